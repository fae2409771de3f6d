// intents.h — the `intents` rows by kind: what each kind is and how each is recovered.
//
// An intent records work that spans transactions on a layer that no `layers` row names, yet or
// any more: a layer built invisibly (import, merge, flatten, a live change's new delta: LayerBuild)
// or a dropped layer whose rows and file are still being removed (layers.h). A crash leaves the row
// behind. Each kind maps to one recovery (intent_kind_info, one line per kind in intents.cc): a
// removal is finished, a build is rolled back. Every writable Pool::open finishes removals; fsck
// --repair recovers every kind. A new kind is one line there, plus its recovery if none of those
// fits.
//
// Thread-safety: safe to call concurrently, also with other processes recovering the same
// intents (each recovery re-reads its intent in every transaction).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "error.h"
#include "locks.h"
#include "pool.h"
#include "records.h"

namespace layer {

// How the interrupted intents of a kind are recovered.
struct IntentRecovery {
  // kFinish: the work's object has already left the index (a removal), so the work is finished,
  // by every writable Pool::open and by fsck --repair, even while another process may be
  // finishing it too (recover is idempotent). kRollBack: the work builds a layer under the
  // layer's exclusive lock; only fsck --repair rolls it back, and only while that lock is free
  // (a locked one is running, not interrupted).
  enum class Direction { kFinish, kRollBack } direction;
  // The tier of the layer file the intent accounts for (fsck does not call it an orphan).
  // Errors: EIO (a target that does not parse).
  Result<Tier> (*file_tier)(uint64_t intent_id, const IntentRecord& intent);
  // Recovers intent intent_id: true when done, false when it left it alone (its work is
  // running, or was finished or rolled back meanwhile). REQUIRES: the pool open writable.
  // Errors: those of the transactions, the locks and the store.
  Result<bool> (*recover)(Pool& pool, uint64_t intent_id, const IntentRecord& intent);
  // For a kFinish kind whose work holds this lock of its layer while it runs (a move): fsck
  // does not call such an intent unfinished while the lock is held.
  std::optional<LockKind> running_lock = std::nullopt;
};

// What an intent is, for messages, and its kind's recovery.
struct IntentKindInfo {
  const char* name;  // the kind: "import", "removal", "merge"
  std::string what;  // this intent: "import of debian:12", "removal of layer 7"
  const IntentRecovery* recovery;
};
// The one place that lists the kinds. Errors: EIO for a kind this build does not know (which
// decode_intent already refuses).
Result<IntentKindInfo> intent_kind_info(uint64_t intent_id, const IntentRecord& intent);

// The intents of one kind (or of every kind) in the index, in id order: (intent id, intent).
// Errors: EIO (a row that does not decode).
Result<std::vector<std::pair<uint64_t, IntentRecord>>> intents(
    Pool& pool, std::optional<IntentRecord::Kind> kind = std::nullopt);

// Finishes every intent whose kind's recovery is kFinish (interrupted removals): what every
// writable Pool::open does. Stops at the first error. REQUIRES: the pool open writable.
Status finish_interrupted(Pool& pool);

}  // namespace layer
