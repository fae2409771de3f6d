// dirty_tracker.h — the blocks of a live delta's file written while the file is copied to the
// other tier (Disk::move_delta, DESIGN.md "Tiering mover"), and the wrapping file that records
// them, then mirrors writes into the copy.
//
// A DirtyTracker is a bitmap, one bit per block, sparse by page (a page of kBlocksPerPage bits
// is allocated on its first mark and kept until the tracker goes) and updated with atomic
// operations, so writers never lock. A TrackingFile wraps the delta's file for the length of a
// move. First it marks every block a write or a punch touches twice: before the I/O starts (so
// a comparison of the copy that sees the I/O half done is explained by a mark) and after it
// returned (so a catch-up copy of the block that raced the I/O, and took the first mark, is
// done again in the next round). Once the copy exists (start_mirror), it writes and punches the
// copy too, under per-block stripe locks that the mover's catch-up copies also take: the set of
// blocks left to copy then only shrinks, however fast the clients write.
//
// Thread-safety: every method of both classes may be called concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "error.h"
#include "layer_file.h"

namespace layer {

class DirtyTracker {
 public:
  static constexpr uint64_t kBlocksPerPage = 4096;
  // (first block, count) pairs, ascending and not touching.
  using Runs = std::vector<std::pair<uint64_t, uint64_t>>;

  explicit DirtyTracker(uint64_t size_blocks);
  ~DirtyTracker();
  DirtyTracker(const DirtyTracker&) = delete;
  DirtyTracker& operator=(const DirtyTracker&) = delete;

  // Marks blocks [first, first+count), clamped to the tracker's size. Errors: ENOMEM (a page
  // could not be allocated; the blocks of the pages that exist are marked).
  Status mark(uint64_t first, uint64_t count) noexcept;
  // The number of marked blocks at about this moment (marks may land or be taken meanwhile).
  uint64_t count() const noexcept;
  // Clears every mark and returns the marked blocks. A mark that lands meanwhile is either in
  // the result or still set afterwards. Errors: ENOMEM (every mark taken is set again).
  Result<Runs> take() noexcept;

 private:
  struct Page {
    std::atomic<uint64_t> w[kBlocksPerPage / 64] = {};
  };
  Page* ensure_page(uint64_t p) noexcept;

  const uint64_t size_blocks_;
  const uint64_t npages_;
  std::unique_ptr<std::atomic<Page*>[]> pages_;
};

// A layer file whose writes and punches mark the blocks they touch in a DirtyTracker, before
// and after the I/O, and once mirroring, also go to a copy; reads, syncs and everything else go
// to the inner file only.
class TrackingFile : public ForwardingFile {
 public:
  TrackingFile(std::shared_ptr<LayerFile> inner, std::shared_ptr<DirtyTracker> tracker,
               uint32_t block_size);
  ~TrackingFile() override;
  // Tracking: marks, the inner file's I/O, marks again. Mirroring: with the stripes of the
  // blocks held, the inner file's I/O, then the copy's. The result is the inner file's: a
  // failure of the copy's I/O marks the blocks and is kept for mirror_error().
  // Errors: the inner file's; ENOMEM when the first mark fails (nothing is written then).
  Status write(const void* buf, uint64_t len, uint64_t offset) override;
  Status punch(uint64_t offset, uint64_t len) override;

  // From now on writes and punches go to `copy` too. Returns once every write or punch begun
  // before (tracked, not mirrored) has returned: after it, every block of the copy that differs
  // from the inner file's outside with_blocks_locked is marked.
  void start_mirror(std::shared_ptr<LayerFile> copy);
  // Runs fn with the stripes of blocks [first, first+count) held: no mirrored write or punch of
  // them is in flight meanwhile. REQUIRES: count blocks' stripes in ascending order is what
  // every holder takes (no other stripe held by the caller).
  Status with_blocks_locked(uint64_t first, uint64_t count, const std::function<Status()>& fn);
  // The first failure of the copy's I/O while mirroring (its blocks are marked), if any.
  Status mirror_error() const;

 private:
  static constexpr size_t kStripes = 1024;
  Status mark(uint64_t offset, uint64_t len) noexcept;
  // One write or punch: `io(file)` on the inner file, then (mirroring) on the copy.
  Status apply(uint64_t offset, uint64_t len, const std::function<Status(LayerFile&)>& io);
  void lock_stripes(uint64_t first, uint64_t count, std::vector<size_t>* held);
  void unlock_stripes(const std::vector<size_t>& held);

  const std::shared_ptr<DirtyTracker> tracker_;
  const uint32_t block_size_;
  std::shared_ptr<LayerFile> copy_;          // set once, before mirror_ is
  std::atomic<LayerFile*> mirror_{nullptr};  // the copy, once mirroring
  std::atomic<uint64_t> tracked_in_flight_{0};
  std::unique_ptr<std::mutex[]> stripes_;
  mutable std::mutex error_mu_;
  Status mirror_error_;  // GUARDED_BY(error_mu_)
};

}  // namespace layer
