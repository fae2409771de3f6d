// nbd_fixture.h — integration-test fixture: temp dirs, child processes, a real nbdkit serving the
// layer plugin, and a small RAII wrapper over libnbd.
//
// Mirrors nbdkit's tests/functions.sh: the server is started with `-P PIDFILE -U SOCK` and the
// absolute path of the plugin in the build tree, readiness is the pidfile (nbdkit writes it once
// it accepts connections), polled in milliseconds with a deadline, and the server is killed by
// that PID in the destructor. A test that cannot run here calls skip(), which exits 77 (ctest's
// SKIP_RETURN_CODE) with its reason.
//
// Environment (set by tests/integration/CMakeLists.txt): LAYER_BIN (the CLI), LAYER_PLUGIN (the
// plugin .so), LAYER_SRC (the source tree), and in sanitizer builds LAYER_NBDKIT_PRELOAD, the
// ASan runtime, which goes into LD_PRELOAD of nbdkit only (nbdkit itself is not instrumented).
//
// Errors: helpers throw TestError (or NbdError for libnbd calls) with a message naming the
// command and its output; Catch2 reports the message and fails the test.
//
// Thread-safety: a Nbd handle may be used by one thread at a time (one handle per thread in the
// concurrent tests). Everything else is meant for the test's main thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct nbd_handle;

namespace layer_test {

class TestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Prints "SKIP: reason" and exits 77. Use only before any server is started (no destructors run).
[[noreturn]] void skip(const std::string& reason);
// Skips unless `program` is found in PATH.
void require_program(const std::string& program);
// The value of an environment variable, or skip() naming it when it is unset or empty.
std::string require_env(const char* name);
// The value of an environment variable, or "" when unset.
std::string env_or_empty(const char* name);

// Makes the calling process a child subreaper, so a daemonized nbdkit (whose parent exits right
// after the fork) is re-parented to the test and can be reaped with waitpid. Called by Server.
void become_subreaper();

// A watchdog process, forked on first use, that outlives the test only when the test dies
// without running its destructors (a ctest timeout sends SIGKILL): it then SIGKILLs the servers
// still registered and removes the temp dirs still registered. It learns both through a pipe
// whose end of file is the test's death (every descriptor of ours is O_CLOEXEC, so no server
// inherits it). Server and TempDir register themselves. The watchdog is detached (own session,
// not in the test's process tree, so a ctest timeout does not kill it too); call
// watchdog_start() before become_subreaper(), else it is re-parented to the test.
void watchdog_start();
void watchdog_add_pid(pid_t pid);
void watchdog_remove_pid(pid_t pid);
void watchdog_add_dir(const std::string& path);
void watchdog_remove_dir(const std::string& path);

// The seed of a random test: LAYER_TEST_SEED when set, else from std::random_device. Printed to
// stderr with the name of the test, so a failure can be replayed.
uint64_t test_seed(const std::string& test_name);

// A directory made with mkdtemp (under $TMPDIR when short enough for unix socket paths, else
// /tmp), removed with everything in it by the destructor. Owns the directory.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct RunResult {
  int exit_code = -1;  // the exit status, or 128 + signal number when killed by a signal
  std::string out;
  std::string err;
  std::string describe() const;  // "exit N; stdout: ...; stderr: ..." for messages
};

// Runs argv[0] (searched in PATH) with argv, stdin from /dev/null, capturing stdout and stderr,
// and waits for it. `env` entries "NAME=VALUE" are added to (or replace in) the environment.
// Throws TestError only when the program cannot be started.
RunResult run(const std::vector<std::string>& argv, const std::vector<std::string>& env = {});
// As run(), and throws TestError with the output unless it exits 0.
RunResult run_ok(const std::vector<std::string>& argv, const std::vector<std::string>& env = {});

// The environment additions for running nbdkit: LD_PRELOAD and ASAN_OPTIONS when
// LAYER_NBDKIT_PRELOAD is set (sanitizer reports go to files named `report_prefix`.PID), else none.
std::vector<std::string> nbdkit_env(const std::string& report_prefix);

// A pool made with `layer init` in a directory the caller keeps alive, with helpers running the
// CLI on it. Copyable description; does not own the directory.
class Pool {
 public:
  // Runs `layer init DIR`. Throws TestError on failure.
  explicit Pool(std::string dir);
  const std::string& dir() const { return dir_; }
  // Runs `layer --pool DIR args...`.
  RunResult layer(const std::vector<std::string>& args) const;
  // As layer(), throwing TestError with the output unless it exits 0.
  RunResult layer_ok(const std::vector<std::string>& args) const;
  void import_image(const std::string& ref, const std::string& file) const;
  void clone(const std::string& ref, const std::string& container,
             std::optional<uint64_t> size_bytes = std::nullopt) const;

 private:
  std::string dir_;
};

// Writes a raw image of size_bytes (a multiple of 512) at path and returns its content. Regions
// of 64 KiB are, at random: holes (never written), written zeroes, random data, or mostly zero
// with a little data, so imports see holes, all-zero blocks and partly-zero blocks.
std::vector<uint8_t> make_random_image(const std::string& path, uint64_t size_bytes,
                                       std::mt19937_64& rng);
// Reads a whole file. Throws TestError.
std::vector<uint8_t> read_file(const std::string& path);

enum class ServerMode {
  kDaemon,      // no -f: nbdkit forks into the background after get_ready
  kForeground,  // -f, run in the background by the test
};

struct ServerOptions {
  ServerMode mode = ServerMode::kDaemon;
  int threads = 0;  // --threads N when > 0
  bool read_only = false;
  // -v --log=stderr: debug log in log(); in daemon mode the only way to keep nbdkit's stderr
  // (else /dev/null after the fork). Always on when LAYER_NBDKIT_PRELOAD is set.
  bool verbose = false;
  std::vector<std::string> extra_args;  // before the plugin
  std::vector<std::string> env;         // "NAME=VALUE" added to nbdkit's environment
};

// A running nbdkit serving the layer plugin on a unix socket in `dir`, owned by this object: the
// destructor stops it by PID (SIGTERM, wait, then SIGKILL). The socket, pidfile and log get
// unique names in `dir`, which must outlive the Server.
class Server {
 public:
  // Starts the server and waits until its pidfile is written. Throws TestError with the log if
  // nbdkit exits first or is not ready within the deadline.
  Server(const TempDir& dir, const Pool& pool, ServerOptions options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  pid_t pid() const { return pid_; }
  // The process the fixture started: the serving process with -f, its exited parent without.
  pid_t spawned_pid() const { return spawned_; }
  const std::string& socket() const { return socket_; }
  // nbd+unix:///EXPORT?socket=SOCK
  std::string uri(const std::string& export_name) const;
  // What nbdkit wrote to stderr (foreground mode, or daemon mode with verbose).
  std::string log() const;
  bool running() const { return pid_ > 0; }
  // Graceful stop: SIGTERM, wait (the plugin's cleanup runs), SIGKILL after 15 s, which sets
  // g_server_stop_failed (except for the known hang in exit handlers with libasan preloaded,
  // after the plugin has unloaded). Returns the wait status description, e.g. "exit 0".
  // No-op when already stopped.
  std::string stop();
  // SIGKILL and reap: nothing in the server gets to run.
  void kill9();
  // Waits up to `timeout` for the server to die on its own (a failpoint); true, and reaped, if
  // it did.
  bool wait_exit(std::chrono::milliseconds timeout);

 private:
  void wait_ready(pid_t spawned, std::chrono::steady_clock::time_point deadline);
  // True when nbdkit runs with the ASan runtime preloaded (LAYER_NBDKIT_PRELOAD).
  static bool sanitized();
  // After the server died: reaps what is left and unregisters it from the watchdog.
  void forget();
  std::string check_sanitizer_reports() const;

  ServerOptions options_;
  std::string socket_, pidfile_, logfile_, report_prefix_;
  pid_t pid_ = -1;      // the serving process (from the pidfile)
  pid_t spawned_ = -1;  // the process we spawned (== pid_ in foreground mode)
};

// Set when a server's sanitizer reports were found at stop; main() then fails the run.
extern bool g_sanitizer_report_seen;
// Set when a server did not exit after SIGTERM; main() then fails the run.
extern bool g_server_stop_failed;

class NbdError : public TestError {
 public:
  NbdError(const std::string& what, int err) : TestError(what), err_(err) {}
  int err() const { return err_; }  // nbd_get_errno() of the failure (0 if unknown)

 private:
  int err_;
};

struct Extent {
  uint64_t offset;
  uint64_t length;
  uint32_t flags;  // LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO
};

// One libnbd connection (nbd_create + nbd_connect_unix), closed by the destructor. Requests
// "base:allocation". strict = false turns off libnbd's client-side checks (bounds, commands), so
// that out-of-range or read-only requests reach the server and test its refusals.
class Nbd {
 public:
  // Throws NbdError with nbd_get_error() when the connection or handshake fails.
  Nbd(const std::string& socket, const std::string& export_name, bool strict = true);
  ~Nbd();
  Nbd(const Nbd&) = delete;
  Nbd& operator=(const Nbd&) = delete;

  // Returns the error message of connecting, or nullopt when it connected.
  static std::optional<std::string> connect_error(const std::string& socket,
                                                  const std::string& export_name);
  // Export names listed by the server (NBD_OPT_LIST). Throws NbdError.
  static std::vector<std::string> list_exports(const std::string& socket);

  nbd_handle* get() const { return h_; }
  uint64_t size() const;
  int64_t block_size(int which) const;  // LIBNBD_SIZE_MINIMUM / PREFERRED / MAXIMUM

  // Each throws NbdError naming the request and the error on failure.
  void pread(void* buf, uint64_t len, uint64_t offset);
  std::vector<uint8_t> read(uint64_t len, uint64_t offset);
  void pwrite(const void* buf, uint64_t len, uint64_t offset, uint32_t flags = 0);
  void zero(uint64_t len, uint64_t offset, uint32_t flags = 0);
  void trim(uint64_t len, uint64_t offset, uint32_t flags = 0);
  void cache(uint64_t len, uint64_t offset);
  void flush();
  // NBD_CMD_DISC: the server closes the export cleanly.
  void shutdown();
  // base:allocation extents covering [offset, offset+len), in order (asks again until covered).
  std::vector<Extent> extents(uint64_t len, uint64_t offset);

  // As above, returning 0 on success or the errno of the failure, for tests of refusals.
  int try_pread(void* buf, uint64_t len, uint64_t offset);
  int try_pwrite(const void* buf, uint64_t len, uint64_t offset, uint32_t flags = 0);
  int try_zero(uint64_t len, uint64_t offset, uint32_t flags = 0);
  int try_trim(uint64_t len, uint64_t offset, uint32_t flags = 0);

 private:
  [[noreturn]] void fail(const std::string& what) const;
  nbd_handle* h_ = nullptr;
  std::string name_;
};

// Polls `done` every few milliseconds until it returns true or `timeout` passes; returns the last
// result. For conditions a test can observe, never a fixed sleep.
bool poll_until(const std::function<bool()>& done,
                std::chrono::milliseconds timeout = std::chrono::seconds(20));

}  // namespace layer_test
