// Unit tests for lib/locks.h: counted holders within a process, conflicts within and across
// processes (forked children with their own LockTable), holder names and the life of holder
// records, is_locked's errors, locks vanishing when their process exits, and holder notes read
// back as pids.
#include "locks.h"

#include <unistd.h>

#include "test_util.h"

using namespace layer;

namespace {

// Exit codes of a child that tries one lock through its own LockTable.
constexpr int kChildGotLock = 0;
constexpr int kChildBusy = 1;
constexpr int kChildOtherError = 2;
constexpr int kChildNoTable = 3;

// Forks a child that opens run_dir/locks itself, tries the lock once and exits with one of the
// codes above.
int try_in_child(const std::string& run_dir, LockKind kind, uint64_t id, bool exclusive) {
  test::Child child([&]() -> int {
    auto table = LockTable::open(run_dir);
    if (!table.ok()) return kChildNoTable;
    auto lock = (*table)->try_lock(kind, id, exclusive, "object in child");
    if (lock.ok()) return kChildGotLock;
    return lock.error().code == EBUSY ? kChildBusy : kChildOtherError;
  });
  return child.wait();
}

}  // namespace

TEST_CASE("LockTable::open creates run/locks", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  CHECK(std::filesystem::exists(run.sub("locks")));
  REQUIRE_ERRNO(LockTable::open(run.sub("missing/dir")), ENOENT);
}

TEST_CASE("shared locks in one process are counted", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));

  Lock a = MUST(table->try_lock(LockKind::kContainer, 7, false, "container \"c7\""));
  Lock b = MUST(table->try_lock(LockKind::kContainer, 7, false, "container \"c7\""));
  CHECK(a.held());
  CHECK(b.held());

  // Another process may share it but not take it exclusively.
  CHECK(try_in_child(run.path(), LockKind::kContainer, 7, false) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kContainer, 7, true) == kChildBusy);

  // Releasing one holder keeps the byte locked.
  a.release();
  CHECK_FALSE(a.held());
  CHECK(try_in_child(run.path(), LockKind::kContainer, 7, true) == kChildBusy);

  // Releasing the last one frees it.
  b.release();
  CHECK(try_in_child(run.path(), LockKind::kContainer, 7, true) == kChildGotLock);

  // The destructor releases too.
  {
    Lock c = MUST(table->try_lock(LockKind::kLayer, 3, false, "layer 3"));
    CHECK(try_in_child(run.path(), LockKind::kLayer, 3, true) == kChildBusy);
  }
  CHECK(try_in_child(run.path(), LockKind::kLayer, 3, true) == kChildGotLock);
}

TEST_CASE("is_locked sees this process's holders and takes nothing", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  CHECK_FALSE(MUST(table->is_locked(LockKind::kContainer, 3)));
  {
    Lock s = MUST(table->try_lock(LockKind::kContainer, 3, false, "c3"));
    CHECK(MUST(table->is_locked(LockKind::kContainer, 3)));
    CHECK_FALSE(MUST(table->is_locked(LockKind::kLayer, 3)));
  }
  CHECK_FALSE(MUST(table->is_locked(LockKind::kContainer, 3)));
  // Asking took nothing: another process can lock it exclusively.
  CHECK(try_in_child(run.path(), LockKind::kContainer, 3, true) == kChildGotLock);
}

TEST_CASE("a moved Lock is released once, by its new owner", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  Lock moved;
  CHECK_FALSE(moved.held());
  {
    Lock first = MUST(table->try_lock(LockKind::kLayer, 11, true, "layer 11"));
    moved = std::move(first);
    CHECK_FALSE(first.held());  // NOLINT(bugprone-use-after-move): the contract under test
    CHECK(moved.held());
  }
  // `first` was destroyed: the lock must still be held by `moved`.
  CHECK(try_in_child(run.path(), LockKind::kLayer, 11, false) == kChildBusy);
  moved.release();
  CHECK(try_in_child(run.path(), LockKind::kLayer, 11, true) == kChildGotLock);
}

TEST_CASE("exclusive locks conflict within one process", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  {
    Lock x = MUST(table->try_lock(LockKind::kContainer, 1, true, "container \"one\""));
    auto again = table->try_lock(LockKind::kContainer, 1, true, "container \"one\"");
    REQUIRE_FALSE(again.ok());
    CHECK(again.error().code == EBUSY);
    CHECK_THAT(again.error().message, Catch::Contains("container \"one\""));
    CHECK(try_in_child(run.path(), LockKind::kContainer, 1, false) == kChildBusy);
  }
  {
    Lock s = MUST(table->try_lock(LockKind::kContainer, 1, false, "container \"one\""));
    REQUIRE_ERRNO(table->try_lock(LockKind::kContainer, 1, true, "container \"one\""), EBUSY);
    // The failed attempt did not disturb the shared holder.
    CHECK(try_in_child(run.path(), LockKind::kContainer, 1, true) == kChildBusy);
  }
  // All released: exclusive works again, in this process and in another.
  CHECK(try_in_child(run.path(), LockKind::kContainer, 1, true) == kChildGotLock);
  Lock x = MUST(table->try_lock(LockKind::kContainer, 1, true, "container \"one\""));
  CHECK(x.held());
}

TEST_CASE("container and layer locks of the same id are different bytes", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  Lock c5 = MUST(table->try_lock(LockKind::kContainer, 5, true, "container 5"));
  Lock l5 = MUST(table->try_lock(LockKind::kLayer, 5, true, "layer 5"));
  Lock c6 = MUST(table->try_lock(LockKind::kContainer, 6, true, "container 6"));
  // Neighbouring bytes (layer 4 = 9, container 5 = 10, layer 5 = 11, container 6 = 12) are free.
  CHECK(try_in_child(run.path(), LockKind::kLayer, 4, true) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kLayer, 6, true) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kContainer, 4, true) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kContainer, 5, false) == kChildBusy);
  CHECK(try_in_child(run.path(), LockKind::kLayer, 5, false) == kChildBusy);
  CHECK(try_in_child(run.path(), LockKind::kContainer, 6, false) == kChildBusy);
  l5.release();
  CHECK(try_in_child(run.path(), LockKind::kLayer, 5, true) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kContainer, 5, true) == kChildBusy);
}

TEST_CASE("a lock held by another process: EBUSY naming the holder, gone when it exits",
          "[locks]") {
  test::TempDir run;
  test::Pipe ready;  // child -> parent: "I hold it"
  test::Pipe done;   // parent -> child: closed when the child may exit
  test::Child child([&]() -> int {
    done.write_end.reset();
    auto table = LockTable::open(run.path());
    if (!table.ok()) return kChildNoTable;
    auto lock = (*table)->try_lock(LockKind::kContainer, 42, true, "container \"web\"");
    if (!lock.ok()) return kChildOtherError;
    auto layer_lock = (*table)->try_lock(LockKind::kLayer, 42, false, "layer 42");
    if (!layer_lock.ok()) return kChildOtherError;
    test::write_byte(ready.write_end.get());
    test::read_byte(done.read_end.get());  // returns at EOF: the parent closed its end
    return kChildGotLock;
  });
  ready.write_end.reset();
  done.read_end.reset();
  REQUIRE(test::read_byte(ready.read_end.get()));

  auto table = MUST(LockTable::open(run.path()));
  const std::string holder = "pid " + std::to_string(child.pid());
  CHECK(MUST(table->is_locked(LockKind::kContainer, 42)));
  CHECK(MUST(table->is_locked(LockKind::kLayer, 42)));  // shared conflicts with exclusive
  CHECK_FALSE(MUST(table->is_locked(LockKind::kContainer, 41)));
  CHECK_FALSE(MUST(table->is_locked(LockKind::kLayer, 43)));
  CHECK(table->holder_of(42) == holder);

  auto busy = table->try_lock(LockKind::kContainer, 42, true, "container \"web\"");
  REQUIRE_FALSE(busy.ok());
  CHECK(busy.error().code == EBUSY);
  CHECK_THAT(busy.error().message, Catch::Contains("container \"web\""));
  CHECK_THAT(busy.error().message, Catch::Contains(holder));
  // Shared is refused too while another process holds it exclusively.
  REQUIRE_ERRNO(table->try_lock(LockKind::kContainer, 42, false, "container \"web\""), EBUSY);
  // The child's shared layer lock allows shared, refuses exclusive.
  {
    Lock shared_layer = MUST(table->try_lock(LockKind::kLayer, 42, false, "layer 42"));
    CHECK(shared_layer.held());
  }
  REQUIRE_ERRNO(table->try_lock(LockKind::kLayer, 42, true, "layer 42"), EBUSY);
  // A failed attempt leaves nothing behind in our table: the same request fails the same way.
  REQUIRE_ERRNO(table->try_lock(LockKind::kContainer, 42, true, "container \"web\""), EBUSY);

  // Let the child exit: its locks vanish with it.
  done.write_end.reset();
  REQUIRE(child.wait() == kChildGotLock);
  CHECK_FALSE(MUST(table->is_locked(LockKind::kContainer, 42)));
  CHECK_FALSE(MUST(table->is_locked(LockKind::kLayer, 42)));
  Lock mine = MUST(table->try_lock(LockKind::kContainer, 42, true, "container \"web\""));
  CHECK(mine.held());
  Lock layer_x = MUST(table->try_lock(LockKind::kLayer, 42, true, "layer 42"));
  // We are now the recorded holder.
  CHECK(table->holder_of(42) == "pid " + std::to_string(::getpid()));
}

TEST_CASE("a process killed while holding a lock releases it", "[locks]") {
  test::TempDir run;
  test::Pipe ready;
  auto child = std::make_unique<test::Child>([&]() -> int {
    auto table = LockTable::open(run.path());
    if (!table.ok()) return kChildNoTable;
    auto lock = (*table)->try_lock(LockKind::kContainer, 9, true, "container \"k\"");
    if (!lock.ok()) return kChildOtherError;
    test::write_byte(ready.write_end.get());
    for (;;) ::pause();
  });
  ready.write_end.reset();
  REQUIRE(test::read_byte(ready.read_end.get()));
  auto table = MUST(LockTable::open(run.path()));
  REQUIRE_ERRNO(table->try_lock(LockKind::kContainer, 9, true, "container \"k\""), EBUSY);
  child.reset();  // SIGKILL and reap
  Lock mine = MUST(table->try_lock(LockKind::kContainer, 9, true, "container \"k\""));
  CHECK(mine.held());
}

namespace {

std::string holder_record(const test::TempDir& run, uint64_t container_id) {
  const std::string path = run.sub("holders/" + std::to_string(container_id));
  if (!std::filesystem::exists(path)) return "";
  auto bytes = test::read_file(path);
  return std::string(bytes.begin(), bytes.end());
}

size_t holder_files(const test::TempDir& run) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(run.sub("holders")))
    ++n;
  return n;
}

// The descriptor this process has open on `path`, found through /proc/self/fd; -1 if none.
int fd_open_on(const std::string& path) {
  const auto want = std::filesystem::canonical(path);
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec);
    if (!ec && target == want) return std::stoi(e.path().filename().string());
  }
  return -1;
}

}  // namespace

TEST_CASE("a container's holder record lives exactly as long as its exclusive lock", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  const std::string mine = "pid " + std::to_string(::getpid()) + "\n";
  {
    Lock x = MUST(table->try_lock(LockKind::kContainer, 8, true, "container 8"));
    CHECK(holder_record(run, 8) == mine);
    CHECK(table->holder_of(8) == "pid " + std::to_string(::getpid()));
  }
  CHECK(holder_record(run, 8).empty());
  CHECK(holder_files(run) == 0);

  // Shared container locks and layer locks write no record.
  {
    Lock s1 = MUST(table->try_lock(LockKind::kContainer, 8, false, "container 8"));
    Lock s2 = MUST(table->try_lock(LockKind::kContainer, 8, false, "container 8"));
    Lock l = MUST(table->try_lock(LockKind::kLayer, 8, true, "layer 8"));
    CHECK(holder_files(run) == 0);
  }

  // Open/close probes (every nbdinfo --list opens every export) leave nothing behind.
  for (uint64_t id = 100; id < 300; ++id) {
    Lock x = MUST(table->try_lock(LockKind::kContainer, id, true, "probe"));
  }
  CHECK(holder_files(run) == 0);
}

TEST_CASE("a holder record that does not name this process is not removed", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  Lock x = MUST(table->try_lock(LockKind::kContainer, 5, true, "container 5"));
  // Our own write of the record failed, say, and an old one is in its place.
  {
    test::Fd fd(::open(run.sub("holders/5").c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
    REQUIRE(fd.get() >= 0);
    test::pwrite_all(fd.get(), "pid 1\n", 6, 0);
  }
  x.release();
  CHECK(holder_record(run, 5) == "pid 1\n");
}

TEST_CASE("a stale holder record of a killed process is replaced, then removed", "[locks]") {
  test::TempDir run;
  test::Pipe ready;
  auto child = std::make_unique<test::Child>([&]() -> int {
    auto table = LockTable::open(run.path());
    if (!table.ok()) return kChildNoTable;
    auto lock = (*table)->try_lock(LockKind::kContainer, 12, true, "container 12");
    if (!lock.ok()) return kChildOtherError;
    test::write_byte(ready.write_end.get());
    for (;;) ::pause();
  });
  ready.write_end.reset();
  REQUIRE(test::read_byte(ready.read_end.get()));
  const pid_t dead = child->pid();
  child.reset();  // SIGKILL: its record stays behind, stale
  auto table = MUST(LockTable::open(run.path()));
  CHECK(holder_record(run, 12) == "pid " + std::to_string(dead) + "\n");
  CHECK_FALSE(MUST(table->is_locked(LockKind::kContainer, 12)));
  {
    Lock x = MUST(table->try_lock(LockKind::kContainer, 12, true, "container 12"));
    CHECK(holder_record(run, 12) == "pid " + std::to_string(::getpid()) + "\n");
  }
  CHECK(holder_files(run) == 0);
}

TEST_CASE("is_locked reports a failed F_OFD_GETLK as an error, not as unlocked", "[locks]") {
  test::TempDir run;
  // In a child, whose copy of the table can be broken without harm: close the descriptor the
  // table holds on run/locks behind its back, so fcntl fails with EBADF.
  test::Child child([&]() -> int {
    auto table = LockTable::open(run.path());
    if (!table.ok()) return kChildNoTable;
    const int fd = fd_open_on(run.sub("locks"));
    if (fd < 0) return 10;
    ::close(fd);
    auto r = (*table)->is_locked(LockKind::kContainer, 77);
    if (r.ok()) return 11;
    if (r.error().code != EBADF) return 12;
    if (r.error().message.find("locks") == std::string::npos) return 13;
    return 0;
  });
  CHECK(child.wait() == 0);
}

TEST_CASE("downgrade keeps the byte and lets other processes read", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  Lock lock = MUST(table->try_lock(LockKind::kLayer, 21, true, "layer 21"));
  CHECK(try_in_child(run.path(), LockKind::kLayer, 21, false) == kChildBusy);
  REQUIRE_OK(lock.downgrade());
  CHECK_FALSE(lock.exclusive());
  CHECK(try_in_child(run.path(), LockKind::kLayer, 21, false) == kChildGotLock);
  CHECK(try_in_child(run.path(), LockKind::kLayer, 21, true) == kChildBusy);
  // Shared now: another holder in this process may join.
  Lock second = MUST(table->try_lock(LockKind::kLayer, 21, false, "layer 21"));
  lock.release();
  CHECK(try_in_child(run.path(), LockKind::kLayer, 21, true) == kChildBusy);
  second.release();
  CHECK(try_in_child(run.path(), LockKind::kLayer, 21, true) == kChildGotLock);
}

TEST_CASE("held_by_others counts this process's extra holders, not its own", "[locks]") {
  test::TempDir run;
  auto table = MUST(LockTable::open(run.path()));
  CHECK_FALSE(MUST(table->held_by_others(LockKind::kLayer, 5, 0)));
  Lock a = MUST(table->try_lock(LockKind::kLayer, 5, false, "layer 5"));
  CHECK_FALSE(MUST(table->held_by_others(LockKind::kLayer, 5, 1)));
  CHECK(MUST(table->held_by_others(LockKind::kLayer, 5, 0)));
  Lock b = MUST(table->try_lock(LockKind::kLayer, 5, false, "layer 5"));
  CHECK(MUST(table->held_by_others(LockKind::kLayer, 5, 1)));
  b.release();
  // Another process holding it shared (a child that keeps it until told to go).
  int to_child[2], from_child[2];
  REQUIRE(::pipe(to_child) == 0);
  REQUIRE(::pipe(from_child) == 0);
  test::Child child([&]() -> int {
    auto t = LockTable::open(run.path());
    if (!t) return 1;
    auto l = (*t)->try_lock(LockKind::kLayer, 5, false, "layer 5");
    if (!l) return 2;
    char c = 'x';
    if (::write(from_child[1], &c, 1) != 1) return 3;
    if (::read(to_child[0], &c, 1) != 1) return 4;
    return 0;
  });
  char c;
  REQUIRE(::read(from_child[0], &c, 1) == 1);
  CHECK(MUST(table->held_by_others(LockKind::kLayer, 5, 1)));
  REQUIRE(::write(to_child[1], &c, 1) == 1);
  CHECK(child.wait() == 0);
  CHECK_FALSE(MUST(table->held_by_others(LockKind::kLayer, 5, 1)));
  for (int fd : {to_child[0], to_child[1], from_child[0], from_child[1]}) ::close(fd);
}

TEST_CASE("holder_pid reads the pid of a holder note, and 0 from anything else", "[locks]") {
  CHECK(holder_pid("pid 1234") == 1234);
  CHECK(holder_pid("pid 1234\n") == 1234);
  CHECK(holder_pid("pid 7 (web1)") == 7);
  CHECK(holder_pid("pid 2147483647") == 2147483647);
  for (const char* none : {"", "another process", "pid ", "pid x", "pid -5", "PID 5", " pid 5"}) {
    INFO("note \"" << none << "\"");
    CHECK(holder_pid(none) == 0);
  }
  // fuzz_text found these: a number past INT_MAX overflowed pid_t (undefined behaviour; in
  // practice 2^32 + 1234 came out as 1234, another process).
  CHECK(holder_pid("pid 2147483648") == 0);
  CHECK(holder_pid("pid 4294968530") == 0);
  CHECK(holder_pid("pid 1232147483647:") == 0);
  CHECK(holder_pid("pid 99999999999999999999999999") == 0);
}
