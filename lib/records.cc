// records.cc — binary encoding of index values.
//
// Layout of every record: u8 record version (kRecordVersion), then fields in declaration order;
// integers big-endian, strings as u32 length + bytes, maps as u32 count + key/value strings.
// Decoding reads untrusted bytes: every read is bounds-checked and trailing bytes are an error.
#include "records.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

namespace layer {
namespace {

constexpr uint8_t kRecordVersion = 1;
// Opens a container record's resources (a later trailing field would come after them).
constexpr uint8_t kResourcesTag = 1;
// Opens the auto limits that follow the resources (written only when one is on).
constexpr uint8_t kAutoLimitsTag = 2;

class Encoder {
 public:
  Encoder() { u8(kRecordVersion); }
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) {
    for (int i = 3; i >= 0; --i) out_.push_back(static_cast<char>(v >> (i * 8)));
  }
  void u64(uint64_t v) {
    for (int i = 7; i >= 0; --i) out_.push_back(static_cast<char>(v >> (i * 8)));
  }
  // A double as the big-endian bits of its IEEE 754 binary64.
  void f64(double v) { u64(std::bit_cast<uint64_t>(v)); }
  void str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class Decoder {
 public:
  Decoder(std::string_view in, std::string what) : in_(in), what_(std::move(what)) {}
  bool version() {
    uint8_t v = 0;
    if (!u8(&v)) return false;
    if (v != kRecordVersion) {
      bad_ = fmt::format("record version {} (this build reads {})", v, kRecordVersion);
      return false;
    }
    return true;
  }
  bool u8(uint8_t* v) {
    if (!need(1)) return false;
    *v = static_cast<uint8_t>(in_[pos_++]);
    return true;
  }
  bool u32(uint32_t* v) {
    if (!need(4)) return false;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r = r << 8 | static_cast<uint8_t>(in_[pos_++]);
    *v = r;
    return true;
  }
  bool u64(uint64_t* v) {
    if (!need(8)) return false;
    uint64_t r = 0;
    for (int i = 0; i < 8; ++i) r = r << 8 | static_cast<uint8_t>(in_[pos_++]);
    *v = r;
    return true;
  }
  bool f64(double* v) {
    uint64_t bits = 0;
    if (!u64(&bits)) return false;
    *v = std::bit_cast<double>(bits);
    if (!std::isfinite(*v)) bad_ = "a number that is not finite";
    return std::isfinite(*v);
  }
  bool str(std::string* s) {
    uint32_t n = 0;
    if (!u32(&n) || !need(n)) return false;
    s->assign(in_.substr(pos_, n));
    pos_ += n;
    return true;
  }
  // Every byte consumed (a field added to a record's end may be absent in an older one).
  bool at_end() const { return pos_ == in_.size(); }
  // Finishes decoding: an error unless every byte was consumed and every read succeeded.
  Status finish(bool ok) {
    if (ok && pos_ != in_.size()) bad_ = fmt::format("{} trailing bytes", in_.size() - pos_);
    if (ok && bad_.empty()) return {};
    return make_error(EIO, "{}: corrupt record ({})", what_, bad_.empty() ? "truncated" : bad_);
  }

 private:
  bool need(size_t n) {
    if (in_.size() - pos_ >= n) return true;
    bad_ = fmt::format("truncated at byte {} of {}", pos_, in_.size());
    return false;
  }
  std::string_view in_;
  size_t pos_ = 0;
  std::string what_;
  std::string bad_;
};

}  // namespace

const char* to_string(Tier tier) { return tier == Tier::kHdd ? "hdd" : "ssd"; }

Result<Tier> parse_tier(std::string_view name) {
  if (name == "ssd") return Tier::kSsd;
  if (name == "hdd") return Tier::kHdd;
  return make_error(EINVAL, "unknown tier \"{}\" (expected ssd or hdd)", name);
}

const char* to_string(LayerState state) {
  switch (state) {
    case LayerState::kWritable:
      return "writable";
    case LayerState::kFrozenUnhashed:
      return "frozen-unhashed";
    case LayerState::kFrozen:
      return "frozen";
  }
  return "invalid";
}

std::string encode(const LayerRecord& r) {
  Encoder e;
  e.u64(r.id);
  e.u64(r.parent);
  e.u8(static_cast<uint8_t>(r.tier));
  e.u64(r.size_bytes);
  e.u32(r.block_size);
  e.u8(static_cast<uint8_t>(r.state));
  e.u32(r.refcount);
  e.u64(r.created_unix);
  return e.take();
}

Result<LayerRecord> decode_layer(std::string_view bytes, uint64_t id) {
  Decoder d(bytes, fmt::format("layer {}", id));
  LayerRecord r;
  uint8_t tier = 0, state = 0;
  bool ok = d.version() && d.u64(&r.id) && d.u64(&r.parent) && d.u8(&tier) &&
            d.u64(&r.size_bytes) && d.u32(&r.block_size) && d.u8(&state) && d.u32(&r.refcount) &&
            d.u64(&r.created_unix);
  LAYER_TRY(d.finish(ok));
  if (tier > 1 || state > 2 || r.id != id)
    return make_error(EIO, "layer {}: corrupt record (tier {}, state {}, id {})", id, tier, state,
                      r.id);
  r.tier = static_cast<Tier>(tier);
  r.state = static_cast<LayerState>(state);
  return r;
}

std::string encode(const ImageRecord& r) {
  Encoder e;
  e.str(r.ref);
  e.u64(r.top_layer);
  e.u64(r.size_bytes);
  e.u32(r.block_size);
  e.u64(r.created_unix);
  e.str(r.description);
  return e.take();
}

Result<ImageRecord> decode_image(std::string_view bytes, std::string_view ref) {
  Decoder d(bytes, fmt::format("image {}", ref));
  ImageRecord r;
  bool ok = d.version() && d.str(&r.ref) && d.u64(&r.top_layer) && d.u64(&r.size_bytes) &&
            d.u32(&r.block_size) && d.u64(&r.created_unix) && d.str(&r.description);
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string encode(const ContainerRecord& r) {
  Encoder e;
  e.str(r.name);
  e.u64(r.id);
  e.str(r.image_ref);
  e.u64(r.delta_layer);
  e.u64(r.size_bytes);
  e.u32(r.block_size);
  e.u64(r.created_unix);
  e.u64(r.generation);
  e.u32(static_cast<uint32_t>(r.labels.size()));
  for (const auto& [k, v] : r.labels) {
    e.str(k);
    e.str(v);
  }
  e.u32(static_cast<uint32_t>(r.access.size()));
  for (const auto& a : r.access) {
    e.u8(static_cast<uint8_t>(a.subject));
    e.u32(a.id);
    e.str(a.addr);
    e.u8(static_cast<uint8_t>((a.deny ? 1 : 0) | (a.read_only ? 2 : 0)));
    e.str(a.label);
  }
  if (!r.resources.is_default()) {
    const Resources& q = r.resources;
    e.u8(kResourcesTag);
    e.u64(q.cpu_millis);
    e.u64(q.memory_bytes);
    e.u64(q.net_bps);
    e.u64(q.iops);
    e.u64(q.bandwidth);
    e.u8(q.priority);
    e.u64(q.timed.iops);
    e.u64(q.timed.bandwidth);
    e.u64(q.timed.until_ms);
    if (q.auto_iops != Resources::AutoLimit{} || q.auto_bandwidth != Resources::AutoLimit{}) {
      e.u8(kAutoLimitsTag);
      for (const auto* a : {&q.auto_iops, &q.auto_bandwidth}) {
        e.u8(a->on ? 1 : 0);
        e.u64(a->floor);
        e.u64(a->ceiling);
      }
    }
  }
  return e.take();
}

Result<ContainerRecord> decode_container(std::string_view bytes, std::string_view name) {
  Decoder d(bytes, fmt::format("container {}", name));
  ContainerRecord r;
  uint32_t labels = 0;
  bool ok = d.version() && d.str(&r.name) && d.u64(&r.id) && d.str(&r.image_ref) &&
            d.u64(&r.delta_layer) && d.u64(&r.size_bytes) && d.u32(&r.block_size) &&
            d.u64(&r.created_unix) && d.u64(&r.generation) && d.u32(&labels);
  for (uint32_t i = 0; ok && i < labels; ++i) {
    std::string k, v;
    ok = d.str(&k) && d.str(&v);
    if (ok) r.labels.emplace(std::move(k), std::move(v));
  }
  uint32_t rules = 0;
  if (ok && !d.at_end()) ok = d.u32(&rules);
  for (uint32_t i = 0; ok && i < rules; ++i) {
    AccessRule a;
    uint8_t subject = 0, flags = 0;
    ok = d.u8(&subject) && d.u32(&a.id) && d.str(&a.addr) && d.u8(&flags) && d.str(&a.label);
    if (ok && (subject > static_cast<uint8_t>(AccessRule::Subject::kAddr) || flags > 3))
      return make_error(EIO, "container {}: corrupt record (access rule {})", name, i);
    a.subject = static_cast<AccessRule::Subject>(subject);
    a.deny = flags & 1;
    a.read_only = flags & 2;
    if (ok) r.access.push_back(std::move(a));
  }
  if (ok && !d.at_end()) {
    uint8_t tag = 0;
    Resources& q = r.resources;
    ok = d.u8(&tag) && d.u64(&q.cpu_millis) && d.u64(&q.memory_bytes) && d.u64(&q.net_bps) &&
         d.u64(&q.iops) && d.u64(&q.bandwidth) && d.u8(&q.priority) && d.u64(&q.timed.iops) &&
         d.u64(&q.timed.bandwidth) && d.u64(&q.timed.until_ms);
    if (ok && (tag != kResourcesTag || q.priority < 1 || q.priority > 10))
      return make_error(EIO, "container {}: corrupt record (resources tag {}, priority {})", name,
                        tag, q.priority);
    if (ok && !d.at_end()) {
      uint8_t on[2] = {0, 0};
      ok = d.u8(&tag) && d.u8(&on[0]) && d.u64(&q.auto_iops.floor) && d.u64(&q.auto_iops.ceiling) &&
           d.u8(&on[1]) && d.u64(&q.auto_bandwidth.floor) && d.u64(&q.auto_bandwidth.ceiling);
      if (ok && (tag != kAutoLimitsTag || on[0] > 1 || on[1] > 1))
        return make_error(EIO, "container {}: corrupt record (auto limits tag {})", name, tag);
      q.auto_iops.on = on[0] == 1;
      q.auto_bandwidth.on = on[1] == 1;
    }
  }
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string encode(const SnapshotRecord& r) {
  Encoder e;
  e.str(r.name);
  e.u64(r.container_id);
  e.u64(r.layer);
  e.u64(r.created_unix);
  return e.take();
}

Result<SnapshotRecord> decode_snapshot(std::string_view bytes, std::string_view key) {
  std::string what = "snapshot";
  if (key.size() > 8) what = fmt::format("snapshot {}", key.substr(8));
  Decoder d(bytes, what);
  SnapshotRecord r;
  bool ok = d.version() && d.str(&r.name) && d.u64(&r.container_id) && d.u64(&r.layer) &&
            d.u64(&r.created_unix);
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string snapshot_key(uint64_t container_id, std::string_view name) {
  std::string key(8, '\0');
  for (int i = 0; i < 8; ++i) key[i] = static_cast<char>(container_id >> (56 - 8 * i));
  key.append(name);
  return key;
}

std::string encode(const HeatRecord& r) {
  Encoder e;
  e.u64(r.read_ops);
  e.u64(r.read_bytes);
  e.u64(r.write_ops);
  e.u64(r.write_bytes);
  e.u64(r.last_access_unix);
  e.f64(r.read_rate);
  e.f64(r.write_rate);
  e.f64(r.read_bps);
  e.f64(r.write_bps);
  e.u64(r.rate_unix);
  e.u64(r.moved_unix);
  return e.take();
}

Result<HeatRecord> decode_heat(std::string_view bytes, uint64_t id) {
  Decoder d(bytes, fmt::format("heat {}", id));
  HeatRecord r;
  const bool ok = d.version() && d.u64(&r.read_ops) && d.u64(&r.read_bytes) &&
                  d.u64(&r.write_ops) && d.u64(&r.write_bytes) && d.u64(&r.last_access_unix) &&
                  d.f64(&r.read_rate) && d.f64(&r.write_rate) && d.f64(&r.read_bps) &&
                  d.f64(&r.write_bps) && d.u64(&r.rate_unix) && d.u64(&r.moved_unix);
  LAYER_TRY(d.finish(ok));
  return r;
}

const char* to_string(IoOp op) {
  static const char* const kNames[] = {"read", "write", "trim", "zero", "flush"};
  return kNames[static_cast<int>(op)];
}

bool StatsRecord::empty() const {
  return std::all_of(op.begin(), op.end(), [](const IoOpStats& s) { return s.ops == 0; });
}

void StatsRecord::add(const StatsRecord& other) {
  for (int i = 0; i < kIoOps; ++i) {
    op[i].ops += other.op[i].ops;
    op[i].bytes += other.op[i].bytes;
    op[i].latency_ns_sum += other.op[i].latency_ns_sum;
    for (int b = 0; b < kLatencyBuckets; ++b) op[i].latency[b] += other.op[i].latency[b];
  }
}

// Sparse: only the buckets that counted something (a minute of 4 KiB reads fills a handful).
std::string encode(const StatsRecord& r) {
  Encoder e;
  e.u8(kIoOps);
  for (const auto& s : r.op) {
    e.u64(s.ops);
    e.u64(s.bytes);
    e.u64(s.latency_ns_sum);
    const auto used =
        std::count_if(s.latency.begin(), s.latency.end(), [](uint64_t n) { return n != 0; });
    e.u8(static_cast<uint8_t>(used));
    for (int b = 0; b < kLatencyBuckets; ++b) {
      if (s.latency[b] == 0) continue;
      e.u8(static_cast<uint8_t>(b));
      e.u64(s.latency[b]);
    }
  }
  return e.take();
}

Result<StatsRecord> decode_stats(std::string_view bytes, std::string_view what) {
  Decoder d(bytes, std::string(what));
  StatsRecord r;
  uint8_t ops = 0;
  bool ok = d.version() && d.u8(&ops);
  for (int i = 0; ok && i < ops; ++i) {
    IoOpStats s;
    uint8_t used = 0;
    ok = d.u64(&s.ops) && d.u64(&s.bytes) && d.u64(&s.latency_ns_sum) && d.u8(&used);
    for (int j = 0; ok && j < used; ++j) {
      uint8_t b = 0;
      uint64_t n = 0;
      ok = d.u8(&b) && d.u64(&n);
      s.latency[std::min<int>(b, kLatencyBuckets - 1)] += n;
    }
    if (i < kIoOps) r.op[i] = s;
  }
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string encode(const TierPolicy& p) {
  Encoder e;
  e.u64(p.cold_after_s);
  e.f64(p.cold_rate);
  e.f64(p.hot_rate);
  e.u64(p.half_life_s);
  e.u8(static_cast<uint8_t>(p.high_water));
  e.u64(p.high_water_value);
  e.u64(p.move_rate);
  if (p.prewarm_s != 0) e.u64(p.prewarm_s);
  return e.take();
}

Result<TierPolicy> decode_tier_policy(std::string_view bytes) {
  Decoder d(bytes, "meta tier.policy");
  TierPolicy p;
  uint8_t hw = 0;
  bool has_prewarm = false;
  const bool ok = d.version() && d.u64(&p.cold_after_s) && d.f64(&p.cold_rate) &&
                  d.f64(&p.hot_rate) && d.u64(&p.half_life_s) && d.u8(&hw) &&
                  d.u64(&p.high_water_value) && (d.at_end() || d.u64(&p.move_rate)) &&
                  (d.at_end() || (has_prewarm = true, d.u64(&p.prewarm_s)));
  LAYER_TRY(d.finish(ok));
  // The prewarm field is written only when set: a 0 there is no record this code wrote.
  if (has_prewarm && p.prewarm_s == 0)
    return make_error(EIO, "meta tier.policy: corrupt record (a prewarm of 0 written out)");
  if (hw > static_cast<uint8_t>(TierPolicy::HighWater::kPercent))
    return make_error(EIO, "meta tier.policy: corrupt record (high-water kind {})", hw);
  p.high_water = static_cast<TierPolicy::HighWater>(hw);
  return p;
}

std::string encode(const StaleRecord& r) {
  Encoder e;
  e.u64(r.container_id);
  e.str(r.container);
  e.u64(r.delta);
  e.u64(r.blocks);
  e.u64(r.restored_unix);
  e.str(r.backup);
  return e.take();
}

Result<StaleRecord> decode_stale(std::string_view bytes) {
  Decoder d(bytes, "meta stale");
  StaleRecord r;
  const bool ok = d.version() && d.u64(&r.container_id) && d.str(&r.container) && d.u64(&r.delta) &&
                  d.u64(&r.blocks) && d.u64(&r.restored_unix) && d.str(&r.backup);
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string encode(const RestoreRecord& r) {
  Encoder e;
  e.str(r.backup);
  e.u64(r.backup_txnid);
  e.u64(r.restored_unix);
  e.u64(r.first_unknown_layer);
  return e.take();
}

Result<RestoreRecord> decode_restore(std::string_view bytes) {
  Decoder d(bytes, "meta restore");
  RestoreRecord r;
  const bool ok = d.version() && d.str(&r.backup) && d.u64(&r.backup_txnid) &&
                  d.u64(&r.restored_unix) && d.u64(&r.first_unknown_layer);
  LAYER_TRY(d.finish(ok));
  return r;
}

std::string encode(const IntentRecord& r) {
  Encoder e;
  e.u8(static_cast<uint8_t>(r.kind));
  e.u64(r.layer);
  e.str(r.target);
  e.u64(r.created_unix);
  return e.take();
}

Result<IntentRecord> decode_intent(std::string_view bytes, uint64_t id) {
  Decoder d(bytes, fmt::format("intent {}", id));
  IntentRecord r;
  uint8_t kind = 0;
  bool ok =
      d.version() && d.u8(&kind) && d.u64(&r.layer) && d.str(&r.target) && d.u64(&r.created_unix);
  LAYER_TRY(d.finish(ok));
  if (kind != static_cast<uint8_t>(IntentRecord::Kind::kImport) &&
      kind != static_cast<uint8_t>(IntentRecord::Kind::kDrop) &&
      kind != static_cast<uint8_t>(IntentRecord::Kind::kMerge) &&
      kind != static_cast<uint8_t>(IntentRecord::Kind::kDelta) &&
      kind != static_cast<uint8_t>(IntentRecord::Kind::kMove))
    return make_error(EIO, "intent {}: unknown kind {}", id, kind);
  r.kind = static_cast<IntentRecord::Kind>(kind);
  return r;
}

std::string encode_sums(const std::vector<uint64_t>& sums) {
  Encoder e;
  for (uint64_t s : sums) e.u64(s);
  return e.take();
}

Result<std::vector<uint64_t>> decode_sums(std::string_view bytes) {
  if (bytes.empty() || (bytes.size() - 1) % 8 != 0 || (bytes.size() - 1) / 8 > kSumsPerRow ||
      static_cast<uint8_t>(bytes[0]) != kRecordVersion)
    return make_error(EIO, "sums row: corrupt ({} bytes)", bytes.size());
  Decoder d(bytes, "sums row");
  std::vector<uint64_t> sums((bytes.size() - 1) / 8);
  bool ok = d.version();
  for (auto& s : sums) ok = ok && d.u64(&s);
  LAYER_TRY(d.finish(ok));
  return sums;
}

}  // namespace layer
