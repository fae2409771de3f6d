// stats.h — per-container I/O history (issue 14 item 3; docs/stats.md): what a server's exports
// serve, counted on the I/O path, written per container per minute into the `stats` db off it,
// pruned after a retention, and shown as Prometheus text.
//
// Counting: every export of a container in one server (its connections, its snapshots'
// exports) shares one IoCounters, taken from the server's StatsTable. A request adds to it once
// it is done: its op count, bytes, latency sum and one latency bucket — four relaxed atomic
// adds into one of kShards copies picked per thread, so that the threads of several connections
// rarely share a cache line. No lock, no allocation, no system call beyond the two vDSO clock
// reads that time the request. The counters only grow (cumulative since the server started:
// what the metrics socket shows); the writer takes differences.
//
// Writing: persist_stats adds what each container's counters gained since its last call to the
// row of the minute the interval began in (read, add, put: a row survives a server restart
// within its minute), in one transaction on the committer, none when nothing was counted. The
// StatsWriter calls it every `interval` and at each minute's start (so an interval never spans
// two minutes), when nudged (a connection closed) and when it stops. A container removed
// meanwhile (its row gone or holding another id) gets no rows: `layer rm` deletes its history
// after removing the row, so no history outlives its container.
//
// Thread-safety: IoCounters, StatsTable and StatsWriter are safe for concurrent use.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "error.h"
#include "index.h"
#include "qos.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

class Pool;

// Latency buckets (kLatencyBuckets, records.h): bucket 0 holds latencies under 1024 ns; from
// there each power of two is split in 4 (1024..1279 ns is bucket 1, 1280..1535 bucket 2, ...),
// so a bucket spans at most a quarter of its lower bound; the last bucket holds everything from
// 6 << 39 ns (55 minutes) on.
int latency_bucket(uint64_t ns);
// The smallest latency of bucket b (0 <= b < kLatencyBuckets).
uint64_t bucket_lower_ns(int b);
// The q-quantile (0 < q <= 1) of a histogram: the upper bound of the bucket where the running
// count reaches q of the total (an over-estimate by less than one bucket). 0 when it is empty.
uint64_t latency_quantile_ns(const std::array<uint64_t, kLatencyBuckets>& h, double q);

// One container's counters in one server: cumulative since the server started.
class IoCounters {
 public:
  static constexpr int kShards = 4;
  // Counts one request of kind `op` that moved (or covered) `bytes` and took `latency_ns`.
  void record(IoOp op, uint64_t bytes, uint64_t latency_ns) noexcept {
    Shard& s = shards_[shard_index()];
    const int i = static_cast<int>(op);
    s.ops[i].fetch_add(1, std::memory_order_relaxed);
    s.bytes[i].fetch_add(bytes, std::memory_order_relaxed);
    s.latency_ns[i].fetch_add(latency_ns, std::memory_order_relaxed);
    s.buckets[i][latency_bucket(latency_ns)].fetch_add(1, std::memory_order_relaxed);
  }
  // The sums over the shards. Counts of requests recording meanwhile may be half in (the op
  // counted, its bucket not yet): the next read has them whole.
  StatsRecord totals() const;

 private:
  struct alignas(64) Shard {
    std::atomic<uint64_t> ops[kIoOps] = {}, bytes[kIoOps] = {}, latency_ns[kIoOps] = {};
    std::atomic<uint64_t> buckets[kIoOps][kLatencyBuckets] = {};
  };
  static int shard_index() noexcept;
  Shard shards_[kShards];
};

// A server's counters, one per container it serves (by container id). A container's counters
// stay while a connection holds them and for `keep_idle` after its last request, so that its
// metrics stay cumulative across reconnects; then they go (a later open starts again from 0: a
// counter reset to Prometheus). Counters that never counted go when no connection holds them
// (nbdinfo --list opens every export).
class StatsTable {
 public:
  static constexpr std::chrono::minutes kKeepIdle{10};
  explicit StatsTable(std::chrono::milliseconds keep_idle = kKeepIdle) : keep_idle_(keep_idle) {}
  // The counters of container `id` named `name`, made on first use.
  std::shared_ptr<IoCounters> acquire(uint64_t id, const std::string& name);
  struct Entry {
    uint64_t id = 0;
    std::string name;
    StatsRecord totals;
  };
  // Every container's cumulative totals, in name order (the metrics socket).
  std::vector<Entry> totals();
  // What each container's counters gained since the last call (containers with nothing new
  // left out); give_back() returns a failed write's deltas to the next call. Forgets the
  // counters that nothing holds and that are idle (see above).
  std::vector<Entry> take_deltas();
  void give_back(const std::vector<Entry>& deltas);
  // Forgets container `id` (removed): its counters are no longer shown or written.
  void forget(uint64_t id);

 private:
  struct Item {
    std::string name;
    std::shared_ptr<IoCounters> counters;
    StatsRecord taken;  // the totals as of the last take_deltas, minus what was given back
    std::chrono::steady_clock::time_point active;  // when last held or seen counting
  };
  const std::chrono::milliseconds keep_idle_;
  std::mutex mu_;
  std::map<uint64_t, Item> items_;  // GUARDED_BY(mu_)
};

// Adds each delta to its container's row of `minute` (unix minutes) in one transaction, when
// the container (by name) still exists with that id; deltas of removed containers are dropped
// and forgotten. On a failed transaction the deltas go back to the table. Errors: those of the
// transaction, EACCES (a read-only pool).
Status persist_stats(Pool& pool, StatsTable& table, uint64_t minute);

// Deletes the rows of minutes before `before_minute`, and every row of a container id no
// container has (history left by an interrupted `layer rm`), at most `limit` rows in one
// transaction. Returns how many went. Errors: those of the transaction.
Result<uint64_t> prune_stats(Pool& pool, uint64_t before_minute, uint64_t limit = kMaxRowsPerTxn);

// Deletes every row of container `id`, in transactions of at most kMaxRowsPerTxn rows.
Status drop_stats(Pool& pool, uint64_t container_id);

// One container's rows from minute `from` on (unix minutes), in minute order.
struct StatsMinute {
  uint64_t minute = 0;
  StatsRecord record;
};
Result<std::vector<StatsMinute>> read_stats(ReadTxn& txn, uint64_t container_id,
                                            uint64_t from_minute);

// Prometheus text exposition format (version 0.0.4) of cumulative counters per container:
// layer_<op>_ops_total, layer_<op>_bytes_total (read, write, trim, zero; flush has no bytes)
// and the histogram layer_request_duration_seconds{op=...} (a bucket per power of two).
std::string prometheus_counters(const std::vector<StatsTable::Entry>& entries);

// A server's stats writer: a thread calling persist_stats every `interval`, at each minute's
// start and when nudged, and prune_stats once a minute; the destructor persists once more and
// joins it.
// REQUIRES: the Pool and the StatsTable outlive it.
class StatsWriter {
 public:
  struct Options {
    std::chrono::milliseconds interval{10000};
    std::chrono::seconds retention{7 * 24 * 3600};
    Clock* clock = nullptr;  // the wall clock's minutes; null: real_clock()
    // Called on the writer's thread when a write or a prune fails.
    std::function<void(const std::string& line)> log_error;
    // Called on the writer's thread once a minute, after that minute's first write (the
    // server's auto limits, forecast.h); given the clock's unix seconds.
    std::function<void(uint64_t now)> each_minute;
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<StatsWriter>> start(Pool& pool, StatsTable& table, Options options);
  ~StatsWriter();
  StatsWriter(const StatsWriter&) = delete;
  StatsWriter& operator=(const StatsWriter&) = delete;
  // Asks for a write soon (a connection closed); returns at once.
  void nudge();

 private:
  StatsWriter(Pool& pool, StatsTable& table, Options options);
  void run();
  // Persists what was counted since the last tick into the minute the interval began in.
  void tick();

  Pool& pool_;
  StatsTable& table_;
  const Options options_;
  Clock& clock_;
  uint64_t interval_start_ms_ = 0;  // writer thread only
  uint64_t pruned_minute_ = 0;      // writer thread only
  uint64_t hooked_minute_ = 0;      // writer thread only: each_minute's last minute
  std::atomic<bool> nudged_{false};
  StopSignal stop_;
  std::thread thread_;
};

// A unix socket that answers every connection with `text()` and closes it (plugin metrics=PATH).
// Thread-safety: text() runs on the server's one thread.
class MetricsServer {
 public:
  // Binds `path` (mode 0600; a stale socket there nobody accepts on is replaced), listens and
  // starts the thread. Errors: ENAMETOOLONG, EADDRINUSE (someone accepts there), EEXIST (not a
  // socket), the errno of socket/bind/listen, EAGAIN (no thread).
  static Result<std::unique_ptr<MetricsServer>> start(const std::string& path,
                                                      std::function<std::string()> text);
  ~MetricsServer();  // stops, joins, removes the socket file
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

 private:
  MetricsServer() = default;
  void run();
  std::string path_;
  std::function<std::string()> text_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::thread thread_;
};

}  // namespace layer
