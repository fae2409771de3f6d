// index.h — the pool's LMDB index: environment, named dbs, big-endian keys, typed transactions,
// and the committer thread that runs every write transaction of a process.
//
// Settings (docs/format.md): map size 64 GiB without MDB_WRITEMAP, maxreaders 1024 (fixed by
// whoever creates the env, `layer init`), MDB_NOTLS, one Index per process. Transactions hold a
// process-wide shared lock so that an MDB_MAP_RESIZED answer can be handled by
// mdb_env_set_mapsize(env, 0) under the exclusive lock, which LMDB allows only while the process
// has no transaction open.
//
// Thread-safety: Index and Committer are safe for concurrent use. A ReadTxn or WriteTxn belongs
// to one thread at a time (MDB_NOTLS lets it move between threads, never be shared).
#pragma once

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

 protected:
  friend class Index;
  friend class Committer;
  ReadTxn(Index* index, MDB_txn* txn, std::shared_lock<std::shared_mutex> lock);
  Index* index_;
  MDB_txn* txn_;
  std::shared_lock<std::shared_mutex> resize_lock_;
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

class Index {
 public:
  struct Options {
    bool create = false;     // create the environment (layer init)
    bool read_only = false;  // MDB_RDONLY
    bool no_lock = false;    // MDB_NOLOCK: only for nbdkit's get_ready validation
  };
  static constexpr uint64_t kMapSizeBytes = 64ULL << 30;
  static constexpr unsigned kMaxReaders = 1024;

  // Opens the environment in directory `dir` (which must exist) and its named dbs.
  // Errors: ENOENT (no index there), EACCES, EIO (LMDB failure or a lock.mdb with fewer than
  // kMaxReaders reader slots), EINVAL.
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

 private:
  friend class ReadTxn;
  friend class WriteTxn;
  friend class Committer;
  Index() = default;
  Result<MDB_txn*> begin(unsigned flags, std::shared_lock<std::shared_mutex>& lock);

  MDB_env* env_ = nullptr;
  unsigned int dbi_[static_cast<int>(Db::kCount)] = {};  // MDB_dbi
  bool read_only_ = false;
  std::string dir_;
  std::shared_mutex resize_mu_;  // shared by every open transaction; exclusive for a resize
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

  // Test seam: the next n batches that would commit abort instead, and their jobs fail with
  // `error` (ENOSPC models a full map, MDB_MAP_FULL).
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
  bool stop_ = false;
  int failing_commits_ = 0;  // GUARDED_BY(mu_)
  Error commit_fault_;       // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace layer
