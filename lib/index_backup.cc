// index_backup.cc — compact copies of the index: take, list, prune; the server's copier.
#include "index_backup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "index.h"
#include "index_check.h"
#include "isolate.h"
#include "layer_file.h"
#include "pool.h"

namespace layer {
namespace {

constexpr std::string_view kPrefix = "index-";
constexpr std::string_view kSuffix = ".mdb";
constexpr std::string_view kTempPrefix = ".tmp-";

std::optional<uint64_t> parse_stamp(std::string_view s) {
  struct tm tm {};
  const std::string text(s);
  const char* end = strptime(text.c_str(), "%Y%m%dT%H%M%SZ", &tm);
  if (end == nullptr || *end != '\0') return std::nullopt;
  return static_cast<uint64_t>(timegm(&tm));
}

// index-STAMP-tTXN-REASON.mdb
std::optional<IndexBackup> parse_name(const std::string& dir, const std::string& name) {
  if (!name.starts_with(kPrefix) || !name.ends_with(kSuffix)) return std::nullopt;
  std::string_view rest(name);
  rest.remove_prefix(kPrefix.size());
  rest.remove_suffix(kSuffix.size());
  const auto dash = rest.find("-t");
  if (dash == std::string_view::npos) return std::nullopt;
  auto created = parse_stamp(rest.substr(0, dash));
  if (!created) return std::nullopt;
  rest.remove_prefix(dash + 2);
  const auto dash2 = rest.find('-');
  if (dash2 == 0 || dash2 == std::string_view::npos) return std::nullopt;
  uint64_t txnid = 0;
  for (char c : rest.substr(0, dash2)) {
    if (c < '0' || c > '9') return std::nullopt;
    txnid = txnid * 10 + static_cast<uint64_t>(c - '0');
  }
  IndexBackup b;
  b.name = name;
  b.path = dir + "/" + name;
  b.created_unix = *created;
  b.txnid = txnid;
  b.reason = std::string(rest.substr(dash2 + 1));
  return b;
}

bool valid_reason(std::string_view reason) {
  if (reason.empty() || reason.size() > 32) return false;
  for (char c : reason)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  return true;
}

Status make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) == 0) return fsync_dir(dir_of(dir));
  if (errno == EEXIST) return {};
  return sys_error(errno, "create {}", dir);
}

// Removes the temporary files of copies whose process is gone (a crash midway).
void remove_stale_temps(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::string> stale;
  while (struct dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (!name.starts_with(kTempPrefix)) continue;
    const pid_t pid = static_cast<pid_t>(std::atol(name.c_str() + kTempPrefix.size()));
    if (pid > 0 && ::kill(pid, 0) != 0 && errno == ESRCH) stale.push_back(dir + "/" + name);
  }
  ::closedir(d);
  for (const auto& path : stale) ::unlink(path.c_str());
}

std::atomic<uint64_t> g_temp_counter{0};

}  // namespace

std::string utc_stamp(uint64_t unix_s) {
  const time_t t = static_cast<time_t>(unix_s);
  struct tm tm {};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

std::string index_backup_dir(const std::string& index_dir) { return index_dir + "/backup"; }

Result<std::vector<IndexBackup>> list_index_backups(const std::string& index_dir) {
  const std::string dir = index_backup_dir(index_dir);
  std::vector<IndexBackup> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) {
    if (errno == ENOENT) return out;
    return sys_error(errno, "open {}", dir);
  }
  while (struct dirent* e = ::readdir(d)) {
    auto b = parse_name(dir, e->d_name);
    if (!b) continue;
    struct stat st;
    if (::stat(b->path.c_str(), &st) != 0) continue;  // removed meanwhile
    b->bytes = static_cast<uint64_t>(st.st_size);
    out.push_back(std::move(*b));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const IndexBackup& a, const IndexBackup& b) {
    if (a.created_unix != b.created_unix) return a.created_unix > b.created_unix;
    return a.txnid > b.txnid;
  });
  return out;
}

Status copy_backup_file(const std::string& from, const std::string& dest) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return sys_error(errno, "open {}", from);
  const int out = ::open(dest.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (out < 0) {
    const int err = errno;
    ::close(in);
    return sys_error(err, "create {}", dest);
  }
  std::vector<char> buf(1 << 20);
  Status s;
  for (;;) {
    const ssize_t n = ::read(in, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      s = sys_error(errno, "read {}", from);
      break;
    }
    if (n == 0) break;
    ssize_t done = 0;
    while (done < n) {
      const ssize_t w = ::write(out, buf.data() + done, static_cast<size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        s = sys_error(errno, "write {}", dest);
        break;
      }
      done += w;
    }
    if (!s) break;
  }
  if (s && ::fsync(out) != 0) s = sys_error(errno, "fsync {}", dest);
  ::close(in);
  ::close(out);
  if (!s) ::unlink(dest.c_str());
  return s;
}

namespace {

// In the child: a compact copy of the index in directory `index_dir` into `fd`; its txnid.
Result<std::string> copy_compact_into(const std::string& index_dir, int fd) {
  LAYER_ASSIGN(auto index, Index::open(index_dir, Index::Options{.read_only = true}));
  LAYER_ASSIGN(uint64_t txnid, index->copy_compact(fd));
  return std::to_string(txnid);
}

}  // namespace

Result<BackupResult> backup_index(Pool& pool, std::string_view reason,
                                  std::chrono::seconds fresh_enough) {
  if (!valid_reason(reason)) return make_error(EINVAL, "index copy: bad reason \"{}\"", reason);
  const std::string index_dir = pool.paths().index_dir;
  const std::string dir = index_backup_dir(index_dir);
  LAYER_TRY(make_dir(dir));
  LAYER_ASSIGN(auto existing, list_index_backups(index_dir));
  BackupResult result;
  if (!existing.empty() &&
      (existing.front().txnid >= pool.index().last_txnid() ||
       existing.front().created_unix + static_cast<uint64_t>(fresh_enough.count()) > now_unix())) {
    result.backup = existing.front();
    return result;
  }
  remove_stale_temps(dir);
  const std::string temp =
      fmt::format("{}/{}{}-{}.mdb", dir, kTempPrefix, ::getpid(), g_temp_counter.fetch_add(1));
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return sys_error(errno, "create {}", temp);
  struct stat st {};
  ::stat((index_dir + "/data.mdb").c_str(), &st);
  auto copied = run_isolated(fmt::format("copying index {}", index_dir),
                             index_read_timeout(static_cast<uint64_t>(st.st_size)),
                             copy_compact_into, index_dir, fd);
  Status synced;
  if (copied && ::fsync(fd) != 0) synced = sys_error(errno, "fsync {}", temp);
  ::close(fd);
  if (!copied || !synced) {
    ::unlink(temp.c_str());
    if (!copied) {
      const Error& e = copied.error();
      if (e.code == EUCLEAN)
        return make_error(EUCLEAN,
                          "index {} is damaged: {}; no copy was taken, the older ones are "
                          "kept. {}",
                          index_dir, e.message, damaged_index_advice(index_dir));
      return e;
    }
    return synced.error();
  }
  IndexBackup b;
  b.created_unix = now_unix();
  b.txnid = std::strtoull(copied->c_str(), nullptr, 10);
  b.reason = std::string(reason);
  b.name =
      fmt::format("{}{}-t{}-{}{}", kPrefix, utc_stamp(b.created_unix), b.txnid, b.reason, kSuffix);
  b.path = dir + "/" + b.name;
  if (::rename(temp.c_str(), b.path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    return sys_error(err, "rename {} to {}", temp, b.path);
  }
  LAYER_TRY(fsync_dir(dir));
  struct stat copy_st {};
  if (::stat(b.path.c_str(), &copy_st) == 0) b.bytes = static_cast<uint64_t>(copy_st.st_size);
  result.backup = b;
  result.taken = true;
  LAYER_ASSIGN(auto all, list_index_backups(index_dir));
  for (size_t i = kIndexBackupsKept; i < all.size(); ++i) {
    if (all[i].name == b.name) continue;  // never the copy just taken (a clock set back)
    if (::unlink(all[i].path.c_str()) == 0) result.removed.push_back(all[i].name);
  }
  if (!result.removed.empty()) LAYER_TRY(fsync_dir(dir));
  return result;
}

// ---- BackgroundBackup ----

Result<std::unique_ptr<BackgroundBackup>> BackgroundBackup::start(Pool& pool, Options options) {
  std::unique_ptr<BackgroundBackup> b(new BackgroundBackup(pool, std::move(options)));
  try {
    b->thread_ = std::thread([raw = b.get()] { raw->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value() == EAGAIN ? EAGAIN : ENOMEM,
                      "cannot start the index copier thread: {}", e.what());
  }
  return b;
}

BackgroundBackup::~BackgroundBackup() {
  stop_.request_stop();
  if (thread_.joinable()) thread_.join();
}

void BackgroundBackup::run() {
  // The first copy after one interval, not at start: a start changes nothing in the index (the
  // CLI copies it before bulk changes), and a copy is a fork of the whole server, which a
  // sanitizer build's runtime may not survive while other threads start up.
  while (stop_.wait_until(std::chrono::steady_clock::now() + options_.interval)) {
    try {
      auto r = backup_index(pool_, "server");
      if (options_.log) {
        if (!r)
          options_.log(true, fmt::format("index copy: {}", r.error().message));
        else if (r->taken)
          options_.log(false,
                       fmt::format("index copy: {} ({} bytes)", r->backup.path, r->backup.bytes));
      }
    } catch (...) {
      // Nothing may end the thread; the next interval tries again.
    }
  }
}

}  // namespace layer
