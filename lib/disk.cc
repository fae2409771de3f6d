// disk.cc — the I/O engine of an open container.
//
// Design notes (DESIGN.md "Read path", "Write path", "Durability"):
// - State: the delta's 2-bit map lives in memory (DeltaMap: chunks allocated on first touch,
//   words updated with atomics) and the frozen chain below it is one shared ChainMap. A block's
//   content is the delta's if the delta says data (or zero), else the chain map's source.
// - Read: walk the range in runs of blocks with one source (next_run) and issue one pread per
//   run (every layer file is same-offset) or one memset for zero/absent runs. No lock, no LMDB.
// - Write: blocks already data in the delta are written in place, lock-free. Otherwise the
//   request takes the striped locks of its blocks that are not data, re-checks, copies up its
//   partial head/tail blocks (content through the chain, merged with the request), writes, and
//   only after the writes returned marks the blocks data. Marking puts the chunks in the dirty
//   set.
// - Zero/trim: whole blocks are punched and marked zero (or left absent where nothing below
//   holds data: absent reads as zeroes too); partial blocks are written as zeroes.
// - Flush round: (1) take a copy of the dirty chunks' rows — every mark in them belongs to I/O
//   that already completed; (2) fdatasync the delta; (3) one LMDB transaction with the rows
//   (through the Committer, group-committed with other disks); (4) wake the flushes that joined
//   before (1). A failed transaction puts the chunks back; a failed fdatasync breaks the disk
//   (Linux may have dropped the dirty pages, so a retry could lie).
// - Heat (heat.h): each run read from a layer adds an op and its bytes to that layer's counter;
//   each write and punch of the delta one to the delta's. Relaxed atomics, nothing else.
// - Boot profile (boot_profile.h): a fresh disk's first request opens its boot window with the
//   pool's BootService; until it ends, each run read from a frozen layer is recorded there.
// - Verification (verify.h, Pool::verify_reads): a read from a `frozen` layer verifies the
//   64 KiB groups it touches, once per group per process, before reading.
#include "disk.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <map>

#include "boot_profile.h"
#include "index.h"
#include "index_restore.h"
#include "journal.h"
#include "layers.h"
#include "names.h"

namespace layer {
namespace {

// Values of Disk::broken_.
constexpr int kSyncFailed = 1;  // an fdatasync failed: Linux may have dropped the dirty pages
constexpr int kLostMarks = 2;   // a mark may have left the dirty set for want of memory
constexpr int kStale = 3;       // a live change committed but the disk could not follow it

// quiesce(): flush rounds with the gate open before closing it, until one takes less than this.
constexpr int kQuiesceRounds = 4;
constexpr auto kQuiesceQuickFlush = std::chrono::milliseconds(5);

// How long after a journaled round its rows wait to be folded into the index: the folds of
// the rounds meanwhile are one transaction.
constexpr auto kFoldDelay = std::chrono::milliseconds(50);

}  // namespace

// ---- open ----

namespace {

// Shared locks ("I read this") on each layer of chain, in order. Errors: EBUSY (one held
// exclusively: a merge or a build at work), EIO.
Result<std::vector<Lock>> lock_layers_shared(Pool& pool, const std::vector<LayerRecord>& chain) {
  std::vector<Lock> locks;
  for (const auto& layer : chain) {
    LAYER_ASSIGN(Lock l, pool.locks().try_lock(LockKind::kLayer, layer.id, false,
                                               fmt::format("layer {}", layer.id)));
    locks.push_back(std::move(l));
  }
  return locks;
}

struct LockedChain {
  ContainerRecord container;
  SnapshotRecord snapshot;
  std::vector<LayerRecord> chain;  // the snapshot's layer first
  std::vector<Lock> locks;         // shared, parallel to chain
};

// A snapshot's chain as read, then locked shared, then read again: the locks come before the
// rows we trust, so a `snapshot rm` (which drops a layer only under its exclusive lock) or a
// merge (exclusive locks on both layers) cannot take a layer away while the holder reads it.
// Errors: ENOENT (container or snapshot), EBUSY (a layer locked exclusively, or the chain
// changed between the two reads), EIO.
Result<LockedChain> locked_snapshot_chain(Pool& pool, const std::string& container,
                                          const std::string& snap) {
  LockedChain out;
  auto read = [&]() -> Result<std::vector<LayerRecord>> {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(out.container, pool.get_container(txn, container));
    LAYER_ASSIGN(out.snapshot, get_snapshot(txn, out.container, snap));
    return chain_of(txn, out.snapshot.layer);
  };
  LAYER_ASSIGN(out.chain, read());
  LAYER_ASSIGN(out.locks, lock_layers_shared(pool, out.chain));
  LAYER_ASSIGN(auto again, read());
  if (!std::equal(out.chain.begin(), out.chain.end(), again.begin(), again.end(),
                  [](const LayerRecord& a, const LayerRecord& b) { return a.id == b.id; }))
    return make_error(EBUSY, "snapshot \"{}\" of container \"{}\" changed meanwhile", snap,
                      container);
  out.chain = std::move(again);
  return out;
}

}  // namespace

Result<ExportName> parse_export_name(std::string_view name) {
  ExportName out;
  const auto at = name.find('@');
  out.container = std::string(name.substr(0, at));
  LAYER_TRY(validate_name(out.container, "container name"));
  if (at == std::string_view::npos) return out;
  std::string_view snap = name.substr(at + 1);
  if (const auto dots = snap.find(".."); dots != std::string_view::npos) {
    out.since = std::string(snap.substr(0, dots));
    snap = snap.substr(dots + 2);
    LAYER_TRY(validate_name(out.since, "snapshot name"));
  }
  out.snapshot = std::string(snap);
  LAYER_TRY(validate_name(out.snapshot, "snapshot name"));
  return out;
}

Result<std::shared_ptr<Disk>> Disk::open(Pool& pool, const std::string& name, bool writable) {
  LAYER_ASSIGN(auto parsed, parse_export_name(name));
  if (!parsed.snapshot.empty()) {
    if (writable) return make_error(EPERM, "snapshot {} is read-only", name);
    LAYER_ASSIGN(auto disk, open_snapshot(pool, name, parsed.container, parsed.snapshot));
    if (!parsed.since.empty()) {
      LAYER_ASSIGN(auto txn, pool.index().begin_read());
      LAYER_TRY(get_snapshot(txn, disk->container_, parsed.since));  // A exists
      disk->diff_since_ = parsed.container + "@" + parsed.since;
      disk->diff_of_ = parsed.container + "@" + parsed.snapshot;
    }
    return disk;
  }
  LAYER_TRY(validate_name(name, "container name"));
  if (writable && pool.read_only())
    return make_error(EACCES, "container \"{}\": pool {} is open read-only", name,
                      pool.paths().root);
  std::shared_ptr<Disk> disk(new Disk(pool));
  disk->name_ = name;
  disk->writable_ = writable;
  uint64_t id = 0;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_ASSIGN(auto rec, pool.get_container(txn, name));
    id = rec.id;
  }
  // The lock comes before the row we trust: a concurrent `rm` or rollback holds it while it
  // changes the row.
  LAYER_ASSIGN(disk->container_lock_, pool.locks().try_lock(LockKind::kContainer, id, writable,
                                                            fmt::format("container \"{}\"", name)));
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  LAYER_ASSIGN(disk->container_, pool.get_container(txn, name));
  if (disk->container_.id != id)
    return make_error(EBUSY, "container \"{}\" was replaced while opening", name);
  // After an index restore its map may not know its newest writes: never served silently.
  LAYER_TRY(check_not_stale(txn, disk->container_));
  LAYER_ASSIGN(disk->delta_layer_, get_layer(txn, disk->container_.delta_layer));
  if (disk->delta_layer_.parent != 0) {
    LAYER_ASSIGN(disk->chain_, chain_of(txn, disk->delta_layer_.parent));
  }
  LAYER_ASSIGN(disk->delta_lock_,
               pool.locks().try_lock(LockKind::kLayer, disk->delta_layer_.id, writable,
                                     fmt::format("layer {}", disk->delta_layer_.id)));
  LAYER_ASSIGN(disk->layer_locks_, lock_layers_shared(pool, disk->chain_));
  LAYER_TRY(disk->take_sizes());
  return disk;
}

Result<std::shared_ptr<Disk>> Disk::open_snapshot(Pool& pool, const std::string& name,
                                                  const std::string& container,
                                                  const std::string& snap) {
  std::shared_ptr<Disk> disk(new Disk(pool));
  disk->name_ = name;
  disk->snapshot_ = true;
  LAYER_ASSIGN(auto locked, locked_snapshot_chain(pool, container, snap));
  disk->container_ = std::move(locked.container);
  disk->chain_ = std::move(locked.chain);
  disk->layer_locks_ = std::move(locked.locks);
  const SnapshotRecord& rec = locked.snapshot;
  // No delta: an all-absent map over the snapshot's chain.
  disk->delta_layer_ = LayerRecord{0,
                                   rec.layer,
                                   Tier::kSsd,
                                   disk->container_.size_bytes,
                                   disk->container_.block_size,
                                   LayerState::kWritable,
                                   0,
                                   0};
  // Its layers are locked shared (a merge leaves them alone), the container not at all: the
  // live container may be served read-write beside it.
  LAYER_TRY(disk->take_sizes());
  return disk;
}

Status Disk::take_sizes() {
  size_bytes_ = container_.size_bytes;
  block_size_ = container_.block_size;
  LAYER_TRY(validate_records());
  size_blocks_ = (size_bytes_ + block_size_ - 1) / block_size_;
  return {};
}

Disk::Disk(Pool& pool) : pool_(pool) {}
Disk::~Disk() {
  if (boot_) boot_->close();  // the service persists what the window recorded
  // A fold queued for later must not write this journal's rows over what the next opener
  // recovers and writes (it may run after that opener's commits).
  if (auto v = pin(); v && v->journal) {
    std::lock_guard<std::mutex> lk(v->journal->mu);
    v->journal->abandoned = true;
  }
}

// The index is input from outside: a row that would make the maps or the files disagree is
// refused here rather than served.
Status Disk::validate_records() const {
  const uint32_t bs = block_size_;
  if (bs < kMinBlockSize || bs > kMaxBlockSize || (bs & (bs - 1)) != 0)
    return make_error(EIO,
                      "container \"{}\": block size {} in the index is not a power of two "
                      "from {} to {}",
                      name_, bs, kMinBlockSize, kMaxBlockSize);
  if (size_bytes_ == 0 || size_bytes_ % 512 != 0 || size_bytes_ > kMaxDiskBytes)
    return make_error(EIO,
                      "container \"{}\": size {} in the index is not a positive multiple of "
                      "512 up to {}",
                      name_, size_bytes_, kMaxDiskBytes);
  if (snapshot_) {
    // No delta to check; the chain below.
  } else if (delta_layer_.size_bytes != size_bytes_ || delta_layer_.block_size != bs)
    return make_error(EIO,
                      "container \"{}\": its delta layer {} has size {} and block size {}, "
                      "the container {} and {}",
                      name_, delta_layer_.id, delta_layer_.size_bytes, delta_layer_.block_size,
                      size_bytes_, bs);
  if (!snapshot_ && delta_layer_.state != LayerState::kWritable)
    return make_error(EIO, "container \"{}\": its delta layer {} is not writable", name_,
                      delta_layer_.id);
  for (const auto& layer : chain_) {
    if (layer.block_size != bs)
      return make_error(EIO,
                        "container \"{}\": layer {} of its chain has block size {}, the "
                        "container {}",
                        name_, layer.id, layer.block_size, bs);
    if (layer.state == LayerState::kWritable)
      return make_error(EIO, "container \"{}\": layer {} of its chain is writable", name_,
                        layer.id);
  }
  return {};
}

// A layer file shorter than its layer would read its tail as zeroes: refuse it.
Status Disk::check_file_size(LayerFile& file, const LayerRecord& layer) const {
  LAYER_ASSIGN(uint64_t actual, file.size());
  if (actual < layer.size_bytes)
    return make_error(EIO, "layer {}: file {} is {} bytes, index says {}", layer.id, file.path(),
                      actual, layer.size_bytes);
  return {};
}

std::shared_ptr<Disk::View> Disk::pin() const {
  std::lock_guard<std::mutex> lk(view_mu_);
  return view_;
}

Result<std::shared_ptr<Disk::View>> Disk::loaded_view() {
  if (auto v = pin()) return v;
  std::lock_guard<std::mutex> lk(load_mu_);
  if (auto v = pin()) return v;
  LAYER_ASSIGN(auto v, load_view());
  {
    std::lock_guard<std::mutex> vlk(view_mu_);
    view_ = v;
  }
  // Fresh: never written since the clone (no delta file). Its boot window opens now.
  if (BootService* boot = pool_.boot();
      boot && writable_ && !snapshot_ && !boot_ && !v->file_raw.load(std::memory_order_acquire)) {
    boot_ = boot->begin(name_, container_.image_ref, v->chain, v->chain_files);
    boot_raw_.store(boot_.get(), std::memory_order_release);
  }
  return v;
}

Result<std::shared_ptr<Disk::View>> Disk::load_view(const View* previous) {
  auto v = std::make_shared<View>();
  v->chain = chain_;
  v->delta_layer = delta_layer_;
  // Our delta's journal from before a crash (we hold its lock): into the index before the
  // delta's rows are read.
  if (writable_ && !snapshot_) LAYER_TRY(journal::recover(pool_, delta_layer_.id));
  LAYER_ASSIGN(auto txn, pool_.index().begin_read());
  LAYER_ASSIGN(v->chain_map,
               pool_.chains().get(txn, v->chain, previous ? previous->chain_map.get() : nullptr));
  for (const auto& layer : v->chain) {
    auto f = pool_.open_frozen(layer);
    if (!f && f.error().code != ENOENT) return std::move(f).error();
    if (f) LAYER_TRY(check_file_size(**f, layer));
    v->chain_files.push_back(f ? *f : nullptr);  // missing: an error only if a read needs it
    v->chain_heat.push_back(pool_.heat().counter(layer.id));
    v->chain_verify.push_back(pool_.verify_reads() && layer.state == LayerState::kFrozen
                                  ? pool_.verifiers().get(pool_.index(), layer)
                                  : nullptr);
  }
  v->delta = std::make_shared<DeltaMap>(size_blocks_);
  if (snapshot_) return v;  // no delta: the map stays all absent, no file
  v->delta_heat = pool_.heat().counter(v->delta_layer.id);
  const LayerId delta_id = v->delta_layer.id;
  const uint64_t nchunks = (size_blocks_ + kBlocksPerChunk - 1) / kBlocksPerChunk;
  if (writable_) {
    auto j = std::make_shared<JournalState>();
    j->layer = delta_id;
    j->zone = journal::zone_offset(size_bytes_);
    j->enabled = pool_.journal();
    LAYER_ASSIGN(auto st, journal::get_state(txn, delta_id));
    j->written = j->folded = st.checkpoint;
    v->journal = std::move(j);
  }
  bool delta_has_data = false;
  LAYER_TRY(for_each_map_row(txn, delta_id, [&](uint32_t c, const ChunkBits& bits) -> Result<bool> {
    if (c >= nchunks) return make_error(EIO, "layer {}: map row outside the disk", delta_id);
    for (uint32_t i = 0; i < kBlocksPerChunk && !delta_has_data; ++i)
      delta_has_data = bits.get(i) == BlockState::kData;
    v->delta->load(c, bits);
    return true;
  }));
  LayerStore& store = pool_.store(v->delta_layer.tier);
  auto f = store.open(delta_id, writable_);
  if (f) {
    LAYER_TRY(check_file_size(**f, v->delta_layer));
    // Its name may come from a create whose directory fsync failed, or from before a crash:
    // make it durable before a flush commits rows naming its data.
    if (writable_) LAYER_TRY((*f)->sync_entry());
    adopt_delta_file(*v, std::move(*f));
  } else if (f.error().code != ENOENT) {
    return std::move(f).error();
  } else if (delta_has_data) {
    // Creating an empty file now would serve every data block as zeroes without an error.
    return make_error(EIO,
                      "layer {}: file {} is missing, but the index says it holds data of "
                      "container \"{}\"",
                      delta_id, pool_.layer_path(v->delta_layer), name_);
  }
  return v;
}

Result<LayerFile*> Disk::delta_file_for_write(View& v) {
  if (LayerFile* f = v.file_raw.load(std::memory_order_acquire)) return f;
  std::lock_guard<std::mutex> lk(v.file_mu);
  if (v.file) return v.file.get();
  // Only a delta without data gets here (load_view refuses one whose file is missing).
  // Created, synced and its directory synced before any row naming its data is committed.
  LayerStore& store = pool_.store(v.delta_layer.tier);
  auto created = store.create(v.delta_layer.id, size_bytes_);
  if (created) {
    adopt_delta_file(v, std::move(*created));
    return v.file.get();
  }
  if (created.error().code != EEXIST) return std::move(created).error();
  // Left by an earlier create whose directory fsync failed (or a crash before any row named
  // it): nothing reads its blocks before they are written, so adopt it once its name is
  // durable and its size right.
  LAYER_ASSIGN(auto file, store.open(v.delta_layer.id, true));
  LAYER_TRY(check_file_size(*file, v.delta_layer));
  LAYER_TRY(file->sync_entry());
  adopt_delta_file(v, std::move(file));
  return v.file.get();
}

void Disk::adopt_delta_file(View& v, std::shared_ptr<LayerFile> file) {
  v.file = std::move(file);
  v.file->hint_random_access();
  v.file_raw.store(v.file.get(), std::memory_order_release);
}

Result<Disk::Mutation> Disk::begin_mutation() {
  // Gate first: the view cannot be replaced while any mutation holds it.
  std::shared_lock<WriteGate> gate(gate_);
  LAYER_ASSIGN(auto view, loaded_view());
  return Mutation{std::move(gate), std::move(view)};
}

// ---- helpers ----

Status Disk::fail_if_broken() const {
  const int broken = broken_.load(std::memory_order_acquire);
  if (broken == kSyncFailed)
    return make_error(EIO, "container \"{}\": an earlier fdatasync failed; reopen the disk", name_);
  if (broken == kBrokenMove)
    return make_error(EIO,
                      "container \"{}\": a tier move of its delta failed after the disk switched "
                      "to the copy; reopen the disk (the delta is read from its old tier)",
                      name_);
  if (broken == kStale)
    return make_error(EIO,
                      "container \"{}\" was changed by a snapshot or rollback that this disk "
                      "could not follow; reopen the disk",
                      name_);
  if (broken == kLostMarks)
    return make_error(EIO,
                      "container \"{}\": a flush ran out of memory and may have lost track "
                      "of written blocks; reopen the disk",
                      name_);
  return {};
}

Status Disk::check_range(uint64_t len, uint64_t offset, bool for_write) const {
  if (for_write && !writable_) return make_error(EPERM, "container \"{}\" is read-only", name_);
  if (offset > size_bytes_ || len > size_bytes_ - offset)
    return make_error(EINVAL, "container \"{}\": request at {} for {} bytes is beyond the end ({})",
                      name_, offset, len, size_bytes_);
  return fail_if_broken();
}

uint64_t Disk::block_len(uint64_t block_no) const {
  return std::min<uint64_t>(block_size_, size_bytes_ - block_no * block_size_);
}

Disk::Run Disk::next_run(const View& v, uint64_t b, uint64_t max) {
  const DeltaMap& delta = *v.delta;
  const BlockState ds = delta.get(b);
  if (ds == BlockState::kData) return Run{kFromDelta, delta.run(b, max, BlockState::kData)};
  if (ds == BlockState::kZero) return Run{kFromZero, delta.run(b, max, BlockState::kZero)};
  const Source src = v.chain_map->lookup(b);
  const uint64_t n =
      std::min(v.chain_map->run_length(b, max), delta.run(b, max, BlockState::kAbsent));
  if (src == kSourceZero || src == kSourceAbsent) return Run{kFromZero, std::max<uint64_t>(n, 1)};
  return Run{static_cast<int>(src), std::max<uint64_t>(n, 1)};
}

// ---- read ----

Status Disk::read(void* buf, uint64_t len, uint64_t offset) {
  LAYER_TRY(check_range(len, offset, false));
  if (len == 0) return {};
  LAYER_ASSIGN(auto v, loaded_view());
  if (!is_diff()) return read_range(*v, static_cast<uint8_t*>(buf), len, offset);
  return for_each_change(len, offset, [&](uint64_t from, uint64_t to, bool changed) -> Status {
    uint8_t* dst = static_cast<uint8_t*>(buf) + (from - offset);
    if (changed) return read_range(*v, dst, to - from, from);
    std::memset(dst, 0, to - from);
    return {};
  });
}

Status Disk::for_each_run(const View& v, uint64_t len, uint64_t offset,
                          const std::function<Status(uint64_t, uint64_t, int)>& fn) const {
  const uint64_t end = offset + len;
  uint64_t b = offset / block_size_;
  const uint64_t last = (end - 1) / block_size_;
  while (b <= last) {
    const Run run = next_run(v, b, last - b + 1);
    const uint64_t from = std::max(offset, b * block_size_);
    const uint64_t to = std::min(end, (b + run.blocks) * block_size_);
    LAYER_TRY(fn(from, to, run.source));
    b += run.blocks;
  }
  return {};
}

LayerFile* Disk::file_of(const View& v, int source) {
  if (source == kFromZero) return nullptr;
  if (source == kFromDelta) return v.file_raw.load(std::memory_order_acquire);
  return v.chain_files[static_cast<size_t>(source)].get();
}

Status Disk::read_range(const View& v, uint8_t* buf, uint64_t len, uint64_t offset) {
  return for_each_run(v, len, offset, [&](uint64_t from, uint64_t to, int source) -> Status {
    uint8_t* dst = buf + (from - offset);
    if (source == kFromZero) {
      std::memset(dst, 0, to - from);
      return {};
    }
    LayerFile* file = file_of(v, source);
    if (!file) {
      const LayerRecord& l = source == kFromDelta ? v.delta_layer : v.chain[source];
      return make_error(EIO, "layer {}: file {} is missing but holds block {}", l.id,
                        pool_.layer_path(l), from / block_size_);
    }
    HeatCounter* heat =
        source == kFromDelta ? v.delta_heat.get() : v.chain_heat[static_cast<size_t>(source)].get();
    if (heat) heat->add_read(to - from);
    if (source != kFromDelta)
      if (BootSession* boot = boot_raw_.load(std::memory_order_acquire))
        boot->record(v.chain[static_cast<size_t>(source)].id, from, to - from);
    if (source != kFromDelta)
      if (LayerVerifier* verifier = v.chain_verify[static_cast<size_t>(source)].get())
        LAYER_TRY(verifier->check(*file, from, to - from));
    return file->read(dst, to - from, from);
  });
}

// ---- write ----

namespace {

// Holds a set of stripes, taken in ascending order (no deadlock between requests).
class StripeGuard {
 public:
  StripeGuard(std::mutex* stripes, std::vector<size_t> held)
      : stripes_(stripes), held_(std::move(held)) {
    for (size_t i : held_) stripes_[i].lock();
  }
  ~StripeGuard() {
    for (auto it = held_.rbegin(); it != held_.rend(); ++it) stripes_[*it].unlock();
  }
  StripeGuard(const StripeGuard&) = delete;
  StripeGuard& operator=(const StripeGuard&) = delete;

 private:
  std::mutex* stripes_;
  std::vector<size_t> held_;  // ascending, unique
};

}  // namespace

std::vector<size_t> Disk::stripes_for(const View& v, uint64_t first, uint64_t last, bool with_first,
                                      bool with_last) const {
  std::vector<size_t> held;
  if (with_first) held.push_back(stripe_of(first));
  if (with_last) held.push_back(stripe_of(last));
  // Runs of the delta's own data are skipped word by word, and a block that is not data takes
  // its whole group's stripe at once: a 1 MiB request costs a few steps, not one per block.
  for (uint64_t b = first; b <= last;) {
    b += v.delta->run(b, last - b + 1, BlockState::kData);
    if (b > last) break;
    held.push_back(stripe_of(b));
    b = (b / kStripeBlocks + 1) * kStripeBlocks;
  }
  std::sort(held.begin(), held.end());
  held.erase(std::unique(held.begin(), held.end()), held.end());
  return held;
}

Status Disk::write(const void* buf, uint64_t len, uint64_t offset, bool fua) {
  LAYER_TRY(check_range(len, offset, true));
  if (len == 0) return {};
  {
    LAYER_ASSIGN(Mutation m, begin_mutation());
    LAYER_TRY(write_range(*m.view, static_cast<const uint8_t*>(buf), len, offset));
  }
  return fua ? flush() : Status{};
}

Status Disk::write_range(View& v, const uint8_t* buf, uint64_t len, uint64_t offset) {
  const uint64_t end = offset + len;
  const uint64_t first = offset / block_size_;
  const uint64_t last = (end - 1) / block_size_;
  const uint64_t count = last - first + 1;

  // Fast path: every block is already the delta's own data; write in place, no lock.
  if (v.delta->run(first, count, BlockState::kData) == count) {
    LayerFile* f = v.file_raw.load(std::memory_order_acquire);
    if (!f)
      return make_error(EIO, "layer {}: file {} is missing but the index says it holds data",
                        v.delta_layer.id, pool_.layer_path(v.delta_layer));
    LAYER_TRY(f->write(buf, len, offset));
    v.write_seq.fetch_add(1, std::memory_order_release);
    if (v.delta_heat) v.delta_heat->add_write(len);
    return {};
  }

  LAYER_ASSIGN(LayerFile * file, delta_file_for_write(v));
  auto partial = [&](uint64_t b) {
    return offset > b * block_size_ || end < b * block_size_ + block_len(b);
  };
  // The partial edge blocks are locked whatever their state now: one that is data here may be
  // a tombstone by the re-check below, and its copy-up must not race another's.
  std::vector<size_t> held = stripes_for(v, first, last, partial(first), partial(last));
  at("write.stripes_chosen");
  StripeGuard guard(stripes_.get(), std::move(held));

  // Copy up a partial head or tail block that is not (re-checked under its stripe) data yet:
  // its whole content through the chain, merged with the request, in one write.
  uint64_t direct_from = offset, direct_to = end;
  std::vector<uint8_t> tmp;
  const std::array<uint64_t, 2> edges{first, last};
  for (size_t e = 0; e < (last == first ? 1u : 2u); ++e) {
    const uint64_t b = edges[e];
    if (!partial(b) || v.delta->get(b) == BlockState::kData) continue;
    const uint64_t bstart = b * block_size_, blen = block_len(b);
    tmp.resize(blen);
    LAYER_TRY(read_range(v, tmp.data(), blen, bstart));
    at("write.copy_up_read");
    const uint64_t from = std::max(offset, bstart), to = std::min(end, bstart + blen);
    std::memcpy(tmp.data() + (from - bstart), buf + (from - offset), to - from);
    LAYER_TRY(file->write(tmp.data(), blen, bstart));
    at("write.copied_up");  // in the delta file, not yet marked in its map
    if (b == first) direct_from = std::max(direct_from, bstart + blen);
    if (b == last) direct_to = std::min(direct_to, bstart);
  }
  if (direct_from < direct_to)
    LAYER_TRY(file->write(buf + (direct_from - offset), direct_to - direct_from, direct_from));
  v.write_seq.fetch_add(1, std::memory_order_release);
  if (v.delta_heat) v.delta_heat->add_write(len);
  // Marked only now that every write above returned.
  v.delta->set_range(first, count, BlockState::kData);
  return {};
}

// ---- zero / trim ----

Status Disk::zero(uint64_t len, uint64_t offset, bool fua, bool fast) {
  LAYER_TRY(check_range(len, offset, true));
  if (len == 0) return {};
  const uint64_t end = offset + len;
  // Whole blocks: [ws, we) — block b is whole when the range covers all of its bytes.
  const uint64_t ws = (offset + block_size_ - 1) / block_size_;
  const uint64_t we = end == size_bytes_ ? size_blocks_ : end / block_size_;
  const bool has_whole = ws < we;
  const uint64_t head_to = has_whole ? ws * block_size_ : end;
  const uint64_t tail_from = has_whole ? we * block_size_ : end;
  if (fast && (offset < head_to || tail_from < end))
    return make_error(ENOTSUP, "fast zero of a partial block would write data");
  {
    LAYER_ASSIGN(Mutation m, begin_mutation());
    View& v = *m.view;
    std::vector<uint8_t> zeroes;
    if (offset < head_to) {
      zeroes.assign(head_to - offset, 0);
      LAYER_TRY(write_range(v, zeroes.data(), head_to - offset, offset));
    }
    if (has_whole) LAYER_TRY(zero_whole_blocks(v, ws, we - ws));
    if (tail_from < end) {
      zeroes.assign(end - tail_from, 0);
      LAYER_TRY(write_range(v, zeroes.data(), end - tail_from, tail_from));
    }
  }
  return fua ? flush() : Status{};
}

Status Disk::trim(uint64_t len, uint64_t offset, bool fua) {
  // Trimmed ranges read back as zeroes: stronger than NBD asks, and what users expect.
  return zero(len, offset, fua, false);
}

Status Disk::zero_whole_blocks(View& v, uint64_t first, uint64_t count) {
  StripeGuard guard(stripes_.get(), stripes_for(v, first, first + count - 1, false, false));

  if (LayerFile* f = v.file_raw.load(std::memory_order_acquire)) {
    const uint64_t from = first * block_size_;
    const uint64_t to = std::min(size_bytes_, (first + count) * block_size_);
    LAYER_TRY(f->punch(from, to - from));
    v.write_seq.fetch_add(1, std::memory_order_release);
    if (v.delta_heat) v.delta_heat->add_write(0);  // an op, no data
  }
  // Mark after the punch returned. Blocks whose content is something (the delta's data, or a
  // lower layer's) get a tombstone; blocks that already read as zeroes (a tombstone, or absent
  // everywhere) are left as they are.
  for (uint64_t b = first, end = first + count; b < end;) {
    const Run run = next_run(v, b, end - b);
    if (run.source != kFromZero) v.delta->set_range(b, run.blocks, BlockState::kZero);
    b += run.blocks;
  }
  return {};
}

// ---- flush ----

Status Disk::flush() {
  if (!writable_) return {};
  LAYER_TRY(fail_if_broken());
  if (!pin()) return {};  // nothing written yet
  std::unique_lock<std::mutex> lk(flush_mu_);
  const uint64_t ticket = ++tickets_;
  for (;;) {
    if (done_ >= ticket) return {};
    if (failed_upto_ >= ticket) return failed_error_;
    // After a failed fdatasync no round may run again: Linux reports a writeback error once
    // and marks the pages clean, so the next fdatasync would succeed over lost data.
    LAYER_TRY(fail_if_broken());
    if (!round_running_) break;
    at("flush.wait");
    flush_cv_.wait(lk);
  }
  // Lead a round covering every ticket issued so far.
  round_running_ = true;
  const uint64_t covers = tickets_;
  lk.unlock();
  Status s = run_round();
  lk.lock();
  round_running_ = false;
  if (s.ok()) {
    done_ = std::max(done_, covers);
  } else {
    failed_upto_ = std::max(failed_upto_, covers);
    // Copying the message may throw; the waiters must be woken whatever happens.
    try {
      failed_error_ = s.error();
    } catch (...) {
      failed_error_ = Error{s.error().code, std::string()};
    }
  }
  flush_cv_.notify_all();
  return s;
}

Status Disk::run_round() noexcept {
  try {
    // The view now: one replaced meanwhile was flushed, with the gate closed, before it went.
    std::shared_ptr<View> v = pin();
    if (!v) return {};
    return flush_round(*v);
  } catch (const std::bad_alloc&) {
    return Error{ENOMEM, "out of memory"};
  } catch (const std::exception& e) {
    try {
      return make_error(EIO, "container \"{}\": flush: {}", name_, e.what());
    } catch (...) {
      return Error{EIO, "flush failed"};
    }
  } catch (...) {
    return Error{EIO, "flush failed"};
  }
}

namespace {

// Gives a flush round's rows back to the dirty set unless the round committed them. If that
// fails for want of memory, marks may be lost: the disk is broken (EIO until reopened).
class DirtyRowsGuard {
 public:
  DirtyRowsGuard(DeltaMap& map, const DeltaMap::Rows& rows, std::atomic<int>& broken)
      : map_(map), rows_(rows), broken_(broken) {}
  ~DirtyRowsGuard() {
    if (armed_ && !map_.return_dirty(rows_)) broken_.store(kLostMarks, std::memory_order_release);
  }
  void committed() { armed_ = false; }

 private:
  DeltaMap& map_;
  const DeltaMap::Rows& rows_;
  std::atomic<int>& broken_;
  bool armed_ = true;
};

}  // namespace

namespace {

// Writes j's unfolded rows and its checkpoint (the last record written) with the journal's
// state `open` in txn. Returns the checkpoint written; std::nullopt when there was nothing to
// fold (the journal not open, or every record folded) and `open` is what the index says.
Result<std::optional<uint64_t>> write_fold(WriteTxn& txn, JournalState& j, bool open) {
  journal::Rows rows;
  uint64_t upto = 0;
  {
    std::lock_guard<std::mutex> lk(j.mu);
    // A fold that keeps the journal open leaves it alone once its Disk is gone or it is being
    // retired: the retiring (or recovering) owner folds what is left itself.
    if (open && (j.abandoned || j.retiring)) return std::optional<uint64_t>();
    if (!j.open || (open && j.written == j.folded)) return std::optional<uint64_t>();
    rows = j.unfolded_rows();
    upto = j.written;
  }
  LAYER_TRY(journal::put_rows(txn, j.layer, rows));
  LAYER_TRY(
      txn.put(Db::kMeta, journal::key(j.layer), journal::encode_state(journal::State{upto, open})));
  return std::optional<uint64_t>(upto);
}

// Queues a fold of j's unfolded rows into the index (Committer::post), kFoldDelay from now.
// REQUIRES: j->posted set by the caller (one fold queued at a time).
void post_fold(Committer& committer, std::shared_ptr<JournalState> j) {
  struct Taken {
    uint64_t upto = 0;
    bool any = false;
  };
  auto taken = std::make_shared<Taken>();
  auto job = [j, taken](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto upto, write_fold(txn, *j, true));
    if (upto) {
      taken->upto = *upto;
      taken->any = true;
    }
    return {};
  };
  auto done = [&committer, j, taken](Status s) {
    {
      std::lock_guard<std::mutex> lk(j->mu);
      if (s.ok() && taken->any) j->folded_upto(taken->upto);
      // Rounds journaled meanwhile, or a failed fold's rows: another fold. (A fold that keeps
      // failing keeps its rows in the journal; the next round's commit, classic or not, or
      // recovery, folds them.)
      if (!(j->open && !j->retiring && !j->abandoned && j->written != j->folded && s.ok())) {
        j->posted = false;
        return;
      }
    }
    post_fold(committer, j);
  };
  if (!committer.post(std::move(job), std::move(done), kFoldDelay)) {
    std::lock_guard<std::mutex> lk(j->mu);
    j->posted = false;
  }
}

}  // namespace

Status Disk::flush_round(View& v) {
  // A mark dropped for want of memory would never be committed: no flush may succeed again.
  if (v.delta->lost_marks()) {
    broken_.store(kLostMarks, std::memory_order_release);
    return fail_if_broken();
  }
  DeltaMap::Rows rows = v.delta->take_dirty();
  DirtyRowsGuard guard(*v.delta, rows, broken_);
  at("flush.rows_taken");
  // Read after the copy: every write whose mark the copy holds bumped write_seq before it
  // marked, so seq counts it, and the sync below (which starts after this load) covers it.
  // (Read before the copy, a write finishing in between could be committed unsynced.)
  const uint64_t seq = v.write_seq.load(std::memory_order_acquire);
  if (seq != v.synced_seq) {
    if (LayerFile* f = v.file_raw.load(std::memory_order_acquire)) {
      // Data is fdatasync'ed before the index commit that makes it visible, so a crash never
      // exposes an index entry without its data.
      auto s = f->sync();
      if (!s) {
        broken_.store(kSyncFailed, std::memory_order_release);
        return make_error(EIO, "container \"{}\": {}", name_, s.error().message);
      }
    }
    v.synced_seq = seq;
    at("flush.synced");  // data durable, the rows naming it not committed
  }
  if (rows.empty()) return {};
  if (v.journal) {
    LAYER_ASSIGN(bool journaled, journal_round(v, rows));
    if (journaled) {
      guard.committed();
      return {};
    }
  }
  // Into the index now, with the journal's unfolded rows (older: this round's win) and its
  // checkpoint, which opens the journal for the next rounds. Bounded transactions: LMDB has
  // one writer for every process of the pool, so a round of many dirty chunks commits in
  // pieces rather than holding the write lock for long. Each piece names synced data only, so
  // a failure midway leaves a consistent index.
  const LayerId delta_id = v.delta_layer.id;
  journal::Rows all;
  uint64_t upto = 0;
  bool open_journal = false;
  if (v.journal) {
    std::lock_guard<std::mutex> lk(v.journal->mu);
    upto = v.journal->written;
    // This round's rows join the unfolded ones (as of the last record, and erased with them
    // once this commit is done): a fold that runs before then must not write a chunk's older
    // journaled row over this newer one.
    for (const auto& [chunk, row] : rows) v.journal->unfolded[chunk] = {upto, row};
    all = v.journal->unfolded_rows();
    open_journal = v.journal->enabled && v.journal->suspended == 0;
  } else {
    all = rows;
  }
  for (size_t i = 0; i < all.size(); i += kMaxRowsPerTxn) {
    const size_t end = std::min(all.size(), i + kMaxRowsPerTxn);
    const bool last = end == all.size();
    LAYER_TRY(pool_.committer().run([&](WriteTxn& txn) -> Status {
      LAYER_TRY(journal::put_rows(txn, delta_id,
                                  journal::Rows(all.begin() + static_cast<ptrdiff_t>(i),
                                                all.begin() + static_cast<ptrdiff_t>(end))));
      if (last && v.journal)
        LAYER_TRY(txn.put(Db::kMeta, journal::key(delta_id),
                          journal::encode_state(journal::State{upto, open_journal})));
      return {};
    }));
  }
  guard.committed();
  if (v.journal) {
    std::lock_guard<std::mutex> lk(v.journal->mu);
    v.journal->folded_upto(upto);
    v.journal->open = open_journal;
  }
  return {};
}

Result<bool> Disk::journal_round(View& v, const DeltaMap::Rows& rows) {
  JournalState& j = *v.journal;
  LayerFile* f = v.file_raw.load(std::memory_order_acquire);
  uint64_t seq = 0, segment = 0, at_offset = 0;
  size_t record_bytes = 0;
  auto usable = [&] { return f && j.enabled && j.open && j.suspended == 0 && !j.retiring; };
  {
    std::lock_guard<std::mutex> lk(j.mu);
    if (!usable()) return false;
    seq = j.written + 1;  // rounds run one at a time: only this one moves written and the tail
  }
  // Encoded (and checksummed) outside the lock that the fold thread takes.
  const std::string record = journal::encode_record(seq, j.layer, rows);
  record_bytes = record.size();
  {
    std::lock_guard<std::mutex> lk(j.mu);
    if (!usable()) return false;
    segment = j.segment;
    at_offset = j.tail;
    if (at_offset + record_bytes > journal::kSegmentBytes) {
      // On at the next segment's start, once every record in it is folded.
      segment = (segment + 1) % journal::kSegments;
      at_offset = 0;
      if (j.segment_last[segment] > j.folded || record_bytes > journal::kSegmentBytes) return false;
    }
  }
  // The zone's blocks allocated once, so that records overwrite (journal.h). Everything in
  // it is folded (the journal opened with a commit of every row): zeroes lose nothing.
  bool zone_written = false;
  {
    std::lock_guard<std::mutex> lk(j.mu);
    zone_written = j.zone_written;
  }
  if (!zone_written) {
    const std::string zeroes(journal::kZoneBytes, '\0');
    if (!f->write(zeroes.data(), zeroes.size(), j.zone)) return false;
    std::lock_guard<std::mutex> lk(j.mu);
    j.zone_written = true;
  }
  // A failed write (a full disk) leaves at most garbage where the next record goes: the round
  // commits to the index instead.
  const uint64_t offset = j.zone + segment * journal::kSegmentBytes + at_offset;
  if (!f->write(record.data(), record_bytes, offset)) return false;
  at("journal.written");  // the record written, not synced
  // The data was synced before the record was written: a record never names data that is
  // not durable, as an index commit never does.
  if (auto s = f->sync(); !s) {
    broken_.store(kSyncFailed, std::memory_order_release);
    return make_error(EIO, "container \"{}\": {}", name_, s.error().message);
  }
  at("journal.synced");  // the round durable, its rows not folded
  std::shared_ptr<JournalState> post;
  {
    std::lock_guard<std::mutex> lk(j.mu);
    j.written = seq;
    j.segment = segment;
    j.tail = at_offset + record_bytes;
    j.segment_last[segment] = seq;
    for (const auto& [chunk, row] : rows) j.unfolded[chunk] = {seq, row};
    if (!j.posted) {
      j.posted = true;
      post = v.journal;
    }
  }
  if (post) post_fold(pool_.committer(), std::move(post));
  return true;
}

Status Disk::retire_journal(View& v) {
  if (!v.journal) return {};
  JournalState& j = *v.journal;
  {
    std::lock_guard<std::mutex> lk(j.mu);
    if (!j.open) return {};
    j.retiring = true;
  }
  std::optional<uint64_t> upto;
  Status s = pool_.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(upto, write_fold(txn, j, false));
    return {};
  });
  {
    std::lock_guard<std::mutex> lk(j.mu);
    j.retiring = false;
    if (!s) return s;
    if (upto) j.folded_upto(*upto);
    j.open = false;
    j.zone_written = false;
    j.segment = j.tail = 0;
    j.segment_last.fill(0);
  }
  // Every record is folded and the journal closed: the zone's space goes back (its bytes are
  // never read again; a journal opened later starts at the zone's start).
  if (LayerFile* f = v.file_raw.load(std::memory_order_acquire)) {
    auto size = f->size();
    if (size && *size > j.zone) (void)f->punch(j.zone, *size - j.zone);
  }
  return {};
}

Status Disk::fold_journal() {
  std::shared_ptr<View> v = pin();
  if (!v || !v->journal) return {};
  JournalState& j = *v->journal;
  std::optional<uint64_t> upto;
  LAYER_TRY(pool_.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(upto, write_fold(txn, j, true));
    return {};
  }));
  if (upto) {
    std::lock_guard<std::mutex> lk(j.mu);
    j.folded_upto(*upto);
  }
  return {};
}

Status Disk::close_journal() {
  if (!writable_) return {};
  LAYER_TRY(flush());
  std::shared_ptr<View> v = pin();
  // No I/O yet: the view that would have recovered a journal left by an earlier process (or
  // Disk) is not loaded; recover it here (we hold the delta's lock).
  if (!v) {
    if (snapshot_) return {};
    LAYER_TRY(journal::recover(pool_, delta_layer_.id));
    return {};
  }
  hold_rounds();
  Status s = retire_journal(*v);
  release_rounds();
  return s;
}

Status Disk::quiesce(const std::function<Status()>& fn) {
  // Flush without pausing first, so little is left to flush with the gate closed: again while
  // a round still took long (under a heavy writer each round syncs what the previous one let
  // in), up to a few rounds.
  for (int round = 0; round < kQuiesceRounds; ++round) {
    const auto start = std::chrono::steady_clock::now();
    LAYER_TRY(flush());
    if (std::chrono::steady_clock::now() - start < kQuiesceQuickFlush) break;
  }
  std::unique_lock<WriteGate> closed(gate_);
  // Everything in the index, as fn (a snapshot, a rollback...) reads it from there.
  LAYER_TRY(close_journal());
  return fn();
}

// ---- live changes ----

Result<ContainerState> Disk::change(const std::function<Result<ContainerState>()>& op) {
  if (!writable_) return make_error(EPERM, "container \"{}\" is open read-only", name_);
  std::lock_guard<std::mutex> live(live_mu_);
  ContainerState state;
  LAYER_TRY(quiesce([&]() -> Status {
    LAYER_ASSIGN(state, op());
    pool_.test_point("change.committed");
    // Committed: from here the disk serves the new state or nothing.
    auto s = adopt(state);
    if (!s) broken_.store(kStale, std::memory_order_release);
    return s;
  }));
  return state;
}

Status Disk::reload_moved(LayerId id) {
  if (!writable_) return {};
  {
    std::lock_guard<std::mutex> lk(load_mu_);
    if (std::none_of(chain_.begin(), chain_.end(), [&](const auto& l) { return l.id == id; }))
      return {};
  }
  // The same state, the moved layer's row read afresh (its new tier).
  auto reloaded = change([&]() -> Result<ContainerState> {
    LAYER_ASSIGN(auto txn, pool_.index().begin_read());
    LAYER_ASSIGN(const LayerRecord moved, get_layer(txn, id));
    std::lock_guard<std::mutex> lk(load_mu_);
    ContainerState state{container_, delta_layer_, chain_};
    for (auto& l : state.chain)
      if (l.id == id) l = moved;
    return state;
  });
  if (!reloaded) return std::move(reloaded).error();
  return {};
}

LayerRecord Disk::delta_layer() const {
  std::lock_guard<std::mutex> lk(load_mu_);
  return delta_layer_;
}

std::shared_ptr<Disk::View> Disk::view_with_file(View& v, std::shared_ptr<LayerFile> file,
                                                 Tier tier, bool same_file) {
  auto out = std::make_shared<View>();
  out->chain = v.chain;
  out->chain_map = v.chain_map;
  out->chain_files = v.chain_files;
  out->chain_heat = v.chain_heat;
  out->chain_verify = v.chain_verify;
  out->delta_heat = v.delta_heat;
  out->delta_layer = v.delta_layer;
  out->delta_layer.tier = tier;
  out->delta = v.delta;
  out->journal = v.journal;
  if (file) adopt_delta_file(*out, std::move(file));
  if (same_file) {
    // No write is in flight (the gate is closed) and no round runs on v any more once the new
    // view is published (publish_view), so these are settled.
    out->write_seq.store(v.write_seq.load(std::memory_order_acquire), std::memory_order_relaxed);
    out->synced_seq = v.synced_seq;
  }
  return out;
}

void Disk::hold_rounds() {
  std::unique_lock<std::mutex> lk(flush_mu_);
  flush_cv_.wait(lk, [&] { return !round_running_; });
  round_running_ = true;
}

void Disk::release_rounds() {
  std::lock_guard<std::mutex> lk(flush_mu_);
  round_running_ = false;
  flush_cv_.notify_all();
}

void Disk::publish_view(std::shared_ptr<View> v) {
  {
    std::lock_guard<std::mutex> vlk(view_mu_);
    view_.swap(v);
  }
  // v, the old view, goes when the last request pinning it lets go (here, if none does).
}

Status Disk::adopt(const ContainerState& state) {
  std::lock_guard<std::mutex> lk(load_mu_);
  // Locks: the new delta's exclusive; the new chain's shared, reusing those held (the old
  // delta, frozen now, keeps its byte and turns shared).
  std::map<LayerId, Lock> held;
  for (size_t i = 0; i < chain_.size() && i < layer_locks_.size(); ++i)
    held.emplace(chain_[i].id, std::move(layer_locks_[i]));
  layer_locks_.clear();
  held.emplace(delta_layer_.id, std::move(delta_lock_));
  std::vector<Lock> chain_locks;
  for (const auto& layer : state.chain) {
    if (auto it = held.find(layer.id); it != held.end()) {
      LAYER_TRY(it->second.downgrade());
      chain_locks.push_back(std::move(it->second));
      held.erase(it);
    } else {
      LAYER_ASSIGN(Lock l, pool_.locks().try_lock(LockKind::kLayer, layer.id, false,
                                                  fmt::format("layer {}", layer.id)));
      chain_locks.push_back(std::move(l));
    }
  }
  if (auto it = held.find(state.delta.id); it != held.end()) {
    delta_lock_ = std::move(it->second);  // the same delta (a merge below it)
    held.erase(it);
  } else {
    LAYER_ASSIGN(delta_lock_, pool_.locks().try_lock(LockKind::kLayer, state.delta.id, true,
                                                     fmt::format("layer {}", state.delta.id)));
  }
  layer_locks_ = std::move(chain_locks);
  container_ = state.container;
  delta_layer_ = state.delta;
  chain_ = state.chain;
  // Locks in `held` (a rolled-back delta, layers below it) are released on return.
  // The new view now, so that the first request after the gate opens does not build it; if
  // that fails, the next request tries again.
  const std::shared_ptr<View> previous = pin();
  auto v = load_view(previous.get());
  std::lock_guard<std::mutex> vlk(view_mu_);
  view_ = v ? *v : nullptr;
  return {};
}

Result<std::vector<std::pair<LayerId, LayerId>>> Disk::merge_hidden() {
  std::vector<std::pair<LayerId, LayerId>> merged;
  if (!writable_) return merged;
  for (bool again = true; again;) {
    again = false;
    std::vector<LayerRecord> chain;
    {
      std::lock_guard<std::mutex> lk(load_mu_);
      chain = chain_;
    }
    // L = chain[i], K = chain[i - 1] (its child, above it).
    for (size_t i = 1; i < chain.size() && !again; ++i) {
      std::string why;
      LAYER_ASSIGN(auto plan, plan_merge(pool_, chain[i].id, &why));
      if (!plan || plan->child.id != chain[i - 1].id) continue;
      // Only this disk may read them: its own shared lock on each, nobody else's.
      LAYER_ASSIGN(bool busy_l, pool_.locks().held_by_others(LockKind::kLayer, chain[i].id, 1));
      LAYER_ASSIGN(bool busy_k, pool_.locks().held_by_others(LockKind::kLayer, chain[i - 1].id, 1));
      if (busy_l || busy_k) continue;
      // Built outside the gate: L and K are frozen, and reads go on meanwhile.
      LAYER_ASSIGN(auto build, build_merge(pool_, *plan));
      const LayerId m = build->id();
      std::vector<uint64_t> drops;
      LAYER_TRY(change([&]() -> Result<ContainerState> {
        LAYER_TRY(build->publish(
            [&](WriteTxn& txn) { return switch_merge(pool_, txn, *plan, m, &drops); }));
        pool_.test_point("merge.switched");
        LAYER_ASSIGN(auto txn, pool_.index().begin_read());
        ContainerState state;
        LAYER_ASSIGN(state.container, pool_.get_container(txn, name_));
        LAYER_ASSIGN(state.delta, get_layer(txn, state.container.delta_layer));
        LAYER_ASSIGN(state.chain, chain_of(txn, state.delta.parent));
        return state;
      }));
      LAYER_TRY(finish_drops_after_removal(
          pool_, drops, fmt::format("merged layers {} and {}", chain[i].id, chain[i - 1].id)));
      merged.emplace_back(chain[i].id, m);
      again = true;
    }
  }
  return merged;
}

Result<std::unique_ptr<LayerBuild>> Disk::premake_delta() {
  if (!writable_) return make_error(EPERM, "container \"{}\" is open read-only", name_);
  LAYER_ASSIGN(auto build, LayerBuild::begin(pool_, IntentRecord::Kind::kDelta, name_));
  LAYER_TRY(build->create_file(Tier::kSsd, size_bytes_));
  pool_.test_point("delta.premade");
  return build;
}

Result<ContainerState> Disk::snapshot(const std::string& snap) {
  LAYER_ASSIGN(auto premade, premake_delta());
  return change(
      [&] { return snapshot_container(pool_, name_, snap, delta_layer_.id, premade.get()); });
}

Result<ContainerState> Disk::commit(const std::string& image_ref, const std::string& description) {
  LAYER_ASSIGN(auto premade, premake_delta());
  return change([&] {
    return commit_container(pool_, name_, image_ref, description, delta_layer_.id, premade.get());
  });
}

Result<ContainerState> Disk::rollback(const std::string& snap,
                                      const std::optional<std::string>& keep_as) {
  // The target's chain is locked before the switch commits and until the disk holds its own
  // locks on it, so no merge replaces one of its layers in between.
  LAYER_ASSIGN(auto target, locked_snapshot_chain(pool_, name_, snap));
  LAYER_ASSIGN(auto premade, premake_delta());
  std::vector<uint64_t> drops;
  LAYER_ASSIGN(auto state, change([&] {
                 return rollback_container(pool_, name_, snap, keep_as, &drops, delta_layer_.id,
                                           premade.get());
               }));
  // The old delta's rows and file go now that no view will write it (a read still in flight
  // keeps its file open).
  LAYER_TRY(finish_drops_after_removal(
      pool_, drops, fmt::format("the rolled-back delta of container \"{}\"", name_)));
  return state;
}

Result<ContainerState> Disk::flatten() {
  if (!writable_) return make_error(EPERM, "container \"{}\" is open read-only", name_);
  // The copy is made from the frozen chain while I/O goes on; only the switch of the delta's
  // parent happens with the gate closed.
  LAYER_ASSIGN(auto built, build_flat(pool_, name_));
  if (!built) {
    std::lock_guard<std::mutex> lk(load_mu_);
    return ContainerState{container_, delta_layer_, chain_};
  }
  std::vector<uint64_t> drops;
  LAYER_ASSIGN(auto state, change([&] { return switch_flat(pool_, *built, &drops); }));
  LAYER_TRY(finish_drops_after_removal(pool_, drops,
                                       fmt::format("the old chain of container \"{}\"", name_)));
  return state;
}

// ---- extents / cache ----

Status Disk::extents(uint64_t len, uint64_t offset,
                     const std::function<void(uint64_t, uint64_t, bool)>& fn) {
  LAYER_TRY(check_range(len, offset, false));
  if (len == 0) return {};
  if (is_diff())
    return for_each_change(len, offset, [&](uint64_t from, uint64_t to, bool changed) -> Status {
      fn(from, to - from, changed);
      return {};
    });
  LAYER_ASSIGN(auto v, loaded_view());
  // Runs of the same kind (data, or hole+zero) are merged into one extent.
  uint64_t cur_from = offset;
  bool cur_data = false, have = false;
  LAYER_TRY(for_each_run(*v, len, offset, [&](uint64_t from, uint64_t, int source) -> Status {
    const bool data = source != kFromZero;
    if (have && data != cur_data) fn(cur_from, from - cur_from, cur_data);
    if (!have || data != cur_data) {
      cur_from = from;
      cur_data = data;
      have = true;
    }
    return {};
  }));
  fn(cur_from, offset + len - cur_from, cur_data);
  return {};
}

Result<std::shared_ptr<const Disk::Ranges>> Disk::changed_ranges() {
  std::lock_guard<std::mutex> lk(diff_mu_);
  if (!changed_) {
    LAYER_ASSIGN(auto d, diff(pool_, diff_since_, diff_of_));
    std::sort(d.ranges.begin(), d.ranges.end());
    changed_ = std::make_shared<const Ranges>(std::move(d.ranges));
  }
  return changed_;
}

Status Disk::for_each_change(uint64_t len, uint64_t offset,
                             const std::function<Status(uint64_t, uint64_t, bool)>& fn) {
  LAYER_ASSIGN(auto changed, changed_ranges());
  const uint64_t end = offset + len;
  uint64_t pos = offset;
  auto it = std::upper_bound(changed->begin(), changed->end(), std::make_pair(offset, UINT64_MAX));
  if (it != changed->begin()) --it;
  for (; it != changed->end() && pos < end; ++it) {
    const uint64_t from = std::max(pos, it->first);
    const uint64_t to = std::min(end, it->first + it->second);
    if (to <= pos) continue;
    if (from >= end) break;
    if (from > pos) LAYER_TRY(fn(pos, from, false));
    LAYER_TRY(fn(from, to, true));
    pos = to;
  }
  if (pos < end) LAYER_TRY(fn(pos, end, false));
  return {};
}

Status Disk::cache(uint64_t len, uint64_t offset) {
  LAYER_TRY(check_range(len, offset, false));
  if (len == 0) return {};
  LAYER_ASSIGN(auto v, loaded_view());
  return for_each_run(*v, len, offset, [&](uint64_t from, uint64_t to, int source) -> Status {
    if (LayerFile* file = file_of(*v, source)) file->prefetch(from, to - from);
    return {};
  });
}

// ---- DiskTable ----

Result<std::shared_ptr<Disk>> DiskTable::acquire(const std::string& name, bool writable) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = disks_.find(name);
  if (it != disks_.end()) {
    if (writable && !it->second.disk->writable())
      return make_error(EBUSY, "container \"{}\" is open read-only in this server", name);
    ++it->second.users;
    return it->second.disk;
  }
  LAYER_ASSIGN(auto disk, Disk::open(pool_, name, writable));
  disks_[name] = Entry{disk, 1};
  return disk;
}

Status DiskTable::release(std::shared_ptr<Disk> disk) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = disks_.find(disk->name());
  if (it == disks_.end() || it->second.disk != disk) return {};
  disk.reset();
  if (--it->second.users > 0) return {};
  std::shared_ptr<Disk> closing = it->second.disk;
  const std::string name = closing->name();
  ++it->second.closers;
  lk.unlock();
  // A clean disconnect keeps everything written, flushed or not. Meanwhile an acquire may
  // take the Disk back (users > 0 again), and release it again (another closer).
  Status s = closing->close_journal();
  lk.lock();
  closing.reset();
  it = disks_.find(name);  // still there: closers > 0 keeps it
  // The table's reference is now the only one left once no user or other closer holds it:
  // erasing the entry destroys the Disk (closing files, dropping its locks) under mu_.
  if (--it->second.closers == 0 && it->second.users == 0) disks_.erase(it);
  return s;
}

Status DiskTable::reload_moved(LayerId id) {
  // The handles this process shares may name a file the move replaced (after a move there and
  // back, even one of the same tier): the reloads must open the file the row names now.
  pool_.forget_frozen(id);
  // Each held as a user meanwhile (as acquire does), so that it stays open until released.
  std::vector<std::shared_ptr<Disk>> open;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [name, e] : disks_) {
      ++e.users;
      open.push_back(e.disk);
    }
  }
  Status result;
  for (auto& disk : open) {
    auto s = disk->reload_moved(id);
    auto released = release(std::move(disk));
    if (!s && result.ok()) result = s;
    if (!released && result.ok()) result = released;
  }
  return result;
}

Status DiskTable::flush_all() {
  std::vector<std::shared_ptr<Disk>> all;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [name, e] : disks_) all.push_back(e.disk);
  }
  Status result;
  for (auto& d : all) {
    auto s = d->close_journal();
    if (!s && result.ok()) result = s;
  }
  return result;
}

}  // namespace layer
