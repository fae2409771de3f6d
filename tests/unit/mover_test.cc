// Unit tests for lib/mover.h: frozen layers (hashed and unhashed) moved both ways while a disk
// reads them, an offline delta moved, corrupted and failing copies refused with the layer left
// readable in its source tier and no file behind, and a crash at each step of a move recovered
// by the next open — each read checked against the byte-vector model, fsck clean afterwards.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <thread>

#include "disk_test_util.h"
#include "fsck.h"
#include "intents.h"
#include "mover.h"
#include "snapshots.h"

using namespace layer;
using namespace disktest;

namespace {

constexpr uint64_t kImage = 256 * 4096;
constexpr uint64_t kDisk = kImage + 64 * 4096;

void require_fsck_clean(Pool& pool) {
  auto r = MUST(fsck(pool, true, false));
  for (const auto& p : r.problems) UNSCOPED_INFO(p);
  REQUIRE(r.problems.empty());
}

LayerRecord layer_row(Pool& pool, LayerId id) {
  auto txn = MUST(pool.index().begin_read());
  auto v = MUST(txn.get(Db::kLayers, key_u64(id)));
  REQUIRE(v);
  return MUST(decode_layer(*v, id));
}

// The layer's file is in `tier` and nowhere else, and no move intent is left.
void require_only_in(Pool& pool, LayerId id, Tier tier) {
  CHECK(layer_row(pool, id).tier == tier);
  CHECK(MUST(pool.store(tier).stat(id)).has_value());
  const Tier other = tier == Tier::kSsd ? Tier::kHdd : Tier::kSsd;
  CHECK_FALSE(MUST(pool.store(other).stat(id)).has_value());
  CHECK(MUST(intents(pool, IntentRecord::Kind::kMove)).empty());
}

// A file whose writes go wrong: one byte flipped (corrupt) or ENOSPC.
class BadFile : public ForwardingFile {
 public:
  BadFile(std::shared_ptr<LayerFile> inner, bool enospc)
      : ForwardingFile(std::move(inner)), enospc_(enospc) {}
  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    if (enospc_) return make_error(ENOSPC, "write {}: no space (injected)", inner_->path());
    std::vector<uint8_t> copy(static_cast<const uint8_t*>(buf),
                              static_cast<const uint8_t*>(buf) + len);
    copy[len / 2] ^= 0x40;
    return inner_->write(copy.data(), len, offset);
  }

 private:
  bool enospc_;
};

// A tier whose new files (the mover's copies) are BadFiles.
class BadStore : public ForwardingStore {
 public:
  BadStore(const std::string& dir, bool enospc)
      : ForwardingStore(std::make_unique<LocalStore>(dir)), enospc_(enospc) {}
  Result<std::shared_ptr<LayerFile>> create(LayerId id, uint64_t size_bytes) override {
    LAYER_ASSIGN(auto f, ForwardingStore::create(id, size_bytes));
    return std::shared_ptr<LayerFile>(std::make_shared<BadFile>(f, enospc_));
  }

 private:
  bool enospc_;
};

// Descriptors of this process open on removed layer files.
int deleted_layer_fds() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec).string();
    if (!ec && target.find(".layer (deleted)") != std::string::npos) n++;
  }
  return n;
}

}  // namespace

TEST_CASE("a frozen layer moves both ways while disks read it", "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  auto disk = d.open();
  do_write(*disk, d.model, 4096 * 10, pattern(4096 * 5, 3));
  REQUIRE_OK(disk->flush());
  const auto info = MUST(pool.inspect("c"));
  REQUIRE(info.chain.size() == 2);
  const LayerId base = info.chain[1].id;
  REQUIRE(info.chain[1].state == LayerState::kFrozen);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::thread reader([&] {
    std::mt19937_64 rng(test::test_seed("mover-reader"));
    while (!stop.load()) {
      const uint64_t off = rng() % (kDisk / 512) * 512;
      const uint64_t len = std::min<uint64_t>(kDisk - off, (rng() % 64 + 1) * 512);
      check_read(*disk, d.model, off, len);
      reads++;
    }
  });
  for (Tier to : {Tier::kHdd, Tier::kSsd, Tier::kHdd}) {
    auto r = MUST(move_layer(pool, base, to));
    CHECK(r.moved);
    // The open disk lets go of the old file once told (its reads go on meanwhile).
    REQUIRE_OK(disk->reload_moved(base));
    // A read already in flight holds the old view (and file) until it returns.
    for (int i = 0; i < 5000 && deleted_layer_fds() > 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    CHECK(deleted_layer_fds() == 0);
    CHECK(r.to == to);
    CHECK(r.data_bytes > 0);
    require_only_in(pool, base, to);
    // A disk opened now on the same image reads the same bytes.
    MUST(pool.clone("base:1", "c2", kDisk));
    {
      auto other = d.open("c2");
      check_disk(*other, d.initial_model(kDisk));
    }
    REQUIRE_OK(pool.remove_container("c2"));
  }
  while (reads.load() < 50) std::this_thread::yield();
  stop = true;
  reader.join();
  CHECK_FALSE(MUST(move_layer(pool, base, Tier::kHdd)).moved);  // there already
  check_disk(*disk, d.model);
  disk.reset();
  require_fsck_clean(pool);
  CHECK(move_layer(pool, 999999, Tier::kSsd).error().code == ENOENT);
}

TEST_CASE("an unhashed snapshot layer and an offline delta move; a served delta does not",
          "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 4096 * 3 + 7, 9000, 1);
  MUST(snapshot_container(pool, "c", "s1"));
  write_flush(d, 4096 * 40, 4096 * 3, 2);
  auto info = MUST(pool.inspect("c"));
  REQUIRE(info.chain.size() == 3);
  const LayerId delta = info.chain[0].id, snap = info.chain[1].id;
  REQUIRE(info.chain[1].state == LayerState::kFrozenUnhashed);
  CHECK(MUST(move_layer(pool, snap, Tier::kHdd)).moved);
  require_only_in(pool, snap, Tier::kHdd);
  {
    auto disk = d.open();
    // The served container's delta is its server's to move.
    CHECK(move_layer(pool, delta, Tier::kHdd).error().code == EBUSY);
    check_disk(*disk, d.model);
  }
  CHECK(MUST(move_layer(pool, delta, Tier::kHdd)).moved);
  require_only_in(pool, delta, Tier::kHdd);
  {
    auto disk = d.open();
    check_disk(*disk, d.model);
    do_write(*disk, d.model, 4096 * 100, pattern(4096 * 2, 5));
    REQUIRE_OK(disk->flush());
  }
  CHECK(MUST(move_layer(pool, delta, Tier::kSsd)).moved);
  require_only_in(pool, delta, Tier::kSsd);
  auto disk = d.open();
  check_disk(*disk, d.model);
  disk.reset();
  require_fsck_clean(pool);
}

TEST_CASE("a corrupted or failing copy is refused; the layer stays in its source tier", "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 4096 * 3, 4096 * 4, 1);
  MUST(snapshot_container(pool, "c", "s1"));
  const auto info = MUST(pool.inspect("c"));
  const LayerId snap = info.chain[1].id, base = info.chain[2].id;
  struct Case {
    LayerId layer;
    bool enospc;
    int code;
  };
  for (const Case& c : {Case{base, false, EIO}, Case{snap, false, EIO}, Case{base, true, ENOSPC},
                        Case{snap, true, ENOSPC}}) {
    INFO("layer " << c.layer << (c.enospc ? " ENOSPC" : " corrupt"));
    pool.set_store(Tier::kHdd, std::make_unique<BadStore>(pool.paths().tier_dir[1], c.enospc));
    auto r = move_layer(pool, c.layer, Tier::kHdd);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == c.code);
    pool.set_store(Tier::kHdd, std::make_unique<LocalStore>(pool.paths().tier_dir[1]));
    require_only_in(pool, c.layer, Tier::kSsd);
    auto disk = d.open("c", false);
    check_disk(*disk, d.model);
  }
  require_fsck_clean(pool);
}

TEST_CASE("a damaged, truncated or missing source file is refused; the layer stays where it is",
          "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId base = MUST(pool.inspect("c")).chain[1].id;
  const std::string path = pool.store(Tier::kSsd).describe(base);
  const std::string saved = path + ".saved";
  std::filesystem::copy_file(path, saved);
  struct Case {
    const char* what;
    std::function<void()> damage;
    const char* message;
  };
  const Case cases[] = {
      {"a flipped bit", [&] { test::flip_bits(path, 4096 * 7 + 100, 0x10); }, "hashes to"},
      {"truncated", [&] { std::filesystem::resize_file(path, kImage / 2); }, "hashes to"},
      {"missing", [&] { std::filesystem::remove(path); }, "is missing"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    c.damage();
    auto r = move_layer(pool, base, Tier::kHdd);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == EIO);
    CHECK_THAT(r.error().message, Catch::Contains(c.message));
    // Nothing moved: the row names ssd, hdd holds no copy, no intent is left.
    CHECK(layer_row(pool, base).tier == Tier::kSsd);
    CHECK_FALSE(MUST(pool.store(Tier::kHdd).stat(base)).has_value());
    CHECK(MUST(intents(pool, IntentRecord::Kind::kMove)).empty());
    std::filesystem::copy_file(saved, path, std::filesystem::copy_options::overwrite_existing);
  }
  std::filesystem::remove(saved);
  require_only_in(pool, base, Tier::kSsd);
  auto disk = d.open("c", false);
  check_disk(*disk, d.model);
  disk.reset();
  require_fsck_clean(pool);
}

TEST_CASE("a copy spoiled while the move runs is refused, for every kind of layer", "[mover]") {
  // Small pieces: the copy is verified piece by piece, each one while the next is copied, and
  // the spoiled byte lands in a piece after the first.
  constexpr uint64_t kPiece = 64 * 1024;
  const MoveOptions options{kPiece};
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  write_flush(d, 4096 * 20 + 7, 9000, 1);
  MUST(snapshot_container(pool, "c", "s1"));
  write_flush(d, 4096 * 40, 4096 * 30, 2);
  const auto info = MUST(pool.inspect("c"));
  REQUIRE(info.chain.size() == 3);
  struct Case {
    LayerId layer;
    const char* what;
  };
  for (const Case& c : {Case{info.chain[2].id, "frozen (checksums)"},
                        Case{info.chain[1].id, "frozen-unhashed (compared)"},
                        Case{info.chain[0].id, "writable delta (compared)"}}) {
    INFO(c.what);
    // The source's last data byte gets flipped in the copy, right after the piece holding it
    // is written and before that piece is verified.
    uint64_t target = 0;
    {
      auto src = MUST(pool.store(Tier::kSsd).open(c.layer, false));
      MUST(src->data_extents(0, MUST(src->size()),
                             [&](uint64_t o, uint64_t len) { target = o + len - 1; }));
    }
    REQUIRE(target >= kPiece);
    const std::string copy_path = pool.store(Tier::kHdd).describe(c.layer);
    int piece = 0;
    bool spoiled = false;
    pool.set_test_hook([&](std::string_view point) {
      if (point != "move.piece-copied" || piece++ != static_cast<int>(target / kPiece)) return;
      const int fd = ::open(copy_path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0) return;
      uint8_t byte = 0;
      if (::pread(fd, &byte, 1, static_cast<off_t>(target)) == 1) {
        byte ^= 0x10;
        spoiled = ::pwrite(fd, &byte, 1, static_cast<off_t>(target)) == 1;
      }
      ::close(fd);
    });
    auto r = move_layer(pool, c.layer, Tier::kHdd, options);
    pool.set_test_hook(nullptr);
    CHECK(spoiled);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == EIO);
    CHECK_THAT(r.error().message, Catch::Contains(copy_path));
    require_only_in(pool, c.layer, Tier::kSsd);
    {
      auto disk = d.open("c", false);
      check_disk(*disk, d.model);
    }
    // Unspoiled, the same piece-by-piece move goes through, both ways.
    CHECK(MUST(move_layer(pool, c.layer, Tier::kHdd, options)).moved);
    require_only_in(pool, c.layer, Tier::kHdd);
    CHECK(MUST(move_layer(pool, c.layer, Tier::kSsd, options)).moved);
    require_only_in(pool, c.layer, Tier::kSsd);
    auto disk = d.open("c", false);
    check_disk(*disk, d.model);
  }
  CHECK(move_layer(pool, info.chain[2].id, Tier::kHdd, MoveOptions{1000}).error().code == EINVAL);
  require_fsck_clean(pool);
}

namespace {

// Pages of the file in the page cache (mincore of an untouched mapping).
size_t cached_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  const size_t len = static_cast<size_t>(::lseek(fd, 0, SEEK_END)), page = 4096;
  void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    ::close(fd);
    FAIL("mmap " << path);
  }
  std::vector<unsigned char> v((len + page - 1) / page);
  REQUIRE(::mincore(map, len, v.data()) == 0);
  ::munmap(map, len);
  // And drop them, for the next look.
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  return static_cast<size_t>(
      std::count_if(v.begin(), v.end(), [](unsigned char c) { return c & 1; }));
}

}  // namespace

TEST_CASE("a move keeps a served layer's pages cached and a layer nobody reads leaves none",
          "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId base = MUST(pool.inspect("c")).chain[1].id;
  const std::string on_ssd = pool.store(Tier::kSsd).describe(base);
  (void)cached_pages(on_ssd);
  if (cached_pages(on_ssd) > 0) {
    WARN("this filesystem keeps pages on POSIX_FADV_DONTNEED: page-cache handling not tested");
    return;
  }
  // Nobody reads it: the move leaves the page cache as it found it.
  CHECK(MUST(move_layer(pool, base, Tier::kHdd)).moved);
  CHECK(cached_pages(pool.store(Tier::kHdd).describe(base)) == 0);
  // A disk reads it (it holds the layer's lock): what the move copied stays cached, for the
  // disk's reads of the new file.
  auto disk = d.open("c", false);
  CHECK(MUST(move_layer(pool, base, Tier::kSsd)).moved);
  CHECK(cached_pages(on_ssd) == kImage / 4096);
  REQUIRE_OK(disk->reload_moved(base));
  check_disk(*disk, d.model);
}

TEST_CASE("a crash at each step of a move leaves the layer in one place once reopened", "[mover]") {
  for (const char* point : {"move.intent-committed", "move.piece-copied", "move.copied",
                            "move.verified", "move.switched"}) {
    INFO(point);
    DiskFixture d(kImage, kDisk);
    const LayerId base = MUST(d.f.pool->inspect("c")).chain[1].id;
    d.f.pool.reset();
    test::Child child([&] {
      ::setenv("LAYER_FAILPOINT", point, 1);
      auto pool = Pool::open(d.f.root, Pool::OpenOptions{});
      if (!pool) return 3;
      return move_layer(**pool, base, Tier::kHdd) ? 0 : 4;
    });
    REQUIRE(child.wait() == 128 + SIGKILL);
    {
      // What the crash left, before any recovery: one move intent.
      auto ro = MUST(Pool::open(d.f.root, Pool::OpenOptions{true}));
      CHECK(MUST(intents(*ro, IntentRecord::Kind::kMove)).size() == 1);
      auto r = MUST(fsck(*ro, false, false));
      CHECK_FALSE(r.problems.empty());
    }
    d.f.reopen();  // a writable open finishes the move's recovery
    Pool& pool = *d.f.pool;
    const Tier expect = std::string(point) == "move.switched" ? Tier::kHdd : Tier::kSsd;
    require_only_in(pool, base, expect);
    auto disk = d.open();
    check_disk(*disk, d.model);
    disk.reset();
    require_fsck_clean(pool);
    // And it moves again.
    const Tier back = expect == Tier::kSsd ? Tier::kHdd : Tier::kSsd;
    CHECK(MUST(move_layer(pool, base, back)).moved);
    require_only_in(pool, base, back);
  }
}

TEST_CASE("fsck --repair reports only the move recoveries it did", "[mover]") {
  DiskFixture d(kImage, kDisk);
  Pool& pool = *d.f.pool;
  const LayerId base = MUST(pool.inspect("c")).chain[1].id;
  // What a move killed after its intent leaves: the intent, no copy yet.
  MUST(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(uint64_t id, txn.next_id("intent"));
    IntentRecord intent{IntentRecord::Kind::kMove, base, "hdd", now_unix()};
    return txn.put(Db::kIntents, key_u64(id), encode(intent));
  }));
  // A mover takes the layer up again between fsck's scan and its repairs: fsck leaves the
  // intent to it and does not say it finished it.
  Lock mover;
  pool.set_test_hook([&](std::string_view point) {
    if (point == "fsck.scanned")
      mover = MUST(pool.locks().try_lock(LockKind::kMove, base, true, "test mover"));
  });
  auto r = MUST(fsck(pool, false, true));
  pool.set_test_hook(nullptr);
  for (const auto& line : r.repaired) INFO(line);
  CHECK(r.repaired.empty());
  CHECK(r.problems.empty());
  CHECK(MUST(intents(pool, IntentRecord::Kind::kMove)).size() == 1);
  // Once it lets go, the next repair finishes it and says so.
  mover.release();
  r = MUST(fsck(pool, false, true));
  REQUIRE(r.repaired.size() == 1);
  CHECK(r.repaired[0].find("finished") != std::string::npos);
  CHECK(MUST(intents(pool, IntentRecord::Kind::kMove)).empty());
  require_only_in(pool, base, Tier::kSsd);
  require_fsck_clean(pool);
}
