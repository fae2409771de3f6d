// chain.cc — building and sharing chain maps.
//
// Design notes:
// - Built bottom-up: each layer's `maps` rows overwrite the sources of the blocks it holds
//   (data -> its index, zero -> kSourceZero), so the topmost non-absent layer wins. Cost is one
//   pass over the chain's rows, paid once per chain (on first I/O, not at open) and shared.
// - A chunk whose blocks all come from one source stays a single byte; only mixed chunks get a
//   4 KiB array, so sequentially imported images cost almost nothing.
// - The map never changes after build: readers need no lock, and a lookup is two array reads
//   whatever the depth, which is the point (DESIGN.md "Read path").
#include "chain.h"

#include <algorithm>

#include "index.h"

namespace layer {

Result<std::shared_ptr<const ChainMap>> ChainMap::build(ReadTxn& txn,
                                                        const std::vector<LayerRecord>& layers,
                                                        uint64_t size_blocks) {
  if (layers.size() > kMaxChainDepth)
    return make_error(EINVAL, "chain of {} layers is deeper than the limit of {}", layers.size(),
                      kMaxChainDepth);
  auto map = std::make_shared<ChainMap>();
  map->layers_ = layers;
  map->size_blocks_ = size_blocks;
  const uint64_t nchunks = (size_blocks + kBlocksPerChunk - 1) / kBlocksPerChunk;
  map->chunks_.resize(nchunks);
  using Array = std::array<Source, kBlocksPerChunk>;
  std::vector<std::unique_ptr<Array>> mixed(nchunks);

  for (size_t k = layers.size(); k-- > 0;) {
    const Source self = static_cast<Source>(k);
    const LayerId id = layers[k].id;
    LAYER_TRY(txn.scan(Db::kMaps, key_u64(id), [&](std::string_view key, std::string_view value)
                                                   -> Result<bool> {
      auto parsed = decode_key_u64_u32(key);
      if (!parsed) return make_error(EIO, "layer {}: map key of {} bytes", id, key.size());
      const uint32_t c = parsed->second;
      if (c >= nchunks) return true;  // beyond this disk (cannot happen: sizes only grow)
      auto bits = decode_chunk(value);
      if (!bits) return make_error(EIO, "layer {} chunk {}: {}", id, c, bits.error().message);
      BlockState u;
      if (bits->uniform(&u)) {
        if (u == BlockState::kAbsent) return true;
        mixed[c].reset();
        map->chunks_[c].uniform = u == BlockState::kData ? self : kSourceZero;
        return true;
      }
      if (!mixed[c]) {
        mixed[c] = std::make_unique<Array>();
        mixed[c]->fill(map->chunks_[c].uniform);
      }
      Array& a = *mixed[c];
      for (uint32_t i = 0; i < kBlocksPerChunk; ++i) {
        const BlockState s = bits->get(i);
        if (s == BlockState::kData) a[i] = self;
        else if (s == BlockState::kZero) a[i] = kSourceZero;
      }
      return true;
    }));
  }
  for (uint64_t c = 0; c < nchunks; ++c) {
    if (!mixed[c]) continue;
    const Array& a = *mixed[c];
    if (std::all_of(a.begin(), a.end(), [&](Source s) { return s == a[0]; })) {
      map->chunks_[c].uniform = a[0];
    } else {
      map->chunks_[c].mixed = std::shared_ptr<const Array>(std::move(mixed[c]));
    }
  }
  return std::shared_ptr<const ChainMap>(std::move(map));
}

uint64_t ChainMap::run_length(uint64_t block_no, uint64_t max_blocks) const {
  const Source first = lookup(block_no);
  uint64_t n = 0;
  while (n < max_blocks) {
    const uint64_t b = block_no + n;
    const uint64_t chunk = b / kBlocksPerChunk;
    const uint64_t in_chunk = std::min<uint64_t>(kBlocksPerChunk - b % kBlocksPerChunk, max_blocks - n);
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

Result<std::shared_ptr<const ChainMap>> ChainCache::get(ReadTxn& txn,
                                                        const std::vector<LayerRecord>& layers,
                                                        uint64_t size_blocks) {
  const auto key = std::make_pair(layers.empty() ? LayerId{0} : layers.front().id, size_blocks);
  const auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = slots_.begin(); it != slots_.end();) {
      if (it->second.lingering && it->second.expires < now) it->second.lingering.reset();
      if (!it->second.lingering && it->second.live.expired()) it = slots_.erase(it);
      else ++it;
    }
    auto it = slots_.find(key);
    if (it != slots_.end()) {
      if (auto live = it->second.live.lock()) {
        it->second.lingering = live;
        it->second.expires = now + linger_;
        return std::shared_ptr<const ChainMap>(live);
      }
    }
  }
  // Built outside the lock: two disks racing on a new chain may both build; one result wins.
  LAYER_ASSIGN(auto built, ChainMap::build(txn, layers, size_blocks));
  std::lock_guard<std::mutex> lk(mu_);
  Slot& slot = slots_[key];
  if (auto live = slot.live.lock()) built = live;
  slot.live = built;
  slot.lingering = built;
  slot.expires = now + linger_;
  return built;
}

}  // namespace layer
