// Unit tests for lib/index_restore.h: a restore from a copy older than the layer files marks
// the containers whose newer writes the copy does not know, refuses to serve or change them,
// and fsck --repair adopts the writes (every byte read back as it was before the restore); the
// restore is refused while another process has the index open and for a damaged copy; layers
// moved after the copy are followed; layer ids continue past the files.
#include "index_restore.h"

#include <sys/stat.h>

#include <filesystem>

#include "disk.h"
#include "fsck.h"
#include "mover.h"
#include "snapshots.h"
#include "test_util.h"

using namespace layer;
namespace fs = std::filesystem;

namespace {

void write_flush(Pool& pool, const std::string& name, uint64_t off, size_t len, uint8_t byte) {
  auto disk = MUST(Disk::open(pool, name, true));
  std::vector<uint8_t> data(len, byte);
  REQUIRE_OK(disk->write(data.data(), data.size(), off, false));
  REQUIRE_OK(disk->flush());
}

std::vector<uint8_t> read_disk(Pool& pool, const std::string& name) {
  auto disk = MUST(Disk::open(pool, name, false));
  std::vector<uint8_t> out(disk->size_bytes());
  REQUIRE_OK(disk->read(out.data(), out.size(), 0));
  return out;
}

bool has_line(const std::vector<std::string>& lines, const std::string& part) {
  for (const auto& l : lines)
    if (l.find(part) != std::string::npos) return true;
  return false;
}

// A copy of the index as `layer index backup` takes it (through a read-only pool: see
// index_backup_test's take_copy); the fixture's pool is open again afterwards.
BackupResult take_copy(test::PoolFixture& f) {
  f.pool.reset();
  auto ro = MUST(Pool::open(f.root, Pool::OpenOptions{.read_only = true}));
  auto r = MUST(backup_index(*ro, "manual"));
  ro.reset();
  f.reopen();
  return r;
}

ino_t inode(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("a restore marks containers with newer writes; fsck --repair adopts them",
          "[index_restore]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 7);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  MUST(f.pool->clone("base:1", "quiet", std::nullopt));
  write_flush(*f.pool, "c", 3 * 4096, 4096, 0x11);
  write_flush(*f.pool, "quiet", 0, 4096, 0x22);
  const BackupResult copy = take_copy(f);
  // After the copy: whole blocks, a partial block (copied up), a new container.
  write_flush(*f.pool, "c", 10 * 4096, 2 * 4096, 0x33);
  write_flush(*f.pool, "c", 20 * 4096 + 100, 50, 0x44);
  MUST(f.pool->clone("base:1", "late", std::nullopt));
  write_flush(*f.pool, "late", 0, 4096, 0x55);
  const LayerId late_delta = MUST(f.pool->inspect("late")).container.delta_layer;
  const std::vector<uint8_t> want_c = read_disk(*f.pool, "c");
  const std::vector<uint8_t> want_quiet = read_disk(*f.pool, "quiet");
  f.pool.reset();

  const RestoreReport r = MUST(restore_index(f.root, ""));
  CHECK(r.from.name == copy.backup.name);
  CHECK(fs::exists(r.replaced));
  CHECK(r.replaced.find("/index/backup/replaced-") != std::string::npos);
  REQUIRE(r.stale.size() == 1);
  CHECK(r.stale[0].name == "c");
  CHECK(r.stale[0].blocks == 3);  // blocks 10, 11 and 20
  CHECK(r.first_unknown_layer <= late_delta);
  CHECK(has_line(r.notes, fmt::format("{}.layer: no layer of the copy names it (made after the "
                                      "copy",
                                      late_delta)));

  f.reopen();
  // Not served, not changed, not rolled back until adopted; the other container is served.
  const Error open_err = ERROR_OF(Disk::open(*f.pool, "c", true));
  CHECK(open_err.code == EUCLEAN);
  CHECK(open_err.message.find("layer fsck --repair") != std::string::npos);
  CHECK_ERRNO(Disk::open(*f.pool, "c", false), EUCLEAN);
  CHECK_ERRNO(snapshot_container(*f.pool, "c", "s"), EUCLEAN);
  CHECK(read_disk(*f.pool, "quiet") == want_quiet);
  {
    auto txn = MUST(f.pool->index().begin_read());
    CHECK(MUST(incompat_features(txn)) == kIncompatStaleContainers);
  }
  // fsck names it, and the file of the container made after the copy.
  FsckReport check = MUST(fsck(*f.pool, false, false));
  CHECK(has_line(check.problems, "container c: its delta"));
  CHECK(has_line(check.problems, "holds 3 blocks written after the index copy"));
  CHECK(has_line(check.problems, "(made after the index copy"));

  FsckReport repair = MUST(fsck(*f.pool, false, true));
  INFO(fmt::format("{}", fmt::join(repair.repaired, "\n")));
  CHECK(repair.problems.empty());
  CHECK(has_line(repair.repaired, "container c: adopted 3 blocks"));
  CHECK(has_line(repair.repaired, fmt::format("{}.layer: moved to", late_delta)));
  CHECK(has_line(repair.repaired, "is settled"));
  CHECK(read_disk(*f.pool, "c") == want_c);
  CHECK(MUST(fsck(*f.pool, true, false)).problems.empty());
  {
    auto txn = MUST(f.pool->index().begin_read());
    CHECK(MUST(incompat_features(txn)) == 0);
    CHECK_FALSE(MUST(get_restore(txn)).has_value());
  }
  // Ids continue past the files made after the copy.
  MUST(f.pool->clone("base:1", "next", std::nullopt));
  CHECK(MUST(f.pool->inspect("next")).container.delta_layer > late_delta);
}

TEST_CASE("rm of a marked container removes its mark and the feature bit", "[index_restore]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 8);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  take_copy(f);
  write_flush(*f.pool, "c", 0, 4096, 0x66);
  f.pool.reset();
  REQUIRE(MUST(restore_index(f.root, "")).stale.size() == 1);
  f.reopen();
  REQUIRE_OK(f.pool->remove_container("c"));
  auto txn = MUST(f.pool->index().begin_read());
  CHECK(MUST(stale_marks(txn)).empty());
  CHECK(MUST(incompat_features(txn)) == 0);
}

TEST_CASE("restore is refused while another process has the index open", "[index_restore]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 9);
  take_copy(f);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  f.pool.reset();
  const std::string data = f.root + "/index/data.mdb";
  const ino_t before = inode(data);
  test::Pipe ready, go;
  test::Child holder([&] {
    auto pool = Pool::open(f.root, Pool::OpenOptions{.read_only = true});
    test::write_byte(ready.write_end.get());
    test::read_byte(go.read_end.get());
    return pool ? 0 : 1;
  });
  REQUIRE(test::read_byte(ready.read_end.get()));
  const Error e = ERROR_OF(restore_index(f.root, ""));
  CHECK(e.code == EBUSY);
  CHECK(e.message.find("is open by another process") != std::string::npos);
  CHECK(inode(data) == before);
  CHECK_FALSE(fs::exists(f.root + "/index/.restore"));
  test::write_byte(go.write_end.get());
  REQUIRE(holder.wait() == 0);
  MUST(restore_index(f.root, ""));
  CHECK(inode(data) != before);
  f.reopen();
  CHECK_ERRNO(f.pool->inspect("c"), ENOENT);  // made after the copy
}

TEST_CASE("a damaged copy is refused and the index stays as it was", "[index_restore]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 10);
  const BackupResult copy = take_copy(f);
  f.pool.reset();
  {
    const uint64_t size = fs::file_size(copy.backup.path);
    std::vector<uint8_t> junk(size - 2 * 4096, 0x5a);
    test::Fd fd(::open(copy.backup.path.c_str(), O_WRONLY | O_CLOEXEC));
    test::pwrite_all(fd.get(), junk.data(), junk.size(), 2 * 4096);
  }
  const std::string data = f.root + "/index/data.mdb";
  const std::vector<uint8_t> before = test::read_file(data);
  const Error e = ERROR_OF(restore_index(f.root, copy.backup.name));
  INFO(e.message);
  CHECK(e.code == EUCLEAN);
  CHECK(e.message.find("is damaged too") != std::string::npos);
  CHECK(test::read_file(data) == before);
  CHECK_FALSE(fs::exists(f.root + "/index/.restore"));
  CHECK_ERRNO(restore_index(f.root, "index-nosuch.mdb"), ENOENT);
}

TEST_CASE("a layer moved to another tier after the copy is followed", "[index_restore]") {
  test::PoolFixture f;
  f.import("base:1", 1 << 20, 4096, 11);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  const std::vector<uint8_t> want = read_disk(*f.pool, "c");
  take_copy(f);
  const LayerId base = test::image_top_layer(*f.pool, "base:1");
  MUST(move_layer(*f.pool, base, Tier::kHdd));
  f.pool.reset();
  const RestoreReport r = MUST(restore_index(f.root, ""));
  CHECK(has_line(r.notes, fmt::format("layer {}: its file is on hdd now", base)));
  f.reopen();
  CHECK(read_disk(*f.pool, "c") == want);
  CHECK(MUST(fsck(*f.pool, true, false)).problems.empty());
}
