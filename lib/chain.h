// chain.h — the chain map: which layer of a frozen chain holds each block, resolved once, so
// that a lookup is two array reads whatever the chain's depth (DESIGN.md "Read path").
//
// A chain is an ordered list of frozen layers, top first (index 0 = top). For each chunk of
// kBlocksPerChunk blocks the map keeps either one source for the whole chunk (layer index,
// kSourceZero or kSourceAbsent) or a shared, immutable array of 4096 sources.
// Depth is limited to kMaxChainDepth layers.
//
// Thread-safety: a ChainMap is immutable once built and shared by every open disk on the same
// chain; ChainCache is safe for concurrent use.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "block_map.h"
#include "error.h"
#include "records.h"

namespace layer {

class ReadTxn;

using Source = uint8_t;
constexpr Source kSourceZero = 0xFE;    // a zero tombstone is topmost: reads as zeroes
constexpr Source kSourceAbsent = 0xFF;  // absent in every layer: reads as zeroes
constexpr size_t kMaxChainDepth = 250;

class ChainMap {
 public:
  // Builds the map of `layers` (top first; all frozen) covering size_blocks blocks from their
  // `maps` rows. Errors: EIO (corrupt row), EINVAL (depth over kMaxChainDepth).
  static Result<std::shared_ptr<const ChainMap>> build(ReadTxn& txn,
                                                       const std::vector<LayerRecord>& layers,
                                                       uint64_t size_blocks);

  // The source of block_no: an index into layers(), kSourceZero or kSourceAbsent.
  Source lookup(uint64_t block_no) const {
    const uint64_t chunk = block_no / kBlocksPerChunk;
    if (chunk >= chunks_.size()) return kSourceAbsent;
    const Entry& e = chunks_[chunk];
    return e.mixed ? (*e.mixed)[block_no % kBlocksPerChunk] : e.uniform;
  }
  // Number of blocks from block_no (at most max_blocks) with the same source as block_no.
  uint64_t run_length(uint64_t block_no, uint64_t max_blocks) const;

  const std::vector<LayerRecord>& layers() const { return layers_; }
  uint64_t size_blocks() const { return size_blocks_; }

 private:
  struct Entry {
    Source uniform = kSourceAbsent;
    std::shared_ptr<const std::array<Source, kBlocksPerChunk>> mixed;  // null when uniform
  };
  std::vector<LayerRecord> layers_;
  std::vector<Entry> chunks_;
  uint64_t size_blocks_ = 0;
};

// Shares chain maps between open disks: keyed by the chain's top layer id and size; an entry
// lives while a disk uses it and for `linger` after (so a reconnect does not rebuild it).
class ChainCache {
 public:
  explicit ChainCache(std::chrono::milliseconds linger = std::chrono::seconds(5))
      : linger_(linger) {}
  // Returns the cached map for (layers, size_blocks) or builds it with `txn`.
  Result<std::shared_ptr<const ChainMap>> get(ReadTxn& txn, const std::vector<LayerRecord>& layers,
                                              uint64_t size_blocks);

 private:
  struct Slot {
    std::weak_ptr<const ChainMap> live;
    std::shared_ptr<const ChainMap> lingering;
    std::chrono::steady_clock::time_point expires;
  };
  std::chrono::milliseconds linger_;
  std::mutex mu_;
  std::map<std::pair<LayerId, uint64_t>, Slot> slots_;  // GUARDED_BY(mu_)
};

}  // namespace layer
