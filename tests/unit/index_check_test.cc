// Unit tests for lib/index_check.h: the check of a whole index — healthy, truncated, not LMDB
// at all, and thousands of random byte flips, after each of which neither the check nor fsck
// behind it may crash the caller.
#include "index_check.h"

#include <filesystem>
#include <map>
#include <random>

#include "disk.h"
#include "fsck.h"
#include "test_util.h"

using namespace layer;
namespace fs = std::filesystem;

namespace {

// A pool with an image, two containers written and flushed, a snapshot and some removals (so
// the index has free pages, several dbs and many rows).
struct BusyPool {
  test::PoolFixture f;
  BusyPool() {
    f.import("base:1", 4 << 20, 4096, 5);
    MUST(f.pool->clone("base:1", "a", std::nullopt));
    MUST(f.pool->clone("base:1", "b", uint64_t{64} << 20));
    for (const char* name : {"a", "b"}) {
      auto disk = MUST(Disk::open(*f.pool, name, true));
      std::vector<uint8_t> data(4096, 0x5a);
      for (uint64_t off = 0; off < (4u << 20); off += 3 * 4096 + 512)
        REQUIRE_OK(disk->write(data.data(), data.size(), off, false));
      REQUIRE_OK(disk->flush());
    }
    MUST(f.pool->clone("base:1", "gone", std::nullopt));
    REQUIRE_OK(f.pool->remove_container("gone"));
  }
};

std::string copy_pool(const std::string& from, const std::string& to) {
  fs::copy(from, to, fs::copy_options::recursive);
  return to;
}

}  // namespace

TEST_CASE("check_index reads a healthy pool's index, also while the pool is open",
          "[index_check]") {
  BusyPool p;
  const IndexWalk w = MUST(check_index(p.f.root + "/index"));
  CHECK(w.entries >= 20);
  CHECK(w.free_pages > 0);
  CHECK(w.txnid == p.f.pool->index().last_txnid());
  p.f.pool.reset();
  CHECK(MUST(check_index(p.f.root + "/index")).txnid == w.txnid);
}

TEST_CASE("check_index calls a truncated or foreign data.mdb damaged, with what to do",
          "[index_check]") {
  BusyPool p;
  p.f.pool.reset();
  const std::string data = p.f.root + "/index/data.mdb";
  SECTION("truncated") { fs::resize_file(data, fs::file_size(data) / 2); }
  SECTION("not LMDB") {
    std::vector<uint8_t> junk(fs::file_size(data), 0x42);
    test::Fd fd(::open(data.c_str(), O_WRONLY | O_CLOEXEC));
    test::pwrite_all(fd.get(), junk.data(), junk.size(), 0);
  }
  auto e = ERROR_OF(check_index(p.f.root + "/index"));
  INFO(e.message);
  CHECK(e.code == EUCLEAN);
  CHECK(e.message.starts_with("index " + p.f.root + "/index is damaged: "));
  CHECK(e.message.find("index restore") != std::string::npos);
  CHECK(e.message.find('\n') == std::string::npos);
}

TEST_CASE("random bytes in data.mdb: neither the check nor fsck after it crashes the caller",
          "[index_check][fuzz]") {
  BusyPool p;
  p.f.pool.reset();
  const std::string pristine = p.f.root + "/index/data.mdb";
  const std::vector<uint8_t> good = test::read_file(pristine);
  const std::string copy = copy_pool(p.f.root, p.f.tmp.sub("copy"));
  const std::string data = copy + "/index/data.mdb";
  const uint64_t seed = test::test_seed("index fuzz");
  std::mt19937_64 rng(seed);
  const int rounds =
      std::getenv("LAYER_FUZZ_ROUNDS") ? std::atoi(std::getenv("LAYER_FUZZ_ROUNDS")) : 300;
  std::map<std::string, int> outcomes;
  for (int round = 0; round < rounds; ++round) {
    std::vector<uint8_t> bytes = good;
    // A few bytes anywhere, or a burst in one page (a torn or overwritten page).
    const int flips = 1 + static_cast<int>(rng() % 16);
    const uint64_t page = rng() % (bytes.size() / 4096);
    const bool burst = rng() % 2 == 0;
    for (int i = 0; i < flips; ++i) {
      const uint64_t at = burst ? page * 4096 + rng() % 4096 : rng() % bytes.size();
      bytes[at] ^= static_cast<uint8_t>(1 + rng() % 255);
    }
    {
      test::Fd fd(::open(data.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
      REQUIRE(fd.get() >= 0);
      test::pwrite_all(fd.get(), bytes.data(), bytes.size(), 0);
    }
    fs::remove(copy + "/index/lock.mdb");
    INFO("round " << round << " (seed " << seed << ")");
    auto checked = check_index(copy + "/index");
    if (!checked) {
      INFO(checked.error().message);
      REQUIRE(checked.error().code == EUCLEAN);
      REQUIRE(checked.error().message.find("is damaged: ") != std::string::npos);
      REQUIRE(checked.error().message.find("index restore") != std::string::npos);
      ++outcomes[checked.error().message.find("crashed") != std::string::npos ? "crash caught"
                                                                              : "damage found"];
      continue;
    }
    // Passed: what fsck reads next (decoding every row) must not crash either. It runs in a
    // child only so that this test can tell a crash (128 + signal) from an answer.
    test::Child fsck_child([&] {
      auto pool = Pool::open(copy, Pool::OpenOptions{.read_only = true});
      if (!pool) return 10;
      auto report = fsck(**pool, false, false);
      if (!report) return 11;
      return report->problems.empty() ? 0 : 12;
    });
    const int rc = fsck_child.wait();
    INFO("fsck exit " << rc);
    REQUIRE(rc < 128);
    ++outcomes[rc == 0 ? "clean" : "fsck reports"];
  }
  std::string summary;
  for (const auto& [what, n] : outcomes) summary += fmt::format(" {}: {};", what, n);
  std::cerr << "index fuzz: " << rounds << " damaged copies:" << summary << "\n";
  CHECK(outcomes["crash caught"] + outcomes["damage found"] > 0);
}
