// access.h — who may open a container (DESIGN.md "Security"; docs/security.md): the rules a
// container's row keeps (`layer access`), the pool's policy for containers with none (`layer
// pool set --access`), and the decision the server makes for a peer on open and on listing.
//
// A decision, for a peer and a container's rules:
//   1. a deny rule that matches the peer refuses it;
//   2. allow rules that match it grant it: read-write if any of them is, read-only otherwise;
//   3. when the container has allow rules and none matches: refused;
//   4. when it has none: a client of a unix socket is allowed (read-write) if the pool's policy
//      is `open` (the socket's mode and owner are what restrict who connects); anyone else —
//      a TCP client, or any client under `rules` — is refused.
// And always: a TCP client from an address other than loopback without TLS is refused, whatever
// the rules say (`layer serve` also refuses to listen there without TLS).
//
// Subjects: uid:N, gid:N (the peer's primary group or any group its user is a member of),
// user:NAME and group:NAME (resolved to uid/gid when the rule is made, and shown with the name
// given), addr:CIDR (an IPv4 or IPv6 network; an IPv4-mapped IPv6 peer matches IPv4 rules).
// uid/gid rules match only unix-socket peers (SO_PEERCRED), addr rules only TCP ones.
//
// Thread-safety: plain functions; decide_access is pure.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "error.h"
#include "index.h"
#include "records.h"

namespace layer {

class Pool;

// The pool's policy for containers without rules: meta "pool.access". Absent: kOpen.
enum class AccessPolicy : uint8_t { kOpen = 0, kRules = 1 };
std::string_view to_string(AccessPolicy p);
// "open" | "rules". Errors: EINVAL.
Result<AccessPolicy> parse_access_policy(std::string_view text);
// Errors: EIO (a corrupt value).
Result<AccessPolicy> load_access_policy(ReadTxn& txn);
Result<AccessPolicy> load_access_policy(Pool& pool);
Status save_access_policy(Pool& pool, AccessPolicy policy);

// Parses a subject (uid:N, gid:N, user:NAME, group:NAME, addr:CIDR) into a rule (allow,
// read-write). Errors: EINVAL naming the text (an unknown user or group, a bad CIDR).
Result<AccessRule> parse_access_subject(std::string_view text);
// "allow user:alice (uid 1000), read-only", "deny addr:10.0.0.0/8".
std::string describe(const AccessRule& rule);
// Whether two rules name the same subject (a new rule for it replaces the old one).
bool same_subject(const AccessRule& a, const AccessRule& b);

// Who is connecting, as the server sees it.
struct Peer {
  enum class Kind : uint8_t { kUnknown = 0, kUnix = 1, kTcp = 2 };
  Kind kind = Kind::kUnknown;
  std::optional<uint32_t> uid, gid;  // a unix peer's credentials
  std::vector<uint32_t> groups;      // the groups its user is a member of (gid included)
  std::optional<int64_t> pid;
  // A TCP peer's address: IPv4 as its 4 bytes, IPv6 as 16 (IPv4-mapped ones as IPv4).
  std::vector<uint8_t> addr;
  bool tls = false;
  // "uid 1000 gid 1000 pid 4242", "addr 10.1.2.3 (TLS)", "unknown peer".
  std::string describe() const;
  bool loopback() const;
  // A TCP peer's address as text ("10.1.2.3", "fd00::1"); "" for others.
  std::string address() const;
};
// The groups user `uid` is a member of (its primary `gid` first), from the user database;
// just {gid} when uid has no entry.
std::vector<uint32_t> groups_of(uint32_t uid, uint32_t gid);

struct AccessDecision {
  bool allowed = false;
  bool read_only = false;
  std::string why;  // which rule decided, or why none did
};
AccessDecision decide_access(AccessPolicy policy, const std::vector<AccessRule>& rules,
                             const Peer& peer);

// Changes container `name`'s rules in one transaction: `clear` removes every rule first; then
// the rules for the subjects of `remove` go, and `add` come (each replacing a rule of the same
// subject). Returns the rules after.
// Errors: ENOENT (no such container), EINVAL (a removal that names no rule), those of the
// transaction.
Result<std::vector<AccessRule>> change_access(Pool& pool, const std::string& name, bool clear,
                                              const std::vector<AccessRule>& remove,
                                              const std::vector<AccessRule>& add);

}  // namespace layer
