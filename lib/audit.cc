// audit.cc — the access audit trail (audit.h).
#include "audit.h"

#include "layer_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <chrono>
#include <cmath>
#include <fstream>

namespace layer {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Whether a line has the shape audit.h documents, so that a reader (`layer audit`) can take
// its fields as they are: a "time" that is a number of seconds a uint64_t holds, and each
// other field, when present, of its type. The file may hold anything (a damaged or foreign
// line), and the line's values are used as they are: a time of 1e300 cast to whole seconds, or
// a "container" that is a number compared with a name, is undefined behaviour or an exception.
bool well_formed(const nlohmann::ordered_json& j) {
  if (!j.is_object()) return false;
  const auto time = j.find("time");
  if (time == j.end() || !time->is_number()) return false;
  const double t = time->get<double>();
  if (!std::isfinite(t) || t < 0 || t >= 18446744073709551616.0) return false;  // 2^64
  auto is = [&](const nlohmann::ordered_json& o, const char* key, auto type_ok) {
    const auto it = o.find(key);
    return it == o.end() || type_ok(*it);
  };
  auto string = [](const nlohmann::ordered_json& v) { return v.is_string(); };
  auto boolean = [](const nlohmann::ordered_json& v) { return v.is_boolean(); };
  auto count = [](const nlohmann::ordered_json& v) { return v.is_number_unsigned(); };
  auto integer = [](const nlohmann::ordered_json& v) { return v.is_number_integer(); };
  auto number = [](const nlohmann::ordered_json& v) { return v.is_number(); };
  if (!is(j, "event", string) || !is(j, "export", string) || !is(j, "container", string) ||
      !is(j, "why", string) || !is(j, "tls", boolean) || !is(j, "read_only", boolean) ||
      !is(j, "read_bytes", count) || !is(j, "written_bytes", count) || !is(j, "seconds", number) ||
      !is(j, "pid", integer))
    return false;
  const auto peer = j.find("peer");
  if (peer == j.end()) return true;
  return peer->is_object() && is(*peer, "kind", string) && is(*peer, "addr", string) &&
         is(*peer, "uid", integer) && is(*peer, "gid", integer) && is(*peer, "pid", integer);
}

}  // namespace

std::string audit_dir(const std::string& pool_root) { return pool_root + "/log"; }

AuditLog::AuditLog(std::string dir, uint64_t max_bytes, int keep)
    : dir_(std::move(dir)), path_(dir_ + "/access.log"), max_bytes_(max_bytes), keep_(keep) {}

AuditLog::~AuditLog() {
  // Lines appended without waiting are made durable on the way out.
  std::lock_guard<std::mutex> lk(mu_);
  if (file_ && written_ > 0) ::fdatasync(file_->fd);
}

AuditLog::File::~File() { ::close(fd); }

Status AuditLog::open_locked() {
  if (file_) {
    // Rotated away by another server: write to the new file.
    struct stat by_fd, by_path;
    if (::fstat(file_->fd, &by_fd) == 0 && ::stat(path_.c_str(), &by_path) == 0 &&
        by_fd.st_ino == by_path.st_ino && by_fd.st_dev == by_path.st_dev)
      return {};
    // Lines this object wrote there are made durable before it is let go (a sync in flight may
    // still hold it); the rotation's renames were synced by the server that made them.
    if (::fdatasync(file_->fd) != 0) return sys_error(errno, "sync the audit log {}", path_);
    syncs_.fetch_add(1, std::memory_order_relaxed);
    file_.reset();
  }
  if (::mkdir(dir_.c_str(), 0750) != 0 && errno != EEXIST)
    return sys_error(errno, "make the audit log directory {}", dir_);
  int fd = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    fd = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    // A new file's name must survive a power cut with the lines in it.
    if (fd >= 0) {
      if (auto s = fsync_dir(dir_); !s) {
        ::close(fd);
        return s;
      }
    }
  }
  if (fd < 0) return sys_error(errno, "open the audit log {}", path_);
  file_ = std::make_shared<File>(fd);
  return {};
}

Status AuditLog::rotate_locked() {
  const std::string lock_path = path_ + ".lock";
  const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
  if (lock < 0) return sys_error(errno, "open {}", lock_path);
  Status status;
  if (::flock(lock, LOCK_EX) != 0) {
    status = sys_error(errno, "lock {}", lock_path);
  } else {
    // Another server may have rotated it meanwhile: only a file still over the mark goes.
    struct stat st;
    if (::stat(path_.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) >= max_bytes_) {
      for (int i = keep_; i >= 1; --i) {
        const std::string from = i == 1 ? path_ : fmt::format("{}.{}", path_, i - 1);
        const std::string to = fmt::format("{}.{}", path_, i);
        if (::rename(from.c_str(), to.c_str()) != 0 && errno != ENOENT) {
          status = sys_error(errno, "rotate the audit log {} to {}", from, to);
          break;
        }
      }
      // The renames, durable before any line goes to the new file.
      if (status) status = fsync_dir(dir_);
    }
  }
  ::close(lock);  // releases the flock
  return status;
}

Status AuditLog::append(const nlohmann::ordered_json& event, bool durable) {
  nlohmann::ordered_json line;
  line["time"] = now_seconds();
  for (const auto& [k, v] : event.items())
    if (k != "time") line[k] = v;
  const std::string text =
      line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    LAYER_TRY(open_locked());
    struct stat st;
    if (::fstat(file_->fd, &st) == 0 && static_cast<uint64_t>(st.st_size) >= max_bytes_) {
      LAYER_TRY(rotate_locked());
      LAYER_TRY(open_locked());  // syncs and lets go of the renamed file
    }
    const ssize_t n = ::write(file_->fd, text.data(), text.size());
    if (n < 0) return sys_error(errno, "write the audit log {}", path_);
    if (static_cast<size_t>(n) != text.size())
      return make_error(EIO, "write the audit log {}: short write ({} of {} bytes)", path_, n,
                        text.size());
    seq = ++written_;
  }
  if (!durable) return {};
  return sync_through(seq);
}

// Group commit: the first thread in syncs every line written so far; a thread that finds its
// line covered by a sync that finished meanwhile returns at once.
Status AuditLog::sync_through(uint64_t seq) {
  std::lock_guard<std::mutex> sync_lk(sync_mu_);
  if (synced_ >= seq) return {};
  uint64_t target = 0;
  std::shared_ptr<File> file;
  {
    std::lock_guard<std::mutex> lk(mu_);
    target = written_;
    file = file_;  // lines in a file let go of before were synced by open_locked
  }
  if (!file) {  // let go of (and synced) by an append whose reopen then failed
    synced_ = target;
    return {};
  }
  if (::fdatasync(file->fd) != 0) return sys_error(errno, "sync the audit log {}", path_);
  syncs_.fetch_add(1, std::memory_order_relaxed);
  synced_ = target;
  return {};
}

Result<std::vector<nlohmann::ordered_json>> read_audit(const std::string& dir,
                                                       const std::string& container, double since,
                                                       size_t* bad) {
  std::vector<nlohmann::ordered_json> out;
  std::vector<std::string> files;
  const std::string base = dir + "/access.log";
  for (int i = 64; i >= 1; --i) {
    const std::string p = fmt::format("{}.{}", base, i);
    if (::access(p.c_str(), F_OK) == 0) files.push_back(p);
  }
  files.push_back(base);
  for (const auto& p : files) {
    std::ifstream in(p);
    if (!in) {
      if (errno == ENOENT) continue;
      return sys_error(errno, "read the audit log {}", p);
    }
    std::string text;
    while (std::getline(in, text)) {
      if (text.empty()) continue;
      auto j = nlohmann::ordered_json::parse(text, nullptr, false);
      if (j.is_discarded() || !well_formed(j)) {
        if (bad) ++*bad;
        continue;
      }
      if (j["time"].get<double>() < since) continue;
      if (!container.empty() && j.value("container", std::string()) != container) continue;
      out.push_back(std::move(j));
    }
    if (in.bad()) return make_error(EIO, "read the audit log {}", p);
  }
  return out;
}

}  // namespace layer
