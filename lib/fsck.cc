// fsck.cc — Pool::fsck: the index checked against itself and against the layer files.
//
// Checks, each problem one line naming the object:
// - every record decodes; every parent, image top and container delta exists; chains end;
// - refcounts equal the references found (child layers, images, containers, snapshots);
// - every map row belongs to a known layer, decodes and lies within the layer's size;
// - every layer with data rows has its file, and every existing file has the layer's size;
// - files in the tier directories that no layer names (orphans; --repair removes them);
// - interrupted imports and merges left in `intents` (--repair rolls them back);
// - with full: every stored 64 KiB checksum of a frozen layer matches its data, and every
//   group of a frozen layer that holds data has a checksum.
// Read-only unless repair: it never changes a layer that is in use.
#include <sys/stat.h>

#include <cstring>

#include <map>
#include <set>

#include "block_map.h"
#include "checksum.h"
#include "layers.h"
#include "pool.h"
#include "snapshots.h"

namespace layer {

namespace {

struct LayerFacts {
  LayerRecord rec;
  uint32_t refs = 0;
  uint64_t data_blocks = 0;
  std::set<uint64_t> data_groups;  // 64 KiB groups holding data (frozen layers only)
};

std::string describe_intent(const IntentRecord& intent) {
  if (intent.kind == IntentRecord::Kind::kMerge)
    return fmt::format("merge of layers {}", intent.target);
  return fmt::format("import of {}", intent.target);
}

}  // namespace

Result<FsckReport> Pool::fsck(bool full, bool repair) {
  if (repair && read_only_) return make_error(EACCES, "pool {} is open read-only", paths_.root);
  FsckReport report;
  auto problem = [&](std::string line) { report.problems.push_back(std::move(line)); };
  std::map<LayerId, LayerFacts> layers;
  std::vector<std::pair<uint64_t, IntentRecord>> stale_imports;  // intent id, intent
  std::vector<uint64_t> drops;                                   // drop intent ids
  std::map<LayerId, Tier> intent_files;                          // files an intent accounts for
  std::map<LayerId, std::map<uint32_t, std::vector<uint64_t>>> sums;
  std::set<LayerId> importing;  // layers of every intent, running or interrupted
  std::set<uint64_t> container_ids;
  {
    LAYER_ASSIGN(auto txn, index_->begin_read());
    LAYER_TRY(
        txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto id = decode_key_u64(k);
          if (!id) {
            problem(fmt::format("layers: key of {} bytes", k.size()));
            return true;
          }
          auto rec = decode_layer(v, *id);
          if (!rec)
            problem(rec.error().message);
          else
            layers[*id].rec = *rec;
          return true;
        }));
    report.layers = layers.size();
    for (auto& [id, f] : layers) {
      if (f.rec.parent == 0) continue;
      auto parent = layers.find(f.rec.parent);
      if (parent == layers.end()) {
        problem(fmt::format("layer {}: parent layer {} is missing", id, f.rec.parent));
        continue;
      }
      ++parent->second.refs;
      if (parent->second.rec.state == LayerState::kWritable)
        problem(fmt::format("layer {}: parent layer {} is writable", id, f.rec.parent));
      if (parent->second.rec.block_size != f.rec.block_size)
        problem(fmt::format("layer {}: block size {} differs from parent {}'s {}", id,
                            f.rec.block_size, f.rec.parent, parent->second.rec.block_size));
    }
    LAYER_TRY(
        txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          ++report.images;
          auto image = decode_image(v, k);
          if (!image) {
            problem(image.error().message);
            return true;
          }
          auto it = layers.find(image->top_layer);
          if (it == layers.end()) {
            problem(fmt::format("image {}: layer {} is missing", k, image->top_layer));
            return true;
          }
          ++it->second.refs;
          if (it->second.rec.state == LayerState::kWritable)
            problem(fmt::format("image {}: layer {} is writable", k, image->top_layer));
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          ++report.containers;
          auto c = decode_container(v, k);
          if (!c) {
            problem(c.error().message);
            return true;
          }
          auto it = layers.find(c->delta_layer);
          if (it == layers.end()) {
            problem(fmt::format("container {}: delta layer {} is missing", k, c->delta_layer));
            return true;
          }
          ++it->second.refs;
          if (it->second.rec.state != LayerState::kWritable)
            problem(fmt::format("container {}: delta layer {} is not writable", k, c->delta_layer));
          if (it->second.rec.size_bytes != c->size_bytes)
            problem(fmt::format("container {}: size {} differs from its delta's {}", k,
                                c->size_bytes, it->second.rec.size_bytes));
          auto chain = chain_of(txn, c->delta_layer);
          if (!chain) problem(fmt::format("container {}: {}", k, chain.error().message));
          container_ids.insert(c->id);
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto s = decode_snapshot(v, k);
          if (!s) {
            problem(s.error().message);
            return true;
          }
          if (!container_ids.count(s->container_id) || k != snapshot_key(s->container_id, s->name))
            problem(fmt::format("snapshot {} (layer {}): its container {} is missing", s->name,
                                s->layer, s->container_id));
          auto it = layers.find(s->layer);
          if (it == layers.end()) {
            problem(fmt::format("snapshot {}: layer {} is missing", s->name, s->layer));
            return true;
          }
          ++it->second.refs;
          if (it->second.rec.state == LayerState::kWritable)
            problem(fmt::format("snapshot {}: layer {} is writable", s->name, s->layer));
          return true;
        }));
    for (auto& [id, f] : layers) {
      if (f.refs != f.rec.refcount)
        problem(fmt::format("layer {}: refcount is {}, but {} references were found", id,
                            f.rec.refcount, f.refs));
      if (f.refs == 0) problem(fmt::format("layer {}: nothing refers to it (leaked)", id));
    }
    LAYER_TRY(txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
      ++report.map_rows;
      auto key = decode_key_u64_u32(k);
      if (!key) {
        problem(fmt::format("maps: key of {} bytes", k.size()));
        return true;
      }
      auto [id, chunk] = *key;
      auto it = layers.find(id);
      if (it == layers.end()) return true;  // reported below unless an import is pending
      LayerFacts& f = it->second;
      auto bits = decode_chunk(v);
      if (!bits) {
        problem(fmt::format("layer {} chunk {}: {}", id, chunk, bits.error().message));
        return true;
      }
      const uint64_t size_blocks = (f.rec.size_bytes + f.rec.block_size - 1) / f.rec.block_size;
      for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
        if (bits->get(i) != BlockState::kData) continue;
        const uint64_t b = uint64_t{chunk} * kBlocksPerChunk + i;
        if (b >= size_blocks) {
          problem(fmt::format("layer {}: block {} is beyond its size", id, b));
          break;
        }
        ++f.data_blocks;
        if (full && f.rec.state == LayerState::kFrozen) {
          const uint64_t first = b * f.rec.block_size / kSumGroupBytes;
          const uint64_t end = std::min<uint64_t>((b + 1) * f.rec.block_size, f.rec.size_bytes);
          for (uint64_t g = first; g * kSumGroupBytes < end; ++g) f.data_groups.insert(g);
        }
      }
      return true;
    }));
    // Map rows whose layer is unknown and not an import in progress are leaks.
    LAYER_TRY(
        txn.scan(Db::kIntents, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          auto id = decode_key_u64(k).value_or(0);
          auto intent = decode_intent(v, id);
          if (!intent) {
            problem(intent.error().message);
            return true;
          }
          importing.insert(intent->layer);
          if (intent->kind == IntentRecord::Kind::kDrop) {
            auto tier = parse_tier(intent->target);
            if (!tier) {
              problem(fmt::format("intent {}: {}", id, tier.error().message));
              return true;
            }
            intent_files[intent->layer] = *tier;
            drops.push_back(id);
            if (!repair)
              problem(
                  fmt::format("unfinished removal of layer {} (intent {}): run `layer fsck "
                              "--repair` or any command that opens the pool for writing",
                              intent->layer, id));
            return true;
          }
          intent_files[intent->layer] = Tier::kSsd;
          // An import still running holds its layer's lock: not interrupted, leave it alone.
          LAYER_ASSIGN(const bool running, locks_->is_locked(LockKind::kLayer, intent->layer));
          if (running) return true;
          stale_imports.emplace_back(id, *intent);
          if (!repair)
            problem(fmt::format(
                "interrupted {} (intent {}, layer {}): run `layer fsck --repair` to roll it back",
                describe_intent(*intent), id, intent->layer));
          return true;
        }));
    std::set<LayerId> leaked;
    LAYER_TRY(txn.scan(Db::kMaps, "", [&](std::string_view k, std::string_view) -> Result<bool> {
      auto key = decode_key_u64_u32(k);
      if (key && !layers.count(key->first) && !importing.count(key->first))
        leaked.insert(key->first);
      return true;
    }));
    for (LayerId id : leaked) problem(fmt::format("maps: rows of unknown layer {}", id));
    if (full) {
      LAYER_TRY(
          txn.scan(Db::kSums, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
            auto key = decode_key_u64_u32(k);
            if (!key) return true;
            auto s = decode_sums(v);
            if (!s)
              problem(fmt::format("layer {} sums row {}: {}", key->first, key->second,
                                  s.error().message));
            else
              sums[key->first][key->second] = *s;
            return true;
          }));
    }
  }

  test_point("fsck.index_scanned");

  // Files: each layer's in its tier's store; an intent accounts for its layer's file.
  std::set<std::pair<Tier, LayerId>> named;
  for (auto& [id, f] : layers) {
    named.insert({f.rec.tier, id});
    const std::string path = layer_path(f.rec);
    auto size = store(f.rec.tier).stat(id);
    if (!size) {
      problem(fmt::format("layer {}: {}", id, size.error().message));
      continue;
    }
    if (!*size) {
      if (f.data_blocks > 0)
        problem(fmt::format("layer {}: file {} is missing, the index has {} data blocks in it", id,
                            path, f.data_blocks));
      continue;
    }
    if (**size != f.rec.size_bytes)
      problem(fmt::format("layer {}: file {} is {} bytes, index says {}", id, path, **size,
                          f.rec.size_bytes));
  }
  for (const auto& [id, tier] : intent_files) named.insert({tier, id});
  std::vector<OrphanFile> orphans;
  for (const Tier tier : {Tier::kSsd, Tier::kHdd}) {
    auto entries = store(tier).list();
    if (!entries) {
      problem(fmt::format("tier {} cannot be read: {}", to_string(tier), entries.error().message));
      continue;
    }
    for (auto& e : *entries)
      if (!named.count({tier, e.id})) orphans.push_back(OrphanFile{tier, std::move(e)});
  }
  // The scan's view is older than the listing: confirm each candidate.
  LAYER_ASSIGN(orphans, confirm_orphans(orphans));
  if (!repair)
    for (const auto& o : orphans)
      problem(fmt::format("orphan file {}: no layer names it; `layer fsck --repair` removes it",
                          o.entry.name));

  // Checksums.
  if (full) {
    std::vector<uint8_t> buf(kSumGroupBytes);
    for (auto& [id, f] : layers) {
      if (f.rec.state != LayerState::kFrozen) continue;
      auto& rows = sums[id];
      auto sum_of = [&](uint64_t g) -> uint64_t {
        auto it = rows.find(static_cast<uint32_t>(g / kSumsPerRow));
        if (it == rows.end() || g % kSumsPerRow >= it->second.size()) return 0;
        return it->second[g % kSumsPerRow];
      };
      for (uint64_t g : f.data_groups)
        if (sum_of(g) == 0)
          problem(
              fmt::format("layer {}: no checksum for data at offset {}", id, g * kSumGroupBytes));
      if (rows.empty()) continue;
      auto file = store(f.rec.tier).open(id, false);
      if (!file) continue;  // reported above when it matters
      for (const auto& [row, v] : rows) {
        for (size_t i = 0; i < v.size(); ++i) {
          if (v[i] == 0) continue;
          const uint64_t g = uint64_t{row} * kSumsPerRow + i;
          const uint64_t off = g * kSumGroupBytes;
          if (off >= f.rec.size_bytes) {
            problem(fmt::format("layer {}: checksum for offset {} beyond its size", id, off));
            continue;
          }
          const uint64_t len = std::min<uint64_t>(kSumGroupBytes, f.rec.size_bytes - off);
          auto r = (*file)->read(buf.data(), len, off);
          if (!r) {
            problem(fmt::format("layer {}: {}", id, r.error().message));
            continue;
          }
          ++report.groups_verified;
          const uint64_t got = group_checksum(buf.data(), len);
          if (got != v[i])
            problem(
                fmt::format("layer {}: checksum mismatch at offset {} (index says {:016x}, "
                            "data hashes to {:016x})",
                            id, off, v[i], got));
        }
      }
    }
  }

  test_point("fsck.scanned");
  if (repair) {
    // Everything above is a view from before the scan: each change re-checks its candidate
    // in a fresh transaction and under the layer's lock, so work that started meanwhile (an
    // import, a clone's first write) is never undone.
    for (const auto& [intent_id, intent] : stale_imports) {
      LAYER_ASSIGN(bool rolled_back, roll_back_import(intent_id, intent));
      // Not rolled back: it resumed, finished or was rolled back by someone else meanwhile,
      // none of which is a problem.
      if (rolled_back)
        report.repaired.push_back(fmt::format("interrupted {} (intent {}, layer {}): rolled back",
                                              describe_intent(intent), intent_id, intent.layer));
    }
    // One removal that cannot be finished (an unlink refused, say) must not stop the others
    // or the orphan cleanup: it is reported and stays for a later run.
    for (uint64_t intent_id : drops) {
      auto s = finish_drop(*this, intent_id);
      if (s)
        report.repaired.push_back(
            fmt::format("unfinished removal (intent {}): finished", intent_id));
      else
        report.problems.push_back(
            fmt::format("unfinished removal (intent {}) could not be "
                        "finished: {}",
                        intent_id, s.error().message));
    }
    // Confirmed once more just before: a file made before the first confirmation has its row
    // or intent committed by then, so what is still an orphan stays one.
    LAYER_ASSIGN(orphans, confirm_orphans(orphans));
    for (const auto& o : orphans) {
      LAYER_TRY(store(o.tier).remove(o.entry.id));
      report.repaired.push_back(fmt::format("orphan file {}: removed", o.entry.name));
    }
  }
  return report;
}

Result<bool> Pool::roll_back_import(uint64_t intent_id, const IntentRecord& intent) {
  // Held through the rollback: an import holds it from before its intent is visible until
  // it publishes, so holding it here means no import of this layer runs.
  auto lock =
      locks_->try_lock(LockKind::kLayer, intent.layer, true, fmt::format("layer {}", intent.layer));
  if (!lock) {
    if (lock.error().code == EBUSY) return false;
    return std::move(lock).error();
  }
  for (;;) {
    bool skip = false, done = false;
    LAYER_TRY(committer_->run([&](WriteTxn& txn) -> Status {
      LAYER_ASSIGN(auto current, txn.get(Db::kIntents, key_u64(intent_id)));
      LAYER_ASSIGN(auto published, txn.get(Db::kLayers, key_u64(intent.layer)));
      if (!current || published) {
        skip = true;  // finished, published or rolled back meanwhile
        return {};
      }
      LAYER_ASSIGN(uint64_t n, delete_layer_rows(txn, intent.layer));
      if (n > 0) return {};  // more to do: the intent stays until the rows are gone
      done = true;
      return txn.del(Db::kIntents, key_u64(intent_id));
    }));
    if (skip) return false;
    if (done) break;
  }
  LAYER_TRY(store(Tier::kSsd).remove(intent.layer));
  return true;
}

Result<std::vector<Pool::OrphanFile>> Pool::confirm_orphans(
    const std::vector<OrphanFile>& candidates) {
  std::vector<OrphanFile> orphans;
  if (candidates.empty()) return orphans;
  LAYER_ASSIGN(auto txn, index_->begin_read());
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
    LAYER_ASSIGN(const bool locked, locks_->is_locked(LockKind::kLayer, id));
    if (locked) keep = true;
    if (!keep) orphans.push_back(o);
  }
  return orphans;
}

}  // namespace layer
