// dirty_tracker.cc — DirtyTracker and TrackingFile.
#include "dirty_tracker.h"

#include <algorithm>
#include <bit>
#include <new>
#include <thread>

namespace layer {
namespace {

// "out of memory" fits std::string's inline buffer: building it allocates nothing.
Error out_of_memory() noexcept { return Error{ENOMEM, "out of memory"}; }

}  // namespace

DirtyTracker::DirtyTracker(uint64_t size_blocks)
    : size_blocks_(size_blocks),
      npages_((size_blocks + kBlocksPerPage - 1) / kBlocksPerPage),
      pages_(new std::atomic<Page*>[npages_]) {
  for (uint64_t p = 0; p < npages_; ++p) pages_[p].store(nullptr, std::memory_order_relaxed);
}

DirtyTracker::~DirtyTracker() {
  for (uint64_t p = 0; p < npages_; ++p) delete pages_[p].load(std::memory_order_relaxed);
}

DirtyTracker::Page* DirtyTracker::ensure_page(uint64_t p) noexcept {
  Page* page = pages_[p].load(std::memory_order_acquire);
  if (page) return page;
  Page* fresh = new (std::nothrow) Page;
  if (!fresh) return nullptr;
  if (pages_[p].compare_exchange_strong(page, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread installed one
  return page;
}

Status DirtyTracker::mark(uint64_t first, uint64_t count) noexcept {
  const uint64_t end = std::min(size_blocks_, first + count);
  bool failed = false;
  for (uint64_t b = first; b < end;) {
    const uint64_t p = b / kBlocksPerPage;
    const uint64_t page_end = std::min(end, (p + 1) * kBlocksPerPage);
    Page* page = ensure_page(p);
    if (!page) {
      failed = true;
      b = page_end;
      continue;
    }
    while (b < page_end) {
      const uint64_t i = b % kBlocksPerPage;
      const uint64_t lo = i % 64;
      const uint64_t n = std::min<uint64_t>(64 - lo, page_end - b);
      const uint64_t bits = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << lo;
      // Release: the copier that takes this bit (an acq_rel exchange) then reads the file after
      // the I/O that marked it returned.
      page->w[i / 64].fetch_or(bits, std::memory_order_acq_rel);
      b += n;
    }
  }
  if (failed) return out_of_memory();
  return {};
}

uint64_t DirtyTracker::count() const noexcept {
  uint64_t n = 0;
  for (uint64_t p = 0; p < npages_; ++p) {
    const Page* page = pages_[p].load(std::memory_order_acquire);
    if (!page) continue;
    for (const auto& w : page->w) n += static_cast<uint64_t>(std::popcount(w.load()));
  }
  return n;
}

Result<DirtyTracker::Runs> DirtyTracker::take() noexcept {
  Runs runs;
  for (uint64_t p = 0; p < npages_; ++p) {
    Page* page = pages_[p].load(std::memory_order_acquire);
    if (!page) continue;
    for (uint64_t w = 0; w < kBlocksPerPage / 64; ++w) {
      if (page->w[w].load(std::memory_order_relaxed) == 0) continue;
      const uint64_t bits = page->w[w].exchange(0, std::memory_order_acq_rel);
      if (bits == 0) continue;
      // Room for the word's runs (at most 32) first, so that appending them cannot throw.
      if (runs.capacity() - runs.size() < 32) {
        try {
          runs.reserve(std::max<size_t>(2 * runs.capacity(), runs.size() + 64));
        } catch (...) {
          // Every mark taken is set again; their pages exist, so this allocates nothing.
          page->w[w].fetch_or(bits, std::memory_order_acq_rel);
          for (const auto& [first, n] : runs) (void)mark(first, n);
          return out_of_memory();
        }
      }
      const uint64_t block0 = p * kBlocksPerPage + w * 64;
      for (uint64_t rest = bits; rest != 0;) {
        const int lo = std::countr_zero(rest);
        const int len = std::countr_one(rest >> lo);
        const uint64_t first = block0 + static_cast<uint64_t>(lo);
        if (!runs.empty() && runs.back().first + runs.back().second == first)
          runs.back().second += static_cast<uint64_t>(len);
        else
          runs.emplace_back(first, static_cast<uint64_t>(len));
        if (lo + len >= 64) break;
        rest &= ~0ULL << (lo + len);
      }
    }
  }
  return runs;
}

TrackingFile::TrackingFile(std::shared_ptr<LayerFile> inner, std::shared_ptr<DirtyTracker> tracker,
                           uint32_t block_size)
    : ForwardingFile(std::move(inner)),
      tracker_(std::move(tracker)),
      block_size_(block_size),
      stripes_(new std::mutex[kStripes]) {}

TrackingFile::~TrackingFile() = default;

Status TrackingFile::mark(uint64_t offset, uint64_t len) noexcept {
  if (len == 0) return {};
  const uint64_t first = offset / block_size_;
  const uint64_t last = (offset + len - 1) / block_size_;
  return tracker_->mark(first, last - first + 1);
}

void TrackingFile::lock_stripes(uint64_t first, uint64_t count, std::vector<size_t>* held) {
  held->clear();
  if (count >= kStripes) {
    for (size_t i = 0; i < kStripes; ++i) held->push_back(i);
  } else {
    for (uint64_t b = first; b < first + count; ++b) held->push_back(b % kStripes);
    std::sort(held->begin(), held->end());
  }
  // Ascending: no deadlock between two holders.
  for (size_t i : *held) stripes_[i].lock();
}

void TrackingFile::unlock_stripes(const std::vector<size_t>& held) {
  for (auto it = held.rbegin(); it != held.rend(); ++it) stripes_[*it].unlock();
}

Status TrackingFile::apply(uint64_t offset, uint64_t len,
                           const std::function<Status(LayerFile&)>& io) {
  // Counted before mirror_ is read (both sequentially consistent): either this write sees the
  // mirror, or start_mirror sees it in flight and waits for it.
  tracked_in_flight_.fetch_add(1);
  LayerFile* mirror = mirror_.load();
  if (!mirror) {
    Status s = mark(offset, len);
    if (s) {
      s = io(*inner_);
      // The pages exist since the first mark: this one cannot fail.
      (void)mark(offset, len);
    }
    tracked_in_flight_.fetch_sub(1);
    return s;
  }
  tracked_in_flight_.fetch_sub(1);
  if (len == 0) return io(*inner_);
  const uint64_t first = offset / block_size_;
  const uint64_t count = (offset + len - 1) / block_size_ - first + 1;
  std::vector<size_t> held;
  lock_stripes(first, count, &held);
  Status s = io(*inner_);
  Status copied = s ? io(*mirror) : Status{};
  unlock_stripes(held);
  if (!s || !copied) {
    // Whatever either file holds now, the next catch-up round copies these blocks again.
    (void)tracker_->mark(first, count);
  }
  if (!copied) {
    std::lock_guard<std::mutex> lk(error_mu_);
    if (mirror_error_.ok()) mirror_error_ = copied;
  }
  return s;
}

Status TrackingFile::write(const void* buf, uint64_t len, uint64_t offset) {
  return apply(offset, len, [&](LayerFile& f) { return f.write(buf, len, offset); });
}

Status TrackingFile::punch(uint64_t offset, uint64_t len) {
  return apply(offset, len, [&](LayerFile& f) { return f.punch(offset, len); });
}

void TrackingFile::start_mirror(std::shared_ptr<LayerFile> copy) {
  copy_ = std::move(copy);
  mirror_.store(copy_.get());
  // The tracked writes begun before drain quickly (no new one starts tracked).
  while (tracked_in_flight_.load() != 0) std::this_thread::yield();
}

Status TrackingFile::with_blocks_locked(uint64_t first, uint64_t count,
                                        const std::function<Status()>& fn) {
  std::vector<size_t> held;
  lock_stripes(first, count, &held);
  Status s = fn();
  unlock_stripes(held);
  return s;
}

Status TrackingFile::mirror_error() const {
  std::lock_guard<std::mutex> lk(error_mu_);
  return mirror_error_;
}

}  // namespace layer
