// index.cc — LMDB environment, named dbs, transactions and the committer thread.
//
// Design notes:
// - One env per process (LMDB forbids opening the same env twice in a process, and an env must
//   not cross a fork: the plugin opens it in after_fork).
// - All named dbs are created by `layer init` (Index::open with create); a later open finds
//   them or reports the index as corrupt, so a read-only open never needs a write transaction.
// - Map size starts at 64 GiB (more for a large data.mdb). When a batch fails with
//   MDB_MAP_FULL its jobs get ENOSPC and the committer doubles the map (up to 1 TiB) before it
//   answers them, so a retry can succeed. When another process grew the map past ours, LMDB
//   answers MDB_MAP_RESIZED at txn begin; we then adopt the new size with
//   mdb_env_set_mapsize(env, 0). Both are only allowed while this process has no transaction
//   open — hence every transaction holds resize_mu_ shared and a resize takes it exclusively,
//   waiting a bounded time (a thread holding a transaction while it waits for the committer
//   would otherwise deadlock with it) and never from a thread that holds a transaction itself.
// - The committer runs each job in a nested transaction of one batch transaction, so a failing
//   job is rolled back alone and the others still commit together (group commit: one pair of
//   LMDB syncs for all the flush rounds that queued up meanwhile).
#include "index.h"

#include <lmdb.h>

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <system_error>
#include <type_traits>

#include "failpoint.h"

static_assert(std::is_same_v<MDB_dbi, unsigned int>, "index.h stores MDB_dbi as unsigned int");

namespace layer {
namespace {

// Resize-lock holds of the transactions this thread has open: a thread holding one must not
// wait for the exclusive lock (it would wait for itself).
thread_local int t_txn_holds = 0;
// Set when an LMDB call on this thread answered MDB_MAP_FULL (the committer's jobs and commits
// run on its thread: it grows the map after such a batch).
thread_local bool t_map_full = false;

// LMDB's answers that mean the file is not a sound index.
bool is_damage(int rc) {
  return rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND || rc == MDB_INVALID ||
         rc == MDB_VERSION_MISMATCH || rc == MDB_CURSOR_FULL;
}

// The dbs added after format version 1 (index.h): an index may lack them.
bool is_added_db(Db db) { return db == Db::kStats; }

Error lmdb_error(int rc, std::string_view what) {
  int code = EIO;
  if (rc == MDB_MAP_FULL) {
    code = ENOSPC;
    t_map_full = true;
  } else if (is_damage(rc)) {
    code = EUCLEAN;
  } else if (rc == EACCES || rc == ENOENT || rc == ENOSPC || rc == ENOMEM || rc == EROFS) {
    code = rc;
  }
  return make_error(code, "index: {}: {}", what, mdb_strerror(rc));
}

MDB_val val(std::string_view s) { return MDB_val{s.size(), const_cast<char*>(s.data())}; }
std::string_view view(const MDB_val& v) {
  return std::string_view(static_cast<const char*>(v.mv_data), v.mv_size);
}

// A cursor closed on every path.
class Cursor {
 public:
  Cursor() = default;
  ~Cursor() {
    if (c_) mdb_cursor_close(c_);
  }
  MDB_cursor** out() { return &c_; }
  MDB_cursor* get() { return c_; }

 private:
  MDB_cursor* c_ = nullptr;
};

// After mdb_env_open failed with ENOMEM: whether LMDB wanted a map for more pages than the file
// holds (the last page number in a damaged meta page) rather than this process lacking address
// space. A second env with a map the size of the file tells: LMDB maps no less than the meta
// page's last page, so it fails again only when that lies beyond any sane size.
bool meta_asks_too_much(const std::string& dir, const struct stat& st) {
  MDB_env* probe = nullptr;
  if (mdb_env_create(&probe) != 0) return false;
  mdb_env_set_maxdbs(probe, static_cast<MDB_dbi>(Db::kCount) + 4);
  mdb_env_set_mapsize(probe, std::max<uint64_t>(static_cast<uint64_t>(st.st_size), 1 << 20));
  const int rc = mdb_env_open(probe, dir.c_str(), MDB_NOTLS | MDB_RDONLY | MDB_NOLOCK, 0644);
  mdb_env_close(probe);
  return rc == ENOMEM;
}

}  // namespace

const char* db_name(Db db) {
  static const char* const kNames[] = {"meta",       "layers",    "maps", "sums",    "images",
                                       "containers", "snapshots", "heat", "intents", "stats"};
  return kNames[static_cast<int>(db)];
}

std::string key_u64(uint64_t id) {
  std::string k(8, '\0');
  for (int i = 0; i < 8; ++i) k[i] = static_cast<char>(id >> (56 - 8 * i));
  return k;
}

std::string key_u64_u32(uint64_t id, uint32_t n) {
  std::string k = key_u64(id);
  for (int i = 0; i < 4; ++i) k.push_back(static_cast<char>(n >> (24 - 8 * i)));
  return k;
}

std::optional<uint64_t> decode_key_u64(std::string_view key) {
  if (key.size() != 8) return std::nullopt;
  uint64_t v = 0;
  for (char c : key) v = v << 8 | static_cast<uint8_t>(c);
  return v;
}

std::optional<std::pair<uint64_t, uint32_t>> decode_key_u64_u32(std::string_view key) {
  if (key.size() != 12) return std::nullopt;
  uint64_t id = *decode_key_u64(key.substr(0, 8));
  uint32_t n = 0;
  for (char c : key.substr(8)) n = n << 8 | static_cast<uint8_t>(c);
  return std::make_pair(id, n);
}

// ---- ReadTxn / WriteTxn ----

ReadTxn::ReadTxn(Index* index, MDB_txn* txn, std::shared_lock<std::shared_timed_mutex> lock)
    : index_(index), txn_(txn), resize_lock_(std::move(lock)) {}

ReadTxn::ReadTxn(ReadTxn&& o) noexcept
    : index_(o.index_), txn_(o.txn_), resize_lock_(std::move(o.resize_lock_)) {
  o.txn_ = nullptr;
}

ReadTxn::~ReadTxn() {
  if (txn_) mdb_txn_abort(txn_);
  release_resize_lock();
}

void ReadTxn::release_resize_lock() {
  if (!resize_lock_.owns_lock()) return;
  resize_lock_.unlock();
  if (t_txn_holds > 0) --t_txn_holds;
}

Result<std::optional<std::string_view>> ReadTxn::get(Db db, std::string_view key) {
  if (!index_->has_db(db)) return std::optional<std::string_view>();
  MDB_val k = val(key), v;
  int rc = mdb_get(txn_, index_->dbi_[static_cast<int>(db)], &k, &v);
  if (rc == MDB_NOTFOUND) return std::optional<std::string_view>();
  if (rc != 0) return lmdb_error(rc, fmt::format("get from {}", db_name(db)));
  return std::optional<std::string_view>(view(v));
}

Status ReadTxn::scan(Db db, std::string_view prefix,
                     const std::function<Result<bool>(std::string_view, std::string_view)>& fn) {
  return scan_from(db, prefix, prefix, fn);
}

Result<std::optional<std::string>> ReadTxn::next_key(Db db, std::string_view from) {
  std::optional<std::string> found;
  LAYER_TRY(scan_from(db, "", from, [&](std::string_view k, std::string_view) -> Result<bool> {
    found = std::string(k);
    return false;
  }));
  return found;
}

Status ReadTxn::scan_from(
    Db db, std::string_view prefix, std::string_view from,
    const std::function<Result<bool>(std::string_view, std::string_view)>& fn) {
  if (!index_->has_db(db)) return {};
  Cursor cur;
  int rc = mdb_cursor_open(txn_, index_->dbi_[static_cast<int>(db)], cur.out());
  if (rc != 0) return lmdb_error(rc, "cursor open");
  MDB_val k = val(from), v;
  rc = mdb_cursor_get(cur.get(), &k, &v, from.empty() ? MDB_FIRST : MDB_SET_RANGE);
  while (rc == 0) {
    std::string_view key = view(k);
    if (key.substr(0, prefix.size()) != prefix) break;
    LAYER_ASSIGN(bool more, fn(key, view(v)));
    if (!more) return {};
    rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT);
  }
  if (rc != 0 && rc != MDB_NOTFOUND) return lmdb_error(rc, fmt::format("scan {}", db_name(db)));
  return {};
}

// A db this open could not create (Index::has_db) takes no writes.
static Status missing_db(Db db) {
  return make_error(EIO, "index: db {} is missing (the index was opened read-only)", db_name(db));
}

Status WriteTxn::put(Db db, std::string_view key, std::string_view value) {
  if (!index_->has_db(db)) return missing_db(db);
  MDB_val k = val(key), v = val(value);
  int rc = mdb_put(txn_, index_->dbi_[static_cast<int>(db)], &k, &v, 0);
  if (rc != 0) return lmdb_error(rc, fmt::format("put into {}", db_name(db)));
  return {};
}

Status WriteTxn::append(Db db, std::string_view key, std::string_view value) {
  if (!index_->has_db(db)) return missing_db(db);
  MDB_val k = val(key), v = val(value);
  int rc = mdb_put(txn_, index_->dbi_[static_cast<int>(db)], &k, &v, MDB_APPEND);
  // Another process may have committed a higher key meanwhile (a delta's rows): then the
  // key is not last and an ordinary put is right.
  if (rc == MDB_KEYEXIST) rc = mdb_put(txn_, index_->dbi_[static_cast<int>(db)], &k, &v, 0);
  if (rc != 0) return lmdb_error(rc, fmt::format("append into {}", db_name(db)));
  return {};
}

Status WriteTxn::del(Db db, std::string_view key) {
  if (!index_->has_db(db)) return {};
  MDB_val k = val(key);
  int rc = mdb_del(txn_, index_->dbi_[static_cast<int>(db)], &k, nullptr);
  if (rc != 0 && rc != MDB_NOTFOUND)
    return lmdb_error(rc, fmt::format("delete from {}", db_name(db)));
  return {};
}

Result<uint64_t> WriteTxn::del_prefix(Db db, std::string_view prefix, uint64_t limit) {
  if (!index_->has_db(db)) return uint64_t{0};
  Cursor cur;
  int rc = mdb_cursor_open(txn_, index_->dbi_[static_cast<int>(db)], cur.out());
  if (rc != 0) return lmdb_error(rc, "cursor open");
  MDB_val k = val(prefix), v;
  uint64_t n = 0;
  rc = mdb_cursor_get(cur.get(), &k, &v, prefix.empty() ? MDB_FIRST : MDB_SET_RANGE);
  while (rc == 0 && n < limit && view(k).substr(0, prefix.size()) == prefix) {
    rc = mdb_cursor_del(cur.get(), 0);
    if (rc != 0) return lmdb_error(rc, fmt::format("delete from {}", db_name(db)));
    ++n;
    rc = mdb_cursor_get(cur.get(), &k, &v, MDB_GET_CURRENT);
    if (rc == EINVAL) rc = MDB_NOTFOUND;  // deleted the last item
  }
  if (rc != 0 && rc != MDB_NOTFOUND) return lmdb_error(rc, fmt::format("scan {}", db_name(db)));
  return n;
}

Result<uint64_t> WriteTxn::next_id(std::string_view name) {
  const std::string key = fmt::format("next.{}", name);
  LAYER_ASSIGN(auto cur, get(Db::kMeta, key));
  uint64_t next = 1;
  if (cur) {
    auto v = decode_key_u64(*cur);
    if (!v) return make_error(EIO, "index: meta {} is corrupt", key);
    next = *v;
  }
  LAYER_TRY(put(Db::kMeta, key, key_u64(next + 1)));
  return next;
}

Status WriteTxn::commit() {
  MDB_txn* txn = txn_;
  txn_ = nullptr;
  int rc = mdb_txn_commit(txn);
  release_resize_lock();
  if (rc != 0) return lmdb_error(rc, "commit");
  return {};
}

// ---- Index ----

Result<std::unique_ptr<Index>> Index::open(const std::string& dir, const Options& options) {
  struct stat st {};
  if (!options.create && ::stat((dir + "/data.mdb").c_str(), &st) != 0)
    return make_error(ENOENT, "no index at {}", dir);
  // An empty data.mdb (truncated, or a crash before its first page) is damage: LMDB would
  // fail read-only with EBADF, and a writer would quietly make a new, empty index over it.
  if (!options.create && st.st_size == 0)
    return make_error(EUCLEAN, "index {}: data.mdb is empty (0 bytes)", dir);
  std::unique_ptr<Index> index(new Index());
  index->dir_ = dir;
  index->read_only_ = options.read_only;
  int rc = mdb_env_create(&index->env_);
  if (rc != 0) return lmdb_error(rc, "env create");
  mdb_env_set_maxdbs(index->env_, static_cast<MDB_dbi>(Db::kCount) + 4);
  index->max_map_size_ =
      options.max_map_size_bytes != 0 ? options.max_map_size_bytes : kMaxMapSizeBytes;
  // The size recorded in the meta page is not trusted (a damaged one could ask for an
  // impossible mapping): 64 GiB, or room to double what data.mdb holds once it has grown past
  // a third of that, so a grown index does not start full (LMDB never maps less than its data).
  uint64_t map_size = options.map_size_bytes;
  if (map_size == 0) {
    map_size = kMapSizeBytes;
    if (!options.create && st.st_size > 0)
      while (map_size < 3 * static_cast<uint64_t>(st.st_size) && map_size < index->max_map_size_)
        map_size *= 2;
  }
  mdb_env_set_mapsize(index->env_, map_size);
  mdb_env_set_maxreaders(index->env_, kMaxReaders);
  unsigned flags = MDB_NOTLS;
  if (options.read_only) flags |= MDB_RDONLY;
  if (options.no_lock) flags |= MDB_NOLOCK;
  rc = mdb_env_open(index->env_, dir.c_str(), flags, 0644);
  if (rc == ENOMEM && !options.create && meta_asks_too_much(dir, st))
    return make_error(EUCLEAN, "index {}: its meta page asks for more pages than data.mdb holds",
                      dir);
  // An existing file whose header LMDB cannot use (page size, flags) is damaged.
  if (rc == EINVAL && !options.create)
    return make_error(EUCLEAN, "index {}: LMDB cannot use its header: {}", dir, mdb_strerror(rc));
  if (rc != 0) return lmdb_error(rc, fmt::format("open {}", dir));

  // Set by whoever created lock.mdb; too few slots would make busy servers fail at random.
  unsigned readers = 0;
  mdb_env_get_maxreaders(index->env_, &readers);
  if (!options.no_lock && readers < kMaxReaders)
    return make_error(EIO, "index {}: lock.mdb has {} reader slots, need {}", dir, readers,
                      kMaxReaders);
  int dead = 0;
  if (!options.no_lock) mdb_reader_check(index->env_, &dead);

  MDB_txn* txn = nullptr;
  rc = mdb_txn_begin(index->env_, nullptr, options.create ? 0 : MDB_RDONLY, &txn);
  if (rc == MDB_MAP_RESIZED) {
    // Another process grew the map since the open (adopt it), or the meta page names pages
    // beyond any map (damage).
    rc = mdb_env_set_mapsize(index->env_, 0);
    if (rc == 0) rc = mdb_txn_begin(index->env_, nullptr, options.create ? 0 : MDB_RDONLY, &txn);
    if (rc == ENOMEM || rc == MDB_MAP_RESIZED)
      return make_error(EUCLEAN, "index {}: its meta page names pages beyond its map", dir);
  }
  if (rc != 0) return lmdb_error(rc, "begin");
  for (int i = 0; i < static_cast<int>(Db::kCount); ++i) {
    rc = mdb_dbi_open(txn, db_name(static_cast<Db>(i)), options.create ? MDB_CREATE : 0,
                      &index->dbi_[i]);
    if (rc == MDB_NOTFOUND && is_added_db(static_cast<Db>(i))) continue;  // made below
    if (rc == 0) index->has_db_[i] = true;
    if (rc != 0) {
      mdb_txn_abort(txn);
      if (rc == MDB_NOTFOUND)
        return make_error(EUCLEAN, "index {}: db \"{}\" is missing", dir,
                          db_name(static_cast<Db>(i)));
      // The main db's record of a named db is damaged (its flags, or the pages it names).
      if (!options.create &&
          (rc == MDB_INCOMPATIBLE || rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND))
        return make_error(EUCLEAN, "index {}: db \"{}\" cannot be opened: {}", dir,
                          db_name(static_cast<Db>(i)), mdb_strerror(rc));
      return lmdb_error(rc, fmt::format("open db {}", db_name(static_cast<Db>(i))));
    }
  }
  rc = mdb_txn_commit(txn);
  if (rc != 0) return lmdb_error(rc, "commit");
  // The dbs added since format 1 that this index lacks: a writable open makes them (an older
  // build ignores a db it does not know); a read-only one reads them as empty.
  for (int i = 0; i < static_cast<int>(Db::kCount); ++i) {
    if (index->has_db_[i] || options.read_only || options.no_lock) continue;
    rc = mdb_txn_begin(index->env_, nullptr, 0, &txn);
    if (rc != 0) return lmdb_error(rc, "begin");
    rc = mdb_dbi_open(txn, db_name(static_cast<Db>(i)), MDB_CREATE, &index->dbi_[i]);
    if (rc == 0)
      rc = mdb_txn_commit(txn);
    else
      mdb_txn_abort(txn);
    if (rc != 0) return lmdb_error(rc, fmt::format("create db {}", db_name(static_cast<Db>(i))));
    index->has_db_[i] = true;
  }
  return index;
}

Index::~Index() {
  if (env_) mdb_env_close(env_);
}

Result<MDB_txn*> Index::begin(unsigned flags, std::shared_lock<std::shared_timed_mutex>& lock) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    lock = std::shared_lock<std::shared_timed_mutex>(resize_mu_);
    MDB_txn* txn = nullptr;
    int rc = mdb_txn_begin(env_, nullptr, flags, &txn);
    if (rc == 0) {
      ++t_txn_holds;  // given back by the ReadTxn that takes `lock`
      return txn;
    }
    lock.unlock();
    if (rc != MDB_MAP_RESIZED) return lmdb_error(rc, "begin transaction");
    // Another process grew the map past ours: adopt the size its meta page records.
    LAYER_TRY(with_resize_lock("adopt the map another process grew", [&]() -> Status {
      const int set = mdb_env_set_mapsize(env_, 0);
      if (set != 0) return lmdb_error(set, "adopt the grown map");
      return {};
    }));
  }
  return make_error(EIO, "index: map keeps being resized");
}

Status Index::with_resize_lock(const char* why, const std::function<Status()>& fn) {
  if (t_txn_holds > 0)
    return make_error(EAGAIN,
                      "index {}: cannot {} while this thread has a transaction open; try again",
                      dir_, why);
  std::unique_lock<std::shared_timed_mutex> exclusive(resize_mu_, std::defer_lock);
  if (!exclusive.try_lock_for(kResizeWait))
    return make_error(EAGAIN, "index {}: cannot {}: other transactions stayed open for {} s", dir_,
                      why, kResizeWait.count());
  return fn();
}

Result<ReadTxn> Index::begin_read() {
  std::shared_lock<std::shared_timed_mutex> lock;
  LAYER_ASSIGN(MDB_txn * txn, begin(MDB_RDONLY, lock));
  return ReadTxn(this, txn, std::move(lock));
}

Result<WriteTxn> Index::begin_write() {
  if (read_only_) return make_error(EACCES, "index {} is open read-only", dir_);
  std::shared_lock<std::shared_timed_mutex> lock;
  LAYER_ASSIGN(MDB_txn * txn, begin(0, lock));
  return WriteTxn(this, txn, std::move(lock));
}

uint64_t Index::map_size() const {
  std::shared_lock<std::shared_timed_mutex> lock(resize_mu_);
  MDB_envinfo info;
  mdb_env_info(env_, &info);
  return info.me_mapsize;
}

uint64_t Index::last_txnid() const {
  // mdb_env_info reads the meta pages through the map, which a resize replaces.
  std::shared_lock<std::shared_timed_mutex> lock(resize_mu_);
  MDB_envinfo info;
  mdb_env_info(env_, &info);
  return info.me_last_txnid;
}

Result<uint64_t> Index::grow_map() {
  uint64_t grown = 0;
  LAYER_TRY(with_resize_lock("grow the map", [&]() -> Status {
    MDB_envinfo info;
    mdb_env_info(env_, &info);
    const uint64_t current = info.me_mapsize;
    if (current >= max_map_size_)
      return make_error(ENOSPC, "index {}: the map is at its limit of {} bytes", dir_,
                        max_map_size_);
    grown = std::min(max_map_size_, current * 2);
    const int rc = mdb_env_set_mapsize(env_, grown);
    if (rc != 0) return lmdb_error(rc, "grow the map");
    return {};
  }));
  map_grows_.fetch_add(1);
  return grown;
}

Result<uint64_t> Index::copy_compact(int fd) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    {
      std::shared_lock<std::shared_timed_mutex> lock(resize_mu_);
      ++t_txn_holds;  // the copy's read transaction
      MDB_envinfo info;
      mdb_env_info(env_, &info);
      const int rc = mdb_env_copyfd2(env_, fd, MDB_CP_COMPACT);
      --t_txn_holds;
      if (rc == 0) return static_cast<uint64_t>(info.me_last_txnid);
      if (rc != MDB_MAP_RESIZED) return lmdb_error(rc, fmt::format("copy {}", dir_));
      // Nothing was written: LMDB begins the read transaction before it writes.
    }
    LAYER_TRY(with_resize_lock("adopt the map another process grew", [&]() -> Status {
      const int set = mdb_env_set_mapsize(env_, 0);
      if (set != 0) return lmdb_error(set, "adopt the grown map");
      return {};
    }));
  }
  return make_error(EIO, "index: map keeps being resized");
}

void Index::check_readers() {
  int dead = 0;
  mdb_reader_check(env_, &dead);
}

// ---- walk ----

namespace {

// Reads a key's or value's bytes (the first, one every 4 KiB, the last), so that a length or
// pointer a damaged page made up faults here, in the checker's process, rather than later.
unsigned char touch(const MDB_val& v) {
  const auto* p = static_cast<const volatile unsigned char*>(v.mv_data);
  unsigned char sink = 0;
  if (v.mv_size == 0) return sink;
  for (size_t i = 0; i < v.mv_size; i += 4096) sink ^= p[i];
  return sink ^ p[v.mv_size - 1];
}

// LMDB's default key order (mdb_cmp_memn): bytes, then the shorter first.
int compare_keys(const MDB_val& a, const MDB_val& b) {
  const int diff = std::memcmp(a.mv_data, b.mv_data, std::min(a.mv_size, b.mv_size));
  if (diff != 0) return diff;
  return a.mv_size < b.mv_size ? -1 : a.mv_size > b.mv_size ? 1 : 0;
}

}  // namespace

Result<IndexWalk> Index::walk() {
  IndexWalk w;
  LAYER_ASSIGN(auto txn, begin_read());
  MDB_envinfo info;
  mdb_env_info(env_, &info);
  MDB_stat env_stat;
  mdb_env_stat(env_, &env_stat);
  const uint64_t page = env_stat.ms_psize;
  w.txnid = mdb_txn_id(txn.txn_);
  w.used_bytes = (static_cast<uint64_t>(info.me_last_pgno) + 1) * page;
  // Stat after the info: a writer extends the file before it commits the meta page naming the
  // new pages, so the file is never shorter than a meta page we saw says.
  const std::string data = dir_ + "/data.mdb";
  struct stat st;
  if (::stat(data.c_str(), &st) != 0) return sys_error(errno, "index: stat {}", data);
  w.file_bytes = static_cast<uint64_t>(st.st_size);
  // Pages past the end of the file would fault (SIGBUS) when read.
  if (w.file_bytes < w.used_bytes)
    return make_error(EUCLEAN, "index {}: data.mdb is {} bytes, but its pages reach {} (truncated)",
                      dir_, w.file_bytes, w.used_bytes);
  const unsigned max_key = static_cast<unsigned>(mdb_env_get_maxkeysize(env_));
  unsigned char sink = 0;
  // In a read-only walk every LMDB error but an I/O or memory failure is damage (one that LMDB
  // noticed midway leaves the transaction MDB_BAD_TXN for the next call).
  auto damage = [&](int rc, const std::string& what) {
    Error e = lmdb_error(rc, what);
    if (rc != EIO && rc != ENOMEM) e.code = EUCLEAN;
    return e;
  };

  // Walks one db in key order; fn checks each row. Errors: EUCLEAN for an order or size
  // LMDB would never write, LMDB's own (damage: EUCLEAN).
  auto walk_db = [&](MDB_dbi dbi, const char* name, bool integer_keys,
                     const std::function<Status(const MDB_val&, const MDB_val&)>& fn) -> Status {
    Cursor cur;
    int rc = mdb_cursor_open(txn.txn_, dbi, cur.out());
    if (rc != 0) return damage(rc, fmt::format("cursor on {}", name));
    MDB_val k, v, prev{0, nullptr};
    bool first = true;
    rc = mdb_cursor_get(cur.get(), &k, &v, MDB_FIRST);
    while (rc == 0) {
      if (k.mv_size == 0 || k.mv_size > max_key)
        return make_error(EUCLEAN, "index {}: db {}: a key of {} bytes", dir_, name, k.mv_size);
      sink ^= touch(k);
      sink ^= touch(v);
      if (!first) {
        bool ascending;
        if (integer_keys) {
          size_t a = 0, b = 0;
          std::memcpy(&a, prev.mv_data, std::min(sizeof a, prev.mv_size));
          std::memcpy(&b, k.mv_data, std::min(sizeof b, k.mv_size));
          ascending = a < b;
        } else {
          ascending = compare_keys(prev, k) < 0;
        }
        if (!ascending)
          return make_error(EUCLEAN, "index {}: db {}: keys out of order", dir_, name);
      }
      first = false;
      prev = k;
      LAYER_TRY(fn(k, v));
      rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT);
    }
    if (rc != MDB_NOTFOUND) return damage(rc, fmt::format("walk db {}", name));
    return {};
  };

  // LMDB's free list (FREE_DBI, 0): txn id -> [count, page numbers...].
  LAYER_TRY(walk_db(0, "(free list)", true, [&](const MDB_val& k, const MDB_val& v) -> Status {
    if (k.mv_size != sizeof(size_t) || v.mv_size < sizeof(size_t) ||
        v.mv_size % sizeof(size_t) != 0)
      return make_error(EUCLEAN, "index {}: the free list holds a record of {} bytes", dir_,
                        v.mv_size);
    std::vector<size_t> ids(v.mv_size / sizeof(size_t));
    std::memcpy(ids.data(), v.mv_data, v.mv_size);
    if (ids[0] != ids.size() - 1)
      return make_error(EUCLEAN, "index {}: a free-list record counts {} pages in {} bytes", dir_,
                        ids[0], v.mv_size);
    for (size_t i = 1; i < ids.size(); ++i)
      if (ids[i] < 2 || ids[i] > info.me_last_pgno)
        return make_error(EUCLEAN, "index {}: the free list names page {}, beyond the last ({})",
                          dir_, ids[i], info.me_last_pgno);
    w.free_pages += ids.size() - 1;
    return {};
  }));
  // LMDB's main db (MAIN_DBI, 1): the named dbs' records.
  LAYER_TRY(walk_db(1, "(main)", false, [](const MDB_val&, const MDB_val&) { return Status{}; }));
  for (int i = 0; i < static_cast<int>(Db::kCount); ++i) {
    if (!has_db_[i]) continue;
    const char* name = db_name(static_cast<Db>(i));
    uint64_t rows = 0;
    LAYER_TRY(walk_db(dbi_[i], name, false, [&](const MDB_val&, const MDB_val&) -> Status {
      ++rows;
      return {};
    }));
    MDB_stat db_stat;
    const int rc = mdb_stat(txn.txn_, dbi_[i], &db_stat);
    if (rc != 0) return damage(rc, fmt::format("stat db {}", name));
    if (db_stat.ms_entries != rows)
      return make_error(EUCLEAN, "index {}: db {} records {} rows, but {} were found", dir_, name,
                        db_stat.ms_entries, rows);
    w.entries += rows;
  }
  (void)sink;  // the reads are volatile: done whatever becomes of their value
  return w;
}

// ---- Committer ----

struct Committer::Pending {
  Job job;
  bool done = false;
  Status result;
  Done on_done;  // posted jobs: called after the batch, outside mu_
  std::chrono::steady_clock::time_point due;
};

Committer::Committer(Index& index) : index_(index) {}

Result<std::unique_ptr<Committer>> Committer::start(Index& index) {
  std::unique_ptr<Committer> c(new Committer(index));
  try {
    c->thread_ = std::thread([p = c.get()] { p->loop(); });
  } catch (const std::system_error& e) {
    const int code = e.code().value() == EAGAIN ? EAGAIN : ENOMEM;
    return make_error(code, "index: cannot start the committer thread: {}", e.what());
  }
  return c;
}

Committer::~Committer() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Status Committer::run(Job job) {
  std::shared_ptr<Pending> p;
  std::unique_lock<std::mutex> lk(mu_, std::defer_lock);
  try {
    p = std::make_shared<Pending>();
    p->job = std::move(job);
    lk.lock();
    if (stop_) return make_error(ESHUTDOWN, "index committer is stopped");
    queue_.push_back(p);
  } catch (const std::bad_alloc&) {
    return Error{ENOMEM, "out of memory"};
  }
  cv_.notify_all();
  cv_.wait(lk, [&] { return p->done; });
  return p->result;
}

Status Committer::post(Job job, Done done, std::chrono::milliseconds delay) {
  try {
    auto p = std::make_shared<Pending>();
    p->job = std::move(job);
    p->on_done = std::move(done);
    p->due = std::chrono::steady_clock::now() + delay;
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) return make_error(ESHUTDOWN, "index committer is stopped");
    if (delay.count() <= 0)
      queue_.push_back(std::move(p));
    else
      delayed_.push_back(std::move(p));
  } catch (const std::bad_alloc&) {
    return Error{ENOMEM, "out of memory"};
  }
  cv_.notify_all();
  return {};
}

void Committer::fail_next_commits(int n, Error error) {
  std::lock_guard<std::mutex> lk(mu_);
  failing_commits_ = n;
  commit_fault_ = std::move(error);
}

std::optional<Error> Committer::take_commit_fault() {
  std::lock_guard<std::mutex> lk(mu_);
  if (failing_commits_ <= 0) return std::nullopt;
  --failing_commits_;
  return commit_fault_;
}

void Committer::loop() {
  auto last_reader_check = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    auto wake = std::chrono::steady_clock::now() + kReaderCheckInterval;
    for (const auto& p : delayed_) wake = std::min(wake, p->due);
    cv_.wait_until(lk, wake, [&] {
      if (stop_ || !queue_.empty()) return true;
      const auto now = std::chrono::steady_clock::now();
      for (const auto& p : delayed_)
        if (p->due <= now) return true;
      return false;
    });
    // Reader slots of dead processes are cleared on a timer, busy or idle: a busy pool is the
    // one that runs out of slots.
    if (std::chrono::steady_clock::now() - last_reader_check >= kReaderCheckInterval) {
      index_.check_readers();
      last_reader_check = std::chrono::steady_clock::now();
    }
    // Posted jobs that are due (all of them once stopping) join the batch.
    const auto now = std::chrono::steady_clock::now();
    for (auto it = delayed_.begin(); it != delayed_.end();) {
      if (stop_ || (*it)->due <= now) {
        queue_.push_back(std::move(*it));
        it = delayed_.erase(it);
      } else {
        ++it;
      }
    }
    if (queue_.empty()) {
      if (stop_) return;
      continue;
    }
    std::deque<std::shared_ptr<Pending>> batch;
    batch.swap(queue_);
    lk.unlock();
    run_batch(batch);
    for (auto& p : batch) {
      if (!p->on_done) continue;
      try {
        p->on_done(p->result);
      } catch (...) {
        // A callback may not end the thread; its owner sees its job as never done.
      }
    }
    lk.lock();
    cv_.notify_all();
  }
}

// Runs a batch in one transaction, each job in a nested transaction of its own, and publishes
// the results (waiters read them under mu_). Nothing thrown here may end the thread: a job's
// exception fails that job; a failure to allocate the bookkeeping fails the whole batch.
void Committer::run_batch(std::deque<std::shared_ptr<Pending>>& batch) noexcept {
  auto run_job = [&](Pending& p, WriteTxn& nested) -> Status {
    try {
      Status s = p.job(nested);
      if (s.ok()) s = nested.commit();  // merges into the batch
      return s;
    } catch (const std::bad_alloc&) {
      return Error{ENOMEM, "out of memory"};
    } catch (...) {
      return Error{EIO, "index job failed"};
    }
  };
  Status batch_status;
  std::vector<std::optional<Status>> results;
  t_map_full = false;
  try {
    results.resize(batch.size());
    auto txn = index_.begin_write();
    if (!txn) {
      batch_status = txn.error();
    } else {
      bool any = false;
      for (size_t i = 0; i < batch.size(); ++i) {
        MDB_txn* child = nullptr;
        int rc = mdb_txn_begin(index_.env_, txn->txn_, 0, &child);
        if (rc != 0) {
          results[i] = lmdb_error(rc, "begin nested transaction");
          continue;
        }
        WriteTxn nested(&index_, child, std::shared_lock<std::shared_timed_mutex>());
        Status s = run_job(*batch[i], nested);
        if (!s.ok())
          results[i] = s;
        else
          any = true;
      }
      if (any) {
        failpoint("index.commit");  // the batch built, not committed
        if (auto fault = take_commit_fault())
          batch_status = std::move(*fault);  // txn aborts
        else
          batch_status = txn->commit();
        if (batch_status.ok()) failpoint("index.committed");  // committed, nobody answered
      }
    }
  } catch (...) {
    // The batch transaction (if begun) was aborted by its destructor.
    results.clear();
    batch_status = Error{ENOMEM, "out of memory"};
  }
  // A full map: grow it now, with the batch's transaction gone, before anyone is answered, so
  // that the flush round that failed can succeed when it is retried; say so in the errors.
  if (t_map_full) {
    t_map_full = false;
    std::string note;
    try {
      auto grown = index_.grow_map();
      note = grown ? fmt::format(" (the map was grown to {} bytes; try again)", *grown)
                   : fmt::format(" ({})", grown.error().message);
    } catch (...) {
    }
    auto add_note = [&](Status& s) {
      if (!s.ok() && s.error().code == ENOSPC) {
        try {
          s = Error{ENOSPC, s.error().message + note};
        } catch (...) {
        }
      }
    };
    add_note(batch_status);
    for (auto& r : results)
      if (r) add_note(*r);
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t i = 0; i < batch.size(); ++i) {
    if (i < results.size() && results[i])
      batch[i]->result = std::move(*results[i]);
    else
      batch[i]->result = batch_status;
    batch[i]->done = true;
  }
}

}  // namespace layer
