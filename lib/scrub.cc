// scrub.cc — scrub: frozen layers read back and verified against their checksums.
#include "scrub.h"

#include <algorithm>

#include "checksum.h"
#include "layers.h"

namespace layer {
namespace {

// The layer's row now; std::nullopt when it is gone.
Result<std::optional<LayerRecord>> current_row(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
  if (!v) return std::optional<LayerRecord>();
  LAYER_ASSIGN(auto rec, decode_layer(*v, id));
  return std::optional<LayerRecord>(rec);
}

// The layer's checksums: (group, sum) for every group that has one, in offset order.
Result<std::vector<std::pair<uint64_t, uint64_t>>> sums_of(Pool& pool, LayerId id) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_TRY(
      txn.scan(Db::kSums, key_u64(id), [&](std::string_view k, std::string_view v) -> Result<bool> {
        auto key = decode_key_u64_u32(k);
        if (!key) return make_error(EIO, "sums: a key of {} bytes", k.size());
        LAYER_ASSIGN(auto sums, decode_sums(v));
        for (size_t i = 0; i < sums.size(); ++i)
          if (sums[i] != 0) out.emplace_back(uint64_t{key->second} * kSumsPerRow + i, sums[i]);
        return true;
      }));
  return out;
}

// Verifies one frozen layer into `out`. False: stopped.
bool scrub_layer(Pool& pool, ScrubLayer& out, Pacer& pacer) {
  const LayerRecord& layer = out.layer;
  auto sums = sums_of(pool, layer.id);
  if (!sums) {
    out.errors.push_back(sums.error().message);
    return true;
  }
  if (sums->empty()) return true;  // no data
  auto file = pool.open_frozen(layer);
  if (!file) {
    // Gone meanwhile (dropped or merged away) is not damage.
    auto row = current_row(pool, layer.id);
    if (row && !*row) {
      out.skipped = "removed while being scrubbed";
      return true;
    }
    out.errors.push_back(file.error().message);
    return true;
  }
  std::vector<uint8_t> buf(kSumGroupBytes);
  for (const auto& [group, want] : *sums) {
    const uint64_t off = group * kSumGroupBytes;
    if (off >= layer.size_bytes) {
      out.errors.push_back(fmt::format("a checksum for offset {}, beyond the layer's size", off));
      continue;
    }
    const uint64_t len = std::min<uint64_t>(kSumGroupBytes, layer.size_bytes - off);
    if (!pacer.admit(len)) return false;
    if (auto r = (*file)->read(buf.data(), len, off); !r) {
      out.errors.push_back(r.error().message);
      continue;
    }
    out.bytes += len;
    ++out.groups;
    const uint64_t got = group_checksum(buf.data(), len);
    if (got != want) out.mismatches.push_back({off, want, got});
  }
  return true;
}

}  // namespace

Result<ScrubReport> scrub(Pool& pool, const std::vector<LayerId>& ids,
                          const ScrubOptions& options) {
  ScrubReport report;
  std::map<LayerId, std::vector<std::string>> users;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(users, layer_users(txn));
    auto add = [&](LayerId id, std::string_view v) -> Status {
      ScrubLayer l;
      LAYER_ASSIGN(l.layer, decode_layer(v, id));
      report.layers.push_back(std::move(l));
      return {};
    };
    if (ids.empty()) {
      LAYER_TRY(
          txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
            auto id = decode_key_u64(k);
            if (!id) return make_error(EIO, "layers: a key of {} bytes", k.size());
            LAYER_TRY(add(*id, v));
            return true;
          }));
    }
    for (const LayerId id : ids) {
      LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
      if (!v) return make_error(ENOENT, "layer {} not found in pool {}", id, pool.paths().root);
      LAYER_TRY(add(id, *v));
    }
  }
  Pacer pacer(options.rate_bytes_per_sec, options.stop);
  for (auto& l : report.layers) {
    if (auto it = users.find(l.layer.id); it != users.end()) l.users = it->second;
    if (l.layer.state == LayerState::kWritable) {
      l.skipped = "a writable delta has no checksums";
    } else if (l.layer.state == LayerState::kFrozenUnhashed) {
      l.skipped = "not checksummed yet (a server's hasher or `layer gc` does it)";
    } else if (!scrub_layer(pool, l, pacer)) {
      report.stopped = true;
      break;
    }
    report.groups += l.groups;
    report.bytes += l.bytes;
  }
  return report;
}

}  // namespace layer
