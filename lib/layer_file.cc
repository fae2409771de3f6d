// layer_file.cc — local layer files and the fault-injecting wrapper used by power-loss tests.
//
// LocalFile: one O_CLOEXEC fd; pread/pwrite loops over short transfers and EINTR; punch is
// fallocate(PUNCH_HOLE|KEEP_SIZE). A fresh file is created under a temporary name, sized,
// fsynced, renamed into place and its directory fsynced, so the index can never name a file
// that a crash could lose.
//
// FaultInjectingStore: before each write or punch of a file it saves the bytes being replaced
// (an undo record, marked completed once the write returned); sync() forgets the records of
// writes completed before it began; simulate_power_loss() replays the remaining undo records
// newest first, which is what the disk holds after losing its volatile cache. With tear, only
// a random subset is undone (a cache that wrote back some blocks early). An injected sync
// failure undoes every unsynced write, as Linux drops the dirty pages of a failed writeback.
#include "layer_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <optional>
#include <random>
#include <system_error>
#include <thread>

#include "stop_signal.h"

namespace layer {
namespace {

class LocalFile : public LayerFile {
 public:
  LocalFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~LocalFile() override { ::close(fd_); }

  Status read(void* buf, uint64_t len, uint64_t offset) override {
    auto* p = static_cast<uint8_t*>(buf);
    while (len > 0) {
      ssize_t n = ::pread(fd_, p, len, static_cast<off_t>(offset));
      if (n < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        return sys_error(err, fmt::format("read {} at {}", path_, offset));
      }
      if (n == 0) {  // past the end of the file: zeroes
        std::memset(p, 0, len);
        return {};
      }
      p += n;
      len -= static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
    }
    return {};
  }

  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    while (len > 0) {
      ssize_t n = ::pwrite(fd_, p, len, static_cast<off_t>(offset));
      if (n < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        return sys_error(err, fmt::format("write {} at {}", path_, offset));
      }
      p += n;
      len -= static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
    }
    return {};
  }

  Status punch(uint64_t offset, uint64_t len) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(len)) == 0)
      return {};
    int err = errno;
    if (err != EOPNOTSUPP && err != ENOSYS) return sys_error(err, fmt::format("punch {}", path_));
    // No hole punching here: write zeroes instead, in bounded pieces.
    static const std::vector<uint8_t> zeroes(1 << 20, 0);
    while (len > 0) {
      const uint64_t n = std::min<uint64_t>(len, zeroes.size());
      LAYER_TRY(write(zeroes.data(), n, offset));
      offset += n;
      len -= n;
    }
    return {};
  }

  Status sync() override {
    if (::fdatasync(fd_) != 0) {
      const int err = errno;
      return sys_error(err, fmt::format("fdatasync {}", path_));
    }
    return {};
  }

  Status sync_entry() override { return fsync_dir(dir_of(path_)); }

  Status data_extents(uint64_t offset, uint64_t len,
                      const std::function<void(uint64_t, uint64_t)>& fn) override {
    const uint64_t end = offset + len;
    uint64_t pos = offset;
    while (pos < end) {
      off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        const int err = errno;
        if (err == ENXIO) return {};  // no more data
        return sys_error(err, fmt::format("SEEK_DATA {}", path_));
      }
      if (static_cast<uint64_t>(data) >= end) return {};
      off_t hole = ::lseek(fd_, data, SEEK_HOLE);
      if (hole < 0) {
        const int err = errno;
        return sys_error(err, fmt::format("SEEK_HOLE {}", path_));
      }
      const uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
      fn(static_cast<uint64_t>(data), stop - static_cast<uint64_t>(data));
      pos = stop;
    }
    return {};
  }

  void prefetch(uint64_t offset, uint64_t len) override {
    ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(len), POSIX_FADV_WILLNEED);
  }

  void hint_random_access() override { ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM); }

  Result<uint64_t> size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      return sys_error(err, fmt::format("stat {}", path_));
    }
    return static_cast<uint64_t>(st.st_size);
  }

  const std::string& path() const override { return path_; }
  int fd() const { return fd_; }

 private:
  int fd_;
  std::string path_;
};

}  // namespace

std::string dir_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
}

// The stat of path; std::nullopt when it does not exist. Errors: the errno of stat.
Result<std::optional<struct stat>> stat_if_exists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return std::optional<struct stat>(st);
  const int err = errno;
  if (err == ENOENT) return std::optional<struct stat>();
  return sys_error(err, "stat {}", path);
}

Status fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return sys_error(errno, "open directory {}", dir);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return sys_error(err, "fsync directory {}", dir);
  return {};
}

std::string LocalStore::describe(LayerId id) const { return fmt::format("{}/{}.layer", dir_, id); }

Result<std::shared_ptr<LayerFile>> LocalStore::open(LayerId id, bool writable) {
  const std::string path = describe(id);
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return sys_error(errno, "open layer file {}", path);
  return std::shared_ptr<LayerFile>(std::make_shared<LocalFile>(fd, path));
}

Result<std::shared_ptr<LayerFile>> LocalStore::create(LayerId id, uint64_t size_bytes) {
  const std::string path = describe(id);
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return make_error(EEXIST, "layer file {} exists", path);
  const std::string tmp = path + ".new";
  int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return sys_error(errno, "create layer file {}", tmp);
  auto file = std::make_shared<LocalFile>(fd, path);
  if (::ftruncate(fd, static_cast<off_t>(size_bytes)) != 0 || ::fsync(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return sys_error(err, "size layer file {}", tmp);
  }
  // Never over an existing file (another creator's, or one the stat above missed): a
  // RENAME_NOREPLACE rename, or link+unlink where the filesystem lacks it.
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) != 0) {
    int err = errno;
    if (err == EINVAL || err == ENOSYS) {
      err = ::link(tmp.c_str(), path.c_str()) == 0 ? 0 : errno;
      ::unlink(tmp.c_str());
    } else {
      ::unlink(tmp.c_str());
    }
    if (err == EEXIST) return make_error(EEXIST, "layer file {} exists", path);
    if (err != 0) return sys_error(err, "rename {} into place", tmp);
  }
  // The file is in place now. A failed directory fsync is retried once; if it fails again
  // the file stays (a retry of create sees EEXIST and may open it and call sync_entry()).
  if (!sync_dir().ok()) LAYER_TRY(sync_dir());
  return std::shared_ptr<LayerFile>(file);
}

Status LocalStore::remove(LayerId id) {
  for (const std::string& path : {describe(id), describe(id) + ".new"}) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return sys_error(errno, "unlink {}", path);
  }
  return {};
}

Result<std::string> LocalStore::set_aside(LayerId id, const std::string& dir) {
  const std::string path = describe(id);
  LAYER_ASSIGN(auto st, stat_if_exists(path));
  if (!st) {
    LAYER_TRY(remove(id));
    return std::string();
  }
  // The tier's own directory name tells two tiers' files apart: ssd-12.layer, hdd-12.layer.
  const std::string tier_name = std::filesystem::path(dir_).filename().string();
  auto place = [&](const std::string& into) -> Result<std::string> {
    if (::mkdir(into.c_str(), 0750) != 0 && errno != EEXIST)
      return sys_error(errno, "mkdir {}", into);
    for (int n = 0;; ++n) {
      std::string target = fmt::format("{}/{}-{}.layer", into, tier_name, id);
      if (n > 0) target += fmt::format(".{}", n);
      // link + unlink, not rename: never replaces a file set aside before.
      if (::link(path.c_str(), target.c_str()) == 0) {
        if (::unlink(path.c_str()) != 0) return sys_error(errno, "unlink {}", path);
        LAYER_TRY(fsync_dir(into));
        LAYER_TRY(sync_dir());
        return target;
      }
      if (errno != EEXIST) return sys_error(errno, "link {} to {}", path, target);
    }
  };
  auto placed = place(dir);
  if (!placed && placed.error().code == EXDEV) placed = place(dir_ + "/lost+found");
  LAYER_TRY(placed);
  const std::string leftover = path + ".new";
  if (::unlink(leftover.c_str()) != 0 && errno != ENOENT)
    return sys_error(errno, "unlink {}", leftover);
  return *placed;
}

Result<std::optional<uint64_t>> LocalStore::stat(LayerId id) {
  LAYER_ASSIGN(auto st, stat_if_exists(describe(id)));
  if (!st) return std::optional<uint64_t>();
  return std::optional<uint64_t>(static_cast<uint64_t>(st->st_size));
}

Result<std::optional<uint64_t>> LocalStore::allocated(LayerId id) {
  LAYER_ASSIGN(auto st, stat_if_exists(describe(id)));
  if (!st) return std::optional<uint64_t>();
  return std::optional<uint64_t>(static_cast<uint64_t>(st->st_blocks) * 512);
}

Result<LayerStore::Space> LocalStore::space() {
  struct statvfs st;
  if (::statvfs(dir_.c_str(), &st) != 0) return sys_error(errno, "statvfs {}", dir_);
  Space s;
  s.total = static_cast<uint64_t>(st.f_blocks) * st.f_frsize;
  s.used = static_cast<uint64_t>(st.f_blocks - st.f_bfree) * st.f_frsize;
  return s;
}

Result<std::vector<LayerStore::Entry>> LocalStore::list() {
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return sys_error(errno, "read tier directory {}", dir_);
  std::vector<Entry> out;
  while (struct dirent* e = ::readdir(d)) {
    const std::string_view n = e->d_name;
    const bool unfinished = n.ends_with(".layer.new");
    if (!unfinished && !n.ends_with(".layer")) continue;
    const std::string_view digits = n.substr(0, n.find('.'));
    LayerId id = 0;
    bool ok = !digits.empty() && digits.size() <= 19;
    for (char c : digits) {
      ok = ok && c >= '0' && c <= '9';
      if (ok) id = id * 10 + static_cast<uint64_t>(c - '0');
    }
    if (!ok || n != fmt::format("{}{}", id, unfinished ? ".layer.new" : ".layer")) continue;
    out.push_back(Entry{id, unfinished, dir_ + "/" + std::string(n)});
  }
  ::closedir(d);
  return out;
}

namespace {

// A copy goes in units of kCopyUnitBytes: each unit's writeback starts as soon as it is copied,
// and the oldest is waited for once kCopyUnitsInFlight are being written back. So the device
// writes the copy while the next units are read, instead of all of it at the final fdatasync (a
// burst of the whole layer that stalls every other reader of the device: docs/performance.md,
// "Tier moves"), and a reader arriving meanwhile waits behind at most that much of the copy's
// writes. Measured (1 GiB, 2-core VM, virtio disk): 4 x 4 MiB copies as fast as larger windows;
// 1 MiB units or a window of one unit cost 30-50% of the speed.
constexpr uint64_t kCopyUnitBytes = uint64_t{4} << 20;
constexpr size_t kCopyUnitsInFlight = 4;
// A paced copy (CopyOptions::rate_bytes_per_sec) is one that nobody waits for: its unit is
// smaller and waited for before the next is read, and the source is read without readahead
// (POSIX_FADV_RANDOM on the copy's own descriptor), so that at any moment at most one unit of
// it is at the device, and a client's read waits behind at most that. Measured at 64 MiB/s
// (same VM): 1 MiB units left the p99 of cold 4K reads at 2.8-2.9x idle, 256 KiB at 1.3-1.4x,
// and the copy still kept its rate (1 GiB in 16.3 s).
constexpr uint64_t kPacedUnitBytes = uint64_t{256} << 10;

// One piece of a copy, as the copying stage hands it to the finishing one.
struct CopyPiece {
  uint64_t offset = 0;
  uint64_t len = 0;
  bool has_data = false;  // any data range of the source was copied into it
  // Which of the source's pages in the piece were in the page cache before the copy (mincore:
  // bit 0 of each byte); empty when unknown (then the copy leaves the page cache alone).
  std::vector<unsigned char> resident;
};

int local_fd(LayerFile& f) {
  auto* local = dynamic_cast<LocalFile*>(&f);
  return local ? local->fd() : -1;
}

uint64_t page_bytes() { return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)); }

// Which pages of [offset, offset+len) of fd are in the page cache (mincore(2) of a mapping
// that is never touched); empty when the kernel will not say.
std::vector<unsigned char> resident_pages(int fd, uint64_t offset, uint64_t len) {
  const uint64_t page = page_bytes();
  if (fd < 0 || len == 0 || offset % page != 0) return {};
  void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (map == MAP_FAILED) return {};
  std::vector<unsigned char> v((len + page - 1) / page);
  if (::mincore(map, len, v.data()) != 0) v.clear();
  ::munmap(map, len);
  return v;
}

// Drops from fd's page cache the piece's pages that were not resident in the source before the
// copy (POSIX_FADV_DONTNEED of each such run; the kernel keeps dirty and locked pages).
void drop_new_pages(int fd, const CopyPiece& piece) {
  const uint64_t page = page_bytes();
  const auto& r = piece.resident;
  for (size_t i = 0; i < r.size();) {
    if (r[i] & 1) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < r.size() && !(r[j] & 1)) ++j;
    ::posix_fadvise(fd, static_cast<off_t>(piece.offset + i * page),
                    static_cast<off_t>((j - i) * page), POSIX_FADV_DONTNEED);
    i = j;
  }
}

// sync_file_range of [offset, offset+len): flags as sync_file_range(2).
Status write_back(int fd, const std::string& path, uint64_t offset, uint64_t len,
                  unsigned int flags) {
  if (::sync_file_range(fd, static_cast<off64_t>(offset), static_cast<off64_t>(len), flags) == 0)
    return {};
  return sys_error(errno, fmt::format("write back {} at {}", path, offset));
}
constexpr unsigned int kWriteAndWait =
    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;

// Runs fn on a new thread and waits for it; runs it here where no thread can be started
// (then thread_setup is skipped: it must not change the caller's thread).
template <typename Fn>
void run_on_own_thread(const std::function<void()>& thread_setup, Fn&& fn) {
  try {
    std::thread t([&] {
      if (thread_setup) thread_setup();
      fn();
    });
    t.join();
  } catch (const std::system_error&) {
    fn();
  }
}

// The second stage of a copy: runs `finish` on each piece the first stage hands over, one at a
// time and in order, on its own thread, while the first stage copies the next piece. After the
// first error it takes no more pieces. Where no thread can be started, submit() runs `finish`
// itself. Thread-safety: submit() and drain() from one thread (the first stage).
class PieceFinisher {
 public:
  PieceFinisher(std::function<Status(const CopyPiece&)> finish,
                const std::function<void()>& thread_setup)
      : finish_(std::move(finish)) {
    try {
      thread_ = std::thread([this, thread_setup] {
        if (thread_setup) thread_setup();
        run();
      });
    } catch (const std::system_error&) {
      // No second thread: pieces are finished inline, the copy only loses its overlap.
    }
  }
  ~PieceFinisher() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      closing_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  // Hands a piece over, first waiting while one is still queued (the second stage is at most
  // one piece behind, plus the one it works on). Returns the second stage's first error, if
  // any; then the piece is not taken.
  Status submit(CopyPiece piece) {
    if (!thread_.joinable()) return finish_(piece);
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !queued_ || !status_.ok(); });
    if (!status_.ok()) return status_;
    queued_ = std::move(piece);
    cv_.notify_all();
    return {};
  }
  // Waits until every piece handed over is finished. Returns the first error.
  Status drain() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return (!queued_ && !busy_) || !status_.ok(); });
    return status_;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return queued_ || closing_; });
      if (!queued_) return;  // closing
      const CopyPiece piece = std::move(*queued_);
      queued_.reset();
      busy_ = true;
      cv_.notify_all();  // room for the next piece
      lk.unlock();
      Status status = finish_(piece);
      lk.lock();
      busy_ = false;
      if (!status.ok() && status_.ok()) status_ = std::move(status);
      cv_.notify_all();
      if (!status_.ok()) return;
    }
  }

  std::function<Status(const CopyPiece&)> finish_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<CopyPiece> queued_;  // GUARDED_BY(mu_)
  bool busy_ = false;                // GUARDED_BY(mu_): finish_ runs
  bool closing_ = false;             // GUARDED_BY(mu_)
  Status status_;                    // GUARDED_BY(mu_): the first error
  std::thread thread_;
};

// The first stage of a copy: copies each piece's data ranges unit by unit, starting each
// unit's writeback, and hands the piece to the second stage (PieceFinisher), which checks it
// (options.check), waits for its writeback and drops from the page cache what the copy brought
// in, while this stage copies the next piece. Returns the data bytes copied.
Result<uint64_t> copy_pieces(LayerFile& src, LayerFile& out, uint64_t size,
                             const CopyOptions& options) {
  const uint64_t piece_bytes = options.piece_bytes;
  // Between two local files the kernel copies (copy_file_range: no user-space round trip, a
  // reflink where the filesystem shares extents); it refuses across filesystems (EXDEV) and on
  // some filesystems, and then read/write does it. Any other store gets read/write, and no
  // writeback or page-cache handling (it has no descriptor for them).
  const int in_fd = local_fd(src), out_fd = local_fd(out);
  bool kernel_copy = in_fd >= 0 && out_fd >= 0;
  PieceFinisher finisher(
      [&](const CopyPiece& piece) -> Status {
        if (options.check) LAYER_TRY(options.check(src, out, piece.offset, piece.len));
        if (!piece.has_data || out_fd < 0) return {};
        LAYER_TRY(write_back(out_fd, out.path(), piece.offset, piece.len, kWriteAndWait));
        // Leave the page cache as the copy found it (unless options.keep_cache: then no
        // residency was taken): the source's pages it read in go, and so do the copy's (clean
        // now), but where the source's were cached (a working set readers use), the copy's
        // stay, for the readers that switch to it.
        if (!piece.resident.empty()) {
          drop_new_pages(in_fd, piece);
          drop_new_pages(out_fd, piece);
        }
        return {};
      },
      options.thread_setup);
  const bool paced = options.rate_bytes_per_sec > 0;
  const uint64_t unit_bytes = paced ? kPacedUnitBytes : kCopyUnitBytes;
  const size_t units_in_flight = paced ? 0 : kCopyUnitsInFlight;
  Pacer pacer(options.rate_bytes_per_sec, nullptr);
  // Only this copy's descriptor of the source: other readers keep their readahead.
  if (paced && in_fd >= 0) (void)::posix_fadvise(in_fd, 0, 0, POSIX_FADV_RANDOM);
  std::vector<uint8_t> buf;
  std::deque<std::pair<uint64_t, uint64_t>> writing;  // units being written back, oldest first
  auto copy_unit = [&](uint64_t start, uint64_t len) -> Status {
    pacer.admit(len);
    for (uint64_t done = 0; done < len;) {
      if (kernel_copy) {
        loff_t in_off = static_cast<loff_t>(start + done), out_off = in_off;
        const ssize_t n = ::copy_file_range(in_fd, &in_off, out_fd, &out_off, len - done, 0);
        if (n > 0) {
          done += static_cast<uint64_t>(n);
          continue;
        }
        // A refusal (another filesystem, a filesystem or kernel without it), or 0 before the
        // range's end: read/write copies the rest. Any other error is the copy's.
        const int err = n < 0 ? errno : 0;
        if (err == EINTR) continue;
        if (err != 0 && err != EXDEV && err != EINVAL && err != EOPNOTSUPP && err != ENOSYS)
          return sys_error(err, fmt::format("copy {} to {}", src.path(), out.path()));
        kernel_copy = false;
      }
      if (buf.empty()) buf.resize(unit_bytes);
      const uint64_t n = std::min<uint64_t>(buf.size(), len - done);
      LAYER_TRY(src.read(buf.data(), n, start + done));
      LAYER_TRY(out.write(buf.data(), n, start + done));
      done += n;
    }
    if (out_fd < 0) return {};
    // Only a start (the final fdatasync, which also covers metadata and the device's cache, is
    // what makes the copy durable); an error shows at the wait.
    (void)::sync_file_range(out_fd, static_cast<off64_t>(start), static_cast<off64_t>(len),
                            SYNC_FILE_RANGE_WRITE);
    writing.emplace_back(start, len);
    if (writing.size() > units_in_flight) {
      const auto [off, n] = writing.front();
      writing.pop_front();
      LAYER_TRY(write_back(out_fd, out.path(), off, n, kWriteAndWait));
    }
    return {};
  };

  uint64_t data_bytes = 0;
  // Residency is taken one piece ahead: the kernel's readahead for one piece reaches into the
  // next (by up to its window, 8 MiB by default, less than the mover's pieces), not into the
  // one after. (A page counted resident by mistake only stays cached.)
  const int probe_fd = out_fd >= 0 && !options.keep_cache ? in_fd : -1;
  std::vector<unsigned char> next_resident =
      resident_pages(probe_fd, 0, std::min(piece_bytes, size));
  for (uint64_t offset = 0; offset < size; offset += piece_bytes) {
    CopyPiece piece{offset, std::min(piece_bytes, size - offset), false, std::move(next_resident)};
    if (offset + piece_bytes < size)
      next_resident = resident_pages(probe_fd, offset + piece_bytes,
                                     std::min(piece_bytes, size - offset - piece_bytes));
    Status status;
    LAYER_TRY(src.data_extents(piece.offset, piece.len, [&](uint64_t start, uint64_t len) {
      piece.has_data = true;
      data_bytes += len;
      for (uint64_t done = 0; status.ok() && done < len; done += unit_bytes)
        status = copy_unit(start + done, std::min(unit_bytes, len - done));
    }));
    LAYER_TRY(status);
    LAYER_TRY(finisher.submit(std::move(piece)));
  }
  LAYER_TRY(finisher.drain());
  return data_bytes;
}

}  // namespace

Result<uint64_t> LocalStore::copy_to(LayerId id, LayerStore& dst, const CopyOptions& options) {
  if (options.piece_bytes == 0 || options.piece_bytes % 4096 != 0)
    return make_error(EINVAL, "copy of layer {}: piece size {} is not a positive multiple of 4096",
                      id, options.piece_bytes);
  LAYER_ASSIGN(auto src, open(id, false));
  LAYER_ASSIGN(uint64_t size, src->size());
  LAYER_ASSIGN(auto out, dst.create(id, size));
  Result<uint64_t> copied = uint64_t{0};
  // Both stages on threads of their own, so that options.thread_setup (lowering their
  // priority) leaves the caller's thread as it was.
  run_on_own_thread(options.thread_setup, [&] { copied = copy_pieces(*src, *out, size, options); });
  // create() made the name durable (directory fsync); this makes the data durable.
  if (copied.ok()) {
    if (auto synced = out->sync(); !synced.ok()) copied = std::move(synced).error();
  }
  if (!copied.ok()) (void)dst.remove(id);  // no partial copy stays behind
  return copied;
}

Status LocalStore::check_can_hold(uint64_t size_bytes) {
  // O_TMPFILE: nameless, gone on close; a named probe where the filesystem lacks it.
  std::string named;
  int fd = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    named = fmt::format("{}/.size-probe.{}", dir_, ::getpid());
    fd = ::open(named.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  }
  if (fd < 0) return sys_error(errno, "probe file size limit in tier {}", dir_);
  const int rc = ::ftruncate(fd, static_cast<off_t>(size_bytes));
  const int err = errno;
  ::close(fd);
  if (!named.empty()) ::unlink(named.c_str());
  if (rc != 0 && (err == EFBIG || err == EINVAL))
    return make_error(EINVAL,
                      "size {} is larger than the filesystem of tier {} can hold in one file "
                      "({}); choose a smaller size or a tier on another filesystem",
                      size_bytes, dir_, sys_error(err, "ftruncate").message);
  if (rc != 0) return sys_error(err, "probe file size limit in tier {}", dir_);
  return {};
}

Status LocalStore::sync_dir() { return fsync_dir(dir_); }

// ---- FaultInjectingStore ----

// A LocalStore whose directory fsyncs go through the fault store's gate.
// A LocalStore whose directory fsyncs go through the fault store's gate.
class FaultInjectingStore::Local : public LocalStore {
 public:
  Local(std::string dir, FaultInjectingStore* store) : LocalStore(std::move(dir)), store_(store) {}

 protected:
  Status sync_dir() override {
    LAYER_TRY(store_->dir_sync_gate(dir()));
    return LocalStore::sync_dir();
  }

 private:
  FaultInjectingStore* store_;
};

class FaultInjectingStore::File : public ForwardingFile {
 public:
  File(std::shared_ptr<LayerFile> inner, FaultInjectingStore* store)
      : ForwardingFile(std::move(inner)), store_(store) {}

  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    LAYER_ASSIGN(uint64_t id, save(offset, len));
    if (store_->on_write_saved) store_->on_write_saved();
    LAYER_TRY(inner_->write(buf, len, offset));
    complete(id);
    return {};
  }
  Status punch(uint64_t offset, uint64_t len) override {
    LAYER_ASSIGN(uint64_t id, save(offset, len));
    LAYER_TRY(inner_->punch(offset, len));
    complete(id);
    return {};
  }
  Status sync() override {
    if (store_->on_sync) store_->on_sync();
    // Covered: the writes that completed before this sync began. One whose pwrite lands
    // after the sync started keeps its undo record.
    std::vector<uint64_t> covered;  // ascending
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (const auto& u : undo_)
        if (u.completed) covered.push_back(u.id);
    }
    if (store_->take_sync_failure()) {
      // As Linux: the dirty pages are dropped (here: undone) and the error is reported once.
      std::lock_guard<std::mutex> lk(mu_);
      for (auto it = undo_.rbegin(); it != undo_.rend(); ++it)
        (void)inner_->write(it->old.data(), it->old.size(), it->offset);
      undo_.clear();
      return make_error(EIO, "fdatasync {}: Input/output error (injected)", inner_->path());
    }
    LAYER_TRY(inner_->sync());
    std::lock_guard<std::mutex> lk(mu_);
    std::erase_if(undo_, [&](const Undo& u) {
      return std::binary_search(covered.begin(), covered.end(), u.id);
    });
    return {};
  }
  Status sync_entry() override {
    LAYER_TRY(store_->dir_sync_gate(dir_of(inner_->path())));
    return inner_->sync_entry();
  }

  // Puts back what unsynced writes replaced, newest first; with tear, a random subset.
  void power_loss(bool tear, std::mt19937_64& rng) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
      if (tear && rng() % 2 == 0) continue;
      (void)inner_->write(it->old.data(), it->old.size(), it->offset);
    }
    undo_.clear();
  }

 private:
  struct Undo {
    uint64_t id;  // ascending in undo_
    uint64_t offset;
    std::vector<uint8_t> old;
    bool completed = false;  // the write or punch returned
  };
  Result<uint64_t> save(uint64_t offset, uint64_t len) {
    Undo u{0, offset, std::vector<uint8_t>(len)};
    LAYER_TRY(inner_->read(u.old.data(), len, offset));
    std::lock_guard<std::mutex> lk(mu_);
    u.id = next_id_++;
    undo_.push_back(std::move(u));
    return undo_.back().id;
  }
  void complete(uint64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& u : undo_)
      if (u.id == id) u.completed = true;
  }
  FaultInjectingStore* store_;
  std::mutex mu_;
  std::vector<Undo> undo_;  // GUARDED_BY(mu_)
  uint64_t next_id_ = 0;    // GUARDED_BY(mu_)
};

Result<std::shared_ptr<LayerFile>> FaultInjectingStore::track(
    Result<std::shared_ptr<LayerFile>> inner) {
  if (!inner) return std::move(inner).error();
  auto f = std::make_shared<File>(std::move(*inner), this);
  std::lock_guard<std::mutex> lk(mu_);
  files_.push_back(f);
  return std::shared_ptr<LayerFile>(f);
}

FaultInjectingStore::FaultInjectingStore(std::string dir)
    : ForwardingStore(std::make_unique<Local>(std::move(dir), this)) {}

Result<std::shared_ptr<LayerFile>> FaultInjectingStore::open(LayerId id, bool writable) {
  return track(inner().open(id, writable));
}

Result<std::shared_ptr<LayerFile>> FaultInjectingStore::create(LayerId id, uint64_t size_bytes) {
  return track(inner().create(id, size_bytes));
}

void FaultInjectingStore::simulate_power_loss(bool tear, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& f : files_) f->power_loss(tear, rng);
}

void FaultInjectingStore::fail_next_syncs(int n) {
  std::lock_guard<std::mutex> lk(mu_);
  failing_syncs_ = n;
}

void FaultInjectingStore::fail_next_dir_syncs(int n) {
  std::lock_guard<std::mutex> lk(mu_);
  failing_dir_syncs_ = n;
}

int FaultInjectingStore::dir_syncs() {
  std::lock_guard<std::mutex> lk(mu_);
  return dir_syncs_;
}

bool FaultInjectingStore::take_sync_failure() {
  std::lock_guard<std::mutex> lk(mu_);
  if (failing_syncs_ <= 0) return false;
  --failing_syncs_;
  return true;
}

Status FaultInjectingStore::dir_sync_gate(const std::string& dir) {
  std::lock_guard<std::mutex> lk(mu_);
  ++dir_syncs_;
  if (failing_dir_syncs_ <= 0) return {};
  --failing_dir_syncs_;
  return make_error(EIO, "fsync directory {}: Input/output error (injected)", dir);
}

}  // namespace layer
