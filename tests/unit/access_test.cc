// Unit tests for lib/access.h and lib/audit.h: subjects parsed and canonical, the decision for
// unix and TCP peers under both policies (deny first, read-only grants, TLS off loopback),
// rules changed in the index, the pool's policy stored; the audit trail appended, rotated
// (also when another writer rotated it away) and read back with its filters.
#include "access.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "audit.h"
#include "test_util.h"

using namespace layer;

namespace {

AccessRule rule(const std::string& subject, bool deny = false, bool read_only = false) {
  AccessRule r = MUST(parse_access_subject(subject));
  r.deny = deny;
  r.read_only = read_only;
  return r;
}

Peer unix_peer(uint32_t uid, uint32_t gid, std::vector<uint32_t> groups = {}) {
  Peer p;
  p.kind = Peer::Kind::kUnix;
  p.uid = uid;
  p.gid = gid;
  p.groups = groups.empty() ? std::vector<uint32_t>{gid} : groups;
  return p;
}

Peer tcp_peer(std::vector<uint8_t> addr, bool tls) {
  Peer p;
  p.kind = Peer::Kind::kTcp;
  p.addr = std::move(addr);
  p.tls = tls;
  return p;
}

}  // namespace

TEST_CASE("subjects parse into canonical rules; bad ones are EINVAL", "[access]") {
  CHECK(MUST(parse_access_subject("uid:1000")).id == 1000);
  CHECK(MUST(parse_access_subject("gid:0")).subject == AccessRule::Subject::kGid);
  CHECK(MUST(parse_access_subject("user:root")).id == 0);
  CHECK(MUST(parse_access_subject("group:root")).subject == AccessRule::Subject::kGid);
  auto net = MUST(parse_access_subject("addr:10.1.2.3/8"));
  CHECK(net.addr == "10.0.0.0/8");  // host bits cleared
  CHECK(net.label == "addr:10.0.0.0/8");
  CHECK(MUST(parse_access_subject("addr:192.168.1.7")).addr == "192.168.1.7/32");
  CHECK(MUST(parse_access_subject("addr:fd00::1/8")).addr == "fd00::/8");
  CHECK(MUST(parse_access_subject("addr:::ffff:10.0.0.1")).addr == "10.0.0.1/32");
  for (const char* bad : {"1000", "uid:", "uid:x", "uid:-1", "uid:99999999999", "who:1",
                          "user:no-such-user-here", "group:no-such-group-here", "addr:10.0.0.0/33",
                          "addr:fd00::/129", "addr:not-an-address", "addr:10.0.0.0/x"}) {
    INFO(bad);
    CHECK_ERRNO(parse_access_subject(bad), EINVAL);
  }
  CHECK(describe(rule("user:root", false, true)) == "allow user:root (uid 0), read-only");
  CHECK(describe(rule("addr:10.0.0.0/8", true)) == "deny addr:10.0.0.0/8");
  CHECK(same_subject(rule("uid:0"), rule("user:root")));
  CHECK_FALSE(same_subject(rule("uid:0"), rule("gid:0")));
}

TEST_CASE("the decision: deny first, allows grant, read-only only if all are", "[access]") {
  const Peer alice = unix_peer(1000, 1000, {1000, 34});
  const Peer bob = unix_peer(1001, 1001);
  // No rules: the pool's policy.
  CHECK(decide_access(AccessPolicy::kOpen, {}, alice).allowed);
  CHECK_FALSE(decide_access(AccessPolicy::kOpen, {}, alice).read_only);
  CHECK_FALSE(decide_access(AccessPolicy::kRules, {}, alice).allowed);
  // An allow for alice refuses bob, under either policy.
  const std::vector<AccessRule> rules = {rule("uid:1000")};
  CHECK(decide_access(AccessPolicy::kOpen, rules, alice).allowed);
  auto d = decide_access(AccessPolicy::kOpen, rules, bob);
  CHECK_FALSE(d.allowed);
  CHECK(d.why == "no rule allows it");
  // A supplementary group matches a gid rule; read-only unless a read-write grant matches too.
  CHECK(decide_access(AccessPolicy::kRules, {rule("gid:34", false, true)}, alice).read_only);
  d = decide_access(AccessPolicy::kRules, {rule("gid:34", false, true), rule("uid:1000")}, alice);
  CHECK(d.allowed);
  CHECK_FALSE(d.read_only);
  CHECK_FALSE(decide_access(AccessPolicy::kRules, {rule("gid:34")}, bob).allowed);
  // A deny wins over any allow.
  d = decide_access(AccessPolicy::kOpen, {rule("uid:1000"), rule("gid:34", true)}, alice);
  CHECK_FALSE(d.allowed);
  CHECK(d.why == "refused by rule deny gid:34");
  // Only denies: the policy decides for the rest.
  CHECK(decide_access(AccessPolicy::kOpen, {rule("uid:1000", true)}, bob).allowed);
  CHECK_FALSE(decide_access(AccessPolicy::kRules, {rule("uid:1000", true)}, bob).allowed);
  // An unknown peer gets nothing.
  CHECK_FALSE(decide_access(AccessPolicy::kOpen, {}, Peer{}).allowed);
}

TEST_CASE("TCP peers: rules by address, never by policy, TLS off loopback", "[access]") {
  const Peer local = tcp_peer({127, 0, 0, 1}, false);
  const Peer lan = tcp_peer({10, 1, 2, 3}, false);
  const Peer lan_tls = tcp_peer({10, 1, 2, 3}, true);
  std::vector<uint8_t> v6(16, 0);
  v6[0] = 0xfd;
  v6[15] = 1;
  const Peer lan6 = tcp_peer(v6, true);
  // No rule: refused, even under the open policy.
  CHECK_FALSE(decide_access(AccessPolicy::kOpen, {}, local).allowed);
  const std::vector<AccessRule> rules = {rule("addr:10.0.0.0/8"), rule("addr:127.0.0.1"),
                                         rule("addr:fd00::/8", false, true)};
  CHECK(decide_access(AccessPolicy::kOpen, rules, local).allowed);  // loopback: no TLS needed
  auto d = decide_access(AccessPolicy::kOpen, rules, lan);
  CHECK_FALSE(d.allowed);
  CHECK(d.why == "a client from a non-loopback address needs TLS");
  CHECK(decide_access(AccessPolicy::kOpen, rules, lan_tls).allowed);
  CHECK(decide_access(AccessPolicy::kOpen, rules, lan6).read_only);
  CHECK_FALSE(decide_access(AccessPolicy::kOpen, rules, tcp_peer({11, 0, 0, 1}, true)).allowed);
  // uid rules never match a TCP peer, addr rules never a unix one.
  CHECK_FALSE(decide_access(AccessPolicy::kOpen, {rule("uid:0")}, lan_tls).allowed);
  CHECK_FALSE(
      decide_access(AccessPolicy::kRules, {rule("addr:0.0.0.0/0")}, unix_peer(0, 0)).allowed);
  CHECK(lan_tls.describe() == "tcp peer 10.1.2.3 (TLS)");
  CHECK(local.loopback());
  CHECK_FALSE(lan.loopback());
}

TEST_CASE("rules are changed in the container's row; the policy in meta", "[access]") {
  test::PoolFixture f;
  f.import("base:1", 64 * 1024, 4096, 1);
  MUST(f.pool->clone("base:1", "c", std::nullopt));
  CHECK(MUST(f.pool->inspect("c")).container.access.empty());
  auto rules = MUST(change_access(*f.pool, "c", false, {}, {rule("uid:1"), rule("uid:2", true)}));
  REQUIRE(rules.size() == 2);
  // A rule for the same subject replaces the old one, in place.
  rules = MUST(change_access(*f.pool, "c", false, {}, {rule("uid:1", false, true)}));
  REQUIRE(rules.size() == 2);
  CHECK(rules[0].read_only);
  rules = MUST(change_access(*f.pool, "c", false, {rule("uid:2")}, {}));
  CHECK(rules.size() == 1);
  CHECK_ERRNO(change_access(*f.pool, "c", false, {rule("uid:9")}, {}), EINVAL);
  CHECK_ERRNO(change_access(*f.pool, "nope", false, {}, {rule("uid:9")}), ENOENT);
  f.reopen();
  CHECK(MUST(f.pool->inspect("c")).container.access.size() == 1);
  CHECK(MUST(change_access(*f.pool, "c", true, {}, {})).empty());
  // Snapshots and rollbacks rewrite the row: the rules stay.
  MUST(change_access(*f.pool, "c", false, {}, {rule("gid:5")}));
  MUST(f.pool->clone("base:1", "d", std::nullopt));
  CHECK(MUST(f.pool->inspect("d")).container.access.empty());
  CHECK(MUST(load_access_policy(*f.pool)) == AccessPolicy::kOpen);
  MUST(save_access_policy(*f.pool, AccessPolicy::kRules));
  f.reopen();
  CHECK(MUST(load_access_policy(*f.pool)) == AccessPolicy::kRules);
  CHECK(MUST(parse_access_policy("open")) == AccessPolicy::kOpen);
  CHECK_ERRNO(parse_access_policy("closed"), EINVAL);
}

TEST_CASE("the audit trail appends, rotates and reads back with filters", "[audit]") {
  test::TempDir tmp;
  const std::string dir = tmp.sub("log");
  {
    AuditLog log(dir, 600, 2);  // rotates every few lines
    for (int i = 0; i < 20; ++i)
      MUST(log.append({{"event", "open"},
                       {"container", i % 2 ? "a" : "b"},
                       {"n", i},
                       {"pad", std::string(100, 'x')}}));
  }
  CHECK(std::filesystem::exists(dir + "/access.log"));
  CHECK(std::filesystem::exists(dir + "/access.log.1"));
  CHECK(std::filesystem::exists(dir + "/access.log.2"));
  CHECK_FALSE(std::filesystem::exists(dir + "/access.log.3"));  // keep = 2
  CHECK(std::filesystem::file_size(dir + "/access.log") <= 600 + 200);
  auto all = MUST(read_audit(dir, "", 0));
  REQUIRE_FALSE(all.empty());
  // Oldest first, the newest last; the oldest rotated away.
  for (size_t i = 1; i < all.size(); ++i) CHECK(all[i]["n"] > all[i - 1]["n"]);
  CHECK(all.back()["n"] == 19);
  CHECK(all.front()["n"] > 0);
  for (const auto& e : MUST(read_audit(dir, "a", 0))) CHECK(e["container"] == "a");
  CHECK(MUST(read_audit(dir, "", 4e9)).empty());  // nothing since the far future
  // A damaged line is skipped and counted.
  std::ofstream(dir + "/access.log", std::ios::app) << "{not json\n";
  size_t bad = 0;
  MUST(read_audit(dir, "", 0, &bad));
  CHECK(bad == 1);
  CHECK(MUST(read_audit(tmp.sub("nothing-here"), "", 0)).empty());
}

TEST_CASE("audit lines without the documented shape are skipped and counted", "[audit]") {
  // fuzz_text found the first: a time no uint64_t holds, which `layer audit` cast to whole
  // seconds (undefined behaviour); a "container" that is not a string threw out of read_audit
  // when filtering by container.
  test::TempDir tmp;
  const std::string good =
      R"({"time":1700000000.5,"event":"open","container":"a","peer":{"kind":"unix","uid":0}})";
  const char* bad_lines[] = {
      R"({"time":1.7e29,"container":"a"})",
      R"({"time":-5,"container":"a"})",
      R"({"time":"1700000000","container":"a"})",
      R"({"time":1700000000,"container":5})",
      R"({"time":1700000000,"container":"a","event":["open"]})",
      R"({"time":1700000000,"container":"a","tls":"no"})",
      R"({"time":1700000000,"container":"a","read_bytes":-1})",
      R"({"time":1700000000,"container":"a","peer":"unix"})",
      R"({"time":1700000000,"container":"a","peer":{"uid":"root"}})",
      R"([1700000000])",
  };
  {
    std::ofstream out(tmp.path() + "/access.log");
    out << good << '\n';
    for (const char* l : bad_lines) out << l << '\n';
  }
  for (const std::string container : {"", "a"}) {
    size_t bad = 0;
    auto lines = MUST(read_audit(tmp.path(), container, 0, &bad));
    REQUIRE(lines.size() == 1);
    CHECK(lines[0]["event"] == "open");
    CHECK(bad == std::size(bad_lines));
  }
}

TEST_CASE("two writers of one trail: neither loses lines when the other rotates", "[audit]") {
  test::TempDir tmp;
  const std::string dir = tmp.sub("log");
  AuditLog a(dir, 4096, 8), b(dir, 4096, 8);
  std::thread ta([&] {
    for (int i = 0; i < 200; ++i) MUST(a.append({{"event", "open"}, {"w", "a"}, {"n", i}}));
  });
  std::thread tb([&] {
    for (int i = 0; i < 200; ++i) MUST(b.append({{"event", "open"}, {"w", "b"}, {"n", i}}));
  });
  ta.join();
  tb.join();
  size_t bad = 0;
  auto all = MUST(read_audit(dir, "", 0, &bad));
  CHECK(bad == 0);  // no interleaved lines
  // With 8 files of 4 KiB kept, the last lines of both writers are all there, in order.
  int last_a = -1, last_b = -1;
  for (const auto& e : all) {
    int& last = e["w"] == "a" ? last_a : last_b;
    CHECK(e["n"].get<int>() > last);
    last = e["n"].get<int>();
  }
  CHECK(last_a == 199);
  CHECK(last_b == 199);
}

TEST_CASE("appends from many threads are all kept and share their syncs", "[audit]") {
  test::TempDir tmp;
  const std::string dir = tmp.sub("log");
  constexpr int kThreads = 8, kLines = 100;
  AuditLog log(dir, 16 << 10, 64);  // a few rotations on the way, none lost
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      // Half the writers do not wait for the sync (refusals): their lines are kept all the same.
      for (int i = 0; i < kLines; ++i)
        MUST(log.append({{"event", "open"}, {"t", t}, {"n", i}}, t % 2 == 0));
    });
  for (auto& th : threads) th.join();
  CHECK(std::filesystem::exists(dir + "/access.log.1"));
  size_t bad = 0;
  auto all = MUST(read_audit(dir, "", 0, &bad));
  CHECK(bad == 0);
  REQUIRE(all.size() == size_t{kThreads} * kLines);
  std::vector<int> last(kThreads, -1);
  for (const auto& e : all) {
    const int t = e["t"].get<int>(), n = e["n"].get<int>();
    CHECK(n == last[t] + 1);  // each thread's lines in its order
    last[t] = n;
  }
  // Every append returned after a sync that covered it: at least one, at most one per line
  // plus one per rotation (the file let go of is synced).
  CHECK(log.syncs() >= 1);
  CHECK(log.syncs() <= size_t{kThreads} * kLines + 64);
}
