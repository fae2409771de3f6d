// locks.h — cross-process locks: open-file-description byte locks on POOL/run/locks.
//
// One byte per object at offset 2*id + kind; shared = "I read this", exclusive = "I change
// this". They vanish when a process dies. Locks of one open file description merge and two
// descriptions of one process conflict, so each process opens run/locks once (one LockTable per
// Pool) and counts holders, locking the byte on the first holder and unlocking it on the last.
// F_OFD_GETLK cannot name a holder, so an exclusive holder of a container records itself in
// run/holders/<id> ("pid N"), read to name it in errors. The table owns these files: it writes
// one after taking the byte and removes it (only if it names this process) before unlocking the
// byte, so a record exists only while its lock is held, except after a crash (a record whose
// lock is free is stale).
//
// Thread-safety: LockTable is safe for concurrent use; a Lock belongs to its owner.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "error.h"

namespace layer {

// kMove: held exclusively by the one mover of a layer (mover.h), on its own byte range above
// the container and layer bytes (a crashed move's intent is recovered only while it is free).
enum class LockKind : uint8_t { kContainer = 0, kLayer = 1, kMove = 2 };

class LockTable;

// The process id a holder note ("pid N", LockTable::holder_of) names; 0 when it names none
// (no "pid ", no digits, or a number larger than a pid_t).
pid_t holder_pid(std::string_view note);

// A held lock; released (the last holder unlocks the byte) in the destructor.
class Lock {
 public:
  Lock() = default;
  Lock(Lock&& other) noexcept;
  Lock& operator=(Lock&& other) noexcept;
  ~Lock();
  bool held() const { return table_ != nullptr; }
  bool exclusive() const { return exclusive_; }
  void release();
  // Turns an exclusive lock into a shared one without letting go of the byte (a live
  // snapshot's delta becomes a frozen layer of the chain). Errors: the errno of F_OFD_SETLK.
  Status downgrade();

 private:
  friend class LockTable;
  Lock(LockTable* table, uint64_t offset, bool exclusive)
      : table_(table), offset_(offset), exclusive_(exclusive) {}
  LockTable* table_ = nullptr;
  uint64_t offset_ = 0;
  bool exclusive_ = false;
};

class LockTable {
 public:
  // Opens (creating if needed) run_dir/locks. Errors: EACCES, EIO, ENOENT.
  static Result<std::unique_ptr<LockTable>> open(const std::string& run_dir);
  ~LockTable();

  // Takes the lock without waiting. Errors: EBUSY when another process (or, for an
  // exclusive lock, another holder in this process) holds a conflicting lock; the message names
  // `what` and, for containers, the holder recorded under run/holders.
  // REQUIRES: the LockTable outlives the Lock.
  Result<Lock> try_lock(LockKind kind, uint64_t id, bool exclusive, const std::string& what);

  // True when some process (this one included) holds a lock on the object that conflicts
  // with an exclusive lock (F_OFD_GETLK: takes nothing, so it cannot disturb a server).
  // Errors: the errno of a failed F_OFD_GETLK (EBADF, EINVAL, ...): never read as "unlocked".
  Result<bool> is_locked(LockKind kind, uint64_t id);

  // True when anyone but `own` holders of this process holds the object: more holders in this
  // process, or any lock of another process (F_OFD_GETLK ignores this process's own locks).
  // A server asks it before merging layers only its own disk reads. Errors: as is_locked.
  Result<bool> held_by_others(LockKind kind, uint64_t id, unsigned own);

  // The holder note written for exclusive container locks ("pid N").
  std::string holder_of(uint64_t container_id) const;

 private:
  friend class Lock;
  LockTable(int fd, std::string run_dir) : fd_(fd), run_dir_(std::move(run_dir)) {}
  void unlock(uint64_t offset, bool exclusive);
  Status downgrade(uint64_t offset);
  // Whether another process holds the byte (F_OFD_GETLK: this description's own locks never
  // conflict with it). Errors: the errno of F_OFD_GETLK.
  Result<bool> locked_elsewhere(uint64_t offset);
  std::string holder_path(uint64_t container_id) const;
  // REQUIRES: this process holds the container's byte exclusively (no one else writes it).
  void write_holder(uint64_t container_id) const;
  void remove_holder(uint64_t container_id) const;
  struct Held {
    bool exclusive = false;
    unsigned count = 0;
  };
  int fd_;
  std::string run_dir_;
  std::mutex mu_;
  std::map<uint64_t, Held> held_;  // GUARDED_BY(mu_)
};

}  // namespace layer
