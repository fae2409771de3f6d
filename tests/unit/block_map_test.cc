// Unit tests for lib/block_map.h: the 2-bit block state encoding, ChunkBits, the `maps` row
// encoding and BlockMap.
#include "block_map.h"

#include <set>

#include "test_util.h"

using namespace layer;

TEST_CASE("BlockState values follow the table in block_map.h", "[block_map]") {
  STATIC_REQUIRE(static_cast<int>(BlockState::kAbsent) == 0b00);
  STATIC_REQUIRE(static_cast<int>(BlockState::kData) == 0b01);
  STATIC_REQUIRE(static_cast<int>(BlockState::kZero) == 0b10);
  STATIC_REQUIRE(kBlocksPerChunk == 4096);
  STATIC_REQUIRE(kChunkBytes == 1024);

  std::set<std::string> names;
  for (BlockState s : {BlockState::kAbsent, BlockState::kData, BlockState::kZero}) {
    const char* name = to_string(s);
    REQUIRE(name != nullptr);
    REQUIRE(std::string(name).size() > 0);
    names.insert(name);
  }
  CHECK(names.size() == 3);
}

TEST_CASE("ChunkBits puts block i at bits 2*(i%4) of byte i/4", "[block_map]") {
  ChunkBits bits;
  for (uint32_t i = 0; i < kBlocksPerChunk; i++) REQUIRE(bits.get(i) == BlockState::kAbsent);
  REQUIRE(test::all_zero(bits.data(), kChunkBytes));

  bits.set(0, BlockState::kData);
  CHECK(bits.data()[0] == 0b00000001);
  bits.set(1, BlockState::kZero);
  CHECK(bits.data()[0] == 0b00001001);
  bits.set(3, BlockState::kData);
  CHECK(bits.data()[0] == 0b01001001);
  bits.set(5, BlockState::kZero);
  CHECK(bits.data()[1] == 0b00001000);
  bits.set(4095, BlockState::kZero);
  CHECK(bits.data()[1023] == 0b10000000);

  // Overwriting a state clears its old bits and leaves the neighbours alone.
  bits.set(1, BlockState::kData);
  CHECK(bits.data()[0] == 0b01000101);
  bits.set(1, BlockState::kAbsent);
  CHECK(bits.data()[0] == 0b01000001);
  CHECK(bits.get(0) == BlockState::kData);
  CHECK(bits.get(1) == BlockState::kAbsent);
  CHECK(bits.get(2) == BlockState::kAbsent);
  CHECK(bits.get(3) == BlockState::kData);
  CHECK(bits.get(5) == BlockState::kZero);
  CHECK(bits.get(4095) == BlockState::kZero);
  CHECK(bits.get(4094) == BlockState::kAbsent);

  // Only the touched bytes changed.
  for (uint32_t b = 2; b < 1023; b++) REQUIRE(bits.data()[b] == 0);
}

TEST_CASE("ChunkBits fill and uniform", "[block_map]") {
  BlockState st = BlockState::kData;
  ChunkBits empty;
  REQUIRE(empty.uniform(&st));
  CHECK(st == BlockState::kAbsent);

  for (BlockState s : {BlockState::kAbsent, BlockState::kData, BlockState::kZero}) {
    ChunkBits bits;
    bits.set(17, BlockState::kData);
    bits.set(18, BlockState::kZero);
    bits.fill(s);
    for (uint32_t i = 0; i < kBlocksPerChunk; i++) REQUIRE(bits.get(i) == s);
    const uint8_t expect_byte = static_cast<uint8_t>(static_cast<unsigned>(s) * 0x55);
    for (uint32_t b = 0; b < kChunkBytes; b++) REQUIRE(bits.data()[b] == expect_byte);
    BlockState got = s == BlockState::kZero ? BlockState::kAbsent : BlockState::kZero;
    REQUIRE(bits.uniform(&got));
    CHECK(got == s);

    ChunkBits ctor(s);
    REQUIRE(ctor.uniform(&got));
    CHECK(got == s);

    // One different block anywhere (first, middle, last) breaks uniformity.
    for (uint32_t i : {0u, 2047u, 4095u}) {
      ChunkBits one = bits;
      one.set(i, s == BlockState::kData ? BlockState::kZero : BlockState::kData);
      CHECK_FALSE(one.uniform(&got));
    }
  }
}

TEST_CASE("encode_chunk: 1 byte when uniform, 1024 bytes otherwise", "[block_map]") {
  for (BlockState s : {BlockState::kAbsent, BlockState::kData, BlockState::kZero}) {
    std::string row = encode_chunk(ChunkBits(s));
    REQUIRE(row.size() == 1);
    CHECK(static_cast<uint8_t>(row[0]) == static_cast<uint8_t>(s));
    ChunkBits back = MUST(decode_chunk(row));
    BlockState got;
    REQUIRE(back.uniform(&got));
    CHECK(got == s);
  }

  ChunkBits mixed(BlockState::kData);
  mixed.set(100, BlockState::kZero);
  mixed.set(4095, BlockState::kAbsent);
  std::string row = encode_chunk(mixed);
  REQUIRE(row.size() == kChunkBytes);
  REQUIRE(std::memcmp(row.data(), mixed.data(), kChunkBytes) == 0);
  ChunkBits back = MUST(decode_chunk(row));
  REQUIRE(std::memcmp(back.data(), mixed.data(), kChunkBytes) == 0);
}

TEST_CASE("encode_chunk/decode_chunk round trip random chunks", "[block_map]") {
  const uint64_t seed = test::test_seed("block_map random round trip");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 200; iter++) {
    ChunkBits bits;
    const int density = static_cast<int>(rng() % 4);  // 0: very sparse .. 3: dense
    for (uint32_t i = 0; i < kBlocksPerChunk; i++) {
      if (static_cast<int>(rng() % 8) <= density * 2)
        bits.set(i, static_cast<BlockState>(rng() % 3));
    }
    const std::string row = encode_chunk(bits);
    BlockState st;
    REQUIRE(row.size() == (bits.uniform(&st) ? 1u : kChunkBytes));
    ChunkBits back = MUST(decode_chunk(row));
    for (uint32_t i = 0; i < kBlocksPerChunk; i++) REQUIRE(back.get(i) == bits.get(i));
  }
}

TEST_CASE("decode_chunk rejects wrong sizes and the invalid state 11 with EIO", "[block_map]") {
  for (size_t n : {0u, 2u, 3u, 512u, 1023u, 1025u, 2048u}) {
    INFO("row size " << n);
    REQUIRE_ERRNO(decode_chunk(std::string(n, '\0')), EIO);
  }
  // A 1-byte row holds one state: 3 (11) is invalid, and so is anything above.
  for (int v : {3, 4, 0x55, 0xFF}) {
    INFO("uniform row byte " << v);
    REQUIRE_ERRNO(decode_chunk(std::string(1, static_cast<char>(v))), EIO);
  }
  // A 1 KiB row with one block in state 11, at the first, a middle and the last block.
  for (uint32_t block : {0u, 1u, 2u, 3u, 1000u, 4095u}) {
    INFO("invalid state at block " << block);
    std::string row(kChunkBytes, '\0');
    row[block / 4] = static_cast<char>(3u << ((block % 4) * 2));
    REQUIRE_ERRNO(decode_chunk(row), EIO);
  }
  std::string all_invalid(kChunkBytes, '\xFF');
  REQUIRE_ERRNO(decode_chunk(all_invalid), EIO);
  // A valid 1 KiB row that happens to be uniform still decodes.
  ChunkBits ok = MUST(decode_chunk(std::string(kChunkBytes, '\x55')));
  BlockState st;
  REQUIRE(ok.uniform(&st));
  CHECK(st == BlockState::kData);
}

TEST_CASE("BlockMap get/set/count across chunks", "[block_map]") {
  BlockMap map;
  CHECK(map.empty());
  CHECK(map.get(0) == BlockState::kAbsent);
  CHECK(map.get(123456789) == BlockState::kAbsent);
  CHECK(map.count(BlockState::kData) == 0);

  const uint64_t far = uint64_t{kBlocksPerChunk} * 1000000 + 7;  // chunk 1,000,000
  map.set(0, BlockState::kData);
  map.set(4095, BlockState::kData);
  map.set(4096, BlockState::kZero);
  map.set(far, BlockState::kData);
  CHECK_FALSE(map.empty());
  CHECK(map.get(0) == BlockState::kData);
  CHECK(map.get(1) == BlockState::kAbsent);
  CHECK(map.get(4095) == BlockState::kData);
  CHECK(map.get(4096) == BlockState::kZero);
  CHECK(map.get(4097) == BlockState::kAbsent);
  CHECK(map.get(far) == BlockState::kData);
  CHECK(map.get(far - 1) == BlockState::kAbsent);
  CHECK(map.count(BlockState::kData) == 3);
  CHECK(map.count(BlockState::kZero) == 1);

  REQUIRE(map.chunks().size() == 3);
  CHECK(map.chunks().count(0) == 1);
  CHECK(map.chunks().count(1) == 1);
  CHECK(map.chunks().count(1000000) == 1);
  CHECK(map.chunks().at(1).get(0) == BlockState::kZero);

  map.set(0, BlockState::kZero);
  CHECK(map.count(BlockState::kData) == 2);
  CHECK(map.count(BlockState::kZero) == 2);

  ChunkBits full(BlockState::kZero);
  map.set_chunk(5, full);
  CHECK(map.get(5 * uint64_t{kBlocksPerChunk}) == BlockState::kZero);
  CHECK(map.get(6 * uint64_t{kBlocksPerChunk} - 1) == BlockState::kZero);
  CHECK(map.get(6 * uint64_t{kBlocksPerChunk}) == BlockState::kAbsent);
  CHECK(map.count(BlockState::kZero) == 2 + kBlocksPerChunk);
  CHECK(map.count(BlockState::kData) == 2);
}

TEST_CASE("BlockMap matches a plain model under random sets", "[block_map]") {
  const uint64_t seed = test::test_seed("block_map model");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  BlockMap map;
  std::map<uint64_t, BlockState> model;
  const uint64_t span = 5 * uint64_t{kBlocksPerChunk};
  for (int i = 0; i < 20000; i++) {
    const uint64_t b = rng() % span;
    const auto s = static_cast<BlockState>(rng() % 3);
    map.set(b, s);
    model[b] = s;
  }
  uint64_t data = 0, zero = 0;
  for (uint64_t b = 0; b < span; b++) {
    auto it = model.find(b);
    const BlockState want = it == model.end() ? BlockState::kAbsent : it->second;
    REQUIRE(map.get(b) == want);
    data += want == BlockState::kData;
    zero += want == BlockState::kZero;
  }
  CHECK(map.count(BlockState::kData) == data);
  CHECK(map.count(BlockState::kZero) == zero);
}
