// Unit tests for lib/chain.h: ChainMap::build from `maps` rows, lookup (topmost non-absent
// layer wins, zero tombstones hide lower data), run_length, depth limit, corrupt rows, and
// ChainCache sharing.
#include "chain.h"

#include <thread>

#include "disk.h"
#include "index.h"
#include "test_util.h"

using namespace layer;

namespace {

constexpr uint64_t kChunk = kBlocksPerChunk;

struct ChainFixture {
  test::TempDir dir;
  std::unique_ptr<Index> index;

  ChainFixture() {
    Index::Options opt;
    opt.create = true;
    index = MUST(Index::open(dir.path(), opt));
  }

  LayerRecord make_layer(LayerId id, LayerId parent, uint64_t size_blocks) {
    LayerRecord r;
    r.id = id;
    r.parent = parent;
    r.size_bytes = size_blocks * 4096;
    r.block_size = 4096;
    r.state = LayerState::kFrozen;
    r.refcount = 1;
    return r;
  }

  // Writes the layer row and its map rows (one per chunk present in `map`).
  void write_layer(const LayerRecord& layer, const BlockMap& map) {
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kLayers, key_u64(layer.id), encode(layer)));
    for (const auto& [chunk_no, bits] : map.chunks()) {
      REQUIRE_OK(txn.put(Db::kMaps, key_u64_u32(layer.id, chunk_no), encode_chunk(bits)));
    }
    REQUIRE_OK(txn.commit());
  }

  std::shared_ptr<const ChainMap> build(const std::vector<LayerRecord>& layers,
                                        uint64_t size_blocks) {
    ReadTxn txn = MUST(index->begin_read());
    return MUST(ChainMap::build(txn, layers, size_blocks));
  }
};

// The reference: walk the layers top first.
Source expected_source(const std::vector<BlockMap>& maps, uint64_t block) {
  for (size_t k = 0; k < maps.size(); k++) {
    const BlockState s = maps[k].get(block);
    if (s == BlockState::kData) return static_cast<Source>(k);
    if (s == BlockState::kZero) return kSourceZero;
  }
  return kSourceAbsent;
}

}  // namespace

TEST_CASE("ChainMap: topmost non-absent layer wins, zero hides lower data", "[chain]") {
  ChainFixture f;
  const uint64_t size_blocks = 3 * kChunk + 100;  // the last chunk is partial

  // bottom (index 2): data 0..99, all of chunk 1 (a 1-byte uniform row), data in chunk 3.
  BlockMap bottom;
  for (uint64_t b = 0; b < 100; b++) bottom.set(b, BlockState::kData);
  bottom.set_chunk(1, ChunkBits(BlockState::kData));
  for (uint64_t b = 3 * kChunk; b < 3 * kChunk + 50; b++) bottom.set(b, BlockState::kData);
  // middle (index 1): zero 10..19 (hides bottom), data 50..59, zero all of chunk 1 except 5.
  BlockMap middle;
  for (uint64_t b = 10; b < 20; b++) middle.set(b, BlockState::kZero);
  for (uint64_t b = 50; b < 60; b++) middle.set(b, BlockState::kData);
  {
    ChunkBits c(BlockState::kZero);
    c.set(5, BlockState::kAbsent);
    middle.set_chunk(1, c);
  }
  // top (index 0): data at 15 (over middle's zero), zero at 55 (over middle's data), data at
  // 200 (over nothing).
  BlockMap top;
  top.set(15, BlockState::kData);
  top.set(55, BlockState::kZero);
  top.set(200, BlockState::kData);

  const LayerRecord l_bottom = f.make_layer(10, 0, size_blocks);
  const LayerRecord l_middle = f.make_layer(11, 10, size_blocks);
  const LayerRecord l_top = f.make_layer(12, 11, size_blocks);
  f.write_layer(l_bottom, bottom);
  f.write_layer(l_middle, middle);
  f.write_layer(l_top, top);

  auto map = f.build({l_top, l_middle, l_bottom}, size_blocks);
  REQUIRE(map->layers().size() == 3);
  CHECK(map->layers()[0].id == 12);
  CHECK(map->layers()[2].id == 10);
  CHECK(map->size_blocks() == size_blocks);

  CHECK(map->lookup(0) == 2);
  CHECK(map->lookup(9) == 2);
  CHECK(map->lookup(10) == kSourceZero);
  CHECK(map->lookup(14) == kSourceZero);
  CHECK(map->lookup(15) == 0);
  CHECK(map->lookup(16) == kSourceZero);
  CHECK(map->lookup(20) == 2);
  CHECK(map->lookup(50) == 1);
  CHECK(map->lookup(55) == kSourceZero);
  CHECK(map->lookup(59) == 1);
  CHECK(map->lookup(60) == 2);
  CHECK(map->lookup(99) == 2);
  CHECK(map->lookup(100) == kSourceAbsent);
  CHECK(map->lookup(200) == 0);
  CHECK(map->lookup(kChunk - 1) == kSourceAbsent);
  CHECK(map->lookup(kChunk) == kSourceZero);
  CHECK(map->lookup(kChunk + 5) == 2);
  CHECK(map->lookup(2 * kChunk - 1) == kSourceZero);
  CHECK(map->lookup(2 * kChunk) == kSourceAbsent);
  CHECK(map->lookup(3 * kChunk) == 2);
  CHECK(map->lookup(3 * kChunk + 49) == 2);
  CHECK(map->lookup(3 * kChunk + 50) == kSourceAbsent);
  // Beyond the map: absent.
  CHECK(map->lookup(100 * kChunk) == kSourceAbsent);

  // The same layers in another order resolve differently (order is the chain's, not ids').
  auto flipped = f.build({l_bottom, l_middle, l_top}, size_blocks);
  CHECK(flipped->lookup(15) == 0);  // bottom (now index 0) has data at 15
  CHECK(flipped->lookup(10) == 0);
  CHECK(flipped->lookup(55) == 0);
  CHECK(flipped->lookup(200) == 2);
  CHECK(flipped->lookup(kChunk + 5) == 0);
}

TEST_CASE("ChainMap::run_length coalesces runs, across chunks too", "[chain]") {
  ChainFixture f;
  const uint64_t size_blocks = 4 * kChunk;
  BlockMap lower;
  lower.set_chunk(0, ChunkBits(BlockState::kData));
  lower.set_chunk(1, ChunkBits(BlockState::kData));
  for (uint64_t b = 2 * kChunk; b < 2 * kChunk + 10; b++) lower.set(b, BlockState::kData);
  BlockMap upper;
  upper.set(kChunk + 100, BlockState::kZero);
  for (uint64_t b = 3 * kChunk + 7; b < 3 * kChunk + 17; b++) upper.set(b, BlockState::kData);
  const LayerRecord l_lower = f.make_layer(1, 0, size_blocks);
  const LayerRecord l_upper = f.make_layer(2, 1, size_blocks);
  f.write_layer(l_lower, lower);
  f.write_layer(l_upper, upper);
  auto map = f.build({l_upper, l_lower}, size_blocks);

  CHECK(map->run_length(0, size_blocks) == kChunk + 100);
  CHECK(map->run_length(0, 10) == 10);
  CHECK(map->run_length(kChunk - 3, 1000) == 103);
  CHECK(map->run_length(kChunk + 100, 1000) == 1);
  CHECK(map->run_length(kChunk + 101, size_blocks - (kChunk + 101)) == kChunk - 101 + 10);
  CHECK(map->run_length(2 * kChunk + 10, size_blocks - (2 * kChunk + 10)) == kChunk - 10 + 7);
  CHECK(map->run_length(3 * kChunk + 7, 100) == 10);
  CHECK(map->run_length(3 * kChunk + 17, kChunk - 17) == kChunk - 17);
  CHECK(map->run_length(5, 1) == 1);
}

TEST_CASE("ChainMap matches a reference on random chains", "[chain]") {
  const uint64_t seed = test::test_seed("chain random");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 3; round++) {
    ChainFixture f;
    const size_t depth = 1 + rng() % 8;
    const uint64_t size_blocks = 3 * kChunk + rng() % kChunk;
    std::vector<BlockMap> maps(depth);
    std::vector<LayerRecord> layers;
    for (size_t k = 0; k < depth; k++) {
      BlockMap& m = maps[k];
      for (uint32_t c = 0; c < 4; c++) {
        switch (rng() % 5) {
          case 0:
            break;  // no row: absent
          case 1:
            m.set_chunk(c, ChunkBits(static_cast<BlockState>(rng() % 3)));
            break;
          default: {
            // Runs of random states, some long.
            uint64_t b = c * kChunk;
            while (b < (c + 1) * kChunk) {
              const uint64_t max_len = rng() % 2 ? 8 : 600;
              const uint64_t len = 1 + rng() % max_len;
              const auto s = static_cast<BlockState>(rng() % 3);
              for (uint64_t i = 0; i < len && b < (c + 1) * kChunk; i++, b++) m.set(b, s);
            }
          }
        }
      }
      layers.push_back(f.make_layer(100 + k, k + 1 < depth ? 101 + k : 0, size_blocks));
      f.write_layer(layers.back(), m);
    }
    auto map = f.build(layers, size_blocks);
    INFO("round " << round << " depth " << depth);
    for (uint64_t b = 0; b < size_blocks; b++) {
      INFO("block " << b);
      REQUIRE(map->lookup(b) == expected_source(maps, b));
    }
    // Stacked one layer at a time from the bottom (as snapshots make it): the same map.
    {
      ReadTxn txn = MUST(f.index->begin_read());
      auto stacked = MUST(ChainMap::build(txn, {layers.back()}, size_blocks));
      for (size_t k = depth - 1; k-- > 0;)
        stacked = MUST(ChainMap::stack(txn, layers[k], *stacked, size_blocks));
      REQUIRE(stacked->layers().size() == depth);
      for (uint64_t b = 0; b < size_blocks; b++) {
        INFO("stacked, block " << b);
        REQUIRE(stacked->lookup(b) == map->lookup(b));
      }
      for (int i = 0; i < 200; i++) {
        const uint64_t b = rng() % size_blocks;
        const uint64_t max = 1 + rng() % (size_blocks - b);
        REQUIRE(stacked->run_length(b, max) == map->run_length(b, max));
      }
    }
    for (int i = 0; i < 2000; i++) {
      const uint64_t b = rng() % size_blocks;
      const uint64_t max = 1 + rng() % (size_blocks - b);
      uint64_t want = 0;
      const Source s = expected_source(maps, b);
      while (want < max && expected_source(maps, b + want) == s) want++;
      INFO("run_length(" << b << ", " << max << ")");
      REQUIRE(map->run_length(b, max) == want);
    }
  }
}

TEST_CASE("ChainMap depth limit", "[chain]") {
  ChainFixture f;
  std::vector<LayerRecord> layers;
  for (size_t k = 0; k < kMaxChainDepth; k++) layers.push_back(f.make_layer(1000 + k, 0, 8));
  BlockMap bottom;
  bottom.set(3, BlockState::kData);
  f.write_layer(layers.back(), bottom);
  {
    auto map = f.build(layers, 8);  // exactly the limit: fine
    CHECK(map->lookup(3) == kMaxChainDepth - 1);
    CHECK(map->lookup(2) == kSourceAbsent);
  }
  layers.push_back(f.make_layer(5000, 0, 8));
  ReadTxn txn = MUST(f.index->begin_read());
  REQUIRE_ERRNO(ChainMap::build(txn, layers, 8), EIO);
}

TEST_CASE("ChainMap::build rejects a corrupt map row with EIO", "[chain]") {
  ChainFixture f;
  const LayerRecord layer = f.make_layer(7, 0, 2 * kChunk);
  {
    WriteTxn txn = MUST(f.index->begin_write());
    REQUIRE_OK(txn.put(Db::kLayers, key_u64(7), encode(layer)));
    REQUIRE_OK(txn.put(Db::kMaps, key_u64_u32(7, 1), "12345"));  // neither 1 nor 1024 bytes
    REQUIRE_OK(txn.commit());
  }
  ReadTxn txn = MUST(f.index->begin_read());
  auto r = ChainMap::build(txn, {layer}, 2 * kChunk);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EIO);
  CHECK_THAT(r.error().message, Catch::Contains("7"));
}

TEST_CASE("ChainMap of an empty chain or a layer without rows is all absent", "[chain]") {
  ChainFixture f;
  const LayerRecord layer = f.make_layer(3, 0, 100);
  f.write_layer(layer, BlockMap{});
  auto map = f.build({layer}, 100);
  for (uint64_t b = 0; b < 100; b++) REQUIRE(map->lookup(b) == kSourceAbsent);
  CHECK(map->run_length(0, 100) == 100);
  auto empty = f.build({}, 100);
  CHECK(empty->lookup(0) == kSourceAbsent);
  CHECK(empty->run_length(0, 100) == 100);
}

TEST_CASE("ChainCache shares one map per chain, sized to the chain", "[chain]") {
  ChainFixture f;
  BlockMap m;
  m.set(1, BlockState::kData);
  const LayerRecord a = f.make_layer(1, 0, 64);
  const LayerRecord b = f.make_layer(2, 0, 64);
  f.write_layer(a, m);
  f.write_layer(b, m);

  ChainCache cache;
  ReadTxn txn = MUST(f.index->begin_read());
  auto first = MUST(cache.get(txn, {a}));
  auto second = MUST(cache.get(txn, {a}));
  CHECK(first.get() == second.get());
  CHECK(first->lookup(1) == 0);
  CHECK(first->size_blocks() == 64);

  auto other_chain = MUST(cache.get(txn, {b}));
  CHECK(other_chain.get() != first.get());
  CHECK(other_chain->layers()[0].id == 2);
  CHECK(cache.resident() == 2);

  // Lingering: after every user let go, the same map comes back (default linger is seconds).
  const ChainMap* raw = first.get();
  std::weak_ptr<const ChainMap> weak = first;
  first.reset();
  second.reset();
  CHECK_FALSE(weak.expired());
  auto again = MUST(cache.get(txn, {a}));
  CHECK(again.get() == raw);
}

TEST_CASE("ChainCache: disks of different sizes on one chain share its map", "[chain]") {
  // As clones of one image with different --size: the disks' sizes are not part of the key.
  test::PoolFixture p;
  const uint64_t image_bytes = 17 * 4096;  // well inside one chunk of the map
  const auto content = p.import("base:1", image_bytes, 4096, 7);
  MUST(p.pool->clone("base:1", "small", std::nullopt));
  MUST(p.pool->clone("base:1", "big", 3 * kChunk * 4096));  // chunks the chain does not have
  auto small = MUST(Disk::open(*p.pool, "small", true));
  auto big = MUST(Disk::open(*p.pool, "big", true));
  CHECK(p.pool->chains().resident() == 0);  // maps are built on first I/O, not at open
  std::vector<uint8_t> buf(image_bytes);
  MUST(small->read(buf.data(), buf.size(), 0));
  CHECK(buf == content);
  CHECK(p.pool->chains().resident() == 1);
  std::fill(buf.begin(), buf.end(), 0xAA);
  MUST(big->read(buf.data(), buf.size(), 0));
  CHECK(buf == content);
  CHECK(p.pool->chains().resident() == 1);
  // Past the chain, the big disk reads zeroes: across the chain's end, and in later chunks.
  std::vector<uint8_t> edge(2 * 4096, 0xAA);
  MUST(big->read(edge.data(), edge.size(), image_bytes - 4096));
  CHECK(std::equal(edge.begin(), edge.begin() + 4096, content.end() - 4096));
  CHECK(test::all_zero(edge.data() + 4096, 4096));
  std::fill(edge.begin(), edge.end(), 0xAA);
  MUST(big->read(edge.data(), edge.size(), 2 * kChunk * 4096 + 4096));
  CHECK(test::all_zero(edge.data(), edge.size()));
}

TEST_CASE("ChainCache frees a map after its linger without another lookup", "[chain]") {
  using namespace std::chrono_literals;
  ChainFixture f;
  BlockMap m;
  m.set(1, BlockState::kData);
  const LayerRecord a = f.make_layer(1, 0, 64);
  f.write_layer(a, m);

  ChainCache cache(20ms);
  std::weak_ptr<const ChainMap> weak;
  {
    ReadTxn txn = MUST(f.index->begin_read());
    auto map = MUST(cache.get(txn, {a}));
    weak = map;
    CHECK(cache.resident() == 1);
  }
  // The last user let go; nothing looks the map up again. Polled, not slept on: the reaper
  // frees it between one and one and a half lingers later.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!weak.expired() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(5ms);
  CHECK(weak.expired());
  CHECK(cache.resident() == 0);

  // A map in use stays cached however long it is held (users' references keep it alive
  // anyway: this checks that the cache keeps its own, so the next disk shares it).
  {
    ReadTxn txn = MUST(f.index->begin_read());
    auto map = MUST(cache.get(txn, {a}));
    std::this_thread::sleep_for(100ms);  // five lingers, while held
    CHECK(cache.resident() == 1);
    CHECK(MUST(cache.get(txn, {a})).get() == map.get());
  }
}

TEST_CASE("ChainCache never reuses a map for a different chain under the same top layer",
          "[chain]") {
  // A merge that re-parents a frozen layer keeps its id: the cached map of its old chain
  // (whose layer indexes reach further down) must not be served for the new one.
  ChainFixture f;
  BlockMap top_map, low_map;
  top_map.set(1, BlockState::kData);
  low_map.set(2, BlockState::kData);
  const LayerRecord low = f.make_layer(1, 0, 64);
  const LayerRecord top = f.make_layer(2, 1, 64);
  f.write_layer(low, low_map);
  f.write_layer(top, top_map);
  ChainCache cache;
  ReadTxn txn = MUST(f.index->begin_read());
  auto deep = MUST(cache.get(txn, {top, low}));
  CHECK(deep->lookup(2) == 1);
  auto shallow = MUST(cache.get(txn, {top}));  // same top id, chain without `low`
  CHECK(shallow.get() != deep.get());
  CHECK(shallow->layers().size() == 1);
  CHECK(shallow->lookup(2) == kSourceAbsent);
  CHECK(shallow->lookup(1) == 0);
  CHECK(deep->lookup(2) == 1);  // its users keep the old map
}
