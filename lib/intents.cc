// intents.cc — the kinds of intents, each mapped to its recovery.
#include "intents.h"

#include "layer_build.h"
#include "layers.h"
#include "mover.h"

namespace layer {
namespace {

Result<bool> recover_drop(Pool& pool, uint64_t intent_id, const IntentRecord&) {
  LAYER_TRY(finish_drop(pool, intent_id));
  return true;
}

// Imports and merges build in the ssd tier (roll_back_build removes the file there).
Result<Tier> build_file_tier(uint64_t, const IntentRecord&) { return Tier::kSsd; }

// Removals: rows in bounded transactions, then the file, then the intent (finish_drop).
const IntentRecovery kFinishDrop{IntentRecovery::Direction::kFinish, drop_file_tier, recover_drop};
// Builds: under the layer's lock, rows, then the intent, then the file (roll_back_build).
const IntentRecovery kRollBackBuild{IntentRecovery::Direction::kRollBack, build_file_tier,
                                    roll_back_build};
// Moves: under the layer's move lock, keep the copy the layer's row names (recover_move).
const IntentRecovery kFinishMove{IntentRecovery::Direction::kFinish, move_file_tier, recover_move,
                                 LockKind::kMove};

}  // namespace

Result<IntentKindInfo> intent_kind_info(uint64_t intent_id, const IntentRecord& intent) {
  using Kind = IntentRecord::Kind;
  // One line per kind. Without a default, the compiler names a kind added to
  // IntentRecord::Kind and missing here (-Wswitch).
  switch (intent.kind) {
    case Kind::kImport:
      return IntentKindInfo{"import", fmt::format("import of {}", intent.target), &kRollBackBuild};
    case Kind::kDrop:
      return IntentKindInfo{"removal", fmt::format("removal of layer {}", intent.layer),
                            &kFinishDrop};
    case Kind::kMerge:
      return IntentKindInfo{"merge", fmt::format("merge of layers {}", intent.target),
                            &kRollBackBuild};
    case Kind::kDelta:
      return IntentKindInfo{
          "delta", fmt::format("new delta for a live change of container \"{}\"", intent.target),
          &kRollBackBuild};
    case Kind::kMove:
      return IntentKindInfo{
          "move", fmt::format("move of layer {} to {}", intent.layer, intent.target), &kFinishMove};
  }
  return make_error(EIO, "intent {}: unknown kind {}", intent_id, static_cast<int>(intent.kind));
}

Result<std::vector<std::pair<uint64_t, IntentRecord>>> intents(
    Pool& pool, std::optional<IntentRecord::Kind> kind) {
  std::vector<std::pair<uint64_t, IntentRecord>> out;
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_TRY(txn.scan(Db::kIntents, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k);
    if (!id) return make_error(EIO, "intents: key of {} bytes", k.size());
    LAYER_ASSIGN(auto intent, decode_intent(v, *id));
    if (!kind || intent.kind == *kind) out.emplace_back(*id, intent);
    return true;
  }));
  return out;
}

Status finish_interrupted(Pool& pool) {
  LAYER_ASSIGN(auto all, intents(pool));
  for (const auto& [id, intent] : all) {
    LAYER_ASSIGN(auto info, intent_kind_info(id, intent));
    if (info.recovery->direction == IntentRecovery::Direction::kFinish)
      LAYER_TRY(info.recovery->recover(pool, id, intent));
  }
  return {};
}

}  // namespace layer
