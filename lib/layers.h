// layers.h — layers in the index: a layer's row and chain, its block counts, and references:
// dropping one (refcounts), retiring one, and removing a dropped layer's rows and file.
//
// A layer's refcount counts the child layers, image rows, container rows and snapshot rows that
// name it. A layer whose last reference goes loses its `layers` row in the transaction that
// drops the reference, which also records a drop intent; its `maps`/`sums` rows (any number)
// and its file go after the commit, in bounded transactions (finish_drop), so no transaction of
// a removal is long. Files are removed only after the transaction that dropped the last
// reference committed; a crash in between leaves the drop intent, finished by the next writable
// open or `layer fsck --repair` (intents.h).
//
// Thread-safety: the functions that take a transaction use it (one thread at a time); the others
// are safe to call concurrently, also with other processes finishing the same intents.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "error.h"
#include "index.h"
#include "records.h"

namespace layer {

class Pool;

// A layer's row. Errors: EIO when it is missing (a reference to it exists, so the index is
// corrupt) or does not decode.
Result<LayerRecord> get_layer(ReadTxn& txn, LayerId id);
// The chain of `top` following parents, top first. Errors: EIO on a missing or cyclic
// parent (the index is corrupt).
Result<std::vector<LayerRecord>> chain_of(ReadTxn& txn, LayerId top);
// Who reads each layer: the containers whose chain holds it ("NAME"), the snapshots that are
// it ("C@SNAP"), the image versions whose chain holds it ("NAME:VER"), in that order, each in
// key order. Layers no one reads are absent. Errors: EIO (corrupt records, a broken chain).
Result<std::map<LayerId, std::vector<std::string>>> layer_users(ReadTxn& txn);
// Counts a layer's data and zero blocks from its `maps` rows. Errors: EIO (corrupt row).
Status count_blocks(ReadTxn& txn, LayerId id, uint64_t* data, uint64_t* zero);

// Decrements a layer's refcount inside txn; one that reaches 0 loses its `layers` row and
// gets a drop intent (appended to drop_intents), and its parent is dropped the same way.
// After the commit, finish_drop() each intent.
Status drop_layer(WriteTxn& txn, LayerId id, std::vector<uint64_t>* drop_intents);
// Takes a layer's `layers` and `heat` rows out of the index inside txn and records a drop
// intent for its map rows and file (finished by finish_drop after the commit), without
// touching its parent's refcount (a merge hands that reference to the merged layer).
Status retire_layer(WriteTxn& txn, const LayerRecord& layer, std::vector<uint64_t>* drop_intents);
// Deletes up to kMaxRowsPerTxn of a layer's `maps` and `sums` rows in txn; returns how many
// (0: none are left). Drops and rollbacks call it until it returns 0, one bounded
// transaction at a time.
Result<uint64_t> delete_layer_rows(WriteTxn& txn, LayerId id);

// The tier of a drop intent's file (its target). Errors: EIO naming the intent.
Result<Tier> drop_file_tier(uint64_t intent_id, const IntentRecord& intent);
// Deletes a dropped layer's rows in bounded transactions, then its file, then the intent.
// Idempotent: another process may finish the same intent concurrently. Calls the test point
// "drop.rows" first. Errors: EIO (not a drop intent, corrupt target), those of the
// transactions and of the store's remove. REQUIRES: pool open writable.
Status finish_drop(Pool& pool, uint64_t intent_id);
// Finishes the drops of a removal that committed; an error says the object (`what`) is gone
// and what remains to be done.
Status finish_drops_after_removal(Pool& pool, const std::vector<uint64_t>& drops,
                                  const std::string& what);

}  // namespace layer
