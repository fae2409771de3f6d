// boot_profile_test.cc — boot profiles (lib/boot_profile.h): coalescing and capping ranges, the
// row's encoding and merging, a session's recording and window, and the service with a real
// pool and real disks: a fresh clone's reads become the image's profile, the next fresh
// clone's first read prefetches it, a written container records nothing.
#include "boot_profile.h"

#include <condition_variable>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "disk.h"
#include "images.h"
#include "test_util.h"

using namespace layer;
using namespace std::chrono_literals;

namespace {

BootRanges R(std::initializer_list<std::pair<uint64_t, uint64_t>> list) {
  BootRanges out;
  for (const auto& [o, l] : list) out.push_back({o, l});
  return out;
}

// The service's events, waited for.
struct Events {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<BootEvent> seen;
  void add(const BootEvent& e) {
    std::lock_guard<std::mutex> lk(mu);
    seen.push_back(e);
    cv.notify_all();
  }
  // The first event of `kind` for `container`, waiting up to 10 s.
  std::optional<BootEvent> wait(BootEvent::Kind kind, const std::string& container) {
    std::unique_lock<std::mutex> lk(mu);
    std::optional<BootEvent> found;
    cv.wait_for(lk, 10s, [&] {
      for (const auto& e : seen)
        if (e.kind == kind && e.container == container) found = e;
      return found.has_value();
    });
    return found;
  }
  size_t count(BootEvent::Kind kind, const std::string& container) {
    std::lock_guard<std::mutex> lk(mu);
    size_t n = 0;
    for (const auto& e : seen) n += e.kind == kind && e.container == container ? 1 : 0;
    return n;
  }
};

// Imports `size` bytes of pseudo-random data (no zero block: every block is data) as `ref`.
std::vector<uint8_t> import_random(test::PoolFixture& f, const std::string& ref, uint64_t size) {
  std::vector<uint8_t> content(size);
  std::mt19937_64 rng(42);
  for (auto& b : content) b = static_cast<uint8_t>(rng() | 1);
  const std::string file = f.tmp.sub("random.raw");
  {
    std::ofstream out(file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(content.data()), static_cast<std::streamsize>(size));
  }
  MUST(import_image(*f.pool, ref, file, 4096, nullptr));
  return content;
}

}  // namespace

TEST_CASE("coalesce_ranges sorts, merges overlapping and adjacent ranges, drops empty ones") {
  CHECK(coalesce_ranges({}).empty());
  CHECK(coalesce_ranges(R({{8192, 4096}, {0, 4096}, {4096, 100}, {5000, 0}, {100, 50}})) ==
        R({{0, 4196}, {8192, 4096}}));
  CHECK(coalesce_ranges(R({{0, 10000}, {4096, 4096}})) == R({{0, 10000}}));
  CHECK(coalesce_ranges(R({{10, 5}, {15, 5}, {21, 1}})) == R({{10, 10}, {21, 1}}));
}

TEST_CASE("cap_ranges merges across the smallest gaps first") {
  // Gaps: 10, 1000, 5, 200.
  const auto r = R({{0, 10}, {20, 10}, {1030, 10}, {1045, 10}, {1255, 10}});
  CHECK(cap_ranges(r, 5) == r);
  CHECK(cap_ranges(r, 4) == R({{0, 10}, {20, 10}, {1030, 25}, {1255, 10}}));
  CHECK(cap_ranges(r, 3) == R({{0, 30}, {1030, 25}, {1255, 10}}));
  CHECK(cap_ranges(r, 2) == R({{0, 30}, {1030, 235}}));
  CHECK(cap_ranges(r, 1) == R({{0, 1265}}));
  CHECK(cap_ranges(r, 0) == R({{0, 1265}}));  // at least one
  // Equal gaps: exactly as many merges as needed.
  BootRanges even;
  for (uint64_t i = 0; i < 100; ++i) even.push_back({i * 20, 10});
  const auto capped = cap_ranges(even, 37);
  CHECK(capped.size() == 37);
  CHECK(capped.front().offset == 0);
  CHECK(capped.back().offset + capped.back().length == 99 * 20 + 10);
  // Every byte of the input stays covered.
  for (const auto& x : even) {
    bool covered = false;
    for (const auto& c : capped)
      covered = covered || (c.offset <= x.offset && x.offset + x.length <= c.offset + c.length);
    CHECK(covered);
  }
}

TEST_CASE("a profile row round-trips and a damaged one is refused") {
  BootProfile p;
  p.image_ref = "busybox:1";
  p.top_layer = 7;
  p.boots = 3;
  p.updated_unix = 1700000000;
  p.layers[5] = R({{0, 4096}, {1 << 20, 65536}});
  p.layers[7] = R({{4096, 512}});
  const std::string row = encode_boot_profile(p);
  const auto back = MUST(decode_boot_profile(row, "busybox:1"));
  CHECK(back.image_ref == "busybox:1");
  CHECK(back.top_layer == 7);
  CHECK(back.boots == 3);
  CHECK(back.updated_unix == 1700000000);
  CHECK(back.layers == p.layers);
  CHECK(back.bytes() == 4096 + 65536 + 512);
  CHECK(back.range_count() == 3);
  for (size_t cut : {size_t{0}, size_t{1}, size_t{10}, row.size() - 1})
    CHECK_ERRNO(decode_boot_profile(row.substr(0, cut), "busybox:1"), EIO);
  CHECK_ERRNO(decode_boot_profile(row + "x", "busybox:1"), EIO);
  std::string version = row;
  version[0] = 9;
  CHECK_ERRNO(decode_boot_profile(version, "busybox:1"), EIO);
  BootProfile unordered = p;
  unordered.layers[5] = R({{1 << 20, 65536}, {0, 4096}});
  CHECK_ERRNO(decode_boot_profile(encode_boot_profile(unordered), "busybox:1"), EIO);
}

TEST_CASE("merge_boot is a union that counts boots and keeps each layer under its share") {
  BootProfile p;
  merge_boot(p, {{1, R({{0, 4096}, {8192, 4096}})}});
  merge_boot(p, {{1, R({{4096, 4096}})}, {2, R({{100, 1}})}});
  CHECK(p.boots == 2);
  CHECK(p.layers[1] == R({{0, 12288}}));
  CHECK(p.layers[2] == R({{100, 1}}));
  // A cap of 4 over two layers: 2 ranges each at most.
  BootLayerRanges many;
  for (uint64_t i = 0; i < 10; ++i) many[3].push_back({i * 100, 10});
  merge_boot(p, many, 4);
  CHECK(p.boots == 3);
  CHECK(p.layers.size() == 3);
  for (const auto& [id, r] : p.layers) CHECK(r.size() <= 1);  // 4 / 3 layers
  CHECK(p.layers[3] == R({{0, 910}}));
}

TEST_CASE("a session records in its window only, coalesced, and stops when closed") {
  BootSession s("c", "img:1", {}, {}, std::chrono::steady_clock::now() + 1h);
  s.record(4, 0, 4096);
  s.record(4, 4096, 4096);  // extends the last run
  s.record(4, 65536, 4096);
  s.record(2, 0, 512);
  s.record(4, 8192, 0);  // nothing
  s.record(4, 2048, 4096);
  auto ranges = s.finish();
  CHECK(ranges.size() == 2);
  CHECK(ranges[4] == R({{0, 8192}, {65536, 4096}}));
  CHECK(ranges[2] == R({{0, 512}}));
  s.record(4, 0, 4096);  // finished: nothing more
  CHECK(s.finish().empty());

  BootSession past("c", "img:1", {}, {}, std::chrono::steady_clock::now() - 1s);
  past.record(1, 0, 4096);
  CHECK(past.finish().empty());

  BootSession closed("c", "img:1", {}, {}, std::chrono::steady_clock::now() + 1h);
  closed.record(1, 0, 4096);
  closed.close();
  closed.record(1, 8192, 4096);
  CHECK(closed.closed());
  CHECK(closed.finish() == BootLayerRanges{{1, R({{0, 4096}})}});
}

TEST_CASE("a session's many scattered reads from threads are coalesced and capped") {
  BootSession s("c", "img:1", {}, {}, std::chrono::steady_clock::now() + 1h);
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      // Every other 512-byte piece: nothing adjacent within a thread.
      for (uint64_t i = 0; i < 40000; ++i) s.record(1, (i * 4 + t) * 1024, 512);
    });
  for (auto& t : threads) t.join();
  auto ranges = s.finish();
  REQUIRE(ranges.count(1) == 1);
  CHECK(ranges[1].size() <= kBootProfileMaxRanges);
  CHECK(ranges[1].front().offset == 0);
  CHECK(ranges[1].back().offset + ranges[1].back().length == (39999 * 4 + 3) * 1024 + 512);
}

TEST_CASE("the service: a fresh clone's reads become its image's profile; the next prefetches") {
  test::PoolFixture f;
  const auto content = import_random(f, "img:1", 8 << 20);
  const LayerId top = test::image_top_layer(*f.pool, "img:1");
  MUST(f.pool->clone("img:1", "c1", std::nullopt));
  MUST(f.pool->clone("img:1", "c2", std::nullopt));
  MUST(f.pool->clone("img:1", "w", std::nullopt));
  Events events;
  BootService::Options options;
  options.window = 30s;
  options.piece_bytes = 64 << 10;
  options.max_inflight_bytes = 128 << 10;
  options.log = [&](const BootEvent& e) { events.add(e); };
  auto service = MUST(BootService::start(*f.pool, options));
  f.pool->set_boot(service.get());

  // A container written before the image has a profile (its first request, a write, opens a
  // window that records nothing and finds nothing to prefetch); from then on it is not fresh.
  std::vector<uint8_t> buf(65536);
  {
    auto d = MUST(Disk::open(*f.pool, "w", true));
    MUST(d->write(buf.data(), 4096, 0, true));
  }

  // A pattern of reads, out of order, some adjacent.
  const std::vector<std::pair<uint64_t, uint64_t>> pattern = {
      {5 << 20, 4096}, {0, 4096}, {4096, 8192}, {1 << 20, 65536}, {7 << 20, 512}, {3 << 20, 4096}};
  {
    auto d = MUST(Disk::open(*f.pool, "c1", true));
    for (const auto& [off, len] : pattern) {
      MUST(d->read(buf.data(), len, off));
      CHECK(std::equal(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(len),
                       content.begin() + static_cast<ptrdiff_t>(off)));
    }
  }  // closed before the window's end: persisted now
  auto saved = events.wait(BootEvent::Kind::kProfile, "c1");
  REQUIRE(saved);
  CHECK(saved->error.empty());
  CHECK(saved->boots == 1);
  CHECK(saved->bytes == 12288 + 65536 + 4096 + 4096 + 512);
  // The first boot had no profile to prefetch.
  CHECK(events.count(BootEvent::Kind::kPrefetch, "c1") == 0);
  {
    auto txn = MUST(f.pool->index().begin_read());
    auto p = MUST(read_boot_profile(txn, "img:1"));
    REQUIRE(p);
    CHECK(p->top_layer == top);
    CHECK(p->boots == 1);
    REQUIRE(p->layers.count(top) == 1);
    CHECK(p->layers.at(top) ==
          R({{0, 12288}, {1 << 20, 65536}, {3 << 20, 4096}, {5 << 20, 4096}, {7 << 20, 512}}));
  }

  // A written container is not fresh: no window, no prefetch.
  {
    auto d = MUST(Disk::open(*f.pool, "w", true));
    MUST(d->read(buf.data(), 4096, 2 << 20));
  }

  // The next fresh clone: its first read starts the prefetch of the whole profile, in pieces.
  {
    auto d = MUST(Disk::open(*f.pool, "c2", true));
    MUST(d->read(buf.data(), 4096, 6 << 20));
    auto pre = events.wait(BootEvent::Kind::kPrefetch, "c2");
    REQUIRE(pre);
    CHECK(pre->error.empty());
    CHECK(pre->complete);
    CHECK(pre->bytes == 12288 + 65536 + 4096 + 4096 + 512);
    CHECK(pre->profile_bytes == pre->bytes);
    CHECK(pre->ranges == 5);  // each range under 64 KiB: one piece each
    CHECK(pre->boots == 1);
    // Data read meanwhile is the image's.
    for (const auto& [off, len] : pattern) {
      MUST(d->read(buf.data(), len, off));
      CHECK(std::equal(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(len),
                       content.begin() + static_cast<ptrdiff_t>(off)));
    }
  }
  auto second = events.wait(BootEvent::Kind::kProfile, "c2");
  REQUIRE(second);
  CHECK(second->boots == 2);
  CHECK(second->profile_bytes == 12288 + 65536 + 4096 + 4096 + 4096 + 512);  // + 6 MiB's
  CHECK(events.count(BootEvent::Kind::kProfile, "w") == 0);
  CHECK(events.count(BootEvent::Kind::kPrefetch, "w") == 0);

  // Clearing, and a profile whose image is gone.
  CHECK(MUST(clear_boot_profile(*f.pool, "img:1")));
  CHECK_FALSE(MUST(clear_boot_profile(*f.pool, "img:1")));
  CHECK_FALSE(MUST(save_boot(*f.pool, "gone:1", top, {{top, R({{0, 4096}})}})));
  CHECK_FALSE(MUST(save_boot(*f.pool, "img:1", top + 100, {{top, R({{0, 4096}})}})));
  CHECK(MUST(save_boot(*f.pool, "img:1", top, {{top, R({{0, 4096}})}})));
  f.pool->set_boot(nullptr);
  service.reset();
  // Removing the image removes its profile.
  MUST(f.pool->remove_container("c1"));
  MUST(f.pool->remove_container("c2"));
  MUST(f.pool->remove_container("w"));
  MUST(remove_image(*f.pool, "img:1"));
  auto txn = MUST(f.pool->index().begin_read());
  CHECK_FALSE(MUST(read_boot_profile(txn, "img:1")));
}

TEST_CASE("the service persists a window that ends while the disk stays open") {
  test::PoolFixture f;
  import_random(f, "img:1", 1 << 20);
  MUST(f.pool->clone("img:1", "c", std::nullopt));
  Events events;
  BootService::Options options;
  options.window = 300ms;
  options.log = [&](const BootEvent& e) { events.add(e); };
  auto service = MUST(BootService::start(*f.pool, options));
  f.pool->set_boot(service.get());
  auto d = MUST(Disk::open(*f.pool, "c", true));
  std::vector<uint8_t> buf(4096);
  MUST(d->read(buf.data(), 4096, 0));
  auto saved = events.wait(BootEvent::Kind::kProfile, "c");
  REQUIRE(saved);
  CHECK(saved->bytes == 4096);
  MUST(d->read(buf.data(), 4096, 65536));  // after the window: not recorded
  d.reset();
  f.pool->set_boot(nullptr);
  service.reset();
  CHECK(events.count(BootEvent::Kind::kProfile, "c") == 1);
  auto txn = MUST(f.pool->index().begin_read());
  auto p = MUST(read_boot_profile(txn, "img:1"));
  REQUIRE(p);
  CHECK(p->bytes() == 4096);
}

TEST_CASE("a window that read more than a boot does is not kept") {
  test::PoolFixture f;
  import_random(f, "img:1", 1 << 20);
  MUST(f.pool->clone("img:1", "scan", std::nullopt));
  MUST(f.pool->clone("img:1", "boot", std::nullopt));
  Events events;
  BootService::Options options;
  options.window = 30s;
  options.max_boot_bytes = 256 << 10;  // a scan of the 1 MiB disk reads more
  options.log = [&](const BootEvent& e) { events.add(e); };
  auto service = MUST(BootService::start(*f.pool, options));
  f.pool->set_boot(service.get());
  std::vector<uint8_t> buf(65536);
  {
    auto d = MUST(Disk::open(*f.pool, "scan", true));
    for (uint64_t off = 0; off < (1 << 20); off += buf.size())
      MUST(d->read(buf.data(), 65536, off));
  }
  auto scanned = events.wait(BootEvent::Kind::kProfile, "scan");
  REQUIRE(scanned);
  CHECK(scanned->error.empty());
  CHECK(scanned->bytes == (1 << 20));
  CHECK_FALSE(scanned->discarded.empty());
  {
    auto txn = MUST(f.pool->index().begin_read());
    CHECK_FALSE(MUST(read_boot_profile(txn, "img:1")));  // nothing kept
  }
  // A boot-sized window after it is kept.
  {
    auto d = MUST(Disk::open(*f.pool, "boot", true));
    MUST(d->read(buf.data(), 65536, 0));
  }
  auto booted = events.wait(BootEvent::Kind::kProfile, "boot");
  REQUIRE(booted);
  CHECK(booted->discarded.empty());
  CHECK(booted->boots == 1);
  f.pool->set_boot(nullptr);
  service.reset();
}

TEST_CASE("a session stops recording once it has read more than a boot does") {
  BootSession s("c", "img:1", {}, {}, std::chrono::steady_clock::now() + 1h);
  // 8 KiB reads 16 KiB apart (not adjacent, so each is a run of its own): at the first
  // coalescing, after kCoalesceAt of them, they cover 512 MiB, past the 256 MiB cap.
  uint64_t i = 0;
  for (; i < BootSession::kCoalesceAt * 4; ++i) s.record(1, i * 16384, 8192);
  auto ranges = s.finish();
  REQUIRE(ranges.count(1) == 1);
  uint64_t bytes = 0;
  for (const auto& r : ranges[1]) bytes += r.length;
  CHECK(bytes > kBootProfileMaxBytes);
  // Recording stopped at the first coalescing past the cap: nothing after it was kept.
  CHECK(ranges[1].back().offset + ranges[1].back().length <= BootSession::kCoalesceAt * 16384);
}
