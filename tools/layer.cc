// layer.cc — the `layer` CLI: parses arguments (CLI11), calls lib/, prints text or JSON.
//
// The contract is docs/cli-spec.md; the user reference is docs/cli.md. lib/ returns Result
// values; a failed one becomes a CliError exception here (the one exception type of tools/),
// caught once in main(), which prints one `layer: error:` line (JSON with --json) and exits 1
// for the user's mistakes and 2 for internal failures.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "access.h"
#include "apply_cmd.h"
#include "audit.h"
#include "control.h"
#include "disk.h"
#include "error.h"
#include "fsck.h"
#include "hasher.h"
#include "images.h"
#include "import.h"
#include "index.h"
#include "index_backup.h"
#include "index_check.h"
#include "index_restore.h"
#include "isolate.h"
#include "layers.h"
#include "locks.h"
#include "mover.h"
#include "names.h"
#include "output.h"
#include "pool.h"
#include "pool_cmd.h"
#include "predict_cmd.h"
#include "profile_cmd.h"
#include "qmp.h"
#include "qos.h"
#include "records.h"
#include "scrub.h"
#include "snapshots.h"
#include "stats_cmd.h"
#include "tier.h"
#include "version.h"

namespace {

using layer::errno_name;
using layer::Error;
using layer::LayerId;
using layer::Result;
using layer::Status;
// ordered_json keeps the fields in the order of docs/cli-spec.md.
using json = nlohmann::ordered_json;
using namespace layer_cli;

constexpr int kExitUser = 1;
constexpr int kExitInternal = 2;
// nbdkit starts --threads workers for every connection: 1,000 open exports at 32 would be
// 33,000 threads, past the common pid_max of 32,768, and 363 KiB of memory each; at 8, 9,000
// threads and 141 KiB (docs/performance.md, "Scale of one host").
constexpr unsigned kDefaultThreads = 8;
constexpr const char* kDefaultListen = "127.0.0.1";
constexpr const char* kDefaultSocketName = "nbd.sock";

// The one exception type of tools/: carries a lib Error up to main().
struct CliError {
  Error error;
};

[[noreturn]] void fail(int code, std::string message) {
  throw CliError{Error{code, std::move(message)}};
}

template <typename T>
T take(Result<T> result) {
  if (!result.ok()) throw CliError{std::move(result).error()};
  return std::move(result).value();
}

void check(Status status) {
  if (!status.ok()) throw CliError{std::move(status).error()};
}

// The errno values that mean "the user asked for something that cannot be done" (exit 1);
// everything else (EIO, ENOMEM, ...) is a failure of the system or of layer itself (exit 2).
int exit_code_for(int code) {
  static constexpr int kUserErrors[] = {ENOENT,       EEXIST, EINVAL, EBUSY,  ENOTSUP,
                                        EACCES,       EPERM,  ENOSPC, EDQUOT, ENOTEMPTY,
                                        ENAMETOOLONG, ERANGE, EROFS};
  return std::find(std::begin(kUserErrors), std::end(kUserErrors), code) != std::end(kUserErrors)
             ? kExitUser
             : kExitInternal;
}

// Paths and descriptions may hold bytes that are not UTF-8; never let that fail the output.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int report_error(const Error& error, int exit_code, bool json_errors) {
  if (json_errors) {
    json j;
    j["error"] = {
        {"message", error.message}, {"errno", errno_name(error.code)}, {"exit", exit_code}};
    std::cerr << dump(j) << '\n';
  } else {
    // One line, whatever the message quotes (a name with a newline, say).
    std::cerr << "layer: error: " << layer::escape_control(error.message) << '\n';
  }
  return exit_code;
}

// Options valid before or after the subcommand (CLI11 fallthrough).
struct Globals {
  std::string pool;
  bool json = false;
};

std::string resolve_pool(const Globals& g) {
  if (!g.pool.empty()) return g.pool;
  const char* env = std::getenv("LAYER_POOL");
  if (env != nullptr && *env != '\0') return env;
  fail(EINVAL, "no pool given: use --pool POOL or set LAYER_POOL");
}

std::unique_ptr<layer::Pool> open_pool(const Globals& g, bool writable) {
  return take(layer::Pool::open(resolve_pool(g), {.read_only = !writable}));
}

// A copy of the index before a bulk change (docs/design.md "Index copies"). A damaged index
// stops the command before it changes anything; a copy that cannot be written (a full disk)
// does not stop it (the change may be what frees space): a warning says so.
void copy_index_before(layer::Pool& pool, const char* reason) {
  // A copy taken in the last minute is close enough (a script's commands share one).
  auto r = layer::backup_index(pool, reason, std::chrono::seconds(60));
  if (r) return;
  if (r.error().code == EUCLEAN) throw CliError{std::move(r).error()};
  std::cerr << "layer: warning: no copy of the index was taken before this change: "
            << r.error().message << '\n';
}

std::string absolute_path(const std::string& path) {
  std::error_code ec;
  auto abs = std::filesystem::absolute(path, ec);
  if (ec) fail(ec.value(), fmt::format("{}: {}", path, ec.message()));
  return abs.lexically_normal().string();
}

void print_json(const json& j) { std::cout << dump(j) << '\n'; }

// The one-object result of a command that changes something: JSON, or one line of text.
void print_result(const Globals& g, const json& j, const std::string& text) {
  if (g.json) {
    print_json(j);
  } else {
    std::cout << text << '\n';
  }
}

// ---- argument helpers ----

// Sizes: parse_size's syntax, and a whole number of 512-byte sectors (cli-spec.md).
uint64_t parse_sector_size(const std::string& text, const char* what) {
  const uint64_t bytes = take(layer::parse_size(text));
  if (bytes == 0 || bytes % 512 != 0) {
    fail(EINVAL, fmt::format("{} {}: must be a positive multiple of 512 bytes", what, text));
  }
  return bytes;
}

// An option given an empty value (`--size ""`, `--rate=`): refused, not taken as "not given"
// (the commands read an empty string as the default). Free text may be empty.
void refuse_empty_values(const CLI::App& app) {
  for (const CLI::Option* opt : app.get_options()) {
    if (opt->count() == 0 || !opt->nonpositional() || opt->get_type_size() == 0 ||
        opt->get_name() == "--description")
      continue;
    for (const std::string& value : opt->results()) {
      if (value.empty())
        fail(EINVAL, fmt::format("{}: the value must not be empty", opt->get_name()));
    }
  }
  for (const CLI::App* sub : app.get_subcommands()) refuse_empty_values(*sub);
}

// ---- commands ----

struct InitArgs {
  std::string pool, ssd, hdd;
};

int cmd_init(const Globals& g, const InitArgs& a) {
  if (!a.pool.empty() && !g.pool.empty() && absolute_path(a.pool) != absolute_path(g.pool)) {
    fail(EINVAL, fmt::format("pool given twice: init {} and --pool {}", a.pool, g.pool));
  }
  const std::string root = !a.pool.empty() ? a.pool : resolve_pool(g);
  // Tier paths are recorded in the pool: relative ones would depend on today's cwd.
  check(layer::Pool::create(root, a.ssd.empty() ? "" : absolute_path(a.ssd),
                            a.hdd.empty() ? "" : absolute_path(a.hdd)));
  print_result(g, {{"ok", true}, {"pool", absolute_path(root)}}, "created pool " + root);
  return 0;
}

struct ImportArgs {
  std::string ref, file, block_size, description;
};

int cmd_image_import(const Globals& g, const ImportArgs& a) {
  check(layer::validate_image_ref(a.ref));
  uint64_t block_size = layer::kDefaultBlockSize;
  if (!a.block_size.empty()) {
    block_size = take(layer::parse_size(a.block_size));
    if (block_size > UINT32_MAX)
      fail(EINVAL, fmt::format("block size {} is too large", a.block_size));
  }
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "image-import");

  // Progress goes to a terminal only: a script's stderr stays clean.
  const bool show_progress = isatty(STDERR_FILENO) == 1;
  int last_percent = -1;
  auto progress = [&](uint64_t done, uint64_t total) {
    const int percent = total == 0 ? 100 : static_cast<int>(done * 100 / total);
    if (!show_progress || percent == last_percent) return;
    last_percent = percent;
    std::cerr << fmt::format("\rimporting {}: {}% ({}/{} MiB)", a.ref, percent, done >> 20,
                             total >> 20)
              << std::flush;
  };
  auto result = layer::import_image(*pool, a.ref, a.file, static_cast<uint32_t>(block_size),
                                    progress, a.description);
  if (last_percent >= 0) std::cerr << '\n';
  auto info = take(std::move(result));

  const auto& img = info.image;
  print_result(
      g, image_json(info),
      fmt::format("imported {}: layer {}, {}, block size {}, {} of data", a.ref, info.layer.id,
                  human_size(img.size_bytes), img.block_size,
                  human_size(data_bytes(info.data_blocks, img.block_size, img.size_bytes))));
  return 0;
}

int cmd_image_ls(const Globals& g) {
  auto pool = open_pool(g, false);
  const auto images = take(layer::list_images(*pool));
  if (g.json) {
    json j = json::array();
    for (const auto& info : images) j.push_back(image_json(info));
    print_json(j);
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {
      {"REF", "LAYER", "SIZE", "BLOCK", "DATA", "CONTAINERS", "CREATED"}};
  for (const auto& info : images) {
    const auto& img = info.image;
    rows.push_back({img.ref, std::to_string(info.layer.id), human_size(img.size_bytes),
                    std::to_string(img.block_size),
                    human_size(data_bytes(info.data_blocks, img.block_size, img.size_bytes)),
                    std::to_string(info.containers), format_time(img.created_unix)});
  }
  print_table(rows);
  return 0;
}

int cmd_image_rm(const Globals& g, const std::string& ref) {
  check(layer::validate_image_ref(ref));
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "image-rm");
  check(layer::remove_image(*pool, ref));
  print_result(g, {{"ok", true}, {"ref", ref}}, "removed image " + ref);
  return 0;
}

// The resource options of clone and set (issue 14 item 1; qos.h).
struct ResourceArgs {
  std::optional<std::string> cpu, memory, net, iops, bandwidth, priority, for_;
  // `--iops auto` / `--bandwidth auto` (forecast.h) and their bounds.
  std::optional<std::string> iops_floor, iops_ceiling, bandwidth_floor, bandwidth_ceiling;
};

void add_resource_options(CLI::App* cmd, ResourceArgs& a, bool timed) {
  cmd->add_option("--cpu", a.cpu, "CPUs for the provisioning scripts (e.g. 2, 0.5; none)")
      ->type_name("N");
  cmd->add_option("--memory", a.memory, "memory for the provisioning scripts (e.g. 1G; none)")
      ->type_name("SIZE");
  cmd->add_option("--net", a.net, "network bytes/s for the provisioning scripts (e.g. 100M; none)")
      ->type_name("RATE");
  cmd->add_option("--iops", a.iops,
                  "requests per second, enforced by the server (none: no limit; auto: follow "
                  "the forecast)")
      ->type_name("N|auto");
  cmd->add_option("--iops-floor", a.iops_floor, "with --iops auto: at least N (default 100)")
      ->type_name("N");
  cmd->add_option("--iops-ceiling", a.iops_ceiling, "with --iops auto: at most N (none: no cap)")
      ->type_name("N");
  cmd->add_option("--bandwidth", a.bandwidth,
                  "bytes per second read and written, enforced by the server (e.g. 50M; none; "
                  "auto: follow the forecast)")
      ->type_name("RATE|auto");
  cmd->add_option("--bandwidth-floor", a.bandwidth_floor,
                  "with --bandwidth auto: at least RATE (default 1M)")
      ->type_name("RATE");
  cmd->add_option("--bandwidth-ceiling", a.bandwidth_ceiling,
                  "with --bandwidth auto: at most RATE (none: no cap)")
      ->type_name("RATE");
  cmd->add_option("--priority", a.priority, "1 (lowest) to 10 (highest); default 5")
      ->type_name("1..10");
  if (timed)
    cmd->add_option("--for", a.for_,
                    "only for this long (e.g. 90s, 1h): --iops and --bandwidth, then they revert")
        ->type_name("DURATION");
}

// The options given, checked. Errors: EINVAL naming the option and the value.
layer::ResourceChange parse_resources(const ResourceArgs& a) {
  layer::ResourceChange c;
  auto parse = [](const char* option, const std::string& text, auto parser) {
    auto v = parser(text);
    if (!v) fail(EINVAL, fmt::format("{} {}: {}", option, text, v.error().message));
    return *v;
  };
  auto size = [](std::string_view text) -> Result<uint64_t> {
    if (text == "none") return uint64_t{0};
    return layer::parse_size(text);
  };
  if (a.cpu) c.cpu_millis = parse("--cpu", *a.cpu, layer::parse_cpu);
  if (a.memory) c.memory_bytes = parse("--memory", *a.memory, size);
  if (a.net) c.net_bps = parse("--net", *a.net, size);
  if (a.iops && *a.iops != "auto") c.iops = parse("--iops", *a.iops, layer::parse_count);
  if (a.bandwidth && *a.bandwidth != "auto") c.bandwidth = parse("--bandwidth", *a.bandwidth, size);
  if ((a.iops && *a.iops == "auto") || a.iops_floor || a.iops_ceiling) {
    if (c.iops) fail(EINVAL, "--iops-floor and --iops-ceiling go with --iops auto, not a number");
    c.auto_iops = layer::ResourceChange::AutoChange{a.iops.has_value(), {}, {}};
    if (a.iops_floor) c.auto_iops->floor = parse("--iops-floor", *a.iops_floor, layer::parse_count);
    if (a.iops_ceiling)
      c.auto_iops->ceiling = parse("--iops-ceiling", *a.iops_ceiling, layer::parse_count);
  }
  if ((a.bandwidth && *a.bandwidth == "auto") || a.bandwidth_floor || a.bandwidth_ceiling) {
    if (c.bandwidth)
      fail(EINVAL,
           "--bandwidth-floor and --bandwidth-ceiling go with --bandwidth auto, not a number");
    c.auto_bandwidth = layer::ResourceChange::AutoChange{a.bandwidth.has_value(), {}, {}};
    if (a.bandwidth_floor)
      c.auto_bandwidth->floor = parse("--bandwidth-floor", *a.bandwidth_floor, size);
    if (a.bandwidth_ceiling)
      c.auto_bandwidth->ceiling = parse("--bandwidth-ceiling", *a.bandwidth_ceiling, size);
  }
  if (a.priority) {
    c.priority = parse("--priority", *a.priority, layer::parse_count);
    if (*c.priority < 1 || *c.priority > 10)
      fail(EINVAL, fmt::format("--priority {}: must be 1 to 10", *a.priority));
  }
  if (a.for_) {
    c.for_ms = parse("--for", *a.for_, layer::parse_duration) * 1000;
    if (c.for_ms == 0) fail(EINVAL, fmt::format("--for {}: must be longer than 0", *a.for_));
  }
  return c;
}

struct CloneArgs {
  std::string image, name, size;
  ResourceArgs resources;
};

int cmd_clone(const Globals& g, const CloneArgs& a) {
  if (!take(layer::parse_snapshot_ref(a.image))) check(layer::validate_image_ref(a.image));
  check(layer::validate_name(a.name, "container name"));
  std::optional<uint64_t> size;
  if (!a.size.empty()) size = parse_sector_size(a.size, "size");
  const auto change = parse_resources(a.resources);
  layer::Resources resources;
  if (!change.empty()) resources = take(layer::apply_change({}, change, layer::now_unix_ms()));
  auto pool = open_pool(g, true);
  const auto info = take(pool->clone(a.image, a.name, size, resources));
  json j = container_detail_json(*pool, info);
  take(add_auto_limits(*pool, info.container, layer::now_unix_ms(), j["resources"]));
  print_result(
      g, j,
      fmt::format("cloned {} as {} ({})", a.image, a.name, human_size(info.container.size_bytes)));
  return 0;
}

int cmd_ls(const Globals& g) {
  auto pool = open_pool(g, false);
  const auto containers = take(pool->list_containers());
  if (g.json) {
    json j = json::array();
    for (const auto& info : containers) j.push_back(container_json(info));
    print_json(j);
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "IMAGE", "SIZE", "USED", "SERVED", "CREATED"}};
  for (const auto& info : containers) {
    const auto& c = info.container;
    rows.push_back({c.name, c.image_ref.empty() ? "-" : c.image_ref, human_size(c.size_bytes),
                    human_size(data_bytes(info.delta_data_blocks, c.block_size, c.size_bytes)),
                    info.served_by.value_or("-"), format_time(c.created_unix)});
  }
  print_table(rows);
  return 0;
}

int cmd_inspect(const Globals& g, const std::string& name) {
  check(layer::validate_name(name, "container name"));
  auto pool = open_pool(g, false);
  const auto info = take(pool->inspect(name));
  json j = container_detail_json(*pool, info);
  const auto auto_text =
      take(add_auto_limits(*pool, info.container, layer::now_unix_ms(), j["resources"]));
  if (g.json) {
    print_json(j);
    return 0;
  }
  const auto& c = info.container;
  std::string labels;
  for (const auto& [key, value] : c.labels)
    labels += (labels.empty() ? "" : ", ") + key + "=" + value;
  std::cout << "name: " << c.name << '\n'
            << "image: " << (c.image_ref.empty() ? "- (flattened)" : c.image_ref) << '\n'
            << fmt::format("size: {} ({} bytes)\n", human_size(c.size_bytes), c.size_bytes)
            << "block size: " << c.block_size << '\n'
            << "delta layer: " << c.delta_layer << '\n'
            << "delta data: " << human_size(j["delta_data_bytes"].get<uint64_t>()) << '\n'
            << "served by: " << info.served_by.value_or("-") << '\n'
            << "created: " << format_time(c.created_unix) << '\n'
            << "labels: " << (labels.empty() ? "-" : labels) << '\n';
  std::string rules;
  for (const auto& rule : c.access) rules += (rules.empty() ? "" : "; ") + layer::describe(rule);
  std::cout << "access: " << (rules.empty() ? "- (the pool's policy)" : rules) << '\n'
            << "resources: " << resources_text(c.resources, layer::now_unix_ms()) << '\n';
  if (!auto_text.empty()) std::cout << "auto limits: " << auto_text << '\n';
  std::cout << "chain (top first):\n";
  std::vector<std::vector<std::string>> rows = {{"  LAYER", "STATE", "TIER", "DATA", "PATH"}};
  for (const auto& layer : j["chain"]) {
    rows.push_back({"  " + std::to_string(layer["layer"].get<uint64_t>()),
                    layer["state"].get<std::string>(), layer["tier"].get<std::string>(),
                    human_size(layer["data_bytes"].get<uint64_t>()),
                    layer["path"].get<std::string>()});
  }
  print_table(rows);
  return 0;
}

struct SetArgs {
  std::string container;
  ResourceArgs resources;
};

// layer set: changes a container's resources in one transaction, then tells the server that
// serves it, which applies them to the running export at once (qos.h). A server that does not
// serve it reads them when it opens it.
int cmd_set(const Globals& g, const SetArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  const auto change = parse_resources(a.resources);
  auto pool = open_pool(g, true);
  const uint64_t now_ms = layer::now_unix_ms();
  const auto r = take(layer::change_resources(*pool, a.container, change, now_ms));
  bool live = false;
  json applied = nullptr;  // the limits in force in the server, as it replied
  std::string warning;
  const auto info = take(pool->inspect(a.container));
  const pid_t pid = pool->serving_pid(info.container.id);
  // A holder note outlives a server killed before it let go: only a held lock means a server.
  if (pid != 0 && take(pool->locks().is_locked(layer::LockKind::kContainer, info.container.id))) {
    const auto reply = layer::control_request(
        layer::control_socket_path(pool->paths().run_dir, pid),
        {{"op", "resources"}, {"container", a.container}}, std::chrono::seconds(10));
    const Status status = reply.ok() ? layer::control_status(*reply) : reply.error();
    if (status.ok()) {
      live = reply->value("served", false);
      applied = {{"iops", reply->value("iops", uint64_t{0})},
                 {"bandwidth", reply->value("bandwidth", uint64_t{0})}};
    } else {
      // Recorded all the same: the server applies them at its next open of the container.
      warning = fmt::format("its server (pid {}) did not apply them now: {}", pid,
                            status.error().message);
    }
  }
  json j{{"ok", true},
         {"container", a.container},
         {"resources", resources_json(r, now_ms)},
         {"live", live}};
  auto record = info.container;
  record.resources = r;
  const auto auto_text = take(add_auto_limits(*pool, record, now_ms, j["resources"]));
  if (live) j["applied"] = applied;
  if (!warning.empty()) j["warning"] = warning;
  if (!warning.empty() && !g.json) std::cerr << "layer: warning: " << warning << '\n';
  // --memory on a guest started by scripts/vm-launch: its balloon, through QMP (qmp.h).
  const auto guest = apply_guest_memory(*pool, a.container, change);
  if (!guest.json.is_null()) j["guest"] = guest.json;
  print_result(
      g, j,
      fmt::format("{}: {}{}{}{}", a.container, resources_text(r, now_ms),
                  auto_text.empty() ? "" : "; auto limits: " + auto_text,
                  live ? " (applied live)" : "", guest.text.empty() ? "" : "; " + guest.text));
  return 0;
}

struct AccessArgs {
  std::string container;
  std::vector<std::string> allow, deny, remove;
  bool read_only = false, clear = false;
};

int cmd_access(const Globals& g, const AccessArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  std::vector<layer::AccessRule> add, remove;
  for (const auto& s : a.allow) {
    auto rule = take(layer::parse_access_subject(s));
    rule.read_only = a.read_only;
    add.push_back(std::move(rule));
  }
  for (const auto& s : a.deny) {
    auto rule = take(layer::parse_access_subject(s));
    rule.deny = true;
    add.push_back(std::move(rule));
  }
  for (const auto& s : a.remove) remove.push_back(take(layer::parse_access_subject(s)));
  if (a.read_only && a.allow.empty()) fail(EINVAL, "--read-only qualifies --allow rules");
  const bool change = a.clear || !add.empty() || !remove.empty();
  auto pool = open_pool(g, change);
  std::vector<layer::AccessRule> rules;
  if (change) {
    rules = take(layer::change_access(*pool, a.container, a.clear, remove, add));
  } else {
    rules = take(pool->inspect(a.container)).container.access;
  }
  const auto policy = take(layer::load_access_policy(*pool));
  json list = json::array();
  std::string text;
  for (const auto& rule : rules) {
    list.push_back(access_rule_json(rule));
    text += (text.empty() ? "" : "\n") + layer::describe(rule);
  }
  if (rules.empty())
    text = fmt::format("no rules: {}", policy == layer::AccessPolicy::kOpen
                                           ? "any client of the unix socket may open it (the "
                                             "pool's access is open)"
                                           : "no client may open it (the pool's access is rules)");
  print_result(g,
               {{"ok", true},
                {"container", a.container},
                {"changed", change},
                {"rules", list},
                {"pool_access", std::string(layer::to_string(policy))}},
               text);
  return 0;
}

struct AuditArgs {
  std::string container, since, limit;
};

// --since: a unix time, or a duration back from now ("1h").
double parse_since(const std::string& text) {
  if (text.empty()) return 0;
  if (text.find_first_not_of("0123456789") == std::string::npos && text.size() >= 9) {
    uint64_t t = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), t);
    if (ec != std::errc() || end != text.data() + text.size())
      fail(EINVAL, fmt::format("--since {}: not a unix time (too large)", text));
    return static_cast<double>(t);
  }
  const uint64_t back = take(layer::parse_duration(text));
  return static_cast<double>(layer::now_unix()) - static_cast<double>(back);
}

int cmd_audit(const Globals& g, const AuditArgs& a) {
  if (!a.container.empty()) check(layer::validate_name(a.container, "container name"));
  const double since = parse_since(a.since);
  const std::string root = resolve_pool(g);
  check(layer::Pool::validate(root));
  size_t bad = 0;
  auto lines =
      take(layer::read_audit(layer::audit_dir(absolute_path(root)), a.container, since, &bad));
  // --limit N: a whole number (CLI11 took "-1" for a size_t as 2^64-1, and ignored overflow).
  size_t limit = 0;
  if (!a.limit.empty()) {
    const auto [end, ec] = std::from_chars(a.limit.data(), a.limit.data() + a.limit.size(), limit);
    if (ec != std::errc() || end != a.limit.data() + a.limit.size())
      fail(EINVAL, fmt::format("--limit {}: not a whole number of events", a.limit));
  }
  if (limit != 0 && lines.size() > limit)
    lines.erase(lines.begin(), lines.end() - static_cast<std::ptrdiff_t>(limit));
  if (g.json) {
    json arr = json::array();
    for (auto& l : lines) arr.push_back(std::move(l));
    print_json({{"ok", true}, {"events", arr}, {"unreadable_lines", bad}});
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {
      {"TIME", "EVENT", "EXPORT", "PEER", "ACCESS", "READ", "WRITTEN", "WHY"}};
  for (const auto& l : lines) {
    const auto& p = l.contains("peer") ? l["peer"] : json::object();
    std::string peer = p.value("kind", std::string("?"));
    if (p.contains("uid")) peer = fmt::format("uid {}", p["uid"].get<int64_t>());
    if (p.contains("pid")) peer += fmt::format(" pid {}", p["pid"].get<int64_t>());
    if (p.contains("addr")) peer = p["addr"].get<std::string>();
    if (l.value("tls", false)) peer += " tls";
    const std::string event = l.value("event", std::string("?"));
    std::string access = "-";
    if (event == "open" || event == "close") access = l.value("read_only", false) ? "ro" : "rw";
    const bool closed = event == "close";
    rows.push_back({format_time(static_cast<uint64_t>(l["time"].get<double>())), event,
                    layer::escape_control(l.value("export", std::string())), peer, access,
                    closed ? human_size(l.value("read_bytes", uint64_t{0})) : "",
                    closed ? human_size(l.value("written_bytes", uint64_t{0})) : "",
                    event == "refuse" ? layer::escape_control(l.value("why", std::string()))
                                      : boot_event_text(l)});
  }
  print_table(rows);
  if (bad != 0) std::cerr << fmt::format("layer: {} unreadable audit lines skipped\n", bad);
  return 0;
}

int cmd_rm(const Globals& g, const std::string& name) {
  check(layer::validate_name(name, "container name"));
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "rm");
  check(pool->remove_container(name));
  print_result(g, {{"ok", true}, {"name", name}}, "removed container " + name);
  return 0;
}

// ---- snapshots ----

// The outcome of a change of what a container serves, done here or by its server.
struct Changed {
  LayerId base = 0;   // the layer the new delta sits on
  LayerId delta = 0;  // the new delta
  bool live = false;  // done by the serving server, without its clients reconnecting
};

Changed changed_from(const layer::ContainerState& st, bool live) {
  return {st.chain.empty() ? 0 : st.chain.front().id, st.delta.id, live};
}

// Runs a change of what `name` serves: here, under the container's exclusive lock, when no
// server serves it; else through the serving server's control socket (DESIGN.md "Locking"),
// which quiesces the export, changes it and resumes without the clients reconnecting.
// !allow_live refuses a served container with EBUSY and `refusal`.
// Returns the offline result, or the server's response (with "live": true).
json route_change(layer::Pool& pool, const std::string& name, const json& request, bool allow_live,
                  const std::string& refusal, const std::function<json()>& offline) {
  for (int attempt = 0;; ++attempt) {
    const auto info = take(pool.inspect(name));
    auto lock = pool.locks().try_lock(layer::LockKind::kContainer, info.container.id, true,
                                      fmt::format("container \"{}\"", name));
    if (lock.ok()) {
      json j = offline();
      j["live"] = false;
      return j;
    }
    if (lock.error().code != EBUSY) throw CliError{lock.error()};
    const pid_t pid = pool.serving_pid(info.container.id);
    if (pid == 0) {
      // No holder recorded: a server between removing its record and unlocking (it is letting
      // go), or a CLI command of another process. Try again shortly, then give up.
      if (attempt < 5) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20 << attempt));
        continue;
      }
      throw CliError{lock.error()};
    }
    if (!allow_live)
      fail(EBUSY, fmt::format("container \"{}\" is served by pid {}: {}", name, pid, refusal));
    auto response =
        layer::control_request(layer::control_socket_path(pool.paths().run_dir, pid), request);
    if (!response.ok()) {
      // The server went away between the lock and the request: try again, now offline.
      const int code = response.error().code;
      if ((code == ENOENT || code == ECONNREFUSED) && attempt < 3) continue;
      throw CliError{std::move(response).error()};
    }
    check(layer::control_status(*response));
    json j = *response;
    j["live"] = true;
    return j;
  }
}

Changed change_container(layer::Pool& pool, const std::string& name, const json& request,
                         bool allow_live, const std::string& refusal,
                         const std::function<layer::ContainerState()>& offline) {
  const json j = route_change(pool, name, request, allow_live, refusal, [&] {
    const Changed c = changed_from(offline(), false);
    return json{{"base_layer", c.base}, {"delta_layer", c.delta}};
  });
  return {j.value("base_layer", LayerId{0}), j.value("delta_layer", LayerId{0}),
          j.value("live", false)};
}

struct SnapshotArgs {
  std::string container, name;
};

int cmd_snapshot(const Globals& g, const SnapshotArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  check(layer::validate_name(a.name, "snapshot name"));
  auto pool = open_pool(g, true);
  const Changed c = change_container(
      *pool, a.container, {{"op", "snapshot"}, {"container", a.container}, {"name", a.name}}, true,
      "", [&] { return take(layer::snapshot_container(*pool, a.container, a.name)); });
  print_result(g,
               {{"ok", true},
                {"container", a.container},
                {"snapshot", a.name},
                {"layer", c.base},
                {"delta_layer", c.delta},
                {"live", c.live}},
               fmt::format("snapshot {}@{} (layer {}{})", a.container, a.name, c.base,
                           c.live ? ", taken live" : ""));
  return 0;
}

int cmd_snapshot_ls(const Globals& g, const std::string& container) {
  check(layer::validate_name(container, "container name"));
  auto pool = open_pool(g, false);
  const auto tree = take(layer::list_snapshots(*pool, container));
  const auto& c = tree.container;
  auto bytes = [&](uint64_t blocks) { return data_bytes(blocks, c.block_size, c.size_bytes); };
  if (g.json) {
    json j = {{"container", c.name}, {"snapshots", json::array()}, {"hidden", json::array()}};
    for (const auto& s : tree.snapshots)
      j["snapshots"].push_back({{"name", s.snapshot.name},
                                {"layer", s.layer.id},
                                {"parent", s.parent.empty() ? json(nullptr) : json(s.parent)},
                                {"created", s.snapshot.created_unix},
                                {"data_bytes", bytes(s.data_blocks)},
                                {"current", s.current}});
    for (const auto& h : tree.hidden)
      j["hidden"].push_back(
          {{"layer", h.layer.id}, {"data_bytes", bytes(h.data_blocks)}, {"why", h.why}});
    print_json(j);
    return 0;
  }
  // The tree: children under their parent snapshot, in creation order.
  std::map<std::string, std::vector<const layer::SnapshotInfo*>> children;
  for (const auto& s : tree.snapshots) children[s.parent].push_back(&s);
  std::vector<std::vector<std::string>> rows = {{"NAME", "LAYER", "DATA", "CREATED", ""}};
  std::function<void(const std::string&, int)> walk = [&](const std::string& parent, int depth) {
    for (const auto* s : children[parent]) {
      rows.push_back({std::string(depth * 2, ' ') + s->snapshot.name, std::to_string(s->layer.id),
                      human_size(bytes(s->data_blocks)), format_time(s->snapshot.created_unix),
                      s->current ? "<- current" : ""});
      walk(s->snapshot.name, depth + 1);
    }
  };
  walk("", 0);
  print_table(rows);
  for (const auto& h : tree.hidden)
    std::cout << fmt::format("hidden layer {}: {} ({})\n", h.layer.id,
                             human_size(bytes(h.data_blocks)), h.why);
  return 0;
}

int cmd_snapshot_rm(const Globals& g, const SnapshotArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  check(layer::validate_name(a.name, "snapshot name"));
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "snapshot-rm");
  // A served container's server removes it, so that it can merge layers its disk reads.
  const json reply = route_change(
      *pool, a.container, {{"op", "snapshot-rm"}, {"container", a.container}, {"name", a.name}},
      true, "", [&] { return json(take(layer::remove_snapshot(*pool, a.container, a.name))); });
  const auto r = reply.get<layer::RemovedSnapshot>();
  json j = r;
  j.update({{"ok", true},
            {"container", a.container},
            {"snapshot", a.name},
            {"live", reply.value("live", false)}});
  std::string text = fmt::format("removed snapshot {}@{}", a.container, a.name);
  if (r.fate == layer::RemovedSnapshot::Fate::kDropped)
    text += fmt::format("; layer {} freed", r.layer);
  if (r.fate == layer::RemovedSnapshot::Fate::kMerged)
    text += fmt::format("; layer {} merged with its child into layer {}", r.layer, r.merged_into);
  if (r.fate == layer::RemovedSnapshot::Fate::kHidden)
    text += fmt::format("; layer {} stays hidden ({})", r.layer, r.why);
  print_result(g, j, text);
  return 0;
}

struct TierMoveArgs {
  std::string target, tier, rate;
};

// A copy rate for --rate and --move-rate: SIZE per second; "none" or 0, unlimited.
uint64_t parse_rate(const std::string& option, const std::string& text) {
  if (text == "none") return 0;
  auto size = layer::parse_size(text);
  if (!size) fail(EINVAL, fmt::format("{} {}: {}", option, text, size.error().message));
  return *size;
}

std::string rate_text(uint64_t bytes_per_sec) {
  return bytes_per_sec == 0 ? "unlimited" : human_size(bytes_per_sec) + "/s";
}

// The layers `layer tier move` moves for TARGET: a layer id; NAME:VER, the image's chain; a
// container, its own snapshot layers and its delta (moved by its server when one serves it).
std::vector<LayerId> layers_to_move(layer::Pool& pool, const std::string& target) {
  if (!target.empty() && target.find_first_not_of("0123456789") == std::string::npos) {
    if (target.size() > 19) fail(ENOENT, fmt::format("layer {} not found", target));
    return {std::stoull(target)};
  }
  auto txn = take(pool.index().begin_read());
  std::vector<LayerId> out;
  if (target.find(':') != std::string::npos) {
    check(layer::validate_image_ref(target));
    const auto v = take(txn.get(layer::Db::kImages, target));
    if (!v) fail(ENOENT, fmt::format("image {} not found in pool {}", target, pool.paths().root));
    const auto image = take(layer::decode_image(*v, target));
    for (const auto& l : take(layer::chain_of(txn, image.top_layer))) out.push_back(l.id);
    return out;
  }
  check(layer::validate_name(target, "container name"));
  const auto c = take(pool.get_container(txn, target));
  const std::string prefix = layer::key_u64(c.id);
  check(txn.scan(layer::Db::kSnapshots, prefix,
                 [&](std::string_view k, std::string_view v) -> Result<bool> {
                   LAYER_ASSIGN(auto snap, layer::decode_snapshot(v, k));
                   if (std::find(out.begin(), out.end(), snap.layer) == out.end())
                     out.push_back(snap.layer);
                   return true;
                 }));
  out.push_back(c.delta_layer);
  return out;
}

json move_json(const layer::TierMoveReport& r) {
  json j{{"layer", r.layer},
         {"reloaded_by", r.reloaded_by},
         {"from", layer::to_string(r.from)},
         {"to", layer::to_string(r.to)},
         {"moved", r.moved},
         {"data_bytes", r.data_bytes},
         {"by", r.by.empty() ? "cli" : r.by}};
  if (r.pause_ms >= 0) {
    j["pause_ms"] = r.pause_ms;
    j["start_pause_ms"] = r.start_pause_ms;
    j["catch_up_rounds"] = r.catch_up_rounds;
    j["caught_up_bytes"] = r.caught_up_bytes;
  }
  return j;
}

std::string move_text(const layer::TierMoveReport& r) {
  if (!r.moved) return fmt::format("layer {} is on {} already", r.layer, layer::to_string(r.to));
  std::string text =
      fmt::format("moved layer {} from {} to {} ({} of data)", r.layer, layer::to_string(r.from),
                  layer::to_string(r.to), human_size(r.data_bytes));
  if (r.server != 0) text += fmt::format(" by the server (pid {})", r.server);
  if (r.pause_ms >= 0)
    text += fmt::format(", writes paused {:.1f} ms", std::max(r.pause_ms, r.start_pause_ms));
  return text;
}

int cmd_tier_move(const Globals& g, const TierMoveArgs& a) {
  const layer::Tier to = take(layer::parse_tier(a.tier));
  const uint64_t rate = a.rate.empty() ? 0 : parse_rate("--rate", a.rate);
  auto pool = open_pool(g, true);
  json moves = json::array();
  std::string text;
  for (const LayerId id : layers_to_move(*pool, a.target)) {
    const auto r = take(layer::move_layer_anywhere(*pool, id, to, rate));
    moves.push_back(move_json(r));
    if (!text.empty()) text += '\n';
    text += move_text(r);
  }
  print_result(g, {{"ok", true}, {"target", a.target}, {"tier", a.tier}, {"layers", moves}}, text);
  return 0;
}

// "12.5 ops/s" with three significant digits.
std::string rate(double ops) { return fmt::format("{:.3g}", ops); }

std::string ago(uint64_t now, uint64_t then) {
  if (then == 0) return "never";
  return layer::format_duration(now > then ? now - then : 0) + " ago";
}

json policy_json(const layer::TierPolicy& p) {
  json j{{"cold_after_s", p.cold_after_s}, {"cold_rate", p.cold_rate}, {"hot_rate", p.hot_rate},
         {"half_life_s", p.half_life_s},   {"move_rate", p.move_rate}, {"prewarm_s", p.prewarm_s}};
  switch (p.high_water) {
    case layer::TierPolicy::HighWater::kNone:
      j["ssd_high_water"] = nullptr;
      break;
    case layer::TierPolicy::HighWater::kBytes:
      j["ssd_high_water"] = {{"bytes", p.high_water_value}};
      break;
    case layer::TierPolicy::HighWater::kPercent:
      j["ssd_high_water"] = {{"percent", p.high_water_value}};
      break;
  }
  return j;
}

std::string policy_text(const layer::TierPolicy& p) {
  std::string hw = "none";
  if (p.high_water == layer::TierPolicy::HighWater::kBytes) hw = human_size(p.high_water_value);
  if (p.high_water == layer::TierPolicy::HighWater::kPercent)
    hw = fmt::format("{}%", p.high_water_value);
  return fmt::format(
      "cold after {} at or below {} ops/s; hot at or above {} ops/s; heat half-life {}; ssd "
      "high-water mark {}; moves copy at {}; prewarm {}",
      layer::format_duration(p.cold_after_s), rate(p.cold_rate), rate(p.hot_rate),
      layer::format_duration(p.half_life_s), hw, rate_text(p.move_rate),
      p.prewarm_s == 0 ? std::string("off") : layer::format_duration(p.prewarm_s));
}

json tier_layer_json(const layer::LayerTierStatus& l, uint64_t now) {
  json j{
      {"layer", l.layer.id},
      {"tier", layer::to_string(l.layer.tier)},
      {"state", layer::to_string(l.layer.state)},
      {"size_bytes", l.layer.size_bytes},
      {"disk_bytes", l.disk_bytes},
      {"last_access", l.heat.last_access_unix == 0 ? json(nullptr) : json(l.heat.last_access_unix)},
      {"idle_s", l.heat.last_access_unix == 0 ? json(nullptr)
                                              : json(now - std::min(now, l.heat.last_access_unix))},
      {"moved", l.heat.moved_unix == 0 ? json(nullptr) : json(l.heat.moved_unix)},
      {"read_ops", l.heat.read_ops},
      {"read_bytes", l.heat.read_bytes},
      {"write_ops", l.heat.write_ops},
      {"write_bytes", l.heat.write_bytes},
      {"read_rate", l.heat.read_rate},
      {"write_rate", l.heat.write_rate},
      {"read_bps", l.heat.read_bps},
      {"write_bps", l.heat.write_bps},
      {"predicted_rate", l.predicted},
      {"users", l.users},
      {"action",
       l.verdict.to ? (*l.verdict.to == layer::Tier::kHdd ? "demote" : "promote") : "stay"},
      {"reason", l.verdict.reason}};
  return j;
}

json ssd_json(const layer::SsdSpace& s) {
  return {{"used_bytes", s.used},
          {"high_water_bytes", s.limit == 0 ? json(nullptr) : json(s.limit)}};
}

std::string users_text(const std::vector<std::string>& users) {
  if (users.empty()) return "-";
  std::string out = users[0];
  if (users.size() > 1) out += fmt::format(" +{}", users.size() - 1);
  return out;
}

void print_tier_table(const layer::TierStatus& st) {
  std::vector<std::vector<std::string>> rows{{"LAYER", "TIER", "STATE", "ON DISK", "LAST ACCESS",
                                              "READ/S", "WRITE/S", "USED BY", "POLICY"}};
  for (const auto& l : st.layers) {
    std::string policy =
        l.verdict.to ? fmt::format("→ {}: {}", layer::to_string(*l.verdict.to), l.verdict.reason)
                     : "stay: " + l.verdict.reason;
    rows.push_back({std::to_string(l.layer.id), layer::to_string(l.layer.tier),
                    layer::to_string(l.layer.state), human_size(l.disk_bytes),
                    ago(st.now, l.heat.last_access_unix), rate(l.heat.read_rate),
                    rate(l.heat.write_rate), users_text(l.users), policy});
  }
  print_table(rows);
}

int cmd_tier_status(const Globals& g) {
  auto pool = open_pool(g, false);
  const auto st = take(layer::tier_status(*pool, layer::now_unix()));
  if (g.json) {
    json layers = json::array();
    for (const auto& l : st.layers) layers.push_back(tier_layer_json(l, st.now));
    print_json({{"ok", true},
                {"now", st.now},
                {"policy", policy_json(st.policy)},
                {"ssd", ssd_json(st.ssd)},
                {"ssd_after", ssd_json(st.ssd_after)},
                {"layers", layers}});
    return 0;
  }
  std::cout << "policy: " << policy_text(st.policy) << '\n';
  std::cout << fmt::format("ssd: {} of layer data{}", human_size(st.ssd.used),
                           st.ssd.limit == 0
                               ? std::string()
                               : fmt::format(" (high-water {})", human_size(st.ssd.limit)))
            << "\n\n";
  print_tier_table(st);
  return 0;
}

struct TierPolicyArgs {
  std::optional<std::string> cold_after, half_life, high_water, move_rate, prewarm;
  std::optional<double> cold_rate, hot_rate;
};

int cmd_tier_policy(const Globals& g, const TierPolicyArgs& a) {
  const bool change = a.cold_after || a.half_life || a.high_water || a.cold_rate || a.hot_rate ||
                      a.move_rate || a.prewarm;
  auto pool = open_pool(g, change);
  layer::TierPolicy p = take(layer::load_tier_policy(*pool));
  if (a.cold_after) p.cold_after_s = take(layer::parse_duration(*a.cold_after));
  if (a.half_life) p.half_life_s = take(layer::parse_duration(*a.half_life));
  if (a.cold_rate) p.cold_rate = *a.cold_rate;
  if (a.hot_rate) p.hot_rate = *a.hot_rate;
  if (a.move_rate) p.move_rate = parse_rate("--move-rate", *a.move_rate);
  if (a.prewarm) p.prewarm_s = *a.prewarm == "off" ? 0 : take(layer::parse_duration(*a.prewarm));
  if (a.high_water) {
    const std::string& hw = *a.high_water;
    if (hw == "none") {
      p.high_water = layer::TierPolicy::HighWater::kNone;
      p.high_water_value = 0;
    } else if (!hw.empty() && hw.back() == '%') {
      const std::string digits = hw.substr(0, hw.size() - 1);
      if (digits.empty() || digits.size() > 3 ||
          digits.find_first_not_of("0123456789") != std::string::npos)
        fail(EINVAL, fmt::format("--ssd-high-water {}: not a percentage (e.g. 80%)", hw));
      p.high_water = layer::TierPolicy::HighWater::kPercent;
      p.high_water_value = std::stoull(digits);
    } else {
      p.high_water = layer::TierPolicy::HighWater::kBytes;
      p.high_water_value = take(layer::parse_size(hw));
    }
  }
  if (change) check(layer::save_tier_policy(*pool, p));
  print_result(g, {{"ok", true}, {"changed", change}, {"policy", policy_json(p)}}, policy_text(p));
  return 0;
}

struct TierRunArgs {
  bool dry_run = false;
  std::string rate;
};

int cmd_tier_run(const Globals& g, const TierRunArgs& a) {
  const bool dry_run = a.dry_run;
  std::optional<uint64_t> rate;
  if (!a.rate.empty()) rate = parse_rate("--rate", a.rate);
  auto pool = open_pool(g, !dry_run);
  const auto r = take(layer::run_tier_policy(*pool, layer::now_unix(), dry_run, nullptr, rate));
  json planned = json::array();
  for (size_t i : r.status.order)
    planned.push_back(tier_layer_json(r.status.layers[i], r.status.now));
  json moved = json::array();
  for (const auto& m : r.moved) moved.push_back(move_json(m));
  std::string text;
  if (r.status.order.empty()) text = "nothing to move";
  for (size_t i : r.status.order) {
    const auto& v = r.status.layers[i].verdict;
    if (!text.empty()) text += '\n';
    text += fmt::format("{}layer {} {} → {}: {}", dry_run ? "would move " : "", v.id,
                        layer::to_string(v.from), layer::to_string(*v.to), v.reason);
  }
  for (const auto& m : r.moved) text += '\n' + move_text(m);
  for (const auto& b : r.busy) text += "\nbusy, left for the next run: " + b;
  for (const auto& f : r.failed) text += "\nfailed: " + f;
  const bool ok = r.failed.empty();
  if (g.json) {
    print_json({{"ok", ok},
                {"dry_run", dry_run},
                {"planned", planned},
                {"moved", moved},
                {"busy", r.busy},
                {"failed", r.failed},
                {"ssd", ssd_json(r.status.ssd)},
                {"ssd_after", ssd_json(r.status.ssd_after)}});
  } else {
    std::cout << text << '\n';
  }
  if (!ok) {
    std::cerr << fmt::format("layer: error: {} of {} moves failed\n", r.failed.size(),
                             r.status.order.size());
    return kExitInternal;
  }
  return 0;
}

struct RollbackArgs {
  std::string container, snapshot, keep_as;
  bool force = false;
};

int cmd_rollback(const Globals& g, const RollbackArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  check(layer::validate_name(a.snapshot, "snapshot name"));
  std::optional<std::string> keep;
  if (!a.keep_as.empty()) {
    check(layer::validate_name(a.keep_as, "snapshot name"));
    keep = a.keep_as;
  }
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "rollback");
  json request = {{"op", "rollback"}, {"container", a.container}, {"name", a.snapshot}};
  if (keep) request["keep_as"] = *keep;
  const Changed c = change_container(
      *pool, a.container, request, a.force,
      "rolling back under a running guest makes its page cache lie; stop the guest, or use "
      "--force",
      [&] {
        std::vector<uint64_t> drops;
        auto st = take(layer::rollback_container(*pool, a.container, a.snapshot, keep, &drops));
        check(layer::finish_drops_after_removal(
            *pool, drops, fmt::format("the rolled-back delta of container \"{}\"", a.container)));
        return st;
      });
  json j = {{"ok", true},
            {"container", a.container},
            {"snapshot", a.snapshot},
            {"delta_layer", c.delta},
            {"live", c.live}};
  if (keep) j["kept_as"] = *keep;
  print_result(g, j,
               fmt::format("rolled {} back to {}{}{}", a.container, a.snapshot,
                           keep ? fmt::format(" (the previous state is snapshot {})", *keep) : "",
                           c.live ? ", live" : ""));
  return 0;
}

struct CommitArgs {
  std::string container, image, description;
};

int cmd_commit(const Globals& g, const CommitArgs& a) {
  check(layer::validate_name(a.container, "container name"));
  check(layer::validate_image_ref(a.image));
  auto pool = open_pool(g, true);
  const Changed c = change_container(
      *pool, a.container,
      {{"op", "commit"},
       {"container", a.container},
       {"image", a.image},
       {"description", a.description}},
      true, "",
      [&] { return take(layer::commit_container(*pool, a.container, a.image, a.description)); });
  print_result(g,
               {{"ok", true},
                {"container", a.container},
                {"image", a.image},
                {"layer", c.base},
                {"delta_layer", c.delta},
                {"live", c.live}},
               fmt::format("committed {} as image {} (layer {}{})", a.container, a.image, c.base,
                           c.live ? ", live" : ""));
  return 0;
}

int cmd_flatten(const Globals& g, const std::string& container) {
  check(layer::validate_name(container, "container name"));
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "flatten");
  const Changed c = change_container(
      *pool, container, {{"op", "flatten"}, {"container", container}}, true, "", [&] {
        std::vector<uint64_t> drops;
        auto st = take(layer::flatten_container(*pool, container, &drops));
        check(layer::finish_drops_after_removal(
            *pool, drops, fmt::format("the old chain of container \"{}\"", container)));
        return st;
      });
  print_result(g, {{"ok", true}, {"container", container}, {"layer", c.base}, {"live", c.live}},
               fmt::format("flattened {}: its delta now sits on layer {} alone{}", container,
                           c.base, c.live ? " (live)" : ""));
  return 0;
}

int cmd_image_history(const Globals& g, const std::string& ref) {
  check(layer::validate_image_ref(ref));
  auto pool = open_pool(g, false);
  const auto history = take(layer::image_history(*pool, ref));
  if (g.json) {
    json j = json::array();
    for (const auto& img : history)
      j.push_back({{"ref", img.ref},
                   {"layer", img.top_layer},
                   {"size", img.size_bytes},
                   {"created", img.created_unix},
                   {"description", img.description}});
    print_json(j);
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"REF", "LAYER", "SIZE", "CREATED", "DESCRIPTION"}};
  for (const auto& img : history)
    rows.push_back({img.ref, std::to_string(img.top_layer), human_size(img.size_bytes),
                    format_time(img.created_unix), img.description});
  print_table(rows);
  return 0;
}

int cmd_diff(const Globals& g, const std::string& a, const std::string& b) {
  auto pool = open_pool(g, false);
  // A served container's head is read from the index: its server folds the rounds it
  // journaled first, so the diff sees the head as of its last flush.
  for (const std::string& point : {a, b}) {
    if (point.find('@') != std::string::npos || !pool->inspect(point)) continue;
    (void)route_change(*pool, point, {{"op", "fold"}, {"container", point}}, true, "",
                       [] { return json::object(); });
  }
  const auto d = take(layer::diff(*pool, a, b));
  uint64_t total = 0;
  for (const auto& [off, len] : d.ranges) total += len;
  if (g.json) {
    json ranges = json::array();
    for (const auto& [off, len] : d.ranges) ranges.push_back({{"offset", off}, {"length", len}});
    print_json({{"a", a},
                {"b", b},
                {"size_a", d.size_a},
                {"size_b", d.size_b},
                {"block_size", d.block_size},
                {"changed_bytes", total},
                {"ranges", ranges}});
    return 0;
  }
  for (const auto& [off, len] : d.ranges) std::cout << fmt::format("{} {}\n", off, len);
  std::cerr << fmt::format("{} and {}: {} in {} ranges differ\n", a, b, human_size(total),
                           d.ranges.size());
  return 0;
}

int cmd_gc(const Globals& g, bool hash) {
  auto pool = open_pool(g, true);
  copy_index_before(*pool, "gc");
  auto r = take(layer::gc(*pool));
  // Hidden layers that only a server's disk reads: that server merges them, live.
  for (const auto& info : take(pool->list_containers())) {
    const pid_t pid = pool->serving_pid(info.container.id);
    if (pid == 0) continue;
    // A holder note outlives a server killed before it let go (SIGKILL): only a held lock
    // means a server serves it.
    if (!take(pool->locks().is_locked(layer::LockKind::kContainer, info.container.id))) continue;
    const auto reply =
        layer::control_request(layer::control_socket_path(pool->paths().run_dir, pid),
                               {{"op", "merge"}, {"container", info.container.name}});
    const layer::Status status = reply.ok() ? layer::control_status(*reply) : reply.error();
    if (!status.ok()) {
      // Gone meanwhile (its layers are then free for the next gc), or failing: say so, go on.
      r.kept.push_back(fmt::format("container \"{}\": its server (pid {}) did not merge: {}",
                                   info.container.name, pid, status.error().message));
      continue;
    }
    for (const auto& pair : reply->value("merged", nlohmann::json::array())) {
      const auto from = pair.at(0).get<LayerId>();
      r.done.push_back(
          fmt::format("layer {}: merged with its child into layer {} by the server "
                      "of container \"{}\" (pid {})",
                      from, pair.at(1).get<LayerId>(), info.container.name, pid));
      // No longer kept: gc's line for it ("layer N: kept (...)") goes.
      std::erase_if(r.kept, [&](const std::string& line) {
        return line.starts_with(fmt::format("layer {}:", from));
      });
    }
  }
  // Then checksums for the frozen layers no server reads (a server's hasher does its own), after
  // the merges, whose new layers need them too.
  layer::HashPendingReport hashed;
  if (hash) {
    layer::HashOptions options;
    options.skip_held = true;
    hashed = take(layer::hash_pending(*pool, options));
    for (const auto& l : hashed.hashed)
      r.done.push_back(fmt::format("layer {}: hashed ({} of data, {} checksum groups)", l.id,
                                   human_size(l.bytes), l.groups));
  } else {
    hashed.still_unhashed = take(layer::count_unhashed(*pool));
  }
  const auto& problems = hashed.failed;
  if (g.json) {
    print_json({{"ok", problems.empty()},
                {"done", r.done},
                {"kept", r.kept},
                {"hashed_layers", hashed.hashed.size()},
                {"hashed_bytes", hashed.bytes},
                {"unhashed_layers", hashed.still_unhashed},
                {"problems", problems}});
  } else {
    for (const auto& line : r.done) std::cout << line << '\n';
    for (const auto& line : r.kept) std::cout << line << '\n';
    for (const auto& line : problems) std::cout << line << '\n';
    if (hashed.still_unhashed > problems.size())
      std::cout << fmt::format(
          "{} frozen layer{} not hashed yet ({})\n", hashed.still_unhashed - problems.size(),
          hashed.still_unhashed - problems.size() == 1 ? "" : "s",
          hash ? "a running server reads them; its hasher hashes them" : "--no-hash");
    if (r.done.empty() && r.kept.empty() && hashed.still_unhashed == 0)
      std::cout << "nothing to collect\n";
  }
  if (problems.empty()) return 0;
  if (!g.json) {
    std::cout.flush();
    std::cerr << fmt::format("layer: error: gc could not hash {} layer{} (see above)\n",
                             problems.size(), problems.size() == 1 ? "" : "s");
  }
  return kExitInternal;
}

struct ServeArgs {
  std::string socket, listen, default_name, tier_interval, tls_psk, tls_certificates;
  bool tls_verify_peer = false;
  unsigned max_connections = 1024;
  std::optional<unsigned> max_per_peer;  // unset: see cmd_serve
  int port = 0;
  unsigned threads = kDefaultThreads;
};

// "127.0.0.1" (any 127/8 address), "::1", "localhost".
bool is_loopback(const std::string& addr) {
  if (addr == "localhost") return true;
  in_addr a4;
  if (::inet_pton(AF_INET, addr.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  in6_addr a6;
  return ::inet_pton(AF_INET6, addr.c_str(), &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

// LAYER_PLUGIN, else the build tree's plugin, else the installed one, else nbdkit's search path.
std::string plugin_path() {
  if (const char* env = std::getenv("LAYER_PLUGIN"); env != nullptr && *env != '\0') return env;
  for (const char* candidate : {LAYER_BUILD_PLUGIN, LAYER_INSTALLED_PLUGIN}) {
    if (access(candidate, R_OK) == 0) return candidate;
  }
  return "layer";
}

// A path as a URI query value (RFC 3986): unreserved characters and '/' stay, every other byte
// becomes %XX, so a space or a '%' in a pool path gives a URI that clients parse back to it.
std::string percent_encode_path(std::string_view path) {
  std::string out;
  for (unsigned char c : path) {
    const bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                            (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
                            c == '~' || c == '/';
    if (unreserved)
      out += static_cast<char>(c);
    else
      out += fmt::format("%{:02X}", c);
  }
  return out;
}

// Each open export costs nbdkit 3 fds (the connection's socket and its threads' wake-up pipe;
// an idle export opens no layer file): a shell's usual soft limit of 1,024 would stop the
// server near 330 exports. The soft limit is raised to the hard one; below what
// max_connections needs, a warning says so (nbdkit then refuses connections past it).
void raise_fd_limit(unsigned max_connections) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur < lim.rlim_max) {
    const rlimit raised{lim.rlim_max, lim.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) lim = raised;
  }
  const rlim_t needed = static_cast<rlim_t>(max_connections) * 4 + 256;
  if (max_connections != 0 && lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < needed)
    std::cerr << fmt::format(
        "layer: warning: the open files limit ({}) holds about {} connections, fewer than "
        "--max-connections {} (raise it: ulimit -n, LimitNOFILE=)\n",
        lim.rlim_cur, lim.rlim_cur > 256 ? (lim.rlim_cur - 256) / 4 : 0, max_connections);
}

// nbdkit refuses to bind over an existing path, and a killed server leaves its socket behind.
// A socket nobody accepts on is stale and removed; a live one means another server.
void clear_stale_socket(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return;
  if (!S_ISSOCK(st.st_mode)) fail(EEXIST, fmt::format("{} exists and is not a socket", path));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    fail(ENAMETOOLONG, fmt::format("socket path {} is too long", path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail(errno, fmt::format("socket: {}", std::strerror(errno)));
  const bool live = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  if (live) fail(EBUSY, fmt::format("socket {} is in use by a running server", path));
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    fail(errno, fmt::format("remove stale socket {}: {}", path, std::strerror(errno)));
  }
}

int cmd_serve(const Globals& g, const ServeArgs& a) {
  // nbdkit resolves the plugin's pool= after changing directory: pass an absolute path.
  const std::string root = absolute_path(resolve_pool(g));
  check(layer::Pool::validate(root));
  if (!a.default_name.empty()) {
    check(layer::validate_name(a.default_name, "container name"));
    // Fail now rather than at the first client. The pool is closed again before exec.
    auto pool = take(layer::Pool::open(root, {.read_only = true}));
    take(pool->inspect(a.default_name));
  }

  std::vector<std::string> args = {"nbdkit", "-f", "--threads", std::to_string(a.threads)};
  const std::string export_name = a.default_name.empty() ? "CONTAINER" : a.default_name;
  const bool tls = !a.tls_psk.empty() || !a.tls_certificates.empty();
  if (!a.tls_psk.empty() && !a.tls_certificates.empty())
    fail(EINVAL, "give one of --tls-psk and --tls-certificates");
  if (tls && a.port == 0)
    fail(EINVAL, "--tls-psk and --tls-certificates are for a TCP listener (--port)");
  if (!a.tls_psk.empty()) {
    if (::access(a.tls_psk.c_str(), R_OK) != 0) {
      const int err = errno;
      fail(err, fmt::format("--tls-psk {}: {}", a.tls_psk, std::strerror(err)));
    }
    args.insert(args.end(), {"--tls=require", "--tls-psk=" + absolute_path(a.tls_psk)});
  }
  if (!a.tls_certificates.empty()) {
    if (::access(a.tls_certificates.c_str(), R_OK | X_OK) != 0) {
      const int err = errno;
      fail(err, fmt::format("--tls-certificates {}: {}", a.tls_certificates, std::strerror(err)));
    }
    args.insert(args.end(),
                {"--tls=require", "--tls-certificates=" + absolute_path(a.tls_certificates)});
    if (a.tls_verify_peer) args.push_back("--tls-verify-peer");
  }
  std::string uri;
  if (a.port != 0) {
    const std::string listen = a.listen.empty() ? kDefaultListen : a.listen;
    // Off the host, clients' data crosses a network: no listener there without TLS.
    if (!tls && !is_loopback(listen))
      fail(EINVAL, fmt::format("refusing to listen on {} without TLS: clients off this host "
                               "would read and write disks in the clear; give --tls-psk FILE or "
                               "--tls-certificates DIR, or --listen 127.0.0.1",
                               listen));
    args.insert(args.end(), {"-p", std::to_string(a.port), "-i", listen});
    const bool ipv6 = listen.find(':') != std::string::npos;
    uri = fmt::format("nbd://{}{}{}:{}/{}", ipv6 ? "[" : "", listen, ipv6 ? "]" : "", a.port,
                      export_name);
  } else {
    const std::string sock =
        a.socket.empty() ? root + "/run/" + kDefaultSocketName : absolute_path(a.socket);
    clear_stale_socket(sock);
    args.insert(args.end(), {"-U", sock});
    // The socket (and what the server creates) open to the owner and its group only: under
    // the pool's `open` access policy, who can connect is who may open every container.
    ::umask(0007);
    uri = fmt::format("nbd+unix:///{}?socket={}", export_name, percent_encode_path(sock));
  }
  // nbdkit's limit filter bounds the connections (and so nbdkit's threads) of the whole server,
  // the ones that never open an export included; the plugin bounds each peer's and each
  // container's share of them.
  if (a.max_connections != 0) args.push_back("--filter=limit");
  args.push_back(plugin_path());
  args.push_back("pool=" + root);
  if (a.max_connections != 0) args.push_back("limit=" + std::to_string(a.max_connections));
  // On the unix socket every VM of the host may come from one local user (libvirt's qemu user):
  // the plugin's per-peer default (256) would stop such a host at 256 exports, so there a peer
  // may hold as many connections as the whole server. Over TCP a peer is an address and keeps
  // the plugin's default.
  if (a.max_per_peer)
    args.push_back("max-connections-per-peer=" + std::to_string(*a.max_per_peer));
  else if (a.port == 0)
    args.push_back("max-connections-per-peer=" + std::to_string(a.max_connections));
  if (!a.default_name.empty()) args.push_back("default=" + a.default_name);
  if (!a.tier_interval.empty()) {
    take(layer::parse_duration(a.tier_interval));
    args.push_back("tier-interval=" + a.tier_interval);
  }

  if (g.json) {
    print_json({{"pool", root}, {"uri", uri}, {"tls", tls}, {"argv", args}});
  } else {
    std::cerr << "serving pool " << root << " on " << uri << '\n';
  }
  std::cout.flush();
  std::cerr.flush();
  std::vector<char*> argv;
  for (auto& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  layer::stop_fork_server();  // reaped now: nbdkit would leave it a zombie
  raise_fd_limit(a.max_connections);
  execvp(argv[0], argv.data());
  const int err = errno;
  fail(err, fmt::format("cannot run nbdkit: {}", std::strerror(err)));
}

struct FsckArgs {
  bool full = false, repair = false;
};

int cmd_fsck(const Globals& g, const FsckArgs& a) {
  const std::string root = resolve_pool(g);
  // First the whole index, read in a child process: LMDB has no checksums, and a damaged page
  // can crash its reader. A damaged index stops here with what to do (EUCLEAN, exit 2).
  if (access((root + "/index/data.mdb").c_str(), F_OK) == 0)
    take(layer::check_index(absolute_path(root) + "/index"));
  auto pool = open_pool(g, a.repair);
  if (a.repair) copy_index_before(*pool, "fsck-repair");
  const auto r = take(layer::fsck(*pool, a.full, a.repair));
  if (g.json) {
    print_json({{"ok", r.problems.empty()},
                {"problems", r.problems},
                {"repaired", r.repaired},
                {"layers", r.layers},
                {"images", r.images},
                {"containers", r.containers},
                {"map_rows", r.map_rows},
                {"groups_verified", r.groups_verified}});
  } else {
    for (const auto& fixed : r.repaired) std::cout << "repaired: " << fixed << '\n';
    for (const auto& problem : r.problems) std::cout << problem << '\n';
    if (r.problems.empty()) {
      std::cout << fmt::format(
          "pool {}: ok ({} layers, {} images, {} containers, {} map rows, {} checksum groups "
          "verified)\n",
          root, r.layers, r.images, r.containers, r.map_rows, r.groups_verified);
    }
  }
  if (r.problems.empty()) return 0;
  if (!g.json) {
    std::cout.flush();
    std::cerr << fmt::format("layer: error: fsck found {} problem{} in pool {}\n",
                             r.problems.size(), r.problems.size() == 1 ? "" : "s", root);
  }
  return kExitUser;
}

// ---- index copies ----

json backup_json(const layer::IndexBackup& b) {
  return {{"name", b.name}, {"path", b.path},     {"created", b.created_unix},
          {"txn", b.txnid}, {"reason", b.reason}, {"bytes", b.bytes}};
}

int cmd_index_backup(const Globals& g) {
  auto pool = open_pool(g, false);
  const auto r = take(layer::backup_index(*pool, "manual"));
  std::string text = r.taken ? fmt::format("index copied to {} ({}, transaction {})", r.backup.path,
                                           human_size(r.backup.bytes), r.backup.txnid)
                             : fmt::format("index unchanged since copy {} (transaction {})",
                                           r.backup.path, r.backup.txnid);
  for (const auto& name : r.removed) text += "\nremoved the older copy " + name;
  print_result(
      g,
      {{"ok", true}, {"taken", r.taken}, {"backup", backup_json(r.backup)}, {"removed", r.removed}},
      text);
  return 0;
}

int cmd_index_ls(const Globals& g) {
  const std::string root = absolute_path(resolve_pool(g));
  // Not Pool::validate: the index itself may be damaged (that is when its copies matter), but
  // a path without an index directory is no pool, not one with no copies.
  if (!std::filesystem::exists(root)) fail(ENOENT, fmt::format("pool {} does not exist", root));
  if (!std::filesystem::is_directory(root + "/index"))
    fail(ENOENT, fmt::format("{} is not a layer pool (no index directory)", root));
  const auto copies = take(layer::list_index_backups(root + "/index"));
  if (g.json) {
    json j = json::array();
    for (const auto& b : copies) j.push_back(backup_json(b));
    print_json(j);
    return 0;
  }
  std::vector<std::vector<std::string>> rows = {{"NAME", "TAKEN", "TXN", "BY", "SIZE"}};
  for (const auto& b : copies)
    rows.push_back({b.name, format_time(b.created_unix), std::to_string(b.txnid), b.reason,
                    human_size(b.bytes)});
  print_table(rows);
  return 0;
}

int cmd_index_restore(const Globals& g, const std::string& name) {
  const std::string root = absolute_path(resolve_pool(g));
  const auto r = take(layer::restore_index(root, name));
  if (g.json) {
    json stale = json::array();
    for (const auto& c : r.stale)
      stale.push_back({{"container", c.name}, {"layer", c.delta}, {"blocks", c.blocks}});
    print_json({{"ok", true},
                {"restored", backup_json(r.from)},
                {"replaced", r.replaced.empty() ? json(nullptr) : json(r.replaced)},
                {"first_unknown_layer", r.first_unknown_layer},
                {"stale", stale},
                {"notes", r.notes}});
    return 0;
  }
  std::cout << fmt::format(
      "restored the index of pool {} from copy {} (taken {}, transaction {})\n", root, r.from.name,
      format_time(r.from.created_unix), r.from.txnid);
  if (!r.replaced.empty()) std::cout << "the index it replaced is kept as " << r.replaced << '\n';
  for (const auto& note : r.notes) std::cout << note << '\n';
  for (const auto& c : r.stale)
    std::cout << fmt::format(
        "container {}: its delta (layer {}) holds {} blocks written after the copy; not served "
        "until `layer fsck --repair` adopts them\n",
        c.name, c.delta, c.blocks);
  std::cout << fmt::format("next: layer --pool {} fsck{}\n", root,
                           r.stale.empty() ? "" : " --repair");
  return 0;
}

struct ScrubArgs {
  std::vector<std::string> targets;
  std::string rate;
};

// The layers `layer scrub` reads for TARGET: a layer id; NAME:VER, the image's chain; a
// CONTAINER or CONTAINER@SNAP, the chain it reads.
std::vector<LayerId> layers_to_scrub(layer::Pool& pool, const std::string& target) {
  if (!target.empty() && target.find_first_not_of("0123456789") == std::string::npos) {
    if (target.size() > 19) fail(ENOENT, fmt::format("layer {} not found", target));
    return {std::stoull(target)};
  }
  auto txn = take(pool.index().begin_read());
  LayerId top = 0;
  if (target.find(':') != std::string::npos) {
    check(layer::validate_image_ref(target));
    const auto v = take(txn.get(layer::Db::kImages, target));
    if (!v) fail(ENOENT, fmt::format("image {} not found in pool {}", target, pool.paths().root));
    top = take(layer::decode_image(*v, target)).top_layer;
  } else {
    const auto name = take(layer::parse_export_name(target));
    if (!name.since.empty()) fail(EINVAL, "scrub takes CONTAINER or CONTAINER@SNAP, not A..B");
    const auto c = take(pool.get_container(txn, name.container));
    top = name.snapshot.empty() ? c.delta_layer
                                : take(layer::get_snapshot(txn, c, name.snapshot)).layer;
  }
  std::vector<LayerId> out;
  for (const auto& l : take(layer::chain_of(txn, top))) out.push_back(l.id);
  return out;
}

int cmd_scrub(const Globals& g, const ScrubArgs& a) {
  auto pool = open_pool(g, false);
  std::vector<LayerId> ids;
  for (const auto& t : a.targets)
    for (LayerId id : layers_to_scrub(*pool, t))
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  layer::ScrubOptions options;
  if (!a.rate.empty()) options.rate_bytes_per_sec = take(layer::parse_size(a.rate));
  const auto r = take(layer::scrub(*pool, ids, options));
  size_t damaged = 0;
  json layers = json::array();
  for (const auto& l : r.layers) {
    if (l.bad()) ++damaged;
    json mismatches = json::array();
    for (const auto& m : l.mismatches)
      mismatches.push_back({{"offset", m.offset},
                            {"want", fmt::format("{:016x}", m.want)},
                            {"got", fmt::format("{:016x}", m.got)}});
    layers.push_back({{"layer", l.layer.id},
                      {"tier", layer::to_string(l.layer.tier)},
                      {"state", layer::to_string(l.layer.state)},
                      {"ok", !l.bad()},
                      {"skipped", l.skipped.empty() ? json(nullptr) : json(l.skipped)},
                      {"groups", l.groups},
                      {"bytes", l.bytes},
                      {"mismatches", mismatches},
                      {"errors", l.errors},
                      {"users", l.users}});
  }
  if (g.json) {
    print_json({{"ok", damaged == 0},
                {"layers", layers},
                {"groups", r.groups},
                {"bytes", r.bytes},
                {"damaged", damaged}});
  } else {
    for (const auto& l : r.layers) {
      std::string users = l.users.empty() ? std::string("no users") : fmt::format("{}", l.users[0]);
      for (size_t i = 1; i < l.users.size(); ++i) users += ", " + l.users[i];
      if (!l.skipped.empty()) {
        std::cout << fmt::format("layer {}: skipped: {}\n", l.layer.id, l.skipped);
        continue;
      }
      if (!l.bad()) {
        std::cout << fmt::format("layer {}: ok ({} verified; {})\n", l.layer.id,
                                 human_size(l.bytes), users);
        continue;
      }
      for (const auto& m : l.mismatches)
        std::cout << fmt::format(
            "layer {}: DAMAGED at offset {}: data hashes to {:016x}, its checksum is {:016x} "
            "(affects {})\n",
            l.layer.id, m.offset, m.got, m.want, users);
      for (const auto& e : l.errors)
        std::cout << fmt::format("layer {}: cannot verify: {} (affects {})\n", l.layer.id, e,
                                 users);
    }
    std::cout << fmt::format("scrubbed {} layer{}: {} in {} checksum groups verified, {} damaged\n",
                             r.layers.size(), r.layers.size() == 1 ? "" : "s", human_size(r.bytes),
                             r.groups, damaged);
  }
  if (damaged == 0) return 0;
  if (!g.json) {
    std::cout.flush();
    std::cerr << fmt::format("layer: error: scrub found damage in {} layer{}\n", damaged,
                             damaged == 1 ? "" : "s");
  }
  return kExitUser;
}

int cmd_version(const Globals& g) {
  print_result(g, {{"version", LAYER_VERSION}, {"format", layer::kFormatVersion}},
               fmt::format("layer {} (pool format {})", LAYER_VERSION, layer::kFormatVersion));
  return 0;
}

// ---- parsing ----

int run(int argc, char** argv) {
  CLI::App app{"layer: layered copy-on-write disks served over NBD", "layer"};
  app.footer("--pool and --json may also follow the command. Reference: docs/cli.md");
  app.require_subcommand(1);
  // Subcommands created after this pass options they do not know (--pool, --json) up to here.
  app.fallthrough();
  Globals g;
  app.add_option("--pool", g.pool, "pool directory (default: $LAYER_POOL)")->type_name("POOL");
  app.add_flag("--json", g.json, "print JSON (errors too, on stderr)");

  InitArgs init;
  auto* init_cmd = app.add_subcommand("init", "create a pool");
  init_cmd->add_option("POOL", init.pool, "pool directory (or --pool)")->type_name("");
  init_cmd->add_option("--ssd", init.ssd, "fast tier directory (default POOL/tiers/ssd)")
      ->type_name("DIR");
  init_cmd->add_option("--hdd", init.hdd, "slow tier directory (default POOL/tiers/hdd)")
      ->type_name("DIR");

  auto* image_cmd = app.add_subcommand("image", "manage images");
  image_cmd->require_subcommand(1);
  ImportArgs import;
  auto* import_cmd = image_cmd->add_subcommand("import", "import a raw disk image");
  import_cmd->add_option("IMAGE", import.ref, "new image")->type_name("NAME:VER")->required();
  import_cmd->add_option("FILE", import.file, "raw image file")->type_name("")->required();
  import_cmd->add_option("--block-size", import.block_size, "block size, 4K to 1M (default 4K)")
      ->type_name("SIZE");
  import_cmd->add_option("--description", import.description, "free text")->type_name("TEXT");
  auto* image_ls_cmd = image_cmd->add_subcommand("ls", "list images");
  std::string history_ref;
  auto* image_history_cmd =
      image_cmd->add_subcommand("history", "an image version and the versions it descends from");
  image_history_cmd->add_option("IMAGE", history_ref, "image")->type_name("NAME:VER")->required();
  std::string image_rm_ref;
  ProfileArgs profile_args;
  auto* image_profile_cmd = image_cmd->add_subcommand(
      "profile", "what fresh clones of an image read first (its boot profile), or --clear it");
  image_profile_cmd->add_option("IMAGE", profile_args.image, "image, or every version of NAME")
      ->type_name("NAME[:VER]")
      ->required();
  image_profile_cmd->add_flag("--clear", profile_args.clear, "delete the profile");
  image_profile_cmd->add_flag("--ranges", profile_args.ranges, "list every range");
  auto* image_rm_cmd = image_cmd->add_subcommand("rm", "remove an unused image");
  image_rm_cmd->add_option("IMAGE", image_rm_ref, "image")->type_name("NAME:VER")->required();

  CloneArgs clone;
  auto* clone_cmd = app.add_subcommand("clone", "create a container on an image or a snapshot");
  clone_cmd->add_option("IMAGE", clone.image, "image, or a container's snapshot")
      ->type_name("NAME:VER|CONTAINER@SNAP")
      ->required();
  clone_cmd->add_option("CONTAINER", clone.name, "new container name")->type_name("")->required();
  clone_cmd->add_option("--size", clone.size, "disk size (default and minimum: the image's)")
      ->type_name("SIZE");

  add_resource_options(clone_cmd, clone.resources, false);

  SetArgs set_args;
  auto* set_cmd = app.add_subcommand(
      "set", "change a container's resources (iops and bandwidth apply live to a served export)");
  set_cmd->add_option("CONTAINER", set_args.container, "container name")->type_name("")->required();
  add_resource_options(set_cmd, set_args.resources, true);

  auto* ls_cmd = app.add_subcommand("ls", "list containers");
  std::string container;
  auto* inspect_cmd = app.add_subcommand("inspect", "show one container");
  inspect_cmd->add_option("CONTAINER", container, "container name")->type_name("")->required();
  auto* rm_cmd = app.add_subcommand("rm", "remove a container");
  rm_cmd->add_option("CONTAINER", container, "container name")->type_name("")->required();

  SnapshotArgs snap;
  auto* snapshot_cmd = app.add_subcommand("snapshot", "take, list and remove snapshots");
  snapshot_cmd->require_subcommand(0, 1);
  snapshot_cmd->add_option("CONTAINER", snap.container, "container")->type_name("");
  snapshot_cmd->add_option("NAME", snap.name, "new snapshot name")->type_name("");
  auto* snap_create_cmd = snapshot_cmd->add_subcommand("create", "take a snapshot");
  snap_create_cmd->add_option("CONTAINER", snap.container, "container")->type_name("")->required();
  snap_create_cmd->add_option("NAME", snap.name, "new snapshot name")->type_name("")->required();
  auto* snap_ls_cmd = snapshot_cmd->add_subcommand("ls", "show a container's snapshot tree");
  snap_ls_cmd->add_option("CONTAINER", snap.container, "container")->type_name("")->required();
  auto* snap_rm_cmd = snapshot_cmd->add_subcommand("rm", "remove a snapshot");
  snap_rm_cmd->add_option("CONTAINER", snap.container, "container")->type_name("")->required();
  snap_rm_cmd->add_option("NAME", snap.name, "snapshot")->type_name("")->required();

  RollbackArgs rollback;
  auto* rollback_cmd = app.add_subcommand("rollback", "make a container's content a snapshot's");
  rollback_cmd->add_option("CONTAINER", rollback.container, "container")->type_name("")->required();
  rollback_cmd->add_option("SNAPSHOT", rollback.snapshot, "snapshot")->type_name("")->required();
  rollback_cmd
      ->add_option("--keep-as", rollback.keep_as, "save the current state as snapshot NAME first")
      ->type_name("NAME");
  rollback_cmd->add_flag("--force", rollback.force, "roll back a container a server is serving");

  CommitArgs commit;
  auto* commit_cmd =
      app.add_subcommand("commit", "publish a container's state as an image version");
  commit_cmd->add_option("CONTAINER", commit.container, "container")->type_name("")->required();
  commit_cmd->add_option("IMAGE", commit.image, "new image")->type_name("NAME:VER")->required();
  commit_cmd->add_option("--description", commit.description, "free text")->type_name("TEXT");

  std::string diff_a, diff_b;
  auto* diff_cmd = app.add_subcommand("diff", "byte ranges that differ between two points");
  diff_cmd->add_option("A", diff_a, "container or container@snapshot")->type_name("")->required();
  diff_cmd->add_option("B", diff_b, "container or container@snapshot")->type_name("")->required();

  bool gc_no_hash = false;
  auto* gc_cmd = app.add_subcommand(
      "gc", "merge hidden layers, remove unreferenced files, checksum frozen layers");
  gc_cmd->add_flag("--no-hash", gc_no_hash,
                   "do not checksum the frozen layers that no server reads");

  std::string flatten_name;
  auto* flatten_cmd =
      app.add_subcommand("flatten", "copy what a container reads into one layer of its own");
  flatten_cmd->add_option("CONTAINER", flatten_name, "container")->type_name("")->required();

  ServeArgs serve;
  auto* serve_cmd = app.add_subcommand("serve", "run nbdkit with the layer plugin (foreground)");
  auto* socket_opt =
      serve_cmd->add_option("--socket", serve.socket, "unix socket (default POOL/run/nbd.sock)")
          ->type_name("PATH");
  auto* port_opt = serve_cmd->add_option("--port", serve.port, "TCP port")
                       ->type_name("N")
                       ->check(CLI::Range(1, 65535));
  socket_opt->excludes(port_opt);
  serve_cmd->add_option("--listen", serve.listen, "TCP address (default 127.0.0.1)")
      ->type_name("ADDR")
      ->needs(port_opt);
  serve_cmd
      ->add_option("--threads", serve.threads, "nbdkit worker threads per connection (default 8)")
      ->type_name("N")
      ->check(CLI::Range(1u, 1024u));
  serve_cmd
      ->add_option("--default", serve.default_name, "container served as the empty export name")
      ->type_name("NAME");
  serve_cmd
      ->add_option("--tier-interval", serve.tier_interval,
                   "run the tiering policy every DURATION (e.g. 1m; default: never)")
      ->type_name("DURATION");
  serve_cmd->add_option("--tls-psk", serve.tls_psk, "require TLS with the pre-shared keys in FILE")
      ->type_name("FILE");
  serve_cmd
      ->add_option("--tls-certificates", serve.tls_certificates,
                   "require TLS with the x509 certificates in DIR")
      ->type_name("DIR");
  serve_cmd
      ->add_option("--max-connections", serve.max_connections,
                   "connections the server accepts at once (default 1024; 0: no limit)")
      ->type_name("N");
  serve_cmd
      ->add_option("--max-connections-per-peer", serve.max_per_peer,
                   "connections one peer (uid, or TCP address) may hold (default: "
                   "--max-connections on a unix socket, 256 over TCP; 0: no limit)")
      ->type_name("N");
  serve_cmd->add_flag("--tls-verify-peer", serve.tls_verify_peer,
                      "with --tls-certificates: clients need certificates the CA signed");

  AccessArgs access_args;
  auto* access_cmd =
      app.add_subcommand("access", "show or change who may open a container (the server checks)");
  access_cmd->add_option("CONTAINER", access_args.container, "container")
      ->type_name("")
      ->required();
  access_cmd
      ->add_option("--allow", access_args.allow,
                   "allow uid:N, gid:N, user:NAME, group:NAME or addr:CIDR (repeatable)")
      ->type_name("SUBJECT");
  access_cmd->add_flag("--read-only", access_args.read_only, "the --allow rules grant read only");
  access_cmd->add_option("--deny", access_args.deny, "refuse SUBJECT (repeatable)")
      ->type_name("SUBJECT");
  access_cmd->add_option("--remove", access_args.remove, "remove SUBJECT's rule (repeatable)")
      ->type_name("SUBJECT");
  access_cmd->add_flag("--clear", access_args.clear, "remove every rule first");

  StatsArgs stats_args;
  auto* stats_cmd = app.add_subcommand(
      "stats",
      "a container's I/O history per minute or hour, or every container's as Prometheus text");
  stats_cmd->add_option("CONTAINER", stats_args.container, "the container")->type_name("");
  stats_cmd
      ->add_option("--since", stats_args.since,
                   "from DURATION ago (e.g. 1h; default) or a unix time")
      ->type_name("WHEN");
  stats_cmd->add_option("--per", stats_args.per, "one row per minute (default) or hour")
      ->type_name("minute|hour");
  stats_cmd->add_flag("--prometheus", stats_args.prometheus,
                      "every container's current minute in the Prometheus text format");

  PredictArgs predict_args;
  auto* predict_cmd = app.add_subcommand(
      "predict", "a container's expected iops and bandwidth per hour, from its I/O history");
  predict_cmd->add_option("CONTAINER", predict_args.container, "the container")
      ->type_name("")
      ->required();
  predict_cmd->add_option("--hours", predict_args.hours, "how many hours (default 24, at most 336)")
      ->type_name("N");

  AuditArgs audit_args;
  auto* audit_cmd =
      app.add_subcommand("audit", "the access audit trail: opens, refusals and closes of exports");
  audit_cmd->add_option("CONTAINER", audit_args.container, "only this container's")->type_name("");
  audit_cmd->add_option("--since", audit_args.since, "from DURATION ago (e.g. 1h) or a unix time")
      ->type_name("WHEN");
  audit_cmd->add_option("--limit", audit_args.limit, "only the last N events")->type_name("N");

  PoolSetArgs pool_set;
  auto* pool_cmd = app.add_subcommand("pool", "show or change pool-wide settings");
  pool_cmd->require_subcommand(1);
  auto* pool_show_cmd = pool_cmd->add_subcommand("show", "show the pool's settings");
  auto* pool_set_cmd = pool_cmd->add_subcommand("set", "change the pool's settings");
  pool_set_cmd
      ->add_option("--access", pool_set.access,
                   "open: containers without rules open to any client of the unix socket; "
                   "rules: only by rule")
      ->type_name("open|rules");
  add_capacity_options(pool_set_cmd, pool_set);
  auto* pool_status_cmd = pool_cmd->add_subcommand(
      "status", "capacity, reserved, used now and lent iops/bandwidth, per container");

  auto* tier_cmd = app.add_subcommand("tier", "move layers between the ssd and hdd tiers");
  tier_cmd->require_subcommand(1);
  TierMoveArgs tier_move;
  auto* tier_move_cmd =
      tier_cmd->add_subcommand("move", "move a layer, a container's layers or an image's layers");
  tier_move_cmd->add_option("TARGET", tier_move.target, "LAYER id, CONTAINER or NAME:VER")
      ->type_name("")
      ->required();
  tier_move_cmd->add_option("TIER", tier_move.tier, "ssd or hdd")->type_name("")->required();
  tier_move_cmd
      ->add_option("--rate", tier_move.rate,
                   "copy at most SIZE per second (default: as fast as it can)")
      ->type_name("SIZE");
  auto* tier_status_cmd =
      tier_cmd->add_subcommand("status", "each layer's tier, heat, users and the policy's verdict");
  TierPolicyArgs tier_policy;
  auto* tier_policy_cmd =
      tier_cmd->add_subcommand("policy", "show or change the pool's tiering policy");
  tier_policy_cmd
      ->add_option("--cold-after", tier_policy.cold_after,
                   "demote after this long without access (e.g. 10m)")
      ->type_name("DURATION");
  tier_policy_cmd
      ->add_option("--cold-rate", tier_policy.cold_rate,
                   "... and at or below this many read+write ops/s")
      ->type_name("OPS");
  tier_policy_cmd
      ->add_option("--hot-rate", tier_policy.hot_rate,
                   "promote at or above this many ops/s (above --cold-rate)")
      ->type_name("OPS");
  tier_policy_cmd
      ->add_option("--half-life", tier_policy.half_life, "half-life of the heat rates (e.g. 5m)")
      ->type_name("DURATION");
  tier_policy_cmd
      ->add_option("--ssd-high-water", tier_policy.high_water,
                   "demote the coldest while ssd holds more (SIZE, N% of its filesystem, none)")
      ->type_name("SIZE|N%");
  tier_policy_cmd
      ->add_option("--move-rate", tier_policy.move_rate,
                   "the policy's moves copy at most SIZE per second (none: unlimited; default 64M)")
      ->type_name("SIZE|none");
  tier_policy_cmd
      ->add_option("--prewarm", tier_policy.prewarm,
                   "promote layers whose users' forecast is hot within DURATION (e.g. 30m; off)")
      ->type_name("DURATION|off");
  TierRunArgs tier_run;
  auto* tier_run_cmd = tier_cmd->add_subcommand("run", "one pass of the policy: move what it says");
  tier_run_cmd->add_flag("--dry-run", tier_run.dry_run, "only say what would move");
  tier_run_cmd
      ->add_option(
          "--rate", tier_run.rate,
          "copy at most SIZE per second (default: the policy's move rate; none: unlimited)")
      ->type_name("SIZE|none");

  FsckArgs fsck;
  auto* fsck_cmd = app.add_subcommand("fsck", "check the index against the layer files");
  fsck_cmd->add_flag("--full", fsck.full, "also verify every checksum");
  fsck_cmd->add_flag("--repair", fsck.repair, "roll back interrupted imports, remove orphan files");

  auto* index_cmd = app.add_subcommand("index", "copies of the pool's index: take, list, restore");
  index_cmd->require_subcommand(1);
  auto* index_backup_cmd = index_cmd->add_subcommand("backup", "take a compact copy of the index");
  auto* index_ls_cmd = index_cmd->add_subcommand("ls", "list the copies, newest first");
  std::string restore_name;
  auto* index_restore_cmd = index_cmd->add_subcommand(
      "restore", "replace the index with a copy (no server may have the pool open)");
  index_restore_cmd->add_option("COPY", restore_name, "a copy's name (default: the newest)")
      ->type_name("");

  ScrubArgs scrub;
  auto* scrub_cmd = app.add_subcommand(
      "scrub", "read frozen layers back and verify them against their checksums");
  scrub_cmd
      ->add_option("TARGET", scrub.targets, "LAYER id, CONTAINER[@SNAP] or NAME:VER (default: all)")
      ->type_name("");
  scrub_cmd->add_option("--rate", scrub.rate, "read at most SIZE per second")->type_name("SIZE");

  ApplyArgs apply_args;
  auto* apply_cmd = app.add_subcommand(
      "apply", "make the pool match a spec of images and containers (docs/apply.md)");
  apply_cmd->add_option("SPEC", apply_args.spec, "spec file (JSON; - reads stdin)")
      ->type_name("")
      ->required();
  apply_cmd->add_flag("--dry-run", apply_args.dry_run, "print the plan, change nothing");
  apply_cmd->add_flag("--prune", apply_args.prune,
                      "also remove this spec's containers it no longer names");

  auto* version_cmd = app.add_subcommand("version", "print the version");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    // CLI11 reports "bogus" as a missing subcommand; name the word the user typed instead.
    CLI::App* level = *image_cmd ? image_cmd : *index_cmd ? index_cmd : &app;
    if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr &&
        level->get_subcommands().empty()) {
      const auto extra = app.remaining(true);  // extras fall through to the root
      const std::string prefix = level == &app ? "" : level == image_cmd ? "image " : "index ";
      if (extra.empty()) fail(EINVAL, fmt::format("no command given (see layer {}--help)", prefix));
      fail(EINVAL, fmt::format("unknown command \"{}{}\" (see layer {}--help)", prefix,
                               extra.front(), prefix));
    }
    fail(EINVAL, e.what());
  }
  refuse_empty_values(app);

  if (*init_cmd) return cmd_init(g, init);
  if (*import_cmd) return cmd_image_import(g, import);
  if (*image_ls_cmd) return cmd_image_ls(g);
  if (*image_rm_cmd) return cmd_image_rm(g, image_rm_ref);
  if (*image_history_cmd) return cmd_image_history(g, history_ref);
  if (*image_profile_cmd) return take(run_image_profile(resolve_pool(g), g.json, profile_args));
  if (*clone_cmd) return cmd_clone(g, clone);
  if (*snap_create_cmd) return cmd_snapshot(g, snap);
  if (*snap_ls_cmd) return cmd_snapshot_ls(g, snap.container);
  if (*snap_rm_cmd) return cmd_snapshot_rm(g, snap);
  if (*snapshot_cmd) {
    if (snap.container.empty() || snap.name.empty())
      fail(EINVAL, "usage: layer snapshot CONTAINER NAME (or snapshot ls|rm ...)");
    return cmd_snapshot(g, snap);
  }
  if (*rollback_cmd) return cmd_rollback(g, rollback);
  if (*commit_cmd) return cmd_commit(g, commit);
  if (*diff_cmd) return cmd_diff(g, diff_a, diff_b);
  if (*gc_cmd) return cmd_gc(g, !gc_no_hash);
  if (*flatten_cmd) return cmd_flatten(g, flatten_name);
  if (*ls_cmd) return cmd_ls(g);
  if (*inspect_cmd) return cmd_inspect(g, container);
  if (*rm_cmd) return cmd_rm(g, container);
  if (*serve_cmd) return cmd_serve(g, serve);
  if (*access_cmd) return cmd_access(g, access_args);
  if (*set_cmd) return cmd_set(g, set_args);
  if (*audit_cmd) return cmd_audit(g, audit_args);
  if (*stats_cmd)
    return take(run_stats(resolve_pool(g), g.json, stats_args, parse_since(stats_args.since),
                          layer::now_unix()));
  if (*predict_cmd)
    return take(run_predict(resolve_pool(g), g.json, predict_args, layer::now_unix()));
  if (*pool_show_cmd) return take(run_pool_settings(resolve_pool(g), g.json, {}));
  if (*pool_set_cmd) {
    if (!pool_set.any()) fail(EINVAL, "nothing to change: give --access or a capacity");
    return take(run_pool_settings(resolve_pool(g), g.json, pool_set));
  }
  if (*pool_status_cmd) return take(run_pool_status(resolve_pool(g), g.json));
  if (*tier_move_cmd) return cmd_tier_move(g, tier_move);
  if (*tier_status_cmd) return cmd_tier_status(g);
  if (*tier_policy_cmd) return cmd_tier_policy(g, tier_policy);
  if (*tier_run_cmd) return cmd_tier_run(g, tier_run);
  if (*fsck_cmd) return cmd_fsck(g, fsck);
  if (*scrub_cmd) return cmd_scrub(g, scrub);
  if (*index_backup_cmd) return cmd_index_backup(g);
  if (*index_ls_cmd) return cmd_index_ls(g);
  if (*index_restore_cmd) return cmd_index_restore(g, restore_name);
  if (*apply_cmd) return take(run_apply(resolve_pool(g), g.json, apply_args));
  if (*version_cmd) return cmd_version(g);
  fail(EINVAL, "no command given");
}

// Errors before or during parsing cannot rely on the parsed flag.
bool wants_json(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg == "--json" || arg == "--json=true" || arg == "--json=1") return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool json_errors = wants_json(argc, argv);
  // While this process has one thread: index checks and copies fork their children from it,
  // never from a process whose committer thread may hold a lock (isolate.h). Without it they
  // fork from here, as before.
  (void)layer::start_fork_server();
  try {
    int code = run(argc, argv);
    std::cout.flush();
    if (!std::cout)
      return report_error(Error{EIO, "writing output failed"}, kExitInternal, json_errors);
    return code;
  } catch (const CliError& e) {
    std::cout.flush();
    return report_error(e.error, exit_code_for(e.error.code), json_errors);
  } catch (const std::bad_alloc&) {
    return report_error(Error{ENOMEM, "out of memory"}, kExitInternal, json_errors);
  } catch (const std::exception& e) {
    return report_error(Error{EIO, fmt::format("internal error: {}", e.what())}, kExitInternal,
                        json_errors);
  } catch (...) {
    return report_error(Error{EIO, "internal error: unknown exception"}, kExitInternal,
                        json_errors);
  }
}
