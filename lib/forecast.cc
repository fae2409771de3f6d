// forecast.cc — the seasonal forecast (forecast.h) and the limits derived from it.
#include "forecast.h"

#include <algorithm>
#include <cmath>

#include "pool.h"
#include "qos.h"
#include "stats.h"

namespace layer {
namespace {

constexpr uint64_t kHour = 3600;

void blend(HourRates& avg, const HourRates& x, double alpha, bool first) {
  if (first) {
    avg = x;
    return;
  }
  avg.iops = alpha * x.iops + (1 - alpha) * avg.iops;
  avg.bps = alpha * x.bps + (1 - alpha) * avg.bps;
  avg.peak_iops = alpha * x.peak_iops + (1 - alpha) * avg.peak_iops;
  avg.peak_bps = alpha * x.peak_bps + (1 - alpha) * avg.peak_bps;
}

size_t slot_of(Season season, uint64_t unix_hour) {
  return static_cast<size_t>(season == Season::kWeekly ? unix_hour % (7 * 24) : unix_hour % 24);
}

}  // namespace

const char* to_string(Season s) {
  switch (s) {
    case Season::kNone:
      return "none";
    case Season::kDaily:
      return "daily";
    case Season::kWeekly:
      return "weekly";
  }
  return "?";
}

const char* to_string(HourForecast::Basis b) {
  switch (b) {
    case HourForecast::Basis::kSlot:
      return "slot";
    case HourForecast::Basis::kRecent:
      return "recent";
    case HourForecast::Basis::kNone:
      return "none";
  }
  return "?";
}

std::vector<HistoryPoint> history_points(const std::vector<StatsMinute>& rows) {
  std::vector<HistoryPoint> out;
  out.reserve(rows.size());
  for (const auto& row : rows) {
    const auto& r = row.record;
    out.push_back({row.minute, r[IoOp::kRead].ops + r[IoOp::kWrite].ops,
                   r[IoOp::kRead].bytes + r[IoOp::kWrite].bytes});
  }
  return out;
}

Forecast build_forecast(const std::vector<HistoryPoint>& points, uint64_t now,
                        const ForecastOptions& options) {
  Forecast f;
  const uint64_t now_hour = now / kHour;
  const uint64_t oldest = now_hour > options.max_hours ? now_hour - options.max_hours : 0;
  // Per past hour: the sums and the busiest minute.
  struct Acc {
    uint64_t ops = 0, bytes = 0, peak_ops = 0, peak_bytes = 0;
  };
  // Points of one minute add up (the stats rows have one per minute; other callers may not).
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> minutes;
  for (const auto& p : points) {
    const uint64_t h = p.minute / 60;
    if (h >= now_hour || h < oldest) continue;
    auto& m = minutes[p.minute];
    m.first += p.ops;
    m.second += p.bytes;
  }
  std::map<uint64_t, Acc> hours;
  for (const auto& [minute, sums] : minutes) {
    Acc& a = hours[minute / 60];
    a.ops += sums.first;
    a.bytes += sums.second;
    a.peak_ops = std::max(a.peak_ops, sums.first);
    a.peak_bytes = std::max(a.peak_bytes, sums.second);
  }
  if (hours.empty()) return f;
  f.first_hour = hours.begin()->first;
  f.history_hours = now_hour - f.first_hour;
  f.season = f.history_hours >= options.weekly_after_hours ? Season::kWeekly : Season::kDaily;
  f.slots.resize(f.season == Season::kWeekly ? 7 * 24 : 24);
  // Every hour from the first on, in order; an hour without rows was idle.
  for (uint64_t h = f.first_hour; h < now_hour; ++h) {
    HourRates x;
    if (auto it = hours.find(h); it != hours.end()) {
      x.iops = static_cast<double>(it->second.ops) / kHour;
      x.bps = static_cast<double>(it->second.bytes) / kHour;
      x.peak_iops = static_cast<double>(it->second.peak_ops) / 60;
      x.peak_bps = static_cast<double>(it->second.peak_bytes) / 60;
    }
    Forecast::Slot& s = f.slots[slot_of(f.season, h)];
    blend(s.rates, x, options.alpha, s.samples == 0);
    ++s.samples;
    blend(f.recent.rates, x, options.recent_alpha, f.recent.samples == 0);
    ++f.recent.samples;
    f.last_hour = x;
  }
  return f;
}

HourForecast forecast_hour(const Forecast& f, uint64_t t) {
  HourForecast out;
  out.start = t / kHour * kHour;
  if (f.season == Season::kNone) return out;
  const Forecast::Slot& s = f.slots[slot_of(f.season, t / kHour)];
  if (s.samples > 0) {
    out.rates = s.rates;
    out.basis = HourForecast::Basis::kSlot;
    out.samples = s.samples;
  } else {
    out.rates = f.recent.rates;
    out.basis = HourForecast::Basis::kRecent;
    out.samples = f.recent.samples;
  }
  return out;
}

std::vector<HourForecast> forecast_hours(const Forecast& f, uint64_t now, uint32_t hours) {
  std::vector<HourForecast> out;
  out.reserve(hours);
  for (uint32_t i = 0; i < hours; ++i) out.push_back(forecast_hour(f, now + uint64_t{i} * kHour));
  return out;
}

double predicted_iops(const Forecast& f, uint64_t now, uint64_t lead_s) {
  double best = 0;
  for (uint64_t h = now / kHour; h <= (now + lead_s) / kHour; ++h)
    best = std::max(best, forecast_hour(f, h * kHour).rates.iops);
  return best;
}

Result<Forecast> load_forecast(ReadTxn& txn, uint64_t container_id, uint64_t now,
                               const ForecastOptions& options) {
  const uint64_t now_minute = now / 60;
  const uint64_t back = options.max_hours * 60;
  LAYER_ASSIGN(auto rows, read_stats(txn, container_id, now_minute > back ? now_minute - back : 0));
  return build_forecast(history_points(rows), now, options);
}

uint64_t derive_auto_limit(const Resources::AutoLimit& a, std::optional<double> peak) {
  if (!peak) return a.ceiling;
  const double want = std::ceil(*peak * kAutoHeadroom);
  uint64_t limit = want >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(want);
  limit = std::max({limit, a.floor, uint64_t{1}});
  if (a.ceiling != 0) limit = std::min(limit, a.ceiling);
  return limit;
}

AutoDerived derive_auto(const Resources& r, const Forecast& f, uint64_t now) {
  AutoDerived d;
  d.iops = r.iops;
  d.bandwidth = r.bandwidth;
  d.hour = now / kHour;
  if (f.season != Season::kNone) {
    const HourRates h = forecast_hour(f, now).rates;
    d.peak_iops = std::max(h.peak_iops, f.last_hour.peak_iops);
    d.peak_bps = std::max(h.peak_bps, f.last_hour.peak_bps);
  }
  if (r.auto_iops.on) d.iops = derive_auto_limit(r.auto_iops, d.peak_iops);
  if (r.auto_bandwidth.on) d.bandwidth = derive_auto_limit(r.auto_bandwidth, d.peak_bps);
  return d;
}

Resources with_auto(Resources r, const AutoDerived& d) {
  if (r.auto_iops.on) r.iops = d.iops;
  if (r.auto_bandwidth.on) r.bandwidth = d.bandwidth;
  return r;
}

Result<AutoLimitCache::Resolved> AutoLimitCache::resolve(Pool& pool, uint64_t container_id,
                                                         const Resources& r, uint64_t now) {
  Resolved out;
  if (!has_auto(r)) {
    forget(container_id);
    out.resources = r;
    out.derived.iops = r.iops;
    out.derived.bandwidth = r.bandwidth;
    out.derived.hour = now / kHour;
    return out;
  }
  {
    std::lock_guard lock(mu_);
    auto it = entries_.find(container_id);
    if (it != entries_.end() && it->second.iops == r.auto_iops &&
        it->second.bandwidth == r.auto_bandwidth && it->second.derived.hour == now / kHour) {
      out.derived = it->second.derived;
      out.resources = with_auto(r, out.derived);
      return out;
    }
  }
  // Read outside the lock: two threads may both read; the last one's entry stays.
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(const auto f, load_forecast(txn, container_id, now));
  out.derived = derive_auto(r, f, now);
  out.resources = with_auto(r, out.derived);
  std::lock_guard lock(mu_);
  auto& e = entries_[container_id];
  out.changed = e.derived.iops != out.derived.iops ||
                e.derived.bandwidth != out.derived.bandwidth || e.iops != r.auto_iops ||
                e.bandwidth != r.auto_bandwidth;
  e = Entry{r.auto_iops, r.auto_bandwidth, out.derived};
  return out;
}

void AutoLimitCache::forget(uint64_t id) {
  std::lock_guard lock(mu_);
  entries_.erase(id);
}

Resources limiter_resources(Pool& pool, AutoLimitCache& cache, uint64_t id, const Resources& r,
                            uint64_t now, std::string* error) {
  if (!has_auto(r)) return r;
  auto resolved = cache.resolve(pool, id, r, now);
  if (resolved) return resolved->resources;
  if (error) *error = resolved.error().message;
  return with_auto(r, derive_auto(r, Forecast{}, now));
}

std::vector<std::string> refresh_auto_limits(Pool& pool, AutoLimitCache& cache,
                                             LimiterTable& limiters, uint64_t now) {
  std::vector<std::string> lines;
  for (const auto& name : limiters.names()) {
    ContainerRecord c;
    {
      auto txn = pool.index().begin_read();
      if (!txn) {
        lines.push_back(fmt::format("auto limits: {}", txn.error().message));
        return lines;
      }
      auto got = pool.get_container(*txn, name);
      if (!got) continue;  // removed, or renamed: nothing of it to apply
      c = std::move(*got);
    }
    if (!has_auto(c.resources)) {
      cache.forget(c.id);
      continue;
    }
    auto resolved = cache.resolve(pool, c.id, c.resources, now);
    if (!resolved) {
      lines.push_back(fmt::format("auto limits of {}: {}", name, resolved.error().message));
      continue;
    }
    if (!resolved->changed) continue;
    limiters.apply(name, resolved->resources);
    lines.push_back(fmt::format("auto limits of {}: iops {}, bandwidth {}", name,
                                resolved->derived.iops, resolved->derived.bandwidth));
  }
  return lines;
}

}  // namespace layer
