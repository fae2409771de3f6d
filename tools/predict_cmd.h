// predict_cmd.h — `layer predict CONTAINER [--hours N]` (lib/forecast.h; docs/forecast.md),
// registered by layer.cc, and the auto limits' part of `layer inspect` and `layer set`.
#pragma once

#include <cstdint>
#include <string>

#include "error.h"
#include "output.h"
#include "pool.h"

namespace layer_cli {

struct PredictArgs {
  std::string container;
  uint32_t hours = 24;
};

// Runs `layer predict` on the pool at pool_root at unix time `now`: the forecast of the hours
// from the current one on, per hour, with the history each figure rests on (JSON with `json`).
// Errors: EINVAL (--hours outside 1..336, a bad name), ENOENT (no such container), those of
// the index.
layer::Result<int> run_predict(const std::string& pool_root, bool json, const PredictArgs& args,
                               uint64_t now);

// With an auto limit on, adds to `resources` (resources_json's object of container `c`)
// "auto": {"iops": null|{"floor","ceiling","limit","peak"}, "bandwidth": ...} and sets its
// "effective" values to the derived limits (unless a timed change is in force); with none on,
// leaves it as it is (no "auto"). Returns a line for the human output ("" with none on).
// Errors: index reads.
layer::Result<std::string> add_auto_limits(layer::Pool& pool, const layer::ContainerRecord& c,
                                           uint64_t now_ms, json& resources);

}  // namespace layer_cli
