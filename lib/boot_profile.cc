// boot_profile.cc — boot profiles: ranges, their row, the sessions' recording and the service
// that prefetches and persists them (boot_profile.h).
#include "boot_profile.h"

#include <fmt/format.h>

#include <algorithm>
#include <system_error>

#include "layer_file.h"
#include "pool.h"

namespace layer {
namespace {

constexpr uint8_t kBootRecordVersion = 1;
constexpr std::string_view kBootKeyPrefix = "boot.";

void put_u32(std::string& out, uint32_t v) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<char>(v >> (i * 8)));
}
void put_u64(std::string& out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>(v >> (i * 8)));
}

// Reads big-endian fields; every read checks what is left.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool u8(uint8_t* v) {
    if (in_.size() < 1) return false;
    *v = static_cast<uint8_t>(in_[0]);
    in_.remove_prefix(1);
    return true;
  }
  bool u32(uint32_t* v) {
    if (in_.size() < 4) return false;
    *v = 0;
    for (int i = 0; i < 4; ++i) *v = (*v << 8) | static_cast<uint8_t>(in_[i]);
    in_.remove_prefix(4);
    return true;
  }
  bool u64(uint64_t* v) {
    if (in_.size() < 8) return false;
    *v = 0;
    for (int i = 0; i < 8; ++i) *v = (*v << 8) | static_cast<uint8_t>(in_[i]);
    in_.remove_prefix(8);
    return true;
  }
  bool str(std::string* s) {
    uint32_t n = 0;
    if (!u32(&n) || in_.size() < n) return false;
    s->assign(in_.substr(0, n));
    in_.remove_prefix(n);
    return true;
  }
  size_t left() const { return in_.size(); }

 private:
  std::string_view in_;
};

// Coalesces each layer's ranges and caps each at its share of max_ranges.
BootLayerRanges tidy(BootLayerRanges layers, size_t max_ranges) {
  const size_t share = std::max<size_t>(1, max_ranges / std::max<size_t>(1, layers.size()));
  for (auto it = layers.begin(); it != layers.end();) {
    it->second = cap_ranges(std::move(it->second), share);
    it = it->second.empty() ? layers.erase(it) : std::next(it);
  }
  return layers;
}

}  // namespace

// ---- ranges ----

BootRanges coalesce_ranges(BootRanges ranges) {
  std::erase_if(ranges, [](const BootRange& r) { return r.length == 0; });
  std::sort(ranges.begin(), ranges.end(),
            [](const BootRange& a, const BootRange& b) { return a.offset < b.offset; });
  BootRanges out;
  out.reserve(ranges.size());
  for (const auto& r : ranges) {
    if (!out.empty() && r.offset <= out.back().offset + out.back().length) {
      BootRange& last = out.back();
      last.length = std::max(last.offset + last.length, r.offset + r.length) - last.offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

BootRanges cap_ranges(BootRanges ranges, size_t max_ranges) {
  ranges = coalesce_ranges(std::move(ranges));
  max_ranges = std::max<size_t>(max_ranges, 1);
  if (ranges.size() <= max_ranges) return ranges;
  const size_t n = ranges.size();
  const size_t merges = n - max_ranges;  // gaps to close
  std::vector<uint64_t> gaps(n - 1);
  for (size_t i = 0; i + 1 < n; ++i)
    gaps[i] = ranges[i + 1].offset - (ranges[i].offset + ranges[i].length);
  std::vector<uint64_t> sorted = gaps;
  std::nth_element(sorted.begin(), sorted.begin() + static_cast<ptrdiff_t>(merges - 1),
                   sorted.end());
  const uint64_t threshold = sorted[merges - 1];
  size_t below = 0;
  for (uint64_t g : gaps) below += g < threshold ? 1 : 0;
  size_t equal_left = merges - below;  // gaps equal to the threshold that close too
  BootRanges out;
  out.reserve(max_ranges);
  out.push_back(ranges[0]);
  for (size_t i = 1; i < n; ++i) {
    const uint64_t g = gaps[i - 1];
    bool merge = g < threshold;
    if (!merge && g == threshold && equal_left > 0) {
      merge = true;
      --equal_left;
    }
    if (merge)
      out.back().length = ranges[i].offset + ranges[i].length - out.back().offset;
    else
      out.push_back(ranges[i]);
  }
  return out;
}

uint64_t ranges_bytes(const BootRanges& ranges) {
  uint64_t n = 0;
  for (const auto& r : ranges) n += r.length;
  return n;
}

// ---- the profile row ----

uint64_t BootProfile::bytes() const {
  uint64_t n = 0;
  for (const auto& [id, r] : layers) n += ranges_bytes(r);
  return n;
}

size_t BootProfile::range_count() const {
  size_t n = 0;
  for (const auto& [id, r] : layers) n += r.size();
  return n;
}

std::string encode_boot_profile(const BootProfile& p) {
  std::string out;
  out.push_back(static_cast<char>(kBootRecordVersion));
  put_u32(out, static_cast<uint32_t>(p.image_ref.size()));
  out.append(p.image_ref);
  put_u64(out, p.top_layer);
  put_u64(out, p.boots);
  put_u64(out, p.updated_unix);
  put_u32(out, static_cast<uint32_t>(p.layers.size()));
  for (const auto& [id, ranges] : p.layers) {
    put_u64(out, id);
    put_u32(out, static_cast<uint32_t>(ranges.size()));
    for (const auto& r : ranges) {
      put_u64(out, r.offset);
      put_u64(out, r.length);
    }
  }
  return out;
}

Result<BootProfile> decode_boot_profile(std::string_view bytes, std::string_view image_ref) {
  auto bad = [&](std::string_view why) {
    return make_error(EIO, "meta {}{}: corrupt boot profile ({})", kBootKeyPrefix, image_ref, why);
  };
  Reader in(bytes);
  uint8_t version = 0;
  if (!in.u8(&version)) return bad("empty");
  if (version != kBootRecordVersion)
    return bad(fmt::format("record version {}, this build reads {}", version, kBootRecordVersion));
  BootProfile p;
  uint32_t nlayers = 0;
  if (!in.str(&p.image_ref) || !in.u64(&p.top_layer) || !in.u64(&p.boots) ||
      !in.u64(&p.updated_unix) || !in.u32(&nlayers))
    return bad("truncated header");
  for (uint32_t l = 0; l < nlayers; ++l) {
    uint64_t id = 0;
    uint32_t n = 0;
    if (!in.u64(&id) || !in.u32(&n)) return bad("truncated layer");
    if (in.left() / 16 < n) return bad(fmt::format("layer {}: {} ranges do not fit", id, n));
    BootRanges& ranges = p.layers[id];
    ranges.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
      BootRange r;
      (void)in.u64(&r.offset);
      (void)in.u64(&r.length);
      if (r.length == 0 || r.offset + r.length < r.offset)
        return bad(fmt::format("layer {}: range {} is empty or wraps", id, i));
      if (!ranges.empty() && r.offset <= ranges.back().offset + ranges.back().length)
        return bad(fmt::format("layer {}: ranges out of order at {}", id, i));
      ranges.push_back(r);
    }
  }
  if (in.left() != 0) return bad("trailing bytes");
  return p;
}

void merge_boot(BootProfile& into, const BootLayerRanges& boot, size_t max_ranges) {
  BootLayerRanges all = std::move(into.layers);
  for (const auto& [id, ranges] : boot) {
    BootRanges& r = all[id];
    r.insert(r.end(), ranges.begin(), ranges.end());
  }
  into.layers = tidy(std::move(all), max_ranges);
  ++into.boots;
}

std::string boot_profile_key(std::string_view image_ref) {
  return std::string(kBootKeyPrefix) + std::string(image_ref);
}

Result<std::optional<BootProfile>> read_boot_profile(ReadTxn& txn, std::string_view image_ref) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, boot_profile_key(image_ref)));
  if (!v) return std::optional<BootProfile>();
  LAYER_ASSIGN(auto p, decode_boot_profile(*v, image_ref));
  return std::optional<BootProfile>(std::move(p));
}

Result<std::vector<BootProfile>> list_boot_profiles(ReadTxn& txn, std::string_view prefix) {
  std::vector<BootProfile> out;
  LAYER_TRY(txn.scan(Db::kMeta, boot_profile_key(prefix),
                     [&](std::string_view k, std::string_view v) -> Result<bool> {
                       LAYER_ASSIGN(auto p,
                                    decode_boot_profile(v, k.substr(kBootKeyPrefix.size())));
                       out.push_back(std::move(p));
                       return true;
                     }));
  return out;
}

Result<std::optional<BootProfile>> save_boot(Pool& pool, const std::string& image_ref,
                                             LayerId top_layer, const BootLayerRanges& boot) {
  std::optional<BootProfile> saved;
  bool any = false;
  for (const auto& [id, r] : boot) any = any || !r.empty();
  if (!any || image_ref.empty()) return saved;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    saved.reset();
    LAYER_ASSIGN(auto row, txn.get(Db::kImages, image_ref));
    if (!row) return {};
    LAYER_ASSIGN(auto image, decode_image(*row, image_ref));
    if (image.top_layer != top_layer) return {};
    BootProfile p;
    // A damaged or stale row is replaced: it is a cache of what boots read, nothing more.
    auto old = read_boot_profile(txn, image_ref);
    if (old && *old && (*old)->top_layer == top_layer) p = std::move(**old);
    p.image_ref = image_ref;
    p.top_layer = top_layer;
    merge_boot(p, boot);
    p.updated_unix = now_unix();
    LAYER_TRY(txn.put(Db::kMeta, boot_profile_key(image_ref), encode_boot_profile(p)));
    saved = std::move(p);
    return {};
  }));
  return saved;
}

Result<bool> clear_boot_profile(Pool& pool, const std::string& image_ref) {
  LAYER_TRY(pool.check_writable());
  bool existed = false;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto v, txn.get(Db::kMeta, boot_profile_key(image_ref)));
    existed = v.has_value();
    return existed ? txn.del(Db::kMeta, boot_profile_key(image_ref)) : Status{};
  }));
  return existed;
}

Status drop_boot_profile(WriteTxn& txn, std::string_view image_ref) {
  return txn.del(Db::kMeta, boot_profile_key(image_ref));
}

// ---- BootSession ----

BootSession::BootSession(std::string container, std::string image_ref,
                         std::vector<LayerRecord> chain,
                         std::vector<std::shared_ptr<LayerFile>> files,
                         std::chrono::steady_clock::time_point deadline)
    : container_(std::move(container)),
      image_ref_(std::move(image_ref)),
      chain_(std::move(chain)),
      files_(std::move(files)),
      deadline_(deadline) {}

void BootSession::record_slow(LayerId layer, uint64_t offset, uint64_t length) noexcept {
  if (length == 0) return;
  if (std::chrono::steady_clock::now() >= deadline_) {
    recording_.store(false, std::memory_order_relaxed);
    return;
  }
  try {
    std::lock_guard<std::mutex> lk(mu_);
    if (!recording_.load(std::memory_order_relaxed)) return;  // finished meanwhile
    // A sequential reader extends its last run instead of adding one.
    if (!runs_.empty() && runs_.back().first == layer &&
        runs_.back().second.offset + runs_.back().second.length == offset) {
      runs_.back().second.length += length;
      return;
    }
    runs_.emplace_back(layer, BootRange{offset, length});
    if (runs_.size() < kCoalesceAt) return;
    BootLayerRanges by_layer;
    for (const auto& [id, r] : runs_) by_layer[id].push_back(r);
    for (auto& [id, r] : by_layer) r = coalesce_ranges(std::move(r));
    size_t n = 0;
    uint64_t bytes = 0;
    for (const auto& [id, r] : by_layer) {
      n += r.size();
      bytes += ranges_bytes(r);
    }
    // More than a boot reads: not a boot (the service will not keep it), so stop paying for it.
    if (bytes > max_bytes_) recording_.store(false, std::memory_order_relaxed);
    if (n > kCoalesceAt / 2) {
      by_layer = tidy(std::move(by_layer), kBootProfileMaxRanges);
      full_ = true;
    }
    runs_.clear();
    for (const auto& [id, rs] : by_layer)
      for (const auto& r : rs) runs_.emplace_back(id, r);
  } catch (...) {
    recording_.store(false, std::memory_order_relaxed);  // out of memory: the window ends
  }
}

void BootSession::close() {
  recording_.store(false, std::memory_order_relaxed);
  closed_.store(true);
  if (wake_) wake_->wake();
}

BootLayerRanges BootSession::finish() {
  recording_.store(false, std::memory_order_relaxed);
  std::vector<std::pair<LayerId, BootRange>> runs;
  {
    std::lock_guard<std::mutex> lk(mu_);
    runs.swap(runs_);
  }
  BootLayerRanges by_layer;
  for (const auto& [id, r] : runs) by_layer[id].push_back(r);
  return tidy(std::move(by_layer), kBootProfileMaxRanges);
}

// ---- BootService ----

BootService::BootService(Pool& pool, Options options) : pool_(pool), options_(std::move(options)) {}

Result<std::unique_ptr<BootService>> BootService::start(Pool& pool, Options options) {
  std::unique_ptr<BootService> s(new BootService(pool, std::move(options)));
  try {
    s->thread_ = std::thread([p = s.get()] { p->run(); });
  } catch (const std::system_error& e) {
    return make_error(EAGAIN, "boot profiles: cannot start a thread: {}", e.what());
  }
  return s;
}

BootService::~BootService() {
  stop_->request_stop();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<BootSession> BootService::begin(
    const std::string& container, const std::string& image_ref,
    const std::vector<LayerRecord>& chain, const std::vector<std::shared_ptr<LayerFile>>& files) {
  auto s = std::make_shared<BootSession>(container, image_ref, chain, files,
                                         std::chrono::steady_clock::now() + options_.window);
  s->wake_ = stop_;
  s->max_bytes_ = options_.max_boot_bytes;
  {
    std::lock_guard<std::mutex> lk(mu_);
    open_.push_back(s);
    if (options_.prefetch) to_prefetch_.push_back(s);
  }
  stop_->wake();
  return s;
}

void BootService::run() {
  for (;;) {
    std::shared_ptr<BootSession> next;
    std::vector<std::shared_ptr<BootSession>> due;
    auto wake_at = std::chrono::steady_clock::now() + std::chrono::hours(1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!to_prefetch_.empty() && !stop_->stop_requested()) {
        next = std::move(to_prefetch_.front());
        to_prefetch_.pop_front();
      }
      const auto now = std::chrono::steady_clock::now();
      for (auto it = open_.begin(); it != open_.end();) {
        if ((*it)->closed() || (*it)->deadline() <= now) {
          due.push_back(std::move(*it));
          it = open_.erase(it);
        } else {
          wake_at = std::min(wake_at, (*it)->deadline());
          ++it;
        }
      }
    }
    for (auto& s : due) persist(*s);
    if (next) {
      prefetch(*next);
      continue;
    }
    if (!due.empty()) continue;
    if (stop_->stop_requested()) break;
    stop_->wait_until(wake_at, [&] {
      std::lock_guard<std::mutex> lk(mu_);
      if (!to_prefetch_.empty()) return true;
      return std::any_of(open_.begin(), open_.end(), [](const auto& s) { return s->closed(); });
    });
  }
  // Stopping: what the open windows recorded so far is kept.
  std::vector<std::shared_ptr<BootSession>> left;
  {
    std::lock_guard<std::mutex> lk(mu_);
    left.swap(open_);
    to_prefetch_.clear();
  }
  for (auto& s : left) persist(*s);
}

void BootService::prefetch(BootSession& s) {
  if (s.closed() || s.chain_.empty()) return;
  const auto started = s.deadline_ - options_.window;
  BootEvent e;
  e.kind = BootEvent::Kind::kPrefetch;
  e.container = s.container_;
  e.image_ref = s.image_ref_;
  std::optional<BootProfile> profile;
  {
    auto txn = pool_.index().begin_read();
    if (!txn) {
      e.error = txn.error().message;
      log(e);
      return;
    }
    auto p = read_boot_profile(*txn, s.image_ref_);
    if (!p) {
      e.error = p.error().message;
      log(e);
      return;
    }
    profile = std::move(*p);
  }
  // No profile yet (this is the first boot), or one of another top layer: nothing to do.
  if (!profile || profile->top_layer != s.chain_[0].id) return;
  e.profile_ranges = profile->range_count();
  e.profile_bytes = profile->bytes();
  e.boots = profile->boots;
  struct Piece {
    LayerFile* file;
    uint64_t offset, length;
  };
  std::vector<Piece> pieces;
  const uint64_t piece_bytes = std::max<uint64_t>(options_.piece_bytes, 4096);
  for (size_t i = 0; i < s.chain_.size(); ++i) {
    auto it = profile->layers.find(s.chain_[i].id);
    if (it == profile->layers.end() || !s.files_[i]) continue;
    for (const auto& r : it->second)
      for (uint64_t off = r.offset; off < r.offset + r.length; off += piece_bytes)
        pieces.push_back(
            {s.files_[i].get(), off, std::min(piece_bytes, r.offset + r.length - off)});
  }
  std::deque<Piece> inflight;
  uint64_t inflight_bytes = 0;
  // Waits until the piece's last byte is in the page cache (readahead reads a piece in order).
  auto settle = [&] {
    const Piece& q = inflight.front();
    uint8_t byte = 0;
    (void)q.file->read(&byte, 1, q.offset + q.length - 1);
    inflight_bytes -= q.length;
    inflight.pop_front();
  };
  auto stopping = [&] {
    return s.closed() || stop_->stop_requested() || std::chrono::steady_clock::now() >= s.deadline_;
  };
  for (const Piece& p : pieces) {
    if (stopping()) {
      e.complete = false;
      break;
    }
    while (!inflight.empty() && inflight_bytes + p.length > options_.max_inflight_bytes) settle();
    p.file->prefetch(p.offset, p.length);
    inflight.push_back(p);
    inflight_bytes += p.length;
    e.bytes += p.length;
    ++e.ranges;
  }
  while (!inflight.empty() && e.complete && !stopping()) settle();
  e.elapsed_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                           std::chrono::steady_clock::now() - started)
                                           .count());
  log(e);
}

void BootService::persist(BootSession& s) {
  BootLayerRanges boot = s.finish();
  s.files_.clear();  // this thread's: no prefetch of s runs now
  if (boot.empty() || s.chain_.empty()) return;
  BootEvent e;
  e.kind = BootEvent::Kind::kProfile;
  e.container = s.container_;
  e.image_ref = s.image_ref_;
  for (const auto& [id, r] : boot) {
    e.ranges += r.size();
    e.bytes += ranges_bytes(r);
  }
  if (e.bytes > options_.max_boot_bytes) {
    e.discarded = fmt::format("the window read {} bytes, more than a boot's {}: not kept", e.bytes,
                              options_.max_boot_bytes);
    log(e);
    return;
  }
  auto saved = save_boot(pool_, s.image_ref_, s.chain_[0].id, boot);
  if (!saved) {
    e.error = saved.error().message;
  } else if (!*saved) {
    return;  // not a clone of the image (any more): nothing kept
  } else {
    e.profile_ranges = (*saved)->range_count();
    e.profile_bytes = (*saved)->bytes();
    e.boots = (*saved)->boots;
  }
  log(e);
}

}  // namespace layer
