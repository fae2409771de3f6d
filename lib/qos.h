// qos.h — a container's resources and the server's enforcement of its iops and bandwidth
// (issue 14 item 1; docs/design.md "Resources and QoS").
//
// A container record carries Resources (records.h). The server enforces two of them per export
// (per container: every connection of a container in one server, and its snapshots' exports,
// share one Limiter): `iops`, requests per second, and `bandwidth`, bytes per second read and
// written, each with a token bucket whose burst is one second's worth. A request that finds a
// bucket in debt waits until it is not; it never fails. A request larger than the burst still
// passes: it takes the bucket into debt, which the next requests wait out, so the long-run rate
// is the limit. An export without limits costs one relaxed atomic load per request.
//
// Thread-safety: TokenBucket is a plain value (its owner locks). Limiter and LimiterTable are
// safe from any thread. The clock is injectable (ManualClock) so tests run without sleeping.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "error.h"
#include "records.h"

namespace layer {

class Pool;

// The time a Limiter reads: monotonic time for its buckets, the wall clock (unix ms) for the
// end of a time-bounded change, and a way to wait.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::chrono::nanoseconds monotonic() = 0;
  virtual uint64_t unix_ms() = 0;
  // Waits at most `d` on `cv` (`lock` held on entry and on return); may return early.
  virtual void wait(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                    std::chrono::nanoseconds d) = 0;
};
// steady_clock, system_clock and the condition variable. Lives as long as the process.
Clock& real_clock();

// A clock that moves only when told: wait() advances it by the time waited (and counts it).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(uint64_t unix_ms = 1'700'000'000'000) : unix_ms_(unix_ms) {}
  std::chrono::nanoseconds monotonic() override { return mono_.load(); }
  uint64_t unix_ms() override {
    return unix_ms_ + static_cast<uint64_t>(mono_.load().count() / 1'000'000);
  }
  void wait(std::unique_lock<std::mutex>&, std::condition_variable&,
            std::chrono::nanoseconds d) override {
    advance(d);
    waited_ += d;
  }
  void advance(std::chrono::nanoseconds d) { mono_.store(mono_.load() + d); }
  std::chrono::nanoseconds waited() const { return waited_; }

 private:
  const uint64_t unix_ms_;
  std::atomic<std::chrono::nanoseconds> mono_{std::chrono::nanoseconds(0)};
  std::chrono::nanoseconds waited_{0};
};

// A token bucket over explicit times: `rate` tokens per second, holding at most `rate` (one
// second's worth). Rate 0 is unlimited: it never waits and counts nothing.
class TokenBucket {
 public:
  using Nanos = std::chrono::nanoseconds;
  // Changes the rate at `now`: the tokens earned so far at the old rate are kept, capped at the
  // new burst; a debt is kept. From unlimited, the bucket starts full.
  void set_rate(uint64_t rate, Nanos now);
  uint64_t rate() const { return rate_; }
  // 0 when the bucket is not in debt at `now` (a request may take from it), else how long until
  // it is out of debt.
  Nanos wait_time(Nanos now);
  // Takes n tokens at `now`; the bucket may go into debt.
  void take(uint64_t n, Nanos now);
  // The tokens at `now` (negative: a debt).
  double tokens(Nanos now);

 private:
  void refill(Nanos now);
  uint64_t rate_ = 0;
  double tokens_ = 0;
  Nanos last_{0};
};

// The iops and bandwidth limits of one export, applied from the container's Resources.
class Limiter {
 public:
  explicit Limiter(Clock& clock = real_clock()) : clock_(clock) {}
  Limiter(const Limiter&) = delete;
  Limiter& operator=(const Limiter&) = delete;

  // Enforces `r` from now on: the effective iops and bandwidth at the clock's unix time (a
  // time-bounded change in force counts until it ends; then the base values count, without
  // anyone calling apply again). Requests waiting on the old limits recompute at once.
  void apply(const Resources& r);
  // Before a request of `bytes` (0 for one that moves no data): waits until both buckets allow
  // it, then takes 1 op and `bytes` bytes. Never fails.
  void admit(uint64_t bytes) {
    if (!active_.load(std::memory_order_relaxed)) return;
    admit_slow(bytes);
  }

  // What the limiter did since the last sample (the counts are reset). Only a limited export
  // counts (admit_slow): the unlimited path stays one relaxed load.
  struct Window {
    uint64_t ops = 0, bytes = 0;
    bool waited_ops = false, waited_bytes = false;  // a request waited on that bucket
    uint64_t iops = 0, bandwidth = 0;               // the reservation (effective) now
    uint8_t priority = Resources::kDefaultPriority;
  };
  Window sample();
  // Adds a loan to the reservation: the buckets' rates become reservation + loan (a dimension
  // without a reservation is unlimited and stays so). Waiting requests recompute at once.
  void lend(uint64_t iops, uint64_t bandwidth);

  struct Limits {
    uint64_t iops = 0;       // 0: unlimited
    uint64_t bandwidth = 0;  // 0: unlimited
    uint64_t until_ms = 0;   // when these change by themselves (a timed change ends); 0: never
  };
  Limits limits();

 private:
  void admit_slow(uint64_t bytes);
  // REQUIRES: mu_ held. Sets the buckets from resources_ at `now_ms`.
  void update_locked(uint64_t now_ms);

  Clock& clock_;
  // False: no limit and nothing pending, admit returns at once.
  std::atomic<bool> active_{false};
  std::mutex mu_;
  std::condition_variable changed_;  // apply() wakes the waiters
  Resources resources_;              // GUARDED_BY(mu_)
  uint64_t switch_ms_ = 0;           // GUARDED_BY(mu_): when the limits change next; 0: never
  TokenBucket ops_;                  // GUARDED_BY(mu_)
  TokenBucket bytes_;                // GUARDED_BY(mu_)
  uint64_t loan_iops_ = 0;           // GUARDED_BY(mu_): lent to it on top of its reservation
  uint64_t loan_bandwidth_ = 0;      // GUARDED_BY(mu_)
  std::atomic<uint64_t> count_ops_{0}, count_bytes_{0};
  std::atomic<bool> waited_ops_{false}, waited_bytes_{false};
};

// Lending (issue 14 item 2; docs/design.md "Capacity, admission and lending"): one dimension
// (iops or bandwidth) of one limiter over the last window, as plan_loans reads it.
struct LendingInput {
  uint64_t reserved = 0;  // its reservation; 0: unlimited, neither lends nor borrows
  double used = 0;        // its measured rate over the window
  bool waited = false;    // a request waited on its bucket in the window
  uint8_t priority = Resources::kDefaultPriority;
};
struct LendingShare {
  uint64_t borrowed = 0;  // added to its reservation
  uint64_t lent = 0;      // of its reservation, lent to others
  bool busy = false;      // it wants (at least) its whole reservation
};
// The loans of one dimension, given the pool's capacity of it (0: no capacity, nothing lent).
// A limiter is busy when a request waited on its bucket or it used at least 90% of its
// reservation; a busy one keeps its whole reservation; an idle one keeps twice what it used
// (at most its reservation: the headroom for its demand to grow until the next rebalance) and
// the rest is lendable. What the capacity leaves beyond what the limiters keep (the idle
// limiters' lendable part, and capacity nobody reserved) is split among the busy ones in
// proportion to their priority; `lent` attributes it to the idle owners in proportion to their
// lendable parts. Sum of kept + borrowed <= capacity.
std::vector<LendingShare> plan_loans(const std::vector<LendingInput>& in, uint64_t capacity);

// What the pool gives, as the server's lending reads it (capacity.h PoolCapacity's two rates).
struct LendingCapacity {
  uint64_t iops = 0, bandwidth = 0;  // 0: no capacity, nothing lent in that dimension
};

// One container's part in the last rebalance (`layer pool status`).
struct ContainerLending {
  std::string container;
  uint8_t priority = Resources::kDefaultPriority;
  bool measured = false;  // it has a limit, so its requests were counted (else used is unknown)
  struct Dim {
    uint64_t reserved = 0;
    double used = 0;  // per second, over the last window
    uint64_t borrowed = 0, lent = 0;
  } iops, bandwidth;
};
// The last rebalance's view, in container name order; the capacity it used; its window.
struct LendingStatus {
  LendingCapacity capacity;
  double window_s = 0;  // 0: no round yet
  std::vector<ContainerLending> containers;
};

// A server's limiters, one per container it has served. Kept for the server's life (a few
// hundred bytes each), so a client that reconnects does not get a fresh burst.
class LimiterTable {
 public:
  explicit LimiterTable(Clock& clock = real_clock()) : clock_(clock) {}
  // The limiter of `container`, made on first use; `r` applied.
  std::shared_ptr<Limiter> acquire(const std::string& container, const Resources& r);
  // Applies `r` to the limiter of `container`; false when this server has none (not served).
  bool apply(const std::string& container, const Resources& r);
  // The containers that have a limiter here (served since the server started).
  std::vector<std::string> names();

  // One lending round at the clock's now: samples every limiter over the window since the last
  // round, plans the loans of each dimension (plan_loans) against `capacity` and lends them.
  // The first round only starts the window. The rounds' caller is the lending thread (or a test).
  void rebalance(const LendingCapacity& capacity);
  // Starts the thread that calls rebalance(capacity()) every `interval` until the destructor.
  // `capacity` is called on that thread. Errors: EAGAIN (no thread).
  Status start_lending(std::function<LendingCapacity()> capacity,
                       std::chrono::milliseconds interval);
  ~LimiterTable();
  // The last rebalance's view.
  LendingStatus lending_status();

 private:
  Clock& clock_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Limiter>> limiters_;  // GUARDED_BY(mu_)
  std::mutex round_mu_;  // one rebalance at a time; guards the members below
  std::optional<std::chrono::nanoseconds> last_round_;
  LendingStatus status_;
  std::mutex thread_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;  // GUARDED_BY(thread_mu_)
  std::thread thread_;
};

// A change of a container's resources: the fields given. With for_ms > 0 it is time-bounded:
// only iops and bandwidth, which revert to the base values for_ms after now.
struct ResourceChange {
  std::optional<uint64_t> cpu_millis, memory_bytes, net_bps, iops, bandwidth;
  std::optional<uint64_t> priority;
  uint64_t for_ms = 0;
  // A limit that follows the forecast (forecast.h): on (`--iops auto`, with the floor and
  // ceiling given, or the ones it had, or a default floor), or a change of the floor or ceiling
  // of one already on (on false). A number for iops/bandwidth turns it off.
  struct AutoChange {
    bool on = false;
    std::optional<uint64_t> floor, ceiling;
  };
  std::optional<AutoChange> auto_iops, auto_bandwidth;
  bool empty() const {
    return !cpu_millis && !memory_bytes && !net_bps && !iops && !bandwidth && !priority &&
           !auto_iops && !auto_bandwidth;
  }
};

// `r` changed by `c` at `now_ms`. A timed change that has ended is dropped. A timed change sets
// its fields of the timed part and its end (now + for_ms, one end for the whole part); a
// lasting change of iops or bandwidth sets the base and ends a timed change of that field.
// Errors: EINVAL (nothing to change; priority outside 1..10; --for with cpu, memory, net or
// priority, or without iops or bandwidth, or with auto; a floor above the ceiling; a floor or
// ceiling for a limit that is not auto).
Result<Resources> apply_change(Resources r, const ResourceChange& c, uint64_t now_ms);

// The resources of container `name`. Errors: ENOENT, those of the read.
Result<Resources> load_resources(Pool& pool, const std::string& name);
// apply_change on container `name`'s record in one transaction. Errors: apply_change's,
// ENOENT, EROFS (a read-only pool), those of the transaction.
Result<Resources> change_resources(Pool& pool, const std::string& name, const ResourceChange& c,
                                   uint64_t now_ms);

// "2", "0.5", "1.25" CPUs -> thousandths ("none" or "0": 0). Errors: EINVAL naming the text.
Result<uint64_t> parse_cpu(std::string_view text);
// Thousandths of a CPU as the shortest decimal: 2000 -> "2", 500 -> "0.5".
std::string format_cpu(uint64_t millis);
// A count ("2000", "none" or "0": 0). Errors: EINVAL naming the text.
Result<uint64_t> parse_count(std::string_view text);
// The wall clock in unix milliseconds.
uint64_t now_unix_ms();

}  // namespace layer
