// Unit tests for lib/pool.h: create/open and format checks, image import,
// clone, removal, listing, and fsck (missing, truncated, orphan and corrupt files).
#include "pool.h"

#include <sys/stat.h>

#include <map>
#include <set>

#include "disk.h"
#include "fsck.h"
#include "snapshots.h"
#include "test_util.h"

using namespace layer;
using test::PoolFixture;

namespace {

// Puts one meta value into a closed pool's index (the pool must not be open in this process).
void put_meta(const std::string& root, std::string_view key, std::string_view value) {
  auto index = MUST(Index::open(root + "/index", Index::Options{}));
  WriteTxn txn = MUST(index->begin_write());
  REQUIRE_OK(txn.put(Db::kMeta, key, value));
  REQUIRE_OK(txn.commit());
}

std::string be32(uint32_t v) { return key_u64(v).substr(4); }

uint64_t allocated_bytes(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

bool has_problem_containing(const FsckReport& r, const std::string& needle) {
  for (const auto& p : r.problems)
    if (p.find(needle) != std::string::npos) return true;
  return false;
}

std::string problems_text(const FsckReport& r) {
  std::string s;
  for (const auto& p : r.problems) s += "\n  " + p;
  return s;
}

#define REQUIRE_FSCK_CLEAN(pool, full)                    \
  do {                                                    \
    FsckReport rep_ = MUST(fsck(*(pool), (full), false)); \
    INFO("fsck problems:" << problems_text(rep_));        \
    REQUIRE(rep_.problems.empty());                       \
  } while (0)

}  // namespace

// ---- create / open ----

TEST_CASE("Pool::create then open", "[pool]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  REQUIRE_OK(Pool::create(root, "", ""));
  CHECK(std::filesystem::is_directory(root + "/index"));
  CHECK(std::filesystem::is_directory(root + "/run"));
  REQUIRE_OK(Pool::validate(root));
  auto pool = MUST(Pool::open(root, Pool::OpenOptions{}));
  CHECK_FALSE(pool->read_only());
  CHECK(pool->paths().root == std::filesystem::canonical(root).string());
  CHECK(std::filesystem::is_directory(pool->paths().tier_dir[0]));
  CHECK(std::filesystem::is_directory(pool->paths().tier_dir[1]));
  CHECK(pool->paths().tier_dir[0] != pool->paths().tier_dir[1]);
  CHECK(MUST(list_images(*pool)).empty());
  CHECK(MUST(pool->list_containers()).empty());
  REQUIRE_FSCK_CLEAN(pool, true);
}

TEST_CASE("Pool::create with tier directories elsewhere", "[pool]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  std::filesystem::create_directories(tmp.sub("fast"));
  REQUIRE_OK(Pool::create(root, tmp.sub("fast"), tmp.sub("slow/x")));
  auto pool = MUST(Pool::open(root, Pool::OpenOptions{}));
  CHECK(pool->paths().tier_dir[static_cast<int>(Tier::kSsd)] ==
        std::filesystem::canonical(tmp.sub("fast")).string());
  CHECK(pool->paths().tier_dir[static_cast<int>(Tier::kHdd)] ==
        std::filesystem::canonical(tmp.sub("slow/x")).string());
}

TEST_CASE("a pool copied whole (cp -a) is a pool of its own", "[pool][tiers]") {
  // Its tiers inside it are stored relative to it: the copy reads and writes its own layer
  // files, never the original's.
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 3);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  const std::vector<uint8_t> before(4096, 0x11), after(4096, 0x22);
  {
    auto disk = MUST(Disk::open(*f.pool, "c", true));
    REQUIRE_OK(disk->write(before.data(), before.size(), 8192, false));
    REQUIRE_OK(disk->flush());
  }
  f.pool.reset();
  const std::string copy = f.tmp.sub("copy");
  std::filesystem::copy(f.root, copy, std::filesystem::copy_options::recursive);
  {
    auto pool = MUST(Pool::open(copy, Pool::OpenOptions{}));
    for (int t = 0; t < 2; ++t)
      CHECK(pool->paths().tier_dir[t].starts_with(std::filesystem::canonical(copy).string() + "/"));
    auto disk = MUST(Disk::open(*pool, "c", true));
    REQUIRE_OK(disk->write(after.data(), after.size(), 8192, false));
    REQUIRE_OK(disk->flush());
  }
  f.reopen();
  auto disk = MUST(Disk::open(*f.pool, "c", false));
  std::vector<uint8_t> got(4096);
  REQUIRE_OK(disk->read(got.data(), got.size(), 8192));
  CHECK(got == before);
  REQUIRE_FSCK_CLEAN(f.pool, true);
}

TEST_CASE("Pool::create refuses an existing pool or a non-empty directory", "[pool]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  REQUIRE_OK(Pool::create(root, "", ""));
  REQUIRE_ERRNO(Pool::create(root, "", ""), EEXIST);
  // A non-empty directory that is not a pool.
  std::filesystem::create_directories(tmp.sub("full/stuff"));
  REQUIRE_ERRNO(Pool::create(tmp.sub("full"), "", ""), EEXIST);
  // An existing empty directory is fine.
  std::filesystem::create_directories(tmp.sub("empty"));
  REQUIRE_OK(Pool::create(tmp.sub("empty"), "", ""));
}

TEST_CASE("a tier directory belongs to one pool", "[pool][tiers]") {
  test::TempDir tmp;
  const std::string shared = tmp.sub("shared-ssd");
  REQUIRE_OK(Pool::create(tmp.sub("a"), shared, ""));
  // Each tier holds a marker naming its pool; a second pool cannot claim the directory.
  CHECK(std::filesystem::exists(shared + "/.layer-pool"));
  CHECK(std::filesystem::exists(tmp.sub("a/tiers/hdd/.layer-pool")));
  auto e = ERROR_OF(Pool::create(tmp.sub("b"), shared, ""));
  CHECK(e.code == EEXIST);
  CHECK_THAT(e.message, Catch::Contains(std::filesystem::canonical(shared).string()) ||
                            Catch::Contains(shared));
  // Nor a non-empty directory, nor one directory for both tiers.
  std::filesystem::create_directories(tmp.sub("used"));
  test::write_raw_image(tmp.sub("used/1.layer"), std::vector<uint8_t>(512, 1), {{0, 512}});
  REQUIRE_ERRNO(Pool::create(tmp.sub("c"), tmp.sub("used"), ""), EEXIST);
  REQUIRE_ERRNO(Pool::create(tmp.sub("d"), tmp.sub("same"), tmp.sub("same")), EINVAL);
  // An empty existing directory is fine.
  std::filesystem::create_directories(tmp.sub("empty"));
  REQUIRE_OK(Pool::create(tmp.sub("e"), tmp.sub("empty"), ""));
  MUST(Pool::open(tmp.sub("e"), Pool::OpenOptions{}));
}

TEST_CASE("Pool::open refuses a tier directory of another pool or without its marker",
          "[pool][tiers]") {
  test::TempDir tmp;
  REQUIRE_OK(Pool::create(tmp.sub("a"), "", ""));
  REQUIRE_OK(Pool::create(tmp.sub("b"), "", ""));
  const std::string a_ssd = tmp.sub("a/tiers/ssd");
  const std::string b_ssd = tmp.sub("b/tiers/ssd");
  const auto a_marker = test::read_file(a_ssd + "/.layer-pool");
  const auto b_marker = test::read_file(b_ssd + "/.layer-pool");
  REQUIRE(a_marker != b_marker);
  SECTION("another pool's marker") {
    std::filesystem::copy_file(b_ssd + "/.layer-pool", a_ssd + "/.layer-pool",
                               std::filesystem::copy_options::overwrite_existing);
    auto e = ERROR_OF(Pool::open(tmp.sub("a"), Pool::OpenOptions{}));
    CHECK(e.code == EIO);
    CHECK_THAT(e.message, Catch::Contains("tiers/ssd"));
    // Both ids are named.
    std::string a_id(a_marker.begin(), a_marker.end()), b_id(b_marker.begin(), b_marker.end());
    a_id = a_id.substr(0, a_id.find('\n'));
    b_id = b_id.substr(0, b_id.find('\n'));
    CHECK_THAT(e.message, Catch::Contains(a_id) && Catch::Contains(b_id));
    REQUIRE_ERRNO(Pool::validate(tmp.sub("a")), EIO);
  }
  SECTION("no marker (an unmounted tier, say)") {
    std::filesystem::remove(a_ssd + "/.layer-pool");
    auto e = ERROR_OF(Pool::open(tmp.sub("a"), Pool::OpenOptions{.read_only = true}));
    CHECK(e.code == EIO);
    CHECK_THAT(e.message, Catch::Contains("tiers/ssd") && Catch::Contains(".layer-pool"));
  }
  SECTION("a pool made before markers opens as it is") {
    std::filesystem::remove(a_ssd + "/.layer-pool");
    std::filesystem::remove(tmp.sub("a/tiers/hdd/.layer-pool"));
    {
      auto index = MUST(Index::open(tmp.sub("a/index"), Index::Options{}));
      WriteTxn txn = MUST(index->begin_write());
      REQUIRE_OK(txn.del(Db::kMeta, "pool.id"));
      REQUIRE_OK(txn.commit());
    }
    MUST(Pool::open(tmp.sub("a"), Pool::OpenOptions{}));
    REQUIRE_OK(Pool::validate(tmp.sub("a")));
  }
}

TEST_CASE("Pool::open of a missing or non-pool directory is ENOENT naming the path", "[pool]") {
  test::TempDir tmp;
  const std::string missing = tmp.sub("no-such-pool");
  auto r = Pool::open(missing, Pool::OpenOptions{});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == ENOENT);
  CHECK_THAT(r.error().message, Catch::Contains(missing));
  CHECK_FALSE(std::filesystem::exists(missing));  // open creates nothing

  std::filesystem::create_directories(tmp.sub("plain"));
  auto r2 = Pool::open(tmp.sub("plain"), Pool::OpenOptions{});
  REQUIRE_FALSE(r2.ok());
  CHECK(r2.error().code == ENOENT);
  CHECK_THAT(r2.error().message, Catch::Contains(tmp.sub("plain")));
  CHECK(std::filesystem::is_empty(tmp.sub("plain")));

  auto v = Pool::validate(missing);
  REQUIRE_FALSE(v.ok());
  CHECK(v.error().code == ENOENT);
}

TEST_CASE("a pool of a newer format version is refused with ENOTSUP", "[pool][format]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  REQUIRE_OK(Pool::create(root, "", ""));
  put_meta(root, "format", be32(kFormatVersion + 1));
  auto r = Pool::open(root, Pool::OpenOptions{});
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == ENOTSUP);
  CHECK_THAT(r.error().message, Catch::Contains(std::to_string(kFormatVersion + 1)));
  auto v = Pool::validate(root);
  REQUIRE_FALSE(v.ok());
  CHECK(v.error().code == ENOTSUP);
  Pool::OpenOptions ro;
  ro.read_only = true;
  REQUIRE_ERRNO(Pool::open(root, ro), ENOTSUP);

  // The current version opens again.
  put_meta(root, "format", be32(kFormatVersion));
  REQUIRE_OK(Pool::validate(root));
  auto pool = MUST(Pool::open(root, Pool::OpenOptions{}));
}

TEST_CASE("an unknown incompatible feature bit is refused with ENOTSUP naming it",
          "[pool][format]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  REQUIRE_OK(Pool::create(root, "", ""));
  for (unsigned bit : {0u, 5u, 63u}) {
    if (kKnownIncompatFeatures & (1ULL << bit)) continue;
    INFO("bit " << bit);
    put_meta(root, "features.incompat", key_u64(1ULL << bit));
    auto r = Pool::open(root, Pool::OpenOptions{});
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == ENOTSUP);
    CHECK_THAT(r.error().message, Catch::Contains("bit " + std::to_string(bit)));
    auto v = Pool::validate(root);
    REQUIRE_FALSE(v.ok());
    CHECK(v.error().code == ENOTSUP);
  }
  // Unknown compatible bits are fine.
  put_meta(root, "features.incompat", key_u64(0));
  put_meta(root, "features.compat", key_u64(1ULL << 17));
  auto pool = MUST(Pool::open(root, Pool::OpenOptions{}));
}

TEST_CASE("a pool with corrupt meta is EIO", "[pool][format]") {
  test::TempDir tmp;
  const std::string root = tmp.sub("p");
  REQUIRE_OK(Pool::create(root, "", ""));
  put_meta(root, "format", "x");
  REQUIRE_ERRNO(Pool::open(root, Pool::OpenOptions{}), EIO);
}

// ---- import ----

TEST_CASE("import of a raw file with holes and zero blocks", "[pool][import]") {
  PoolFixture f;
  const uint32_t bs = 4096;
  const uint64_t size = 300 * 4096 + 1536;  // a short last block
  uint64_t data_blocks = 0;
  const std::string file = f.tmp.sub("img.raw");
  auto content = test::write_patterned_image(file, size, bs, 1, &data_blocks);
  REQUIRE(data_blocks > 0);

  std::vector<std::pair<uint64_t, uint64_t>> progress;
  ImageInfo info =
      MUST(import_image(*f.pool, "debian:12.1", file, bs, [&](uint64_t done, uint64_t total) {
        progress.emplace_back(done, total);
      }));
  CHECK(info.image.ref == "debian:12.1");
  CHECK(info.image.size_bytes == size);
  CHECK(info.image.block_size == bs);
  CHECK(info.data_blocks == data_blocks);
  CHECK(info.containers == 0);
  CHECK(info.layer.id == info.image.top_layer);
  CHECK(info.layer.parent == 0);
  CHECK(info.layer.size_bytes == size);
  CHECK(info.layer.state == LayerState::kFrozen);
  REQUIRE_FALSE(progress.empty());
  CHECK(progress.back().first == size);
  CHECK(progress.back().second == size);

  // The layer file holds the data at the same offsets and stores no zero block.
  const std::string path = f.pool->layer_path(info.layer);
  auto stored = test::read_file(path);
  REQUIRE(stored.size() == size);
  CHECK(stored == content);
  CHECK(allocated_bytes(path) <= data_blocks * bs + 64 * 1024);

  auto images = MUST(list_images(*f.pool));
  REQUIRE(images.size() == 1);
  CHECK(images[0].image.ref == "debian:12.1");
  CHECK(images[0].data_blocks == data_blocks);
  CHECK(images[0].image.size_bytes == size);

  REQUIRE_FSCK_CLEAN(f.pool, true);
  FsckReport rep = MUST(fsck(*f.pool, true, false));
  CHECK(rep.images == 1);
  CHECK(rep.layers == 1);
  CHECK(rep.groups_verified > 0);

  // Everything survives a reopen.
  f.reopen();
  images = MUST(list_images(*f.pool));
  REQUIRE(images.size() == 1);
  CHECK(images[0].data_blocks == data_blocks);
}

TEST_CASE("import with a larger block size counts its blocks", "[pool][import]") {
  PoolFixture f;
  const uint32_t bs = 64 * 1024;
  uint64_t data_blocks = 0;
  const std::string file = f.tmp.sub("img.raw");
  const uint64_t size = 40 * uint64_t{bs};
  auto content = test::write_patterned_image(file, size, bs, 2, &data_blocks);
  ImageInfo info = MUST(import_image(*f.pool, "big:1", file, bs, nullptr));
  CHECK(info.data_blocks == data_blocks);
  CHECK(info.image.block_size == bs);
  CHECK(test::read_file(f.pool->layer_path(info.layer)) == content);
  REQUIRE_FSCK_CLEAN(f.pool, true);
}

TEST_CASE("import of a 64 GiB sparse file stores no data", "[pool][import]") {
  PoolFixture f;
  const std::string file = f.tmp.sub("sparse.raw");
  {
    test::Fd fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    REQUIRE(fd.get() >= 0);
    REQUIRE(::ftruncate(fd.get(), 64LL << 30) == 0);
  }
  ImageInfo info = MUST(import_image(*f.pool, "empty:64g", file, 4096, nullptr));
  CHECK(info.image.size_bytes == 64ULL << 30);
  CHECK(info.data_blocks == 0);
  CHECK(allocated_bytes(f.pool->layer_path(info.layer)) == 0);
  ReadTxn txn = MUST(f.pool->index().begin_read());
  int rows = 0;
  REQUIRE_OK(txn.scan(Db::kMaps, key_u64(info.layer.id),
                      [&](std::string_view, std::string_view) -> Result<bool> {
                        rows++;
                        return true;
                      }));
  CHECK(rows == 0);
}

TEST_CASE("import errors", "[pool][import]") {
  PoolFixture f;
  const std::string good = f.tmp.sub("good.raw");
  test::write_patterned_image(good, 64 * 1024, 4096, 3);

  SECTION("file size not a multiple of 512") {
    const std::string odd = f.tmp.sub("odd.raw");
    test::write_raw_image(odd, std::vector<uint8_t>(4096 + 100, 7), {{0, 4196}});
    REQUIRE_ERRNO(import_image(*f.pool, "odd:1", odd, 4096, nullptr), EINVAL);
  }
  SECTION("empty file") {
    const std::string empty = f.tmp.sub("empty.raw");
    test::write_raw_image(empty, {}, {});
    REQUIRE_ERRNO(import_image(*f.pool, "empty:1", empty, 4096, nullptr), EINVAL);
  }
  SECTION("duplicate image") {
    MUST(import_image(*f.pool, "dup:1", good, 4096, nullptr));
    REQUIRE_ERRNO(import_image(*f.pool, "dup:1", good, 4096, nullptr), EEXIST);
    CHECK(MUST(list_images(*f.pool)).size() == 1);
    // Another version of the same name is a different image.
    MUST(import_image(*f.pool, "dup:2", good, 4096, nullptr));
    CHECK(MUST(list_images(*f.pool)).size() == 2);
  }
  SECTION("bad block sizes") {
    for (uint32_t bs : {0u, 512u, 2048u, 4095u, 12288u, 2u << 20, 100000u}) {
      INFO("block size " << bs);
      REQUIRE_ERRNO(import_image(*f.pool, "bs:1", good, bs, nullptr), EINVAL);
    }
    for (uint32_t bs : {4096u, 8192u, 1u << 20}) {
      INFO("block size " << bs);
      MUST(import_image(*f.pool, "bs:" + std::to_string(bs), good, bs, nullptr));
    }
  }
  SECTION("bad reference") {
    REQUIRE_ERRNO(import_image(*f.pool, "nocolon", good, 4096, nullptr), EINVAL);
    REQUIRE_ERRNO(import_image(*f.pool, "../x:1", good, 4096, nullptr), EINVAL);
  }
  SECTION("missing file") {
    REQUIRE_ERRNO(import_image(*f.pool, "m:1", f.tmp.sub("nope.raw"), 4096, nullptr), ENOENT);
  }
  // Failed imports leave nothing behind.
  REQUIRE_FSCK_CLEAN(f.pool, true);
  for (const auto& img : MUST(list_images(*f.pool))) {
    CHECK((img.image.ref.rfind("dup:", 0) == 0 || img.image.ref.rfind("bs:", 0) == 0));
  }
}

// ---- clone / remove ----

TEST_CASE("clone", "[pool][clone]") {
  PoolFixture f;
  const uint64_t image_size = 256 * 1024;
  f.import("base:1", image_size, 4096, 4);

  ContainerInfo c = MUST(f.pool->clone("base:1", "web-1", std::nullopt));
  CHECK(c.container.name == "web-1");
  CHECK(c.container.image_ref == "base:1");
  CHECK(c.container.size_bytes == image_size);
  CHECK(c.container.block_size == 4096);
  REQUIRE(c.chain.size() == 2);
  CHECK(c.chain[0].id == c.container.delta_layer);
  CHECK(c.chain[0].state == LayerState::kWritable);
  CHECK(c.chain[1].state == LayerState::kFrozen);
  CHECK(c.chain[0].parent == c.chain[1].id);
  CHECK(c.delta_data_blocks == 0);
  CHECK_FALSE(c.served_by.has_value());
  // A clone does no file work.
  CHECK_FALSE(std::filesystem::exists(f.pool->layer_path(c.chain[0])));

  ContainerInfo big = MUST(f.pool->clone("base:1", "big", image_size * 4));
  CHECK(big.container.size_bytes == image_size * 4);
  CHECK(big.container.id != c.container.id);
  CHECK(big.container.delta_layer != c.container.delta_layer);
  CHECK(big.chain[1].id == c.chain[1].id);

  REQUIRE_ERRNO(f.pool->clone("base:1", "small", image_size - 512), EINVAL);
  REQUIRE_ERRNO(f.pool->clone("base:1", "odd", image_size + 100), EINVAL);
  REQUIRE_ERRNO(f.pool->clone("base:1", "zero", 0), EINVAL);
  REQUIRE_ERRNO(f.pool->clone("base:1", "web-1", std::nullopt), EEXIST);
  REQUIRE_ERRNO(f.pool->clone("nosuch:1", "x", std::nullopt), ENOENT);
  REQUIRE_ERRNO(f.pool->clone("base:2", "x", std::nullopt), ENOENT);
  REQUIRE_ERRNO(f.pool->clone("base:1", "../x", std::nullopt), EINVAL);
  REQUIRE_ERRNO(f.pool->clone("base:1", "Web", std::nullopt), EINVAL);
  REQUIRE_ERRNO(f.pool->clone("base", "x", std::nullopt), EINVAL);

  auto list = MUST(f.pool->list_containers());
  REQUIRE(list.size() == 2);
  std::set<std::string> names;
  for (const auto& ci : list) names.insert(ci.container.name);
  CHECK((names == std::set<std::string>{"web-1", "big"}));

  ContainerInfo again = MUST(f.pool->inspect("web-1"));
  CHECK(again.container.delta_layer == c.container.delta_layer);
  CHECK(again.container.image_ref == "base:1");
  REQUIRE(again.chain.size() == 2);
  auto missing = f.pool->inspect("nope");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().code == ENOENT);
  CHECK_THAT(missing.error().message, Catch::Contains("nope"));

  auto images = MUST(list_images(*f.pool));
  REQUIRE(images.size() == 1);
  CHECK(images[0].containers == 2);

  REQUIRE_FSCK_CLEAN(f.pool, true);
  f.reopen();
  CHECK(MUST(f.pool->list_containers()).size() == 2);
  REQUIRE_FSCK_CLEAN(f.pool, true);
}

TEST_CASE("list_containers counts each chain's layers as inspect does", "[pool]") {
  // list_containers counts a layer shared by many containers once: each container's counts
  // must still be those of its own chain (two images, a written delta, a clone of a snapshot).
  test::PoolFixture f;
  f.import("a:1", 1 << 20, 4096, 1);
  f.import("b:1", 1 << 19, 4096, 2);
  for (const char* name : {"a1", "a2", "a3"}) MUST(f.pool->clone("a:1", name, std::nullopt));
  MUST(f.pool->clone("b:1", "b1", std::nullopt));
  {
    const std::vector<uint8_t> block(3 * 4096, 0x5a);
    auto disk = MUST(Disk::open(*f.pool, "a2", true));
    REQUIRE_OK(disk->write(block.data(), block.size(), 8192, false));
    REQUIRE_OK(disk->flush());
  }
  f.reopen();  // the written blocks in the index (a closed disk's journal folded)
  MUST(snapshot_container(*f.pool, "a2", "s"));
  MUST(f.pool->clone("a2@s", "a2s", std::nullopt));

  const auto list = MUST(f.pool->list_containers());
  REQUIRE(list.size() == 5);
  std::map<std::string, std::vector<uint64_t>> counts;
  for (const auto& info : list) {
    const auto one = MUST(f.pool->inspect(info.container.name));
    INFO(info.container.name);
    REQUIRE(info.chain.size() == one.chain.size());
    for (size_t i = 0; i < one.chain.size(); ++i) CHECK(info.chain[i].id == one.chain[i].id);
    CHECK(info.chain_data_blocks == one.chain_data_blocks);
    CHECK(info.delta_data_blocks == one.delta_data_blocks);
    counts[info.container.name] = info.chain_data_blocks;
  }
  // Not all the same: the images differ in size, and a2s has the snapshot's 3 blocks above a:1.
  CHECK(counts["a1"].back() != counts["b1"].back());
  REQUIRE(counts["a2s"].size() == 3);
  CHECK(counts["a2s"][1] == 3);
  CHECK(counts["a2s"][2] == counts["a1"][1]);
}

// True when the filesystem of `dir` can hold a file of size_bytes (a sparse one).
bool fs_holds_file(const std::string& dir, uint64_t size_bytes) {
  const std::string probe = dir + "/size-probe-in-test";
  test::Fd fd(::open(probe.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  REQUIRE(fd.get() >= 0);
  const bool ok = ::ftruncate(fd.get(), static_cast<off_t>(size_bytes)) == 0;
  ::unlink(probe.c_str());
  return ok;
}

TEST_CASE("clone refuses a size the tier's filesystem cannot hold", "[pool][clone][limits]") {
  PoolFixture f;
  f.import("base:1", 64 * 1024, 4096, 5);
  const std::string tier = f.pool->paths().tier_dir[static_cast<int>(Tier::kSsd)];
  // ext4 with 4 KiB blocks holds 16 TiB - 4 KiB, one block short of kMaxDiskBytes; tmpfs and
  // xfs hold all of it. Every accepted size must be writable up to its last byte.
  int accepted = 0;
  for (uint64_t size : {kMaxDiskBytes, kMaxDiskBytes - 4096}) {
    INFO("size " << size);
    const std::string name = "c" + std::to_string(size);
    auto r = f.pool->clone("base:1", name, size);
    if (!fs_holds_file(tier, size)) {
      REQUIRE_FALSE(r.ok());
      CHECK(r.error().code == EINVAL);
      CHECK_THAT(r.error().message, Catch::Contains(tier) && Catch::Contains(std::to_string(size)));
      continue;
    }
    REQUIRE(r.ok());
    ++accepted;
    auto disk = MUST(Disk::open(*f.pool, name, true));
    std::vector<uint8_t> block(4096, 0x77), back(4096);
    REQUIRE_OK(disk->write(block.data(), block.size(), size - 4096, false));
    REQUIRE_OK(disk->flush());
    REQUIRE_OK(disk->read(back.data(), back.size(), size - 4096));
    CHECK(back == block);
  }
  CHECK(accepted >= 1);
  // The same limit holds for an image: a sparse source file of kMaxDiskBytes cannot exist on a
  // filesystem that refuses it, so import is checked by its own probe of the tier.
}

TEST_CASE("image rm is refused while a container uses it", "[pool][clone]") {
  PoolFixture f;
  f.import("base:1", 128 * 1024, 4096, 5);
  f.import("other:1", 64 * 1024, 4096, 6);
  const ImageInfo base = MUST(list_images(*f.pool))[0];
  REQUIRE(base.image.ref == "base:1");
  const std::string base_path = f.pool->layer_path(base.layer);
  REQUIRE(std::filesystem::exists(base_path));

  MUST(f.pool->clone("base:1", "c1", std::nullopt));
  auto busy = remove_image(*f.pool, "base:1");
  REQUIRE_FALSE(busy.ok());
  CHECK(busy.error().code == EBUSY);
  CHECK_THAT(busy.error().message, Catch::Contains("c1"));
  CHECK(std::filesystem::exists(base_path));
  REQUIRE_FSCK_CLEAN(f.pool, true);

  REQUIRE_ERRNO(f.pool->remove_container("nope"), ENOENT);
  REQUIRE_ERRNO(remove_image(*f.pool, "nope:1"), ENOENT);
  REQUIRE_OK(f.pool->remove_container("c1"));
  REQUIRE_ERRNO(f.pool->inspect("c1"), ENOENT);
  REQUIRE_FSCK_CLEAN(f.pool, true);
  REQUIRE_OK(remove_image(*f.pool, "base:1"));
  CHECK_FALSE(std::filesystem::exists(base_path));
  REQUIRE_ERRNO(remove_image(*f.pool, "base:1"), ENOENT);
  REQUIRE_ERRNO(f.pool->clone("base:1", "c2", std::nullopt), ENOENT);
  auto images = MUST(list_images(*f.pool));
  REQUIRE(images.size() == 1);
  CHECK(images[0].image.ref == "other:1");
  REQUIRE_FSCK_CLEAN(f.pool, true);
  FsckReport rep = MUST(fsck(*f.pool, true, false));
  CHECK(rep.layers == 1);
  CHECK(rep.containers == 0);
}

TEST_CASE("remove_container is refused while another holder has it", "[pool][clone]") {
  PoolFixture f;
  f.import("base:1", 64 * 1024, 4096, 7);
  ContainerInfo c = MUST(f.pool->clone("base:1", "held", std::nullopt));
  {
    Lock lock = MUST(
        f.pool->locks().try_lock(LockKind::kContainer, c.container.id, true, "container \"held\""));
    REQUIRE_ERRNO(f.pool->remove_container("held"), EBUSY);
    ContainerInfo info = MUST(f.pool->inspect("held"));
    CHECK(info.served_by.has_value());
  }
  CHECK_FALSE(MUST(f.pool->inspect("held")).served_by.has_value());
  REQUIRE_OK(f.pool->remove_container("held"));
  REQUIRE_FSCK_CLEAN(f.pool, false);
}

TEST_CASE("a read-only pool refuses changes", "[pool]") {
  PoolFixture f;
  f.import("base:1", 64 * 1024, 4096, 8);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  f.pool.reset();
  Pool::OpenOptions ro;
  ro.read_only = true;
  auto pool = MUST(Pool::open(f.root, ro));
  CHECK(pool->read_only());
  CHECK(MUST(list_images(*pool)).size() == 1);
  CHECK(MUST(pool->list_containers()).size() == 1);
  CHECK_FALSE(pool->clone("base:1", "d", std::nullopt).ok());
  CHECK_FALSE(pool->remove_container("c").ok());
  CHECK_FALSE(remove_image(*pool, "base:1").ok());
  CHECK_FALSE(fsck(*pool, false, true).ok());
  FsckReport rep = MUST(fsck(*pool, true, false));
  CHECK(rep.problems.empty());
}

// ---- fsck ----

TEST_CASE("fsck detects damaged layer files", "[pool][fsck]") {
  PoolFixture f;
  const uint64_t size = 512 * 1024;
  auto content = f.import("base:1", size, 4096, 9);
  const ImageInfo img = MUST(list_images(*f.pool))[0];
  const std::string path = f.pool->layer_path(img.layer);
  const std::string id = std::to_string(img.layer.id);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  REQUIRE_FSCK_CLEAN(f.pool, true);

  SECTION("deleted layer file") {
    std::filesystem::remove(path);
    FsckReport rep = MUST(fsck(*f.pool, false, false));
    INFO(problems_text(rep));
    REQUIRE_FALSE(rep.problems.empty());
    CHECK(has_problem_containing(rep, id));
  }
  SECTION("truncated layer file") {
    std::filesystem::resize_file(path, size / 2);
    FsckReport rep = MUST(fsck(*f.pool, false, false));
    INFO(problems_text(rep));
    REQUIRE_FALSE(rep.problems.empty());
    CHECK(has_problem_containing(rep, id));
  }
  SECTION("orphan file, removed by repair") {
    const std::string orphan = f.pool->paths().tier_dir[0] + "/987654.layer";
    test::write_raw_image(orphan, std::vector<uint8_t>(4096, 1), {{0, 4096}});
    FsckReport rep = MUST(fsck(*f.pool, false, false));
    INFO(problems_text(rep));
    REQUIRE(rep.problems.size() == 1);
    CHECK(has_problem_containing(rep, "987654.layer"));
    CHECK(std::filesystem::exists(orphan));  // without repair, nothing changes

    FsckReport fixed = MUST(fsck(*f.pool, false, true));
    CHECK_FALSE(std::filesystem::exists(orphan));
    CHECK(std::filesystem::exists(path));
    REQUIRE_FSCK_CLEAN(f.pool, true);
    (void)fixed;
  }
  SECTION("corrupted data byte, found by full") {
    // Flip one byte inside the first data block.
    uint64_t off = 0;
    while (off < content.size() && content[off] == 0) off++;
    REQUIRE(off < content.size());
    off += 10;
    {
      test::Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
      REQUIRE(fd.get() >= 0);
      const uint8_t b = static_cast<uint8_t>(content[off] ^ 0x5A);
      test::pwrite_all(fd.get(), &b, 1, off);
    }
    FsckReport rep = MUST(fsck(*f.pool, true, false));
    INFO(problems_text(rep));
    REQUIRE_FALSE(rep.problems.empty());
    CHECK(has_problem_containing(rep, id));
    CHECK(rep.groups_verified > 0);
  }
  SECTION("an interrupted import is rolled back by repair") {
    // What a crash between an import's row batches and its publishing transaction leaves:
    // an intent, map rows and a file for a layer no image names.
    const LayerId ghost = 4000;
    LayerRecord probe;
    probe.id = ghost;
    const std::string ghost_path = f.pool->layer_path(probe);
    test::write_raw_image(ghost_path, std::vector<uint8_t>(8192, 3), {{0, 8192}});
    REQUIRE_OK(f.pool->committer().run([&](WriteTxn& txn) -> Status {
      IntentRecord intent{IntentRecord::Kind::kImport, ghost, "ghost:1", now_unix()};
      LAYER_TRY(txn.put(Db::kIntents, key_u64(77), encode(intent)));
      ChunkBits bits;
      bits.set(0, BlockState::kData);
      return txn.put(Db::kMaps, key_u64_u32(ghost, 0), encode_chunk(bits));
    }));
    FsckReport rep = MUST(fsck(*f.pool, false, false));
    INFO(problems_text(rep));
    REQUIRE_FALSE(rep.problems.empty());
    CHECK(has_problem_containing(rep, "ghost:1"));
    CHECK(std::filesystem::exists(ghost_path));

    MUST(fsck(*f.pool, false, true));
    CHECK_FALSE(std::filesystem::exists(ghost_path));
    REQUIRE_FSCK_CLEAN(f.pool, true);
    ReadTxn txn = MUST(f.pool->index().begin_read());
    CHECK_FALSE(MUST(txn.get(Db::kMaps, key_u64_u32(ghost, 0))).has_value());
    CHECK_FALSE(MUST(txn.get(Db::kIntents, key_u64(77))).has_value());
  }
}
