// qmp.h — a small client of qemu's QMP (a unix stream socket, one JSON object per line), and
// what `layer set CONTAINER --memory SIZE` does with it: a guest started by scripts/vm-launch
// listens on POOL/run/vm-CONTAINER.qmp, and its virtio-balloon is set to the new size there,
// live (docs/vm.md "Live memory").
#pragma once

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "error.h"
#include "pool.h"
#include "qos.h"

namespace layer_cli {

// One QMP session. connect() reads qemu's greeting and leaves capabilities negotiation done
// (qmp_capabilities), so execute() may be called at once. Events qemu sends between replies are
// skipped. Not thread-safe; one command at a time.
class QmpSession {
 public:
  // Errors: ENOENT / ECONNREFUSED (nothing listens at `path`: no guest, or one that died and
  // left its socket), ENAMETOOLONG (`path` does not fit in sun_path), ETIMEDOUT (no greeting or
  // no capabilities reply within `timeout`), EPROTO (what came is not QMP).
  static layer::Result<QmpSession> connect(const std::string& path,
                                           std::chrono::milliseconds timeout);
  // Runs one command (arguments: an object, or null for none) and returns its "return" value.
  // Errors: EREMOTEIO with qemu's "class: desc" (the command failed), ETIMEDOUT (no reply within
  // the session's timeout from now), EPIPE / EIO (qemu closed the socket or sent garbage).
  layer::Result<nlohmann::json> execute(const std::string& command,
                                        const nlohmann::json& arguments = nullptr);

  QmpSession(QmpSession&& other) noexcept;
  QmpSession& operator=(QmpSession&& other) noexcept;
  QmpSession(const QmpSession&) = delete;
  QmpSession& operator=(const QmpSession&) = delete;
  ~QmpSession();

 private:
  QmpSession(int fd, std::string path, std::chrono::milliseconds timeout)
      : fd_(fd), path_(std::move(path)), timeout_(timeout) {}
  // The next message that is not an event, by the deadline.
  layer::Result<nlohmann::json> read_message(std::chrono::steady_clock::time_point deadline);

  int fd_ = -1;
  std::string path_;
  std::chrono::milliseconds timeout_;
  std::string buffer_;  // bytes read past the last whole line
};

// Where scripts/vm-launch puts the QMP socket of CONTAINER's guest: POOL/run/vm-CONTAINER.qmp.
std::string vm_qmp_path(const layer::Pool& pool, const std::string& container);

// The guest's part of `layer set`: when `change` sets memory and a guest of `container` answers
// on its QMP socket, sets its balloon to the new size (`--memory none`: all the memory it booted
// with) and waits up to `settle` for the guest to get there. The JSON, under "guest" in set's
// output (null when --memory was not given): {"qmp":PATH, "state":S, "live":B, "target":N|null,
// "maximum":N|null, "actual":N|null, "message":TEXT}, S one of "applied" (the balloon was set;
// "actual" is the guest's size after the wait), "no_guest" (nothing answers at PATH),
// "above_maximum" (more than the -m the guest booted with: the balloon cannot grow past it; the
// record holds the new size for its next launch), "failed" (qemu refused or did not answer).
// The text: one clause for set's line ("guest: balloon set to 192 MiB live (now 192 MiB)").
struct GuestMemoryNote {
  nlohmann::ordered_json json;  // null: --memory not given
  std::string text;             // empty: --memory not given
};
GuestMemoryNote apply_guest_memory(const layer::Pool& pool, const std::string& container,
                                   const layer::ResourceChange& change,
                                   std::chrono::milliseconds settle = std::chrono::seconds(5));

}  // namespace layer_cli
