// nbd_fixture.cc — see nbd_fixture.h.
//
// Child processes: posix_spawnp with every descriptor of ours O_CLOEXEC, so a daemonized nbdkit
// never inherits a pipe of another command (which would keep run() reading forever). A
// daemonized nbdkit's parent exits right after the fork; the test process is a child subreaper,
// so the daemon is re-parented to it and stop() can reap it. Without that (or if the prctl is
// refused) a dead daemon stays a zombie of PID 1, which is recognised through /proc/PID/stat.
#include "nbd_fixture.h"

#include <dirent.h>
#include <fcntl.h>
#include <libnbd.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

extern char** environ;

namespace layer_test {

bool g_sanitizer_report_seen = false;
bool g_server_stop_failed = false;

namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(int err) { return std::strerror(err); }

// Closes a descriptor on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_;
};

// posix_spawn file actions, destroyed on scope exit.
class FileActions {
 public:
  FileActions() { posix_spawn_file_actions_init(&fa_); }
  ~FileActions() { posix_spawn_file_actions_destroy(&fa_); }
  FileActions(const FileActions&) = delete;
  FileActions& operator=(const FileActions&) = delete;
  posix_spawn_file_actions_t* get() { return &fa_; }

 private:
  posix_spawn_file_actions_t fa_;
};

// The current environment with `extra` ("NAME=VALUE") added or replacing entries of that name.
std::vector<std::string> merged_env(const std::vector<std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry(*e);
    std::string name = entry.substr(0, entry.find('='));
    bool replaced = false;
    for (const auto& x : extra) {
      if (x.substr(0, x.find('=')) == name) replaced = true;
    }
    if (!replaced) out.push_back(entry);
  }
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env,
            FileActions& actions) {
  if (argv.empty()) throw TestError("spawn: empty argv");
  std::vector<std::string> args = argv;
  std::vector<std::string> envs = merged_env(env);
  auto c_args = c_strings(args);
  auto c_env = c_strings(envs);
  pid_t pid = -1;
  int r = posix_spawnp(&pid, args[0].c_str(), actions.get(), nullptr, c_args.data(), c_env.data());
  if (r != 0) throw TestError("cannot start " + args[0] + ": " + errno_text(r));
  return pid;
}

std::string status_text(int status) {
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "status " + std::to_string(status);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// True when `pid` no longer runs: reaped now by us, or gone, or a zombie of someone else.
bool reap_if_dead(pid_t pid, std::string* how) {
  int status = 0;
  pid_t r = waitpid(pid, &status, WNOHANG);
  if (r == pid) {
    if (how) *how = status_text(status);
    return true;
  }
  if (r == 0) return false;  // our child, still running
  // Not our child: look at /proc.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!stat || !std::getline(stat, line)) {
    if (how) *how = "gone";
    return true;
  }
  auto close_paren = line.rfind(')');
  char state = close_paren != std::string::npos && close_paren + 2 < line.size()
                   ? line[close_paren + 2]
                   : '?';
  if (state == 'Z' || state == 'X') {
    if (how) *how = "zombie";
    return true;
  }
  return false;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::atomic<int> g_server_counter{0};

// ---- watchdog ----

// One message on the watchdog pipe; smaller than PIPE_BUF, so each write is atomic.
struct WatchMessage {
  char op;  // '+' / '-' pid, 'D' / 'd' directory
  pid_t pid;
  char path[256];
};
static_assert(sizeof(WatchMessage) < 4096);

std::mutex g_watch_mu;
int g_watch_fd = -1;  // GUARDED_BY(g_watch_mu): write end of the pipe

// The watchdog's body, in a child forked from a process that may have threads: only
// async-signal-safe calls (read, kill, umount-free execv, _exit) and no allocation.
[[noreturn]] void watchdog_main(int fd) {
  constexpr int kMax = 128;
  static pid_t pids[kMax];
  static char dirs[kMax][256];
  int npids = 0, ndirs = 0;
  struct sigaction ignore = {};
  ignore.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) sigaction(sig, &ignore, nullptr);
  WatchMessage m;
  while (true) {
    size_t got = 0;
    while (got < sizeof m) {
      ssize_t n = ::read(fd, reinterpret_cast<char*>(&m) + got, sizeof m - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += size_t(n);
    }
    if (got < sizeof m) break;  // end of file: the test is gone
    m.path[sizeof m.path - 1] = '\0';
    if (m.op == '+' && npids < kMax) pids[npids++] = m.pid;
    if (m.op == '-') {
      for (int i = 0; i < npids; ++i) {
        if (pids[i] == m.pid) pids[i--] = pids[--npids];
      }
    }
    if (m.op == 'D' && ndirs < kMax) std::memcpy(dirs[ndirs++], m.path, sizeof m.path);
    if (m.op == 'd') {
      for (int i = 0; i < ndirs; ++i) {
        if (std::strcmp(dirs[i], m.path) == 0) std::memcpy(dirs[i--], dirs[--ndirs], 256);
      }
    }
  }
  for (int i = 0; i < npids; ++i) ::kill(pids[i], SIGKILL);
  if (ndirs > 0) {
    static char* argv[kMax + 3];
    static char rm[] = "rm", rf[] = "-rf";
    argv[0] = rm;
    argv[1] = rf;
    for (int i = 0; i < ndirs; ++i) argv[2 + i] = dirs[i];
    argv[2 + ndirs] = nullptr;
    ::execv("/bin/rm", argv);
  }
  ::_exit(0);
}

void watch_send(char op, pid_t pid, const std::string& path) {
  std::lock_guard<std::mutex> lk(g_watch_mu);
  if (g_watch_fd < 0) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return;  // best effort: the destructors still clean up
    pid_t child = ::fork();
    if (child == 0) {
      // Detach: a new session, and a grandchild re-parented away from the test (when the test
      // is not yet a subreaper: watchdog_start() runs first), so a ctest timeout, which
      // SIGKILLs the test's process tree, does not reach the watchdog.
      ::setsid();
      if (::fork() != 0) ::_exit(0);
      // Keep only the read end: inherited sockets would keep connections open.
      for (int fd = 0; fd < 4096; ++fd) {
        if (fd != fds[0]) ::close(fd);
      }
      watchdog_main(fds[0]);
    }
    ::close(fds[0]);
    if (child < 0) {
      ::close(fds[1]);
      return;
    }
    int status;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    g_watch_fd = fds[1];
  }
  WatchMessage m = {};
  m.op = op;
  m.pid = pid;
  std::strncpy(m.path, path.c_str(), sizeof m.path - 1);
  (void)!::write(g_watch_fd, &m, sizeof m);
}

}  // namespace

void watchdog_start() { watch_send('-', 0, ""); }
void watchdog_add_pid(pid_t pid) { watch_send('+', pid, ""); }
void watchdog_remove_pid(pid_t pid) { watch_send('-', pid, ""); }
void watchdog_add_dir(const std::string& path) { watch_send('D', 0, path); }
void watchdog_remove_dir(const std::string& path) { watch_send('d', 0, path); }

[[noreturn]] void skip(const std::string& reason) {
  std::cerr << "SKIP: " << reason << std::endl;
  std::exit(77);
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string require_env(const char* name) {
  std::string v = env_or_empty(name);
  if (v.empty()) skip(std::string(name) + " is not set (run the test through ctest)");
  return v;
}

void require_program(const std::string& program) {
  std::string path = env_or_empty("PATH");
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    if (::access((dir + "/" + program).c_str(), X_OK) == 0) return;
  }
  skip(program + " is not installed (not found in PATH)");
}

void become_subreaper() {
  // Best effort: without it stop() still sees the daemon die through /proc.
  (void)prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
}

uint64_t test_seed(const std::string& test_name) {
  uint64_t seed;
  std::string from_env = env_or_empty("LAYER_TEST_SEED");
  if (!from_env.empty()) {
    seed = std::strtoull(from_env.c_str(), nullptr, 0);
  } else {
    std::random_device rd;
    seed = (uint64_t(rd()) << 32) ^ rd();
  }
  std::cerr << test_name << ": seed " << seed << " (replay with LAYER_TEST_SEED=" << seed << ")"
            << std::endl;
  return seed;
}

bool poll_until(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  auto step = std::chrono::milliseconds(1);
  while (true) {
    if (done()) return true;
    if (Clock::now() >= deadline) return done();
    std::this_thread::sleep_for(step);
    step = std::min(step * 2, std::chrono::milliseconds(20));
  }
}

// ---- TempDir ----

TempDir::TempDir() {
  // sun_path holds 108 bytes: keep the directory short enough for DIR/srv-N.sock.
  std::string base = env_or_empty("TMPDIR");
  if (base.empty() || base.size() > 60) base = "/tmp";
  std::string templ = base + "/layer-it.XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    throw TestError("mkdtemp " + templ + ": " + errno_text(errno));
  }
  path_ = buf.data();
  watchdog_add_dir(path_);
}

TempDir::~TempDir() {
  watchdog_remove_dir(path_);
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
  if (ec) std::cerr << "warning: cannot remove " << path_ << ": " << ec.message() << std::endl;
}

// ---- processes ----

std::string RunResult::describe() const {
  return "exit " + std::to_string(exit_code) + "; stdout: " + out + "; stderr: " + err;
}

RunResult run(const std::vector<std::string>& argv, const std::vector<std::string>& env) {
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) throw TestError("pipe2: " + errno_text(errno));
  Fd out_r(out_pipe[0]), out_w(out_pipe[1]);
  if (pipe2(err_pipe, O_CLOEXEC) != 0) throw TestError("pipe2: " + errno_text(errno));
  Fd err_r(err_pipe[0]), err_w(err_pipe[1]);

  FileActions actions;
  posix_spawn_file_actions_addopen(actions.get(), 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(actions.get(), out_w.get(), 1);
  posix_spawn_file_actions_adddup2(actions.get(), err_w.get(), 2);
  pid_t pid = spawn(argv, env, actions);
  out_w.reset();
  err_w.reset();

  RunResult result;
  pollfd fds[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_count = 2;
  char buf[65536];
  while (open_count > 0) {
    int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        sinks[i]->append(buf, size_t(got));
      } else if (got == 0 || errno != EINTR) {
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.exit_code = exit_code_of(status);
  return result;
}

RunResult run_ok(const std::vector<std::string>& argv, const std::vector<std::string>& env) {
  RunResult r = run(argv, env);
  if (r.exit_code != 0) {
    std::string cmd;
    for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
    throw TestError(cmd + " failed: " + r.describe());
  }
  return r;
}

std::vector<std::string> nbdkit_env(const std::string& report_prefix) {
  std::string preload = env_or_empty("LAYER_NBDKIT_PRELOAD");
  if (preload.empty()) return {};
  // nbdkit is not instrumented: leak checking would report nbdkit's own allocations.
  return {"LD_PRELOAD=" + preload, "ASAN_OPTIONS=detect_leaks=0:log_path=" + report_prefix,
          "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=" + report_prefix};
}

// ---- Pool ----

Pool::Pool(std::string dir) : dir_(std::move(dir)) {
  run_ok({require_env("LAYER_BIN"), "init", dir_});
}

RunResult Pool::layer(const std::vector<std::string>& args) const {
  std::vector<std::string> argv = {require_env("LAYER_BIN"), "--pool", dir_};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv);
}

RunResult Pool::layer_ok(const std::vector<std::string>& args) const {
  RunResult r = layer(args);
  if (r.exit_code != 0) {
    std::string cmd = "layer";
    for (const auto& a : args) cmd += " " + a;
    throw TestError(cmd + " failed: " + r.describe());
  }
  return r;
}

void Pool::import_image(const std::string& ref, const std::string& file) const {
  (void)layer_ok({"image", "import", ref, file});
}

void Pool::clone(const std::string& ref, const std::string& container,
                 std::optional<uint64_t> size_bytes) const {
  std::vector<std::string> args = {"clone", ref, container};
  if (size_bytes) {
    args.push_back("--size");
    args.push_back(std::to_string(*size_bytes));
  }
  (void)layer_ok(args);
}

// ---- images ----

std::vector<uint8_t> make_random_image(const std::string& path, uint64_t size_bytes,
                                       std::mt19937_64& rng) {
  if (size_bytes % 512 != 0) throw TestError("make_random_image: size not a multiple of 512");
  std::vector<uint8_t> content(size_bytes, 0);
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw TestError("open " + path + ": " + errno_text(errno));
  if (::ftruncate(fd.get(), off_t(size_bytes)) != 0) {
    throw TestError("ftruncate " + path + ": " + errno_text(errno));
  }
  constexpr uint64_t kRegion = 64 * 1024;
  for (uint64_t off = 0; off < size_bytes; off += kRegion) {
    uint64_t len = std::min(kRegion, size_bytes - off);
    uint8_t* p = content.data() + off;
    switch (rng() % 4) {
      case 0:  // hole
        continue;
      case 1:  // written zeroes
        break;
      case 2:  // random data
        for (uint64_t i = 0; i < len; ++i) p[i] = uint8_t(rng());
        break;
      default: {  // a few short runs of data in zeroes
        int runs = 1 + int(rng() % 8);
        for (int r = 0; r < runs; ++r) {
          uint64_t at = rng() % len;
          uint64_t n = std::min<uint64_t>(1 + rng() % 100, len - at);
          for (uint64_t i = 0; i < n; ++i) p[at + i] = uint8_t(rng() | 1);
        }
      }
    }
    if (::pwrite(fd.get(), p, len, off_t(off)) != ssize_t(len)) {
      throw TestError("pwrite " + path + ": " + errno_text(errno));
    }
  }
  return content;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TestError("cannot open " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// ---- Server ----

Server::Server(const TempDir& dir, const Pool& pool, ServerOptions options)
    : options_(std::move(options)) {
  become_subreaper();
  int n = ++g_server_counter;
  std::string stem = dir / ("srv-" + std::to_string(n));
  socket_ = stem + ".sock";
  pidfile_ = stem + ".pid";
  logfile_ = stem + ".log";
  report_prefix_ = stem + ".sanitizer";

  std::vector<std::string> argv = {"nbdkit"};
  if (options_.mode == ServerMode::kForeground) argv.push_back("-f");
  // Sanitizer runs always keep the debug log: stop() reads it (see kPluginUnloaded).
  if (options_.verbose || sanitized()) {
    argv.push_back("-v");
    argv.push_back("--log=stderr");
  }
  argv.insert(argv.end(), {"-P", pidfile_, "-U", socket_});
  if (options_.threads > 0)
    argv.insert(argv.end(), {"--threads", std::to_string(options_.threads)});
  if (options_.read_only) argv.push_back("-r");
  argv.insert(argv.end(), options_.extra_args.begin(), options_.extra_args.end());
  argv.push_back(require_env("LAYER_PLUGIN"));
  argv.push_back("pool=" + pool.dir());

  FileActions actions;
  posix_spawn_file_actions_addopen(actions.get(), 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(actions.get(), 1, logfile_.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(actions.get(), 1, 2);
  std::vector<std::string> env = nbdkit_env(report_prefix_);
  env.insert(env.end(), options_.env.begin(), options_.env.end());
  spawned_ = spawn(argv, env, actions);
  watchdog_add_pid(spawned_);
  // ASan makes a start a few times slower; the deadline only bounds a hung start.
  try {
    wait_ready(spawned_, Clock::now() + std::chrono::seconds(30));
  } catch (...) {
    watchdog_remove_pid(spawned_);
    throw;
  }
}

void Server::wait_ready(pid_t spawned, Clock::time_point deadline) {
  bool spawned_done = false;
  std::string spawned_status;
  auto step = std::chrono::milliseconds(1);
  while (true) {
    if (!spawned_done && reap_if_dead(spawned, &spawned_status)) {
      spawned_done = true;
      // The daemonizing parent exits 0 right after forking; anything else is a failed start.
      if (options_.mode == ServerMode::kForeground || spawned_status != "exit 0") {
        throw TestError("nbdkit exited before it was ready (" + spawned_status +
                        "); log: " + log());
      }
    }
    std::string content = slurp(pidfile_);
    if (!content.empty() && content.back() == '\n') {
      pid_ = pid_t(std::strtol(content.c_str(), nullptr, 10));
      if (pid_ <= 0) throw TestError("bad pidfile " + pidfile_ + ": " + content);
      if (pid_ != spawned) watchdog_add_pid(pid_);
      // The daemonizing parent exits right after its fork: reap it, leaving no zombie.
      if (!spawned_done && pid_ != spawned) {
        poll_until([&] { return reap_if_dead(spawned, nullptr); }, std::chrono::seconds(10));
      }
      return;
    }
    if (Clock::now() >= deadline) {
      if (!spawned_done) {
        ::kill(spawned, SIGKILL);
        reap_if_dead(spawned, nullptr);
      }
      throw TestError("nbdkit did not write its pidfile in time; log: " + log());
    }
    std::this_thread::sleep_for(step);
    step = std::min(step * 2, std::chrono::milliseconds(10));
  }
}

Server::~Server() {
  try {
    stop();
  } catch (const std::exception& e) {
    std::cerr << "warning: stopping nbdkit: " << e.what() << std::endl;
  }
}

void Server::forget() {
  watchdog_remove_pid(pid_);
  if (spawned_ != pid_) {
    reap_if_dead(spawned_, nullptr);
    watchdog_remove_pid(spawned_);
  }
  pid_ = -1;
  spawned_ = -1;
}

std::string Server::uri(const std::string& export_name) const {
  return "nbd+unix:///" + export_name + "?socket=" + socket_;
}

std::string Server::log() const { return slurp(logfile_); }

std::string Server::check_sanitizer_reports() const {
  std::string reports;
  std::filesystem::path prefix(report_prefix_);
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(prefix.parent_path(), ec)) {
    std::string name = entry.path().filename().string();
    if (name.rfind(prefix.filename().string(), 0) == 0) {
      reports += slurp(entry.path().string());
    }
  }
  if (!reports.empty()) {
    g_sanitizer_report_seen = true;
    std::cerr << "sanitizer report from nbdkit:\n" << reports << std::endl;
  }
  return reports;
}

// What nbdkit -v logs once the plugin's cleanup has returned and the plugin is unloaded.
constexpr const char* kPluginUnloaded = "debug: layer: unload plugin";

bool Server::sanitized() { return !env_or_empty("LAYER_NBDKIT_PRELOAD").empty(); }

std::string Server::stop() {
  if (pid_ <= 0) return "not running";
  std::string how;
  bool exited = false;
  Clock::time_point unloaded_at{};
  ::kill(pid_, SIGTERM);
  poll_until(
      [&] {
        if (reap_if_dead(pid_, &how)) return exited = true;
        // With libasan preloaded, an nbdkit whose worker threads called strerror() hangs in
        // its exit handlers after the plugin is gone (p11-kit's destructor waits in
        // freelocale for glibc's locale lock, whose reader count went negative; an
        // uninstrumented plugin calling strerror does the same). All of ours has run by then.
        if (sanitized() && unloaded_at == Clock::time_point{} &&
            log().find(kPluginUnloaded) != std::string::npos) {
          unloaded_at = Clock::now();
        }
        return unloaded_at != Clock::time_point{} &&
               Clock::now() - unloaded_at > std::chrono::seconds(2);
      },
      std::chrono::seconds(15));
  if (!exited) {
    if (unloaded_at != Clock::time_point{}) {
      std::cerr << "note: nbdkit " << pid_ << " unloaded the plugin but hangs in its exit "
                << "handlers (known issue with libasan preloaded); sending SIGKILL" << std::endl;
      how = "exit 0";
    } else {
      // A server that cannot shut down is a bug (its final flush may never run).
      g_server_stop_failed = true;
      std::cerr << "FAIL: nbdkit " << pid_
                << " did not exit within 15 s of SIGTERM; sending SIGKILL" << std::endl;
      how = "killed after SIGTERM timed out";
    }
    ::kill(pid_, SIGKILL);
    poll_until([&] { return reap_if_dead(pid_, nullptr); }, std::chrono::seconds(10));
  }
  forget();
  check_sanitizer_reports();
  return how;
}

bool Server::wait_exit(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return true;
  if (!poll_until([&] { return reap_if_dead(pid_, nullptr); }, timeout)) return false;
  forget();
  check_sanitizer_reports();
  return true;
}

void Server::kill9() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  poll_until([&] { return reap_if_dead(pid_, nullptr); }, std::chrono::seconds(10));
  forget();
  check_sanitizer_reports();
}

// ---- Nbd ----

Nbd::Nbd(const std::string& socket, const std::string& export_name, bool strict)
    : name_(export_name) {
  h_ = nbd_create();
  if (h_ == nullptr) fail("nbd_create");
  if (nbd_add_meta_context(h_, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) fail("add_meta_context");
  if (nbd_set_export_name(h_, export_name.c_str()) == -1) fail("set_export_name");
  if (!strict && nbd_set_strict_mode(h_, 0) == -1) fail("set_strict_mode");
  if (nbd_connect_unix(h_, socket.c_str()) == -1) {
    std::string msg = "connect to export \"" + export_name + "\" on " + socket + ": " +
                      (nbd_get_error() ? nbd_get_error() : "(no message)");
    int err = nbd_get_errno();
    nbd_close(h_);
    h_ = nullptr;
    throw NbdError(msg, err);
  }
}

Nbd::~Nbd() { nbd_close(h_); }

void Nbd::fail(const std::string& what) const {
  const char* msg = nbd_get_error();
  throw NbdError("nbd " + name_ + ": " + what + ": " + (msg ? msg : "(no message)"),
                 nbd_get_errno());
}

std::optional<std::string> Nbd::connect_error(const std::string& socket,
                                              const std::string& export_name) {
  try {
    Nbd nbd(socket, export_name);
  } catch (const NbdError& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

std::vector<std::string> Nbd::list_exports(const std::string& socket) {
  struct Handle {
    nbd_handle* h = nbd_create();
    ~Handle() { nbd_close(h); }
  } handle;
  auto fail_with = [](const std::string& what) {
    const char* msg = nbd_get_error();
    throw NbdError("list exports: " + what + ": " + (msg ? msg : "(no message)"), nbd_get_errno());
  };
  if (handle.h == nullptr) fail_with("nbd_create");
  if (nbd_set_opt_mode(handle.h, true) == -1) fail_with("set_opt_mode");
  if (nbd_connect_unix(handle.h, socket.c_str()) == -1) fail_with("connect");
  std::vector<std::string> names;
  nbd_list_callback cb = {.callback = [](void* user, const char* name, const char*) -> int {
                            static_cast<std::vector<std::string>*>(user)->push_back(name);
                            return 0;
                          },
                          .user_data = &names,
                          .free = nullptr};
  if (nbd_opt_list(handle.h, cb) == -1) fail_with("opt_list");
  nbd_opt_abort(handle.h);
  return names;
}

uint64_t Nbd::size() const {
  int64_t s = nbd_get_size(h_);
  if (s < 0) fail("get_size");
  return uint64_t(s);
}

int64_t Nbd::block_size(int which) const {
  int64_t s = nbd_get_block_size(h_, which);
  if (s < 0) fail("get_block_size");
  return s;
}

static std::string range_text(const char* op, uint64_t len, uint64_t offset) {
  return std::string(op) + " len " + std::to_string(len) + " at " + std::to_string(offset);
}

void Nbd::pread(void* buf, uint64_t len, uint64_t offset) {
  if (nbd_pread(h_, buf, len, offset, 0) == -1) fail(range_text("pread", len, offset));
}

std::vector<uint8_t> Nbd::read(uint64_t len, uint64_t offset) {
  std::vector<uint8_t> buf(len);
  // Large reads in pieces below the 32 MiB maximum request size.
  constexpr uint64_t kMax = 16 << 20;
  for (uint64_t done = 0; done < len; done += kMax) {
    pread(buf.data() + done, std::min(kMax, len - done), offset + done);
  }
  return buf;
}

void Nbd::pwrite(const void* buf, uint64_t len, uint64_t offset, uint32_t flags) {
  if (nbd_pwrite(h_, buf, len, offset, flags) == -1) fail(range_text("pwrite", len, offset));
}

void Nbd::zero(uint64_t len, uint64_t offset, uint32_t flags) {
  if (nbd_zero(h_, len, offset, flags) == -1) fail(range_text("zero", len, offset));
}

void Nbd::trim(uint64_t len, uint64_t offset, uint32_t flags) {
  if (nbd_trim(h_, len, offset, flags) == -1) fail(range_text("trim", len, offset));
}

void Nbd::cache(uint64_t len, uint64_t offset) {
  if (nbd_cache(h_, len, offset, 0) == -1) fail(range_text("cache", len, offset));
}

void Nbd::flush() {
  if (nbd_flush(h_, 0) == -1) fail("flush");
}

void Nbd::shutdown() {
  if (nbd_shutdown(h_, 0) == -1) fail("shutdown");
}

std::vector<Extent> Nbd::extents(uint64_t len, uint64_t offset) {
  struct Collector {
    std::vector<Extent> got;
    uint64_t end;
  } c{{}, offset + len};
  uint64_t at = offset;
  while (at < offset + len) {
    size_t before = c.got.size();
    nbd_extent_callback cb = {.callback = [](void* user, const char* context, uint64_t off,
                                             uint32_t* entries, size_t n, int*) -> int {
                                auto* col = static_cast<Collector*>(user);
                                if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
                                  return 0;
                                for (size_t i = 0; i + 1 < n; i += 2) {
                                  if (off >= col->end) break;
                                  uint64_t l = std::min<uint64_t>(entries[i], col->end - off);
                                  col->got.push_back(Extent{off, l, entries[i + 1]});
                                  off += entries[i];
                                }
                                return 0;
                              },
                              .user_data = &c,
                              .free = nullptr};
    uint64_t ask = std::min<uint64_t>(offset + len - at, uint64_t(1) << 30);
    if (nbd_block_status(h_, ask, at, cb, 0) == -1) fail(range_text("block_status", ask, at));
    if (c.got.size() == before) {
      throw TestError("block_status at " + std::to_string(at) + " returned no extents");
    }
    const Extent& last = c.got.back();
    if (c.got[before].offset != at) {
      throw TestError("block_status at " + std::to_string(at) + " started at " +
                      std::to_string(c.got[before].offset));
    }
    at = last.offset + last.length;
  }
  return c.got;
}

int Nbd::try_pread(void* buf, uint64_t len, uint64_t offset) {
  return nbd_pread(h_, buf, len, offset, 0) == -1 ? nbd_get_errno() : 0;
}

int Nbd::try_pwrite(const void* buf, uint64_t len, uint64_t offset, uint32_t flags) {
  return nbd_pwrite(h_, buf, len, offset, flags) == -1 ? nbd_get_errno() : 0;
}

int Nbd::try_zero(uint64_t len, uint64_t offset, uint32_t flags) {
  return nbd_zero(h_, len, offset, flags) == -1 ? nbd_get_errno() : 0;
}

int Nbd::try_trim(uint64_t len, uint64_t offset, uint32_t flags) {
  return nbd_trim(h_, len, offset, flags) == -1 ? nbd_get_errno() : 0;
}

}  // namespace layer_test
