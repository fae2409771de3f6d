// pool.cc — pool creation and opening, names, images (import), containers (clone, rm), fsck.
//
// Design notes:
// - Every metadata change is one write transaction through the Committer. Long work (import)
//   commits bounded batches of rows under an `intents` row and publishes with one final
//   transaction; until then no image or layer row names the new rows, so a crash leaves only
//   invisible rows and a file that fsck --repair rolls back.
// - File order: a layer file is created, synced and its directory synced before any
//   transaction refers to it; it is unlinked only after the transaction that drops the last
//   reference commits. An orphan file is benign; a missing one is reported by fsck.
// - Container locks: `rm` takes the container's exclusive lock, so it fails cleanly while a
//   server holds it; `ls` asks with F_OFD_GETLK, which takes nothing.
#include "pool.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <set>

#include "block_map.h"
#include "checksum.h"

namespace layer {
namespace {

constexpr std::string_view kMetaFormat = "format";
constexpr std::string_view kMetaIncompat = "features.incompat";
constexpr std::string_view kMetaCompat = "features.compat";
constexpr std::string_view kMetaTierSsd = "tier.ssd";
constexpr std::string_view kMetaTierHdd = "tier.hdd";
constexpr std::string_view kMetaCreated = "created";
constexpr size_t kMaxRowsPerTxn = 10000;
constexpr uint64_t kImportWindowBytes = 1 << 20;

Status mkdir_p(const std::string& path) {
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    cur = path.substr(0, pos);
    if (cur.empty()) continue;
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
      return sys_error(errno, fmt::format("create directory {}", cur));
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

bool is_zero(const uint8_t* p, size_t len) {
  // Compare 8 bytes at a time: import reads every byte of the data regions anyway.
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < len; ++i)
    if (p[i] != 0) return false;
  return true;
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

Status validate_part(std::string_view name, std::string_view what) {
  // [a-z0-9][a-z0-9._-]{0,63} without "..": safe as a file name and an NBD export name.
  auto lower_or_digit = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  bool ok = !name.empty() && name.size() <= 64 && lower_or_digit(name[0]) &&
            name.find("..") == std::string_view::npos;
  for (char c : name) ok = ok && (lower_or_digit(c) || c == '.' || c == '_' || c == '-');
  if (name.empty()) return make_error(EINVAL, "{} must not be empty", what);
  if (!ok)
    return make_error(EINVAL,
                      "invalid {} \"{}\": use 1-64 characters a-z 0-9 . _ -, starting with a "
                      "letter or digit, without \"..\"",
                      what, name);
  return {};
}

}  // namespace

uint64_t now_unix() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

Status validate_name(std::string_view name, std::string_view what) {
  return validate_part(name, what);
}

Status validate_image_ref(std::string_view ref) {
  const auto colon = ref.find(':');
  if (colon == std::string_view::npos || ref.find(':', colon + 1) != std::string_view::npos)
    return make_error(EINVAL, "invalid image reference \"{}\": expected NAME:VERSION", ref);
  LAYER_TRY(validate_part(ref.substr(0, colon), "image name"));
  return validate_part(ref.substr(colon + 1), "image version");
}

Result<uint64_t> parse_size(std::string_view text) {
  if (text.empty()) return make_error(EINVAL, "empty size");
  uint64_t n = 0;
  size_t i = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (n > (UINT64_MAX - d) / 10) return make_error(EINVAL, "size \"{}\" is too large", text);
    n = n * 10 + d;
  }
  if (i == 0) return make_error(EINVAL, "invalid size \"{}\"", text);
  std::string_view suffix = text.substr(i);
  if (suffix.size() == 2 && (suffix[1] == 'B' || suffix[1] == 'b')) suffix = suffix.substr(0, 1);
  if (suffix == "iB" || suffix.size() == 3) {
    if (suffix.size() == 3 && suffix.substr(1) == "iB") suffix = suffix.substr(0, 1);
  }
  unsigned shift = 0;
  if (suffix.empty()) shift = 0;
  else if (suffix.size() == 1) {
    switch (suffix[0]) {
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      case 't': case 'T': shift = 40; break;
      default: return make_error(EINVAL, "invalid size \"{}\": unknown suffix", text);
    }
  } else {
    return make_error(EINVAL, "invalid size \"{}\": unknown suffix", text);
  }
  if (shift && n > (UINT64_MAX >> shift)) return make_error(EINVAL, "size \"{}\" is too large", text);
  return n << shift;
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
  for (const auto& d : {abs + "/index", abs + "/run", ssd, hdd}) LAYER_TRY(mkdir_p(d));
  LAYER_ASSIGN(std::string ssd_abs, real_path(ssd));
  LAYER_ASSIGN(std::string hdd_abs, real_path(hdd));

  LAYER_ASSIGN(auto index, Index::open(abs + "/index", Index::Options{.create = true}));
  LAYER_ASSIGN(auto txn, index->begin_write());
  LAYER_TRY(txn.put(Db::kMeta, kMetaFormat, encode_u32(kFormatVersion)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaIncompat, key_u64(0)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaCompat, key_u64(0)));
  LAYER_TRY(txn.put(Db::kMeta, kMetaTierSsd, ssd_abs));
  LAYER_TRY(txn.put(Db::kMeta, kMetaTierHdd, hdd_abs));
  LAYER_TRY(txn.put(Db::kMeta, kMetaCreated, key_u64(now_unix())));
  return txn.commit();
}

Status Pool::validate(const std::string& root) {
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) return make_error(ENOENT, "pool {} does not exist", root);
  if (::stat((root + "/index/data.mdb").c_str(), &st) != 0)
    return make_error(ENOENT, "{} is not a layer pool (no index; create one with `layer init`)",
                      root);
  LAYER_ASSIGN(auto index,
               Index::open(root + "/index", Index::Options{.read_only = true, .no_lock = true}));
  LAYER_ASSIGN(auto txn, index->begin_read());
  return check_format(txn, root);
}

Result<std::unique_ptr<Pool>> Pool::open(const std::string& root, const OpenOptions& options) {
  struct stat st;
  if (::stat(root.c_str(), &st) != 0) return make_error(ENOENT, "pool {} does not exist", root);
  LAYER_ASSIGN(std::string abs, real_path(root));
  if (::stat((abs + "/index/data.mdb").c_str(), &st) != 0)
    return make_error(ENOENT, "{} is not a layer pool (no index; create one with `layer init`)",
                      root);
  std::unique_ptr<Pool> pool(new Pool());
  pool->read_only_ = options.read_only;
  pool->paths_.root = abs;
  pool->paths_.index_dir = abs + "/index";
  pool->paths_.run_dir = abs + "/run";
  LAYER_ASSIGN(pool->index_,
               Index::open(pool->paths_.index_dir, Index::Options{.read_only = options.read_only}));
  {
    LAYER_ASSIGN(auto txn, pool->index_->begin_read());
    LAYER_TRY(check_format(txn, abs));
    LAYER_ASSIGN(pool->paths_.tier_dir[0], meta_string(txn, kMetaTierSsd, abs));
    LAYER_ASSIGN(pool->paths_.tier_dir[1], meta_string(txn, kMetaTierHdd, abs));
  }
  LAYER_ASSIGN(pool->locks_, LockTable::open(pool->paths_.run_dir));
  pool->store_ = std::make_unique<LocalStore>();
  if (!options.read_only) pool->committer_ = std::make_unique<Committer>(*pool->index_);
  return pool;
}

Pool::~Pool() = default;

std::string Pool::layer_path(const LayerRecord& layer) const {
  return fmt::format("{}/{}.layer", paths_.tier_dir[static_cast<int>(layer.tier)], layer.id);
}

Result<LayerRecord> Pool::get_layer(ReadTxn& txn, LayerId id) {
  LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
  if (!v) return make_error(EIO, "layer {} is missing from the index", id);
  return decode_layer(*v, id);
}

Result<ContainerRecord> Pool::get_container(ReadTxn& txn, std::string_view name) {
  LAYER_ASSIGN(auto v, txn.get(Db::kContainers, name));
  if (!v) return make_error(ENOENT, "container \"{}\" not found in pool {}", name, paths_.root);
  return decode_container(*v, name);
}

Result<std::vector<LayerRecord>> Pool::chain_of(ReadTxn& txn, LayerId top) {
  std::vector<LayerRecord> chain;
  for (LayerId id = top; id != 0;) {
    if (chain.size() > kMaxChainDepth + 1)
      return make_error(EIO, "layer {}: parent chain loops or is deeper than {}", top,
                        kMaxChainDepth);
    LAYER_ASSIGN(auto layer, get_layer(txn, id));
    id = layer.parent;
    chain.push_back(std::move(layer));
  }
  return chain;
}

// ---- images ----

namespace {

// Counts the data and zero blocks of a layer from its map rows.
Status count_blocks(ReadTxn& txn, LayerId id, uint64_t* data, uint64_t* zero) {
  *data = *zero = 0;
  return txn.scan(Db::kMaps, key_u64(id), [&](std::string_view, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto bits, decode_chunk(v));
    BlockState u;
    if (bits.uniform(&u)) {
      if (u == BlockState::kData) *data += kBlocksPerChunk;
      if (u == BlockState::kZero) *zero += kBlocksPerChunk;
      return true;
    }
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
      *data += bits.get(i) == BlockState::kData;
      *zero += bits.get(i) == BlockState::kZero;
    }
    return true;
  });
}

// The data regions of fd in [0, size): SEEK_DATA/SEEK_HOLE, or the whole file where the
// filesystem or device does not support them.
Result<std::vector<std::pair<uint64_t, uint64_t>>> data_regions(int fd, uint64_t size,
                                                                const std::string& file) {
  std::vector<std::pair<uint64_t, uint64_t>> regions;
  uint64_t pos = 0;
  while (pos < size) {
    off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      if (errno == EINVAL || errno == EOPNOTSUPP) return decltype(regions){{0, size}};
      return sys_error(errno, fmt::format("SEEK_DATA {}", file));
    }
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return sys_error(errno, fmt::format("SEEK_HOLE {}", file));
    const uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), size);
    if (static_cast<uint64_t>(data) >= end) break;
    regions.emplace_back(static_cast<uint64_t>(data), end);
    pos = end;
  }
  return regions;
}

// Closes an fd on every path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

Result<ImageInfo> Pool::import_image(const std::string& ref, const std::string& file,
                                     uint32_t block_size, const Progress& progress,
                                     const std::string& description) {
  if (read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  LAYER_TRY(validate_image_ref(ref));
  if (block_size < kMinBlockSize || block_size > kMaxBlockSize ||
      (block_size & (block_size - 1)) != 0)
    return make_error(EINVAL, "block size {} is not a power of two from {} to {}", block_size,
                      kMinBlockSize, kMaxBlockSize);
  Fd in;
  in.fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (in.fd < 0) return sys_error(errno, fmt::format("cannot open image file {}", file));
  struct stat st;
  if (::fstat(in.fd, &st) != 0) return sys_error(errno, fmt::format("stat {}", file));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    off_t end = ::lseek(in.fd, 0, SEEK_END);
    if (end < 0) return sys_error(errno, fmt::format("size of {}", file));
    size = static_cast<uint64_t>(end);
  } else if (!S_ISREG(st.st_mode)) {
    return make_error(EINVAL, "{} is not a regular file or block device", file);
  }
  if (size == 0) return make_error(EINVAL, "image file {} is empty", file);
  if (size % 512 != 0)
    return make_error(EINVAL, "image file {} is {} bytes, not a multiple of 512", file, size);
  if (size > kMaxDiskBytes)
    return make_error(EINVAL, "image file {} is {} bytes, larger than the limit of {}", file, size,
                      kMaxDiskBytes);
  {
    LAYER_ASSIGN(auto txn, index_->begin_read());
    LAYER_ASSIGN(auto existing, txn.get(Db::kImages, ref));
    if (existing) return make_error(EEXIST, "image {} already exists", ref);
  }

  // 1. Reserve a layer id under an intent, so a crash leaves something fsck can roll back.
  LayerId layer_id = 0;
  uint64_t intent_id = 0;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(layer_id, txn.next_id("layer"));
    LAYER_ASSIGN(intent_id, txn.next_id("intent"));
    IntentRecord intent{IntentRecord::Kind::kImport, layer_id, ref, now_unix()};
    return txn.put(Db::kIntents, key_u64(intent_id), encode(intent));
  }));
  LayerRecord layer{layer_id, 0, Tier::kSsd, size, block_size, LayerState::kFrozen, 1, now_unix()};
  const std::string path = layer_path(layer);
  // Held until published or rolled back: fsck --repair skips intents whose layer is locked.
  auto import_lock = locks_->try_lock(LockKind::kLayer, layer_id, true,
                                      fmt::format("layer {}", layer_id));

  auto rollback = [&](Error e) -> Error {
    if (!import_lock) return e;  // not ours to roll back
    (void)committer_->run([&](WriteTxn& txn) -> Status {
      LAYER_TRY(txn.del_prefix(Db::kMaps, key_u64(layer_id)));
      LAYER_TRY(txn.del_prefix(Db::kSums, key_u64(layer_id)));
      return txn.del(Db::kIntents, key_u64(intent_id));
    });
    (void)store_->remove(path);
    return e;
  };

  if (!import_lock) return rollback(std::move(import_lock).error());
  // 2. Copy the data blocks into a new layer file at the same offsets; hash each 64 KiB group.
  auto created = store_->create(path, size);
  if (!created) return rollback(std::move(created).error());
  std::shared_ptr<LayerFile> out = *created;
  auto regions = data_regions(in.fd, size, file);
  if (!regions) return rollback(std::move(regions).error());

  BlockMap map;
  std::map<uint64_t, uint64_t> sums;  // group no -> checksum
  std::vector<uint8_t> buf(kImportWindowBytes);
  uint64_t done_bytes = 0;
  uint64_t last_window_end = 0;
  for (const auto& [begin, end] : *regions) {
    // Windows are aligned to 1 MiB, a multiple of the block size and of the 64 KiB group.
    for (uint64_t w = begin / kImportWindowBytes * kImportWindowBytes; w < end;
         w += kImportWindowBytes) {
      if (w < last_window_end) continue;  // already done with the previous region
      const uint64_t wlen = std::min<uint64_t>(kImportWindowBytes, size - w);
      last_window_end = w + wlen;
      uint64_t got = 0;
      while (got < wlen) {
        ssize_t n = ::pread(in.fd, buf.data() + got, wlen - got, static_cast<off_t>(w + got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return rollback(sys_error(errno, fmt::format("read {}", file)));
        if (n == 0) return rollback(make_error(EIO, "{} shrank while importing", file));
        got += static_cast<uint64_t>(n);
      }
      std::vector<bool> block_has_data;
      for (uint64_t off = 0; off < wlen; off += block_size) {
        const uint64_t blen = std::min<uint64_t>(block_size, wlen - off);
        const bool data = !is_zero(buf.data() + off, blen);
        block_has_data.push_back(data);
        if (data) map.set((w + off) / block_size, BlockState::kData);
      }
      // Write runs of data blocks.
      for (size_t i = 0; i < block_has_data.size();) {
        if (!block_has_data[i]) {
          ++i;
          continue;
        }
        size_t j = i;
        while (j < block_has_data.size() && block_has_data[j]) ++j;
        const uint64_t off = i * uint64_t{block_size};
        const uint64_t len = std::min<uint64_t>(j * uint64_t{block_size}, wlen) - off;
        auto s = out->write(buf.data() + off, len, w + off);
        if (!s) return rollback(std::move(s).error());
        i = j;
      }
      for (uint64_t g = 0; g < wlen; g += kSumGroupBytes) {
        const uint64_t glen = std::min<uint64_t>(kSumGroupBytes, wlen - g);
        bool any = false;
        for (uint64_t b = g / block_size; b * block_size < g + glen; ++b) any |= block_has_data[b];
        if (any) sums[(w + g) / kSumGroupBytes] = group_checksum(buf.data() + g, glen);
      }
      done_bytes += wlen;
      if (progress) progress(w + wlen, size);
    }
  }
  if (progress) progress(size, size);
  (void)done_bytes;
  // Data reaches the disk before the rows that name it.
  if (auto s = out->sync(); !s) return rollback(std::move(s).error());

  // 3. Rows in bounded transactions (invisible until published: no layer row names them).
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& [chunk, bits] : map.chunks())
    rows.emplace_back(key_u64_u32(layer_id, chunk), encode_chunk(bits));
  std::vector<std::pair<std::string, std::string>> sum_rows;
  {
    std::map<uint32_t, std::vector<uint64_t>> by_row;
    for (const auto& [group, sum] : sums) {
      auto& v = by_row[static_cast<uint32_t>(group / kSumsPerRow)];
      v.resize(kSumsPerRow, 0);
      v[group % kSumsPerRow] = sum;
    }
    for (const auto& [row, v] : by_row)
      sum_rows.emplace_back(key_u64_u32(layer_id, row), encode_sums(v));
  }
  for (size_t i = 0; i < rows.size() || i < sum_rows.size(); i += kMaxRowsPerTxn) {
    auto s = committer_->run([&](WriteTxn& txn) -> Status {
      for (size_t j = i; j < std::min(rows.size(), i + kMaxRowsPerTxn); ++j)
        LAYER_TRY(txn.append(Db::kMaps, rows[j].first, rows[j].second));
      for (size_t j = i; j < std::min(sum_rows.size(), i + kMaxRowsPerTxn); ++j)
        LAYER_TRY(txn.append(Db::kSums, sum_rows[j].first, sum_rows[j].second));
      return {};
    });
    if (!s) return rollback(std::move(s).error());
  }

  // 4. Publish.
  ImageRecord image{ref, layer_id, size, block_size, now_unix(), description};
  auto s = committer_->run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto intent, txn.get(Db::kIntents, key_u64(intent_id)));
    if (!intent) return make_error(EIO, "import of {}: its intent was rolled back meanwhile", ref);
    LAYER_ASSIGN(auto existing, txn.get(Db::kImages, ref));
    if (existing) return make_error(EEXIST, "image {} already exists", ref);
    LAYER_TRY(txn.put(Db::kLayers, key_u64(layer_id), encode(layer)));
    LAYER_TRY(txn.put(Db::kImages, ref, encode(image)));
    return txn.del(Db::kIntents, key_u64(intent_id));
  });
  if (!s) return rollback(std::move(s).error());
  return ImageInfo{image, layer, map.count(BlockState::kData), 0};
}

Result<std::vector<ImageInfo>> Pool::list_images() {
  LAYER_ASSIGN(auto txn, index_->begin_read());
  std::map<std::string, uint32_t> users;
  LAYER_TRY(txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto c, decode_container(v, k));
    ++users[c.image_ref];
    return true;
  }));
  std::vector<ImageInfo> out;
  LAYER_TRY(txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto image, decode_image(v, k));
    LAYER_ASSIGN(auto layer, get_layer(txn, image.top_layer));
    uint64_t data = 0, zero = 0;
    LAYER_TRY(count_blocks(txn, layer.id, &data, &zero));
    out.push_back(ImageInfo{image, layer, data, users[image.ref]});
    return true;
  }));
  return out;
}

Status Pool::drop_layer(WriteTxn& txn, LayerId id, std::vector<std::string>* unlink_after) {
  while (id != 0) {
    LAYER_ASSIGN(auto layer, get_layer(txn, id));
    if (layer.refcount > 1) {
      --layer.refcount;
      return txn.put(Db::kLayers, key_u64(id), encode(layer));
    }
    LAYER_TRY(txn.del(Db::kLayers, key_u64(id)));
    LAYER_TRY(txn.del_prefix(Db::kMaps, key_u64(id)));
    LAYER_TRY(txn.del_prefix(Db::kSums, key_u64(id)));
    LAYER_TRY(txn.del(Db::kHeat, key_u64(id)));
    unlink_after->push_back(layer_path(layer));
    id = layer.parent;  // the dropped layer's reference to its parent goes too
  }
  return {};
}

Status Pool::remove_image(const std::string& ref) {
  if (read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  LAYER_TRY(validate_image_ref(ref));
  std::vector<std::string> unlink_after;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    unlink_after.clear();
    LAYER_ASSIGN(auto v, txn.get(Db::kImages, ref));
    if (!v) return make_error(ENOENT, "image {} not found in pool {}", ref, paths_.root);
    LAYER_ASSIGN(auto image, decode_image(*v, ref));
    std::vector<std::string> users;
    LAYER_TRY(txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view cv) -> Result<bool> {
      LAYER_ASSIGN(auto c, decode_container(cv, k));
      if (c.image_ref == ref) users.push_back(c.name);
      return true;
    }));
    if (!users.empty())
      return make_error(EBUSY, "image {} is in use by {} container(s): {}", ref, users.size(),
                        fmt::join(users, ", "));
    LAYER_TRY(txn.del(Db::kImages, ref));
    return drop_layer(txn, image.top_layer, &unlink_after);
  }));
  // Unlinked only after the transaction that dropped the last reference committed.
  for (const auto& f : unlink_after) LAYER_TRY(store_->remove(f));
  return {};
}

// ---- containers ----

Result<ContainerInfo> Pool::container_info(ReadTxn& txn, const ContainerRecord& rec) {
  ContainerInfo info;
  info.container = rec;
  LAYER_ASSIGN(info.chain, chain_of(txn, rec.delta_layer));
  LAYER_TRY(count_blocks(txn, rec.delta_layer, &info.delta_data_blocks, &info.delta_zero_blocks));
  info.chain_data_blocks.push_back(info.delta_data_blocks);
  for (size_t i = 1; i < info.chain.size(); ++i) {
    uint64_t data = 0, zero = 0;
    LAYER_TRY(count_blocks(txn, info.chain[i].id, &data, &zero));
    info.chain_data_blocks.push_back(data);
  }
  if (locks_->is_locked(LockKind::kContainer, rec.id)) info.served_by = locks_->holder_of(rec.id);
  return info;
}

Result<ContainerInfo> Pool::clone(const std::string& image_ref, const std::string& name,
                                  std::optional<uint64_t> size_bytes) {
  if (read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  LAYER_TRY(validate_image_ref(image_ref));
  LAYER_TRY(validate_name(name, "container name"));
  if (size_bytes && (*size_bytes == 0 || *size_bytes % 512 != 0))
    return make_error(EINVAL, "size {} is not a positive multiple of 512", *size_bytes);
  if (size_bytes && *size_bytes > kMaxDiskBytes)
    return make_error(EINVAL, "size {} is larger than the limit of {} (16 TiB)", *size_bytes,
                      kMaxDiskBytes);
  ContainerRecord rec;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto existing, txn.get(Db::kContainers, name));
    if (existing) return make_error(EEXIST, "container \"{}\" already exists", name);
    LAYER_ASSIGN(auto iv, txn.get(Db::kImages, image_ref));
    if (!iv) return make_error(ENOENT, "image {} not found in pool {}", image_ref, paths_.root);
    LAYER_ASSIGN(auto image, decode_image(*iv, image_ref));
    const uint64_t size = size_bytes.value_or(image.size_bytes);
    if (size < image.size_bytes)
      return make_error(EINVAL, "size {} is smaller than image {} ({} bytes)", size, image_ref,
                        image.size_bytes);
    LAYER_ASSIGN(auto base, get_layer(txn, image.top_layer));
    ++base.refcount;
    LAYER_TRY(txn.put(Db::kLayers, key_u64(base.id), encode(base)));
    LAYER_ASSIGN(LayerId delta_id, txn.next_id("layer"));
    LAYER_ASSIGN(uint64_t container_id, txn.next_id("container"));
    // The delta's file is created on its first write: a clone is this transaction only.
    LayerRecord delta{delta_id, base.id, Tier::kSsd, size, image.block_size,
                      LayerState::kWritable, 1, now_unix()};
    LAYER_TRY(txn.put(Db::kLayers, key_u64(delta_id), encode(delta)));
    rec = ContainerRecord{name, container_id, image_ref, delta_id, size, image.block_size,
                          now_unix(), 1, {}};
    return txn.put(Db::kContainers, name, encode(rec));
  }));
  LAYER_ASSIGN(auto txn, index_->begin_read());
  return container_info(txn, rec);
}

Result<std::vector<ContainerInfo>> Pool::list_containers() {
  LAYER_ASSIGN(auto txn, index_->begin_read());
  std::vector<ContainerInfo> out;
  LAYER_TRY(txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto rec, decode_container(v, k));
    LAYER_ASSIGN(auto info, container_info(txn, rec));
    out.push_back(std::move(info));
    return true;
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
  if (read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  LAYER_TRY(validate_name(name, "container name"));
  ContainerRecord rec;
  {
    LAYER_ASSIGN(auto txn, index_->begin_read());
    LAYER_ASSIGN(rec, get_container(txn, name));
  }
  // Held until the rows and the file are gone, so no server can open it meanwhile.
  LAYER_ASSIGN(Lock lock, locks_->try_lock(LockKind::kContainer, rec.id, true,
                                           fmt::format("container \"{}\"", name)));
  std::vector<std::string> unlink_after;
  LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
    unlink_after.clear();
    LAYER_ASSIGN(auto current, get_container(txn, name));
    if (current.id != rec.id) return make_error(EBUSY, "container \"{}\" changed meanwhile", name);
    LAYER_TRY(txn.del(Db::kContainers, name));
    return drop_layer(txn, current.delta_layer, &unlink_after);
  }));
  for (const auto& f : unlink_after) LAYER_TRY(store_->remove(f));
  ::unlink(fmt::format("{}/holders/{}", paths_.run_dir, rec.id).c_str());
  return {};
}

}  // namespace layer
