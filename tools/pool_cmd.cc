// pool_cmd.cc — `layer pool show|set|status` (pool_cmd.h; docs/cli.md "layer pool").
#include "pool_cmd.h"

#include <dirent.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <type_traits>
#include <vector>

#include "access.h"
#include "capacity.h"
#include "control.h"
#include "layers.h"
#include "names.h"
#include "output.h"
#include "pool.h"
#include "qos.h"

namespace layer_cli {
namespace {

using layer::make_error;
using layer::Result;

// A capacity as JSON: null when unset (0).
json cap_json(uint64_t v) { return v == 0 ? json(nullptr) : json(v); }

json capacity_json(const layer::PoolCapacity& c) {
  return {{"iops", cap_json(c.iops)},
          {"bandwidth", cap_json(c.bandwidth)},
          {"ssd_bytes", cap_json(c.ssd_bytes)},
          {"overcommit", static_cast<double>(c.overcommit_milli) / 1000}};
}

std::string rate_text(uint64_t bytes_per_sec) { return human_size(bytes_per_sec) + "/s"; }

std::string capacity_text(const layer::PoolCapacity& c) {
  return fmt::format(
      "iops {}, bandwidth {}, ssd-bytes {}, overcommit {}",
      c.iops == 0 ? "-" : std::to_string(c.iops), c.bandwidth == 0 ? "-" : rate_text(c.bandwidth),
      c.ssd_bytes == 0 ? "-" : human_size(c.ssd_bytes), layer::format_cpu(c.overcommit_milli));
}

// The pids of the servers whose control sockets are in `run_dir` (srv-PID.sock).
std::vector<pid_t> server_pids(const std::string& run_dir) {
  std::vector<pid_t> pids;
  DIR* dir = ::opendir(run_dir.c_str());
  if (dir == nullptr) return pids;
  while (const dirent* e = ::readdir(dir)) {
    const std::string name = e->d_name;
    if (name.size() <= 9 || name.rfind("srv-", 0) != 0 || !name.ends_with(".sock")) continue;
    const std::string digits = name.substr(4, name.size() - 9);
    if (digits.find_first_not_of("0123456789") != std::string::npos) continue;
    pids.push_back(static_cast<pid_t>(std::stol(digits)));
  }
  ::closedir(dir);
  std::sort(pids.begin(), pids.end());
  return pids;
}

struct Dim {
  double used = 0;
  uint64_t borrowed = 0, lent = 0;
};
struct Live {
  Dim iops, bandwidth;
  bool measured = true;  // false: a container without limits, whose requests are not counted
};

}  // namespace

void add_capacity_options(CLI::App* cmd, PoolSetArgs& a) {
  cmd->add_option("--iops", a.iops, "requests per second the pool's storage gives (none: clear)")
      ->type_name("N");
  cmd->add_option("--bandwidth", a.bandwidth,
                  "bytes per second read and written it gives (e.g. 400M; none: clear)")
      ->type_name("RATE");
  cmd->add_option("--ssd-bytes", a.ssd_bytes, "bytes of the ssd tier to reserve (none: clear)")
      ->type_name("SIZE");
  cmd->add_option("--overcommit", a.overcommit,
                  "admit reservations up to capacity times this ratio (default 1)")
      ->type_name("RATIO");
}

Result<int> run_pool_settings(const std::string& pool_root, bool as_json, const PoolSetArgs& args) {
  const bool change = args.any();
  layer::CapacityChange c;
  auto count = [](const char* option, const std::string& text, auto parser) -> Result<uint64_t> {
    auto v = parser(text);
    if (!v) return make_error(EINVAL, "{} {}: {}", option, text, v.error().message);
    return *v;
  };
  auto size = [](std::string_view text) -> Result<uint64_t> {
    if (text == "none") return uint64_t{0};
    return layer::parse_size(text);
  };
  if (args.iops) {
    LAYER_ASSIGN(c.iops, count("--iops", *args.iops, layer::parse_count));
  }
  if (args.bandwidth) {
    LAYER_ASSIGN(c.bandwidth, count("--bandwidth", *args.bandwidth, size));
  }
  if (args.ssd_bytes) {
    LAYER_ASSIGN(c.ssd_bytes, count("--ssd-bytes", *args.ssd_bytes, size));
  }
  if (args.overcommit) {
    LAYER_ASSIGN(c.overcommit_milli,
                 count("--overcommit", *args.overcommit, layer::parse_overcommit));
  }
  std::optional<layer::AccessPolicy> access;
  if (!args.access.empty()) {
    LAYER_ASSIGN(access, layer::parse_access_policy(args.access));
  }
  if (args.access.empty() && c.empty() && change)
    return make_error(EINVAL, "nothing to change: give --access or a capacity");
  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = !change}));
  if (!c.empty()) LAYER_TRY(layer::change_capacity(*pool, c, layer::now_unix_ms()));
  if (access) LAYER_TRY(layer::save_access_policy(*pool, *access));
  LAYER_ASSIGN(const auto policy, layer::load_access_policy(*pool));
  LAYER_ASSIGN(const auto cap, layer::load_capacity(*pool));
  const json j{{"ok", true},
               {"changed", change},
               {"access", std::string(layer::to_string(policy))},
               {"capacity", capacity_json(cap)}};
  if (as_json) {
    std::cout << j.dump() << '\n';
  } else {
    std::cout << "access: " << layer::to_string(policy) << '\n'
              << "capacity: " << capacity_text(cap) << '\n';
  }
  return 0;
}

Result<int> run_pool_status(const std::string& pool_root, bool as_json) {
  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = true}));
  const uint64_t now_ms = layer::now_unix_ms();
  struct Row {
    std::string name;
    uint8_t priority = layer::Resources::kDefaultPriority;
    layer::Reservation reserved;
    std::optional<Live> live;
  };
  std::vector<Row> rows;
  layer::PoolCapacity cap;
  layer::Reservation total;
  {
    LAYER_ASSIGN(auto txn, pool->index().begin_read());
    LAYER_ASSIGN(cap, layer::load_capacity(txn));
    LAYER_TRY(txn.scan(layer::Db::kContainers, "",
                       [&](std::string_view key, std::string_view value) -> Result<bool> {
                         LAYER_ASSIGN(auto rec, layer::decode_container(value, key));
                         LAYER_ASSIGN(auto delta, layer::get_layer(txn, rec.delta_layer));
                         Row row{
                             rec.name, rec.resources.priority,
                             layer::reservation_of(rec, delta.tier == layer::Tier::kSsd, now_ms),
                             std::nullopt};
                         total.iops += row.reserved.iops;
                         total.bandwidth += row.reserved.bandwidth;
                         total.ssd_bytes += row.reserved.ssd_bytes;
                         total.unlimited_iops += row.reserved.unlimited_iops;
                         total.unlimited_bandwidth += row.reserved.unlimited_bandwidth;
                         rows.push_back(std::move(row));
                         return true;
                       }));
  }
  // What the running servers measured in their last lending round.
  std::vector<pid_t> servers;
  std::map<std::string, Live> live;
  for (const pid_t pid : server_pids(pool->paths().run_dir)) {
    auto reply = layer::control_request(layer::control_socket_path(pool->paths().run_dir, pid),
                                        {{"op", "lending"}}, std::chrono::seconds(5));
    if (!reply || !layer::control_status(*reply).ok()) continue;  // gone, or an older server
    servers.push_back(pid);
    for (const auto& c : (*reply)["containers"]) {
      Live& l = live[c["container"].get<std::string>()];
      for (auto [dim, key] : {std::pair{&Live::iops, "iops"}, {&Live::bandwidth, "bandwidth"}}) {
        const auto& d = c[key];
        if (d["used"].is_null()) {
          l.measured = false;
        } else {
          (l.*dim).used += d["used"].get<double>();
        }
        (l.*dim).borrowed += d["borrowed"].get<uint64_t>();
      }
    }
  }
  const bool known = !servers.empty();
  Live sum;
  for (auto& row : rows) {
    if (!known) continue;
    auto it = live.find(row.name);
    row.live = it == live.end() ? Live{} : it->second;  // a container not served: idle
    for (auto [dim, _] : {std::pair{&Live::iops, 0}, {&Live::bandwidth, 0}}) {
      if (row.live->measured) (sum.*dim).used += ((*row.live).*dim).used;
      (sum.*dim).borrowed += ((*row.live).*dim).borrowed;
    }
  }
  // Who lent it: a server knows only the containers it has opened, so the loans are attributed
  // here, over every container, as plan_loans does (qos.h): to the idle owners in proportion to
  // the part of their reservation they do not use (a container no server opened: all of it).
  if (known) {
    for (auto [dim, reserved] : {std::pair{&Live::iops, &layer::Reservation::iops},
                                 {&Live::bandwidth, &layer::Reservation::bandwidth}}) {
      std::vector<double> spare(rows.size(), 0);
      double lendable = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        const double r = static_cast<double>(rows[i].reserved.*reserved);
        const Dim& d = (*rows[i].live).*dim;
        if (r == 0 || d.borrowed != 0 || d.used >= 0.9 * r) continue;  // unlimited or busy
        spare[i] = r - std::min(r, 2 * d.used);
        lendable += spare[i];
      }
      const double from_owners = std::min(static_cast<double>((sum.*dim).borrowed), lendable);
      for (size_t i = 0; i < rows.size(); ++i) {
        if (spare[i] == 0) continue;
        ((*rows[i].live).*dim).lent = static_cast<uint64_t>(from_owners * spare[i] / lendable);
        (sum.*dim).lent += ((*rows[i].live).*dim).lent;
      }
    }
  }
  auto live_json = [&](const std::optional<Live>& l, auto field) -> json {
    if (!l) return nullptr;
    if (!l->measured && std::is_same_v<decltype(field(l->iops)), double>) return nullptr;
    return {{"iops", field(l->iops)}, {"bandwidth", field(l->bandwidth)}};
  };
  const auto used = [](const Dim& d) { return d.used; };
  const auto borrowed = [](const Dim& d) { return d.borrowed; };
  const auto lent = [](const Dim& d) { return d.lent; };
  const std::optional<Live> sum_opt = known ? std::optional<Live>(sum) : std::nullopt;
  if (as_json) {
    json containers = json::array();
    for (const auto& row : rows)
      containers.push_back({{"container", row.name},
                            {"priority", row.priority},
                            {"reserved",
                             {{"iops", cap_json(row.reserved.iops)},
                              {"bandwidth", cap_json(row.reserved.bandwidth)},
                              {"ssd_bytes", row.reserved.ssd_bytes}}},
                            {"used", live_json(row.live, used)},
                            {"borrowed", live_json(row.live, borrowed)},
                            {"lent", live_json(row.live, lent)}});
    const json j{{"capacity", capacity_json(cap)},
                 {"admit_up_to",
                  {{"iops", cap_json(cap.limit(cap.iops))},
                   {"bandwidth", cap_json(cap.limit(cap.bandwidth))},
                   {"ssd_bytes", cap_json(cap.limit(cap.ssd_bytes))}}},
                 {"reserved",
                  {{"iops", total.iops},
                   {"bandwidth", total.bandwidth},
                   {"ssd_bytes", total.ssd_bytes},
                   {"unlimited_iops", total.unlimited_iops},
                   {"unlimited_bandwidth", total.unlimited_bandwidth}}},
                 {"servers", servers},
                 {"used", live_json(sum_opt, used)},
                 {"lent", live_json(sum_opt, borrowed)},
                 {"containers", containers}};
    std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    return 0;
  }
  std::cout << "capacity: " << capacity_text(cap) << '\n'
            << fmt::format("reserved: iops {}{}, bandwidth {}{}, ssd-bytes {}\n", total.iops,
                           total.unlimited_iops
                               ? fmt::format(" (+{} unlimited)", total.unlimited_iops)
                               : "",
                           rate_text(total.bandwidth),
                           total.unlimited_bandwidth
                               ? fmt::format(" (+{} unlimited)", total.unlimited_bandwidth)
                               : "",
                           human_size(total.ssd_bytes));
  if (!known) {
    std::cout << "used now: unknown (no server of this pool is running)\n"
              << "lent: unknown\n";
  } else {
    std::cout << fmt::format("used now: iops {:.0f}, bandwidth {} (servers: {})\n", sum.iops.used,
                             rate_text(static_cast<uint64_t>(sum.bandwidth.used)),
                             fmt::join(servers, ", "))
              << fmt::format("lent: iops {}, bandwidth {}\n", sum.iops.borrowed,
                             rate_text(sum.bandwidth.borrowed));
  }
  std::vector<std::vector<std::string>> table = {{"CONTAINER", "PRIO", "IOPS", "USED", "BORROWED",
                                                  "LENT", "BANDWIDTH", "USED", "BORROWED", "LENT",
                                                  "SSD"}};
  auto opt = [](uint64_t v, bool bytes) {
    return v == 0 ? std::string("-") : bytes ? rate_text(v) : std::to_string(v);
  };
  for (const auto& row : rows) {
    auto f = [&](auto get) { return row.live ? get(*row.live) : std::string("?"); };
    auto u = [&](auto get) {
      return row.live && row.live->measured ? get(*row.live) : std::string("?");
    };
    table.push_back({row.name, std::to_string(row.priority), opt(row.reserved.iops, false),
                     u([](const Live& l) { return fmt::format("{:.0f}", l.iops.used); }),
                     f([](const Live& l) { return std::to_string(l.iops.borrowed); }),
                     f([](const Live& l) { return std::to_string(l.iops.lent); }),
                     opt(row.reserved.bandwidth, true), u([](const Live& l) {
                       return rate_text(static_cast<uint64_t>(l.bandwidth.used));
                     }),
                     f([](const Live& l) { return rate_text(l.bandwidth.borrowed); }),
                     f([](const Live& l) { return rate_text(l.bandwidth.lent); }),
                     row.reserved.ssd_bytes == 0 ? "-" : human_size(row.reserved.ssd_bytes)});
  }
  print_table(table);
  return 0;
}

}  // namespace layer_cli
