// pool_cmd.h — `layer pool show`, `layer pool set` (access policy and capacities) and
// `layer pool status` (capacity, reserved, used now and lent: lib/capacity.h, qos.h lending),
// registered by layer.cc.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "error.h"

namespace layer_cli {

struct PoolSetArgs {
  std::string access;  // empty: unchanged
  std::optional<std::string> iops, bandwidth, ssd_bytes, overcommit;
  bool any() const { return !access.empty() || iops || bandwidth || ssd_bytes || overcommit; }
};

// Registers --iops, --bandwidth, --ssd-bytes and --overcommit on `layer pool set`.
void add_capacity_options(CLI::App* cmd, PoolSetArgs& a);

// `layer pool show` (args empty) and `layer pool set`: changes what is given, then prints the
// pool's settings. Errors: EINVAL (a bad value, nothing given to set), ENOSPC (a capacity below
// what the containers reserve: nothing changed), EROFS.
layer::Result<int> run_pool_settings(const std::string& pool_root, bool json,
                                     const PoolSetArgs& args);

// `layer pool status`: capacities, the sum of reservations, and from the pool's running
// servers (their control sockets' "lending") what each container uses now, borrows and lends.
// Without a server: used and lent are unknown (null). Errors: those of the index.
layer::Result<int> run_pool_status(const std::string& pool_root, bool json);

}  // namespace layer_cli
