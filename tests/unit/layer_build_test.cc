// Unit tests for lib/layer_build.h: a layer built under an intent is invisible until published,
// rolled back (rows, intent, its own file) when dropped or failed, left alone by fsck --repair
// while it runs, and refused publication once fsck rolled it back.
#include "layer_build.h"

#include "block_map.h"
#include "fsck.h"
#include "intents.h"
#include "test_util.h"

using namespace layer;
using test::PoolFixture;

namespace {

size_t merge_intents(Pool& pool) { return MUST(intents(pool, IntentRecord::Kind::kMerge)).size(); }

void put_row(Pool& pool, LayerId id) {
  MUST(pool.committer().run([&](WriteTxn& txn) {
    return txn.put(Db::kMaps, key_u64_u32(id, 0), encode_chunk(ChunkBits(BlockState::kData)));
  }));
}

}  // namespace

TEST_CASE("a LayerBuild dropped before publishing leaves nothing behind", "[layer_build]") {
  PoolFixture f;
  LayerId id = 0;
  {
    auto build = MUST(LayerBuild::begin(*f.pool, IntentRecord::Kind::kMerge, "1+2"));
    id = build->id();
    CHECK(merge_intents(*f.pool) == 1);
    MUST(build->create_file(Tier::kSsd, 1 << 20));
    put_row(*f.pool, id);
    CHECK(MUST(f.pool->store(Tier::kSsd).stat(id)).has_value());
  }
  CHECK(merge_intents(*f.pool) == 0);
  CHECK_FALSE(MUST(f.pool->store(Tier::kSsd).stat(id)).has_value());
  auto r = MUST(fsck(*f.pool, false, false));
  CHECK(r.problems.empty());
  CHECK(r.map_rows == 0);
}

TEST_CASE("a published LayerBuild stays; fail() rolls back", "[layer_build]") {
  PoolFixture f;
  auto build = MUST(LayerBuild::begin(*f.pool, IntentRecord::Kind::kMerge, "x"));
  const LayerId id = build->id();
  MUST(build->create_file(Tier::kSsd, 4096));
  put_row(*f.pool, id);
  MUST(build->publish([&](WriteTxn& txn) {
    LayerRecord l{id, 0, Tier::kSsd, 4096, 4096, LayerState::kFrozenUnhashed, 1, now_unix()};
    return txn.put(Db::kLayers, key_u64(id), encode(l));
  }));
  CHECK(merge_intents(*f.pool) == 0);
  build.reset();  // nothing to roll back any more
  CHECK(MUST(f.pool->store(Tier::kSsd).stat(id)).has_value());

  auto other = MUST(LayerBuild::begin(*f.pool, IntentRecord::Kind::kMerge, "y"));
  MUST(other->create_file(Tier::kSsd, 4096));
  Error e = other->fail(Error{ENOSPC, "full"});
  CHECK(e.code == ENOSPC);
  CHECK(merge_intents(*f.pool) == 0);
  CHECK_FALSE(MUST(f.pool->store(Tier::kSsd).stat(other->id())).has_value());
}

TEST_CASE("fsck --repair leaves a running LayerBuild alone; one it rolled back cannot publish",
          "[layer_build]") {
  PoolFixture f;
  auto build = MUST(LayerBuild::begin(*f.pool, IntentRecord::Kind::kMerge, "1+2"));
  MUST(build->create_file(Tier::kSsd, 4096));
  put_row(*f.pool, build->id());
  // Running: locked, so not "interrupted".
  auto r = MUST(fsck(*f.pool, false, true));
  CHECK(r.repaired.empty());
  CHECK(merge_intents(*f.pool) == 1);
  // The intent gone (as if a repair rolled back a build whose process died): publish refuses.
  MUST(f.pool->committer().run([&](WriteTxn& txn) -> Status {
    auto all = MUST(intents(*f.pool, IntentRecord::Kind::kMerge));
    for (const auto& [id, intent] : all) LAYER_TRY(txn.del(Db::kIntents, key_u64(id)));
    return {};
  }));
  auto s = build->publish([](WriteTxn&) -> Status { return {}; });
  CHECK(s.error().code == EIO);
  CHECK_FALSE(MUST(f.pool->store(Tier::kSsd).stat(build->id())).has_value());
}
