// capacity.cc — a pool's capacities and admission (capacity.h).
#include "capacity.h"

#include <algorithm>
#include <charconv>

#include "layers.h"
#include "pool.h"
#include "qos.h"

namespace layer {
namespace {

constexpr std::string_view kMetaIops = "capacity.iops";
constexpr std::string_view kMetaBandwidth = "capacity.bandwidth";
constexpr std::string_view kMetaSsdBytes = "capacity.ssd_bytes";
constexpr std::string_view kMetaOvercommit = "capacity.overcommit";  // thousandths

// A decimal u64 meta value; `fallback` when absent. Errors: EIO.
Result<uint64_t> meta_u64(ReadTxn& txn, std::string_view key, uint64_t fallback) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, key));
  if (!v) return fallback;
  uint64_t n = 0;
  const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
  if (v->empty() || ec != std::errc() || end != v->data() + v->size())
    return make_error(EIO, "meta {}: corrupt value \"{}\"", key, *v);
  return n;
}

Status put_u64(WriteTxn& txn, std::string_view key, uint64_t v, uint64_t fallback) {
  if (v == fallback) return txn.del(Db::kMeta, key);
  return txn.put(Db::kMeta, key, std::to_string(v));
}

// The reservation's value in a dimension; UINT64_MAX for an unlimited one.
uint64_t want(uint64_t v) { return v == 0 ? UINT64_MAX : v; }

Status refuse_over(const char* dimension, uint64_t total, uint64_t capacity,
                   uint64_t overcommit_milli, std::string_view who) {
  return make_error(ENOSPC,
                    "admission refused: {} reservations would total {} (with {}), past the "
                    "pool's {} capacity {} × overcommit {} = {}",
                    dimension, total, who, dimension, capacity, format_cpu(overcommit_milli),
                    PoolCapacity{0, 0, 0, overcommit_milli}.limit(capacity));
}

Status refuse_unlimited(const char* dimension, std::string_view who, const char* option) {
  return make_error(ENOSPC,
                    "admission refused: {} has no {} reservation (unlimited) but the pool has an "
                    "{} capacity: give it {} N",
                    who, dimension, dimension, option);
}

}  // namespace

Result<PoolCapacity> load_capacity(ReadTxn& txn) {
  PoolCapacity c;
  LAYER_ASSIGN(c.iops, meta_u64(txn, kMetaIops, 0));
  LAYER_ASSIGN(c.bandwidth, meta_u64(txn, kMetaBandwidth, 0));
  LAYER_ASSIGN(c.ssd_bytes, meta_u64(txn, kMetaSsdBytes, 0));
  LAYER_ASSIGN(c.overcommit_milli,
               meta_u64(txn, kMetaOvercommit, PoolCapacity::kDefaultOvercommitMilli));
  if (c.overcommit_milli == 0) return make_error(EIO, "meta {}: corrupt value 0", kMetaOvercommit);
  return c;
}

Result<PoolCapacity> load_capacity(Pool& pool) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  return load_capacity(txn);
}

Reservation reservation_of(const ContainerRecord& rec, bool delta_on_ssd, uint64_t now_ms) {
  const Resources& r = rec.resources;
  Reservation out;
  // A time-bounded change counts while in force; the larger of it and the base, so neither a
  // raise nor the end of a lowering can take the pool past what was admitted.
  out.iops = std::max(r.iops, r.effective_iops(now_ms));
  out.bandwidth = std::max(r.bandwidth, r.effective_bandwidth(now_ms));
  if (r.iops == 0 || r.effective_iops(now_ms) == 0) {
    out.iops = 0;
    out.unlimited_iops = 1;
  }
  if (r.bandwidth == 0 || r.effective_bandwidth(now_ms) == 0) {
    out.bandwidth = 0;
    out.unlimited_bandwidth = 1;
  }
  // An automatic limit (forecast.h) may be set anywhere up to its ceiling: that is what it
  // reserves (no ceiling: unlimited), or a timed change in force when that is larger.
  auto automatic = [&](const Resources::AutoLimit& a, uint64_t timed, uint64_t& value,
                       uint64_t& unlimited) {
    if (!a.on) return;
    const bool timed_on = r.timed_active(now_ms) && timed != Resources::kKeep;
    if (a.ceiling == 0 || (timed_on && timed == 0)) {
      value = 0;
      unlimited = 1;
      return;
    }
    value = std::max(a.ceiling, timed_on ? timed : 0);
    unlimited = 0;
  };
  automatic(r.auto_iops, r.timed.iops, out.iops, out.unlimited_iops);
  automatic(r.auto_bandwidth, r.timed.bandwidth, out.bandwidth, out.unlimited_bandwidth);
  if (delta_on_ssd) out.ssd_bytes = rec.size_bytes;
  return out;
}

Result<Reservation> sum_reservations(ReadTxn& txn, uint64_t now_ms, std::string_view except) {
  Reservation sum;
  LAYER_TRY(txn.scan(Db::kContainers, "",
                     [&](std::string_view key, std::string_view value) -> Result<bool> {
                       if (key == except) return true;
                       LAYER_ASSIGN(auto rec, decode_container(value, key));
                       LAYER_ASSIGN(auto delta, get_layer(txn, rec.delta_layer));
                       const auto r = reservation_of(rec, delta.tier == Tier::kSsd, now_ms);
                       sum.iops += r.iops;
                       sum.bandwidth += r.bandwidth;
                       sum.ssd_bytes += r.ssd_bytes;
                       sum.unlimited_iops += r.unlimited_iops;
                       sum.unlimited_bandwidth += r.unlimited_bandwidth;
                       return true;
                     }));
  return sum;
}

Status check_admission(ReadTxn& txn, const ContainerRecord& rec, const ContainerRecord* before,
                       uint64_t now_ms) {
  LAYER_ASSIGN(const auto cap, load_capacity(txn));
  if (cap.iops == 0 && cap.bandwidth == 0 && cap.ssd_bytes == 0) return {};
  LAYER_ASSIGN(auto delta, get_layer(txn, rec.delta_layer));
  const bool on_ssd = delta.tier == Tier::kSsd;
  const Reservation now = reservation_of(rec, on_ssd, now_ms);
  Reservation was;  // a new container raises every dimension it reserves from nothing
  if (before) was = reservation_of(*before, on_ssd, now_ms);
  const bool raises_iops = before == nullptr || want(now.iops) > want(was.iops);
  const bool raises_bandwidth = before == nullptr || want(now.bandwidth) > want(was.bandwidth);
  const bool raises_ssd = before == nullptr || now.ssd_bytes > was.ssd_bytes;
  const std::string who = fmt::format("container \"{}\"", rec.name);
  if (cap.iops != 0 && raises_iops && now.unlimited_iops)
    return refuse_unlimited("iops", who, "--iops");
  if (cap.bandwidth != 0 && raises_bandwidth && now.unlimited_bandwidth)
    return refuse_unlimited("bandwidth", who, "--bandwidth");
  LAYER_ASSIGN(const auto others, sum_reservations(txn, now_ms, rec.name));
  if (cap.iops != 0 && raises_iops && others.iops + now.iops > cap.limit(cap.iops))
    return refuse_over("iops", others.iops + now.iops, cap.iops, cap.overcommit_milli,
                       fmt::format("{} asking {}", who, now.iops));
  if (cap.bandwidth != 0 && raises_bandwidth &&
      others.bandwidth + now.bandwidth > cap.limit(cap.bandwidth))
    return refuse_over("bandwidth", others.bandwidth + now.bandwidth, cap.bandwidth,
                       cap.overcommit_milli, fmt::format("{} asking {}", who, now.bandwidth));
  if (cap.ssd_bytes != 0 && raises_ssd &&
      others.ssd_bytes + now.ssd_bytes > cap.limit(cap.ssd_bytes))
    return refuse_over("ssd-bytes", others.ssd_bytes + now.ssd_bytes, cap.ssd_bytes,
                       cap.overcommit_milli, fmt::format("{} asking {}", who, now.ssd_bytes));
  return {};
}

Result<PoolCapacity> change_capacity(Pool& pool, const CapacityChange& c, uint64_t now_ms) {
  if (c.empty()) return make_error(EINVAL, "nothing to change: give a capacity to set");
  LAYER_TRY(pool.check_writable());
  PoolCapacity after;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(after, load_capacity(txn));
    if (c.iops) after.iops = *c.iops;
    if (c.bandwidth) after.bandwidth = *c.bandwidth;
    if (c.ssd_bytes) after.ssd_bytes = *c.ssd_bytes;
    if (c.overcommit_milli)
      after.overcommit_milli =
          *c.overcommit_milli == 0 ? PoolCapacity::kDefaultOvercommitMilli : *c.overcommit_milli;
    LAYER_ASSIGN(const auto sum, sum_reservations(txn, now_ms));
    const std::string who = "the pool's containers";
    if (after.iops != 0 && sum.unlimited_iops != 0)
      return make_error(ENOSPC,
                        "capacity refused: {} container(s) have no iops reservation (unlimited); "
                        "give each an --iops first (layer set)",
                        sum.unlimited_iops);
    if (after.bandwidth != 0 && sum.unlimited_bandwidth != 0)
      return make_error(ENOSPC,
                        "capacity refused: {} container(s) have no bandwidth reservation "
                        "(unlimited); give each a --bandwidth first (layer set)",
                        sum.unlimited_bandwidth);
    if (after.iops != 0 && sum.iops > after.limit(after.iops))
      return refuse_over("iops", sum.iops, after.iops, after.overcommit_milli, who);
    if (after.bandwidth != 0 && sum.bandwidth > after.limit(after.bandwidth))
      return refuse_over("bandwidth", sum.bandwidth, after.bandwidth, after.overcommit_milli, who);
    if (after.ssd_bytes != 0 && sum.ssd_bytes > after.limit(after.ssd_bytes))
      return refuse_over("ssd-bytes", sum.ssd_bytes, after.ssd_bytes, after.overcommit_milli, who);
    LAYER_TRY(put_u64(txn, kMetaIops, after.iops, 0));
    LAYER_TRY(put_u64(txn, kMetaBandwidth, after.bandwidth, 0));
    LAYER_TRY(put_u64(txn, kMetaSsdBytes, after.ssd_bytes, 0));
    return put_u64(txn, kMetaOvercommit, after.overcommit_milli,
                   PoolCapacity::kDefaultOvercommitMilli);
  }));
  return after;
}

Result<uint64_t> parse_overcommit(std::string_view text) {
  if (text == "none") return PoolCapacity::kDefaultOvercommitMilli;
  auto v = parse_cpu(text);
  if (!v || *v == 0)
    return make_error(EINVAL, "\"{}\" is not an overcommit ratio (e.g. 1, 1.5; none: 1)", text);
  return *v;
}

}  // namespace layer
