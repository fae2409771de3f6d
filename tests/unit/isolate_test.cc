// Unit tests for lib/isolate.h: work in a child process, forked by the caller or by the fork
// server — answers, errors, crashes (EUCLEAN), deadlines, a passed descriptor — and what the
// fork server is for: a child that needs a lock another thread of the caller holds.
#include "isolate.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "test_util.h"

using namespace layer;

namespace {

Result<std::string> echo(const std::string& arg, int) { return "got " + arg; }

Result<std::string> fail_enoent(const std::string&, int) { return make_error(ENOENT, "gone"); }

Result<std::string> crash(const std::string& arg, int) {
  ::raise(std::stoi(arg));
  return std::string();
}

Result<std::string> spin(const std::string&, int) {
  for (;;) ::pause();
}

Result<std::string> quit(const std::string&, int) { ::_exit(5); }

Result<std::string> write_fd(const std::string& arg, int fd) {
  if (::write(fd, arg.data(), arg.size()) != static_cast<ssize_t>(arg.size()))
    return sys_error(errno, "write");
  return std::string("written");
}

std::mutex g_held;

Result<std::string> take_held(const std::string&, int) {
  std::lock_guard lock(g_held);
  return std::string("took it");
}

// Every kind of answer, the same whoever forks the child.
void check_answers() {
  CHECK(MUST(run_isolated("t", std::chrono::seconds(30), echo, "payload 1 2")) ==
        "got payload 1 2");
  const std::string binary("a\0b\nc", 5);
  CHECK(MUST(run_isolated("t", std::chrono::seconds(30), echo, binary)) == "got " + binary);
  auto err = run_isolated("t", std::chrono::seconds(30), fail_enoent);
  REQUIRE_FALSE(err.ok());
  CHECK(err.error().code == ENOENT);
  CHECK(err.error().message == "gone");
  for (int sig : {SIGSEGV, SIGBUS, SIGABRT}) {
    auto crashed = run_isolated("reading x", std::chrono::seconds(30), crash, std::to_string(sig));
    REQUIRE_FALSE(crashed.ok());
    CHECK(crashed.error().code == EUCLEAN);
    INFO(crashed.error().message);
    CHECK(crashed.error().message.starts_with("reading x crashed with SIG"));
  }
  auto loop = run_isolated("spinning", std::chrono::seconds(1), spin);
  REQUIRE_FALSE(loop.ok());
  CHECK(loop.error().code == EUCLEAN);
  CHECK(loop.error().message.find("did not finish in 1 s") != std::string::npos);
  auto quitting = run_isolated("quitting", std::chrono::seconds(30), quit);
  REQUIRE_FALSE(quitting.ok());
  CHECK(quitting.error().code == EIO);
  CHECK(quitting.error().message.find("status 5") != std::string::npos);
  auto big = run_isolated("t", std::chrono::seconds(30), echo, std::string(65 * 1024, 'x'));
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().code == EINVAL);
  // The child writes into a descriptor the caller passed.
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  CHECK(MUST(run_isolated("t", std::chrono::seconds(30), write_fd, "through the pipe", fds[1])) ==
        "written");
  ::close(fds[1]);
  char buf[64] = {};
  CHECK(::read(fds[0], buf, sizeof buf) == 16);
  CHECK(std::string(buf) == "through the pipe");
  ::close(fds[0]);
}

// Runs `body` while another thread exists: that thread runs `hold` first (what it returns, a
// lock for instance, it keeps) and parks until body has returned. Returns body's result.
template <typename Hold, typename Body>
auto with_parked_thread(Hold hold, Body body) {
  std::mutex mu;
  std::condition_variable cv;
  bool ready = false, done = false;
  std::thread other([&] {
    std::unique_lock lock(mu);
    [[maybe_unused]] auto kept = hold();
    ready = true;
    cv.notify_all();
    cv.wait(lock, [&] { return done; });
  });
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return ready; });
  }
  auto result = body();
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_all();
  other.join();
  return result;
}

// Starts the fork server; false (and says why) when this build cannot: TSan's runtime keeps a
// thread of its own, so the process never has one thread.
bool start_or_explain() {
  auto started = start_fork_server();
  if (started) return true;
  REQUIRE(started.error().code == EBUSY);
  WARN("no fork server in this build: " << started.error().message);
  return false;
}

}  // namespace

TEST_CASE("run_isolated without a fork server forks the child itself", "[isolate]") {
  stop_fork_server();
  REQUIRE(fork_server_pid() == -1);
  check_answers();
}

TEST_CASE("run_isolated through the fork server", "[isolate]") {
  if (!start_or_explain()) return;
  const int server = fork_server_pid();
  REQUIRE(server > 0);
  check_answers();
  CHECK(fork_server_pid() == server);  // one fork server served them all
  stop_fork_server();
  CHECK(fork_server_pid() == -1);
  CHECK(::kill(server, 0) != 0);  // reaped
}

TEST_CASE("a fork server's child does not inherit a lock another thread holds", "[isolate]") {
  if (!start_or_explain()) return;
  // Another thread takes the lock and keeps it while this one runs work that needs it: forked
  // from here, the child would start with the lock held by a thread it does not have, and
  // wait for ever (the deadline reads it as damage). The fork server forked before.
  auto r = with_parked_thread(
      [] { return std::unique_lock(g_held); },
      [] { return run_isolated("taking a lock", std::chrono::seconds(30), take_held); });
  REQUIRE(r.ok());
  CHECK(*r == "took it");
  stop_fork_server();
}

TEST_CASE("a dead fork server is replaced by forks of the caller", "[isolate]") {
  if (!start_or_explain()) return;
  const int server = fork_server_pid();
  REQUIRE(::kill(server, SIGKILL) == 0);
  // The request that finds it dead still runs, forked here; the dead one is reaped.
  CHECK(MUST(run_isolated("t", std::chrono::seconds(30), echo, "after")) == "got after");
  CHECK(fork_server_pid() == -1);
  CHECK(::waitpid(server, nullptr, WNOHANG) < 0);
}

TEST_CASE("a fork server starts only in a process of one thread", "[isolate]") {
  stop_fork_server();
  auto r = with_parked_thread([] { return 0; }, [] { return start_fork_server(); });
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EBUSY);
  CHECK(fork_server_pid() == -1);
}
