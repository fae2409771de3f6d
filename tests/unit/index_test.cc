// Unit tests for lib/index.h: big-endian keys, Index open modes, typed transactions, scans,
// counters, snapshots, append, and the Committer (group commit with failing jobs).
#include "index.h"

#include <atomic>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "test_util.h"

using namespace layer;

namespace {

std::unique_ptr<Index> open_new(const test::TempDir& dir) {
  Index::Options opt;
  opt.create = true;
  return MUST(Index::open(dir.path(), opt));
}

std::optional<std::string> get_str(ReadTxn& txn, Db db, std::string_view key) {
  auto v = MUST(txn.get(db, key));
  if (!v) return std::nullopt;
  return std::string(*v);
}

std::optional<std::string> read_key(Index& index, Db db, std::string_view key) {
  ReadTxn txn = MUST(index.begin_read());
  return get_str(txn, db, key);
}

}  // namespace

TEST_CASE("key_u64 is big-endian so byte order is numeric order", "[index][keys]") {
  CHECK(key_u64(1).size() == 8);
  CHECK(key_u64(1) == std::string("\0\0\0\0\0\0\0\x01", 8));
  CHECK(key_u64(0x0102030405060708ULL) == std::string("\x01\x02\x03\x04\x05\x06\x07\x08", 8));
  CHECK(key_u64(1) < key_u64(256));
  CHECK(key_u64(255) < key_u64(256));
  CHECK(key_u64(256) < key_u64(1ULL << 32));
  CHECK(key_u64((1ULL << 56) - 1) < key_u64(1ULL << 56));
  CHECK(key_u64(0x7FFFFFFFFFFFFFFFULL) < key_u64(0x8000000000000000ULL));

  const uint64_t seed = test::test_seed("key ordering");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 10000; i++) {
    // Values of every magnitude (one rng() call per statement: a replayable order).
    auto any_u64 = [&] {
      const uint64_t v = rng();
      return v >> (rng() % 64);
    };
    const uint64_t a = any_u64();
    const uint64_t b = any_u64();
    INFO(a << " vs " << b);
    REQUIRE((a < b) == (key_u64(a) < key_u64(b)));
    REQUIRE(decode_key_u64(key_u64(a)) == a);
  }
}

TEST_CASE("key_u64_u32 orders by id, then by number", "[index][keys]") {
  CHECK(key_u64_u32(1, 0).size() == 12);
  CHECK(key_u64_u32(1, 2) == std::string("\0\0\0\0\0\0\0\x01\0\0\0\x02", 12));
  CHECK(key_u64_u32(1, 0xFFFFFFFF) < key_u64_u32(2, 0));
  CHECK(key_u64_u32(1, 1) < key_u64_u32(1, 256));
  CHECK(key_u64_u32(256, 0) > key_u64_u32(1, 0xFFFFFFFF));
  // A layer's rows all start with its key_u64: a prefix scan finds them.
  CHECK(key_u64_u32(7, 123).substr(0, 8) == key_u64(7));

  const uint64_t seed = test::test_seed("key_u64_u32 ordering");
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 10000; i++) {
    uint64_t a = rng() % 1000, b = rng() % 1000;
    const uint32_t x = static_cast<uint32_t>(rng() >> 32);
    const uint32_t shift_y = static_cast<uint32_t>(rng() % 32);
    const uint32_t y = static_cast<uint32_t>(rng() >> 32) >> shift_y;
    REQUIRE((std::pair(a, x) < std::pair(b, y)) == (key_u64_u32(a, x) < key_u64_u32(b, y)));
    auto back = decode_key_u64_u32(key_u64_u32(a, x));
    REQUIRE(back.has_value());
    REQUIRE(back->first == a);
    REQUIRE(back->second == x);
  }
}

TEST_CASE("key decoding rejects wrong lengths", "[index][keys]") {
  CHECK_FALSE(decode_key_u64("").has_value());
  CHECK_FALSE(decode_key_u64(std::string(7, 'a')).has_value());
  CHECK_FALSE(decode_key_u64(std::string(9, 'a')).has_value());
  CHECK_FALSE(decode_key_u64(key_u64_u32(1, 2)).has_value());
  CHECK_FALSE(decode_key_u64_u32("").has_value());
  CHECK_FALSE(decode_key_u64_u32(key_u64(5)).has_value());
  CHECK_FALSE(decode_key_u64_u32(std::string(11, 'a')).has_value());
  CHECK_FALSE(decode_key_u64_u32(std::string(13, 'a')).has_value());
  CHECK(decode_key_u64(std::string(8, '\xff')) == 0xFFFFFFFFFFFFFFFFULL);
}

TEST_CASE("db names are distinct", "[index]") {
  std::set<std::string> names;
  for (int i = 0; i < static_cast<int>(Db::kCount); i++) {
    const char* n = db_name(static_cast<Db>(i));
    REQUIRE(n != nullptr);
    names.insert(n);
  }
  CHECK(names.size() == static_cast<size_t>(Db::kCount));
  CHECK(std::string(db_name(Db::kMaps)) == "maps");
  CHECK(std::string(db_name(Db::kLayers)) == "layers");
}

TEST_CASE("Index::open of a directory without an index is ENOENT", "[index]") {
  test::TempDir dir;
  REQUIRE_ERRNO(Index::open(dir.path(), Index::Options{}), ENOENT);
  Index::Options ro;
  ro.read_only = true;
  REQUIRE_ERRNO(Index::open(dir.path(), ro), ENOENT);
  // Opening without create made nothing.
  CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("Index CRUD through WriteTxn", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  CHECK_FALSE(index->read_only());

  {
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kMeta, "a", "1"));
    REQUIRE_OK(txn.put(Db::kMeta, "b", std::string("two\0bytes", 9)));
    REQUIRE_OK(txn.put(Db::kImages, "a", "other db"));
    // A transaction sees its own writes.
    CHECK(get_str(txn, Db::kMeta, "a") == "1");
    REQUIRE_OK(txn.commit());
  }
  CHECK(read_key(*index, Db::kMeta, "a") == "1");
  CHECK(read_key(*index, Db::kMeta, "b") == std::string("two\0bytes", 9));
  CHECK(read_key(*index, Db::kImages, "a") == "other db");
  CHECK(read_key(*index, Db::kContainers, "a") == std::nullopt);
  CHECK(read_key(*index, Db::kMeta, "zzz") == std::nullopt);

  {
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kMeta, "a", "overwritten"));
    REQUIRE_OK(txn.del(Db::kMeta, "b"));
    REQUIRE_OK(txn.del(Db::kMeta, "never-there"));  // not an error
    REQUIRE_OK(txn.commit());
  }
  CHECK(read_key(*index, Db::kMeta, "a") == "overwritten");
  CHECK(read_key(*index, Db::kMeta, "b") == std::nullopt);
  CHECK(read_key(*index, Db::kImages, "a") == "other db");

  // A transaction destroyed without commit is aborted.
  {
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kMeta, "aborted", "x"));
    REQUIRE_OK(txn.del(Db::kMeta, "a"));
  }
  CHECK(read_key(*index, Db::kMeta, "aborted") == std::nullopt);
  CHECK(read_key(*index, Db::kMeta, "a") == "overwritten");

  // Data persists across close and reopen.
  index.reset();
  index = MUST(Index::open(dir.path(), Index::Options{}));
  CHECK(read_key(*index, Db::kMeta, "a") == "overwritten");
  CHECK(index->dir() == dir.path());
}

TEST_CASE("scan with prefix, order and early stop; del_prefix", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    WriteTxn txn = MUST(index->begin_write());
    for (uint64_t layer : {1, 2, 256}) {
      for (uint32_t n : {0u, 1u, 255u, 256u, 70000u}) {
        REQUIRE_OK(txn.put(Db::kMaps, key_u64_u32(layer, n), std::to_string(layer * 1000000 + n)));
      }
    }
    REQUIRE_OK(txn.commit());
  }

  ReadTxn txn = MUST(index->begin_read());
  std::vector<uint32_t> seen;
  REQUIRE_OK(
      txn.scan(Db::kMaps, key_u64(2), [&](std::string_view k, std::string_view v) -> Result<bool> {
        auto key = decode_key_u64_u32(k);
        REQUIRE(key.has_value());
        CHECK(key->first == 2);
        CHECK(std::string(v) == std::to_string(2000000 + key->second));
        seen.push_back(key->second);
        return true;
      }));
  CHECK(seen == std::vector<uint32_t>{0, 1, 255, 256, 70000});

  // Everything, in key order.
  std::vector<std::pair<uint64_t, uint32_t>> all;
  REQUIRE_OK(txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view) -> Result<bool> {
    all.push_back(*decode_key_u64_u32(k));
    return true;
  }));
  REQUIRE(all.size() == 15);
  CHECK(std::is_sorted(all.begin(), all.end()));
  CHECK(all.front() == std::pair<uint64_t, uint32_t>{1, 0});
  CHECK(all.back() == std::pair<uint64_t, uint32_t>{256, 70000});

  // Early stop after 3.
  int calls = 0;
  REQUIRE_OK(
      txn.scan(Db::kMaps, key_u64(1),
               [&](std::string_view, std::string_view) -> Result<bool> { return ++calls < 3; }));
  CHECK(calls == 3);

  // A prefix with no keys, one past the end, and an empty db.
  calls = 0;
  auto count = [&](std::string_view, std::string_view) -> Result<bool> {
    ++calls;
    return true;
  };
  REQUIRE_OK(txn.scan(Db::kMaps, key_u64(3), count));
  REQUIRE_OK(txn.scan(Db::kMaps, key_u64(257), count));
  REQUIRE_OK(txn.scan(Db::kHeat, "", count));
  CHECK(calls == 0);

  // The callback's error comes back as it is.
  Status st = txn.scan(Db::kMaps, "", [&](std::string_view, std::string_view) -> Result<bool> {
    return make_error(ENOSPC, "callback says no");
  });
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == ENOSPC);
  CHECK(st.error().message == "callback says no");

  {
    WriteTxn w = MUST(index->begin_write());
    CHECK(MUST(w.del_prefix(Db::kMaps, key_u64(2))) == 5);
    CHECK(MUST(w.del_prefix(Db::kMaps, key_u64(99))) == 0);
    REQUIRE_OK(w.commit());
  }
  // The old read transaction still sees its snapshot.
  calls = 0;
  REQUIRE_OK(txn.scan(Db::kMaps, key_u64(2), count));
  CHECK(calls == 5);

  ReadTxn fresh = MUST(index->begin_read());
  calls = 0;
  REQUIRE_OK(fresh.scan(Db::kMaps, key_u64(2), count));
  CHECK(calls == 0);
  calls = 0;
  REQUIRE_OK(fresh.scan(Db::kMaps, "", count));
  CHECK(calls == 10);
}

TEST_CASE("next_id counts from 1 per name and persists", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    WriteTxn txn = MUST(index->begin_write());
    CHECK(MUST(txn.next_id("layer")) == 1);
    CHECK(MUST(txn.next_id("layer")) == 2);
    CHECK(MUST(txn.next_id("container")) == 1);
    CHECK(MUST(txn.next_id("layer")) == 3);
    REQUIRE_OK(txn.commit());
  }
  {
    WriteTxn txn = MUST(index->begin_write());
    CHECK(MUST(txn.next_id("layer")) == 4);
    // aborted: the counter goes back
  }
  index.reset();
  index = MUST(Index::open(dir.path(), Index::Options{}));
  WriteTxn txn = MUST(index->begin_write());
  CHECK(MUST(txn.next_id("layer")) == 4);
  CHECK(MUST(txn.next_id("container")) == 2);
  REQUIRE_OK(txn.commit());
}

TEST_CASE("a ReadTxn sees a snapshot", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  auto committer_owner = MUST(Committer::start(*index));
  Committer& committer = *committer_owner;
  REQUIRE_OK(committer.run([](WriteTxn& t) { return t.put(Db::kContainers, "c", "v1"); }));

  ReadTxn before = MUST(index->begin_read());
  CHECK(get_str(before, Db::kContainers, "c") == "v1");
  REQUIRE_OK(committer.run([](WriteTxn& t) -> Status {
    LAYER_TRY(t.put(Db::kContainers, "c", "v2"));
    return t.put(Db::kContainers, "d", "new");
  }));
  CHECK(get_str(before, Db::kContainers, "c") == "v1");
  CHECK(get_str(before, Db::kContainers, "d") == std::nullopt);

  ReadTxn after = MUST(index->begin_read());
  CHECK(get_str(after, Db::kContainers, "c") == "v2");
  CHECK(get_str(after, Db::kContainers, "d") == "new");
}

TEST_CASE("a read-only Index refuses writes", "[index]") {
  test::TempDir dir;
  {
    auto index = open_new(dir);
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kMeta, "k", "v"));
    REQUIRE_OK(txn.commit());
  }
  Index::Options ro;
  ro.read_only = true;
  auto index = MUST(Index::open(dir.path(), ro));
  CHECK(index->read_only());
  CHECK(read_key(*index, Db::kMeta, "k") == "v");
  auto w = index->begin_write();
  REQUIRE_FALSE(w.ok());
  CHECK(w.error().code == EACCES);
  CHECK(read_key(*index, Db::kMeta, "k") == "v");
}

TEST_CASE("append writes ascending keys", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    WriteTxn txn = MUST(index->begin_write());
    REQUIRE_OK(txn.put(Db::kMaps, key_u64_u32(1, 5), "before"));
    for (uint32_t n = 0; n < 3000; n++) {
      REQUIRE_OK(txn.append(Db::kMaps, key_u64_u32(9, n),
                            std::string(n % 7 == 0 ? 1 : 1024, char('a' + n % 26))));
    }
    REQUIRE_OK(txn.commit());
  }
  ReadTxn txn = MUST(index->begin_read());
  uint32_t expect = 0;
  REQUIRE_OK(
      txn.scan(Db::kMaps, key_u64(9), [&](std::string_view k, std::string_view v) -> Result<bool> {
        auto key = decode_key_u64_u32(k);
        REQUIRE(key);
        REQUIRE(key->second == expect);
        REQUIRE(v.size() == (expect % 7 == 0 ? 1u : 1024u));
        REQUIRE(v[0] == char('a' + expect % 26));
        expect++;
        return true;
      }));
  CHECK(expect == 3000);
  CHECK(get_str(txn, Db::kMaps, key_u64_u32(1, 5)) == "before");
}

TEST_CASE("del_prefix removes many rows across pages and nothing else", "[index]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    WriteTxn txn = MUST(index->begin_write());
    for (uint64_t layer : {8, 9, 10}) {
      for (uint32_t n = 0; n < 2000; n++) {
        REQUIRE_OK(txn.put(Db::kMaps, key_u64_u32(layer, n), std::string(n % 3 ? 1024 : 1, 'x')));
      }
    }
    REQUIRE_OK(txn.commit());
  }
  {
    WriteTxn txn = MUST(index->begin_write());
    CHECK(MUST(txn.del_prefix(Db::kMaps, key_u64(9))) == 2000);
    REQUIRE_OK(txn.commit());
  }
  ReadTxn txn = MUST(index->begin_read());
  std::map<uint64_t, int> per_layer;
  REQUIRE_OK(txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view) -> Result<bool> {
    per_layer[decode_key_u64_u32(k)->first]++;
    return true;
  }));
  CHECK(per_layer[8] == 2000);
  CHECK(per_layer.count(9) == 0);
  CHECK(per_layer[10] == 2000);
  {
    WriteTxn w = MUST(index->begin_write());
    CHECK(MUST(w.del_prefix(Db::kMaps, key_u64(10))) == 2000);  // the last keys of the db
    CHECK(MUST(w.del_prefix(Db::kMaps, "")) == 2000);           // everything left
    REQUIRE_OK(w.commit());
  }
  ReadTxn after = MUST(index->begin_read());
  int rows = 0;
  REQUIRE_OK(after.scan(Db::kMaps, "", [&](std::string_view, std::string_view) -> Result<bool> {
    rows++;
    return true;
  }));
  CHECK(rows == 0);
}

TEST_CASE("Committer runs jobs and reports their errors", "[index][committer]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    auto committer_owner = MUST(Committer::start(*index));
    Committer& committer = *committer_owner;
    REQUIRE_OK(committer.run([](WriteTxn& t) { return t.put(Db::kMeta, "x", "1"); }));
    CHECK(read_key(*index, Db::kMeta, "x") == "1");

    Status st = committer.run([](WriteTxn& t) -> Status {
      LAYER_TRY(t.put(Db::kMeta, "failed", "must not stay"));
      return make_error(EINVAL, "job {} refuses", 7);
    });
    REQUIRE_FALSE(st.ok());
    CHECK(st.error().code == EINVAL);
    CHECK(st.error().message == "job 7 refuses");
    CHECK(read_key(*index, Db::kMeta, "failed") == std::nullopt);

    // The committer keeps working after a failure.
    REQUIRE_OK(committer.run([](WriteTxn& t) { return t.put(Db::kMeta, "y", "2"); }));
    CHECK(read_key(*index, Db::kMeta, "y") == "2");
  }
}

TEST_CASE("a failing job does not stop concurrent jobs from committing", "[index][committer]") {
  test::TempDir dir;
  auto index = open_new(dir);
  auto committer_owner = MUST(Committer::start(*index));
  Committer& committer = *committer_owner;

  constexpr int kThreads = 8;
  constexpr int kJobsPerThread = 100;
  std::atomic<int> failures_seen{0};
  std::atomic<int> unexpected{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      for (int j = 0; j < kJobsPerThread; j++) {
        const int n = t * kJobsPerThread + j;
        // Every 37th job fails after writing its key; the rest write theirs.
        const bool fail = n % 37 == 5;
        Status st = committer.run([n, fail](WriteTxn& txn) -> Status {
          LAYER_TRY(txn.put(Db::kHeat, key_u64(n), std::to_string(n)));
          // Also bump a shared counter so batched jobs depend on each other's writes.
          auto cur = txn.get(Db::kMeta, "counter");
          if (!cur.ok()) return std::move(cur).error();
          uint64_t c = *cur ? std::stoull(std::string(**cur)) : 0;
          LAYER_TRY(txn.put(Db::kMeta, "counter", std::to_string(c + 1)));
          if (fail) return make_error(EBADMSG, "job {} fails on purpose", n);
          return Status{};
        });
        if (fail) {
          if (!st.ok() && st.error().code == EBADMSG &&
              st.error().message == fmt::format("job {} fails on purpose", n)) {
            failures_seen++;
          } else {
            unexpected++;
          }
        } else if (!st.ok()) {
          unexpected++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(unexpected == 0);

  int expected_failures = 0;
  ReadTxn txn = MUST(index->begin_read());
  for (int n = 0; n < kThreads * kJobsPerThread; n++) {
    const bool fail = n % 37 == 5;
    expected_failures += fail;
    INFO("job " << n);
    if (fail) {
      CHECK(get_str(txn, Db::kHeat, key_u64(n)) == std::nullopt);
    } else {
      CHECK(get_str(txn, Db::kHeat, key_u64(n)) == std::to_string(n));
    }
  }
  CHECK(failures_seen == expected_failures);
  // Only the successful jobs' increments stayed.
  CHECK(get_str(txn, Db::kMeta, "counter") ==
        std::to_string(kThreads * kJobsPerThread - expected_failures));
}

TEST_CASE("Committer destructor finishes queued jobs", "[index][committer]") {
  test::TempDir dir;
  auto index = open_new(dir);
  std::atomic<int> ok{0};
  {
    auto committer_owner = MUST(Committer::start(*index));
    Committer& committer = *committer_owner;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) {
      threads.emplace_back([&, t] {
        for (int j = 0; j < 50; j++) {
          if (committer
                  .run([=](WriteTxn& txn) { return txn.put(Db::kHeat, key_u64(t * 50 + j), "v"); })
                  .ok())
            ok++;
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  CHECK(ok == 200);
  ReadTxn txn = MUST(index->begin_read());
  int rows = 0;
  REQUIRE_OK(txn.scan(Db::kHeat, "", [&](std::string_view, std::string_view) -> Result<bool> {
    rows++;
    return true;
  }));
  CHECK(rows == 200);
}

TEST_CASE("a Committer job that throws fails alone and the committer goes on",
          "[index][committer]") {
  test::TempDir dir;
  auto index = open_new(dir);
  auto committer_owner = MUST(Committer::start(*index));
  Committer& committer = *committer_owner;
  Status st = committer.run([](WriteTxn& t) -> Status {
    LAYER_TRY(t.put(Db::kMeta, "thrower", "must not stay"));
    throw std::bad_alloc();
  });
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == ENOMEM);
  CHECK(read_key(*index, Db::kMeta, "thrower") == std::nullopt);
  st = committer.run([](WriteTxn&) -> Status { throw std::runtime_error("boom"); });
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == EIO);
  REQUIRE_OK(committer.run([](WriteTxn& t) { return t.put(Db::kMeta, "after", "1"); }));
  CHECK(read_key(*index, Db::kMeta, "after") == "1");
}

// ---- the map: full, grown, resized by another process; walk; compact copy ----

namespace {

std::unique_ptr<Index> open_small(const test::TempDir& dir, uint64_t map_bytes, uint64_t max_bytes,
                                  bool create) {
  Index::Options opt;
  opt.create = create;
  opt.map_size_bytes = map_bytes;
  opt.max_map_size_bytes = max_bytes;
  return MUST(Index::open(dir.path(), opt));
}

// A job writing `rows` rows of 1 KiB into kMaps under keys (tag, i): two rows per 4 KiB page.
Committer::Job put_rows(uint64_t tag, int rows) {
  return [tag, rows](WriteTxn& txn) -> Status {
    for (int i = 0; i < rows; ++i)
      LAYER_TRY(txn.put(Db::kMaps, key_u64_u32(tag, static_cast<uint32_t>(i)),
                        std::string(1024, static_cast<char>('a' + i % 26))));
    return {};
  };
}

uint64_t count_rows(Index& index, uint64_t tag) {
  ReadTxn txn = MUST(index.begin_read());
  uint64_t n = 0;
  REQUIRE_OK(txn.scan(Db::kMaps, key_u64(tag), [&](std::string_view, std::string_view v) {
    REQUIRE(v.size() == 1024);
    ++n;
    return Result<bool>(true);
  }));
  return n;
}

}  // namespace

TEST_CASE("a full map fails the batch with ENOSPC, the committer grows it, a retry commits",
          "[index][committer][mapfull]") {
  test::TempDir dir;
  auto index = open_small(dir, 256 << 10, 1 << 20, true);
  REQUIRE(index->map_size() == 256 << 10);
  auto committer = MUST(Committer::start(*index));
  REQUIRE_OK(committer->run(put_rows(1, 10)));

  // 150 rows (about 300 KiB of pages) do not fit in 256 KiB: real MDB_MAP_FULL from LMDB.
  Status full = committer->run(put_rows(2, 150));
  REQUIRE_FALSE(full.ok());
  CHECK(full.error().code == ENOSPC);
  INFO(full.error().message);
  CHECK(full.error().message.find("MDB_MAP_FULL") != std::string::npos);
  CHECK(full.error().message.find("grown to 524288 bytes") != std::string::npos);
  CHECK(index->map_size() == 512 << 10);
  CHECK(index->map_grows() == 1);
  // Nothing of the failed job, everything from before.
  CHECK(count_rows(*index, 2) == 0);
  CHECK(count_rows(*index, 1) == 10);
  CHECK(MUST(index->walk()).entries == 10);

  // The same job again: it fits now.
  REQUIRE_OK(committer->run(put_rows(2, 150)));
  CHECK(count_rows(*index, 2) == 150);
  CHECK(index->map_grows() == 1);

  // Grown once more, then at the limit: ENOSPC says so, the map stays, the index is unharmed.
  const Error grew = ERROR_OF(committer->run(put_rows(3, 600)));
  CHECK(grew.code == ENOSPC);
  CHECK(index->map_size() == 1 << 20);
  const Error limit = ERROR_OF(committer->run(put_rows(3, 600)));
  CHECK(limit.code == ENOSPC);
  INFO(limit.message);
  CHECK(limit.message.find("at its limit of 1048576 bytes") != std::string::npos);
  CHECK(index->map_size() == 1 << 20);
  CHECK(index->map_grows() == 2);
  CHECK(count_rows(*index, 3) == 0);
  committer.reset();
  index.reset();
  index = open_small(dir, 0, 0, false);
  CHECK(count_rows(*index, 1) == 10);
  CHECK(count_rows(*index, 2) == 150);
  CHECK(MUST(index->walk()).entries == 160);
  CHECK(index->map_size() == Index::kMapSizeBytes);
}

TEST_CASE("a map another process grew is adopted (MDB_MAP_RESIZED)", "[index][resize]") {
  test::TempDir dir;
  auto index = open_small(dir, 256 << 10, 0, true);
  {
    auto committer = MUST(Committer::start(*index));
    REQUIRE_OK(committer->run(put_rows(1, 5)));
  }
  CHECK(count_rows(*index, 1) == 5);
  std::optional<ReadTxn> held;
  if (GENERATE(false, true)) held.emplace(MUST(index->begin_read()));
  // Another process maps 4 MiB and writes past the end of this process's 256 KiB map.
  test::Child grower([&] {
    auto other = Index::open(dir.path(), Index::Options{.map_size_bytes = 4 << 20});
    if (!other) return 1;
    auto committer = Committer::start(**other);
    if (!committer) return 2;
    return (*committer)->run(put_rows(2, 300)).ok() ? 0 : 3;
  });
  REQUIRE(grower.wait() == 0);
  if (held) {
    // This thread cannot resize its map while its own transaction uses it: it is told to try
    // again rather than left waiting for itself. Its old snapshot still reads.
    CHECK_ERRNO(index->begin_read(), EAGAIN);
    CHECK(index->map_size() == 256 << 10);
    CHECK(MUST(held->get(Db::kMaps, key_u64_u32(1, 0))).has_value());
    held.reset();
  }
  // With no transaction open, the next one adopts the larger map and sees the rows.
  CHECK(count_rows(*index, 2) == 300);
  CHECK(index->map_size() >= 4 << 20);
  auto committer = MUST(Committer::start(*index));
  REQUIRE_OK(committer->run(put_rows(3, 100)));
  CHECK(count_rows(*index, 3) == 100);
}

TEST_CASE("walk reads a healthy index; copy_compact writes one that opens and holds the rows",
          "[index][walk]") {
  test::TempDir dir;
  auto index = open_new(dir);
  {
    auto committer = MUST(Committer::start(*index));
    REQUIRE_OK(committer->run(put_rows(1, 300)));
    REQUIRE_OK(committer->run([](WriteTxn& txn) -> Status {  // some free pages
      LAYER_TRY(txn.del_prefix(Db::kMaps, key_u64(1), 200));
      return {};
    }));
    REQUIRE_OK(committer->run(put_rows(2, 3)));
  }
  const IndexWalk w = MUST(index->walk());
  CHECK(w.entries == 103);
  CHECK(w.free_pages > 0);
  CHECK(w.file_bytes >= w.used_bytes);
  CHECK(w.txnid == index->last_txnid());

  test::TempDir copy_dir;
  {
    test::Fd fd(
        ::open(copy_dir.sub("data.mdb").c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    REQUIRE(fd.get() >= 0);
    CHECK(MUST(index->copy_compact(fd.get())) == index->last_txnid());
  }
  auto copy = MUST(Index::open(copy_dir.path(), Index::Options{.read_only = true}));
  const IndexWalk cw = MUST(copy->walk());
  CHECK(cw.entries == 103);
  CHECK(cw.free_pages == 0);  // compacted
  CHECK(cw.file_bytes < w.file_bytes);
  CHECK(count_rows(*copy, 1) == 100);
  CHECK(count_rows(*copy, 2) == 3);
}
