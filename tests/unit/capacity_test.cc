// Unit tests for lib/capacity.h: the pool's capacities in its meta (defaults, round trip,
// "none" clears), and admission: clone, `set` and timed raises against capacity × overcommit,
// unlimited containers on a pool with a capacity, ssd bytes of deltas on ssd, a capacity below
// what is reserved, refusals that change nothing, and two concurrent clones for one slot.
#include "capacity.h"

#include <atomic>
#include <thread>
#include <vector>

#include "qos.h"
#include "test_util.h"

using namespace layer;

namespace {

constexpr uint64_t kImageBytes = 64 * 1024;

Resources iops(uint64_t n, uint64_t bandwidth = 0) {
  Resources r;
  r.iops = n;
  r.bandwidth = bandwidth;
  return r;
}

CapacityChange iops_capacity(uint64_t n) {
  CapacityChange c;
  c.iops = n;
  return c;
}

}  // namespace

TEST_CASE("capacity: defaults, set, cleared, overcommit parsed", "[capacity]") {
  test::PoolFixture f;
  auto cap = MUST(load_capacity(*f.pool));
  CHECK(cap == PoolCapacity{});
  CHECK(cap.overcommit_milli == 1000);
  CapacityChange c;
  c.iops = 600;
  c.bandwidth = 100 << 20;
  c.ssd_bytes = 1 << 30;
  c.overcommit_milli = MUST(parse_overcommit("1.5"));
  cap = MUST(change_capacity(*f.pool, c, now_unix_ms()));
  f.reopen();
  CHECK(MUST(load_capacity(*f.pool)) == cap);
  CHECK(cap.iops == 600);
  CHECK(cap.overcommit_milli == 1500);
  CHECK(cap.limit(cap.iops) == 900);
  CapacityChange clear;
  clear.bandwidth = 0;  // "none"
  clear.overcommit_milli = MUST(parse_overcommit("none"));
  cap = MUST(change_capacity(*f.pool, clear, now_unix_ms()));
  CHECK(cap.bandwidth == 0);
  CHECK(cap.iops == 600);
  CHECK(cap.overcommit_milli == 1000);
  CHECK(ERROR_OF(parse_overcommit("0")).code == EINVAL);
  CHECK(ERROR_OF(parse_overcommit("lots")).code == EINVAL);
  CHECK(ERROR_OF(change_capacity(*f.pool, CapacityChange{}, 0)).code == EINVAL);
}

TEST_CASE("admission: clones against capacity × overcommit", "[capacity]") {
  test::PoolFixture f;
  f.import("base:1", kImageBytes, 4096, 1);
  MUST(change_capacity(*f.pool, iops_capacity(600), now_unix_ms()));
  MUST(f.pool->clone("base:1", "a", std::nullopt, iops(400)));
  MUST(f.pool->clone("base:1", "b", std::nullopt, iops(200)));  // exactly the capacity
  const auto e = ERROR_OF(f.pool->clone("base:1", "c", std::nullopt, iops(1)));
  CHECK(e.code == ENOSPC);
  CHECK(e.message.find("iops reservations would total 601") != std::string::npos);
  CHECK(e.message.find("container \"c\"") != std::string::npos);
  // Nothing was created.
  CHECK(ERROR_OF(f.pool->inspect("c")).code == ENOENT);
  // An unlimited container is not admitted on a pool with an iops capacity.
  const auto u = ERROR_OF(f.pool->clone("base:1", "u", std::nullopt));
  CHECK(u.code == ENOSPC);
  CHECK(u.message.find("no iops reservation") != std::string::npos);
  // The bandwidth has no capacity: a and b are unlimited there, and admitted.
  {
    auto txn = MUST(f.pool->index().begin_read());
    const auto sum = MUST(sum_reservations(txn, now_unix_ms()));
    CHECK(sum.iops == 600);
    CHECK(sum.unlimited_bandwidth == 2);
  }
  // Overcommit 1.5: 900 admitted.
  CapacityChange over;
  over.overcommit_milli = 1500;
  MUST(change_capacity(*f.pool, over, now_unix_ms()));
  MUST(f.pool->clone("base:1", "c", std::nullopt, iops(300)));
  CHECK(ERROR_OF(f.pool->clone("base:1", "d", std::nullopt, iops(1))).code == ENOSPC);
  // Removing a container frees its reservation.
  MUST(f.pool->remove_container("c"));
  MUST(f.pool->clone("base:1", "d", std::nullopt, iops(300)));
}

TEST_CASE("admission: set raises refused, lowering and other changes pass", "[capacity]") {
  test::PoolFixture f;
  f.import("base:1", kImageBytes, 4096, 1);
  MUST(f.pool->clone("base:1", "a", std::nullopt, iops(400, 10 << 20)));
  MUST(f.pool->clone("base:1", "b", std::nullopt, iops(200, 10 << 20)));
  CapacityChange cap;
  cap.iops = 600;
  cap.bandwidth = 20 << 20;
  MUST(change_capacity(*f.pool, cap, now_unix_ms()));
  const uint64_t now = now_unix_ms();
  ResourceChange raise;
  raise.iops = 201;
  CHECK(ERROR_OF(change_resources(*f.pool, "b", raise, now)).code == ENOSPC);
  CHECK(MUST(load_resources(*f.pool, "b")).iops == 200);  // unchanged
  ResourceChange unlimited;
  unlimited.bandwidth = 0;
  CHECK(ERROR_OF(change_resources(*f.pool, "b", unlimited, now)).code == ENOSPC);
  ResourceChange lower;
  lower.iops = 100;
  MUST(change_resources(*f.pool, "b", lower, now));
  ResourceChange prio;
  prio.priority = 9;
  MUST(change_resources(*f.pool, "b", prio, now));
  // A time-bounded raise counts while in force: b at 100 may rise to 200 for an hour, not 201.
  ResourceChange timed;
  timed.iops = 201;
  timed.for_ms = 3'600'000;
  CHECK(ERROR_OF(change_resources(*f.pool, "b", timed, now)).code == ENOSPC);
  timed.iops = 200;
  MUST(change_resources(*f.pool, "b", timed, now));
  auto txn = MUST(f.pool->index().begin_read());
  CHECK(MUST(sum_reservations(txn, now)).iops == 600);
  // After its end it counts its base again.
  CHECK(MUST(sum_reservations(txn, now + 3'600'001)).iops == 500);
}

TEST_CASE("admission: ssd bytes of deltas on ssd", "[capacity]") {
  test::PoolFixture f;
  f.import("base:1", kImageBytes, 4096, 1);
  CapacityChange cap;
  cap.ssd_bytes = 2 * kImageBytes;
  MUST(change_capacity(*f.pool, cap, now_unix_ms()));
  MUST(f.pool->clone("base:1", "a", std::nullopt));
  MUST(f.pool->clone("base:1", "b", std::nullopt));
  const auto e = ERROR_OF(f.pool->clone("base:1", "c", std::nullopt));
  CHECK(e.code == ENOSPC);
  CHECK(e.message.find("ssd-bytes") != std::string::npos);
  CHECK(ERROR_OF(f.pool->clone("base:1", "big", kImageBytes * 4)).code == ENOSPC);
}

TEST_CASE("capacity below the reservations, or over unlimited containers, is refused",
          "[capacity]") {
  test::PoolFixture f;
  f.import("base:1", kImageBytes, 4096, 1);
  MUST(f.pool->clone("base:1", "a", std::nullopt, iops(400)));
  MUST(f.pool->clone("base:1", "u", std::nullopt, iops(0, 1 << 20)));
  auto e = ERROR_OF(change_capacity(*f.pool, iops_capacity(1000), now_unix_ms()));
  CHECK(e.code == ENOSPC);
  CHECK(e.message.find("1 container(s) have no iops reservation") != std::string::npos);
  CHECK(MUST(load_capacity(*f.pool)).iops == 0);  // nothing changed
  MUST(f.pool->remove_container("u"));
  e = ERROR_OF(change_capacity(*f.pool, iops_capacity(399), now_unix_ms()));
  CHECK(e.code == ENOSPC);
  CHECK(MUST(load_capacity(*f.pool)).iops == 0);
  MUST(change_capacity(*f.pool, iops_capacity(400), now_unix_ms()));
}

TEST_CASE("admission: two concurrent clones for one slot, one admitted", "[capacity]") {
  test::PoolFixture f;
  f.import("base:1", kImageBytes, 4096, 1);
  MUST(change_capacity(*f.pool, iops_capacity(1000), now_unix_ms()));
  MUST(f.pool->clone("base:1", "a", std::nullopt, iops(400)));
  // Room for one more 400, not two: of 8 racing clones, exactly one gets it.
  std::atomic<int> admitted{0}, refused{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&, i] {
      auto r = f.pool->clone("base:1", "c" + std::to_string(i), std::nullopt, iops(400));
      (r ? admitted : r.error().code == ENOSPC ? refused : other).fetch_add(1);
    });
  for (auto& t : threads) t.join();
  CHECK(admitted.load() == 1);
  CHECK(refused.load() == 7);
  CHECK(other.load() == 0);
  auto txn = MUST(f.pool->index().begin_read());
  CHECK(MUST(sum_reservations(txn, now_unix_ms())).iops == 800);
}

TEST_CASE("an automatic limit reserves its ceiling; without one it is unlimited", "[capacity]") {
  ContainerRecord rec;
  rec.resources.iops = 0;
  rec.resources.auto_iops = {true, 100, 800};
  auto r = reservation_of(rec, false, 1'000);
  CHECK(r.iops == 800);
  CHECK(r.unlimited_iops == 0);
  // A timed change in force counts when larger than the ceiling.
  rec.resources.timed = {1'500, Resources::kKeep, 2'000};
  CHECK(reservation_of(rec, false, 1'000).iops == 1'500);
  CHECK(reservation_of(rec, false, 3'000).iops == 800);  // ended
  rec.resources.timed = {};
  rec.resources.auto_iops.ceiling = 0;  // may rise without bound
  r = reservation_of(rec, false, 1'000);
  CHECK(r.unlimited_iops == 1);
  CHECK(r.iops == 0);
  rec.resources.auto_iops.on = false;  // back to the base value (0: unlimited)
  CHECK(reservation_of(rec, false, 1'000).unlimited_iops == 1);
}
