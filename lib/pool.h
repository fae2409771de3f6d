// pool.h — a pool: its directories, index, committer, locks and layer stores, open once per
// process; and its containers (clone, ls, inspect, rm, export names).
//
// The rest works on a Pool through free functions in modules of its own: layers.h (chains,
// refcounts, drops), layer_build.h (a layer built under an intent), intents.h (intents by kind
// and their recovery), import.h and images.h (images), snapshots.h, fsck.h; names.h holds the
// naming rules.
//
// POOL/index (LMDB), POOL/run/locks, POOL/run/holders/, tier directories (default
// POOL/tiers/ssd and POOL/tiers/hdd; either may be elsewhere, recorded in `meta`). Layer files
// are TIER/<layer id>.layer. Format: docs/format.md.
//
// Thread-safety: Pool is safe for concurrent use once open; it owns the process's Index,
// Committer, LockTable, ChainCache and LayerStore, which must outlive every Disk opened on it.
// REQUIRES: at most one Pool per pool directory per process (LMDB: one env per process).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chain.h"
#include "error.h"
#include "heat.h"
#include "index.h"
#include "layer_file.h"
#include "locks.h"
#include "records.h"
#include "verify.h"

namespace layer {

constexpr uint32_t kFormatVersion = 1;
// Feature bits in `meta` "features.incompat": an unknown bit makes open fail (ENOTSUP).
// Bit 0: some container is marked stale after an index restore (index_restore.h); a build that
// does not know the marks would serve its old map silently.
constexpr uint64_t kIncompatStaleContainers = 1;
constexpr uint64_t kKnownIncompatFeatures = kIncompatStaleContainers;
constexpr uint32_t kDefaultBlockSize = 4096;
constexpr uint32_t kMinBlockSize = 4096;
constexpr uint32_t kMaxBlockSize = 1 << 20;
// Largest disk: keeps the in-memory maps of one disk small (a pointer per 4096 blocks: 8 MiB
// for the delta and 24 MiB for the chain map at 16 TiB with 4 KiB blocks).
constexpr uint64_t kMaxDiskBytes = 16ULL << 40;

struct PoolPaths {
  std::string root;
  std::string index_dir;
  std::string run_dir;
  std::string tier_dir[2];  // indexed by Tier
};

struct ContainerInfo {
  ContainerRecord container;
  std::vector<LayerRecord> chain;           // delta first, then the frozen layers below it
  std::vector<uint64_t> chain_data_blocks;  // parallel to chain: data blocks in each layer
  uint64_t delta_data_blocks = 0;           // as of the last flush (== chain_data_blocks[0])
  uint64_t delta_zero_blocks = 0;
  std::optional<std::string> served_by;  // "pid N" when a server holds it
};

class BootService;

class Pool {
 public:
  // Creates an empty pool at root (made if missing; must be empty if it exists) with tier
  // directories ssd_dir/hdd_dir ("" = default under root), each new or empty and claimed with
  // a marker holding the pool's id (docs/format.md); new directories are fsynced into their
  // parents. Errors: EEXIST (already a pool, or root or a tier not empty), EACCES, EIO, EINVAL
  // (both tiers one directory).
  static Status create(const std::string& root, const std::string& ssd_dir,
                       const std::string& hdd_dir);

  struct OpenOptions {
    bool read_only = false;  // no writes, no committer (fsck, ls)
    // The index's map size and growth limit (Index::Options; 0: the defaults). Tests fill a
    // small map to see MDB_MAP_FULL.
    uint64_t index_map_bytes = 0;
    uint64_t index_max_map_bytes = 0;
  };
  // Opens a pool; a writable open then finishes the removals a crash interrupted (best effort:
  // finish_interrupted, intents.h). Errors: ENOENT (not a pool: names the path), ENOTSUP
  // (newer format or unknown feature bit), EIO (corrupt meta; a tier's marker missing or naming
  // another pool), EACCES.
  static Result<std::unique_ptr<Pool>> open(const std::string& root, const OpenOptions& options);
  // Checks a pool without creating or locking anything (MDB_RDONLY|MDB_NOLOCK), as nbdkit's
  // get_ready needs. Errors: as open.
  static Status validate(const std::string& root);
  ~Pool();

  const PoolPaths& paths() const { return paths_; }
  Index& index() { return *index_; }
  Committer& committer() { return *committer_; }
  // The layer files of one tier, addressed by layer id.
  LayerStore& store(Tier tier) { return *stores_[static_cast<int>(tier)]; }
  LockTable& locks() { return *locks_; }
  ChainCache& chains() { return chains_; }
  // The heat counters of the layers this process reads and writes (heat.h).
  HeatTable& heat() { return heat_; }
  // Whether disks verify reads from frozen layers against their checksums (verify.h; plugin
  // verify=on), and the process's verifiers. REQUIRES: set before any disk opens.
  bool verify_reads() const { return verify_reads_; }
  void set_verify_reads(bool on) { verify_reads_ = on; }
  VerifierTable& verifiers() { return verifiers_; }
  // Whether disks journal their flush rounds' map rows (journal.h; plugin journal=on|off,
  // default on). Off: every round commits its rows to the index before it answers.
  // REQUIRES: set before any disk opens.
  bool journal() const { return journal_; }
  void set_journal(bool on) { journal_ = on; }
  // The server's boot profiles and prefetch (boot_profile.h; plugin boot-profile=), or null:
  // a fresh disk's first request opens its boot window there. REQUIRES: set before any disk
  // opens, and cleared (or the pool gone) before the service goes.
  BootService* boot() const { return boot_; }
  void set_boot(BootService* boot) { boot_ = boot; }
  bool read_only() const { return read_only_; }
  // Errors: EACCES `pool P is open read-only` when it is.
  Status check_writable() const;
  // Checks that every tier's filesystem can hold a layer file of size_bytes (ext4 with 4 KiB
  // blocks stops at 16 TiB - 4 KiB, below kMaxDiskBytes): a sparse temporary file in each tier
  // is sized to it. Errors: EINVAL naming the tier and the size; EIO/EACCES from the probe.
  Status check_tiers_hold(uint64_t size_bytes) const;
  // Where a layer's file is, for messages and tools (for a local tier: its path).
  std::string layer_path(const LayerRecord& layer) const;
  std::string layer_path(LayerId id, Tier tier) const;
  // Replaces a tier's store (tests: FaultInjectingStore). REQUIRES: no disk open.
  void set_store(Tier tier, std::unique_ptr<LayerStore> store);
  // A frozen layer's file opened read-only, one handle shared by every disk of this process
  // that reads the layer (beside the chain-map cache). When the file is gone from layer.tier,
  // the layer's row is read again and the tier it names now is tried (the mover switched it
  // and removed the old file since `layer` was read). Errors: as LayerStore::open.
  Result<std::shared_ptr<LayerFile>> open_frozen(const LayerRecord& layer);
  // Drops the shared handles of layer id's files from open_frozen's table (the mover replaced
  // the file: later opens open it anew; holders keep reading the old one).
  void forget_frozen(LayerId id);
  // Test seam for interleavings: when set, long operations call it with a named point on
  // their own thread, and it may block (pause the operation) or change the world meanwhile.
  // Points: "import.intent-committed" (intent row visible), "import.data-walked" (the source's
  // data regions found, nothing read yet), "import.rows-committed", "fsck.index_scanned"
  // (fsck's index snapshot read, directories not yet listed), "fsck.scanned" (before any
  // repair), "drop.rows" (a removal's container row is gone, its layer rows not yet),
  // "merge.switched" (a merge's switch committed, the old layers' rows and files not yet gone),
  // "merge.intent-committed", "merge.built" (the merged layer's rows committed, not switched),
  // "snapshot.committed", "commit.committed", "rollback.committed" (before the old delta's
  // rows and file go), "snapshot-rm.committed", "change.committed" (a live change committed,
  // the disk not yet switched), "flatten.built" (the flat layer built, not switched), and the
  // mover's (mover.h). Unset in production. REQUIRES: set before the operations it observes start.
  using TestHook = std::function<void(std::string_view point)>;
  void set_test_hook(TestHook hook) { test_hook_ = std::move(hook); }
  // Calls the test hook, if any (lib/ modules mark their points with it), and failpoint(point)
  // (failpoint.h: LAYER_FAILPOINT=POINT[@N] kills the process there, the crash tests' way to
  // stop a CLI or a server between two steps of an operation).
  void test_point(std::string_view point);

  // Errors: ENOENT `container "x" not found in pool P`.
  Result<ContainerRecord> get_container(ReadTxn& txn, std::string_view name);

  // A new container on image_ref ("NAME:VER", or "CONTAINER@SNAP": on that snapshot, with the
  // source container's image ref): one transaction, no file work. size_bytes defaults to the
  // image's size and may only grow it (multiple of 512, at most kMaxDiskBytes and what the
  // tiers' filesystems hold in one file: check_tiers_hold). `resources` are recorded as given
  // (qos.h: apply_change validates them), and so are `labels` (names.h validate_label checks
  // them). Errors: ENOENT, EEXIST, EINVAL.
  Result<ContainerInfo> clone(const std::string& image_ref, const std::string& name,
                              std::optional<uint64_t> size_bytes, const Resources& resources = {},
                              const std::map<std::string, std::string>& labels = {});
  // Replaces the labels of container `name` in one transaction; returns the labels it had.
  // Errors: ENOENT, EINVAL (a bad label), EACCES (read-only pool), EIO.
  Result<std::map<std::string, std::string>> set_labels(
      const std::string& name, const std::map<std::string, std::string>& labels);
  Result<std::vector<ContainerInfo>> list_containers();
  // The names of the first `limit` containers in name order (byte order), reading nothing but
  // the keys: what nbdkit's list_exports needs. Errors: EIO.
  Result<std::vector<std::string>> container_names(size_t limit);
  // As container_names, with each container's snapshots as "CONTAINER@SNAP" after it.
  Result<std::vector<std::string>> export_names(size_t limit);
  Result<ContainerInfo> inspect(const std::string& name);
  // Removes the container and its snapshots. Errors: ENOENT, EBUSY (a server holds it: names
  // the holder).
  Status remove_container(const std::string& name);

  // The lock table's record of who serves container_id ("pid N"), as a pid; 0 if unknown.
  pid_t serving_pid(uint64_t container_id) const;

 private:
  Pool() = default;
  // Data and zero block counts of layers already counted in one read transaction.
  using BlockCounts = std::map<LayerId, std::pair<uint64_t, uint64_t>>;
  // `counts` (may be null) keeps each layer's counts for the next container read in `txn`:
  // containers cloned from one image share its layers, so a listing counts them once.
  Result<ContainerInfo> container_info(ReadTxn& txn, const ContainerRecord& rec,
                                       BlockCounts* counts = nullptr);

  PoolPaths paths_;
  bool read_only_ = false;
  std::unique_ptr<Index> index_;
  std::unique_ptr<Committer> committer_;
  std::unique_ptr<LockTable> locks_;
  std::unique_ptr<LayerStore> stores_[2];  // indexed by Tier
  std::mutex frozen_mu_;
  std::map<std::pair<int, LayerId>, std::weak_ptr<LayerFile>>
      frozen_files_;  // GUARDED_BY(frozen_mu_)
  ChainCache chains_;
  HeatTable heat_;
  bool verify_reads_ = false;
  BootService* boot_ = nullptr;
  bool journal_ = true;
  VerifierTable verifiers_;
  TestHook test_hook_;
};

uint64_t now_unix();

// The directory of tier `t` (0 ssd, 1 hdd) of the pool at `root`, from the index's meta: a
// tier inside the pool is stored relative to it ("tiers/ssd", since pools made after
// 2026-12-07), so a pool copied or moved whole (cp -a, mv) uses its own tiers, not the
// original's; a tier elsewhere (init --ssd DIR) and older pools' tiers are stored absolute.
// Errors: EIO (missing), those of the read.
Result<std::string> tier_dir_of(ReadTxn& txn, int t, const std::string& root);

// The pool's incompatible feature bits (`meta` "features.incompat"), and their replacement.
// Errors: EIO (a corrupt value).
Result<uint64_t> incompat_features(ReadTxn& txn);
Status set_incompat_features(WriteTxn& txn, uint64_t bits);

}  // namespace layer
