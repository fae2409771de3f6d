// qos.cc — token buckets, per-export limiters and changes of a container's resources (qos.h).
#include "qos.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <system_error>

#include "capacity.h"
#include "forecast.h"
#include "index.h"
#include "pool.h"

namespace layer {
namespace {

using Nanos = std::chrono::nanoseconds;

class RealClock final : public Clock {
 public:
  Nanos monotonic() override {
    return std::chrono::duration_cast<Nanos>(std::chrono::steady_clock::now().time_since_epoch());
  }
  uint64_t unix_ms() override { return now_unix_ms(); }
  void wait(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Nanos d) override {
    cv.wait_for(lock, d);
  }
};

}  // namespace

Clock& real_clock() {
  static RealClock* clock = new RealClock;  // never destroyed: servers' threads may outlive main
  return *clock;
}

uint64_t now_unix_ms() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// ---- TokenBucket ----

void TokenBucket::refill(Nanos now) {
  if (rate_ == 0) return;
  if (now > last_) {
    const double earned =
        static_cast<double>((now - last_).count()) * 1e-9 * static_cast<double>(rate_);
    tokens_ = std::min(tokens_ + earned, static_cast<double>(rate_));
  }
  last_ = std::max(last_, now);
}

void TokenBucket::set_rate(uint64_t rate, Nanos now) {
  if (rate_ == 0) {
    tokens_ = static_cast<double>(rate);  // from unlimited: full
  } else {
    refill(now);
    tokens_ = std::min(tokens_, static_cast<double>(rate));
  }
  rate_ = rate;
  last_ = now;
}

Nanos TokenBucket::wait_time(Nanos now) {
  refill(now);
  if (rate_ == 0 || tokens_ >= 0) return Nanos(0);
  // At least a nanosecond: a rounding to 0 would spin.
  return Nanos(std::max<int64_t>(
      1, static_cast<int64_t>(std::ceil(-tokens_ / static_cast<double>(rate_) * 1e9))));
}

void TokenBucket::take(uint64_t n, Nanos now) {
  if (rate_ == 0) return;
  refill(now);
  tokens_ -= static_cast<double>(n);
}

double TokenBucket::tokens(Nanos now) {
  refill(now);
  return tokens_;
}

// ---- Limiter ----

void Limiter::update_locked(uint64_t now_ms) {
  const Nanos now = clock_.monotonic();
  const uint64_t iops = resources_.effective_iops(now_ms);
  const uint64_t bandwidth = resources_.effective_bandwidth(now_ms);
  ops_.set_rate(iops == 0 ? 0 : iops + loan_iops_, now);
  bytes_.set_rate(bandwidth == 0 ? 0 : bandwidth + loan_bandwidth_, now);
  switch_ms_ = resources_.timed_active(now_ms) ? resources_.timed.until_ms : 0;
  active_.store(ops_.rate() != 0 || bytes_.rate() != 0 || switch_ms_ != 0,
                std::memory_order_relaxed);
}

void Limiter::apply(const Resources& r) {
  {
    std::lock_guard lock(mu_);
    resources_ = r;
    update_locked(clock_.unix_ms());
  }
  changed_.notify_all();
}

Limiter::Limits Limiter::limits() {
  std::lock_guard lock(mu_);
  if (switch_ms_ != 0 && clock_.unix_ms() >= switch_ms_) update_locked(clock_.unix_ms());
  return {ops_.rate(), bytes_.rate(), switch_ms_};
}

void Limiter::admit_slow(uint64_t bytes) {
  // Counted for the lending (LimiterTable::rebalance) and `layer pool status`.
  count_ops_.fetch_add(1, std::memory_order_relaxed);
  count_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  std::unique_lock lock(mu_);
  for (;;) {
    if (switch_ms_ != 0) {
      const uint64_t now_ms = clock_.unix_ms();
      if (now_ms >= switch_ms_) update_locked(now_ms);
    }
    const Nanos now = clock_.monotonic();
    const Nanos wait_ops = ops_.wait_time(now);
    const Nanos wait_bytes = bytes_.wait_time(now);
    if (wait_ops > Nanos(0)) waited_ops_.store(true, std::memory_order_relaxed);
    if (wait_bytes > Nanos(0)) waited_bytes_.store(true, std::memory_order_relaxed);
    Nanos wait = std::max(wait_ops, wait_bytes);
    if (wait == Nanos(0)) {
      ops_.take(1, now);
      bytes_.take(bytes, now);
      return;
    }
    // Wake for the end of a timed change too: the limits change then.
    if (switch_ms_ != 0) {
      const uint64_t now_ms = clock_.unix_ms();
      const Nanos until_switch =
          std::chrono::milliseconds(switch_ms_ > now_ms ? switch_ms_ - now_ms : 0);
      wait = std::max(Nanos(1), std::min(wait, until_switch));
    }
    clock_.wait(lock, changed_, wait);
  }
}

Limiter::Window Limiter::sample() {
  Window w;
  w.ops = count_ops_.exchange(0, std::memory_order_relaxed);
  w.bytes = count_bytes_.exchange(0, std::memory_order_relaxed);
  w.waited_ops = waited_ops_.exchange(false, std::memory_order_relaxed);
  w.waited_bytes = waited_bytes_.exchange(false, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  const uint64_t now_ms = clock_.unix_ms();
  w.iops = resources_.effective_iops(now_ms);
  w.bandwidth = resources_.effective_bandwidth(now_ms);
  w.priority = resources_.priority;
  return w;
}

void Limiter::lend(uint64_t iops, uint64_t bandwidth) {
  {
    std::lock_guard lock(mu_);
    if (iops == loan_iops_ && bandwidth == loan_bandwidth_) return;
    loan_iops_ = iops;
    loan_bandwidth_ = bandwidth;
    update_locked(clock_.unix_ms());
  }
  changed_.notify_all();
}

// ---- lending ----

std::vector<LendingShare> plan_loans(const std::vector<LendingInput>& in, uint64_t capacity) {
  std::vector<LendingShare> out(in.size());
  if (capacity == 0) return out;
  double kept = 0, lendable = 0, weight = 0;
  std::vector<double> spare(in.size(), 0);
  for (size_t i = 0; i < in.size(); ++i) {
    const auto& d = in[i];
    if (d.reserved == 0) continue;
    const double r = static_cast<double>(d.reserved);
    out[i].busy = d.waited || d.used >= 0.9 * r;
    if (out[i].busy) {
      kept += r;
      weight += d.priority;
    } else {
      const double keep = std::min(r, 2 * d.used);
      kept += keep;
      spare[i] = r - keep;
      lendable += spare[i];
    }
  }
  const double pot = static_cast<double>(capacity) - kept;
  if (weight == 0 || pot <= 0) return out;
  double handed = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!out[i].busy) continue;
    out[i].borrowed = static_cast<uint64_t>(pot * in[i].priority / weight);
    handed += static_cast<double>(out[i].borrowed);
  }
  // The idle owners' part of what was handed out (the rest is capacity nobody reserved).
  const double from_owners = std::min(handed, lendable);
  for (size_t i = 0; i < in.size(); ++i)
    if (spare[i] > 0) out[i].lent = static_cast<uint64_t>(from_owners * spare[i] / lendable);
  return out;
}

// ---- LimiterTable ----

void LimiterTable::rebalance(const LendingCapacity& capacity) {
  std::vector<std::pair<std::string, std::shared_ptr<Limiter>>> all;
  {
    std::lock_guard lock(mu_);
    all.assign(limiters_.begin(), limiters_.end());
  }
  std::lock_guard round(round_mu_);
  const Nanos now = clock_.monotonic();
  std::vector<Limiter::Window> windows;
  windows.reserve(all.size());
  for (auto& [name, limiter] : all) windows.push_back(limiter->sample());
  const bool first = !last_round_;
  const double window_s =
      first ? 0 : std::max(1e-3, static_cast<double>((now - *last_round_).count()) * 1e-9);
  last_round_ = now;
  if (first) return;
  std::vector<LendingInput> iops(all.size()), bandwidth(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    const auto& w = windows[i];
    iops[i] = {w.iops, static_cast<double>(w.ops) / window_s, w.waited_ops, w.priority};
    bandwidth[i] = {w.bandwidth, static_cast<double>(w.bytes) / window_s, w.waited_bytes,
                    w.priority};
  }
  const auto iops_plan = plan_loans(iops, capacity.iops);
  const auto bandwidth_plan = plan_loans(bandwidth, capacity.bandwidth);
  LendingStatus st;
  st.capacity = capacity;
  st.window_s = window_s;
  for (size_t i = 0; i < all.size(); ++i) {
    all[i].second->lend(iops_plan[i].borrowed, bandwidth_plan[i].borrowed);
    ContainerLending c;
    c.container = all[i].first;
    c.priority = windows[i].priority;
    c.measured = windows[i].iops != 0 || windows[i].bandwidth != 0;
    c.iops = {iops[i].reserved, iops[i].used, iops_plan[i].borrowed, iops_plan[i].lent};
    c.bandwidth = {bandwidth[i].reserved, bandwidth[i].used, bandwidth_plan[i].borrowed,
                   bandwidth_plan[i].lent};
    st.containers.push_back(std::move(c));
  }
  status_ = std::move(st);
}

LendingStatus LimiterTable::lending_status() {
  std::lock_guard round(round_mu_);
  return status_;
}

Status LimiterTable::start_lending(std::function<LendingCapacity()> capacity,
                                   std::chrono::milliseconds interval) {
  try {
    thread_ = std::thread([this, capacity = std::move(capacity), interval] {
      std::unique_lock lock(thread_mu_);
      while (!stop_) {
        lock.unlock();
        rebalance(capacity());
        lock.lock();
        stop_cv_.wait_for(lock, interval, [this] { return stop_; });
      }
    });
  } catch (const std::system_error& e) {
    return make_error(EAGAIN, "lending thread: {}", e.what());
  }
  return {};
}

LimiterTable::~LimiterTable() {
  {
    std::lock_guard lock(thread_mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<Limiter> LimiterTable::acquire(const std::string& container, const Resources& r) {
  std::shared_ptr<Limiter> limiter;
  {
    std::lock_guard lock(mu_);
    auto& slot = limiters_[container];
    if (!slot) slot = std::make_shared<Limiter>(clock_);
    limiter = slot;
  }
  limiter->apply(r);
  return limiter;
}

bool LimiterTable::apply(const std::string& container, const Resources& r) {
  std::shared_ptr<Limiter> limiter;
  {
    std::lock_guard lock(mu_);
    auto it = limiters_.find(container);
    if (it == limiters_.end()) return false;
    limiter = it->second;
  }
  limiter->apply(r);
  return true;
}

std::vector<std::string> LimiterTable::names() {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, limiter] : limiters_) out.push_back(name);
  return out;
}

// ---- changes ----

Result<Resources> apply_change(Resources r, const ResourceChange& c, uint64_t now_ms) {
  if (c.empty()) return make_error(EINVAL, "nothing to change: give a resource to set");
  if (c.priority && (*c.priority < 1 || *c.priority > 10))
    return make_error(EINVAL, "priority {}: must be 1 to 10", *c.priority);
  if (!r.timed_active(now_ms)) r.timed = {};  // ended: it reverted by itself
  if (c.for_ms > 0) {
    if (c.cpu_millis || c.memory_bytes || c.net_bps || c.priority)
      return make_error(EINVAL,
                        "a time-bounded change (--for) changes only iops and bandwidth; set cpu, "
                        "memory, net and priority without --for");
    if (c.auto_iops || c.auto_bandwidth)
      return make_error(EINVAL,
                        "a time-bounded change (--for) sets a number: an auto limit lasts until "
                        "changed");
    if (!c.iops && !c.bandwidth)
      return make_error(EINVAL, "a time-bounded change (--for) needs --iops or --bandwidth");
    if (c.iops) r.timed.iops = *c.iops;
    if (c.bandwidth) r.timed.bandwidth = *c.bandwidth;
    r.timed.until_ms = now_ms + c.for_ms;
    return r;
  }
  if (c.cpu_millis) r.cpu_millis = *c.cpu_millis;
  if (c.memory_bytes) r.memory_bytes = *c.memory_bytes;
  if (c.net_bps) r.net_bps = *c.net_bps;
  if (c.priority) r.priority = static_cast<uint8_t>(*c.priority);
  if (c.iops) {
    r.iops = *c.iops;
    r.timed.iops = Resources::kKeep;
  }
  if (c.bandwidth) {
    r.bandwidth = *c.bandwidth;
    r.timed.bandwidth = Resources::kKeep;
  }
  if (c.iops) r.auto_iops = {};
  if (c.bandwidth) r.auto_bandwidth = {};
  auto change_auto = [](const char* what, Resources::AutoLimit& a,
                        const ResourceChange::AutoChange& ch, uint64_t default_floor) -> Status {
    if (!ch.on && !a.on)
      return make_error(EINVAL, "{} is not auto: a floor or ceiling needs --{} auto", what, what);
    if (ch.on && !a.on) a = {true, default_floor, 0};
    if (ch.floor) a.floor = *ch.floor;
    if (ch.ceiling) a.ceiling = *ch.ceiling;
    if (a.ceiling != 0 && a.floor > a.ceiling)
      return make_error(EINVAL, "{}: the floor ({}) is above the ceiling ({})", what, a.floor,
                        a.ceiling);
    return {};
  };
  if (c.auto_iops) {
    LAYER_TRY(change_auto("iops", r.auto_iops, *c.auto_iops, kAutoIopsFloor));
    r.timed.iops = Resources::kKeep;
  }
  if (c.auto_bandwidth) {
    LAYER_TRY(change_auto("bandwidth", r.auto_bandwidth, *c.auto_bandwidth, kAutoBandwidthFloor));
    r.timed.bandwidth = Resources::kKeep;
  }
  if (r.timed.iops == Resources::kKeep && r.timed.bandwidth == Resources::kKeep) r.timed = {};
  return r;
}

Result<Resources> load_resources(Pool& pool, const std::string& name) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto c, pool.get_container(txn, name));
  return c.resources;
}

Result<Resources> change_resources(Pool& pool, const std::string& name, const ResourceChange& c,
                                   uint64_t now_ms) {
  LAYER_TRY(pool.check_writable());
  Resources after;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto rec, pool.get_container(txn, name));
    LAYER_ASSIGN(after, apply_change(rec.resources, c, now_ms));
    const ContainerRecord before = rec;
    rec.resources = after;
    // Admission against the pool's capacities, in this transaction (capacity.h).
    LAYER_TRY(check_admission(txn, rec, &before, now_ms));
    return txn.put(Db::kContainers, name, encode(rec));
  }));
  return after;
}

// ---- parsing ----

Result<uint64_t> parse_count(std::string_view text) {
  if (text == "none") return uint64_t{0};
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size())
    return make_error(EINVAL, "\"{}\" is not a count (a whole number, or none)", text);
  return v;
}

Result<uint64_t> parse_cpu(std::string_view text) {
  if (text == "none") return uint64_t{0};
  const auto bad = [&] {
    return make_error(EINVAL, "\"{}\" is not a number of CPUs (e.g. 2, 0.5, 1.25, or none)", text);
  };
  const size_t dot = text.find('.');
  const std::string_view whole = text.substr(0, dot);
  const std::string_view frac = dot == std::string_view::npos ? "" : text.substr(dot + 1);
  if (whole.empty() || frac.size() > 3 || (dot != std::string_view::npos && frac.empty()))
    return bad();
  uint64_t w = 0, f = 0;
  auto [end, ec] = std::from_chars(whole.data(), whole.data() + whole.size(), w);
  if (ec != std::errc() || end != whole.data() + whole.size() || w > 1'000'000) return bad();
  if (!frac.empty()) {
    auto [fend, fec] = std::from_chars(frac.data(), frac.data() + frac.size(), f);
    if (fec != std::errc() || fend != frac.data() + frac.size()) return bad();
    for (size_t i = frac.size(); i < 3; ++i) f *= 10;
  }
  return w * 1000 + f;
}

std::string format_cpu(uint64_t millis) {
  std::string s = std::to_string(millis / 1000);
  if (millis % 1000 != 0) {
    std::string frac = fmt::format("{:03}", millis % 1000);
    while (frac.back() == '0') frac.pop_back();
    s += "." + frac;
  }
  return s;
}

}  // namespace layer
