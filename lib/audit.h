// audit.h — the access audit trail (DESIGN.md "Security"; docs/security.md): every open, refusal
// and close of an export, one JSON object per line, appended to POOL/log/access.log by the
// servers of the pool and read back by `layer audit`.
//
// A line: {"time": UNIX_SECONDS (fractional), "event": "open"|"refuse"|"close", "export": NAME,
// "container": C, "pid": SERVER_PID, "peer": {"kind": "unix", "uid": N, "gid": N, "pid": N} |
// {"kind": "tcp", "addr": "10.1.2.3"} | {"kind": "unknown"}, "tls": B, "read_only": B,
// "why": TEXT (refuse; open: the rule that allowed), and for close "read_bytes", "written_bytes",
// "seconds"}.
//
// Rotation: once the file holds max_bytes, the next append renames it to access.log.1 (.1 to .2,
// and so on; the oldest beyond `keep` goes), under an flock of POOL/log/access.log.lock so that
// two servers rotate once; a server whose open file was rotated away reopens the new one.
// Appends are single write(2)s of whole lines with O_APPEND, so lines of several servers never
// interleave.
//
// Durability: append() returns once its line is on stable storage (fdatasync; the directory is
// synced when the file is created or rotated), so an open that was served and a close that was
// audited survive a crash or a power cut. Syncs are group-committed: threads appending at the
// same time share one fdatasync (the first one in syncs every line written so far; the others
// find theirs covered), so a burst of opens costs a few syncs, not one each. A refusal grants
// nothing and is appended with `durable` false: written, not waited for (the next durable
// append, or the log's destruction, syncs it), so that a flood of refused connections does not
// hold a thread each for a sync.
//
// Thread-safety: AuditLog is safe for concurrent use; read_audit is a plain function.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "error.h"

namespace layer {

class AuditLog {
 public:
  static constexpr uint64_t kDefaultMaxBytes = uint64_t{16} << 20;
  static constexpr int kDefaultKeep = 4;
  // `dir` is made (mode 0750) on the first append.
  explicit AuditLog(std::string dir, uint64_t max_bytes = kDefaultMaxBytes,
                    int keep = kDefaultKeep);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends `event` with "time" (now) first and, when `durable`, returns once the line is on
  // stable storage. Errors: those of mkdir, open, write, fdatasync (the caller logs them: an
  // audit line that cannot be written does not stop the server).
  Status append(const nlohmann::ordered_json& event, bool durable = true);

  // How many fdatasyncs of the log this object made (tests: a burst shares them).
  uint64_t syncs() const { return syncs_.load(std::memory_order_relaxed); }

  const std::string& path() const { return path_; }

 private:
  // An open log file, closed when the last user lets go: a sync may still hold the file that a
  // rotation replaced.
  struct File {
    int fd;
    explicit File(int f) : fd(f) {}
    ~File();
    File(const File&) = delete;
    File& operator=(const File&) = delete;
  };
  Status open_locked();
  Status rotate_locked();
  Status sync_through(uint64_t seq);

  const std::string dir_, path_;
  const uint64_t max_bytes_;
  const int keep_;
  std::mutex mu_;
  std::shared_ptr<File> file_;  // GUARDED_BY(mu_)
  uint64_t written_ = 0;        // GUARDED_BY(mu_): lines written by this object
  std::mutex sync_mu_;          // one fdatasync at a time; taken before mu_, never inside it
  uint64_t synced_ = 0;         // GUARDED_BY(sync_mu_): lines known durable
  std::atomic<uint64_t> syncs_{0};
};

// POOL/log, where the audit trail is.
std::string audit_dir(const std::string& pool_root);

// The lines of the audit trail in `dir`, oldest first (rotated files first), those whose
// container is `container` (all when empty) and whose time is at or after `since` (unix s).
// A line that does not parse, or lacks the shape above (a "time" of whole seconds a uint64_t
// holds; each other field, when present, of its type), is skipped and counted in *bad (when
// not null): what is returned can be used without checking types.
// Errors: EACCES, EIO of the reads (a missing log is no lines).
Result<std::vector<nlohmann::ordered_json>> read_audit(const std::string& dir,
                                                       const std::string& container, double since,
                                                       size_t* bad = nullptr);

}  // namespace layer
