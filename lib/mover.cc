// mover.cc — move_layer and the recovery of an interrupted move.
#include "mover.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "block_map.h"
#include "checksum.h"
#include "intents.h"
#include "layers.h"
#include "locks.h"

namespace layer {
namespace {

Tier other_tier(Tier t) { return t == Tier::kSsd ? Tier::kHdd : Tier::kSsd; }

// Bytes compare_files reads from each file at a time.
constexpr uint64_t kCompareBytes = 4 << 20;

// The layer's row, or std::nullopt when it has none.
Result<std::optional<LayerRecord>> read_layer(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
  if (!v) return std::optional<LayerRecord>();
  LAYER_ASSIGN(auto rec, decode_layer(*v, id));
  return std::optional<LayerRecord>(rec);
}

// The container whose delta is `id`. Errors: EIO when none is (a writable layer is always one).
Result<ContainerRecord> container_of_delta(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto found, find_container_of_delta(pool, id));
  if (!found) return make_error(EIO, "layer {}: writable, but no container's delta", id);
  return *found;
}

// Removes the copy the layer's row does not name and deletes the intent.
// REQUIRES: the layer's move lock held.
Status recover_locked(Pool& pool, uint64_t intent_id, const IntentRecord& intent) {
  LAYER_ASSIGN(const Tier to, move_file_tier(intent_id, intent));
  LAYER_ASSIGN(auto row, read_layer(pool, intent.layer));
  if (!row || row->tier != to) LAYER_TRY(pool.store(to).remove(intent.layer));
  if (!row || row->tier == to) LAYER_TRY(pool.store(other_tier(to)).remove(intent.layer));
  return pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto current, txn.get(Db::kIntents, key_u64(intent_id)));
    if (!current) return {};
    return txn.del(Db::kIntents, key_u64(intent_id));
  });
}

// Compares the two files' bytes over every data range of either in [offset, offset+len).
// Errors: EIO naming the first range that differs, those of the reads.
Status compare_files(LayerFile& src, LayerFile& copy, uint64_t offset, uint64_t len, LayerId id) {
  std::vector<uint8_t> a, b;
  Status status;
  auto compare = [&](uint64_t start, uint64_t n_bytes) {
    if (a.empty()) {
      a.resize(kCompareBytes);
      b.resize(kCompareBytes);
    }
    for (uint64_t done = 0; status.ok() && done < n_bytes;) {
      const uint64_t n = std::min<uint64_t>(a.size(), n_bytes - done);
      status = src.read(a.data(), n, start + done);
      if (status.ok()) status = copy.read(b.data(), n, start + done);
      if (status.ok() && std::memcmp(a.data(), b.data(), n) != 0)
        status = make_error(EIO, "layer {}: the copy in {} differs from {} in [{}, {})", id,
                            copy.path(), src.path(), start + done, start + done + n);
      done += n;
    }
  };
  LAYER_TRY(src.data_extents(offset, len, compare));
  LAYER_TRY(status);
  // The copy's own data ranges: where the source has a hole, the copy must read as zeroes.
  LAYER_TRY(copy.data_extents(offset, len, compare));
  return status;
}

// Whether the index maps any block of layer `id` to data in its file.
Result<bool> index_has_data(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  bool found = false;
  LAYER_TRY(
      txn.scan(Db::kMaps, key_u64(id), [&](std::string_view, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto bits, decode_chunk(v));
        for (uint32_t i = 0; i < kBlocksPerChunk && !found; ++i)
          found = bits.get(i) == BlockState::kData;
        return !found;
      }));
  return found;
}

// Checks, in the copy, every 64 KiB group that the layer's `sums` hash and that starts in
// [offset, offset+len) (offset a multiple of 64 KiB). Errors: EIO naming the offset and both
// hashes, those of the reads and of the index.
Status verify_sums(Pool& pool, LayerFile& copy, const LayerRecord& layer, uint64_t offset,
                   uint64_t len) {
  const uint64_t row_bytes = uint64_t{kSumsPerRow} * kSumGroupBytes;
  const uint64_t end = std::min(offset + len, layer.size_bytes);
  std::vector<uint8_t> buf;
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  for (uint64_t row = offset / row_bytes; row * row_bytes < end; ++row) {
    LAYER_ASSIGN(auto v, txn.get(Db::kSums, key_u64_u32(layer.id, static_cast<uint32_t>(row))));
    if (!v) continue;
    LAYER_ASSIGN(auto sums, decode_sums(*v));
    // Runs of hashed groups are read in one go and hashed from the buffer.
    for (size_t i = 0; i < sums.size();) {
      const uint64_t off = row * row_bytes + i * kSumGroupBytes;
      if (sums[i] == 0 || off < offset || off >= end) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < sums.size() && sums[j] != 0 && row * row_bytes + j * kSumGroupBytes < end) ++j;
      // The last group may be short (the layer's end); fsck reports groups past it.
      const uint64_t run_bytes =
          std::min<uint64_t>((j - i) * kSumGroupBytes, layer.size_bytes - off);
      if (buf.size() < run_bytes) buf.resize(row_bytes);
      LAYER_TRY(copy.read(buf.data(), run_bytes, off));
      for (size_t g = i; g < j; ++g) {
        const uint64_t g_off = (g - i) * kSumGroupBytes;
        const uint64_t g_len = std::min<uint64_t>(kSumGroupBytes, run_bytes - g_off);
        const uint64_t got = group_checksum(buf.data() + g_off, g_len);
        if (got != sums[g])
          return make_error(EIO,
                            "layer {}: the copy in {} at offset {} hashes to {:016x}, "
                            "its checksum is {:016x}",
                            layer.id, copy.path(), off + g_off, got, sums[g]);
      }
      i = j;
    }
  }
  return {};
}

// A move is background work: the copy's threads go to the idle I/O class (mq-deadline holds
// back idle-class requests while any other is queued or in flight, for up to its
// prio_aging_expire, 10 s; BFQ serves them when nothing else waits) and 10 nice steps below
// the thread that asked for the move (at most 19), so that the clients of served layers go
// first; with nothing else waiting, the copy goes at full speed. Not nice 19 outright: on a
// host busy with other work a move would all but stop. A failure leaves the thread as it was.
void lower_copy_thread_priority() {
  constexpr int kIoprioWhoProcess = 1, kIoprioClassIdle = 3, kIoprioClassShift = 13;
  const pid_t tid = ::gettid();
  (void)::syscall(SYS_ioprio_set, kIoprioWhoProcess, tid, kIoprioClassIdle << kIoprioClassShift);
  errno = 0;
  const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(tid));  // inherited
  if (errno == 0)
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), std::min(19, nice + 10));
}

// Steps 2 and 3: the copy, synced and verified. Returns the source's data bytes.
//
// Each piece of the copy is verified as soon as it is written, on a second thread while the
// next piece is copied (LayerStore::copy_to), rather than by reading the whole copy back after
// its fdatasync: the move then costs about what a plain copy does. Both read the copy through
// the page cache (its pages are still there after the sync), so they check the same bytes:
// what the copy hands the filesystem to write, which is what a bad source read, a wrong copy
// (offsets, lengths, holes) or a buggy store would spoil. Neither reads the destination device
// back (O_DIRECT would, at the cost of a third pass over the data through the device, the one
// resource a move is short of); a write the device loses is found as for any layer at rest, by
// `layer scrub`, `fsck --full` or `verify=on` reads (DESIGN.md "Checksums").
// REQUIRES: this process holds the layer's lock once, shared (move_layer's).
Result<uint64_t> copy_and_verify(Pool& pool, const LayerRecord& layer, Tier to,
                                 const MoveOptions& move_options) {
  LayerStore& src_store = pool.store(layer.tier);
  LAYER_ASSIGN(auto src_size, src_store.stat(layer.id));
  if (!src_size) {
    // No file: nothing to copy when no data was ever written (a delta never written, its
    // snapshot); a file lost while the index has data in it is damage, not a move's business.
    LAYER_ASSIGN(const bool has_data, index_has_data(pool, layer.id));
    if (has_data)
      return make_error(EIO,
                        "layer {}: its file {} is missing, but the index has data in it; nothing "
                        "moved (`layer fsck` reports it)",
                        layer.id, src_store.describe(layer.id));
    return uint64_t{0};
  }
  CopyOptions options;
  options.piece_bytes = move_options.piece_bytes;
  options.rate_bytes_per_sec = move_options.rate_bytes_per_sec;
  options.thread_setup = lower_copy_thread_priority;
  // A layer some server reads (it holds the layer's lock, beside ours) keeps what the copy
  // reads and writes in the page cache: its clients read the pages the copy brings in, and
  // after the switch they read the copy's. A layer nobody reads leaves the page cache as the
  // copy found it, instead of two copies of itself pushing out what is in use.
  LAYER_ASSIGN(options.keep_cache, pool.locks().held_by_others(LockKind::kLayer, layer.id, 1));
  options.check = [&](LayerFile& src, LayerFile& copy, uint64_t offset, uint64_t len) -> Status {
    pool.test_point("move.piece-copied");
    if (layer.state == LayerState::kFrozen) return verify_sums(pool, copy, layer, offset, len);
    return compare_files(src, copy, offset, len, layer.id);
  };
  LAYER_ASSIGN(uint64_t data_bytes, src_store.copy_to(layer.id, pool.store(to), options));
  pool.test_point("move.copied");
  LAYER_ASSIGN(auto copy, pool.store(to).open(layer.id, false));
  LAYER_ASSIGN(uint64_t copy_size, copy->size());
  if (copy_size != *src_size)
    return make_error(EIO, "layer {}: the copy in {} is {} bytes, the source {}", layer.id,
                      copy->path(), copy_size, *src_size);
  // Checksums of groups past the file's end (it reads as zeroes there), if any.
  if (layer.state == LayerState::kFrozen && layer.size_bytes > copy_size) {
    const uint64_t tail = (copy_size + kSumGroupBytes - 1) / kSumGroupBytes * kSumGroupBytes;
    if (tail < layer.size_bytes)
      LAYER_TRY(verify_sums(pool, *copy, layer, tail, layer.size_bytes - tail));
  }
  pool.test_point("move.verified");
  return data_bytes;
}

}  // namespace

Result<Tier> move_file_tier(uint64_t intent_id, const IntentRecord& intent) {
  auto tier = parse_tier(intent.target);
  if (!tier)
    return make_error(EIO, "intent {}: move to \"{}\", not a tier", intent_id, intent.target);
  return *tier;
}

Result<bool> recover_move(Pool& pool, uint64_t intent_id, const IntentRecord& intent) {
  auto lock = pool.locks().try_lock(LockKind::kMove, intent.layer, true,
                                    fmt::format("the move of layer {}", intent.layer));
  if (!lock) {
    if (lock.error().code == EBUSY) return false;  // a mover runs
    return std::move(lock).error();
  }
  LAYER_TRY(recover_locked(pool, intent_id, intent));
  return true;
}

Result<std::optional<ContainerRecord>> find_container_of_delta(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  std::optional<ContainerRecord> found;
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto c, decode_container(v, k));
        if (c.delta_layer == id) found = std::move(c);
        return !found;
      }));
  return found;
}

Status finish_moves_of(Pool& pool, LayerId id) {
  LAYER_ASSIGN(auto moves, intents(pool, IntentRecord::Kind::kMove));
  for (const auto& [intent_id, intent] : moves)
    if (intent.layer == id) LAYER_TRY(recover_locked(pool, intent_id, intent));
  return {};
}

Result<uint64_t> begin_move(Pool& pool, LayerId id, Tier to) {
  // Any file of this layer in `to` is a leftover: the row names the other tier and no mover
  // (the move lock) writes there.
  LAYER_TRY(pool.store(to).remove(id));
  uint64_t intent_id = 0;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(intent_id, txn.next_id("intent"));
    IntentRecord intent{IntentRecord::Kind::kMove, id, to_string(to), now_unix()};
    return txn.put(Db::kIntents, key_u64(intent_id), encode(intent));
  }));
  pool.test_point("move.intent-committed");
  return intent_id;
}

Status switch_tier(Pool& pool, LayerId id, Tier from, Tier to, uint64_t intent_id) {
  return pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
    if (!v) return make_error(ENOENT, "layer {} was removed during its move", id);
    LAYER_ASSIGN(auto rec, decode_layer(*v, id));
    if (rec.tier != from) return make_error(EBUSY, "layer {} changed tier during its move", id);
    LAYER_ASSIGN(auto current, txn.get(Db::kIntents, key_u64(intent_id)));
    if (!current) return make_error(EIO, "layer {}: its move intent was recovered meanwhile", id);
    rec.tier = to;
    return txn.put(Db::kLayers, key_u64(id), encode(rec));
  });
}

Status end_move(Pool& pool, uint64_t intent_id, LayerId id, Tier to) {
  return recover_locked(pool, intent_id,
                        IntentRecord{IntentRecord::Kind::kMove, id, to_string(to), 0});
}

Result<MoveResult> move_layer(Pool& pool, LayerId id, Tier to, const MoveOptions& options) {
  LAYER_TRY(pool.check_writable());
  if (options.piece_bytes == 0 || options.piece_bytes % kSumGroupBytes != 0)
    return make_error(EINVAL, "move of layer {}: piece size {} is not a positive multiple of {}",
                      id, options.piece_bytes, kSumGroupBytes);
  LAYER_ASSIGN(Lock move_lock, pool.locks().try_lock(LockKind::kMove, id, true,
                                                     fmt::format("layer {} (being moved)", id)));
  LAYER_ASSIGN(auto first, read_layer(pool, id));
  if (!first) return make_error(ENOENT, "layer {} not found in pool {}", id, pool.paths().root);
  Lock container_lock;
  if (first->state == LayerState::kWritable) {
    // A delta changes under its server: only an offline one moves here.
    LAYER_ASSIGN(auto c, container_of_delta(pool, id));
    LAYER_ASSIGN(container_lock, pool.locks().try_lock(LockKind::kContainer, c.id, true,
                                                       fmt::format("container \"{}\"", c.name)));
  }
  // Shared: readers go on; merges and drops, which need it exclusively, wait for the move.
  LAYER_ASSIGN(Lock layer_lock,
               pool.locks().try_lock(LockKind::kLayer, id, false, fmt::format("layer {}", id)));
  // Read again under the locks: a merge or a snapshot may have changed it before.
  LAYER_ASSIGN(auto row, read_layer(pool, id));
  if (!row) return make_error(ENOENT, "layer {} not found in pool {}", id, pool.paths().root);
  const LayerRecord layer = *row;
  MoveResult result{id, layer.tier, to, false, 0, layer.state};
  if (layer.state != first->state)
    return make_error(EBUSY, "layer {} changed meanwhile (it was frozen); try again", id);
  // A move of this layer that a crash interrupted: finish it first (we hold its move lock).
  LAYER_TRY(finish_moves_of(pool, id));
  if (layer.tier == to) return result;
  LAYER_ASSIGN(const uint64_t intent_id, begin_move(pool, id, to));
  // Until the switch commits, a failure removes the copy, then the intent (a failure of that
  // leaves the intent for recover_move).
  const IntentRecord intent{IntentRecord::Kind::kMove, id, to_string(to), 0};
  auto fail = [&](Error e) -> Error {
    (void)recover_locked(pool, intent_id, intent);
    return e;
  };
  auto copied = copy_and_verify(pool, layer, to, options);
  if (!copied) return fail(std::move(copied).error());
  result.data_bytes = *copied;

  auto switched = switch_tier(pool, id, layer.tier, to, intent_id);
  if (!switched) return fail(std::move(switched).error());
  pool.test_point("move.switched");
  // Readers holding the old file keep reading it (same content) until they let it go. The
  // intent stays until the old file is gone, so a crash here leaves no orphan.
  auto removed = recover_locked(pool, intent_id, intent);
  if (!removed)
    return make_error(removed.error().code,
                      "layer {} moved to {}, but its old file stays: {} (`layer fsck --repair` "
                      "removes it)",
                      id, to_string(to), removed.error().message);
  result.moved = true;
  return result;
}

}  // namespace layer
