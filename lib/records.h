// records.h — the values stored in the index's dbs, and their binary encoding.
//
// Every record starts with a one-byte record version; integers are big-endian; strings are
// u32-length-prefixed. decode_* treat the bytes as untrusted: a short, long or unknown record is
// Error{EIO, "<what> <key>: corrupt record ..."}, never a crash (docs/format.md).
//
// Thread-safety: plain values.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "error.h"

namespace layer {

using LayerId = uint64_t;

enum class Tier : uint8_t { kSsd = 0, kHdd = 1 };
const char* to_string(Tier tier);
// "ssd" / "hdd" -> Tier. Errors: EINVAL.
Result<Tier> parse_tier(std::string_view name);

enum class LayerState : uint8_t {
  kWritable = 0,        // a container's delta: changes in place, never hashed
  kFrozenUnhashed = 1,  // immutable, checksums not yet written
  kFrozen = 2,          // immutable, every 64 KiB with data has an xxh3-64 in `sums`
};
const char* to_string(LayerState state);

// `layers` db, key key_u64(id).
struct LayerRecord {
  LayerId id = 0;
  LayerId parent = 0;  // 0: bottom of its chain
  Tier tier = Tier::kSsd;
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  LayerState state = LayerState::kWritable;
  // References to this layer: child layers (their `parent`), image rows (`top_layer`),
  // container rows (`delta_layer`), snapshot rows. fsck recomputes it.
  uint32_t refcount = 0;
  uint64_t created_unix = 0;
};
std::string encode(const LayerRecord& r);
Result<LayerRecord> decode_layer(std::string_view bytes, uint64_t id);

// `images` db, key "name:version".
struct ImageRecord {
  std::string ref;  // name:version
  LayerId top_layer = 0;
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  uint64_t created_unix = 0;
  std::string description;
};
std::string encode(const ImageRecord& r);
Result<ImageRecord> decode_image(std::string_view bytes, std::string_view ref);

// `containers` db, key name.
// An access rule of a container (access.h): who may open it.
struct AccessRule {
  enum class Subject : uint8_t { kUid = 0, kGid = 1, kAddr = 2 };
  Subject subject = Subject::kUid;
  uint32_t id = 0;         // kUid, kGid
  std::string addr;        // kAddr: the network, canonical: "10.0.0.0/8", "fd00::/8"
  bool deny = false;       // refuse (else allow)
  bool read_only = false;  // an allow that serves the export read-only
  std::string label;       // the subject as the user gave it: "user:alice", "uid:1000"
};

// A container's resources (issue 14 item 1; docs/design.md "Resources and QoS"). cpu, memory
// and net are recorded for the scripts that provision what uses the disk (`layer inspect
// --json`); iops and bandwidth are enforced by the server per export (qos.h). 0: unset, i.e.
// unlimited.
struct Resources {
  static constexpr uint64_t kKeep = UINT64_MAX;  // an override field that keeps the base value
  static constexpr uint8_t kDefaultPriority = 5;
  uint64_t cpu_millis = 0;  // thousandths of a CPU: 2 CPUs = 2000
  uint64_t memory_bytes = 0;
  uint64_t net_bps = 0;                 // bytes per second
  uint64_t iops = 0;                    // requests per second
  uint64_t bandwidth = 0;               // bytes per second read and written
  uint8_t priority = kDefaultPriority;  // 1..10
  // A time-bounded change of iops/bandwidth, in force while the clock is before until_ms
  // (unix milliseconds; 0: none). It reverts by itself: the effective values are computed from
  // the clock, nothing rewrites the record when it ends.
  struct Timed {
    uint64_t iops = kKeep;
    uint64_t bandwidth = kKeep;
    uint64_t until_ms = 0;
    bool operator==(const Timed&) const = default;
  } timed;
  // A limit that follows the container's forecast (issue 14 item 4; forecast.h): while `on`,
  // the server derives the limit from the forecast, clamped to floor..ceiling (ceiling 0: none),
  // in place of the base value (a timed change in force still wins). Added after `timed`: a
  // trailing part of its own, absent (and not written) while both are off.
  struct AutoLimit {
    bool on = false;
    uint64_t floor = 0;
    uint64_t ceiling = 0;
    bool operator==(const AutoLimit&) const = default;
  };
  AutoLimit auto_iops, auto_bandwidth;

  bool operator==(const Resources&) const = default;
  bool is_default() const { return *this == Resources{}; }
  // The override is in force at `now_ms` (unix milliseconds).
  bool timed_active(uint64_t now_ms) const { return timed.until_ms > now_ms; }
  uint64_t effective_iops(uint64_t now_ms) const {
    return timed_active(now_ms) && timed.iops != kKeep ? timed.iops : iops;
  }
  uint64_t effective_bandwidth(uint64_t now_ms) const {
    return timed_active(now_ms) && timed.bandwidth != kKeep ? timed.bandwidth : bandwidth;
  }
};

struct ContainerRecord {
  std::string name;
  uint64_t id = 0;  // lock byte and run/ file names use the id
  std::string image_ref;
  LayerId delta_layer = 0;
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  uint64_t created_unix = 0;
  uint64_t generation = 0;  // bumped by every change that replaces the delta or the chain
  std::map<std::string, std::string> labels;
  // Who may open it (access.h); added after the first layout: absent in older rows (none).
  std::vector<AccessRule> access;
  // Added after `access`: absent in older rows (the defaults), and not written while default,
  // so such a row stays byte for byte what an older build wrote.
  Resources resources;
};
std::string encode(const ContainerRecord& r);
Result<ContainerRecord> decode_container(std::string_view bytes, std::string_view name);

// `snapshots` db, key snapshot_key(container id, name): a named, frozen point of a container.
// The tree of a container's snapshots is the tree of their layers (each layer's `parent`).
struct SnapshotRecord {
  std::string name;
  uint64_t container_id = 0;
  LayerId layer = 0;
  uint64_t created_unix = 0;
};
std::string encode(const SnapshotRecord& r);
Result<SnapshotRecord> decode_snapshot(std::string_view bytes, std::string_view key);
// key_u64(container_id) followed by the name: a container's snapshots are one prefix scan.
std::string snapshot_key(uint64_t container_id, std::string_view name);

// `intents` db, key key_u64(id): a multi-transaction operation in progress. Each kind has its
// own recovery (fsck --repair, and Pool::open for drops):
// - kImport: `layer` is being built (no `layers` row yet); its rows and file are rolled back.
// - kMerge: `layer` is the merged copy of two layers being built (no `layers` row yet); rolled
//   back like an import (`target` names the two layers, "PARENT+CHILD").
// - kDelta: `layer` is a new delta made before a live snapshot, commit or rollback switches to
//   it (no `layers` row yet; its file exists, on ssd); rolled back like an import.
// - kMove: `layer`'s file is being copied to the tier named by `target` ("ssd", "hdd") by the
//   mover (mover.h); recovered by removing whichever copy the layer's row does not name.
// - kDrop: `layer` lost its last reference (its `layers` row is gone); its `maps`/`sums` rows
//   are deleted in bounded transactions, then its file, then the intent.
struct IntentRecord {
  enum class Kind : uint8_t { kImport = 1, kDrop = 2, kMerge = 3, kDelta = 4, kMove = 5 };
  Kind kind = Kind::kImport;
  LayerId layer = 0;
  // kImport: the image ref being imported; kDrop: the tier of the layer's file ("ssd", "hdd");
  // kMerge: "PARENT+CHILD", the layer ids being merged; kDelta: the container's name; kMove:
  // the destination tier.
  std::string target;
  uint64_t created_unix = 0;
};
std::string encode(const IntentRecord& r);
Result<IntentRecord> decode_intent(std::string_view bytes, uint64_t id);

// `heat` db, key key_u64(layer id): how much the layer is read and written (heat.h). Totals
// since counting began; rates in ops/s and bytes/s, exponentially decayed (half-life: the tier
// policy's) as of rate_unix.
struct HeatRecord {
  uint64_t read_ops = 0;
  uint64_t read_bytes = 0;
  uint64_t write_ops = 0;
  uint64_t write_bytes = 0;
  uint64_t last_access_unix = 0;  // 0: never counted
  double read_rate = 0;           // ops/s
  double write_rate = 0;          // ops/s
  double read_bps = 0;            // bytes/s
  double write_bps = 0;           // bytes/s
  uint64_t rate_unix = 0;         // when the rates were last decayed
  uint64_t moved_unix = 0;        // the layer's last tier move; 0: never moved
};
std::string encode(const HeatRecord& r);
Result<HeatRecord> decode_heat(std::string_view bytes, uint64_t id);

// `stats` db, key key_u64_u32(container id, unix minute): what a container's exports served in
// one minute (lib/stats.h). Per kind of request: how many, the bytes they moved (trim and zero:
// the bytes they covered; flush: 0), the sum of their latencies, and a histogram of latencies in
// kLatencyBuckets log-scale buckets (stats.h latency_bucket: 4 per power of two from 1 us).
enum class IoOp : uint8_t { kRead = 0, kWrite = 1, kTrim = 2, kZero = 3, kFlush = 4 };
constexpr int kIoOps = 5;
const char* to_string(IoOp op);
constexpr int kLatencyBuckets = 128;
struct IoOpStats {
  uint64_t ops = 0;
  uint64_t bytes = 0;
  uint64_t latency_ns_sum = 0;
  std::array<uint64_t, kLatencyBuckets> latency{};  // requests per latency bucket
  bool operator==(const IoOpStats&) const = default;
};
struct StatsRecord {
  std::array<IoOpStats, kIoOps> op{};
  const IoOpStats& operator[](IoOp o) const { return op[static_cast<int>(o)]; }
  IoOpStats& operator[](IoOp o) { return op[static_cast<int>(o)]; }
  bool empty() const;
  // Adds every count of `other` (a minute's rows merged, a delta added).
  void add(const StatsRecord& other);
  bool operator==(const StatsRecord&) const = default;
};
std::string encode(const StatsRecord& r);
// `what` names the row in messages. Ops beyond kIoOps (a newer build's) are read and dropped,
// buckets beyond the last are counted in the last one.
Result<StatsRecord> decode_stats(std::string_view bytes, std::string_view what);

// `meta` key "tier.policy": the tiering policy (tier.h). Absent: the defaults.
struct TierPolicy {
  enum class HighWater : uint8_t { kNone = 0, kBytes = 1, kPercent = 2 };
  uint64_t cold_after_s = 600;  // demote only after this long without an access or a move
  double cold_rate = 0.05;      // ... and with read+write ops/s at or below this
  double hot_rate = 1.0;        // promote at read+write ops/s at or above this (> cold_rate)
  uint64_t half_life_s = 300;   // of the heat rates
  HighWater high_water = HighWater::kNone;
  uint64_t high_water_value = 0;  // bytes of layer files on ssd, or % of the ssd filesystem
  // Bytes per second a policy move copies at most (0: as fast as it can). Added after the
  // first record layout: a record without it reads as the default.
  uint64_t move_rate = kDefaultMoveRate;
  static constexpr uint64_t kDefaultMoveRate = uint64_t{64} << 20;
  // Pre-promotion (issue 14 item 4; forecast.h): the lead window, in seconds, over which the
  // containers' forecasts count as a layer's predicted heat (0: off). Added after move_rate,
  // written only when set: a record without it reads as 0.
  uint64_t prewarm_s = 0;
};
std::string encode(const TierPolicy& p);
Result<TierPolicy> decode_tier_policy(std::string_view bytes);

// `meta` key "stale." + key_u64(container id): a container whose delta file holds blocks that
// its map, restored from an older copy of the index, does not know (index_restore.h). Such a
// container is not served or changed until `layer fsck --repair` adopts the blocks.
struct StaleRecord {
  uint64_t container_id = 0;
  std::string container;  // its name, for messages
  LayerId delta = 0;
  uint64_t blocks = 0;  // blocks with data in the file that the map does not mark data
  uint64_t restored_unix = 0;
  std::string backup;  // the copy the index was restored from
};
std::string encode(const StaleRecord& r);
Result<StaleRecord> decode_stale(std::string_view bytes);

// `meta` key "restore": the index was restored from an older copy (index_restore.h). While it
// is there, repairs set files aside instead of deleting them; `layer fsck --repair` deletes it
// once no container is stale.
struct RestoreRecord {
  std::string backup;  // the copy's name
  uint64_t backup_txnid = 0;
  uint64_t restored_unix = 0;
  LayerId first_unknown_layer = 0;  // layer ids from this one on were given after the copy
};
std::string encode(const RestoreRecord& r);
Result<RestoreRecord> decode_restore(std::string_view bytes);

// `sums` db, key key_u64_u32(layer, row): xxh3-64 of groups row*64 .. row*64+63 of 64 KiB.
// A zero entry means "no data in that group" (nothing to verify).
constexpr uint32_t kSumGroupBytes = 64 * 1024;
constexpr uint32_t kSumsPerRow = 64;
std::string encode_sums(const std::vector<uint64_t>& sums);
Result<std::vector<uint64_t>> decode_sums(std::string_view bytes);

}  // namespace layer
