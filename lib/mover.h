// mover.h — the tiering mover's mechanism: a layer's file moved from one tier to the other,
// crash-safe (DESIGN.md "Tiering mover"). Heat and policy are not here.
//
// A move, under the layer's lock held shared (merges and drops, which take it exclusively, wait;
// readers go on) and its move lock held exclusively (one mover per layer, across processes):
//   1. one transaction records a kMove intent naming the destination tier;
//   2. LayerStore::copy_to copies the file's data ranges into the destination in pieces, and
//   3. verifies each piece as soon as it is written, on a second thread while the next one is
//      copied: against the layer's `sums` when it is frozen (hashed), byte for byte against the
//      source otherwise (frozen-unhashed, or a writable delta); then the copy is synced. A
//      piece that does not verify stops the copy. (What the verification reads, and why this
//      order checks the same bytes as reading the copy back after its sync: copy_and_verify
//      in mover.cc.)
//   4. one transaction switches the layer row's tier;
//   5. the old file is removed, then the intent (so a crash leaves no orphan). Readers that
//      opened the old file keep reading it (same content, an unlinked inode);
//      Pool::open_frozen re-reads the row when a file it was told of is gone.
// A crash leaves the intent: recover_move (every writable Pool::open and fsck --repair, while no
// mover holds the move lock) removes the copy the row does not name, then the intent. So a
// layer is always readable from exactly one place, the one its row names.
//
// A writable delta moves here only while its container is not served: move_layer takes the
// container's lock exclusively (EBUSY names the server holding it). A served delta is moved by
// its server, live, through Disk::move_delta (disk.h), with the same intent, steps and recovery:
// the copy is made while writes go on, then writes go to both files while the blocks written
// during the copy are copied again, and writes pause only for the switch.
//
// Test points (Pool::test_point, LAYER_FAILPOINT): "move.intent-committed",
// "move.piece-copied" (move_layer: a piece of the copy written, before its verification; on
// the copy's second thread), "move.copied" (move_layer: copy written, verified and synced; a
// live delta's: the bulk copy, not caught up), "move.caught-up" (a live delta's catch-up rounds
// and the comparison done, copy synced, writes not paused yet), "move.verified" (move_layer:
// its size checked too; a live delta's: with writes paused, the last blocks copied and
// compared, the disk not yet switched to the copy), "move.published" (a live delta's: the
// disk writes to the copy, not synced, the row not switched, flush rounds held),
// "move.switched" (row switched, old file not yet removed; a live delta's server writes to the
// copy, its flush rounds still held).
//
// Thread-safety: move_layer may run concurrently with anything; a second move of the same layer
// fails with EBUSY.
#pragma once

#include <cstdint>

#include "error.h"
#include "pool.h"
#include "records.h"

namespace layer {

struct MoveOptions {
  // The copy is made and verified in pieces of this many bytes, each verified while the next
  // is copied; a positive multiple of 64 KiB (a checksum group). Tests use small pieces.
  uint64_t piece_bytes = uint64_t{32} << 20;
  // Bytes per second the copy reads at most; 0: as fast as it can (CopyOptions).
  uint64_t rate_bytes_per_sec = 0;
};

struct MoveResult {
  LayerId layer = 0;
  Tier from = Tier::kSsd;
  Tier to = Tier::kSsd;
  bool moved = false;       // false: it was in `to` already
  uint64_t data_bytes = 0;  // bytes of data copied (the source's data ranges)
  LayerState state = LayerState::kWritable;
  // A live delta's move (Disk::move_delta) only:
  double pause_ms = 0;        // how long writes waited for the final catch-up and the switch
  double start_pause_ms = 0;  // and for the tracker to be installed, before the copy
  uint32_t catch_up_rounds = 0;
  uint64_t caught_up_bytes = 0;  // bytes copied again after the bulk copy (rounds and final)
};

// Moves layer `id`'s file to tier `to` (nothing to do when it is there already). A layer with
// no file (a delta never written) only has its row switched. Errors: ENOENT (no such layer),
// EBUSY (another move of it runs, a merge or drop holds it, or its container is served), EIO
// (the copy does not verify; source unreadable), ENOSPC (destination full): after any error the
// layer is still read from its source tier and the destination holds no copy.
// REQUIRES: the pool open writable.
Result<MoveResult> move_layer(Pool& pool, LayerId id, Tier to, const MoveOptions& options = {});

// The destination tier of a move intent (fsck does not call the copy there an orphan).
// Errors: EIO (a target that does not parse).
Result<Tier> move_file_tier(uint64_t intent_id, const IntentRecord& intent);
// Recovers an interrupted move: under the layer's move lock (false, changing nothing, when a
// mover holds it), removes the file in the tier the layer's row does not name (both are
// removed when the row is gone: the layer was dropped), then the intent. Errors: those of the
// store, the lock and the transaction.
Result<bool> recover_move(Pool& pool, uint64_t intent_id, const IntentRecord& intent);

// The steps of a move that Disk::move_delta shares with move_layer.
// REQUIRES (each): the layer's move lock held.
//
// Finishes every move of layer `id` that a crash interrupted (as recover_move).
Status finish_moves_of(Pool& pool, LayerId id);
// Removes any file of layer `id` in `to` (a leftover: the row names the other tier), then
// commits a move intent to `to`; returns the intent's id. Test point "move.intent-committed".
Result<uint64_t> begin_move(Pool& pool, LayerId id, Tier to);
// One transaction switching layer `id`'s row from tier `from` to `to`, while its move intent
// `intent_id` is there. Errors: ENOENT (the layer was removed), EBUSY (its tier changed), EIO
// (the intent is gone: recovered meanwhile).
Status switch_tier(Pool& pool, LayerId id, Tier from, Tier to, uint64_t intent_id);
// Ends the move `intent_id` of layer `id` to `to`, switched or not: removes the file in the
// tier the layer's row does not name, then the intent.
Status end_move(Pool& pool, uint64_t intent_id, LayerId id, Tier to);

// The container whose delta is layer `id`; std::nullopt when none (a frozen layer, or none).
Result<std::optional<ContainerRecord>> find_container_of_delta(Pool& pool, LayerId id);

}  // namespace layer
