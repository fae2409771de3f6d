// Unit tests for lib/heat.h and lib/tier.h: heat counted by real disks and written to the
// `heat` db, decay with an injected clock, the policy's demotion after cold_after, promotion on
// heat, hysteresis, a shared base's heat summed over its users, high-water demotion order, and
// one policy pass moving real layers (data checked, fsck clean).
#include <limits.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "disk_test_util.h"
#include "forecast.h"
#include "fsck.h"
#include "heat.h"
#include "layers.h"
#include "mover.h"
#include "stats.h"
#include "tier.h"

using namespace layer;
using namespace disktest;

namespace {

constexpr uint64_t kT0 = 1'800'000'000;  // the injected clock's start (unix s)

HeatRecord heat_of(Pool& pool, LayerId id) {
  auto txn = MUST(pool.index().begin_read());
  auto v = MUST(txn.get(Db::kHeat, key_u64(id)));
  if (!v) return HeatRecord{};
  return MUST(decode_heat(*v, id));
}

LayerId delta_of(Pool& pool, const std::string& name) {
  auto txn = MUST(pool.index().begin_read());
  return MUST(pool.get_container(txn, name)).delta_layer;
}

PolicyLayer layer_at(LayerId id, Tier tier, double heat, uint64_t last_active,
                     uint64_t bytes = 1 << 20) {
  PolicyLayer l;
  l.id = id;
  l.tier = tier;
  l.heat = heat;
  l.last_active = last_active;
  l.disk_bytes = bytes;
  return l;
}

TierPolicy test_policy() {
  TierPolicy p;
  p.cold_after_s = 600;
  p.cold_rate = 0.1;
  p.hot_rate = 2.0;
  p.half_life_s = 60;
  return p;
}

Tier tier_of(Pool& pool, LayerId id) {
  auto txn = MUST(pool.index().begin_read());
  return MUST(get_layer(txn, id)).tier;
}

const LayerTierStatus& status_of(const TierStatus& st, LayerId id) {
  for (const auto& l : st.layers)
    if (l.layer.id == id) return l;
  FAIL("layer " << id << " not in tier status");
  throw;
}

}  // namespace

TEST_CASE("heat and policy records round-trip and refuse corruption") {
  HeatRecord h;
  h.read_ops = 7;
  h.read_bytes = 7 << 12;
  h.write_ops = 3;
  h.write_bytes = 3 << 12;
  h.last_access_unix = kT0;
  h.read_rate = 0.125;
  h.write_rate = 2.5;
  h.read_bps = 512.0;
  h.write_bps = 1e6;
  h.rate_unix = kT0;
  h.moved_unix = kT0 - 5;
  const std::string bytes = encode(h);
  const HeatRecord back = MUST(decode_heat(bytes, 1));
  CHECK(back.read_ops == 7);
  CHECK(back.write_bytes == (3 << 12));
  CHECK(back.read_rate == 0.125);
  CHECK(back.write_bps == 1e6);
  CHECK(back.moved_unix == kT0 - 5);
  CHECK(decode_heat(bytes.substr(0, bytes.size() - 1), 1).error().code == EIO);
  CHECK(decode_heat(bytes + "x", 1).error().code == EIO);

  TierPolicy p = test_policy();
  p.high_water = TierPolicy::HighWater::kPercent;
  p.high_water_value = 80;
  p.move_rate = 5 << 20;
  const TierPolicy pb = MUST(decode_tier_policy(encode(p)));
  CHECK(pb.cold_after_s == 600);
  CHECK(pb.hot_rate == 2.0);
  CHECK(pb.high_water == TierPolicy::HighWater::kPercent);
  CHECK(pb.high_water_value == 80);
  CHECK(pb.move_rate == 5 << 20);
  std::string bad = encode(p);
  bad[bad.size() - 17] = 7;  // the high-water kind
  CHECK(decode_tier_policy(bad).error().code == EIO);
  // A record written before move_rate was added (its last field) reads with the default.
  const std::string old = encode(p).substr(0, encode(p).size() - 8);
  const TierPolicy po = MUST(decode_tier_policy(old));
  CHECK(po.high_water_value == 80);
  CHECK(po.move_rate == TierPolicy::kDefaultMoveRate);
  CHECK(decode_tier_policy(old.substr(0, old.size() - 1)).error().code == EIO);
  CHECK(decode_tier_policy(encode(p) + "x").error().code == EIO);
}

TEST_CASE("durations parse and print") {
  CHECK(MUST(parse_duration("90")) == 90);
  CHECK(MUST(parse_duration("90s")) == 90);
  CHECK(MUST(parse_duration("10m")) == 600);
  CHECK(MUST(parse_duration("2h")) == 7200);
  CHECK(MUST(parse_duration("7d")) == 7 * 86400);
  for (const char* bad : {"", "m", "-5m", "5x", "1.5h", "5 m", "9999999999999d"})
    CHECK(parse_duration(bad).error().code == EINVAL);
  CHECK(format_duration(600) == "10m");
  CHECK(format_duration(90) == "90s");
  CHECK(format_duration(7200) == "2h");
  CHECK(format_duration(0) == "0s");
}

TEST_CASE("a policy whose hot rate is not above its cold rate is refused") {
  TierPolicy p = test_policy();
  p.hot_rate = p.cold_rate;
  CHECK(validate_tier_policy(p).error().code == EINVAL);
  p.hot_rate = 1;
  p.high_water = TierPolicy::HighWater::kPercent;
  p.high_water_value = 101;
  CHECK(validate_tier_policy(p).error().code == EINVAL);
  p.high_water_value = 90;
  CHECK(validate_tier_policy(p).ok());
}

TEST_CASE("decayed rates: a steady rate converges to itself, an idle one halves each half-life") {
  HeatRecord r;
  // 10 ops/s for 20 half-lives, flushed every 5 s.
  const uint64_t half_life = 60;
  uint64_t t = kT0;
  for (int i = 0; i < 240; ++i) {
    t += 5;
    add_counts(r, HeatCounts{50, 50 * 4096, 0, 0}, t, half_life);
  }
  CHECK(std::abs(r.read_rate - 10.0) < 0.5);
  CHECK(std::abs(r.read_bps - 10.0 * 4096) < 0.5 * 4096);
  CHECK(r.read_ops == 240 * 50);
  CHECK(r.last_access_unix == t);
  const HeatRecord later = decayed(r, t + half_life, half_life);
  CHECK(std::abs(later.read_rate - r.read_rate / 2) < 1e-9);
  CHECK(decayed(r, t + 10 * half_life, half_life).read_rate < 0.02);
  CHECK(later.last_access_unix == t);  // decay is not an access
}

TEST_CASE("the policy demotes a layer only after cold_after without access, and when cold") {
  const TierPolicy p = test_policy();
  const uint64_t now = kT0;
  const std::vector<PolicyLayer> layers{
      layer_at(1, Tier::kSsd, 0.0, now - 599),      // idle just under cold_after
      layer_at(2, Tier::kSsd, 0.0, now - 600),      // idle cold_after: cold
      layer_at(3, Tier::kSsd, 0.5, now - 3600),     // idle long, but still read above cold_rate
      layer_at(4, Tier::kSsd, 0.0, now - 9999, 0),  // nothing on disk: never moves
  };
  const Plan plan = plan_moves(p, layers, now, SsdSpace{});
  REQUIRE(plan.verdicts.size() == 4);
  CHECK_FALSE(plan.verdicts[0].to);
  REQUIRE(plan.verdicts[1].to);
  CHECK(*plan.verdicts[1].to == Tier::kHdd);
  CHECK_FALSE(plan.verdicts[2].to);
  CHECK_FALSE(plan.verdicts[3].to);
  CHECK(plan.order == std::vector<size_t>{1});
  CHECK(plan.verdicts[1].reason.find("cold") != std::string::npos);
}

TEST_CASE("the policy promotes on heat, with hysteresis between the cold and hot rates") {
  const TierPolicy p = test_policy();  // cold 0.1, hot 2
  const uint64_t now = kT0;
  const std::vector<PolicyLayer> layers{
      layer_at(1, Tier::kHdd, 2.0, now),          // hot: promote
      layer_at(2, Tier::kHdd, 1.0, now),          // warm on hdd: stays
      layer_at(3, Tier::kSsd, 1.0, now - 86400),  // warm on ssd, idle long: stays too
      layer_at(4, Tier::kHdd, 50.0, now, 0),      // hot but nothing on disk
  };
  const Plan plan = plan_moves(p, layers, now, SsdSpace{});
  REQUIRE(plan.verdicts[0].to);
  CHECK(*plan.verdicts[0].to == Tier::kSsd);
  CHECK_FALSE(plan.verdicts[1].to);
  CHECK_FALSE(plan.verdicts[2].to);
  CHECK_FALSE(plan.verdicts[3].to);
}

TEST_CASE("a promoted layer whose heat fades is not demoted before cold_after has passed") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 3);
  const LayerId base = test::image_top_layer(*f.pool, "base:1");
  TierPolicy p = test_policy();
  MUST(save_tier_policy(*f.pool, p));
  MUST(move_layer(*f.pool, base, Tier::kHdd));
  // Hot at kT0: 600 reads in 5 s → well above 2 ops/s.
  {
    auto counter = f.pool->heat().counter(base);
    for (int i = 0; i < 600; ++i) counter->add_read(4096);
  }
  MUST(persist_heat(*f.pool, kT0));
  auto run = MUST(run_tier_policy(*f.pool, kT0, false));
  REQUIRE(run.moved.size() == 1);
  CHECK(run.moved[0].to == Tier::kSsd);
  MUST(note_moved(*f.pool, base, kT0));  // the pass noted the real clock; use the injected one
  // Ten half-lives later the heat is gone, but cold_after (600 s) has not passed since the move.
  auto st = MUST(tier_status(*f.pool, kT0 + 599));
  CHECK(status_of(st, base).heat.read_rate < p.cold_rate);
  CHECK_FALSE(status_of(st, base).verdict.to);
  st = MUST(tier_status(*f.pool, kT0 + 600));
  REQUIRE(status_of(st, base).verdict.to);
  CHECK(*status_of(st, base).verdict.to == Tier::kHdd);
}

TEST_CASE("above the ssd high-water mark the coldest layers are demoted first") {
  TierPolicy p = test_policy();
  p.high_water = TierPolicy::HighWater::kBytes;
  p.high_water_value = 3 << 20;
  const uint64_t now = kT0;
  const std::vector<PolicyLayer> layers{
      layer_at(1, Tier::kSsd, 1.5, now),       // warm
      layer_at(2, Tier::kSsd, 0.5, now - 10),  // cooler
      layer_at(3, Tier::kSsd, 0.5, now - 20),  // as cool, idle longer: the coldest
      layer_at(4, Tier::kSsd, 1.9, now),       // warmest
      layer_at(5, Tier::kHdd, 3.0, now),       // hot on hdd: no room for it
  };
  const Plan plan = plan_moves(p, layers, now, SsdSpace{4 << 20, 3 << 20});
  // 4 MiB on ssd, mark 3 MiB: one 1 MiB layer goes, the coldest (3).
  REQUIRE(plan.order.size() == 1);
  CHECK(plan.verdicts[plan.order[0]].id == 3);
  CHECK(plan.verdicts[2].reason.find("high-water") != std::string::npos);
  CHECK_FALSE(plan.verdicts[4].to);
  CHECK(plan.verdicts[4].reason.find("no room") != std::string::npos);
  CHECK(plan.space_after.used == 3 << 20);

  // 6 MiB on ssd: three go, coldest first (3, 2, 1); the hot one on hdd still has no room.
  const Plan more = plan_moves(p, layers, now, SsdSpace{6 << 20, 3 << 20});
  std::vector<LayerId> order;
  for (size_t i : more.order) order.push_back(more.verdicts[i].id);
  CHECK(order == std::vector<LayerId>{3, 2, 1});
  CHECK_FALSE(more.verdicts[4].to);

  // With room (a 6 MiB mark): nothing is demoted and the hot layer comes back.
  const Plan room = plan_moves(p, layers, now, SsdSpace{4 << 20, 6 << 20});
  REQUIRE(room.order.size() == 1);
  CHECK(room.verdicts[room.order[0]].id == 5);
  CHECK(*room.verdicts[4].to == Tier::kSsd);
}

TEST_CASE("pre-promotion: a layer predicted hot is promoted early and not demoted as cold") {
  TierPolicy p = test_policy();  // cold 0.1, hot 2, cold after 600 s
  p.prewarm_s = 1800;
  const uint64_t now = kT0;
  auto with_prediction = [](PolicyLayer l, double predicted) {
    l.predicted = predicted;
    return l;
  };
  const std::vector<PolicyLayer> layers{
      with_prediction(layer_at(1, Tier::kHdd, 0.0, now - 86400), 3.0),  // cold now, busy soon
      with_prediction(layer_at(2, Tier::kHdd, 0.0, now - 86400), 1.0),  // predicted warm only
      with_prediction(layer_at(3, Tier::kSsd, 0.0, now - 86400), 2.0),  // idle, but busy soon
      with_prediction(layer_at(4, Tier::kSsd, 0.0, now - 86400), 1.9),  // idle, quiet ahead
      with_prediction(layer_at(5, Tier::kSsd, 0.0, now - 10), 0.0),     // hysteresis: recent
  };
  const Plan plan = plan_moves(p, layers, now, SsdSpace{});
  REQUIRE(plan.verdicts[0].to);
  CHECK(*plan.verdicts[0].to == Tier::kSsd);
  CHECK(plan.verdicts[0].reason.find("predicted hot within 30m") != std::string::npos);
  CHECK_FALSE(plan.verdicts[1].to);
  CHECK_FALSE(plan.verdicts[2].to);
  CHECK(plan.verdicts[2].reason.find("predicted hot") != std::string::npos);
  REQUIRE(plan.verdicts[3].to);
  CHECK(*plan.verdicts[3].to == Tier::kHdd);
  CHECK_FALSE(plan.verdicts[4].to);

  // The high-water mark still rules: a predicted-hot layer waits for room, and it ranks by the
  // higher of heat and prediction (layer 3, predicted hot, is not the coldest on ssd).
  std::vector<PolicyLayer> full = layers;
  full[3].predicted = 0.5;
  const Plan tight = plan_moves(p, full, now, SsdSpace{3 << 20, 2 << 20});
  CHECK_FALSE(tight.verdicts[0].to);
  CHECK(tight.verdicts[0].reason.find("no room") != std::string::npos);
  std::vector<LayerId> demoted;
  for (size_t i : tight.order) demoted.push_back(tight.verdicts[i].id);
  CHECK(demoted == std::vector<LayerId>{4});  // cold; then used 2 MiB, at the mark
  full[3].heat = 0.2;                         // not cold: the mark takes the coldest instead
  const Plan ranked = plan_moves(p, full, now, SsdSpace{3 << 20, 2 << 20});
  demoted.clear();
  for (size_t i : ranked.order) demoted.push_back(ranked.verdicts[i].id);
  CHECK(demoted == std::vector<LayerId>{5});  // heat 0, predicted 0: colder than 3 and 4
}

TEST_CASE("tier status predicts a layer's heat from its users' history before the hot hour") {
  PoolFixture f;
  f.import("base:1", 64 * 4096, 4096, 3);
  MUST(f.pool->clone("base:1", "web", std::nullopt));
  MUST(f.pool->clone("base:1", "idle", std::nullopt));
  const LayerId base = test::image_top_layer(*f.pool, "base:1");
  const LayerId web_delta = delta_of(*f.pool, "web");
  MUST(move_layer(*f.pool, base, Tier::kHdd));
  uint64_t web = 0;
  {
    auto txn = MUST(f.pool->index().begin_read());
    web = MUST(f.pool->get_container(txn, "web")).id;
  }
  // Five days of history: "web" busy from 09:00 to 17:00 UTC (a minute of 3600 reads each
  // half hour: 2 ops/s over the hour), nothing else.
  const uint64_t day0 = kT0 / 86400 * 86400 - 5 * 86400;
  StatsTable table;
  auto counters = table.acquire(web, "web");
  for (int d = 0; d < 5; ++d)
    for (int h = 9; h < 17; ++h)
      for (int half = 0; half < 2; ++half) {
        for (int i = 0; i < 3600; ++i) counters->record(IoOp::kRead, 4096, 1000);
        MUST(persist_stats(*f.pool, table, (day0 + d * 86400 + h * 3600) / 60 + half * 30));
      }
  TierPolicy p = test_policy();  // hot at 2 ops/s
  MUST(save_tier_policy(*f.pool, p));
  const uint64_t early = day0 + 5 * 86400 + 8 * 3600 + 20 * 60;  // 08:20, the sixth day
  // Without prewarm: nothing predicted, the base stays on hdd.
  auto st = MUST(tier_status(*f.pool, early));
  CHECK(status_of(st, base).predicted == 0);
  CHECK_FALSE(status_of(st, base).verdict.to);
  // With a 30-minute lead the 09:00 hour is not in reach yet; with 45 minutes it is.
  p.prewarm_s = 1800;
  MUST(save_tier_policy(*f.pool, p));
  st = MUST(tier_status(*f.pool, early));
  CHECK(status_of(st, base).predicted == 0);
  p.prewarm_s = 2700;
  MUST(save_tier_policy(*f.pool, p));
  st = MUST(tier_status(*f.pool, early));
  CHECK(std::abs(status_of(st, base).predicted - 2.0) < 1e-9);
  CHECK(std::abs(status_of(st, web_delta).predicted - 2.0) < 1e-9);
  CHECK(status_of(st, delta_of(*f.pool, "idle")).predicted == 0);
  REQUIRE(status_of(st, base).verdict.to);
  CHECK(*status_of(st, base).verdict.to == Tier::kSsd);
  CHECK(status_of(st, base).verdict.reason.find("predicted hot") != std::string::npos);
  // The pass moves it before 09:00.
  auto run = MUST(run_tier_policy(*f.pool, early, false));
  CHECK(run.failed.empty());
  CHECK(tier_of(*f.pool, base) == Tier::kSsd);
}

TEST_CASE("disks count heat per layer and a shared base sums the heat of its users") {
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  MUST(pool.clone("base:1", "c2", std::nullopt));
  MUST(save_tier_policy(pool, test_policy()));
  const LayerId base = test::image_top_layer(pool, "base:1");
  MUST(move_layer(pool, base, Tier::kHdd));
  auto c1 = d.open("c");
  auto c2 = d.open("c2");
  // Each container alone reads the base at 1.5 ops/s over 60 s (below the 2 ops/s hot rate);
  // together at 3 ops/s.
  // Blocks the image holds data in (holes read as zeroes without touching a layer).
  std::vector<uint64_t> data_blocks;
  for (uint64_t b = 0; b < d.model.blocks(); ++b)
    if (!d.model.must_be_hole[b]) data_blocks.push_back(b);
  REQUIRE(data_blocks.size() > 8);
  std::vector<uint8_t> buf(4096);
  for (size_t i = 0; i < 90; ++i) {
    const uint64_t off = data_blocks[i % data_blocks.size()] * 4096;
    REQUIRE_OK(c1->read(buf.data(), 4096, off));
    REQUIRE_OK(c2->read(buf.data(), 4096, off));
  }
  // Writes land in each container's own delta.
  do_write(*c1, d.model, data_blocks[0] * 4096, std::vector<uint8_t>(8192, 0x5a));
  MUST(persist_heat(pool, kT0));
  const HeatRecord h = heat_of(pool, base);
  CHECK(h.read_ops == 180);
  CHECK(h.read_bytes == 180 * 4096);
  CHECK(h.write_ops == 0);
  CHECK(h.last_access_unix == kT0);
  const HeatRecord dh = heat_of(pool, delta_of(pool, "c"));
  CHECK(dh.write_ops == 1);
  CHECK(dh.write_bytes == 8192);
  CHECK(heat_of(pool, delta_of(pool, "c2")).write_ops == 0);
  // Nothing more counted: no transaction, the rows stay.
  MUST(persist_heat(pool, kT0 + 5));
  CHECK(heat_of(pool, base).rate_unix == kT0);

  // The counts of one flush spread over tau = half-life / ln 2: 180 ops → 180 ln2 / 60 ≈ 2.08
  // ops/s, above the hot rate; either container's 90 alone would be 1.04.
  const auto st = MUST(tier_status(pool, kT0));
  const auto& b = status_of(st, base);
  CHECK(std::abs(b.heat.read_rate - 180 * std::log(2.0) / 60) < 1e-6);
  REQUIRE(b.verdict.to);
  CHECK(*b.verdict.to == Tier::kSsd);
  CHECK(b.users == std::vector<std::string>{"c", "c2", "base:1"});
  CHECK(b.layer.tier == Tier::kHdd);
}

TEST_CASE("heat of a dropped layer is not written, and a row goes with its layer") {
  PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 5);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  const LayerId delta = delta_of(*f.pool, "c");
  {
    auto disk = MUST(Disk::open(*f.pool, "c", true));
    std::vector<uint8_t> data(4096, 1);
    REQUIRE_OK(disk->write(data.data(), data.size(), 0, true));
  }
  MUST(persist_heat(*f.pool, kT0));
  CHECK(heat_of(*f.pool, delta).write_ops == 1);
  MUST(f.pool->remove_container("c"));
  {
    auto txn = MUST(f.pool->index().begin_read());
    CHECK_FALSE(MUST(txn.get(Db::kHeat, key_u64(delta))));
  }
  // Counts for a layer that no longer exists are dropped, not written as a new row.
  f.pool->heat().counter(delta)->add_write(4096);
  MUST(persist_heat(*f.pool, kT0 + 5));
  auto txn = MUST(f.pool->index().begin_read());
  CHECK_FALSE(MUST(txn.get(Db::kHeat, key_u64(delta))));
}

TEST_CASE("a policy pass demotes cold layers and promotes hot ones; the data stays intact") {
  DiskFixture d(128 * 4096, 128 * 4096);
  Pool& pool = *d.f.pool;
  MUST(save_tier_policy(pool, test_policy()));
  const LayerId base = test::image_top_layer(pool, "base:1");
  const LayerId delta = delta_of(pool, "c");
  {
    auto disk = d.open();
    do_write(*disk, d.model, 4096 * 3, std::vector<uint8_t>(3 * 4096, 0x77));
    REQUIRE_OK(disk->flush());
  }
  // An hour on, nothing was read: the base and the delta (not served) go to hdd.
  const uint64_t now = now_unix() + 3600;
  auto dry = MUST(run_tier_policy(pool, now, true));
  CHECK(dry.status.order.size() == 2);
  CHECK(dry.moved.empty());
  CHECK(tier_of(pool, base) == Tier::kSsd);
  auto run = MUST(run_tier_policy(pool, now, false));
  CHECK(run.failed.empty());
  REQUIRE(run.moved.size() == 2);
  CHECK(tier_of(pool, base) == Tier::kHdd);
  CHECK(tier_of(pool, delta) == Tier::kHdd);
  {
    // Every block read four times, one block per request: the base gets an op for each of
    // its data blocks (about half of 125: 4 x 60 ln2 / 60 ≈ 2.8 ops/s, hot), the delta 12
    // (not hot).
    auto disk = d.open();
    for (int round = 0; round < 4; ++round)
      for (uint64_t b = 0; b < 128; ++b) check_read(*disk, d.model, b * 4096, 4096);
  }
  MUST(persist_heat(pool, now + 10));
  run = MUST(run_tier_policy(pool, now + 10, false));
  CHECK(run.failed.empty());
  CHECK(tier_of(pool, base) == Tier::kSsd);
  CHECK(tier_of(pool, delta) == Tier::kHdd);
  auto disk = d.open();
  check_disk(*disk, d.model);
  auto r = MUST(fsck(pool, true, false));
  for (const auto& p : r.problems) UNSCOPED_INFO(p);
  CHECK(r.problems.empty());
}

TEST_CASE("fsck reports heat rows without a layer, corrupt heat rows and a corrupt policy") {
  PoolFixture f;
  f.import("base:1", 16 * 4096, 4096, 5);
  const LayerId base = test::image_top_layer(*f.pool, "base:1");
  auto problems = [&] {
    auto r = MUST(fsck(*f.pool, false, false));
    std::string all;
    for (const auto& p : r.problems) all += p + "\n";
    return all;
  };
  CHECK(problems().empty());
  MUST(f.pool->committer().run([&](WriteTxn& txn) -> Status {
    LAYER_TRY(txn.put(Db::kHeat, key_u64(999), encode(HeatRecord{})));
    LAYER_TRY(txn.put(Db::kHeat, key_u64(base), "\x01short"));
    return txn.put(Db::kSums, key_u64_u32(998, 0), encode_sums({1}));
  }));
  const std::string found = problems();
  CHECK(found.find("heat: row of unknown layer 999") != std::string::npos);
  CHECK(found.find(fmt::format("heat {}: corrupt record", base)) != std::string::npos);
  CHECK(found.find("sums: rows of unknown layer 998") != std::string::npos);
  MUST(f.pool->committer().run(
      [&](WriteTxn& txn) -> Status { return txn.put(Db::kMeta, "tier.policy", "\x01"); }));
  CHECK(problems().find("tier.policy: corrupt record") != std::string::npos);
}

TEST_CASE(
    "after a move there and back, a reloaded disk opens the current file, not a shared "
    "handle to a removed one") {
  DiskFixture d(64 * 4096, 64 * 4096);
  Pool& pool = *d.f.pool;
  const LayerId base = test::image_top_layer(pool, "base:1");
  DiskTable table(pool);
  auto disk = MUST(table.acquire("c", true));
  check_disk(*disk, d.model);
  auto held_first = MUST(pool.open_frozen(MUST([&]() -> Result<LayerRecord> {
    auto txn = MUST(pool.index().begin_read());
    return get_layer(txn, base);
  }())));  // something else of the process keeps the ssd file open (an old view, say)
  for (Tier to : {Tier::kHdd, Tier::kSsd}) {
    MUST(move_layer(pool, base, to));
    MUST(table.reload_moved(base));
  }
  // The disk reads the current ssd file: once the handle held above (to the removed first
  // file) is let go, no descriptor of the process names a removed layer file.
  check_disk(*disk, d.model);
  held_first.reset();
  char link[PATH_MAX];
  int deleted = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    const ssize_t n = ::readlink(e.path().c_str(), link, sizeof link - 1);
    if (n <= 0) continue;
    const std::string target(link, static_cast<size_t>(n));
    if (target.find(".layer (deleted)") != std::string::npos) ++deleted;
  }
  CHECK(deleted == 0);
  MUST(table.release(std::move(disk)));
}
