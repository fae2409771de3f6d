// Unit tests for lib/layer_file.h: LocalStore (create: sized, renamed into place, EEXIST;
// read past the end, punch and its write-zeroes fallback, data_extents, size, remove; copy_to:
// data ranges only, piece by piece with a check per piece, on threads of its own) and the
// basics of FaultInjectingStore (synced writes survive a simulated power loss, unsynced ones
// do not, injected sync failures).
#include "layer_file.h"

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include "test_util.h"

using namespace layer;

namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

std::vector<uint8_t> read_at(LayerFile& f, uint64_t len, uint64_t offset) {
  std::vector<uint8_t> buf(len, 0xEE);  // not zero: a read that leaves bytes alone is seen
  MUST(f.read(buf.data(), len, offset));
  return buf;
}

uint64_t file_size(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_size);
}

// Bytes the filesystem allocated to path.
uint64_t allocated_bytes(const std::string& path) {
  struct stat st;
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

std::vector<std::pair<uint64_t, uint64_t>> extents_of(LayerFile& f, uint64_t offset, uint64_t len) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  MUST(f.data_extents(offset, len, [&](uint64_t o, uint64_t l) { out.emplace_back(o, l); }));
  return out;
}

std::vector<uint8_t> pattern(uint64_t len, uint8_t seed) {
  std::vector<uint8_t> v(len);
  for (uint64_t i = 0; i < len; i++) v[i] = static_cast<uint8_t>(seed + i * 7 + i / 4096);
  return v;
}

// Makes this process's fallocate(2) fail with `err` (a seccomp filter; for a forked child only:
// it cannot be undone). Returns false where seccomp filters cannot be installed.
bool deny_fallocate(int err) {
#if defined(__x86_64__)
  constexpr uint32_t kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
  constexpr uint32_t kArch = AUDIT_ARCH_AARCH64;
#else
  (void)err;
  return false;
#endif
#if defined(__x86_64__) || defined(__aarch64__)
  struct sock_filter code[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kArch, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_fallocate, 0, 1),
      BPF_STMT(BPF_RET | BPF_K,
               SECCOMP_RET_ERRNO | (static_cast<uint32_t>(err) & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {static_cast<unsigned short>(sizeof code / sizeof code[0]), code};
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
  return ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
#endif
}

constexpr int kChildNoSeccomp = 77;

}  // namespace

// ---- LocalStore ----

TEST_CASE("LocalStore::create makes a sized, sparse file in place, and refuses an existing one",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  const LayerId id = 7;
  const std::string path = dir.sub("7.layer");
  const uint64_t size = 10 * 1024 * kKiB + 512;
  auto f = MUST(store.create(id, size));
  CHECK(f->path() == path);
  CHECK(file_size(path) == size);
  CHECK(MUST(f->size()) == size);
  CHECK(allocated_bytes(path) < 64 * kKiB);             // sparse: sizing allocates nothing
  CHECK_FALSE(std::filesystem::exists(path + ".new"));  // renamed into place
  CHECK(read_at(*f, 4096, size - 4096) == std::vector<uint8_t>(4096, 0));

  // The new file is writable through the handle create returned.
  const auto data = pattern(8192, 1);
  MUST(f->write(data.data(), data.size(), 4096));
  MUST(f->sync());
  CHECK(read_at(*f, 8192, 4096) == data);

  // An existing file is refused and left as it was.
  CHECK_ERRNO(store.create(id, 4096), EEXIST);
  CHECK(file_size(path) == size);
  auto again = MUST(store.open(id, false));
  CHECK(read_at(*again, 8192, 4096) == data);
  CHECK_FALSE(std::filesystem::exists(path + ".new"));

  // A directory that does not exist.
  CHECK_ERRNO(LocalStore(dir.sub("missing")).create(8, 4096), ENOENT);
  CHECK_FALSE(std::filesystem::exists(dir.sub("missing")));
}

TEST_CASE("LocalStore::create replaces a .new file left by a crash", "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  const LayerId id = 9;
  const std::string path = dir.sub("9.layer");
  {
    test::Fd leftover(::open((path + ".new").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    REQUIRE(leftover.get() >= 0);
    const auto junk = pattern(4096, 3);
    test::pwrite_all(leftover.get(), junk.data(), junk.size(), 0);
  }
  auto f = MUST(store.create(id, 2 * 4096));
  CHECK(file_size(path) == 2 * 4096);
  CHECK(read_at(*f, 2 * 4096, 0) == std::vector<uint8_t>(2 * 4096, 0));  // not the leftover
  CHECK_FALSE(std::filesystem::exists(path + ".new"));
}

TEST_CASE("LocalStore::open: missing files, read-only handles", "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  CHECK_ERRNO(store.open(1, false), ENOENT);
  CHECK_ERRNO(store.open(1, true), ENOENT);
  MUST(store.create(1, 4096));
  auto ro = MUST(store.open(1, false));
  const auto data = pattern(512, 9);
  auto w = ro->write(data.data(), data.size(), 0);
  REQUIRE_FALSE(w.ok());
  CHECK(w.error().code == EBADF);
  CHECK_THAT(w.error().message, Catch::Contains("1.layer"));
}

TEST_CASE("LocalFile::read: holes and bytes past the end read as zeroes", "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  auto f = MUST(store.create(2, 8192));
  const auto data = pattern(8192, 5);
  MUST(f->write(data.data(), data.size(), 0));

  // Straddling the end: the file's bytes, then zeroes.
  auto buf = read_at(*f, 3 * 4096, 4096);
  CHECK(std::equal(buf.begin(), buf.begin() + 4096, data.begin() + 4096));
  CHECK(test::all_zero(buf.data() + 4096, 2 * 4096));
  // Wholly past the end.
  CHECK(read_at(*f, 4096, 1 << 20) == std::vector<uint8_t>(4096, 0));
  // A hole inside the file.
  auto g = MUST(store.create(3, 1 << 20));
  MUST(g->write(data.data(), 4096, 512 * kKiB));
  CHECK(read_at(*g, 4096, 256 * kKiB) == std::vector<uint8_t>(4096, 0));
  CHECK(read_at(*g, 4096, 512 * kKiB) == std::vector<uint8_t>(data.begin(), data.begin() + 4096));
  // Unaligned, odd-sized.
  CHECK(read_at(*f, 777, 1001) ==
        std::vector<uint8_t>(data.begin() + 1001, data.begin() + 1001 + 777));
}

TEST_CASE("LocalFile::punch: the range reads zeroes, is deallocated, the size is kept",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  const LayerId id = 4;
  const std::string path = dir.sub("4.layer");
  const uint64_t size = 1024 * kKiB;
  auto f = MUST(store.create(id, size));
  const auto data = pattern(size, 11);
  MUST(f->write(data.data(), data.size(), 0));
  MUST(f->sync());
  const uint64_t before = allocated_bytes(path);

  MUST(f->punch(256 * kKiB, 512 * kKiB));
  CHECK(file_size(path) == size);
  auto all = read_at(*f, size, 0);
  CHECK(std::equal(all.begin(), all.begin() + 256 * kKiB, data.begin()));
  CHECK(test::all_zero(all.data() + 256 * kKiB, 512 * kKiB));
  CHECK(std::equal(all.begin() + 768 * kKiB, all.end(), data.begin() + 768 * kKiB));
  CHECK(allocated_bytes(path) <= before - 512 * kKiB);
  CHECK(extents_of(*f, 0, size) ==
        std::vector<std::pair<uint64_t, uint64_t>>{{0, 256 * kKiB}, {768 * kKiB, 256 * kKiB}});

  // Punching the tail keeps the size too (KEEP_SIZE); a partial block reads zeroes as well.
  MUST(f->punch(size - 4096, 4096));
  MUST(f->punch(1000, 100));
  CHECK(file_size(path) == size);
  CHECK(read_at(*f, 4096, size - 4096) == std::vector<uint8_t>(4096, 0));
  all = read_at(*f, 2000, 0);
  CHECK(std::equal(all.begin(), all.begin() + 1000, data.begin()));
  CHECK(test::all_zero(all.data() + 1000, 100));
  CHECK(std::equal(all.begin() + 1100, all.end(), data.begin() + 1100));
}

TEST_CASE("LocalFile::punch writes zeroes where fallocate cannot punch", "[layer_file]") {
  test::TempDir dir;
  const LayerId id = 5;
  const std::string path = dir.sub("5.layer");
  const uint64_t size = 3 * 1024 * kKiB;  // the fallback writes in 1 MiB pieces: cross them
  const auto data = pattern(size, 13);
  LocalStore store(dir.path());
  auto f = MUST(store.create(id, size));
  // In a child whose fallocate fails as on a filesystem without hole punching.
  for (int err : {EOPNOTSUPP, ENOSYS}) {
    INFO("fallocate fails with " << std::strerror(err));
    MUST(f->write(data.data(), data.size(), 0));
    MUST(f->sync());
    test::Child child([&]() -> int {
      if (!deny_fallocate(err)) return kChildNoSeccomp;
      auto g = store.open(id, true);
      if (!g.ok()) return 10;
      return (*g)->punch(100 * kKiB + 3, 2 * 1024 * kKiB + 5).ok() ? 0 : 11;
    });
    const int rc = child.wait();
    if (rc == kChildNoSeccomp) {
      WARN("seccomp filters unavailable here: the punch fallback is not tested");
      return;
    }
    REQUIRE(rc == 0);
    CHECK(file_size(path) == size);
    const auto all = test::read_file(path);
    CHECK(std::equal(all.begin(), all.begin() + 100 * kKiB + 3, data.begin()));
    CHECK(test::all_zero(all.data() + 100 * kKiB + 3, 2 * 1024 * kKiB + 5));
    CHECK(std::equal(all.begin() + 2148 * kKiB + 8, all.end(), data.begin() + 2148 * kKiB + 8));
  }
  // Any other failure is reported, not papered over with zeroes.
  test::Child child([&]() -> int {
    if (!deny_fallocate(EIO)) return kChildNoSeccomp;
    auto g = store.open(id, true);
    if (!g.ok()) return 10;
    auto s = (*g)->punch(0, 4096);
    if (s.ok()) return 11;
    return s.error().code == EIO ? 0 : 12;
  });
  const int rc = child.wait();
  if (rc != kChildNoSeccomp) CHECK(rc == 0);
  CHECK(std::equal(data.begin(), data.begin() + 4096, test::read_file(path).begin()));
}

TEST_CASE("LocalFile::data_extents reports allocated ranges within the range asked",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  const uint64_t size = 4 * 1024 * kKiB;
  auto f = MUST(store.create(6, size));
  CHECK(extents_of(*f, 0, size).empty());
  const auto data = pattern(256 * kKiB, 17);
  MUST(f->write(data.data(), 128 * kKiB, 512 * kKiB));
  MUST(f->write(data.data(), 256 * kKiB, 2048 * kKiB));
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
  CHECK(extents_of(*f, 0, size) == Ranges{{512 * kKiB, 128 * kKiB}, {2048 * kKiB, 256 * kKiB}});
  // Clipped to the range asked.
  CHECK(extents_of(*f, 576 * kKiB, 2048 * kKiB - 576 * kKiB + 64 * kKiB) ==
        Ranges{{576 * kKiB, 64 * kKiB}, {2048 * kKiB, 64 * kKiB}});
  CHECK(extents_of(*f, 0, 512 * kKiB).empty());
  CHECK(extents_of(*f, 3 * 1024 * kKiB, 1024 * kKiB).empty());
  // A range past the end of the file.
  CHECK(extents_of(*f, size, 1024 * kKiB).empty());
}

TEST_CASE("LocalStore::remove: gone afterwards, a missing file is fine, other errors are not",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  const LayerId id = 10;
  const std::string path = dir.sub("10.layer");
  { auto f = MUST(store.create(id, 4096)); }
  MUST(store.remove(id));
  CHECK_FALSE(std::filesystem::exists(path));
  MUST(store.remove(id));  // already gone
  MUST(LocalStore(dir.sub("missing")).remove(11));
  std::filesystem::create_directory(dir.sub("12.layer"));
  auto r = store.remove(12);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EISDIR);
  CHECK_THAT(r.error().message, Catch::Contains("12.layer"));
}

TEST_CASE("LocalFile: an open handle keeps reading a removed file", "[layer_file]") {
  // The mover and gc unlink files that readers may still hold (DESIGN.md "Tiering mover").
  test::TempDir dir;
  LocalStore store(dir.path());
  const LayerId id = 13;
  const std::string path = dir.sub("13.layer");
  auto f = MUST(store.create(id, 8192));
  const auto data = pattern(8192, 19);
  MUST(f->write(data.data(), data.size(), 0));
  MUST(store.remove(id));
  CHECK(read_at(*f, 8192, 0) == data);
  CHECK(MUST(f->size()) == 8192);
}

// ---- FaultInjectingStore ----

TEST_CASE("FaultInjectingStore: a power loss undoes exactly the unsynced writes and punches",
          "[layer_file]") {
  test::TempDir dir;
  FaultInjectingStore store(dir.path());
  const LayerId id = 20;
  const std::string path = dir.sub("20.layer");
  const uint64_t size = 16 * 4096;
  auto f = MUST(store.create(id, size));
  const auto a = pattern(size, 21);
  const auto b = pattern(size, 22);
  MUST(f->write(a.data(), size, 0));
  MUST(f->sync());
  // Unsynced: an overwrite of blocks 0..3, a punch of 8..9, a write past the old data.
  MUST(f->write(b.data(), 4 * 4096, 0));
  MUST(f->punch(8 * 4096, 2 * 4096));
  // Reads see them before the loss, as the page cache would.
  CHECK(read_at(*f, 4 * 4096, 0) == std::vector<uint8_t>(b.begin(), b.begin() + 4 * 4096));
  CHECK(read_at(*f, 2 * 4096, 8 * 4096) == std::vector<uint8_t>(2 * 4096, 0));

  store.simulate_power_loss(false, 1);
  CHECK(read_at(*f, size, 0) == a);
  CHECK(test::read_file(path) == a);

  // Synced writes survive; a second loss has nothing left to undo.
  MUST(f->write(b.data(), 4096, 5 * 4096));
  MUST(f->sync());
  store.simulate_power_loss(false, 2);
  auto want = a;
  std::copy(b.begin(), b.begin() + 4096, want.begin() + 5 * 4096);
  CHECK(test::read_file(path) == want);
}

TEST_CASE(
    "FaultInjectingStore: files closed before the loss are undone too; torn losses "
    "leave each write whole or gone",
    "[layer_file]") {
  test::TempDir dir;
  FaultInjectingStore store(dir.path());
  const LayerId id = 21;
  const std::string path = dir.sub("21.layer");
  const uint64_t blocks = 64;
  const auto old_data = pattern(blocks * 4096, 31);
  const auto new_data = pattern(blocks * 4096, 32);
  {
    auto f = MUST(store.create(id, blocks * 4096));
    MUST(f->write(old_data.data(), old_data.size(), 0));
    MUST(f->sync());
    for (uint64_t b = 0; b < blocks; b++)
      MUST(f->write(new_data.data() + b * 4096, 4096, b * 4096));
  }  // closed, never synced
  const uint64_t seed = test::test_seed("torn power loss");
  store.simulate_power_loss(true, seed);
  const auto after = test::read_file(path);
  REQUIRE(after.size() == old_data.size());
  uint64_t kept = 0, undone = 0;
  for (uint64_t b = 0; b < blocks; b++) {
    INFO("block " << b);
    const auto* got = after.data() + b * 4096;
    const bool is_new = std::equal(got, got + 4096, new_data.data() + b * 4096);
    const bool is_old = std::equal(got, got + 4096, old_data.data() + b * 4096);
    CHECK((is_new || is_old));
    kept += is_new;
    undone += is_old;
  }
  // With 64 coin flips, both outcomes (the odds of either never showing are 2^-63).
  CHECK(kept > 0);
  CHECK(undone > 0);
}

TEST_CASE("FaultInjectingStore: injected sync failures", "[layer_file]") {
  test::TempDir dir;
  FaultInjectingStore store(dir.path());
  auto f = MUST(store.create(22, 4096));
  const auto data = pattern(4096, 41);
  MUST(f->write(data.data(), data.size(), 0));
  store.fail_next_syncs(2);
  for (int i = 0; i < 2; i++) {
    auto s = f->sync();
    REQUIRE_FALSE(s.ok());
    CHECK(s.error().code == EIO);
    CHECK_THAT(s.error().message, Catch::Contains("22.layer"));
  }
  MUST(f->sync());  // the third one succeeds
  store.fail_next_syncs(1);
  CHECK_ERRNO(f->sync(), EIO);
  MUST(f->sync());
}

TEST_CASE("FaultInjectingStore passes open, create and remove through to local files",
          "[layer_file]") {
  test::TempDir dir;
  FaultInjectingStore store(dir.path());
  const LayerId id = 23;
  const std::string path = dir.sub("23.layer");
  CHECK_ERRNO(store.open(id, false), ENOENT);
  {
    auto f = MUST(store.create(id, 8192));
    CHECK(f->path() == path);
    CHECK(MUST(f->size()) == 8192);
  }
  CHECK_ERRNO(store.create(id, 8192), EEXIST);
  auto g = MUST(store.open(id, false));
  CHECK(read_at(*g, 8192, 0) == std::vector<uint8_t>(8192, 0));
  MUST(store.remove(id));
  CHECK_FALSE(std::filesystem::exists(path));
  MUST(store.remove(id));
}

// ---- addressing by layer id ----

TEST_CASE("LocalStore::stat and list see layer files and unfinished creates by id",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  CHECK(MUST(store.stat(3)) == std::nullopt);
  MUST(store.create(3, 8192));
  MUST(store.create(17, 4096));
  { std::ofstream(dir.sub("42.layer.new")) << "x"; }  // a create that did not finish
  { std::ofstream(dir.sub(".layer-pool")) << "marker"; }
  { std::ofstream(dir.sub("x7.layer")) << "not ours"; }
  { std::ofstream(dir.sub("007.layer")) << "not a canonical id"; }
  CHECK(MUST(store.stat(3)) == std::optional<uint64_t>(8192));
  auto entries = MUST(store.list());
  std::set<std::tuple<LayerId, bool, std::string>> got;
  for (const auto& e : entries) got.insert({e.id, e.unfinished, e.name});
  CHECK(got ==
        std::set<std::tuple<LayerId, bool, std::string>>{{3, false, dir.sub("3.layer")},
                                                         {17, false, dir.sub("17.layer")},
                                                         {42, true, dir.sub("42.layer.new")}});
  // remove takes an unfinished create's leftover too.
  MUST(store.remove(42));
  CHECK_FALSE(std::filesystem::exists(dir.sub("42.layer.new")));
  CHECK(store.describe(3) == dir.sub("3.layer"));
}

TEST_CASE("LocalStore::copy_to copies a layer's data ranges into another store, synced",
          "[layer_file]") {
  test::TempDir a, b;
  LocalStore from(a.path()), to(b.path());
  const uint64_t size = 4 * 1024 * kKiB;
  auto f = MUST(from.create(9, size));
  const auto head = pattern(5000, 1), tail = pattern(3 * kKiB, 2);
  MUST(f->write(head.data(), head.size(), 100));
  MUST(f->write(tail.data(), tail.size(), size - tail.size()));
  MUST(f->sync());
  const uint64_t data_bytes = MUST(from.copy_to(9, to));
  // The source's data ranges: whole filesystem blocks around what was written.
  CHECK(data_bytes >= head.size() + tail.size());
  CHECK(data_bytes < 1024 * kKiB);
  CHECK(MUST(to.stat(9)) == std::optional<uint64_t>(size));
  CHECK(test::read_file(b.sub("9.layer")) == test::read_file(a.sub("9.layer")));
  CHECK(allocated_bytes(b.sub("9.layer")) < 1024 * kKiB);  // the hole stayed a hole
  CHECK_ERRNO(from.copy_to(9, to), EEXIST);
  CHECK_ERRNO(from.copy_to(10, to), ENOENT);
}

namespace {

// A store whose files are wrapped (not LocalStore's own): copy_to then copies with read/write.
class WrappingStore : public ForwardingStore {
 public:
  explicit WrappingStore(const std::string& dir)
      : ForwardingStore(std::make_unique<LocalStore>(dir)) {}
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override {
    LAYER_ASSIGN(auto f, ForwardingStore::create(id, size_bytes));
    return std::shared_ptr<LayerFile>(std::make_shared<ForwardingFile>(f));
  }
};

}  // namespace

TEST_CASE("LocalStore::copy_to checks each piece once, in order, after writing it",
          "[layer_file]") {
  constexpr uint64_t kPiece = 64 * kKiB;
  // Data in pieces 0, 2 (crossing into 3) and the short last one; pieces 1 and 4 are holes.
  const uint64_t size = 5 * kPiece + 12 * kKiB;
  for (bool wrapped : {false, true}) {
    INFO((wrapped ? "read/write into a wrapped file" : "copy_file_range between local files"));
    test::TempDir a, b;
    LocalStore from(a.path());
    std::unique_ptr<LayerStore> to;
    if (wrapped)
      to = std::make_unique<WrappingStore>(b.path());
    else
      to = std::make_unique<LocalStore>(b.path());
    auto f = MUST(from.create(4, size));
    const auto p0 = pattern(20 * kKiB, 3), p2 = pattern(kPiece, 4), p5 = pattern(8 * kKiB, 5);
    MUST(f->write(p0.data(), p0.size(), 8 * kKiB));
    MUST(f->write(p2.data(), p2.size(), 2 * kPiece + 32 * kKiB));
    MUST(f->write(p5.data(), p5.size(), size - p5.size()));
    MUST(f->sync());
    uint64_t expect_data = 0;
    for (auto [o, l] : extents_of(*f, 0, size)) expect_data += l;

    // (Catch's assertions stay on this thread: the check runs on the copy's second thread.)
    std::vector<std::pair<uint64_t, uint64_t>> checked;
    bool pieces_written = true;
    CopyOptions options;
    options.piece_bytes = kPiece;
    options.check = [&](LayerFile& src, LayerFile& copy, uint64_t offset, uint64_t len) -> Status {
      checked.emplace_back(offset, len);
      std::vector<uint8_t> x(len), y(len);
      LAYER_TRY(src.read(x.data(), len, offset));
      LAYER_TRY(copy.read(y.data(), len, offset));
      pieces_written = pieces_written && x == y;  // the piece is in the copy already
      return {};
    };
    CHECK(MUST(from.copy_to(4, *to, options)) == expect_data);
    CHECK(pieces_written);
    CHECK(checked == std::vector<std::pair<uint64_t, uint64_t>>{{0, kPiece},
                                                                {kPiece, kPiece},
                                                                {2 * kPiece, kPiece},
                                                                {3 * kPiece, kPiece},
                                                                {4 * kPiece, kPiece},
                                                                {5 * kPiece, 12 * kKiB}});
    CHECK(test::read_file(b.sub("4.layer")) == test::read_file(a.sub("4.layer")));
    CHECK(allocated_bytes(b.sub("4.layer")) < 3 * kPiece);  // the holes stayed holes
    MUST(to->remove(4));

    // A failing check stops the copy, which returns its error and leaves nothing behind.
    int calls = 0;
    options.check = [&](LayerFile&, LayerFile&, uint64_t offset, uint64_t) -> Status {
      ++calls;
      if (offset == 2 * kPiece) return make_error(EIO, "piece at {} does not verify", offset);
      return {};
    };
    auto r = from.copy_to(4, *to, options);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
    CHECK_THAT(r.error().message, Catch::Contains("does not verify"));
    CHECK(calls == 3);
    CHECK_FALSE(MUST(to->stat(4)).has_value());
    CHECK(std::filesystem::is_empty(b.path()));

    options.piece_bytes = 1000;
    CHECK_ERRNO(from.copy_to(4, *to, options), EINVAL);
  }
}

TEST_CASE("a paced copy reads no faster than its rate and copies the same bytes", "[layer_file]") {
  // 6 MiB of data with a hole between; at 16 MiB/s the copy cannot take less than 6/16 s less
  // the pacer's burst (0.1 s). Only a lower bound: how much longer is the machine's business.
  constexpr uint64_t kSize = 8 * kMiB;
  for (bool wrapped : {false, true}) {
    INFO((wrapped ? "read/write into a wrapped file" : "copy_file_range between local files"));
    test::TempDir a, b;
    LocalStore from(a.path());
    std::unique_ptr<LayerStore> to;
    if (wrapped)
      to = std::make_unique<WrappingStore>(b.path());
    else
      to = std::make_unique<LocalStore>(b.path());
    auto f = MUST(from.create(7, kSize));
    const auto head = pattern(4 * kMiB, 8), tail = pattern(2 * kMiB, 9);
    MUST(f->write(head.data(), head.size(), 0));
    MUST(f->write(tail.data(), tail.size(), kSize - tail.size()));
    MUST(f->sync());
    CopyOptions options;
    options.rate_bytes_per_sec = 16 * kMiB;
    const auto start = std::chrono::steady_clock::now();
    CHECK(MUST(from.copy_to(7, *to, options)) == 6 * kMiB);
    const auto took = std::chrono::steady_clock::now() - start;
    CHECK(took >= std::chrono::milliseconds(6 * 1000 / 16 - 100));
    CHECK(test::read_file(b.sub("7.layer")) == test::read_file(a.sub("7.layer")));
    CHECK(allocated_bytes(b.sub("7.layer")) < 7 * kMiB);  // the hole stayed a hole
  }
}

TEST_CASE("a copy between two filesystems (EXDEV) falls back to read/write, holes kept",
          "[layer_file]") {
  // The tiers on different filesystems: copy_file_range refuses (EXDEV between ext4 and tmpfs),
  // and read/write makes the same copy. Skipped where /dev/shm is the temp dir's filesystem.
  test::TempDir a;
  char pattern_buf[] = "/dev/shm/layer-unit-XXXXXX";
  if (::mkdtemp(pattern_buf) == nullptr) {
    WARN("no /dev/shm: skipped");
    return;
  }
  const std::string other = pattern_buf;
  struct stat sa, sb;
  REQUIRE(::stat(a.path().c_str(), &sa) == 0);
  REQUIRE(::stat(other.c_str(), &sb) == 0);
  if (sa.st_dev == sb.st_dev) {
    std::filesystem::remove_all(other);
    WARN("/dev/shm is on the temp dir's filesystem: skipped");
    return;
  }
  constexpr uint64_t kSize = 4 * kMiB;
  LocalStore from(a.path()), to(other);
  auto f = MUST(from.create(9, kSize));
  const auto head = pattern(kMiB, 10), tail = pattern(512 * kKiB, 11);
  MUST(f->write(head.data(), head.size(), 64 * kKiB));
  MUST(f->write(tail.data(), tail.size(), kSize - tail.size()));
  MUST(f->sync());
  for (uint64_t rate : {uint64_t{0}, 64 * kMiB}) {
    INFO("rate " << rate);
    CopyOptions options;
    options.rate_bytes_per_sec = rate;
    CHECK(MUST(from.copy_to(9, to, options)) == head.size() + tail.size());
    CHECK(test::read_file(other + "/9.layer") == test::read_file(a.sub("9.layer")));
    CHECK(allocated_bytes(other + "/9.layer") < 2 * kMiB);  // the hole stayed a hole
    // And back, the other way across.
    MUST(from.remove(9));
    CHECK(MUST(to.copy_to(9, from, options)) == head.size() + tail.size());
    CHECK(test::read_file(a.sub("9.layer")) == test::read_file(other + "/9.layer"));
    MUST(to.remove(9));
  }
  std::filesystem::remove_all(other);
}

TEST_CASE("LocalStore::copy_to runs on threads of its own, each set up first", "[layer_file]") {
  test::TempDir a, b;
  LocalStore from(a.path()), to(b.path());
  auto f = MUST(from.create(5, 256 * kKiB));
  const auto data = pattern(256 * kKiB, 6);
  MUST(f->write(data.data(), data.size(), 0));
  MUST(f->sync());
  std::mutex mu;
  std::set<std::thread::id> set_up, checked_on;
  CopyOptions options;
  options.piece_bytes = 64 * kKiB;
  options.thread_setup = [&] {
    // What the mover does there: a lower priority, which must not reach the caller.
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
    std::lock_guard<std::mutex> lk(mu);
    set_up.insert(std::this_thread::get_id());
  };
  options.check = [&](LayerFile&, LayerFile&, uint64_t, uint64_t) -> Status {
    std::lock_guard<std::mutex> lk(mu);
    checked_on.insert(std::this_thread::get_id());
    return {};
  };
  errno = 0;
  const int nice_before = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
  REQUIRE(errno == 0);
  CHECK(MUST(from.copy_to(5, to, options)) == data.size());
  CHECK(::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid())) == nice_before);
  CHECK(set_up.size() == 2);  // the copying stage and the checking one
  CHECK_FALSE(set_up.contains(std::this_thread::get_id()));
  CHECK(checked_on.size() == 1);
  CHECK(set_up.contains(*checked_on.begin()));
  CHECK(test::read_file(b.sub("5.layer")) == test::read_file(a.sub("5.layer")));
}

namespace {

// Which of the file's pages are in the page cache (mincore of an untouched mapping).
std::vector<bool> cached_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  struct stat st;
  REQUIRE(::fstat(fd, &st) == 0);
  const size_t len = static_cast<size_t>(st.st_size), page = 4096;
  void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  REQUIRE(map != MAP_FAILED);
  std::vector<unsigned char> v((len + page - 1) / page);
  REQUIRE(::mincore(map, len, v.data()) == 0);
  ::munmap(map, len);
  std::vector<bool> out;
  for (unsigned char c : v) out.push_back(c & 1);
  return out;
}

void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

}  // namespace

TEST_CASE("LocalStore::copy_to leaves the page cache as it found it, or keeps what it copied",
          "[layer_file]") {
  constexpr uint64_t kSize = 8 * 1024 * kKiB;
  constexpr uint64_t kHot = 1024 * kKiB, kHotAt = 2 * 1024 * kKiB;  // a reader's working set
  constexpr size_t kPage = 4096;
  for (bool keep : {false, true}) {
    INFO((keep ? "keep_cache" : "leave the cache as found"));
    test::TempDir a, b;
    LocalStore from(a.path()), to(b.path());
    {
      auto f = MUST(from.create(6, kSize));
      const auto data = pattern(kSize, 7);
      MUST(f->write(data.data(), data.size(), 0));
      MUST(f->sync());
    }
    const std::string src = a.sub("6.layer"), copy = b.sub("6.layer");
    drop_cached(src);
    const auto dropped = cached_pages(src);
    if (std::count(dropped.begin(), dropped.end(), true) > 0) {
      WARN("this filesystem keeps pages on POSIX_FADV_DONTNEED: page-cache handling not tested");
      return;
    }
    {
      auto f = MUST(from.open(6, false));
      std::vector<uint8_t> buf(kHot);
      MUST(f->read(buf.data(), kHot, kHotAt));
    }
    // What readers had cached before the copy (the read above, and whatever readahead added).
    const auto before = cached_pages(src);
    const size_t pages = kSize / kPage,
                 cached_before =
                     static_cast<size_t>(std::count(before.begin(), before.end(), true));
    REQUIRE(cached_before >= kHot / kPage);
    REQUIRE(cached_before < pages);
    CopyOptions options;
    options.piece_bytes = kSize;  // one piece: no readahead runs ahead of its residency
    options.keep_cache = keep;
    CHECK(MUST(from.copy_to(6, to, options)) == kSize);
    const auto in_src = cached_pages(src), in_copy = cached_pages(copy);
    REQUIRE(in_copy.size() == pages);
    if (keep) {
      // Everything the copy read and wrote stays.
      CHECK(std::count(in_src.begin(), in_src.end(), true) == static_cast<long>(pages));
      CHECK(std::count(in_copy.begin(), in_copy.end(), true) == static_cast<long>(pages));
    } else {
      // What readers had cached stays, and is cached in the copy too, for readers that switch
      // to it; what only the copy read, or wrote, is gone.
      CHECK(in_src == before);
      CHECK(in_copy == before);
    }
    CHECK(test::read_file(copy) == test::read_file(src));
  }
}

TEST_CASE("LocalStore::check_can_hold refuses a size the filesystem cannot hold in one file",
          "[layer_file]") {
  test::TempDir dir;
  LocalStore store(dir.path());
  MUST(store.check_can_hold(1 << 30));
  auto r = store.check_can_hold(uint64_t{1} << 62);  // beyond any Linux filesystem's file size
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EINVAL);
  CHECK_THAT(r.error().message, Catch::Contains(dir.path()));
  // The probe leaves nothing behind.
  CHECK(std::filesystem::is_empty(dir.path()));
}
