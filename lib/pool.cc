// pool.cc — pool creation and opening, containers (clone, ls, inspect, rm).
// Layers are in layers.cc, images in images.cc and import.cc, fsck in fsck.cc.
//
// Design notes:
// - Every metadata change is one write transaction through the Committer. Long work (import,
//   merge) commits bounded batches of rows under an `intents` row and publishes with one
//   final transaction.
// - File order: a layer file is created, synced and its directory synced before any
//   transaction refers to it; it is unlinked only after the transaction that drops the last
//   reference commits. An orphan file is benign; a missing one is reported by fsck.
// - Container locks: `rm` takes the container's exclusive lock, so it fails cleanly while a
//   server holds it; `ls` asks with F_OFD_GETLK, which takes nothing.
#include "pool.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <set>

#include "capacity.h"
#include "failpoint.h"
#include "index_restore.h"
#include "intents.h"
#include "journal.h"
#include "layers.h"
#include "names.h"
#include "qos.h"
#include "snapshots.h"
#include "stats.h"

namespace layer {
namespace {

constexpr std::string_view kMetaFormat = "format";
constexpr std::string_view kMetaIncompat = "features.incompat";
constexpr std::string_view kMetaCompat = "features.compat";
constexpr std::string_view kMetaTierSsd = "tier.ssd";
constexpr std::string_view kMetaTierHdd = "tier.hdd";
constexpr std::string_view kMetaCreated = "created";
// The pool's random id, also in each tier's marker file; absent in pools made before markers.
constexpr std::string_view kMetaPoolId = "pool.id";
constexpr std::string_view kTierMarker = ".layer-pool";

// Creates path and its missing parents; each new directory is fsynced into its parent, so a
// pool's directories survive a power loss once init returns.
Status mkdir_p(const std::string& path) {
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    cur = path.substr(0, pos);
    if (cur.empty()) continue;
    if (::mkdir(cur.c_str(), 0755) != 0) {
      if (errno == EEXIST) continue;
      return sys_error(errno, "create directory {}", cur);
    }
    LAYER_TRY(fsync_dir(dir_of(cur)));
  }
  return {};
}

Result<std::string> new_pool_id() {
  uint8_t bytes[16];
  if (::getrandom(bytes, sizeof bytes, 0) != static_cast<ssize_t>(sizeof bytes))
    return sys_error(errno, "getrandom for the pool id");
  std::string id;
  for (uint8_t b : bytes) id += fmt::format("{:02x}", b);
  return id;
}

// Writes TIER/.layer-pool ("ID\n"), fsynced with its directory. Errors: EEXIST, EIO, EACCES.
Status write_tier_marker(const std::string& tier, const std::string& pool_id) {
  const std::string path = fmt::format("{}/{}", tier, kTierMarker);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return sys_error(errno, "create pool marker {}", path);
  const std::string text = pool_id + "\n";
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                  ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) return sys_error(err, fmt::format("write pool marker {}", path));
  return fsync_dir(tier);
}

// Checks that every tier directory carries this pool's marker: a tier directory shared by two
// pools would mix their layer files (named by per-pool ids), and an unmounted tier would take
// new files on the wrong filesystem. A pool whose meta has no id predates markers and is
// accepted as it is. Errors: EIO naming the directory and both ids.
Status check_tier_markers(ReadTxn& txn, const std::string& root, const std::string (&tiers)[2]) {
  LAYER_ASSIGN(auto id, txn.get(Db::kMeta, kMetaPoolId));
  if (!id) return {};
  for (const auto& tier : tiers) {
    const std::string path = fmt::format("{}/{}", tier, kTierMarker);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == ENOENT)
        return make_error(EIO,
                          "pool {}: tier directory {} has no pool marker {} (pool id {}); is the "
                          "tier's filesystem mounted?",
                          root, tier, kTierMarker, *id);
      return sys_error(err, fmt::format("pool {}: open {}", root, path));
    }
    char buf[128];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    ::close(fd);
    if (n < 0) return sys_error(errno, "pool {}: read {}", root, path);
    std::string_view found(buf, static_cast<size_t>(n));
    if (auto nl = found.find('\n'); nl != std::string_view::npos) found = found.substr(0, nl);
    if (found != *id)
      return make_error(EIO,
                        "pool {}: tier directory {} belongs to pool id {}, not to this pool "
                        "(id {})",
                        root, tier, found, *id);
  }
  return {};
}

Result<std::string> real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) return sys_error(errno, path);
  return std::string(buf);
}

bool dir_is_empty(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (!d) return true;
  bool empty = true;
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      empty = false;
      break;
    }
  }
  ::closedir(d);
  return empty;
}

std::string encode_u32(uint32_t v) { return key_u64(v).substr(4); }

std::optional<uint64_t> decode_uint(std::string_view v) {
  if (v.size() != 4 && v.size() != 8) return std::nullopt;
  uint64_t r = 0;
  for (char c : v) r = r << 8 | static_cast<uint8_t>(c);
  return r;
}

// Reads meta and checks that this build understands the pool (docs/format.md).
Status check_format(ReadTxn& txn, const std::string& root) {
  LAYER_ASSIGN(auto fmtv, txn.get(Db::kMeta, kMetaFormat));
  if (!fmtv) return make_error(EIO, "pool {}: index has no format version (corrupt meta)", root);
  auto version = decode_uint(*fmtv);
  if (!version) return make_error(EIO, "pool {}: corrupt format version", root);
  if (*version > kFormatVersion)
    return make_error(ENOTSUP,
                      "pool {} has format version {}; this build of layer reads versions up to {}",
                      root, *version, kFormatVersion);
  LAYER_ASSIGN(auto inc, txn.get(Db::kMeta, kMetaIncompat));
  if (inc) {
    auto bits = decode_uint(*inc);
    if (!bits) return make_error(EIO, "pool {}: corrupt incompatible feature bits", root);
    const uint64_t unknown = *bits & ~kKnownIncompatFeatures;
    if (unknown != 0)
      return make_error(ENOTSUP, "pool {} uses incompatible feature bit {} unknown to this build",
                        root, __builtin_ctzll(unknown));
  }
  return {};
}

Result<std::string> meta_string(ReadTxn& txn, std::string_view key, const std::string& root) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, key));
  if (!v) return make_error(EIO, "pool {}: meta {} is missing", root, key);
  return std::string(*v);
}

}  // namespace

Result<std::string> tier_dir_of(ReadTxn& txn, int t, const std::string& root) {
  LAYER_ASSIGN(std::string stored, meta_string(txn, t == 0 ? kMetaTierSsd : kMetaTierHdd, root));
  if (stored.starts_with('/')) return stored;
  return fmt::format("{}/{}", root, stored);
}

Result<uint64_t> incompat_features(ReadTxn& txn) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaIncompat));
  if (!v) return uint64_t{0};
  auto bits = decode_uint(*v);
  if (!bits) return make_error(EIO, "index: corrupt incompatible feature bits");
  return *bits;
}

Status set_incompat_features(WriteTxn& txn, uint64_t bits) {
  return txn.put(Db::kMeta, kMetaIncompat, key_u64(bits));
}

uint64_t now_unix() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// ---- create / open ----

Status Pool::create(const std::string& root, const std::string& ssd_dir,
                    const std::string& hdd_dir) {
  if (root.empty()) return make_error(EINVAL, "pool path must not be empty");
  struct stat st;
  if (::stat((root + "/index/data.mdb").c_str(), &st) == 0)
    return make_error(EEXIST, "{} is already a pool", root);
  if (::stat(root.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return make_error(EEXIST, "{} exists and is not a directory", root);
    if (!dir_is_empty(root)) return make_error(EEXIST, "{} exists and is not empty", root);
  }
  LAYER_TRY(mkdir_p(root));
  LAYER_ASSIGN(std::string abs, real_path(root));
  const std::string ssd = ssd_dir.empty() ? abs + "/tiers/ssd" : ssd_dir;
  const std::string hdd = hdd_dir.empty() ? abs + "/tiers/hdd" : hdd_dir;
  // A tier directory belongs to one pool: layer files are named by this pool's ids.
  for (const auto& d : {ssd, hdd}) {
    if (::stat(d.c_str(), &st) != 0) continue;
    if (!S_ISDIR(st.st_mode)) return make_error(EEXIST, "tier {} exists and is not a directory", d);
    if (!dir_is_empty(d))
      return make_error(EEXIST, "tier directory {} is not empty (it may belong to another pool)",
                        d);
  }
  for (const auto& d : {abs + "/index", abs + "/run", ssd, hdd}) LAYER_TRY(mkdir_p(d));
  LAYER_ASSIGN(std::string ssd_abs, real_path(ssd));
  LAYER_ASSIGN(std::string hdd_abs, real_path(hdd));
  if (ssd_abs == hdd_abs)
    return make_error(EINVAL, "the ssd and hdd tiers must be different directories, both are {}",
                      ssd_abs);
  LAYER_ASSIGN(std::string pool_id, new_pool_id());
  // Markers before the index: a crash in between leaves a pool that is not one yet.
  LAYER_TRY(write_tier_marker(ssd_abs, pool_id));
  LAYER_TRY(write_tier_marker(hdd_abs, pool_id));

  LAYER_ASSIGN(auto index, Index::open(abs + "/index", Index::Options{.create = true}));
  LAYER_ASSIGN(auto txn, index->begin_write());
  LAYER_TRY(txn.put(Db::kMeta, kMetaFormat, encode_u32(kFormatVersion)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaIncompat, key_u64(0)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaCompat, key_u64(0)));
  // Inside the pool: relative to it (tier_dir_of), so that a copy of the pool is a pool of its
  // own.
  LAYER_ASSIGN(std::string root_real, real_path(abs));
  auto stored = [&](const std::string& dir) {
    const std::string prefix = root_real + "/";
    return dir.starts_with(prefix) ? dir.substr(prefix.size()) : dir;
  };
  LAYER_TRY(txn.put(Db::kMeta, kMetaTierSsd, stored(ssd_abs)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaTierHdd, stored(hdd_abs)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaCreated, key_u64(now_unix())));
  LAYER_TRY(txn.put(Db::kMeta, kMetaPoolId, pool_id));
  return txn.commit();
}

// The absolute path of root, if it is a pool (has an index). Errors: ENOENT naming `root` as
// given, so the user recognises it.
static Result<std::string> pool_root(const std::string& root) {
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) return make_error(ENOENT, "pool {} does not exist", root);
  LAYER_ASSIGN(std::string abs, real_path(root));
  if (::stat((abs + "/index/data.mdb").c_str(), &st) != 0)
    return make_error(ENOENT, "{} is not a layer pool (no index; create one with `layer init`)",
                      root);
  return abs;
}

Status Pool::validate(const std::string& root) {
  LAYER_TRY(pool_root(root));
  LAYER_ASSIGN(auto index,
               Index::open(root + "/index", Index::Options{.read_only = true, .no_lock = true}));
  LAYER_ASSIGN(auto txn, index->begin_read());
  LAYER_TRY(check_format(txn, root));
  std::string tiers[2];
  LAYER_ASSIGN(tiers[0], tier_dir_of(txn, 0, root));
  LAYER_ASSIGN(tiers[1], tier_dir_of(txn, 1, root));
  return check_tier_markers(txn, root, tiers);
}

Result<std::unique_ptr<Pool>> Pool::open(const std::string& root, const OpenOptions& options) {
  LAYER_ASSIGN(std::string abs, pool_root(root));
  rearm_failpoint();
  std::unique_ptr<Pool> pool(new Pool());
  pool->read_only_ = options.read_only;
  pool->paths_.root = abs;
  pool->paths_.index_dir = abs + "/index";
  pool->paths_.run_dir = abs + "/run";
  LAYER_ASSIGN(pool->index_,
               Index::open(pool->paths_.index_dir,
                           Index::Options{.read_only = options.read_only,
                                          .map_size_bytes = options.index_map_bytes,
                                          .max_map_size_bytes = options.index_max_map_bytes}));
  {
    LAYER_ASSIGN(auto txn, pool->index_->begin_read());
    LAYER_TRY(check_format(txn, abs));
    LAYER_ASSIGN(pool->paths_.tier_dir[0], tier_dir_of(txn, 0, abs));
    LAYER_ASSIGN(pool->paths_.tier_dir[1], tier_dir_of(txn, 1, abs));
    LAYER_TRY(check_tier_markers(txn, abs, pool->paths_.tier_dir));
  }
  LAYER_ASSIGN(pool->locks_, LockTable::open(pool->paths_.run_dir));
  for (int t = 0; t < 2; ++t)
    pool->stores_[t] = std::make_unique<LocalStore>(pool->paths_.tier_dir[t]);
  if (!options.read_only) {
    LAYER_ASSIGN(pool->committer_, Committer::start(*pool->index_));
    // Removals a crash interrupted are finished here (their containers are already gone).
    // Best effort: a pool whose disk is full must still open (to remove things); a drop that
    // fails now stays for the next open or fsck --repair.
    (void)finish_interrupted(*pool);
    // Journals that a server stopped without folding (a crash): into the index now, so that
    // every tool reads a delta's map from the index alone (the containers' own servers, if
    // alive, hold their locks and are left alone).
    (void)journal::recover_all(*pool);
  }
  return pool;
}

Pool::~Pool() = default;

void Pool::test_point(std::string_view point) {
  if (test_hook_) test_hook_(point);
  failpoint(point);
}

Status Pool::check_writable() const {
  if (read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  return {};
}

Status Pool::check_tiers_hold(uint64_t size_bytes) const {
  for (const auto& store : stores_) LAYER_TRY(store->check_can_hold(size_bytes));
  return {};
}

void Pool::set_store(Tier tier, std::unique_ptr<LayerStore> store) {
  std::lock_guard<std::mutex> lk(frozen_mu_);
  frozen_files_.clear();
  stores_[static_cast<int>(tier)] = std::move(store);
}

Result<std::shared_ptr<LayerFile>> Pool::open_frozen(const LayerRecord& layer) {
  Tier tier = layer.tier;
  for (;;) {
    {
      const auto key = std::make_pair(static_cast<int>(tier), layer.id);
      std::lock_guard<std::mutex> lk(frozen_mu_);
      std::erase_if(frozen_files_, [](const auto& kv) { return kv.second.expired(); });
      if (auto it = frozen_files_.find(key); it != frozen_files_.end())
        if (auto file = it->second.lock()) return file;
      auto file = store(tier).open(layer.id, false);
      if (file) {
        frozen_files_[key] = *file;
        return file;
      }
      if (file.error().code != ENOENT) return file;
    }
    // The mover may have switched the layer's tier and removed this file since `layer` was
    // read: the row names where it is now.
    LAYER_ASSIGN(auto txn, index_->begin_read());
    LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(layer.id)));
    if (!v) return make_error(ENOENT, "layer {}: no file, and no row any more", layer.id);
    LAYER_ASSIGN(auto now, decode_layer(*v, layer.id));
    if (now.tier == tier)
      return make_error(ENOENT, "layer {}: no file {}", layer.id, layer_path(layer.id, tier));
    tier = now.tier;
  }
}

void Pool::forget_frozen(LayerId id) {
  std::lock_guard<std::mutex> lk(frozen_mu_);
  std::erase_if(frozen_files_, [&](const auto& kv) { return kv.first.second == id; });
}

std::string Pool::layer_path(const LayerRecord& layer) const {
  return layer_path(layer.id, layer.tier);
}

std::string Pool::layer_path(LayerId id, Tier tier) const {
  return stores_[static_cast<int>(tier)]->describe(id);
}

Result<ContainerRecord> Pool::get_container(ReadTxn& txn, std::string_view name) {
  LAYER_ASSIGN(auto v, txn.get(Db::kContainers, name));
  if (!v) return make_error(ENOENT, "container \"{}\" not found in pool {}", name, paths_.root);
  return decode_container(*v, name);
}

pid_t Pool::serving_pid(uint64_t container_id) const {
  return holder_pid(locks_->holder_of(container_id));
}

// ---- containers ----

Result<ContainerInfo> Pool::container_info(ReadTxn& txn, const ContainerRecord& rec,
                                           BlockCounts* counts) {
  ContainerInfo info;
  info.container = rec;
  LAYER_ASSIGN(info.chain, chain_of(txn, rec.delta_layer));
  LAYER_TRY(count_blocks(txn, rec.delta_layer, &info.delta_data_blocks, &info.delta_zero_blocks));
  info.chain_data_blocks.push_back(info.delta_data_blocks);
  for (size_t i = 1; i < info.chain.size(); ++i) {
    const LayerId id = info.chain[i].id;
    if (counts != nullptr) {
      if (auto it = counts->find(id); it != counts->end()) {
        info.chain_data_blocks.push_back(it->second.first);
        continue;
      }
    }
    uint64_t data = 0, zero = 0;
    LAYER_TRY(count_blocks(txn, id, &data, &zero));
    info.chain_data_blocks.push_back(data);
    if (counts != nullptr) counts->emplace(id, std::make_pair(data, zero));
  }
  LAYER_ASSIGN(const bool served, locks_->is_locked(LockKind::kContainer, rec.id));
  if (served) info.served_by = locks_->holder_of(rec.id);
  return info;
}

Result<ContainerInfo> Pool::clone(const std::string& source, const std::string& name,
                                  std::optional<uint64_t> size_bytes, const Resources& resources,
                                  const std::map<std::string, std::string>& labels) {
  LAYER_TRY(check_writable());
  LAYER_ASSIGN(auto snap, parse_snapshot_ref(source));
  if (!snap) LAYER_TRY(validate_image_ref(source));
  LAYER_TRY(validate_name(name, "container name"));
  if (size_bytes && (*size_bytes == 0 || *size_bytes % 512 != 0))
    return make_error(EINVAL, "size {} is not a positive multiple of 512", *size_bytes);
  if (size_bytes && *size_bytes > kMaxDiskBytes)
    return make_error(EINVAL, "size {} is larger than the limit of {} (16 TiB)", *size_bytes,
                      kMaxDiskBytes);
  // The image's own size was checked by its import.
  if (size_bytes) LAYER_TRY(check_tiers_hold(*size_bytes));
  ContainerRecord rec;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto existing, txn.get(Db::kContainers, name));
    if (existing) return make_error(EEXIST, "container \"{}\" already exists", name);
    // The source: an image's top layer, or a snapshot's layer.
    LayerId base_id = 0;
    uint64_t base_size = 0;
    uint32_t block_size = 0;
    std::string image_ref = source;
    if (snap) {
      LAYER_ASSIGN(auto from, get_container(txn, snap->first));
      LAYER_ASSIGN(auto s, get_snapshot(txn, from, snap->second));
      base_id = s.layer;
      base_size = from.size_bytes;
      block_size = from.block_size;
      image_ref = from.image_ref;
    } else {
      LAYER_ASSIGN(auto iv, txn.get(Db::kImages, source));
      if (!iv) return make_error(ENOENT, "image {} not found in pool {}", source, paths_.root);
      LAYER_ASSIGN(auto image, decode_image(*iv, source));
      base_id = image.top_layer;
      base_size = image.size_bytes;
      block_size = image.block_size;
    }
    const uint64_t size = size_bytes.value_or(base_size);
    if (size < base_size)
      return make_error(EINVAL, "size {} is smaller than {} ({} bytes)", size, source, base_size);
    LAYER_ASSIGN(auto base, get_layer(txn, base_id));
    ++base.refcount;
    LAYER_TRY(txn.put(Db::kLayers, key_u64(base.id), encode(base)));
    LAYER_ASSIGN(LayerId delta_id, txn.next_id("layer"));
    LAYER_ASSIGN(uint64_t container_id, txn.next_id("container"));
    // The delta's file is created on its first write: a clone is this transaction only.
    LayerRecord delta{delta_id, base.id,   Tier::kSsd, size, block_size, LayerState::kWritable,
                      1,        now_unix()};
    LAYER_TRY(txn.put(Db::kLayers, key_u64(delta_id), encode(delta)));
    rec = ContainerRecord{name, container_id, image_ref, delta_id, size, block_size, now_unix(),
                          1,    labels,       {},        resources};
    // Admission against the pool's capacities, in this transaction (capacity.h).
    LAYER_TRY(check_admission(txn, rec, nullptr, now_unix_ms()));
    return txn.put(Db::kContainers, name, encode(rec));
  }));
  LAYER_ASSIGN(auto txn, index_->begin_read());
  return container_info(txn, rec);
}

Result<std::map<std::string, std::string>> Pool::set_labels(
    const std::string& name, const std::map<std::string, std::string>& labels) {
  LAYER_TRY(check_writable());
  for (const auto& [key, value] : labels) LAYER_TRY(validate_label(key, value));
  std::map<std::string, std::string> before;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto rec, get_container(txn, name));
    before = rec.labels;
    rec.labels = labels;
    return txn.put(Db::kContainers, name, encode(rec));
  }));
  return before;
}

Result<std::vector<ContainerInfo>> Pool::list_containers() {
  LAYER_ASSIGN(auto txn, index_->begin_read());
  std::vector<ContainerInfo> out;
  // Every clone of an image shares the image's layers: counted once, not once per container
  // (10,000 clones of a 1 GiB image: `layer ls` spent 0.5 s recounting its 64 map rows).
  BlockCounts counts;
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto rec, decode_container(v, k));
        LAYER_ASSIGN(auto info, container_info(txn, rec, &counts));
        out.push_back(std::move(info));
        return true;
      }));
  return out;
}

Result<std::vector<std::string>> Pool::container_names(size_t limit) {
  std::vector<std::string> out;
  if (limit == 0) return out;
  LAYER_ASSIGN(auto txn, index_->begin_read());
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view) -> Result<bool> {
        out.emplace_back(k);
        return out.size() < limit;
      }));
  return out;
}

Result<std::vector<std::string>> Pool::export_names(size_t limit) {
  std::vector<std::string> out;
  if (limit == 0) return out;
  LAYER_ASSIGN(auto txn, index_->begin_read());
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        out.emplace_back(k);
        if (out.size() >= limit) return false;
        LAYER_ASSIGN(auto c, decode_container(v, k));
        LAYER_TRY(txn.scan(Db::kSnapshots, key_u64(c.id),
                           [&](std::string_view sk, std::string_view) -> Result<bool> {
                             out.push_back(fmt::format("{}@{}", k, sk.substr(8)));
                             return out.size() < limit;
                           }));
        return out.size() < limit;
      }));
  return out;
}

Result<ContainerInfo> Pool::inspect(const std::string& name) {
  LAYER_TRY(validate_name(name, "container name"));
  LAYER_ASSIGN(auto txn, index_->begin_read());
  LAYER_ASSIGN(auto rec, get_container(txn, name));
  return container_info(txn, rec);
}

Status Pool::remove_container(const std::string& name) {
  LAYER_TRY(check_writable());
  LAYER_TRY(validate_name(name, "container name"));
  ContainerRecord rec;
  {
    LAYER_ASSIGN(auto txn, index_->begin_read());
    LAYER_ASSIGN(rec, get_container(txn, name));
  }
  // Held until the rows and the file are gone, so no server can open it meanwhile.
  LAYER_ASSIGN(Lock lock, locks_->try_lock(LockKind::kContainer, rec.id, true,
                                           fmt::format("container \"{}\"", name)));
  std::vector<uint64_t> drops;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    drops.clear();
    LAYER_ASSIGN(auto current, get_container(txn, name));
    if (current.id != rec.id) return make_error(EBUSY, "container \"{}\" changed meanwhile", name);
    LAYER_TRY(txn.del(Db::kContainers, name));
    LAYER_TRY(clear_stale(txn, current.id));  // the writes a restore found go with it
    // Its snapshots go with it (their layers stay while clones or images use them).
    std::vector<std::pair<std::string, LayerId>> snaps;
    LAYER_TRY(txn.scan(Db::kSnapshots, key_u64(current.id),
                       [&](std::string_view k, std::string_view v) -> Result<bool> {
                         LAYER_ASSIGN(auto s, decode_snapshot(v, k));
                         snaps.emplace_back(std::string(k), s.layer);
                         return true;
                       }));
    for (const auto& [key, layer] : snaps) {
      LAYER_TRY(txn.del(Db::kSnapshots, key));
      LAYER_TRY(drop_layer(txn, layer, &drops));
    }
    return drop_layer(txn, current.delta_layer, &drops);
  }));
  // Its I/O history (stats.h) goes after its row, so that no server adds a row for it later;
  // rows an interruption leaves behind are pruned by the next server's stats writer.
  auto history = drop_stats(*this, rec.id);
  // The container is gone; a crash from here on is finished by the next open or fsck --repair.
  LAYER_TRY(finish_drops_after_removal(*this, drops, fmt::format("container \"{}\"", name)));
  return history;
}

}  // namespace layer
