// control_ops.cc — the control socket's requests (control_ops.h).
#define NBDKIT_API_VERSION 2
#include "control_ops.h"

#include <nbdkit-plugin.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "control.h"
#include "mover.h"
#include "names.h"
#include "snapshots.h"

namespace layer_plugin {
namespace {

using nlohmann::json;

json error(int code, std::string message) {
  return layer::control_error(layer::Error{code, std::move(message)});
}

// The first of `keys` that `request` holds with a type other than a string, or nullptr. An
// optional field of the wrong type is refused, not read as absent: a rollback's "keep_as": 5
// must not discard the state it was meant to keep.
const char* not_a_string(const json& request, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    const auto it = request.find(key);
    if (it != request.end() && !it->is_string()) return key;
  }
  return nullptr;
}

// The request's "container": a string that is a valid container name.
layer::Result<std::string> requested_container(const json& request, const std::string& op) {
  const auto it = request.find("container");
  if (it == request.end() || !it->is_string())
    return layer::Error{EINVAL, "a \"" + op + "\" request needs a \"container\" string"};
  std::string container = it->get<std::string>();
  LAYER_TRY(layer::validate_name(container, "container name"));
  return container;
}

json wrong_type(const std::string& op, const char* key) {
  return error(EINVAL,
               "the \"" + std::string(key) + "\" of a \"" + op + "\" request must be a string");
}

// {"op": "moved", "layer": N}: the mover moved frozen layer N; the disks reading it switch to
// the new file (mover.h). Reply {"ok": true, "layer": N}.
json moved(const ControlContext& ctx, const json& request) {
  if (!request.contains("layer") || !request["layer"].is_number_unsigned())
    return error(EINVAL, "a \"moved\" request needs a \"layer\" number");
  const layer::LayerId id = request["layer"];
  auto s = ctx.disks.reload_moved(id);
  if (!s) {
    nbdkit_error("reload after the move of layer %" PRIu64 ": %s", id, s.error().message.c_str());
    return layer::control_error(s.error());
  }
  return json{{"ok", true}, {"layer", id}};
}

// {"op": "move", "layer": N, "tier": "ssd"|"hdd", "container": C, "rate": BYTES_PER_SEC}:
// moves layer N to the tier, its copy reading at most `rate` bytes/s (0 or absent: as fast as
// it can).
// The delta of a container (C, when given, must be it) is moved live by the container's disk,
// acquired as a connection would (opened if no client has it open): Disk::move_delta. A frozen
// layer is moved as the CLI would (move_layer), and this server's disks reading it switch to
// the new file. Reply {"ok": true, "layer": N, "container": C ("" for a frozen layer), "from",
// "to", "moved", "data_bytes", "pause_ms", "start_pause_ms", "catch_up_rounds",
// "caught_up_bytes"} (the last four: a live delta's move).
json move(const ControlContext& ctx, const json& request) {
  if (!request.contains("layer") || !request["layer"].is_number_unsigned() ||
      !request.contains("tier") || !request["tier"].is_string())
    return error(EINVAL, "a \"move\" request needs a \"layer\" number and a \"tier\" string");
  if (request.contains("rate") && !request["rate"].is_number_unsigned())
    return error(EINVAL, "a \"move\" request's \"rate\" is a number of bytes per second");
  if (const char* key = not_a_string(request, {"container"})) return wrong_type("move", key);
  const uint64_t rate = request.value("rate", uint64_t{0});
  const layer::LayerId id = request["layer"];
  auto to = layer::parse_tier(request["tier"].get<std::string>());
  if (!to) return layer::control_error(to.error());
  auto owner = layer::find_container_of_delta(ctx.pool, id);
  if (!owner) return layer::control_error(owner.error());
  const std::string asked = request.value("container", "");
  if (!asked.empty() && (!*owner || (*owner)->name != asked))
    return error(EBUSY, "layer " + std::to_string(id) + " is not the delta of container \"" +
                            asked + "\" any more");
  layer::Result<layer::MoveResult> result = layer::Error{EIO, ""};
  std::string container;
  if (!*owner) {
    layer::MoveOptions options;
    options.rate_bytes_per_sec = rate;
    result = layer::move_layer(ctx.pool, id, *to, options);
    if (result && result->moved) {
      if (auto s = ctx.disks.reload_moved(id); !s)
        nbdkit_error("reload after the move of layer %" PRIu64 ": %s", id,
                     s.error().message.c_str());
    }
  } else {
    container = (*owner)->name;
    auto disk = ctx.disks.acquire(container, true);
    if (!disk) return layer::control_error(disk.error());
    layer::Disk::MoveOptions options;
    options.rate_bytes_per_sec = rate;
    result = (*disk)->move_delta(id, *to, options);
    auto released = ctx.disks.release(std::move(*disk));
    if (!released)
      nbdkit_error("flush after the move of layer %" PRIu64 ": %s", id,
                   released.error().message.c_str());
  }
  if (!result) {
    nbdkit_error("move of layer %" PRIu64 ": %s", id, result.error().message.c_str());
    return layer::control_error(result.error());
  }
  const layer::MoveResult& r = *result;
  nbdkit_debug("layer %" PRIu64 " %s from %s to %s: %" PRIu64
               " bytes of data, writes paused %.3f ms (and %.3f ms before the copy), "
               "%u catch-up rounds, %" PRIu64 " bytes caught up",
               id, r.moved ? "moved" : "not moved", layer::to_string(r.from),
               layer::to_string(r.to), r.data_bytes, r.pause_ms, r.start_pause_ms,
               r.catch_up_rounds, r.caught_up_bytes);
  return json{{"ok", true},
              {"layer", id},
              {"container", container},
              {"from", layer::to_string(r.from)},
              {"to", layer::to_string(r.to)},
              {"moved", r.moved},
              {"data_bytes", r.data_bytes},
              {"pause_ms", r.pause_ms},
              {"start_pause_ms", r.start_pause_ms},
              {"catch_up_rounds", r.catch_up_rounds},
              {"caught_up_bytes", r.caught_up_bytes}};
}

// {"op": "resources", "container": C}: C's resources changed (`layer set`); the limiter of C,
// if this server has one, applies them from the record at once. Reply {"ok": true,
// "container": C, "served": B, "iops": N, "bandwidth": N, "until_ms": N} (the limits in force:
// with `--iops auto` or `--bandwidth auto`, the ones derived from the forecast now).
json resources(const ControlContext& ctx, const json& request) {
  auto named = requested_container(request, "resources");
  if (!named) return layer::control_error(named.error());
  const std::string& container = *named;
  auto record = [&]() -> layer::Result<layer::ContainerRecord> {
    LAYER_ASSIGN(auto txn, ctx.pool.index().begin_read());
    return ctx.pool.get_container(txn, container);
  }();
  if (!record) return layer::control_error(record.error());
  const uint64_t now_ms = layer::now_unix_ms();
  // Auto limits (forecast.h): derived from the forecast now, in place of the base values.
  layer::AutoLimitCache none;
  std::string auto_error;
  const layer::Resources r =
      layer::limiter_resources(ctx.pool, ctx.auto_limits ? *ctx.auto_limits : none, record->id,
                               record->resources, now_ms / 1000, &auto_error);
  if (!auto_error.empty())
    nbdkit_error("auto limits of %s: %s", container.c_str(), auto_error.c_str());
  const bool served = ctx.limiters.apply(container, r);
  nbdkit_debug("resources of container %s: iops %" PRIu64 ", bandwidth %" PRIu64 "%s",
               container.c_str(), r.effective_iops(now_ms), r.effective_bandwidth(now_ms),
               served ? "" : " (not served here)");
  return json{{"ok", true},
              {"container", container},
              {"served", served},
              {"iops", r.effective_iops(now_ms)},
              {"bandwidth", r.effective_bandwidth(now_ms)},
              {"until_ms", r.timed_active(now_ms) ? r.timed.until_ms : 0}};
}

// {"op": "lending"}: the last lending round's view (qos.h LimiterTable::rebalance), for
// `layer pool status`. Reply {"ok": true, "pid": N, "window_s": S (0: no round yet),
// "capacity": {"iops", "bandwidth"}, "containers": [{"container", "priority", "iops":
// {"reserved", "used", "borrowed", "lent"}, "bandwidth": {...}}]} (used: per second over the
// window; null for a container without limits, whose requests are not counted; reserved 0:
// unlimited).
json lending(const ControlContext& ctx) {
  const auto st = ctx.limiters.lending_status();
  json containers = json::array();
  for (const auto& c : st.containers) {
    auto dim = [&](const layer::ContainerLending::Dim& d) {
      return json{{"reserved", d.reserved},
                  {"used", c.measured ? json(d.used) : json(nullptr)},
                  {"borrowed", d.borrowed},
                  {"lent", d.lent}};
    };
    containers.push_back({{"container", c.container},
                          {"priority", c.priority},
                          {"iops", dim(c.iops)},
                          {"bandwidth", dim(c.bandwidth)}});
  }
  return json{{"ok", true},
              {"pid", static_cast<int64_t>(::getpid())},
              {"window_s", st.window_s},
              {"capacity", {{"iops", st.capacity.iops}, {"bandwidth", st.capacity.bandwidth}}},
              {"containers", containers}};
}

// A live change of container C (DESIGN.md "Locking"): the container is acquired as a
// connection would (opening it if no client has), changed through its Disk with the write gate
// closed, and released. Requests: {"op": "snapshot"|"rollback"|"commit"|"flatten",
// "container": C, "name": SNAP, "keep_as": NAME, "image": REF, "description": TEXT}, and
// {"op": "snapshot-rm", "container": C, "name": SNAP}, which also merges the layers that only
// this server's disk of C reads (Disk::merge_hidden), and {"op": "merge", "container": C},
// which only merges them (`layer gc`), replying {"merged": [[OLD, NEW], ...]}.
json change(const ControlContext& ctx, const json& request) {
  const std::string op = request["op"];
  auto named = requested_container(request, op);
  if (!named) return layer::control_error(named.error());
  const std::string& container = *named;
  auto str = [&](const char* key) {
    auto it = request.find(key);
    return it != request.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  if (const char* key = not_a_string(request, {"name", "keep_as", "image", "description"}))
    return wrong_type(op, key);
  if (op != "snapshot" && op != "rollback" && op != "commit" && op != "snapshot-rm" &&
      op != "merge" && op != "flatten")
    return error(EINVAL, "unknown control operation \"" + op + "\"");
  auto disk = ctx.disks.acquire(container, true);
  if (!disk) return layer::control_error(disk.error());
  if (op == "merge") {
    auto merged = (*disk)->merge_hidden();
    auto released = ctx.disks.release(std::move(*disk));
    if (!released) nbdkit_error("flush after %s: %s", op.c_str(), released.error().message.c_str());
    if (!merged) return layer::control_error(merged.error());
    if (ctx.hasher && !merged->empty()) ctx.hasher->nudge();  // merged layers wait to be hashed
    json pairs = json::array();
    for (const auto& [from, to] : *merged) pairs.push_back({from, to});
    return json{{"ok", true}, {"container", container}, {"merged", pairs}};
  }
  if (op == "snapshot-rm") {
    // The name goes; a merge of layers this server's disk reads is done here, live.
    auto removed = layer::remove_snapshot(ctx.pool, container, str("name"));
    layer::Result<std::vector<std::pair<layer::LayerId, layer::LayerId>>> merged =
        std::vector<std::pair<layer::LayerId, layer::LayerId>>{};
    if (removed && removed->fate == layer::RemovedSnapshot::Fate::kHidden)
      merged = (*disk)->merge_hidden();
    auto released = ctx.disks.release(std::move(*disk));
    if (!released) nbdkit_error("flush after %s: %s", op.c_str(), released.error().message.c_str());
    if (!removed) return layer::control_error(removed.error());
    if (ctx.hasher) ctx.hasher->nudge();  // a merged layer waits to be hashed
    if (merged)
      for (const auto& [from, to] : *merged)
        if (from == removed->layer) {
          removed->fate = layer::RemovedSnapshot::Fate::kMerged;
          removed->merged_into = to;
          removed->why.clear();
        }
    json reply = *removed;
    reply["ok"] = true;
    reply["container"] = container;
    if (!merged) reply["merge_error"] = merged.error().message;
    return reply;
  }
  layer::Result<layer::ContainerState> state = layer::Error{EINVAL, ""};
  if (op == "snapshot") {
    state = (*disk)->snapshot(str("name"));
  } else if (op == "commit") {
    state = (*disk)->commit(str("image"), str("description"));
  } else if (op == "flatten") {
    state = (*disk)->flatten();
  } else {
    std::optional<std::string> keep;
    if (!str("keep_as").empty()) keep = str("keep_as");
    state = (*disk)->rollback(str("name"), keep);
  }
  auto released = ctx.disks.release(std::move(*disk));
  if (!state) {
    nbdkit_error("%s of %s: %s", op.c_str(), container.c_str(), state.error().message.c_str());
    return layer::control_error(state.error());
  }
  nbdkit_debug("%s of container %s: now delta layer %" PRIu64, op.c_str(), container.c_str(),
               state->delta.id);
  if (ctx.hasher) ctx.hasher->nudge();  // the frozen delta waits to be hashed
  if (!released) nbdkit_error("flush after %s: %s", op.c_str(), released.error().message.c_str());
  return json{{"ok", true},
              {"container", container},
              {"base_layer", state->chain.empty() ? 0 : state->chain.front().id},
              {"delta_layer", state->delta.id},
              {"generation", state->container.generation}};
}

// {"op": "fold", "container": C}: C's journaled rounds folded into the index now, so that a
// reader of the index (`layer diff`) sees it as of its last flush.
json fold(const ControlContext& ctx, const json& request) {
  auto named = requested_container(request, "fold");
  if (!named) return layer::control_error(named.error());
  auto disk = ctx.disks.acquire(*named, true);
  if (!disk) return layer::control_error(disk.error());
  auto folded = (*disk)->fold_journal();
  auto released = ctx.disks.release(std::move(*disk));
  if (!folded) return layer::control_error(folded.error());
  if (!released) return layer::control_error(released.error());
  return json{{"ok", true}, {"container", *named}};
}

}  // namespace

json handle_control(const ControlContext& ctx, const json& request) {
  if (!request.is_object() || !request.contains("op") || !request["op"].is_string())
    return error(EINVAL, "a control request needs an \"op\" string");
  const std::string op = request["op"];
  if (op == "moved") return moved(ctx, request);
  if (op == "move") return move(ctx, request);
  if (op == "resources") return resources(ctx, request);
  if (op == "fold") return fold(ctx, request);
  if (op == "lending") return lending(ctx);
  return change(ctx, request);
}

}  // namespace layer_plugin
