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
// A writable delta moves only while its container is not served: move_layer takes the
// container's lock exclusively (EBUSY names the server holding it).
//
// Test points (Pool::test_point, LAYER_FAILPOINT): "move.intent-committed",
// "move.piece-copied" (a piece of the copy written, before its verification; on the copy's
// second thread), "move.copied" (copy written, verified and synced), "move.verified" (its size
// checked too), "move.switched" (row switched, old file not yet removed).
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
};

struct MoveResult {
  LayerId layer = 0;
  Tier from = Tier::kSsd;
  Tier to = Tier::kSsd;
  bool moved = false;       // false: it was in `to` already
  uint64_t data_bytes = 0;  // bytes of data copied (the source's data ranges)
  LayerState state = LayerState::kWritable;
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

}  // namespace layer
