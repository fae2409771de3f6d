// qmp.cc — the QMP client and the live memory change of `layer set` (qmp.h).
#include "qmp.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

#include "output.h"

namespace layer_cli {
namespace {

using Clock = std::chrono::steady_clock;
using layer::make_error;
using layer::Result;
using layer::sys_error;

// A reply larger than this is not one of the few commands this client sends.
constexpr size_t kMaxMessageBytes = 1 << 20;

int ms_left(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, 60'000));
}

// The QMP error of a reply as "class: desc".
std::string error_text(const nlohmann::json& error) {
  std::string cls = error.value("class", "");
  std::string desc = error.value("desc", "");
  return cls.empty() ? desc : cls + ": " + desc;
}

}  // namespace

Result<QmpSession> QmpSession::connect(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return make_error(ENAMETOOLONG, "QMP socket path {} does not fit in a unix socket address",
                      path);
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return sys_error(errno, "socket for {}", path);
  QmpSession session(fd, path, timeout);
  const auto deadline = Clock::now() + timeout;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    if (err == ENOENT || err == ECONNREFUSED)
      return make_error(err, "nothing listens on QMP socket {}", path);
    if (err != EAGAIN && err != EINPROGRESS) return sys_error(err, "connect to {}", path);
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, ms_left(deadline)) <= 0)
      return make_error(ETIMEDOUT, "QMP socket {}: qemu did not accept within {} ms", path,
                        timeout.count());
  }
  LAYER_ASSIGN(const auto greeting, session.read_message(deadline));
  if (!greeting.is_object() || !greeting.contains("QMP"))
    return make_error(EPROTO, "{} is not a QMP socket: it greeted with {}", path, greeting.dump());
  LAYER_TRY(session.execute("qmp_capabilities"));
  return Result<QmpSession>(std::move(session));
}

Result<nlohmann::json> QmpSession::execute(const std::string& command,
                                           const nlohmann::json& arguments) {
  const auto deadline = Clock::now() + timeout_;
  nlohmann::json request{{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  const std::string line = request.dump() + "\n";
  size_t sent = 0;
  while (sent < line.size()) {
    const ssize_t n = ::send(fd_, line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) return sys_error(errno, "QMP socket {}: send {}", path_, command);
    pollfd p{fd_, POLLOUT, 0};
    if (::poll(&p, 1, ms_left(deadline)) <= 0)
      return make_error(ETIMEDOUT, "QMP socket {}: {} not sent within {} ms", path_, command,
                        timeout_.count());
  }
  LAYER_ASSIGN(auto reply, read_message(deadline));
  if (!reply.is_object())
    return make_error(EIO, "QMP socket {}: a reply to {} that is not an object: {}", path_, command,
                      reply.dump());
  if (const auto error = reply.find("error"); error != reply.end())
    return make_error(EREMOTEIO, "qemu refused {}: {}", command, error_text(*error));
  const auto ret = reply.find("return");
  if (ret == reply.end())
    return make_error(EIO, "QMP socket {}: a reply to {} without \"return\": {}", path_, command,
                      reply.dump());
  return *ret;
}

Result<nlohmann::json> QmpSession::read_message(Clock::time_point deadline) {
  for (;;) {
    // Every whole line in the buffer first; an event is not the reply.
    size_t eol;
    while ((eol = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, eol);
      buffer_.erase(0, eol + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      nlohmann::json message;
      try {
        message = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        return make_error(EIO, "QMP socket {}: not JSON: {}", path_, e.what());
      }
      if (message.is_object() && message.contains("event")) continue;
      return message;
    }
    if (buffer_.size() > kMaxMessageBytes)
      return make_error(EIO, "QMP socket {}: a message longer than {} bytes", path_,
                        kMaxMessageBytes);
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, ms_left(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return sys_error(errno, "poll QMP socket {}", path_);
    if (ready == 0)
      return make_error(ETIMEDOUT, "QMP socket {}: qemu did not answer within {} ms", path_,
                        timeout_.count());
    char chunk[4096];
    const ssize_t n = ::read(fd_, chunk, sizeof chunk);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return sys_error(errno, "read QMP socket {}", path_);
    if (n == 0) return make_error(EPIPE, "QMP socket {}: qemu closed the connection", path_);
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

QmpSession::QmpSession(QmpSession&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)),
      timeout_(other.timeout_),
      buffer_(std::move(other.buffer_)) {}

QmpSession& QmpSession::operator=(QmpSession&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    timeout_ = other.timeout_;
    buffer_ = std::move(other.buffer_);
  }
  return *this;
}

QmpSession::~QmpSession() {
  if (fd_ >= 0) ::close(fd_);
}

std::string vm_qmp_path(const layer::Pool& pool, const std::string& container) {
  return pool.paths().run_dir + "/vm-" + container + ".qmp";
}

GuestMemoryNote apply_guest_memory(const layer::Pool& pool, const std::string& container,
                                   const layer::ResourceChange& change,
                                   std::chrono::milliseconds settle) {
  GuestMemoryNote note;
  if (!change.memory_bytes) return note;
  const std::string path = vm_qmp_path(pool, container);
  json& j = note.json;
  j = {{"qmp", path},        {"state", "no_guest"}, {"live", false}, {"target", nullptr},
       {"maximum", nullptr}, {"actual", nullptr},   {"message", ""}};
  auto finish = [&](const std::string& state, const std::string& message) {
    j["state"] = state;
    j["message"] = message;
    note.text = "guest: " + message;
    return note;
  };

  auto session = QmpSession::connect(path, std::chrono::seconds(5));
  if (!session.ok()) {
    const int code = session.error().code;
    if (code == ENOENT || code == ECONNREFUSED)
      return finish("no_guest",
                    code == ENOENT
                        ? "no guest running (no " + path + "), recorded for its next launch"
                        : "no guest running (nothing answers on " + path +
                              ", left by a guest that died), recorded for its next launch");
    return finish("failed", "not applied live: " + session.error().message);
  }
  // The memory the guest booted with (-m): the balloon's ceiling.
  auto summary = session->execute("query-memory-size-summary");
  if (!summary.ok()) return finish("failed", "not applied live: " + summary.error().message);
  const uint64_t maximum = summary->value("base-memory", uint64_t{0});
  if (maximum == 0)
    return finish("failed", "not applied live: qemu reported no base-memory: " + summary->dump());
  j["maximum"] = maximum;
  // --memory none: no limit, all the memory the guest booted with.
  const uint64_t target = *change.memory_bytes == 0 ? maximum : *change.memory_bytes;
  j["target"] = target;
  if (target > maximum)
    return finish("above_maximum",
                  fmt::format("not applied live: {} is more than the {} the guest booted with "
                              "(its -m; start it with a larger vm-launch --max-memory to grow it), "
                              "recorded for its next launch",
                              human_size(target), human_size(maximum)));
  if (auto set = session->execute("balloon", {{"value", target}}); !set.ok())
    return finish("failed", "not applied live: " + set.error().message);
  j["live"] = true;
  // The guest's balloon driver inflates or deflates at its own pace: wait for it a little.
  const auto deadline = Clock::now() + settle;
  uint64_t actual = 0;
  for (;;) {
    auto balloon = session->execute("query-balloon");
    if (!balloon.ok())
      return finish("applied",
                    fmt::format("balloon set to {} live ({} cannot be read: {})",
                                human_size(target), "the guest's size", balloon.error().message));
    actual = balloon->value("actual", uint64_t{0});
    if (actual == target || Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  j["actual"] = actual;
  if (actual == target)
    return finish("applied", fmt::format("balloon set to {} live (the guest has {} now)",
                                         human_size(target), human_size(actual)));
  return finish("applied",
                fmt::format("balloon set to {} live; the guest has {} so far (its balloon driver "
                            "is still working, or is not loaded)",
                            human_size(target), human_size(actual)));
}

}  // namespace layer_cli
