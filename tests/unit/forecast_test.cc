// Unit tests for lib/forecast.h: the seasonal forecast on synthetic history with explicit
// times (a daily pattern busy 09-17, EWMA weights, the fallback when a slot has no history,
// weekly slots after two weeks, the current hour left out), the auto limit's clamp, the auto
// settings in the container record and in apply_change, and the forecast and the auto-limit
// cache over a real pool's stats rows written by lib/stats's writer API.
#include <atomic>
#include <cmath>
#include <thread>

#include "forecast.h"
#include "qos.h"
#include "stats.h"
#include "test_util.h"

using namespace layer;

namespace {

constexpr uint64_t kDay = 86400;
constexpr uint64_t kDay0 = 20'000 * kDay;  // a midnight UTC (2024-10-04)

// `days` days of minutes from kDay0: `busy` ops a minute from 09:00 to 17:00 UTC, `idle` else,
// 4 KiB each.
std::vector<HistoryPoint> office_hours(int days, uint64_t busy, uint64_t idle) {
  std::vector<HistoryPoint> out;
  for (uint64_t m = kDay0 / 60; m < (kDay0 + days * kDay) / 60; ++m) {
    const uint64_t hour_of_day = (m / 60) % 24;
    const uint64_t ops = hour_of_day >= 9 && hour_of_day < 17 ? busy : idle;
    out.push_back({m, ops, ops * 4096});
  }
  return out;
}

bool near(double a, double b, double tolerance = 1e-6) { return std::abs(a - b) <= tolerance; }

}  // namespace

TEST_CASE("a daily pattern busy 09-17: tomorrow's 10:00 is forecast busy, 03:00 quiet") {
  const auto history = office_hours(6, 600, 6);              // 10 ops/s busy, 0.1 idle
  const uint64_t now = kDay0 + 5 * kDay + 22 * 3600 + 1800;  // day 5, 22:30
  const Forecast f = build_forecast(history, now);           // the rows after now are left out
  CHECK(f.season == Season::kDaily);
  CHECK(f.first_hour == kDay0 / 3600);
  CHECK(f.history_hours == 5 * 24 + 22);
  const uint64_t tomorrow = kDay0 + 6 * kDay;
  const HourForecast ten = forecast_hour(f, tomorrow + 10 * 3600 + 120);
  CHECK(ten.start == tomorrow + 10 * 3600);
  CHECK(ten.basis == HourForecast::Basis::kSlot);
  CHECK(ten.samples == 6);  // six past 10:00s
  CHECK(near(ten.rates.iops, 10.0));
  CHECK(near(ten.rates.peak_iops, 10.0));
  CHECK(near(ten.rates.bps, 10.0 * 4096));
  const HourForecast three = forecast_hour(f, tomorrow + 3 * 3600);
  CHECK(three.samples == 6);
  CHECK(near(three.rates.iops, 0.1));
  // Today's 22:00 is not over: its slot has the five earlier days only; 21:00 has six.
  CHECK(forecast_hour(f, tomorrow + 22 * 3600).samples == 5);
  CHECK(forecast_hour(f, tomorrow + 21 * 3600).samples == 6);

  // The next 24 hours from now: busy exactly from 09:00 to 16:00 inclusive.
  const auto hours = forecast_hours(f, now, 24);
  REQUIRE(hours.size() == 24);
  CHECK(hours[0].start == now / 3600 * 3600);
  for (const auto& h : hours) {
    const uint64_t hod = (h.start / 3600) % 24;
    CHECK(near(h.rates.iops, hod >= 9 && hod < 17 ? 10.0 : 0.1));
  }
  // The lead window: from 08:10, 50 minutes ahead reaches 09:00; 40 minutes does not.
  CHECK(near(predicted_iops(f, tomorrow + 8 * 3600 + 600, 3000), 10.0));
  CHECK(near(predicted_iops(f, tomorrow + 8 * 3600 + 600, 2400), 0.1));
}

TEST_CASE("each slot is an EWMA of its hours, newest weighted alpha; idle hours count as 0") {
  // 10:00 on three days: 100, 200, then 400 ops a minute for the whole hour; nothing else.
  std::vector<HistoryPoint> history;
  const uint64_t per_minute[] = {100, 200, 400};
  for (int d = 0; d < 3; ++d)
    for (uint64_t m = 0; m < 60; ++m)
      history.push_back({(kDay0 + d * kDay + 10 * 3600) / 60 + m, per_minute[d], 0});
  const uint64_t now = kDay0 + 3 * kDay;  // midnight after the third day
  ForecastOptions o;
  o.alpha = 0.5;
  Forecast f = build_forecast(history, now, o);
  // (100, 200, 400)/60 ops/s: 100/60, then .5*200/60 + .5*100/60, then .5*400/60 + .5*that.
  const double expected = 0.5 * 400.0 / 60 + 0.5 * (0.5 * 200.0 / 60 + 0.5 * 100.0 / 60);
  HourForecast ten = forecast_hour(f, now + 10 * 3600);
  CHECK(near(ten.rates.iops, expected));
  CHECK(ten.samples == 3);
  // alpha 1: the last day only.
  o.alpha = 1.0;
  f = build_forecast(history, now, o);
  CHECK(near(forecast_hour(f, now + 10 * 3600).rates.iops, 400.0 / 60));
  // 11:00 had no rows on any of the three days: idle, not unknown.
  ten = forecast_hour(f, now + 11 * 3600);
  CHECK(ten.basis == HourForecast::Basis::kSlot);
  CHECK(ten.samples == 3);  // days 0, 1 and 2 (the history starts at day 0's 10:00)
  CHECK(ten.rates.iops == 0);
}

TEST_CASE("sparse history: a slot without hours falls back to the recent EWMA; none gives 0") {
  // Three hours of history today, 10:00 to 12:59, 60 ops a minute; now 13:30.
  std::vector<HistoryPoint> history;
  for (uint64_t m = (kDay0 + 10 * 3600) / 60; m < (kDay0 + 13 * 3600) / 60; ++m)
    history.push_back({m, 60, 60 * 512});
  const uint64_t now = kDay0 + 13 * 3600 + 1800;
  const Forecast f = build_forecast(history, now);
  CHECK(f.season == Season::kDaily);
  CHECK(f.history_hours == 3);
  const HourForecast evening = forecast_hour(f, kDay0 + 20 * 3600);
  CHECK(evening.basis == HourForecast::Basis::kRecent);
  CHECK(evening.samples == 3);
  CHECK(near(evening.rates.iops, 1.0));
  const HourForecast tomorrow_eleven = forecast_hour(f, kDay0 + kDay + 11 * 3600);
  CHECK(tomorrow_eleven.basis == HourForecast::Basis::kSlot);
  CHECK(tomorrow_eleven.samples == 1);

  // Rows of the current hour only: not history yet.
  const Forecast current = build_forecast({{now / 60, 1000, 1}}, now);
  CHECK(current.season == Season::kNone);
  const HourForecast none = forecast_hour(current, now + 3600);
  CHECK(none.basis == HourForecast::Basis::kNone);
  CHECK(none.rates.iops == 0);
  CHECK(predicted_iops(current, now, 7200) == 0);
  CHECK(build_forecast({}, now).season == Season::kNone);
}

TEST_CASE("two weeks of history give hour-of-week slots: a quiet weekend stays quiet") {
  // Busy every hour on weekdays, idle at weekends (kDay0 is a Friday: day 1 and 2 are the
  // weekend), for 15 days.
  std::vector<HistoryPoint> history;
  for (int d = 0; d < 15; ++d) {
    const bool weekend = d % 7 == 1 || d % 7 == 2;
    for (uint64_t m = 0; m < 24 * 60; m += 30)
      history.push_back({(kDay0 + d * kDay) / 60 + m, weekend ? 0u : 1200u, 0});
  }
  const uint64_t now = kDay0 + 15 * kDay;  // day 15: Saturday
  const Forecast f = build_forecast(history, now);
  CHECK(f.season == Season::kWeekly);
  REQUIRE(f.slots.size() == 168);
  const HourForecast saturday = forecast_hour(f, now + 12 * 3600);
  CHECK(saturday.samples == 2);
  CHECK(saturday.rates.iops == 0);
  const HourForecast monday = forecast_hour(f, now + 2 * kDay + 12 * 3600);
  CHECK(monday.rates.iops > 0);
  // Under two weeks the same history is daily: Saturday noon averages in the weekdays.
  ForecastOptions o;
  o.weekly_after_hours = 10000;
  const Forecast daily = build_forecast(history, now, o);
  CHECK(daily.season == Season::kDaily);
  CHECK(forecast_hour(daily, now + 12 * 3600).rates.iops > 0);
}

TEST_CASE("the auto limit: peak x headroom, clamped to floor and ceiling") {
  Resources::AutoLimit a{true, 20, 5000};
  CHECK(derive_auto_limit(a, 100.0) == 150);          // 100 x 1.5
  CHECK(derive_auto_limit(a, 100.2) == 151);          // rounded up
  CHECK(derive_auto_limit(a, 1.0) == 20);             // the floor
  CHECK(derive_auto_limit(a, 9000.0) == 5000);        // the ceiling
  CHECK(derive_auto_limit(a, std::nullopt) == 5000);  // no history: the ceiling
  a.ceiling = 0;
  CHECK(derive_auto_limit(a, 1e6) == 1'500'000);   // no ceiling
  CHECK(derive_auto_limit(a, std::nullopt) == 0);  // no history, no ceiling: unlimited
  a.floor = 0;
  CHECK(derive_auto_limit(a, 0.0) == 1);  // never 0 (which would mean unlimited)

  // derive_auto: this hour's forecast peak, or the last hour's when that was higher.
  Resources r;
  r.iops = 777;  // the base value: replaced while auto is on
  r.auto_iops = {true, 10, 1000};
  const auto history = office_hours(3, 600, 6);  // peaks 10/s busy, 0.1/s idle
  const uint64_t three_am = kDay0 + 3 * kDay + 3 * 3600 + 60;
  AutoDerived d = derive_auto(r, build_forecast(history, three_am), three_am);
  REQUIRE(d.peak_iops);
  CHECK(near(*d.peak_iops, 0.1));
  CHECK(d.iops == 10);  // 0.15 → the floor
  CHECK(d.bandwidth == 0);
  CHECK(with_auto(r, d).iops == 10);
  const uint64_t ten_am = kDay0 + 3 * kDay + 10 * 3600;
  d = derive_auto(r, build_forecast(history, ten_am), ten_am);
  CHECK(d.iops == 15);  // 10 x 1.5
  // Demand above the pattern in the last hour: the limit follows it.
  auto surge = history;
  for (uint64_t m = 0; m < 60; ++m) surge.push_back({(ten_am - 3600) / 60 + m, 24'000, 0});
  d = derive_auto(r, build_forecast(surge, ten_am), ten_am);
  CHECK(d.iops == 600);  // 24000 a minute: 400/s x 1.5
  r.auto_iops.on = false;
  CHECK(with_auto(r, derive_auto(r, build_forecast(surge, ten_am), ten_am)).iops == 777);
}

TEST_CASE("auto limits in the container record: trailing, old rows and default rows unchanged",
          "[records]") {
  ContainerRecord c;
  c.name = "vm1";
  c.id = 3;
  c.delta_layer = 4;
  c.size_bytes = 1 << 20;
  c.block_size = 4096;
  const std::string plain = encode(c);
  c.resources.iops = 2000;
  const std::string with_resources = encode(c);
  c.resources.auto_iops = {true, 100, 4000};
  const std::string with_auto_row = encode(c);
  // A row without auto limits is what a build before them wrote, byte for byte.
  CHECK(with_resources.size() > plain.size());
  CHECK(with_auto_row.size() == with_resources.size() + 1 + 2 * 17);
  CHECK(with_auto_row.substr(0, with_resources.size()) == with_resources);
  const ContainerRecord back = MUST(decode_container(with_auto_row, "vm1"));
  CHECK(back.resources == c.resources);
  CHECK(MUST(decode_container(with_resources, "vm1")).resources.auto_iops ==
        Resources::AutoLimit{});
  // Only auto, base values default: the resources part is written so the auto part can follow.
  ContainerRecord only = c;
  only.resources = {};
  only.resources.auto_bandwidth = {true, 1 << 20, 0};
  CHECK(MUST(decode_container(encode(only), "vm1")).resources == only.resources);
  // Damaged: truncated, a bad tag, an "on" that is not 0 or 1.
  for (size_t n = with_resources.size() + 1; n < with_auto_row.size(); ++n)
    CHECK(test::error_of(decode_container(with_auto_row.substr(0, n), "vm1"), "").code == EIO);
  std::string bad = with_auto_row;
  bad[with_resources.size()] = 9;
  CHECK(test::error_of(decode_container(bad, "vm1"), "").code == EIO);
  bad = with_auto_row;
  bad[with_resources.size() + 1] = 2;
  CHECK(test::error_of(decode_container(bad, "vm1"), "").code == EIO);

  // The tier policy's prewarm: written only when set.
  TierPolicy p;
  const std::string policy = encode(p);
  p.prewarm_s = 1800;
  const std::string warm = encode(p);
  CHECK(warm.size() == policy.size() + 8);
  CHECK(MUST(decode_tier_policy(warm)).prewarm_s == 1800);
  CHECK(MUST(decode_tier_policy(policy)).prewarm_s == 0);
}

TEST_CASE("apply_change: --iops auto with a floor and ceiling; a number ends it") {
  const uint64_t now = 1'800'000'000'000;
  ResourceChange c;
  c.auto_iops = ResourceChange::AutoChange{true, std::nullopt, 5000};
  Resources r = MUST(apply_change({}, c, now));
  CHECK(r.auto_iops == Resources::AutoLimit{true, kAutoIopsFloor, 5000});
  // A floor alone changes an auto limit that is on, keeping the ceiling.
  c.auto_iops = ResourceChange::AutoChange{false, 50, std::nullopt};
  r = MUST(apply_change(r, c, now));
  CHECK(r.auto_iops == Resources::AutoLimit{true, 50, 5000});
  // ... and is refused for one that is off, as is a floor above the ceiling and --for.
  CHECK(test::error_of(apply_change({}, c, now), "").code == EINVAL);
  c.auto_iops = ResourceChange::AutoChange{true, 6000, std::nullopt};
  CHECK(test::error_of(apply_change(r, c, now), "").code == EINVAL);
  c.auto_iops = ResourceChange::AutoChange{true, std::nullopt, std::nullopt};
  c.for_ms = 60'000;
  CHECK(test::error_of(apply_change(r, c, now), "").code == EINVAL);
  // A timed change of iops in force ends when auto starts (a lasting change, as a number is).
  ResourceChange timed;
  timed.iops = 9;
  timed.for_ms = 60'000;
  Resources t = MUST(apply_change({}, timed, now));
  c.for_ms = 0;
  t = MUST(apply_change(t, c, now));
  CHECK(t.auto_iops.on);
  CHECK(t.timed.until_ms == 0);
  // A number turns auto off.
  ResourceChange number;
  number.iops = 300;
  r = MUST(apply_change(r, number, now));
  CHECK(r.iops == 300);
  CHECK(r.auto_iops == Resources::AutoLimit{});
  // Bandwidth: its own default floor.
  ResourceChange bw;
  bw.auto_bandwidth = ResourceChange::AutoChange{true, std::nullopt, std::nullopt};
  CHECK(MUST(apply_change({}, bw, now)).auto_bandwidth.floor == kAutoBandwidthFloor);
}

TEST_CASE("the forecast and the auto-limit cache over a pool's stats rows") {
  test::PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 1);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  uint64_t id = 0;
  {
    auto txn = MUST(f.pool->index().begin_read());
    id = MUST(f.pool->get_container(txn, "c")).id;
  }
  // Two days of history through the stats writer's API: at 10:00 one minute of 6000 reads
  // (a peak of 100/s), at 03:00 one minute of 60.
  StatsTable table;
  auto counters = table.acquire(id, "c");
  for (int d = 0; d < 2; ++d) {
    for (int i = 0; i < 6000; ++i) counters->record(IoOp::kRead, 4096, 1000);
    MUST(persist_stats(*f.pool, table, (kDay0 + d * kDay + 10 * 3600) / 60 + 5));
    for (int i = 0; i < 60; ++i) counters->record(IoOp::kWrite, 4096, 1000);
    MUST(persist_stats(*f.pool, table, (kDay0 + d * kDay + 3 * 3600) / 60 + 5));
  }
  const uint64_t ten = kDay0 + 2 * kDay + 10 * 3600 + 30;
  {
    auto txn = MUST(f.pool->index().begin_read());
    const Forecast fc = MUST(load_forecast(txn, id, ten));
    CHECK(fc.season == Season::kDaily);
    const HourForecast h = forecast_hour(fc, ten);
    CHECK(h.samples == 2);
    CHECK(near(h.rates.peak_iops, 100.0));
    CHECK(near(h.rates.iops, 6000.0 / 3600));
    // 03:00: 1/s on days 0 and 1, idle today (no row): 0.5 x 0 + 0.5 x 1.
    const HourForecast three = forecast_hour(fc, ten - 7 * 3600);
    CHECK(three.samples == 3);
    CHECK(near(three.rates.peak_iops, 0.5));
  }
  Resources r;
  r.auto_iops = {true, 5, 0};
  AutoLimitCache cache;
  auto got = MUST(cache.resolve(*f.pool, id, r, ten));
  CHECK(got.changed);
  CHECK(got.derived.iops == 150);
  CHECK(got.resources.iops == 150);
  // The same hour and settings: from the cache, unchanged.
  got = MUST(cache.resolve(*f.pool, id, r, ten + 600));
  CHECK_FALSE(got.changed);
  CHECK(got.resources.iops == 150);
  // New settings: derived again.
  r.auto_iops.ceiling = 120;
  got = MUST(cache.resolve(*f.pool, id, r, ten + 600));
  CHECK(got.changed);
  CHECK(got.resources.iops == 120);
  // The next hour (11:00: idle on both days, and the last hour, 10:00, had no rows today).
  got = MUST(cache.resolve(*f.pool, id, r, ten + 3600));
  CHECK(got.changed);
  CHECK(got.resources.iops == 5);
  // Without auto: the record's values, nothing read.
  Resources plain;
  plain.iops = 42;
  CHECK(limiter_resources(*f.pool, cache, id, plain, ten).iops == 42);
}

TEST_CASE("the server's pass: auto limits applied to its limiters when derived anew, hourly") {
  test::PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 1);
  MUST(f.pool->clone("base:1", "auto", std::nullopt));
  MUST(f.pool->clone("base:1", "fixed", std::nullopt));
  uint64_t id = 0;
  {
    auto txn = MUST(f.pool->index().begin_read());
    id = MUST(f.pool->get_container(txn, "auto")).id;
  }
  // A day of history: every hour one minute of 6000 reads (a peak of 100/s).
  StatsTable table;
  auto counters = table.acquire(id, "auto");
  for (uint64_t h = 0; h < 24; ++h) {
    for (int i = 0; i < 6000; ++i) counters->record(IoOp::kRead, 4096, 1000);
    MUST(persist_stats(*f.pool, table, (kDay0 + h * 3600) / 60 + 1));
  }
  ResourceChange fixed;
  fixed.iops = 70;
  MUST(change_resources(*f.pool, "fixed", fixed, 0));
  ManualClock clock;
  LimiterTable limiters(clock);
  auto auto_limiter = limiters.acquire("auto", {});
  auto fixed_limiter = limiters.acquire("fixed", MUST(load_resources(*f.pool, "fixed")));
  AutoLimitCache cache;
  const uint64_t now = kDay0 + kDay + 10 * 3600 + 60;
  // Not auto yet: nothing to do.
  CHECK(refresh_auto_limits(*f.pool, cache, limiters, now).empty());
  CHECK(auto_limiter->limits().iops == 0);
  ResourceChange c;
  c.auto_iops = ResourceChange::AutoChange{true, 10, 1000};
  MUST(change_resources(*f.pool, "auto", c, 0));
  auto lines = refresh_auto_limits(*f.pool, cache, limiters, now);
  REQUIRE(lines.size() == 1);
  CHECK(lines[0] == "auto limits of auto: iops 150, bandwidth 0");
  CHECK(auto_limiter->limits().iops == 150);
  CHECK(fixed_limiter->limits().iops == 70);
  // The same hour: nothing new. The next hour (whose slot and last hour were as busy): the same
  // value, not applied again.
  CHECK(refresh_auto_limits(*f.pool, cache, limiters, now + 600).empty());
  CHECK(refresh_auto_limits(*f.pool, cache, limiters, now + 3600).empty());
  // A lower ceiling is applied at the next pass.
  c.auto_iops = ResourceChange::AutoChange{false, std::nullopt, 90};
  MUST(change_resources(*f.pool, "auto", c, 0));
  lines = refresh_auto_limits(*f.pool, cache, limiters, now + 3600);
  REQUIRE(lines.size() == 1);
  CHECK(auto_limiter->limits().iops == 90);
}

TEST_CASE("the stats writer calls each_minute on its thread with the clock's time") {
  test::PoolFixture f;
  StatsTable table;
  ManualClock clock(1'800'000'000'000);
  std::atomic<uint64_t> seen{0};
  StatsWriter::Options o;
  o.interval = std::chrono::milliseconds(10);
  o.clock = &clock;
  o.each_minute = [&](uint64_t now) { seen = now; };
  auto writer = MUST(StatsWriter::start(*f.pool, table, o));
  for (int i = 0; i < 1000 && seen == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(seen == 1'800'000'000);
}
