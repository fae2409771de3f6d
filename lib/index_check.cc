// index_check.cc — a child process for reads of an index that may be damaged.
//
// Design notes:
// - The child gives up core dumps two ways (RLIMIT_CORE 0 does not stop a core_pattern pipe
//   such as systemd-coredump; PR_SET_DUMPABLE 0 does), puts the crash signals back to their
//   default action (a host process may catch them) and leaves with _exit: no atexit handler or
//   stdio buffer of the parent runs twice.
// - Its answer crosses a pipe: "0 " and the payload, or "<errno> " and the message. A child that
//   exits without writing it, or dies by a signal, is judged by how it ended.
// - The child opens its own LMDB environment: an env must not be used across fork(), and a
//   child of a process that has the index open is a process of its own (its POSIX locks on
//   lock.mdb are its own; the parent's are not inherited).
#include "index_check.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "layer_file.h"

namespace layer {
namespace {

constexpr int kCrashSignals[] = {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL};

bool write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    const ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    s.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

[[noreturn]] void child_main(int out_fd, pid_t parent,
                             const std::function<Result<std::string>()>& body) {
  // The child shares the parent's open files, its run/locks descriptor among them (and with it
  // the parent's container and layer locks): it must not outlive a parent that is killed, or a
  // restarted server would find its containers held by nobody it can name.
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
    auto r = body();
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

}  // namespace

Result<std::string> run_isolated(const std::string& what, std::chrono::seconds timeout,
                                 const std::function<Result<std::string>()>& body) {
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
    child_main(fds[1], parent, body);
  }
  ::close(fds[1]);
  // Read the answer until EOF (the child exited or died) or the deadline.
  std::string answer;
  bool timed_out = false;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    struct pollfd p = {fds[0], POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) continue;
    char buf[4096];
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    answer.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
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

std::chrono::seconds index_read_timeout(uint64_t bytes) {
  return std::chrono::seconds(120 + 60 * (bytes >> 30));
}

std::string damaged_index_advice(const std::string& index_dir) {
  const std::string root = dir_of(index_dir);
  return fmt::format(
      "Stop its servers and restore a copy: `layer --pool {0} index restore` (the newest; `layer "
      "--pool {0} index ls` lists them), then `layer --pool {0} fsck`",
      root);
}

Result<IndexWalk> check_index(const std::string& index_dir) {
  const std::string data = index_dir + "/data.mdb";
  struct stat st;
  if (::stat(data.c_str(), &st) != 0) return sys_error(errno, "index {}", data);
  const bool lock = ::access((index_dir + "/lock.mdb").c_str(), W_OK) == 0;
  auto answer = run_isolated(
      fmt::format("reading index {}", data), index_read_timeout(static_cast<uint64_t>(st.st_size)),
      [&]() -> Result<std::string> {
        LAYER_ASSIGN(auto index,
                     Index::open(index_dir, Index::Options{.read_only = true, .no_lock = !lock}));
        LAYER_ASSIGN(IndexWalk w, index->walk());
        return fmt::format("{} {} {} {} {}", w.txnid, w.entries, w.free_pages, w.file_bytes,
                           w.used_bytes);
      });
  if (!answer) {
    const Error& e = answer.error();
    if (e.code != EUCLEAN) return e;
    // "index DIR: why" and "index: why" say the index twice: only the why.
    std::string_view why = e.message;
    for (const std::string& prefix : {"index " + index_dir + ": ", std::string("index: ")})
      if (why.starts_with(prefix)) why.remove_prefix(prefix.size());
    return make_error(EUCLEAN, "index {} is damaged: {}. {}", index_dir, why,
                      damaged_index_advice(index_dir));
  }
  IndexWalk w;
  if (std::sscanf(answer->c_str(), "%lu %lu %lu %lu %lu", &w.txnid, &w.entries, &w.free_pages,
                  &w.file_bytes, &w.used_bytes) != 5)
    return make_error(EIO, "index {}: the check answered \"{}\"", index_dir, *answer);
  return w;
}

}  // namespace layer
