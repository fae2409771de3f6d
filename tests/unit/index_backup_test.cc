// Unit tests for lib/index_backup.h: compact copies of the index taken, skipped while nothing
// changed, pruned to the newest kIndexBackupsKept, readable as indexes; a damaged index leaves
// no copy and keeps the older ones; the server's copier thread.
#include "index_backup.h"

#include <filesystem>
#include <mutex>
#include <thread>

#include "index_check.h"
#include "test_util.h"

using namespace layer;
namespace fs = std::filesystem;

namespace {

// One more change to the index (a new container).
void change(Pool& pool, int n) { MUST(pool.clone("base:1", fmt::format("c{}", n), std::nullopt)); }

// backup_index through a read-only pool, as `layer index backup` takes it: a process with no
// other thread forks the copying child (TSan does not let a child of a multi-threaded process
// start the thread MDB_CP_COMPACT writes with; the committer of a writable pool is one).
BackupResult take_copy(test::PoolFixture& f, const char* reason) {
  f.pool.reset();
  auto ro = MUST(Pool::open(f.root, Pool::OpenOptions{.read_only = true}));
  auto r = MUST(backup_index(*ro, reason));
  ro.reset();
  f.reopen();
  return r;
}

uint64_t containers_in(const std::string& copy) {
  test::TempDir dir;
  fs::copy_file(copy, dir.sub("data.mdb"));
  auto index = MUST(Index::open(dir.path(), Index::Options{.read_only = true, .no_lock = true}));
  auto txn = MUST(index->begin_read());
  uint64_t n = 0;
  REQUIRE_OK(txn.scan(Db::kContainers, "", [&](std::string_view, std::string_view) {
    ++n;
    return Result<bool>(true);
  }));
  return n;
}

}  // namespace

TEST_CASE("backup_index takes compact copies, skips an unchanged index, keeps the newest",
          "[index_backup]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 3);
  const std::string index_dir = f.root + "/index";
  CHECK(MUST(list_index_backups(index_dir)).empty());

  BackupResult first = take_copy(f, "manual");
  CHECK(first.taken);
  CHECK(first.backup.reason == "manual");
  CHECK(first.backup.txnid == f.pool->index().last_txnid());
  CHECK(first.backup.name.starts_with("index-"));
  CHECK(fs::exists(first.backup.path));
  CHECK(first.backup.bytes == fs::file_size(first.backup.path));
  CHECK(first.backup.bytes <= fs::file_size(index_dir + "/data.mdb"));
  CHECK(containers_in(first.backup.path) == 0);

  // Nothing changed: no new copy.
  BackupResult again = take_copy(f, "gc");
  CHECK_FALSE(again.taken);
  CHECK(again.backup.name == first.backup.name);

  // A change, but the newest copy is fresh enough for the caller: no new copy.
  change(*f.pool, 100);
  f.pool.reset();
  {
    auto ro = MUST(Pool::open(f.root, Pool::OpenOptions{.read_only = true}));
    BackupResult fresh = MUST(backup_index(*ro, "rm", std::chrono::seconds(3600)));
    CHECK_FALSE(fresh.taken);
    CHECK(fresh.backup.name == first.backup.name);
  }
  f.reopen();

  // Changes: a copy each, the oldest pruned beyond kIndexBackupsKept.
  std::vector<std::string> names = {first.backup.name};
  for (int i = 0; i < static_cast<int>(kIndexBackupsKept) + 2; ++i) {
    change(*f.pool, i);
    BackupResult r = take_copy(f, "rm");
    REQUIRE(r.taken);
    CHECK(containers_in(r.backup.path) == static_cast<uint64_t>(i + 2));
    names.push_back(r.backup.name);
  }
  auto all = MUST(list_index_backups(index_dir));
  REQUIRE(all.size() == kIndexBackupsKept);
  // Newest first: the last kIndexBackupsKept taken, in reverse.
  for (size_t i = 0; i < all.size(); ++i) CHECK(all[i].name == names[names.size() - 1 - i]);
  for (size_t i = 1; i < all.size(); ++i) CHECK(all[i - 1].txnid > all[i].txnid);
  // No temporary files left behind.
  for (const auto& e : fs::directory_iterator(index_dir + "/backup"))
    CHECK(e.path().filename().string().starts_with("index-"));
}

TEST_CASE("a damaged index is not copied, and the older copies stay", "[index_backup]") {
  test::PoolFixture f;
  f.import("base:1", 8 << 20, 4096, 4);
  BackupResult good = take_copy(f, "manual");
  change(*f.pool, 1);
  f.pool.reset();
  auto ro = MUST(Pool::open(f.root, Pool::OpenOptions{.read_only = true}));
  // Junk over every page but the two meta pages, under the open pool (which reads only the
  // meta pages meanwhile), put back before the pool closes.
  const std::string data = f.root + "/index/data.mdb";
  const std::vector<uint8_t> saved = test::read_file(data);
  {
    std::vector<uint8_t> junk(saved.size() - 2 * 4096, 0xa5);
    test::Fd fd(::open(data.c_str(), O_WRONLY | O_CLOEXEC));
    test::pwrite_all(fd.get(), junk.data(), junk.size(), 2 * 4096);
  }
  auto r = backup_index(*ro, "gc");
  {
    test::Fd fd(::open(data.c_str(), O_WRONLY | O_CLOEXEC));
    test::pwrite_all(fd.get(), saved.data(), saved.size(), 0);
  }
  REQUIRE_FALSE(r.ok());
  INFO(r.error().message);
  CHECK(r.error().code == EUCLEAN);
  CHECK(r.error().message.find("is damaged") != std::string::npos);
  CHECK(r.error().message.find("the older ones are kept") != std::string::npos);
  auto all = MUST(list_index_backups(f.root + "/index"));
  REQUIRE(all.size() == 1);
  CHECK(all[0].name == good.backup.name);
  for (const auto& e : fs::directory_iterator(f.root + "/index/backup"))
    CHECK(e.path().filename() == good.backup.name);
}

TEST_CASE("the server's copier takes a copy at start and after changes", "[index_backup]") {
#if defined(__SANITIZE_THREAD__)
  WARN("skipped under TSan: the copier forks from a multi-threaded process");
  return;
#endif
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 5);
  std::mutex mu;
  std::vector<std::string> lines;
  BackgroundBackup::Options options;
  options.interval = std::chrono::seconds(1);
  options.log = [&](bool error, const std::string& line) {
    std::lock_guard<std::mutex> lk(mu);
    lines.push_back((error ? "error: " : "") + line);
  };
  auto copier = MUST(BackgroundBackup::start(*f.pool, options));
  auto copies = [&] { return MUST(list_index_backups(f.root + "/index")).size(); };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (copies() < 1 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(copies() == 1);
  change(*f.pool, 1);
  while (copies() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(copies() == 2);
  copier.reset();
  std::lock_guard<std::mutex> lk(mu);
  for (const auto& line : lines) CHECK(line.starts_with("index copy: "));
  CHECK(MUST(list_index_backups(f.root + "/index"))[0].reason == "server");
}
