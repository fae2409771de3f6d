// layers.cc — layer rows, chains, block counts, refcounts and drops.
#include "layers.h"

#include "block_map.h"
#include "chain.h"
#include "journal.h"
#include "pool.h"

namespace layer {

Result<LayerRecord> get_layer(ReadTxn& txn, LayerId id) {
  LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
  if (!v) return make_error(EIO, "layer {} is missing from the index", id);
  return decode_layer(*v, id);
}

Result<std::vector<LayerRecord>> chain_of(ReadTxn& txn, LayerId top) {
  std::vector<LayerRecord> chain;
  for (LayerId id = top; id != 0;) {
    if (chain.size() > kMaxChainDepth + 1)
      return make_error(EIO, "layer {}: parent chain loops or is deeper than {}", top,
                        kMaxChainDepth);
    LAYER_ASSIGN(auto layer, get_layer(txn, id));
    id = layer.parent;
    chain.push_back(std::move(layer));
  }
  return chain;
}

Status count_blocks(ReadTxn& txn, LayerId id, uint64_t* data, uint64_t* zero) {
  *data = *zero = 0;
  return for_each_map_row(txn, id, [&](uint32_t, const ChunkBits& bits) -> Result<bool> {
    BlockState u;
    if (bits.uniform(&u)) {
      if (u == BlockState::kData) *data += kBlocksPerChunk;
      if (u == BlockState::kZero) *zero += kBlocksPerChunk;
      return true;
    }
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
      *data += bits.get(i) == BlockState::kData;
      *zero += bits.get(i) == BlockState::kZero;
    }
    return true;
  });
}

Status retire_layer(WriteTxn& txn, const LayerRecord& layer, std::vector<uint64_t>* drop_intents) {
  // The layer row goes now; its map and checksum rows (any number) and its file go in bounded
  // steps under a drop intent (finish_drop), so this transaction stays short.
  LAYER_TRY(txn.del(Db::kLayers, key_u64(layer.id)));
  LAYER_TRY(txn.del(Db::kHeat, key_u64(layer.id)));
  LAYER_TRY(txn.del(Db::kMeta, journal::key(layer.id)));
  LAYER_ASSIGN(uint64_t intent_id, txn.next_id("intent"));
  IntentRecord intent{IntentRecord::Kind::kDrop, layer.id, to_string(layer.tier), now_unix()};
  LAYER_TRY(txn.put(Db::kIntents, key_u64(intent_id), encode(intent)));
  drop_intents->push_back(intent_id);
  return {};
}

Status drop_layer(WriteTxn& txn, LayerId id, std::vector<uint64_t>* drop_intents) {
  while (id != 0) {
    LAYER_ASSIGN(auto layer, get_layer(txn, id));
    if (layer.refcount > 1) {
      --layer.refcount;
      return txn.put(Db::kLayers, key_u64(id), encode(layer));
    }
    LAYER_TRY(retire_layer(txn, layer, drop_intents));
    id = layer.parent;  // the dropped layer's reference to its parent goes too
  }
  return {};
}

Result<uint64_t> delete_layer_rows(WriteTxn& txn, LayerId id) {
  const std::string prefix = key_u64(id);
  LAYER_ASSIGN(uint64_t maps, txn.del_prefix(Db::kMaps, prefix, kMaxRowsPerTxn));
  LAYER_ASSIGN(uint64_t sums, txn.del_prefix(Db::kSums, prefix, kMaxRowsPerTxn - maps));
  return maps + sums;
}

Result<Tier> drop_file_tier(uint64_t intent_id, const IntentRecord& intent) {
  auto tier = parse_tier(intent.target);
  if (!tier) return make_error(EIO, "intent {}: {}", intent_id, tier.error().message);
  return *tier;
}

Status finish_drop(Pool& pool, uint64_t intent_id) {
  pool.test_point("drop.rows");
  IntentRecord intent;
  for (;;) {
    bool gone = false;
    uint64_t deleted = 0;
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      LAYER_ASSIGN(auto v, txn.get(Db::kIntents, key_u64(intent_id)));
      if (!v) {
        gone = true;  // finished by another process meanwhile
        return {};
      }
      LAYER_ASSIGN(intent, decode_intent(*v, intent_id));
      if (intent.kind != IntentRecord::Kind::kDrop)
        return make_error(EIO, "intent {} is not a drop", intent_id);
      LAYER_ASSIGN(deleted, delete_layer_rows(txn, intent.layer));
      return {};
    }));
    if (gone) return {};
    if (deleted == 0) break;
  }
  // No row names the layer any more: its file goes, then the intent (a crash in between
  // repeats the unlink, which tolerates a missing file).
  LAYER_ASSIGN(const Tier tier, drop_file_tier(intent_id, intent));
  LAYER_TRY(pool.store(tier).remove(intent.layer));
  return pool.committer().run(
      [&](WriteTxn& txn) { return txn.del(Db::kIntents, key_u64(intent_id)); });
}

Status finish_drops_after_removal(Pool& pool, const std::vector<uint64_t>& drops,
                                  const std::string& what) {
  for (uint64_t intent_id : drops) {
    auto s = finish_drop(pool, intent_id);
    if (!s)
      return make_error(s.error().code,
                        "{} was removed, but freeing its space failed ({}); the "
                        "next `layer fsck --repair` or writable open of the pool finishes it",
                        what, s.error().message);
  }
  return {};
}

Result<std::map<LayerId, std::vector<std::string>>> layer_users(ReadTxn& txn) {
  std::map<LayerId, std::vector<std::string>> users;
  std::map<uint64_t, std::string> container_names;
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto c, decode_container(v, k));
        container_names[c.id] = c.name;
        LAYER_ASSIGN(auto chain, chain_of(txn, c.delta_layer));
        for (const auto& l : chain) users[l.id].push_back(c.name);
        return true;
      }));
  LAYER_TRY(
      txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto s, decode_snapshot(v, k));
        auto it = container_names.find(s.container_id);
        users[s.layer].push_back(
            fmt::format("{}@{}", it == container_names.end() ? "?" : it->second, s.name));
        return true;
      }));
  LAYER_TRY(txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto image, decode_image(v, k));
    LAYER_ASSIGN(auto chain, chain_of(txn, image.top_layer));
    for (const auto& l : chain) users[l.id].push_back(image.ref);
    return true;
  }));
  return users;
}

}  // namespace layer
