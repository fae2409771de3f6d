// Unit tests for Disk::move_delta (lib/delta_move.cc) and lib/dirty_tracker.h: a served
// delta moved both ways while four threads write, zero, trim and read their own quarters of the
// disk against their own models, with the catch-up rounds held until the writers have raced
// them; a delta never written moved by its row alone; a copy that does not compare equal, or a
// full tier, refused with the disk still serving from its source; a crash at each step of a
// live move recovered by the next open — data checked against the model, fsck clean.
#include <atomic>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"
#include "intents.h"
#include "mover.h"

using namespace layer;
using namespace disktest;

namespace {

constexpr uint64_t kImage = 256 * 4096;
constexpr uint64_t kDisk = 2048 * 4096;  // 8 MiB: four quarters of 2 MiB

Tier other(Tier t) { return t == Tier::kSsd ? Tier::kHdd : Tier::kSsd; }

void require_fsck_clean(Pool& pool) {
  auto r = MUST(fsck(pool, true, false));
  for (const auto& p : r.problems) UNSCOPED_INFO(p);
  REQUIRE(r.problems.empty());
}

LayerRecord layer_row(Pool& pool, LayerId id) {
  auto txn = MUST(pool.index().begin_read());
  auto v = MUST(txn.get(Db::kLayers, key_u64(id)));
  REQUIRE(v);
  return MUST(decode_layer(*v, id));
}

// The layer's row names `tier`, its file (if `has_file`) is there and in no other tier, and no
// move intent is left.
void require_only_in(Pool& pool, LayerId id, Tier tier, bool has_file = true) {
  CHECK(layer_row(pool, id).tier == tier);
  CHECK(MUST(pool.store(tier).stat(id)).has_value() == has_file);
  CHECK_FALSE(MUST(pool.store(other(tier)).stat(id)).has_value());
  CHECK(MUST(intents(pool, IntentRecord::Kind::kMove)).empty());
}

// Descriptors of this process open on removed layer files.
int deleted_layer_fds() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec).string();
    if (!ec && target.find(".layer (deleted)") != std::string::npos) n++;
  }
  return n;
}

// A file whose writes flip one byte (corrupt) or fail with ENOSPC.
class BadFile : public ForwardingFile {
 public:
  BadFile(std::shared_ptr<LayerFile> inner, bool enospc)
      : ForwardingFile(std::move(inner)), enospc_(enospc) {}
  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    if (enospc_) return make_error(ENOSPC, "write {}: no space (injected)", inner_->path());
    std::vector<uint8_t> copy(static_cast<const uint8_t*>(buf),
                              static_cast<const uint8_t*>(buf) + len);
    copy[len / 2] ^= 0x40;
    return inner_->write(copy.data(), len, offset);
  }

 private:
  bool enospc_;
};

// A tier whose files written through it (the mover's copy, and the catch-up's and mirrored
// writes to it) are BadFiles; with good_copy, copy_to's file (create) is a good one.
class BadStore : public ForwardingStore {
 public:
  BadStore(const std::string& dir, bool enospc, bool good_copy = false)
      : ForwardingStore(std::make_unique<LocalStore>(dir)),
        enospc_(enospc),
        good_copy_(good_copy) {}
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override {
    LAYER_ASSIGN(auto f, ForwardingStore::create(id, size_bytes));
    if (good_copy_) return f;
    return std::shared_ptr<LayerFile>(std::make_shared<BadFile>(f, enospc_));
  }
  Result<std::shared_ptr<LayerFile>> open(LayerId id, bool writable) override {
    LAYER_ASSIGN(auto f, ForwardingStore::open(id, writable));
    if (!writable) return f;
    return std::shared_ptr<LayerFile>(std::make_shared<BadFile>(f, enospc_));
  }

 private:
  bool enospc_;
  bool good_copy_;
};

// Four writers, each on its own quarter of the disk with its own model of it: random writes
// (aligned or not), zeroes, trims and reads checked against the model, until stopped. Failures
// are collected (Catch's assertions are not for other threads) and checked by the caller.
class Writers {
 public:
  Writers(Disk& disk, const Model& start, uint64_t seed) : disk_(disk) {
    const uint64_t quarter = disk.size_bytes() / 4;
    for (int q = 0; q < 4; ++q) {
      Part& p = parts_[q];
      p.from = quarter * static_cast<uint64_t>(q);
      p.bytes.assign(start.bytes.begin() + static_cast<long>(p.from),
                     start.bytes.begin() + static_cast<long>(p.from + quarter));
      p.rng.seed(seed + static_cast<uint64_t>(q));
    }
    for (int q = 0; q < 4; ++q) threads_.emplace_back([this, q] { run(parts_[q]); });
  }
  ~Writers() { stop(); }

  // Blocks until the writers have done n more operations between them.
  void wait_ops(uint64_t n) {
    const uint64_t until = ops_.load() + n;
    while (ops_.load() < until && failures() == 0) std::this_thread::yield();
  }
  void stop() {
    stop_ = true;
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  uint64_t ops() const { return ops_.load(); }
  size_t failures() {
    std::lock_guard<std::mutex> lk(mu_);
    return errors_.size();
  }
  std::vector<std::string> errors() {
    std::lock_guard<std::mutex> lk(mu_);
    return errors_;
  }
  // The models put together. REQUIRES: stopped.
  void into(Model& m) const {
    for (const Part& p : parts_)
      std::copy(p.bytes.begin(), p.bytes.end(), m.bytes.begin() + static_cast<long>(p.from));
  }

 private:
  struct Part {
    uint64_t from = 0;
    std::vector<uint8_t> bytes;
    std::mt19937_64 rng;
  };
  void failed(std::string what) {
    std::lock_guard<std::mutex> lk(mu_);
    errors_.push_back(std::move(what));
  }
  void run(Part& p) {
    const uint64_t size = p.bytes.size();
    std::vector<uint8_t> buf;
    while (!stop_) {
      const uint64_t off = p.rng() % 2 ? p.rng() % (size / 4096) * 4096 : p.rng() % (size - 1);
      const uint64_t len = std::min<uint64_t>(size - off, 1 + p.rng() % (3 * 4096));
      const int op = static_cast<int>(p.rng() % 100);
      Status s;
      if (op < 45) {
        buf.resize(len);
        const uint8_t fill = static_cast<uint8_t>(1 + p.rng() % 255);
        for (uint64_t i = 0; i < len; ++i) buf[i] = static_cast<uint8_t>(fill + i % 7);
        s = disk_.write(buf.data(), len, p.from + off, false);
        if (s) std::copy(buf.begin(), buf.end(), p.bytes.begin() + static_cast<long>(off));
      } else if (op < 60) {
        s = p.rng() % 2 ? disk_.zero(len, p.from + off, false, false)
                        : disk_.trim(len, p.from + off, false);
        if (s)
          std::fill(p.bytes.begin() + static_cast<long>(off),
                    p.bytes.begin() + static_cast<long>(off + len), 0);
      } else if (op < 62) {
        s = disk_.flush();
      } else {
        buf.assign(len, 0xCC);
        s = disk_.read(buf.data(), len, p.from + off);
        if (s && !std::equal(buf.begin(), buf.end(), p.bytes.begin() + static_cast<long>(off)))
          failed(fmt::format("read of {} bytes at {} differs from the model", len, p.from + off));
      }
      if (!s) failed(fmt::format("op {} at {}: {}", op, p.from + off, s.error().message));
      ops_++;
    }
  }

  Disk& disk_;
  Part parts_[4];
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> ops_{0};
  std::mutex mu_;
  std::vector<std::string> errors_;  // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace

TEST_CASE("a served delta moves both ways while four threads write, zero, trim and read",
          "[delta_move]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  // Data in every quarter, so that the bulk copy has something to race.
  for (uint64_t off = 0; off < kDisk; off += 4096 * 8)
    do_write(*disk, d.model, off, pattern(4096 * 3, off));
  REQUIRE_OK(disk->flush());
  const LayerId delta = MUST(pool.inspect("c")).container.delta_layer;

  // The writers surely race the bulk copy and every catch-up round: each waits for them. (The
  // hooks are set before the writers start: no I/O may run meanwhile.)
  std::optional<Writers> writers;
  pool.set_test_hook([&](std::string_view point) {
    if (point == "move.copied" || point == "move.caught-up") writers->wait_ops(200);
  });
  disk->set_test_hook([&](std::string_view point) {
    if (point == "move.catch-up") writers->wait_ops(50);
  });
  writers.emplace(*disk, d.model, test::test_seed("delta-move-writers"));
  Disk::MoveOptions options;
  options.final_bytes = 0;  // every round runs
  options.max_rounds = 3;
  for (Tier to : {Tier::kHdd, Tier::kSsd, Tier::kHdd}) {
    INFO("to " << to_string(to));
    auto r = MUST(disk->move_delta(delta, to, options));
    CHECK(r.moved);
    CHECK(r.from == other(to));
    CHECK(r.to == to);
    CHECK(r.data_bytes > 0);
    CHECK(r.catch_up_rounds > 0);
    CHECK(r.caught_up_bytes > 0);
    CHECK(disk->delta_layer().tier == to);
    require_only_in(pool, delta, to);
    writers->wait_ops(200);  // on the new file
  }
  // Moved already: nothing to do. Another delta id: refused.
  CHECK_FALSE(MUST(disk->move_delta(delta, Tier::kHdd)).moved);
  CHECK(disk->move_delta(delta + 1000, Tier::kSsd).error().code == EBUSY);
  writers->stop();
  for (const auto& e : writers->errors()) UNSCOPED_INFO(e);
  REQUIRE(writers->failures() == 0);
  INFO(writers->ops() << " operations");
  pool.set_test_hook(nullptr);
  disk->set_test_hook(nullptr);
  writers->into(d.model);
  check_disk(*disk, d.model);
  // A live snapshot freezes the moved delta where it is now.
  MUST(disk->snapshot("after"));
  check_disk(*disk, d.model);
  REQUIRE_OK(disk->flush());
  // The old files were let go (a read in flight holds its view until it returns).
  for (int i = 0; i < 5000 && deleted_layer_fds() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(deleted_layer_fds() == 0);
  disk.reset();

  d.f.reopen();
  require_only_in(*d.f.pool, delta, Tier::kHdd);
  check_disk(*d.open(), d.model);
  check_disk(*d.open("c@after", false), d.model);
  require_fsck_clean(*d.f.pool);
}

TEST_CASE("a live move never lets the index name data the copy has not synced", "[delta_move]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  // The copy's tier records which writes a sync made durable (TrackingStore).
  auto* hdd = new TrackingStore(pool.paths().tier_dir[1], 4096);
  pool.set_store(Tier::kHdd, std::unique_ptr<LayerStore>(hdd));
  auto disk = d.open();
  for (uint64_t off = 0; off < kDisk; off += 4096 * 5)
    do_write(*disk, d.model, off, pattern(4096 * 2, off));
  REQUIRE_OK(disk->flush());
  const LayerId delta = MUST(pool.inspect("c")).container.delta_layer;
  // Every block the committed index names as data in the delta was written (or punched: an
  // all-zero block is copied as a hole) in the copy, then synced. No Catch macros: it runs on
  // the mover's thread.
  auto unsynced = [&]() -> std::string {
    auto blocks = committed_data_blocks(pool, delta);
    if (!blocks) return blocks.error().message;
    for (uint64_t b : *blocks)
      if (!hdd->durable(delta, b))
        return fmt::format("block {} is data in the committed index, not synced in the copy", b);
    return "";
  };
  std::optional<Writers> writers;
  std::string at_switch = "not reached";
  pool.set_test_hook([&](std::string_view point) {
    if (point == "move.copied" || point == "move.caught-up") writers->wait_ops(300);
    if (point == "move.switched") at_switch = unsynced();
  });
  disk->set_test_hook([&](std::string_view point) {
    if (point == "move.catch-up") writers->wait_ops(50);
  });
  writers.emplace(*disk, d.model, test::test_seed("delta-move-sync"));
  Disk::MoveOptions options;
  options.final_bytes = 0;
  options.max_rounds = 2;
  CHECK(MUST(disk->move_delta(delta, Tier::kHdd, options)).moved);
  writers->wait_ops(500);  // flush rounds commit marks of writes to the copy
  writers->stop();
  for (const auto& e : writers->errors()) UNSCOPED_INFO(e);
  REQUIRE(writers->failures() == 0);
  pool.set_test_hook(nullptr);
  disk->set_test_hook(nullptr);
  CHECK(at_switch == "");
  REQUIRE_OK(disk->flush());
  CHECK(unsynced() == "");
  writers->into(d.model);
  check_disk(*disk, d.model);
}

TEST_CASE("a delta never written moves by its row; its first write makes the file there",
          "[delta_move]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  const LayerId delta = MUST(pool.inspect("c")).container.delta_layer;
  check_read(*disk, d.model, 0, 4096 * 4);  // loaded, still no file
  auto r = MUST(disk->move_delta(delta, Tier::kHdd));
  CHECK(r.moved);
  CHECK(r.data_bytes == 0);
  require_only_in(pool, delta, Tier::kHdd, false);
  do_write(*disk, d.model, 4096 * 7 + 3, pattern(9000, 1));
  do_zero(*disk, d.model, 0, 4096 * 2);
  REQUIRE_OK(disk->flush());
  require_only_in(pool, delta, Tier::kHdd);
  check_disk(*disk, d.model);
  disk.reset();
  d.f.reopen();
  check_disk(*d.open(), d.model);
  require_fsck_clean(*d.f.pool);
}

TEST_CASE("a live copy that does not compare equal, or a full tier, leaves the delta serving",
          "[delta_move]") {
  // corrupt: every write to the copy flips a byte; full: the copy cannot be made; full later:
  // the copy is made, then the tier refuses a client's mirrored write and the catch-up's.
  enum class Fault { kCorrupt, kFull, kFullLater };
  for (Fault fault : {Fault::kCorrupt, Fault::kFull, Fault::kFullLater}) {
    INFO("fault " << static_cast<int>(fault));
    DiskFixture d(kImage, kDisk);
    Pool& pool = *d.f.pool;
    pool.set_store(Tier::kHdd,
                   std::make_unique<BadStore>(pool.paths().tier_dir[1], fault != Fault::kCorrupt,
                                              fault == Fault::kFullLater));
    auto disk = d.open();
    do_write(*disk, d.model, 4096 * 5, pattern(4096 * 40, 3));
    REQUIRE_OK(disk->flush());
    const LayerId delta = MUST(pool.inspect("c")).container.delta_layer;
    // A client's write once the copy is made: mirrored, refused by the full tier, acknowledged
    // (the source took it).
    pool.set_test_hook([&](std::string_view point) {
      if (point == "move.caught-up") do_write(*disk, d.model, 4096 * 7 + 1, pattern(5000, 8));
    });
    auto r = disk->move_delta(delta, Tier::kHdd);
    pool.set_test_hook(nullptr);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == (fault == Fault::kCorrupt ? EIO : ENOSPC));
    require_only_in(pool, delta, Tier::kSsd);
    CHECK(disk->delta_layer().tier == Tier::kSsd);
    // It goes on serving from its source: writes, zeroes, reads, flushes.
    do_write(*disk, d.model, 4096 * 2 + 5, pattern(4096 * 3, 4));
    do_trim(*disk, d.model, 4096 * 20, 4096 * 4);
    REQUIRE_OK(disk->flush());
    check_disk(*disk, d.model);
    // And moves once the tier works.
    disk.reset();
    pool.set_store(Tier::kHdd, std::make_unique<LocalStore>(pool.paths().tier_dir[1]));
    disk = d.open();
    CHECK(MUST(disk->move_delta(delta, Tier::kHdd)).moved);
    require_only_in(pool, delta, Tier::kHdd);
    check_disk(*disk, d.model);
    disk.reset();
    require_fsck_clean(pool);
  }
}

TEST_CASE("a crash at each step of a live move leaves the delta in one place once reopened",
          "[delta_move]") {
  for (const char* point : {"move.intent-committed", "move.copied", "move.caught-up",
                            "move.verified", "move.published", "move.switched"}) {
    INFO(point);
    DiskFixture d(kImage, kDisk);
    write_flush(d, 4096 * 3 + 11, 4096 * 30, 5);
    const LayerId delta = MUST(d.f.pool->inspect("c")).container.delta_layer;
    d.f.pool.reset();
    test::Child child([&] {
      ::setenv("LAYER_FAILPOINT", point, 1);
      auto pool = Pool::open(d.f.root, Pool::OpenOptions{});
      if (!pool) return 3;
      auto disk = Disk::open(**pool, "c", true);
      if (!disk) return 4;
      std::vector<uint8_t> block(4096, 0);
      if (!(*disk)->read(block.data(), block.size(), 0)) return 5;  // loaded, with its file
      return (*disk)->move_delta(delta, Tier::kHdd) ? 0 : 6;
    });
    REQUIRE(child.wait() == 128 + SIGKILL);
    {
      // What the crash left, before any recovery: one move intent.
      auto ro = MUST(Pool::open(d.f.root, Pool::OpenOptions{true}));
      CHECK(MUST(intents(*ro, IntentRecord::Kind::kMove)).size() == 1);
    }
    d.f.reopen();  // a writable open finishes the move's recovery
    Pool& pool = *d.f.pool;
    const Tier expect = std::string(point) == "move.switched" ? Tier::kHdd : Tier::kSsd;
    require_only_in(pool, delta, expect);
    auto disk = d.open();
    check_disk(*disk, d.model);
    // And it moves (live) again, and takes writes.
    CHECK(MUST(disk->move_delta(delta, other(expect))).moved);
    do_write(*disk, d.model, 4096 * 100, pattern(4096, 6));
    REQUIRE_OK(disk->flush());
    check_disk(*disk, d.model);
    disk.reset();
    require_only_in(pool, delta, other(expect));
    require_fsck_clean(pool);
  }
}
