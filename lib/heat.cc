// heat.cc — heat counters, their persistence and the server's heat writer.
#include "heat.h"

#include <cmath>

#include "pool.h"
#include "tier.h"

namespace layer {
namespace {

// Layer id's heat row; an empty one when it has none.
Result<HeatRecord> heat_row(ReadTxn& txn, LayerId id) {
  LAYER_ASSIGN(auto v, txn.get(Db::kHeat, key_u64(id)));
  if (!v) return HeatRecord{};
  return decode_heat(*v, id);
}

}  // namespace

HeatCounts HeatCounter::drain() {
  HeatCounts c;
  c.read_ops = read_ops_.exchange(0, std::memory_order_relaxed);
  c.read_bytes = read_bytes_.exchange(0, std::memory_order_relaxed);
  c.write_ops = write_ops_.exchange(0, std::memory_order_relaxed);
  c.write_bytes = write_bytes_.exchange(0, std::memory_order_relaxed);
  return c;
}

void HeatCounter::give_back(const HeatCounts& c) {
  read_ops_.fetch_add(c.read_ops, std::memory_order_relaxed);
  read_bytes_.fetch_add(c.read_bytes, std::memory_order_relaxed);
  write_ops_.fetch_add(c.write_ops, std::memory_order_relaxed);
  write_bytes_.fetch_add(c.write_bytes, std::memory_order_relaxed);
}

std::shared_ptr<HeatCounter> HeatTable::counter(LayerId id) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& c = counters_[id];
  if (!c) c = std::make_shared<HeatCounter>();
  return c;
}

std::vector<std::pair<LayerId, HeatCounts>> HeatTable::drain() {
  std::vector<std::pair<LayerId, HeatCounts>> out;
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = counters_.begin(); it != counters_.end();) {
    const HeatCounts c = it->second->drain();
    if (!c.empty()) out.emplace_back(it->first, c);
    // No view holds it: nothing can add to it any more (counter() hands it out under mu_).
    if (it->second.use_count() == 1)
      it = counters_.erase(it);
    else
      ++it;
  }
  return out;
}

void HeatTable::give_back(const std::vector<std::pair<LayerId, HeatCounts>>& counts) {
  for (const auto& [id, c] : counts) counter(id)->give_back(c);
}

double decay(double rate, uint64_t since, uint64_t now, uint64_t half_life_s) {
  if (half_life_s == 0 || now <= since) return rate;
  return rate * std::exp2(-static_cast<double>(now - since) / static_cast<double>(half_life_s));
}

HeatRecord decayed(const HeatRecord& r, uint64_t now, uint64_t half_life_s) {
  HeatRecord out = r;
  out.read_rate = decay(r.read_rate, r.rate_unix, now, half_life_s);
  out.write_rate = decay(r.write_rate, r.rate_unix, now, half_life_s);
  out.read_bps = decay(r.read_bps, r.rate_unix, now, half_life_s);
  out.write_bps = decay(r.write_bps, r.rate_unix, now, half_life_s);
  out.rate_unix = std::max(now, r.rate_unix);
  return out;
}

void add_counts(HeatRecord& r, const HeatCounts& c, uint64_t now, uint64_t half_life_s) {
  r = decayed(r, now, half_life_s);
  // tau = half_life / ln 2: a steady rate converges to itself (heat.h). No half-life: the
  // counts of the last second.
  const double tau = half_life_s == 0 ? 1.0 : static_cast<double>(half_life_s) / std::log(2.0);
  r.read_rate += static_cast<double>(c.read_ops) / tau;
  r.write_rate += static_cast<double>(c.write_ops) / tau;
  r.read_bps += static_cast<double>(c.read_bytes) / tau;
  r.write_bps += static_cast<double>(c.write_bytes) / tau;
  r.read_ops += c.read_ops;
  r.read_bytes += c.read_bytes;
  r.write_ops += c.write_ops;
  r.write_bytes += c.write_bytes;
  if (!c.empty()) r.last_access_unix = std::max(r.last_access_unix, now);
}

Status persist_heat(Pool& pool, uint64_t now) {
  LAYER_TRY(pool.check_writable());
  auto counts = pool.heat().drain();
  if (counts.empty()) return {};
  auto s = pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(const TierPolicy policy, load_tier_policy(txn));
    for (const auto& [id, c] : counts) {
      const std::string key = key_u64(id);
      LAYER_ASSIGN(auto layer_row, txn.get(Db::kLayers, key));
      if (!layer_row) continue;  // dropped meanwhile: its heat row went with it
      LAYER_ASSIGN(HeatRecord r, heat_row(txn, id));
      add_counts(r, c, now, policy.half_life_s);
      LAYER_TRY(txn.put(Db::kHeat, key, encode(r)));
    }
    return Status{};
  });
  if (!s.ok()) pool.heat().give_back(counts);
  return s;
}

Status note_moved(Pool& pool, LayerId id, uint64_t now) {
  return pool.committer().run([&](WriteTxn& txn) -> Status {
    const std::string key = key_u64(id);
    LAYER_ASSIGN(auto layer_row, txn.get(Db::kLayers, key));
    if (!layer_row) return Status{};
    LAYER_ASSIGN(const TierPolicy policy, load_tier_policy(txn));
    LAYER_ASSIGN(HeatRecord r, heat_row(txn, id));
    r = decayed(r, now, policy.half_life_s);
    r.moved_unix = now;
    return txn.put(Db::kHeat, key, encode(r));
  });
}

Result<std::unique_ptr<HeatPersister>> HeatPersister::start(Pool& pool, Options options) {
  std::unique_ptr<HeatPersister> p(new HeatPersister(pool, std::move(options)));
  try {
    p->thread_ = std::thread([raw = p.get()] { raw->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value(), "cannot start the heat writer thread: {}", e.what());
  }
  return p;
}

HeatPersister::~HeatPersister() {
  stop_.request_stop();
  if (thread_.joinable()) thread_.join();
}

void HeatPersister::run() {
  for (;;) {
    const bool go_on = stop_.wait_until(std::chrono::steady_clock::now() + options_.interval);
    auto s = persist_heat(pool_, now_unix());
    if (!s.ok() && options_.log_error)
      options_.log_error(fmt::format("heat: not written: {}", s.error().message));
    if (!go_on) return;  // stopping: that was the last write
  }
}

}  // namespace layer
