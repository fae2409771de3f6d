// Unit tests for lib/snapshots.h: snapshot, rollback (with and without --keep-as), commit as
// an image version, snapshot removal (drop, merge, hidden), clone from a snapshot, CONTAINER@SNAP
// disks, diff and gc — offline (no disk open) and live (Disk::snapshot/rollback/commit with
// writers running), each read checked against byte-vector models, fsck clean afterwards.
#include <algorithm>
#include <atomic>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"
#include "intents.h"
#include "snapshots.h"

using namespace layer;
using namespace disktest;

namespace Catch {
template <>
struct StringMaker<std::pair<uint64_t, uint64_t>> {
  static std::string convert(const std::pair<uint64_t, uint64_t>& r) {
    return "(" + std::to_string(r.first) + "+" + std::to_string(r.second) + ")";
  }
};
}  // namespace Catch

namespace {

void require_fsck_clean(Pool& pool) {
  auto r = MUST(fsck(pool, true, false));
  for (const auto& p : r.problems) UNSCOPED_INFO(p);
  REQUIRE(r.problems.empty());
}

std::vector<uint8_t> read_export(Pool& pool, const std::string& name) {
  auto disk = MUST(Disk::open(pool, name, false));
  return read_all(*disk);
}

void zero_flush(DiskFixture& d, uint64_t off, uint64_t len) {
  auto disk = d.open();
  do_zero(*disk, d.model, off, len);
  REQUIRE_OK(disk->flush());
}

constexpr uint64_t kImage = 256 * 4096;
constexpr uint64_t kDisk = kImage + 64 * 4096 + 512;

}  // namespace

TEST_CASE("snapshot freezes the delta and a new delta starts on it", "[snapshots]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  std::vector<uint8_t> at_s1;
  {
    auto disk = d.open();
    do_write(*disk, d.model, 4096 * 3 + 5, pattern(9000, 1));
    do_zero(*disk, d.model, 4096 * 20, 4096 * 4);
    REQUIRE_OK(disk->flush());
  }
  at_s1 = d.model.bytes;
  auto st = MUST(snapshot_container(pool, "c", "s1"));
  REQUIRE(st.chain.size() == 2);
  CHECK(st.chain[0].state == LayerState::kFrozenUnhashed);
  CHECK(st.delta.parent == st.chain[0].id);
  CHECK(snapshot_container(pool, "c", "s1").error().code == EEXIST);
  CHECK(snapshot_container(pool, "c", "bad/name").error().code == EINVAL);
  CHECK(snapshot_container(pool, "nope", "s1").error().code == ENOENT);
  {
    auto disk = d.open();
    check_disk(*disk, d.model);
    do_write(*disk, d.model, 0, pattern(4096 * 2 + 3, 2));
    REQUIRE_OK(disk->flush());
    check_disk(*disk, d.model);
  }
  require_same(read_export(pool, "c@s1"), at_s1);
  // The snapshot export is read-only.
  auto snap_disk = MUST(Disk::open(pool, "c@s1", false));
  std::vector<uint8_t> buf(10, 1);
  CHECK(snap_disk->write(buf.data(), buf.size(), 0, false).error().code == EPERM);
  CHECK(Disk::open(pool, "c@s1", true).error().code == EPERM);
  CHECK(Disk::open(pool, "c@none", false).error().code == ENOENT);
  snap_disk.reset();

  auto tree = MUST(list_snapshots(pool, "c"));
  REQUIRE(tree.snapshots.size() == 1);
  CHECK(tree.snapshots[0].snapshot.name == "s1");
  CHECK(tree.snapshots[0].current);
  CHECK(tree.snapshots[0].data_blocks > 0);
  CHECK(tree.hidden.empty());
  require_fsck_clean(pool);
}

TEST_CASE("rollback restores a snapshot; later snapshots survive and one rolls forward",
          "[snapshots]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 4096, 4096 * 3, 1);
  MUST(snapshot_container(pool, "c", "a"));
  const auto at_a = d.model.bytes;
  write_flush(d, 4096 * 2 + 100, 5000, 2);
  MUST(snapshot_container(pool, "c", "b"));
  const auto at_b = d.model.bytes;
  write_flush(d, 0, 100, 3);
  const auto at_head = d.model.bytes;

  std::vector<uint64_t> drops;
  MUST(rollback_container(pool, "c", "a", std::string("before"), &drops));
  CHECK(drops.empty());
  require_same(read_export(pool, "c"), at_a);
  require_same(read_export(pool, "c@before"), at_head);
  require_same(read_export(pool, "c@b"), at_b);
  // Forward again, this time discarding the head (its layer dropped and its file removed).
  write_flush(d, 4096 * 50, 4096, 4);
  MUST(rollback_container(pool, "c", "b", std::nullopt, &drops));
  CHECK(drops.size() == 1);
  MUST(finish_drops_after_removal(pool, drops, "test"));
  require_same(read_export(pool, "c"), at_b);
  CHECK(rollback_container(pool, "c", "zz", std::nullopt, &drops).error().code == ENOENT);
  CHECK(rollback_container(pool, "c", "a", std::string("b"), &drops).error().code == EEXIST);

  auto tree = MUST(list_snapshots(pool, "c"));
  REQUIRE(tree.snapshots.size() == 3);
  std::map<std::string, SnapshotInfo> by_name;
  for (const auto& s : tree.snapshots) by_name[s.snapshot.name] = s;
  CHECK(by_name["a"].parent.empty());
  CHECK(by_name["b"].parent == "a");
  CHECK(by_name["before"].parent == "b");
  CHECK(by_name["b"].current);
  CHECK_FALSE(by_name["a"].current);
  require_fsck_clean(pool);
}

TEST_CASE("snapshot rm drops a leaf, merges a layer with one child, keeps a shared one hidden",
          "[snapshots]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 0, 4096 * 8, 1);
  MUST(snapshot_container(pool, "c", "s1"));
  write_flush(d, 4096 * 4, 4096 * 8, 2);  // overlaps s1's blocks 4..7
  zero_flush(d, 4096 * 1, 4096);          // a tombstone over s1's block 1
  MUST(snapshot_container(pool, "c", "s2"));
  const auto at_s2 = d.model.bytes;
  write_flush(d, 4096 * 30, 4096, 3);
  MUST(snapshot_container(pool, "c", "s3"));
  const auto at_s3 = d.model.bytes;
  write_flush(d, 4096 * 31, 4096, 4);
  const auto at_head = d.model.bytes;

  // s1's layer: one frozen child (s2's layer), nothing else: merged.
  auto r = MUST(remove_snapshot(pool, "c", "s1"));
  CHECK(r.fate == RemovedSnapshot::Fate::kMerged);
  CHECK(r.merged_into != 0);
  require_same(read_export(pool, "c@s2"), at_s2);
  require_same(read_export(pool, "c@s3"), at_s3);
  require_same(read_export(pool, "c"), at_head);
  require_fsck_clean(pool);

  // s3's layer carries the live delta: the name goes, the layer stays hidden.
  r = MUST(remove_snapshot(pool, "c", "s3"));
  CHECK(r.fate == RemovedSnapshot::Fate::kHidden);
  auto tree = MUST(list_snapshots(pool, "c"));
  REQUIRE(tree.hidden.size() == 1);
  CHECK(tree.hidden[0].layer.id == r.layer);
  require_same(read_export(pool, "c"), at_head);

  // A clone of s2 shares its layer: removing s2 keeps it (hidden), the clone reads the same.
  MUST(pool.clone("c@s2", "k", std::nullopt));
  r = MUST(remove_snapshot(pool, "c", "s2"));
  CHECK(r.fate == RemovedSnapshot::Fate::kHidden);
  require_same(read_export(pool, "k"), at_s2);
  require_same(read_export(pool, "c"), at_head);
  CHECK(remove_snapshot(pool, "c", "s2").error().code == ENOENT);
  require_fsck_clean(pool);

  // After the next snapshot the hidden layer under it has a frozen child: gc merges it.
  MUST(snapshot_container(pool, "c", "s4"));
  auto g = MUST(gc(pool));
  CHECK_FALSE(g.done.empty());
  require_same(read_export(pool, "c"), at_head);
  require_same(read_export(pool, "c@s4"), at_head);
  require_same(read_export(pool, "k"), at_s2);
  require_fsck_clean(pool);

  // A leaf snapshot nothing depends on is dropped; removing the container removes the rest.
  std::vector<uint64_t> drops;
  MUST(rollback_container(pool, "c", "s4", std::nullopt, &drops));
  MUST(finish_drops_after_removal(pool, drops, "test"));
  MUST(snapshot_container(pool, "c", "leaf"));
  MUST(rollback_container(pool, "c", "s4", std::nullopt, &drops));
  MUST(finish_drops_after_removal(pool, drops, "test"));
  // While an export reads it, the leaf's layer cannot go: the removal is refused and the
  // export goes on reading it.
  const auto at_leaf = read_export(pool, "c@leaf");
  {
    auto reader = MUST(Disk::open(pool, "c@leaf", false));
    auto busy = remove_snapshot(pool, "c", "leaf");
    REQUIRE_FALSE(busy);
    CHECK(busy.error().code == EBUSY);
    CHECK(busy.error().message.find("c@leaf") != std::string::npos);
    require_same(read_all(*reader), at_leaf);
  }
  r = MUST(remove_snapshot(pool, "c", "leaf"));
  CHECK(r.fate == RemovedSnapshot::Fate::kDropped);
  CHECK(Disk::open(pool, "c@leaf", false).error().code == ENOENT);
  MUST(pool.remove_container("c"));
  require_same(read_export(pool, "k"), at_s2);
  require_fsck_clean(pool);
  MUST(pool.remove_container("k"));
  MUST(remove_image(pool, "base:1"));
  auto layers = MUST(fsck(pool, false, false));
  CHECK(layers.layers == 0);
}

TEST_CASE("a merge that a server's reads block stays hidden until gc", "[snapshots]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  {
    auto disk = d.open();
    do_write(*disk, d.model, 0, pattern(4096 * 4, 1));
    REQUIRE_OK(disk->flush());
  }
  MUST(snapshot_container(pool, "c", "s1"));
  MUST(snapshot_container(pool, "c", "s2"));
  auto reader = d.open();  // holds the chain's layers shared
  auto r = MUST(remove_snapshot(pool, "c", "s1"));
  CHECK(r.fate == RemovedSnapshot::Fate::kHidden);
  CHECK(r.why.find("server") != std::string::npos);
  check_disk(*reader, d.model);
  reader.reset();
  auto g = MUST(gc(pool));
  CHECK(g.done.size() >= 1);
  check_disk(*d.open(), d.model);
  require_fsck_clean(pool);
}

TEST_CASE("a served disk merges the hidden layers only it reads, live", "[snapshots][live]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 0, pattern(4096 * 4, 1));
  MUST(disk->snapshot("s1"));
  const auto at_s1 = d.model.bytes;
  do_write(*disk, d.model, 4096 * 2, pattern(4096 * 4, 2));
  MUST(disk->snapshot("s2"));
  const auto at_s2 = d.model.bytes;
  do_write(*disk, d.model, 4096 * 9, pattern(10, 3));
  // The name goes; the merge is refused by the open disk's locks: hidden.
  auto r = MUST(remove_snapshot(pool, "c", "s1"));
  CHECK(r.fate == RemovedSnapshot::Fate::kHidden);
  // A snapshot export of s2 reads s1's layer too: the disk alone may not merge it.
  {
    auto export_s2 = MUST(Disk::open(pool, "c@s2", false));
    CHECK(MUST(disk->merge_hidden()).empty());
    require_same(read_all(*export_s2), at_s2);
  }
  auto merged = MUST(disk->merge_hidden());
  REQUIRE(merged.size() == 1);
  CHECK(merged[0].first == r.layer);
  check_disk(*disk, d.model);
  do_write(*disk, d.model, 4096 * 3, pattern(4096, 4));
  REQUIRE_OK(disk->flush());
  check_disk(*disk, d.model);
  require_same(read_export(pool, "c@s2"), at_s2);
  CHECK(MUST(list_snapshots(pool, "c")).hidden.empty());
  disk.reset();
  check_disk(*d.open(), d.model);
  (void)at_s1;
  require_fsck_clean(pool);
}

TEST_CASE("commit publishes an image version whose history names its parent", "[snapshots]") {
  DiskFixture d(kImage, kImage);
  Pool& pool = *d.f.pool;
  {
    auto disk = d.open();
    do_write(*disk, d.model, 4096 * 7, pattern(4096 * 2, 5));
    MUST(disk->commit("base:2", "with a patch"));
  }
  auto hist = MUST(image_history(pool, "base:2"));
  REQUIRE(hist.size() == 2);
  CHECK(hist[0].ref == "base:2");
  CHECK(hist[0].description == "with a patch");
  CHECK(hist[1].ref == "base:1");
  MUST(pool.clone("base:2", "fresh", std::nullopt));
  require_same(read_export(pool, "fresh"), d.model.bytes);
  auto info = MUST(pool.inspect("c"));
  CHECK(info.container.image_ref == "base:2");
  CHECK(commit_container(pool, "c", "base:2", "").error().code == EEXIST);
  // The old version can go: the new one keeps its layers.
  MUST(remove_image(pool, "base:1"));
  require_same(read_export(pool, "fresh"), d.model.bytes);
  require_fsck_clean(pool);
}

// The ranges of blocks whose bytes differ between two models.
std::vector<std::pair<uint64_t, uint64_t>> differing(const std::vector<uint8_t>& a,
                                                     const std::vector<uint8_t>& b) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (uint64_t off = 0; off < a.size(); off += 4096) {
    const uint64_t len = std::min<uint64_t>(4096, a.size() - off);
    if (std::equal(a.begin() + off, a.begin() + off + len, b.begin() + off)) continue;
    if (!out.empty() && out.back().first + out.back().second == off)
      out.back().second += len;
    else
      out.emplace_back(off, len);
  }
  return out;
}

TEST_CASE("diff reports exactly the blocks written since the fork", "[snapshots]") {
  DiskFixture d(kImage, kImage);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 4096 * 10, pattern(4096 * 2, 1));
  REQUIRE_OK(disk->flush());
  MUST(disk->snapshot("a"));
  const auto at_a = d.model.bytes;
  do_write(*disk, d.model, 4096 * 40 + 1, pattern(10, 2));  // block 40
  do_zero(*disk, d.model, 4096 * 60, 4096 * 8);             // blocks 60..67: image data or holes
  REQUIRE_OK(disk->flush());
  MUST(disk->snapshot("b"));
  const auto at_b = d.model.bytes;
  do_write(*disk, d.model, 4096 * 10, pattern(4096, 3));  // block 10 again
  REQUIRE_OK(disk->flush());
  const auto at_head = d.model.bytes;

  auto ab = MUST(diff(pool, "c@a", "c@b"));
  CHECK(ab.ranges == differing(at_a, at_b));
  CHECK_FALSE(ab.ranges.empty());
  CHECK(MUST(diff(pool, "c@b", "c@a")).ranges == ab.ranges);
  CHECK(MUST(diff(pool, "c@a", "c")).ranges == differing(at_a, at_head));
  CHECK(MUST(diff(pool, "c@b", "c@b")).ranges.empty());
  // The export "c@a..b" reads b where diff reports a change and zeroes elsewhere, and its
  // extents mark exactly those ranges as data.
  {
    auto ex = MUST(Disk::open(pool, "c@a..b", false));
    CHECK(ex->is_diff());
    std::vector<uint8_t> want_bytes(at_b.size(), 0);
    for (auto [o, l] : ab.ranges)
      std::copy(at_b.begin() + o, at_b.begin() + o + l, want_bytes.begin() + o);
    require_same(read_all(*ex), want_bytes);
    std::vector<std::pair<uint64_t, uint64_t>> changed;
    uint64_t covered = 0;
    REQUIRE_OK(ex->extents(kImage - 4096, 4096, [&](uint64_t o, uint64_t l, bool data) {
      CHECK(o == 4096 + covered);
      covered += l;
      if (data) changed.emplace_back(o, l);
    }));
    CHECK(covered == kImage - 4096);
    CHECK(changed == ab.ranges);  // all of them start above 4096
    CHECK(Disk::open(pool, "c@a..b", true).error().code == EPERM);
    CHECK(Disk::open(pool, "c@zz..b", false).error().code == ENOENT);
    CHECK(Disk::open(pool, "c@a..", false).error().code == EINVAL);
    CHECK_FALSE(MUST(Disk::open(pool, "c@b", false))->is_diff());
  }
  // Two branches of the tree: a clone of a, written elsewhere.
  disk.reset();
  MUST(pool.clone("c@a", "k", std::nullopt));
  auto at_k = at_a;
  {
    auto k = MUST(Disk::open(pool, "k", true));
    std::vector<uint8_t> data = pattern(4096, 4);
    REQUIRE_OK(k->write(data.data(), data.size(), 4096 * 5, false));
    REQUIRE_OK(k->flush());
    std::copy(data.begin(), data.end(), at_k.begin() + 4096 * 5);
  }
  CHECK(MUST(diff(pool, "k", "c@b")).ranges == differing(at_k, at_b));
  // A tombstone on one side over the image's data (layer 1) on the other.
  {
    auto k = MUST(Disk::open(pool, "k", true));
    for (uint64_t b = 0; b < 64; ++b) REQUIRE_OK(k->zero(4096, b * 4096, false, false));
    REQUIRE_OK(k->flush());
    std::fill(at_k.begin(), at_k.begin() + 64 * 4096, 0);
  }
  MUST(pool.clone("base:1", "fresh", std::nullopt));
  // Flattened, k shares no layer with fresh: its tombstones must still differ from the
  // image's layer (id 1) on the other side.
  {
    std::vector<uint64_t> drops;
    MUST(flatten_container(pool, "k", &drops));
    MUST(finish_drops_after_removal(pool, drops, "test"));
    auto k = MUST(Disk::open(pool, "k", true));
    for (uint64_t b = 100; b < 164; ++b) REQUIRE_OK(k->zero(4096, b * 4096, false, false));
    REQUIRE_OK(k->flush());
    std::fill(at_k.begin() + 100 * 4096, at_k.begin() + 164 * 4096, 0);
  }
  // Conservative there: a tombstone over a block the image holds as zeroes is reported too.
  const auto ranges = MUST(diff(pool, "k", "fresh")).ranges;
  std::set<uint64_t> reported;
  for (const auto& [off, len] : ranges)
    for (uint64_t b = off / 4096; b < (off + len) / 4096; ++b) reported.insert(b);
  for (const auto& [off, len] : differing(at_k, d.image))
    for (uint64_t b = off / 4096; b < (off + len) / 4096; ++b) {
      INFO("block " << b);
      CHECK(reported.count(b));
    }
  // (Precision is not checked here: with no layer shared, every block either side stores is
  // reported.)
  CHECK(diff(pool, "k", "c@nope").error().code == ENOENT);
}

TEST_CASE("live snapshots under concurrent writers capture every acknowledged write",
          "[snapshots][live]") {
  DiskFixture d(kImage, kImage);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  // Each writer owns its own blocks and records, per block, the last value it had written
  // (acknowledged) before each snapshot began, and the one in flight.
  constexpr int kWriters = 4;
  constexpr int kBlocksEach = 32;
  std::atomic<bool> stop{false};
  std::vector<std::vector<std::atomic<uint32_t>>> acked(kWriters);
  for (auto& v : acked) v = std::vector<std::atomic<uint32_t>>(kBlocksEach);
  // Generation 0 everywhere first: a block no writer reached yet reads 0, not the image.
  {
    std::vector<uint8_t> zeroes(kWriters * kBlocksEach * 4096, 0);
    REQUIRE_OK(disk->write(zeroes.data(), zeroes.size(), 0, false));
  }
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w)
    writers.emplace_back([&, w] {
      std::vector<uint8_t> buf(4096);
      for (uint32_t gen = 1; !stop.load(); ++gen)
        for (int i = 0; i < kBlocksEach && !stop.load(); ++i) {
          const uint64_t block = uint64_t(w) * kBlocksEach + i;
          std::fill(buf.begin(), buf.end(), 0);
          std::memcpy(buf.data(), &gen, sizeof gen);
          REQUIRE_OK(disk->write(buf.data(), buf.size(), block * 4096, false));
          acked[w][i].store(gen);
        }
    });
  for (int s = 0; s < 5; ++s) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::vector<uint32_t> before(kWriters * kBlocksEach);
    for (int w = 0; w < kWriters; ++w)
      for (int i = 0; i < kBlocksEach; ++i) before[w * kBlocksEach + i] = acked[w][i].load();
    MUST(disk->snapshot("s" + std::to_string(s)));
    std::vector<uint32_t> after(kWriters * kBlocksEach);
    for (int w = 0; w < kWriters; ++w)
      for (int i = 0; i < kBlocksEach; ++i) after[w * kBlocksEach + i] = acked[w][i].load();
    auto snap = MUST(Disk::open(pool, "c@s" + std::to_string(s), false));
    for (size_t b = 0; b < before.size(); ++b) {
      uint32_t got = 0;
      REQUIRE_OK(snap->read(&got, sizeof got, b * 4096));
      INFO("snapshot " << s << " block " << b);
      // Every write acknowledged before the snapshot began is in it; one in flight may land
      // on either side, so the value lies between the two observations (+1 for in flight).
      CHECK(got >= before[b]);
      CHECK(got <= after[b] + 1);
    }
  }
  stop = true;
  for (auto& t : writers) t.join();
  REQUIRE_OK(disk->flush());
  disk.reset();
  require_fsck_clean(pool);
}

TEST_CASE("live rollback and commit switch the open disk without reopening", "[snapshots][live]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 4096, pattern(4096 * 3, 1));
  MUST(disk->snapshot("a"));
  const auto at_a = d.model.bytes;
  do_write(*disk, d.model, 4096 * 2, pattern(4096 * 3, 2));
  const auto at_head = d.model.bytes;
  MUST(disk->rollback("a", std::string("head")));
  require_same(read_all(*disk), at_a);
  d.model.bytes = at_a;
  do_write(*disk, d.model, 0, pattern(100, 3));
  MUST(disk->rollback("head", std::nullopt));
  require_same(read_all(*disk), at_head);
  d.model.bytes = at_head;
  MUST(disk->commit("base:2", ""));
  do_write(*disk, d.model, 4096 * 9, pattern(4096, 4));
  REQUIRE_OK(disk->flush());
  check_disk(*disk, d.model);
  disk.reset();
  check_disk(*d.open(), d.model);
  require_same(read_export(pool, "c@a"), at_a);
  require_fsck_clean(pool);
}

TEST_CASE("a live change switches to a delta whose file was made before the gate closed",
          "[snapshots][live]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 4096, pattern(4096, 1));
  auto st = MUST(disk->snapshot("a"));
  // The new delta's file is there before any write, and no intent is left.
  CHECK(MUST(pool.store(Tier::kSsd).stat(st.delta.id)).has_value());
  CHECK(MUST(intents(pool, IntentRecord::Kind::kDelta)).empty());
  // A change that fails (the name exists) leaves neither the intent nor the file behind.
  const auto files_before = MUST(pool.store(Tier::kSsd).list()).size();
  CHECK(disk->snapshot("a").error().code == EEXIST);
  CHECK(disk->commit("nope:1/x", "").error().code == EINVAL);
  CHECK(disk->rollback("zz", std::nullopt).error().code == ENOENT);
  CHECK(MUST(intents(pool, IntentRecord::Kind::kDelta)).empty());
  CHECK(MUST(pool.store(Tier::kSsd).list()).size() == files_before);
  do_write(*disk, d.model, 8192, pattern(4096, 2));
  REQUIRE_OK(disk->flush());
  check_disk(*disk, d.model);
  disk.reset();
  check_disk(*d.open(), d.model);
  require_fsck_clean(pool);
}

TEST_CASE("flatten copies the chain into one layer; the image can then go", "[snapshots]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  {
    auto disk = d.open();
    do_write(*disk, d.model, 4096 * 3 + 1, pattern(4096 * 5, 1));
    do_zero(*disk, d.model, 4096 * 30, 4096 * 10);
    MUST(disk->snapshot("a"));
    do_write(*disk, d.model, 4096 * 100, pattern(4096 * 2, 2));
    MUST(disk->snapshot("b"));
    do_write(*disk, d.model, 4096 * 101, pattern(100, 3));  // stays in the delta
    REQUIRE_OK(disk->flush());
  }
  const auto at_a = read_export(pool, "c@a");
  std::vector<uint64_t> drops;
  auto st = MUST(flatten_container(pool, "c", &drops));
  MUST(finish_drops_after_removal(pool, drops, "test"));
  REQUIRE(st.chain.size() == 1);
  CHECK(st.chain[0].parent == 0);
  check_disk(*d.open(), d.model);
  require_same(read_export(pool, "c@a"), at_a);
  // Only the snapshots keep the old chain; without them and the image, one layer is left.
  MUST(remove_snapshot(pool, "c", "a"));
  MUST(remove_snapshot(pool, "c", "b"));
  CHECK(MUST(pool.inspect("c")).container.image_ref.empty());
  MUST(remove_image(pool, "base:1"));
  check_disk(*d.open(), d.model);
  require_fsck_clean(pool);
  // Flattening again changes nothing.
  auto again = MUST(flatten_container(pool, "c", &drops));
  CHECK(again.chain.size() == 1);
  CHECK(drops.empty());
}

TEST_CASE("a live flatten switches the open disk under concurrent writers", "[snapshots][live]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 4096 * 3 + 1, pattern(4096 * 5, 1));
  MUST(disk->snapshot("a"));
  do_write(*disk, d.model, 4096 * 100, pattern(4096 * 2, 2));
  MUST(disk->snapshot("b"));
  const auto at_a = read_export(pool, "c@a");
  // Writers keep writing their own blocks (above the image) while the flat copy is built
  // and switched in; the model is updated after the threads stop.
  constexpr int kWriters = 3;
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  std::vector<std::vector<uint8_t>> last(kWriters);
  for (int w = 0; w < kWriters; ++w)
    writers.emplace_back([&, w] {
      for (uint64_t i = 0; !stop; ++i) {
        last[w] = pattern(4096, 1000 * w + i);
        REQUIRE_OK(disk->write(last[w].data(), 4096, kImage + 4096 * w, false));
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  auto st = MUST(disk->flatten());
  stop = true;
  for (auto& t : writers) t.join();
  for (int w = 0; w < kWriters; ++w)
    std::copy(last[w].begin(), last[w].end(), d.model.bytes.begin() + kImage + 4096 * w);
  REQUIRE(st.chain.size() == 1);
  CHECK(st.chain[0].parent == 0);
  CHECK(st.container.image_ref.empty());
  check_disk(*disk, d.model);
  REQUIRE_OK(disk->flush());
  disk.reset();
  check_disk(*d.open(), d.model);
  require_same(read_export(pool, "c@a"), at_a);
  require_fsck_clean(pool);
}

TEST_CASE("a seeded random sequence of snapshot operations matches the model", "[snapshots]") {
  const uint64_t seed = Catch::rngSeed();
  INFO("seed " << seed << " (replay: --rng-seed " << seed << ")");
  std::mt19937_64 rng(seed);
  DiskFixture d(kImage, kImage);
  Pool& pool = *d.f.pool;
  std::map<std::string, std::vector<uint8_t>> containers{{"c", d.model.bytes}};
  std::map<std::string, std::vector<uint8_t>> snaps;  // "c@s"
  std::map<std::string, std::shared_ptr<Disk>> open;
  int next = 0;
  auto pick = [&](auto& m) {
    auto it = m.begin();
    std::advance(it, rng() % m.size());
    return it->first;
  };
  auto disk_of = [&](const std::string& c) {
    auto& slot = open[c];
    if (!slot) slot = MUST(Disk::open(pool, c, true));
    return slot;
  };
  for (int step = 0; step < 300; ++step) {
    const std::string c = pick(containers);
    auto& bytes = containers[c];
    const int op = static_cast<int>(rng() % 100);
    INFO("step " << step << " op " << op << " container " << c);
    if (getenv("SNAPDEBUG")) fprintf(stderr, "step %d op %d c %s\n", step, op, c.c_str());
    if (op < 40) {
      const uint64_t off = rng() % (kImage - 1);
      const uint64_t len = 1 + rng() % std::min<uint64_t>(3 * 4096, kImage - off);
      auto data = pattern(len, rng());
      REQUIRE_OK(disk_of(c)->write(data.data(), len, off, false));
      std::copy(data.begin(), data.end(), bytes.begin() + static_cast<long>(off));
    } else if (op < 50) {
      const uint64_t off = rng() % (kImage - 1);
      const uint64_t len = 1 + rng() % std::min<uint64_t>(5 * 4096, kImage - off);
      REQUIRE_OK(disk_of(c)->zero(len, off, false, false));
      std::fill(bytes.begin() + static_cast<long>(off),
                bytes.begin() + static_cast<long>(off + len), 0);
    } else if (op < 58) {
      REQUIRE_OK(disk_of(c)->flush());
    } else if (op < 68) {
      const std::string s = "s" + std::to_string(next++);
      if (rng() % 2) {
        MUST(disk_of(c)->snapshot(s));  // live
      } else {
        if (auto it = open.find(c); it != open.end()) {
          REQUIRE_OK(it->second->flush());
          open.erase(it);
        }
        MUST(snapshot_container(pool, c, s));  // offline
      }
      snaps[c + "@" + s] = bytes;
    } else if (op < 76) {
      std::vector<std::string> mine;
      for (const auto& [k, _] : snaps)
        if (k.substr(0, k.find('@')) == c) mine.push_back(k);
      if (mine.empty()) continue;
      const std::string ref = mine[rng() % mine.size()];
      const std::string s = ref.substr(ref.find('@') + 1);
      std::optional<std::string> keep;
      if (rng() % 3 == 0) {
        keep = "k" + std::to_string(next++);
        REQUIRE_OK(disk_of(c)->flush());
        snaps[c + "@" + *keep] = bytes;
      }
      if (getenv("SNAPDEBUG"))
        fprintf(stderr, "  rollback to %s keep %s\n", ref.c_str(), keep ? keep->c_str() : "-");
      MUST(disk_of(c)->rollback(s, keep));
      bytes = snaps[ref];
    } else if (op < 84) {
      if (snaps.empty()) continue;
      const std::string ref = pick(snaps);
      const auto at = ref.find('@');
      // Close the disks (flushed: a Disk closed unflushed may lose writes, as after a crash)
      // so that merges are not blocked by their locks, half the time.
      if (rng() % 2) {
        for (auto& [name, disk] : open) REQUIRE_OK(disk->flush());
        open.clear();
      }
      auto rr = MUST(remove_snapshot(pool, ref.substr(0, at), ref.substr(at + 1)));
      if (getenv("SNAPDEBUG"))
        fprintf(stderr, "  rm %s fate %d layer %lu merged %lu why %s\n", ref.c_str(), int(rr.fate),
                rr.layer, rr.merged_into, rr.why.c_str());
      snaps.erase(ref);
    } else if (op < 90) {
      if (snaps.empty() || containers.size() > 5) continue;
      const std::string ref = pick(snaps);
      const std::string name = "n" + std::to_string(next++);
      MUST(pool.clone(ref, name, std::nullopt));
      containers[name] = snaps[ref];
    } else if (op < 94) {
      const std::string ref = "img:" + std::to_string(next++);
      MUST(disk_of(c)->commit(ref, ""));
    } else if (op < 97) {
      for (auto& [name, disk] : open) REQUIRE_OK(disk->flush());
      open.clear();
      MUST(gc(pool));
    } else {
      // Check everything.
      for (const auto& [name, want] : containers) require_same(read_all(*disk_of(name)), want);
      for (const auto& [ref, want] : snaps) require_same(read_export(pool, ref), want);
    }
  }
  for (const auto& [name, want] : containers) require_same(read_all(*disk_of(name)), want);
  for (const auto& [ref, want] : snaps) require_same(read_export(pool, ref), want);
  for (auto& [name, disk] : open) REQUIRE_OK(disk->flush());
  open.clear();
  MUST(gc(pool));
  for (const auto& [ref, want] : snaps) require_same(read_export(pool, ref), want);
  require_fsck_clean(pool);
}
