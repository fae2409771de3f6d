// index.h — the pool's LMDB index: environment, named dbs, big-endian keys, typed transactions,
// and the committer thread that runs every write transaction of a process.
//
// Settings (docs/format.md): map size 64 GiB (or more, once grown) without MDB_WRITEMAP,
// maxreaders 1024 (fixed by whoever creates the env, `layer init`), MDB_NOTLS, one Index per
// process. Transactions hold a process-wide shared lock so that the map can be resized under the
// exclusive lock, which LMDB allows only while the process has no transaction open: to adopt
// another process's growth (MDB_MAP_RESIZED, mdb_env_set_mapsize(env, 0)) and to grow it after
// MDB_MAP_FULL (the committer, up to a limit).
//
// Thread-safety: Index and Committer are safe for concurrent use. A ReadTxn or WriteTxn belongs
// to the thread that began it (its hold on the resize lock is counted per thread, so that a
// thread never waits for a resize its own transaction blocks).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "error.h"

// LMDB's handles, opaque here: only index.cc includes <lmdb.h>.
struct MDB_env;
struct MDB_txn;

namespace layer {

// The named databases (DESIGN.md "Index"). Values are encoded by records.h.
enum class Db : int {
  kMeta = 0,
  kLayers,
  kMaps,
  kSums,
  kImages,
  kContainers,
  kSnapshots,
  kHeat,
  kIntents,
  // Added after format version 1 was released: an index made before it lacks the db. A
  // writable open creates it; a read-only one reads it as empty (Index::has_db).
  kStats,
  kCount
};
const char* db_name(Db db);

// Rows one write transaction may change at most: LMDB has one writer for every process of a
// pool, so long work (flush rounds, import, rm) commits in pieces this size.
constexpr size_t kMaxRowsPerTxn = 10000;

// Big-endian key encoding, so that range scans follow disk order.
std::string key_u64(uint64_t id);
std::string key_u64_u32(uint64_t id, uint32_t n);
// Decodes a key made by key_u64_u32; std::nullopt when `key` is not 12 bytes.
std::optional<std::pair<uint64_t, uint32_t>> decode_key_u64_u32(std::string_view key);
std::optional<uint64_t> decode_key_u64(std::string_view key);

class Index;

// A read-only snapshot of the index. Aborts (releases) in its destructor.
// Views returned by get() and passed to scan() callbacks are valid until the transaction ends.
class ReadTxn {
 public:
  ReadTxn(ReadTxn&&) noexcept;
  ReadTxn& operator=(ReadTxn&&) = delete;
  ~ReadTxn();

  // The value at `key`, std::nullopt when absent. Errors: EIO (LMDB failure).
  Result<std::optional<std::string_view>> get(Db db, std::string_view key);

  // Calls fn(key, value) for every key starting with `prefix`, in key order, until fn returns
  // false. Errors: EIO; fn's own errors are returned as they are.
  Status scan(Db db, std::string_view prefix,
              const std::function<Result<bool>(std::string_view, std::string_view)>& fn);
  // As scan, from the first key >= `from` (which should start with `prefix`).
  Status scan_from(Db db, std::string_view prefix, std::string_view from,
                   const std::function<Result<bool>(std::string_view, std::string_view)>& fn);
  // The first key >= `from` in `db`, std::nullopt when there is none. Errors: EIO.
  Result<std::optional<std::string>> next_key(Db db, std::string_view from);

 protected:
  friend class Index;
  friend class Committer;
  ReadTxn(Index* index, MDB_txn* txn, std::shared_lock<std::shared_timed_mutex> lock);
  // Ends the transaction's hold on the resize lock (and this thread's count of holds).
  void release_resize_lock();
  Index* index_;
  MDB_txn* txn_;
  std::shared_lock<std::shared_timed_mutex> resize_lock_;
};

// A write transaction: all of one metadata change. Aborted in its destructor unless committed.
// REQUIRES: only the Committer (or a single-threaded tool through Committer::run) creates one.
class WriteTxn : public ReadTxn {
 public:
  WriteTxn(WriteTxn&&) noexcept = default;

  // Errors: EIO; ENOSPC when the 64 GiB map is full.
  Status put(Db db, std::string_view key, std::string_view value);
  // Like put, with MDB_APPEND when `key` sorts after every key in `db` (import's map rows pack
  // pages fuller that way); falls back to an ordinary put otherwise.
  Status append(Db db, std::string_view key, std::string_view value);
  // Deletes `key`; deleting an absent key is not an error.
  Status del(Db db, std::string_view key);
  // Deletes every key that starts with `prefix`, at most `limit` of them; returns how many.
  Result<uint64_t> del_prefix(Db db, std::string_view prefix, uint64_t limit = UINT64_MAX);
  // Returns the next value of the u64 counter `name` in `meta` (first call returns 1).
  Result<uint64_t> next_id(std::string_view name);

  // Commits; the transaction is over either way. Errors: EIO, ENOSPC.
  Status commit();

 private:
  friend class Index;
  friend class Committer;
  using ReadTxn::ReadTxn;
};

// What Index::walk found: a whole index read through.
struct IndexWalk {
  uint64_t txnid = 0;       // the transaction the walk read
  uint64_t entries = 0;     // rows of the named dbs
  uint64_t free_pages = 0;  // pages listed in LMDB's free list
  uint64_t file_bytes = 0;  // data.mdb's size
  uint64_t used_bytes = 0;  // (last page + 1) * page size
};

class Index {
 public:
  struct Options {
    bool create = false;     // create the environment (layer init)
    bool read_only = false;  // MDB_RDONLY
    bool no_lock = false;    // MDB_NOLOCK: only for nbdkit's get_ready validation
    // The map size to start with; 0: kMapSizeBytes, doubled while data.mdb holds more than a
    // third of it (an index that grew). LMDB never maps less than the data needs.
    uint64_t map_size_bytes = 0;
    // How far the committer may grow the map after MDB_MAP_FULL; 0: kMaxMapSizeBytes.
    uint64_t max_map_size_bytes = 0;
  };
  static constexpr uint64_t kMapSizeBytes = 64ULL << 30;
  // The map only reserves address space (no MDB_WRITEMAP: data.mdb grows as pages are written),
  // so growing it costs nothing until the data is there.
  static constexpr uint64_t kMaxMapSizeBytes = 1ULL << 40;
  static constexpr unsigned kMaxReaders = 1024;
  // How long a resize waits for the transactions of other threads to end before giving up.
  static constexpr std::chrono::seconds kResizeWait{10};

  // Opens the environment in directory `dir` (which must exist) and its named dbs.
  // Errors: ENOENT (no index there), EACCES, EUCLEAN (not an LMDB file, or damaged: LMDB's
  // MDB_INVALID, MDB_CORRUPTED, MDB_PAGE_NOTFOUND, MDB_VERSION_MISMATCH), EIO (another LMDB
  // failure or a lock.mdb with fewer than kMaxReaders reader slots), EINVAL.
  static Result<std::unique_ptr<Index>> open(const std::string& dir, const Options& options);
  ~Index();
  Index(const Index&) = delete;
  Index& operator=(const Index&) = delete;

  // Errors: EIO.
  Result<ReadTxn> begin_read();
  // Prefer Committer::run: LMDB has one writer across all processes, so write transactions
  // must stay short. Errors: EIO, EACCES (read-only index).
  Result<WriteTxn> begin_write();

  // Clears reader slots left by dead processes (mdb_reader_check).
  void check_readers();
  bool read_only() const { return read_only_; }
  const std::string& dir() const { return dir_; }
  // False for a db added after the index was made (Db::kStats), when this open was read-only
  // and so could not create it: it reads as empty, and writing to it fails with EIO.
  bool has_db(Db db) const { return has_db_[static_cast<int>(db)]; }

  // The size of this process's map of the index, and the limit grow_map() grows it to.
  uint64_t map_size() const;
  uint64_t max_map_size() const { return max_map_size_; }
  // The id of the last committed transaction (any process's).
  uint64_t last_txnid() const;
  // Grows this process's map (doubling, at most to max_map_size()): what the committer does
  // after MDB_MAP_FULL. Waits up to kResizeWait for other threads' transactions to end.
  // Returns the new size. Errors: ENOSPC (at the limit already), EAGAIN (this thread holds a
  // transaction, or others' did not end in time), EIO.
  Result<uint64_t> grow_map();
  // How many times grow_map() grew the map (tests, logs).
  uint64_t map_grows() const { return map_grows_.load(); }

  // Writes a compact copy of the index (mdb_env_copyfd2 with MDB_CP_COMPACT: free pages
  // omitted, pages renumbered) as of one read transaction to `fd`, an empty file the caller
  // syncs. Returns the copied transaction's id. Errors: EIO, ENOSPC, EUCLEAN (damage found).
  Result<uint64_t> copy_compact(int fd);

  // Reads the whole index in one read transaction: every page of every named db, LMDB's own
  // main and free-list dbs, every key and value touched (first byte, every 4 KiB, last byte),
  // keys in order, entry counts equal to the dbs' records, free-list page numbers within the
  // file, and the file long enough for its last page. LMDB keeps no checksums: a damaged page
  // can also crash the reader (SIGSEGV, SIGBUS, an assertion), so callers run this in a child
  // process (index_check.h). Errors: EUCLEAN naming what is damaged, EIO.
  Result<IndexWalk> walk();

 private:
  friend class ReadTxn;
  friend class WriteTxn;
  friend class Committer;
  Index() = default;
  Result<MDB_txn*> begin(unsigned flags, std::shared_lock<std::shared_timed_mutex>& lock);
  // Runs fn with the resize lock held exclusively, after waiting up to kResizeWait for the
  // transactions of other threads. Errors: EAGAIN (this thread holds a transaction, or the wait
  // timed out), fn's.
  Status with_resize_lock(const char* why, const std::function<Status()>& fn);

  MDB_env* env_ = nullptr;
  unsigned int dbi_[static_cast<int>(Db::kCount)] = {};  // MDB_dbi
  bool has_db_[static_cast<int>(Db::kCount)] = {};
  bool read_only_ = false;
  std::string dir_;
  uint64_t max_map_size_ = kMaxMapSizeBytes;
  std::atomic<uint64_t> map_grows_{0};
  // Shared by every open transaction (and every reader of the map: mdb_env_info); exclusive
  // for a resize.
  mutable std::shared_timed_mutex resize_mu_;
};

// Runs every write transaction of a process on one thread, batching the jobs that queue up
// meanwhile into one transaction (group commit). A job that fails aborts only itself: the
// batch is retried without it.
// Thread-safety: run() may be called from any thread; it blocks until the job's transaction
// committed or failed. The Index must outlive the Committer.
class Committer {
 public:
  using Job = std::function<Status(WriteTxn&)>;
  // Starts the committer thread. Errors: EAGAIN or ENOMEM when no thread can be started.
  static Result<std::unique_ptr<Committer>> start(Index& index);
  ~Committer();  // finishes queued jobs, then joins
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Runs job in a write transaction and commits it. A job that throws fails alone with ENOMEM
  // (std::bad_alloc) or EIO. Errors: the job's own, or the commit's (EIO, ENOSPC), ENOMEM.
  Status run(Job job);
  // Queues job for a batch that starts no sooner than `delay` from now and returns at once;
  // done(result) runs on the committer thread after that batch, outside the committer's lock
  // (it must not call run()). Jobs still queued when the committer stops run then. Errors
  // (only when nothing was queued): ENOMEM, ESHUTDOWN.
  using Done = std::function<void(Status)>;
  Status post(Job job, Done done, std::chrono::milliseconds delay);

  // Test seam: the next n batches that would commit abort instead, and their jobs fail with
  // `error` (ENOSPC models a full map, MDB_MAP_FULL). A real full map (Index::Options'
  // map_size_bytes) fails a batch with ENOSPC too; the committer then grows the map
  // (Index::grow_map) before it answers, so the next batch can succeed.
  void fail_next_commits(int n, Error error);

  // How often the thread clears reader slots of dead processes (mdb_reader_check), busy or not.
  static constexpr std::chrono::seconds kReaderCheckInterval{30};

 private:
  struct Pending;
  explicit Committer(Index& index);
  void loop();
  void run_batch(std::deque<std::shared_ptr<Pending>>& batch) noexcept;
  std::optional<Error> take_commit_fault();
  Index& index_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Pending>> queue_;
  std::vector<std::shared_ptr<Pending>> delayed_;  // GUARDED_BY(mu_): posted, not yet due
  bool stop_ = false;
  int failing_commits_ = 0;  // GUARDED_BY(mu_)
  Error commit_fault_;       // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace layer
