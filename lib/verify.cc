// verify.cc — LayerVerifier and VerifierTable.
#include "verify.h"

#include <algorithm>

#include "checksum.h"
#include "index.h"

namespace layer {

LayerVerifier::LayerVerifier(Index& index, const LayerRecord& layer)
    : index_(index), layer_(layer) {
  const uint64_t groups = (layer.size_bytes + kSumGroupBytes - 1) / kSumGroupBytes;
  const uint64_t words = (groups + 63) / 64;
  verified_.reset(new std::atomic<uint64_t>[words]);
  for (uint64_t i = 0; i < words; ++i) verified_[i].store(0, std::memory_order_relaxed);
}

Result<uint64_t> LayerVerifier::sum_of(uint64_t g) {
  const auto row = static_cast<uint32_t>(g / kSumsPerRow);
  std::lock_guard<std::mutex> lk(mu_);
  auto it = rows_.find(row);
  if (it == rows_.end()) {
    LAYER_ASSIGN(auto txn, index_.begin_read());
    LAYER_ASSIGN(auto v, txn.get(Db::kSums, key_u64_u32(layer_.id, row)));
    std::vector<uint64_t> sums;
    if (v) {
      LAYER_ASSIGN(sums, decode_sums(*v));
    }
    it = rows_.emplace(row, std::move(sums)).first;
  }
  const uint64_t i = g % kSumsPerRow;
  return i < it->second.size() ? it->second[i] : 0;
}

Status LayerVerifier::check(LayerFile& file, uint64_t offset, uint64_t len) {
  if (len == 0) return {};
  const uint64_t first = offset / kSumGroupBytes;
  const uint64_t last = (offset + len - 1) / kSumGroupBytes;
  std::vector<uint8_t> buf;
  for (uint64_t g = first; g <= last; ++g) {
    const uint64_t bit = uint64_t{1} << (g % 64);
    std::atomic<uint64_t>& word = verified_[g / 64];
    if (word.load(std::memory_order_acquire) & bit) continue;
    LAYER_ASSIGN(const uint64_t want, sum_of(g));
    if (want != 0) {  // 0: no data in the group, nothing to verify
      const uint64_t off = g * kSumGroupBytes;
      const uint64_t glen = std::min<uint64_t>(kSumGroupBytes, layer_.size_bytes - off);
      buf.resize(glen);
      LAYER_TRY(file.read(buf.data(), glen, off));
      const uint64_t got = group_checksum(buf.data(), glen);
      if (got != want)
        return make_error(EIO,
                          "layer {}: checksum mismatch at offset {} of {} (data hashes to "
                          "{:016x}, its checksum is {:016x}): the read fails; `layer scrub` "
                          "lists what it affects",
                          layer_.id, off, file.path(), got, want);
    }
    if (!(word.fetch_or(bit, std::memory_order_acq_rel) & bit))
      verified_count_.fetch_add(1, std::memory_order_relaxed);
  }
  return {};
}

std::shared_ptr<LayerVerifier> VerifierTable::get(Index& index, const LayerRecord& layer) {
  std::lock_guard<std::mutex> lk(mu_);
  auto& weak = verifiers_[layer.id];
  auto v = weak.lock();
  if (!v) {
    v = std::make_shared<LayerVerifier>(index, layer);
    weak = v;
  }
  // Forget the ones no disk holds any more.
  for (auto it = verifiers_.begin(); it != verifiers_.end();)
    it = it->second.expired() ? verifiers_.erase(it) : std::next(it);
  return v;
}

}  // namespace layer
