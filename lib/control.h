// control.h — a server's control socket POOL/run/srv-PID.sock, through which the CLI asks the
// running server that serves a container to do live operations on it.
//
// Protocol: one request per connection. The client sends one JSON object on one line (ended by
// '\n', at most kMaxRequestBytes); the server answers with one JSON value on one line and closes.
// An error reply is {"ok":false,"errno":"EBUSY","code":16,"message":"..."} (control_error;
// control_status reads it back); what a successful reply holds is up to the handler.
//
// Thread-safety: a ControlServer runs its handler on kWorkers threads of its own, so up to that
// many requests are handled at once: a long one (a live delta's move takes as long as its copy)
// does not hold up the others. The handler must be safe for concurrent calls (the plugin's
// serialises live operations per disk itself: Disk's live_mu_). start() and the destructor
// belong to its owner. control_request and the helpers may be called from any thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "error.h"

namespace layer {

class ControlServer {
 public:
  // Answers one request (a JSON object). An exception it throws becomes an EIO error reply.
  using Handler = std::function<nlohmann::json(const nlohmann::json& request)>;
  static constexpr size_t kMaxRequestBytes = 64 * 1024;
  // Threads serving connections, each one at a time; further connections wait in the backlog.
  static constexpr int kWorkers = 4;

  // Binds a unix stream socket at `path` (mode 0600), listens, and starts the thread that serves
  // it. A socket file at `path` that nobody accepts on (left by a server that died) is replaced;
  // nothing else there is removed. `read_timeout` bounds the time a connection may take to send
  // its request, and again to take its reply, so a silent client cannot wedge the thread.
  // Errors: ENAMETOOLONG (path does not fit in sun_path), EADDRINUSE (a server accepts on
  // `path`), EEXIST (`path` is not a socket), EINVAL (empty path), the errno of a failed
  // socket/bind/listen (EACCES, ENOENT for a missing directory...), EAGAIN (no thread).
  static Result<std::unique_ptr<ControlServer>> start(
      const std::string& path, Handler handler,
      std::chrono::milliseconds read_timeout = std::chrono::seconds(10));

  // Stops accepting, lets the requests being handled finish (a handler is not interrupted), joins
  // the threads and removes the socket file if it is still the one start() bound.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  const std::string& path() const { return path_; }

 private:
  ControlServer(std::string path, Handler handler, std::chrono::milliseconds read_timeout)
      : path_(std::move(path)), handler_(std::move(handler)), read_timeout_(read_timeout) {}
  void run();
  void serve(int fd) noexcept;
  void pause_briefly();

  const std::string path_;
  const Handler handler_;
  const std::chrono::milliseconds read_timeout_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // an eventfd: readable once the destructor asks the thread to stop
  bool bound_ = false;
  dev_t dev_ = 0;  // the socket file start() bound, so the destructor removes only that one
  ino_t ino_ = 0;
  std::vector<std::thread> threads_;
};

// Sends `request` to the server at `path` and returns its reply (the whole exchange, connect
// included, within `timeout`). The reply may be an error reply: see control_status.
// Errors: ENOENT or ECONNREFUSED (no server listens at `path`; the message names it),
// ETIMEDOUT, EIO (the server closed without replying, or the reply is not JSON), ENAMETOOLONG.
Result<nlohmann::json> control_request(
    const std::string& path, const nlohmann::json& request,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

// The error reply for `e`: {"ok":false,"errno":"EBUSY","code":16,"message":e.message}.
nlohmann::json control_error(const Error& e);

// A reply read back: success for "ok":true; for "ok":false an Error with its "code" (else the
// code its "errno" names, else EIO) and its "message". Errors: EIO for a reply without "ok".
Status control_status(const nlohmann::json& response);

// run_dir + "/srv-PID.sock": where the server with process id `pid` listens.
std::string control_socket_path(const std::string& run_dir, pid_t pid);

}  // namespace layer
