// dirty_tracker.h — the blocks of a live delta's file written while the file is copied to the
// other tier (Disk::move_delta, DESIGN.md "Tiering mover"), and the wrapping file that records
// them.
//
// A DirtyTracker is a bitmap, one bit per block, sparse by page (a page of kBlocksPerPage bits
// is allocated on its first mark and kept until the tracker goes) and updated with atomic
// operations, so writers never lock. A TrackingFile wraps the delta's file for the length of a
// move and marks every block a write or a punch touches twice: before the I/O starts (so a
// comparison of the copy that sees the I/O half done is explained by a mark) and after it
// returned (so a catch-up copy of the block that raced the I/O, and took the first mark, is
// done again in the next round).
//
// Thread-safety: every method of both classes may be called concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
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
// and after the I/O; reads and everything else go to the inner file.
class TrackingFile : public ForwardingFile {
 public:
  TrackingFile(std::shared_ptr<LayerFile> inner, std::shared_ptr<DirtyTracker> tracker,
               uint32_t block_size)
      : ForwardingFile(std::move(inner)), tracker_(std::move(tracker)), block_size_(block_size) {}
  // Errors: the inner file's; ENOMEM when the first mark fails (nothing is written then).
  Status write(const void* buf, uint64_t len, uint64_t offset) override;
  Status punch(uint64_t offset, uint64_t len) override;
  const std::shared_ptr<LayerFile>& inner() const { return inner_; }

 private:
  Status mark(uint64_t offset, uint64_t len) noexcept;
  const std::shared_ptr<DirtyTracker> tracker_;
  const uint32_t block_size_;
};

}  // namespace layer
