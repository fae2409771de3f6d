// tier.cc — the tiering policy: its record, the planner, status and one pass.
#include "tier.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <thread>

#include "control.h"
#include "forecast.h"
#include "hasher.h"
#include "heat.h"
#include "layers.h"
#include "locks.h"
#include "mover.h"
#include "pool.h"

namespace layer {
namespace {

constexpr std::string_view kMetaTierPolicy = "tier.policy";

std::string rate_text(double ops) { return fmt::format("{:.3g} ops/s", ops); }

TierMoveReport report_of(const MoveResult& r) {
  TierMoveReport out;
  out.layer = r.layer;
  out.from = r.from;
  out.to = r.to;
  out.moved = r.moved;
  out.data_bytes = r.data_bytes;
  return out;
}

}  // namespace

TierMoveReport live_move_report(const MoveResult& r) {
  TierMoveReport out = report_of(r);
  out.pause_ms = r.pause_ms;
  out.start_pause_ms = r.start_pause_ms;
  out.catch_up_rounds = r.catch_up_rounds;
  out.caught_up_bytes = r.caught_up_bytes;
  return out;
}

namespace {

// A server's reply to {"op":"move"} read back into a report.
Result<TierMoveReport> report_of(const nlohmann::json& j, pid_t pid) {
  try {
    TierMoveReport r;
    r.layer = j.at("layer").get<LayerId>();
    LAYER_ASSIGN(r.from, parse_tier(j.at("from").get<std::string>()));
    LAYER_ASSIGN(r.to, parse_tier(j.at("to").get<std::string>()));
    r.moved = j.at("moved").get<bool>();
    r.data_bytes = j.value("data_bytes", uint64_t{0});
    if (j.contains("pause_ms")) {
      r.pause_ms = j.value("pause_ms", 0.0);
      r.start_pause_ms = j.value("start_pause_ms", 0.0);
      r.catch_up_rounds = j.value("catch_up_rounds", 0u);
      r.caught_up_bytes = j.value("caught_up_bytes", uint64_t{0});
    }
    r.by = fmt::format("server pid {}", pid);
    r.server = pid;
    return r;
  } catch (const nlohmann::json::exception& e) {
    return make_error(EIO, "the server of pid {} answered a move with {}: {}", pid, j.dump(),
                      e.what());
  }
}

Result<TierMoveReport> move_one(Pool& pool, LayerId id, Tier to, uint64_t rate,
                                const LocalServer* local);

}  // namespace

Result<TierPolicy> load_tier_policy(ReadTxn& txn) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaTierPolicy));
  if (!v) return TierPolicy{};
  return decode_tier_policy(*v);
}

Result<TierPolicy> load_tier_policy(Pool& pool) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  return load_tier_policy(txn);
}

Status validate_tier_policy(const TierPolicy& p) {
  if (!std::isfinite(p.cold_rate) || !std::isfinite(p.hot_rate) || p.cold_rate < 0)
    return make_error(EINVAL, "tier policy: rates must be finite and not negative");
  if (p.hot_rate <= p.cold_rate)
    return make_error(EINVAL,
                      "tier policy: the hot rate ({}) must be above the cold rate ({}), or "
                      "layers would move back and forth",
                      p.hot_rate, p.cold_rate);
  if (p.high_water == TierPolicy::HighWater::kPercent &&
      (p.high_water_value == 0 || p.high_water_value > 100))
    return make_error(EINVAL, "tier policy: a high-water mark of {}% is not 1 to 100%",
                      p.high_water_value);
  if (p.high_water == TierPolicy::HighWater::kBytes && p.high_water_value == 0)
    return make_error(EINVAL,
                      "tier policy: a high-water mark of 0 bytes would empty ssd; say "
                      "\"none\" for no mark");
  return {};
}

Status save_tier_policy(Pool& pool, const TierPolicy& p) {
  LAYER_TRY(validate_tier_policy(p));
  LAYER_TRY(pool.check_writable());
  return pool.committer().run(
      [&](WriteTxn& txn) -> Status { return txn.put(Db::kMeta, kMetaTierPolicy, encode(p)); });
}

Result<uint64_t> parse_duration(std::string_view text) {
  auto bad = [&] {
    return make_error(EINVAL, "\"{}\" is not a duration (e.g. 90s, 10m, 2h, 7d)", text);
  };
  if (text.empty()) return bad();
  uint64_t unit = 1;
  std::string_view digits = text;
  switch (text.back()) {
    case 's':
      unit = 1;
      break;
    case 'm':
      unit = 60;
      break;
    case 'h':
      unit = 3600;
      break;
    case 'd':
      unit = 86400;
      break;
    default:
      if (text.back() < '0' || text.back() > '9') return bad();
  }
  if (text.back() > '9') digits.remove_suffix(1);
  if (digits.empty() || digits.size() > 12 ||
      digits.find_first_not_of("0123456789") != std::string_view::npos)
    return bad();
  return std::stoull(std::string(digits)) * unit;
}

std::string format_duration(uint64_t s) {
  if (s != 0 && s % 86400 == 0) return fmt::format("{}d", s / 86400);
  if (s != 0 && s % 3600 == 0) return fmt::format("{}h", s / 3600);
  if (s != 0 && s % 60 == 0) return fmt::format("{}m", s / 60);
  return fmt::format("{}s", s);
}

Plan plan_moves(const TierPolicy& policy, const std::vector<PolicyLayer>& layers, uint64_t now,
                SsdSpace ssd) {
  Plan plan;
  plan.verdicts.resize(layers.size());
  // The heat that ranks layers: the higher of the measured and the predicted.
  auto rank = [&](size_t i) { return std::max(layers[i].heat, layers[i].predicted); };
  uint64_t used = ssd.used;
  std::vector<size_t> demotions, staying_on_ssd, promotions;
  for (size_t i = 0; i < layers.size(); ++i) {
    const PolicyLayer& l = layers[i];
    Verdict& v = plan.verdicts[i];
    v.id = l.id;
    v.from = l.tier;
    if (l.disk_bytes == 0) {
      v.reason = "no data on disk";
      continue;
    }
    const uint64_t idle = now > l.last_active ? now - l.last_active : 0;
    if (l.tier == Tier::kSsd) {
      if (idle < policy.cold_after_s) {
        v.reason = fmt::format("active {} ago (cold after {})", format_duration(idle),
                               format_duration(policy.cold_after_s));
        staying_on_ssd.push_back(i);
      } else if (l.heat > policy.cold_rate) {
        v.reason = fmt::format("heat {} above the cold rate {}", rate_text(l.heat),
                               rate_text(policy.cold_rate));
        staying_on_ssd.push_back(i);
      } else if (l.predicted >= policy.hot_rate) {
        v.reason = fmt::format("predicted hot within {}: {}", format_duration(policy.prewarm_s),
                               rate_text(l.predicted));
        staying_on_ssd.push_back(i);
      } else {
        v.to = Tier::kHdd;
        v.reason = fmt::format("cold: idle {}, heat {}", format_duration(idle), rate_text(l.heat));
        demotions.push_back(i);
        used -= std::min(used, l.disk_bytes);
      }
    } else if (l.heat >= policy.hot_rate || l.predicted >= policy.hot_rate) {
      promotions.push_back(i);
    } else {
      v.reason = fmt::format("heat {} below the hot rate {}", rate_text(l.heat),
                             rate_text(policy.hot_rate));
    }
  }
  // Over the high-water mark: the coldest first (lowest heat, then idle longest).
  if (ssd.limit != 0 && used > ssd.limit) {
    std::stable_sort(staying_on_ssd.begin(), staying_on_ssd.end(), [&](size_t a, size_t b) {
      if (rank(a) != rank(b)) return rank(a) < rank(b);
      return layers[a].last_active < layers[b].last_active;
    });
    for (size_t i : staying_on_ssd) {
      if (used <= ssd.limit) break;
      Verdict& v = plan.verdicts[i];
      v.to = Tier::kHdd;
      v.reason = fmt::format("ssd above its high-water mark ({} of {} bytes): coldest first", used,
                             ssd.limit);
      demotions.push_back(i);
      used -= std::min(used, layers[i].disk_bytes);
    }
  }
  // Hottest first, while they fit under the mark.
  std::stable_sort(promotions.begin(), promotions.end(),
                   [&](size_t a, size_t b) { return rank(a) > rank(b); });
  std::vector<size_t> promoted;
  for (size_t i : promotions) {
    Verdict& v = plan.verdicts[i];
    if (ssd.limit != 0 && used + layers[i].disk_bytes > ssd.limit) {
      v.reason = fmt::format("hot ({}), but ssd has no room for it under its high-water mark",
                             rate_text(rank(i)));
      continue;
    }
    v.to = Tier::kSsd;
    v.reason = layers[i].heat >= policy.hot_rate
                   ? fmt::format("hot: heat {}", rate_text(layers[i].heat))
                   : fmt::format("predicted hot within {}: {} (heat now {})",
                                 format_duration(policy.prewarm_s), rate_text(layers[i].predicted),
                                 rate_text(layers[i].heat));
    used += layers[i].disk_bytes;
    promoted.push_back(i);
  }
  plan.order = demotions;  // room first
  plan.order.insert(plan.order.end(), promoted.begin(), promoted.end());
  plan.space_after = SsdSpace{used, ssd.limit};
  return plan;
}

Result<TierStatus> tier_status(Pool& pool, uint64_t now) {
  TierStatus st;
  st.now = now;
  std::map<LayerId, LayerTierStatus> by_id;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(st.policy, load_tier_policy(txn));
    LAYER_TRY(
        txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto id = decode_key_u64(k);
          if (!id) return make_error(EIO, "layers: a key of {} bytes", k.size());
          LAYER_ASSIGN(by_id[*id].layer, decode_layer(v, *id));
          return true;
        }));
    LAYER_TRY(txn.scan(Db::kHeat, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
      auto id = decode_key_u64(k);
      if (!id) return make_error(EIO, "heat: a key of {} bytes", k.size());
      auto it = by_id.find(*id);
      if (it == by_id.end()) return true;  // fsck's business
      LAYER_ASSIGN(auto heat, decode_heat(v, *id));
      it->second.heat = decayed(heat, now, st.policy.half_life_s);
      return true;
    }));
    if (st.policy.prewarm_s > 0) {
      // Pre-promotion: each container's forecast counts for every layer of its chain.
      std::vector<ContainerRecord> containers;
      LAYER_TRY(txn.scan(Db::kContainers, "",
                         [&](std::string_view k, std::string_view v) -> Result<bool> {
                           LAYER_ASSIGN(auto c, decode_container(v, k));
                           containers.push_back(std::move(c));
                           return true;
                         }));
      for (const auto& c : containers) {
        LAYER_ASSIGN(const auto f, load_forecast(txn, c.id, now));
        const double predicted = predicted_iops(f, now, st.policy.prewarm_s);
        if (predicted <= 0) continue;
        LayerId id = c.delta_layer;
        for (size_t steps = 0; id != 0 && steps <= by_id.size(); ++steps) {
          auto it = by_id.find(id);
          if (it == by_id.end()) break;  // fsck's business
          it->second.predicted += predicted;
          id = it->second.layer.parent;
        }
      }
    }
    LAYER_ASSIGN(auto users, layer_users(txn));
    for (auto& [id, list] : users) {
      auto it = by_id.find(id);
      if (it != by_id.end()) it->second.users = std::move(list);
    }
  }
  uint64_t ssd_layer_bytes = 0;
  std::vector<PolicyLayer> input;
  for (auto& [id, l] : by_id) {
    LAYER_ASSIGN(auto allocated, pool.store(l.layer.tier).allocated(id));
    l.has_file = allocated.has_value();
    l.disk_bytes = allocated.value_or(0);
    if (l.layer.tier == Tier::kSsd) ssd_layer_bytes += l.disk_bytes;
    if (l.heat.rate_unix == 0) l.heat.rate_unix = now;
    PolicyLayer p;
    p.id = id;
    p.tier = l.layer.tier;
    p.disk_bytes = l.disk_bytes;
    p.heat = l.heat.read_rate + l.heat.write_rate;
    p.last_active = std::max({l.heat.last_access_unix, l.heat.moved_unix, l.layer.created_unix});
    p.predicted = l.predicted;
    input.push_back(p);
    st.layers.push_back(std::move(l));
  }
  switch (st.policy.high_water) {
    case TierPolicy::HighWater::kNone:
      st.ssd = {ssd_layer_bytes, 0};
      break;
    case TierPolicy::HighWater::kBytes:
      st.ssd = {ssd_layer_bytes, st.policy.high_water_value};
      break;
    case TierPolicy::HighWater::kPercent: {
      LAYER_ASSIGN(auto space, pool.store(Tier::kSsd).space());
      st.ssd = {space.used, space.total / 100 * st.policy.high_water_value};
      break;
    }
  }
  const Plan plan = plan_moves(st.policy, input, now, st.ssd);
  for (size_t i = 0; i < plan.verdicts.size(); ++i) st.layers[i].verdict = plan.verdicts[i];
  st.order = plan.order;
  st.ssd_after = plan.space_after;
  return st;
}

std::vector<pid_t> tell_servers_moved(Pool& pool, LayerId id, pid_t skip) {
  std::vector<pid_t> reloaded;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(pool.paths().run_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with("srv-") || !name.ends_with(".sock")) continue;
    const std::string digits = name.substr(4, name.size() - 9);
    if (digits.empty() || digits.size() > 9 ||
        digits.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const auto pid = static_cast<pid_t>(std::stol(digits));
    if (pid == skip) continue;
    auto reply = control_request(entry.path().string(), {{"op", "moved"}, {"layer", id}},
                                 std::chrono::seconds(10));
    // A stale socket, a server going away, or one that could not switch: it reads the same
    // content from the unlinked old file until its disks close.
    if (!reply.ok() || !control_status(*reply).ok()) continue;
    reloaded.push_back(pid);
  }
  return reloaded;
}

Result<TierMoveReport> move_layer_anywhere(Pool& pool, LayerId id, Tier to,
                                           uint64_t rate_bytes_per_sec, const LocalServer* local) {
  auto r = move_one(pool, id, to, rate_bytes_per_sec, local);
  // A move counts as an access (tier.h): best effort, a lost note only lets it move sooner.
  if (r && r->moved) (void)note_moved(pool, id, now_unix());
  return r;
}

namespace {

Result<TierMoveReport> move_one(Pool& pool, LayerId id, Tier to, uint64_t rate,
                                const LocalServer* local) {
  MoveOptions options;
  options.rate_bytes_per_sec = rate;
  LayerRecord layer;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto row, txn.get(Db::kLayers, key_u64(id)));
    if (!row) return make_error(ENOENT, "layer {} not found in pool {}", id, pool.paths().root);
    LAYER_ASSIGN(layer, decode_layer(*row, id));
  }
  if (layer.state != LayerState::kWritable) {
    LAYER_ASSIGN(auto r, move_layer(pool, id, to, options));
    TierMoveReport report = report_of(r);
    if (r.moved) {
      if (local && local->reload_moved) (void)local->reload_moved(id);  // else: the old file
      report.reloaded_by = tell_servers_moved(pool, id, local ? local->pid : 0);
    }
    return report;
  }
  if (local && local->move_delta)
    if (auto r = local->move_delta(id, to, rate)) return std::move(*r);
  // A delta: moved by its container's server when one serves it, here otherwise.
  for (int attempt = 0;; ++attempt) {
    LAYER_ASSIGN(auto c, find_container_of_delta(pool, id));
    if (!c) return make_error(EIO, "layer {}: writable, but no container's delta", id);
    LAYER_ASSIGN(const bool served, pool.locks().is_locked(LockKind::kContainer, c->id));
    if (!served) {
      auto r = move_layer(pool, id, to, options);
      if (r) return report_of(*r);
      // A server took the container meanwhile: ask it.
      if (r.error().code != EBUSY || attempt >= 3) return std::move(r).error();
      continue;
    }
    const pid_t pid = pool.serving_pid(c->id);
    if (pid == 0) {
      // A holder letting go, or another CLI command: try again shortly, then give up.
      if (attempt < 5) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20 << attempt));
        continue;
      }
      return make_error(EBUSY, "container \"{}\" is in use by another process", c->name);
    }
    auto reply = control_request(control_socket_path(pool.paths().run_dir, pid),
                                 {{"op", "move"},
                                  {"layer", id},
                                  {"tier", to_string(to)},
                                  {"container", c->name},
                                  {"rate", rate}},
                                 std::chrono::hours(24));
    if (!reply.ok()) {
      const int code = reply.error().code;
      if ((code == ENOENT || code == ECONNREFUSED) && attempt < 3) continue;  // it went away
      return std::move(reply).error();
    }
    LAYER_TRY(control_status(*reply));
    return report_of(*reply, pid);
  }
}

}  // namespace

Result<TierRunReport> run_tier_policy(Pool& pool, uint64_t now, bool dry_run,
                                      const LocalServer* local, std::optional<uint64_t> rate) {
  TierRunReport report;
  LAYER_ASSIGN(report.status, tier_status(pool, now));
  if (dry_run) return report;
  LAYER_TRY(pool.check_writable());
  for (size_t i : report.status.order) {
    const Verdict& v = report.status.layers[i].verdict;
    auto moved = move_layer_anywhere(pool, v.id, *v.to,
                                     rate.value_or(report.status.policy.move_rate), local);
    if (!moved) {
      (moved.error().code == EBUSY ? report.busy : report.failed)
          .push_back(fmt::format("layer {}: {}", v.id, moved.error().message));
      continue;
    }
    report.moved.push_back(*moved);
  }
  return report;
}

Result<std::unique_ptr<BackgroundTiering>> BackgroundTiering::start(Pool& pool, Options options) {
  std::unique_ptr<BackgroundTiering> t(new BackgroundTiering(pool, std::move(options)));
  try {
    t->thread_ = std::thread([raw = t.get()] { raw->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value(), "cannot start the tiering thread: {}", e.what());
  }
  return t;
}

BackgroundTiering::~BackgroundTiering() {
  stop_.request_stop();
  if (thread_.joinable()) thread_.join();
}

void BackgroundTiering::run() {
  auto log = [&](bool error, const std::string& line) {
    if (options_.log) options_.log(error, line);
  };
  if (auto s = lower_thread_priority(); !s.ok())
    log(true, fmt::format("tiering: runs at normal priority: {}", s.error().message));
  while (stop_.wait_until(std::chrono::steady_clock::now() + options_.interval)) {
    // The heat of the last seconds counts: write it first.
    if (auto s = persist_heat(pool_, now_unix()); !s.ok())
      log(true, fmt::format("tiering: heat not written: {}", s.error().message));
    auto r = run_tier_policy(pool_, now_unix(), false, &options_.local);
    if (!r) {
      log(true, fmt::format("tiering: pass failed: {}", r.error().message));
      continue;
    }
    for (const auto& m : r->moved)
      if (m.moved)
        log(false, fmt::format("tiering: moved layer {} from {} to {} ({} bytes of data)", m.layer,
                               to_string(m.from), to_string(m.to), m.data_bytes));
    for (const auto& b : r->busy) log(false, "tiering: skipped (busy) " + b);
    for (const auto& f : r->failed) log(true, "tiering: " + f);
  }
}

}  // namespace layer
