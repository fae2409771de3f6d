// block_map.cc — 2-bit block states, chunk rows and a sparse in-memory layer map.
//
// A `maps` row is the raw 1 KiB of a chunk's bits, or one byte holding the state shared by all
// its blocks (the common case for imported and sequentially written data, which keeps the index
// small: DESIGN.md "Index"). Rows come from disk, so decode_chunk validates every block.
#include "block_map.h"

#include "index.h"

#include <cstring>

namespace layer {

const char* to_string(BlockState state) {
  switch (state) {
    case BlockState::kAbsent:
      return "absent";
    case BlockState::kData:
      return "data";
    case BlockState::kZero:
      return "zero";
  }
  return "invalid";
}

namespace {
uint8_t fill_byte(BlockState s) {
  const unsigned v = static_cast<unsigned>(s);
  return static_cast<uint8_t>(v | v << 2 | v << 4 | v << 6);
}
}  // namespace

void ChunkBits::fill(BlockState s) { bytes_.fill(fill_byte(s)); }

bool ChunkBits::uniform(BlockState* state) const {
  const uint8_t first = bytes_[0];
  const unsigned s = first & 3;
  if (first != fill_byte(static_cast<BlockState>(s))) return false;
  for (uint8_t b : bytes_)
    if (b != first) return false;
  *state = static_cast<BlockState>(s);
  return true;
}

std::string encode_chunk(const ChunkBits& bits) {
  BlockState s;
  if (bits.uniform(&s)) return std::string(1, static_cast<char>(s));
  return std::string(reinterpret_cast<const char*>(bits.data()), kChunkBytes);
}

Result<ChunkBits> decode_chunk(std::string_view row) {
  if (row.size() == 1) {
    const auto s = static_cast<uint8_t>(row[0]);
    if (s > static_cast<uint8_t>(BlockState::kZero))
      return make_error(EIO, "map row: invalid uniform state {}", s);
    return ChunkBits(static_cast<BlockState>(s));
  }
  if (row.size() != kChunkBytes)
    return make_error(EIO, "map row: {} bytes, expected 1 or {}", row.size(), kChunkBytes);
  ChunkBits bits;
  std::memcpy(bits.data(), row.data(), kChunkBytes);
  // State 11 in any position: some 2-bit field has both bits set.
  for (uint32_t i = 0; i < kChunkBytes; ++i) {
    const uint8_t b = bits.data()[i];
    if ((b & (b >> 1) & 0x55) != 0)
      return make_error(EIO, "map row: invalid block state 11 near block {}", i * 4);
  }
  return bits;
}

BlockState BlockMap::get(uint64_t block_no) const {
  auto it = chunks_.find(static_cast<uint32_t>(block_no / kBlocksPerChunk));
  if (it == chunks_.end()) return BlockState::kAbsent;
  return it->second.get(static_cast<uint32_t>(block_no % kBlocksPerChunk));
}

void BlockMap::set(uint64_t block_no, BlockState s) {
  const auto chunk = static_cast<uint32_t>(block_no / kBlocksPerChunk);
  auto it = chunks_.find(chunk);
  if (it == chunks_.end()) {
    if (s == BlockState::kAbsent) return;
    it = chunks_.emplace(chunk, ChunkBits()).first;
  }
  it->second.set(static_cast<uint32_t>(block_no % kBlocksPerChunk), s);
}

uint64_t BlockMap::count(BlockState s) const {
  uint64_t n = 0;
  for (const auto& [no, bits] : chunks_) {
    BlockState u;
    if (bits.uniform(&u)) {
      if (u == s) n += kBlocksPerChunk;
      continue;
    }
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) n += bits.get(i) == s;
  }
  return n;
}

Status for_each_map_row(ReadTxn& txn, uint64_t id,
                        const std::function<Result<bool>(uint32_t, const ChunkBits&)>& fn) {
  return txn.scan(
      Db::kMaps, key_u64(id), [&](std::string_view key, std::string_view value) -> Result<bool> {
        auto parsed = decode_key_u64_u32(key);
        if (!parsed) return make_error(EIO, "layer {}: map key of {} bytes", id, key.size());
        auto bits = decode_chunk(value);
        if (!bits)
          return make_error(EIO, "layer {} chunk {}: {}", id, parsed->second, bits.error().message);
        return fn(parsed->second, *bits);
      });
}

}  // namespace layer
