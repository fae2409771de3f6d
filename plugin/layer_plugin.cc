// layer_plugin.cc — nbdkit callbacks over lib/:
// `nbdkit layer pool=DIR [default=NAME] [hasher=on|off] [hash-rate=BYTES_PER_SEC]
// [heat-interval=DURATION] [tier-interval=DURATION] [index-backup-interval=DURATION]
// [verify=on|off] [journal=on|off] [stats-interval=DURATION] [stats-retention=DURATION]
// [metrics=PATH] [boot-profile=DURATION] [boot-prefetch=on|off]`.
//
// Life cycle (nbdkit forks after config_complete/get_ready unless -f; with --run the server is
// the child): config parses and makes paths absolute; get_ready reads the whole index through
// in a child process (a damaged one is refused with one line, not a crash) and validates the
// pool (read-only, nothing created, nothing left open); after_fork opens the pool (LMDB env,
// committer thread, lock file) and starts the hasher, heat writer, tiering and index copier
// threads and the control socket; cleanup stops them, flushes every open disk and closes the pool.
// No global object has a destructor with side effects: the pool, hasher and disk table are heap
// pointers owned from after_fork to cleanup.
//
// Every callback catches everything (nothing may unwind into nbdkit) and reports failures
// with nbdkit_error + nbdkit_set_error, mapping errors to the errnos NBD can carry.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>

#include "access.h"
#include "audit.h"
#include "boot_profile.h"
#include "capacity.h"
#include "control.h"
#include "control_ops.h"
#include "disk.h"
#include "hasher.h"
#include "index_backup.h"
#include "index_check.h"
#include "isolate.h"
#include "mover.h"
#include "names.h"
#include "pool.h"
#include "qos.h"
#include "snapshots.h"
#include "stats.h"
#include "tier.h"
#include "version.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

std::string g_pool_path;                              // set by config
std::string g_default_name;                           // default=NAME
bool g_hasher_on = true;                              // hasher=on|off
bool g_verify = false;                                // verify=on|off
bool g_journal = true;                                // journal=on|off
uint64_t g_hash_rate = layer::kDefaultHashRateBytes;  // hash-rate=BYTES_PER_SEC (0: unlimited)
layer::Pool* g_pool = nullptr;
layer::DiskTable* g_disks = nullptr;
// Each served container's iops and bandwidth limits (qos.h), shared by its connections.
layer::LimiterTable* g_limiters = nullptr;
// Their limits that follow the forecast (`layer set --iops auto`; forecast.h), per container.
layer::AutoLimitCache* g_auto_limits = nullptr;
layer::BackgroundHasher* g_hasher = nullptr;    // null with hasher=off
uint64_t g_heat_interval_s = 5;                 // heat-interval= (0: heat is not written)
uint64_t g_tier_interval_s = 0;                 // tier-interval= (0: no policy passes)
layer::HeatPersister* g_heat = nullptr;         // null with heat-interval=0
layer::BackgroundTiering* g_tiering = nullptr;  // null without tier-interval
layer::ControlServer* g_control = nullptr;
layer::AuditLog* g_audit = nullptr;  // POOL/log/access.log
// Open connections per peer (a unix peer's uid, a TCP peer's address) and per container, and
// their limits (max-connections-per-peer=, max-connections-per-export=; 0: none): a client
// that opens connections by the thousand is refused beyond its share instead of taking every
// container's share of the server with it.
uint64_t g_max_per_peer = 256;
uint64_t g_max_per_export = 64;
std::mutex g_conn_mu;
std::map<std::string, uint64_t> g_conn_by_peer;    // GUARDED_BY(g_conn_mu)
std::map<std::string, uint64_t> g_conn_by_export;  // GUARDED_BY(g_conn_mu)
// index-backup-interval= (0: no copies)
uint64_t g_backup_interval_s = layer::kDefaultIndexBackupInterval.count();
layer::BackgroundBackup* g_backup = nullptr;  // null with index-backup-interval=0
// Each served container's I/O counters (stats.h), shared by its connections; the writer of
// their minute rows (null with stats-interval=0) and the metrics socket (null without metrics=).
layer::StatsTable* g_stats = nullptr;
layer::StatsWriter* g_stats_writer = nullptr;
layer::MetricsServer* g_metrics = nullptr;
uint64_t g_stats_interval_s = 10;              // stats-interval= (0: no history written)
uint64_t g_stats_retention_s = 7 * 24 * 3600;  // stats-retention=
std::string g_metrics_path;                    // metrics=PATH
// Boot profiles and prefetch (boot_profile.h): the window (boot-profile=; 0: neither) and
// whether fresh clones are read ahead (boot-prefetch=).
uint64_t g_boot_window_s = 30;
bool g_boot_prefetch = true;
layer::BootService* g_boot = nullptr;  // null with boot-profile=0

constexpr uint32_t kMaxRequestBytes = 32 << 20;

// The client sees only a few errnos; anything else would arrive as EINVAL (DESIGN.md).
// ENOTSUP is meaningful only as the answer to a fast zero (layer_zero sets it itself) and
// EOVERFLOW only with DF, which this plugin does not offer: elsewhere they are internal
// errors, EIO.
int nbd_errno(int code) {
  switch (code) {
    case EIO:
    case ENOSPC:
    case EPERM:
    case EINVAL:
    case ENOMEM:
    case ESHUTDOWN:
      return code;
    case EDQUOT:
    case EFBIG:
      return ENOSPC;
    case EROFS:
      return EPERM;
    default:
      return EIO;
  }
}

int fail(const layer::Error& e) {
  nbdkit_error("%s", e.message.c_str());
  nbdkit_set_error(nbd_errno(e.code));
  return -1;
}

int check(const layer::Status& s) { return s.ok() ? 0 : fail(s.error()); }

template <typename F>
auto guarded(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    nbdkit_error("%s: out of memory", what);
    nbdkit_set_error(ENOMEM);
  } catch (const std::exception& e) {
    nbdkit_error("%s: %s", what, e.what());
    nbdkit_set_error(EIO);
  } catch (...) {
    nbdkit_error("%s: unknown exception", what);
    nbdkit_set_error(EIO);
  }
  if constexpr (std::is_pointer_v<decltype(f())>)
    return nullptr;
  else
    return -1;
}

struct Handle {
  std::shared_ptr<layer::Disk> disk;
  std::shared_ptr<layer::Limiter> limiter;  // the container's: every request passes it
  std::shared_ptr<layer::IoCounters> io;    // the container's: every request is counted (or null)
  bool readonly = false;
  // For the audit trail's close line.
  std::string export_name, container;
  nlohmann::ordered_json peer;
  bool tls = false;
  std::chrono::steady_clock::time_point opened;
  std::atomic<uint64_t> read_bytes{0}, written_bytes{0};
};

// The key a peer's connections are counted under.
std::string peer_key(const layer::Peer& peer) {
  if (peer.kind == layer::Peer::Kind::kUnix && peer.uid) return "uid " + std::to_string(*peer.uid);
  if (peer.kind == layer::Peer::Kind::kTcp) return "addr " + peer.address();
  return "unknown peer";
}

// A peer's connections are counted from preconnect (before the handshake: a connection that
// never opens an export counts too) until its thread ends: nbdkit serves each connection on a
// thread of its own, which ends with it, and a thread_local's destructor runs then.
struct PeerSlot {
  std::string key;
  bool counted = false;
  ~PeerSlot() {
    if (!counted) return;
    std::lock_guard<std::mutex> lk(g_conn_mu);
    if (--g_conn_by_peer[key] == 0) g_conn_by_peer.erase(key);
  }
};
thread_local PeerSlot t_peer_slot;

// Counts a connection of `peer_key`; the reason when the limit refuses it.
std::optional<std::string> count_peer(const std::string& peer_key) {
  std::lock_guard<std::mutex> lk(g_conn_mu);
  uint64_t& n = g_conn_by_peer[peer_key];
  if (g_max_per_peer != 0 && n >= g_max_per_peer)
    return "too many connections from " + peer_key +
           " (max-connections-per-peer=" + std::to_string(g_max_per_peer) + ")";
  ++n;
  return std::nullopt;
}

// Counts an open connection to `container`; the reason when the limit refuses it.
std::optional<std::string> count_export(const std::string& container) {
  std::lock_guard<std::mutex> lk(g_conn_mu);
  uint64_t& n = g_conn_by_export[container];
  if (g_max_per_export != 0 && n >= g_max_per_export)
    return "too many connections to container \"" + container +
           "\" (max-connections-per-export=" + std::to_string(g_max_per_export) + ")";
  ++n;
  return std::nullopt;
}

void uncount_export(const std::string& container) {
  std::lock_guard<std::mutex> lk(g_conn_mu);
  if (--g_conn_by_export[container] == 0) g_conn_by_export.erase(container);
}

layer::Disk& disk_of(void* h) { return *static_cast<Handle*>(h)->disk; }

uint64_t monotonic_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);  // vDSO: no system call
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000 + static_cast<uint64_t>(ts.tv_nsec);
}

// Counts one request in its container's I/O history when it ends (however it ends): its
// latency is from here (before the QoS wait: what the client sees) to the end of the scope.
// Nothing without counters (stats-interval=0 and no metrics=).
class Counted {
 public:
  Counted(void* h, layer::IoOp op, uint64_t bytes)
      : io_(static_cast<Handle*>(h)->io.get()),
        op_(op),
        bytes_(bytes),
        start_ns_(io_ ? monotonic_ns() : 0) {}
  ~Counted() {
    if (io_) io_->record(op_, bytes_, monotonic_ns() - start_ns_);
  }
  Counted(const Counted&) = delete;
  Counted& operator=(const Counted&) = delete;

 private:
  layer::IoCounters* const io_;
  const layer::IoOp op_;
  const uint64_t bytes_;
  const uint64_t start_ns_;
};

int layer_config(const char* key, const char* value) {
  return guarded("config", [&] {
    if (std::strcmp(key, "pool") == 0) {
      char* abs = nbdkit_realpath(value);  // nbdkit changes directory after forking
      if (!abs) return -1;
      g_pool_path = abs;
      std::free(abs);
      return 0;
    }
    if (std::strcmp(key, "default") == 0) {
      auto s = layer::validate_name(value, "default container name");
      if (!s) return fail(s.error());
      g_default_name = value;
      return 0;
    }
    if (std::strcmp(key, "hasher") == 0) {
      const int on = nbdkit_parse_bool(value);
      if (on == -1) return -1;
      g_hasher_on = on != 0;
      return 0;
    }
    if (std::strcmp(key, "boot-profile") == 0) {
      auto seconds = layer::parse_duration(value);
      if (!seconds) return fail(seconds.error());
      g_boot_window_s = *seconds;
      return 0;
    }
    if (std::strcmp(key, "boot-prefetch") == 0) {
      const int on = nbdkit_parse_bool(value);
      if (on == -1) return -1;
      g_boot_prefetch = on != 0;
      return 0;
    }
    if (std::strcmp(key, "verify") == 0 || std::strcmp(key, "journal") == 0) {
      const int on = nbdkit_parse_bool(value);
      if (on == -1) return -1;
      (key[0] == 'v' ? g_verify : g_journal) = on != 0;
      return 0;
    }
    if (std::strcmp(key, "hash-rate") == 0) {
      const int64_t rate = nbdkit_parse_size(value);
      if (rate == -1) return -1;
      g_hash_rate = static_cast<uint64_t>(rate);
      return 0;
    }
    if (std::strcmp(key, "max-connections-per-peer") == 0 ||
        std::strcmp(key, "max-connections-per-export") == 0) {
      uint64_t n = 0;
      if (nbdkit_parse_uint64_t(key, value, &n) == -1) return -1;
      (std::strcmp(key, "max-connections-per-peer") == 0 ? g_max_per_peer : g_max_per_export) = n;
      return 0;
    }
    if (std::strcmp(key, "stats-interval") == 0 || std::strcmp(key, "stats-retention") == 0) {
      const bool retention = std::strcmp(key, "stats-retention") == 0;
      auto seconds = layer::parse_duration(value);
      if (!seconds) return fail(seconds.error());
      if (retention && *seconds < 60) {
        nbdkit_error("stats-retention=%s: keep at least one minute", value);
        return -1;
      }
      (retention ? g_stats_retention_s : g_stats_interval_s) = *seconds;
      return 0;
    }
    if (std::strcmp(key, "metrics") == 0) {
      char* abs = nbdkit_absolute_path(value);  // nbdkit changes directory after forking
      if (!abs) return -1;
      g_metrics_path = abs;
      std::free(abs);
      return 0;
    }
    if (std::strcmp(key, "heat-interval") == 0 || std::strcmp(key, "tier-interval") == 0 ||
        std::strcmp(key, "index-backup-interval") == 0) {
      auto seconds = layer::parse_duration(value);
      if (!seconds) return fail(seconds.error());
      (key[0] == 'h'   ? g_heat_interval_s
       : key[0] == 't' ? g_tier_interval_s
                       : g_backup_interval_s) = *seconds;
      return 0;
    }
    nbdkit_error(
        "unknown parameter '%s' (expected pool=DIR, default=NAME, hasher=on|off, "
        "hash-rate=BYTES_PER_SEC, heat-interval=DURATION, tier-interval=DURATION, "
        "index-backup-interval=DURATION, verify=on|off, journal=on|off, "
        "stats-interval=DURATION, stats-retention=DURATION, metrics=PATH, "
        "boot-profile=DURATION, boot-prefetch=on|off, max-connections-per-peer=N or "
        "max-connections-per-export=N)",
        key);
    return -1;
  });
}

int layer_config_complete() {
  if (g_pool_path.empty()) {
    nbdkit_error("the pool=DIR parameter is required");
    return -1;
  }
  return 0;
}

int layer_get_ready() {
  // Runs before nbdkit forks and before it drops privileges: validate only, create nothing.
  // The whole index is read first, in a child process: LMDB has no checksums and a damaged
  // page can crash its reader; a damaged index is refused with one line saying what to do.
  return guarded("get_ready", [] {
    if (::access((g_pool_path + "/index/data.mdb").c_str(), F_OK) == 0) {
      auto checked = layer::check_index(g_pool_path + "/index");
      if (!checked) return fail(checked.error());
    }
    return check(layer::Pool::validate(g_pool_path));
  });
}

// The peer of the current connection (open, list_exports: nbdkit's connection context), `tls`
// as nbdkit says (nbdkit_is_tls() works in open, not in list_exports: that one is given it).
// `with_groups`: also the groups of a unix peer's user (a user-database lookup).
layer::Peer current_peer(bool tls, bool with_groups = true) {
  layer::Peer peer;
  peer.tls = tls;
  sockaddr_storage ss = {};
  socklen_t len = sizeof ss;
  if (nbdkit_peer_name(reinterpret_cast<sockaddr*>(&ss), &len) == -1) return peer;
  if (ss.ss_family == AF_UNIX) {
    peer.kind = layer::Peer::Kind::kUnix;
    const int64_t uid = nbdkit_peer_uid(), gid = nbdkit_peer_gid(), pid = nbdkit_peer_pid();
    if (uid >= 0) peer.uid = static_cast<uint32_t>(uid);
    if (gid >= 0) peer.gid = static_cast<uint32_t>(gid);
    if (pid >= 0) peer.pid = pid;
    if (with_groups && peer.uid && peer.gid) peer.groups = layer::groups_of(*peer.uid, *peer.gid);
  } else if (ss.ss_family == AF_INET) {
    peer.kind = layer::Peer::Kind::kTcp;
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    const auto* b = reinterpret_cast<const uint8_t*>(&a->sin_addr);
    peer.addr.assign(b, b + 4);
  } else if (ss.ss_family == AF_INET6) {
    peer.kind = layer::Peer::Kind::kTcp;
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    peer.addr.assign(a->sin6_addr.s6_addr, a->sin6_addr.s6_addr + 16);
    static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::equal(kMapped, kMapped + 12, peer.addr.begin()))
      peer.addr.erase(peer.addr.begin(), peer.addr.begin() + 12);
  }
  return peer;
}

// The peer as an audit line shows it.
nlohmann::ordered_json peer_json(const layer::Peer& peer) {
  nlohmann::ordered_json j;
  switch (peer.kind) {
    case layer::Peer::Kind::kUnix:
      j["kind"] = "unix";
      if (peer.uid) j["uid"] = *peer.uid;
      if (peer.gid) j["gid"] = *peer.gid;
      if (peer.pid) j["pid"] = *peer.pid;
      break;
    case layer::Peer::Kind::kTcp:
      j["kind"] = "tcp";
      j["addr"] = peer.address();
      break;
    case layer::Peer::Kind::kUnknown:
      j["kind"] = "unknown";
      break;
  }
  return j;
}

// One line of the audit trail; a failure to write it is logged, and the server goes on. Opens
// and closes are durable before this returns; refusals and boot lines are written, not waited
// for (audit.h).
void audit(nlohmann::ordered_json event) {
  if (!g_audit) return;
  event["pid"] = ::getpid();
  const std::string kind = event.value("event", std::string());
  const bool durable = kind == "open" || kind == "close";
  if (auto s = g_audit->append(event, durable); !s)
    nbdkit_error("audit log: %s", s.error().message.c_str());
}

// A boot profile written or a prefetch done (boot_profile.h): one audit line.
void boot_event(const layer::BootEvent& e) {
  const bool prefetch = e.kind == layer::BootEvent::Kind::kPrefetch;
  nlohmann::ordered_json j{{"event", prefetch ? "boot-prefetch" : "boot-profile"},
                           {"export", e.container},
                           {"container", e.container},
                           {"image", e.image_ref},
                           {"ranges", e.ranges},
                           {"bytes", e.bytes},
                           {"profile_ranges", e.profile_ranges},
                           {"profile_bytes", e.profile_bytes},
                           {"boots", e.boots}};
  if (prefetch) {
    j["ms"] = e.elapsed_ms;
    j["complete"] = e.complete;
  }
  if (!e.discarded.empty()) j["discarded"] = e.discarded;
  if (!e.error.empty()) {
    j["error"] = e.error;
    nbdkit_error("boot %s of \"%s\": %s", prefetch ? "prefetch" : "profile", e.container.c_str(),
                 e.error.c_str());
  }
  audit(std::move(j));
}

// Whether `peer` may open container `container` (access.h), and the container's resources
// (qos.h), read from one read transaction.
layer::Result<layer::AccessDecision> access_for(const std::string& container,
                                                const layer::Peer& peer,
                                                layer::Resources* resources,
                                                uint64_t* container_id = nullptr) {
  LAYER_ASSIGN(auto txn, g_pool->index().begin_read());
  LAYER_ASSIGN(const auto policy, layer::load_access_policy(txn));
  LAYER_ASSIGN(auto c, g_pool->get_container(txn, container));
  *resources = c.resources;
  if (container_id) *container_id = c.id;
  return layer::decide_access(policy, c.access, peer);
}

// The control socket's requests (control_ops.h), on its worker threads.
nlohmann::json handle_control(const nlohmann::json& request) {
  return layer_plugin::handle_control({*g_pool, *g_disks, g_hasher, *g_limiters, g_auto_limits},
                                      request);
}

// A background thread's line for nbdkit's log: failures as errors, the rest as debug output.
void log_line(bool error, const std::string& line) {
  if (error)
    nbdkit_error("%s", line.c_str());
  else
    nbdkit_debug("%s", line.c_str());
}

// This server as the tiering code sees it: its disks reload a moved frozen layer.
layer::LocalServer local_server() {
  layer::LocalServer local;
  local.pid = ::getpid();
  local.reload_moved = [](layer::LayerId id) { return g_disks->reload_moved(id); };
  // A delta of a container this server serves moves live through its disk (as the control
  // op "move" does); any other delta is left to move_layer_anywhere.
  local.move_delta = [](layer::LayerId id, layer::Tier to,
                        uint64_t rate) -> std::optional<layer::Result<layer::TierMoveReport>> {
    using Report = layer::Result<layer::TierMoveReport>;
    auto owner = layer::find_container_of_delta(*g_pool, id);
    if (!owner) return Report(std::move(owner).error());
    if (!*owner || g_pool->serving_pid((*owner)->id) != ::getpid()) return std::nullopt;
    auto disk = g_disks->acquire((*owner)->name, true);
    if (!disk) return Report(std::move(disk).error());
    layer::Disk::MoveOptions options;
    options.rate_bytes_per_sec = rate;
    auto moved = (*disk)->move_delta(id, to, options);
    if (auto released = g_disks->release(std::move(*disk)); !released)
      nbdkit_error("flush after the move of layer %" PRIu64 ": %s", id,
                   released.error().message.c_str());
    if (!moved) return Report(std::move(moved).error());
    return Report(layer::live_move_report(*moved));
  };
  return local;
}

int layer_after_fork() {
  return guarded("after_fork", [] {
    // Before the first thread (the pool's committer): index copies fork their children from
    // this single-threaded helper, never from a server whose threads may hold locks.
    if (auto forks = layer::start_fork_server(); !forks)
      nbdkit_debug("layer: %s; index copies fork from the server", forks.error().message.c_str());
    auto pool = layer::Pool::open(g_pool_path, layer::Pool::OpenOptions{});
    if (!pool) return fail(pool.error());
    g_pool = pool->release();
    g_pool->set_verify_reads(g_verify);
    g_pool->set_journal(g_journal);
    g_disks = new layer::DiskTable(*g_pool);
    g_limiters = new layer::LimiterTable();
    // Lending between the containers' limiters against the pool's capacities (capacity.h),
    // read at every round so `layer pool set` applies within one.
    if (auto lending = g_limiters->start_lending(
            [last = layer::LendingCapacity{}]() mutable {
              if (auto cap = layer::load_capacity(*g_pool)) last = {cap->iops, cap->bandwidth};
              return last;
            },
            std::chrono::milliseconds(200));
        !lending)
      return fail(lending.error());
    g_auto_limits = new layer::AutoLimitCache();
    g_stats = new layer::StatsTable();
    g_audit = new layer::AuditLog(layer::audit_dir(g_pool->paths().root));
    // Before the control socket, whose handler nudges it.
    if (g_hasher_on) {
      layer::BackgroundHasher::Options options;
      options.hash.rate_bytes_per_sec = g_hash_rate;
      options.log = log_line;
      auto hasher = layer::BackgroundHasher::start(*g_pool, std::move(options));
      if (!hasher) return fail(hasher.error());
      g_hasher = hasher->release();
    }
    auto control = layer::ControlServer::start(
        layer::control_socket_path(g_pool->paths().run_dir, ::getpid()), [](const auto& request) {
          try {
            return handle_control(request);
          } catch (const std::exception& e) {
            return layer::control_error(layer::Error{EIO, e.what()});
          }
        });
    if (!control) return fail(control.error());
    g_control = control->release();
    if (g_heat_interval_s != 0) {
      layer::HeatPersister::Options options;
      options.interval = std::chrono::seconds(g_heat_interval_s);
      options.log_error = [](const std::string& line) { nbdkit_error("%s", line.c_str()); };
      auto heat = layer::HeatPersister::start(*g_pool, std::move(options));
      if (!heat) return fail(heat.error());
      g_heat = heat->release();
    }
    if (g_tier_interval_s != 0) {
      layer::BackgroundTiering::Options options;
      options.interval = std::chrono::seconds(g_tier_interval_s);
      options.local = local_server();
      options.log = log_line;
      auto tiering = layer::BackgroundTiering::start(*g_pool, std::move(options));
      if (!tiering) return fail(tiering.error());
      g_tiering = tiering->release();
    }
    if (g_stats_interval_s != 0) {
      layer::StatsWriter::Options options;
      options.interval = std::chrono::seconds(g_stats_interval_s);
      options.retention = std::chrono::seconds(g_stats_retention_s);
      options.log_error = [](const std::string& line) { nbdkit_error("%s", line.c_str()); };
      options.each_minute = [](uint64_t now) {
        for (const auto& line :
             layer::refresh_auto_limits(*g_pool, *g_auto_limits, *g_limiters, now))
          nbdkit_debug("%s", line.c_str());
      };
      auto writer = layer::StatsWriter::start(*g_pool, *g_stats, std::move(options));
      if (!writer) return fail(writer.error());
      g_stats_writer = writer->release();
    }
    if (!g_metrics_path.empty()) {
      auto metrics = layer::MetricsServer::start(
          g_metrics_path, [] { return layer::prometheus_counters(g_stats->totals()); });
      if (!metrics) return fail(metrics.error());
      g_metrics = metrics->release();
    }
    if (g_boot_window_s != 0) {
      layer::BootService::Options options;
      options.window = std::chrono::seconds(g_boot_window_s);
      options.prefetch = g_boot_prefetch;
      options.log = boot_event;
      auto boot = layer::BootService::start(*g_pool, std::move(options));
      if (!boot) return fail(boot.error());
      g_boot = boot->release();
      g_pool->set_boot(g_boot);
    }
    if (g_backup_interval_s != 0) {
      layer::BackgroundBackup::Options options;
      options.interval = std::chrono::seconds(g_backup_interval_s);
      options.log = log_line;
      auto backup = layer::BackgroundBackup::start(*g_pool, std::move(options));
      if (!backup) return fail(backup.error());
      g_backup = backup->release();
    }
    return 0;
  });
}

void layer_cleanup() {
  guarded("cleanup", [] {
    delete g_backup;  // a copy in progress finishes first
    g_backup = nullptr;
    // No move or live change may start on a disk that is going away.
    delete g_tiering;  // a move in progress finishes first
    g_tiering = nullptr;
    delete g_control;
    g_control = nullptr;
    delete g_hasher;  // stops a hash between two reads, and joins
    g_hasher = nullptr;
    if (g_disks) {
      auto s = g_disks->flush_all();
      if (!s) nbdkit_error("flush at shutdown: %s", s.error().message.c_str());
    }
    delete g_heat;  // writes the last counts
    g_heat = nullptr;
    delete g_metrics;
    g_metrics = nullptr;
    delete g_stats_writer;  // writes the last minute's counts
    g_stats_writer = nullptr;
    delete g_stats;
    g_stats = nullptr;
    delete g_disks;  // their boot windows close
    g_disks = nullptr;
    if (g_pool) g_pool->set_boot(nullptr);
    delete g_boot;  // persists the windows still open
    g_boot = nullptr;
    delete g_limiters;
    g_limiters = nullptr;
    delete g_auto_limits;
    g_auto_limits = nullptr;
    delete g_audit;
    g_audit = nullptr;
    delete g_pool;
    g_pool = nullptr;
    layer::stop_fork_server();
    return 0;
  });
}

// nbdkit refuses more than this many exports in one list (server/exports.c, MAX_EXPORTS) and
// fails the whole listing on the next one, so the list holds the first kMaxListedExports.
constexpr size_t kMaxListedExports = 10000;

int layer_list_exports(int /*readonly*/, int is_tls, struct nbdkit_exports* exports) {
  return guarded("list_exports", [&] {
    if (!g_pool) return 0;
    // One more than listed, to tell whether some were left out.
    auto names = g_pool->export_names(kMaxListedExports + 1);
    if (!names) return fail(names.error());
    // Only what this peer may open (a snapshot by its container's rules).
    const layer::Peer peer = current_peer(is_tls != 0);
    std::string last_container;
    bool last_allowed = false;
    size_t listed = 0;
    for (const auto& name : *names) {
      const std::string container = name.substr(0, name.find('@'));
      if (container != last_container) {
        layer::Resources unused;
        auto decision = access_for(container, peer, &unused);
        last_container = container;
        last_allowed = decision && decision->allowed;
      }
      if (!last_allowed) continue;
      if (listed == kMaxListedExports || nbdkit_add_export(exports, name.c_str(), nullptr) == -1)
        break;
      ++listed;
    }
    if (listed == kMaxListedExports)
      nbdkit_debug(
          "list_exports: listing the first %zu containers and snapshots; more are not listed (an "
          "NBD export list holds at most %zu names)",
          listed, kMaxListedExports);
    return 0;
  });
}

const char* layer_default_export(int /*readonly*/, int /*is_tls*/) {
  // Without default=NAME the empty name reaches open(), which refuses it with a clear error.
  return g_default_name.c_str();
}

// Before the handshake: a peer beyond its connection limit is turned away at once.
int layer_preconnect(int /*readonly*/) {
  return guarded("preconnect", [] {
    // TLS is not negotiated yet; the key is the uid or address alone.
    const layer::Peer peer = current_peer(false, false);
    const std::string key = peer_key(peer);
    if (auto limited = count_peer(key)) {
      const std::string message = "connection refused to " + peer.describe() + ": " + *limited;
      nbdkit_error("%s", message.c_str());
      audit({{"event", "refuse"},
             {"export", ""},
             {"container", ""},
             {"peer", peer_json(peer)},
             {"tls", false},
             {"why", message}});
      nbdkit_set_error(EBUSY);
      return -1;
    }
    t_peer_slot.key = key;
    t_peer_slot.counted = true;
    return 0;
  });
}

void* layer_open(int readonly) {
  return guarded("open", [&]() -> void* {
    const char* name = nbdkit_export_name();
    const layer::Peer peer = current_peer(nbdkit_is_tls() == 1);
    nlohmann::ordered_json event{{"event", "refuse"},
                                 {"export", name ? name : ""},
                                 {"container", ""},
                                 {"peer", peer_json(peer)},
                                 {"tls", peer.tls}};
    // Every refusal: one error line for the server's log, one audit line, the errno. The
    // message quotes the client's export name: its control characters are escaped in the log,
    // so a name with a newline cannot split the line or forge another.
    auto refuse = [&](int code, const std::string& message) -> void* {
      nbdkit_error("%s", layer::escape_control(message).c_str());
      event["why"] = message;
      audit(event);
      nbdkit_set_error(code);
      return nullptr;
    };
    if (!name || !*name)
      return refuse(EINVAL,
                    "no export name given: name a container, or start the server with "
                    "default=NAME");
    auto parsed = layer::parse_export_name(name);
    if (!parsed.ok())
      return refuse(EINVAL, std::string("unknown export \"") + name +
                                "\": not a container name, CONTAINER@SNAPSHOT or "
                                "CONTAINER@SNAP1..SNAP2");
    const bool is_snapshot = !parsed->snapshot.empty();
    event["container"] = parsed->container;
    if (!g_disks) return refuse(EIO, "pool is not open");
    // Who may open it: the container's rules (a snapshot's are its container's).
    layer::Resources resources;
    uint64_t container_id = 0;
    auto access = access_for(parsed->container, peer, &resources, &container_id);
    if (!access) {
      const auto& e = access.error();
      return refuse(nbd_errno(e.code),
                    e.code == ENOENT ? std::string("unknown export \"") + name + "\": " + e.message
                                     : e.message);
    }
    if (!access->allowed)
      return refuse(EPERM, std::string("access to \"") + name + "\" refused to " + peer.describe() +
                               ": " + access->why);
    if (auto limited = count_export(parsed->container))
      return refuse(
          EBUSY, std::string("\"") + name + "\" refused to " + peer.describe() + ": " + *limited);
    // From here a refusal gives the connection's count back.
    struct Uncount {
      const std::string& container;
      bool armed = true;
      ~Uncount() {
        if (armed) uncount_export(container);
      }
    } uncount{parsed->container};
    // Always the exclusive lock: connections of this server share one Disk, and a read-only
    // connection must not let another server write underneath it. A snapshot is read-only.
    auto disk = g_disks->acquire(name, !is_snapshot);
    if (!disk) {
      const auto& e = disk.error();
      return refuse(nbd_errno(e.code),
                    e.code == ENOENT ? std::string("unknown export \"") + name + "\": " + e.message
                                     : e.message);
    }
    auto handle = std::make_unique<Handle>();
    handle->disk = std::move(*disk);
    std::string auto_error;
    handle->limiter = g_limiters->acquire(
        parsed->container, layer::limiter_resources(*g_pool, *g_auto_limits, container_id,
                                                    resources, layer::now_unix(), &auto_error));
    if (!auto_error.empty()) nbdkit_error("auto limits of %s: %s", name, auto_error.c_str());
    // Without a writer the table forgets nothing: counters only for the metrics socket.
    if (g_stats_writer || g_metrics) handle->io = g_stats->acquire(container_id, parsed->container);
    handle->readonly = readonly != 0 || is_snapshot || access->read_only;
    handle->export_name = name;
    handle->container = parsed->container;
    handle->peer = event["peer"];
    handle->tls = peer.tls;
    handle->opened = std::chrono::steady_clock::now();
    uncount.armed = false;  // the handle's close gives it back
    event["event"] = "open";
    event["read_only"] = handle->readonly;
    event["why"] = access->why;
    audit(event);
    return handle.release();
  });
}

void layer_close(void* h) {
  guarded("close", [&] {
    std::unique_ptr<Handle> handle(static_cast<Handle*>(h));
    uncount_export(handle->container);
    if (g_disks) {
      auto s = g_disks->release(std::move(handle->disk));
      if (!s) nbdkit_error("flush on close: %s", s.error().message.c_str());
    }
    if (g_stats_writer) g_stats_writer->nudge();  // the history shows this connection soon
    audit({{"event", "close"},
           {"export", handle->export_name},
           {"container", handle->container},
           {"peer", handle->peer},
           {"tls", handle->tls},
           {"read_only", handle->readonly},
           {"read_bytes", handle->read_bytes.load()},
           {"written_bytes", handle->written_bytes.load()},
           {"seconds",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - handle->opened)
                .count()}});
    return 0;
  });
}

const char* layer_export_description(void* h) {
  return guarded("export_description", [&]() -> const char* {
    const auto& d = disk_of(h);
    return nbdkit_printf_intern(
        d.is_snapshot() ? "layer snapshot %s (read-only)" : "layer container %s", d.name().c_str());
  });
}

int64_t layer_get_size(void* h) { return static_cast<int64_t>(disk_of(h).size_bytes()); }

int layer_block_size(void* h, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  // Any alignment works (partial blocks are copied up), so the minimum is 1; the preferred
  // size is the block size, where writes never copy anything up.
  *minimum = 1;
  *preferred = std::max<uint32_t>(disk_of(h).block_size(), 4096);
  *maximum = kMaxRequestBytes;
  return 0;
}

int layer_can_write(void* h) { return static_cast<Handle*>(h)->readonly ? 0 : 1; }
int layer_yes(void*) { return 1; }
int layer_no(void*) { return 0; }
int layer_can_fua(void*) { return NBDKIT_FUA_NATIVE; }
int layer_can_cache(void*) { return NBDKIT_CACHE_NATIVE; }

int layer_pread(void* h, void* buf, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  return guarded("pread", [&] {
    Counted counted(h, layer::IoOp::kRead, count);
    auto* handle = static_cast<Handle*>(h);
    handle->limiter->admit(count);
    handle->read_bytes.fetch_add(count, std::memory_order_relaxed);
    return check(disk_of(h).read(buf, count, offset));
  });
}

int layer_pwrite(void* h, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  return guarded("pwrite", [&] {
    if (static_cast<Handle*>(h)->readonly) {
      nbdkit_error("write to read-only export");
      nbdkit_set_error(EPERM);
      return -1;
    }
    Counted counted(h, layer::IoOp::kWrite, count);
    static_cast<Handle*>(h)->limiter->admit(count);
    static_cast<Handle*>(h)->written_bytes.fetch_add(count, std::memory_order_relaxed);
    return check(disk_of(h).write(buf, count, offset, flags & NBDKIT_FLAG_FUA));
  });
}

int layer_flush(void* h, uint32_t /*flags*/) {
  return guarded("flush", [&] {
    Counted counted(h, layer::IoOp::kFlush, 0);
    return check(disk_of(h).flush());
  });
}

int layer_trim(void* h, uint32_t count, uint64_t offset, uint32_t flags) {
  return guarded("trim", [&] {
    Counted counted(h, layer::IoOp::kTrim, count);
    static_cast<Handle*>(h)->limiter->admit(0);
    return check(disk_of(h).trim(count, offset, flags & NBDKIT_FLAG_FUA));
  });
}

int layer_zero(void* h, uint32_t count, uint64_t offset, uint32_t flags) {
  return guarded("zero", [&] {
    Counted counted(h, layer::IoOp::kZero, count);
    static_cast<Handle*>(h)->limiter->admit(0);
    const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
    auto s = disk_of(h).zero(count, offset, flags & NBDKIT_FLAG_FUA, fast);
    if (fast && !s && s.error().code == ENOTSUP) {
      nbdkit_set_error(ENOTSUP);  // expected for fast zero; not worth an error line
      return -1;
    }
    return check(s);
  });
}

int layer_extents(void* h, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents* extents) {
  return guarded("extents", [&] {
    bool full = false;
    bool failed = false;
    const bool req_one = flags & NBDKIT_FLAG_REQ_ONE;
    auto s = disk_of(h).extents(count, offset, [&](uint64_t off, uint64_t len, bool data) {
      if (failed || full) return;
      const uint32_t type = data ? 0 : (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
      if (nbdkit_add_extent(extents, off, len, type) == -1) failed = true;
      if (req_one) full = true;
    });
    if (failed) return -1;
    return check(s);
  });
}

int layer_cache(void* h, uint32_t count, uint64_t offset, uint32_t /*flags*/) {
  return guarded("cache", [&] {
    static_cast<Handle*>(h)->limiter->admit(0);
    return check(disk_of(h).cache(count, offset));
  });
}

void layer_dump_plugin() { std::printf("layer_format_version=%u\n", layer::kFormatVersion); }

struct nbdkit_plugin make_plugin() {
  struct nbdkit_plugin p = {};
  p.name = "layer";
  p.longname = "layer: layered copy-on-write disks";
  p.version = LAYER_VERSION;
  p.description = "Serves the containers of a layer pool: export name = container name";
  p.config = layer_config;
  p.config_complete = layer_config_complete;
  p.config_help =
      "pool=<DIR>      (required) The pool directory (made by `layer init`).\n"
      "default=<NAME>  Container served to clients that give no export name.\n"
      "hasher=on|off   Checksum frozen layers in the background (default on).\n"
      "hash-rate=<BYTES_PER_SEC>  The hasher's read rate (default 64M; 0: unlimited).\n"
      "index-backup-interval=<DURATION>  Copy the index this often (default 15m; 0: never).\n"
      "journal=on|off  Flushes append map rows to the delta's journal (default on).\n"
      "stats-interval=<DURATION>  Write the I/O history this often (default 10s; 0: never).\n"
      "stats-retention=<DURATION>  Keep the I/O history this long (default 7d).\n"
      "metrics=<PATH>  Answer each connection to this unix socket with Prometheus text.\n"
      "boot-profile=<DURATION>  Record what fresh clones read this long (default 30s; 0: off).\n"
      "boot-prefetch=on|off  Read a fresh clone's boot profile ahead (default on).";
  p.magic_config_key = "pool";
  p.get_ready = layer_get_ready;
  p.after_fork = layer_after_fork;
  p.cleanup = layer_cleanup;
  p.list_exports = layer_list_exports;
  p.default_export = layer_default_export;
  p.export_description = layer_export_description;
  p.preconnect = layer_preconnect;
  p.open = layer_open;
  p.close = layer_close;
  p.get_size = layer_get_size;
  p.block_size = layer_block_size;
  p.can_write = layer_can_write;
  p.can_flush = layer_yes;
  p.is_rotational = layer_no;
  p.can_trim = layer_yes;
  p.can_zero = layer_yes;
  p.can_fast_zero = layer_yes;
  p.can_fua = layer_can_fua;
  p.can_multi_conn = layer_yes;  // connections to one export share one Disk
  p.can_extents = layer_yes;
  p.can_cache = layer_can_cache;
  p.pread = layer_pread;
  p.pwrite = layer_pwrite;
  p.flush = layer_flush;
  p.trim = layer_trim;
  p.zero = layer_zero;
  p.extents = layer_extents;
  p.cache = layer_cache;
  p.dump_plugin = layer_dump_plugin;
  p.errno_is_preserved = 0;  // C++: errno cannot be trusted; every failure sets it explicitly
  return p;
}

struct nbdkit_plugin plugin = make_plugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
