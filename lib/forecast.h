// forecast.h — a container's seasonal I/O forecast from its history (issue 14 item 4;
// docs/forecast.md), and what reads it: `layer predict`, the tier policy's pre-promotion
// (tier.h, TierPolicy::prewarm_s) and the limits that follow it (`layer set --iops auto`).
//
// What it models: the container's read+write requests per second and bytes per second, per
// hour, as a repeating pattern. The history (the `stats` rows, stats.h) is cut into whole
// hours (UTC); an hour without rows counts as idle (an idle server writes none). Each hour
// belongs to a slot: its hour of the day, or its hour of the week once the history spans two
// weeks (with the default 7-day retention it never does: a longer `stats-retention=` gives
// weekly seasonality). A slot keeps an exponentially weighted moving average (EWMA) of its
// hours, newest weighted `alpha`: of the hour's mean rate and of its busiest minute's rate
// (the peak). The forecast of a future hour is its slot's averages; a slot with no past hour
// (history shorter than a day) falls back to the EWMA of every past hour (`recent_alpha`), and
// no history at all forecasts 0 with basis kNone.
//
// What it does not model: trends (a container growing week on week is forecast at its
// weighted past), holidays and other irregular events, time zones (the slots are UTC hours,
// which repeat all the same), bursts within a minute, demand the container's own limit held
// back (a limited container's history shows the limit, not what it wanted: the auto limit's
// headroom is what lets it grow), and the current, unfinished hour (left out of the history).
//
// Thread-safety: the functions are pure (explicit times; tests need no clock), but
// load_forecast reads the index; AutoLimitCache is safe from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "error.h"
#include "index.h"
#include "records.h"

namespace layer {

class LimiterTable;
class Pool;
struct StatsMinute;

// One minute of history: read+write requests and bytes (trim, zero, flush left out).
struct HistoryPoint {
  uint64_t minute = 0;  // unix minutes
  uint64_t ops = 0;
  uint64_t bytes = 0;
};
std::vector<HistoryPoint> history_points(const std::vector<StatsMinute>& rows);

struct ForecastOptions {
  double alpha = 0.5;         // weight of a slot's newest hour (0 < alpha <= 1)
  double recent_alpha = 0.2;  // weight of the newest hour in the every-hour average
  // Hour-of-week slots once the history spans this many hours (two weeks), else hour-of-day.
  uint64_t weekly_after_hours = 14 * 24;
  // History older than this many hours is not read (8 weeks).
  uint64_t max_hours = 8 * 7 * 24;
};

enum class Season : uint8_t { kNone = 0, kDaily = 1, kWeekly = 2 };
const char* to_string(Season s);

// Rates of an hour: mean and busiest minute, requests and bytes per second.
struct HourRates {
  double iops = 0;
  double bps = 0;
  double peak_iops = 0;
  double peak_bps = 0;
};

struct Forecast {
  struct Slot {
    HourRates rates;       // EWMA of the slot's past hours
    uint32_t samples = 0;  // past hours in it
  };
  Season season = Season::kNone;
  uint64_t first_hour = 0;     // unix hours: the first hour with history
  uint64_t history_hours = 0;  // whole hours from first_hour to the current hour
  std::vector<Slot> slots;     // 24 (daily) or 168 (weekly); empty with kNone
  Slot recent;                 // EWMA over every past hour
  HourRates last_hour;         // the last whole hour's rates
};

// The forecast from `points` (any order) at unix time `now`: rows of the current hour and later
// are left out. Pure.
Forecast build_forecast(const std::vector<HistoryPoint>& points, uint64_t now,
                        const ForecastOptions& options = {});

struct HourForecast {
  enum class Basis : uint8_t { kSlot = 0, kRecent = 1, kNone = 2 };
  uint64_t start = 0;  // unix s
  HourRates rates;
  Basis basis = Basis::kNone;
  uint32_t samples = 0;  // kSlot: the past hours of its slot; kRecent: every past hour
};
const char* to_string(HourForecast::Basis b);

// The forecast of the hour that contains unix time `t`.
HourForecast forecast_hour(const Forecast& f, uint64_t t);
// `hours` hours from the one that contains `now` on.
std::vector<HourForecast> forecast_hours(const Forecast& f, uint64_t now, uint32_t hours);
// The highest mean iops forecast for the hours that overlap [now, now + lead_s]: a layer's
// predicted heat for pre-promotion (the unit of HeatRecord's rates).
double predicted_iops(const Forecast& f, uint64_t now, uint64_t lead_s);

// Reads container `container_id`'s history (options.max_hours back) and builds its forecast.
// Errors: those of the read.
Result<Forecast> load_forecast(ReadTxn& txn, uint64_t container_id, uint64_t now,
                               const ForecastOptions& options = {});

// ---- limits that follow the forecast ----

// The limit is the expected peak × kAutoHeadroom: the busiest minute forecast for the current
// hour, or the last whole hour's busiest minute when that was higher (demand rising beyond the
// pattern), with room on top so that the limit can grow when it was the limit that held the
// history back.
constexpr double kAutoHeadroom = 1.5;
// Defaults of `--iops auto` / `--bandwidth auto` without a floor: what a quiet hour still gets.
constexpr uint64_t kAutoIopsFloor = 100;
constexpr uint64_t kAutoBandwidthFloor = uint64_t{1} << 20;

// The limit `a` derives from `peak` (requests or bytes per second; nullopt: no history): ceil
// of peak × kAutoHeadroom, clamped to at least max(floor, 1) and at most the ceiling (if any).
// Without history: the ceiling (0, unlimited, when there is none). Pure.
uint64_t derive_auto_limit(const Resources::AutoLimit& a, std::optional<double> peak);

struct AutoDerived {
  uint64_t iops = 0;  // the derived limits (0: unlimited), or the base values when not auto
  uint64_t bandwidth = 0;
  std::optional<double> peak_iops, peak_bps;  // what they rest on; nullopt: no history
  uint64_t hour = 0;                          // unix hours: when they were derived
};
// What `r`'s auto settings derive from `f` at `now`. Pure.
AutoDerived derive_auto(const Resources& r, const Forecast& f, uint64_t now);
// `r` with its base iops/bandwidth replaced by `d`'s where auto is on.
Resources with_auto(Resources r, const AutoDerived& d);
inline bool has_auto(const Resources& r) { return r.auto_iops.on || r.auto_bandwidth.on; }

// A server's derived limits, per container id: computed from the index when first asked, and
// again when the hour changes or the container's auto settings do.
class AutoLimitCache {
 public:
  struct Resolved {
    Resources resources;  // the record's, with the derived values in place of the base ones
    AutoDerived derived;
    bool changed = false;  // differs from what the last call returned for this container
  };
  // Errors: those of the index read.
  Result<Resolved> resolve(Pool& pool, uint64_t container_id, const Resources& r, uint64_t now);
  // Forgets container `id` (removed, or no longer auto).
  void forget(uint64_t id);

 private:
  struct Entry {
    Resources::AutoLimit iops, bandwidth;
    AutoDerived derived;
  };
  std::mutex mu_;
  std::map<uint64_t, Entry> entries_;  // GUARDED_BY(mu_)
};

// The resources the limiter of container `id` applies: `r` with its auto limits derived
// through `cache` at `now` (`r` itself, nothing read, when none is on). When the history cannot
// be read: as without history (the ceilings), and `error` says why.
Resources limiter_resources(Pool& pool, AutoLimitCache& cache, uint64_t id, const Resources& r,
                            uint64_t now, std::string* error = nullptr);

// A server's pass (each minute, on the stats writer's thread): re-derives the auto limits of
// every container that has a limiter in `limiters` and applies those that changed (a new hour,
// new settings). Returns a line per change and per failure, for the log.
std::vector<std::string> refresh_auto_limits(Pool& pool, AutoLimitCache& cache,
                                             LimiterTable& limiters, uint64_t now);

}  // namespace layer
