// control_ops.h — what a server does when the CLI asks on its control socket
// (POOL/run/srv-PID.sock, DESIGN.md "Locking"): live changes of a served container (snapshot,
// rollback, commit, flatten, snapshot rm and merges), changed resources (qos.h), reloads after a
// frozen layer moved, and tier moves (a served delta's, live). The protocol is lib/control.h's; the
// requests and replies are docs/cli-spec.md's.
//
// Thread-safety: called on the control socket's worker threads, up to ControlServer::kWorkers
// requests at once; live operations on one disk are serialised by the disk (Disk::live_mu_).
#pragma once

#include <nlohmann/json.hpp>

#include "disk.h"
#include "forecast.h"
#include "hasher.h"
#include "pool.h"
#include "qos.h"

namespace layer_plugin {

// The server's state the handlers work on (the plugin owns it from after_fork to cleanup).
struct ControlContext {
  layer::Pool& pool;
  layer::DiskTable& disks;
  layer::BackgroundHasher* hasher;  // null with hasher=off
  layer::LimiterTable& limiters;
  layer::AutoLimitCache* auto_limits = nullptr;  // null: auto limits as without history
};

// Answers one request: a reply object, or layer::control_error's. Logs failures with
// nbdkit_error. May throw (the control server turns an exception into an EIO reply).
nlohmann::json handle_control(const ControlContext& ctx, const nlohmann::json& request);

}  // namespace layer_plugin
