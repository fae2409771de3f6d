// access.cc — access rules, the pool's access policy and the server's decision (access.h).
#include "access.h"

#include <arpa/inet.h>
#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <fmt/format.h>
#include <algorithm>
#include <charconv>

#include "pool.h"

namespace layer {
namespace {

constexpr std::string_view kMetaAccess = "pool.access";

// A name-service buffer size for the *_r lookups.
size_t nss_buffer_bytes() {
  const long n = ::sysconf(_SC_GETPW_R_SIZE_MAX);
  return n > 0 ? static_cast<size_t>(n) : 16384;
}

std::optional<uint32_t> parse_u32(std::string_view text) {
  uint32_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return v;
}

// "10.0.0.0/8" -> (network bytes with host bits cleared, prefix); no "/": a host.
Result<std::pair<std::vector<uint8_t>, uint32_t>> parse_cidr(std::string_view text) {
  const size_t slash = text.find('/');
  const std::string host(text.substr(0, slash));
  std::vector<uint8_t> bytes;
  in_addr a4;
  in6_addr a6;
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1) {
    bytes.assign(reinterpret_cast<uint8_t*>(&a4), reinterpret_cast<uint8_t*>(&a4) + 4);
  } else if (::inet_pton(AF_INET6, host.c_str(), &a6) == 1) {
    bytes.assign(a6.s6_addr, a6.s6_addr + 16);
    static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::equal(kMapped, kMapped + 12, bytes.begin()))
      bytes.erase(bytes.begin(), bytes.begin() + 12);
  } else {
    return make_error(EINVAL, "addr:{}: not an IPv4 or IPv6 address (e.g. addr:10.0.0.0/8)", text);
  }
  uint32_t prefix = static_cast<uint32_t>(bytes.size() * 8);
  if (slash != std::string_view::npos) {
    auto p = parse_u32(text.substr(slash + 1));
    if (!p || *p > bytes.size() * 8)
      return make_error(EINVAL, "addr:{}: the prefix length is not 0 to {}", text,
                        bytes.size() * 8);
    prefix = *p;
  }
  for (size_t i = 0; i < bytes.size(); ++i) {
    const uint32_t bits = std::min<uint32_t>(8, prefix > i * 8 ? prefix - i * 8 : 0);
    bytes[i] &= static_cast<uint8_t>(bits == 0 ? 0 : 0xff << (8 - bits));
  }
  return std::make_pair(bytes, prefix);
}

std::string format_addr(const std::vector<uint8_t>& bytes) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (bytes.size() == 4) {
    ::inet_ntop(AF_INET, bytes.data(), buf, sizeof buf);
  } else if (bytes.size() == 16) {
    ::inet_ntop(AF_INET6, bytes.data(), buf, sizeof buf);
  } else {
    return "?";
  }
  return buf;
}

bool matches(const AccessRule& rule, const Peer& peer) {
  switch (rule.subject) {
    case AccessRule::Subject::kUid:
      return peer.kind == Peer::Kind::kUnix && peer.uid && *peer.uid == rule.id;
    case AccessRule::Subject::kGid:
      return peer.kind == Peer::Kind::kUnix &&
             ((peer.gid && *peer.gid == rule.id) ||
              std::find(peer.groups.begin(), peer.groups.end(), rule.id) != peer.groups.end());
    case AccessRule::Subject::kAddr: {
      if (peer.kind != Peer::Kind::kTcp) return false;
      auto net = parse_cidr(rule.addr);
      if (!net || net->first.size() != peer.addr.size()) return false;
      const uint32_t prefix = net->second;
      for (size_t i = 0; i < peer.addr.size(); ++i) {
        const uint32_t bits = std::min<uint32_t>(8, prefix > i * 8 ? prefix - i * 8 : 0);
        const uint8_t mask = static_cast<uint8_t>(bits == 0 ? 0 : 0xff << (8 - bits));
        if ((peer.addr[i] & mask) != net->first[i]) return false;
      }
      return true;
    }
  }
  return false;
}

}  // namespace

std::string_view to_string(AccessPolicy p) { return p == AccessPolicy::kRules ? "rules" : "open"; }

Result<AccessPolicy> parse_access_policy(std::string_view text) {
  if (text == "open") return AccessPolicy::kOpen;
  if (text == "rules") return AccessPolicy::kRules;
  return make_error(EINVAL, "access policy \"{}\": expected open or rules", text);
}

Result<AccessPolicy> load_access_policy(ReadTxn& txn) {
  LAYER_ASSIGN(auto v, txn.get(Db::kMeta, kMetaAccess));
  if (!v) return AccessPolicy::kOpen;
  auto p = parse_access_policy(*v);
  if (!p) return make_error(EIO, "meta {}: corrupt value \"{}\"", kMetaAccess, *v);
  return *p;
}

Result<AccessPolicy> load_access_policy(Pool& pool) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  return load_access_policy(txn);
}

Status save_access_policy(Pool& pool, AccessPolicy policy) {
  LAYER_TRY(pool.check_writable());
  return pool.committer().run([&](WriteTxn& txn) -> Status {
    return txn.put(Db::kMeta, kMetaAccess, std::string(to_string(policy)));
  });
}

Result<AccessRule> parse_access_subject(std::string_view text) {
  AccessRule rule;
  rule.label = std::string(text);
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos)
    return make_error(EINVAL,
                      "access subject \"{}\": expected uid:N, gid:N, user:NAME, group:NAME or "
                      "addr:CIDR",
                      text);
  const std::string_view kind = text.substr(0, colon), value = text.substr(colon + 1);
  if (kind == "uid" || kind == "gid") {
    auto id = parse_u32(value);
    if (!id) return make_error(EINVAL, "access subject \"{}\": not a number", text);
    rule.subject = kind == "uid" ? AccessRule::Subject::kUid : AccessRule::Subject::kGid;
    rule.id = *id;
    return rule;
  }
  if (kind == "user" || kind == "group") {
    const std::string name(value);
    std::vector<char> buf(nss_buffer_bytes());
    if (kind == "user") {
      passwd pw, *found = nullptr;
      const int rc = ::getpwnam_r(name.c_str(), &pw, buf.data(), buf.size(), &found);
      if (rc != 0 || found == nullptr)
        return make_error(EINVAL, "access subject \"{}\": no such user", text);
      rule.subject = AccessRule::Subject::kUid;
      rule.id = pw.pw_uid;
    } else {
      group gr, *found = nullptr;
      const int rc = ::getgrnam_r(name.c_str(), &gr, buf.data(), buf.size(), &found);
      if (rc != 0 || found == nullptr)
        return make_error(EINVAL, "access subject \"{}\": no such group", text);
      rule.subject = AccessRule::Subject::kGid;
      rule.id = gr.gr_gid;
    }
    return rule;
  }
  if (kind == "addr") {
    LAYER_ASSIGN(auto net, parse_cidr(value));
    rule.subject = AccessRule::Subject::kAddr;
    rule.addr = fmt::format("{}/{}", format_addr(net.first), net.second);
    rule.label = "addr:" + rule.addr;
    return rule;
  }
  return make_error(EINVAL,
                    "access subject \"{}\": unknown kind \"{}\" (expected uid, gid, user, group or "
                    "addr)",
                    text, kind);
}

std::string describe(const AccessRule& rule) {
  std::string who = rule.label;
  if (rule.label.rfind("user:", 0) == 0) who += fmt::format(" (uid {})", rule.id);
  if (rule.label.rfind("group:", 0) == 0) who += fmt::format(" (gid {})", rule.id);
  return fmt::format("{} {}{}", rule.deny ? "deny" : "allow", who,
                     !rule.deny && rule.read_only ? ", read-only" : "");
}

bool same_subject(const AccessRule& a, const AccessRule& b) {
  if (a.subject != b.subject) return false;
  return a.subject == AccessRule::Subject::kAddr ? a.addr == b.addr : a.id == b.id;
}

std::string Peer::describe() const {
  switch (kind) {
    case Kind::kUnix: {
      std::string s = "unix socket peer";
      if (uid) s += fmt::format(" uid {}", *uid);
      if (gid) s += fmt::format(" gid {}", *gid);
      if (pid) s += fmt::format(" pid {}", *pid);
      return s;
    }
    case Kind::kTcp:
      return fmt::format("tcp peer {}{}", format_addr(addr), tls ? " (TLS)" : " (no TLS)");
    case Kind::kUnknown:
      break;
  }
  return "unknown peer";
}

std::string Peer::address() const { return kind == Kind::kTcp ? format_addr(addr) : ""; }

bool Peer::loopback() const {
  if (kind != Kind::kTcp) return false;
  if (addr.size() == 4) return addr[0] == 127;
  if (addr.size() == 16)
    return std::all_of(addr.begin(), addr.end() - 1, [](uint8_t b) { return b == 0; }) &&
           addr[15] == 1;
  return false;
}

std::vector<uint32_t> groups_of(uint32_t uid, uint32_t gid) {
  std::vector<uint32_t> out{gid};
  std::vector<char> buf(nss_buffer_bytes());
  passwd pw, *found = nullptr;
  if (::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) return out;
  int n = 64;
  std::vector<gid_t> groups(static_cast<size_t>(n));
  if (::getgrouplist(pw.pw_name, gid, groups.data(), &n) < 0) {
    groups.resize(static_cast<size_t>(n));
    if (::getgrouplist(pw.pw_name, gid, groups.data(), &n) < 0) return out;
  }
  for (int i = 0; i < n; ++i)
    if (groups[static_cast<size_t>(i)] != gid) out.push_back(groups[static_cast<size_t>(i)]);
  return out;
}

AccessDecision decide_access(AccessPolicy policy, const std::vector<AccessRule>& rules,
                             const Peer& peer) {
  if (peer.kind == Peer::Kind::kTcp && !peer.tls && !peer.loopback())
    return {false, false, "a client from a non-loopback address needs TLS"};
  for (const auto& r : rules)
    if (r.deny && matches(r, peer)) return {false, false, "refused by rule " + describe(r)};
  bool any_allow = false;
  const AccessRule* granted = nullptr;
  for (const auto& r : rules) {
    if (r.deny) continue;
    any_allow = true;
    if (!matches(r, peer)) continue;
    if (!granted || (granted->read_only && !r.read_only)) granted = &r;
  }
  if (granted) return {true, granted->read_only, "allowed by rule " + describe(*granted)};
  if (any_allow) return {false, false, "no rule allows it"};
  if (peer.kind == Peer::Kind::kUnix && policy == AccessPolicy::kOpen)
    return {true, false, "no rules, and the pool's access is open"};
  if (peer.kind == Peer::Kind::kTcp)
    return {false, false, "no rule allows it (a TCP client needs a rule)"};
  return {false, false, "no rule allows it (the pool's access is rules)"};
}

Result<std::vector<AccessRule>> change_access(Pool& pool, const std::string& name, bool clear,
                                              const std::vector<AccessRule>& remove,
                                              const std::vector<AccessRule>& add) {
  LAYER_TRY(pool.check_writable());
  std::vector<AccessRule> after;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    LAYER_ASSIGN(auto c, pool.get_container(txn, name));
    if (clear) c.access.clear();
    for (const auto& r : remove) {
      auto it = std::find_if(c.access.begin(), c.access.end(),
                             [&](const AccessRule& x) { return same_subject(x, r); });
      if (it == c.access.end())
        return make_error(EINVAL, "container \"{}\" has no rule for {}", name, r.label);
      c.access.erase(it);
    }
    for (const auto& r : add) {
      auto it = std::find_if(c.access.begin(), c.access.end(),
                             [&](const AccessRule& x) { return same_subject(x, r); });
      if (it != c.access.end())
        *it = r;
      else
        c.access.push_back(r);
    }
    after = c.access;
    return txn.put(Db::kContainers, name, encode(c));
  }));
  return after;
}

}  // namespace layer
