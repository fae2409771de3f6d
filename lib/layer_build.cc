// layer_build.cc — LayerBuild: the intent, lock, publish and rollback of a layer being built.
#include "layer_build.h"

#include "index_restore.h"
#include "layers.h"

namespace layer {

namespace {

// Deletes a build's rows in bounded transactions and its intent with the last of them. The
// build itself (owner: it holds the layer's lock and has not published) deletes whatever is
// there. A recovery (!owner) re-reads the intent in each transaction and stops, returning false,
// when it is gone or the layer was published meanwhile (what is left is not the build's).
Result<bool> delete_build_rows(Pool& pool, LayerId layer, uint64_t intent_id, bool owner) {
  for (;;) {
    bool skip = false, done = false;
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      if (!owner) {
        LAYER_ASSIGN(auto current, txn.get(Db::kIntents, key_u64(intent_id)));
        LAYER_ASSIGN(auto published, txn.get(Db::kLayers, key_u64(layer)));
        if (!current || published) {
          skip = true;  // finished, published or rolled back meanwhile
          return {};
        }
      }
      LAYER_ASSIGN(uint64_t n, delete_layer_rows(txn, layer));
      if (n > 0) return {};  // more to do: the intent stays until the rows are gone
      done = true;
      return txn.del(Db::kIntents, key_u64(intent_id));
    }));
    if (skip) return false;
    if (done) return true;
  }
}

}  // namespace

Result<std::unique_ptr<LayerBuild>> LayerBuild::begin(Pool& pool, IntentRecord::Kind kind,
                                                      std::string target) {
  std::unique_ptr<LayerBuild> build(new LayerBuild(pool));
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(build->id_, txn.next_id("layer"));
    // The id is not taken by anyone else meanwhile (LMDB has one writer); if the transaction
    // fails, the lock goes with the LayerBuild.
    LAYER_ASSIGN(build->lock_, pool.locks().try_lock(LockKind::kLayer, build->id_, true,
                                                     fmt::format("layer {}", build->id_)));
    LAYER_ASSIGN(build->intent_id_, txn.next_id("intent"));
    IntentRecord intent{kind, build->id_, target, now_unix()};
    return txn.put(Db::kIntents, key_u64(build->intent_id_), encode(intent));
  }));
  return build;
}

LayerBuild::~LayerBuild() { roll_back(); }

Result<std::shared_ptr<LayerFile>> LayerBuild::create_file(Tier tier, uint64_t size_bytes) {
  LAYER_ASSIGN(auto file, pool_.store(tier).create(id_, size_bytes));
  // Only a file this build created is ever removed: one already there belongs to someone else.
  file_tier_ = tier;
  created_file_ = true;
  return file;
}

Status LayerBuild::publish(const std::function<Status(WriteTxn&)>& job) {
  auto s = pool_.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_TRY(claim(txn));
    return job(txn);
  });
  if (!s) return fail(s.error());
  published();
  return {};
}

Status LayerBuild::claim(WriteTxn& txn) {
  LAYER_ASSIGN(auto intent, txn.get(Db::kIntents, key_u64(intent_id_)));
  if (!intent) return make_error(EIO, "layer {}: its intent was rolled back meanwhile", id_);
  return txn.del(Db::kIntents, key_u64(intent_id_));
}

void LayerBuild::published() {
  done_ = true;
  // Published: an ordinary layer now, which whoever reads it locks shared (a disk adopting it
  // right away, in the same process).
  lock_.release();
}

Error LayerBuild::fail(Error e) {
  roll_back();
  return e;
}

void LayerBuild::roll_back() noexcept {
  if (done_) return;
  done_ = true;
  try {
    // An error leaves the intent for fsck --repair.
    if (!delete_build_rows(pool_, id_, intent_id_, /*owner=*/true)) return;
    if (created_file_) (void)pool_.store(file_tier_).remove(id_);
  } catch (...) {
    // Out of memory: the intent stays for fsck --repair.
  }
}

Result<bool> roll_back_build(Pool& pool, uint64_t intent_id, const IntentRecord& intent) {
  // Held through the rollback: a build holds it from before its intent is visible until it
  // publishes, so holding it here means no build of this layer runs.
  auto lock = pool.locks().try_lock(LockKind::kLayer, intent.layer, true,
                                    fmt::format("layer {}", intent.layer));
  if (!lock) {
    if (lock.error().code == EBUSY) return false;
    return std::move(lock).error();
  }
  LAYER_ASSIGN(const bool deleted,
               delete_build_rows(pool, intent.layer, intent_id, /*owner=*/false));
  if (!deleted) return false;
  // After an index restore, a build the copy calls interrupted may have finished later and
  // hold data (a merged layer, a delta a snapshot switched to): its file is set aside.
  LAYER_ASSIGN(const bool restored, index_was_restored(pool));
  if (restored) {
    LAYER_TRY(pool.store(Tier::kSsd).set_aside(intent.layer, pool.paths().root + "/lost+found"));
    return true;
  }
  LAYER_TRY(pool.store(Tier::kSsd).remove(intent.layer));
  return true;
}

}  // namespace layer
