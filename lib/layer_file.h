// layer_file.h — the layer I/O seam: one LayerFile per layer, made by the LayerStore of the
// layer's tier, which addresses files by layer id.
//
// A layer file is sparse and same-offset: block b of the disk lives at offset b*block_size.
// The local-directory implementation is the first backend; FaultInjectingStore wraps it for
// power-loss tests (drops or tears every write not yet covered by a sync, on demand); a RADOS
// backend can plug in here later (DESIGN.md "Beyond one host").
//
// Thread-safety: every LayerFile method may be called concurrently (pread/pwrite semantics).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "error.h"
#include "records.h"

namespace layer {

// The directory part of a path ("." when it has none, "/" at the root).
std::string dir_of(const std::string& path);
// fsync of a directory, making the names in it durable. Errors: EIO, ENOENT, EACCES.
Status fsync_dir(const std::string& dir);

class LayerFile {
 public:
  virtual ~LayerFile() = default;
  // Reads exactly len bytes (holes and bytes past the end read as zeroes). Errors: EIO.
  virtual Status read(void* buf, uint64_t len, uint64_t offset) = 0;
  // Writes exactly len bytes. Errors: EIO, ENOSPC, EDQUOT, EFBIG, EROFS.
  virtual Status write(const void* buf, uint64_t len, uint64_t offset) = 0;
  // Deallocates [offset, offset+len) keeping the size; the range reads as zeroes. Errors: EIO,
  // EOPNOTSUPP only if the filesystem cannot punch holes (callers then write zeroes).
  virtual Status punch(uint64_t offset, uint64_t len) = 0;
  // fdatasync. After a failure the file's unsynced data may be lost: callers must not retry
  // and claim success (DESIGN.md "Durability"). Errors: EIO, ENOSPC.
  virtual Status sync() = 0;
  // Makes the file's name durable in its directory (fsync of the directory). A writable delta
  // opened after a crash may have a name nobody synced. Errors: EIO.
  virtual Status sync_entry() = 0;
  // Calls fn(offset, len) for each allocated range in [offset, offset+len) (SEEK_DATA/HOLE).
  virtual Status data_extents(uint64_t offset, uint64_t len,
                              const std::function<void(uint64_t, uint64_t)>& fn) = 0;
  // Hints that the range will be read soon (posix_fadvise WILLNEED). Never fails.
  virtual void prefetch(uint64_t offset, uint64_t len) = 0;
  // Hints that access is random (a writable delta: POSIX_FADV_RANDOM). Readahead would put
  // the delta's data in large page-cache folios, and a later 4 KiB write then dirties a whole
  // folio: measured 20x slower overwrites after a sequential read (docs/performance.md).
  virtual void hint_random_access() {}
  virtual Result<uint64_t> size() = 0;
  virtual const std::string& path() const = 0;
};

// Forwards every call to an inner file: the base of files that wrap another (the fault store's,
// the test files), so a new LayerFile method is forwarded in one place.
class ForwardingFile : public LayerFile {
 public:
  explicit ForwardingFile(std::shared_ptr<LayerFile> inner) : inner_(std::move(inner)) {}
  Status read(void* buf, uint64_t len, uint64_t offset) override {
    return inner_->read(buf, len, offset);
  }
  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    return inner_->write(buf, len, offset);
  }
  Status punch(uint64_t offset, uint64_t len) override { return inner_->punch(offset, len); }
  Status sync() override { return inner_->sync(); }
  Status sync_entry() override { return inner_->sync_entry(); }
  Status data_extents(uint64_t offset, uint64_t len,
                      const std::function<void(uint64_t, uint64_t)>& fn) override {
    return inner_->data_extents(offset, len, fn);
  }
  void prefetch(uint64_t offset, uint64_t len) override { inner_->prefetch(offset, len); }
  void hint_random_access() override { inner_->hint_random_access(); }
  Result<uint64_t> size() override { return inner_->size(); }
  const std::string& path() const override { return inner_->path(); }

 protected:
  std::shared_ptr<LayerFile> inner_;
};

// How LayerStore::copy_to goes about a copy. The file is copied in pieces [k*piece_bytes,
// (k+1)*piece_bytes) (the last one ends at the file's size), in ascending order.
struct CopyOptions {
  // Called once for each piece, holes included, after its data ranges were written to `copy`
  // (not yet synced: the copy is synced once, after the last piece), in ascending order, on a
  // second thread while the next piece is copied; never two at once. It checks the copy (the
  // mover: against the layer's checksums, or byte for byte against `src`); an error stops the
  // copy, and copy_to returns it.
  std::function<Status(LayerFile& src, LayerFile& copy, uint64_t offset, uint64_t len)> check;
  // A positive multiple of 4096.
  uint64_t piece_bytes = uint64_t{32} << 20;
  // Called first on each thread the copy runs on (the copy does not run on the caller's), e.g.
  // to lower their priority; it must not fail.
  std::function<void()> thread_setup;
  // Leave in the page cache what the copy reads and writes (readers of the file find it there:
  // the copy doubles as their readahead). Otherwise, between local files, the copy leaves the
  // page cache as it found it: it drops the source's pages it read in and the copy's pages
  // there, and keeps the copy's pages where the source's were cached already.
  bool keep_cache = false;
  // Bytes per second the copy reads at most (0: as fast as it can). A paced copy also goes in
  // smaller units, one at a time, with no readahead on the source: what a reader of the same
  // device may find queued ahead of it is one unit of the copy's reads or writes, not the
  // kernel's readahead window and several units of writeback.
  uint64_t rate_bytes_per_sec = 0;
};

// Layer files of one tier, addressed by layer id (DESIGN.md "Beyond one host": the seam a
// remote tier plugs into). Nothing outside a store knows how it names or keeps its files.
// Thread-safety: every method may be called concurrently.
class LayerStore {
 public:
  virtual ~LayerStore() = default;
  // Where the layer's file is, for messages (a local store: its path).
  virtual std::string describe(LayerId id) const = 0;
  // Opens an existing layer file. Errors: ENOENT, EACCES, EIO.
  virtual Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) = 0;
  // Creates a new, empty file of size_bytes (sparse), fsyncs it and its directory so that the
  // index may name it. Never replaces an existing file. Errors: EEXIST, ENOSPC, EIO. After an
  // EIO from the directory fsync the file is in place (its name possibly not durable): a retry
  // sees EEXIST, and the caller may open it and call sync_entry().
  virtual Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) = 0;
  // Removes the layer's file and any leftover of an unfinished create; missing ones are fine.
  virtual Status remove(LayerId id) = 0;
  // Moves the layer's file out of the store into directory `dir` (made if missing; for a
  // store whose files cannot be renamed there, a lost+found beside them) instead of deleting
  // it, and removes a leftover of an unfinished create. Returns where the file went ("" when
  // there was none). Errors: EIO, EACCES.
  virtual Result<std::string> set_aside(LayerId id, const std::string& dir) = 0;
  // The size of the layer's file; std::nullopt when it has none. Errors: EIO, EACCES.
  virtual Result<std::optional<uint64_t>> stat(LayerId id) = 0;
  // The bytes the layer's file takes in the store (allocated blocks: a sparse file takes less
  // than its size); std::nullopt when it has none. Errors: EIO, EACCES.
  virtual Result<std::optional<uint64_t>> allocated(LayerId id) = 0;
  struct Space {
    uint64_t total = 0;  // bytes the store can hold in all
    uint64_t used = 0;   // bytes in use (by anything)
  };
  // How full what holds the store is (a directory: its filesystem). Errors: EIO, EACCES.
  virtual Result<Space> space() = 0;
  struct Entry {
    LayerId id = 0;
    bool unfinished = false;  // the leftover of a create that did not finish
    std::string name;         // as describe() would say
  };
  // Every layer file and unfinished create in the store. Errors: EIO, EACCES.
  virtual Result<std::vector<Entry>> list() = 0;
  // Copies the layer's file into `dst` as a new file of the same id and size, only its data
  // ranges, synced, piece by piece (CopyOptions: each piece can be checked as soon as it is
  // written, while the next is copied). A failed copy, or a piece whose check fails, removes
  // what it wrote. Returns the bytes of data copied (the source's data ranges). Errors: EEXIST
  // (dst has it), ENOENT, ENOSPC, EIO, and those of the check.
  virtual Result<uint64_t> copy_to(LayerId id, LayerStore& dst,
                                   const CopyOptions& options = {}) = 0;
  // Whether this store can hold one file of size_bytes. Errors: EINVAL naming the limit.
  virtual Status check_can_hold(uint64_t size_bytes) = 0;
};

// Layer files in one local tier directory: DIR/<id>.layer (O_CLOEXEC, pread/pwrite, fallocate
// punch); a create writes DIR/<id>.layer.new first and renames it into place.
class LocalStore : public LayerStore {
 public:
  explicit LocalStore(std::string dir) : dir_(std::move(dir)) {}
  const std::string& dir() const { return dir_; }
  std::string describe(LayerId id) const override;
  Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) override;
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override;
  Status remove(LayerId id) override;
  Result<std::string> set_aside(LayerId id, const std::string& dir) override;
  Result<std::optional<uint64_t>> stat(LayerId id) override;
  Result<std::optional<uint64_t>> allocated(LayerId id) override;
  Result<Space> space() override;
  Result<std::vector<Entry>> list() override;
  Result<uint64_t> copy_to(LayerId id, LayerStore& dst, const CopyOptions& options = {}) override;
  Status check_can_hold(uint64_t size_bytes) override;

 protected:
  // fsync of the directory (the fault-injecting store fails it on demand).
  virtual Status sync_dir();

 private:
  std::string dir_;
};

// Forwards every call to an inner store: the base of stores that wrap another (the test
// stores), so a new LayerStore method is forwarded in one place.
class ForwardingStore : public LayerStore {
 public:
  explicit ForwardingStore(std::unique_ptr<LayerStore> inner) : inner_(std::move(inner)) {}
  LayerStore& inner() { return *inner_; }
  std::string describe(LayerId id) const override { return inner_->describe(id); }
  Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) override {
    return inner_->open(id, writable);
  }
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override {
    return inner_->create(id, size_bytes);
  }
  Status remove(LayerId id) override { return inner_->remove(id); }
  Result<std::string> set_aside(LayerId id, const std::string& dir) override {
    return inner_->set_aside(id, dir);
  }
  Result<std::optional<uint64_t>> stat(LayerId id) override { return inner_->stat(id); }
  Result<std::optional<uint64_t>> allocated(LayerId id) override { return inner_->allocated(id); }
  Result<Space> space() override { return inner_->space(); }
  Result<std::vector<Entry>> list() override { return inner_->list(); }
  Result<uint64_t> copy_to(LayerId id, LayerStore& dst, const CopyOptions& options = {}) override {
    return inner_->copy_to(id, dst, options);
  }
  Status check_can_hold(uint64_t size_bytes) override { return inner_->check_can_hold(size_bytes); }

 private:
  std::unique_ptr<LayerStore> inner_;
};

// For power-loss tests: files behave like LocalStore's, but each write and punch first saves
// what it overwrites; simulate_power_loss() puts back the saved bytes of every write not yet
// covered by a sync() of its file (all of them, or with tear=true a random subset, as a disk
// that reordered its cache would). A sync() covers the writes that completed before it began.
// It can fail the next sync() with EIO as Linux does: the unsynced writes are lost (undone) and
// the error is reported once, so the sync after it succeeds. It can fail directory fsyncs.
// Thread-safety: as LayerStore; the hooks must be set while no I/O runs.
class FaultInjectingStore : public ForwardingStore {
 public:
  // Layer files in `dir`, as a LocalStore keeps them.
  explicit FaultInjectingStore(std::string dir);
  Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) override;
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override;

  // Undoes every unsynced write of every file this store opened. REQUIRES: no I/O in flight.
  void simulate_power_loss(bool tear, uint64_t seed);
  // The next n sync() calls fail with EIO, undoing that file's unsynced writes first.
  void fail_next_syncs(int n);
  // The next n directory fsyncs (create's, sync_entry's) fail with EIO.
  void fail_next_dir_syncs(int n);
  // Directory fsyncs attempted so far.
  int dir_syncs();

  // Test hooks: on_sync runs at the start of every file sync(); on_write_saved runs inside
  // write() after its undo record is saved and before its data is written.
  std::function<void()> on_sync;
  std::function<void()> on_write_saved;

 private:
  class File;
  class Local;
  bool take_sync_failure();
  Status dir_sync_gate(const std::string& dir);
  // Wraps a local file so its writes can be undone.
  Result<std::shared_ptr<LayerFile>> track(Result<std::shared_ptr<LayerFile>> inner);
  std::mutex mu_;
  std::vector<std::shared_ptr<File>> files_;  // kept so a power loss can be simulated after close
  int failing_syncs_ = 0;                     // GUARDED_BY(mu_)
  int failing_dir_syncs_ = 0;                 // GUARDED_BY(mu_)
  int dir_syncs_ = 0;                         // GUARDED_BY(mu_)
};

}  // namespace layer
