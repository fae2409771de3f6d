// Tests of fsck --repair against work that runs while it scans (forced with Pool's test hook),
// of what it reports, and of removals under drop intents (bounded, finished after a crash).
#include <filesystem>
#include <fstream>

#include "disk_test_util.h"
#include "fsck.h"
#include "intents.h"

using namespace layer;
using namespace disktest;
using test::PoolFixture;

namespace {

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

// Puts an imported image back into the state of an import that wrote its rows and file and
// has not published yet: its `layers` and `images` rows gone, an import intent naming it.
// Returns the intent id; `publish` undoes it as the import's final transaction would.
struct UnpublishedImport {
  uint64_t intent_id = 0;
  LayerId layer = 0;
  std::string layer_row, image_row;
};

UnpublishedImport unpublish(Pool& pool, const std::string& ref) {
  UnpublishedImport u;
  REQUIRE_OK(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto iv, txn.get(Db::kImages, ref));
    if (!iv) return make_error(ENOENT, "no image");
    u.image_row = std::string(*iv);
    LAYER_ASSIGN(auto image, decode_image(*iv, ref));
    u.layer = image.top_layer;
    LAYER_ASSIGN(auto lv, txn.get(Db::kLayers, key_u64(u.layer)));
    u.layer_row = std::string(*lv);
    LAYER_TRY(txn.del(Db::kImages, ref));
    LAYER_TRY(txn.del(Db::kLayers, key_u64(u.layer)));
    LAYER_ASSIGN(u.intent_id, txn.next_id("intent"));
    IntentRecord intent{IntentRecord::Kind::kImport, u.layer, ref, now_unix()};
    return txn.put(Db::kIntents, key_u64(u.intent_id), encode(intent));
  }));
  return u;
}

Status publish(Pool& pool, const UnpublishedImport& u, const std::string& ref) {
  return pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_TRY(txn.put(Db::kLayers, key_u64(u.layer), u.layer_row));
    LAYER_TRY(txn.put(Db::kImages, ref, u.image_row));
    return txn.del(Db::kIntents, key_u64(u.intent_id));
  });
}

uint64_t map_rows(Pool& pool, LayerId id) {
  uint64_t n = 0;
  ReadTxn txn = MUST(pool.index().begin_read());
  REQUIRE_OK(
      txn.scan(Db::kMaps, key_u64(id), [&](std::string_view, std::string_view) -> Result<bool> {
        n++;
        return true;
      }));
  return n;
}

}  // namespace

TEST_CASE("fsck --repair keeps a layer file created while it scans", "[fsck][repair]") {
  PoolFixture f;
  auto image = f.import("base:1", 64 * 4096, 4096, 3);
  std::vector<uint8_t> data = pattern(4096, 4);
  // Between fsck's index scan and its directory scan: a clone and its first write.
  f.pool->set_test_hook([&](std::string_view point) {
    if (point != "fsck.index_scanned") return;
    MUST(f.pool->clone("base:1", "late", std::nullopt));
    auto disk = MUST(Disk::open(*f.pool, "late", true));
    REQUIRE_OK(disk->write(data.data(), data.size(), 8192, false));
    REQUIRE_OK(disk->flush());
  });
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  f.pool->set_test_hook(nullptr);
  INFO("repaired:\n" << joined(rep.repaired) << "problems:\n" << joined(rep.problems));
  CHECK(rep.repaired.empty());
  auto info = MUST(f.pool->inspect("late"));
  CHECK(std::filesystem::exists(f.pool->layer_path(info.chain[0])));
  auto disk = MUST(Disk::open(*f.pool, "late", true));
  std::vector<uint8_t> want = image;
  std::copy(data.begin(), data.end(), want.begin() + 8192);
  require_same(read_all(*disk), want);
}

TEST_CASE("fsck --repair does not roll back an import that finished while it scanned",
          "[fsck][repair]") {
  PoolFixture f;
  auto image = f.import("base:1", 64 * 4096, 4096, 5);
  const UnpublishedImport u = unpublish(*f.pool, "base:1");
  const uint64_t rows = map_rows(*f.pool, u.layer);
  REQUIRE(rows > 0);
  // fsck sees an intent whose layer nobody locks (interrupted, it thinks); the import then
  // publishes before the repair runs.
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "fsck.scanned") REQUIRE_OK(publish(*f.pool, u, "base:1"));
  });
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  f.pool->set_test_hook(nullptr);
  INFO("repaired:\n" << joined(rep.repaired) << "problems:\n" << joined(rep.problems));
  CHECK(rep.repaired.empty());
  CHECK(map_rows(*f.pool, u.layer) == rows);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  auto disk = MUST(Disk::open(*f.pool, "c", false));
  require_same(read_all(*disk), image);
  disk.reset();
  FsckReport again = MUST(fsck(*f.pool, true, false));
  CHECK(joined(again.problems) == "");
}

TEST_CASE("fsck --repair leaves an import alone whose lock was taken after the scan",
          "[fsck][repair]") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 7);
  const UnpublishedImport u = unpublish(*f.pool, "base:1");
  const uint64_t rows = map_rows(*f.pool, u.layer);
  Lock held;
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "fsck.scanned")
      held = MUST(f.pool->locks().try_lock(LockKind::kLayer, u.layer, true, "the import"));
  });
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  f.pool->set_test_hook(nullptr);
  INFO("repaired:\n" << joined(rep.repaired) << "problems:\n" << joined(rep.problems));
  CHECK(rep.repaired.empty());
  CHECK(rep.problems.empty());  // an import that runs is not a problem
  CHECK(map_rows(*f.pool, u.layer) == rows);
  CHECK(std::filesystem::exists(f.pool->layer_path(u.layer, Tier::kSsd)));
  // Once the import is gone for good (its lock free), the repair rolls it back.
  held.release();
  FsckReport later = MUST(fsck(*f.pool, false, true));
  REQUIRE(later.repaired.size() == 1);
  CHECK(later.repaired[0] == fmt::format("interrupted import of base:1 (intent {}, layer {}): "
                                         "rolled back",
                                         u.intent_id, u.layer));
  CHECK(map_rows(*f.pool, u.layer) == 0);
  CHECK_FALSE(std::filesystem::exists(f.pool->layer_path(u.layer, Tier::kSsd)));
  CHECK(joined(MUST(fsck(*f.pool, true, false)).problems) == "");
}

TEST_CASE("fsck reports each problem in one line and --repair reports what it fixed",
          "[fsck][repair]") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 9);
  const std::string orphan = f.pool->paths().tier_dir[1] + "/999.layer";
  { std::ofstream(orphan) << "x"; }
  FsckReport check = MUST(fsck(*f.pool, false, false));
  REQUIRE(check.problems.size() == 1);
  CHECK(check.problems[0] ==
        fmt::format("orphan file {}: no layer names it; `layer fsck --repair` moves it to "
                    "lost+found",
                    orphan));
  const std::string unfinished = f.pool->paths().tier_dir[0] + "/998.layer.new";
  { std::ofstream(unfinished) << "y"; }
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  CHECK(rep.problems.empty());
  REQUIRE(rep.repaired.size() == 2);
  // The orphan is kept (it may be a container's data an older index forgot); the leftover of
  // an unfinished create holds nothing and goes.
  const std::string kept = f.root + "/lost+found/hdd-999.layer";
  CHECK(joined(rep.repaired).find(fmt::format("orphan file {}: moved to {}", orphan, kept)) !=
        std::string::npos);
  CHECK(joined(rep.repaired).find(fmt::format("orphan file {}: removed", unfinished)) !=
        std::string::npos);
  CHECK_FALSE(std::filesystem::exists(orphan));
  CHECK_FALSE(std::filesystem::exists(unfinished));
  CHECK(std::filesystem::exists(kept));
  FsckReport after = MUST(fsck(*f.pool, true, false));
  CHECK(after.problems.empty());
  CHECK(after.repaired.empty());
  // Another orphan of the same name does not replace the first.
  { std::ofstream(orphan) << "z"; }
  MUST(fsck(*f.pool, false, true));
  CHECK(std::filesystem::exists(kept + ".1"));
}

TEST_CASE("fsck --repair sets wrong refcounts to the references found, never to 0",
          "[fsck][repair]") {
  PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 9);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  LayerId base = 0, delta = 0;
  {
    auto txn = MUST(f.pool->index().begin_read());
    base = MUST(decode_image(*MUST(txn.get(Db::kImages, "base:1")), "base:1")).top_layer;
    delta = MUST(f.pool->get_container(txn, "c")).delta_layer;
  }
  auto set_refcount = [&](LayerId id, uint32_t n) {
    MUST(f.pool->committer().run([&](WriteTxn& txn) -> Status {
      LAYER_ASSIGN(auto v, txn.get(Db::kLayers, key_u64(id)));
      LAYER_ASSIGN(auto rec, decode_layer(*v, id));
      rec.refcount = n;
      return txn.put(Db::kLayers, key_u64(id), encode(rec));
    }));
  };
  set_refcount(base, 7);
  FsckReport check = MUST(fsck(*f.pool, false, false));
  CHECK(
      joined(check.problems).find(fmt::format("layer {}: refcount is 7, but 2 references", base)) !=
      std::string::npos);
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  CHECK(rep.problems.empty());
  CHECK(joined(rep.repaired).find(fmt::format("layer {}: refcount 7 set to 2", base)) !=
        std::string::npos);
  CHECK(MUST(fsck(*f.pool, false, false)).problems.empty());

  // A layer that nothing references keeps its count: its data may still be wanted.
  MUST(f.pool->committer().run(
      [&](WriteTxn& txn) -> Status { return txn.del(Db::kContainers, "c"); }));
  rep = MUST(fsck(*f.pool, false, true));
  CHECK(joined(rep.problems)
            .find(fmt::format("layer {}: refcount is 1, but nothing references it", delta)) !=
        std::string::npos);
}

TEST_CASE("a removal interrupted by a crash is finished by the next open", "[fsck][rm]") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 11);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  {
    auto disk = MUST(Disk::open(*f.pool, "c", true));
    auto data = pattern(8 * 4096, 12);
    REQUIRE_OK(disk->write(data.data(), data.size(), 0, false));
    REQUIRE_OK(disk->flush());
  }
  auto info = MUST(f.pool->inspect("c"));
  const LayerId delta = info.container.delta_layer;
  const std::string path = f.pool->layer_path(info.chain[0]);
  // Many rows, so the removal needs several bounded transactions: rows of chunks beyond the
  // disk are still the layer's rows as far as the removal is concerned.
  REQUIRE_OK(f.pool->committer().run([&](WriteTxn& txn) -> Status {
    const std::string row(1, static_cast<char>(BlockState::kZero));
    for (uint32_t c = 1; c <= 25000; c++) LAYER_TRY(txn.put(Db::kMaps, key_u64_u32(delta, c), row));
    return {};
  }));
  // The crash: right after the transaction that dropped the container.
  struct Crash {};
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "drop.rows") throw Crash{};
  });
  CHECK_THROWS_AS(f.pool->remove_container("c"), Crash);
  f.pool->set_test_hook(nullptr);
  CHECK(map_rows(*f.pool, delta) == 25001);
  CHECK(std::filesystem::exists(path));

  f.pool.reset();
  {
    auto ro = MUST(Pool::open(f.root, Pool::OpenOptions{.read_only = true}));
    FsckReport rep = MUST(fsck(*ro, false, false));
    REQUIRE(rep.problems.size() == 1);
    CHECK(rep.problems[0].find(fmt::format("unfinished removal of layer {}", delta)) == 0);
  }
  f.reopen();
  CHECK(map_rows(*f.pool, delta) == 0);
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(MUST(intents(*f.pool, IntentRecord::Kind::kDrop)).empty());
  FsckReport rep = MUST(fsck(*f.pool, true, false));
  CHECK(joined(rep.problems) == "");
  CHECK_ERRNO(f.pool->inspect("c"), ENOENT);
}

TEST_CASE("fsck --repair finishes an interrupted removal", "[fsck][rm]") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 13);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  {
    auto disk = MUST(Disk::open(*f.pool, "c", true));
    auto data = pattern(4096, 14);
    REQUIRE_OK(disk->write(data.data(), data.size(), 0, false));
    REQUIRE_OK(disk->flush());
  }
  const LayerId delta = MUST(f.pool->inspect("c")).container.delta_layer;
  struct Crash {};
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "drop.rows") throw Crash{};
  });
  CHECK_THROWS_AS(f.pool->remove_container("c"), Crash);
  f.pool->set_test_hook(nullptr);
  FsckReport rep = MUST(fsck(*f.pool, false, true));
  REQUIRE(rep.repaired.size() == 1);
  CHECK(rep.repaired[0].find("unfinished removal") == 0);
  CHECK(map_rows(*f.pool, delta) == 0);
  CHECK(joined(MUST(fsck(*f.pool, true, false)).problems) == "");
}
