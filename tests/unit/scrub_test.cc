// Unit tests for lib/scrub.h: a clean pool verifies, a flipped byte is found at its group's
// offset with the containers and images it affects, layers without checksums are skipped with
// the reason, a missing file is an error of that layer only, and unknown ids are ENOENT.
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>

#include "disk_test_util.h"
#include "scrub.h"
#include "snapshots.h"

using namespace layer;
using namespace disktest;

namespace {

const ScrubLayer& entry(const ScrubReport& r, LayerId id) {
  for (const auto& l : r.layers)
    if (l.layer.id == id) return l;
  FAIL("layer " << id << " not in the scrub report");
  throw;
}

}  // namespace

TEST_CASE("scrub verifies every checksummed group and finds a flipped byte") {
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  const LayerId base = test::image_top_layer(pool, "base:1");
  auto clean = MUST(scrub(pool, {}, {}));
  CHECK(clean.clean());
  CHECK(clean.layers.size() == 2);  // the image layer and c's delta
  CHECK(entry(clean, base).groups == 4);
  CHECK(entry(clean, base).bytes == 64 * 4096);
  CHECK(entry(clean, base).skipped.empty());
  CHECK(entry(clean, base).users == std::vector<std::string>{"c", "base:1"});

  // Block 4 holds data (the patterned image's blocks 0, 3 and 4 of each 6); offset 4*4096+10
  // lies in group 0.
  REQUIRE_FALSE(d.model.must_be_hole[4]);
  test::flip_bits(pool.layer_path(entry(clean, base).layer), 4 * 4096 + 10, 0x01);
  auto r = MUST(scrub(pool, {base}, {}));
  REQUIRE(r.layers.size() == 1);
  const ScrubLayer& l = r.layers[0];
  CHECK_FALSE(r.clean());
  REQUIRE(l.mismatches.size() == 1);
  CHECK(l.mismatches[0].offset == 0);
  CHECK(l.mismatches[0].want != l.mismatches[0].got);
  CHECK(l.groups == 4);  // the other groups were still verified
  CHECK(l.users == std::vector<std::string>{"c", "base:1"});
}

TEST_CASE("scrub skips layers without checksums and reports a missing file as that layer's") {
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  {
    auto disk = d.open();
    do_write(*disk, d.model, 0, std::vector<uint8_t>(4096, 7), true);
  }
  MUST(snapshot_container(pool, "c", "s1"));  // frozen-unhashed until hashed
  d.f.import("other:1", 32 * 4096, 4096, 9);
  const LayerId other = test::image_top_layer(pool, "other:1");
  const LayerId base = test::image_top_layer(pool, "base:1");
  auto txn = MUST(pool.index().begin_read());
  const auto c = MUST(pool.get_container(txn, "c"));
  const LayerId snap = MUST(get_snapshot(txn, c, "s1")).layer;
  const std::string other_path = pool.layer_path(MUST(get_layer(txn, other)));
  std::filesystem::remove(other_path);

  auto r = MUST(scrub(pool, {}, {}));
  CHECK(entry(r, c.delta_layer).skipped.find("writable") != std::string::npos);
  CHECK(entry(r, snap).skipped.find("not checksummed") != std::string::npos);
  CHECK(entry(r, snap).users == std::vector<std::string>{"c", "c@s1"});
  REQUIRE(entry(r, other).errors.size() == 1);
  CHECK(entry(r, other).errors[0].find(other_path) != std::string::npos);
  CHECK_FALSE(entry(r, base).bad());
  CHECK(entry(r, base).groups == 4);
  CHECK_FALSE(r.clean());

  CHECK(scrub(pool, {base, 4242}, {}).error().code == ENOENT);
}

TEST_CASE("a stopped scrub says so and verifies no more") {
  DiskFixture d(256 * 4096, 256 * 4096);
  StopSignal stop;
  stop.request_stop();
  ScrubOptions options;
  options.stop = &stop;
  auto r = MUST(scrub(*d.f.pool, {}, options));
  CHECK(r.stopped);
  CHECK(r.groups == 0);
}
