// layer_build.cc — LayerBuild: the intent, lock, publish and rollback of a layer being built.
#include "layer_build.h"

#include "layers.h"

namespace layer {

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
    LAYER_ASSIGN(auto intent, txn.get(Db::kIntents, key_u64(intent_id_)));
    if (!intent) return make_error(EIO, "layer {}: its intent was rolled back meanwhile", id_);
    LAYER_TRY(job(txn));
    return txn.del(Db::kIntents, key_u64(intent_id_));
  });
  if (!s) return fail(s.error());
  done_ = true;
  // Published: an ordinary layer now, which whoever reads it locks shared (a disk adopting it
  // right away, in the same process).
  lock_.release();
  return {};
}

Error LayerBuild::fail(Error e) {
  roll_back();
  return e;
}

void LayerBuild::roll_back() noexcept {
  if (done_) return;
  done_ = true;
  try {
    for (bool finished = false; !finished;) {
      auto s = pool_.committer().run([&](WriteTxn& txn) -> Status {
        LAYER_ASSIGN(uint64_t n, delete_layer_rows(txn, id_));
        if (n > 0) return {};
        finished = true;
        return txn.del(Db::kIntents, key_u64(intent_id_));
      });
      if (!s) return;  // the intent stays: fsck --repair finishes it
    }
    if (created_file_) (void)pool_.store(file_tier_).remove(id_);
  } catch (...) {
    // Out of memory: the intent stays for fsck --repair.
  }
}

}  // namespace layer
