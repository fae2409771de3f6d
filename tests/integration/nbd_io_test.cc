// nbd_io_test.cc — the plugin in a real nbdkit on a unix socket, driven through libnbd, checked
// byte for byte against a reference the test keeps (never against the system under test).
//
// Each TEST_CASE has a tag that tests/integration/CMakeLists.txt registers as one ctest test, so
// they run (and time out, and skip) separately. Random tests print their seed; set
// LAYER_TEST_SEED to replay one.
//
// What the reference assumes beyond the NBD contract, from DESIGN.md: trimmed ranges read back
// as zeroes; extents come from the block maps, so a block holding non-zero bytes is data, and a
// block reported data must have been written (or held data in the image); fast zero succeeds
// on whole blocks and otherwise fails with ENOTSUP without changing anything.
#define CATCH_CONFIG_RUNNER
#include <libnbd.h>
#include <signal.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include "nbd_fixture.h"

using namespace layer_test;

namespace {

constexpr uint32_t kBlock = 4096;  // the default block size of `layer image import`
// Not a multiple of the block size: the last block is short (1536 bytes).
constexpr uint64_t kDiskSize = 8 * 1024 * 1024 + 1536;

// The expected content of one disk, and which blocks may be reported as data by extents.
class Model {
 public:
  explicit Model(std::vector<uint8_t> content) : bytes(std::move(content)) {
    data_allowed.assign((bytes.size() + kBlock - 1) / kBlock, false);
    for (uint64_t b = 0; b < data_allowed.size(); ++b) {
      uint64_t end = std::min<uint64_t>((b + 1) * kBlock, bytes.size());
      data_allowed[b] = std::any_of(bytes.begin() + long(b * kBlock), bytes.begin() + long(end),
                                    [](uint8_t x) { return x != 0; });
    }
  }
  uint64_t size() const { return bytes.size(); }

  void write(const uint8_t* data, uint64_t len, uint64_t offset) {
    std::memcpy(bytes.data() + offset, data, len);
    for (uint64_t b = offset / kBlock; b * kBlock < offset + len; ++b) data_allowed[b] = true;
  }
  // Zero and trim: whole full-size blocks become tombstones (never data); partial blocks are
  // written zeroes (may be data).
  void zero(uint64_t len, uint64_t offset) {
    std::memset(bytes.data() + offset, 0, len);
    for (uint64_t b = offset / kBlock; b * kBlock < offset + len; ++b) {
      uint64_t start = b * kBlock, end = start + kBlock;
      bool whole = start >= offset && end <= offset + len && end <= bytes.size();
      data_allowed[b] = whole ? false : true;
    }
  }
  bool is_zero(uint64_t offset, uint64_t len) const {
    return std::all_of(bytes.begin() + long(offset), bytes.begin() + long(offset + len),
                       [](uint8_t x) { return x == 0; });
  }

  std::vector<uint8_t> bytes;
  std::vector<bool> data_allowed;
};

std::string first_difference(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                             uint64_t base = 0) {
  if (got.size() != want.size()) {
    return "sizes differ: " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
  }
  auto mis = std::mismatch(got.begin(), got.end(), want.begin());
  if (mis.first == got.end()) return "";
  uint64_t at = uint64_t(mis.first - got.begin());
  uint64_t n = 0;
  for (uint64_t i = at; i < got.size(); ++i) n += got[i] != want[i];
  return "first difference at byte " + std::to_string(base + at) + " (block " +
         std::to_string((base + at) / kBlock) + "): got " + std::to_string(got[at]) + ", want " +
         std::to_string(want[at]) + "; " + std::to_string(n) + " bytes differ";
}

// Reads [offset, offset+len) through nbd and compares with the model.
void check_range(Nbd& nbd, const Model& model, uint64_t offset, uint64_t len,
                 const std::string& what) {
  std::vector<uint8_t> got = nbd.read(len, offset);
  std::vector<uint8_t> want(model.bytes.begin() + long(offset),
                            model.bytes.begin() + long(offset + len));
  INFO(what << ": read " << len << " at " << offset);
  REQUIRE(first_difference(got, want, offset) == "");
}

void check_all(Nbd& nbd, const Model& model, const std::string& what) {
  REQUIRE(nbd.size() == model.size());
  check_range(nbd, model, 0, model.size(), what);
}

// Extents must tile the range; zero extents must read as zeroes in the model; data extents may
// only cover blocks that were written or held data in the image.
void check_extents(Nbd& nbd, const Model& model, const std::string& what) {
  std::vector<Extent> extents = nbd.extents(model.size(), 0);
  uint64_t at = 0;
  uint64_t data_bytes = 0;
  for (const Extent& e : extents) {
    INFO(what << ": extent " << e.offset << "+" << e.length << " flags " << e.flags);
    REQUIRE(e.offset == at);
    REQUIRE(e.length > 0);
    // The plugin reports data (0) or hole+zero (3), nothing else.
    REQUIRE((e.flags == 0 || e.flags == (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)));
    if (e.flags & LIBNBD_STATE_ZERO) {
      REQUIRE(model.is_zero(e.offset, e.length));
    } else {
      data_bytes += e.length;
      for (uint64_t b = e.offset / kBlock; b * kBlock < e.offset + e.length; ++b) {
        INFO("block " << b << " reported as data but never written");
        REQUIRE(model.data_allowed[b]);
      }
    }
    at += e.length;
  }
  REQUIRE(at == model.size());
  std::cerr << what << ": " << extents.size() << " extents, " << data_bytes << " data bytes"
            << std::endl;
}

std::vector<uint8_t> random_bytes(std::mt19937_64& rng, uint64_t len) {
  std::vector<uint8_t> v(len);
  for (auto& x : v) x = uint8_t(rng());
  return v;
}

struct Range {
  uint64_t offset, len;
};

// A random request range of the kinds that matter: 1 byte, small unaligned, block-straddling,
// aligned whole blocks, large unaligned, and ranges ending at the (short) last block.
Range random_range(std::mt19937_64& rng, uint64_t size) {
  uint64_t blocks = size / kBlock;
  Range r{0, 1};
  switch (rng() % 6) {
    case 0:
      r = {rng() % size, 1};
      break;
    case 1:
      r = {rng() % size, 1 + rng() % 600};
      break;
    case 2: {
      uint64_t edge = (1 + rng() % (blocks - 1)) * kBlock;
      uint64_t before = 1 + rng() % (kBlock - 1);
      r = {edge - before, before + 1 + rng() % (2 * kBlock)};
      break;
    }
    case 3:
      r = {(rng() % blocks) * kBlock, (1 + rng() % 16) * kBlock};
      break;
    case 4:
      r = {rng() % size, 1 + rng() % (256 * 1024)};
      break;
    default: {
      uint64_t from = size - std::min<uint64_t>(size, 3 * kBlock);
      r.offset = from + rng() % (size - from);
      r.len = size - r.offset;
      if (rng() % 2) r.len = 1 + rng() % r.len;
    }
  }
  r.len = std::min(r.len, size - r.offset);
  if (r.len == 0) r.len = 1;
  return r;
}

bool whole_full_blocks(Range r, uint64_t size) {
  return r.offset % kBlock == 0 && r.len % kBlock == 0 &&
         r.offset + r.len <= size / kBlock * kBlock;
}

// One random operation on `nbd`, mirrored in the model. Returns a short description.
std::string random_op(std::mt19937_64& rng, Nbd& nbd, Model& model) {
  Range r = random_range(rng, model.size());
  unsigned pick = unsigned(rng() % 100);
  if (pick < 45) {
    auto data = random_bytes(rng, r.len);
    uint32_t flags = rng() % 10 == 0 ? LIBNBD_CMD_FLAG_FUA : 0;
    nbd.pwrite(data.data(), r.len, r.offset, flags);
    model.write(data.data(), r.len, r.offset);
    return "write";
  }
  if (pick < 60) {
    nbd.zero(r.len, r.offset, rng() % 10 == 0 ? LIBNBD_CMD_FLAG_FUA : 0);
    model.zero(r.len, r.offset);
    return "zero";
  }
  if (pick < 66) {
    // Fast zero: whole blocks must succeed; anything else may fail with ENOTSUP, unchanged.
    if (rng() % 2) r = {(rng() % (model.size() / kBlock)) * kBlock, kBlock * (1 + rng() % 4)};
    r.len = std::min(r.len, model.size() - r.offset);
    int err = nbd.try_zero(r.len, r.offset, LIBNBD_CMD_FLAG_FAST_ZERO);
    INFO("fast zero len " << r.len << " at " << r.offset << ": " << std::strerror(err));
    if (whole_full_blocks(r, model.size())) REQUIRE(err == 0);
    REQUIRE((err == 0 || err == ENOTSUP));
    if (err == 0) model.zero(r.len, r.offset);
    check_range(nbd, model, r.offset, r.len, "after fast zero");
    return err == 0 ? "fast zero" : "fast zero refused";
  }
  if (pick < 76) {
    nbd.trim(r.len, r.offset);
    model.zero(r.len, r.offset);
    return "trim";
  }
  if (pick < 81) {
    nbd.flush();
    return "flush";
  }
  if (pick < 84) {
    nbd.cache(r.len, r.offset);
    return "cache";
  }
  check_range(nbd, model, r.offset, r.len, "random read");
  return "read";
}

// A temp dir, a seeded RNG, a pool with one random image "base:1" of kDiskSize bytes.
struct Fixture {
  explicit Fixture(const std::string& test_name, uint64_t image_size = kDiskSize)
      : rng(test_seed(test_name)), pool(dir / "pool") {
    image = make_random_image(dir / "base.img", image_size, rng);
    pool.import_image("base:1", dir / "base.img");
  }
  TempDir dir;
  std::mt19937_64 rng;
  Pool pool;
  std::vector<uint8_t> image;
};

ServerOptions with_threads(int n) {
  ServerOptions o;
  o.threads = n;
  return o;
}
ServerOptions foreground() {
  ServerOptions o;
  o.mode = ServerMode::kForeground;
  return o;
}
ServerOptions read_only() {
  ServerOptions o;
  o.read_only = true;
  return o;
}

void check_capabilities(Nbd& nbd) {
  CHECK(nbd_is_read_only(nbd.get()) == 0);
  CHECK(nbd_can_flush(nbd.get()) == 1);
  CHECK(nbd_can_fua(nbd.get()) == 1);
  CHECK(nbd_can_trim(nbd.get()) == 1);
  CHECK(nbd_can_zero(nbd.get()) == 1);
  CHECK(nbd_can_fast_zero(nbd.get()) == 1);
  CHECK(nbd_can_multi_conn(nbd.get()) == 1);
  CHECK(nbd_can_cache(nbd.get()) == 1);
  CHECK(nbd_can_meta_context(nbd.get(), LIBNBD_CONTEXT_BASE_ALLOCATION) == 1);
  // Block size hints: any alignment accepted, preferred = the block size, requests to 32 MiB.
  CHECK(nbd.block_size(LIBNBD_SIZE_MINIMUM) == 1);
  CHECK(nbd.block_size(LIBNBD_SIZE_PREFERRED) == kBlock);
  CHECK(nbd.block_size(LIBNBD_SIZE_MAXIMUM) == 32 * 1024 * 1024);
}

}  // namespace

TEST_CASE("random writes, zeroes and trims from two connections match the reference", "[random]") {
  Fixture f("random");
  f.pool.clone("base:1", "c1");
  Server server(f.dir, f.pool, with_threads(4));
  Nbd a(server.socket(), "c1");
  Nbd b(server.socket(), "c1");
  check_capabilities(a);
  Model model(f.image);
  check_all(a, model, "fresh clone");
  check_extents(a, model, "fresh clone");

  std::map<std::string, int> counts;
  constexpr int kOps = 3000;
  for (int i = 0; i < kOps; ++i) {
    Nbd& nbd = f.rng() % 2 ? a : b;
    INFO("op " << i);
    counts[random_op(f.rng, nbd, model)]++;
    if (i % 500 == 499) {
      check_extents(f.rng() % 2 ? a : b, model, "op " + std::to_string(i));
    }
  }
  for (const auto& [op, n] : counts) std::cerr << op << ": " << n << std::endl;
  // Both connections see every write of the other (one disk per export per server).
  check_all(a, model, "connection a at the end");
  check_all(b, model, "connection b at the end");
  check_extents(b, model, "end");
  a.flush();
  // A new connection after a flush sees the same.
  Nbd c(server.socket(), "c1");
  check_all(c, model, "new connection");
}

TEST_CASE("concurrent writers to disjoint bytes of the same blocks", "[concurrent]") {
  Fixture f("concurrent");
  f.pool.clone("base:1", "c1");
  Server server(f.dir, f.pool, with_threads(8));
  Model model(f.image);

  // Cut [0, kRegion) into pieces of 1..6000 bytes; each piece goes to writer 0 or 1, or to
  // nobody (it must keep the image's bytes, so a racing copy-up that resurrects or drops
  // neighbouring bytes shows). Pieces are disjoint, so the result does not depend on timing.
  constexpr uint64_t kRegion = 4 * 1024 * 1024;
  constexpr int kRounds = 4;
  for (int round = 0; round < kRounds; ++round) {
    struct Piece {
      uint64_t offset, len;
      int kind;  // 0 write, 1 zero, 2 trim
      std::vector<uint8_t> data;
    };
    std::vector<Piece> work[2];
    for (uint64_t at = 0; at < kRegion;) {
      uint64_t len = std::min<uint64_t>(1 + f.rng() % 6000, kRegion - at);
      unsigned who = unsigned(f.rng() % 5);  // 0-1 writer 0, 2-3 writer 1, 4 nobody
      if (who < 4) {
        int kind = f.rng() % 6 == 0 ? 1 + int(f.rng() % 2) : 0;
        Piece p{at, len, kind, {}};
        if (kind == 0) {
          p.data = random_bytes(f.rng, len);
          model.write(p.data.data(), len, at);
        } else {
          model.zero(len, at);
        }
        work[who / 2].push_back(std::move(p));
      }
      at += len;
    }
    for (auto& w : work) std::shuffle(w.begin(), w.end(), f.rng);

    std::mutex errors_mu;
    std::vector<std::string> errors;
    auto writer = [&](int id) {
      try {
        Nbd nbd(server.socket(), "c1");
        int n = 0;
        for (const Piece& p : work[id]) {
          if (p.kind == 0) nbd.pwrite(p.data.data(), p.len, p.offset);
          if (p.kind == 1) nbd.zero(p.len, p.offset);
          if (p.kind == 2) nbd.trim(p.len, p.offset);
          if (++n % 97 == 0) nbd.flush();
        }
        nbd.flush();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(errors_mu);
        errors.push_back("writer " + std::to_string(id) + ": " + e.what());
      }
    };
    std::thread t0(writer, 0), t1(writer, 1);
    t0.join();
    t1.join();
    INFO("round " << round);
    for (const auto& e : errors) FAIL_CHECK(e);
    REQUIRE(errors.empty());
    Nbd check(server.socket(), "c1");
    check_all(check, model, "after round " + std::to_string(round));
    check_extents(check, model, "after round " + std::to_string(round));
  }
  // And the same after a restart.
  server.stop();
  Server again(f.dir, f.pool);
  Nbd nbd(again.socket(), "c1");
  check_all(nbd, model, "after restart");
}

TEST_CASE("clones of one image are independent and the image does not change", "[clones]") {
  Fixture f("clones");
  for (const char* name : {"c1", "c2", "c3"}) f.pool.clone("base:1", name);
  Server server(f.dir, f.pool);
  Model m1(f.image), m2(f.image);
  {
    Nbd n1(server.socket(), "c1");
    Nbd n2(server.socket(), "c2");
    for (int i = 0; i < 300; ++i) {
      random_op(f.rng, n1, m1);
      random_op(f.rng, n2, m2);
    }
    // Overwrite the same range in both with different data.
    auto d1 = random_bytes(f.rng, 3 * kBlock + 7), d2 = random_bytes(f.rng, 3 * kBlock + 7);
    n1.pwrite(d1.data(), d1.size(), kBlock - 3);
    m1.write(d1.data(), d1.size(), kBlock - 3);
    n2.pwrite(d2.data(), d2.size(), kBlock - 3);
    m2.write(d2.data(), d2.size(), kBlock - 3);
    n1.flush();
    n2.flush();
    check_all(n1, m1, "c1");
    check_all(n2, m2, "c2");
    Nbd n3(server.socket(), "c3");
    Model m3(f.image);
    check_all(n3, m3, "c3, never written");
    check_extents(n3, m3, "c3, never written");
  }
  // A clone made while the server runs, after the others were written, shows the image.
  f.pool.clone("base:1", "c4");
  {
    Nbd n4(server.socket(), "c4");
    std::vector<uint8_t> got = n4.read(n4.size(), 0);
    REQUIRE(first_difference(got, read_file(f.dir / "base.img")) == "");
  }
  server.stop();
  // Offline: the pool is consistent.
  RunResult fsck = f.pool.layer({"fsck"});
  INFO(fsck.describe());
  CHECK(fsck.exit_code == 0);
  // After a restart every clone still has its own content.
  Server again(f.dir, f.pool);
  Nbd n1(again.socket(), "c1");
  Nbd n2(again.socket(), "c2");
  Nbd n3(again.socket(), "c3");
  check_all(n1, m1, "c1 after restart");
  check_all(n2, m2, "c2 after restart");
  check_all(n3, Model(f.image), "c3 after restart");
}

TEST_CASE("data survives a server restart", "[restart]") {
  Fixture f("restart");
  f.pool.clone("base:1", "c1");
  Model model(f.image);
  {
    Server server(f.dir, f.pool);
    Nbd nbd(server.socket(), "c1");
    for (int i = 0; i < 300; ++i) random_op(f.rng, nbd, model);
    nbd.flush();
    nbd.shutdown();
    std::string how = server.stop();
    INFO("nbdkit stopped: " << how);
  }
  {
    // Foreground this time; then write without a flush and close cleanly: the last close of
    // the container flushes it.
    Server server(f.dir, f.pool, foreground());
    Nbd nbd(server.socket(), "c1");
    check_all(nbd, model, "after restart");
    check_extents(nbd, model, "after restart");
    for (int i = 0; i < 100; ++i) {
      Range r = random_range(f.rng, model.size());
      auto data = random_bytes(f.rng, r.len);
      nbd.pwrite(data.data(), r.len, r.offset);
      model.write(data.data(), r.len, r.offset);
    }
    nbd.shutdown();
    std::string how = server.stop();
    INFO("nbdkit log: " << server.log());
    CHECK(how == "exit 0");
  }
  Server server(f.dir, f.pool);
  Nbd nbd(server.socket(), "c1");
  check_all(nbd, model, "after a close without flush and a restart");
  check_extents(nbd, model, "after a close without flush and a restart");
}

TEST_CASE("after kill -9, every write acknowledged before a completed flush is intact", "[kill9]") {
  Fixture f("kill9");
  f.pool.clone("base:1", "c1");
  Model model(f.image);
  Server server(f.dir, f.pool, with_threads(4));
  Nbd a(server.socket(), "c1");
  Nbd b(server.socket(), "c1");
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 150; ++i) random_op(f.rng, f.rng() % 2 ? a : b, model);
    (f.rng() % 2 ? a : b).flush();
  }
  Model durable = model;

  // After the last flush: writes, zeroes and trims on disjoint slots (copy-ups of absent
  // blocks among them), acknowledged but never flushed.
  constexpr uint64_t kSlot = 3 * kBlock;
  std::vector<uint64_t> slots(model.size() / kSlot);
  for (uint64_t i = 0; i < slots.size(); ++i) slots[i] = i;
  std::shuffle(slots.begin(), slots.end(), f.rng);
  slots.resize(slots.size() / 3);
  for (uint64_t slot : slots) {
    uint64_t offset = slot * kSlot + f.rng() % kBlock;
    uint64_t len = 1 + f.rng() % (2 * kBlock);
    Nbd& nbd = f.rng() % 2 ? a : b;
    if (f.rng() % 5 == 0) {
      nbd.zero(len, offset);
      model.zero(len, offset);
    } else {
      auto data = random_bytes(f.rng, len);
      nbd.pwrite(data.data(), len, offset);
      model.write(data.data(), len, offset);
    }
  }
  server.kill9();

  Server again(f.dir, f.pool);
  Nbd nbd(again.socket(), "c1");
  std::vector<uint8_t> got = nbd.read(model.size(), 0);
  // Every byte is the durable one, or (only where an unflushed write changed it) the new one.
  uint64_t bad = 0, first_bad = 0, newer = 0;
  for (uint64_t i = 0; i < got.size(); ++i) {
    bool ok = got[i] == durable.bytes[i] || got[i] == model.bytes[i];
    if (!ok && bad++ == 0) first_bad = i;
    newer += got[i] != durable.bytes[i];
  }
  std::cerr << "kill9: " << newer << " bytes carry unflushed writes" << std::endl;
  INFO("first bad byte at " << first_bad << " (block " << first_bad / kBlock << ")");
  REQUIRE(bad == 0);
  // The disk still works: write, flush, read back.
  auto data = random_bytes(f.rng, 2 * kBlock + 100);
  nbd.pwrite(data.data(), data.size(), 5 * kBlock - 50);
  nbd.flush();
  REQUIRE(nbd.read(data.size(), 5 * kBlock - 50) == data);
}

TEST_CASE("bad requests and bad export names are refused", "[errors]") {
  Fixture f("errors");
  f.pool.clone("base:1", "c1");
  f.pool.clone("base:1", "c2");
  Server server(f.dir, f.pool, foreground());
  Model model(f.image);

  SECTION("list_exports lists the containers") {
    auto names = Nbd::list_exports(server.socket());
    std::set<std::string> got(names.begin(), names.end());
    CHECK(got.count("c1") == 1);
    CHECK(got.count("c2") == 1);
    for (const auto& n : got) CHECK((n == "c1" || n == "c2" || n.find('@') != std::string::npos));
  }

  SECTION("requests beyond the end fail and change nothing") {
    // libnbd's own bounds check is off, so the requests reach nbdkit, which refuses them as
    // the NBD spec says: ENOSPC for writes and write-zeroes, EINVAL for the rest.
    Nbd nbd(server.socket(), "c1", /*strict=*/false);
    REQUIRE(nbd.size() == model.size());
    uint64_t size = model.size();
    std::vector<uint8_t> buf(8192, 0x5a);
    CHECK(nbd.try_pread(buf.data(), 1024, size - 512) == EINVAL);
    CHECK(nbd.try_pread(buf.data(), 1, size) == EINVAL);
    CHECK(nbd.try_pwrite(buf.data(), 1024, size - 512) == ENOSPC);
    CHECK(nbd.try_pwrite(buf.data(), 1, size) == ENOSPC);
    CHECK(nbd.try_pwrite(buf.data(), 4096, uint64_t(1) << 40) == ENOSPC);
    CHECK(nbd.try_zero(8192, size - 4096) == ENOSPC);
    CHECK(nbd.try_trim(8192, size - 4096) == EINVAL);
    CHECK(nbd.try_trim(1, size) == EINVAL);
    nbd.flush();
    check_range(nbd, model, size - 3 * kBlock, 3 * kBlock, "end of disk");
    // The connection still works.
    nbd.pwrite(buf.data(), 512, size - 512);
    model.write(buf.data(), 512, size - 512);
    check_range(nbd, model, size - 3 * kBlock, 3 * kBlock, "end of disk after a write");
  }

  SECTION("unknown export names fail to connect with a clear error") {
    const std::vector<std::string> names = {"nosuch", "../x", "../pool/c1", "c1/..", "C1", ""};
    for (const auto& name : names) {
      auto err = Nbd::connect_error(server.socket(), name);
      INFO("export \"" << name << "\"");
      REQUIRE(err.has_value());
      std::cerr << "connect to \"" << name << "\": " << *err << std::endl;
      CHECK(!err->empty());
    }
    // The server says why, naming the export.
    std::string log = server.log();
    INFO("nbdkit log: " << log);
    CHECK(log.find("nosuch") != std::string::npos);
    // And keeps serving.
    Nbd nbd(server.socket(), "c1");
    check_all(nbd, model, "after refused connections");
  }

  SECTION("read-only server refuses writes with EPERM") {
    server.stop();
    Server ro(f.dir, f.pool, read_only());
    for (bool strict : {true, false}) {
      Nbd nbd(ro.socket(), "c1", strict);
      INFO("strict " << strict);
      CHECK(nbd_is_read_only(nbd.get()) == 1);
      std::vector<uint8_t> buf(4096, 1);
      CHECK(nbd.try_pwrite(buf.data(), 4096, 0) == EPERM);
      if (strict) {
        // libnbd refuses these itself: a read-only export advertises neither.
        CHECK(nbd_can_zero(nbd.get()) == 0);
        CHECK(nbd_can_trim(nbd.get()) == 0);
      } else {
        CHECK(nbd.try_zero(4096, 4096) == EPERM);
        CHECK(nbd.try_trim(4096, 8192) == EPERM);
      }
      check_all(nbd, model, "read-only");
    }
  }
}

TEST_CASE("connections to one export open and close quickly, in parallel", "[reconnect]") {
  // Clients such as nbdcopy and qemu-img close a connection and open the next at once, or
  // several at a time: an open racing the last close of the same export must succeed.
  Fixture f("reconnect");
  f.pool.clone("base:1", "c1");
  Model model(f.image);
  Server server(f.dir, f.pool, with_threads(4));
  constexpr int kThreads = 3, kRounds = 40;
  std::vector<std::vector<uint8_t>> last(kThreads);
  for (int t = 0; t < kThreads; ++t) last[t] = random_bytes(f.rng, kBlock + 100);
  std::vector<bool> written(kThreads, false);
  std::mutex mu;
  std::vector<std::string> errors;
  auto worker = [&](int t) {
    for (int round = 0; round < kRounds; ++round) {
      try {
        Nbd nbd(server.socket(), "c1");
        // Unflushed data makes the last close do a flush round, widening the window.
        std::vector<uint8_t> data = last[t];
        data[0] = uint8_t(round);
        nbd.pwrite(data.data(), data.size(), uint64_t(t) * 3 * kBlock + 50);
        {
          std::lock_guard<std::mutex> lk(mu);
          last[t] = data;
          written[t] = true;
        }
        nbd.shutdown();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(mu);
        errors.push_back("thread " + std::to_string(t) + " round " + std::to_string(round) + ": " +
                         e.what());
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < std::min<size_t>(errors.size(), 3); ++i) FAIL_CHECK(errors[i]);
  INFO(errors.size() << " of " << kThreads * kRounds << " connections failed");
  CHECK(errors.empty());
  for (int t = 0; t < kThreads; ++t) {
    if (written[t]) model.write(last[t].data(), last[t].size(), uint64_t(t) * 3 * kBlock + 50);
  }
  Nbd nbd(server.socket(), "c1");
  check_all(nbd, model, "after the reconnects");
}

TEST_CASE("one server per container across processes", "[exclusive]") {
  Fixture f("exclusive");
  f.pool.clone("base:1", "c1");
  f.pool.clone("base:1", "c2");
  Model m1(f.image), m2(f.image);
  Server first(f.dir, f.pool);
  Nbd held(first.socket(), "c1");
  auto data = random_bytes(f.rng, 10000);
  held.pwrite(data.data(), data.size(), 1234);
  m1.write(data.data(), data.size(), 1234);

  Server second(f.dir, f.pool, foreground());
  auto err = Nbd::connect_error(second.socket(), "c1");
  REQUIRE(err.has_value());
  std::cerr << "second server, c1: " << *err << std::endl;
  {
    // The refusal names the process that serves it.
    std::string log = second.log();
    INFO("second server's log: " << log);
    CHECK(log.find("pid " + std::to_string(first.pid())) != std::string::npos);
  }

  // The first server keeps working, on the held connection and on new ones.
  held.flush();
  check_all(held, m1, "first server, held connection");
  {
    Nbd again(first.socket(), "c1");
    check_all(again, m1, "first server, new connection");
  }

  // A different container on the second server works, and is then refused by the first.
  Nbd other(second.socket(), "c2");
  auto d2 = random_bytes(f.rng, 5000);
  other.pwrite(d2.data(), d2.size(), 777);
  m2.write(d2.data(), d2.size(), 777);
  other.flush();
  check_all(other, m2, "second server, c2");
  CHECK(Nbd::connect_error(first.socket(), "c2").has_value());
}

TEST_CASE("the server runs daemonized, in the foreground and captive with --run", "[modes]") {
  Fixture f("modes");
  f.pool.clone("base:1", "c1");
  Model model(f.image);
  {
    Server daemon(f.dir, f.pool);
    // nbdkit forked: the serving process is not the one started.
    CHECK(daemon.pid() != daemon.spawned_pid());
    Nbd nbd(daemon.socket(), "c1");
    for (int i = 0; i < 100; ++i) random_op(f.rng, nbd, model);
    nbd.flush();
  }
  {
    Server fg(f.dir, f.pool, foreground());
    CHECK(fg.pid() == fg.spawned_pid());
    Nbd nbd(fg.socket(), "c1");
    check_all(nbd, model, "foreground after daemon");
    for (int i = 0; i < 100; ++i) random_op(f.rng, nbd, model);
    nbd.flush();
  }
  // Captive: the server is a child of nbdkit's --run, which exits with the command.
  require_program("nbdinfo");
  require_program("nbdcopy");
  std::string plugin = require_env("LAYER_PLUGIN");
  auto env = nbdkit_env(f.dir / "captive.sanitizer");
  RunResult size = run_ok({"nbdkit", "-U", "-", "-e", "c1", plugin, "pool=" + f.pool.dir(), "--run",
                           "nbdinfo --size \"$uri\""},
                          env);
  CHECK(size.out == std::to_string(model.size()) + "\n");
  std::string out = f.dir / "copy.img";
  run_ok({"nbdkit", "-U", "-", "-e", "c1", plugin, "pool=" + f.pool.dir(), "--run",
          "nbdcopy \"$uri\" '" + out + "'"},
         env);
  CHECK(first_difference(read_file(out), model.bytes) == "");
  // Captive and read-only, through a URI naming the export.
  RunResult ro = run_ok({"nbdkit", "-r", "-U", "-", plugin, "pool=" + f.pool.dir(), "--run",
                         "nbdinfo \"nbd+unix:///c1?socket=$unixsocket\""},
                        env);
  INFO(ro.describe());
  CHECK(ro.out.find("is_read_only: true") != std::string::npos);
  CHECK(ro.out.find("export-size: " + std::to_string(model.size())) != std::string::npos);
}

// Crash torture: several connections write, zero, trim and flush (some writes FUA) into their own
// regions of one disk, whose edges share blocks (so copy-ups of one connection carry bytes of
// another), and the server is killed at a random moment, again and again. After each restart
// every byte must be what its connection had when its last flush (or FUA) was acknowledged, or
// the value of a request sent after it (the one in flight at the kill included).
// LAYER_TORTURE_ROUNDS sets the number of kills (default 6).
TEST_CASE("crash torture: kill -9 at random moments under load keeps every flushed byte",
          "[torture]") {
  Fixture f("torture");
  f.pool.clone("base:1", "c1");
  const std::string rounds_env = env_or_empty("LAYER_TORTURE_ROUNDS");
  const int rounds = rounds_env.empty() ? 8 : std::stoi(rounds_env);
  // Every other round the server kills itself at a failpoint (lib/failpoint.h) instead of at a
  // random moment: inside the windows a random kill rarely lands in — a batch built but not
  // committed, committed but not answered, a delta synced but its rows not committed, a
  // journal record written but not synced, synced but not folded, a copy-up written but not
  // marked. The Nth pass, N random, so it dies under load.
  struct Point {
    const char* name;
    unsigned max_n;
  };
  constexpr Point kPoints[] = {{"index.commit", 40},   {"index.committed", 40},
                               {"flush.synced", 30},   {"journal.written", 30},
                               {"journal.synced", 30}, {"write.copied_up", 400}};
  int failpoint_rounds = 0, failpoint_kills = 0;
  constexpr int kConns = 4;
  const uint64_t size = f.image.size();
  const uint64_t region = size / kConns;  // not a multiple of the block size: edges share blocks

  struct Op {
    uint64_t offset;
    std::vector<uint8_t> data;  // the bytes it writes (zeroes for zero and trim)
  };
  struct Conn {
    uint64_t from, to;
    std::vector<uint8_t> durable;  // [from, to) as of the last acknowledged flush
    std::vector<uint8_t> now;      // [from, to) after every acknowledged request
    std::vector<Op> pending;       // sent after the last acknowledged flush
    uint64_t ops = 0, flushes = 0;
  };
  std::vector<Conn> conns(kConns);
  for (int t = 0; t < kConns; ++t) {
    Conn& c = conns[t];
    c.from = t * region;
    c.to = t + 1 == kConns ? size : (t + 1) * region;
    c.durable.assign(f.image.begin() + long(c.from), f.image.begin() + long(c.to));
    c.now = c.durable;
  }

  uint64_t total_ops = 0, total_flushes = 0, newer_bytes = 0;
  for (int round = 0; round < rounds; ++round) {
    ServerOptions options = with_threads(16);
    std::string point;
    if (round % 2 == 1) {
      const Point& p = kPoints[(round / 2) % std::size(kPoints)];
      point = std::string(p.name) + "@" + std::to_string(1 + f.rng() % p.max_n);
      options.env.push_back("LAYER_FAILPOINT=" + point);
      ++failpoint_rounds;
    }
    Server server(f.dir, f.pool, options);
    // A server that dies at its failpoint fails requests before this thread knows: every
    // error of such a round is expected (what the disk holds after it is checked below).
    std::atomic<bool> killed{!point.empty()};
    std::vector<std::string> unexpected(kConns);
    std::vector<std::thread> threads;
    for (int t = 0; t < kConns; ++t) {
      threads.emplace_back([&, t, seed = f.rng()] {
        Conn& c = conns[t];
        std::mt19937_64 rng(seed);
        std::unique_ptr<Nbd> nbd;
        try {
          nbd = std::make_unique<Nbd>(server.socket(), "c1");
        } catch (const std::exception& e) {
          if (!killed) unexpected[t] = std::string("connect: ") + e.what();
          return;
        }
        for (;;) {
          const uint64_t span = c.to - c.from;
          const uint64_t off = c.from + rng() % span;
          const uint64_t len =
              std::min<uint64_t>(c.to - off, 1 + rng() % (rng() % 4 ? 9000 : 70000));
          const unsigned pick = unsigned(rng() % 100);
          Op op{off, {}};
          try {
            if (pick < 8) {
              nbd->flush();
              c.durable = c.now;
              c.pending.clear();
              ++c.flushes;
              continue;
            }
            const bool fua = rng() % 8 == 0;
            if (pick < 70) {
              op.data = random_bytes(rng, len);
              c.pending.push_back(op);
              nbd->pwrite(op.data.data(), len, off, fua ? LIBNBD_CMD_FLAG_FUA : 0);
            } else {
              op.data.assign(len, 0);
              c.pending.push_back(op);
              if (pick < 85)
                nbd->zero(len, off, fua ? LIBNBD_CMD_FLAG_FUA : 0);
              else
                nbd->trim(len, off, fua ? LIBNBD_CMD_FLAG_FUA : 0);
            }
            std::copy(op.data.begin(), op.data.end(), c.now.begin() + long(off - c.from));
            if (fua) {  // durable now, whatever else is pending
              std::copy(op.data.begin(), op.data.end(), c.durable.begin() + long(off - c.from));
            }
            ++c.ops;
          } catch (const std::exception& e) {
            if (!killed) unexpected[t] = e.what();
            return;  // the request in flight stays pending: it may or may not have landed
          }
        }
      });
    }
    if (point.empty()) {
      std::this_thread::sleep_for(
          std::chrono::milliseconds(150 + f.rng() % 400));  // a random moment
    } else if (server.wait_exit(std::chrono::seconds(10))) {
      ++failpoint_kills;
    } else {
      std::cerr << "torture: round " << round << ": " << point
                << " was not reached in 10 s; killed at random" << std::endl;
    }
    killed = true;
    server.kill9();
    for (auto& th : threads) th.join();
    for (int t = 0; t < kConns; ++t) {
      INFO("connection " << t);
      REQUIRE(unexpected[t] == "");
    }

    Server again(f.dir, f.pool);
    Nbd nbd(again.socket(), "c1");
    const std::vector<uint8_t> got = nbd.read(size, 0);
    for (int t = 0; t < kConns; ++t) {
      Conn& c = conns[t];
      for (uint64_t i = c.from; i < c.to; ++i) {
        const uint8_t g = got[i];
        if (g == c.durable[i - c.from]) continue;
        bool from_pending = false;
        for (const Op& op : c.pending)
          if (i >= op.offset && i < op.offset + op.data.size() && op.data[i - op.offset] == g)
            from_pending = true;
        if (!from_pending)
          FAIL("round " << round << ", connection " << t << ": byte " << i << " (block "
                        << i / kBlock << ") is " << int(g) << ", flushed value "
                        << int(c.durable[i - c.from])
                        << ", and no request after the flush wrote it");
        ++newer_bytes;
      }
      total_ops += c.ops;
      total_flushes += c.flushes;
      c.ops = c.flushes = 0;
      // What the disk holds now is the baseline of the next round.
      c.durable.assign(got.begin() + long(c.from), got.begin() + long(c.to));
      c.now = c.durable;
      c.pending.clear();
    }
  }
  std::cerr << "torture: " << rounds << " kills (" << failpoint_kills << " of " << failpoint_rounds
            << " at a failpoint), " << total_ops << " requests, " << total_flushes << " flushes, "
            << newer_bytes << " bytes carried unflushed writes across a kill" << std::endl;
  // Most failpoint rounds must die where they aimed, or the test tests less than it says.
  CHECK(failpoint_kills * 2 >= failpoint_rounds);
  RunResult fsck = f.pool.layer({"fsck", "--full"});
  INFO(fsck.describe());
  REQUIRE(fsck.exit_code == 0);
}

int main(int argc, char** argv) {
  require_env("LAYER_BIN");
  require_env("LAYER_PLUGIN");
  require_program("nbdkit");
  // A server dying under a request must fail the test, not kill it.
  signal(SIGPIPE, SIG_IGN);
  watchdog_start();
  become_subreaper();
  int rc = Catch::Session().run(argc, argv);
  if (g_sanitizer_report_seen) {
    std::cerr << "FAIL: nbdkit wrote sanitizer reports (above)" << std::endl;
    if (rc == 0) rc = 1;
  }
  if (g_server_stop_failed) {
    std::cerr << "FAIL: an nbdkit did not exit on SIGTERM (above)" << std::endl;
    if (rc == 0) rc = 1;
  }
  return rc;
}
