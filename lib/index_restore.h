// index_restore.h — putting a copy of the index back (`layer index restore`), and what that
// leaves for fsck: containers whose newer writes the copy does not know.
//
// A copy is older than the layer files. Everything written after it is still in the files; the
// copy's maps do not name it. So a restore, before the copy becomes the index:
// - follows layers the mover moved since (a row naming a tier whose file is gone, the other
//   tier holding it: the row is switched, so no move recovery removes the only copy);
// - moves the `next.layer` counter past every layer file in the tiers (ids given after the copy
//   would otherwise be given again, over files that hold data);
// - marks every container whose delta file holds data in blocks its map does not mark data
//   (`meta` "stale.<id>", StaleRecord) and sets the incompatible feature bit
//   kIncompatStaleContainers, so that no server, this build or an older one, serves such a
//   container silently: Disk::open, snapshot, commit and rollback refuse it (EUCLEAN) until
//   `layer fsck --repair` adopts those blocks into its map (nothing is lost: the file holds them)
//   or `layer rm` removes it;
// - records the restore (`meta` "restore"): while it is there repairs set layer files aside in
//   POOL/lost+found instead of deleting them (a build the copy calls interrupted may have
//   finished after it), and fsck names the files made after the copy.
// Adopting is at block granularity from the file's data extents: a block written after the copy
// and trimmed or zeroed again (a hole in the file) reads as the copy's map says (see
// docs/design.md "Index copies").
//
// Thread-safety: restore_index needs the pool to itself (it refuses while any process has the
// index open); the rest is safe beside servers (adoption takes the container's lock).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "block_map.h"
#include "error.h"
#include "index_backup.h"
#include "layer_file.h"
#include "pool.h"
#include "records.h"

namespace layer {

struct StaleContainer {
  std::string name;
  uint64_t id = 0;
  LayerId delta = 0;
  uint64_t blocks = 0;  // blocks with data the restored map does not know
};

struct RestoreReport {
  IndexBackup from;
  std::string replaced;  // where the index that was replaced went ("" when there was none)
  uint64_t first_unknown_layer = 0;
  std::vector<StaleContainer> stale;
  std::vector<std::string>
      notes;  // tiers followed, the counter moved, files the copy does not know
};

// Replaces the index of the pool at `root` with its copy `name` (list_index_backups; "" = the
// newest): checks the copy (index_check.h), prepares it as above, sets the index it replaces
// aside as backup/replaced-STAMP.mdb, installs the copy, and rebuilds LMDB's lock file before
// any other process can open it. REQUIRES: no Pool of this pool open in this process.
// Errors: EBUSY (a server or another command has the index open: stop it first; nothing
// changed), ENOENT (no such copy), EUCLEAN (the copy is damaged too: nothing changed), EIO.
Result<RestoreReport> restore_index(const std::string& root, const std::string& name);

// The blocks of a layer's file that hold data (its data extents) where `txn`'s map of the layer
// does not say data: each touched chunk's bits with those blocks set to data; *blocks counts
// them. A layer without a file has none. Errors: EIO.
Result<std::map<uint32_t, ChunkBits>> unmapped_data(LayerStore& store, ReadTxn& txn,
                                                    const LayerRecord& layer, uint64_t* blocks);

// The `meta` key of a container's mark.
std::string stale_key(uint64_t container_id);
// The mark on a container, if any. Errors: EIO.
Result<std::optional<StaleRecord>> get_stale(ReadTxn& txn, uint64_t container_id);
// Every mark, in container id order. Errors: EIO.
Result<std::vector<StaleRecord>> stale_marks(ReadTxn& txn);
// OK unless `c` is marked: then EUCLEAN naming the container and what to do.
Status check_not_stale(ReadTxn& txn, const ContainerRecord& c);
// Deletes the container's mark (if any), and the feature bit with the last mark.
Status clear_stale(WriteTxn& txn, uint64_t container_id);
// The restore record, if the index was restored from a copy and fsck --repair has not settled it.
Result<std::optional<RestoreRecord>> get_restore(ReadTxn& txn);
// Whether that record is there (repairs then set files aside instead of deleting them).
Result<bool> index_was_restored(Pool& pool);

// Adopts a marked container's newer writes: every block its delta file holds data in becomes
// data in its map (the file fdatasynced first), in transactions of at most kMaxRowsPerTxn rows,
// the last one removing the mark. A mark whose container is gone is just removed. Returns the
// blocks adopted. Errors: EBUSY (a server holds the container), EACCES (read-only pool), EIO.
Result<uint64_t> adopt_unmapped_writes(Pool& pool, const StaleRecord& mark);

// Deletes the restore record when no mark is left (fsck --repair, after its repairs). Returns
// whether it did.
Result<bool> settle_restore(Pool& pool);

}  // namespace layer
