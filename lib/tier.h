// tier.h — the tiering policy (DESIGN.md "Tiering mover"): which layers should move between
// ssd and hdd, given their heat (heat.h), and one pass that moves them (the mechanism is
// mover.h's).
//
// The policy, per layer with data on disk:
// - demote (ssd → hdd) when it has been idle (no access, no move, not created) for cold_after
//   and its heat (read+write ops/s, decayed) is at or below cold_rate;
// - promote (hdd → ssd) when its heat is at or above hot_rate. hot_rate > cold_rate, and a
//   move counts as an access, so a promoted layer stays at least cold_after: nothing
//   ping-pongs;
// - with a high-water mark (bytes of layer files on ssd, or % of the ssd filesystem), while
//   ssd is above it the coldest layers there (lowest heat, then idle longest) are demoted
//   first, and a promotion that would cross it waits.
// - pre-promotion (prewarm_s > 0): a layer's predicted heat (PolicyLayer::predicted: its users'
//   forecasts over the next prewarm_s) counts as heat for promotion (an hdd layer predicted at
//   or above hot_rate is promoted before the busy hours start) and keeps a layer on ssd (one
//   predicted at or above hot_rate is not demoted as cold). Ranking by heat (the high-water
//   mark's coldest first, the hottest promotion first) takes the higher of the two.
// A shared base's heat is the sum of its users' (they all count into its one row, heat.h).
// Layers with no data on disk (a delta never written) stay where they are.
//
// Thread-safety: plain functions; plan_moves is pure (tests give it any clock).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <thread>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "error.h"
#include "index.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

class Pool;
struct MoveResult;

// The pool's policy (`meta` "tier.policy"), or the defaults. Errors: EIO (corrupt record).
Result<TierPolicy> load_tier_policy(ReadTxn& txn);
Result<TierPolicy> load_tier_policy(Pool& pool);
// Errors: EINVAL (hot_rate <= cold_rate, a negative or non-finite rate, a percentage over 100).
Status validate_tier_policy(const TierPolicy& p);
// Validates and stores it. Errors: EINVAL, those of the transaction.
Status save_tier_policy(Pool& pool, const TierPolicy& p);

// "90", "90s", "10m", "2h", "7d" → seconds. Errors: EINVAL naming the text.
Result<uint64_t> parse_duration(std::string_view text);
// Seconds as the shortest exact "10m", "90s", "2h", "7d".
std::string format_duration(uint64_t seconds);

// What the planner needs of one layer.
struct PolicyLayer {
  LayerId id = 0;
  Tier tier = Tier::kSsd;
  uint64_t disk_bytes = 0;   // allocated bytes of its file (0: no file or no data)
  double heat = 0;           // read+write ops/s, decayed to now
  uint64_t last_active = 0;  // unix s: the latest of its last access, last move and creation
  // Pre-promotion (TierPolicy::prewarm_s; forecast.h): the read+write ops/s its users'
  // forecasts expect within the lead window (the sum over the containers whose chain holds it
  // of each one's highest hourly forecast in the window). 0 without prewarm.
  double predicted = 0;
};

// How full ssd is, in the high-water mark's terms: bytes used and the mark. limit 0: no mark.
struct SsdSpace {
  uint64_t used = 0;
  uint64_t limit = 0;
};

struct Verdict {
  LayerId id = 0;
  Tier from = Tier::kSsd;
  std::optional<Tier> to;  // set: the policy moves it there
  std::string reason;      // why it moves or stays
};

// The policy's verdict for each layer (in the order given; moves ordered within their kind by
// urgency in `order`). Pure: depends only on its arguments.
struct Plan {
  std::vector<Verdict> verdicts;  // one per layer, in input order
  std::vector<size_t> order;      // indexes into verdicts of the moves, demotions first
  SsdSpace space_after;           // ssd use once the moves are done
};
Plan plan_moves(const TierPolicy& policy, const std::vector<PolicyLayer>& layers, uint64_t now,
                SsdSpace ssd);

// One layer as `layer tier status` shows it.
struct LayerTierStatus {
  LayerRecord layer;
  double predicted = 0;     // PolicyLayer::predicted (0 without prewarm)
  uint64_t disk_bytes = 0;  // allocated bytes of its file
  bool has_file = false;
  HeatRecord heat;                 // rates decayed to now; zeroes when never counted
  std::vector<std::string> users;  // containers ("NAME"), snapshots ("C@SNAP"), images ("N:V")
  Verdict verdict;
};
struct TierStatus {
  TierPolicy policy;
  uint64_t now = 0;
  SsdSpace ssd;                         // before any move
  SsdSpace ssd_after;                   // after the planned moves
  std::vector<LayerTierStatus> layers;  // by layer id
  std::vector<size_t> order;            // indexes of the planned moves, in move order
};
// Reads the index (one snapshot), the layers' files' sizes and the ssd space, and plans.
// Errors: EIO, EACCES.
Result<TierStatus> tier_status(Pool& pool, uint64_t now);

// What one move did.
struct TierMoveReport {
  LayerId layer = 0;
  Tier from = Tier::kSsd;
  Tier to = Tier::kSsd;
  bool moved = false;
  uint64_t data_bytes = 0;
  std::string by;                  // "" (this process) or "server pid N"
  pid_t server = 0;                // the server that moved it; 0: this process
  std::vector<pid_t> reloaded_by;  // servers that switched to the moved frozen layer's file
  // A live delta move's (Disk::move_delta): the write pauses, final and at the start (-1:
  // not a live move), the catch-up rounds and the bytes copied again.
  double pause_ms = -1;
  double start_pause_ms = -1;
  uint32_t catch_up_rounds = 0;
  uint64_t caught_up_bytes = 0;
};

// The server a move runs in, when it runs in one (the plugin): its own disks.
struct LocalServer {
  pid_t pid = 0;
  // Moves the delta of a disk this server serves; std::nullopt when it serves none with
  // that delta.
  // rate_bytes_per_sec: as move_layer_anywhere's.
  std::function<std::optional<Result<TierMoveReport>>(LayerId id, Tier to,
                                                      uint64_t rate_bytes_per_sec)>
      move_delta;
  // Switches this server's disks to a moved frozen layer's new file.
  std::function<Status(LayerId id)> reload_moved;
};
// The report of a live delta move done in this process (Disk::move_delta).
TierMoveReport live_move_report(const MoveResult& r);
// Moves one layer the way it must be moved: a frozen layer by this process (then every
// server is told, control op "moved"); a served container's delta by its server (control op
// "move"), an unserved one here. rate_bytes_per_sec: what the copy reads at most, 0 as fast as
// it can (a live delta's catch-up is not paced). Errors: those of move_layer and of the
// server's reply; ENOENT (no such layer).
Result<TierMoveReport> move_layer_anywhere(Pool& pool, LayerId id, Tier to,
                                           uint64_t rate_bytes_per_sec = 0,
                                           const LocalServer* local = nullptr);
// Asks every running server but `skip` (each control socket POOL/run/srv-PID.sock) to switch
// to a moved frozen layer's new file. Best effort: returns the pids that did.
std::vector<pid_t> tell_servers_moved(Pool& pool, LayerId id, pid_t skip = 0);

// One policy pass: plans (as tier_status) and, unless dry_run, moves in plan order, recording
// each move in the layer's heat row, each at the policy's move_rate unless `rate` says
// otherwise. A failed move does not stop the pass: it is in `failed`;
// one refused with EBUSY (another move of it, a merge, a drop running) is in `busy`, for the
// next pass.
struct TierRunReport {
  TierStatus status;
  std::vector<TierMoveReport> moved;
  std::vector<std::string> busy;    // "layer N: why"
  std::vector<std::string> failed;  // "layer N: why"
};
Result<TierRunReport> run_tier_policy(Pool& pool, uint64_t now, bool dry_run,
                                      const LocalServer* local = nullptr,
                                      std::optional<uint64_t> rate = std::nullopt);

// A server's tiering thread (plugin parameter tier-interval=S): a policy pass every
// `interval`, at idle I/O priority and nice 19 (its copies wait behind the clients' I/O), moving
// its own disks' deltas live through `local`. The destructor stops it (a move in progress
// finishes first) and joins it.
// REQUIRES: the Pool and everything `local` refers to outlive it.
class BackgroundTiering {
 public:
  struct Options {
    std::chrono::milliseconds interval{60000};
    LocalServer local;
    // Called on the thread: one line per move (error = false) and per failure (error = true).
    std::function<void(bool error, const std::string& line)> log;
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<BackgroundTiering>> start(Pool& pool, Options options);
  ~BackgroundTiering();
  BackgroundTiering(const BackgroundTiering&) = delete;
  BackgroundTiering& operator=(const BackgroundTiering&) = delete;

 private:
  BackgroundTiering(Pool& pool, Options options) : pool_(pool), options_(std::move(options)) {}
  void run();

  Pool& pool_;
  const Options options_;
  StopSignal stop_;
  std::thread thread_;
};

}  // namespace layer
