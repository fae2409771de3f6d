// stats_cmd.cc — `layer stats`: a container's I/O history from the index, per minute or per
// hour, with totals; or every container's current minute as Prometheus text.
#include "stats_cmd.h"

#include <fmt/format.h>

#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "names.h"
#include "output.h"
#include "pool.h"
#include "stats.h"

namespace layer_cli {
namespace {

using layer::IoOp;
using layer::kIoOps;
using layer::make_error;
using layer::Result;
using layer::StatsRecord;

constexpr uint64_t kDefaultSinceS = 3600;

// "850ns", "12.3us", "1.50ms", "2.00s".
std::string human_latency(uint64_t ns) {
  if (ns < 1000) return fmt::format("{}ns", ns);
  if (ns < 1'000'000) return fmt::format("{:.1f}us", static_cast<double>(ns) / 1e3);
  if (ns < 1'000'000'000) return fmt::format("{:.2f}ms", static_cast<double>(ns) / 1e6);
  return fmt::format("{:.2f}s", static_cast<double>(ns) / 1e9);
}

// p50/p99 of one kind of request, "-" when there were none.
std::string quantiles_text(const layer::IoOpStats& s) {
  if (s.ops == 0) return "-";
  return human_latency(layer::latency_quantile_ns(s.latency, 0.5)) + "/" +
         human_latency(layer::latency_quantile_ns(s.latency, 0.99));
}

// The JSON of one row or of the totals (docs/cli.md "layer stats").
json record_json(const StatsRecord& r) {
  json j;
  for (int i = 0; i < kIoOps; ++i)
    j[fmt::format("{}_ops", layer::to_string(static_cast<IoOp>(i)))] = r.op[i].ops;
  for (int i = 0; i < kIoOps; ++i) {
    if (static_cast<IoOp>(i) == IoOp::kFlush) continue;
    j[fmt::format("{}_bytes", layer::to_string(static_cast<IoOp>(i)))] = r.op[i].bytes;
  }
  json latency = json::object();
  for (int i = 0; i < kIoOps; ++i) {
    const auto& s = r.op[i];
    const char* name = layer::to_string(static_cast<IoOp>(i));
    if (s.ops == 0) {
      latency[name] = nullptr;
      continue;
    }
    latency[name] = {
        {"p50", static_cast<double>(layer::latency_quantile_ns(s.latency, 0.5)) / 1e3},
        {"p99", static_cast<double>(layer::latency_quantile_ns(s.latency, 0.99)) / 1e3},
        {"mean", static_cast<double>(s.latency_ns_sum) / static_cast<double>(s.ops) / 1e3}};
  }
  j["latency_us"] = std::move(latency);
  return j;
}

std::vector<std::string> record_cells(const std::string& when, const StatsRecord& r) {
  return {when,
          std::to_string(r[IoOp::kRead].ops),
          std::to_string(r[IoOp::kWrite].ops),
          std::to_string(r[IoOp::kTrim].ops),
          std::to_string(r[IoOp::kZero].ops),
          std::to_string(r[IoOp::kFlush].ops),
          human_size(r[IoOp::kRead].bytes),
          human_size(r[IoOp::kWrite].bytes),
          quantiles_text(r[IoOp::kRead]),
          quantiles_text(r[IoOp::kWrite])};
}

Result<int> prometheus(layer::Pool& pool, uint64_t now) {
  const uint64_t minute = now / 60;
  LAYER_ASSIGN(const auto names, pool.container_names(SIZE_MAX));
  std::vector<layer::StatsTable::Entry> entries;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    for (const auto& name : names) {
      LAYER_ASSIGN(const auto c, pool.get_container(txn, name));
      LAYER_ASSIGN(const auto rows, layer::read_stats(txn, c.id, minute));
      layer::StatsTable::Entry e{c.id, name, {}};
      for (const auto& row : rows)
        if (row.minute == minute) e.totals = row.record;
      entries.push_back(std::move(e));
    }
  }
  // The minute restarts from zero every minute: gauges, not counters (a Prometheus counter
  // only grows; the server's metrics socket has the cumulative counters).
  std::string out = fmt::format(
      "# HELP layer_minute_start_seconds The unix time the current minute began.\n"
      "# TYPE layer_minute_start_seconds gauge\nlayer_minute_start_seconds {}\n",
      minute * 60);
  auto family = [&](const std::string& metric, const std::string& help, auto value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} gauge\n", metric, help, metric);
    for (const auto& e : entries)
      out += fmt::format("{}{{container=\"{}\"}} {}\n", metric, e.name, value(e.totals));
  };
  for (int i = 0; i < kIoOps; ++i) {
    const std::string op = layer::to_string(static_cast<IoOp>(i));
    family("layer_minute_" + op + "_ops", op + " requests in the current minute",
           [i](const StatsRecord& r) { return r.op[i].ops; });
    if (static_cast<IoOp>(i) == IoOp::kFlush) continue;
    family("layer_minute_" + op + "_bytes", "bytes of " + op + " requests in the current minute",
           [i](const StatsRecord& r) { return r.op[i].bytes; });
  }
  std::cout << out;
  return 0;
}

}  // namespace

Result<int> run_stats(const std::string& pool_root, bool as_json, const StatsArgs& args,
                      double since_unix, uint64_t now) {
  if (args.prometheus) {
    if (!args.container.empty())
      return make_error(EINVAL, "stats --prometheus shows every container: drop \"{}\"",
                        args.container);
    if (!args.since.empty() || args.per != "minute")
      return make_error(EINVAL, "stats --prometheus shows the current minute: no --since or --per");
  } else if (args.container.empty()) {
    return make_error(EINVAL,
                      "usage: layer stats CONTAINER [--since WHEN] [--per minute|hour] "
                      "(or layer stats --prometheus)");
  }
  if (args.per != "minute" && args.per != "hour")
    return make_error(EINVAL, "--per {}: expected minute or hour", args.per);
  if (!args.container.empty()) LAYER_TRY(layer::validate_name(args.container, "container name"));
  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = true}));
  if (args.prometheus) return prometheus(*pool, now);

  if (since_unix <= 0) since_unix = static_cast<double>(now - std::min(now, kDefaultSinceS));
  const uint64_t from_minute = static_cast<uint64_t>(std::max(0.0, since_unix)) / 60;
  std::vector<layer::StatsMinute> rows;
  layer::ContainerRecord c;
  {
    LAYER_ASSIGN(auto txn, pool->index().begin_read());
    LAYER_ASSIGN(c, pool->get_container(txn, args.container));
    LAYER_ASSIGN(rows, layer::read_stats(txn, c.id, from_minute));
  }
  // Per hour: the minutes of each hour added up (in order, as the rows are).
  const uint64_t step = args.per == "hour" ? 60 : 1;
  std::vector<layer::StatsMinute> grouped;
  StatsRecord totals;
  for (const auto& row : rows) {
    const uint64_t start = row.minute / step * step;
    if (grouped.empty() || grouped.back().minute != start) grouped.push_back({start, {}});
    grouped.back().record.add(row.record);
    totals.add(row.record);
  }
  if (as_json) {
    json out_rows = json::array();
    for (const auto& g : grouped) {
      json j = {{"time", g.minute * 60}};
      j.update(record_json(g.record));
      out_rows.push_back(std::move(j));
    }
    json j = {{"ok", true},      {"container", c.name},         {"since", from_minute * 60},
              {"per", args.per}, {"rows", std::move(out_rows)}, {"totals", record_json(totals)}};
    std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    return 0;
  }
  std::vector<std::vector<std::string>> table = {{"TIME", "READS", "WRITES", "TRIMS", "ZEROES",
                                                  "FLUSHES", "READ", "WRITTEN", "READ P50/P99",
                                                  "WRITE P50/P99"}};
  for (const auto& g : grouped) table.push_back(record_cells(format_time(g.minute * 60), g.record));
  table.push_back(record_cells("total", totals));
  print_table(table);
  if (rows.empty())
    std::cout << fmt::format("no I/O recorded for {} since {}\n", c.name,
                             format_time(from_minute * 60));
  return 0;
}

}  // namespace layer_cli
