// snapshots.h — snapshots, rollback, commit as an image version, snapshot removal and merge,
// clone sources and the diff of two points of a container's tree (DESIGN.md "Snapshots,
// images and merges").
//
// A snapshot freezes the container's delta (state frozen-unhashed) and puts a new empty delta
// on top, in one transaction: no data is copied. Snapshots form a tree: the tree of their
// layers' parents. Rollback puts a new empty delta on a snapshot's layer; the snapshots taken
// after it stay. Removing a snapshot removes its name; its layer goes when nothing refers to
// it, is merged with its only child when that child is frozen and no name, clone or image
// refers to the layer, and otherwise stays hidden (list_snapshots shows it and why).
//
// The operations that replace a container's delta (snapshot, commit, rollback) REQUIRE that
// the caller holds the container's exclusive lock and that everything written to the delta is
// flushed: the CLI holds the lock itself when no server serves the container, and a server runs
// them through Disk::change (write gate closed, flushed) when a client asks over the control
// socket.
//
// Thread-safety: the functions are safe to call concurrently (each change is one transaction
// that re-checks what it read); the Pool must be open writable for the changing ones.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "error.h"
#include "layer_build.h"
#include "layers.h"
#include "pool.h"
#include "records.h"

namespace layer {

// What a container serves after a change: its row, its writable delta and the frozen chain
// below the delta (top first).
struct ContainerState {
  ContainerRecord container;
  LayerRecord delta;
  std::vector<LayerRecord> chain;
};

// Snapshot `name` of container c. Errors: ENOENT `snapshot "S" of container "C" not found`, EIO.
Result<SnapshotRecord> get_snapshot(ReadTxn& txn, const ContainerRecord& c, std::string_view name);

// Freezes the container's delta as snapshot `snap` and starts a new empty delta on it.
// expected_delta (if not 0) must still be the container's delta (EBUSY otherwise). The new
// delta is `premade` when given (a live change: its file made before the write gate closed;
// published by the commit, left to roll back on failure), else a new id whose file the first
// write creates. The same for commit_container and rollback_container.
// Errors: ENOENT (container), EEXIST (snapshot name), EINVAL (name), EIO.
Result<ContainerState> snapshot_container(Pool& pool, std::string_view container,
                                          std::string_view snap, LayerId expected_delta = 0,
                                          LayerBuild* premade = nullptr);

// Freezes the container's delta as the top layer of a new image `image_ref` (its parent is
// the container's image chain) and starts a new empty delta on it; the container now names
// that image. Errors: ENOENT, EEXIST (image), EINVAL, EIO.
Result<ContainerState> commit_container(Pool& pool, std::string_view container,
                                        std::string_view image_ref, std::string_view description,
                                        LayerId expected_delta = 0, LayerBuild* premade = nullptr);

// Replaces the container's delta by a new empty one on snapshot `snap`'s layer. The old delta
// is dropped (its file removed once nothing refers to it: *drops, to be finished with
// finish_drops_after_removal (layers.h) after the caller switched away from it), or kept as
// snapshot keep_as. Errors: ENOENT (container or snapshot), EEXIST (keep_as), EIO.
Result<ContainerState> rollback_container(Pool& pool, std::string_view container,
                                          std::string_view snap,
                                          const std::optional<std::string>& keep_as,
                                          std::vector<uint64_t>* drops, LayerId expected_delta = 0,
                                          LayerBuild* premade = nullptr);

struct SnapshotInfo {
  SnapshotRecord snapshot;
  LayerRecord layer;
  uint64_t data_blocks = 0;  // blocks stored in the snapshot's own layer
  std::string parent;        // the nearest earlier snapshot of the container ("" : none)
  bool current = false;      // the container's delta sits directly on it
};
// A layer of the container's tree that no snapshot names any more but that is still needed.
struct HiddenLayer {
  LayerRecord layer;
  uint64_t data_blocks = 0;
  std::string why;
};
struct SnapshotTree {
  ContainerRecord container;
  std::vector<SnapshotInfo> snapshots;  // oldest first
  std::vector<HiddenLayer> hidden;
};
// Errors: ENOENT (container), EIO.
Result<SnapshotTree> list_snapshots(Pool& pool, std::string_view container);

struct RemovedSnapshot {
  LayerId layer = 0;
  enum class Fate { kDropped, kMerged, kHidden } fate = Fate::kHidden;
  LayerId merged_into = 0;  // kMerged: the new layer replacing the snapshot's and its child's
  std::string why;          // kHidden: why the layer stays
};
// "dropped", "merged", "hidden".
const char* to_string(RemovedSnapshot::Fate fate);
// As the CLI prints it and a server's control reply carries it: {"layer","layer_fate",
// "merged_into" (merged only), "why" (hidden only)}. from_json reads an unknown fate as hidden.
// (Templates: the CLI's JSON keeps key order, the control socket's does not.)
template <typename Json>
void to_json(Json& j, const RemovedSnapshot& r) {
  j = Json{{"layer", r.layer}, {"layer_fate", to_string(r.fate)}};
  if (r.merged_into) j["merged_into"] = r.merged_into;
  if (!r.why.empty()) j["why"] = r.why;
}
template <typename Json>
void from_json(const Json& j, RemovedSnapshot& r) {
  r.layer = j.value("layer", LayerId{0});
  r.merged_into = j.value("merged_into", LayerId{0});
  r.why = j.value("why", std::string());
  const std::string fate = j.value("layer_fate", std::string());
  r.fate = fate == "dropped"  ? RemovedSnapshot::Fate::kDropped
           : fate == "merged" ? RemovedSnapshot::Fate::kMerged
                              : RemovedSnapshot::Fate::kHidden;
}

// Removes the name; then drops, merges or keeps the layer (see above). A merge copies the two
// layers' blocks into a new layer file and switches every reference in one transaction, under
// a merge intent (rolled back by fsck --repair after a crash) and the layers' exclusive locks
// (a layer that a server reads is left hidden: `layer gc` merges it later).
// Errors: ENOENT, EIO, ENOSPC.
Result<RemovedSnapshot> remove_snapshot(Pool& pool, std::string_view container,
                                        std::string_view snap);

// Merges `layer` into its only child when the rules above allow it; returns the new layer's
// id, or 0 with *why saying why not. Errors: EIO, ENOSPC.
Result<LayerId> merge_layer(Pool& pool, LayerId layer, std::string* why);

// The phases of a merge, for a server that merges layers its own disk reads (Disk::merge):
// plan (may L merge into its only child K?), build M invisibly, then switch in the publishing
// transaction.
struct MergePlan {
  LayerRecord parent;  // L
  LayerRecord child;   // K
};
// std::nullopt with *why when the layer may not be merged. Errors: EIO.
Result<std::optional<MergePlan>> plan_merge(Pool& pool, LayerId layer, std::string* why);
// M = K over L, built under a merge intent; publish it with switch_merge. REQUIRES: no other
// process changes L or K meanwhile (their locks). Errors: ENOSPC, EIO.
Result<std::unique_ptr<LayerBuild>> build_merge(Pool& pool, const MergePlan& plan);
// In the publishing transaction: K's references move to M, L and K retire (their rows and
// files: *drops, finished after the commit). Errors: EBUSY (L or K changed), EIO.
Status switch_merge(Pool& pool, WriteTxn& txn, const MergePlan& plan, LayerId merged,
                    std::vector<uint64_t>* drops);

// Copies everything the container reads from its frozen chain into one new frozen layer
// without a parent and puts the container's delta on it, so that the container no longer
// depends on its image or snapshots (their layers stay while others use them); its image ref
// becomes "" so that the image can be removed. The copy is built under a merge intent (rolled
// back by fsck --repair after a crash) and switched in one transaction: build_flat, then
// switch_flat (a served container's Disk::flatten switches with its write gate closed;
// flatten_container does both, for a caller holding the container's exclusive lock). The old
// chain's references are dropped: *drops, to finish after the switch.
// Errors: ENOENT, ENOSPC, EIO; EBUSY from switch_flat when the delta changed meanwhile.
struct FlatBuild {
  std::unique_ptr<LayerBuild> build;
  ContainerRecord container;
  LayerRecord delta;  // the delta whose chain was copied
  uint64_t size_bytes = 0;
};
// std::nullopt: the delta already sits on one parentless layer (or none).
Result<std::optional<FlatBuild>> build_flat(Pool& pool, std::string_view container);
Result<ContainerState> switch_flat(Pool& pool, FlatBuild& built, std::vector<uint64_t>* drops);
Result<ContainerState> flatten_container(Pool& pool, std::string_view container,
                                         std::vector<uint64_t>* drops);

struct GcReport {
  std::vector<std::string> done;  // one line per removed file or merged layer
  std::vector<std::string> kept;  // hidden layers that could not be merged, and why
};
// Finishes interrupted removals, merges every hidden layer that can be merged and removes
// layer files that no index entry names. Errors: EIO.
Result<GcReport> gc(Pool& pool);

// One of the points `diff` compares: a container's live head (as of its last flush) or a
// snapshot.
// Byte ranges (offset, length) whose content may differ between A and B, each "CONTAINER" or
// "CONTAINER@SNAP", from the maps only: blocks that resolve to the same layer (or to zeroes)
// in both are equal; anything else is reported. Cost: the map rows of the layers that are not
// shared by both chains. Errors: ENOENT, EINVAL (different block sizes), EIO.
struct DiffResult {
  uint64_t size_a = 0, size_b = 0;
  uint32_t block_size = 0;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
};
Result<DiffResult> diff(Pool& pool, std::string_view a, std::string_view b);

// The image versions that `image_ref`'s layers descend from, newest first, itself included.
Result<std::vector<ImageRecord>> image_history(Pool& pool, std::string_view image_ref);

}  // namespace layer
