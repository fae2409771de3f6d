// chain.cc — building and sharing chain maps.
//
// Design notes:
// - Built bottom-up: each layer's `maps` rows overwrite the sources of the blocks it holds
//   (data -> its index, zero -> kSourceZero), so the topmost non-absent layer wins. Cost is one
//   pass over the chain's rows, paid once per chain (on first I/O, not at open) and shared.
// - Sources are stored counted from the bottom, so a snapshot's map (the frozen delta stacked
//   on the old chain) shares every untouched chunk, mixed arrays included, with the old map:
//   it costs the delta's rows, not the chain's (ChainMap::stack).
// - A chunk whose blocks all come from one source stays a single byte; only mixed chunks get a
//   4 KiB array, so sequentially imported images cost almost nothing.
// - The map never changes after build: readers need no lock, and a lookup is two array reads
//   whatever the depth, which is the point (DESIGN.md "Read path").
// - The cache keys a map by the chain's top layer and sizes it to the chain, not to the disk:
//   clones of one image with different sizes share one map, and a disk's blocks past its chain
//   are absent in every frozen layer, which is what lookup() says past the map.
#include "chain.h"

#include <algorithm>
#include <system_error>

#include "index.h"

namespace layer {

using Array = std::array<Source, kBlocksPerChunk>;

Status ChainMap::apply_rows(ReadTxn& txn, LayerId id, Source self,
                            std::vector<std::unique_ptr<Array>>& mixed) {
  const uint64_t nchunks = chunks_.size();
  return for_each_map_row(txn, id, [&](uint32_t c, const ChunkBits& row) -> Result<bool> {
    if (c >= nchunks) return true;  // beyond the size asked for: not needed
    const ChunkBits* bits = &row;
    BlockState u;
    if (bits->uniform(&u)) {
      if (u == BlockState::kAbsent) return true;
      mixed[c].reset();
      chunks_[c].mixed.reset();
      chunks_[c].uniform = u == BlockState::kData ? self : kSourceZero;
      return true;
    }
    if (!mixed[c]) {
      mixed[c] = std::make_unique<Array>();
      // A chunk shared with the map below is copied before it changes.
      if (chunks_[c].mixed)
        *mixed[c] = *chunks_[c].mixed;
      else
        mixed[c]->fill(chunks_[c].uniform);
      chunks_[c].mixed.reset();
    }
    Array& a = *mixed[c];
    for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
      const BlockState s = bits->get(i);
      if (s == BlockState::kData)
        a[i] = self;
      else if (s == BlockState::kZero)
        a[i] = kSourceZero;
    }
    return true;
  });
}

void ChainMap::finish(std::vector<std::unique_ptr<Array>>& mixed) {
  for (uint64_t c = 0; c < mixed.size(); ++c) {
    if (!mixed[c]) continue;
    const Array& a = *mixed[c];
    if (std::all_of(a.begin(), a.end(), [&](Source s) { return s == a[0]; })) {
      chunks_[c].uniform = a[0];
      chunks_[c].mixed.reset();
    } else {
      chunks_[c].mixed = std::shared_ptr<const Array>(std::move(mixed[c]));
    }
  }
}

Result<std::shared_ptr<const ChainMap>> ChainMap::build(ReadTxn& txn,
                                                        const std::vector<LayerRecord>& layers,
                                                        uint64_t size_blocks) {
  if (layers.size() > kMaxChainDepth)
    return make_error(EIO, "chain of {} layers is deeper than the limit of {}", layers.size(),
                      kMaxChainDepth);
  auto map = std::make_shared<ChainMap>();
  map->layers_ = layers;
  map->size_blocks_ = size_blocks;
  const uint64_t nchunks = (size_blocks + kBlocksPerChunk - 1) / kBlocksPerChunk;
  map->chunks_.resize(nchunks);
  std::vector<std::unique_ptr<Array>> mixed(nchunks);
  // Bottom first, so the topmost layer saying something about a block wins.
  for (size_t k = layers.size(); k-- > 0;)
    LAYER_TRY(
        map->apply_rows(txn, layers[k].id, static_cast<Source>(layers.size() - 1 - k), mixed));
  map->finish(mixed);
  return std::shared_ptr<const ChainMap>(std::move(map));
}

Result<std::shared_ptr<const ChainMap>> ChainMap::stack(ReadTxn& txn, const LayerRecord& top,
                                                        const ChainMap& below,
                                                        uint64_t size_blocks) {
  if (below.layers_.size() + 1 > kMaxChainDepth)
    return make_error(EIO, "chain of {} layers is deeper than the limit of {}",
                      below.layers_.size() + 1, kMaxChainDepth);
  auto map = std::make_shared<ChainMap>();
  map->layers_.reserve(below.layers_.size() + 1);
  map->layers_.push_back(top);
  map->layers_.insert(map->layers_.end(), below.layers_.begin(), below.layers_.end());
  map->size_blocks_ = size_blocks;
  const uint64_t nchunks = (size_blocks + kBlocksPerChunk - 1) / kBlocksPerChunk;
  map->chunks_ = below.chunks_;  // shares every mixed array
  map->chunks_.resize(nchunks);
  std::vector<std::unique_ptr<Array>> mixed(nchunks);
  LAYER_TRY(map->apply_rows(txn, top.id, static_cast<Source>(below.layers_.size()), mixed));
  map->finish(mixed);
  return std::shared_ptr<const ChainMap>(std::move(map));
}

uint64_t ChainMap::run_length(uint64_t block_no, uint64_t max_blocks) const {
  const Source first = raw(block_no);
  uint64_t n = 0;
  while (n < max_blocks) {
    const uint64_t b = block_no + n;
    const uint64_t chunk = b / kBlocksPerChunk;
    const uint64_t in_chunk =
        std::min<uint64_t>(kBlocksPerChunk - b % kBlocksPerChunk, max_blocks - n);
    if (chunk >= chunks_.size() || !chunks_[chunk].mixed) {
      const Source s = chunk >= chunks_.size() ? kSourceAbsent : chunks_[chunk].uniform;
      if (s != first) break;
      n += in_chunk;
      continue;
    }
    const auto& a = *chunks_[chunk].mixed;
    uint64_t i = b % kBlocksPerChunk;
    const uint64_t stop = i + in_chunk;
    while (i < stop && a[i] == first) ++i;
    n += i - b % kBlocksPerChunk;
    if (i < stop) break;
  }
  return std::min(n, max_blocks);
}

ChainCache::~ChainCache() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (reaper_.joinable()) reaper_.join();
}

size_t ChainCache::resident() {
  std::lock_guard<std::mutex> lk(mu_);
  return slots_.size();
}

bool ChainCache::sweep(std::chrono::steady_clock::time_point now,
                       std::vector<std::shared_ptr<const ChainMap>>* freed) {
  for (auto it = slots_.begin(); it != slots_.end();) {
    Slot& slot = it->second;
    // use_count() == 1 is stable here: only get(), under mu_, makes new references from ours.
    if (slot.map.use_count() > 1) {
      slot.idle = false;
    } else if (!slot.idle) {
      slot.idle = true;
      slot.idle_since = now;
    } else if (now - slot.idle_since >= linger_) {
      freed->push_back(std::move(slot.map));
      it = slots_.erase(it);
      continue;
    }
    ++it;
  }
  return !slots_.empty();
}

// Why a thread: a map's users are Disks that drop their reference without telling the cache,
// and the last one to leave may be the last I/O the server sees, so neither lookups nor
// releases can be relied on to free it. The thread polls only while maps are held (every half
// linger: a map is freed between 1 and 1.5 lingers after its last user left) and sleeps
// otherwise. It starts on the first map, never at construction: a Pool may be made before
// nbdkit forks, and a thread made then would be lost in the child.
void ChainCache::reap() {
  const auto period =
      std::max<std::chrono::milliseconds>(linger_ / 2, std::chrono::milliseconds(1));
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    std::vector<std::shared_ptr<const ChainMap>> freed;
    const bool held = sweep(std::chrono::steady_clock::now(), &freed);
    if (!freed.empty()) {
      lk.unlock();
      freed.clear();  // a large map is not freed under mu_
      lk.lock();
      continue;
    }
    if (held)
      wake_.wait_for(lk, period);
    else
      wake_.wait(lk);
  }
}

namespace {

bool same_layers(const std::vector<LayerRecord>& a, const std::vector<LayerRecord>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].id != b[i].id) return false;
  return true;
}

}  // namespace

Result<std::shared_ptr<const ChainMap>> ChainCache::get(ReadTxn& txn,
                                                        const std::vector<LayerRecord>& layers,
                                                        const ChainMap* below) {
  const LayerId key = layers.empty() ? LayerId{0} : layers.front().id;
  // Destroyed after the lock is released (declared before it).
  std::vector<std::shared_ptr<const ChainMap>> freed;
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Also here, so maps are still freed if the reaper could not start.
    sweep(std::chrono::steady_clock::now(), &freed);
    auto it = slots_.find(key);
    // The chain below a frozen layer never changes today; a merge that re-parents a layer
    // would change it, so a map is reused only for the very same list of layers.
    if (it != slots_.end() && same_layers(it->second.map->layers(), layers)) {
      it->second.idle = false;
      return std::shared_ptr<const ChainMap>(it->second.map);
    }
  }
  uint64_t size_blocks = 0;
  for (const auto& layer : layers) {
    if (layer.block_size == 0) return make_error(EIO, "layer {}: block size 0", layer.id);
    size_blocks =
        std::max(size_blocks, (layer.size_bytes + layer.block_size - 1) / layer.block_size);
  }
  // Built outside the lock: two disks racing on a new chain may both build; the first one kept
  // wins.
  const bool stacked =
      below && !layers.empty() &&
      same_layers(below->layers(), std::vector<LayerRecord>(layers.begin() + 1, layers.end()));
  LAYER_ASSIGN(auto built, stacked ? ChainMap::stack(txn, layers.front(), *below, size_blocks)
                                   : ChainMap::build(txn, layers, size_blocks));
  std::lock_guard<std::mutex> lk(mu_);
  auto [it, inserted] = slots_.try_emplace(key);
  if (inserted || !same_layers(it->second.map->layers(), layers)) {
    // Disks still on a replaced map keep it through their own references.
    if (!inserted) freed.push_back(std::move(it->second.map));
    it->second.map = built;
  }
  it->second.idle = false;
  if (!reaper_tried_) {
    reaper_tried_ = true;
    try {
      reaper_ = std::thread([this] { reap(); });
    } catch (const std::system_error&) {
      // No thread: get() still sweeps, so maps are freed at the next lookup instead.
    }
  }
  wake_.notify_one();  // the reaper may be sleeping without a deadline
  return std::shared_ptr<const ChainMap>(it->second.map);
}

}  // namespace layer
