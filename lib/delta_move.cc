// delta_move.cc — Disk::move_delta: a served container's delta moved to the other tier while
// its clients read and write (DESIGN.md "Tiering mover"; docs/design.md "Live delta moves").
//
// Design notes:
// - Who: the server that serves the container (the CLI asks it through its control socket), so
//   that one process holds the delta, its file and its map; the layer's move lock and a kMove
//   intent, as move_layer's (mover.h), make a crash at any step recoverable by recover_move.
// - Tracking: before the copy starts, the view's delta file is wrapped in a TrackingFile (with
//   the write gate closed for a moment, so that no write in flight escapes it), which marks the
//   blocks of every write and punch before and after the I/O.
// - Copy: the store's copy_to (sparse, the kernel's copy_file_range) while writes go on.
// - Mirror: then the TrackingFile writes every write and punch into the copy too, under
//   per-block stripe locks, and catch-up rounds copy the marked blocks (an all-zero block as a
//   hole) under the same locks, reading each back and comparing it with the source; then the
//   whole copy is compared with the source (a live delta has no checksums), piece by piece
//   under the locks. A block that differs is marked and copied again. Mirroring is what makes
//   the rounds converge when clients write faster than a round copies: nothing but a failure
//   marks a block once it is on.
// - Invariant before the switch: every block of the copy equals the source's (mirrored writes
//   keep it so) or is marked.
// - Switch: flush rounds held, then with the gate closed the marked blocks are copied and
//   compared, strictly now (a difference is EIO), and a view sharing the maps serves the copy;
//   the gate reopens; the copy is synced and one transaction switches the row before any round
//   may commit marks of writes to the copy. Reads in flight finish on the old file (the old
//   view holds it), which is removed last.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "dirty_tracker.h"
#include "disk.h"

namespace layer {
namespace {

using Runs = DirtyTracker::Runs;
using Clock = std::chrono::steady_clock;

// Copies and comparisons read at most this much at a time.
constexpr uint64_t kPieceBytes = 1 << 20;

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// Runs a function when it goes out of scope.
class OnExit {
 public:
  explicit OnExit(std::function<void()> fn) : fn_(std::move(fn)) {}
  ~OnExit() { fn_(); }
  OnExit(const OnExit&) = delete;
  OnExit& operator=(const OnExit&) = delete;

 private:
  std::function<void()> fn_;
};

bool all_zero(const uint8_t* p, uint64_t n) {
  return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}

// Calls fn(offset, len, first_block, blocks) for the pieces (at most kPieceBytes, whole blocks
// but the disk's last) that cover runs. Stops at the first error.
template <typename Fn>
Status for_each_piece(const Runs& runs, uint32_t bs, uint64_t size_bytes, Fn&& fn) {
  const uint64_t piece_blocks = std::max<uint64_t>(1, kPieceBytes / bs);
  for (const auto& [first, count] : runs) {
    for (uint64_t b = first; b < first + count;) {
      const uint64_t n = std::min(piece_blocks, first + count - b);
      const uint64_t offset = b * bs;
      if (offset >= size_bytes) break;
      const uint64_t len = std::min(n * bs, size_bytes - offset);
      LAYER_TRY(fn(offset, len, b, n));
      b += n;
    }
  }
  return {};
}

// Copies and compares pieces of the delta's file (src) and its copy (dst), each with the
// stripes of its blocks held in the TrackingFile, so that no mirrored write to them is in
// flight meanwhile: a difference seen then is not a race with a client's write.
class Copier {
 public:
  Copier(LayerFile& src, LayerFile& dst, TrackingFile& guard, uint32_t bs, uint64_t size_bytes)
      : src_(src),
        dst_(dst),
        guard_(guard),
        bs_(bs),
        size_bytes_(size_bytes),
        a_(std::max<uint64_t>(kPieceBytes, bs)),
        b_(a_.size()) {}

  // Copies the blocks of `runs` as src reads them now (an all-zero block as a hole: punched, or
  // written as zeroes where the filesystem cannot punch), reads them back and calls
  // differ(block) for each that differs; stops at the first error differ returns. Adds the
  // bytes copied to *copied.
  template <typename Differ>
  Status copy(const Runs& runs, uint64_t* copied, Differ&& differ) {
    return for_each_piece(runs, bs_, size_bytes_,
                          [&](uint64_t offset, uint64_t len, uint64_t first, uint64_t n) {
                            return guard_.with_blocks_locked(first, n, [&]() -> Status {
                              LAYER_TRY(src_.read(a_.data(), len, offset));
                              LAYER_TRY(write_piece(offset, len));
                              *copied += len;
                              return check_piece(offset, len, first, differ);
                            });
                          });
  }

  // Calls differ(block) for each block of `runs` whose bytes in src and dst differ now.
  template <typename Differ>
  Status compare(const Runs& runs, Differ&& differ) {
    return for_each_piece(runs, bs_, size_bytes_,
                          [&](uint64_t offset, uint64_t len, uint64_t first, uint64_t n) {
                            return guard_.with_blocks_locked(first, n, [&]() -> Status {
                              LAYER_TRY(src_.read(a_.data(), len, offset));
                              return check_piece(offset, len, first, differ);
                            });
                          });
  }

 private:
  // Writes a_[0, len) at offset: consecutive blocks of one kind (data, or zeroes) in one write
  // or punch.
  Status write_piece(uint64_t offset, uint64_t len) {
    for (uint64_t at = 0; at < len;) {
      const bool zero = all_zero(a_.data() + at, std::min<uint64_t>(bs_, len - at));
      uint64_t end = at;
      while (end < len && all_zero(a_.data() + end, std::min<uint64_t>(bs_, len - end)) == zero)
        end += std::min<uint64_t>(bs_, len - end);
      Status s;
      if (zero) {
        s = dst_.punch(offset + at, end - at);
        if (!s && s.error().code == EOPNOTSUPP)
          s = dst_.write(a_.data() + at, end - at, offset + at);
      } else {
        s = dst_.write(a_.data() + at, end - at, offset + at);
      }
      LAYER_TRY(s);
      at = end;
    }
    return {};
  }
  // Reads dst's piece and compares it with a_ (src's), block by block.
  template <typename Differ>
  Status check_piece(uint64_t offset, uint64_t len, uint64_t first, Differ& differ) {
    LAYER_TRY(dst_.read(b_.data(), len, offset));
    for (uint64_t at = 0, block = first; at < len; at += bs_, ++block) {
      const uint64_t n = std::min<uint64_t>(bs_, len - at);
      if (std::memcmp(a_.data() + at, b_.data() + at, n) != 0) LAYER_TRY(differ(block));
    }
    return {};
  }

  LayerFile& src_;
  LayerFile& dst_;
  TrackingFile& guard_;
  const uint32_t bs_;
  const uint64_t size_bytes_;
  std::vector<uint8_t> a_, b_;
};

// The blocks that hold data in either file (their allocated ranges), as runs.
Result<Runs> data_runs(LayerFile& a, LayerFile& b, uint32_t bs, uint64_t size_bytes) {
  Runs runs;
  auto add = [&](uint64_t offset, uint64_t len) {
    if (len == 0) return;
    runs.emplace_back(offset / bs, (offset + len + bs - 1) / bs - offset / bs);
  };
  LAYER_TRY(a.data_extents(0, size_bytes, add));
  LAYER_TRY(b.data_extents(0, size_bytes, add));
  std::sort(runs.begin(), runs.end());
  Runs merged;
  for (const auto& [first, count] : runs) {
    if (!merged.empty() && first <= merged.back().first + merged.back().second)
      merged.back().second =
          std::max(merged.back().first + merged.back().second, first + count) - merged.back().first;
    else
      merged.emplace_back(first, count);
  }
  return merged;
}

}  // namespace

struct Disk::LiveMove {
  LayerId id = 0;
  Tier from = Tier::kSsd;
  Tier to = Tier::kSsd;
  uint64_t intent_id = 0;
  std::shared_ptr<DirtyTracker> tracker;
  std::shared_ptr<LayerFile> source;      // the delta's file, unwrapped
  std::shared_ptr<LayerFile> copy;        // its copy in `to`
  std::shared_ptr<TrackingFile> wrapper;  // the view's file while tracking
  bool tracking = false;                  // the current view writes through a TrackingFile
  bool published = false;                 // the current view serves the copy
  bool switched = false;                  // the row's switch committed
  MoveResult result;
};

Result<MoveResult> Disk::move_delta(LayerId id, Tier to, const MoveOptions& options) {
  if (!writable_ || snapshot_)
    return make_error(EPERM, "container \"{}\" is open read-only", name_);
  LAYER_TRY(fail_if_broken());
  // No snapshot, rollback or other live change meanwhile: they would replace the delta.
  std::lock_guard<std::mutex> live(live_mu_);
  const LayerRecord delta = delta_layer();
  if (delta.id != id)
    return make_error(EBUSY, "container \"{}\": its delta is layer {}, not {}", name_, delta.id,
                      id);
  LAYER_ASSIGN(Lock move_lock, pool_.locks().try_lock(LockKind::kMove, id, true,
                                                      fmt::format("layer {} (being moved)", id)));
  // A move of this layer that a crash interrupted: finish it first (we hold its move lock).
  LAYER_TRY(finish_moves_of(pool_, id));
  LiveMove m;
  m.id = id;
  m.from = delta.tier;
  m.to = to;
  m.result.layer = id;
  m.result.from = delta.tier;
  m.result.to = to;
  m.result.state = LayerState::kWritable;
  if (delta.tier == to) return m.result;
  LAYER_TRY(loaded_view());  // the view to wrap (no request may have come yet)
  // Rounds commit to the index while the delta moves (the tracker and the comparison see the
  // disk's blocks, not the journal's zone): the journal is folded and closed first, and
  // opened again by the first round after the move.
  std::shared_ptr<JournalState> journal;
  {
    std::shared_ptr<View> v = pin();
    LAYER_TRY(flush());
    hold_rounds();
    Status s = retire_journal(*v);
    if (s && v->journal) {
      journal = v->journal;
      std::lock_guard<std::mutex> lk(journal->mu);
      ++journal->suspended;
    }
    release_rounds();
    LAYER_TRY(s);
  }
  struct Resume {
    std::shared_ptr<JournalState> j;
    ~Resume() {
      if (!j) return;
      std::lock_guard<std::mutex> lk(j->mu);
      --j->suspended;
    }
  } resume{journal};
  LAYER_ASSIGN(m.intent_id, begin_move(pool_, id, to));
  // Until the switch commits, a failure unwraps the delta's file, then removes the copy and
  // the intent (a failure of that leaves the intent to recover_move).
  auto fail = [&](Error e) -> Error {
    move_untrack(m);
    m.copy.reset();
    (void)end_move(pool_, m.intent_id, id, to);
    return e;
  };
  auto tracked = move_track(m);
  if (!tracked) return fail(std::move(tracked).error());
  if (!m.switched) {
    auto copied = move_copy(m, options);
    if (!copied) return fail(std::move(copied).error());
    pool_.test_point("move.caught-up");
    auto switched = move_switch(m);
    // Once the disk served the copy, a failure broke the disk (its requests fail until it is
    // reopened) and leaves the intent to recover_move, which removes the copy.
    if (!switched)
      return m.published ? std::move(switched).error() : fail(std::move(switched).error());
  }
  // The disk serves the copy; reads still on the old view finish on the old, unlinked file.
  // The intent stays until the old file is gone, so a crash before leaves no orphan.
  m.source.reset();
  auto removed = end_move(pool_, m.intent_id, id, to);
  if (!removed)
    return make_error(removed.error().code,
                      "layer {} moved to {}, but its old file stays: {} (`layer fsck --repair` "
                      "removes it)",
                      id, to_string(to), removed.error().message);
  m.result.moved = true;
  return m.result;
}

Status Disk::move_track(LiveMove& m) {
  auto tracker = std::make_shared<DirtyTracker>(size_blocks_);
  // Outside the gate: a running round ends before writes wait.
  hold_rounds();
  OnExit rounds([&] { release_rounds(); });
  const auto closing = Clock::now();
  // Closed for as long as the writes in flight take to return: none of them escapes the tracker.
  std::unique_lock<WriteGate> closed(gate_);
  std::lock_guard<std::mutex> lk(load_mu_);
  const std::shared_ptr<View> v = pin();  // loaded by move_delta; live_mu_ keeps it current
  std::shared_ptr<LayerFile> file;
  {
    std::lock_guard<std::mutex> flk(v->file_mu);
    file = v->file;
  }
  if (!file) {
    // Never written: nothing to copy. The row alone moves, and the first write creates the
    // file in the new tier (the view's delta_layer.tier).
    auto next = view_with_file(*v, nullptr, m.to, false);
    LAYER_TRY(switch_tier(pool_, m.id, m.from, m.to, m.intent_id));
    m.switched = true;
    pool_.test_point("move.switched");
    publish_view(std::move(next));
    delta_layer_.tier = m.to;
    m.result.start_pause_ms = ms(Clock::now() - closing);
    return {};
  }
  m.tracker = std::move(tracker);
  m.source = file;
  m.wrapper = std::make_shared<TrackingFile>(std::move(file), m.tracker, block_size_);
  publish_view(view_with_file(*v, m.wrapper, m.from, true));
  m.tracking = true;
  m.result.start_pause_ms = ms(Clock::now() - closing);
  return {};
}

Status Disk::move_copy(LiveMove& m, const MoveOptions& options) {
  // The bulk copy, while writes go on: the store's (sparse, in the kernel where it can).
  CopyOptions copy_options;
  copy_options.rate_bytes_per_sec = options.rate_bytes_per_sec;
  LAYER_TRY(pool_.store(m.from).copy_to(m.id, pool_.store(m.to), copy_options));
  pool_.test_point("move.copied");
  LAYER_ASSIGN(m.copy, pool_.store(m.to).open(m.id, true));
  LAYER_ASSIGN(const uint64_t src_size, m.source->size());
  LAYER_ASSIGN(const uint64_t copy_size, m.copy->size());
  if (copy_size != src_size)
    return make_error(EIO, "layer {}: the copy in {} is {} bytes, the source {}", m.id,
                      m.copy->path(), copy_size, src_size);
  LAYER_TRY(m.source->data_extents(0, src_size,
                                   [&](uint64_t, uint64_t len) { m.result.data_bytes += len; }));

  // From now on the clients' writes go to both files; the marked blocks (written during the
  // bulk copy) only need copying once more, as nothing marks them again but a failure.
  m.wrapper->start_mirror(m.copy);
  Copier copier(*m.source, *m.copy, *m.wrapper, block_size_, size_bytes_);
  // A block that still differs once copied (under its stripe: no write in flight) is marked
  // and copied again; if it differs with the gate closed, the move fails then.
  auto mark = [&](uint64_t block) { return m.tracker->mark(block, 1); };
  auto rounds = [&]() -> Status {
    for (int round = 0; round < options.max_rounds; ++round) {
      at("move.catch-up");
      if (m.tracker->count() * block_size_ <= options.final_bytes) break;
      LAYER_ASSIGN(const Runs runs, m.tracker->take());
      LAYER_TRY(copier.copy(runs, &m.result.caught_up_bytes, mark));
      ++m.result.catch_up_rounds;
    }
    return m.wrapper->mirror_error();
  };
  LAYER_TRY(rounds());
  // The whole copy against the source (a live delta has no checksums): every data range of
  // either file (elsewhere both read as zeroes).
  LAYER_ASSIGN(const Runs all, data_runs(*m.source, *m.copy, block_size_, size_bytes_));
  LAYER_TRY(copier.compare(all, mark));
  LAYER_TRY(rounds());
  // Synced now, so that the sync after the switch covers only the last writes.
  return m.copy->sync();
}

Status Disk::move_switch(LiveMove& m) {
  // From the view's switch until the copy is synced and the row names its tier, no flush round
  // may commit marks of writes to the copy: rounds wait (and with them a client's flush).
  hold_rounds();
  OnExit rounds([&] { release_rounds(); });
  {
    const auto closing = Clock::now();
    std::unique_lock<WriteGate> closed(gate_);
    // No write in flight: the blocks marked since the last round are the last to copy, and
    // the copy must now equal the source wherever either holds data.
    Status s = [&]() -> Status {
      LAYER_ASSIGN(const Runs runs, m.tracker->take());
      Copier copier(*m.source, *m.copy, *m.wrapper, block_size_, size_bytes_);
      LAYER_TRY(copier.copy(runs, &m.result.caught_up_bytes, [&](uint64_t block) -> Status {
        return make_error(EIO,
                          "layer {}: block {} of the copy in {} differs from {} with "
                          "writes paused; the delta stays in {}",
                          m.id, block, m.copy->path(), m.source->path(), to_string(m.from));
      }));
      // A write the copy refused since the last round (its blocks were copied again above).
      LAYER_TRY(m.wrapper->mirror_error());
      pool_.test_point("move.verified");
      std::lock_guard<std::mutex> lk(load_mu_);
      publish_view(view_with_file(*pin(), m.copy, m.to, false));
      m.published = true;
      m.tracking = false;
      return {};
    }();
    if (!s) untrack_locked(m);
    m.result.pause_ms = ms(Clock::now() - closing);
    LAYER_TRY(s);
  }
  // Writes go on, to the copy. Its earlier writes synced (then the row switched) before any
  // round commits a mark naming them; a crash before the switch commits loses only writes no
  // flush acknowledged (the row names the source, whose marks are all committed).
  pool_.test_point("move.published");
  Status s = m.copy->sync();
  if (s) s = switch_tier(pool_, m.id, m.from, m.to, m.intent_id);
  if (!s) {
    // The disk cannot go back to the source (writes went to the copy) nor on with the copy.
    broken_.store(kBrokenMove, std::memory_order_release);
    return make_error(EIO,
                      "container \"{}\": the move of its delta, layer {}, to {} failed after the "
                      "disk switched to the copy: {}; reopen the disk",
                      name_, m.id, to_string(m.to), s.error().message);
  }
  m.switched = true;
  pool_.test_point("move.switched");
  std::lock_guard<std::mutex> lk(load_mu_);
  delta_layer_.tier = m.to;
  return {};
}

void Disk::untrack_locked(LiveMove& m) {
  if (!m.tracking) return;
  std::lock_guard<std::mutex> lk(load_mu_);
  publish_view(view_with_file(*pin(), m.source, m.from, true));
  m.tracking = false;
}

void Disk::move_untrack(LiveMove& m) {
  if (!m.tracking) return;
  hold_rounds();
  OnExit rounds([&] { release_rounds(); });
  std::unique_lock<WriteGate> closed(gate_);
  untrack_locked(m);
}

}  // namespace layer
