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
#include <sstream>

namespace layer {
namespace {

uint64_t lock_offset(LockKind kind, uint64_t id) { return 2 * id + static_cast<uint64_t>(kind); }

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

Result<std::unique_ptr<LockTable>> LockTable::open(const std::string& run_dir) {
  const std::string path = run_dir + "/locks";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return sys_error(errno, fmt::format("open {}", path));
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
  if (exclusive && kind == LockKind::kContainer) {
    // Best effort: only used to name the holder in other processes' errors.
    const std::string path = fmt::format("{}/holders/{}", run_dir_, id);
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << "pid " << ::getpid() << "\n";
    }
    std::rename(tmp.c_str(), path.c_str());
  }
  return Lock(this, offset, exclusive);
}

bool LockTable::is_locked(LockKind kind, uint64_t id) {
  const uint64_t offset = lock_offset(kind, id);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (held_.count(offset)) return true;
  }
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  if (fcntl(fd_, F_OFD_GETLK, &fl) != 0) return false;
  return fl.l_type != F_UNLCK;
}

void LockTable::unlock(uint64_t offset, bool exclusive) {
  (void)exclusive;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = held_.find(offset);
  if (it == held_.end()) return;
  if (--it->second.count > 0) return;
  held_.erase(it);
  ofd_lock(fd_, F_UNLCK, offset);
}

}  // namespace layer
