// Unit tests for lib/disk.h, checked byte for byte against a plain std::vector<uint8_t> model:
// aligned and unaligned writes, zero/trim/fast zero, extents, range and permission errors,
// clone independence, a seeded model-based random test, concurrent partial writers, DiskTable
// sharing and reconnect races. Durability (power loss, failed syncs, flush order) is in
// disk_durability_test.cc.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <map>
#include <set>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"

using namespace layer;
using namespace disktest;
using test::PoolFixture;

TEST_CASE("Disk reads a fresh clone as the image", "[disk]") {
  DiskFixture d(300 * 4096 + 1024, 300 * 4096 + 1024);
  auto disk = d.open();
  CHECK(disk->name() == "c");
  CHECK(disk->size_bytes() == d.model.size());
  CHECK(disk->block_size() == 4096);
  CHECK(disk->writable());
  check_disk(*disk, d.model);
  // Unaligned reads of every kind of block: data, written zeroes, holes, partial data.
  for (uint64_t off : {0ull, 1ull, 511ull, 4095ull, 4096ull * 3 + 17, 4096ull * 299}) {
    for (uint64_t len : {1ull, 513ull, 4096ull, 3 * 4096ull + 5}) {
      if (off + len <= d.model.size()) check_read(*disk, d.model, off, len);
    }
  }
  check_read(*disk, d.model, d.model.size() - 1, 1);
  // Extents of a fresh clone are the image's data blocks, exactly.
  auto data = data_blocks_of(*disk, 4096);
  for (uint64_t b = 0; b < d.model.blocks(); b++) {
    INFO("block " << b);
    CHECK(data[b] == !d.model.must_be_hole[b]);
  }
  check_extents(*disk, d.model, 0, d.model.size());
  check_extents(*disk, d.model, 1000, 50000);
  check_extents(*disk, d.model, 4096 * 5 + 1, 1);
}

TEST_CASE("Disk aligned and unaligned writes", "[disk]") {
  const uint64_t image_size = 512 * 4096;
  DiskFixture d(image_size, image_size + 4 * (1 << 20) + 1536);  // grown, short last block
  auto disk = d.open();
  Model& m = d.model;
  uint64_t seed = 100;
  struct W {
    uint64_t off, len;
  };
  const std::vector<W> writes = {
      {0, 1},                          // 1 byte into a data block
      {4095, 1},                       // last byte of block 0
      {4096 + 1, 1},                   // 1 byte into written-zeroes block 1
      {2 * 4096 + 100, 1},             // 1 byte into a hole
      {4000, 513},                     // spans blocks 0/1
      {12345, 513},                    // odd offset
      {6 * 4096 - 300, 513},           // spans into block 6
      {8 * 4096, 4096},                // one whole block
      {9 * 4096 + 1, 4096},            // a block's worth, unaligned: two partial blocks
      {20 * 4096 - 7, 3 * 4096 + 14},  // partial, 2 whole, partial
      {1 << 20, 1 << 20},              // a whole MiB, aligned
      {(3 << 20) + 512, 1 << 20},      // a MiB at a sector offset
      {image_size - 100, 300},         // across the image's end
      {image_size + 8192, 4096},       // beyond the image
      {m.size() - 1536, 1536},         // the short last block, whole
      {m.size() - 1, 1},               // the very last byte
      {0, 1},                          // again: now data in the delta
      {4000, 513},
      {8 * 4096 + 10, 20},  // into a block already data in the delta
  };
  for (const W& w : writes) {
    do_write(*disk, m, w.off, pattern(w.len, seed++));
    check_read(*disk, m, w.off >= 8192 ? w.off - 8192 : 0,
               std::min<uint64_t>(w.len + 16384, m.size() - (w.off >= 8192 ? w.off - 8192 : 0)));
  }
  check_disk(*disk, m);
  check_extents(*disk, m, 0, m.size());

  REQUIRE_OK(disk->flush());
  disk.reset();
  disk = d.open();
  check_disk(*disk, m);
  // And after reopening the whole pool.
  disk.reset();
  d.f.reopen();
  disk = d.open();
  check_disk(*disk, m);
  check_extents(*disk, m, 0, m.size());
}

TEST_CASE("Disk zero, trim and fast zero", "[disk]") {
  const uint64_t size = 128 * 4096;
  DiskFixture d(size, size);
  auto disk = d.open();
  Model& m = d.model;
  // Make the delta hold data in blocks 40..59 too.
  do_write(*disk, m, 40 * 4096, pattern(20 * 4096, 1));

  SECTION("whole blocks over image data and over delta data") {
    do_zero(*disk, m, 0, 4 * 4096);
    do_zero(*disk, m, 42 * 4096, 2 * 4096);
    check_disk(*disk, m);
    check_extents(*disk, m, 0, size);
    // A partial write into a zeroed block must not bring back the lower data.
    do_write(*disk, m, 1 * 4096 + 100, pattern(50, 2));
    do_write(*disk, m, 42 * 4096 + 4000, pattern(200, 3));
    check_disk(*disk, m);
  }
  SECTION("partial blocks") {
    do_zero(*disk, m, 100, 1);
    do_zero(*disk, m, 4096 * 3 + 7, 4096);  // spans two blocks, partially
    do_zero(*disk, m, 41 * 4096 + 1, 4094);
    do_zero(*disk, m, 10 * 4096 - 1, 2 * 4096 + 2);  // partial, whole, partial
    check_disk(*disk, m);
    check_extents(*disk, m, 0, size);
  }
  SECTION("trim") {
    do_trim(*disk, m, 4 * 4096, 8 * 4096);
    do_trim(*disk, m, 45 * 4096, 4096);
    do_trim(*disk, m, 50 * 4096 + 512, 1024);  // partial: reads back as zeroes anyway
    do_trim(*disk, m, 60 * 4096 - 5, 10);
    check_disk(*disk, m);
    check_extents(*disk, m, 0, size);
    do_write(*disk, m, 5 * 4096 + 3, pattern(10, 4));
    check_disk(*disk, m);
  }
  SECTION("fast zero: whole blocks only") {
    const auto before = m.bytes;
    for (auto [off, len] : std::vector<std::pair<uint64_t, uint64_t>>{
             {1, 4096}, {0, 4095}, {4096, 4097}, {100, 1}, {40 * 4096 + 512, 4096}, {4095, 2}}) {
      INFO("fast zero " << len << " at " << off);
      auto st = disk->zero(len, off, false, true);
      REQUIRE_FALSE(st.ok());
      CHECK(st.error().code == ENOTSUP);
    }
    // Nothing changed.
    check_disk(*disk, m);
    require_same(m.bytes, before);
    REQUIRE_OK(disk->zero(2 * 4096, 6 * 4096, false, true));
    m.zero(6 * 4096, 2 * 4096);
    REQUIRE_OK(disk->zero(4096, 44 * 4096, false, true));
    m.zero(44 * 4096, 4096);
    check_disk(*disk, m);
    check_extents(*disk, m, 0, size);
  }
  SECTION("fua variants") {
    REQUIRE_OK(disk->zero(4096, 0, true, false));
    m.zero(0, 4096);
    REQUIRE_OK(disk->trim(4096, 4096, true));
    m.zero(4096, 4096);
    const auto data = pattern(700, 5);
    REQUIRE_OK(disk->write(data.data(), data.size(), 3 * 4096 + 1, true));
    m.write(3 * 4096 + 1, data.data(), data.size());
    check_disk(*disk, m);
  }
  // Whatever the section did survives flush and reopen.
  REQUIRE_OK(disk->flush());
  disk.reset();
  disk = d.open();
  check_disk(*disk, m);
  check_extents(*disk, m, 0, size);
}

TEST_CASE("Disk rejects out-of-range requests with EINVAL", "[disk]") {
  const uint64_t size = 64 * 4096;
  DiskFixture d(size, size);
  auto disk = d.open();
  std::vector<uint8_t> buf(8192, 1);
  CHECK_ERRNO(disk->read(buf.data(), 2, size - 1), EINVAL);
  CHECK_ERRNO(disk->read(buf.data(), 1, size), EINVAL);
  CHECK_ERRNO(disk->read(buf.data(), 4096, size + 4096), EINVAL);
  CHECK_ERRNO(disk->read(buf.data(), 16, UINT64_MAX - 8), EINVAL);  // offset + len overflows
  CHECK_ERRNO(disk->write(buf.data(), 2, size - 1, false), EINVAL);
  CHECK_ERRNO(disk->write(buf.data(), 8192, size - 4096, false), EINVAL);
  CHECK_ERRNO(disk->write(buf.data(), 16, UINT64_MAX - 8, false), EINVAL);
  CHECK_ERRNO(disk->zero(4097, size - 4096, false, false), EINVAL);
  CHECK_ERRNO(disk->zero(4096, size, false, true), EINVAL);
  CHECK_ERRNO(disk->trim(1, size, false), EINVAL);
  CHECK_ERRNO(disk->trim(UINT64_MAX, 1, false), EINVAL);
  CHECK_ERRNO(disk->extents(2, size - 1, [](uint64_t, uint64_t, bool) {}), EINVAL);
  CHECK_ERRNO(disk->cache(2, size - 1), EINVAL);
  // Nothing was changed by the refused requests, and the edges themselves work.
  check_disk(*disk, d.model);
  do_write(*disk, d.model, size - 1, {42});
  check_read(*disk, d.model, size - 1, 1);
  REQUIRE_OK(disk->cache(4096, size - 4096));
}

TEST_CASE("a read-only Disk refuses writes with EPERM", "[disk]") {
  const uint64_t size = 32 * 4096;
  DiskFixture d(size, size);
  {
    auto rw = d.open();
    do_write(*rw, d.model, 100, pattern(5000, 1));
    REQUIRE_OK(rw->flush());
  }
  auto ro = d.open("c", false);
  CHECK_FALSE(ro->writable());
  std::vector<uint8_t> buf(4096, 9);
  CHECK_ERRNO(ro->write(buf.data(), buf.size(), 0, false), EPERM);
  CHECK_ERRNO(ro->write(buf.data(), 1, 5, true), EPERM);
  CHECK_ERRNO(ro->zero(4096, 0, false, false), EPERM);
  CHECK_ERRNO(ro->zero(4096, 0, false, true), EPERM);
  CHECK_ERRNO(ro->trim(4096, 4096, false), EPERM);
  check_disk(*ro, d.model);
  check_extents(*ro, d.model, 0, size);
  REQUIRE_OK(ro->flush());
}

TEST_CASE("Disk::open errors and exclusivity", "[disk]") {
  DiskFixture d(16 * 4096, 16 * 4096);
  REQUIRE_ERRNO(Disk::open(*d.f.pool, "nope", true), ENOENT);
  {
    auto disk = d.open();
    // A second writable open in the same process conflicts with the exclusive lock.
    REQUIRE_ERRNO(Disk::open(*d.f.pool, "c", true), EBUSY);
    // The pool sees it as served, and refuses to remove it.
    CHECK(MUST(d.f.pool->inspect("c")).served_by.has_value());
    REQUIRE_ERRNO(d.f.pool->remove_container("c"), EBUSY);
  }
  auto again = d.open();
  CHECK(again->writable());
}

TEST_CASE("two clones of one image stay independent; the image does not change", "[disk]") {
  const uint64_t size = 96 * 4096;
  DiskFixture d(size, size);
  MUST(d.f.pool->clone("base:1", "c2", std::nullopt));
  const ImageInfo img = MUST(list_images(*d.f.pool))[0];
  const std::string image_path = d.f.pool->layer_path(img.layer);
  const auto image_file_before = test::read_file(image_path);

  Model m1 = d.model, m2 = d.model;
  {
    auto a = d.open("c");
    auto b = d.open("c2");
    do_write(*a, m1, 0, pattern(3 * 4096 + 5, 1));
    do_write(*b, m2, 100, pattern(2000, 2));
    do_zero(*a, m1, 10 * 4096, 5 * 4096);
    do_write(*b, m2, 12 * 4096 - 1, pattern(4098, 3));
    do_trim(*b, m2, 30 * 4096, 4096);
    check_disk(*a, m1);
    check_disk(*b, m2);
    check_extents(*a, m1, 0, size);
    check_extents(*b, m2, 0, size);
    REQUIRE_OK(a->flush());
    REQUIRE_OK(b->flush());
  }
  // A third clone made now still reads the original image.
  MUST(d.f.pool->clone("base:1", "c3", std::nullopt));
  auto c = d.open("c3");
  check_disk(*c, d.model);
  CHECK(test::read_file(image_path) == image_file_before);
  auto a = d.open("c");
  check_disk(*a, m1);
  FsckReport rep = MUST(fsck(*d.f.pool, true, false));
  INFO(rep.problems.size() << " problems, first: "
                           << (rep.problems.empty() ? "" : rep.problems[0]));
  CHECK(rep.problems.empty());
  // The delta of c has its data now; inspect counts it as of the last flush.
  ContainerInfo info = MUST(d.f.pool->inspect("c"));
  CHECK(info.delta_data_blocks >= 4);
  // Of the 5 zeroed blocks, those over image data need tombstones; holes may stay absent.
  uint64_t over_data = 0;
  for (uint64_t b = 10; b < 15; b++) over_data += !d.model.must_be_hole[b];
  CHECK(info.delta_zero_blocks >= over_data);
  CHECK(info.delta_zero_blocks <= 5);

  // Removing a container with a delta file removes the file; the others are untouched.
  const std::string delta_path = d.f.pool->layer_path(MUST(d.f.pool->inspect("c2")).chain[0]);
  REQUIRE(std::filesystem::exists(delta_path));
  REQUIRE_OK(d.f.pool->remove_container("c2"));
  CHECK_FALSE(std::filesystem::exists(delta_path));
  check_disk(*a, m1);
  FsckReport after_rm = MUST(fsck(*d.f.pool, true, false));
  INFO("first problem: " << (after_rm.problems.empty() ? "" : after_rm.problems[0]));
  CHECK(after_rm.problems.empty());
}

TEST_CASE("Disk model-based random test", "[disk][random]") {
  const uint64_t seed = test::test_seed("disk random");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const uint32_t bs = GENERATE(4096u, 65536u);
  CAPTURE(bs);
  const uint64_t image_size = bs == 4096 ? 200 * 4096 + 512 : 20 * 65536;
  const uint64_t disk_size = bs == 4096 ? 260 * 4096 + 1536 : 24 * 65536 - 1024;
  DiskFixture d(image_size, disk_size, bs, seed + 1);
  Model& m = d.model;
  auto disk = d.open();

  auto pick_range = [&](uint64_t max_len) -> std::pair<uint64_t, uint64_t> {
    uint64_t len;
    switch (rng() % 6) {
      case 0:
        len = 1 + rng() % 16;
        break;
      case 1:
        len = 512 * (1 + rng() % 16);
        break;
      case 2:
        len = bs * (1 + rng() % 3);
        break;
      default:
        len = 1 + rng() % max_len;
        break;
    }
    len = std::min<uint64_t>(len, m.size());
    uint64_t off = rng() % (m.size() - len + 1);
    if (rng() % 3 == 0) off = off / bs * bs;  // often block aligned
    if (rng() % 4 == 0) len = std::min<uint64_t>(((len + bs - 1) / bs) * bs, m.size() - off);
    if (len == 0) len = 1, off = std::min<uint64_t>(off, m.size() - 1);
    return {off, len};
  };

  const int kOps = 2000;
  int reopens = 0;
  for (int i = 0; i < kOps; i++) {
    const unsigned op = rng() % 100;
    auto [off, len] = pick_range(3 * bs + 1000);
    INFO("op " << i << " kind " << op << " range " << off << "+" << len);
    if (op < 35) {
      const uint64_t data_seed = rng();
      const bool fua = rng() % 50 == 0;
      do_write(*disk, m, off, pattern(len, data_seed), fua);
    } else if (op < 55) {
      check_read(*disk, m, off, len);
    } else if (op < 67) {
      do_zero(*disk, m, off, len);
    } else if (op < 72) {
      auto st = disk->zero(len, off, false, true);
      const bool whole = off % bs == 0 && (off + len) % bs == 0;
      const bool at_end = off % bs == 0 && off + len == m.size();
      if (whole) {
        REQUIRE_OK(st);
        m.zero(off, len);
      } else if (at_end) {
        if (st.ok())
          m.zero(off, len);
        else
          CHECK(st.error().code == ENOTSUP);
      } else {
        REQUIRE_FALSE(st.ok());
        REQUIRE(st.error().code == ENOTSUP);
      }
    } else if (op < 80) {
      do_trim(*disk, m, off, len);
    } else if (op < 97) {
      auto [eoff, elen] = pick_range(m.size());
      check_extents(*disk, m, eoff, elen);
    } else if (op < 99 || rng() % 2 == 0) {
      REQUIRE_OK(disk->flush());
    } else {
      REQUIRE_OK(disk->flush());
      disk.reset();
      disk = d.open();
      reopens++;
      check_disk(*disk, m);
    }
  }
  check_disk(*disk, m);
  check_extents(*disk, m, 0, m.size());
  REQUIRE_OK(disk->flush());
  disk.reset();
  d.f.reopen();
  disk = d.open();
  check_disk(*disk, m);
  check_extents(*disk, m, 0, m.size());
  CHECK(reopens > 0);
  disk.reset();
  FsckReport rep = MUST(fsck(*d.f.pool, true, false));
  INFO(rep.problems.size() << " problems, first: "
                           << (rep.problems.empty() ? "" : rep.problems[0]));
  CHECK(rep.problems.empty());
}

TEST_CASE("concurrent partial writers to shared blocks", "[disk][threads]") {
  const uint64_t seed = test::test_seed("disk concurrent");
  CAPTURE(seed);
  constexpr int kThreads = 8;
  constexpr uint32_t kSlice = 4096 / kThreads;  // thread t owns bytes [t*512, t*512+512) of a block
  constexpr uint64_t kShared = 64;              // blocks 0..63: every thread writes in each
  constexpr uint64_t kOwned = 64;               // blocks 64..127: block b belongs to thread b%8
  const uint64_t size = (kShared + kOwned) * 4096;

  for (int round = 0; round < 3; round++) {
    INFO("round " << round);
    DiskFixture d(size, size, 4096, seed + round);
    auto disk = d.open();
    // Each thread updates only its own bytes of d.model; the bytes never overlap.
    std::vector<uint8_t>& want = d.model.bytes;
    std::atomic<int> failures{0};
    std::barrier start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; t++) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(seed * 1000 + round * 100 + t);
        start.arrive_and_wait();
        for (int pass = 0; pass < 6; pass++) {
          // Everyone walks the shared blocks in the same order, so they meet in each block,
          // often on its first touch (copy-up).
          for (uint64_t b = 0; b < kShared; b++) {
            const uint64_t slice = b * 4096 + t * kSlice;
            const uint64_t sub = rng() % kSlice;
            const uint64_t len = 1 + rng() % (kSlice - sub);
            const uint64_t off = slice + sub;
            if (rng() % 4 == 0) {
              if (!disk->zero(len, off, false, false).ok()) failures++;
              std::fill(want.begin() + static_cast<long>(off),
                        want.begin() + static_cast<long>(off + len), 0);
            } else {
              auto data = pattern(len, rng());
              if (!disk->write(data.data(), len, off, false).ok()) failures++;
              std::copy(data.begin(), data.end(), want.begin() + static_cast<long>(off));
            }
          }
          // Whole-block work on this thread's own blocks, racing the others' copy-ups.
          for (uint64_t b = kShared + t; b < kShared + kOwned; b += kThreads) {
            const uint64_t off = b * 4096;
            switch (rng() % 3) {
              case 0: {
                auto data = pattern(4096, rng());
                if (!disk->write(data.data(), 4096, off, false).ok()) failures++;
                std::copy(data.begin(), data.end(), want.begin() + static_cast<long>(off));
                break;
              }
              case 1:
                if (!disk->zero(4096, off, false, false).ok()) failures++;
                std::fill(want.begin() + static_cast<long>(off),
                          want.begin() + static_cast<long>(off + 4096), 0);
                break;
              default:
                if (!disk->trim(4096, off, false).ok()) failures++;
                std::fill(want.begin() + static_cast<long>(off),
                          want.begin() + static_cast<long>(off + 4096), 0);
                break;
            }
          }
          if (t == 0 && !disk->flush().ok()) failures++;
        }
      });
    }
    for (auto& th : threads) th.join();
    REQUIRE(failures == 0);
    check_disk(*disk, d.model);
    REQUIRE_OK(disk->flush());
    disk.reset();
    disk = d.open();
    check_disk(*disk, d.model);
  }
}

TEST_CASE("concurrent reads, writes and flushes on one disk", "[disk][threads]") {
  // Readers check blocks no writer touches while writers hammer their own blocks and flush.
  const uint64_t size = 64 * 4096;
  DiskFixture d(size, size, 4096, 21);
  auto disk = d.open();
  const std::vector<uint8_t> stable = d.model.bytes;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 300; i++) {
        if (t < 2) {
          // Writers: blocks 0..31, thread t's are even/odd.
          const uint64_t b = 2 * (rng() % 16) + t;
          const uint64_t len = 1 + rng() % 4096;
          auto data = pattern(len, rng());
          const uint64_t off = b * 4096 + rng() % (4096 - data.size() + 1);
          if (!disk->write(data.data(), data.size(), off, false).ok()) failures++;
          if (i % 50 == 0 && !disk->flush().ok()) failures++;
        } else {
          // Readers: blocks 32..63 never change.
          const uint64_t off = 32 * 4096 + rng() % (32 * 4096 - 8192);
          std::vector<uint8_t> buf(1 + rng() % 8192);
          if (!disk->read(buf.data(), buf.size(), off).ok())
            failures++;
          else if (!std::equal(buf.begin(), buf.end(), stable.begin() + static_cast<long>(off)))
            failures++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
}

TEST_CASE("DiskTable shares one Disk per container and flushes on the last release", "[disk]") {
  const uint64_t size = 32 * 4096;
  DiskFixture d(size, size, 4096, 51);
  FaultInjectingStore* faults = install_store<FaultInjectingStore>(*d.f.pool);
  Model m = d.model;
  {
    DiskTable table(*d.f.pool);
    auto a = MUST(table.acquire("c", true));
    auto b = MUST(table.acquire("c", true));
    CHECK(a.get() == b.get());
    REQUIRE_ERRNO(table.acquire("nope", true), ENOENT);
    do_write(*a, m, 100, pattern(9000, 1));
    REQUIRE_OK(table.release(b));
    b.reset();
    check_disk(*a, m);
    do_write(*a, m, 20 * 4096, pattern(4096, 2));
    REQUIRE_OK(table.release(a));
  }
  // The last release flushed: a power loss now loses nothing.
  faults->simulate_power_loss(false, 2);
  auto disk = d.open();
  check_disk(*disk, m);
}

TEST_CASE("DiskTable: an acquire racing the last release never finds the container locked",
          "[disk][disktable]") {
  // nbdkit opens a new connection while the previous one's close is still flushing: the
  // acquire must get the closing Disk back (or a fresh one once it is gone), never EBUSY from
  // the Disk that is going away.
  const uint64_t size = 64 * 4096;
  DiskFixture d(size, size, 4096, 77);
  DiskTable table(*d.f.pool);
  std::atomic<int> failures{0};
  std::string first_error;
  std::mutex mu;
  auto worker = [&](int t) {
    std::vector<uint8_t> buf(4096 + 100, static_cast<uint8_t>(t + 1));
    for (int round = 0; round < 400; ++round) {
      auto disk = table.acquire("c", true);
      if (!disk.ok()) {
        std::lock_guard<std::mutex> lk(mu);
        if (failures++ == 0) first_error = disk.error().message;
        continue;
      }
      // Unflushed data makes the last release run a flush round outside the table's lock.
      (void)(*disk)->write(buf.data(), buf.size(), uint64_t(t) * 3 * 4096 + 50, false);
      (void)table.release(std::move(*disk));
    }
  };
  std::vector<std::thread> threads;
  // Two threads: the last release (users falling to 0) happens often.
  for (int t = 0; t < 2; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  INFO("first failure: " << first_error);
  CHECK(failures.load() == 0);
  // Everything was released: the container is free for anyone, including another table.
  DiskTable other(*d.f.pool);
  auto again = MUST(other.acquire("c", true));
  std::vector<uint8_t> got(4096 + 100);
  REQUIRE_OK(again->read(got.data(), got.size(), 50));
  CHECK(got == std::vector<uint8_t>(got.size(), 1));
  REQUIRE_OK(other.release(std::move(again)));
}

TEST_CASE("a container served by another process is EBUSY naming it", "[disk][locks]") {
  DiskFixture d(16 * 4096, 16 * 4096);
  const std::string root = d.f.root;
  d.f.pool.reset();  // no LMDB env may cross the fork

  test::Pipe ready, done;
  test::Child child([&]() -> int {
    done.write_end.reset();
    auto pool = Pool::open(root, Pool::OpenOptions{});
    if (!pool.ok()) return 2;
    auto disk = Disk::open(**pool, "c", true);
    if (!disk.ok()) return 3;
    test::write_byte(ready.write_end.get());
    test::read_byte(done.read_end.get());
    return 0;
  });
  ready.write_end.reset();
  done.read_end.reset();
  REQUIRE(test::read_byte(ready.read_end.get()));

  d.f.reopen();
  const std::string holder = "pid " + std::to_string(child.pid());
  auto busy = Disk::open(*d.f.pool, "c", true);
  REQUIRE_FALSE(busy.ok());
  CHECK(busy.error().code == EBUSY);
  CHECK_THAT(busy.error().message, Catch::Contains(holder));
  REQUIRE_ERRNO(Disk::open(*d.f.pool, "c", false), EBUSY);
  CHECK(MUST(d.f.pool->inspect("c")).served_by == holder);
  REQUIRE_ERRNO(d.f.pool->remove_container("c"), EBUSY);

  done.write_end.reset();
  REQUIRE(child.wait() == 0);
  auto disk = d.open();
  check_disk(*disk, d.model);
  // Now this process is the one serving it.
  CHECK(MUST(d.f.pool->inspect("c")).served_by == "pid " + std::to_string(::getpid()));
}

TEST_CASE("a writable Disk on a read-only pool refuses writes instead of crashing", "[disk]") {
  // Run in a child process: a crash there fails this test instead of killing the runner.
  DiskFixture d(16 * 4096, 16 * 4096);
  const std::string root = d.f.root;
  d.f.pool.reset();  // no LMDB env may cross the fork
  test::Child child([&]() -> int {
    Pool::OpenOptions ro;
    ro.read_only = true;
    auto pool = Pool::open(root, ro);
    if (!pool.ok()) return 10;
    auto disk = Disk::open(**pool, "c", true);
    if (!disk.ok()) return 0;  // refused at open: fine
    std::vector<uint8_t> buf(4096, 7);
    if (!(*disk)->write(buf.data(), buf.size(), 0, false).ok()) return 0;
    if (!(*disk)->flush().ok()) return 0;
    return 1;  // wrote and "flushed" through a pool opened read-only
  });
  const int rc = child.wait();
  INFO("child exit status " << rc << " (0: refused cleanly, 1: wrote, >128: killed by signal "
                            << (rc > 128 ? rc - 128 : 0) << ")");
  CHECK(rc == 0);
}

TEST_CASE("disks on one image share one handle of its layer file", "[disk]") {
  DiskFixture d(16 * 4096, 16 * 4096);
  MUST(d.f.pool->clone("base:1", "c2", std::nullopt));
  auto info = MUST(d.f.pool->inspect("c"));
  const LayerRecord& image_layer = info.chain[1];
  auto one = d.open("c");
  auto two = d.open("c2");
  std::vector<uint8_t> buf(4096);
  REQUIRE_OK(one->read(buf.data(), buf.size(), 0));
  REQUIRE_OK(two->read(buf.data(), buf.size(), 0));
  auto a = MUST(d.f.pool->open_frozen(image_layer));
  auto b = MUST(d.f.pool->open_frozen(image_layer));
  CHECK(a.get() == b.get());
  // The two disks and a, b: one handle, used four times.
  CHECK(a.use_count() == 4);
}

TEST_CASE("quiesce: everything written before is committed, and no write runs inside it",
          "[disk][threads]") {
  DiskFixture d(16 * 4096, 16 * 4096);
  auto disk = d.open();
  Model m = d.model;
  do_write(*disk, m, 2 * 4096, pattern(4096, 1));
  do_write(*disk, m, 5 * 4096 + 7, pattern(30, 2));
  const LayerId delta = MUST(d.f.pool->inspect("c")).container.delta_layer;
  std::atomic<bool> late_done{false};
  std::thread late;
  const auto late_data = pattern(4096, 3);
  Status late_status;
  REQUIRE_OK(disk->quiesce([&]() -> Status {
    // Flushed before the gate closed behind it.
    CHECK(MUST(committed_data_blocks(*d.f.pool, delta)) == std::vector<uint64_t>{2, 5});
    late = std::thread([&] {
      late_status = disk->write(late_data.data(), late_data.size(), 9 * 4096, false);
      late_done = true;
    });
    // A write that started now would be done in microseconds; it must wait for the gate.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    CHECK_FALSE(late_done);
    return {};
  }));
  late.join();
  REQUIRE_OK(late_status);
  m.write(9 * 4096, late_data.data(), late_data.size());
  check_disk(*disk, m);
}
