// index_backup.h — compact copies of the pool's index in POOL/index/backup/.
//
// A copy is `mdb_env_copyfd2(..., MDB_CP_COMPACT)` (free pages left out, every page written
// anew) as of one read transaction, made in a child process (index_check.h): a damaged index
// fails the copy with EUCLEAN instead of crashing the caller, and leaves the older copies alone.
// It is written under a temporary name, fsynced, renamed into place and its directory fsynced;
// then all but the newest kIndexBackupsKept copies are removed. A copy is skipped when the newest
// one already holds the index's last transaction (an idle pool is not copied again and again).
//
// Who takes them: a server every `index-backup-interval=` (BackgroundBackup), the CLI before
// every bulk change (docs/design.md "Index copies"), and `layer index backup`.
// Names: index-YYYYMMDDTHHMMSSZ-tTXNID-REASON.mdb (UTC); `layer index restore` sets the index it
// replaces aside as replaced-YYYYMMDDTHHMMSSZ.mdb beside them, never removed by the pruning.
//
// Thread-safety: the functions may run concurrently in any processes (each copy has its own
// temporary name; renames are atomic; the pruning tolerates files that vanish).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "error.h"
#include "stop_signal.h"

namespace layer {

class Pool;

constexpr size_t kIndexBackupsKept = 8;
// The server's default interval between copies (plugin index-backup-interval=).
constexpr std::chrono::seconds kDefaultIndexBackupInterval{15 * 60};

struct IndexBackup {
  std::string name;  // index-...mdb
  std::string path;
  uint64_t created_unix = 0;
  uint64_t txnid = 0;  // the last transaction the copy holds (at least)
  std::string reason;  // who took it: "server", "manual", or the command ("gc", "image-rm", ...)
  uint64_t bytes = 0;
};

// POOL/index/backup for the index in index_dir.
std::string index_backup_dir(const std::string& index_dir);
// A UTC time stamp for file names: "20261207T121500Z".
std::string utc_stamp(uint64_t unix_s);

// The copies of the index in index_dir, newest first (files not named as above are ignored).
// Errors: EIO, EACCES (none yet: an empty list).
Result<std::vector<IndexBackup>> list_index_backups(const std::string& index_dir);

struct BackupResult {
  IndexBackup backup;  // the new copy, or the newest one when nothing changed since
  bool taken = false;  // false: skipped, the newest copy holds the last transaction already
  std::vector<std::string> removed;  // older copies removed to keep kIndexBackupsKept
};

// Takes a copy of the pool's index for `reason` (lower-case letters, digits and '-'), unless
// the newest copy holds the index's last transaction or is younger than `fresh_enough` (the
// CLI's copies before bulk changes: a script removing 100 containers copies the index once a
// minute, not 100 times). Errors: EUCLEAN (the index is damaged: the message says what to do;
// no copy is made), ENOSPC, EIO, EACCES.
Result<BackupResult> backup_index(Pool& pool, std::string_view reason,
                                  std::chrono::seconds fresh_enough = std::chrono::seconds(0));

// Copies a backup file into `dest` (a new file), fsynced. Errors: ENOENT, EEXIST, ENOSPC, EIO.
Status copy_backup_file(const std::string& from, const std::string& dest);

// A server's copier: a thread taking backup_index(pool, "server") every `interval`, the first
// one an interval after start. Failures are logged and retried at the next interval. The destructor
// stops it (a copy in progress finishes first) and joins. REQUIRES: the Pool outlives it.
class BackgroundBackup {
 public:
  struct Options {
    std::chrono::seconds interval = kDefaultIndexBackupInterval;
    // Called on the thread: error lines, and the copies taken (as non-errors).
    std::function<void(bool error, const std::string& line)> log;
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<BackgroundBackup>> start(Pool& pool, Options options);
  ~BackgroundBackup();
  BackgroundBackup(const BackgroundBackup&) = delete;
  BackgroundBackup& operator=(const BackgroundBackup&) = delete;

 private:
  BackgroundBackup(Pool& pool, Options options) : pool_(pool), options_(std::move(options)) {}
  void run();

  Pool& pool_;
  const Options options_;
  StopSignal stop_;
  std::thread thread_;
};

}  // namespace layer
