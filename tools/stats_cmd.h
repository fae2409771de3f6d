// stats_cmd.h — `layer stats CONTAINER [--since WHEN] [--per minute|hour]` and
// `layer stats --prometheus` (lib/stats.h; docs/stats.md), registered by layer.cc.
#pragma once

#include <cstdint>
#include <string>

#include "error.h"

namespace layer_cli {

struct StatsArgs {
  std::string container;
  std::string since;           // as given; empty: an hour back
  std::string per = "minute";  // minute | hour
  bool prometheus = false;
};

// Runs `layer stats` on the pool at pool_root at unix time `now` with --since resolved to
// `since_unix` (0: an hour before now). Prints a table and totals (JSON with `json`), or with
// --prometheus the current minute's counts of every container as Prometheus text. Errors:
// EINVAL (a bad combination of arguments), ENOENT (no such container), those of the index.
layer::Result<int> run_stats(const std::string& pool_root, bool json, const StatsArgs& args,
                             double since_unix, uint64_t now);

}  // namespace layer_cli
