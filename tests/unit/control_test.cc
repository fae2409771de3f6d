// Unit tests for lib/control.h: request round trips, error replies (handler exceptions, bad
// JSON, oversized requests), clients that stay silent, concurrent clients, the socket file's
// life (mode, stale files replaced, live ones refused, unlinked only if still ours) and the
// wire error form.
#include "control.h"

#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "test_util.h"

using namespace layer;
using nlohmann::json;

namespace {

// A handler that echoes the request and counts its calls.
struct Echo {
  std::atomic<int> calls{0};
  ControlServer::Handler handler() {
    return [this](const json& request) {
      ++calls;
      return json{{"ok", true}, {"echo", request}};
    };
  }
};

sockaddr_un address_of(const std::string& path) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof(addr.sun_path));
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// A raw client connection, its reads bounded so a broken server fails the test, not hangs it.
test::Fd connect_raw(const std::string& path) {
  test::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.get() >= 0);
  const timeval tv = {30, 0};
  REQUIRE(::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
  const sockaddr_un addr = address_of(path);
  REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

void send_raw(int fd, const std::string& data) {
  REQUIRE(::send(fd, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size()));
}

// Everything the server sends until it closes.
std::string read_to_eof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) FAIL("recv: " << std::strerror(errno));
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

json raw_request(const std::string& path, const std::string& data) {
  test::Fd fd = connect_raw(path);
  send_raw(fd.get(), data);
  const std::string reply = read_to_eof(fd.get());
  REQUIRE(!reply.empty());
  REQUIRE(reply.back() == '\n');
  return json::parse(reply);
}

// A socket file nobody accepts on, as a server that died leaves it.
void make_stale_socket(const std::string& path) {
  test::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const sockaddr_un addr = address_of(path);
  REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
}

ino_t inode_of(const std::string& path) {
  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("a request makes a round trip", "[control]") {
  test::TempDir run;
  const std::string path = control_socket_path(run.path(), 1234);
  CHECK(path == run.path() + "/srv-1234.sock");
  Echo echo;
  auto server = MUST(ControlServer::start(path, echo.handler()));
  CHECK(server->path() == path);

  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0600);

  const json request = {{"op", "snapshot"}, {"container", "web1"}, {"name", "s\xc3\xa9"}};
  const json reply = MUST(control_request(path, request));
  CHECK(reply["echo"] == request);
  MUST(control_status(reply));
  // One connection per request: a second one is served too.
  CHECK(MUST(control_request(path, json{{"op", "ping"}}))["echo"]["op"] == "ping");
  CHECK(echo.calls == 2);
}

TEST_CASE("a handler that throws gets an EIO reply and the server goes on", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  auto server = MUST(ControlServer::start(path, [](const json& request) -> json {
    if (request["op"] == "boom") throw std::runtime_error("disk on fire");
    if (request["op"] == "int") throw 42;
    return json{{"ok", true}};
  }));

  const json reply = MUST(control_request(path, json{{"op", "boom"}}));
  CHECK(reply["ok"] == false);
  CHECK(reply["errno"] == "EIO");
  CHECK(reply["code"] == EIO);
  const Status status = control_status(reply);
  REQUIRE_FALSE(status.ok());
  CHECK(status.error().code == EIO);
  CHECK_THAT(status.error().message, Catch::Contains("disk on fire"));

  CHECK(MUST(control_request(path, json{{"op", "int"}}))["errno"] == "EIO");
  MUST(control_status(MUST(control_request(path, json{{"op", "ok"}}))));
}

TEST_CASE("bad requests get EINVAL without reaching the handler", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  Echo echo;
  auto server = MUST(ControlServer::start(path, echo.handler()));

  for (const std::string bad : {"{\"op\": \n", "not json\n", "[1, 2]\n", "\"op\"\n"}) {
    INFO(bad);
    const json reply = raw_request(path, bad);
    CHECK(reply["ok"] == false);
    CHECK(reply["errno"] == "EINVAL");
    CHECK(reply["code"] == EINVAL);
    CHECK(reply["message"].is_string());
  }
  // Longer than 64 KiB, with no newline in sight.
  const json big = raw_request(path, std::string(ControlServer::kMaxRequestBytes + 10, ' '));
  CHECK(big["errno"] == "EINVAL");
  CHECK(echo.calls == 0);
  // A request of exactly the limit is fine.
  std::string exact = "{\"pad\":\"\"}";
  exact.insert(8, ControlServer::kMaxRequestBytes - exact.size(), 'x');
  CHECK(raw_request(path, exact + "\n")["ok"] == true);
  CHECK(echo.calls == 1);
}

TEST_CASE("a request to a path with no server fails and names the path", "[control]") {
  test::TempDir run;
  const std::string missing = run.sub("srv-1.sock");
  auto e = ERROR_OF(control_request(missing, json{{"op", "ping"}}));
  CHECK(e.code == ENOENT);
  CHECK_THAT(e.message, Catch::Contains(missing));

  const std::string stale = run.sub("srv-2.sock");
  make_stale_socket(stale);
  e = ERROR_OF(control_request(stale, json{{"op", "ping"}}));
  CHECK(e.code == ECONNREFUSED);
  CHECK_THAT(e.message, Catch::Contains(stale));

  const std::string too_long = run.path() + "/" + std::string(200, 'x');
  REQUIRE_ERRNO(control_request(too_long, json::object()), ENAMETOOLONG);
  REQUIRE_ERRNO(ControlServer::start(too_long, Echo().handler()), ENAMETOOLONG);
}

TEST_CASE("a silent client does not hold up the next request", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  Echo echo;
  auto server = MUST(ControlServer::start(path, echo.handler(), std::chrono::milliseconds(100)));
  test::Fd silent = connect_raw(path);
  test::Fd half = connect_raw(path);
  send_raw(half.get(), "{\"op\":");  // never finished
  CHECK(MUST(control_request(path, json{{"op", "ping"}}, std::chrono::seconds(30)))["ok"] == true);
  CHECK(echo.calls == 1);
  // Both were dropped without a reply.
  CHECK(read_to_eof(silent.get()).empty());
  CHECK(read_to_eof(half.get()).empty());
}

TEST_CASE("the destructor does not wait for a silent client", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  auto server = MUST(ControlServer::start(path, Echo().handler(), std::chrono::hours(1)));
  test::Fd silent = connect_raw(path);
  send_raw(silent.get(), "{");
  // Wait until the server has read the byte, so it is inside the connection's read.
  int unread = 1;
  while (unread != 0 && ::ioctl(silent.get(), SIOCOUTQ, &unread) == 0) {
  }
  REQUIRE(unread == 0);
  server.reset();  // would hang for the hour if the read did not watch the stop signal
  CHECK(read_to_eof(silent.get()).empty());
}

TEST_CASE("requests from many threads are served, at most kWorkers at a time", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  std::mutex mu;
  int in_handler = 0;      // GUARDED_BY(mu)
  int max_in_handler = 0;  // GUARDED_BY(mu)
  std::atomic<int> calls{0};
  auto server = MUST(ControlServer::start(path, [&](const json& request) {
    {
      std::lock_guard<std::mutex> lk(mu);
      max_in_handler = std::max(max_in_handler, ++in_handler);
    }
    ++calls;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    {
      std::lock_guard<std::mutex> lk(mu);
      --in_handler;
    }
    return json{{"ok", true}, {"n", request["n"]}};
  }));
  constexpr int kThreads = 4, kEach = 25;
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; i++) {
        auto reply = control_request(path, json{{"n", t * kEach + i}});
        if (reply.ok() && (*reply)["n"] == t * kEach + i) ++good;
      }
    });
  }
  for (auto& th : threads) th.join();
  server.reset();  // joins the server thread before reading what the handler wrote
  CHECK(good == kThreads * kEach);
  CHECK(calls == kThreads * kEach);
  CHECK(max_in_handler >= 1);
  CHECK(max_in_handler <= ControlServer::kWorkers);
}

TEST_CASE("a long request does not hold up the next one", "[control]") {
  // A live delta's move holds its connection for as long as its copy takes; a snapshot of
  // another container, or a "moved" note, must not wait for it.
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  std::mutex mu;
  std::condition_variable cv;
  bool released = false;  // GUARDED_BY(mu)
  bool waiting = false;   // GUARDED_BY(mu): the slow request is in the handler
  auto server = MUST(ControlServer::start(path, [&](const json& request) {
    std::unique_lock<std::mutex> lk(mu);
    if (request["op"] == "release") {
      released = true;
      cv.notify_all();
      return json{{"ok", true}};
    }
    // "slow": waits for the release (10 s at most, so that a server that serves one request at
    // a time fails the test instead of hanging it).
    waiting = true;
    cv.notify_all();
    const bool got = cv.wait_for(lk, std::chrono::seconds(10), [&] { return released; });
    return json{{"ok", true}, {"released", got}};
  }));
  Result<json> slow = json();
  std::thread slow_client([&] { slow = control_request(path, json{{"op", "slow"}}); });
  {
    std::unique_lock<std::mutex> lk(mu);
    REQUIRE(cv.wait_for(lk, std::chrono::seconds(30), [&] { return waiting; }));
  }
  const auto start = std::chrono::steady_clock::now();
  CHECK(MUST(control_request(path, json{{"op", "release"}}))["ok"] == true);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  slow_client.join();
  REQUIRE(slow.ok());
  CHECK((*slow)["released"] == true);
}

TEST_CASE("the destructor removes the socket file, but only its own", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  auto server = MUST(ControlServer::start(path, Echo().handler()));
  REQUIRE(std::filesystem::exists(path));
  server.reset();
  CHECK_FALSE(std::filesystem::exists(path));
  REQUIRE_ERRNO(control_request(path, json::object()), ENOENT);

  // Someone replaced the file meanwhile: it stays.
  server = MUST(ControlServer::start(path, Echo().handler()));
  REQUIRE(::unlink(path.c_str()) == 0);
  make_stale_socket(path);
  const ino_t other = inode_of(path);
  server.reset();
  REQUIRE(std::filesystem::exists(path));
  CHECK(inode_of(path) == other);
}

TEST_CASE("a stale socket file is replaced; other files are not", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  make_stale_socket(path);
  REQUIRE_ERRNO(control_request(path, json::object()), ECONNREFUSED);
  Echo echo;
  auto server = MUST(ControlServer::start(path, echo.handler()));
  CHECK(MUST(control_request(path, json{{"op", "ping"}}))["ok"] == true);
  server.reset();

  const std::string file = run.sub("file");
  REQUIRE(::close(::open(file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) == 0);
  REQUIRE_ERRNO(ControlServer::start(file, echo.handler()), EEXIST);
  CHECK(std::filesystem::is_regular_file(file));
}

TEST_CASE("a second server on a live socket fails with EADDRINUSE", "[control]") {
  test::TempDir run;
  const std::string path = run.sub("srv.sock");
  Echo first;
  auto server = MUST(ControlServer::start(path, first.handler()));
  const ino_t ino = inode_of(path);
  Echo second;
  auto e = ERROR_OF(ControlServer::start(path, second.handler()));
  CHECK(e.code == EADDRINUSE);
  CHECK_THAT(e.message, Catch::Contains(path));
  // The first server keeps its socket and still answers (its probe connection was dropped).
  CHECK(inode_of(path) == ino);
  CHECK(MUST(control_request(path, json{{"op", "ping"}}))["ok"] == true);
  CHECK(first.calls == 1);
  CHECK(second.calls == 0);
}

TEST_CASE("errors cross the wire with their errno", "[control]") {
  const json busy = control_error(make_error(EBUSY, "container \"web1\" is busy"));
  CHECK(busy == json{{"ok", false},
                     {"errno", "EBUSY"},
                     {"code", EBUSY},
                     {"message", "container \"web1\" is busy"}});
  Status s = control_status(busy);
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code == EBUSY);
  CHECK(s.error().message == "container \"web1\" is busy");

  CHECK(control_error(Error{ENOTSUP, "x"})["errno"] == "ENOTSUP");
  // Without "code", the errno name is read back.
  s = control_status(json{{"ok", false}, {"errno", "ENOSPC"}, {"message", "full"}});
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code == ENOSPC);
  s = control_status(json{{"ok", false}, {"errno", "ENOTSUP"}});
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code == ENOTSUP);
  CHECK_ERRNO(control_status(json{{"ok", false}, {"errno", "EWHATEVER"}}), EIO);

  MUST(control_status(json{{"ok", true}, {"id", 7}}));
  CHECK_ERRNO(control_status(json{{"id", 7}}), EIO);
  CHECK_ERRNO(control_status(json{{"ok", "yes"}}), EIO);
  CHECK_ERRNO(control_status(json::array({1, 2})), EIO);
}
