// isolate.cc — children for work that may crash, and the fork server they come from.
//
// Design notes:
// - A child gives up core dumps two ways (RLIMIT_CORE 0 does not stop a core_pattern pipe such
//   as systemd-coredump; PR_SET_DUMPABLE 0 does), puts the crash signals back to their default
//   action (a host process may catch them) and leaves with _exit: no atexit handler or stdio
//   buffer of the parent runs twice. It dies with its parent (PR_SET_PDEATHSIG): it shares the
//   parent's open files, a server's lock descriptor among them.
// - Its answer crosses a pipe: "0 " and the payload, or "<errno> " and the message. A child that
//   exits without writing it, or dies by a signal, is judged by how it ended.
// - The fork server gets one SOCK_SEQPACKET message per request: {fn, timeout, arg size}, the
//   arg, and by SCM_RIGHTS the pipe's write end (and the caller's fd, if any). It forks the
//   child, closes its copies, waits for the child (a pidfd, else a 10 ms poll) and kills it at
//   the deadline, then answers {wait status, timed out, fork errno}. The caller reads the pipe to
//   EOF and then the answer, with a deadline of its own a little past the fork server's, so a
//   wedged fork server is killed and replaced by direct forks, never waited on forever.
// - One request at a time (a mutex on the caller's side): the work is rare (index checks and
//   copies) and the fork server stays a single-threaded loop with nothing to lock.
#include "isolate.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace layer {
namespace {

constexpr int kCrashSignals[] = {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL};
constexpr size_t kMaxArg = 64 * 1024;
// How long past the fork server's own deadline the caller waits for its answer.
constexpr auto kServerGrace = std::chrono::seconds(30);

struct Request {
  uint64_t fn;
  uint32_t timeout_s;
  uint32_t arg_size;
};

struct Reply {
  int32_t status;     // waitpid's
  int32_t timed_out;  // 1: killed at the deadline
  int32_t fork_errno;
};

bool write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    const ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    s.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

[[noreturn]] void child_main(int out_fd, pid_t parent, IsolatedFn fn, const std::string& arg,
                             int fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (::getppid() != parent) ::_exit(4);  // the parent died before the line above
  struct rlimit none = {0, 0};
  ::setrlimit(RLIMIT_CORE, &none);
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  sigset_t set;
  sigemptyset(&set);
  for (int sig : kCrashSignals) {
    ::signal(sig, SIG_DFL);
    sigaddset(&set, sig);
  }
  ::signal(SIGPIPE, SIG_IGN);
  ::sigprocmask(SIG_UNBLOCK, &set, nullptr);
  std::string answer;
  try {
    auto r = fn(arg, fd);
    answer = r ? "0 " + *r : fmt::format("{} {}", r.error().code, r.error().message);
  } catch (const std::bad_alloc&) {
    answer = fmt::format("{} out of memory", ENOMEM);
  } catch (...) {
    answer = fmt::format("{} unexpected exception", EIO);
  }
  ::_exit(write_all(out_fd, answer) ? 0 : 3);
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

// Reads fd until EOF or the deadline; true when the deadline came first.
bool read_to_eof(int fd, std::chrono::steady_clock::time_point deadline, std::string* out) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return true;
    struct pollfd p = {fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) continue;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    out->append(buf, static_cast<size_t>(n));
  }
}

// Waits for child `pid` at most `timeout`, killing it at the deadline; its wait status.
int wait_child(pid_t pid, std::chrono::milliseconds timeout, bool* timed_out) {
  *timed_out = false;
  int status = 0;
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const pid_t got = ::waitpid(pid, &status, WNOHANG);
    if (got == pid || (got < 0 && errno != EINTR)) break;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      *timed_out = true;
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    if (pidfd >= 0) {
      struct pollfd p = {pidfd, POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    } else {
      ::usleep(10 * 1000);
    }
  }
  if (pidfd >= 0) ::close(pidfd);
  return status;
}

Result<std::string> judge(const std::string& what, std::chrono::seconds timeout, int status,
                          bool timed_out, const std::string& answer) {
  if (timed_out)
    return make_error(EUCLEAN, "{} did not finish in {} s (a loop through damaged pages?)", what,
                      timeout.count());
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    for (int crash : kCrashSignals)
      if (sig == crash)
        return make_error(EUCLEAN, "{} crashed with {} (damaged pages)", what, signal_name(sig));
    return make_error(EIO, "{}: the process doing it was killed by {}", what, signal_name(sig));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || answer.empty())
    return make_error(EIO, "{}: the process doing it exited with status {}", what,
                      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  const auto space = answer.find(' ');
  const int code = std::atoi(answer.substr(0, space).c_str());
  std::string rest = space == std::string::npos ? std::string() : answer.substr(space + 1);
  if (code == 0) return rest;
  return Error{code, std::move(rest)};
}

Result<std::string> run_forked(const std::string& what, std::chrono::seconds timeout, IsolatedFn fn,
                               const std::string& arg, int fd) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return sys_error(errno, "{}: pipe", what);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return sys_error(err == EAGAIN ? EAGAIN : EIO, "{}: fork", what);
  }
  if (pid == 0) {
    ::close(fds[0]);
    child_main(fds[1], parent, fn, arg, fd);
  }
  ::close(fds[1]);
  std::string answer;
  const bool late = read_to_eof(fds[0], std::chrono::steady_clock::now() + timeout, &answer);
  ::close(fds[0]);
  if (late) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return judge(what, timeout, status, late, answer);
}

// ---- the fork server ----

std::mutex g_mu;
int g_sock = -1;   // GUARDED_BY(g_mu)
pid_t g_pid = -1;  // GUARDED_BY(g_mu)

int count_threads() {
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr) return -1;
  int n = 0;
  while (const dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n;
}

[[noreturn]] void serve(int sock) {
  for (;;) {
    Request req{};
    std::string arg(kMaxArg, '\0');
    struct iovec iov[2] = {{&req, sizeof req}, {arg.data(), arg.size()}};
    alignas(struct cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))];
    struct msghdr msg {};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ::_exit(0);  // the parent closed its end, or is gone
    int fds[2] = {-1, -1};
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      std::memcpy(fds, CMSG_DATA(c), std::min<size_t>(count, 2) * sizeof(int));
    }
    Reply reply{};
    if (static_cast<size_t>(n) < sizeof req || fds[0] < 0 ||
        static_cast<size_t>(n) - sizeof req != req.arg_size) {
      reply.fork_errno = EPROTO;
    } else {
      arg.resize(req.arg_size);
      const pid_t self = ::getpid();
      const pid_t pid = ::fork();
      if (pid == 0) {
        ::close(sock);
        child_main(fds[0], self, reinterpret_cast<IsolatedFn>(req.fn), arg, fds[1]);
      }
      if (pid < 0) reply.fork_errno = errno;
      for (int fd : fds)
        if (fd >= 0) ::close(fd);
      fds[0] = fds[1] = -1;
      if (pid > 0) {
        bool timed_out = false;
        reply.status = wait_child(pid, std::chrono::seconds(req.timeout_s), &timed_out);
        reply.timed_out = timed_out;
      }
    }
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
    if (::send(sock, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply) ::_exit(0);
  }
}

// Drops the fork server (it failed a request): kill, reap, forget. REQUIRES: g_mu.
void drop_fork_server() {
  if (g_sock >= 0) ::close(g_sock);
  if (g_pid > 0) {
    ::kill(g_pid, SIGKILL);
    while (::waitpid(g_pid, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  g_sock = -1;
  g_pid = -1;
}

// Runs one request through the fork server. An error with code 0 means the fork server failed
// (nothing was run, or its answer was lost): the caller drops it and forks itself.
// REQUIRES: g_mu.
Result<std::string> run_served(const std::string& what, std::chrono::seconds timeout, IsolatedFn fn,
                               const std::string& arg, int fd) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return sys_error(errno, "{}: pipe", what);
  Request req{reinterpret_cast<uint64_t>(fn), static_cast<uint32_t>(timeout.count()),
              static_cast<uint32_t>(arg.size())};
  struct iovec iov[2] = {{&req, sizeof req}, {const_cast<char*>(arg.data()), arg.size()}};
  const int pass[2] = {fds[1], fd};
  const size_t npass = fd >= 0 ? 2 : 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))] = {};
  struct msghdr msg {};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  msg.msg_control = control;
  msg.msg_controllen = CMSG_SPACE(npass * sizeof(int));
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(npass * sizeof(int));
  std::memcpy(CMSG_DATA(c), pass, npass * sizeof(int));
  ssize_t sent;
  do {
    sent = ::sendmsg(g_sock, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  ::close(fds[1]);
  if (sent != static_cast<ssize_t>(sizeof req + arg.size())) {
    ::close(fds[0]);
    return Error{0, "send"};
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout + kServerGrace;
  std::string answer;
  const bool late = read_to_eof(fds[0], deadline, &answer);
  ::close(fds[0]);
  Reply reply{};
  bool got = false;
  while (!late) {
    struct pollfd p = {g_sock, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) break;
    const ssize_t n = ::recv(g_sock, &reply, sizeof reply, 0);
    if (n < 0 && errno == EINTR) continue;
    got = n == sizeof reply;
    break;
  }
  if (!got) return Error{0, "answer"};
  if (reply.fork_errno != 0)
    return sys_error(reply.fork_errno == EAGAIN ? EAGAIN : EIO, "{}: fork", what);
  return judge(what, timeout, reply.status, reply.timed_out != 0, answer);
}

}  // namespace

Result<std::string> run_isolated(const std::string& what, std::chrono::seconds timeout,
                                 IsolatedFn fn, const std::string& arg, int fd) {
  if (arg.size() > kMaxArg)
    return make_error(EINVAL, "{}: an argument of {} bytes (at most {})", what, arg.size(),
                      kMaxArg);
  {
    std::lock_guard lock(g_mu);
    if (g_sock >= 0) {
      auto r = run_served(what, timeout, fn, arg, fd);
      if (r || r.error().code != 0) return r;
      drop_fork_server();
    }
  }
  return run_forked(what, timeout, fn, arg, fd);
}

Status start_fork_server() {
  std::lock_guard lock(g_mu);
  if (g_sock >= 0) return {};
  const int threads = count_threads();
  if (threads != 1) return make_error(EBUSY, "no fork server: the process has {} threads", threads);
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
    return Error{EIO, sys_error(errno, "fork server: socketpair").message};
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(sv[0]);
    ::close(sv[1]);
    return Error{EIO, sys_error(err, "fork server: fork").message};
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (::getppid() != parent) ::_exit(0);
    ::prctl(PR_SET_NAME, "layer-fork-srv", 0, 0, 0);
    // Nothing of the parent's but stderr (for a sanitizer's report) and the socket: not its
    // listening sockets, not its lock descriptor, not a pipe a caller waits to see closed.
    int sock = sv[1];
    if (sock != 3) {
      if (::dup2(sock, 3) < 0) ::_exit(1);
      sock = 3;
    }
    ::close_range(4, ~0U, 0);
    const int null = ::open("/dev/null", O_RDWR);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      if (null > 2 && null != sock) ::close(null);
    }
    ::signal(SIGINT, SIG_IGN);
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGHUP, SIG_IGN);
    ::signal(SIGPIPE, SIG_IGN);
    ::signal(SIGCHLD, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    serve(sock);
  }
  ::close(sv[1]);
  g_sock = sv[0];
  g_pid = pid;
  return {};
}

void stop_fork_server() {
  std::lock_guard lock(g_mu);
  drop_fork_server();
}

int fork_server_pid() {
  std::lock_guard lock(g_mu);
  return g_pid;
}

}  // namespace layer
