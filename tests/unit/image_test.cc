// Unit tests for import (lib/import.h) that need the Pool's test hook: interleavings with
// other processes, the source changing underneath, and what a failed import leaves behind.
#include <sys/stat.h>

#include <filesystem>

#include "fsck.h"
#include "import.h"
#include "pool.h"
#include "test_util.h"

using namespace layer;
using test::PoolFixture;

namespace {

// The layer ids named by the pool's `intents` rows.
std::vector<LayerId> intent_layers(Pool& pool) {
  std::vector<LayerId> out;
  ReadTxn txn = MUST(pool.index().begin_read());
  REQUIRE_OK(
      txn.scan(Db::kIntents, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        IntentRecord intent = MUST(decode_intent(v, decode_key_u64(k).value_or(0)));
        out.push_back(intent.layer);
        return true;
      }));
  return out;
}

// Rows of `db` whose key starts with the layer id.
int rows_of(Pool& pool, Db db, LayerId id) {
  int rows = 0;
  ReadTxn txn = MUST(pool.index().begin_read());
  REQUIRE_OK(txn.scan(db, key_u64(id), [&](std::string_view, std::string_view) -> Result<bool> {
    rows++;
    return true;
  }));
  return rows;
}

}  // namespace

TEST_CASE("import holds the new layer's lock before its intent is visible", "[image][import]") {
  PoolFixture f;
  const std::string file = f.tmp.sub("img.raw");
  test::write_patterned_image(file, 256 * 1024, 4096, 7);
  int seen = 0;
  f.pool->set_test_hook([&](std::string_view point) {
    if (point != "import.intent-committed") return;
    ++seen;
    // fsck judges an intent whose layer is unlocked an interrupted import: from the moment
    // the intent is visible, the lock must be held, in this process and for others.
    auto layers = intent_layers(*f.pool);
    REQUIRE(layers.size() == 1);
    CHECK(MUST(f.pool->locks().is_locked(LockKind::kLayer, layers[0])));
    test::Child child([&] {
      auto other = LockTable::open(f.pool->paths().run_dir);
      if (!other.ok()) return 2;
      auto locked = (*other)->is_locked(LockKind::kLayer, layers[0]);
      return locked.ok() && *locked ? 0 : 1;
    });
    CHECK(child.wait() == 0);
  });
  ImageInfo info = MUST(import_image(*f.pool, "locked:1", file, 4096, nullptr));
  CHECK(seen == 1);
  CHECK(intent_layers(*f.pool).empty());
  CHECK_FALSE(MUST(f.pool->locks().is_locked(LockKind::kLayer, info.layer.id)));
}

TEST_CASE("a failed import never removes a layer file it did not create", "[image][import]") {
  PoolFixture f;
  const std::string file = f.tmp.sub("img.raw");
  test::write_patterned_image(file, 256 * 1024, 4096, 8);
  // A file already where the import's layer file would go (another pool's, say): the
  // import's create fails with EEXIST, and its rollback must leave the file alone.
  LayerId next = 0;
  f.pool->set_test_hook([&](std::string_view point) {
    if (point != "import.intent-committed") return;
    auto layers = intent_layers(*f.pool);
    REQUIRE(layers.size() == 1);
    next = layers[0];
    LayerRecord probe{next, 0, Tier::kSsd, 0, 4096, LayerState::kFrozen, 1, 0};
    test::write_raw_image(f.pool->layer_path(probe), std::vector<uint8_t>(4096, 0x5a), {{0, 4096}});
  });
  REQUIRE_ERRNO(import_image(*f.pool, "clash:1", file, 4096, nullptr), EEXIST);
  REQUIRE(next != 0);
  LayerRecord probe{next, 0, Tier::kSsd, 0, 4096, LayerState::kFrozen, 1, 0};
  const std::string foreign = f.pool->layer_path(probe);
  REQUIRE(std::filesystem::exists(foreign));
  CHECK(test::read_file(foreign) == std::vector<uint8_t>(4096, 0x5a));
  CHECK(intent_layers(*f.pool).empty());
  CHECK(MUST(list_images(*f.pool)).empty());
}

TEST_CASE("an image file changed during import fails the import and leaves nothing",
          "[image][import]") {
  PoolFixture f;
  const std::string file = f.tmp.sub("img.raw");
  const uint64_t size = 8 << 20;
  // Data at 0 and 4 MiB; the rest is a hole.
  std::vector<uint8_t> content(size, 0);
  std::fill(content.begin(), content.begin() + 4096, 0x11);
  std::fill(content.begin() + (4 << 20), content.begin() + (4 << 20) + 4096, 0x22);
  test::write_raw_image(file, content, {{0, 4096}, {4 << 20, 4096}});
  // An old mtime, so the writer below changes it even within one timestamp tick.
  const struct timespec old_times[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(::utimensat(AT_FDCWD, file.c_str(), old_times, 0) == 0);

  LayerId layer_id = 0;
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "import.intent-committed") {
      auto layers = intent_layers(*f.pool);
      REQUIRE(layers.size() == 1);
      layer_id = layers[0];
    }
    if (point != "import.data-walked") return;
    // A writer fills part of a former hole after the data regions were found.
    test::Fd fd(::open(file.c_str(), O_WRONLY | O_CLOEXEC));
    REQUIRE(fd.get() >= 0);
    const std::vector<uint8_t> data(4096, 0x33);
    test::pwrite_all(fd.get(), data.data(), data.size(), 2 << 20);
  });
  auto r = import_image(*f.pool, "moving:1", file, 4096, nullptr);
  REQUIRE_FALSE(r.ok());
  INFO(test::describe(r.error()));
  CHECK(r.error().code == EBUSY);
  CHECK_THAT(r.error().message,
             Catch::Contains(file) && Catch::Contains("changed while importing"));
  REQUIRE(layer_id != 0);
  CHECK(MUST(list_images(*f.pool)).empty());
  CHECK(intent_layers(*f.pool).empty());
  CHECK(rows_of(*f.pool, Db::kMaps, layer_id) == 0);
  CHECK(rows_of(*f.pool, Db::kSums, layer_id) == 0);
  CHECK(rows_of(*f.pool, Db::kLayers, layer_id) == 0);
  LayerRecord probe{layer_id, 0, Tier::kSsd, 0, 4096, LayerState::kFrozen, 1, 0};
  CHECK_FALSE(std::filesystem::exists(f.pool->layer_path(probe)));

  // Unchanged, the same file imports.
  f.pool->set_test_hook(nullptr);
  MUST(import_image(*f.pool, "moving:1", file, 4096, nullptr));
}

TEST_CASE("import commits its rows in bounded transactions as the copy goes", "[image][import]") {
  PoolFixture f;
  // 40 GiB with one 4 KiB data block every 4 MiB: 10240 sums rows and 2560 chunk rows, more
  // than one transaction's worth (10k rows, index.h kMaxRowsPerTxn).
  constexpr uint64_t kMaxRowsPerTxn = 10000;
  const uint64_t size = 40ULL << 30, step = 4 << 20;
  const std::string file = f.tmp.sub("scatter.raw");
  {
    test::Fd fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    REQUIRE(fd.get() >= 0);
    REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
    std::vector<uint8_t> block(4096);
    for (uint64_t off = 0; off < size; off += step) {
      std::memcpy(block.data(), &off, sizeof off);
      block[4095] = 1;
      test::pwrite_all(fd.get(), block.data(), block.size(), off);
    }
  }
  LayerId layer_id = 0;
  uint64_t copied = 0;
  std::vector<std::pair<int, uint64_t>> commits;  // (rows in the index, bytes copied by then)
  f.pool->set_test_hook([&](std::string_view point) {
    if (point == "import.intent-committed") layer_id = intent_layers(*f.pool).at(0);
    if (point == "import.rows-committed")
      commits.emplace_back(
          rows_of(*f.pool, Db::kMaps, layer_id) + rows_of(*f.pool, Db::kSums, layer_id), copied);
  });
  ImageInfo info = MUST(import_image(*f.pool, "scatter:1", file, 4096,
                                     [&](uint64_t done, uint64_t) { copied = done; }));
  CHECK(info.data_blocks == size / step);
  REQUIRE(commits.size() >= 2);
  // The first batch left memory while most of the image was still to copy.
  CHECK(commits.front().second < size);
  int before = 0;
  for (const auto& [rows, at] : commits) {
    INFO("rows " << rows << " after " << at << " bytes");
    CHECK(rows - before > 0);
    CHECK(static_cast<uint64_t>(rows - before) <= kMaxRowsPerTxn);
    before = rows;
  }
  CHECK(before == static_cast<int>(size / step + size / step / 4));
  FsckReport rep = MUST(fsck(*f.pool, true, false));
  CHECK(rep.problems.empty());
  CHECK(rep.groups_verified == size / step);
}
