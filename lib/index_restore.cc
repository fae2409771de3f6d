// index_restore.cc — `layer index restore`, the marks it leaves, and their adoption.
//
// Design notes:
// - No process may have the index open while its file is replaced: a server maps data.mdb and
//   would go on writing into the replaced file, and LMDB's lock file (lock.mdb) records the
//   replaced index's last transaction and readers. LMDB itself tells who has the env open: each
//   holds a shared POSIX lock on byte 0 of lock.mdb, and the first opener, which takes it
//   exclusively, rebuilds the lock file. So the restore takes that byte exclusively (or refuses
//   with EBUSY), and keeps it while it installs the copy and opens it once itself: LMDB's open
//   in this process gets the byte too (a process's own locks never conflict), rebuilds lock.mdb
//   from the copy, then downgrades the byte to shared, and only then can another process open
//   the index (LMDB's openers wait for the byte). The container locks in run/locks (locks.h)
//   would not do: a server with no client holds none, yet has the index open.
// - The copy is checked (in a child) and prepared (marks, tiers, counter, the restore record)
//   in a staging directory before it is installed, so no process ever opens it unmarked.
#include "index_restore.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <set>

#include "index_check.h"
#include "layers.h"
#include "pool.h"

namespace layer {
namespace {

constexpr std::string_view kMetaRestore = "restore";
constexpr std::string_view kStalePrefix = "stale.";

// The byte of lock.mdb that LMDB's openers lock (shared while they have the env open).
class IndexOpenGuard {
 public:
  ~IndexOpenGuard() {
    if (fd_ >= 0) ::close(fd_);  // releases the lock
  }
  // Errors: EBUSY naming who has the index open, EIO.
  Status take(const std::string& root) {
    const std::string path = root + "/index/lock.mdb";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return sys_error(errno, "open {}", path);
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 1;
    if (::fcntl(fd_, F_SETLK, &fl) == 0) return {};
    const int err = errno;
    if (err != EAGAIN && err != EACCES) return sys_error(err, "lock {}", path);
    return make_error(EBUSY,
                      "the index of pool {} is open by another process ({}): stop it first, then "
                      "restore",
                      root, who_has(root));
  }

 private:
  // The live servers of the pool, by their control sockets (run/srv-PID.sock).
  static std::string who_has(const std::string& root) {
    std::vector<std::string> servers;
    if (DIR* d = ::opendir((root + "/run").c_str())) {
      while (struct dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (!name.starts_with("srv-") || !name.ends_with(".sock")) continue;
        const pid_t pid = static_cast<pid_t>(std::atol(name.c_str() + 4));
        if (pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM))
          servers.push_back(fmt::format("a server, pid {}", pid));
      }
      ::closedir(d);
    }
    if (servers.empty()) return "a server, or a layer command";
    std::string out = servers[0];
    for (size_t i = 1; i < servers.size(); ++i) out += "; " + servers[i];
    return out;
  }
  int fd_ = -1;
};

Result<uint64_t> read_counter(ReadTxn& txn, std::string_view name) {
  const std::string key = fmt::format("next.{}", name);
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, key));
  if (!v) return uint64_t{1};
  auto n = decode_key_u64(*v);
  if (!n) return make_error(EIO, "index: meta {} is corrupt", key);
  return *n;
}

// Prepares the copy in `stage` (an index directory no other process knows) for the pool at
// root: tiers followed, counter moved, marks and the restore record written, in one
// transaction.
Status prepare_copy(const std::string& root, const std::string& stage, const IndexBackup& from,
                    RestoreReport* report) {
  LAYER_ASSIGN(auto index, Index::open(stage, Index::Options{}));
  std::string tier_dir[2];
  std::map<LayerId, LayerRecord> layers;
  std::vector<ContainerRecord> containers;
  uint64_t next_layer = 1;
  {
    LAYER_ASSIGN(auto txn, index->begin_read());
    for (int t = 0; t < 2; ++t) {
      auto dir = tier_dir_of(txn, t, root);
      if (!dir) return make_error(EIO, "copy {}: {}", from.name, dir.error().message);
      tier_dir[t] = *dir;
    }
    LAYER_TRY(
        txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto id = decode_key_u64(k);
          if (!id) return true;  // fsck reports it
          if (auto rec = decode_layer(v, *id)) layers[*id] = *rec;
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          if (auto c = decode_container(v, k)) containers.push_back(*c);
          return true;
        }));
    LAYER_ASSIGN(next_layer, read_counter(txn, "layer"));
  }
  report->first_unknown_layer = next_layer;
  LocalStore stores[2] = {LocalStore(tier_dir[0]), LocalStore(tier_dir[1])};
  std::set<LayerId> files[2];
  LayerId max_file = 0;
  for (int t = 0; t < 2; ++t) {
    LAYER_ASSIGN(auto entries, stores[t].list());
    for (const auto& e : entries) {
      max_file = std::max(max_file, e.id);
      if (!e.unfinished) files[t].insert(e.id);
    }
  }
  // Rows naming a tier whose file the mover removed after the copy.
  std::vector<LayerRecord> moved;
  for (auto& [id, rec] : layers) {
    const int t = static_cast<int>(rec.tier), other = 1 - t;
    if (files[t].count(id) || !files[other].count(id)) continue;
    rec.tier = static_cast<Tier>(other);
    moved.push_back(rec);
    report->notes.push_back(
        fmt::format("layer {}: its file is on {} now (moved after the copy): "
                    "the row follows it",
                    id, to_string(rec.tier)));
  }
  for (const auto& [t, ids] : {std::pair{0, &files[0]}, std::pair{1, &files[1]}})
    for (LayerId id : *ids)
      if (!layers.count(id))
        report->notes.push_back(fmt::format(
            "{}: no layer of the copy names it ({}; `layer fsck --repair` moves it to "
            "{}/lost+found)",
            stores[t].describe(id),
            id >= next_layer ? "made after the copy: it may hold writes the copy does not know"
                             : "an orphan already",
            root));
  // Containers whose delta holds data its map does not know.
  std::vector<StaleRecord> marks;
  {
    LAYER_ASSIGN(auto txn, index->begin_read());
    for (const auto& c : containers) {
      auto it = layers.find(c.delta_layer);
      if (it == layers.end()) continue;  // fsck reports it
      uint64_t blocks = 0;
      LAYER_TRY(unmapped_data(stores[static_cast<int>(it->second.tier)], txn, it->second, &blocks));
      if (blocks == 0) continue;
      report->stale.push_back(StaleContainer{c.name, c.id, c.delta_layer, blocks});
      marks.push_back(StaleRecord{c.id, c.name, c.delta_layer, blocks, now_unix(), from.name});
    }
    for (const auto& [id, rec] : layers) {
      if (files[static_cast<int>(rec.tier)].count(id)) continue;
      uint64_t data = 0, zero = 0;
      LAYER_TRY(count_blocks(txn, id, &data, &zero));
      if (data > 0)
        report->notes.push_back(fmt::format(
            "layer {}: its file is gone (removed or merged after the copy) but the copy's map "
            "has {} data blocks in it: what reads it fails (fsck names it)",
            id, data));
    }
  }
  if (max_file >= next_layer)
    report->notes.push_back(
        fmt::format("layer ids continue from {} (files up to {} exist)", max_file + 1, max_file));
  LAYER_ASSIGN(auto txn, index->begin_write());
  for (const auto& rec : moved) LAYER_TRY(txn.put(Db::kLayers, key_u64(rec.id), encode(rec)));
  if (max_file >= next_layer) LAYER_TRY(txn.put(Db::kMeta, "next.layer", key_u64(max_file + 1)));
  for (const auto& m : marks) LAYER_TRY(txn.put(Db::kMeta, stale_key(m.container_id), encode(m)));
  if (!marks.empty()) {
    LAYER_ASSIGN(uint64_t bits, incompat_features(txn));
    LAYER_TRY(set_incompat_features(txn, bits | kIncompatStaleContainers));
  }
  RestoreRecord restored{from.name, from.txnid, now_unix(), next_layer};
  LAYER_TRY(txn.put(Db::kMeta, kMetaRestore, encode(restored)));
  return txn.commit();
}

}  // namespace

std::string stale_key(uint64_t container_id) {
  return std::string(kStalePrefix) + key_u64(container_id);
}

Result<std::optional<StaleRecord>> get_stale(ReadTxn& txn, uint64_t container_id) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, stale_key(container_id)));
  if (!v) return std::optional<StaleRecord>();
  LAYER_ASSIGN(auto rec, decode_stale(*v));
  return std::optional<StaleRecord>(std::move(rec));
}

Result<std::vector<StaleRecord>> stale_marks(ReadTxn& txn) {
  std::vector<StaleRecord> out;
  LAYER_TRY(
      txn.scan(Db::kMeta, kStalePrefix, [&](std::string_view, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto rec, decode_stale(v));
        out.push_back(std::move(rec));
        return true;
      }));
  return out;
}

Status check_not_stale(ReadTxn& txn, const ContainerRecord& c) {
  LAYER_ASSIGN(auto mark, get_stale(txn, c.id));
  if (!mark) return {};
  return make_error(EUCLEAN,
                    "container \"{}\": its delta holds {} blocks written after the index copy {} "
                    "the index was restored from; run `layer fsck --repair` to adopt them (or "
                    "`layer rm` it) before it is served or changed",
                    c.name, mark->blocks, mark->backup);
}

Status clear_stale(WriteTxn& txn, uint64_t container_id) {
  LAYER_ASSIGN(auto mark, txn.get(Db::kMeta, stale_key(container_id)));
  if (!mark) return {};
  LAYER_TRY(txn.del(Db::kMeta, stale_key(container_id)));
  bool others = false;
  LAYER_TRY(txn.scan(Db::kMeta, kStalePrefix, [&](std::string_view, std::string_view) {
    others = true;
    return Result<bool>(false);
  }));
  if (others) return {};
  LAYER_ASSIGN(uint64_t bits, incompat_features(txn));
  return set_incompat_features(txn, bits & ~kIncompatStaleContainers);
}

Result<std::optional<RestoreRecord>> get_restore(ReadTxn& txn) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaRestore));
  if (!v) return std::optional<RestoreRecord>();
  LAYER_ASSIGN(auto rec, decode_restore(*v));
  return std::optional<RestoreRecord>(std::move(rec));
}

Result<bool> index_was_restored(Pool& pool) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaRestore));
  return v.has_value();
}

Result<std::map<uint32_t, ChunkBits>> unmapped_data(LayerStore& store, ReadTxn& txn,
                                                    const LayerRecord& layer, uint64_t* blocks) {
  *blocks = 0;
  std::map<uint32_t, ChunkBits> out;
  auto file = store.open(layer.id, false);
  if (!file) {
    if (file.error().code == ENOENT) return out;
    return std::move(file).error();
  }
  std::map<uint32_t, ChunkBits> map;
  LAYER_TRY(for_each_map_row(txn, layer.id, [&](uint32_t c, const ChunkBits& bits) -> Result<bool> {
    map.emplace(c, bits);
    return true;
  }));
  const uint64_t bs = layer.block_size;
  const uint64_t size_blocks = (layer.size_bytes + bs - 1) / bs;
  uint64_t next_block = 0;  // extents come in order; a block two extents share counts once
  LAYER_TRY((*file)->data_extents(0, layer.size_bytes, [&](uint64_t off, uint64_t len) {
    const uint64_t end = std::min(size_blocks, (off + len + bs - 1) / bs);
    for (uint64_t b = std::max(next_block, off / bs); b < end; ++b) {
      const auto chunk = static_cast<uint32_t>(b / kBlocksPerChunk);
      const auto i = static_cast<uint32_t>(b % kBlocksPerChunk);
      auto it = map.find(chunk);
      if (it != map.end() && it->second.get(i) == BlockState::kData) continue;
      auto [o, fresh] = out.try_emplace(chunk);
      if (fresh) o->second = it != map.end() ? it->second : ChunkBits();
      o->second.set(i, BlockState::kData);
      ++*blocks;
    }
    next_block = std::max(next_block, end);
  }));
  return out;
}

Result<uint64_t> adopt_unmapped_writes(Pool& pool, const StaleRecord& mark) {
  LAYER_TRY(pool.check_writable());
  const std::string what = fmt::format("container \"{}\"", mark.container);
  std::optional<ContainerRecord> c;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto v, txn.get(Db::kContainers, mark.container));
    if (v) {
      LAYER_ASSIGN(auto rec, decode_container(*v, mark.container));
      if (rec.id == mark.container_id) c = rec;
    }
  }
  if (!c) {  // removed or replaced: nothing to adopt
    LAYER_TRY(
        pool.committer().run([&](WriteTxn& txn) { return clear_stale(txn, mark.container_id); }));
    return uint64_t{0};
  }
  // No server may open it meanwhile (Disk::open refuses it anyway while it is marked).
  LAYER_ASSIGN(Lock lock, pool.locks().try_lock(LockKind::kContainer, c->id, true, what));
  std::map<uint32_t, ChunkBits> adopt;
  uint64_t blocks = 0;
  LayerId delta = 0;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto cur, pool.get_container(txn, mark.container));
    LAYER_ASSIGN(auto layer, get_layer(txn, cur.delta_layer));
    delta = layer.id;
    LAYER_ASSIGN(adopt, unmapped_data(pool.store(layer.tier), txn, layer, &blocks));
    if (!adopt.empty()) {
      // The blocks become visible in the index: their data first, as a flush round does.
      LAYER_ASSIGN(auto file, pool.store(layer.tier).open(layer.id, true));
      LAYER_TRY(file->sync());
    }
  }
  std::vector<std::pair<uint32_t, std::string>> rows;
  for (const auto& [chunk, bits] : adopt) rows.emplace_back(chunk, encode_chunk(bits));
  size_t i = 0;
  do {
    const size_t end = std::min(rows.size(), i + kMaxRowsPerTxn);
    const bool last = end == rows.size();
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      for (size_t j = i; j < end; ++j)
        LAYER_TRY(txn.put(Db::kMaps, key_u64_u32(delta, rows[j].first), rows[j].second));
      if (last) LAYER_TRY(clear_stale(txn, mark.container_id));
      return {};
    }));
    i = end;
  } while (i < rows.size());
  return blocks;
}

Result<bool> settle_restore(Pool& pool) {
  bool settled = false;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    settled = false;
    LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaRestore));
    if (!v) return {};
    LAYER_ASSIGN(auto marks, stale_marks(txn));
    if (!marks.empty()) return {};
    LAYER_TRY(txn.del(Db::kMeta, kMetaRestore));
    settled = true;
    return {};
  }));
  return settled;
}

Result<RestoreReport> restore_index(const std::string& root_arg, const std::string& name) {
  std::error_code ec;
  const std::string root = std::filesystem::canonical(root_arg, ec).string();
  if (ec) return make_error(ENOENT, "pool {} does not exist", root_arg);
  const std::string index_dir = root + "/index";
  if (!std::filesystem::is_directory(index_dir))
    return make_error(ENOENT, "{} is not a layer pool (no index directory)", root_arg);
  LAYER_ASSIGN(auto copies, list_index_backups(index_dir));
  if (copies.empty())
    return make_error(ENOENT,
                      "pool {} has no copies of its index in {} (servers take them every "
                      "index-backup-interval, layer commands before bulk changes, and `layer "
                      "index backup`)",
                      root, index_backup_dir(index_dir));
  RestoreReport report;
  if (name.empty()) {
    report.from = copies.front();
  } else {
    const std::string base = std::filesystem::path(name).filename().string();
    auto it = std::find_if(copies.begin(), copies.end(),
                           [&](const IndexBackup& b) { return b.name == base; });
    if (it == copies.end())
      return make_error(ENOENT, "no index copy \"{}\" in {} (`layer index ls` lists them)", name,
                        index_backup_dir(index_dir));
    report.from = *it;
  }

  IndexOpenGuard guard;
  LAYER_TRY(guard.take(root));
  // Stage, check and prepare the copy where no other process looks.
  const std::string stage = index_dir + "/.restore";
  std::filesystem::remove_all(stage, ec);
  if (::mkdir(stage.c_str(), 0755) != 0) return sys_error(errno, "create {}", stage);
  auto staged = [&]() -> Status {
    LAYER_TRY(copy_backup_file(report.from.path, stage + "/data.mdb"));
    auto checked = check_index(stage);
    if (!checked) {
      if (checked.error().code != EUCLEAN) return checked.error();
      return make_error(EUCLEAN,
                        "index copy {} is damaged too ({}); name an older one (`layer "
                        "index ls`)",
                        report.from.name, checked.error().message);
    }
    return prepare_copy(root, stage, report.from, &report);
  }();
  if (!staged) {
    std::filesystem::remove_all(stage, ec);
    return staged.error();
  }
  std::filesystem::remove(stage + "/lock.mdb", ec);
  // The index it replaces is set aside, never deleted: it may still be read by hand.
  const std::string data = index_dir + "/data.mdb";
  const std::string backups = index_backup_dir(index_dir);
  if (::access(data.c_str(), F_OK) == 0) {
    std::string aside = fmt::format("{}/replaced-{}.mdb", backups, utc_stamp(now_unix()));
    for (int n = 2; ::access(aside.c_str(), F_OK) == 0; ++n)
      aside = fmt::format("{}/replaced-{}-{}.mdb", backups, utc_stamp(now_unix()), n);
    if (::rename(data.c_str(), aside.c_str()) != 0) return sys_error(errno, "rename {}", data);
    report.replaced = aside;
  }
  if (::rename((stage + "/data.mdb").c_str(), data.c_str()) != 0)
    return sys_error(errno, "install {}", data);
  LAYER_TRY(fsync_dir(index_dir));
  LAYER_TRY(fsync_dir(backups));
  std::filesystem::remove_all(stage, ec);
  // LMDB's lock file still describes the replaced index: an open here, while the guard holds
  // the byte, rebuilds it before any other process gets in.
  {
    LAYER_ASSIGN(auto index, Index::open(index_dir, Index::Options{}));
    (void)index->last_txnid();
  }
  return report;
}

}  // namespace layer
