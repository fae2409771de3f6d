// import.cc — import of raw disk images.
//
// Import reads the data regions SEEK_DATA/SEEK_HOLE report (or the whole file where
// unsupported) in 1 MiB windows, holes reading as zeroes; stores all-zero blocks as nothing
// (absent reads as zeroes); writes data blocks at the same offset of a new layer file; hashes
// every 64 KiB group holding data. Rows of finished chunks and checksum groups are committed as
// the copy goes, in bounded transactions under an `intents` row, so memory stays flat; after
// the copy it fdatasyncs and publishes with one final transaction (layer + image rows, intent
// deleted). Until then nothing names the rows, so a crash leaves invisible rows and a file that
// fsck --repair rolls back. The new layer's lock is held from before the intent is visible, so
// fsck leaves a running import alone.
#include "import.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <optional>

#include "block_map.h"
#include "checksum.h"
#include "layer_build.h"
#include "names.h"
#include "pool.h"

namespace layer {

constexpr uint64_t kImportWindowBytes = 1 << 20;

namespace {

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

// The first offset at or after pos (and below size) where fd holds data, per SEEK_DATA;
// std::nullopt when none. Where SEEK_DATA is unsupported, every offset may hold data: pos.
Result<std::optional<uint64_t>> next_data(int fd, uint64_t pos, uint64_t size,
                                          const std::string& file) {
  if (pos >= size) return std::optional<uint64_t>();
  off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
  if (data < 0) {
    const int err = errno;
    if (err == ENXIO) return std::optional<uint64_t>();
    if (err == EINVAL || err == EOPNOTSUPP) return std::optional<uint64_t>(pos);
    return sys_error(err, "SEEK_DATA {}", file);
  }
  if (static_cast<uint64_t>(data) >= size) return std::optional<uint64_t>();
  return std::optional<uint64_t>(static_cast<uint64_t>(data));
}

// Calls fn(lo, hi) for each data region of fd within [from, to) (SEEK_DATA/SEEK_HOLE), or once
// for all of it where they are unsupported. Walked window by window, so memory does not grow
// with the number of extents of the source.
Status for_each_data_region(int fd, uint64_t from, uint64_t to, const std::string& file,
                            const std::function<Status(uint64_t, uint64_t)>& fn) {
  for (uint64_t pos = from; pos < to;) {
    LAYER_ASSIGN(auto data, next_data(fd, pos, to, file));
    if (!data) return {};
    off_t hole = ::lseek(fd, static_cast<off_t>(*data), SEEK_HOLE);
    if (hole < 0) {
      const int err = errno;
      if (err != EINVAL && err != EOPNOTSUPP) return sys_error(err, "SEEK_HOLE {}", file);
      hole = static_cast<off_t>(to);
    }
    const uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), to);
    if (end <= *data) return {};
    LAYER_TRY(fn(*data, end));
    pos = end;
  }
  return {};
}

// The identity of one version of the source: a writer changes the mtime and ctime (and maybe
// the size). Timestamps move with the kernel's clock tick, so a write in the same tick as a
// change made just before the import started can go unseen: this catches writers, it does not
// lock them out.
bool same_version(const struct stat& a, const struct stat& b) {
  return a.st_size == b.st_size && a.st_mtim.tv_sec == b.st_mtim.tv_sec &&
         a.st_mtim.tv_nsec == b.st_mtim.tv_nsec && a.st_ctim.tv_sec == b.st_ctim.tv_sec &&
         a.st_ctim.tv_nsec == b.st_ctim.tv_nsec;
}

// Closes an fd on every path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

Result<ImageInfo> import_image(Pool& pool, const std::string& ref, const std::string& file,
                               uint32_t block_size, const ImportProgress& progress,
                               const std::string& description) {
  LAYER_TRY(pool.check_writable());
  LAYER_TRY(validate_image_ref(ref));
  if (block_size < kMinBlockSize || block_size > kMaxBlockSize ||
      (block_size & (block_size - 1)) != 0)
    return make_error(EINVAL, "block size {} is not a power of two from {} to {}", block_size,
                      kMinBlockSize, kMaxBlockSize);
  Fd in;
  in.fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (in.fd < 0) return sys_error(errno, "cannot open image file {}", file);
  struct stat st;
  if (::fstat(in.fd, &st) != 0) return sys_error(errno, "stat {}", file);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    off_t end = ::lseek(in.fd, 0, SEEK_END);
    if (end < 0) return sys_error(errno, "size of {}", file);
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
  LAYER_TRY(pool.check_tiers_hold(size));
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto existing, txn.get(Db::kImages, ref));
    if (existing) return make_error(EEXIST, "image {} already exists", ref);
  }

  // 1. Reserve a layer id under an intent, so a crash leaves something fsck can roll back; its
  // lock is held until the layer is published or rolled back (LayerBuild). Every failure below
  // rolls back through build->fail: rows, intent, and the file only if this import created it.
  LAYER_ASSIGN(auto build, LayerBuild::begin(pool, IntentRecord::Kind::kImport, ref));
  const LayerId layer_id = build->id();
  pool.test_point("import.intent-committed");
  LayerRecord layer{layer_id, 0, Tier::kSsd, size, block_size, LayerState::kFrozen, 1, now_unix()};
  auto rollback = [&](Error e) -> Error { return build->fail(std::move(e)); };

  // 2. Copy the data blocks into a new layer file at the same offsets; hash each 64 KiB group;
  // commit the rows of finished chunks and checksum groups as the copy goes (3).
  auto created = build->create_file(layer.tier, size);
  if (!created) return rollback(std::move(created).error());
  std::shared_ptr<LayerFile> out = *created;
  pool.test_point("import.data-walked");

  // 3. Rows in bounded transactions, invisible until published: no layer row names them yet.
  // Windows go in disk order, so a chunk (or a row of checksums) is finished once a window has
  // passed its end: it moves to `rows` and leaves memory with the next transaction. Memory
  // stays flat whatever the image's size: the open chunk and sums row, and at most
  // kMaxRowsPerTxn finished rows.
  const uint64_t chunk_bytes = uint64_t{kBlocksPerChunk} * block_size;
  const uint64_t sums_row_bytes = uint64_t{kSumsPerRow} * kSumGroupBytes;
  std::map<uint32_t, ChunkBits> open_chunks;            // chunk no -> bits
  std::map<uint32_t, std::vector<uint64_t>> open_sums;  // sums row no -> checksums
  std::vector<std::pair<Db, std::pair<std::string, std::string>>>
      rows;  // finished, in key order per db
  uint64_t data_blocks = 0;
  auto commit_rows = [&]() -> Status {
    if (rows.empty()) return {};
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      for (const auto& [db, kv] : rows) LAYER_TRY(txn.append(db, kv.first, kv.second));
      return {};
    }));
    rows.clear();
    pool.test_point("import.rows-committed");
    return {};
  };
  // Moves every chunk and sums row that ends at or before `offset` to `rows`, committing
  // whenever kMaxRowsPerTxn are waiting.
  auto finish_before = [&](uint64_t offset) -> Status {
    for (;;) {
      const bool chunk_done = !open_chunks.empty() &&
                              (open_chunks.begin()->first + uint64_t{1}) * chunk_bytes <= offset;
      const bool sums_done =
          !open_sums.empty() && (open_sums.begin()->first + uint64_t{1}) * sums_row_bytes <= offset;
      if (!chunk_done && !sums_done) return {};
      if (chunk_done) {
        auto it = open_chunks.begin();
        rows.push_back({Db::kMaps, {key_u64_u32(layer_id, it->first), encode_chunk(it->second)}});
        open_chunks.erase(it);
      } else {
        auto it = open_sums.begin();
        rows.push_back({Db::kSums, {key_u64_u32(layer_id, it->first), encode_sums(it->second)}});
        open_sums.erase(it);
      }
      if (rows.size() >= kMaxRowsPerTxn) LAYER_TRY(commit_rows());
    }
  };

  std::vector<uint8_t> buf(kImportWindowBytes);
  std::vector<bool> block_has_data;
  // Windows are aligned to 1 MiB, a multiple of the block size and of the 64 KiB group; a
  // window without data (per SEEK_DATA) is skipped without reading.
  for (uint64_t pos = 0; pos < size;) {
    auto next = next_data(in.fd, pos, size, file);
    if (!next) return rollback(std::move(next).error());
    if (!*next) break;
    {
      const uint64_t w = std::max(pos, **next / kImportWindowBytes * kImportWindowBytes);
      const uint64_t wlen = std::min<uint64_t>(kImportWindowBytes, size - w);
      pos = w + wlen;
      // Only the data regions are read; the holes between them read as zeroes.
      std::memset(buf.data(), 0, wlen);
      auto read =
          for_each_data_region(in.fd, w, w + wlen, file, [&](uint64_t lo, uint64_t hi) -> Status {
            for (uint64_t at = lo; at < hi;) {
              ssize_t n = ::pread(in.fd, buf.data() + (at - w), hi - at, static_cast<off_t>(at));
              if (n < 0 && errno == EINTR) continue;
              if (n < 0) return sys_error(errno, "read {}", file);
              if (n == 0) return make_error(EIO, "{} shrank while importing", file);
              at += static_cast<uint64_t>(n);
            }
            return {};
          });
      if (!read) return rollback(std::move(read).error());
      block_has_data.clear();
      for (uint64_t off = 0; off < wlen; off += block_size) {
        const uint64_t blen = std::min<uint64_t>(block_size, wlen - off);
        const bool data = !is_zero(buf.data() + off, blen);
        block_has_data.push_back(data);
        if (!data) continue;
        const uint64_t block_no = (w + off) / block_size;
        open_chunks[static_cast<uint32_t>(block_no / kBlocksPerChunk)].set(
            static_cast<uint32_t>(block_no % kBlocksPerChunk), BlockState::kData);
        ++data_blocks;
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
        if (!any) continue;
        const uint64_t group = (w + g) / kSumGroupBytes;
        auto& v = open_sums[static_cast<uint32_t>(group / kSumsPerRow)];
        v.resize(kSumsPerRow, 0);
        v[group % kSumsPerRow] = group_checksum(buf.data() + g, glen);
      }
      if (auto s = finish_before(w + wlen); !s) return rollback(std::move(s).error());
      if (progress) progress(w + wlen, size);
    }
  }
  if (progress) progress(size, size);
  // A writer meanwhile (into a window already copied, or a former hole) would leave the image
  // different from the file without a word.
  struct stat after;
  if (::fstat(in.fd, &after) != 0) return rollback(sys_error(errno, "stat {}", file));
  if (!same_version(st, after))
    return rollback(make_error(EBUSY,
                               "image file {} changed while importing (its size, mtime or ctime "
                               "moved); stop the writer and import again",
                               file));
  if (auto s = finish_before(UINT64_MAX); !s) return rollback(std::move(s).error());
  if (auto s = commit_rows(); !s) return rollback(std::move(s).error());
  // Data reaches the disk before the publishing transaction that names it.
  if (auto s = out->sync(); !s) return rollback(std::move(s).error());

  // 4. Publish.
  ImageRecord image{ref, layer_id, size, block_size, now_unix(), description};
  LAYER_TRY(build->publish([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto existing, txn.get(Db::kImages, ref));
    if (existing) return make_error(EEXIST, "image {} already exists", ref);
    LAYER_TRY(txn.put(Db::kLayers, key_u64(layer_id), encode(layer)));
    return txn.put(Db::kImages, ref, encode(image));
  }));
  return ImageInfo{image, layer, data_blocks, 0};
}

}  // namespace layer
