// Unit tests for lib/hasher.h: a snapshot's layer hashed as import hashes (the same rows as the
// image it copies), verified by fsck --full, a corrupted byte found; drops and merges while a
// layer is hashed leave no sums rows; interrupted hashes (stop, crash) leave fsck clean and a
// rerun completes; hash_pending's order, skips and report; the rate limit and prompt stops;
// the BackgroundHasher thread and its priority.
#include <sys/resource.h>
#include <sys/syscall.h>
#include <xxhash.h>

#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"
#include "hasher.h"
#include "layers.h"
#include "snapshots.h"

using namespace layer;
using namespace disktest;

namespace {

using Rows = std::map<uint32_t, std::vector<uint64_t>>;  // sums row no -> checksums

// A layer's `sums` rows.
Rows sums_rows(Pool& pool, LayerId id) {
  Rows rows;
  auto txn = MUST(pool.index().begin_read());
  REQUIRE_OK(
      txn.scan(Db::kSums, key_u64(id), [&](std::string_view k, std::string_view v) -> Result<bool> {
        auto key = decode_key_u64_u32(k);
        REQUIRE(key);
        rows[key->second] = MUST(decode_sums(v));
        return true;
      }));
  return rows;
}

uint64_t map_rows(Pool& pool, LayerId id) {
  uint64_t n = 0;
  auto txn = MUST(pool.index().begin_read());
  REQUIRE_OK(
      txn.scan(Db::kMaps, key_u64(id), [&](std::string_view, std::string_view) -> Result<bool> {
        ++n;
        return true;
      }));
  return n;
}

LayerState state_of(Pool& pool, LayerId id) {
  auto txn = MUST(pool.index().begin_read());
  return MUST(get_layer(txn, id)).state;
}

FsckReport fsck_clean(Pool& pool, bool full = true) {
  auto r = MUST(fsck(pool, full, false));
  for (const auto& p : r.problems) UNSCOPED_INFO(p);
  REQUIRE(r.problems.empty());
  return r;
}

// The snapshot's frozen layer (the container's former delta).
LayerId snapshot(Pool& pool, const std::string& name) {
  auto st = MUST(snapshot_container(pool, "c", name));
  REQUIRE(st.chain[0].state == LayerState::kFrozenUnhashed);
  return st.chain[0].id;
}

// The test points between a hash's transactions (hasher.h).
constexpr const char* kHashPoints[] = {"hash.rows-committed", "hash.all-rows-committed"};

constexpr uint64_t kMiB = 1 << 20;
// Three sums rows (4 MiB each) hold data, and the last group is short (the size is not a
// multiple of 64 KiB).
constexpr uint64_t kDisk = 10 * kMiB + 3 * 512;

// Writes into three sums rows of the container: partial blocks, a hole inside a group, the
// short last group; then zeroes part of one group.
void write_three_rows(DiskFixture& d, uint64_t seed) {
  write_flush(d, 100, 9000, seed);                      // row 0, partial blocks
  write_flush(d, 64 * 1024 + 8192, 4096, seed + 1);     // row 0, a hole before it in the group
  write_flush(d, 5 * kMiB + 77, 200 * 1024, seed + 2);  // row 1, several groups
  write_flush(d, kDisk - 1000, 1000, seed + 3);         // row 2, the short last group
  zero_flush(d, 5 * kMiB + 4096 * 3, 4096 * 2);         // zero blocks inside data groups
}

// write_three_rows, then snapshot s1: its layer.
LayerId three_row_snapshot(DiskFixture& d, uint64_t seed) {
  write_three_rows(d, seed);
  return snapshot(*d.f.pool, "s1");
}

// Two small snapshots of the container, s1 then s2: their layers.
std::pair<LayerId, LayerId> two_snapshots(DiskFixture& d) {
  write_flush(d, 0, 4096, 1);
  const LayerId l1 = snapshot(*d.f.pool, "s1");
  write_flush(d, 4096, 4096, 2);
  return {l1, snapshot(*d.f.pool, "s2")};
}

}  // namespace

TEST_CASE("a snapshot's layer is hashed and fsck --full verifies it", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId l = three_row_snapshot(d, 1);
  const uint64_t image_groups = fsck_clean(pool).groups_verified;
  CHECK(sums_rows(pool, l).empty());

  auto r = MUST(hash_layer(pool, l));
  CHECK(r.outcome == HashResult::Outcome::kHashed);
  CHECK(state_of(pool, l) == LayerState::kFrozen);
  // Groups: 0 and 1 (row 0), 80..83 (row 1: 5 MiB + 77 .. + 200 KiB), the last one (row 2).
  CHECK(r.groups == 2 + 4 + 1);
  const Rows rows = sums_rows(pool, l);
  REQUIRE(rows.size() == 3);
  CHECK(rows.count(0));
  CHECK(rows.count(1));
  CHECK(rows.count(2));
  // Each stored checksum is that of the layer file's bytes in its group (holes read as 0).
  const auto file = test::read_file(pool.layer_path(l, Tier::kSsd));
  REQUIRE(file.size() == kDisk);
  uint64_t nonzero = 0;
  for (const auto& [row, sums] : rows)
    for (size_t i = 0; i < sums.size(); ++i) {
      if (sums[i] == 0) continue;
      ++nonzero;
      const uint64_t off = (uint64_t{row} * kSumsPerRow + i) * kSumGroupBytes;
      const uint64_t len = std::min<uint64_t>(kSumGroupBytes, kDisk - off);
      CHECK(sums[i] == XXH3_64bits(file.data() + off, len));  // (0 never came up)
    }
  CHECK(nonzero == r.groups);
  CHECK(r.bytes == (r.groups - 1) * kSumGroupBytes + (kDisk % kSumGroupBytes));

  auto report = fsck_clean(pool);
  CHECK(report.groups_verified == image_groups + r.groups);
  // Hashing again is nothing to do.
  CHECK(MUST(hash_layer(pool, l)).outcome == HashResult::Outcome::kAlready);
  // The snapshot still reads what was written.
  auto snap = MUST(Disk::open(pool, "c@s1", false));
  check_disk(*snap, d.model);
}

TEST_CASE("fsck --full finds a corrupted byte in a hashed snapshot layer", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId l = three_row_snapshot(d, 2);
  MUST(hash_layer(pool, l));
  fsck_clean(pool);
  const uint64_t at = 5 * kMiB + 77 + 70000;  // inside group 81
  {
    test::Fd fd(::open(pool.layer_path(l, Tier::kSsd).c_str(), O_RDWR | O_CLOEXEC));
    REQUIRE(fd.get() >= 0);
    uint8_t byte = 0;
    REQUIRE(::pread(fd.get(), &byte, 1, at) == 1);
    byte ^= 0x40;
    test::pwrite_all(fd.get(), &byte, 1, at);
  }
  auto r = MUST(fsck(pool, true, false));
  REQUIRE(r.problems.size() == 1);
  CHECK_THAT(r.problems[0], Catch::Contains(fmt::format("layer {}: checksum mismatch at offset {}",
                                                        l, at / kSumGroupBytes * kSumGroupBytes)));
}

TEST_CASE("a flattened copy of an image hashes to the image's own checksums", "[hasher]") {
  // Import hashed the image; flatten copies its data blocks into a new, frozen-unhashed layer
  // at the same offsets. The hasher must write exactly the rows import wrote: the same groups
  // (also with blocks larger than a group), the same bytes, the short last group cut alike.
  for (const uint32_t bs : {4096u, 128u * 1024}) {
    DYNAMIC_SECTION("block size " << bs) {
      const uint64_t size = 9 * kMiB + 5 * 512;
      DiskFixture d(size, size, bs, 21);
      Pool& pool = *d.f.pool;
      MUST(snapshot_container(pool, "c", "empty"));  // a chain of two layers to flatten
      std::vector<uint64_t> drops;
      auto flat = MUST(flatten_container(pool, "c", &drops));
      MUST(finish_drops_after_removal(pool, drops, "test"));
      REQUIRE(flat.chain.size() == 1);
      const LayerId f = flat.chain[0].id;
      REQUIRE(state_of(pool, f) == LayerState::kFrozenUnhashed);
      LayerId image_layer = 0;
      {
        auto txn = MUST(pool.index().begin_read());
        image_layer = MUST(decode_image(*MUST(txn.get(Db::kImages, "base:1")), "base:1")).top_layer;
      }
      auto r = MUST(hash_layer(pool, f));
      CHECK(r.outcome == HashResult::Outcome::kHashed);
      const Rows want = sums_rows(pool, image_layer);
      REQUIRE_FALSE(want.empty());
      CHECK(sums_rows(pool, f) == want);
      fsck_clean(pool);
    }
  }
}

TEST_CASE("a layer dropped while it is hashed keeps no sums rows", "[hasher]") {
  for (const char* point : kHashPoints) {
    DYNAMIC_SECTION("dropped at " << point) {
      DiskFixture d(kMiB, kDisk);
      Pool& pool = *d.f.pool;
      const LayerId l = three_row_snapshot(d, 3);
      int seen = 0;
      pool.set_test_hook([&](std::string_view p) {
        if (p != point || seen++ > 0) return;
        // The container and its snapshot go: the layer's row first, then its rows and file.
        REQUIRE_OK(pool.remove_container("c"));
      });
      HashOptions options;
      options.rows_per_txn = 1;
      auto r = MUST(hash_layer(pool, l, options));
      CHECK(seen == 1);
      CHECK(r.outcome == HashResult::Outcome::kGone);
      CHECK(sums_rows(pool, l).empty());
      CHECK(map_rows(pool, l) == 0);
      fsck_clean(pool);
    }
  }
}

TEST_CASE("a layer merged away while it is hashed keeps no sums rows", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId l = three_row_snapshot(d, 4);
  write_flush(d, 2 * kMiB, 3 * 4096, 9);
  const LayerId k = snapshot(pool, "s2");
  const auto at_s2 = d.model.bytes;
  LayerId merged = 0;
  int seen = 0;
  pool.set_test_hook([&](std::string_view p) {
    if (p != "hash.rows-committed" || seen++ > 0) return;
    // The hasher takes no lock: snapshot rm merges l at once (l and k into a new layer), and
    // only the index re-check keeps the hasher from writing rows for l afterwards.
    auto removed = MUST(remove_snapshot(pool, "c", "s1"));
    CHECK(removed.fate == RemovedSnapshot::Fate::kMerged);
    merged = removed.merged_into;
  });
  HashOptions options;
  options.rows_per_txn = 1;
  auto r = MUST(hash_layer(pool, l, options));
  pool.set_test_hook(nullptr);
  CHECK(r.outcome == HashResult::Outcome::kGone);
  REQUIRE(merged != 0);
  CHECK(sums_rows(pool, l).empty());
  CHECK(sums_rows(pool, k).empty());
  fsck_clean(pool);
  // The merged layer is frozen-unhashed in turn; the next pass hashes it.
  CHECK(state_of(pool, merged) == LayerState::kFrozenUnhashed);
  auto report = MUST(hash_pending(pool));
  REQUIRE(report.hashed.size() == 1);
  CHECK(report.hashed[0].id == merged);
  CHECK(report.still_unhashed == 0);
  CHECK(fsck_clean(pool).groups_verified > 0);
  auto snap = MUST(Disk::open(pool, "c@s2", false));
  require_same(read_all(*snap), at_s2);
}

TEST_CASE("an interrupted hash leaves fsck clean and a rerun completes", "[hasher]") {
  for (const char* point : kHashPoints) {
    DYNAMIC_SECTION("stopped at " << point) {
      DiskFixture d(kMiB, kDisk);
      Pool& pool = *d.f.pool;
      const LayerId l = three_row_snapshot(d, 5);
      StopSignal stop;
      pool.set_test_hook([&](std::string_view p) {
        if (p == point) stop.request_stop();
      });
      HashOptions options;
      options.rows_per_txn = 1;
      options.stop = &stop;
      auto r = MUST(hash_layer(pool, l, options));
      pool.set_test_hook(nullptr);
      CHECK(r.outcome == HashResult::Outcome::kStopped);
      CHECK(state_of(pool, l) == LayerState::kFrozenUnhashed);
      const size_t partial = sums_rows(pool, l).size();
      CHECK(partial == (std::string_view(point) == "hash.rows-committed" ? 1 : 3));
      fsck_clean(pool, false);
      fsck_clean(pool, true);
      CHECK(MUST(count_unhashed(pool)) == 1);

      CHECK(MUST(hash_layer(pool, l)).outcome == HashResult::Outcome::kHashed);
      CHECK(sums_rows(pool, l).size() == 3);
      fsck_clean(pool);
    }
  }
}

TEST_CASE("a hash killed at its failpoints leaves fsck clean and a rerun completes", "[hasher]") {
  for (const char* point : kHashPoints) {
    DYNAMIC_SECTION("killed at " << point) {
      DiskFixture d(kMiB, kDisk);
      const LayerId l = three_row_snapshot(d, 6);
      const std::string root = d.f.root;
      d.f.pool.reset();  // no LMDB env may cross the fork
      test::Child child([&]() -> int {
        ::setenv("LAYER_FAILPOINT", point, 1);
        auto pool = Pool::open(root, Pool::OpenOptions{});
        if (!pool.ok()) return 2;
        HashOptions options;
        options.rows_per_txn = 1;
        return hash_layer(**pool, l, options).ok() ? 0 : 3;
      });
      CHECK(child.wait() == 128 + SIGKILL);
      d.f.reopen();
      Pool& pool = *d.f.pool;
      CHECK(state_of(pool, l) == LayerState::kFrozenUnhashed);
      CHECK_FALSE(sums_rows(pool, l).empty());
      fsck_clean(pool, false);
      fsck_clean(pool, true);
      CHECK(MUST(hash_layer(pool, l)).outcome == HashResult::Outcome::kHashed);
      fsck_clean(pool);
    }
  }
}

TEST_CASE("hash_pending hashes oldest first and skips what it must", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  const auto [l1, l2] = two_snapshots(d);
  const LayerId l3 = snapshot(pool, "s3");  // an empty layer: hashed without reading
  CHECK(MUST(count_unhashed(pool)) == 3);

  // Held shared (a server reads it): skipped with skip_held (what `layer gc` does: the
  // server hashes it itself); the others are hashed, oldest first.
  auto reader = MUST(pool.locks().try_lock(LockKind::kLayer, l2, false, "test"));
  HashOptions gc_options;
  gc_options.skip_held = true;
  auto report = MUST(hash_pending(pool, gc_options));
  REQUIRE(report.hashed.size() == 2);
  CHECK(report.hashed[0].id == l1);
  CHECK(report.hashed[1].id == l3);
  CHECK(report.hashed[1].bytes == 0);
  CHECK(report.held == std::vector<LayerId>{l2});
  CHECK(report.failed.empty());
  CHECK(report.still_unhashed == 1);
  CHECK(report.bytes == report.hashed[0].bytes);
  reader.release();

  // Held exclusively (a merge at work): hashed all the same, without the lock (a merge that
  // retires it meanwhile makes the hasher stop, "gone").
  auto busy = MUST(pool.locks().try_lock(LockKind::kLayer, l2, true, "test"));
  report = MUST(hash_pending(pool));
  REQUIRE(report.hashed.size() == 1);
  CHECK(report.hashed[0].id == l2);
  CHECK(report.held.empty());
  CHECK(report.still_unhashed == 0);
  busy.release();

  // Not frozen-unhashed: an import's layer, a delta, a layer that does not exist.
  CHECK(MUST(hash_layer(pool, 1)).outcome == HashResult::Outcome::kAlready);
  auto info = MUST(pool.inspect("c"));
  REQUIRE_ERRNO(hash_layer(pool, info.container.delta_layer), EINVAL);
  CHECK(MUST(hash_layer(pool, 999)).outcome == HashResult::Outcome::kGone);
  fsck_clean(pool);
}

TEST_CASE("a layer whose file is missing fails alone", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  const auto [l1, l2] = two_snapshots(d);
  REQUIRE(std::filesystem::remove(pool.layer_path(l1, Tier::kSsd)));
  auto report = MUST(hash_pending(pool));
  REQUIRE(report.failed.size() == 1);
  CHECK_THAT(report.failed[0],
             Catch::Contains(fmt::format("layer {}: file", l1)) && Catch::Contains("is missing"));
  REQUIRE(report.hashed.size() == 1);
  CHECK(report.hashed[0].id == l2);
  CHECK(report.still_unhashed == 1);
  CHECK(state_of(pool, l1) == LayerState::kFrozenUnhashed);
}

TEST_CASE("the rate limit paces reads, and a stop wakes a paced hash at once", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 0, 2 * kMiB, 1);  // two reads of 1 MiB
  const LayerId l1 = snapshot(pool, "s1");
  using Clock = std::chrono::steady_clock;
  {
    HashOptions options;
    options.rate_bytes_per_sec = kMiB;  // the second read waits about 0.9 s
    const auto start = Clock::now();
    CHECK(MUST(hash_layer(pool, l1, options)).outcome == HashResult::Outcome::kHashed);
    CHECK(Clock::now() - start >= std::chrono::milliseconds(800));
  }
  write_flush(d, 0, kMiB, 2);
  write_flush(d, 5 * kMiB, 4096, 3);
  const LayerId l2 = snapshot(pool, "s2");
  // At one byte a second, the read of the second row would wait twelve days: only the stop
  // ends it.
  StopSignal stop;
  HashOptions options;
  options.rate_bytes_per_sec = 1;
  options.rows_per_txn = 1;
  options.stop = &stop;
  std::atomic<int> committed{0};
  pool.set_test_hook([&](std::string_view p) {
    if (p == "hash.rows-committed") ++committed;
  });
  Result<HashResult> result = Error{EIO, "not run"};
  std::thread hasher([&] { result = hash_layer(pool, l2, options); });
  // The first row's read goes at once; then the hasher sleeps (or is about to).
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (committed == 0 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(committed == 1);
  const auto asked = Clock::now();
  stop.request_stop();
  hasher.join();
  CHECK(Clock::now() - asked < std::chrono::seconds(30));
  REQUIRE(result.ok());
  CHECK(result->outcome == HashResult::Outcome::kStopped);
  CHECK(state_of(pool, l2) == LayerState::kFrozenUnhashed);
  CHECK(committed == 1);
  pool.set_test_hook(nullptr);
}

TEST_CASE("lower_thread_priority lowers only the calling thread", "[hasher]") {
  constexpr int kIoprioWhoProcess = 1, kIoprioClassIdle = 3, kIoprioClassShift = 13;
  const int nice_before = ::getpriority(PRIO_PROCESS, 0);
  int nice = 0;
  long ioprio = -1;
  Status status;
  std::thread t([&] {
    status = lower_thread_priority();
    nice = ::getpriority(PRIO_PROCESS, 0);
    ioprio = ::syscall(SYS_ioprio_get, kIoprioWhoProcess, 0);
  });
  t.join();
  REQUIRE_OK(status);
  CHECK(nice == 19);
  CHECK(ioprio >> kIoprioClassShift == kIoprioClassIdle);
  CHECK(::getpriority(PRIO_PROCESS, 0) == nice_before);
}

TEST_CASE("the background hasher hashes new snapshots when nudged and stops promptly", "[hasher]") {
  DiskFixture d(kMiB, kDisk);
  Pool& pool = *d.f.pool;
  std::mutex log_mu;
  std::vector<std::string> lines;
  BackgroundHasher::Options options;
  options.interval = std::chrono::hours(1);  // only the first pass and nudges
  options.log = [&](bool error, const std::string& line) {
    std::lock_guard<std::mutex> lk(log_mu);
    lines.push_back((error ? "error: " : "") + line);
  };
  auto hasher = MUST(BackgroundHasher::start(pool, options));
  const LayerId l = three_row_snapshot(d, 7);
  hasher->nudge();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (state_of(pool, l) != LayerState::kFrozen && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(state_of(pool, l) == LayerState::kFrozen);
  fsck_clean(pool);
  // Joined: the pass that hashed the layer has logged it.
  hasher.reset();
  {
    std::lock_guard<std::mutex> lk(log_mu);
    CHECK_THAT(fmt::format("{}", fmt::join(lines, "\n")),
               Catch::Contains(fmt::format("hasher: layer {} hashed", l)));
  }

  // A slow hash in progress (one byte a second) ends when the hasher is destroyed.
  options.hash.rate_bytes_per_sec = 1;
  options.hash.rows_per_txn = 1;
  std::atomic<int> committed{0};
  pool.set_test_hook([&](std::string_view p) {
    if (p == "hash.rows-committed") ++committed;
  });
  write_flush(d, 0, kMiB, 8);
  write_flush(d, 5 * kMiB, 4096, 9);
  const LayerId slow = snapshot(pool, "s2");
  hasher = MUST(BackgroundHasher::start(pool, options));
  // Row 0 is one read, at once; row 1's read would wait twelve days.
  const auto slow_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (committed == 0 && std::chrono::steady_clock::now() < slow_deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(committed == 1);
  hasher.reset();
  pool.set_test_hook(nullptr);
  CHECK(committed == 1);
  CHECK(state_of(pool, slow) == LayerState::kFrozenUnhashed);
  fsck_clean(pool);
}
