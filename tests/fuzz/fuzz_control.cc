// fuzz_control.cc — libFuzzer target: the control socket's protocol (control.h) from both ends.
//
// Input: one selector byte, then:
// - even selector: the bytes a client sends to a real ControlServer (its framing: one line of
//   at most kMaxRequestBytes, JSON, an object; its error replies), whose handler echoes the
//   request. The byte after the selector, when odd, puts about kMaxRequestBytes spaces (JSON
//   whitespace) in front, so that small inputs reach the size limit from both sides.
// - odd selector: the bytes a server answers to control_request (the client's framing and
//   parsing), then control_status and the CLI's reading of a snapshot-rm reply on the result.
//
// Properties, beyond no crash, leak, hang or undefined behaviour:
// - server: a request line longer than the limit gets an EINVAL reply; a line that is not
//   JSON, or not an object, gets EINVAL without reaching the handler; an object reaches the
//   handler as parsed, and its reply comes back as one line; a handler that throws gives EIO;
//   no newline before the client hangs up: no reply. Every reply is one line of JSON.
// - client: a reply line that is JSON comes back as parsed; anything else is EIO;
//   control_status says EIO for a reply without a boolean "ok", success for "ok":true, and an
//   error with a positive code and the reply's message for "ok":false.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "control.h"
#include "fuzz_inputs.h"
#include "fuzz_util.h"
#include "snapshots.h"

using namespace layer;
using nlohmann::json;

namespace {

int connect_unix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(fd >= 0, std::string("socket: ") + std::strerror(errno));
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  const timeval tv = {30, 0};  // a hang is a failure, not a stuck fuzzer
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  FUZZ_CHECK(::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0,
             "connect " + path + ": " + std::strerror(errno));
  return fd;
}

// Sends what it can (the peer may hang up early: EPIPE is not a failure here).
void send_some(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    data.remove_prefix(static_cast<size_t>(n));
  }
}

// Everything the peer sent until it closed. A unix socket closed with bytes it did not read
// (after the request line, or past the size limit) resets the connection: ECONNRESET then
// ends the stream like EOF, after whatever was sent before it.
std::string read_to_eof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ECONNRESET) return out;
    FUZZ_CHECK(n >= 0, std::string("recv: ") + std::strerror(errno));
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

// The sockets live in a temp dir for the whole run; the servers stop at exit.
struct World {
  std::string dir;
  std::mutex mu;
  json last_request;  // GUARDED_BY(mu): what the echo handler was given
  int handled = 0;    // GUARDED_BY(mu)
  std::unique_ptr<ControlServer> server;

  // The fake server of the client side: answers each connection's first line with `reply`.
  std::string fake_path;
  int fake_listen = -1;
  std::string reply;  // GUARDED_BY(mu)
  std::thread fake;

  World() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/layer-fuzz-XXXXXX";
    FUZZ_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp " + pattern);
    dir = pattern;
    auto started = ControlServer::start(
        dir + "/srv.sock",
        [this](const json& request) {
          std::lock_guard<std::mutex> lk(mu);
          last_request = request;
          ++handled;
          if (request.contains("throw")) throw std::runtime_error("the handler threw");
          return json{{"ok", true}, {"echo", request}};
        },
        std::chrono::seconds(30));
    FUZZ_CHECK(started.ok(), "ControlServer::start: " + started.error().message);
    server = std::move(*started);

    fake_path = dir + "/fake.sock";
    fake_listen = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, fake_path.data(), fake_path.size());
    FUZZ_CHECK(::bind(fake_listen, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 &&
                   ::listen(fake_listen, 4) == 0,
               "bind " + fake_path);
    fake = std::thread([this] { serve_fake(); });
  }

  ~World() {
    ::shutdown(fake_listen, SHUT_RDWR);  // wakes accept
    fake.join();
    ::close(fake_listen);
    server.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  void serve_fake() {
    for (;;) {
      const int fd = ::accept4(fake_listen, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;  // shut down
      }
      std::string request;
      char c;
      while (::recv(fd, &c, 1, 0) == 1 && c != '\n') request += c;
      std::string answer;
      {
        std::lock_guard<std::mutex> lk(mu);
        answer = reply;
      }
      send_some(fd, answer);
      ::close(fd);
    }
  }
};

World& world() {
  static World w;
  return w;
}

void check_error_reply(const json& reply, int code, const std::string& context) {
  const Status s = control_status(reply);
  FUZZ_CHECK(!s.ok(), context + ": expected an error reply, got " + reply.dump());
  FUZZ_CHECK(s.error().code == code,
             context + ": expected errno " + std::to_string(code) + ", got " + reply.dump());
}

void server_side(fuzz::FuzzInput& in) {
  World& w = world();
  std::string sent;
  if (const uint8_t pad = in.u8(); pad & 1)
    sent.assign(ControlServer::kMaxRequestBytes - 64 + (pad >> 1), ' ');
  sent.append(in.rest());
  int handled_before;
  {
    std::lock_guard<std::mutex> lk(w.mu);
    handled_before = w.handled;
  }
  const int fd = connect_unix(w.server->path());
  send_some(fd, sent);
  ::shutdown(fd, SHUT_WR);
  const std::string reply_text = read_to_eof(fd);
  ::close(fd);
  int handled_after;
  json request;
  {
    std::lock_guard<std::mutex> lk(w.mu);
    handled_after = w.handled;
    request = w.last_request;
  }

  const size_t newline = sent.find('\n');
  const size_t line_bytes = std::min(newline, sent.size());
  if (line_bytes > ControlServer::kMaxRequestBytes) {
    FUZZ_CHECK(handled_after == handled_before, "an oversized request reached the handler");
  } else if (newline == std::string::npos) {
    FUZZ_CHECK(reply_text.empty(), "a reply to a request without its newline: " + reply_text);
    FUZZ_CHECK(handled_after == handled_before, "a request without its newline was handled");
    return;
  }
  FUZZ_CHECK(!reply_text.empty() && reply_text.back() == '\n' &&
                 reply_text.find('\n') == reply_text.size() - 1,
             "the reply is not one line: " + reply_text);
  json reply;
  try {
    reply = json::parse(reply_text);
  } catch (const json::exception&) {
    FUZZ_CHECK(false, "the reply is not JSON: " + reply_text);
  }
  if (line_bytes > ControlServer::kMaxRequestBytes) {
    check_error_reply(reply, EINVAL, "an oversized request");
    return;
  }
  json parsed;
  try {
    parsed = json::parse(sent.substr(0, newline));
  } catch (const json::exception&) {
    FUZZ_CHECK(handled_after == handled_before, "a request that is not JSON was handled");
    check_error_reply(reply, EINVAL, "a request that is not JSON");
    return;
  }
  if (!parsed.is_object()) {
    FUZZ_CHECK(handled_after == handled_before, "a request that is not an object was handled");
    check_error_reply(reply, EINVAL, "a request that is not an object");
    return;
  }
  FUZZ_CHECK(handled_after == handled_before + 1, "a request object was not handled once");
  FUZZ_CHECK(request == parsed, "the handler got " + request.dump() + " for " + parsed.dump());
  if (parsed.contains("throw")) {
    check_error_reply(reply, EIO, "a handler that threw");
    return;
  }
  FUZZ_CHECK(reply == json({{"ok", true}, {"echo", parsed}}),
             "the handler's reply changed on the way: " + reply.dump());
}

void check_status(const json& reply) {
  const Status s = control_status(reply);
  const auto ok = reply.is_object() ? reply.find("ok") : reply.end();
  if (ok == reply.end() || !ok->is_boolean()) {
    FUZZ_CHECK(!s.ok() && s.error().code == EIO, "a reply without a boolean ok: " + reply.dump());
    return;
  }
  FUZZ_CHECK(s.ok() == ok->get<bool>(), "control_status disagrees with ok: " + reply.dump());
  if (s.ok()) return;
  FUZZ_CHECK(s.error().code > 0, "control_status gave errno " + std::to_string(s.error().code));
  const auto message = reply.find("message");
  if (message != reply.end() && message->is_string())
    FUZZ_CHECK(s.error().message == message->get<std::string>(), "the message changed");
  const auto code = reply.find("code");
  if (code != reply.end() && code->is_number_integer() && code->get<int64_t>() > 0 &&
      code->get<int64_t>() <= INT32_MAX)
    FUZZ_CHECK(s.error().code == code->get<int>(), "the code changed: " + reply.dump());
}

void client_side(fuzz::FuzzInput& in) {
  World& w = world();
  const std::string answer(in.rest());
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.reply = answer;
  }
  const auto reply = control_request(w.fake_path, {{"op", "fuzz"}}, std::chrono::seconds(30));
  const size_t newline = answer.find('\n');
  std::optional<json> want;
  if (newline != std::string::npos) try {
      want = json::parse(answer.substr(0, newline));
    } catch (const json::exception&) {
    }
  if (!want) {
    FUZZ_CHECK(!reply.ok(), "control_request took a reply that is not a JSON line");
    FUZZ_CHECK(reply.error().code == EIO, "control_request: " + reply.error().message);
    return;
  }
  FUZZ_CHECK(reply.ok(), "control_request refused a JSON line: " + reply.error().message);
  FUZZ_CHECK(*reply == *want, "control_request changed the reply");
  check_status(*reply);
  // The CLI reads a live snapshot-rm's reply so (a throw there is the CLI's internal error).
  if (reply->is_object()) try {
      (void)reply->get<RemovedSnapshot>();
    } catch (const json::exception&) {
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  if (in.u8() % 2 == fuzz::kControlServer)
    server_side(in);
  else
    client_side(in);
  return 0;
}
