// isolate.h — work that may crash, run in a child process.
//
// LMDB keeps no page checksums: random bytes in data.mdb can make its reader follow a wild
// pointer (SIGSEGV), read past the end of the file (SIGBUS) or fail an assertion (SIGABRT).
// Whatever reads a whole index that nothing has vouched for runs in a child that cannot dump
// core, and a crash there becomes an error of the caller, never a crash of it.
//
// A child forked from a process with several threads starts with every lock another thread
// held at the fork: a malloc lock that is not fork-aware (ASan's allocator) or any mutex of ours
// hangs it. So the children come from a *fork server*: a process forked while its parent still
// had one thread (start_fork_server: the CLI's main, a server's after_fork), which stays
// single-threaded and forks one child per request. The function to run crosses the socket as a
// pointer, valid in the fork server because it is a copy of the same program. Without a fork
// server (a single-threaded caller, or a fork server that died) the caller forks the child itself.
//
// Thread-safety: run_isolated may be called from any thread; requests to the fork server are
// served one at a time.
#pragma once

#include <chrono>
#include <string>

#include "error.h"

namespace layer {

// The work: it gets `arg` and `fd` (-1, or a descriptor the caller passed, the child's own copy)
// and returns a payload or an error. It runs in a child process: it may use nothing of the
// caller's memory but what it was given, and nothing it changes there is seen by the caller.
using IsolatedFn = Result<std::string> (*)(const std::string& arg, int fd);

// Runs fn(arg, fd) in a child that cannot dump core and returns what it returned. Waits at most
// `timeout`. `what` names the work in messages ("reading index /srv/pool/index/data.mdb").
// Errors: EUCLEAN when the child crashed (SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL) or did not
// finish in time (a loop through damaged pages), naming the signal; EIO when it died otherwise
// or could not be started; EINVAL for an `arg` over 64 KiB; fn's own.
Result<std::string> run_isolated(const std::string& what, std::chrono::seconds timeout,
                                 IsolatedFn fn, const std::string& arg = {}, int fd = -1);

// Starts this process's fork server, if it has none. Call it while the process has one thread:
// it refuses (EBUSY, nothing started) when /proc/self/task lists more, since that fork is the
// very hazard it avoids. The fork server closes every descriptor but its socket, ignores SIGINT
// and SIGTERM (it ends with its parent: PR_SET_PDEATHSIG, and when its socket closes) and asks
// for nothing else. Errors: EBUSY, EIO (socketpair or fork failed).
Status start_fork_server();

// Ends the fork server and reaps it (a server's cleanup). Safe without one; after it
// run_isolated forks its children itself again.
void stop_fork_server();

// The fork server's pid, or -1 (for tests).
int fork_server_pid();

}  // namespace layer
