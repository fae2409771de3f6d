// disk.h — an open container: delta map + chain map; read, write, zero, trim, flush, extents.
//
// Opening is cheap (locks + one container row): nbdkit opens every export for each
// NBD_OPT_INFO. The chain map, the delta's map and the layer files are loaded on the first I/O.
// Requests may have any offset and length within the disk. Writes copy up partial blocks; the
// flush order is fdatasync(delta) before the LMDB commit of the map rows it makes visible
// (DESIGN.md "Durability"). After a failed fdatasync every request fails with EIO until the
// disk is reopened.
//
// Thread-safety: every I/O method may be called concurrently from many threads and
// connections. The Pool must outlive the Disk.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "chain.h"
#include "delta_map.h"
#include "error.h"
#include "failpoint.h"
#include "heat.h"
#include "journal.h"
#include "layer_build.h"
#include "layer_file.h"
#include "locks.h"
#include "mover.h"
#include "pool.h"
#include "records.h"
#include "snapshots.h"

namespace layer {

class BootSession;

// The write gate of a Disk: every write, zero and trim holds it shared from its first write to
// its mark; closing it waits for those in flight and holds off new ones. Closing has priority
// (glibc's rwlock prefers readers, and a stream of writes would starve a snapshot): once a
// close is waiting, new shared holders wait behind it.
// Thread-safety: safe for concurrent use.
class WriteGate {
 public:
  void lock_shared() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return closers_ == 0 && !closed_; });
    ++open_;
  }
  void unlock_shared() {
    std::lock_guard<std::mutex> lk(mu_);
    if (--open_ == 0 && closers_ > 0) cv_.notify_all();
  }
  void lock() {
    std::unique_lock<std::mutex> lk(mu_);
    ++closers_;
    cv_.wait(lk, [&] { return open_ == 0 && !closed_; });
    --closers_;
    closed_ = true;
  }
  void unlock() {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = false;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t open_ = 0;     // GUARDED_BY(mu_): shared holders
  unsigned closers_ = 0;  // GUARDED_BY(mu_): closes waiting
  bool closed_ = false;   // GUARDED_BY(mu_)
};

// An export name: "CONTAINER", "CONTAINER@SNAP" (read-only), or "CONTAINER@A..B": snapshot B
// read-only, whose extents mark what changed since snapshot A (an incremental backup reads
// only those).
struct ExportName {
  std::string container;
  std::string snapshot;  // "" for the container itself
  std::string since;     // "CONTAINER@A..B": A; else ""
};
// Errors: EINVAL naming the rule broken.
Result<ExportName> parse_export_name(std::string_view name);

// A writable delta's journal (journal.h) as its Disk keeps it; shared with the folds posted
// to the committer, which may run after the Disk is gone (they then find nothing to do).
struct JournalState {
  std::mutex mu;
  LayerId layer = 0;
  uint64_t zone = 0;    // the zone's offset in the delta's file
  bool enabled = true;  // the pool journals (Pool::journal)
  // GUARDED_BY(mu) from here.
  bool open = false;          // the index's state says open: rounds may journal
  int suspended = 0;          // live moves running: rounds commit to the index
  bool retiring = false;      // a retire's fold is queued: posted folds do nothing
  bool abandoned = false;     // the Disk is gone: posted folds do nothing (recovery folds)
  uint64_t written = 0;       // the last record durable in the zone (or the checkpoint)
  uint64_t folded = 0;        // the index's checkpoint
  bool zone_written = false;  // the zone's blocks allocated (zeroes) since the journal opened
  uint64_t segment = 0;       // the segment records go to (journal.h)
  uint64_t tail = 0;          // the next record's offset in that segment
  // The last record written into each segment (0: none since the journal opened).
  std::array<uint64_t, journal::kSegments> segment_last{};
  bool posted = false;  // a fold is queued
  // Rows journaled and not folded yet: chunk -> (record seq, row).
  std::map<uint32_t, std::pair<uint64_t, std::string>> unfolded;

  journal::Rows unfolded_rows() const {
    journal::Rows rows;
    rows.reserve(unfolded.size());
    for (const auto& [chunk, e] : unfolded) rows.emplace_back(chunk, e.second);
    return rows;
  }
  // After a commit of every row journaled up to `upto`: those rows are folded.
  void folded_upto(uint64_t upto) {
    folded = std::max(folded, upto);
    std::erase_if(unfolded, [&](const auto& e) { return e.second.first <= upto; });
  }
};

class Disk {
 public:
  // Opens container `name`, taking its exclusive lock (writable) or a shared one, and shared
  // locks on its chain's layers. `name` may also be "CONTAINER@SNAP": that snapshot, read-only
  // (writes fail with EPERM), locking only its layers, so it can be served beside the live
  // container. Errors: ENOENT (no such container or snapshot), EBUSY (another process serves
  // it: the message names it), EACCES (writable on a pool opened read-only), EPERM (a
  // snapshot opened writable), EIO.
  // "CONTAINER@A..B" opens B like "CONTAINER@SNAP" and marks it a diff export (changed_extents);
  // A must exist. Errors for it as for a snapshot.
  static Result<std::shared_ptr<Disk>> open(Pool& pool, const std::string& name, bool writable);
  // Does not flush: what was not flushed may be lost, as after a crash.
  ~Disk();
  Disk(const Disk&) = delete;
  Disk& operator=(const Disk&) = delete;

  const std::string& name() const { return name_; }
  uint64_t size_bytes() const { return size_bytes_; }
  uint32_t block_size() const { return block_size_; }
  bool writable() const { return writable_; }
  // True for a "CONTAINER@SNAP" disk.
  bool is_snapshot() const { return snapshot_; }

  // Errors (all I/O): EINVAL (range beyond the end), EPERM (write to a read-only disk), EIO
  // (I/O failure, corrupt index, or the disk failed an fdatasync), ENOSPC, ENOMEM.
  Status read(void* buf, uint64_t len, uint64_t offset);
  // fua: the write is durable when this returns (a flush round).
  Status write(const void* buf, uint64_t len, uint64_t offset, bool fua);
  // Zeroes the range. Whole blocks become zero tombstones (punched); partial blocks are written.
  // fast: ENOTSUP unless the range is whole blocks (nothing would be written).
  Status zero(uint64_t len, uint64_t offset, bool fua, bool fast);
  // As zero(): trimmed ranges read back as zeroes.
  Status trim(uint64_t len, uint64_t offset, bool fua);
  // Makes every write completed before this call durable (group commit: concurrent flushes
  // share one round). A round appends the map rows it makes durable to the delta's journal
  // (journal.h) when it can, and folds them into the index later.
  Status flush();
  // flush(), then folds the journal into the index and closes it (its index state no longer
  // open): what a clean close does, so that the index alone describes the delta. Errors: the
  // flush's, the fold's commit's.
  Status close_journal();
  // Folds the rounds journaled so far into the index now (it otherwise lags them by a moment,
  // journal.h): `layer diff` of a served container reads the index. Errors: the commit's.
  Status fold_journal();
  // Calls fn(offset, len, is_data) for consecutive extents covering [offset, offset+len);
  // !is_data means hole+zero. From the maps, never from the files.
  Status extents(uint64_t len, uint64_t offset,
                 const std::function<void(uint64_t, uint64_t, bool)>& fn);
  // Hints that the range will be read soon.
  Status cache(uint64_t len, uint64_t offset);
  // A "CONTAINER@A..B" export: it reads B where B may differ from A (diff(): from the index,
  // computed on the first request) and zeroes elsewhere, and its extents say so (changed:
  // data; unchanged: hole+zero). Every client reads it truthfully as "what changed", and a
  // backup copies just the data extents.
  bool is_diff() const { return !diff_since_.empty(); }

  // Runs fn with the write gate closed, after a flush: no write, zero or trim is in flight
  // or starts until fn returns, and everything written before is durable. The seam through
  // which snapshot and rollback swap the disk's view. Errors: the flush's, then fn's.
  Status quiesce(const std::function<Status()>& fn);

  // Live changes of what the disk serves (DESIGN.md "Snapshots"): with the write gate closed
  // and everything flushed, runs the index change and switches to the container state it
  // returns (new delta, new chain) without the clients reconnecting. Reads in flight finish on
  // the view they started with. Every write acknowledged before the call is in the snapshot;
  // writes that arrive meanwhile wait and land in the new delta.
  // Errors: EPERM (read-only disk), the flush's, the operation's; after a committed change
  // that the disk could not follow (a lock it could not take), EIO until reopened.
  Result<ContainerState> snapshot(const std::string& snap);
  Result<ContainerState> commit(const std::string& image_ref, const std::string& description);
  // Merges the hidden layers of its chain that no one else reads (a live `snapshot rm`): each
  // layer with one frozen child, no name and no other reference is merged with that child into
  // a new layer, built while I/O goes on and switched in with the gate closed. Returns the
  // merged layers and what replaced them. Errors: ENOSPC, EIO.
  Result<std::vector<std::pair<LayerId, LayerId>>> merge_hidden();
  // Copies the frozen chain into one layer of the container's own (flatten_container), built
  // while I/O goes on, and switches the delta onto it with the gate closed. Errors: ENOSPC,
  // EIO, EBUSY (the disk changed meanwhile).
  Result<ContainerState> flatten();
  // The old delta's file is removed after the switch (unless keep_as keeps it as a snapshot).
  Result<ContainerState> rollback(const std::string& snap,
                                  const std::optional<std::string>& keep_as);
  // After the mover moved frozen layer `id` (mover.h): a writable disk whose chain holds it
  // re-reads its row and switches to a view on the new file (with the gate closed, as a live
  // change), so the old file's space is freed once no request reads it any more. A read-only
  // disk, or one whose chain does not hold it, is left alone (its reads go on from the old,
  // unlinked file, whose content is the same). Errors: as change().
  Status reload_moved(LayerId id);

  // Moves the file of the disk's delta, layer `id`, to tier `to` while the disk serves
  // (DESIGN.md "Tiering mover"; delta_move.cc). Under the layer's move lock and a kMove intent,
  // as move_layer (mover.h), whose recovery a crash leaves to: the file is copied (LayerStore::
  // copy_to) while writes go on and a DirtyTracker records the blocks they touch; then writes
  // go to both files (TrackingFile::start_mirror) while catch-up rounds copy the marked blocks
  // again; the copy is compared with the source and synced. Then,
  // with the write gate closed, the blocks written since are copied and compared (a difference
  // now is EIO), and the disk switches to a view on the copy that shares its maps; the gate
  // reopens. Flush rounds wait (a client's flush with them) until the copy is synced again and
  // one transaction has switched the layer's tier. Reads in flight finish on the old file; the
  // old file and the intent go last. A delta with no file yet (never written) moves by its row
  // alone, and its first write creates the file in `to`. Writes also wait for a moment when
  // the tracker is installed. result.pause_ms and start_pause_ms say how long writes waited.
  // Nothing to do (moved false) when the delta is in `to`.
  // Errors: EPERM (read-only disk), EBUSY (the delta is no longer `id`: a snapshot changed it;
  // another move of it runs), EIO (the copy does not compare equal, I/O errors), ENOSPC; after
  // an error before the view's switch the disk serves from the source, and no copy or intent
  // is left (a failure to remove them leaves the intent to recover_move). After it (the copy's
  // sync or the switching transaction failed) the disk fails every request with EIO until it
  // is reopened, and recover_move removes the copy: the delta is read from its source again.
  struct MoveOptions {
    // The catch-up rounds stop once the blocks left to copy are at most this many bytes: what
    // is left is copied with the gate closed. (Writes are mirrored into the copy once the
    // rounds begin, so only the bulk copy's marks and failures are left: the rounds empty the
    // set.)
    uint64_t final_bytes = 0;
    // At most this many catch-up rounds after the bulk copy, and as many after the comparison.
    int max_rounds = 8;
    // Bytes per second the bulk copy reads at most; 0: as fast as it can (CopyOptions). The
    // catch-up rounds are not paced.
    uint64_t rate_bytes_per_sec = 0;
  };
  Result<MoveResult> move_delta(LayerId id, Tier to, const MoveOptions& options);
  Result<MoveResult> move_delta(LayerId id, Tier to) { return move_delta(id, to, MoveOptions{}); }
  // The delta's layer row as the disk serves it (its tier follows move_delta).
  LayerRecord delta_layer() const;

  // Test seam: hook(point) runs at named points of the I/O paths ("write.stripes_chosen",
  // "write.copy_up_read", "flush.wait", "flush.rows_taken") and of move_delta ("move.catch-up"
  // before each catch-up round), on the thread that reaches them.
  // REQUIRES: set or cleared while no I/O runs.
  void set_test_hook(std::function<void(std::string_view)> hook) { hook_ = std::move(hook); }

 private:
  explicit Disk(Pool& pool);

  // What the disk serves: its frozen chain with the chain's map and files, and its delta's
  // layer, map and file. Built on the first I/O, immutable once published except for the
  // delta map's bits (atomics) and the delta file's creation on the first write. Every
  // request pins the view it starts with, so replacing the view (with the gate closed) never
  // pulls a map or a file from under a request.
  struct View {
    std::vector<LayerRecord> chain;  // frozen layers below the delta, top first
    std::shared_ptr<const ChainMap> chain_map;
    std::vector<std::shared_ptr<LayerFile>> chain_files;  // parallel to chain; null: no file
    // Heat counters (heat.h), parallel to chain, and the delta's (null for a snapshot disk).
    std::vector<std::shared_ptr<HeatCounter>> chain_heat;
    // With Pool::verify_reads, the verifiers of the chain's `frozen` layers (verify.h),
    // parallel to chain; null: not verified (the option is off, or the layer has no
    // checksums yet).
    std::vector<std::shared_ptr<LayerVerifier>> chain_verify;
    std::shared_ptr<HeatCounter> delta_heat;
    LayerRecord delta_layer;
    // Shared by the views of one delta that differ only in its file (move_delta).
    std::shared_ptr<DeltaMap> delta;
    // The delta's file, created on the first write: set once under file_mu, read lock-free
    // through file_raw (a block is marked data only after its write to this file returned).
    std::mutex file_mu;
    std::shared_ptr<LayerFile> file;  // GUARDED_BY(file_mu)
    std::atomic<LayerFile*> file_raw{nullptr};
    // Bumped after every completed write or punch of the file; a flush round syncs only when
    // it moved since the last successful sync.
    std::atomic<uint64_t> write_seq{0};
    uint64_t synced_seq = 0;  // GUARDED_BY(flush rounds: only the running round touches it)
    // The delta's map journal; shared like `delta`. Null for a snapshot disk.
    std::shared_ptr<JournalState> journal;
  };
  // One write, zero or trim: the write gate held shared from its first write to its mark,
  // and the view pinned under it.
  struct Mutation {
    std::shared_lock<WriteGate> gate;
    std::shared_ptr<View> view;
  };

  // Where a run of blocks comes from.
  static constexpr int kFromDelta = -1;
  static constexpr int kFromZero = -2;  // zero tombstone or absent everywhere
  struct Run {
    int source;  // kFromDelta, kFromZero or an index into the view's chain
    uint64_t blocks;
  };
  static Run next_run(const View& v, uint64_t block_no, uint64_t max_blocks);
  // Calls fn(from, to, source) for the runs covering [offset, offset+len), in order; stops at
  // and returns the first error. REQUIRES: len > 0, range checked.
  Status for_each_run(const View& v, uint64_t len, uint64_t offset,
                      const std::function<Status(uint64_t, uint64_t, int)>& fn) const;
  // The file holding a run's data; null for kFromZero or a missing file.
  static LayerFile* file_of(const View& v, int source);
  uint64_t block_len(uint64_t block_no) const;
  // The current view, loading it on the first call.
  Result<std::shared_ptr<View>> loaded_view();
  // previous: the view being replaced, whose chain map a snapshot's new map stacks on.
  Result<std::shared_ptr<View>> load_view(const View* previous = nullptr);
  // The current view; null before the first I/O.
  std::shared_ptr<View> pin() const;
  Result<Mutation> begin_mutation();
  static Result<std::shared_ptr<Disk>> open_snapshot(Pool& pool, const std::string& name,
                                                     const std::string& container,
                                                     const std::string& snap);
  // The disk's size and block size from its container row, checked (validate_records).
  Status take_sizes();
  // A new delta's id, intent and file (on ssd), made before a live snapshot, commit or
  // rollback closes the write gate, so that neither the switch nor the first write after it
  // creates a file (with its two syncs) while writers wait. Rolled back unless the change
  // publishes it. Errors: EPERM (read-only), those of LayerBuild.
  Result<std::unique_ptr<LayerBuild>> premake_delta();
  // Runs op with the gate closed after a flush, then adopts the state it returns.
  Result<ContainerState> change(const std::function<Result<ContainerState>()>& op);
  // Takes the locks of `state` (keeping those already held), releases the others and loads
  // the new view. REQUIRES: gate_ held exclusively.
  Status adopt(const ContainerState& state);
  // A view like v (same chain, maps and delta) whose delta file is `file` (null: none yet) in
  // tier `tier`. same_file: `file` holds v's file's bytes (wraps it): its write count carries
  // over. REQUIRES: gate_ held exclusively (no write to v in flight).
  static std::shared_ptr<View> view_with_file(View& v, std::shared_ptr<LayerFile> file, Tier tier,
                                              bool same_file);
  // Holds off flush rounds: waits for a running round to end and marks one running, so that
  // a flush waits as it would for a round, until release_rounds().
  void hold_rounds();
  void release_rounds();
  // Makes v the current view. A flush round that pinned the old view could commit marks of
  // writes to v's file without syncing it (a round syncs its own view's file), so no round may
  // run across the switch. REQUIRES: rounds held (hold_rounds), gate_ held exclusively,
  // load_mu_ held.
  void publish_view(std::shared_ptr<View> v);
  // The steps of move_delta (delta_move.cc).
  struct LiveMove;
  Status move_track(LiveMove& m);
  Status move_copy(LiveMove& m, const MoveOptions& options);
  Status move_switch(LiveMove& m);
  // Takes the TrackingFile out of the view. untrack_locked: REQUIRES rounds held, gate_ held
  // exclusively.
  void move_untrack(LiveMove& m);
  void untrack_locked(LiveMove& m);
  Status validate_records() const;
  Status check_file_size(LayerFile& file, const LayerRecord& layer) const;
  Status check_range(uint64_t len, uint64_t offset, bool for_write) const;
  Result<LayerFile*> delta_file_for_write(View& v);
  // Installs the delta's file (opened or just created). REQUIRES: v not yet published, or
  // v.file_mu held.
  static void adopt_delta_file(View& v, std::shared_ptr<LayerFile> file);
  Status read_range(const View& v, uint8_t* buf, uint64_t len, uint64_t offset);
  Status write_range(View& v, const uint8_t* buf, uint64_t len, uint64_t offset);
  Status zero_whole_blocks(View& v, uint64_t first, uint64_t count);
  // The stripes (ascending, unique) a mutation of blocks [first, last] holds: those of the
  // blocks that are not the delta's data, and of the first/last block whatever their state.
  std::vector<size_t> stripes_for(const View& v, uint64_t first, uint64_t last, bool with_first,
                                  bool with_last) const;
  // One flush round (DESIGN.md "Durability"); flush() leads it. Catches exceptions (ENOMEM).
  Status run_round() noexcept;
  Status flush_round(View& v);
  // A round's rows appended to the journal and synced. Returns false when the round must
  // commit them to the index instead (no journal yet, a move runs, the zone is full, the
  // record could not be written). Errors: EIO after a failed sync (the disk is broken).
  Result<bool> journal_round(View& v, const DeltaMap::Rows& rows);
  // Folds the journal into the index and closes it. REQUIRES: rounds held (hold_rounds).
  Status retire_journal(View& v);

  Status fail_if_broken() const;
  void at(std::string_view point) {
    if (hook_) hook_(point);
    failpoint(point);
  }

  Pool& pool_;
  std::string name_;
  ContainerRecord container_;
  LayerRecord delta_layer_;
  uint64_t size_bytes_ = 0;
  uint32_t block_size_ = 0;
  uint64_t size_blocks_ = 0;
  bool writable_ = false;
  bool snapshot_ = false;   // "CONTAINER@SNAP": no delta (delta_layer_.id == 0), read-only
  std::string diff_since_;  // "CONTAINER@A..B": "CONTAINER@A"
  std::string diff_of_;     // and "CONTAINER@B"
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;  // (offset, length), sorted
  std::mutex diff_mu_;
  std::shared_ptr<const Ranges> changed_;  // GUARDED_BY(diff_mu_); null until computed
  // The diff export's changed ranges, computed on the first call. Errors: those of diff().
  Result<std::shared_ptr<const Ranges>> changed_ranges();
  // Calls fn(from, to, changed) for consecutive pieces covering [offset, offset+len).
  Status for_each_change(uint64_t len, uint64_t offset,
                         const std::function<Status(uint64_t, uint64_t, bool)>& fn);
  Lock container_lock_;
  Lock delta_lock_;  // exclusive when writable: fsck --repair leaves the delta's file alone
  // What the disk serves; replaced by adopt() with the gate closed. GUARDED_BY(load_mu_)
  std::vector<Lock> layer_locks_;   // parallel to chain_
  std::vector<LayerRecord> chain_;  // frozen layers below the delta, top first

  mutable std::mutex load_mu_;  // serialises loading a view and switching state
  // Held by a live change (change()) and a live move for their whole length: one at a time.
  std::mutex live_mu_;
  mutable std::mutex view_mu_;
  std::shared_ptr<View> view_;  // GUARDED_BY(view_mu_); null until the first I/O
  // The write gate: every write, zero and trim holds it shared from its first write to its
  // mark, so holding it exclusively means none is in flight and none starts.
  WriteGate gate_;

  // Striped locks: a write, zero or trim touching a block that is not yet data in the delta
  // holds the stripes of its blocks (ascending order), so no copy-up can resurrect lower data
  // over a concurrent write. A stripe covers a group of kStripeBlocks consecutive blocks (64 KiB
  // at 4 KiB blocks): a large aligned request takes one per group, not one per block.
  static constexpr size_t kStripes = 1024;
  static constexpr uint64_t kStripeBlocks = 16;
  static size_t stripe_of(uint64_t b) { return (b / kStripeBlocks) % kStripes; }
  std::unique_ptr<std::mutex[]> stripes_{new std::mutex[kStripes]};

  // Flush rounds (group commit): each flush takes a ticket; a round covers every ticket issued
  // before it started.
  std::mutex flush_mu_;
  std::condition_variable flush_cv_;
  uint64_t tickets_ = 0;        // GUARDED_BY(flush_mu_)
  uint64_t done_ = 0;           // GUARDED_BY(flush_mu_): tickets covered by a successful round
  uint64_t failed_upto_ = 0;    // GUARDED_BY(flush_mu_): tickets covered by a failed round
  Error failed_error_;          // GUARDED_BY(flush_mu_)
  bool round_running_ = false;  // GUARDED_BY(flush_mu_)
  // 0, or why the disk fails every request with EIO until reopened (disk.cc: an fdatasync
  // failed, or marks may have been dropped from the dirty set for want of memory).
  std::atomic<int> broken_{0};
  // The value of broken_ after a live move failed once the disk had switched to the copy
  // (delta_move.cc); disk.cc's other values are 1 to 3.
  static constexpr int kBrokenMove = 4;

  std::function<void(std::string_view)> hook_;  // tests only

  // A fresh disk's boot window (boot_profile.h): opened on the first request of a writable
  // container whose delta has no file, when the pool has a BootService; closed with the disk.
  std::shared_ptr<BootSession> boot_;            // GUARDED_BY(load_mu_): set once
  std::atomic<BootSession*> boot_raw_{nullptr};  // boot_, for the read path
};

// One Disk per container per process, shared by all connections to it (so multi-conn is
// safe). The last release flushes and closes it, releasing its locks; an acquire racing that
// close reuses the closing Disk, and the Disk is destroyed under the table's mutex, so a
// reconnect never finds the container locked by the Disk that is going away.
// Thread-safety: safe for concurrent use.
class DiskTable {
 public:
  explicit DiskTable(Pool& pool) : pool_(pool) {}
  Result<std::shared_ptr<Disk>> acquire(const std::string& name, bool writable);
  // Takes the caller's reference (pass it with std::move: the Disk must not outlive the
  // table's hold on it). Errors: the final flush's.
  Status release(std::shared_ptr<Disk> disk);
  Status flush_all();
  // Disk::reload_moved(id) on every open disk; the first error is returned after all ran.
  Status reload_moved(LayerId id);

 private:
  Pool& pool_;
  std::mutex mu_;
  struct Entry {
    std::shared_ptr<Disk> disk;
    unsigned users = 0;    // open handles
    unsigned closers = 0;  // releases flushing it outside mu_; they keep the entry
  };
  std::map<std::string, Entry> disks_;  // GUARDED_BY(mu_)
};

}  // namespace layer
