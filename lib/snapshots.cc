// snapshots.cc — snapshot, commit, rollback, snapshot removal and merge, gc, diff, history.
//
// Design notes (DESIGN.md "Snapshots, images and merges"):
// - Refcounts: a layer's refcount counts its child layers, the image rows, container rows and
//   snapshot rows naming it. A snapshot turns the container's reference to its delta into a
//   child reference (the new delta) plus a snapshot reference: +1.
// - Every change is one transaction that re-reads what it depends on; the callers that change
//   what a container serves hold its exclusive lock (snapshots.h).
// - Merge (snapshot rm): layer L whose only reference is one frozen child K is replaced, with
//   K, by a new layer M = K over L, whose parent is L's parent. M is built under a merge intent
//   (its rows and file invisible: no `layers` row), then one transaction repoints K's
//   references to M and retires L and K (drop intents remove their rows and files). Frozen
//   files never change in place. Both layers are locked exclusively while this runs, so a
//   server reading them (shared locks) makes the merge wait for `layer gc`.
#include "snapshots.h"

#include <algorithm>
#include <map>
#include <set>

#include "block_map.h"
#include "fsck.h"
#include "index.h"
#include "index_restore.h"
#include "journal.h"
#include "layer_build.h"
#include "layers.h"
#include "locks.h"
#include "names.h"

namespace layer {

Result<SnapshotRecord> get_snapshot(ReadTxn& txn, const ContainerRecord& c, std::string_view name) {
  LAYER_ASSIGN(auto v, txn.get(Db::kSnapshots, snapshot_key(c.id, name)));
  if (!v) return make_error(ENOENT, "snapshot \"{}\" of container \"{}\" not found", name, c.name);
  return decode_snapshot(*v, snapshot_key(c.id, name));
}

namespace {

Status put_layer(WriteTxn& txn, const LayerRecord& layer) {
  return txn.put(Db::kLayers, key_u64(layer.id), encode(layer));
}

// A new, empty writable delta for container c on `parent` (whose refcount the caller adds):
// the pre-made one if given (its file exists), else a new id whose file the first write makes.
// A new delta starts on ssd: it is what the container writes.
Result<LayerRecord> make_delta(WriteTxn& txn, const ContainerRecord& c, LayerId parent,
                               LayerBuild* premade) {
  LayerId id = 0;
  if (premade) {
    LAYER_TRY(premade->claim(txn));
    id = premade->id();
  } else {
    LAYER_ASSIGN(id, txn.next_id("layer"));
  }
  LayerRecord delta{id, parent,    Tier::kSsd, c.size_bytes, c.block_size, LayerState::kWritable,
                    1,  now_unix()};
  LAYER_TRY(put_layer(txn, delta));
  return delta;
}

// The container's delta, frozen (not yet written back). Errors: EBUSY when it is not
// expected_delta, EIO when the index says it is not writable, EUCLEAN when an index restore
// marked the container (freezing its map would freeze it without its newest writes).
Result<LayerRecord> frozen_delta(Pool& /*pool*/, WriteTxn& txn, const ContainerRecord& c,
                                 LayerId expected_delta) {
  if (expected_delta != 0 && c.delta_layer != expected_delta)
    return make_error(EBUSY, "container \"{}\" changed meanwhile (its delta is now layer {})",
                      c.name, c.delta_layer);
  LAYER_TRY(check_not_stale(txn, c));
  LAYER_ASSIGN(auto d, get_layer(txn, c.delta_layer));
  if (d.state != LayerState::kWritable)
    return make_error(EIO, "container \"{}\": its delta layer {} is not writable", c.name, d.id);
  d.state = LayerState::kFrozenUnhashed;
  return d;
}

// Switches container c to a new delta on `base` (refcounts of base already counted) and
// returns what it now serves.
Result<ContainerState> switch_delta(WriteTxn& txn, ContainerRecord c, const LayerRecord& base,
                                    LayerBuild* premade) {
  LAYER_ASSIGN(auto delta, make_delta(txn, c, base.id, premade));
  c.delta_layer = delta.id;
  ++c.generation;
  LAYER_TRY(txn.put(Db::kContainers, c.name, encode(c)));
  ContainerState state{c, delta, {}};
  LAYER_ASSIGN(state.chain, chain_of(txn, base.id));
  return state;
}

// Every layer of the index, and the children of each.
struct LayerGraph {
  std::map<LayerId, LayerRecord> layers;
  std::map<LayerId, std::vector<LayerId>> children;
};

Result<LayerGraph> load_graph(ReadTxn& txn) {
  LayerGraph g;
  LAYER_TRY(txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k);
    if (!id) return make_error(EIO, "layers: key of {} bytes", k.size());
    LAYER_ASSIGN(auto rec, decode_layer(v, *id));
    if (rec.parent != 0) g.children[rec.parent].push_back(rec.id);
    g.layers.emplace(*id, std::move(rec));
    return true;
  }));
  return g;
}

// A layer's map rows, by chunk.
Result<std::map<uint32_t, ChunkBits>> load_rows(ReadTxn& txn, LayerId id) {
  std::map<uint32_t, ChunkBits> rows;
  LAYER_TRY(for_each_map_row(txn, id, [&](uint32_t c, const ChunkBits& bits) -> Result<bool> {
    rows.emplace(c, bits);
    return true;
  }));
  return rows;
}

// The container's delta journal folded into the index (journal.h) before a change reads the
// delta's rows from it. Errors: those of journal::recover_delta; ENOENT (container).
Status recover_journal_of(Pool& pool, std::string_view container) {
  LayerId delta = 0;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    delta = c.delta_layer;
  }
  return journal::recover_delta(pool, delta);
}

}  // namespace

// ---- snapshot / commit / rollback ----

Result<ContainerState> snapshot_container(Pool& pool, std::string_view container,
                                          std::string_view snap, LayerId expected_delta,
                                          LayerBuild* premade) {
  LAYER_TRY(validate_name(container, "container name"));
  LAYER_TRY(validate_snapshot_name(snap));
  LAYER_TRY(recover_journal_of(pool, container));
  ContainerState state;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    const std::string key = snapshot_key(c.id, snap);
    LAYER_ASSIGN(auto existing, txn.get(Db::kSnapshots, key));
    if (existing)
      return make_error(EEXIST, "snapshot \"{}\" of container \"{}\" already exists", snap,
                        container);
    LAYER_ASSIGN(auto frozen, frozen_delta(pool, txn, c, expected_delta));
    ++frozen.refcount;  // the container's reference becomes the new delta's; + the snapshot's
    LAYER_TRY(put_layer(txn, frozen));
    SnapshotRecord rec{std::string(snap), c.id, frozen.id, now_unix()};
    LAYER_TRY(txn.put(Db::kSnapshots, key, encode(rec)));
    LAYER_ASSIGN(state, switch_delta(txn, c, frozen, premade));
    return {};
  }));
  if (premade) premade->published();
  pool.test_point("snapshot.committed");
  return state;
}

Result<ContainerState> commit_container(Pool& pool, std::string_view container,
                                        std::string_view image_ref, std::string_view description,
                                        LayerId expected_delta, LayerBuild* premade) {
  LAYER_TRY(validate_name(container, "container name"));
  LAYER_TRY(validate_image_ref(image_ref));
  LAYER_TRY(recover_journal_of(pool, container));
  ContainerState state;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    LAYER_ASSIGN(auto existing, txn.get(Db::kImages, image_ref));
    if (existing) return make_error(EEXIST, "image {} already exists", image_ref);
    LAYER_ASSIGN(auto frozen, frozen_delta(pool, txn, c, expected_delta));
    ++frozen.refcount;  // the new delta's and the image row's, for the container's
    LAYER_TRY(put_layer(txn, frozen));
    ImageRecord image{std::string(image_ref), frozen.id,  c.size_bytes,
                      c.block_size,           now_unix(), std::string(description)};
    LAYER_TRY(txn.put(Db::kImages, image_ref, encode(image)));
    c.image_ref = std::string(image_ref);
    LAYER_ASSIGN(state, switch_delta(txn, c, frozen, premade));
    return {};
  }));
  if (premade) premade->published();
  pool.test_point("commit.committed");
  return state;
}

Result<ContainerState> rollback_container(Pool& pool, std::string_view container,
                                          std::string_view snap,
                                          const std::optional<std::string>& keep_as,
                                          std::vector<uint64_t>* drops, LayerId expected_delta,
                                          LayerBuild* premade) {
  LAYER_TRY(validate_name(container, "container name"));
  LAYER_TRY(validate_snapshot_name(snap));
  if (keep_as) LAYER_TRY(validate_snapshot_name(*keep_as));
  LAYER_TRY(recover_journal_of(pool, container));
  ContainerState state;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    drops->clear();
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    LAYER_ASSIGN(auto target, get_snapshot(txn, c, snap));
    if (expected_delta != 0 && c.delta_layer != expected_delta)
      return make_error(EBUSY, "container \"{}\" changed meanwhile", container);
    // Dropping a marked delta would discard writes its user may not know are there.
    LAYER_TRY(check_not_stale(txn, c));
    if (keep_as) {
      const std::string key = snapshot_key(c.id, *keep_as);
      LAYER_ASSIGN(auto existing, txn.get(Db::kSnapshots, key));
      if (existing)
        return make_error(EEXIST, "snapshot \"{}\" of container \"{}\" already exists", *keep_as,
                          container);
      // The container's reference to the old delta becomes the snapshot's.
      LAYER_ASSIGN(auto frozen, frozen_delta(pool, txn, c, 0));
      LAYER_TRY(put_layer(txn, frozen));
      SnapshotRecord rec{*keep_as, c.id, frozen.id, now_unix()};
      LAYER_TRY(txn.put(Db::kSnapshots, key, encode(rec)));
    } else {
      LAYER_TRY(drop_layer(txn, c.delta_layer, drops));
    }
    LAYER_ASSIGN(auto base, get_layer(txn, target.layer));
    ++base.refcount;
    LAYER_TRY(put_layer(txn, base));
    LAYER_ASSIGN(state, switch_delta(txn, c, base, premade));
    return {};
  }));
  if (premade) premade->published();
  pool.test_point("rollback.committed");
  return state;
}

// ---- listing ----

Result<SnapshotTree> list_snapshots(Pool& pool, std::string_view container) {
  LAYER_TRY(validate_name(container, "container name"));
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  SnapshotTree tree;
  LAYER_ASSIGN(tree.container, pool.get_container(txn, container));
  const ContainerRecord& c = tree.container;
  std::map<LayerId, std::string> named;  // this container's snapshot layers
  LAYER_TRY(txn.scan(Db::kSnapshots, key_u64(c.id),
                     [&](std::string_view k, std::string_view v) -> Result<bool> {
                       LAYER_ASSIGN(auto rec, decode_snapshot(v, k));
                       SnapshotInfo info;
                       info.snapshot = rec;
                       tree.snapshots.push_back(std::move(info));
                       named[rec.layer] = rec.name;
                       return true;
                     }));
  LAYER_ASSIGN(auto delta, get_layer(txn, c.delta_layer));
  for (auto& s : tree.snapshots) {
    LAYER_ASSIGN(s.layer, get_layer(txn, s.snapshot.layer));
    uint64_t zero = 0;
    LAYER_TRY(count_blocks(txn, s.layer.id, &s.data_blocks, &zero));
    s.current = delta.parent == s.layer.id;
    for (LayerId p = s.layer.parent; p != 0;) {
      if (auto it = named.find(p); it != named.end()) {
        s.parent = it->second;
        break;
      }
      LAYER_ASSIGN(auto l, get_layer(txn, p));
      p = l.parent;
    }
  }
  std::sort(tree.snapshots.begin(), tree.snapshots.end(), [](const auto& a, const auto& b) {
    return a.layer.id < b.layer.id;  // layer ids grow: creation order
  });

  // Hidden: layers of this container's tree (above its image) that nothing names.
  std::set<LayerId> image_layers, other_names;
  LAYER_TRY(txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto image, decode_image(v, k));
    other_names.insert(image.top_layer);
    if (image.ref == c.image_ref) {
      LAYER_ASSIGN(auto chain, chain_of(txn, image.top_layer));
      for (const auto& l : chain) image_layers.insert(l.id);
    }
    return true;
  }));
  LAYER_TRY(
      txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto rec, decode_snapshot(v, k));
        other_names.insert(rec.layer);
        return true;
      }));
  std::set<LayerId> seen;
  std::vector<LayerId> starts{delta.parent};
  for (const auto& s : tree.snapshots) starts.push_back(s.layer.parent);
  LAYER_ASSIGN(auto graph, load_graph(txn));
  for (LayerId id : starts) {
    while (id != 0 && !image_layers.count(id) && seen.insert(id).second) {
      auto it = graph.layers.find(id);
      if (it == graph.layers.end())
        return make_error(EIO, "layer {} is missing from the index", id);
      const LayerRecord& l = it->second;
      // A bottom layer is the container's base (an image's, or its own after a flatten).
      if (!other_names.count(id) && l.parent != 0) {
        HiddenLayer h{l, 0, {}};
        uint64_t zero = 0;
        LAYER_TRY(count_blocks(txn, id, &h.data_blocks, &zero));
        const auto& kids = graph.children[id];
        if (kids.size() > 1 || l.refcount > 1)
          h.why = fmt::format("{} layers depend on it", std::max<size_t>(kids.size(), l.refcount));
        else if (kids.size() == 1 && graph.layers[kids[0]].state == LayerState::kWritable)
          h.why = "the live delta sits on it; `layer gc` merges it after the next snapshot";
        else
          h.why =
              "waiting to be merged with its child (`layer gc` merges it when no server reads it)";
        tree.hidden.push_back(std::move(h));
      }
      id = l.parent;
    }
  }
  return tree;
}

// ---- removal, merge, gc ----

const char* to_string(RemovedSnapshot::Fate fate) {
  switch (fate) {
    case RemovedSnapshot::Fate::kDropped:
      return "dropped";
    case RemovedSnapshot::Fate::kMerged:
      return "merged";
    case RemovedSnapshot::Fate::kHidden:
      break;
  }
  return "hidden";
}

Result<RemovedSnapshot> remove_snapshot(Pool& pool, std::string_view container,
                                        std::string_view snap) {
  LAYER_TRY(validate_name(container, "container name"));
  LAYER_TRY(validate_snapshot_name(snap));
  RemovedSnapshot out;
  std::vector<uint64_t> drops;
  bool dropped = false;
  // A layer that goes with its name must not be read meanwhile (an open CONTAINER@SNAP
  // export, a clone being made of it): its exclusive lock, taken when no one reads it, is held
  // from before the drop is decided until the file is gone (opening CONTAINER@SNAP takes the
  // layer's shared lock before it reads the snapshot's row). When the lock is not free the
  // removal goes ahead only if the layer stays (it has a child, or another reference).
  Lock exclusive;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    LAYER_ASSIGN(auto s, get_snapshot(txn, c, snap));
    out.layer = s.layer;
    auto l =
        pool.locks().try_lock(LockKind::kLayer, s.layer, true, fmt::format("layer {}", s.layer));
    if (l) {
      exclusive = std::move(*l);
    } else if (l.error().code != EBUSY) {
      return std::move(l).error();
    }
  }
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    drops.clear();
    LAYER_ASSIGN(auto c, pool.get_container(txn, container));
    LAYER_ASSIGN(auto s, get_snapshot(txn, c, snap));
    if (s.layer != out.layer)
      return make_error(EBUSY, "snapshot \"{}\" of container \"{}\" changed meanwhile", snap,
                        container);
    LAYER_TRY(txn.del(Db::kSnapshots, snapshot_key(c.id, snap)));
    LAYER_TRY(drop_layer(txn, s.layer, &drops));
    LAYER_ASSIGN(auto still, txn.get(Db::kLayers, key_u64(s.layer)));
    dropped = !still;
    if (dropped && !exclusive.held())
      return make_error(EBUSY,
                        "snapshot \"{}\" of container \"{}\" is being read (export {}@{} is "
                        "open); remove it once that is closed",
                        snap, container, container, snap);
    return {};
  }));
  pool.test_point("snapshot-rm.committed");
  LAYER_TRY(finish_drops_after_removal(
      pool, drops, fmt::format("snapshot \"{}\" of container \"{}\"", snap, container)));
  exclusive.release();  // merge_layer takes the locks it needs itself
  if (dropped) {
    out.fate = RemovedSnapshot::Fate::kDropped;
    return out;
  }
  LAYER_ASSIGN(out.merged_into, merge_layer(pool, out.layer, &out.why));
  out.fate = out.merged_into ? RemovedSnapshot::Fate::kMerged : RemovedSnapshot::Fate::kHidden;
  return out;
}

namespace {

// Copies the merged content of `rows` (chunk -> per-block source: 0 none, 1 child, 2 parent)
// into `out`, in runs of one source.
constexpr uint8_t kFromNone = 0, kFromChild = 1, kFromParent = 2;

Status copy_runs(const std::vector<uint8_t>& source, uint64_t chunk, uint32_t block_size,
                 uint64_t size_bytes, LayerFile* child, LayerFile* parent, LayerFile& out,
                 std::vector<uint8_t>& buf) {
  const uint64_t first_block = chunk * kBlocksPerChunk;
  const uint32_t max_run = std::max<uint32_t>(1, static_cast<uint32_t>(buf.size() / block_size));
  for (uint32_t i = 0; i < kBlocksPerChunk;) {
    const uint8_t src = source[i];
    uint32_t n = 1;
    while (i + n < kBlocksPerChunk && source[i + n] == src && n < max_run) ++n;
    if (src != kFromNone) {
      const uint64_t from = (first_block + i) * block_size;
      if (from >= size_bytes) break;
      const uint64_t len = std::min<uint64_t>(uint64_t{n} * block_size, size_bytes - from);
      LayerFile* in = src == kFromChild ? child : parent;
      if (!in)
        return make_error(EIO, "merge: a layer file holding block {} is missing", first_block + i);
      LAYER_TRY(in->read(buf.data(), len, from));
      LAYER_TRY(out.write(buf.data(), len, from));
    }
    i += n;
  }
  return {};
}

}  // namespace

Result<std::optional<MergePlan>> plan_merge(Pool& pool, LayerId layer_id, std::string* why) {
  LayerRecord l, k;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto row, txn.get(Db::kLayers, key_u64(layer_id)));
    if (!row) {
      *why = "it was removed";
      return std::optional<MergePlan>{};
    }
    LAYER_ASSIGN(l, decode_layer(*row, layer_id));
    if (l.state == LayerState::kWritable) {
      *why = "it is a live delta";
      return std::optional<MergePlan>{};
    }
    LAYER_ASSIGN(auto graph, load_graph(txn));
    const auto& kids = graph.children[layer_id];
    if (l.refcount != 1 || kids.size() != 1) {
      *why = fmt::format("{} layers, snapshots, clones or images depend on it",
                         std::max<size_t>(l.refcount, kids.size()));
      return std::optional<MergePlan>{};
    }
    k = graph.layers[kids[0]];
    if (k.state == LayerState::kWritable) {
      *why = "the live delta sits on it; `layer gc` merges it after the next snapshot";
      return std::optional<MergePlan>{};
    }
    if (k.block_size != l.block_size || k.size_bytes < l.size_bytes)
      return make_error(EIO, "layers {} and {}: block sizes or sizes disagree", l.id, k.id);
  }
  return std::optional<MergePlan>{MergePlan{l, k}};
}

Result<std::unique_ptr<LayerBuild>> build_merge(Pool& pool, const MergePlan& plan) {
  const LayerRecord& l = plan.parent;
  const LayerRecord& k = plan.child;
  LAYER_ASSIGN(auto build, LayerBuild::begin(pool, IntentRecord::Kind::kMerge,
                                             fmt::format("{}+{}", l.id, k.id)));
  const LayerId merged = build->id();
  pool.test_point("merge.intent-committed");
  // Build M: rows and data, invisible until the switch.
  std::vector<std::pair<uint32_t, std::string>> out_rows;
  {
    auto built = [&]() -> Status {
      LAYER_ASSIGN(auto txn, pool.index().begin_read());
      LAYER_ASSIGN(auto parent_rows, load_rows(txn, l.id));
      LAYER_ASSIGN(auto child_rows, load_rows(txn, k.id));
      std::set<uint32_t> chunks;
      for (const auto& [c, _] : parent_rows) chunks.insert(c);
      for (const auto& [c, _] : child_rows) chunks.insert(c);
      auto open_file = [&](const LayerRecord& rec) -> Result<std::shared_ptr<LayerFile>> {
        auto f = pool.store(rec.tier).open(rec.id, false);
        if (!f && f.error().code == ENOENT) return std::shared_ptr<LayerFile>();
        return f;
      };
      LAYER_ASSIGN(auto parent_file, open_file(l));
      LAYER_ASSIGN(auto child_file, open_file(k));
      LAYER_ASSIGN(auto out, build->create_file(Tier::kSsd, k.size_bytes));
      std::vector<uint8_t> buf(1 << 20);
      std::vector<uint8_t> source(kBlocksPerChunk);
      for (uint32_t c : chunks) {
        ChunkBits bits;
        auto pc = parent_rows.find(c);
        auto cc = child_rows.find(c);
        bool any_data = false;
        for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
          BlockState s = cc != child_rows.end() ? cc->second.get(i) : BlockState::kAbsent;
          uint8_t from = kFromChild;
          if (s == BlockState::kAbsent && pc != parent_rows.end()) {
            s = pc->second.get(i);
            from = kFromParent;
          }
          bits.set(i, s);
          source[i] = s == BlockState::kData ? from : kFromNone;
          any_data = any_data || s == BlockState::kData;
        }
        BlockState u;
        if (bits.uniform(&u) && u == BlockState::kAbsent) continue;
        if (any_data)
          LAYER_TRY(copy_runs(source, c, k.block_size, k.size_bytes, child_file.get(),
                              parent_file.get(), *out, buf));
        out_rows.emplace_back(c, encode_chunk(bits));
      }
      LAYER_TRY(out->sync());
      for (size_t i = 0; i < out_rows.size(); i += kMaxRowsPerTxn) {
        const size_t end = std::min(out_rows.size(), i + kMaxRowsPerTxn);
        LAYER_TRY(pool.committer().run([&](WriteTxn& wtxn) -> Status {
          for (size_t j = i; j < end; ++j)
            LAYER_TRY(
                wtxn.put(Db::kMaps, key_u64_u32(merged, out_rows[j].first), out_rows[j].second));
          return {};
        }));
      }
      return {};
    }();
    if (!built) return build->fail(built.error());
  }
  pool.test_point("merge.built");
  return build;
}

Status switch_merge(Pool& /*pool*/, WriteTxn& txn, const MergePlan& plan, LayerId merged,
                    std::vector<uint64_t>* drops) {
  const LayerRecord& l = plan.parent;
  const LayerRecord& k = plan.child;
  drops->clear();
  LAYER_ASSIGN(auto cur_l, get_layer(txn, l.id));
  LAYER_ASSIGN(auto cur_k, get_layer(txn, k.id));
  if (cur_l.refcount != 1 || cur_k.parent != l.id)
    return make_error(EBUSY, "layers {} and {} changed while merging", l.id, k.id);
  LayerRecord m{merged,           cur_l.parent,     Tier::kSsd,
                cur_k.size_bytes, cur_k.block_size, LayerState::kFrozenUnhashed,
                cur_k.refcount,   now_unix()};
  LAYER_ASSIGN(auto graph, load_graph(txn));
  for (LayerId id : graph.children[k.id]) {
    LayerRecord child = graph.layers[id];
    child.parent = merged;
    LAYER_TRY(put_layer(txn, child));
  }
  std::vector<std::pair<std::string, SnapshotRecord>> snaps;
  LAYER_TRY(
      txn.scan(Db::kSnapshots, "", [&](std::string_view kk, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto rec, decode_snapshot(v, kk));
        if (rec.layer == k.id) snaps.emplace_back(std::string(kk), rec);
        return true;
      }));
  for (auto& [key, rec] : snaps) {
    rec.layer = merged;
    LAYER_TRY(txn.put(Db::kSnapshots, key, encode(rec)));
  }
  std::vector<ImageRecord> images;
  LAYER_TRY(txn.scan(Db::kImages, "", [&](std::string_view kk, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto rec, decode_image(v, kk));
    if (rec.top_layer == k.id) images.push_back(rec);
    return true;
  }));
  for (auto& image : images) {
    image.top_layer = merged;
    LAYER_TRY(txn.put(Db::kImages, image.ref, encode(image)));
  }
  LAYER_TRY(put_layer(txn, m));
  LAYER_TRY(retire_layer(txn, cur_k, drops));
  return retire_layer(txn, cur_l, drops);
}

Result<LayerId> merge_layer(Pool& pool, LayerId layer_id, std::string* why) {
  LAYER_ASSIGN(auto plan, plan_merge(pool, layer_id, why));
  if (!plan) return LayerId{0};
  const LayerRecord& l = plan->parent;
  const LayerRecord& k = plan->child;
  // A server reading either layer holds it shared.
  auto lock_l = pool.locks().try_lock(LockKind::kLayer, l.id, true, fmt::format("layer {}", l.id));
  auto lock_k =
      lock_l ? pool.locks().try_lock(LockKind::kLayer, k.id, true, fmt::format("layer {}", k.id))
             : Result<Lock>(lock_l.error());
  if (!lock_l || !lock_k) {
    const Error& e = !lock_l ? lock_l.error() : lock_k.error();
    if (e.code != EBUSY) return e;
    *why = "a running server reads it; `layer gc` merges it when none does";
    return LayerId{0};
  }

  LAYER_ASSIGN(auto build, build_merge(pool, *plan));
  const LayerId merged = build->id();
  std::vector<uint64_t> drops;
  LAYER_TRY(build->publish(
      [&](WriteTxn& txn) { return switch_merge(pool, txn, *plan, merged, &drops); }));
  pool.test_point("merge.switched");
  LAYER_TRY(
      finish_drops_after_removal(pool, drops, fmt::format("merged layers {} and {}", l.id, k.id)));
  return merged;
}

Result<std::optional<FlatBuild>> build_flat(Pool& pool, std::string_view container) {
  LAYER_TRY(validate_name(container, "container name"));
  FlatBuild fb;
  ContainerRecord& c = fb.container;
  std::vector<LayerRecord> chain;
  std::shared_ptr<const ChainMap> map;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(c, pool.get_container(txn, container));
    LAYER_ASSIGN(fb.delta, get_layer(txn, c.delta_layer));
    if (fb.delta.parent != 0) {
      LAYER_ASSIGN(chain, chain_of(txn, fb.delta.parent));
    }
    LAYER_ASSIGN(map, pool.chains().get(txn, chain));
  }
  if (chain.size() <= 1 && (chain.empty() || chain[0].parent == 0))
    return std::optional<FlatBuild>{};  // already one layer (or none) below the delta
  LAYER_ASSIGN(fb.build, LayerBuild::begin(pool, IntentRecord::Kind::kMerge,
                                           fmt::format("flatten {}", container)));
  LayerBuild* build = fb.build.get();
  const LayerId flat = build->id();
  const uint32_t bs = c.block_size;
  uint64_t& size = fb.size_bytes;
  for (const auto& l : chain) size = std::max(size, l.size_bytes);
  auto built = [&]() -> Status {
    std::vector<std::shared_ptr<LayerFile>> files;
    for (const auto& l : chain) {
      auto f = pool.open_frozen(l);
      if (!f && f.error().code != ENOENT) return std::move(f).error();
      files.push_back(f ? *f : nullptr);
    }
    LAYER_ASSIGN(auto out, build->create_file(Tier::kSsd, size));
    std::vector<uint8_t> buf(1 << 20);
    std::vector<std::pair<uint32_t, std::string>> rows;
    const uint64_t nblocks = map->size_blocks();
    for (uint64_t chunk = 0; chunk * kBlocksPerChunk < nblocks; ++chunk) {
      ChunkBits bits;
      bool any = false;
      const uint64_t first = chunk * kBlocksPerChunk;
      const uint64_t end = std::min<uint64_t>(nblocks, first + kBlocksPerChunk);
      for (uint64_t b = first; b < end;) {
        const Source src = map->lookup(b);
        const uint64_t n = std::max<uint64_t>(1, map->run_length(b, end - b));
        if (src != kSourceZero && src != kSourceAbsent) {
          LayerFile* in = files[src].get();
          if (!in)
            return make_error(EIO, "layer {}: file is missing but holds block {}", chain[src].id,
                              b);
          for (uint64_t done = 0; done < n;) {
            const uint64_t k = std::min<uint64_t>(n - done, buf.size() / bs);
            const uint64_t from = (b + done) * bs;
            const uint64_t len = std::min<uint64_t>(k * bs, size - from);
            LAYER_TRY(in->read(buf.data(), len, from));
            LAYER_TRY(out->write(buf.data(), len, from));
            done += k;
          }
          for (uint64_t i = b; i < b + n; ++i)
            bits.set(static_cast<uint32_t>(i - first), BlockState::kData);
          any = true;
        }
        b += n;
      }
      if (any) rows.emplace_back(static_cast<uint32_t>(chunk), encode_chunk(bits));
    }
    LAYER_TRY(out->sync());
    for (size_t i = 0; i < rows.size(); i += kMaxRowsPerTxn) {
      const size_t e = std::min(rows.size(), i + kMaxRowsPerTxn);
      LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
        for (size_t j = i; j < e; ++j)
          LAYER_TRY(txn.put(Db::kMaps, key_u64_u32(flat, rows[j].first), rows[j].second));
        return {};
      }));
    }
    return {};
  }();
  if (!built) return build->fail(built.error());
  pool.test_point("flatten.built");
  return std::optional<FlatBuild>(std::move(fb));
}

Result<ContainerState> switch_flat(Pool& pool, FlatBuild& fb, std::vector<uint64_t>* drops) {
  ContainerState state;
  const LayerId flat = fb.build->id();
  const std::string container = fb.container.name;
  LAYER_TRY(fb.build->publish([&](WriteTxn& txn) -> Status {
    drops->clear();
    LAYER_ASSIGN(auto cur, pool.get_container(txn, container));
    LAYER_ASSIGN(auto d, get_layer(txn, cur.delta_layer));
    if (cur.delta_layer != fb.delta.id || d.parent != fb.delta.parent)
      return make_error(EBUSY, "container \"{}\" changed while flattening", container);
    LayerRecord f{flat,
                  0,
                  Tier::kSsd,
                  fb.size_bytes,
                  fb.container.block_size,
                  LayerState::kFrozenUnhashed,
                  1,
                  now_unix()};
    LAYER_TRY(put_layer(txn, f));
    LAYER_TRY(drop_layer(txn, d.parent, drops));
    d.parent = flat;
    LAYER_TRY(put_layer(txn, d));
    cur.image_ref.clear();  // it depends on no image any more
    ++cur.generation;
    LAYER_TRY(txn.put(Db::kContainers, cur.name, encode(cur)));
    state = ContainerState{cur, d, {f}};
    return {};
  }));
  return state;
}

Result<ContainerState> flatten_container(Pool& pool, std::string_view container,
                                         std::vector<uint64_t>* drops) {
  LAYER_ASSIGN(auto fb, build_flat(pool, container));
  if (fb) return switch_flat(pool, *fb, drops);
  drops->clear();
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  ContainerState state;
  LAYER_ASSIGN(state.container, pool.get_container(txn, container));
  LAYER_ASSIGN(state.delta, get_layer(txn, state.container.delta_layer));
  if (state.delta.parent != 0) {
    LAYER_ASSIGN(state.chain, chain_of(txn, state.delta.parent));
  }
  return state;
}

Result<GcReport> gc(Pool& pool) {
  GcReport report;
  // Hidden layers: no name, one frozen child. Merged until none is left that can be.
  for (bool progress = true; progress;) {
    progress = false;
    std::vector<LayerId> candidates;
    {
      LAYER_ASSIGN(auto txn, pool.index().begin_read());
      LAYER_ASSIGN(auto graph, load_graph(txn));
      for (const auto& [id, rec] : graph.layers)
        if (rec.state != LayerState::kWritable && rec.refcount == 1 &&
            graph.children[id].size() == 1)
          candidates.push_back(id);
    }
    report.kept.clear();
    for (LayerId id : candidates) {
      std::string why;
      LAYER_ASSIGN(LayerId merged, merge_layer(pool, id, &why));
      if (merged) {
        report.done.push_back(
            fmt::format("layer {}: merged with its child into layer {}", id, merged));
        progress = true;
      } else if (!why.starts_with("the live delta")) {
        report.kept.push_back(fmt::format("layer {}: kept ({})", id, why));
      }
    }
  }
  LAYER_ASSIGN(auto fsck, layer::fsck(pool, false, true));
  for (auto& line : fsck.repaired) report.done.push_back(std::move(line));
  return report;
}

// ---- diff ----

namespace {

struct Point {
  std::string name;
  uint64_t size_bytes = 0;
  uint32_t block_size = 0;
  std::vector<LayerId> layers;  // top first: delta (if live) then the frozen chain
};

Result<Point> resolve_point(Pool& pool, ReadTxn& txn, std::string_view ref) {
  Point p;
  p.name = std::string(ref);
  LAYER_ASSIGN(auto snap, parse_snapshot_ref(ref));
  LayerId top = 0;
  if (snap) {
    LAYER_ASSIGN(auto c, pool.get_container(txn, snap->first));
    LAYER_ASSIGN(auto s, get_snapshot(txn, c, snap->second));
    top = s.layer;
    p.size_bytes = c.size_bytes;
    p.block_size = c.block_size;
  } else {
    LAYER_TRY(validate_name(ref, "container name"));
    LAYER_ASSIGN(auto c, pool.get_container(txn, ref));
    top = c.delta_layer;
    p.size_bytes = c.size_bytes;
    p.block_size = c.block_size;
  }
  LAYER_ASSIGN(auto chain, chain_of(txn, top));
  for (const auto& l : chain) p.layers.push_back(l.id);
  return p;
}

}  // namespace

Result<DiffResult> diff(Pool& pool, std::string_view a_ref, std::string_view b_ref) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto a, resolve_point(pool, txn, a_ref));
  LAYER_ASSIGN(auto b, resolve_point(pool, txn, b_ref));
  if (a.block_size != b.block_size)
    return make_error(EINVAL, "{} and {} have different block sizes ({} and {})", a_ref, b_ref,
                      a.block_size, b.block_size);
  DiffResult out{a.size_bytes, b.size_bytes, a.block_size, {}};
  // The shared bottom of both chains reads the same on both sides.
  size_t shared = 0;
  while (shared < a.layers.size() && shared < b.layers.size() &&
         a.layers[a.layers.size() - 1 - shared] == b.layers[b.layers.size() - 1 - shared])
    ++shared;
  std::vector<LayerId> own_a(a.layers.begin(), a.layers.end() - shared);
  std::vector<LayerId> own_b(b.layers.begin(), b.layers.end() - shared);
  std::map<LayerId, std::map<uint32_t, ChunkBits>> rows;
  std::set<uint32_t> chunks;
  for (const auto* own : {&own_a, &own_b})
    for (LayerId id : *own) {
      if (rows.count(id)) continue;
      LAYER_ASSIGN(rows[id], load_rows(txn, id));
      for (const auto& [c, _] : rows[id]) chunks.insert(c);
    }
  // A block's source on one side: the first of its own layers that says something about it
  // (a layer id, or kZeroes for a tombstone), else 0 (the shared bottom, the same on both
  // sides). Layer ids start at 1 and never reach UINT64_MAX.
  constexpr LayerId kZeroes = UINT64_MAX;
  auto source = [&](const std::vector<LayerId>& own, uint32_t c, uint32_t i) -> LayerId {
    for (LayerId id : own) {
      const auto& r = rows[id];
      auto it = r.find(c);
      if (it == r.end()) continue;
      const BlockState s = it->second.get(i);
      if (s == BlockState::kData) return id;
      if (s == BlockState::kZero) return kZeroes;
    }
    return 0;
  };
  const uint64_t bs = a.block_size;
  const uint64_t max_size = std::max(a.size_bytes, b.size_bytes);
  auto add = [&](uint64_t from, uint64_t to) {
    to = std::min(to, max_size);
    if (from >= to) return;
    if (!out.ranges.empty() && out.ranges.back().first + out.ranges.back().second == from)
      out.ranges.back().second += to - from;
    else
      out.ranges.emplace_back(from, to - from);
  };
  for (uint32_t c : chunks)
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
      const uint64_t block = uint64_t{c} * kBlocksPerChunk + i;
      if (block * bs >= max_size) break;
      const LayerId sa = source(own_a, c, i), sb = source(own_b, c, i);
      if (sa != sb) add(block * bs, (block + 1) * bs);
    }
  // A size difference: the tail beyond the smaller disk differs unless it reads as zeroes on
  // the larger side, which the chunks above already decided block by block for written ones.
  return out;
}

Result<std::vector<ImageRecord>> image_history(Pool& pool, std::string_view image_ref) {
  LAYER_TRY(validate_image_ref(image_ref));
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto v, txn.get(Db::kImages, image_ref));
  if (!v) return make_error(ENOENT, "image {} not found in pool {}", image_ref, pool.paths().root);
  LAYER_ASSIGN(auto image, decode_image(*v, image_ref));
  std::multimap<LayerId, ImageRecord> by_top;
  LAYER_TRY(
      txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view val) -> Result<bool> {
        LAYER_ASSIGN(auto rec, decode_image(val, k));
        by_top.emplace(rec.top_layer, rec);
        return true;
      }));
  std::vector<ImageRecord> out;
  LAYER_ASSIGN(auto chain, chain_of(txn, image.top_layer));
  for (const auto& l : chain) {
    auto [lo, hi] = by_top.equal_range(l.id);
    if (l.id == image.top_layer) {
      out.push_back(image);
      continue;
    }
    for (auto it = lo; it != hi; ++it) out.push_back(it->second);
  }
  return out;
}

}  // namespace layer
