// Unit tests for the lending of lib/qos.h (issue 14 item 2): plan_loans (an idle owner lends,
// a busy owner keeps its reservation, busy borrowers share in proportion to priority, the
// capacity bounds what is handed out, no capacity lends nothing, unlimited limiters stay out),
// and LimiterTable::rebalance over a ManualClock through real Limiters: a busy container's
// limit rises while the other idles, falls back at the next round once the owner is busy, and
// the owner's requests never wait for the loan; the lending thread runs rounds and stops.
#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "qos.h"
#include "test_util.h"

using namespace layer;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

namespace {

LendingInput idle(uint64_t reserved, double used = 0, uint8_t priority = 5) {
  return {reserved, used, false, priority};
}
LendingInput busy(uint64_t reserved, uint8_t priority = 5) {
  return {reserved, static_cast<double>(reserved), true, priority};
}

uint64_t handed_out(const std::vector<LendingInput>& in, const std::vector<LendingShare>& out) {
  uint64_t sum = 0;
  for (size_t i = 0; i < in.size(); ++i)
    sum += out[i].busy ? in[i].reserved + out[i].borrowed
                       : std::min<uint64_t>(in[i].reserved, static_cast<uint64_t>(2 * in[i].used));
  return sum;
}

Resources rates(uint64_t iops, uint8_t priority = 5) {
  Resources r;
  r.iops = iops;
  r.priority = priority;
  return r;
}

}  // namespace

TEST_CASE("plan: an idle owner lends to a busy one; a busy owner takes it back", "[lending]") {
  // A reserves 400 and idles, B reserves 200 and waits on its bucket: B may use A's 400.
  std::vector<LendingInput> in{idle(400), busy(200)};
  auto out = plan_loans(in, 600);
  CHECK_FALSE(out[0].busy);
  CHECK(out[1].busy);
  CHECK(out[0].borrowed == 0);
  CHECK(out[0].lent == 400);
  CHECK(out[1].borrowed == 400);
  CHECK(out[1].lent == 0);
  // A uses 100: it keeps twice that (headroom until the next round) and lends the rest.
  in[0] = idle(400, 100);
  out = plan_loans(in, 600);
  CHECK(out[1].borrowed == 200);
  CHECK(out[0].lent == 200);
  // A busy (90% of its reservation, or waiting): it keeps all of it, nothing is lent.
  in[0] = idle(400, 360);
  out = plan_loans(in, 600);
  CHECK(out[0].busy);
  CHECK(out[1].borrowed == 0);
  CHECK(out[0].lent == 0);
  in[0] = {400, 10, true, 5};  // waited, though it used little: it wants more
  CHECK(plan_loans(in, 600)[1].borrowed == 0);
}

TEST_CASE("plan: busy borrowers share in proportion to priority", "[lending]") {
  std::vector<LendingInput> in{idle(400), busy(100, 2), busy(100, 6)};
  const auto out = plan_loans(in, 600);
  CHECK(out[1].borrowed == 100);  // 400 × 2/8
  CHECK(out[2].borrowed == 300);  // 400 × 6/8
  CHECK(out[0].lent == 400);
  CHECK(handed_out(in, out) == 600);
}

TEST_CASE("plan: the capacity bounds what is handed out", "[lending]") {
  SECTION("no capacity: nothing lent (limits are hard)") {
    const auto out = plan_loans({idle(400), busy(200)}, 0);
    CHECK(out[1].borrowed == 0);
    CHECK(out[0].lent == 0);
  }
  SECTION("unreserved capacity is lent too; the owners' part is what they lend") {
    std::vector<LendingInput> in{idle(100), busy(200)};
    const auto out = plan_loans(in, 1000);
    CHECK(out[1].borrowed == 800);
    CHECK(out[0].lent == 100);
    CHECK(handed_out(in, out) == 1000);
  }
  SECTION("overcommitted: reservations past the capacity leave less to lend") {
    // 1.5 × overcommit: 900 reserved on 600. A idle, B and C busy keep 500.
    std::vector<LendingInput> in{idle(400), busy(300), busy(200)};
    const auto out = plan_loans(in, 600);
    CHECK(out[1].borrowed == 50);
    CHECK(out[2].borrowed == 50);
    CHECK(handed_out(in, out) == 600);
    // Busy ones past the capacity already: nothing more.
    in[0] = busy(400);
    const auto none = plan_loans(in, 600);
    for (const auto& s : none) CHECK(s.borrowed == 0);
  }
  SECTION("unlimited limiters neither lend nor borrow") {
    const auto out = plan_loans({idle(0), busy(0), idle(400), busy(200)}, 600);
    CHECK(out[0].lent == 0);
    CHECK(out[1].borrowed == 0);
    CHECK_FALSE(out[1].busy);
    CHECK(out[3].borrowed == 400);
  }
  SECTION("random inputs never hand out more than the capacity") {
    std::mt19937_64 rng(test::test_seed("lending bound"));
    for (int round = 0; round < 1000; ++round) {
      std::vector<LendingInput> in;
      const int n = 1 + static_cast<int>(rng() % 8);
      uint64_t reserved = 0;
      for (int i = 0; i < n; ++i) {
        const uint64_t r = 1 + rng() % 1000;
        reserved += r;
        in.push_back({r, static_cast<double>(rng() % 1200), rng() % 3 == 0,
                      static_cast<uint8_t>(1 + rng() % 10)});
      }
      const uint64_t capacity = reserved / 2 + rng() % (reserved + 1);
      const auto out = plan_loans(in, capacity);
      uint64_t kept = 0, borrowed = 0, lent = 0;
      for (size_t i = 0; i < in.size(); ++i) {
        kept += out[i].busy
                    ? in[i].reserved
                    : std::min<uint64_t>(in[i].reserved, static_cast<uint64_t>(2 * in[i].used));
        borrowed += out[i].borrowed;
        lent += out[i].lent;
        if (!out[i].busy) REQUIRE(out[i].borrowed == 0);
        if (out[i].busy) REQUIRE(out[i].lent == 0);
      }
      if (borrowed > 0) REQUIRE(kept + borrowed <= capacity + 1);  // floor rounding aside
      REQUIRE(lent <= borrowed);
    }
  }
}

TEST_CASE("rebalance: the loan follows demand through real limiters", "[lending]") {
  ManualClock clock;
  LimiterTable table(clock);
  auto a = table.acquire("a", rates(400));
  auto b = table.acquire("b", rates(200));
  const LendingCapacity cap{600, 0};
  table.rebalance(cap);  // the first round starts the window
  CHECK(table.lending_status().window_s == 0);
  // B asks more than its 200/s: its burst, then waits on its bucket.
  for (int i = 0; i < 300; ++i) b->admit(4096);
  table.rebalance(cap);
  CHECK(b->limits().iops == 600);  // its 200 and A's idle 400
  CHECK(a->limits().iops == 400);
  auto st = table.lending_status();
  REQUIRE(st.containers.size() == 2);
  CHECK(st.containers[0].container == "a");
  CHECK(st.containers[0].iops.lent == 400);
  CHECK(st.containers[1].iops.borrowed == 400);
  CHECK(st.containers[1].iops.used > 200);
  CHECK(st.capacity.iops == 600);
  // B's requests now pass at the raised rate: 600 more take about one second, not three.
  const nanoseconds before = clock.monotonic();
  for (int i = 0; i < 600; ++i) b->admit(4096);
  CHECK(static_cast<double>((clock.monotonic() - before).count()) * 1e-9 < 1.2);
  table.rebalance(cap);
  // A wakes: its requests never wait for the loan (its bucket is its own, full)...
  const nanoseconds waited = clock.waited();
  for (int i = 0; i < 400; ++i) a->admit(4096);
  CHECK(clock.waited() == waited);
  clock.advance(milliseconds(200));
  for (int i = 0; i < 40; ++i) b->admit(4096);
  // ... and at the next round B's extra is cut at once.
  table.rebalance(cap);
  CHECK(b->limits().iops == 200);
  st = table.lending_status();
  CHECK(st.containers[0].iops.lent == 0);
  CHECK(st.containers[1].iops.borrowed == 0);
  // A idle again (one round with nothing): B borrows again.
  for (int i = 0; i < 300; ++i) b->admit(4096);
  table.rebalance(cap);
  CHECK(b->limits().iops == 600);
  // The capacity cleared: hard limits again.
  for (int i = 0; i < 300; ++i) b->admit(4096);
  table.rebalance({});
  CHECK(b->limits().iops == 200);
}

TEST_CASE("rebalance: priorities split the loan between two busy containers", "[lending]") {
  ManualClock clock;
  LimiterTable table(clock);
  table.acquire("idle", rates(400));
  auto low = table.acquire("low", rates(100, 2));
  auto high = table.acquire("high", rates(100, 6));
  const LendingCapacity cap{600, 0};
  table.rebalance(cap);
  for (int i = 0; i < 150; ++i) {
    low->admit(0);
    high->admit(0);
  }
  table.rebalance(cap);
  CHECK(low->limits().iops == 200);   // 100 + 400 × 2/8
  CHECK(high->limits().iops == 400);  // 100 + 400 × 6/8
}

TEST_CASE("lending thread: runs rounds until the table goes", "[lending]") {
  auto table = std::make_unique<LimiterTable>();
  auto b = table->acquire("b", rates(200));
  std::atomic<int> calls{0};
  MUST(table->start_lending(
      [&] {
        calls.fetch_add(1);
        return LendingCapacity{1000, 0};
      },
      milliseconds(5)));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (table->lending_status().window_s == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(milliseconds(5));
  CHECK(table->lending_status().window_s > 0);
  CHECK(table->lending_status().capacity.iops == 1000);
  table.reset();  // stops and joins the thread
  CHECK(calls.load() >= 2);
}
