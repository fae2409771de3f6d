// stats_test.cc — lib/stats.h: latency buckets and quantiles, the minute rows' encoding, the
// counters under concurrent threads, persist/prune/drop against a real index, the writer with
// an injected clock (retention), an index made before the `stats` db, and the metrics socket.
#include "stats.h"

#include <lmdb.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "test_util.h"

using namespace layer;

namespace {

uint64_t ops_in(Pool& pool, uint64_t id, IoOp op, uint64_t from_minute = 0) {
  auto txn = MUST(pool.index().begin_read());
  uint64_t n = 0;
  for (const auto& row : MUST(read_stats(txn, id, from_minute))) n += row.record[op].ops;
  return n;
}

std::vector<uint64_t> minutes_of(Pool& pool, uint64_t id) {
  auto txn = MUST(pool.index().begin_read());
  std::vector<uint64_t> out;
  for (const auto& row : MUST(read_stats(txn, id, 0))) out.push_back(row.minute);
  return out;
}

uint64_t container_id(Pool& pool, const std::string& name) {
  auto txn = MUST(pool.index().begin_read());
  return MUST(pool.get_container(txn, name)).id;
}

// Polls `cond` every 10 ms for up to 30 s (no timing assertion: only a bound on a hang).
template <typename F>
bool eventually(F cond) {
  for (int i = 0; i < 3000; ++i) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

}  // namespace

TEST_CASE("latency buckets: 4 per power of two from 1 us, bounds continuous") {
  CHECK(latency_bucket(0) == 0);
  CHECK(latency_bucket(1023) == 0);
  CHECK(latency_bucket(1024) == 1);
  CHECK(latency_bucket(1279) == 1);
  CHECK(latency_bucket(1280) == 2);
  CHECK(latency_bucket(2047) == 4);
  CHECK(latency_bucket(2048) == 5);
  CHECK(latency_bucket(UINT64_MAX) == kLatencyBuckets - 1);
  for (int b = 1; b < kLatencyBuckets; ++b) {
    INFO("bucket " << b);
    REQUIRE(bucket_lower_ns(b) > bucket_lower_ns(b - 1));
    CHECK(latency_bucket(bucket_lower_ns(b)) == b);
    CHECK(latency_bucket(bucket_lower_ns(b) - 1) == b - 1);
  }
  // Each bucket spans at most a quarter of its lower bound (after the first).
  for (int b = 2; b < kLatencyBuckets - 1; ++b)
    CHECK(bucket_lower_ns(b + 1) - bucket_lower_ns(b) <= bucket_lower_ns(b) / 4);
}

TEST_CASE("quantiles: the upper bound of the bucket that reaches the rank") {
  std::array<uint64_t, kLatencyBuckets> h{};
  CHECK(latency_quantile_ns(h, 0.5) == 0);
  // 98 requests of 10 us, 2 of 5 ms.
  h[latency_bucket(10'000)] = 98;
  h[latency_bucket(5'000'000)] = 2;
  const uint64_t p50 = latency_quantile_ns(h, 0.5);
  CHECK(p50 > 10'000);
  CHECK(p50 <= 10'000 * 5 / 4);
  CHECK(latency_quantile_ns(h, 0.98) == p50);
  const uint64_t p99 = latency_quantile_ns(h, 0.99);
  CHECK(p99 > 5'000'000);
  CHECK(p99 <= 5'000'000 * 5 / 4);
  CHECK(latency_quantile_ns(h, 1.0) == p99);
  // One request: every quantile is its bucket.
  std::array<uint64_t, kLatencyBuckets> one{};
  one[latency_bucket(700)] = 1;
  CHECK(latency_quantile_ns(one, 0.01) == 1024);
  CHECK(latency_quantile_ns(one, 0.99) == 1024);
}

TEST_CASE("a minute row round-trips, sparsely, and refuses damage") {
  StatsRecord r;
  r[IoOp::kRead] = {7, 7 * 4096, 70'000, {}};
  r[IoOp::kRead].latency[latency_bucket(10'000)] = 7;
  r[IoOp::kFlush].ops = 2;
  r[IoOp::kFlush].latency[kLatencyBuckets - 1] = 2;
  const std::string bytes = encode(r);
  CHECK(bytes.size() < 200);  // 5 kinds x 25 bytes + 2 buckets, not 5 x 128 buckets
  CHECK(MUST(decode_stats(bytes, "row")) == r);
  StatsRecord empty;
  CHECK(MUST(decode_stats(encode(empty), "row")) == empty);
  CHECK(empty.empty());
  CHECK_FALSE(r.empty());
  CHECK_ERRNO(decode_stats(bytes.substr(0, bytes.size() - 1), "row"), EIO);
  CHECK_ERRNO(decode_stats(bytes + "x", "row"), EIO);
  StatsRecord twice = r;
  twice.add(r);
  CHECK(twice[IoOp::kRead].ops == 14);
  CHECK(twice[IoOp::kRead].latency[latency_bucket(10'000)] == 14);
}

TEST_CASE("counters add up over threads, and deltas are taken once", "[concurrent]") {
  StatsTable table;
  auto a = table.acquire(1, "a");
  CHECK(table.acquire(1, "a") == a);  // every connection of a container shares one
  constexpr int kThreads = 4, kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto mine = table.acquire(1, "a");
      for (int i = 0; i < kPerThread; ++i) {
        mine->record(t % 2 ? IoOp::kWrite : IoOp::kRead, 4096, 5000);
        // The writer takes deltas meanwhile.
        if (t == 0 && i % 5000 == 0) (void)table.take_deltas();
      }
    });
  for (auto& t : threads) t.join();
  const auto totals = table.totals();
  REQUIRE(totals.size() == 1);
  CHECK(totals[0].name == "a");
  CHECK(totals[0].totals[IoOp::kRead].ops == kThreads / 2 * kPerThread);
  CHECK(totals[0].totals[IoOp::kWrite].bytes == uint64_t{kThreads / 2} * kPerThread * 4096);
  CHECK(totals[0].totals[IoOp::kRead].latency[latency_bucket(5000)] == kThreads / 2 * kPerThread);
  // Whatever was taken before, the rest comes now; then nothing.
  (void)table.take_deltas();
  a->record(IoOp::kTrim, 65536, 2000);
  auto d = table.take_deltas();
  REQUIRE(d.size() == 1);
  CHECK(d[0].totals[IoOp::kTrim].ops == 1);
  CHECK(d[0].totals[IoOp::kRead].ops == 0);
  CHECK(table.take_deltas().empty());
  table.give_back(d);  // a failed write: the next take has it again
  d = table.take_deltas();
  REQUIRE(d.size() == 1);
  CHECK(d[0].totals[IoOp::kTrim].bytes == 65536);
}

TEST_CASE("counters nothing holds go once idle; those that never counted at once") {
  StatsTable table(std::chrono::milliseconds(0));
  auto held = table.acquire(1, "held");
  table.acquire(2, "info-only");  // opened and closed without a request
  {
    auto c = table.acquire(3, "closed");
    c->record(IoOp::kRead, 4096, 2000);
  }
  auto d = table.take_deltas();
  REQUIRE(d.size() == 1);  // the closed one's last counts are taken before it goes
  CHECK(d[0].name == "closed");
  auto names = [&] {
    std::vector<std::string> out;
    for (const auto& e : table.totals()) out.push_back(e.name);
    return out;
  };
  CHECK(names() == std::vector<std::string>{"closed", "held"});
  CHECK(table.take_deltas().empty());
  CHECK(names() == std::vector<std::string>{"held"});
  // Kept for the default 10 minutes after the last request: still there.
  StatsTable keeping;
  keeping.acquire(3, "closed")->record(IoOp::kRead, 4096, 2000);
  CHECK(keeping.take_deltas().size() == 1);
  CHECK(keeping.take_deltas().empty());
  CHECK(keeping.totals().size() == 1);
}

TEST_CASE("persist adds to the minute's row; prune drops old rows and orphans; rm drops history") {
  test::PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 1);
  MUST(f.pool->clone("base:1", "a", std::nullopt));
  MUST(f.pool->clone("base:1", "b", std::nullopt));
  const uint64_t a = container_id(*f.pool, "a"), b = container_id(*f.pool, "b");
  StatsTable table;
  auto ca = table.acquire(a, "a");
  auto cb = table.acquire(b, "b");
  const uint64_t m0 = 29'000'000;  // a unix minute (2025)
  for (int i = 0; i < 3; ++i) ca->record(IoOp::kRead, 4096, 3000);
  ca->record(IoOp::kWrite, 8192, 9000);
  MUST(persist_stats(*f.pool, table, m0));
  // The same minute again (a second interval, or a restarted server): added, not replaced.
  ca->record(IoOp::kRead, 512, 3000);
  cb->record(IoOp::kFlush, 0, 100'000);
  MUST(persist_stats(*f.pool, table, m0));
  ca->record(IoOp::kZero, 1 << 20, 4000);
  MUST(persist_stats(*f.pool, table, m0 + 1));
  MUST(persist_stats(*f.pool, table, m0 + 2));  // nothing new: no row
  {
    auto txn = MUST(f.pool->index().begin_read());
    const auto rows = MUST(read_stats(txn, a, 0));
    REQUIRE(rows.size() == 2);
    CHECK(rows[0].minute == m0);
    CHECK(rows[0].record[IoOp::kRead].ops == 4);
    CHECK(rows[0].record[IoOp::kRead].bytes == 3 * 4096 + 512);
    CHECK(rows[0].record[IoOp::kWrite].ops == 1);
    CHECK(rows[0].record[IoOp::kWrite].bytes == 8192);
    CHECK(rows[0].record[IoOp::kRead].latency[latency_bucket(3000)] == 4);
    CHECK(rows[1].minute == m0 + 1);
    CHECK(rows[1].record[IoOp::kZero].bytes == 1 << 20);
    CHECK(MUST(read_stats(txn, a, m0 + 1)).size() == 1);
  }
  CHECK(ops_in(*f.pool, b, IoOp::kFlush) == 1);

  // Prune before m0 + 1: a's first row goes, b's only row too.
  CHECK(MUST(prune_stats(*f.pool, m0 + 1)) == 2);
  CHECK(minutes_of(*f.pool, a) == std::vector<uint64_t>{m0 + 1});
  CHECK(minutes_of(*f.pool, b).empty());
  CHECK(MUST(prune_stats(*f.pool, m0 + 1)) == 0);

  // rm: the history goes with the container, and no later write brings it back.
  ca->record(IoOp::kRead, 4096, 3000);
  MUST(f.pool->remove_container("a"));
  CHECK(minutes_of(*f.pool, a).empty());
  MUST(persist_stats(*f.pool, table, m0 + 3));
  CHECK(minutes_of(*f.pool, a).empty());
  // A clone under the old name starts empty (a new id).
  MUST(f.pool->clone("base:1", "a", std::nullopt));
  const uint64_t a2 = container_id(*f.pool, "a");
  CHECK(a2 != a);
  CHECK(minutes_of(*f.pool, a2).empty());

  // Orphan rows (an rm interrupted before its history went) are pruned whatever their age.
  MUST(f.pool->committer().run([&](WriteTxn& txn) {
    return txn.put(Db::kStats, key_u64_u32(a, static_cast<uint32_t>(m0 + 100)),
                   encode(StatsRecord{}));
  }));
  CHECK(MUST(prune_stats(*f.pool, 0)) == 1);
  CHECK(minutes_of(*f.pool, a).empty());
}

TEST_CASE("the writer writes the current minute when nudged and prunes past the retention") {
  test::PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 1);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  const uint64_t id = container_id(*f.pool, "c");
  StatsTable table;
  auto c = table.acquire(id, "c");
  const uint64_t start_ms = 1'750'000'020'000;  // 20 s into a minute
  ManualClock clock(start_ms);
  const uint64_t m0 = start_ms / 60000;
  StatsWriter::Options options;
  options.interval = std::chrono::hours(1);  // only nudges write
  options.retention = std::chrono::hours(24);
  options.clock = &clock;
  {
    auto writer = MUST(StatsWriter::start(*f.pool, table, options));
    for (int i = 0; i < 5; ++i) c->record(IoOp::kWrite, 4096, 20'000);
    writer->nudge();
    REQUIRE(eventually([&] { return ops_in(*f.pool, id, IoOp::kWrite) == 5; }));
    CHECK(minutes_of(*f.pool, id) == std::vector<uint64_t>{m0});
    // Two days later: m0 is past the 24 h kept, and the next interval's counts go to its
    // minute.
    clock.advance(std::chrono::hours(48));
    writer->nudge();  // the interval that began at m0 ends (nothing new in it); a new minute
    REQUIRE(eventually([&] { return minutes_of(*f.pool, id).empty(); }));
    c->record(IoOp::kRead, 4096, 20'000);
    writer->nudge();
    REQUIRE(eventually([&] { return ops_in(*f.pool, id, IoOp::kRead) == 1; }));
    CHECK(minutes_of(*f.pool, id) == std::vector<uint64_t>{m0 + 48 * 60});
    c->record(IoOp::kRead, 4096, 20'000);
  }
  // The destructor wrote what was left.
  CHECK(ops_in(*f.pool, id, IoOp::kRead) == 2);
}

TEST_CASE("an index made before the stats db opens; a writable open adds the db") {
  test::PoolFixture f;
  const std::string dir = f.pool->index().dir();
  f.pool.reset();
  {
    // Drop the db as if the index predated it.
    MDB_env* env = nullptr;
    REQUIRE(mdb_env_create(&env) == 0);
    mdb_env_set_maxdbs(env, 32);
    mdb_env_set_mapsize(env, 1ULL << 30);
    REQUIRE(mdb_env_open(env, dir.c_str(), MDB_NOTLS, 0644) == 0);
    MDB_txn* txn = nullptr;
    REQUIRE(mdb_txn_begin(env, nullptr, 0, &txn) == 0);
    MDB_dbi dbi;
    REQUIRE(mdb_dbi_open(txn, "stats", 0, &dbi) == 0);
    REQUIRE(mdb_drop(txn, dbi, 1) == 0);
    REQUIRE(mdb_txn_commit(txn) == 0);
    mdb_env_close(env);
  }
  {
    auto ro = MUST(Pool::open(f.root, {.read_only = true}));
    CHECK_FALSE(ro->index().has_db(Db::kStats));
    auto txn = MUST(ro->index().begin_read());
    CHECK(MUST(read_stats(txn, 1, 0)).empty());
    CHECK_FALSE(MUST(txn.get(Db::kStats, key_u64_u32(1, 1))).has_value());
  }
  CHECK(MUST(Index::open(dir, {.read_only = true})) != nullptr);
  f.reopen();
  CHECK(f.pool->index().has_db(Db::kStats));
  MUST(f.pool->committer().run(
      [](WriteTxn& txn) { return txn.put(Db::kStats, key_u64_u32(1, 1), encode(StatsRecord{})); }));
  auto walked = MUST(f.pool->index().walk());
  CHECK(walked.entries > 0);
}

TEST_CASE("the metrics socket answers every connection with the text, then closes") {
  test::TempDir tmp;
  const std::string path = tmp.sub("metrics.sock");
  StatsTable table;
  table.acquire(3, "web1")->record(IoOp::kRead, 4096, 1500);
  table.acquire(3, "web1")->record(IoOp::kRead, 4096, 1500);
  table.acquire(4, "db")->record(IoOp::kWrite, 512, 900);
  auto server =
      MUST(MetricsServer::start(path, [&] { return prometheus_counters(table.totals()); }));
  CHECK_ERRNO(MetricsServer::start(path, [] { return std::string(); }), EADDRINUSE);
  for (int round = 0; round < 2; ++round) {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size());
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    std::string text;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
    ::close(fd);
    CHECK(text.find("layer_read_ops_total{container=\"web1\"} 2\n") != std::string::npos);
    CHECK(text.find("layer_read_bytes_total{container=\"web1\"} 8192\n") != std::string::npos);
    CHECK(text.find("layer_write_ops_total{container=\"db\"} 1\n") != std::string::npos);
    CHECK(text.find("layer_read_ops_total{container=\"db\"} 0\n") != std::string::npos);
    CHECK(text.find("# TYPE layer_request_duration_seconds histogram\n") != std::string::npos);
    CHECK(text.find("layer_request_duration_seconds_bucket{container=\"web1\",op=\"read\","
                    "le=\"2.048e-06\"} 2\n") != std::string::npos);
    CHECK(text.find("layer_request_duration_seconds_count{container=\"db\",op=\"write\"} 1\n") !=
          std::string::npos);
  }
  server.reset();
  CHECK(::access(path.c_str(), F_OK) != 0);  // removed
}
