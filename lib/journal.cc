// journal.cc — the map journal's records, its index state, and recovery (journal.h).
#include "journal.h"

#include <xxhash.h>

#include <cstring>

#include "block_map.h"
#include "index.h"
#include "layers.h"
#include "locks.h"
#include "pool.h"

namespace layer::journal {
namespace {

constexpr char kMagic[8] = {'L', 'A', 'Y', 'E', 'R', 'J', 'N', 'L'};
constexpr size_t kRowHeaderBytes = 6;
constexpr size_t kChecksumAt = 32;

void put_u16(std::string& s, uint16_t v) {
  for (int i = 0; i < 2; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}
void put_u32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}
void put_u64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t get_le(std::string_view s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | static_cast<uint8_t>(s[at + i]);
  return v;
}

uint64_t checksum_of(std::string_view header_and_payload) {
  XXH3_state_t* st = XXH3_createState();
  if (!st) throw std::bad_alloc();
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, header_and_payload.data(), kChecksumAt);
  const uint64_t zero = 0;
  XXH3_64bits_update(st, &zero, sizeof zero);
  XXH3_64bits_update(st, header_and_payload.data() + kHeaderBytes,
                     header_and_payload.size() - kHeaderBytes);
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return h;
}

}  // namespace

std::string encode_record(uint64_t seq, LayerId layer, const Rows& rows) {
  std::string out;
  size_t payload = 0;
  for (const auto& [chunk, row] : rows) payload += kRowHeaderBytes + row.size();
  out.reserve((kHeaderBytes + payload + kRecordAlign - 1) / kRecordAlign * kRecordAlign);
  out.append(kMagic, sizeof kMagic);
  put_u64(out, seq);
  put_u64(out, layer);
  put_u32(out, static_cast<uint32_t>(payload));
  put_u32(out, static_cast<uint32_t>(rows.size()));
  put_u64(out, 0);  // the checksum, below
  for (const auto& [chunk, row] : rows) {
    put_u32(out, chunk);
    put_u16(out, static_cast<uint16_t>(row.size()));
    out += row;
  }
  const uint64_t sum = checksum_of(out);
  for (int i = 0; i < 8; ++i) out[kChecksumAt + i] = static_cast<char>(sum >> (8 * i));
  out.resize((out.size() + kRecordAlign - 1) / kRecordAlign * kRecordAlign, '\0');
  return out;
}

std::optional<std::pair<Record, uint64_t>> decode_record(std::string_view bytes, LayerId layer,
                                                         uint64_t nchunks) {
  if (bytes.size() < kHeaderBytes || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0)
    return std::nullopt;
  Record r;
  r.seq = get_le(bytes, 8, 8);
  if (get_le(bytes, 16, 8) != layer) return std::nullopt;
  const uint64_t payload = get_le(bytes, 24, 4);
  const uint64_t count = get_le(bytes, 28, 4);
  if (payload > kZoneBytes || bytes.size() - kHeaderBytes < payload) return std::nullopt;
  const std::string_view whole = bytes.substr(0, kHeaderBytes + payload);
  if (checksum_of(whole) != get_le(bytes, kChecksumAt, 8)) return std::nullopt;
  size_t at = kHeaderBytes;
  for (uint64_t i = 0; i < count; ++i) {
    if (whole.size() - at < kRowHeaderBytes) return std::nullopt;
    const uint32_t chunk = static_cast<uint32_t>(get_le(whole, at, 4));
    const size_t len = get_le(whole, at + 4, 2);
    at += kRowHeaderBytes;
    if (chunk >= nchunks || (len != 1 && len != kChunkBytes) || whole.size() - at < len)
      return std::nullopt;
    const std::string_view row = whole.substr(at, len);
    if (!decode_chunk(row)) return std::nullopt;
    r.rows.emplace_back(chunk, std::string(row));
    at += len;
  }
  if (at != whole.size()) return std::nullopt;
  const uint64_t padded = (whole.size() + kRecordAlign - 1) / kRecordAlign * kRecordAlign;
  return std::make_pair(std::move(r), padded);
}

std::string key(LayerId layer) { return std::string(kKeyPrefix) + key_u64(layer); }

std::string encode_state(const State& s) {
  std::string out;
  put_u64(out, s.checkpoint);
  out.push_back(s.open ? 1 : 0);
  return out;
}

Result<State> decode_state(std::string_view value) {
  if (value.size() != 9 || static_cast<uint8_t>(value[8]) > 1)
    return make_error(EIO, "journal state row of {} bytes is malformed", value.size());
  return State{get_le(value, 0, 8), value[8] == 1};
}

Result<State> get_state(ReadTxn& txn, LayerId layer) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, key(layer)));
  if (!v) return State{};
  auto s = decode_state(*v);
  if (!s) return make_error(EIO, "layer {}: {}", layer, s.error().message);
  return s;
}

Result<std::vector<Record>> read_records(LayerFile& file, const LayerRecord& layer,
                                         uint64_t checkpoint) {
  std::vector<Record> out;
  LAYER_ASSIGN(uint64_t size, file.size());
  const uint64_t zone = zone_offset(layer.size_bytes);
  if (size <= zone) return out;
  const uint64_t zone_len = std::min(kZoneBytes, size - zone);
  const uint64_t nchunks = (layer.size_bytes / layer.block_size +
                            (layer.size_bytes % layer.block_size != 0) + kBlocksPerChunk - 1) /
                           kBlocksPerChunk;
  std::string buf(zone_len, '\0');
  LAYER_TRY(file.read(buf.data(), zone_len, zone));
  std::map<uint64_t, Record> found;  // by seq
  for (uint64_t seg = 0; seg < zone_len; seg += kSegmentBytes) {
    std::string_view rest = std::string_view(buf).substr(seg, kSegmentBytes);
    std::optional<uint64_t> prev;
    while (!rest.empty()) {
      auto rec = decode_record(rest, layer.id, nchunks);
      if (!rec || rec->second > rest.size()) break;
      if (prev && rec->first.seq != *prev + 1) break;
      prev = rec->first.seq;
      rest.remove_prefix(rec->second);
      if (rec->first.seq > checkpoint) found.emplace(rec->first.seq, std::move(rec->first));
    }
  }
  // Past the checkpoint, only the next record continues the folded ones.
  for (uint64_t want = checkpoint + 1;; ++want) {
    auto it = found.find(want);
    if (it == found.end()) break;
    out.push_back(std::move(it->second));
  }
  return out;
}

Status put_rows(WriteTxn& txn, LayerId layer, const Rows& rows) {
  for (const auto& [chunk, row] : rows) {
    const std::string k = key_u64_u32(layer, chunk);
    if (row.size() == 1 && row[0] == static_cast<char>(BlockState::kAbsent)) {
      LAYER_TRY(txn.del(Db::kMaps, k));
    } else {
      LAYER_TRY(txn.put(Db::kMaps, k, row));
    }
  }
  return {};
}

Result<uint64_t> recover(Pool& pool, LayerId id) {
  State state;
  LayerRecord layer;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(state, get_state(txn, id));
    if (!state.open) return uint64_t{0};
    auto l = get_layer(txn, id);
    if (!l) {
      if (l.error().code != ENOENT) return std::move(l).error();
      // A dropped layer: its journal row goes with it.
      LAYER_TRY(pool.committer().run([&](WriteTxn& w) { return w.del(Db::kMeta, key(id)); }));
      return uint64_t{0};
    }
    layer = *l;
  }
  std::vector<Record> records;
  std::shared_ptr<LayerFile> file;
  auto f = pool.store(layer.tier).open(id, true);
  if (f) {
    file = *f;
    LAYER_ASSIGN(records, read_records(*file, layer, state.checkpoint));
  } else if (f.error().code != ENOENT) {
    return std::move(f).error();
  }
  std::map<uint32_t, std::string> latest;
  for (auto& r : records)
    for (auto& [chunk, row] : r.rows) latest[chunk] = std::move(row);
  const uint64_t last = records.empty() ? state.checkpoint : records.back().seq;
  Rows rows(latest.begin(), latest.end());
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_TRY(put_rows(txn, id, rows));
    return txn.put(Db::kMeta, key(id), encode_state(State{last, false}));
  }));
  // Every record is folded: the zone's bytes are garbage now (kept or not, a reader stops at
  // them); give their space back.
  if (file) {
    auto size = file->size();
    const uint64_t zone = zone_offset(layer.size_bytes);
    if (size && *size > zone) (void)file->punch(zone, *size - zone);
  }
  return static_cast<uint64_t>(records.size());
}

Status recover_delta(Pool& pool, LayerId delta) {
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto st, get_state(txn, delta));
    if (!st.open) return {};
  }
  LAYER_ASSIGN(Lock lock, pool.locks().try_lock(LockKind::kLayer, delta, true,
                                                fmt::format("layer {} (journal recovery)", delta)));
  LAYER_TRY(recover(pool, delta));
  return {};
}

uint64_t recover_all(Pool& pool) {
  std::vector<LayerId> open;
  {
    auto txn = pool.index().begin_read();
    if (!txn) return 0;
    (void)txn->scan(Db::kMeta, kKeyPrefix,
                    [&](std::string_view k, std::string_view v) -> Result<bool> {
                      auto id = decode_key_u64(k.substr(kKeyPrefix.size()));
                      auto s = decode_state(v);
                      if (id && s && s->open) open.push_back(*id);
                      return true;
                    });
  }
  uint64_t recovered = 0;
  for (LayerId id : open) {
    // A server that journals into the delta holds its lock exclusively: leave it alone.
    auto lock = pool.locks().try_lock(LockKind::kLayer, id, true,
                                      fmt::format("layer {} (journal recovery)", id));
    if (!lock) continue;
    if (recover(pool, id)) ++recovered;
  }
  return recovered;
}

}  // namespace layer::journal
