// predict_cmd.cc — `layer predict`: a container's forecast per hour, and the auto limits shown
// by `layer inspect` and `layer set`.
#include "predict_cmd.h"

#include <fmt/format.h>

#include <iostream>
#include <vector>

#include "forecast.h"
#include "names.h"

namespace layer_cli {
namespace {

using layer::make_error;
using layer::Result;

constexpr uint32_t kMaxHours = 14 * 24;

json null_or(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

std::string basis_text(const layer::HourForecast& h, layer::Season season) {
  switch (h.basis) {
    case layer::HourForecast::Basis::kSlot:
      return fmt::format("{} {}", h.samples,
                         season == layer::Season::kWeekly ? (h.samples == 1 ? "week" : "weeks")
                                                          : (h.samples == 1 ? "day" : "days"));
    case layer::HourForecast::Basis::kRecent:
      return fmt::format("recent ({} h)", h.samples);
    case layer::HourForecast::Basis::kNone:
      return "no history";
  }
  return "?";
}

std::string rate_text(double v) { return fmt::format("{:.1f}", v); }
std::string bps_text(double v) { return human_size(static_cast<uint64_t>(v + 0.5)) + "/s"; }

}  // namespace

Result<int> run_predict(const std::string& pool_root, bool as_json, const PredictArgs& args,
                        uint64_t now) {
  LAYER_TRY(layer::validate_name(args.container, "container name"));
  if (args.hours < 1 || args.hours > kMaxHours)
    return make_error(EINVAL, "--hours {}: must be 1 to {}", args.hours, kMaxHours);
  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = true}));
  layer::ContainerRecord c;
  layer::Forecast f;
  {
    LAYER_ASSIGN(auto txn, pool->index().begin_read());
    LAYER_ASSIGN(c, pool->get_container(txn, args.container));
    LAYER_ASSIGN(f, layer::load_forecast(txn, c.id, now));
  }
  const auto hours = layer::forecast_hours(f, now, args.hours);
  if (as_json) {
    json rows = json::array();
    for (const auto& h : hours)
      rows.push_back({{"time", h.start},
                      {"iops", h.rates.iops},
                      {"bandwidth", h.rates.bps},
                      {"peak_iops", h.rates.peak_iops},
                      {"peak_bandwidth", h.rates.peak_bps},
                      {"basis", layer::to_string(h.basis)},
                      {"samples", h.samples}});
    json j = {
        {"ok", true},
        {"container", c.name},
        {"now", now},
        {"season", layer::to_string(f.season)},
        {"history_hours", f.history_hours},
        {"since", f.season == layer::Season::kNone ? json(nullptr) : json(f.first_hour * 3600)},
        {"hours", std::move(rows)}};
    std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    return 0;
  }
  if (f.season == layer::Season::kNone) {
    std::cout << fmt::format(
        "no I/O history for {} before this hour: nothing to predict from (the forecast is 0)\n",
        c.name);
  } else {
    std::cout << fmt::format("{}: {} seasonality from {} hours of history (since {})\n", c.name,
                             layer::to_string(f.season), f.history_hours,
                             format_time(f.first_hour * 3600));
  }
  std::vector<std::vector<std::string>> table = {
      {"HOUR", "IOPS", "PEAK IOPS", "BANDWIDTH", "PEAK BANDWIDTH", "RESTS ON"}};
  for (const auto& h : hours)
    table.push_back({format_time(h.start), rate_text(h.rates.iops), rate_text(h.rates.peak_iops),
                     bps_text(h.rates.bps), bps_text(h.rates.peak_bps), basis_text(h, f.season)});
  print_table(table);
  return 0;
}

Result<std::string> add_auto_limits(layer::Pool& pool, const layer::ContainerRecord& c,
                                    uint64_t now_ms, json& resources) {
  const auto& r = c.resources;
  if (!layer::has_auto(r)) return std::string();  // the JSON as before auto limits
  layer::Forecast f;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(f, layer::load_forecast(txn, c.id, now_ms / 1000));
  }
  const auto d = layer::derive_auto(r, f, now_ms / 1000);
  json a = json::object();
  std::string text;
  auto part = [&](const char* what, const layer::Resources::AutoLimit& lim, uint64_t limit,
                  const std::optional<double>& peak, bool bytes) {
    if (!lim.on) {
      a[what] = nullptr;
      return;
    }
    a[what] = {
        {"floor", lim.floor}, {"ceiling", lim.ceiling}, {"limit", limit}, {"peak", null_or(peak)}};
    auto amount = [&](uint64_t v) { return bytes ? human_size(v) + "/s" : std::to_string(v); };
    text +=
        fmt::format("{}{} {} (follows the forecast: {}, floor {}, ceiling {})",
                    text.empty() ? "" : "; ", what, limit == 0 ? "-" : amount(limit),
                    peak ? fmt::format("peak {} x {}", bytes ? bps_text(*peak) : rate_text(*peak),
                                       layer::kAutoHeadroom)
                         : std::string("no history yet"),
                    amount(lim.floor), lim.ceiling == 0 ? "-" : amount(lim.ceiling));
  };
  part("iops", r.auto_iops, d.iops, d.peak_iops, false);
  part("bandwidth", r.auto_bandwidth, d.bandwidth, d.peak_bps, true);
  resources["auto"] = std::move(a);
  const auto with = layer::with_auto(r, d);
  resources["effective"] = {{"iops", with.effective_iops(now_ms)},
                            {"bandwidth", with.effective_bandwidth(now_ms)}};
  return text;
}

}  // namespace layer_cli
