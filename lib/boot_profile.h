// boot_profile.h — boot profiles and boot prefetch (issue 14 item 5; docs/design.md "Boot
// prefetch"): what a fresh clone of an image reads from the image's frozen layers in its first
// seconds, recorded per layer as coalesced byte ranges, merged over clones into one row per
// image, and read ahead into the page cache when the next fresh clone of that image starts.
//
// Fresh: a writable container whose delta has no file when its disk serves its first request
// (a clone never written since `layer clone`). The window opens at that first request, not at
// the open (nbdkit opens every export for NBD_OPT_INFO and `nbdinfo --list`: those read nothing).
//
// Recording: the disk's read path hands each run read from a frozen layer to its BootSession
// (a relaxed load of a flag once the window is over); in the window it appends (layer, offset,
// length) under a mutex, coalescing in place when the list grows. At the end of the window, or
// when the disk closes before it, the service merges the ranges into the image's profile row
// (meta `boot.` + image ref): the union with the ranges already there, at most
// kBootProfileMaxRanges ranges (the smallest gaps are merged first), and a count of the boots.
//
// Prefetch: when a fresh disk's window opens and the image has a profile, the service's thread
// reads the ranges ahead in layer and offset order in pieces of at most piece_bytes
// (posix_fadvise WILLNEED: the kernel reads them asynchronously), with at most
// max_inflight_bytes asked for and not yet read: before asking for more it waits for the oldest
// piece (a one-byte read of its last byte, served once that piece is in). It stops at the end
// of the window, when the disk closes and when the service stops. A layer on the hdd tier is
// read ahead like any other, not promoted (docs/design.md says why).
//
// Thread-safety: BootSession::record may be called from any thread; BootService is safe for
// concurrent use; the free functions are as their transactions.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "error.h"
#include "index.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

class Pool;
class LayerFile;

// A byte range of one layer's file.
struct BootRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const BootRange&) const = default;
};
using BootRanges = std::vector<BootRange>;
using BootLayerRanges = std::map<LayerId, BootRanges>;

// The most ranges one image's profile keeps (over all its layers): about 64 KiB of row.
constexpr size_t kBootProfileMaxRanges = 4096;
// The most bytes one window may read and still be taken for a boot (Options::max_boot_bytes'
// default). A window that read more — a benchmark or a full scan of a clone that only reads, a
// `dd` of the disk — is not a boot: it is not kept, so that the next clone's open does not read
// the whole image ahead beside a workload that never asked for it.
constexpr uint64_t kBootProfileMaxBytes = uint64_t{256} << 20;

// Sorted by offset, overlapping and adjacent ranges merged, empty ones dropped.
BootRanges coalesce_ranges(BootRanges ranges);
// `ranges` coalesced, then merged across the smallest gaps (the bytes between two ranges join
// the profile) until at most `max_ranges` (>= 1) are left.
BootRanges cap_ranges(BootRanges ranges, size_t max_ranges);
uint64_t ranges_bytes(const BootRanges& ranges);

// meta `boot.` + image ref.
struct BootProfile {
  std::string image_ref;
  LayerId top_layer = 0;  // the image's top layer when recorded: another one makes it stale
  uint64_t boots = 0;     // fresh clones' boots merged into it
  uint64_t updated_unix = 0;
  BootLayerRanges layers;  // each coalesced
  uint64_t bytes() const;
  size_t range_count() const;
};
std::string encode_boot_profile(const BootProfile& p);
// Errors: EIO naming the image when the row is damaged.
Result<BootProfile> decode_boot_profile(std::string_view bytes, std::string_view image_ref);
// Adds one boot's ranges to `into` (union), counts the boot and caps each layer at its share of
// max_ranges (max_ranges / layers, at least 1).
void merge_boot(BootProfile& into, const BootLayerRanges& boot,
                size_t max_ranges = kBootProfileMaxRanges);

std::string boot_profile_key(std::string_view image_ref);
// Image `ref`'s profile, std::nullopt when it has none. Errors: EIO.
Result<std::optional<BootProfile>> read_boot_profile(ReadTxn& txn, std::string_view image_ref);
// Every profile whose image ref starts with `prefix` ("" for all), in ref order.
Result<std::vector<BootProfile>> list_boot_profiles(ReadTxn& txn, std::string_view prefix);
// Merges one boot into image `ref`'s profile in one transaction. Nothing is written (and
// false returned) when `boot` holds no range, when the image is gone, or when its top layer is
// no longer `top_layer` (the clone's chain is not the image's); a stored profile of another
// top layer is replaced. Returns the merged profile when written. Errors: the transaction's.
Result<std::optional<BootProfile>> save_boot(Pool& pool, const std::string& image_ref,
                                             LayerId top_layer, const BootLayerRanges& boot);
// Deletes image `ref`'s profile; whether there was one. Errors: the transaction's.
Result<bool> clear_boot_profile(Pool& pool, const std::string& image_ref);
// Inside a transaction that removes image `ref` (images.cc).
Status drop_boot_profile(WriteTxn& txn, std::string_view image_ref);

// One fresh disk's boot window: what its reads record into, and what its prefetch follows.
class BootSession {
 public:
  // Past kCoalesceAt recorded runs the list is coalesced in place, and capped to
  // kBootProfileMaxRanges when coalescing leaves more than half of it.
  static constexpr size_t kCoalesceAt = 65536;
  BootSession(std::string container, std::string image_ref, std::vector<LayerRecord> chain,
              std::vector<std::shared_ptr<LayerFile>> files,
              std::chrono::steady_clock::time_point deadline);

  // Records a read of [offset, offset + length) from frozen layer `layer`; nothing once the
  // window is over or the session closed.
  void record(LayerId layer, uint64_t offset, uint64_t length) noexcept {
    if (!recording_.load(std::memory_order_relaxed)) return;
    record_slow(layer, offset, length);
  }
  // The disk closes: recording and prefetch stop; the service persists what was recorded.
  void close();
  bool closed() const { return closed_.load(); }
  // Ends recording and returns the ranges recorded, coalesced (the first call; then empty).
  BootLayerRanges finish();

  const std::string& container() const { return container_; }
  const std::string& image_ref() const { return image_ref_; }
  const std::vector<LayerRecord>& chain() const { return chain_; }
  std::chrono::steady_clock::time_point deadline() const { return deadline_; }

 private:
  friend class BootService;
  void record_slow(LayerId layer, uint64_t offset, uint64_t length) noexcept;
  const std::string container_, image_ref_;
  const std::vector<LayerRecord> chain_;           // frozen, top first
  std::vector<std::shared_ptr<LayerFile>> files_;  // parallel to chain_; the service's thread
  const std::chrono::steady_clock::time_point deadline_;
  std::shared_ptr<StopSignal> wake_;  // the service's: close() wakes its thread
  std::atomic<bool> recording_{true};
  std::atomic<bool> closed_{false};
  std::mutex mu_;
  std::vector<std::pair<LayerId, BootRange>> runs_;  // GUARDED_BY(mu_)
  bool full_ = false;                                // GUARDED_BY(mu_): capped once
  uint64_t max_bytes_ = kBootProfileMaxBytes;        // set before the session is published
};

// What the service did, for the server's log (the plugin writes audit lines).
struct BootEvent {
  enum class Kind { kProfile, kPrefetch } kind = Kind::kProfile;
  std::string container, image_ref;
  uint64_t ranges = 0, bytes = 0;  // kProfile: this boot's; kPrefetch: read ahead
  uint64_t profile_ranges = 0, profile_bytes = 0, boots = 0;  // the profile after (or read)
  uint64_t elapsed_ms = 0;  // kPrefetch: from the window's start to the last piece read
  bool complete = true;     // kPrefetch: every range read ahead (false: stopped early)
  std::string error;        // non-empty: what failed
  std::string discarded;    // kProfile, non-empty: why this window was not kept (not an error)
};

// A server's boot profiles and prefetches: one thread that reads profiles ahead for the fresh
// disks that start, and persists their windows when they end.
// REQUIRES: the Pool outlives it.
class BootService {
 public:
  struct Options {
    std::chrono::milliseconds window{30000};  // > 0
    bool prefetch = true;
    uint64_t piece_bytes = 1 << 20;
    uint64_t max_inflight_bytes = 16 << 20;
    uint64_t max_boot_bytes = kBootProfileMaxBytes;  // a window that read more is not kept
    std::function<void(const BootEvent&)> log;       // on the service's thread
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<BootService>> start(Pool& pool, Options options);
  // Stops prefetches, persists the windows still open, joins.
  ~BootService();
  BootService(const BootService&) = delete;
  BootService& operator=(const BootService&) = delete;

  // A fresh disk of container `container` (image `image_ref`) on `chain` (frozen, top first;
  // `files` parallel, null where missing) serves its first request: its window opens now.
  // Returns the session its reads record into; never blocks on I/O.
  std::shared_ptr<BootSession> begin(const std::string& container, const std::string& image_ref,
                                     const std::vector<LayerRecord>& chain,
                                     const std::vector<std::shared_ptr<LayerFile>>& files);

 private:
  BootService(Pool& pool, Options options);
  void run();
  void prefetch(BootSession& s);
  void persist(BootSession& s);
  void log(const BootEvent& e) {
    if (options_.log) options_.log(e);
  }

  Pool& pool_;
  const Options options_;
  std::mutex mu_;
  std::deque<std::shared_ptr<BootSession>> to_prefetch_;  // GUARDED_BY(mu_)
  std::vector<std::shared_ptr<BootSession>> open_;        // GUARDED_BY(mu_)
  // Shared with the sessions (a disk may close after the service stopped).
  std::shared_ptr<StopSignal> stop_ = std::make_shared<StopSignal>();
  std::thread thread_;
};

}  // namespace layer
