// fsck.cc — fsck: the index checked against itself and against the layer files, in phases.
//
// Checks, each problem one line naming the object:
// - every record decodes; every parent, image top and container delta exists; chains end;
// - refcounts equal the references found (child layers, images, containers, snapshots);
// - every map row belongs to a known layer, decodes and lies within the layer's size; every
//   sums and heat row belongs to a known layer; heat rows and the tier policy decode;
// - every layer with data rows has its file, and every existing file has the layer's size
//   (a writable delta's, or a frozen layer's that was one, may also hold a journal zone);
// - files in the tier directories that no layer names (orphans; --repair moves them to
//   POOL/lost+found/, and removes leftovers of unfinished creates);
// - refcounts (--repair sets them to the references found, except to 0);
// - interrupted imports and merges left in `intents` (--repair rolls them back);
// - with full: every stored 64 KiB checksum of a frozen layer matches its data, and every
//   group of a frozen layer that holds data has a checksum;
// - containers an index restore marked (their delta holds writes the restored copy does not
//   know; --repair adopts them into the map), and, once none is left, --repair settles the
//   restore (index_restore.h).
// The index itself is read through first, in a child process (index_check.h), by the CLI:
// a damaged index crashes that child, not fsck.
// Read-only unless repair: it never changes a layer that is in use.
//
// The phases run in this order (fsck() below): the index, read in one transaction (layers,
// images, containers, snapshots, refcounts, map rows, intents, leaked rows, checksum rows);
// then the files (sizes, orphans); then, when full, the checksums; then, with repair, the
// repairs. Each phase adds to one FsckState.
#include "fsck.h"

#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include "block_map.h"
#include "checksum.h"
#include "index_restore.h"
#include "intents.h"
#include "journal.h"
#include "layers.h"
#include "tier.h"

namespace layer {

namespace {

struct LayerFacts {
  LayerRecord rec;
  uint32_t refs = 0;
  uint64_t data_blocks = 0;
  std::set<uint64_t> data_groups;  // 64 KiB groups holding data (frozen layers only)
};

// A layer file (or unfinished create) in a tier that no layer of fsck's view names.
struct OrphanFile {
  Tier tier;
  LayerStore::Entry entry;
};

// An intent that waits for a repair.
struct PendingIntent {
  uint64_t id;
  IntentRecord intent;
  IntentKindInfo info;
};

// What the phases have found so far.
struct FsckState {
  FsckState(Pool& p, bool f, bool r) : pool(p), full(f), repair(r) {}
  Pool& pool;
  const bool full, repair;
  FsckReport report;
  std::map<LayerId, LayerFacts> layers;
  std::set<uint64_t> container_ids;
  std::vector<PendingIntent> to_roll_back;  // interrupted builds (their layer is unlocked)
  std::vector<PendingIntent> to_finish;     // unfinished removals
  std::map<LayerId, Tier> intent_files;     // files an intent accounts for
  std::set<LayerId> intent_layers;          // layers of every intent, running or interrupted
  std::map<LayerId, std::map<uint32_t, std::vector<uint64_t>>> sums;  // full only
  std::vector<OrphanFile> orphans;
  std::vector<StaleRecord> stale;         // containers a restore marked
  std::optional<RestoreRecord> restored;  // the index was restored from a copy
  std::set<LayerId> journaled;            // layers with a journal row (journal.h)

  void problem(std::string line) { report.problems.push_back(std::move(line)); }
};

// Every `layers` row; each parent exists, is frozen, has the same block size, and gains a
// reference.
Status read_layers(FsckState& st, ReadTxn& txn) {
  LAYER_TRY(txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k);
    if (!id) {
      st.problem(fmt::format("layers: key of {} bytes", k.size()));
      return true;
    }
    auto rec = decode_layer(v, *id);
    if (!rec)
      st.problem(rec.error().message);
    else
      st.layers[*id].rec = *rec;
    return true;
  }));
  st.report.layers = st.layers.size();
  for (auto& [id, f] : st.layers) {
    if (f.rec.parent == 0) continue;
    auto parent = st.layers.find(f.rec.parent);
    if (parent == st.layers.end()) {
      st.problem(fmt::format("layer {}: parent layer {} is missing", id, f.rec.parent));
      continue;
    }
    ++parent->second.refs;
    if (parent->second.rec.state == LayerState::kWritable)
      st.problem(fmt::format("layer {}: parent layer {} is writable", id, f.rec.parent));
    if (parent->second.rec.block_size != f.rec.block_size)
      st.problem(fmt::format("layer {}: block size {} differs from parent {}'s {}", id,
                             f.rec.block_size, f.rec.parent, parent->second.rec.block_size));
  }
  return {};
}

// Counts a reference from `owner` ("image debian:12") to its `role` ("layer", "delta layer")
// `id`, which must exist and be writable exactly when `writable`. Returns the layer's facts, or
// nullptr when it is missing (reported).
LayerFacts* add_reference(FsckState& st, const std::string& owner, std::string_view role,
                          LayerId id, bool writable) {
  auto it = st.layers.find(id);
  if (it == st.layers.end()) {
    st.problem(fmt::format("{}: {} {} is missing", owner, role, id));
    return nullptr;
  }
  ++it->second.refs;
  if ((it->second.rec.state == LayerState::kWritable) != writable)
    st.problem(
        fmt::format("{}: {} {} is {}", owner, role, id, writable ? "not writable" : "writable"));
  return &it->second;
}

// Every image names an existing frozen layer, which gains a reference.
Status check_images(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    ++st.report.images;
    auto image = decode_image(v, k);
    if (!image) {
      st.problem(image.error().message);
      return true;
    }
    add_reference(st, fmt::format("image {}", k), "layer", image->top_layer, false);
    return true;
  });
}

// Every container's delta exists, is writable, has the container's size and gains a
// reference; its chain ends.
Status check_containers(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    ++st.report.containers;
    auto c = decode_container(v, k);
    if (!c) {
      st.problem(c.error().message);
      return true;
    }
    const LayerFacts* delta =
        add_reference(st, fmt::format("container {}", k), "delta layer", c->delta_layer, true);
    if (!delta) return true;
    if (delta->rec.size_bytes != c->size_bytes)
      st.problem(fmt::format("container {}: size {} differs from its delta's {}", k, c->size_bytes,
                             delta->rec.size_bytes));
    auto chain = chain_of(txn, c->delta_layer);
    if (!chain) st.problem(fmt::format("container {}: {}", k, chain.error().message));
    st.container_ids.insert(c->id);
    return true;
  });
}

// Every snapshot belongs to a container and names an existing frozen layer, which gains a
// reference.
Status check_snapshots(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto s = decode_snapshot(v, k);
    if (!s) {
      st.problem(s.error().message);
      return true;
    }
    if (!st.container_ids.count(s->container_id) || k != snapshot_key(s->container_id, s->name))
      st.problem(fmt::format("snapshot {} (layer {}): its container {} is missing", s->name,
                             s->layer, s->container_id));
    add_reference(st, fmt::format("snapshot {}", s->name), "layer", s->layer, false);
    return true;
  });
}

// Each layer's refcount equals the references the phases above found.
void check_refcounts(FsckState& st) {
  for (auto& [id, f] : st.layers) {
    if (f.refs != f.rec.refcount)
      st.problem(fmt::format("layer {}: refcount is {}, but {} references were found", id,
                             f.rec.refcount, f.refs));
    if (f.refs == 0) st.problem(fmt::format("layer {}: nothing refers to it (leaked)", id));
  }
}

// Every map row of a known layer decodes and lies within the layer's size; counts each
// layer's data blocks and, when full, the 64 KiB groups of frozen layers that hold data.
Status check_map_rows(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    ++st.report.map_rows;
    auto key = decode_key_u64_u32(k);
    if (!key) {
      st.problem(fmt::format("maps: key of {} bytes", k.size()));
      return true;
    }
    auto [id, chunk] = *key;
    auto it = st.layers.find(id);
    if (it == st.layers.end()) return true;  // find_leaked_rows, unless an intent names it
    LayerFacts& f = it->second;
    auto bits = decode_chunk(v);
    if (!bits) {
      st.problem(fmt::format("layer {} chunk {}: {}", id, chunk, bits.error().message));
      return true;
    }
    const uint64_t size_blocks = (f.rec.size_bytes + f.rec.block_size - 1) / f.rec.block_size;
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
      if (bits->get(i) != BlockState::kData) continue;
      const uint64_t b = uint64_t{chunk} * kBlocksPerChunk + i;
      if (b >= size_blocks) {
        st.problem(fmt::format("layer {}: block {} is beyond its size", id, b));
        break;
      }
      ++f.data_blocks;
      if (st.full && f.rec.state == LayerState::kFrozen) {
        const uint64_t first = b * f.rec.block_size / kSumGroupBytes;
        const uint64_t end = std::min<uint64_t>((b + 1) * f.rec.block_size, f.rec.size_bytes);
        for (uint64_t g = first; g * kSumGroupBytes < end; ++g) f.data_groups.insert(g);
      }
    }
    return true;
  });
}

// Every intent: the layer and file it accounts for, and whether it waits for a repair (each
// kind's recovery, intents.h): unfinished removals; interrupted builds, i.e. those whose layer
// is unlocked.
Status read_intents(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kIntents, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k).value_or(0);
    auto intent = decode_intent(v, id);
    if (!intent) {
      st.problem(intent.error().message);
      return true;
    }
    st.intent_layers.insert(intent->layer);
    auto info = intent_kind_info(id, *intent);
    if (!info) {
      st.problem(info.error().message);
      return true;
    }
    const IntentRecovery& recovery = *info->recovery;
    auto tier = recovery.file_tier(id, *intent);
    if (!tier) {
      st.problem(tier.error().message);
      return true;
    }
    st.intent_files[intent->layer] = *tier;
    if (recovery.direction == IntentRecovery::Direction::kFinish) {
      if (recovery.running_lock) {  // running (a move), not interrupted: leave it alone
        LAYER_ASSIGN(const bool running,
                     st.pool.locks().is_locked(*recovery.running_lock, intent->layer));
        if (running) return true;
      }
      if (!st.repair)
        st.problem(fmt::format(
            "unfinished {} (intent {}): run `layer fsck --repair` or any command that opens the "
            "pool for writing",
            info->what, id));
      st.to_finish.push_back(PendingIntent{id, *intent, std::move(*info)});
      return true;
    }
    // A build still running holds its layer's lock: not interrupted, leave it alone.
    LAYER_ASSIGN(const bool running, st.pool.locks().is_locked(LockKind::kLayer, intent->layer));
    if (running) return true;
    if (!st.repair)
      st.problem(fmt::format(
          "interrupted {} (intent {}, layer {}): run `layer fsck --repair` to roll it back",
          info->what, id, intent->layer));
    st.to_roll_back.push_back(PendingIntent{id, *intent, std::move(*info)});
    return true;
  });
}

// Map rows whose layer is unknown and not an intent's (a build in progress) are leaks.
Status find_leaked_rows(FsckState& st, ReadTxn& txn) {
  std::set<LayerId> leaked;
  LAYER_TRY(txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view) -> Result<bool> {
    auto key = decode_key_u64_u32(k);
    if (key && !st.layers.count(key->first) && !st.intent_layers.count(key->first))
      leaked.insert(key->first);
    return true;
  }));
  for (LayerId id : leaked) st.problem(fmt::format("maps: rows of unknown layer {}", id));
  leaked.clear();
  LAYER_TRY(txn.scan(Db::kSums, "", [&](std::string_view k, std::string_view) -> Result<bool> {
    auto key = decode_key_u64_u32(k);
    if (key && !st.layers.count(key->first) && !st.intent_layers.count(key->first))
      leaked.insert(key->first);
    return true;
  }));
  for (LayerId id : leaked) st.problem(fmt::format("sums: rows of unknown layer {}", id));
  // Heat rows go in the transaction that takes their layer's row (and are written only where
  // the layer's row is): one without its layer, or one that does not decode, is a problem.
  LAYER_TRY(txn.scan(Db::kHeat, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k);
    if (!id) {
      st.problem(fmt::format("heat: a key of {} bytes", k.size()));
    } else if (!st.layers.count(*id)) {
      st.problem(fmt::format("heat: row of unknown layer {}", *id));
    } else if (auto h = decode_heat(v, *id); !h) {
      st.problem(h.error().message);
    }
    return true;
  }));
  // Journal rows go with their layer's row too (retire_layer).
  LAYER_TRY(txn.scan(Db::kMeta, journal::kKeyPrefix,
                     [&](std::string_view k, std::string_view v) -> Result<bool> {
                       auto id = decode_key_u64(k.substr(journal::kKeyPrefix.size()));
                       if (!id) {
                         st.problem(fmt::format("meta: a journal key of {} bytes", k.size()));
                       } else if (!st.layers.count(*id)) {
                         st.problem(fmt::format("meta: journal row of unknown layer {}", *id));
                       } else if (auto s = journal::decode_state(v); !s) {
                         st.problem(fmt::format("layer {}: {}", *id, s.error().message));
                       } else {
                         st.journaled.insert(*id);
                       }
                       return true;
                     }));
  if (auto policy = load_tier_policy(txn); !policy) st.problem(policy.error().message);
  return {};
}

// Every `sums` row, decoded, for verify_checksums.
Status read_sums(FsckState& st, ReadTxn& txn) {
  return txn.scan(Db::kSums, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto key = decode_key_u64_u32(k);
    if (!key) return true;
    auto s = decode_sums(v);
    if (!s)
      st.problem(
          fmt::format("layer {} sums row {}: {}", key->first, key->second, s.error().message));
    else
      st.sums[key->first][key->second] = *s;
    return true;
  });
}

// The marks an index restore left, one problem each.
Status read_restore(FsckState& st, ReadTxn& txn) {
  LAYER_ASSIGN(st.restored, get_restore(txn));
  LAYER_ASSIGN(st.stale, stale_marks(txn));
  if (st.repair) return {};
  for (const auto& m : st.stale)
    st.problem(fmt::format(
        "container {}: its delta (layer {}) holds {} blocks written after the index copy {} the "
        "index was restored from; it is not served until `layer fsck --repair` adopts them",
        m.container, m.delta, m.blocks, m.backup));
  return {};
}

// The index phases, all in one read transaction (one consistent view).
Status scan_index(FsckState& st) {
  LAYER_ASSIGN(auto txn, st.pool.index().begin_read());
  LAYER_TRY(read_layers(st, txn));
  LAYER_TRY(check_images(st, txn));
  LAYER_TRY(check_containers(st, txn));
  LAYER_TRY(check_snapshots(st, txn));
  check_refcounts(st);
  LAYER_TRY(check_map_rows(st, txn));
  LAYER_TRY(read_intents(st, txn));
  LAYER_TRY(find_leaked_rows(st, txn));
  if (st.full) LAYER_TRY(read_sums(st, txn));
  LAYER_TRY(read_restore(st, txn));
  return {};
}

// Each layer's file, in its tier's store: present when the index has data blocks in it, and
// of the layer's size when present.
void check_files(FsckState& st) {
  for (auto& [id, f] : st.layers) {
    const std::string path = st.pool.layer_path(f.rec);
    auto size = st.pool.store(f.rec.tier).stat(id);
    if (!size) {
      st.problem(fmt::format("layer {}: {}", id, size.error().message));
      continue;
    }
    if (!*size) {
      if (f.data_blocks > 0)
        st.problem(fmt::format("layer {}: file {} is missing, the index has {} data blocks in it",
                               id, path, f.data_blocks));
      continue;
    }
    // A delta's file also holds its journal's zone past the disk's end (journal.h); a frozen
    // layer keeps the (punched) zone of the delta it was.
    if (**size < f.rec.size_bytes ||
        (**size > f.rec.size_bytes &&
         (!st.journaled.count(id) || **size > journal::max_file_size(f.rec.size_bytes))))
      st.problem(fmt::format("layer {}: file {} is {} bytes, index says {}", id, path, **size,
                             f.rec.size_bytes));
  }
}

// The orphan candidates that a fresh transaction and the layer locks still call orphans.
Result<std::vector<OrphanFile>> confirm_orphans(Pool& pool,
                                                const std::vector<OrphanFile>& candidates) {
  std::vector<OrphanFile> orphans;
  if (candidates.empty()) return orphans;
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  std::set<LayerId> intent_layers;
  LAYER_TRY(txn.scan(Db::kIntents, "", [&](std::string_view, std::string_view v) -> Result<bool> {
    if (auto intent = decode_intent(v, 0)) intent_layers.insert(intent->layer);
    return true;
  }));
  for (const auto& o : candidates) {
    const LayerId id = o.entry.id;
    // Files are created only after the row or intent naming them committed, so a fresh
    // transaction sees whatever made a file that the scan's older view did not know.
    bool keep = false;
    LAYER_ASSIGN(auto row, txn.get(Db::kLayers, key_u64(id)));
    if (row) {
      LAYER_ASSIGN(auto rec, decode_layer(*row, id));
      keep = rec.tier == o.tier;  // its own file; a copy in another tier is a leftover
    }
    if (intent_layers.count(id)) keep = true;
    // Work in progress on the layer (a Disk on its delta, an import, a move) holds its lock.
    LAYER_ASSIGN(const bool locked, pool.locks().is_locked(LockKind::kLayer, id));
    if (locked) keep = true;
    if (!keep) orphans.push_back(o);
  }
  return orphans;
}

// Files in the tiers that neither a layer nor an intent of the scan names, confirmed in a
// fresh transaction (the scan's view is older than the listing).
Status find_orphans(FsckState& st) {
  std::set<std::pair<Tier, LayerId>> named;
  for (const auto& [id, f] : st.layers) named.insert({f.rec.tier, id});
  for (const auto& [id, tier] : st.intent_files) named.insert({tier, id});
  std::vector<OrphanFile> candidates;
  for (const Tier tier : {Tier::kSsd, Tier::kHdd}) {
    auto entries = st.pool.store(tier).list();
    if (!entries) {
      st.problem(
          fmt::format("tier {} cannot be read: {}", to_string(tier), entries.error().message));
      continue;
    }
    for (auto& e : *entries)
      if (!named.count({tier, e.id})) candidates.push_back(OrphanFile{tier, std::move(e)});
  }
  LAYER_ASSIGN(st.orphans, confirm_orphans(st.pool, candidates));
  if (!st.repair)
    for (const auto& o : st.orphans)
      st.problem(fmt::format(
          "orphan file {}: no layer names it{}; `layer fsck --repair` moves it to lost+found",
          o.entry.name,
          st.restored && o.entry.id >= st.restored->first_unknown_layer
              ? " (made after the index copy the index was restored from: it may hold writes "
                "of a container that copy does not know)"
              : ""));
  return {};
}

// Full only: every frozen layer's group holding data has a checksum, and every checksum
// matches the data in the layer's file.
void verify_checksums(FsckState& st) {
  std::vector<uint8_t> buf(kSumGroupBytes);
  for (auto& [id, f] : st.layers) {
    if (f.rec.state != LayerState::kFrozen) continue;
    auto& rows = st.sums[id];
    auto sum_of = [&](uint64_t g) -> uint64_t {
      auto it = rows.find(static_cast<uint32_t>(g / kSumsPerRow));
      if (it == rows.end() || g % kSumsPerRow >= it->second.size()) return 0;
      return it->second[g % kSumsPerRow];
    };
    for (uint64_t g : f.data_groups)
      if (sum_of(g) == 0)
        st.problem(
            fmt::format("layer {}: no checksum for data at offset {}", id, g * kSumGroupBytes));
    if (rows.empty()) continue;
    auto file = st.pool.store(f.rec.tier).open(id, false);
    if (!file) continue;  // reported by check_files when it matters
    for (const auto& [row, v] : rows) {
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] == 0) continue;
        const uint64_t g = uint64_t{row} * kSumsPerRow + i;
        const uint64_t off = g * kSumGroupBytes;
        if (off >= f.rec.size_bytes) {
          st.problem(fmt::format("layer {}: checksum for offset {} beyond its size", id, off));
          continue;
        }
        const uint64_t len = std::min<uint64_t>(kSumGroupBytes, f.rec.size_bytes - off);
        auto r = (*file)->read(buf.data(), len, off);
        if (!r) {
          st.problem(fmt::format("layer {}: {}", id, r.error().message));
          continue;
        }
        ++st.report.groups_verified;
        const uint64_t got = group_checksum(buf.data(), len);
        if (got != v[i])
          st.problem(
              fmt::format("layer {}: checksum mismatch at offset {} (index says {:016x}, "
                          "data hashes to {:016x})",
                          id, off, v[i], got));
      }
    }
  }
}

// Sets each layer's refcount to the references a fresh scan finds, in one transaction (so
// no change can slip between the count and the write). A layer no one references keeps its
// count and is reported: its data is left for the operator (`layer gc` does not drop it).
Status repair_refcounts(FsckState& st) {
  std::set<LayerId> wrong;
  for (const auto& [id, f] : st.layers)
    if (f.refs != f.rec.refcount) wrong.insert(id);
  if (wrong.empty()) return {};
  std::vector<std::string> fixed, kept;
  LAYER_TRY(st.pool.committer().run([&](WriteTxn& txn) -> Status {
    fixed.clear();
    kept.clear();
    std::map<LayerId, uint32_t> refs;
    LAYER_TRY(
        txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto id = decode_key_u64(k);
          if (!id) return true;
          LAYER_ASSIGN(auto rec, decode_layer(v, *id));
          if (rec.parent != 0) ++refs[rec.parent];
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto image, decode_image(v, k));
          ++refs[image.top_layer];
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto c, decode_container(v, k));
          ++refs[c.delta_layer];
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto snap, decode_snapshot(v, k));
          ++refs[snap.layer];
          return true;
        }));
    for (LayerId id : wrong) {
      LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
      if (!v) continue;  // dropped meanwhile
      LAYER_ASSIGN(auto rec, decode_layer(*v, id));
      const uint32_t found = refs.count(id) ? refs[id] : 0;
      if (found == rec.refcount) continue;  // fixed meanwhile
      if (found == 0) {
        kept.push_back(fmt::format(
            "layer {}: refcount is {}, but nothing references it; left as it is (its data may "
            "be needed: clone or commit from it, or remove its file by hand)",
            id, rec.refcount));
        continue;
      }
      fixed.push_back(fmt::format("layer {}: refcount {} set to {}", id, rec.refcount, found));
      rec.refcount = found;
      LAYER_TRY(txn.put(Db::kLayers, key_u64(id), encode(rec)));
    }
    return Status{};
  }));
  // The problems found by the scan are replaced by what the repair did.
  auto& problems = st.report.problems;
  problems.erase(std::remove_if(problems.begin(), problems.end(),
                                [&](const std::string& p) {
                                  return p.find(": refcount is ") != std::string::npos &&
                                         p.find("references were found") != std::string::npos;
                                }),
                 problems.end());
  for (auto& f : fixed) st.report.repaired.push_back(std::move(f));
  for (auto& k : kept) st.problem(std::move(k));
  return {};
}

// Rolls back interrupted imports and merges, finishes removals, sets orphan files aside and
// corrects refcounts.
// Everything the scan found is a view from before it: each change re-checks its candidate
// in a fresh transaction and under the layer's lock, so work that started meanwhile (an
// import, a clone's first write) is never undone.
Status run_repairs(FsckState& st) {
  for (const auto& p : st.to_roll_back) {
    LAYER_ASSIGN(bool rolled_back, p.info.recovery->recover(st.pool, p.id, p.intent));
    // Not rolled back: it resumed, finished or was rolled back by someone else meanwhile,
    // none of which is a problem.
    if (rolled_back)
      st.report.repaired.push_back(fmt::format("interrupted {} (intent {}, layer {}): rolled back",
                                               p.info.what, p.id, p.intent.layer));
  }
  // One removal that cannot be finished (an unlink refused, say) must not stop the others
  // or the orphan cleanup: it is reported and stays for a later run.
  for (const auto& p : st.to_finish) {
    auto done = p.info.recovery->recover(st.pool, p.id, p.intent);
    if (!done)
      st.problem(fmt::format("unfinished {} (intent {}) could not be finished: {}", p.info.name,
                             p.id, done.error().message));
    else if (*done)  // false: left alone (a mover took it up again, or another process did it)
      st.report.repaired.push_back(
          fmt::format("unfinished {} (intent {}): finished", p.info.name, p.id));
  }
  // Confirmed once more just before: a file made before the first confirmation has its row
  // or intent committed by then, so what is still an orphan stays one.
  LAYER_ASSIGN(st.orphans, confirm_orphans(st.pool, st.orphans));
  // An unfinished create holds nothing; a whole layer file might (an index restored from an
  // older copy no longer names a container's delta): it is set aside, never deleted.
  const std::string lost = st.pool.paths().root + "/lost+found";
  for (const auto& o : st.orphans) {
    if (o.entry.unfinished) {
      LAYER_TRY(st.pool.store(o.tier).remove(o.entry.id));
      st.report.repaired.push_back(fmt::format("orphan file {}: removed", o.entry.name));
      continue;
    }
    LAYER_ASSIGN(const std::string to, st.pool.store(o.tier).set_aside(o.entry.id, lost));
    st.report.repaired.push_back(
        fmt::format("orphan file {}: moved to {} (remove it when no one needs it)", o.entry.name,
                    to.empty() ? std::string("(gone meanwhile)") : to));
  }
  LAYER_TRY(repair_refcounts(st));
  // A restore's marks: the writes the copy did not know become part of the map.
  for (const auto& m : st.stale) {
    auto adopted = adopt_unmapped_writes(st.pool, m);
    if (!adopted) {
      st.problem(fmt::format("container {}: its newer writes could not be adopted: {}", m.container,
                             adopted.error().message));
      continue;
    }
    st.report.repaired.push_back(fmt::format(
        "container {}: adopted {} blocks its delta (layer {}) holds beyond the restored map",
        m.container, *adopted, m.delta));
  }
  if (st.restored) {
    LAYER_ASSIGN(const bool settled, settle_restore(st.pool));
    if (settled)
      st.report.repaired.push_back(
          fmt::format("the restore of the index from copy {} is settled (no container is marked)",
                      st.restored->backup));
  }
  return {};
}

}  // namespace

Result<FsckReport> fsck(Pool& pool, bool full, bool repair) {
  if (repair) LAYER_TRY(pool.check_writable());
  FsckState st(pool, full, repair);
  LAYER_TRY(scan_index(st));
  pool.test_point("fsck.index_scanned");
  check_files(st);
  LAYER_TRY(find_orphans(st));
  if (full) verify_checksums(st);
  pool.test_point("fsck.scanned");
  if (repair) LAYER_TRY(run_repairs(st));
  return std::move(st.report);
}

}  // namespace layer
