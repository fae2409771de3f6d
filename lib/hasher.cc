// hasher.cc — hash_layer, hash_pending and the server's BackgroundHasher (see hasher.h).
//
// A layer's data groups are found from its `maps` rows in one short read transaction and kept
// as one 64-bit mask per sums row (8 bytes per 4 MiB of data), so no read transaction stays
// open while the data is read. The groups are then read in runs of up to 1 MiB, paced by the
// rate limit, hashed, and their rows committed kHashRowsPerTxn at a time, each transaction
// re-checking the layer's `layers` row first (hasher.h: why that keeps drops free of orphans).
#include "hasher.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <set>

#include "block_map.h"
#include "checksum.h"
#include "index.h"
#include "layers.h"
#include "locks.h"

namespace layer {
namespace {

// The longest read: 16 groups.
constexpr uint32_t kGroupsPerRead = 16;

using Clock = std::chrono::steady_clock;

// The groups of a layer that hold data: (sums row, bit g % 64 set for each group g of the row
// that holds a data block), rows ascending.
using GroupMasks = std::vector<std::pair<uint32_t, uint64_t>>;

// Marks the groups that bytes [from, to) of the layer touch. REQUIRES: from ascends over calls.
void mark_groups(GroupMasks& masks, uint64_t from, uint64_t to) {
  for (uint64_t g = from / kSumGroupBytes; g * kSumGroupBytes < to; ++g) {
    const auto row = static_cast<uint32_t>(g / kSumsPerRow);
    if (masks.empty() || masks.back().first != row) masks.emplace_back(row, 0);
    masks.back().second |= uint64_t{1} << (g % kSumsPerRow);
  }
}

// The groups holding data blocks, as import and fsck count them: every group that a data block
// overlaps (a block larger than a group makes all of its groups data groups).
Result<GroupMasks> data_groups(ReadTxn& txn, const LayerRecord& layer) {
  GroupMasks masks;
  const uint64_t bs = layer.block_size;
  if (bs == 0) return make_error(EIO, "layer {}: block size 0", layer.id);
  const uint64_t size_blocks = (layer.size_bytes + bs - 1) / bs;
  LAYER_TRY(
      for_each_map_row(txn, layer.id, [&](uint32_t chunk, const ChunkBits& bits) -> Result<bool> {
        const uint64_t first = uint64_t{chunk} * kBlocksPerChunk;
        // Runs of data blocks [run, i) of this chunk.
        uint64_t run = 0;
        bool in_run = false;
        for (uint32_t i = 0; i <= kBlocksPerChunk; ++i) {
          const bool data = i < kBlocksPerChunk && bits.get(i) == BlockState::kData;
          if (data && first + i >= size_blocks)
            return make_error(EIO, "layer {}: block {} holds data beyond the layer's size",
                              layer.id, first + i);
          if (data && !in_run) {
            run = first + i;
            in_run = true;
          } else if (!data && in_run) {
            mark_groups(masks, run * bs, std::min((first + i) * bs, layer.size_bytes));
            in_run = false;
          }
        }
        return true;
      }));
  return masks;
}

// Whether hashing of `id` can go on: std::nullopt while its `layers` row says frozen-unhashed
// (*rec gets it), else how hashing ends. Errors: EINVAL (writable), EIO.
Result<std::optional<HashResult::Outcome>> check_pending(ReadTxn& txn, LayerId id,
                                                         LayerRecord* rec) {
  LAYER_ASSIGN(auto row, txn.get(Db::kLayers, key_u64(id)));
  if (!row) return std::optional<HashResult::Outcome>(HashResult::Outcome::kGone);
  LAYER_ASSIGN(*rec, decode_layer(*row, id));
  switch (rec->state) {
    case LayerState::kFrozenUnhashed:
      return std::optional<HashResult::Outcome>();
    case LayerState::kFrozen:
      return std::optional<HashResult::Outcome>(HashResult::Outcome::kAlready);
    case LayerState::kWritable:
      break;
  }
  return make_error(EINVAL, "layer {} is writable: a container's delta is never hashed", id);
}

bool stop_requested(const HashOptions& options) {
  return options.stop != nullptr && options.stop->stop_requested();
}

}  // namespace

Result<HashResult> hash_layer(Pool& pool, LayerId id, const HashOptions& options) {
  if (pool.read_only()) return make_error(EACCES, "pool {} is open read-only", pool.paths().root);
  const size_t rows_per_txn = std::clamp<size_t>(options.rows_per_txn, 1, kMaxRowsPerTxn);
  HashResult result;
  auto ended = [&](HashResult::Outcome outcome) {
    result.outcome = outcome;
    return result;
  };
  // No lock: the hasher must not make a merge or a snapshot removal wait or give up. What
  // keeps it right is the index (every transaction re-checks the layer) and the file (frozen:
  // an fd opened before a drop or a move reads the same bytes until closed).

  LayerRecord layer;
  GroupMasks masks;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto done, check_pending(txn, id, &layer));
    if (done) return ended(*done);
    LAYER_ASSIGN(masks, data_groups(txn, layer));
  }

  // Whether the layer went away: an error while it is being read is no error then.
  auto gone = [&]() -> bool {
    auto txn = pool.index().begin_read();
    if (!txn) return false;
    auto row = txn->get(Db::kLayers, key_u64(id));
    return row && !*row;
  };
  std::shared_ptr<LayerFile> file;
  if (!masks.empty()) {
    auto opened = pool.open_frozen(layer);
    if (!opened) {
      if (gone()) return ended(HashResult::Outcome::kGone);
      if (opened.error().code == ENOENT)
        return make_error(EIO, "layer {}: file {} is missing, but the index says it holds data", id,
                          pool.layer_path(layer));
      return make_error(opened.error().code, "layer {}: {}", id, opened.error().message);
    }
    file = *opened;
  }

  // Rows wait here until a transaction takes them; it writes them only while the layer is
  // still frozen-unhashed (hasher.h).
  std::vector<std::pair<std::string, std::string>> rows;
  std::optional<HashResult::Outcome> stopped_by_index;
  auto commit_rows = [&]() -> Status {
    LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
      LayerRecord cur;
      LAYER_ASSIGN(stopped_by_index, check_pending(txn, id, &cur));
      if (stopped_by_index) return {};
      for (const auto& [key, value] : rows) LAYER_TRY(txn.put(Db::kSums, key, value));
      return {};
    }));
    rows.clear();
    if (!stopped_by_index) pool.test_point("hash.rows-committed");
    return {};
  };

  Pacer pacer(options.rate_bytes_per_sec, options.stop);
  std::vector<uint8_t> buf(uint64_t{kGroupsPerRead} * kSumGroupBytes);
  for (const auto& [row, mask] : masks) {
    std::vector<uint64_t> sums(kSumsPerRow, 0);
    for (uint32_t i = 0; i < kSumsPerRow;) {
      if (!((mask >> i) & 1)) {
        ++i;
        continue;
      }
      uint32_t j = i;
      while (j < kSumsPerRow && ((mask >> j) & 1) && j - i < kGroupsPerRead) ++j;
      // The groups [i, j) of this row, one read; the last group of the layer may be short.
      const uint64_t off = (uint64_t{row} * kSumsPerRow + i) * kSumGroupBytes;
      const uint64_t len =
          std::min<uint64_t>((j - i) * uint64_t{kSumGroupBytes}, layer.size_bytes - off);
      if (!pacer.admit(len)) return ended(HashResult::Outcome::kStopped);
      if (auto s = file->read(buf.data(), len, off); !s) {
        if (gone()) return ended(HashResult::Outcome::kGone);
        return make_error(s.error().code, "layer {}: {}", id, s.error().message);
      }
      for (uint32_t g = i; g < j; ++g) {
        const uint64_t at = uint64_t{g - i} * kSumGroupBytes;
        sums[g] = group_checksum(buf.data() + at, std::min<uint64_t>(kSumGroupBytes, len - at));
        ++result.groups;
      }
      result.bytes += len;
      i = j;
    }
    rows.emplace_back(key_u64_u32(id, row), encode_sums(sums));
    if (rows.size() >= rows_per_txn) {
      LAYER_TRY(commit_rows());
      if (stopped_by_index) return ended(*stopped_by_index);
    }
  }
  if (!rows.empty()) {
    LAYER_TRY(commit_rows());
    if (stopped_by_index) return ended(*stopped_by_index);
  }
  pool.test_point("hash.all-rows-committed");
  if (stop_requested(options)) return ended(HashResult::Outcome::kStopped);

  // The switch: only a layer still frozen-unhashed becomes frozen.
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LayerRecord cur;
    LAYER_ASSIGN(stopped_by_index, check_pending(txn, id, &cur));
    if (stopped_by_index) return {};
    cur.state = LayerState::kFrozen;
    return txn.put(Db::kLayers, key_u64(id), encode(cur));
  }));
  return ended(stopped_by_index.value_or(HashResult::Outcome::kHashed));
}

namespace {

// The frozen-unhashed layers, oldest (lowest id) first.
Result<std::vector<LayerId>> unhashed_layers(Pool& pool) {
  std::vector<LayerId> ids;
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_TRY(txn.scan(Db::kLayers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    auto id = decode_key_u64(k);
    if (!id) return make_error(EIO, "layers: key of {} bytes", k.size());
    LAYER_ASSIGN(auto rec, decode_layer(v, *id));
    if (rec.state == LayerState::kFrozenUnhashed) ids.push_back(*id);
    return true;
  }));
  return ids;
}

}  // namespace

Result<uint64_t> count_unhashed(Pool& pool) {
  LAYER_ASSIGN(auto ids, unhashed_layers(pool));
  return uint64_t{ids.size()};
}

Result<HashPendingReport> hash_pending(Pool& pool, const HashOptions& options) {
  if (pool.read_only()) return make_error(EACCES, "pool {} is open read-only", pool.paths().root);
  HashPendingReport report;
  LAYER_ASSIGN(auto pending, unhashed_layers(pool));
  for (LayerId id : pending) {
    if (stop_requested(options)) {
      report.stopped = true;
      break;
    }
    if (options.skip_held) {
      auto held = pool.locks().is_locked(LockKind::kLayer, id);
      if (!held) {
        report.failed.push_back(fmt::format("layer {}: {}", id, held.error().message));
        continue;
      }
      if (*held) {
        report.held.push_back(id);
        continue;
      }
    }
    auto r = hash_layer(pool, id, options);
    if (!r) {
      report.failed.push_back(r.error().message);
      continue;
    }
    report.bytes += r->bytes;
    if (r->outcome == HashResult::Outcome::kHashed)
      report.hashed.push_back({id, r->bytes, r->groups});
    if (r->outcome == HashResult::Outcome::kStopped) {
      report.stopped = true;
      break;
    }
  }
  LAYER_ASSIGN(report.still_unhashed, count_unhashed(pool));
  return report;
}

Status lower_thread_priority() {
  // ioprio.h's values (not every libc installs the header): class idle, who = a thread.
  constexpr int kIoprioWhoProcess = 1, kIoprioClassIdle = 3, kIoprioClassShift = 13;
  const pid_t tid = ::gettid();
  Status status;
  if (::syscall(SYS_ioprio_set, kIoprioWhoProcess, tid, kIoprioClassIdle << kIoprioClassShift) != 0)
    status = sys_error(errno, "ioprio_set(IOPRIO_CLASS_IDLE) of thread {}", tid);
  // Linux keeps nice values per thread: this lowers only the calling one.
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), 19) != 0 && status.ok())
    status = sys_error(errno, "setpriority(nice 19) of thread {}", tid);
  return status;
}

// ---- BackgroundHasher ----

Result<std::unique_ptr<BackgroundHasher>> BackgroundHasher::start(Pool& pool, Options options) {
  std::unique_ptr<BackgroundHasher> hasher(new BackgroundHasher(pool, std::move(options)));
  try {
    hasher->thread_ = std::thread([h = hasher.get()] { h->run(); });
  } catch (const std::system_error& e) {
    return make_error(e.code().value() ? e.code().value() : EAGAIN,
                      "cannot start the hasher thread: {}", e.what());
  }
  return hasher;
}

BackgroundHasher::~BackgroundHasher() {
  stop_.request_stop();  // wakes the idle wait, a rate-limit sleep, and ends a hash between reads
  if (thread_.joinable()) thread_.join();
}

void BackgroundHasher::nudge() {
  nudged_ = true;
  stop_.wake();
}

void BackgroundHasher::log(bool error, const std::string& line) const {
  if (options_.log) options_.log(error, line);
}

void BackgroundHasher::run() {
  if (auto s = lower_thread_priority(); !s)
    log(true, fmt::format("hasher: {}; hashing at normal priority", s.error().message));
  HashOptions hash = options_.hash;
  hash.stop = &stop_;
  std::set<std::string> reported;  // failures already logged: each is logged once
  while (!stop_.stop_requested()) {
    nudged_ = false;
    // Nothing may escape the thread (std::terminate): an exception is logged and the next
    // pass tries again.
    try {
      auto report = hash_pending(pool_, hash);
      if (!report) {
        if (reported.insert(report.error().message).second)
          log(true, fmt::format("hasher: {}", report.error().message));
      } else {
        for (const auto& l : report->hashed)
          log(false, fmt::format("hasher: layer {} hashed ({} bytes in {} checksum groups)", l.id,
                                 l.bytes, l.groups));
        for (const auto& line : report->failed)
          if (reported.insert(line).second) log(true, fmt::format("hasher: {}", line));
      }
    } catch (const std::exception& e) {
      log(true, fmt::format("hasher: {}", e.what()));
    }
    stop_.wait_until(Clock::now() + options_.interval, [&] { return nudged_.load(); });
  }
}

}  // namespace layer
