// disk_test_util.h — shared by the Disk unit tests (disk_test.cc, disk_durability_test.cc):
// a byte-vector model of a disk, a fixture with an imported image and a clone, I/O helpers that
// keep the model in step, and TrackingStore, a LayerStore that records which writes a sync()
// made durable (the flush-order tests).
#pragma once

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <set>
#include <thread>

#include "disk.h"
#include "test_util.h"

namespace disktest {

using namespace layer;
using test::PoolFixture;

// The reference: the disk's bytes, and per block whether extents must report a hole.
struct Model {
  std::vector<uint8_t> bytes;
  std::vector<bool> must_be_hole;  // true: known absent/zero (whole-block zero, trim, image hole)
  uint32_t block_size = 0;

  uint64_t size() const { return bytes.size(); }
  uint64_t blocks() const { return (size() + block_size - 1) / block_size; }
  uint64_t block_end(uint64_t b) const { return std::min<uint64_t>((b + 1) * block_size, size()); }

  void write(uint64_t off, const uint8_t* data, uint64_t len) {
    std::copy(data, data + len, bytes.begin() + static_cast<long>(off));
    for (uint64_t b = off / block_size; b * block_size < off + len; b++) must_be_hole[b] = false;
  }
  // Zero/trim: whole blocks become known holes, except the short last block whose handling
  // (tombstone or written zeroes) the contract leaves open; partial blocks become unknown.
  void zero(uint64_t off, uint64_t len) {
    std::fill(bytes.begin() + static_cast<long>(off), bytes.begin() + static_cast<long>(off + len),
              0);
    for (uint64_t b = off / block_size; b * block_size < off + len; b++) {
      const bool whole = b * block_size >= off && (b + 1) * block_size <= off + len;
      must_be_hole[b] = whole;
    }
  }
};

// A pool, an imported image and a container on it, with the model of the container's bytes.
struct DiskFixture {
  PoolFixture f;
  std::vector<uint8_t> image;
  uint32_t block_size;
  Model model;

  // image_size and disk_size must be multiples of 512; disk_size >= image_size.
  DiskFixture(uint64_t image_size, uint64_t disk_size, uint32_t bs = 4096, uint64_t seed = 11)
      : block_size(bs) {
    image = f.import("base:1", image_size, bs, seed);
    MUST(
        f.pool->clone("base:1", "c",
                      disk_size == image_size ? std::nullopt : std::optional<uint64_t>(disk_size)));
    model = initial_model(disk_size);
  }

  Model initial_model(uint64_t disk_size) const {
    Model m;
    m.block_size = block_size;
    m.bytes = image;
    m.bytes.resize(disk_size, 0);
    m.must_be_hole.assign(m.blocks(), false);
    for (uint64_t b = 0; b < m.blocks(); b++) {
      m.must_be_hole[b] =
          test::all_zero(m.bytes.data() + b * block_size, m.block_end(b) - b * block_size);
    }
    return m;
  }

  std::shared_ptr<Disk> open(const std::string& name = "c", bool writable = true) {
    return MUST(Disk::open(*f.pool, name, writable));
  }
};

inline std::vector<uint8_t> read_range(Disk& disk, uint64_t off, uint64_t len) {
  std::vector<uint8_t> buf(len, 0xCC);
  REQUIRE_OK(disk.read(buf.data(), len, off));
  return buf;
}

inline std::vector<uint8_t> read_all(Disk& disk) {
  std::vector<uint8_t> out(disk.size_bytes());
  for (uint64_t off = 0; off < out.size(); off += 1 << 20) {
    const uint64_t len = std::min<uint64_t>(1 << 20, out.size() - off);
    REQUIRE_OK(disk.read(out.data() + off, len, off));
  }
  return out;
}

// Fails naming the first differing offset (a byte-vector CHECK would print megabytes).
void require_same(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                  uint64_t base = 0) {
  REQUIRE(got.size() == want.size());
  auto mm = std::mismatch(got.begin(), got.end(), want.begin());
  if (mm.first != got.end()) {
    const uint64_t at = static_cast<uint64_t>(mm.first - got.begin());
    FAIL("first difference at disk offset " << base + at << ": got " << int(*mm.first) << ", want "
                                            << int(*mm.second));
  }
}

void check_disk(Disk& disk, const Model& m) { require_same(read_all(disk), m.bytes); }

inline void check_read(Disk& disk, const Model& m, uint64_t off, uint64_t len) {
  std::vector<uint8_t> want(m.bytes.begin() + static_cast<long>(off),
                            m.bytes.begin() + static_cast<long>(off + len));
  require_same(read_range(disk, off, len), want, off);
}

inline void do_write(Disk& disk, Model& m, uint64_t off, const std::vector<uint8_t>& data,
                     bool fua = false) {
  INFO("write " << data.size() << " bytes at " << off);
  REQUIRE_OK(disk.write(data.data(), data.size(), off, fua));
  m.write(off, data.data(), data.size());
}

inline void do_zero(Disk& disk, Model& m, uint64_t off, uint64_t len) {
  INFO("zero " << len << " bytes at " << off);
  REQUIRE_OK(disk.zero(len, off, false, false));
  m.zero(off, len);
}

inline void do_trim(Disk& disk, Model& m, uint64_t off, uint64_t len) {
  INFO("trim " << len << " bytes at " << off);
  REQUIRE_OK(disk.trim(len, off, false));
  m.zero(off, len);
}

struct Extent {
  uint64_t offset, len;
  bool data;
};

// Checks extents over [off, off+len): consecutive, non-empty, covering the range exactly; data
// wherever the model holds a non-zero byte; a hole wherever the model says it must be one.
inline void check_extents(Disk& disk, const Model& m, uint64_t off, uint64_t len) {
  INFO("extents " << len << " bytes at " << off);
  std::vector<Extent> ext;
  REQUIRE_OK(disk.extents(len, off, [&](uint64_t o, uint64_t l, bool d) {
    ext.push_back({o, l, d});
  }));
  REQUIRE_FALSE(ext.empty());
  uint64_t pos = off;
  for (const Extent& e : ext) {
    INFO("extent " << e.offset << "+" << e.len << (e.data ? " data" : " hole"));
    REQUIRE(e.offset == pos);
    REQUIRE(e.len > 0);
    pos += e.len;
    REQUIRE(pos <= off + len);
    if (!e.data) {
      auto mm = std::find_if(m.bytes.begin() + static_cast<long>(e.offset),
                             m.bytes.begin() + static_cast<long>(e.offset + e.len),
                             [](uint8_t b) { return b != 0; });
      if (mm != m.bytes.begin() + static_cast<long>(e.offset + e.len))
        FAIL("extents report a hole over non-zero data at " << (mm - m.bytes.begin()));
    } else {
      for (uint64_t b = e.offset / m.block_size; b * m.block_size < e.offset + e.len; b++) {
        if (m.must_be_hole[b]) FAIL("extents report data in block " << b << ", which is a hole");
      }
    }
  }
  REQUIRE(pos == off + len);
}

// Full-disk extents with holes and data at block precision (fresh clone: exact).
inline std::vector<bool> data_blocks_of(Disk& disk, uint32_t bs) {
  std::vector<bool> data((disk.size_bytes() + bs - 1) / bs, false);
  REQUIRE_OK(disk.extents(disk.size_bytes(), 0, [&](uint64_t o, uint64_t l, bool d) {
    if (!d) return;
    for (uint64_t b = o / bs; b * bs < o + l; b++) data[b] = true;
  }));
  return data;
}

inline std::vector<uint8_t> pattern(uint64_t len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto v = test::random_bytes(rng, len);
  for (auto& b : v)
    if (b == 0) b = 1;  // never zero: a lost write cannot pass for a hole
  return v;
}

// Opens the fixture's container, writes (or zeroes) and flushes it, keeping the model in step,
// and closes it again.
inline void write_flush(DiskFixture& d, uint64_t off, uint64_t len, uint64_t seed) {
  auto disk = d.open();
  do_write(*disk, d.model, off, pattern(len, seed));
  REQUIRE_OK(disk->flush());
}

inline void zero_flush(DiskFixture& d, uint64_t off, uint64_t len) {
  auto disk = d.open();
  do_zero(*disk, d.model, off, len);
  REQUIRE_OK(disk->flush());
}

// A LayerStore that records which blocks of each file have had a write (or a punch) covering
// them completed before a sync() that then succeeded: the data the index may name. Files are
// created without fsync (only the bookkeeping matters here), so creation is fast.
class TrackingStore : public ForwardingStore {
 public:
  TrackingStore(std::string dir, uint32_t block_size)
      : ForwardingStore(std::make_unique<LocalStore>(std::move(dir))), block_size_(block_size) {}

  // Called at the start of every sync() of every file (before anything is synced).
  // REQUIRES: set before any I/O.
  std::function<void()> on_sync;

  class File : public ForwardingFile {
   public:
    File(std::shared_ptr<LayerFile> inner, uint32_t block_size, TrackingStore* store)
        : ForwardingFile(std::move(inner)), block_size_(block_size), store_(store) {}
    Status write(const void* buf, uint64_t len, uint64_t offset) override {
      LAYER_TRY(inner_->write(buf, len, offset));
      std::lock_guard<std::mutex> lk(mu_);
      completed_.emplace_back(offset, len);
      return {};
    }
    // A punch writes zeroes (a live move copies an all-zero block as a hole).
    Status punch(uint64_t offset, uint64_t len) override {
      LAYER_TRY(inner_->punch(offset, len));
      std::lock_guard<std::mutex> lk(mu_);
      completed_.emplace_back(offset, len);
      return {};
    }
    Status sync() override {
      if (store_->on_sync) store_->on_sync();
      size_t covered;
      {
        std::lock_guard<std::mutex> lk(mu_);
        covered = completed_.size();  // writes that returned before this sync started
      }
      LAYER_TRY(inner_->sync());
      std::lock_guard<std::mutex> lk(mu_);
      for (size_t i = 0; i < covered; i++) {
        auto [off, len] = completed_[i];
        for (uint64_t b = (off + block_size_ - 1) / block_size_; (b + 1) * block_size_ <= off + len;
             b++)
          durable_.insert(b);
      }
      completed_.erase(completed_.begin(), completed_.begin() + static_cast<long>(covered));
      return {};
    }
    bool durable(uint64_t block_no) {
      std::lock_guard<std::mutex> lk(mu_);
      return durable_.count(block_no) > 0;
    }

   private:
    const uint32_t block_size_;
    TrackingStore* store_;
    std::mutex mu_;
    std::vector<std::pair<uint64_t, uint64_t>> completed_;  // unsynced, in completion order
    std::set<uint64_t> durable_;                            // blocks fully written, then synced
  };

  Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) override {
    LAYER_ASSIGN(auto inner, inner_store().open(id, writable));
    return add(id, std::move(inner));
  }
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override {
    LAYER_ASSIGN(auto inner, inner_store().create(id, size_bytes));
    return add(id, std::move(inner));
  }

  // True when block_no of layer id's file was fully written and then synced.
  bool durable(LayerId id, uint64_t block_no) {
    std::vector<std::shared_ptr<File>> files;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto [lo, hi] = files_.equal_range(id);
      for (auto it = lo; it != hi; ++it) files.push_back(it->second);
    }
    for (auto& f : files)
      if (f->durable(block_no)) return true;
    return false;
  }

 private:
  LayerStore& inner_store() { return inner(); }
  Result<std::shared_ptr<LayerFile>> add(LayerId id, std::shared_ptr<LayerFile> inner_file) {
    auto f = std::make_shared<File>(std::move(inner_file), block_size_, this);
    std::lock_guard<std::mutex> lk(mu_);
    files_.emplace(id, f);
    return std::shared_ptr<LayerFile>(f);
  }
  const uint32_t block_size_;
  std::mutex mu_;
  std::multimap<LayerId, std::shared_ptr<File>> files_;
};

// Replaces the ssd tier's store of `pool` with a new S over the same directory (S's
// constructor takes the directory, then `args`); returns it (owned by the pool).
template <typename S, typename... Args>
S* install_store(Pool& pool, Args&&... args) {
  auto store = std::make_unique<S>(pool.paths().tier_dir[0], std::forward<Args>(args)...);
  S* raw = store.get();
  pool.set_store(Tier::kSsd, std::move(store));
  return raw;
}

// The blocks the committed index marks as data in layer `id`. No Catch macros: runs on
// helper threads too.
inline Result<std::vector<uint64_t>> committed_data_blocks(Pool& pool, LayerId id) {
  std::vector<uint64_t> out;
  LAYER_ASSIGN(ReadTxn txn, pool.index().begin_read());
  LAYER_TRY(
      txn.scan(Db::kMaps, key_u64(id), [&](std::string_view k, std::string_view v) -> Result<bool> {
        auto key = decode_key_u64_u32(k);
        if (!key) return make_error(EIO, "bad maps key");
        LAYER_ASSIGN(ChunkBits bits, decode_chunk(v));
        for (uint32_t i = 0; i < kBlocksPerChunk; i++)
          if (bits.get(i) == BlockState::kData)
            out.push_back(uint64_t{key->second} * kBlocksPerChunk + i);
        return true;
      }));
  return out;
}

// "" when every block the index names as data in the delta of `container` has synced data;
// else what is wrong. No Catch macros: runs on helper threads too.
inline std::string unsynced_data_in_index(Pool& pool, TrackingStore& store,
                                          const std::string& container) {
  auto info = pool.inspect(container);
  if (!info.ok()) return "inspect: " + info.error().message;
  const LayerId delta = info->container.delta_layer;
  auto blocks = committed_data_blocks(pool, delta);
  if (!blocks.ok()) return "maps: " + blocks.error().message;
  for (uint64_t b : *blocks) {
    if (!store.durable(delta, b))
      return fmt::format(
          "container {}: block {} is data in the committed index, but no write "
          "of it was synced before",
          container, b);
  }
  return "";
}

}  // namespace disktest
