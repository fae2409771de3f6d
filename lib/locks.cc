// locks.cc — OFD byte locks on run/locks with a per-process holder count.
//
// Why OFD locks: they belong to the open file description, so they vanish when the process
// dies (no stale lock files) and, unlike classic POSIX locks, closing some other descriptor of
// the file does not drop them. Two descriptions in one process conflict, hence one description
// per process and the holder counts in held_.
#include "locks.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

namespace layer {
namespace {

uint64_t lock_offset(LockKind kind, uint64_t id) {
  if (kind == LockKind::kMove) return (uint64_t{1} << 62) + id;
  return 2 * id + static_cast<uint64_t>(kind);
}

// The content of this process's holder records.
std::string holder_note() { return fmt::format("pid {}\n", ::getpid()); }

int ofd_lock(int fd, short type, uint64_t offset) {
  struct flock fl = {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  fl.l_pid = 0;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

}  // namespace

pid_t holder_pid(std::string_view note) {
  if (!note.starts_with("pid ")) return 0;
  // The file may hold anything: a number no pid_t holds names no process (and must not wrap
  // around to one that exists).
  int64_t pid = 0;
  for (char c : note.substr(4)) {
    if (c < '0' || c > '9') break;
    pid = pid * 10 + (c - '0');
    if (pid > std::numeric_limits<pid_t>::max()) return 0;
  }
  return static_cast<pid_t>(pid);
}

Lock::Lock(Lock&& o) noexcept : table_(o.table_), offset_(o.offset_), exclusive_(o.exclusive_) {
  o.table_ = nullptr;
}

Lock& Lock::operator=(Lock&& o) noexcept {
  if (this != &o) {
    release();
    table_ = o.table_;
    offset_ = o.offset_;
    exclusive_ = o.exclusive_;
    o.table_ = nullptr;
  }
  return *this;
}

Lock::~Lock() { release(); }

void Lock::release() {
  if (table_) table_->unlock(offset_, exclusive_);
  table_ = nullptr;
}

Status Lock::downgrade() {
  if (!table_ || !exclusive_) return {};
  LAYER_TRY(table_->downgrade(offset_));
  exclusive_ = false;
  return {};
}

Result<std::unique_ptr<LockTable>> LockTable::open(const std::string& run_dir) {
  const std::string path = run_dir + "/locks";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;  // read before formatting, which may change it
    return sys_error(err, fmt::format("open {}", path));
  }
  ::mkdir((run_dir + "/holders").c_str(), 0755);  // may exist; failures show up when writing
  return std::unique_ptr<LockTable>(new LockTable(fd, run_dir));
}

LockTable::~LockTable() { ::close(fd_); }

std::string LockTable::holder_of(uint64_t container_id) const {
  std::ifstream in(fmt::format("{}/holders/{}", run_dir_, container_id));
  std::string line;
  if (!in || !std::getline(in, line) || line.empty()) return "another process";
  return line;
}

Result<Lock> LockTable::try_lock(LockKind kind, uint64_t id, bool exclusive,
                                 const std::string& what) {
  const uint64_t offset = lock_offset(kind, id);
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = held_.find(offset);
    if (it != held_.end()) {
      if (exclusive || it->second.exclusive)
        return make_error(EBUSY, "{} is in use by this process", what);
      ++it->second.count;
      return Lock(this, offset, exclusive);
    }
    int rc = ofd_lock(fd_, exclusive ? F_WRLCK : F_RDLCK, offset);
    if (rc == EAGAIN || rc == EACCES) {
      if (kind == LockKind::kContainer)
        return make_error(EBUSY, "{} is in use by a running server ({})", what, holder_of(id));
      return make_error(EBUSY, "{} is in use by another process", what);
    }
    if (rc != 0) return sys_error(rc, fmt::format("lock {}", what));
    held_[offset] = Held{exclusive, 1};
  }
  // Outside mu_: file I/O must not stall other objects' locks. Safe without it: we are the only
  // holder of the byte (exclusive), and the previous holder removed its record before unlocking.
  if (exclusive && kind == LockKind::kContainer) write_holder(id);
  return Lock(this, offset, exclusive);
}

Result<bool> LockTable::locked_elsewhere(uint64_t offset) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  if (fcntl(fd_, F_OFD_GETLK, &fl) != 0) {
    const int err = errno;
    return sys_error(err, fmt::format("F_OFD_GETLK {}/locks at {}", run_dir_, offset));
  }
  return fl.l_type != F_UNLCK;
}

Result<bool> LockTable::is_locked(LockKind kind, uint64_t id) {
  const uint64_t offset = lock_offset(kind, id);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (held_.count(offset)) return true;
  }
  return locked_elsewhere(offset);
}

Result<bool> LockTable::held_by_others(LockKind kind, uint64_t id, unsigned own) {
  const uint64_t offset = lock_offset(kind, id);
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = held_.find(offset);
    const unsigned here = it == held_.end() ? 0 : it->second.count;
    if (here > own) return true;
  }
  return locked_elsewhere(offset);
}

void LockTable::unlock(uint64_t offset, bool exclusive) {
  // An exclusive holder is the only one, so its release is the last: the record goes while we
  // still hold the byte, so it cannot remove the record of whoever takes the byte next.
  if (exclusive && offset % 2 == static_cast<uint64_t>(LockKind::kContainer))
    remove_holder(offset / 2);
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(offset);
  if (it == held_.end()) return;
  if (--it->second.count > 0) return;
  held_.erase(it);
  ofd_lock(fd_, F_UNLCK, offset);
}

Status LockTable::downgrade(uint64_t offset) {
  if (offset % 2 == static_cast<uint64_t>(LockKind::kContainer)) remove_holder(offset / 2);
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(offset);
  if (it == held_.end() || !it->second.exclusive) return {};
  // F_OFD_SETLK on a byte this description holds converts the lock in place.
  if (int rc = ofd_lock(fd_, F_RDLCK, offset); rc != 0)
    return sys_error(rc, fmt::format("downgrade lock at {} of {}/locks", offset, run_dir_));
  it->second.exclusive = false;
  return {};
}

std::string LockTable::holder_path(uint64_t container_id) const {
  return fmt::format("{}/holders/{}", run_dir_, container_id);
}

// Best effort throughout: a record only names the holder in other processes' errors.
void LockTable::write_holder(uint64_t container_id) const {
  const std::string path = holder_path(container_id);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const std::string note = holder_note();
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const bool written = ::write(fd, note.data(), note.size()) == static_cast<ssize_t>(note.size());
  ::close(fd);
  if (!written || std::rename(tmp.c_str(), path.c_str()) != 0) ::unlink(tmp.c_str());
}

void LockTable::remove_holder(uint64_t container_id) const {
  const std::string path = holder_path(container_id);
  const std::string note = holder_note();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[64];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  ::close(fd);
  // A record naming another process is stale (we hold the byte) but not ours to remove; the
  // next exclusive holder overwrites it.
  if (n == static_cast<ssize_t>(note.size()) && std::string_view(buf, n) == note)
    ::unlink(path.c_str());
}

}  // namespace layer
