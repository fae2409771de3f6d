// block_map.h — block states and a layer's block map, chunked as in the `maps` db.
//
// A block is in one of three states (2 bits each, 4 per byte, block i of a chunk at bits
// 2*(i%4) of byte i/4):
//   | bits | state  | meaning                                                   |
//   |------|--------|-----------------------------------------------------------|
//   |  00  | absent | this layer says nothing: look lower (absent everywhere = 0)|
//   |  01  | data   | the layer file holds the block at offset block_no*bs      |
//   |  10  | zero   | tombstone: reads as zeroes, hides lower data, stores nothing|
//   |  11  | —      | invalid: a row holding it is corrupt                      |
// A chunk is kBlocksPerChunk blocks. Its `maps` row is 1 KiB of bits, or 1 byte (the state)
// when all 4096 blocks share it; no row means all absent.
//
// Thread-safety: ChunkBits and BlockMap are plain values (callers synchronize).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "error.h"

namespace layer {

enum class BlockState : uint8_t { kAbsent = 0, kData = 1, kZero = 2 };
const char* to_string(BlockState state);

constexpr uint32_t kBlocksPerChunk = 4096;
constexpr uint32_t kChunkBytes = kBlocksPerChunk / 4;  // 1 KiB

class ChunkBits {
 public:
  ChunkBits() { bytes_.fill(0); }
  explicit ChunkBits(BlockState all) { fill(all); }

  BlockState get(uint32_t i) const {
    return static_cast<BlockState>((bytes_[i >> 2] >> ((i & 3) * 2)) & 3);
  }
  void set(uint32_t i, BlockState s) {
    uint8_t& b = bytes_[i >> 2];
    const unsigned shift = (i & 3) * 2;
    b = static_cast<uint8_t>((b & ~(3u << shift)) | (static_cast<unsigned>(s) << shift));
  }
  void fill(BlockState s);
  // True (and *state set) when every block has the same state.
  bool uniform(BlockState* state) const;
  const uint8_t* data() const { return bytes_.data(); }
  uint8_t* data() { return bytes_.data(); }

 private:
  std::array<uint8_t, kChunkBytes> bytes_;
};

// Encodes a chunk as its `maps` row value (1 byte when uniform, else 1 KiB).
std::string encode_chunk(const ChunkBits& bits);
// Decodes a `maps` row value. Errors: EIO when the size is neither 1 nor 1024 or a block
// holds the invalid state 11.
Result<ChunkBits> decode_chunk(std::string_view row);

class ReadTxn;

// Calls fn(chunk, bits) for each `maps` row of layer `id`, in chunk order, until fn returns
// false: the one walk of a layer's rows (counting, chain maps, delta maps, merges, diff).
// Errors: EIO naming the layer and chunk for a bad key or row; fn's own.
Status for_each_map_row(ReadTxn& txn, uint64_t id,
                        const std::function<Result<bool>(uint32_t, const ChunkBits&)>& fn);

// A whole layer's map in memory, sparse by chunk (absent chunks are not stored).
class BlockMap {
 public:
  BlockState get(uint64_t block_no) const;
  void set(uint64_t block_no, BlockState s);
  void set_chunk(uint32_t chunk_no, const ChunkBits& bits) { chunks_[chunk_no] = bits; }
  const std::map<uint32_t, ChunkBits>& chunks() const { return chunks_; }
  bool empty() const { return chunks_.empty(); }
  // Number of blocks in state `s` (absent is not counted).
  uint64_t count(BlockState s) const;

 private:
  std::map<uint32_t, ChunkBits> chunks_;
};

}  // namespace layer
