// stats.cc — I/O counters, the `stats` db's minute rows, the writer thread and the metrics socket.
#include "stats.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <set>
#include <system_error>

#include "pool.h"

namespace layer {
namespace {

constexpr uint64_t kMsPerMinute = 60'000;
// The writer wakes this long after a minute starts, so that its interval never begins before
// the minute it is counted in (the wall clock and the sleep's clock drift apart by a little).
constexpr uint64_t kMinuteSlackMs = 100;

std::atomic<unsigned> g_next_shard{0};
thread_local int t_shard = -1;

// a - b, field by field. REQUIRES: every field of a >= b's (counters only grow).
StatsRecord difference(const StatsRecord& a, const StatsRecord& b) {
  StatsRecord d;
  for (int i = 0; i < kIoOps; ++i) {
    d.op[i].ops = a.op[i].ops - b.op[i].ops;
    d.op[i].bytes = a.op[i].bytes - b.op[i].bytes;
    d.op[i].latency_ns_sum = a.op[i].latency_ns_sum - b.op[i].latency_ns_sum;
    for (int k = 0; k < kLatencyBuckets; ++k)
      d.op[i].latency[k] = a.op[i].latency[k] - b.op[i].latency[k];
  }
  return d;
}

bool all_zero(const StatsRecord& r) {
  for (const auto& s : r.op) {
    if (s.ops != 0 || s.bytes != 0 || s.latency_ns_sum != 0) return false;
    if (std::any_of(s.latency.begin(), s.latency.end(), [](uint64_t n) { return n != 0; }))
      return false;
  }
  return true;
}

std::string row_name(uint64_t id, uint64_t minute) {
  return fmt::format("stats row of container {} minute {}", id, minute);
}

// Closes an fd on every path.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

// ---- latency buckets ----

int latency_bucket(uint64_t ns) {
  if (ns < 1024) return 0;
  const int e = 63 - std::countl_zero(ns);  // >= 10
  const int b = 1 + (e - 10) * 4 + static_cast<int>((ns >> (e - 2)) & 3);
  return std::min(b, kLatencyBuckets - 1);
}

uint64_t bucket_lower_ns(int b) {
  if (b <= 0) return 0;
  const int e = 10 + (b - 1) / 4;
  return static_cast<uint64_t>(4 + (b - 1) % 4) << (e - 2);
}

uint64_t latency_quantile_ns(const std::array<uint64_t, kLatencyBuckets>& h, double q) {
  uint64_t total = 0;
  for (uint64_t n : h) total += n;
  if (total == 0) return 0;
  // The rank of the quantile, 1-based: the smallest count that covers q of the total.
  const double want = std::max(1.0, q * static_cast<double>(total));
  uint64_t seen = 0;
  for (int b = 0; b < kLatencyBuckets; ++b) {
    seen += h[b];
    if (static_cast<double>(seen) >= want)
      return b == kLatencyBuckets - 1 ? bucket_lower_ns(b) : bucket_lower_ns(b + 1);
  }
  return bucket_lower_ns(kLatencyBuckets - 1);
}

// ---- counters ----

int IoCounters::shard_index() noexcept {
  if (t_shard < 0) t_shard = static_cast<int>(g_next_shard.fetch_add(1) % kShards);
  return t_shard;
}

StatsRecord IoCounters::totals() const {
  StatsRecord r;
  for (const Shard& s : shards_) {
    for (int i = 0; i < kIoOps; ++i) {
      r.op[i].ops += s.ops[i].load(std::memory_order_relaxed);
      r.op[i].bytes += s.bytes[i].load(std::memory_order_relaxed);
      r.op[i].latency_ns_sum += s.latency_ns[i].load(std::memory_order_relaxed);
      for (int b = 0; b < kLatencyBuckets; ++b)
        r.op[i].latency[b] += s.buckets[i][b].load(std::memory_order_relaxed);
    }
  }
  return r;
}

std::shared_ptr<IoCounters> StatsTable::acquire(uint64_t id, const std::string& name) {
  std::lock_guard<std::mutex> lk(mu_);
  Item& item = items_[id];
  if (!item.counters) {
    item.name = name;
    item.counters = std::make_shared<IoCounters>();
    item.active = std::chrono::steady_clock::now();
  }
  return item.counters;
}

std::vector<StatsTable::Entry> StatsTable::totals() {
  std::vector<Entry> out;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [id, item] : items_) out.push_back({id, item.name, item.counters->totals()});
  }
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

std::vector<StatsTable::Entry> StatsTable::take_deltas() {
  std::vector<Entry> out;
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = items_.begin(); it != items_.end();) {
    Item& item = it->second;
    // Only the table holds it: no connection can count into it (acquire() hands it out under
    // mu_), so once its last counts are taken nothing is pending.
    const bool held = item.counters.use_count() > 1;
    const StatsRecord totals = item.counters->totals();
    StatsRecord delta = difference(totals, item.taken);
    if (held || !all_zero(delta)) item.active = now;
    if (!all_zero(delta)) {
      item.taken = totals;
      out.push_back({it->first, item.name, std::move(delta)});
    } else if (!held && (all_zero(totals) || now - item.active >= keep_idle_)) {
      it = items_.erase(it);
      continue;
    }
    ++it;
  }
  return out;
}

void StatsTable::give_back(const std::vector<Entry>& deltas) {
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& d : deltas) {
    auto it = items_.find(d.id);
    if (it != items_.end()) it->second.taken = difference(it->second.taken, d.totals);
  }
}

void StatsTable::forget(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  items_.erase(id);
}

// ---- the `stats` db ----

Status persist_stats(Pool& pool, StatsTable& table, uint64_t minute) {
  LAYER_TRY(pool.check_writable());
  auto deltas = table.take_deltas();
  if (deltas.empty()) return {};
  std::vector<uint64_t> gone;
  auto s = pool.committer().run([&](WriteTxn& txn) -> Status {
    gone.clear();
    for (const auto& d : deltas) {
      auto c = pool.get_container(txn, d.name);
      if (!c && c.error().code != ENOENT) return std::move(c).error();
      if (!c || c->id != d.id) {
        gone.push_back(d.id);  // removed: its history went with it
        continue;
      }
      const std::string key = key_u64_u32(d.id, static_cast<uint32_t>(minute));
      StatsRecord row;
      LAYER_ASSIGN(auto old, txn.get(Db::kStats, key));
      if (old) {
        LAYER_ASSIGN(row, decode_stats(*old, row_name(d.id, minute)));
      }
      row.add(d.totals);
      LAYER_TRY(txn.put(Db::kStats, key, encode(row)));
    }
    return Status{};
  });
  if (!s.ok()) {
    table.give_back(deltas);
    return s;
  }
  for (uint64_t id : gone) table.forget(id);
  return {};
}

Result<uint64_t> prune_stats(Pool& pool, uint64_t before_minute, uint64_t limit) {
  LAYER_TRY(pool.check_writable());
  uint64_t deleted = 0;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    deleted = 0;
    std::set<uint64_t> live;
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto c, decode_container(v, k));
          live.insert(c.id);
          return true;
        }));
    std::vector<std::string> doomed;
    std::string from = key_u64(0);
    while (doomed.size() < limit) {
      LAYER_ASSIGN(auto next, txn.next_key(Db::kStats, from));
      if (!next) break;
      const auto parsed = decode_key_u64_u32(*next);
      if (!parsed) return make_error(EIO, "index: stats: a key of {} bytes", next->size());
      const uint64_t id = parsed->first;
      const bool alive = live.count(id) != 0;
      LAYER_TRY(txn.scan(Db::kStats, key_u64(id),
                         [&](std::string_view k, std::string_view) -> Result<bool> {
                           const auto key = decode_key_u64_u32(k);
                           if (alive && key && key->second >= before_minute) return false;
                           doomed.emplace_back(k);
                           return doomed.size() < limit;
                         }));
      if (id == UINT64_MAX) break;
      from = key_u64(id + 1);
    }
    for (const auto& k : doomed) LAYER_TRY(txn.del(Db::kStats, k));
    deleted = doomed.size();
    return Status{};
  }));
  return deleted;
}

Status drop_stats(Pool& pool, uint64_t container_id) {
  for (;;) {
    uint64_t n = 0;
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      LAYER_ASSIGN(n, txn.del_prefix(Db::kStats, key_u64(container_id), kMaxRowsPerTxn));
      return Status{};
    }));
    if (n < kMaxRowsPerTxn) return {};
  }
}

Result<std::vector<StatsMinute>> read_stats(ReadTxn& txn, uint64_t container_id,
                                            uint64_t from_minute) {
  std::vector<StatsMinute> out;
  const uint32_t from = static_cast<uint32_t>(std::min<uint64_t>(from_minute, UINT32_MAX));
  LAYER_TRY(txn.scan_from(Db::kStats, key_u64(container_id), key_u64_u32(container_id, from),
                          [&](std::string_view k, std::string_view v) -> Result<bool> {
                            const auto key = decode_key_u64_u32(k);
                            if (!key) return make_error(EIO, "index: stats: a bad key");
                            LAYER_ASSIGN(auto r,
                                         decode_stats(v, row_name(container_id, key->second)));
                            out.push_back({key->second, std::move(r)});
                            return true;
                          }));
  return out;
}

// ---- Prometheus text ----

namespace {

// A label value: backslash, double quote and newline escaped.
std::string label(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

std::string prometheus_counters(const std::vector<StatsTable::Entry>& entries) {
  std::string out;
  for (int i = 0; i < kIoOps; ++i) {
    const char* op = to_string(static_cast<IoOp>(i));
    out += fmt::format("# HELP layer_{0}_ops_total {0} requests served.\n", op);
    out += fmt::format("# TYPE layer_{}_ops_total counter\n", op);
    for (const auto& e : entries)
      out += fmt::format("layer_{}_ops_total{{container=\"{}\"}} {}\n", op, label(e.name),
                         e.totals.op[i].ops);
    if (static_cast<IoOp>(i) == IoOp::kFlush) continue;
    out += fmt::format("# HELP layer_{0}_bytes_total Bytes of {0} requests.\n", op);
    out += fmt::format("# TYPE layer_{}_bytes_total counter\n", op);
    for (const auto& e : entries)
      out += fmt::format("layer_{}_bytes_total{{container=\"{}\"}} {}\n", op, label(e.name),
                         e.totals.op[i].bytes);
  }
  out +=
      "# HELP layer_request_duration_seconds Time from a request's arrival in the plugin to "
      "its answer.\n";
  out += "# TYPE layer_request_duration_seconds histogram\n";
  for (const auto& e : entries) {
    for (int i = 0; i < kIoOps; ++i) {
      const IoOpStats& s = e.totals.op[i];
      if (s.ops == 0) continue;
      const std::string labels =
          fmt::format("container=\"{}\",op=\"{}\"", label(e.name), to_string(static_cast<IoOp>(i)));
      int last = 0;
      for (int b = 0; b < kLatencyBuckets; ++b)
        if (s.latency[b] != 0) last = b;
      // Buckets at each power of two (every 4th of ours), up to the one past the last used.
      uint64_t below = 0;
      for (int b = 0; b < kLatencyBuckets; ++b) {
        below += s.latency[b];
        const int next = b + 1;
        if ((next - 1) % 4 != 0 || next >= kLatencyBuckets) continue;
        out += fmt::format("layer_request_duration_seconds_bucket{{{},le=\"{:g}\"}} {}\n", labels,
                           static_cast<double>(bucket_lower_ns(next)) / 1e9, below);
        if (next > last) break;
      }
      uint64_t count = 0;
      for (uint64_t n : s.latency) count += n;
      out += fmt::format("layer_request_duration_seconds_bucket{{{},le=\"+Inf\"}} {}\n", labels,
                         count);
      out += fmt::format("layer_request_duration_seconds_sum{{{}}} {:g}\n", labels,
                         static_cast<double>(s.latency_ns_sum) / 1e9);
      out += fmt::format("layer_request_duration_seconds_count{{{}}} {}\n", labels, count);
    }
  }
  return out;
}

// ---- the writer ----

StatsWriter::StatsWriter(Pool& pool, StatsTable& table, Options options)
    : pool_(pool),
      table_(table),
      options_(std::move(options)),
      clock_(options_.clock ? *options_.clock : real_clock()) {}

Result<std::unique_ptr<StatsWriter>> StatsWriter::start(Pool& pool, StatsTable& table,
                                                        Options options) {
  std::unique_ptr<StatsWriter> w(new StatsWriter(pool, table, std::move(options)));
  w->interval_start_ms_ = w->clock_.unix_ms();
  try {
    w->thread_ = std::thread([raw = w.get()] { raw->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value(), "cannot start the stats writer thread: {}", e.what());
  }
  return w;
}

StatsWriter::~StatsWriter() {
  stop_.request_stop();
  if (thread_.joinable()) thread_.join();
}

void StatsWriter::nudge() {
  nudged_.store(true);
  stop_.wake();
}

void StatsWriter::tick() {
  const uint64_t now_ms = clock_.unix_ms();
  auto s = persist_stats(pool_, table_, interval_start_ms_ / kMsPerMinute);
  if (!s.ok() && options_.log_error)
    options_.log_error(fmt::format("stats: not written: {}", s.error().message));
  interval_start_ms_ = now_ms;
  const uint64_t minute = now_ms / kMsPerMinute;
  if (options_.each_minute && minute != hooked_minute_) {
    hooked_minute_ = minute;
    options_.each_minute(now_ms / 1000);
  }
  if (minute == pruned_minute_) return;
  const uint64_t keep = static_cast<uint64_t>(options_.retention.count()) / 60;
  auto pruned = prune_stats(pool_, minute > keep ? minute - keep : 0);
  if (!pruned.ok()) {
    if (options_.log_error)
      options_.log_error(fmt::format("stats: not pruned: {}", pruned.error().message));
    return;
  }
  // A full prune leaves more: the next tick goes on.
  if (*pruned < kMaxRowsPerTxn) pruned_minute_ = minute;
}

void StatsWriter::run() {
  for (;;) {
    const uint64_t now_ms = clock_.unix_ms();
    const uint64_t next_minute_ms = (now_ms / kMsPerMinute + 1) * kMsPerMinute + kMinuteSlackMs;
    const auto wait = std::min<std::chrono::milliseconds>(
        options_.interval, std::chrono::milliseconds(next_minute_ms - now_ms));
    const bool go_on = stop_.wait_until(std::chrono::steady_clock::now() + wait,
                                        [this] { return nudged_.load(); });
    nudged_.store(false);
    tick();
    if (!go_on) return;  // stopping: that was the last write
  }
}

// ---- the metrics socket ----

Result<std::unique_ptr<MetricsServer>> MetricsServer::start(const std::string& path,
                                                            std::function<std::string()> text) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return make_error(EINVAL, "metrics socket path is empty");
  if (path.size() >= sizeof(addr.sun_path))
    return make_error(ENAMETOOLONG, "metrics socket path {} is longer than {} bytes", path,
                      sizeof(addr.sun_path) - 1);
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd listener{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  if (listener.fd < 0) return sys_error(errno, "metrics socket");
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return make_error(EEXIST, "metrics socket {}: a file that is not a socket is there", path);
    Fd probe{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    if (probe.fd >= 0 &&
        ::connect(probe.fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0)
      return make_error(EADDRINUSE, "metrics socket {}: another process accepts on it", path);
    ::unlink(path.c_str());  // stale: left by a server that died
  }
  if (::bind(listener.fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return sys_error(errno, "metrics socket {}: bind", path);
  if (::chmod(path.c_str(), 0600) != 0 || ::listen(listener.fd, 16) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return sys_error(e, "metrics socket {}", path);
  }
  std::unique_ptr<MetricsServer> m(new MetricsServer());
  m->path_ = path;
  m->text_ = std::move(text);
  m->wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (m->wake_fd_ < 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return sys_error(e, "metrics socket: eventfd");
  }
  m->listen_fd_ = std::exchange(listener.fd, -1);
  try {
    m->thread_ = std::thread([raw = m.get()] { raw->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value(), "cannot start the metrics thread: {}", e.what());
  }
  return m;
}

MetricsServer::~MetricsServer() {
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  }
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void MetricsServer::run() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    Fd conn{::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC)};
    if (conn.fd < 0) {
      // Out of file descriptors (or memory): the listener stays readable; do not spin on it.
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) ::poll(nullptr, 0, 100);
      continue;
    }
    // A client that never reads cannot hold the thread for long.
    const timeval timeout{2, 0};
    ::setsockopt(conn.fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    std::string text;
    try {
      text = text_();
    } catch (const std::exception& e) {
      text = fmt::format("# error: {}\n", e.what());
    }
    std::string_view rest = text;
    while (!rest.empty()) {
      const ssize_t n = ::send(conn.fd, rest.data(), rest.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      rest.remove_prefix(static_cast<size_t>(n));
    }
  }
}

}  // namespace layer
