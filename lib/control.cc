// control.cc — the control socket: one thread, one request per connection, every wait bounded.
//
// All socket I/O is non-blocking behind poll() with a deadline, and the server's polls also watch
// its wake eventfd, so neither a silent client nor one that never reads its reply can hold the
// thread past read_timeout, nor the destructor at all (short of a handler still running).
#include "control.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <system_error>
#include <utility>

namespace layer {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr size_t kMaxResponseBytes = 16 << 20;

// Closes an fd on every path; release() hands it over.
class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

Result<sockaddr_un> socket_address(const std::string& path) {
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return make_error(EINVAL, "control socket path is empty");
  if (path.size() >= sizeof(addr.sun_path))
    return make_error(ENAMETOOLONG, "control socket path {} is longer than {} bytes", path,
                      sizeof(addr.sun_path) - 1);
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// 0 or the errno of connect().
int connect_to(int fd, const sockaddr_un& addr) {
  return ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 ? 0 : errno;
}

// Waits for `events` on fd until the deadline. wake_fd (-1: none) readable means stop.
// Errors: ETIMEDOUT, ECANCELED (woken), the errno of poll.
Status wait_for(int fd, short events, Clock::time_point deadline, int wake_fd) {
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return make_error(ETIMEDOUT, "timed out");
    pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    if (::poll(fds, 2, static_cast<int>(std::min<int64_t>(left.count(), INT_MAX))) < 0) {
      if (errno == EINTR) continue;
      return sys_error(errno, "poll");
    }
    if (fds[1].revents != 0) return make_error(ECANCELED, "the server is stopping");
    if (fds[0].revents != 0) return {};  // errors and hangups show in the next send/recv
  }
}

// MSG_NOSIGNAL: a peer that has gone is EPIPE, not a SIGPIPE that kills the process.
Status send_all(int fd, std::string_view data, Clock::time_point deadline, int wake_fd) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (errno == EAGAIN) {
      LAYER_TRY(wait_for(fd, POLLOUT, deadline, wake_fd));
    } else if (errno != EINTR) {
      return sys_error(errno, "send");
    }
  }
  return {};
}

// One '\n'-ended line of at most max_bytes, returned without its '\n'; bytes after it are
// ignored. Errors: EMSGSIZE (longer), ENODATA (closed before sending a byte), EIO (closed
// within the line), ETIMEDOUT, ECANCELED, the errno of recv.
Result<std::string> read_line(int fd, size_t max_bytes, Clock::time_point deadline, int wake_fd) {
  std::string line;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      line.append(buf, static_cast<size_t>(n));
      const size_t end = line.find('\n', line.size() - static_cast<size_t>(n));
      if (std::min(end, line.size()) > max_bytes)
        return make_error(EMSGSIZE, "line longer than {} bytes", max_bytes);
      if (end == std::string::npos) continue;
      line.resize(end);
      return line;
    }
    if (n == 0 && line.empty()) return make_error(ENODATA, "closed without sending anything");
    if (n == 0) return make_error(EIO, "closed in the middle of a line");
    if (errno == EAGAIN) {
      LAYER_TRY(wait_for(fd, POLLIN, deadline, wake_fd));
    } else if (errno != EINTR) {
      return sys_error(errno, "recv");
    }
  }
}

std::string dump_line(const json& j) {
  // Paths and messages may hold bytes that are not UTF-8; never let that fail the reply.
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + '\n';
}

json reply_to(const ControlServer::Handler& handler, const std::string& line) {
  json request;
  try {
    request = json::parse(line);
  } catch (const json::exception& e) {
    return control_error(make_error(EINVAL, "control request is not JSON: {}", e.what()));
  }
  if (!request.is_object())
    return control_error(make_error(EINVAL, "control request is not a JSON object"));
  try {
    return handler(request);
  } catch (const std::exception& e) {
    return control_error(make_error(EIO, "control request failed: {}", e.what()));
  } catch (...) {
    return control_error(make_error(EIO, "control request failed: unknown exception"));
  }
}

// A socket file that refuses connections was left by a server that died: remove it. A server
// that accepts, or is too busy to (a full backlog: EAGAIN), keeps its socket.
Status remove_stale(const std::string& path, const sockaddr_un& addr) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0)
    return errno == ENOENT ? Status() : sys_error(errno, "lstat {}", path);
  if (!S_ISSOCK(st.st_mode))
    return make_error(EEXIST, "{} exists and is not a control socket; not removing it", path);
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (probe.get() < 0) return sys_error(errno, "socket to probe {}", path);
  const int err = connect_to(probe.get(), addr);
  if (err == 0 || err == EAGAIN)
    return make_error(EADDRINUSE, "control socket {} is in use by a running server", path);
  if (err != ECONNREFUSED) return sys_error(err, "probe control socket {}", path);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return sys_error(errno, "remove stale control socket {}", path);
  return {};
}

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::start(
    const std::string& path, Handler handler, std::chrono::milliseconds read_timeout) {
  LAYER_ASSIGN(const sockaddr_un addr, socket_address(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return sys_error(errno, "socket for {}", path);
  // Linux's bind() gives the file the socket inode's mode less the umask: it is never open to
  // others, not even between bind and a chmod.
  if (::fchmod(fd.get(), 0600) != 0) return sys_error(errno, "fchmod control socket {}", path);
  const auto* sa = reinterpret_cast<const sockaddr*>(&addr);
  if (::bind(fd.get(), sa, sizeof addr) != 0) {
    if (errno != EADDRINUSE) return sys_error(errno, "bind control socket {}", path);
    LAYER_TRY(remove_stale(path, addr));
    if (::bind(fd.get(), sa, sizeof addr) != 0)
      return sys_error(errno, "bind control socket {}", path);
  }
  // From here the destructor cleans up whatever fails: it unlinks the file once bound_ is set.
  std::unique_ptr<ControlServer> server(new ControlServer(path, std::move(handler), read_timeout));
  server->listen_fd_ = fd.release();
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    server->bound_ = true;
    server->dev_ = st.st_dev;
    server->ino_ = st.st_ino;
  }
  if (::listen(server->listen_fd_, 16) != 0) return sys_error(errno, "listen on {}", path);
  server->wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (server->wake_fd_ < 0) return sys_error(errno, "eventfd for control socket {}", path);
  // Non-blocking: every worker polls it, and those that lose the race for a connection must
  // not block in accept (where the stop signal would not reach them).
  const int flags = ::fcntl(server->listen_fd_, F_GETFL);
  if (flags < 0 || ::fcntl(server->listen_fd_, F_SETFL, flags | O_NONBLOCK) != 0)
    return sys_error(errno, "make control socket {} non-blocking", path);
  try {
    for (int i = 0; i < kWorkers; ++i)
      server->threads_.emplace_back([s = server.get()] { s->run(); });
  } catch (const std::system_error& e) {
    return make_error(EAGAIN, "start the threads of control socket {}: {}", path, e.what());
  }
  return server;
}

ControlServer::~ControlServer() {
  if (!threads_.empty()) {
    // Nobody reads the eventfd: it stays readable, and every worker sees it.
    const uint64_t one = 1;
    // Cannot fail: the fd is ours and the counter is far from overflowing.
    if (::write(wake_fd_, &one, sizeof one) < 0) {
    }
    for (auto& t : threads_) t.join();
  }
  struct stat st;
  if (bound_ && ::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_)
    ::unlink(path_.c_str());
  if (wake_fd_ >= 0) ::close(wake_fd_);
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

void ControlServer::run() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno != EINTR) pause_briefly();  // ENOMEM
      continue;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    const int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (conn >= 0) {
      serve(conn);
      ::close(conn);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
      continue;  // another worker took it, or the client left
    } else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      pause_briefly();  // the connection stays queued; do not spin on it
    }
  }
}

// Waits 100 ms, or less if the destructor asks to stop.
void ControlServer::pause_briefly() {
  pollfd wake = {wake_fd_, POLLIN, 0};
  ::poll(&wake, 1, 100);
}

void ControlServer::serve(int fd) noexcept {
  try {
    json reply;
    auto line = read_line(fd, kMaxRequestBytes, Clock::now() + read_timeout_, wake_fd_);
    if (line.ok()) {
      reply = reply_to(handler_, *line);
    } else if (line.error().code == EMSGSIZE) {
      reply = control_error(
          make_error(EINVAL, "control request longer than {} bytes", kMaxRequestBytes));
    } else {
      return;  // silent, gone or stopping: no one to answer (a stale-socket probe ends here)
    }
    // A client that does not take its reply within read_timeout loses it.
    (void)send_all(fd, dump_line(reply), Clock::now() + read_timeout_, wake_fd_);
  } catch (...) {
    // Only an allocation can fail here: the connection is dropped and the next one served.
  }
}

Result<json> control_request(const std::string& path, const json& request,
                             std::chrono::milliseconds timeout) {
  LAYER_ASSIGN(const sockaddr_un addr, socket_address(path));
  const auto deadline = Clock::now() + timeout;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return sys_error(errno, "socket for {}", path);
  // A blocking unix connect waits only while the server's backlog is full, for SO_SNDTIMEO at
  // most (then EAGAIN); 0 would mean forever.
  const auto us =
      std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::microseconds>(timeout).count());
  const timeval tv = {static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
    return sys_error(errno, "set the send timeout of a socket for {}", path);
  if (const int err = connect_to(fd.get(), addr); err != 0) {
    if (err == ENOENT || err == ECONNREFUSED)
      return make_error(err, "no server is listening on control socket {}", path);
    if (err == EAGAIN)
      return make_error(ETIMEDOUT, "control socket {}: the server did not accept within {} ms",
                        path, timeout.count());
    return sys_error(err, "connect to control socket {}", path);
  }
  Result<std::string> reply = std::string();
  if (auto sent = send_all(fd.get(), dump_line(request), deadline, -1); !sent.ok())
    reply = std::move(sent).error();
  else
    reply = read_line(fd.get(), kMaxResponseBytes, deadline, -1);
  if (!reply.ok()) {
    if (reply.error().code == ETIMEDOUT)
      return make_error(ETIMEDOUT, "control socket {}: no reply within {} ms", path,
                        timeout.count());
    return make_error(EIO, "control socket {}: no reply: {}", path, reply.error().message);
  }
  try {
    return json::parse(*reply);
  } catch (const json::exception& e) {
    return make_error(EIO, "control socket {}: the reply is not JSON: {}", path, e.what());
  }
}

json control_error(const Error& e) {
  return {{"ok", false}, {"errno", errno_name(e.code)}, {"code", e.code}, {"message", e.message}};
}

Status control_status(const json& response) {
  const auto ok = response.find("ok");  // end() for a reply that is not an object
  if (ok == response.end() || !ok->is_boolean())
    return make_error(EIO, "control reply without \"ok\": {}", dump_line(response));
  if (ok->get<bool>()) return {};
  int code = EIO;
  const auto code_it = response.find("code");
  const auto name_it = response.find("errno");
  if (code_it != response.end() && code_it->is_number_integer() && code_it->get<int>() > 0)
    code = code_it->get<int>();
  else if (name_it != response.end() && name_it->is_string())
    code = errno_code(name_it->get<std::string>());
  const auto message = response.find("message");
  if (message == response.end() || !message->is_string())
    return make_error(code, "the server reported {} without a message", errno_name(code));
  return Error{code, message->get<std::string>()};
}

std::string control_socket_path(const std::string& run_dir, pid_t pid) {
  return fmt::format("{}/srv-{}.sock", run_dir, pid);
}

}  // namespace layer
