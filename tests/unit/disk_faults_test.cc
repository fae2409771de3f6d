// Fault and interleaving tests for lib/disk.h: a flush queued behind a failed fdatasync, a copy-up
// racing a trim, missing and short layer files, exceptions inside a flush round, a failed
// directory fsync after a layer file's rename, a failed index commit (injected, and a real full
// LMDB map). Interleavings are forced with Disk's and
// FaultInjectingStore's test hooks, not with sleeps.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"

using namespace layer;
using namespace disktest;

namespace {

// Installs a FaultInjectingStore into the fixture's pool; returns it (owned by the pool).
FaultInjectingStore* install_faults(DiskFixture& d) {
  FaultInjectingStore* faults = install_store<FaultInjectingStore>(*d.f.pool);
  return faults;
}

std::string delta_path(Pool& pool, const std::string& container) {
  auto info = MUST(pool.inspect(container));
  return pool.layer_path(info.chain[0]);
}

}  // namespace

TEST_CASE("a flush queued behind a failed fdatasync fails too and syncs nothing",
          "[disk][faults][powerloss]") {
  // F1 leads a round whose fdatasync fails; F2 asked for a flush while that round ran, so its
  // ticket is above the round's. Linux reports a writeback error once and marks the pages
  // clean, so a second fdatasync would succeed and F2 would commit rows naming lost data.
  const uint64_t size = 32 * 4096;
  DiskFixture d(size, size, 4096, 43);
  FaultInjectingStore* faults = install_faults(d);
  auto disk = d.open();
  Model m = d.model;
  do_write(*disk, m, 0, pattern(4096, 1));
  REQUIRE_OK(disk->flush());
  const Model flushed = m;
  std::vector<uint8_t> lost = pattern(4096, 2);
  REQUIRE_OK(disk->write(lost.data(), lost.size(), 3 * 4096, false));

  std::atomic<bool> second_waiting{false};
  disk->set_test_hook([&](std::string_view point) {
    if (point == "flush.wait") second_waiting = true;
  });
  std::atomic<int> syncs{0};
  std::thread second;
  Status second_status;
  faults->on_sync = [&] {
    if (syncs++ != 0) return;
    // F1 is in its round: queue F2 behind it, then let F1's sync fail.
    second = std::thread([&] { second_status = disk->flush(); });
    while (!second_waiting) std::this_thread::yield();
  };
  faults->fail_next_syncs(1);
  Status first = disk->flush();
  second.join();
  faults->on_sync = nullptr;
  disk->set_test_hook(nullptr);
  CHECK_ERRNO(first, EIO);
  CHECK_ERRNO(second_status, EIO);
  CHECK(syncs == 1);

  // The failed sync lost the unsynced write; nothing may name it.
  disk.reset();
  faults->simulate_power_loss(false, 1);
  disk = d.open();
  check_disk(*disk, flushed);
  disk.reset();
  FsckReport rep = MUST(fsck(*d.f.pool, true, false));
  CHECK(rep.problems.empty());
}

TEST_CASE("a failed sync in the fault store loses the unsynced writes and the next sync works",
          "[disk][faults]") {
  test::TempDir tmp;
  FaultInjectingStore store(tmp.path());
  auto file = MUST(store.create(1, 8192));
  std::vector<uint8_t> a(4096, 0xAA), b(4096, 0xBB), got(4096);
  REQUIRE_OK(file->write(a.data(), a.size(), 0));
  REQUIRE_OK(file->sync());
  REQUIRE_OK(file->write(b.data(), b.size(), 0));
  REQUIRE_OK(file->write(b.data(), b.size(), 4096));
  store.fail_next_syncs(1);
  CHECK_ERRNO(file->sync(), EIO);
  REQUIRE_OK(file->read(got.data(), got.size(), 0));
  CHECK(got == a);
  REQUIRE_OK(file->read(got.data(), got.size(), 4096));
  CHECK(test::all_zero(got.data(), got.size()));
  REQUIRE_OK(file->sync());
}

TEST_CASE("the fault store keeps the undo record of a write that completes after a sync began",
          "[disk][faults]") {
  test::TempDir tmp;
  FaultInjectingStore store(tmp.path());
  auto file = MUST(store.create(1, 4096));
  std::vector<uint8_t> a(4096, 0xAA), got(4096);
  // The write saves its undo record, then the sync starts and finishes, then the write's
  // pwrite lands: the sync did not cover it, so a power loss must undo it.
  std::atomic<bool> in_write{false};
  store.on_write_saved = [&] {
    in_write = true;
    REQUIRE_OK(file->sync());
  };
  REQUIRE_OK(file->write(a.data(), a.size(), 0));
  store.on_write_saved = nullptr;
  CHECK(in_write);
  store.simulate_power_loss(false, 1);
  REQUIRE_OK(file->read(got.data(), got.size(), 0));
  CHECK(test::all_zero(got.data(), got.size()));
}

TEST_CASE("a partial write always holds its edge block's stripe, even when the block was data",
          "[disk][faults][threads]") {
  // Writer A spans blocks 15 (data: no stripe chosen before the fix) and 16 (not data: the slow
  // path); they are in different stripe groups (Disk::kStripeBlocks = 16). A trim turns block 15
  // into a tombstone before A re-checks, so A copies it up; meanwhile writer C copies up the same
  // block. Without A holding the stripe, C's bytes are overwritten by A's copy.
  const uint64_t size = 32 * 4096;
  DiskFixture d(size, size, 4096, 47);
  auto disk = d.open();
  Model m = d.model;
  do_write(*disk, m, 15 * 4096, pattern(4096, 3));
  REQUIRE_OK(disk->flush());

  const auto a_id = std::this_thread::get_id();
  std::mutex mu;
  std::condition_variable cv;
  bool c_done = false;
  std::thread c;
  const std::vector<uint8_t> x = pattern(4096, 4), y = pattern(50, 5);
  Status c_status;
  disk->set_test_hook([&](std::string_view point) {
    if (std::this_thread::get_id() != a_id) return;
    if (point == "write.stripes_chosen") {
      REQUIRE_OK(disk->trim(4096, 15 * 4096, false));
    } else if (point == "write.copy_up_read" && !c.joinable()) {
      c = std::thread([&] {
        c_status = disk->write(y.data(), y.size(), 15 * 4096 + 20, false);
        std::lock_guard<std::mutex> lk(mu);
        c_done = true;
        cv.notify_all();
      });
      // With A holding the stripe, C waits for A; give a broken C every chance to finish.
      std::unique_lock<std::mutex> lk(mu);
      cv.wait_for(lk, std::chrono::milliseconds(300), [&] { return c_done; });
    }
  });
  REQUIRE_OK(disk->write(x.data(), x.size(), 15 * 4096 + 100, false));
  REQUIRE(c.joinable());
  c.join();
  disk->set_test_hook(nullptr);
  REQUIRE_OK(c_status);
  m.zero(15 * 4096, 4096);
  m.write(15 * 4096 + 100, x.data(), x.size());
  m.write(15 * 4096 + 20, y.data(), y.size());
  check_read(*disk, m, 15 * 4096, 2 * 4096);
}

TEST_CASE("a delta whose file is missing fails with EIO instead of reading zeroes",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 53);
  {
    auto disk = d.open();
    auto data = pattern(4096, 6);
    REQUIRE_OK(disk->write(data.data(), data.size(), 2 * 4096, false));
    REQUIRE_OK(disk->flush());
  }
  const std::string path = delta_path(*d.f.pool, "c");
  REQUIRE(std::filesystem::remove(path));
  auto disk = d.open();
  std::vector<uint8_t> buf(4096);
  auto r = disk->read(buf.data(), buf.size(), 0);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EIO);
  CHECK(r.error().message.find(path) != std::string::npos);
  CHECK_ERRNO(disk->write(buf.data(), 10, 7 * 4096 + 5, false), EIO);
  CHECK_FALSE(std::filesystem::exists(path));  // not silently recreated empty
}

TEST_CASE("a delta holding only tombstones may still create its file on first write",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 59);
  Model m = d.model;
  {
    auto disk = d.open();
    do_zero(*disk, m, 0, 4096);
    REQUIRE_OK(disk->flush());
  }
  auto disk = d.open();
  do_write(*disk, m, 3 * 4096 + 7, pattern(99, 7));
  REQUIRE_OK(disk->flush());
  check_disk(*disk, m);
}

TEST_CASE("a short layer file fails the load with EIO naming layer, file and sizes",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 61);
  auto info = MUST(d.f.pool->inspect("c"));
  const std::string image_path = d.f.pool->layer_path(info.chain[1]);
  SECTION("an image layer") {
    std::filesystem::resize_file(image_path, 4 * 4096);
    auto disk = d.open();
    std::vector<uint8_t> buf(4096);
    auto r = disk->read(buf.data(), buf.size(), 12 * 4096);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
    INFO(r.error().message);
    CHECK(r.error().message.find(image_path) != std::string::npos);
    CHECK(r.error().message.find(fmt::format("layer {}", info.chain[1].id)) != std::string::npos);
    CHECK(r.error().message.find("16384") != std::string::npos);
    CHECK(r.error().message.find(std::to_string(size)) != std::string::npos);
  }
  SECTION("the delta") {
    {
      auto disk = d.open();
      auto data = pattern(4096, 8);
      REQUIRE_OK(disk->write(data.data(), data.size(), 14 * 4096, false));
      REQUIRE_OK(disk->flush());
    }
    const std::string path = delta_path(*d.f.pool, "c");
    std::filesystem::resize_file(path, 8 * 4096);
    auto disk = d.open();
    std::vector<uint8_t> buf(4096);
    auto r = disk->read(buf.data(), buf.size(), 14 * 4096);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
    CHECK(r.error().message.find(path) != std::string::npos);
  }
}

TEST_CASE("an exception inside a flush round fails that flush only and loses no dirty row",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 67);
  auto disk = d.open();
  Model m = d.model;
  do_write(*disk, m, 4096, pattern(4096, 9));
  int throws = 1;
  disk->set_test_hook([&](std::string_view point) {
    if (point == "flush.rows_taken" && throws-- > 0) throw std::bad_alloc();
  });
  CHECK_ERRNO(disk->flush(), ENOMEM);
  // The round flag was restored (this would hang otherwise) and the rows are dirty again.
  REQUIRE_OK(disk->flush());
  disk->set_test_hook(nullptr);
  auto blocks =
      MUST(committed_data_blocks(*d.f.pool, MUST(d.f.pool->inspect("c")).container.delta_layer));
  CHECK(blocks == std::vector<uint64_t>{1});
  disk.reset();
  disk = d.open();
  check_disk(*disk, m);
}

TEST_CASE("a failed directory fsync after creating the delta's file does not block later writes",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 71);
  FaultInjectingStore* faults = install_faults(d);
  auto disk = d.open();
  Model m = d.model;
  faults->fail_next_dir_syncs(10);  // more than any retry
  auto data = pattern(4096, 10);
  CHECK_ERRNO(disk->write(data.data(), data.size(), 0, false), EIO);
  faults->fail_next_dir_syncs(0);
  do_write(*disk, m, 4096, pattern(4096, 11));
  do_write(*disk, m, 2 * 4096 + 3, pattern(10, 12));
  REQUIRE_OK(disk->flush());
  disk.reset();
  faults->simulate_power_loss(false, 2);
  disk = d.open();
  check_disk(*disk, m);
  disk.reset();
  FsckReport rep = MUST(fsck(*d.f.pool, false, false));
  CHECK(rep.problems.empty());
}

TEST_CASE("opening a writable delta whose file exists syncs its directory entry",
          "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 73);
  {
    auto disk = d.open();
    auto data = pattern(4096, 13);
    REQUIRE_OK(disk->write(data.data(), data.size(), 0, false));
    REQUIRE_OK(disk->flush());
  }
  FaultInjectingStore* faults = install_faults(d);
  const int before = faults->dir_syncs();
  auto disk = d.open();
  std::vector<uint8_t> buf(4096);
  REQUIRE_OK(disk->read(buf.data(), buf.size(), 0));
  CHECK(faults->dir_syncs() == before + 1);
}

TEST_CASE("a failed index commit leaves the rows dirty for the next flush", "[disk][faults]") {
  const uint64_t size = 16 * 4096;
  DiskFixture d(size, size, 4096, 79);
  FaultInjectingStore* faults = install_faults(d);
  auto disk = d.open();
  Model m = d.model;
  do_write(*disk, m, 4096, pattern(4096, 14));
  do_write(*disk, m, 9 * 4096 + 10, pattern(100, 15));
  d.f.pool->committer().fail_next_commits(1,
                                          Error{ENOSPC, "index: commit: MDB_MAP_FULL (injected)"});
  CHECK_ERRNO(disk->flush(), ENOSPC);
  const LayerId delta = MUST(d.f.pool->inspect("c")).container.delta_layer;
  CHECK(MUST(committed_data_blocks(*d.f.pool, delta)).empty());
  // Not broken: the data was synced; only the index did not take the rows.
  do_write(*disk, m, 12 * 4096, pattern(4096, 16));
  REQUIRE_OK(disk->flush());
  CHECK(MUST(committed_data_blocks(*d.f.pool, delta)) == std::vector<uint64_t>{1, 9, 12});
  disk.reset();
  faults->simulate_power_loss(false, 3);
  disk = d.open();
  check_disk(*disk, m);
}

TEST_CASE("a full index map fails the flush with ENOSPC; the grown map takes the same rows",
          "[disk][faults][mapfull]") {
  // Real LMDB, no injected error: the pool is reopened with a map no larger than what the
  // index holds, so the flush round's transaction meets MDB_MAP_FULL.
  const uint64_t chunk_bytes = uint64_t{kBlocksPerChunk} * 4096;  // one `maps` row per 16 MiB
  const uint32_t chunks = 300;                                    // about 150 pages of rows
  test::PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 83);
  MUST(f.pool->clone("base:1", "c", chunks * chunk_bytes));
  const uint64_t index_bytes = std::filesystem::file_size(f.root + "/index/data.mdb");
  f.pool.reset();
  f.pool = MUST(Pool::open(
      f.root, Pool::OpenOptions{.index_map_bytes = index_bytes, .index_max_map_bytes = 64 << 20}));
  FaultInjectingStore* faults = install_store<FaultInjectingStore>(*f.pool);
  const LayerId delta = MUST(f.pool->inspect("c")).container.delta_layer;
  auto disk = MUST(Disk::open(*f.pool, "c", true));
  // Block 1 of every chunk, and what it holds.
  std::map<uint64_t, std::vector<uint8_t>> want;
  for (uint32_t c = 0; c < chunks; ++c) {
    const uint64_t block = uint64_t{c} * kBlocksPerChunk + 1;
    want[block] = pattern(4096, 100 + c);
    REQUIRE_OK(disk->write(want[block].data(), 4096, block * 4096, false));
  }

  int failures = 0;
  for (;;) {
    Status s = disk->flush();
    if (s.ok()) break;
    INFO(s.error().message);
    REQUIRE(s.error().code == ENOSPC);
    CHECK(s.error().message.find("MDB_MAP_FULL") != std::string::npos);
    // Nothing committed, nothing damaged: the index reads through, fsck finds it consistent.
    CHECK(MUST(committed_data_blocks(*f.pool, delta)).empty());
    MUST(f.pool->index().walk());
    CHECK(MUST(fsck(*f.pool, false, false)).problems.empty());
    // The disk goes on serving and taking writes between the attempts.
    require_same(read_range(*disk, 4096, 4096), want[1], 4096);
    const uint64_t extra = 2 + static_cast<uint64_t>(failures);
    want[extra] = pattern(4096, 900 + failures);
    REQUIRE_OK(disk->write(want[extra].data(), 4096, extra * 4096, false));
    REQUIRE(++failures < 10);
  }
  CHECK(failures >= 1);
  CHECK(f.pool->index().map_grows() == static_cast<uint64_t>(failures));
  std::vector<uint64_t> blocks;
  for (const auto& [block, data] : want) blocks.push_back(block);
  CHECK(MUST(committed_data_blocks(*f.pool, delta)) == blocks);

  // Everything the flush acknowledged survives a power loss.
  disk.reset();
  faults->simulate_power_loss(false, 7);
  f.reopen();
  disk = MUST(Disk::open(*f.pool, "c", false));
  for (const auto& [block, data] : want) {
    INFO("block " << block);
    require_same(read_range(*disk, block * 4096, 4096), data, block * 4096);
  }
  disk.reset();
  CHECK(MUST(fsck(*f.pool, false, false)).problems.empty());
}
