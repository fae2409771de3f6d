// Unit tests for lib/verify.h through Disk: with Pool::verify_reads, a read touching a damaged
// 64 KiB group of a frozen layer fails with EIO naming the layer and offset, every other group
// is served, a copy-up that would read the damage fails too, and without the option the damage
// is served silently (what verify=on is for).
#include <fcntl.h>
#include <unistd.h>

#include "disk_test_util.h"

using namespace layer;
using namespace disktest;

namespace {

std::string base_path(Pool& pool) {
  const LayerId id = test::image_top_layer(pool, "base:1");
  auto txn = MUST(pool.index().begin_read());
  auto l = MUST(txn.get(Db::kLayers, key_u64(id)));
  return pool.layer_path(MUST(decode_layer(*l, id)));
}

}  // namespace

TEST_CASE("verify_reads: a damaged group fails with EIO, the rest is served") {
  // 64 blocks of 4 KiB: groups 0..3 of 64 KiB (16 blocks each).
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  REQUIRE_FALSE(d.model.must_be_hole[4]);
  test::flip_bits(base_path(pool), 4 * 4096 + 7, 0x80);  // group 0
  d.f.reopen();
  d.f.pool->set_verify_reads(true);
  auto disk = d.open();
  std::vector<uint8_t> buf(4096);
  auto r = disk->read(buf.data(), 4096, 4 * 4096);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code == EIO);
  CHECK(r.error().message.find("checksum mismatch at offset 0") != std::string::npos);
  // Any block of group 0 that the base holds fails; so does a copy-up of one.
  CHECK(disk->read(buf.data(), 4096, 0).error().code == EIO);
  CHECK(disk->write(buf.data(), 100, 3 * 4096 + 5, false).error().code == EIO);
  // Groups 1..3 are served and match the image.
  for (uint64_t b = 16; b < 64; ++b) check_read(*disk, d.model, b * 4096, 4096);
  // A whole-block write over the damage replaces it in the delta: it reads back.
  do_write(*disk, d.model, 4 * 4096, std::vector<uint8_t>(4096, 0x42));
  check_read(*disk, d.model, 4 * 4096, 4096);
}

TEST_CASE("without verify_reads the damage is served") {
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  test::flip_bits(base_path(pool), 4 * 4096 + 7, 0x80);
  auto disk = d.open();
  std::vector<uint8_t> buf(4096);
  REQUIRE_OK(disk->read(buf.data(), 4096, 4 * 4096));
  CHECK(buf[7] != d.model.bytes[4 * 4096 + 7]);
}

TEST_CASE("verify_reads verifies each group once per process") {
  DiskFixture d(64 * 4096, 64 * 4096);
  d.f.pool->set_verify_reads(true);
  auto disk = d.open();
  check_disk(*disk, d.model);
  check_disk(*disk, d.model);
  const LayerId id = test::image_top_layer(*d.f.pool, "base:1");
  auto txn = MUST(d.f.pool->index().begin_read());
  auto row = MUST(txn.get(Db::kLayers, key_u64(id)));
  auto verifier = d.f.pool->verifiers().get(d.f.pool->index(), MUST(decode_layer(*row, id)));
  CHECK(verifier->groups_verified() == 4);
}
