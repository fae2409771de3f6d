// fuzz_seeds.cc — writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/)
// with the real encoders, so that a seed is what the code writes today; --check compares the
// committed files with what it would write (ctest fuzz.seeds), so a format change that leaves
// the seeds stale fails. Files there that it does not make (inputs kept from crashes) are left
// alone.
//
// Usage: fuzz_seeds DIR            write DIR/<target>/<seed> (DIR: tests/fuzz/corpus)
//        fuzz_seeds --check DIR    exit 1 naming each seed that is missing or differs
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "block_map.h"
#include "control.h"
#include "error.h"
#include "fuzz_inputs.h"
#include "index.h"
#include "records.h"

using namespace layer;
using nlohmann::json;

namespace {

using Seeds = std::map<std::string, std::string>;  // "target/name" -> bytes

std::string with(uint8_t selector, std::string_view bytes) {
  return std::string(1, static_cast<char>(selector)) + std::string(bytes);
}

void records(Seeds& s) {
  LayerRecord layer;
  layer.id = 42;
  layer.parent = 7;
  layer.size_bytes = 10ULL << 30;
  layer.block_size = 4096;
  layer.state = LayerState::kWritable;
  layer.refcount = 1;
  layer.created_unix = 1700000000;
  s["records/layer-writable"] = with(fuzz::kLayer, encode(layer));
  layer.tier = Tier::kHdd;
  layer.state = LayerState::kFrozen;
  layer.parent = 0;
  layer.refcount = 3;
  s["records/layer-frozen-hdd"] = with(fuzz::kLayer, encode(layer));
  s["records/layer-wrong-id"] = with(fuzz::kLayer | 0x80, encode(layer));

  ImageRecord image;
  image.ref = "debian:12.1";
  image.top_layer = 42;
  image.size_bytes = 2ULL << 30;
  image.block_size = 4096;
  image.created_unix = 1700000000;
  image.description = "Debian 12 cloud image";
  s["records/image"] = with(fuzz::kImage, encode(image));

  ContainerRecord container;
  container.name = "web1";
  container.id = 3;
  container.image_ref = "debian:12.1";
  container.delta_layer = 43;
  container.size_bytes = 2ULL << 30;
  container.block_size = 4096;
  container.created_unix = 1700000001;
  container.generation = 2;
  s["records/container"] = with(fuzz::kContainer, encode(container));
  // The first layout of the row: no access rules (their count, 4 bytes, at the end).
  const std::string bare = encode(container);
  s["records/container-first-layout"] = with(fuzz::kContainer, bare.substr(0, bare.size() - 4));
  container.labels = {{"env", "prod"}, {"owner", "ops"}};
  s["records/container-labels"] = with(fuzz::kContainer, encode(container));
  AccessRule allow_uid;
  allow_uid.subject = AccessRule::Subject::kUid;
  allow_uid.id = 1000;
  allow_uid.read_only = true;
  allow_uid.label = "user:alice";
  AccessRule deny_net;
  deny_net.subject = AccessRule::Subject::kAddr;
  deny_net.addr = "10.0.0.0/8";
  deny_net.deny = true;
  deny_net.label = "addr:10.0.0.0/8";
  container.access = {allow_uid, deny_net};
  s["records/container-access"] = with(fuzz::kContainer, encode(container));

  SnapshotRecord snapshot;
  snapshot.name = "before-upgrade";
  snapshot.container_id = 3;
  snapshot.layer = 44;
  snapshot.created_unix = 1700000002;
  s["records/snapshot"] = with(fuzz::kSnapshot, encode(snapshot));

  IntentRecord intent;
  intent.kind = IntentRecord::Kind::kImport;
  intent.layer = 45;
  intent.target = "alpine:3.19";
  intent.created_unix = 1700000003;
  s["records/intent-import"] = with(fuzz::kIntent, encode(intent));
  intent.kind = IntentRecord::Kind::kMerge;
  intent.target = "44+46";
  s["records/intent-merge"] = with(fuzz::kIntent, encode(intent));
  intent.kind = IntentRecord::Kind::kMove;
  intent.target = "hdd";
  s["records/intent-move"] = with(fuzz::kIntent, encode(intent));

  HeatRecord heat;
  heat.read_ops = 1000;
  heat.read_bytes = 4096000;
  heat.write_ops = 10;
  heat.write_bytes = 40960;
  heat.last_access_unix = 1700000004;
  heat.read_rate = 2.5;
  heat.write_rate = 0.01;
  heat.read_bps = 10240.0;
  heat.write_bps = 40.96;
  heat.rate_unix = 1700000004;
  heat.moved_unix = 1699990000;
  s["records/heat"] = with(fuzz::kHeat, encode(heat));

  TierPolicy policy;
  s["records/tier-policy-default"] = with(fuzz::kTierPolicy, encode(policy));
  // The first layout: no move_rate (8 bytes at the end).
  const std::string first = encode(policy);
  s["records/tier-policy-first-layout"] =
      with(fuzz::kTierPolicy, first.substr(0, first.size() - 8));
  policy.high_water = TierPolicy::HighWater::kPercent;
  policy.high_water_value = 80;
  policy.cold_after_s = 3600;
  policy.move_rate = 0;
  s["records/tier-policy-percent"] = with(fuzz::kTierPolicy, encode(policy));

  s["records/sums-empty"] = with(fuzz::kSums, encode_sums({}));
  std::vector<uint64_t> sums(kSumsPerRow);
  for (size_t i = 0; i < sums.size(); ++i) sums[i] = i % 3 == 0 ? 0 : 0x9e3779b97f4a7c15ULL * i;
  s["records/sums-full"] = with(fuzz::kSums, encode_sums(sums));

  StaleRecord stale;
  stale.container_id = 3;
  stale.container = "web1";
  stale.delta = 43;
  stale.blocks = 17;
  stale.restored_unix = 1700000005;
  stale.backup = "index-20231114T221320Z-t812-server.mdb";
  s["records/stale"] = with(fuzz::kStale, encode(stale));
  RestoreRecord restore;
  restore.backup = stale.backup;
  restore.backup_txnid = 812;
  restore.restored_unix = 1700000005;
  restore.first_unknown_layer = 46;
  s["records/restore"] = with(fuzz::kRestore, encode(restore));

  s["records/maprow-uniform"] = with(fuzz::kMapRow, encode_chunk(ChunkBits(BlockState::kData)));
  ChunkBits bits;
  for (uint32_t i = 0; i < kBlocksPerChunk; ++i) bits.set(i, static_cast<BlockState>(i % 3));
  s["records/maprow-mixed"] = with(fuzz::kMapRow, encode_chunk(bits));
}

void keys(Seeds& s) {
  s["keys/key-u64"] = key_u64(42);
  s["keys/key-u64-u32"] = key_u64_u32(42, 7);
  // Two (id, n) pairs, as fuzz_keys reads them, then a snapshot name.
  s["keys/pairs-and-name"] =
      key_u64(3) + key_u64(4) + key_u64(1) + key_u64(0xffffffff) + "before-upgrade";
}

void text(Seeds& s) {
  using fuzz::TextMode;
  const std::pair<const char*, std::pair<TextMode, std::string>> seeds[] = {
      {"name", {fuzz::kName, "web-1"}},
      {"image-ref", {fuzz::kImageRef, "debian:12.1"}},
      {"snapshot-ref", {fuzz::kSnapshotRef, "web1@before-upgrade"}},
      {"export-name", {fuzz::kExportName, "web1@monday..tuesday"}},
      {"size", {fuzz::kSize, "10GiB"}},
      {"size-sectors", {fuzz::kSize, "1048576"}},
      {"duration", {fuzz::kDuration, "10m"}},
      {"duration-bare", {fuzz::kDuration, "90"}},
      {"format-duration", {fuzz::kFormatDuration, key_u64(7200)}},
      {"tier", {fuzz::kTier, "hdd"}},
      {"errno", {fuzz::kErrno, key_u64(EBUSY) + "ENOTSUP"}},
      {"holder-note", {fuzz::kHolderNote, "pid 1234"}},
  };
  for (const auto& [name, seed] : seeds)
    s[std::string("text/") + name] = with(seed.first, seed.second);
}

void access(Seeds& s) {
  const std::pair<const char*, std::pair<fuzz::AccessMode, std::string>> seeds[] = {
      {"access-uid", {fuzz::kAccessSubject, "uid:1000"}},
      {"access-user", {fuzz::kAccessSubject, "user:root"}},
      {"access-addr4", {fuzz::kAccessSubject, "addr:10.1.2.3/8"}},
      {"access-addr6", {fuzz::kAccessSubject, "addr:fd00::1/8"}},
      {"access-policy", {fuzz::kAccessPolicy, "rules"}},
      // fuzz_access's access_decisions reads these bytes: a TCP peer 1.0.0.1 with TLS (only the
      // values 0, 1, 0x80, 0x81 make its bytes), an allow rule addr:1.0.0.0/8 read-only (0x32)
      // and a deny rule uid:1 (0x18).
      {"access-decision",
       {fuzz::kAccessDecision,
        std::string("\x02\x08\x00\x00\x01\x00\x00\x01\x02\x32\x01\x00\x00\x00\x08"
                    "\x18\x01",
                    17)}},
  };
  for (const auto& [name, seed] : seeds)
    s[std::string("access/") + name] = with(seed.first, seed.second);
  // Audit lines as AuditLog::append writes them (audit.h), at a fixed time; the byte after the
  // selector: bit 0 filters container "web1", bit 1 lines since 1700000000.
  nlohmann::ordered_json open, refuse, close;
  open["time"] = 1700000000.25;
  open["event"] = "open";
  open["export"] = "web1";
  open["container"] = "web1";
  open["pid"] = 4242;
  open["peer"] = {{"kind", "unix"}, {"uid", 1000}, {"gid", 1000}, {"pid", 77}};
  open["tls"] = false;
  open["read_only"] = false;
  open["why"] = "allowed by rule allow uid:1000";
  refuse = open;
  refuse["event"] = "refuse";
  refuse["peer"] = {{"kind", "tcp"}, {"addr", "10.1.2.3"}};
  refuse["why"] = "a client from a non-loopback address needs TLS";
  close = open;
  close["event"] = "close";
  close["read_bytes"] = 4096;
  close["written_bytes"] = 0;
  close["seconds"] = 1.5;
  std::string trail;
  for (const auto& l : {open, refuse, close}) trail += l.dump() + "\n";
  s["access/audit-log"] = with(fuzz::kAuditLog, std::string(1, '\x03') + trail);
}

std::string line(const json& j) { return j.dump() + "\n"; }

void control(Seeds& s) {
  const std::string server(1, static_cast<char>(fuzz::kControlServer));
  const std::string client(1, static_cast<char>(fuzz::kControlClient));
  // The byte after the selector: even, no padding; odd, about kMaxRequestBytes of it.
  s["control/server-request"] =
      server + '\0' + line({{"op", "snapshot"}, {"container", "web1"}, {"name", "s1"}});
  s["control/server-not-json"] = server + '\0' + "{\"op\":\n";
  s["control/server-throws"] = server + '\0' + line({{"op", "merge"}, {"throw", true}});
  s["control/server-padded-fits"] = server + '\x01' + line({{"op", "merge"}});
  s["control/server-padded-too-long"] =
      server + '\x81' + line({{"op", "merge"}, {"container", "web1"}});
  s["control/client-error"] = client + line(control_error(Error{EBUSY, "container web1 is busy"}));
  s["control/client-removed"] =
      client + line({{"ok", true}, {"layer", 44}, {"layer_fate", "merged"}, {"merged_into", 47}});
}

// The requests the CLI sends (docs/cli-spec.md), on fuzz_control_ops's pool.
void control_ops(Seeds& s) {
  const std::pair<const char*, json> seeds[] = {
      {"snapshot", {{"op", "snapshot"}, {"container", "c0"}, {"name", "s1"}}},
      {"rollback", {{"op", "rollback"}, {"container", "c0"}, {"name", "s0"}, {"keep_as", "k"}}},
      {"commit",
       {{"op", "commit"}, {"container", "c0"}, {"image", "base:2"}, {"description", "d"}}},
      {"flatten", {{"op", "flatten"}, {"container", "c1"}}},
      {"snapshot-rm", {{"op", "snapshot-rm"}, {"container", "c0"}, {"name", "s0"}}},
      {"merge", {{"op", "merge"}, {"container", "c0"}}},
      {"move", {{"op", "move"}, {"layer", 1}, {"tier", "hdd"}}},
      {"move-delta", {{"op", "move"}, {"layer", 3}, {"tier", "hdd"}, {"container", "c0"}}},
      {"moved", {{"op", "moved"}, {"layer", 1}}},
  };
  for (const auto& [name, request] : seeds) s[std::string("control_ops/") + name] = request.dump();
  // A built request (any first byte but '{'; fuzz_control_ops.cc's request_from): op "move"
  // (choice 1, value 6), container "c0" (1, 0), four keys absent, layer 3 (3, 3), tier "hdd"
  // (1, 1).
  s["control_ops/built-move"] =
      std::string("B\x01\x06\x01\x00\x00\x00\x00\x00\x03\x03\x01\x01", 13);
}

// Specs of `layer apply` (docs/apply.md): the documented shapes and a few near misses.
void apply(Seeds& s) {
  s["apply/minimal"] = R"({"version":1})";
  s["apply/full"] =
      R"({"version":1,"name":"web","images":[{"ref":"busybox:1","file":"busybox.img",)"
      R"("block_size":"4K","description":"rootfs"}],"containers":[{"name":"web1",)"
      R"("image":"busybox:1","size":"128M","resources":{"cpu":2,"memory":"1G",)"
      R"("net":"100M","iops":2000,"bandwidth":"50M","priority":7},"labels":)"
      R"({"role":"web","team/owner":"ops"},"snapshots":["base"]}]})";
  s["apply/count"] = R"({"version":1,"containers":[{"name":"worker-{i}","count":3,"start":0,)"
                     R"("image":"busybox:1","resources":{"cpu":0.5,"iops":"none"}}]})";
  s["apply/duplicate-name"] = R"({"version":1,"containers":[{"name":"a-2","image":"b:1"},)"
                              R"({"name":"a-{i}","count":2,"image":"b:1"}]})";
  s["apply/duplicate-key"] = R"({"version":1,"containers":[],"containers":[]})";
  s["apply/bad-type"] = R"({"version":1,"containers":[{"name":"a","image":"b:1","size":true}]})";
}

std::optional<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  const bool check = argc == 3 && std::strcmp(argv[1], "--check") == 0;
  if (argc != 2 && !check) {
    std::fprintf(stderr, "usage: fuzz_seeds [--check] DIR\n");
    return 2;
  }
  const std::filesystem::path dir = argv[argc - 1];
  Seeds seeds;
  records(seeds);
  keys(seeds);
  text(seeds);
  access(seeds);
  control(seeds);
  control_ops(seeds);
  apply(seeds);
  int bad = 0;
  for (const auto& [name, bytes] : seeds) {
    const auto path = dir / name;
    if (check) {
      const auto have = read_file(path);
      if (have != bytes) {
        std::fprintf(stderr, "fuzz_seeds: %s %s (fuzz_seeds %s rewrites it)\n", path.c_str(),
                     have ? "differs from what the encoders write today" : "is missing",
                     dir.c_str());
        ++bad;
      }
      continue;
    }
    std::filesystem::create_directories(path.parent_path());
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
    if (!out.flush()) {
      std::fprintf(stderr, "fuzz_seeds: cannot write %s\n", path.c_str());
      return 1;
    }
  }
  if (check && bad == 0)
    std::printf("fuzz_seeds: %zu seeds as the encoders write them\n", seeds.size());
  if (!check) std::printf("fuzz_seeds: wrote %zu seeds under %s\n", seeds.size(), dir.c_str());
  return bad == 0 ? 0 : 1;
}
