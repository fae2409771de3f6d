// Unit tests for lib/qos.h: the token bucket over explicit times (rate, the one-second burst,
// debt for a request larger than the burst, a rate changed mid-way), the per-export Limiter
// with a ManualClock (its waits add up to what the limits allow; a time-bounded change reverts
// by itself at its end, with nobody calling apply), the resources in a container's record
// (round trip, rows without them), changes and their parsing.
#include "qos.h"

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"

using namespace layer;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;

namespace {

double secs(nanoseconds d) { return static_cast<double>(d.count()) * 1e-9; }

// Admits `n` requests of `bytes` through `l`; the seconds the clock moved.
double run(Limiter& l, ManualClock& clock, int n, uint64_t bytes) {
  const nanoseconds start = clock.monotonic();
  for (int i = 0; i < n; ++i) l.admit(bytes);
  return secs(clock.monotonic() - start);
}

}  // namespace

TEST_CASE("token bucket: burst of one second, then the rate", "[qos]") {
  TokenBucket b;
  b.set_rate(100, nanoseconds(0));
  CHECK(b.tokens(nanoseconds(0)) == Approx(100));  // starts full: one second's worth
  // The burst: 100 requests at t=0 do not wait; the 101st does (the bucket went to 0, then -1).
  for (int i = 0; i < 100; ++i) {
    REQUIRE(b.wait_time(nanoseconds(0)) == nanoseconds(0));
    b.take(1, nanoseconds(0));
  }
  CHECK(b.wait_time(nanoseconds(0)) == nanoseconds(0));  // at 0 tokens, not in debt
  b.take(1, nanoseconds(0));
  CHECK(secs(b.wait_time(nanoseconds(0))) == Approx(0.01));  // 1 token at 100/s
  // Refill: 10 ms later it is out of debt; it never holds more than one second's worth.
  CHECK(b.wait_time(milliseconds(10)) == nanoseconds(0));
  CHECK(b.tokens(seconds(100)) == Approx(100));
}

TEST_CASE("token bucket: a request larger than the burst passes into debt", "[qos]") {
  TokenBucket b;
  b.set_rate(1000, nanoseconds(0));  // 1000 bytes/s, burst 1000
  CHECK(b.wait_time(nanoseconds(0)) == nanoseconds(0));
  b.take(5000, nanoseconds(0));  // 5x the burst: passes
  CHECK(b.tokens(nanoseconds(0)) == Approx(-4000));
  CHECK(secs(b.wait_time(nanoseconds(0))) == Approx(4.0));  // the next waits the debt out
  CHECK(secs(b.wait_time(seconds(3))) == Approx(1.0));
  CHECK(b.wait_time(seconds(4)) == nanoseconds(0));
}

TEST_CASE("token bucket: rate 0 is unlimited; a rate change keeps tokens and debt", "[qos]") {
  TokenBucket b;
  b.take(1 << 30, nanoseconds(0));
  CHECK(b.wait_time(nanoseconds(0)) == nanoseconds(0));
  b.set_rate(100, seconds(1));
  b.take(150, seconds(1));  // -50
  b.set_rate(1000, seconds(1));
  CHECK(b.tokens(seconds(1)) == Approx(-50));            // the debt stays
  CHECK(secs(b.wait_time(seconds(1))) == Approx(0.05));  // paid at the new rate
  CHECK(b.tokens(seconds(10)) == Approx(1000));          // the new burst
  b.set_rate(10, seconds(10));
  CHECK(b.tokens(seconds(10)) == Approx(10));  // capped at the new burst
  b.set_rate(0, seconds(10));
  CHECK(b.wait_time(seconds(10)) == nanoseconds(0));
}

TEST_CASE("limiter: iops and bandwidth over a manual clock", "[qos]") {
  ManualClock clock;
  Limiter l(clock);
  // Unlimited: nothing waits, whatever the count.
  CHECK(run(l, clock, 100000, 1 << 20) == 0);
  Resources r;
  r.iops = 500;
  l.apply(r);
  // 500 of burst, then 500/s: 3000 requests take 5 s.
  CHECK(run(l, clock, 3000, 4096) == Approx(5.0).epsilon(0.01));
  // Bandwidth 8 MiB/s with 1 MiB requests; the iops limit is far away.
  r.iops = 100000;
  r.bandwidth = 8 << 20;
  l.apply(r);
  run(l, clock, 8, 1 << 20);  // whatever is left of the burst
  const double t = run(l, clock, 40, 1 << 20);
  CHECK(t == Approx(40.0 / 8).epsilon(0.03));
  // A request larger than the burst passes; the next ones pay for it.
  const double big = run(l, clock, 1, 64 << 20);
  CHECK(big <= 0.2);
  CHECK(run(l, clock, 1, 1) == Approx(8.0).epsilon(0.03));
}

TEST_CASE("limiter: a rate changed mid-way applies at once", "[qos]") {
  ManualClock clock;
  Limiter l(clock);
  Resources r;
  r.iops = 100;
  l.apply(r);
  run(l, clock, 100, 0);  // the burst
  CHECK(run(l, clock, 200, 0) == Approx(2.0).epsilon(0.02));
  r.iops = 1000;
  l.apply(r);
  CHECK(run(l, clock, 2000, 0) == Approx(2.0).epsilon(0.02));
  r.iops = 0;
  l.apply(r);
  CHECK(run(l, clock, 100000, 0) == 0);
  CHECK(l.limits().iops == 0);
}

TEST_CASE("limiter: a waiter wakes for a change made by another thread", "[qos]") {
  Limiter l;  // the real clock
  Resources r;
  r.iops = 1;
  l.apply(r);
  l.admit(0);  // the burst (1)
  l.admit(0);  // into debt: the next would wait a second
  std::thread t([&] { l.admit(0); });
  std::this_thread::sleep_for(milliseconds(50));
  const auto start = std::chrono::steady_clock::now();
  r.iops = 0;
  l.apply(r);
  t.join();
  CHECK(std::chrono::steady_clock::now() - start < milliseconds(500));
}

TEST_CASE("a time-bounded change reverts by itself at its end", "[qos]") {
  ManualClock clock;
  const uint64_t t0 = clock.unix_ms();
  Resources base;
  base.iops = 100;
  ResourceChange c;
  c.iops = 1000;
  c.for_ms = 3000;
  const Resources r = MUST(apply_change(base, c, t0));
  CHECK(r.iops == 100);
  CHECK(r.timed.iops == 1000);
  CHECK(r.timed.bandwidth == Resources::kKeep);
  CHECK(r.timed.until_ms == t0 + 3000);
  CHECK(r.effective_iops(t0) == 1000);
  CHECK(r.effective_iops(t0 + 2999) == 1000);
  CHECK(r.effective_iops(t0 + 3000) == 100);
  CHECK(r.effective_bandwidth(t0) == 0);

  Limiter l(clock);
  l.apply(r);
  CHECK(l.limits().iops == 1000);
  CHECK(l.limits().until_ms == t0 + 3000);
  run(l, clock, 1000, 0);  // the burst at 1000/s
  // 2 s at 1000/s, then (nobody applying anything) 1 s more at 1000/s and the rest at 100/s.
  CHECK(run(l, clock, 2000, 0) == Approx(2.0).epsilon(0.02));
  const double t = run(l, clock, 1200, 0);  // 1000 in the last second, 200 at 100/s
  CHECK(t == Approx(3.0).epsilon(0.05));
  CHECK(clock.unix_ms() >= t0 + 3000);
  CHECK(l.limits().iops == 100);
  CHECK(l.limits().until_ms == 0);
  CHECK(run(l, clock, 300, 0) == Approx(3.0).epsilon(0.02));

  // An ended change is dropped by the next change; a lasting change of a field ends its timed
  // change.
  ResourceChange bw;
  bw.bandwidth = 1 << 20;
  const Resources later = MUST(apply_change(r, bw, t0 + 5000));
  CHECK(later.timed == Resources::Timed{});
  Resources both = MUST(apply_change(base, c, t0));
  ResourceChange lasting;
  lasting.iops = 7;
  both = MUST(apply_change(both, lasting, t0 + 1));
  CHECK(both.iops == 7);
  CHECK(both.timed == Resources::Timed{});
}

TEST_CASE("resource changes are checked", "[qos]") {
  ResourceChange none;
  CHECK(test::error_of(apply_change({}, none, 0), "").code == EINVAL);
  ResourceChange p;
  p.priority = 11;
  CHECK(test::error_of(apply_change({}, p, 0), "").code == EINVAL);
  ResourceChange cpu_for;
  cpu_for.cpu_millis = 2000;
  cpu_for.for_ms = 1000;
  CHECK(test::error_of(apply_change({}, cpu_for, 0), "").code == EINVAL);
  CHECK(MUST(parse_cpu("2")) == 2000);
  CHECK(MUST(parse_cpu("0.5")) == 500);
  CHECK(MUST(parse_cpu("1.25")) == 1250);
  CHECK(MUST(parse_cpu("none")) == 0);
  for (const char* bad : {"", "1.", ".5", "1.2345", "-1", "x", "1e3"})
    CHECK(test::error_of(parse_cpu(bad), bad).code == EINVAL);
  CHECK(format_cpu(2000) == "2");
  CHECK(format_cpu(1250) == "1.25");
  CHECK(format_cpu(500) == "0.5");
  CHECK(MUST(parse_count("2000")) == 2000);
  CHECK(MUST(parse_count("none")) == 0);
  for (const char* bad : {"", "1k", "-5", "1.5"})
    CHECK(test::error_of(parse_count(bad), bad).code == EINVAL);
}

TEST_CASE("resources in the container record: round trip, older rows", "[qos][records]") {
  ContainerRecord c;
  c.name = "vm1";
  c.id = 3;
  c.image_ref = "base:1";
  c.delta_layer = 4;
  c.size_bytes = 1 << 20;
  c.block_size = 4096;
  // Unset resources add nothing: the row is what a build without them wrote, and reads back.
  const std::string plain = encode(c);
  CHECK(MUST(decode_container(plain, "vm1")).resources.is_default());
  c.resources.cpu_millis = 2500;
  c.resources.memory_bytes = 1ULL << 30;
  c.resources.net_bps = 100ULL << 20;
  c.resources.iops = 2000;
  c.resources.bandwidth = 50ULL << 20;
  c.resources.priority = 9;
  c.resources.timed = {4000, Resources::kKeep, 1'800'000'000'000};
  const std::string full = encode(c);
  CHECK(full.size() > plain.size());
  CHECK(full.substr(0, plain.size()) == plain);  // a trailing field
  const ContainerRecord back = MUST(decode_container(full, "vm1"));
  CHECK(back.resources == c.resources);
  CHECK(back.name == "vm1");
  // Damaged: truncated anywhere in the field, a bad tag, a bad priority.
  for (size_t n = plain.size() + 1; n < full.size(); ++n)
    CHECK(test::error_of(decode_container(full.substr(0, n), "vm1"), "").code == EIO);
  std::string bad_tag = full;
  bad_tag[plain.size()] = 7;
  CHECK(test::error_of(decode_container(bad_tag, "vm1"), "").code == EIO);
  c.resources.priority = 0;
  CHECK(test::error_of(decode_container(encode(c), "vm1"), "").code == EIO);
}

TEST_CASE("resources are set at clone and changed in one transaction", "[qos]") {
  test::PoolFixture f;
  f.import("base:1", 64 * 1024, 4096, 1);
  Resources r;
  r.iops = 500;
  r.cpu_millis = 2000;
  MUST(f.pool->clone("base:1", "c", std::nullopt, r));
  MUST(f.pool->clone("base:1", "plain", std::nullopt));
  CHECK(MUST(load_resources(*f.pool, "c")) == r);
  CHECK(MUST(load_resources(*f.pool, "plain")).is_default());
  ResourceChange c;
  c.bandwidth = 8 << 20;
  c.priority = 2;
  const Resources after = MUST(change_resources(*f.pool, "c", c, now_unix_ms()));
  CHECK(after.bandwidth == 8 << 20);
  CHECK(after.iops == 500);
  f.reopen();
  CHECK(MUST(load_resources(*f.pool, "c")) == after);
  CHECK(MUST(f.pool->inspect("c")).container.resources.priority == 2);
  CHECK(test::error_of(change_resources(*f.pool, "nope", c, 0), "").code == ENOENT);
}

TEST_CASE("limiter table: one limiter per container, shared", "[qos]") {
  ManualClock clock;
  LimiterTable t(clock);
  Resources r;
  r.iops = 10;
  auto a = t.acquire("a", r);
  auto a2 = t.acquire("a", r);
  CHECK(a == a2);
  CHECK(t.acquire("b", {}) != a);
  r.iops = 20;
  CHECK(t.apply("a", r));
  CHECK(a->limits().iops == 20);
  CHECK_FALSE(t.apply("never-served", r));
}

TEST_CASE("limiter: threads share one export's buckets; apply beside them", "[qos]") {
  Limiter l;  // the real clock
  Resources r;
  r.iops = 1000;
  l.apply(r);
  std::atomic<uint64_t> admitted{0};
  std::atomic<bool> stop{false};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      while (!stop.load()) {
        l.admit(4096);
        admitted.fetch_add(1);
      }
    });
  // Changes beside the requests (the same limit, re-applied: a control request's).
  for (int i = 0; i < 10; ++i) {
    std::this_thread::sleep_for(milliseconds(50));
    l.apply(r);
  }
  stop = true;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Unblock the waiters: unlimited.
  l.apply({});
  for (auto& t : threads) t.join();
  // At most the burst plus the rate over the time (and a request per thread in flight at the
  // end); a limit is an upper bound, so only that is checked on a loaded machine.
  CHECK(static_cast<double>(admitted.load()) <= 1000 + 1000 * elapsed * 1.05 + 4);
  CHECK(admitted.load() >= 1000);  // the burst at least
}
