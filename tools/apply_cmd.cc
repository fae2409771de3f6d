// apply_cmd.cc — `layer apply`: reads a spec, plans against the pool (lib/apply.h), prints the
// plan (--dry-run) or runs it, routing the changes of served containers to their server as
// `layer snapshot` and `layer set` do.
#include "apply_cmd.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <set>
#include <sstream>
#include <thread>

#include "apply.h"
#include "control.h"
#include "index_backup.h"
#include "locks.h"
#include "names.h"
#include "output.h"
#include "pool.h"
#include "qos.h"

namespace layer_cli {
namespace {

using layer::ApplyStep;
using layer::Error;
using layer::make_error;
using layer::Result;
using layer::Status;

// The changes of served containers go to their server (DESIGN.md "Locking"); the rest are
// PoolApplyActions'. Remembers which were applied live, for the output.
class CliActions : public layer::PoolApplyActions {
 public:
  explicit CliActions(layer::Pool& pool) : PoolApplyActions(pool) {}

  Status set_resources(const std::string& container, const layer::Resources& to) override {
    LAYER_TRY(PoolApplyActions::set_resources(container, to));
    // As `layer set`: recorded first; a serving server applies it to its export now.
    LAYER_ASSIGN(const auto rec, record(container));
    const pid_t pid = pool_.serving_pid(rec.id);
    LAYER_ASSIGN(const bool locked, pool_.locks().is_locked(layer::LockKind::kContainer, rec.id));
    if (pid == 0 || !locked) return {};
    const auto reply = layer::control_request(
        layer::control_socket_path(pool_.paths().run_dir, pid),
        {{"op", "resources"}, {"container", container}}, std::chrono::seconds(10));
    const Status status = reply.ok() ? layer::control_status(*reply) : reply.error();
    if (status.ok()) {
      if (reply->value("served", false)) live.insert(container);
    } else {
      warnings.push_back(fmt::format("{}: its server (pid {}) did not apply the resources now: {}",
                                     container, pid, status.error().message));
    }
    return {};
  }

  Status snapshot(const std::string& container, const std::string& name) override {
    return offline_or_live(container,
                           {{"op", "snapshot"}, {"container", container}, {"name", name}},
                           [&] { return PoolApplyActions::snapshot(container, name); });
  }

  Status remove_snapshot(const std::string& container, const std::string& name) override {
    return offline_or_live(
        container, {{"op", "snapshot-rm"}, {"container", container}, {"name", name}},
        [&]() -> Status {
          LAYER_ASSIGN(const auto rec, record(container));
          LAYER_ASSIGN(layer::Lock lock,
                       pool_.locks().try_lock(layer::LockKind::kContainer, rec.id, true,
                                              fmt::format("container \"{}\"", container)));
          return PoolApplyActions::remove_snapshot(container, name);
        });
  }

  std::set<std::string> live;         // containers whose server applied a change
  std::vector<std::string> warnings;  // servers that could not be told

 private:
  Result<layer::ContainerRecord> record(const std::string& container) {
    LAYER_ASSIGN(auto txn, pool_.index().begin_read());
    return pool_.get_container(txn, container);
  }

  // `offline` (which takes the container's lock) unless a server holds the container; then
  // `request` to that server's control socket.
  Status offline_or_live(const std::string& container, const nlohmann::json& request,
                         const std::function<Status()>& offline) {
    for (int attempt = 0;; ++attempt) {
      Status status = offline();
      if (status || status.error().code != EBUSY) return status;
      LAYER_ASSIGN(const auto rec, record(container));
      LAYER_ASSIGN(const bool locked, pool_.locks().is_locked(layer::LockKind::kContainer, rec.id));
      const pid_t pid = pool_.serving_pid(rec.id);
      if (!locked || pid == 0) {
        // A server letting go, or another command: try again shortly, then give up.
        if (attempt < 5) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20 << attempt));
          continue;
        }
        return status;
      }
      auto reply =
          layer::control_request(layer::control_socket_path(pool_.paths().run_dir, pid), request);
      if (!reply) {
        const int code = reply.error().code;
        if ((code == ENOENT || code == ECONNREFUSED) && attempt < 3) continue;
        return std::move(reply).error();
      }
      LAYER_TRY(layer::control_status(*reply));
      live.insert(container);
      return {};
    }
  }
};

json labels_json(const std::map<std::string, std::string>& labels) {
  json j = json::object();
  for (const auto& [k, v] : labels) j[k] = v;
  return j;
}

std::string labels_text(const std::map<std::string, std::string>& labels) {
  std::string s;
  for (const auto& [k, v] : labels)
    s += (s.empty() ? "" : ",") + k + "=" + layer::escape_control(v);
  return s.empty() ? "-" : s;
}

// "cpu 2, iops 2000": the base values that are set, or "none".
std::string resources_summary(const layer::Resources& r) {
  std::string s;
  auto add = [&](const std::string& part) { s += (s.empty() ? "" : ", ") + part; };
  if (r.cpu_millis) add("cpu " + layer::format_cpu(r.cpu_millis));
  if (r.memory_bytes) add("memory " + human_size(r.memory_bytes));
  if (r.net_bps) add("net " + human_size(r.net_bps) + "/s");
  if (r.iops) add(fmt::format("iops {}", r.iops));
  if (r.bandwidth) add("bandwidth " + human_size(r.bandwidth) + "/s");
  if (r.priority != layer::Resources::kDefaultPriority) add(fmt::format("priority {}", r.priority));
  return s.empty() ? "none" : s;
}

json step_json(const ApplyStep& s, const CliActions* done) {
  json j{{"op", layer::to_string(s.kind)}};
  switch (s.kind) {
    case ApplyStep::Kind::kImport:
      j["image"] = s.target;
      j["file"] = s.image.file;
      j["block_size"] = s.image.block_size.value_or(layer::kDefaultBlockSize);
      break;
    case ApplyStep::Kind::kCreate:
      j["container"] = s.target;
      j["image"] = s.container.image;
      j["size"] = s.container.size_bytes ? json(*s.container.size_bytes) : json(nullptr);
      j["resources"] = base_resources_json(s.container.resources);
      j["labels"] = labels_json(s.container.labels);
      break;
    case ApplyStep::Kind::kResources:
      j["container"] = s.target;
      j["from"] = base_resources_json(s.resources_from);
      j["to"] = base_resources_json(s.resources_to);
      break;
    case ApplyStep::Kind::kLabels:
      j["container"] = s.target;
      j["from"] = labels_json(s.labels_from);
      j["to"] = labels_json(s.labels_to);
      break;
    case ApplyStep::Kind::kSnapshot:
      j["container"] = s.target;
      j["snapshot"] = s.snapshot;
      break;
    case ApplyStep::Kind::kRemove:
      j["container"] = s.target;
      break;
  }
  j["field"] = s.field.empty() ? json(nullptr) : json(s.field);
  if (s.kind == ApplyStep::Kind::kResources || s.kind == ApplyStep::Kind::kSnapshot) {
    if (done != nullptr)
      j["live"] = done->live.contains(s.target);
    else
      j["served_by"] = s.served_by ? json(*s.served_by) : json(nullptr);
  }
  return j;
}

std::string step_text(const ApplyStep& s) {
  switch (s.kind) {
    case ApplyStep::Kind::kImport:
      return fmt::format("import {} from {}", s.target, layer::escape_control(s.image.file));
    case ApplyStep::Kind::kCreate: {
      auto labels = s.container.labels;
      labels.erase(layer::kApplySpecLabel);
      return fmt::format(
          "create {} on {} (size {}; resources {}; labels {}{})", s.target, s.container.image,
          s.container.size_bytes ? human_size(*s.container.size_bytes) : "the image's",
          resources_summary(s.container.resources), labels_text(labels),
          s.container.snapshots.empty() ? "" : "; then snapshots");
    }
    case ApplyStep::Kind::kResources:
      return fmt::format("set {}: resources {} -> {}{}", s.target,
                         resources_summary(s.resources_from), resources_summary(s.resources_to),
                         s.served_by ? " (served: applied live)" : "");
    case ApplyStep::Kind::kLabels:
      return fmt::format("set {}: labels {} -> {}", s.target, labels_text(s.labels_from),
                         labels_text(s.labels_to));
    case ApplyStep::Kind::kSnapshot:
      return fmt::format("snapshot {}@{}{}", s.target, s.snapshot,
                         s.served_by ? " (served: taken live)" : "");
    case ApplyStep::Kind::kRemove:
      return fmt::format("remove {} (no longer in the spec)", s.target);
  }
  return "?";
}

Result<std::string> read_spec(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    if (std::cin.bad()) return make_error(EIO, "reading the spec from stdin failed");
    return text;
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return make_error(EINVAL, "{}: is a directory, not a spec file", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno != 0 ? errno : ENOENT;
    return layer::sys_error(err, "spec {}", path);
  }
  // One more byte than the limit: parse_spec names the size.
  text.resize(layer::kMaxApplySpecBytes + 1);
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad()) return make_error(EIO, "reading spec {} failed", path);
  text.resize(static_cast<size_t>(in.gcount()));
  return text;
}

void print_json_line(const json& j) {
  std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
}

}  // namespace

Result<int> run_apply(const std::string& pool_root, bool as_json, const ApplyArgs& a) {
  LAYER_ASSIGN(const std::string text, read_spec(a.spec));
  std::string base_dir = ".";
  if (a.spec != "-") base_dir = std::filesystem::path(a.spec).parent_path().string();
  if (base_dir.empty()) base_dir = ".";
  const std::string label = a.spec == "-" ? "stdin" : a.spec;
  // Every error about the spec starts with the file, then the field.
  auto about_spec = [&](Error e) {
    e.message = label + ": " + e.message;
    return e;
  };
  auto spec = layer::parse_spec(text, base_dir);
  if (!spec) return about_spec(std::move(spec).error());

  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = a.dry_run}));
  LAYER_ASSIGN(const auto state, layer::observe_pool(*pool));
  auto plan = layer::make_plan(*spec, state, {.prune = a.prune});
  if (!plan) return about_spec(std::move(plan).error());

  json result{{"ok", true},
              {"spec", spec->name},
              {"dry_run", a.dry_run},
              {"changed", !a.dry_run && !plan->empty()},
              {"steps", json::array()}};
  if (a.dry_run || plan->empty()) {
    for (const auto& s : plan->steps) result["steps"].push_back(step_json(s, nullptr));
    if (as_json) {
      print_json_line(result);
    } else if (plan->empty()) {
      std::cout << fmt::format("nothing to do: the pool matches spec \"{}\"\n", spec->name);
    } else {
      for (const auto& s : plan->steps) std::cout << step_text(s) << '\n';
      std::cout << fmt::format("{} change{} planned (dry run: nothing changed)\n",
                               plan->steps.size(), plan->steps.size() == 1 ? "" : "s");
    }
    return 0;
  }

  // A copy of the index before a bulk change, as `layer rm` and `image import` take one.
  auto backup = layer::backup_index(*pool, "apply", std::chrono::seconds(60));
  if (!backup) {
    if (backup.error().code == EUCLEAN) return std::move(backup).error();
    std::cerr << "layer: warning: no copy of the index was taken before this change: "
              << backup.error().message << '\n';
  }
  CliActions actions(*pool);
  layer::ApplyOutcome outcome;
  // Text: each step as it starts, so a long import shows what it is doing.
  const auto progress = [&](const ApplyStep& s) {
    if (!as_json) std::cout << step_text(s) << '\n' << std::flush;
  };
  LAYER_TRY(layer::execute_plan(*plan, actions, &outcome, progress));
  for (const auto& w : actions.warnings) std::cerr << "layer: warning: " << w << '\n';
  if (as_json) {
    for (const auto& s : plan->steps) result["steps"].push_back(step_json(s, &actions));
    if (!actions.warnings.empty()) result["warnings"] = actions.warnings;
    print_json_line(result);
  } else {
    std::cout << fmt::format("applied {} change{} (spec \"{}\")\n", plan->steps.size(),
                             plan->steps.size() == 1 ? "" : "s", spec->name);
  }
  return 0;
}

}  // namespace layer_cli
