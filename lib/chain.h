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
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
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
  // `maps` rows. Errors: EIO (corrupt row, or depth over kMaxChainDepth: the index is
  // damaged, not the request).
  static Result<std::shared_ptr<const ChainMap>> build(ReadTxn& txn,
                                                       const std::vector<LayerRecord>& layers,
                                                       uint64_t size_blocks);

  // The map of `top` (frozen) over `below`'s chain, reading only top's `maps` rows: every
  // chunk top does not touch is shared with `below` (a snapshot's new chain map costs what the
  // frozen delta wrote, not what the chain holds). Errors: as build.
  static Result<std::shared_ptr<const ChainMap>> stack(ReadTxn& txn, const LayerRecord& top,
                                                       const ChainMap& below, uint64_t size_blocks);

  // The source of block_no: an index into layers(), kSourceZero or kSourceAbsent.
  Source lookup(uint64_t block_no) const {
    const Source s = raw(block_no);
    return s >= kSourceZero ? s : static_cast<Source>(layers_.size() - 1 - s);
  }
  // Number of blocks from block_no (at most max_blocks) with the same source as block_no.
  uint64_t run_length(uint64_t block_no, uint64_t max_blocks) const;

  const std::vector<LayerRecord>& layers() const { return layers_; }
  // The blocks the map covers; lookups at or past it return kSourceAbsent.
  uint64_t size_blocks() const { return size_blocks_; }

 private:
  // Sources are stored counted from the bottom of the chain (0 = bottom layer), so a chunk's
  // array stays valid when layers are stacked on top; lookup() turns them into top-first
  // indexes.
  Source raw(uint64_t block_no) const {
    const uint64_t chunk = block_no / kBlocksPerChunk;
    if (chunk >= chunks_.size()) return kSourceAbsent;
    const Entry& e = chunks_[chunk];
    return e.mixed ? (*e.mixed)[block_no % kBlocksPerChunk] : e.uniform;
  }
  // Applies a layer's rows (its bottom-up index `self`) over the chunks, topmost last.
  Status apply_rows(ReadTxn& txn, LayerId id, Source self,
                    std::vector<std::unique_ptr<std::array<Source, kBlocksPerChunk>>>& mixed);
  void finish(std::vector<std::unique_ptr<std::array<Source, kBlocksPerChunk>>>& mixed);
  struct Entry {
    Source uniform = kSourceAbsent;
    std::shared_ptr<const std::array<Source, kBlocksPerChunk>> mixed;  // null when uniform
  };
  std::vector<LayerRecord> layers_;
  std::vector<Entry> chunks_;
  uint64_t size_blocks_ = 0;
};

// Shares chain maps between open disks: one map per chain, keyed by the chain's top layer (a
// frozen layer's chain below it never changes), whatever the size of the disks on it. A map
// lives while a disk holds it and for about `linger` after the last one lets go (so a reconnect
// does not rebuild it); then a reaper thread frees it, without waiting for another lookup.
// Thread-safety: safe for concurrent use. The maps it returns may outlive it.
class ChainCache {
 public:
  explicit ChainCache(std::chrono::milliseconds linger = std::chrono::seconds(5))
      : linger_(linger) {}
  ~ChainCache();
  ChainCache(const ChainCache&) = delete;
  ChainCache& operator=(const ChainCache&) = delete;

  // Returns the map of `layers` (top first; empty for a disk without a chain), cached or built
  // with `txn`. It covers the chain's own size (its largest layer): a disk larger than its chain
  // reads kSourceAbsent beyond it. When `below` is the map of layers[1..] (a snapshot froze
  // layers[0] over it), the map is stacked on it instead of built from every layer's rows.
  // Errors: those of ChainMap::build; EIO for a block size of 0.
  Result<std::shared_ptr<const ChainMap>> get(ReadTxn& txn, const std::vector<LayerRecord>& layers,
                                              const ChainMap* below = nullptr);

  // Number of maps held, in use or lingering.
  size_t resident();

 private:
  struct Slot {
    std::shared_ptr<const ChainMap> map;  // the cache's own reference
    bool idle = false;                    // only the cache's reference was left at idle_since
    std::chrono::steady_clock::time_point idle_since;
  };
  // Frees (into *freed, to be destroyed after mu_ is released) the maps idle for linger_.
  // Returns whether any map is still held. REQUIRES: mu_ held.
  bool sweep(std::chrono::steady_clock::time_point now,
             std::vector<std::shared_ptr<const ChainMap>>* freed);
  void reap();
  const std::chrono::milliseconds linger_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::map<LayerId, Slot> slots_;  // GUARDED_BY(mu_)
  bool stop_ = false;              // GUARDED_BY(mu_)
  bool reaper_tried_ = false;      // GUARDED_BY(mu_)
  std::thread reaper_;
};

}  // namespace layer
