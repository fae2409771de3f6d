// fuzz_access.cc — libFuzzer target: who may open a container (access.h) and the audit trail
// of who did (audit.h): access subjects (`layer access`: uid:N, gid:N, user:NAME, group:NAME,
// addr:CIDR) and policies (`layer pool set --access`), the decision on rules and a peer built
// from the input, and the audit file as `layer audit` reads it. Apart from fuzz_text because
// these are slower (user and group lookups, a file per input) and would starve its parsers.
//
// Input: one selector byte (modulo kAccessModes picks the mode), then the text or the bytes
// the mode reads. Properties:
// - subjects: uid/gid take exactly the decimal numbers a u32 holds; an addr rule is canonical
//   (host bits clear, prefix within the address) and parses to itself; refusals are EINVAL;
// - policies: "open" and "rules" only, printed back as given;
// - decisions, against a matcher written here bit by bit: no TCP peer off loopback without TLS;
//   a matching deny refuses; a matching allow grants, read-only only when every matching allow
//   is; allows that do not match refuse; no rules: only a unix peer under the open policy;
// - audit: read_audit throws nothing, returns no more lines than the file has, and each line it
//   returns has the documented shape and passes the filters.
#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "access.h"
#include "audit.h"
#include "fuzz_inputs.h"
#include "fuzz_util.h"

using namespace layer;
using fuzz::check_refusal;
using fuzz::printable;

namespace {

using u128 = unsigned __int128;

// uid:N, gid:N (N a u32 in decimal), user:NAME, group:NAME, addr:CIDR. An addr rule is kept
// canonical ("10.0.0.0/8": host bits cleared), so parsing its own text gives it back.
void access_subjects(std::string_view text) {
  const auto r = parse_access_subject(text);
  check_refusal(r, text, "parse_access_subject");
  const size_t colon = text.find(':');
  const std::string_view kind = text.substr(0, colon);
  if (colon == std::string_view::npos ||
      (kind != "uid" && kind != "gid" && kind != "user" && kind != "group" && kind != "addr")) {
    FUZZ_CHECK(!r.ok(), "parse_access_subject took " + printable(text));
    return;
  }
  const std::string_view value = text.substr(colon + 1);
  if (kind == "uid" || kind == "gid") {
    u128 n = 0;
    bool digits = !value.empty();
    for (char c : value) {
      digits = digits && c >= '0' && c <= '9';
      if (digits) n = std::min<u128>(n * 10 + static_cast<u128>(c - '0'), u128{1} << 64);
    }
    const bool want = digits && n <= UINT32_MAX;
    FUZZ_CHECK(r.ok() == want, "parse_access_subject " + printable(text));
    if (r.ok()) {
      FUZZ_CHECK(r->id == n && r->label == text, "parse_access_subject " + printable(text));
      FUZZ_CHECK((r->subject == AccessRule::Subject::kUid) == (kind == "uid"), "uid or gid");
    }
    return;
  }
  if (!r.ok()) return;
  (void)describe(*r);
  if (kind != "addr") return;
  FUZZ_CHECK(r->subject == AccessRule::Subject::kAddr && r->label == "addr:" + r->addr,
             "addr subject " + printable(text) + " -> " + r->label);
  const auto again = parse_access_subject(r->label);
  FUZZ_CHECK(again.ok() && again->addr == r->addr && same_subject(*r, *again),
             "the canonical " + printable(r->label) + " does not parse to itself");
  // Canonical: a network address, then a prefix no longer than it, no host bits.
  const size_t slash = r->addr.find('/');
  FUZZ_CHECK(slash != std::string::npos, "no prefix in " + r->addr);
  uint8_t net[16];
  const std::string host = r->addr.substr(0, slash);
  const bool v4 = ::inet_pton(AF_INET, host.c_str(), net) == 1;
  FUZZ_CHECK(v4 || ::inet_pton(AF_INET6, host.c_str(), net) == 1, "not an address: " + r->addr);
  const unsigned bits = v4 ? 32 : 128,
                 prefix = static_cast<unsigned>(std::stoul(r->addr.substr(slash + 1)));
  FUZZ_CHECK(prefix <= bits, "prefix past the address: " + r->addr);
  for (unsigned b = prefix; b < bits; ++b)
    FUZZ_CHECK((net[b / 8] >> (7 - b % 8) & 1) == 0, "host bits set in " + r->addr);
}

void access_policies(std::string_view text) {
  const auto r = parse_access_policy(text);
  check_refusal(r, text, "parse_access_policy");
  FUZZ_CHECK(r.ok() == (text == "open" || text == "rules"),
             "parse_access_policy " + printable(text));
  if (r.ok()) FUZZ_CHECK(to_string(*r) == text, "to_string(parse_access_policy(...))");
}

// Whether `rule` matches `peer`, as access.h states it, written out bit by bit.
bool reference_match(const AccessRule& rule, const Peer& peer) {
  if (rule.subject == AccessRule::Subject::kUid)
    return peer.kind == Peer::Kind::kUnix && peer.uid == rule.id;
  if (rule.subject == AccessRule::Subject::kGid)
    return peer.kind == Peer::Kind::kUnix &&
           (peer.gid == rule.id ||
            std::find(peer.groups.begin(), peer.groups.end(), rule.id) != peer.groups.end());
  if (peer.kind != Peer::Kind::kTcp) return false;
  const size_t slash = rule.addr.find('/');
  const std::string host = rule.addr.substr(0, slash);
  uint8_t net[16];
  size_t bytes = 0;
  if (::inet_pton(AF_INET, host.c_str(), net) == 1)
    bytes = 4;
  else if (::inet_pton(AF_INET6, host.c_str(), net) == 1)
    bytes = 16;
  if (bytes == 0 || bytes != peer.addr.size()) return false;
  const unsigned prefix = static_cast<unsigned>(std::stoul(rule.addr.substr(slash + 1)));
  for (unsigned b = 0; b < prefix; ++b)
    if ((net[b / 8] >> (7 - b % 8) & 1) != (peer.addr[b / 8] >> (7 - b % 8) & 1)) return false;
  return true;
}

// A peer and rules built from the input, and what access.h promises of the decision.
void access_decisions(fuzz::FuzzInput& in) {
  Peer peer;
  peer.kind = static_cast<Peer::Kind>(in.u8() % 3);
  const uint8_t has = in.u8();
  if (has & 1) peer.uid = in.u8() % 4;
  if (has & 2) peer.gid = in.u8() % 4;
  for (int i = in.u8() % 3; i > 0; --i) peer.groups.push_back(in.u8() % 4);
  peer.addr.resize(in.u8() & 1 ? 16 : 4);
  for (auto& b : peer.addr) b = in.u8() & 0x81;  // few values, so that rules match
  if (peer.addr.size() == 16 && (has & 4)) peer.addr.assign(15, 0), peer.addr.push_back(1);
  if (peer.addr.size() == 4 && (has & 4)) peer.addr[0] = 127;
  peer.tls = (has & 8) != 0;
  const auto policy = (has & 16) ? AccessPolicy::kRules : AccessPolicy::kOpen;
  std::vector<AccessRule> rules;
  for (int n = in.u8() % 5; n > 0; --n) {
    const uint8_t how = in.u8();
    std::string subject;
    switch (how % 3) {
      case 0:
        subject = fmt::format("uid:{}", in.u8() % 4);
        break;
      case 1:
        subject = fmt::format("gid:{}", in.u8() % 4);
        break;
      default: {
        const bool v6 = how & 4;
        uint8_t a[16] = {};
        for (size_t i = 0; i < (v6 ? 16u : 4u); ++i) a[i] = in.u8() & 0x81;
        char text[INET6_ADDRSTRLEN] = {};
        ::inet_ntop(v6 ? AF_INET6 : AF_INET, a, text, sizeof text);
        subject = fmt::format("addr:{}/{}", text, in.u8() % (v6 ? 129 : 33));
      }
    }
    auto rule = parse_access_subject(subject);
    FUZZ_CHECK(rule.ok(), "parse_access_subject " + subject + ": " + rule.error().message);
    rule->deny = how & 8;
    rule->read_only = how & 16;
    rules.push_back(*rule);
  }
  const AccessDecision d = decide_access(policy, rules, peer);
  const std::string what = peer.describe() + " (" + std::string(d.why) + ")";
  FUZZ_CHECK(!d.why.empty(), "a decision without a reason");
  std::vector<uint8_t> v6_loopback(16, 0);
  v6_loopback[15] = 1;
  const bool loopback = peer.addr.size() == 4 ? peer.addr[0] == 127 : peer.addr == v6_loopback;
  if (peer.kind == Peer::Kind::kTcp && !peer.tls && !loopback) {
    FUZZ_CHECK(!d.allowed, "a TCP peer off loopback without TLS was allowed: " + what);
    return;
  }
  bool deny = false, any_allow = false, allow = false, allow_rw = false;
  for (const auto& r : rules) {
    const bool m = reference_match(r, peer);
    if (r.deny) {
      deny = deny || m;
    } else {
      any_allow = true;
      allow = allow || m;
      allow_rw = allow_rw || (m && !r.read_only);
    }
  }
  if (deny) {
    FUZZ_CHECK(!d.allowed, "a peer a deny rule matches was allowed: " + what);
  } else if (allow) {
    FUZZ_CHECK(d.allowed, "a peer an allow rule matches was refused: " + what);
    FUZZ_CHECK(d.read_only == !allow_rw, "read-only is not 'every matching allow is': " + what);
  } else if (any_allow) {
    FUZZ_CHECK(!d.allowed, "a peer no allow rule matches was allowed: " + what);
  } else {
    const bool want = peer.kind == Peer::Kind::kUnix && policy == AccessPolicy::kOpen;
    FUZZ_CHECK(d.allowed == want && !d.read_only, "without rules: " + what);
  }
}

// The audit trail as `layer audit` reads it: the input is the file, filtered by a container
// and a time. What read_audit returns has the shape audit.h documents (so the CLI can print
// it), is what the filters ask for, and is no more than the file's non-empty lines.
void audit_logs(fuzz::FuzzInput& in) {
  static const std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/layer-fuzz-audit-XXXXXX";
    FUZZ_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp " + pattern);
    return pattern;
  }();
  struct Remove {
    ~Remove() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  };
  static Remove remove_at_exit;
  const uint8_t how = in.u8();
  const std::string container = how & 1 ? "web1" : "";
  const double since = how & 2 ? 1700000000.0 : 0;
  const std::string_view text = in.rest();
  {
    std::ofstream out(dir + "/access.log", std::ios::binary | std::ios::trunc);
    out << text;
  }
  size_t lines = 0;
  for (size_t start = 0; start < text.size();) {
    const size_t end = std::min(text.find('\n', start), text.size());
    if (end > start) ++lines;
    start = end + 1;
  }
  size_t bad = 0;
  Result<std::vector<nlohmann::ordered_json>> r = std::vector<nlohmann::ordered_json>{};
  try {
    r = read_audit(dir, container, since, &bad);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("read_audit threw (no exception crosses lib/): ") + e.what());
  }
  FUZZ_CHECK(r.ok(), "read_audit: " + r.error().message);
  FUZZ_CHECK(r->size() + bad <= lines, "more lines read than the file holds");
  for (const auto& l : *r) {
    const std::string shown =
        l.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
    FUZZ_CHECK(l.is_object() && l.contains("time") && l["time"].is_number(), "no time: " + shown);
    const double t = l["time"].get<double>();
    // The CLI prints the time as whole seconds since 1970 (a uint64_t).
    FUZZ_CHECK(std::isfinite(t) && t >= since && t < 18446744073709551616.0,
               "time out of range: " + shown);
    for (const char* key : {"event", "export", "container", "why"})
      FUZZ_CHECK(!l.contains(key) || l[key].is_string(), std::string(key) + ": " + shown);
    for (const char* key : {"tls", "read_only"})
      FUZZ_CHECK(!l.contains(key) || l[key].is_boolean(), std::string(key) + ": " + shown);
    for (const char* key : {"read_bytes", "written_bytes"})
      FUZZ_CHECK(!l.contains(key) || l[key].is_number_unsigned(), std::string(key) + ": " + shown);
    if (l.contains("peer")) {
      const auto& p = l["peer"];
      FUZZ_CHECK(p.is_object(), "peer: " + shown);
      FUZZ_CHECK(!p.contains("kind") || p["kind"].is_string(), "peer kind: " + shown);
      FUZZ_CHECK(!p.contains("addr") || p["addr"].is_string(), "peer addr: " + shown);
      for (const char* key : {"uid", "gid", "pid"})
        FUZZ_CHECK(!p.contains(key) || p[key].is_number_integer(),
                   std::string("peer ") + key + ": " + shown);
    }
    if (!container.empty())
      FUZZ_CHECK(l.contains("container") && l["container"] == container, "filter: " + shown);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  switch (static_cast<fuzz::AccessMode>(in.u8() % fuzz::kAccessModes)) {
    case fuzz::kAccessSubject:
      access_subjects(in.rest());
      break;
    case fuzz::kAccessPolicy:
      access_policies(in.rest());
      break;
    case fuzz::kAccessDecision:
      access_decisions(in);
      break;
    case fuzz::kAuditLog:
      audit_logs(in);
      break;
    case fuzz::kAccessModes:
      std::abort();
  }
  return 0;
}
