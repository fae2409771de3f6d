// Unit tests for lib/delta_map.h: get/set_range/run across word (32 blocks) and chunk
// boundaries, load, the dirty set (take_dirty/return_dirty), and the compare-and-swap paths
// under threads: concurrent marks of disjoint blocks sharing words all land, and a mark racing
// take_dirty is never lost. Kept small: these also run under TSan.
#include "delta_map.h"

#include <atomic>
#include <set>
#include <thread>

#include "test_util.h"

using namespace layer;

namespace {

constexpr uint64_t kChunk = kBlocksPerChunk;

// The state block b gets from the thread that owns it in the concurrent tests.
BlockState state_for(uint64_t b) { return b % 3 == 0 ? BlockState::kZero : BlockState::kData; }

std::map<uint32_t, ChunkBits> decode_rows(
    const std::vector<std::pair<uint32_t, std::string>>& rows) {
  std::map<uint32_t, ChunkBits> out;
  for (const auto& [c, row] : rows) {
    auto bits = decode_chunk(row);
    REQUIRE(bits.ok());
    REQUIRE(out.count(c) == 0);  // a chunk appears once per round
    out[c] = *bits;
  }
  return out;
}

std::set<uint32_t> chunks_of(const std::vector<std::pair<uint32_t, std::string>>& rows) {
  std::set<uint32_t> out;
  for (const auto& r : rows) out.insert(r.first);
  return out;
}

}  // namespace

TEST_CASE("DeltaMap: a fresh map is all absent and allocates nothing dirty", "[delta_map]") {
  DeltaMap m(3 * kChunk + 100);
  CHECK(m.get(0) == BlockState::kAbsent);
  CHECK(m.get(3 * kChunk + 99) == BlockState::kAbsent);
  CHECK(m.run(0, 3 * kChunk + 100, BlockState::kAbsent) == 3 * kChunk + 100);
  CHECK(m.run(5, 10, BlockState::kAbsent) == 10);
  CHECK(m.run(0, 100, BlockState::kData) == 0);
  CHECK(m.take_dirty().empty());
}

TEST_CASE("DeltaMap: set_range and get across word and chunk boundaries", "[delta_map]") {
  const uint64_t size = 3 * kChunk + 100;  // the last chunk is partial
  DeltaMap m(size);
  BlockMap ref;
  auto set = [&](uint64_t first, uint64_t count, BlockState s) {
    m.set_range(first, count, s);
    for (uint64_t b = first; b < first + count; b++) ref.set(b, s);
  };
  set(31, 2, BlockState::kData);                      // straddles words 0 and 1
  set(64, 32, BlockState::kZero);                     // exactly word 2
  set(100, 1, BlockState::kData);                     // one block mid-word
  set(kChunk - 5, 10, BlockState::kData);             // straddles chunks 0 and 1
  set(kChunk + 200, kChunk + 50, BlockState::kZero);  // chunk 1 to 2, many whole words
  set(kChunk + 300, 40, BlockState::kData);           // overwrites part of the zero run
  set(kChunk + 310, 5, BlockState::kAbsent);          // back to absent inside it
  set(size - 7, 7, BlockState::kData);                // up to the end of the partial chunk
  for (uint64_t b = 0; b < size; b++) {
    INFO("block " << b);
    REQUIRE(m.get(b) == ref.get(b));
  }
  // Neighbours of the edges were left alone.
  CHECK(m.get(30) == BlockState::kAbsent);
  CHECK(m.get(33) == BlockState::kAbsent);
  CHECK(m.get(63) == BlockState::kAbsent);
  CHECK(m.get(96) == BlockState::kAbsent);
  CHECK(m.get(99) == BlockState::kAbsent);
  CHECK(m.get(101) == BlockState::kAbsent);
}

TEST_CASE("DeltaMap::run counts blocks in one state, across words and chunks", "[delta_map]") {
  const uint64_t size = 4 * kChunk;
  DeltaMap m(size);
  m.set_range(10, 2 * kChunk, BlockState::kData);  // whole words in chunk 1, edges in 0 and 2
  m.set_range(3 * kChunk + 7, 3, BlockState::kZero);

  CHECK(m.run(0, size, BlockState::kAbsent) == 10);
  CHECK(m.run(10, size, BlockState::kData) == 2 * kChunk);
  CHECK(m.run(11, size, BlockState::kData) == 2 * kChunk - 1);
  CHECK(m.run(32, size, BlockState::kData) == 2 * kChunk - 22);  // starts on a word
  CHECK(m.run(10, 5, BlockState::kData) == 5);                   // capped by max
  CHECK(m.run(10, 40, BlockState::kData) == 40);                 // capped inside a whole word
  CHECK(m.run(kChunk, kChunk, BlockState::kData) == kChunk);     // a whole chunk
  CHECK(m.run(10, size, BlockState::kZero) == 0);
  // From the end of the data run: absent through the rest of chunk 2 into chunk 3.
  CHECK(m.run(2 * kChunk + 10, size - (2 * kChunk + 10), BlockState::kAbsent) == kChunk - 10 + 7);
  // An absent run over a chunk never touched counts all of it.
  DeltaMap sparse(4 * kChunk);
  sparse.set_range(3 * kChunk + 1, 1, BlockState::kData);
  CHECK(sparse.run(0, 4 * kChunk, BlockState::kAbsent) == 3 * kChunk + 1);
  CHECK(sparse.run(kChunk + 5, 100, BlockState::kAbsent) == 100);
  CHECK(sparse.run(0, 4 * kChunk, BlockState::kData) == 0);
  CHECK(sparse.run(3 * kChunk + 1, kChunk - 1, BlockState::kData) == 1);
  CHECK(m.run(3 * kChunk + 7, kChunk - 7, BlockState::kZero) == 3);
}

TEST_CASE("DeltaMap::load installs rows without making them dirty", "[delta_map]") {
  DeltaMap m(3 * kChunk);
  ChunkBits mixed;
  for (uint32_t i = 0; i < kChunk; i++) mixed.set(i, static_cast<BlockState>(i * 7 % 3));
  m.load(0, mixed);
  m.load(2, ChunkBits(BlockState::kZero));
  for (uint32_t i = 0; i < kChunk; i++) REQUIRE(m.get(i) == mixed.get(i));
  CHECK(m.run(kChunk, kChunk, BlockState::kAbsent) == kChunk);
  CHECK(m.run(2 * kChunk, kChunk, BlockState::kZero) == kChunk);
  CHECK(m.take_dirty().empty());
  // A mark after load makes the chunk dirty, with the loaded states in its row.
  m.set_range(2 * kChunk + 5, 1, BlockState::kData);
  auto rows = decode_rows(m.take_dirty());
  REQUIRE(rows.size() == 1);
  REQUIRE(rows.count(2));
  CHECK(rows[2].get(4) == BlockState::kZero);
  CHECK(rows[2].get(5) == BlockState::kData);
  CHECK(rows[2].get(6) == BlockState::kZero);
}

TEST_CASE("DeltaMap: take_dirty takes each dirty chunk once; return_dirty puts them back",
          "[delta_map]") {
  DeltaMap m(4 * kChunk);
  m.set_range(kChunk - 1, 2, BlockState::kData);  // chunks 0 and 1
  m.set_range(5, 1, BlockState::kZero);           // chunk 0 again: listed once
  m.set_range(3 * kChunk, kChunk, BlockState::kData);
  auto taken = m.take_dirty();
  CHECK(chunks_of(taken) == std::set<uint32_t>{0, 1, 3});
  auto rows = decode_rows(taken);
  CHECK(rows[0].get(kChunk - 1) == BlockState::kData);
  CHECK(rows[0].get(5) == BlockState::kZero);
  CHECK(rows[1].get(0) == BlockState::kData);
  CHECK(rows[1].get(1) == BlockState::kAbsent);
  BlockState u;
  CHECK(rows[3].uniform(&u));
  CHECK(u == BlockState::kData);
  for (const auto& [c, row] : taken)
    CHECK(row.size() == (c == 3 ? 1u : kChunkBytes));  // uniform: 1 byte
  CHECK(m.take_dirty().empty());                       // taken: clean

  // A failed commit returns them; a chunk marked again meanwhile is not listed twice.
  m.set_range(1, 1, BlockState::kData);
  CHECK(m.return_dirty(taken));
  auto again = m.take_dirty();
  CHECK(again.size() == 3);
  CHECK(chunks_of(again) == std::set<uint32_t>{0, 1, 3});
  CHECK(decode_rows(again)[0].get(1) == BlockState::kData);  // rows are copied afresh
  CHECK(m.take_dirty().empty());
}

TEST_CASE("DeltaMap: concurrent marks of disjoint blocks sharing words all land",
          "[delta_map][threads]") {
  // Every word of the first chunks is written by every thread (block b belongs to thread
  // b % kThreads), so the compare-and-swap loop retries, and the chunks are allocated by
  // whichever thread comes first (ensure_chunk's race).
  constexpr unsigned kThreads = 4;
  const uint64_t size = 3 * kChunk + 17;
  for (int round = 0; round < 3; round++) {
    DeltaMap m(size);
    std::atomic<unsigned> ready{0};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; t++) {
      threads.emplace_back([&, t] {
        ready.fetch_add(1);
        while (ready.load() < kThreads) {
        }
        for (uint64_t b = t; b < size; b += kThreads) m.set_range(b, 1, state_for(b));
      });
    }
    for (auto& th : threads) th.join();
    INFO("round " << round);
    for (uint64_t b = 0; b < size; b++) {
      if (m.get(b) != state_for(b)) FAIL("block " << b << " is " << to_string(m.get(b)));
    }
    CHECK(chunks_of(m.take_dirty()) == std::set<uint32_t>{0, 1, 2, 3});
  }
}

TEST_CASE("DeltaMap: a mark racing take_dirty is in a taken row or leaves the chunk dirty",
          "[delta_map][threads]") {
  // Writers mark blocks (each once) while a flusher takes rounds, "commits" them into a model
  // of the index (the last row of a chunk wins, as in LMDB), and now and then fails a commit
  // and returns the rows. After the writers stop, one last round. Every mark must be in the
  // model. (A mark lost between a row's copy and its flag's clearing is mostly hidden here by
  // later marks of the same chunk; the next test aims at that window.)
  const uint64_t seed = test::test_seed("delta_map take_dirty race");
  std::mt19937_64 rng(seed);
  constexpr unsigned kWriters = 3;
  const uint64_t size = 4 * kChunk;
  for (int attempt = 0; attempt < 5; attempt++) {
    DeltaMap m(size);
    std::atomic<unsigned> writers_left{kWriters};
    std::map<uint32_t, ChunkBits> committed;
    unsigned rounds = 0;
    bool return_failed = false;  // return_dirty fails only when out of memory
    const uint64_t flusher_seed = rng();
    std::thread flusher([&] {
      std::mt19937_64 frng(flusher_seed);
      while (writers_left.load() > 0) {
        auto rows = m.take_dirty();
        ++rounds;
        if (!rows.empty() && frng() % 4 == 0) {
          if (!m.return_dirty(rows)) return_failed = true;  // a failed commit
          continue;
        }
        for (auto& [c, bits] : decode_rows(rows)) committed[c] = bits;
      }
    });
    std::vector<std::thread> writers;
    for (unsigned t = 0; t < kWriters; t++) {
      writers.emplace_back([&, t] {
        // Interleaved across every chunk, so marks keep landing in chunks being taken.
        for (uint64_t i = t; i < size; i += kWriters) {
          const uint64_t b = (i % 4) * kChunk + i / 4;
          m.set_range(b, 1, state_for(b));
        }
        writers_left.fetch_sub(1);
      });
    }
    for (auto& th : writers) th.join();
    flusher.join();
    for (auto& [c, bits] : decode_rows(m.take_dirty())) committed[c] = bits;
    INFO("attempt " << attempt << ", flush rounds: " << rounds);
    CHECK_FALSE(return_failed);
    for (uint64_t b = 0; b < size; b++) {
      const auto it = committed.find(static_cast<uint32_t>(b / kChunk));
      const BlockState got = it == committed.end()
                                 ? BlockState::kAbsent
                                 : it->second.get(static_cast<uint32_t>(b % kChunk));
      if (got != state_for(b)) FAIL("block " << b << " committed as " << to_string(got));
    }
    CHECK(m.take_dirty().empty());
  }
}

TEST_CASE("DeltaMap: a mark racing take_dirty of its chunk, started together, is never lost",
          "[delta_map][threads]") {
  // The narrow case, many times: a chunk is dirty; one thread marks another block of it while
  // this one takes the dirty rows (had take_dirty copied a row before clearing the chunk's
  // flag, a mark landing in between would be in no row, and its chunk clean). The mark must be in
  // the taken row, or its chunk must be dirty again (then the next round's row has it). Both are
  // released together each episode, each after a random short spin, so the mark lands before,
  // during or after take_dirty.
  constexpr int kEpisodes = 3000;
  const uint64_t seed = test::test_seed("delta_map mark vs take_dirty");
  DeltaMap m(4 * kChunk);
  auto block_of = [](int e, int which) -> uint64_t {
    return static_cast<uint64_t>(e % 4) * kChunk + static_cast<uint64_t>(e / 4 % 2048) * 2 + which;
  };
  auto spin = [](uint64_t n) {
    std::atomic<uint64_t> sink{0};
    for (uint64_t i = 0; i < n; i++) sink.fetch_add(1, std::memory_order_relaxed);
  };
  std::atomic<int> go{0}, done{0};
  std::thread writer([&] {
    std::mt19937_64 rng(seed);
    for (int e = 1; e <= kEpisodes; e++) {
      const uint64_t jitter = rng() % 512;
      while (go.load() < e) {
      }
      spin(jitter);
      m.set_range(block_of(e, 1), 1, BlockState::kData);
      done.store(e);
    }
  });
  std::mt19937_64 rng(seed + 1);
  int lost = 0, in_row = 0, dirty_again = 0;
  for (int e = 1; e <= kEpisodes; e++) {
    const uint64_t b = block_of(e, 1);
    m.set_range(block_of(e, 0), 1, BlockState::kData);  // the chunk is dirty
    const uint64_t jitter = rng() % 256;
    go.store(e);
    spin(jitter);
    const auto taken = m.take_dirty();
    while (done.load() < e) {
    }
    const auto next = m.take_dirty();
    auto has_mark = [&](const std::vector<std::pair<uint32_t, std::string>>& rows) {
      for (const auto& [c, row] : rows) {
        if (c != b / kChunk) continue;
        auto bits = decode_chunk(row);
        if (bits.ok() && bits->get(static_cast<uint32_t>(b % kChunk)) == BlockState::kData)
          return true;
      }
      return false;
    };
    if (has_mark(taken))
      ++in_row;
    else if (has_mark(next))
      ++dirty_again;
    else
      ++lost;
  }
  writer.join();
  INFO("in the taken row: " << in_row << ", dirty again: " << dirty_again);
  CHECK(lost == 0);
}
