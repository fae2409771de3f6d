// delta_map.h — the in-memory block map of a writable delta, and its dirty set.
//
// Sparse by chunk (a chunk of kBlocksPerChunk blocks is allocated on first touch); each word
// holds 32 blocks' 2-bit states and is updated with compare-and-swap, so readers and writers
// never lock. Marking blocks puts their chunk in the dirty set; a flush round takes the rows of
// the dirty chunks (take_dirty) and puts them back if its commit fails (return_dirty).
// Ordering contract with Disk: blocks are marked only after the I/O that makes them true
// returned, and take_dirty clears a chunk's dirty flag before copying it, so a mark is either
// in the copy or makes the chunk dirty again for the next round.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "block_map.h"

namespace layer {

// The writable layer's map. Words hold 32 blocks (2 bits each, block i at bits 2*(i%32)),
// which is the byte layout of a `maps` row read as little-endian words.
// Thread-safety: get/set are lock-free; the dirty list has its own mutex.
class DeltaMap {
 public:
  static constexpr uint32_t kWords = kBlocksPerChunk / 32;
  struct Chunk {
    std::atomic<uint64_t> w[kWords] = {};
  };

  explicit DeltaMap(uint64_t size_blocks)
      : nchunks_((size_blocks + kBlocksPerChunk - 1) / kBlocksPerChunk),
        chunks_(new std::atomic<Chunk*>[nchunks_]),
        dirty_flag_(new std::atomic<bool>[nchunks_]) {
    for (uint64_t c = 0; c < nchunks_; ++c) {
      chunks_[c].store(nullptr, std::memory_order_relaxed);
      dirty_flag_[c].store(false, std::memory_order_relaxed);
    }
  }
  ~DeltaMap() {
    for (uint64_t c = 0; c < nchunks_; ++c) delete chunks_[c].load();
  }

  BlockState get(uint64_t b) const {
    const Chunk* c = chunks_[b / kBlocksPerChunk].load(std::memory_order_acquire);
    if (!c) return BlockState::kAbsent;
    const uint32_t i = b % kBlocksPerChunk;
    return static_cast<BlockState>((c->w[i / 32].load(std::memory_order_acquire) >> (i % 32 * 2)) &
                                   3);
  }

  // Number of blocks from b (at most max) in state s. Blocks past the map's last chunk end the
  // run (callers pass ranges inside the disk).
  uint64_t run(uint64_t b, uint64_t max, BlockState s) const {
    const uint64_t limit = nchunks_ * kBlocksPerChunk;
    if (b >= limit) return 0;
    max = std::min(max, limit - b);
    uint64_t n = 0;
    const uint64_t pattern = 0x5555555555555555ULL * static_cast<uint64_t>(s);
    while (n < max) {
      const uint64_t cur = b + n;
      const Chunk* c = chunks_[cur / kBlocksPerChunk].load(std::memory_order_acquire);
      if (!c) {
        if (s != BlockState::kAbsent) break;
        n += kBlocksPerChunk - cur % kBlocksPerChunk;
        continue;
      }
      const uint32_t i = cur % kBlocksPerChunk;
      if (i % 32 == 0 && c->w[i / 32].load(std::memory_order_acquire) == pattern) {
        n += 32;
        continue;
      }
      if (get(cur) != s) break;
      ++n;
    }
    return std::min(n, max);
  }

  void set_range(uint64_t first, uint64_t count, BlockState s) {
    uint64_t b = first;
    const uint64_t end = first + count;
    while (b < end) {
      const uint64_t c = b / kBlocksPerChunk;
      Chunk* chunk = ensure_chunk(c);
      const uint64_t chunk_end = std::min(end, (c + 1) * kBlocksPerChunk);
      while (b < chunk_end) {
        const uint32_t i = b % kBlocksPerChunk;
        const uint32_t word = i / 32;
        const uint32_t lo = i % 32;
        const uint32_t hi = static_cast<uint32_t>(std::min<uint64_t>(32, lo + (chunk_end - b)));
        const uint64_t mask = hi - lo == 32 ? ~0ULL : ((1ULL << ((hi - lo) * 2)) - 1) << (lo * 2);
        const uint64_t bits = (0x5555555555555555ULL * static_cast<uint64_t>(s)) & mask;
        uint64_t old = chunk->w[word].load(std::memory_order_relaxed);
        while (!chunk->w[word].compare_exchange_weak(old, (old & ~mask) | bits,
                                                     std::memory_order_acq_rel)) {
        }
        b += hi - lo;
      }
      // After the bits: a flush round that clears the flag before copying sees them, or we
      // re-add the chunk for the next round.
      if (!dirty_flag_[c].exchange(true, std::memory_order_acq_rel)) {
        std::lock_guard<std::mutex> lk(dirty_mu_);
        try {
          dirty_.push_back(static_cast<uint32_t>(c));
        } catch (...) {
          // Flagged but not listed: other writers' marks of this chunk (which saw the flag
          // and did not list it) may now never be committed. Clearing the flag would not
          // help them, so the map says marks are lost and the Disk stops acknowledging.
          lost_marks_.store(true, std::memory_order_release);
          throw;
        }
      }
    }
  }

  // Loads a chunk from its `maps` row (before any I/O).
  void load(uint32_t c, const ChunkBits& bits) {
    Chunk* chunk = ensure_chunk(c);
    for (uint32_t w = 0; w < kWords; ++w) {
      uint64_t v = 0;
      for (int k = 7; k >= 0; --k) v = v << 8 | bits.data()[w * 8 + k];
      chunk->w[w].store(v, std::memory_order_relaxed);
    }
  }

  using Rows = std::vector<std::pair<uint32_t, std::string>>;

  // Step 1 of a flush round: the rows of every dirty chunk, and the set cleared. Every taken
  // chunk's flag is cleared before any row is copied; if copying throws (std::bad_alloc), every
  // taken chunk is dirty again before the exception leaves, so no mark is lost (or, if even
  // that cannot allocate, lost_marks() turns true).
  Rows take_dirty() {
    std::vector<uint32_t> list;
    {
      std::lock_guard<std::mutex> lk(dirty_mu_);
      list.swap(dirty_);
    }
    // A read-modify-write: it reads from (and so synchronises with) the exchange of any mark
    // ordered before it, whose bits the copy below then sees; a later mark's exchange reads
    // false and lists the chunk again.
    for (uint32_t c : list) dirty_flag_[c].exchange(false, std::memory_order_acq_rel);
    struct Restore {
      DeltaMap* map;
      std::vector<uint32_t>* list;
      ~Restore() {
        if (list && !map->requeue(std::move(*list)))
          map->lost_marks_.store(true, std::memory_order_release);
      }
    } restore{this, &list};
    Rows rows;
    rows.reserve(list.size());
    for (uint32_t c : list) rows.emplace_back(c, encode_chunk(snapshot(c)));
    restore.list = nullptr;
    return rows;
  }

  // Puts chunks back into the dirty set after a failed round. Returns false only when that
  // needed memory it could not get: then marks may be lost and the caller must stop
  // acknowledging flushes.
  [[nodiscard]] bool return_dirty(const Rows& rows) noexcept {
    std::vector<uint32_t> list;
    try {
      list.reserve(rows.size());
    } catch (...) {
      lost_marks_.store(true, std::memory_order_release);
      return false;
    }
    for (const auto& row : rows) list.push_back(row.first);
    if (requeue(std::move(list))) return true;
    lost_marks_.store(true, std::memory_order_release);
    return false;
  }

  // True once a mark may have been dropped from the dirty set for want of memory: the map no
  // longer knows what to commit, so the owner must fail every flush until it reloads.
  bool lost_marks() const { return lost_marks_.load(std::memory_order_acquire); }

 private:
  // Marks the chunks of `list` dirty again (those a concurrent mark re-added already are
  // skipped). Allocates only when the dirty list is not empty; false if that failed.
  bool requeue(std::vector<uint32_t> list) noexcept {
    size_t keep = 0;
    for (uint32_t c : list)
      if (!dirty_flag_[c].exchange(true, std::memory_order_acq_rel)) list[keep++] = c;
    list.resize(keep);
    std::lock_guard<std::mutex> lk(dirty_mu_);
    if (dirty_.empty()) {
      dirty_.swap(list);
      return true;
    }
    try {
      dirty_.insert(dirty_.end(), list.begin(), list.end());
    } catch (...) {
      return false;
    }
    return true;
  }

  Chunk* ensure_chunk(uint64_t c) {
    Chunk* chunk = chunks_[c].load(std::memory_order_acquire);
    if (chunk) return chunk;
    auto fresh = std::make_unique<Chunk>();
    if (chunks_[c].compare_exchange_strong(chunk, fresh.get(), std::memory_order_acq_rel))
      return fresh.release();
    return chunk;  // another thread installed one
  }

  ChunkBits snapshot(uint32_t c) const {
    ChunkBits bits;
    const Chunk* chunk = chunks_[c].load(std::memory_order_acquire);
    if (!chunk) return bits;
    for (uint32_t w = 0; w < kWords; ++w) {
      const uint64_t v = chunk->w[w].load(std::memory_order_acquire);
      for (int k = 0; k < 8; ++k) bits.data()[w * 8 + k] = static_cast<uint8_t>(v >> (8 * k));
    }
    return bits;
  }

  const uint64_t nchunks_;
  std::unique_ptr<std::atomic<Chunk*>[]> chunks_;
  std::unique_ptr<std::atomic<bool>[]> dirty_flag_;
  std::mutex dirty_mu_;
  std::vector<uint32_t> dirty_;  // GUARDED_BY(dirty_mu_)
  std::atomic<bool> lost_marks_{false};
};

}  // namespace layer
