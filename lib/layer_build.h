// layer_build.h — a layer built invisibly under an intent: import, merge and flatten.
//
// begin() reserves a layer id and records an intent naming it, with the layer's exclusive lock
// taken inside the transaction that makes the intent visible (fsck --repair rolls back only
// intents whose layer is unlocked, so a build in progress is never undone under it). The
// builder then writes the layer's file and its rows (no `layers` row names them, so nothing
// reads them), and publish() runs the one transaction that makes the layer visible and deletes
// the intent. Until then, destroying the LayerBuild (or fail()) rolls back: the rows in bounded
// transactions, the intent with the last of them, then the file if this build created it. What
// a crash or a failing rollback leaves is an intent that fsck --repair rolls back the same way
// (roll_back_build).
//
// Thread-safety: one thread uses a LayerBuild. The Pool must outlive it.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "error.h"
#include "index.h"
#include "layer_file.h"
#include "locks.h"
#include "pool.h"
#include "records.h"

namespace layer {

class LayerBuild {
 public:
  // Errors: those of the transaction (EIO, ENOSPC), EBUSY (lock).
  static Result<std::unique_ptr<LayerBuild>> begin(Pool& pool, IntentRecord::Kind kind,
                                                   std::string target);
  ~LayerBuild();
  LayerBuild(const LayerBuild&) = delete;
  LayerBuild& operator=(const LayerBuild&) = delete;

  LayerId id() const { return id_; }
  // Creates the layer's file (removed by a rollback). Errors: as LayerStore::create.
  Result<std::shared_ptr<LayerFile>> create_file(Tier tier, uint64_t size_bytes);
  // Runs job in the publishing transaction, which also deletes the intent; after it commits
  // nothing is rolled back and the layer's exclusive lock is released. Errors: EIO when the intent
  // was rolled back meanwhile, the job's, the commit's (the build is then rolled back).
  Status publish(const std::function<Status(WriteTxn&)>& job);
  // Rolls back now and returns e, for `return build->fail(e);`.
  Error fail(Error e);

  // For a publishing transaction that someone else runs (a live snapshot's pre-made delta):
  // claim() inside it checks and deletes the intent; after that transaction committed,
  // published() ends the build as publish() does. A transaction that claimed and then failed
  // leaves the build to roll back. Errors: EIO (the intent was rolled back meanwhile).
  Status claim(WriteTxn& txn);
  void published();
  // The tier of the file create_file made.
  Tier file_tier() const { return file_tier_; }

 private:
  LayerBuild(Pool& pool) : pool_(pool) {}
  void roll_back() noexcept;
  Pool& pool_;
  LayerId id_ = 0;
  uint64_t intent_id_ = 0;
  Lock lock_;
  Tier file_tier_ = Tier::kSsd;
  bool created_file_ = false;
  bool done_ = false;  // published or rolled back
};

// Rolls back a build that a crash (or a failed rollback) left behind, as LayerBuild would have:
// under the layer's exclusive lock, its rows in bounded transactions, its intent with the last
// of them, then its file in the ssd tier (where imports and merges build). Every transaction
// re-reads the intent. Returns false when the lock is held (the build is running: nothing is
// changed) or when the intent is gone or the layer published meanwhile (it stops there). This
// is fsck --repair's recovery of import and merge intents (intents.h). Errors: those of the
// lock, the transactions and the store's remove.
Result<bool> roll_back_build(Pool& pool, uint64_t intent_id, const IntentRecord& intent);

}  // namespace layer
