// fuzz_apply.cc — libFuzzer target: the spec parser of `layer apply` (apply.h parse_spec) and
// the planner over it against a synthetic pool.
//
// Input: the spec's text. Properties:
// - parse_spec throws nothing and refuses with EINVAL, a message of one line (no raw control
//   characters) no longer than a few hundred bytes plus what it quotes;
// - an accepted spec keeps the limits: at most kMaxApplyContainers containers, names valid
//   and distinct, labels valid, priorities 1..10;
// - its canonical form (spec_to_json) parses back to the same spec;
// - make_plan (no file checks) against a pool holding some of its images and containers throws
//   nothing, succeeds or fails with a documented errno, and a plan for an empty pool creates
//   every container exactly once.
#include <set>

#include "apply.h"
#include "fuzz_util.h"
#include "names.h"

using namespace layer;
using fuzz::printable;

namespace {

void check_spec(const Spec& s, std::string_view text) {
  FUZZ_CHECK(s.containers.size() <= kMaxApplyContainers, "too many containers");
  FUZZ_CHECK(s.images.size() <= kMaxApplyImages, "too many images");
  FUZZ_CHECK(validate_name(s.name, "spec").ok(), "spec name " + printable(s.name));
  std::set<std::string> names;
  for (const auto& c : s.containers) {
    FUZZ_CHECK(validate_name(c.name, "container").ok(), "container name " + printable(c.name));
    FUZZ_CHECK(names.insert(c.name).second,
               "duplicate container " + c.name + " in " + printable(text.substr(0, 200)));
    FUZZ_CHECK(validate_image_ref(c.image).ok(), "image " + printable(c.image));
    FUZZ_CHECK(c.resources.priority >= 1 && c.resources.priority <= 10, "priority");
    FUZZ_CHECK(!c.labels.contains(kApplySpecLabel), "a spec set the reserved label");
    for (const auto& [k, v] : c.labels)
      FUZZ_CHECK(validate_label(k, v).ok(), "label " + printable(k) + "=" + printable(v));
    for (const auto& snap : c.snapshots)
      FUZZ_CHECK(validate_name(snap, "snapshot").ok(), "snapshot " + printable(snap));
    if (c.size_bytes) FUZZ_CHECK(*c.size_bytes % 512 == 0 && *c.size_bytes != 0, "size");
  }
}

bool same(const Spec& a, const Spec& b) {
  if (a.name != b.name || a.images.size() != b.images.size() ||
      a.containers.size() != b.containers.size())
    return false;
  for (size_t i = 0; i < a.images.size(); ++i) {
    const auto &x = a.images[i], &y = b.images[i];
    if (x.ref != y.ref || x.file != y.file || x.block_size != y.block_size ||
        x.description != y.description)
      return false;
  }
  for (size_t i = 0; i < a.containers.size(); ++i) {
    const auto &x = a.containers[i], &y = b.containers[i];
    if (x.name != y.name || x.image != y.image || x.size_bytes != y.size_bytes ||
        !(x.resources == y.resources) || x.labels != y.labels || x.snapshots != y.snapshots)
      return false;
  }
  return true;
}

void check_plans(const Spec& s) {
  // An empty pool holding the images of the containers: every container is created once.
  PoolState empty;
  for (const auto& c : s.containers) empty.images[c.image] = {1 << 20, 4096};
  auto p = make_plan(s, empty, {.prune = true, .check_files = false});
  FUZZ_CHECK(p.ok() || p.error().code == EINVAL, "plan on an empty pool: " + p.error().message);
  if (p.ok()) {
    size_t creates = 0;
    for (const auto& step : p->steps) {
      FUZZ_CHECK(step.kind != ApplyStep::Kind::kRemove, "a removal planned on an empty pool");
      if (step.kind == ApplyStep::Kind::kCreate) ++creates;
    }
    FUZZ_CHECK(creates == s.containers.size(), "not every container created once");
  }
  // A pool that has every other container already, some served, some of other specs.
  PoolState some = empty;
  uint64_t id = 1;
  for (const auto& c : s.containers) {
    if (id++ % 2 == 0) continue;
    auto& have = some.containers[c.name];
    have.record.name = c.name;
    have.record.id = id;
    have.record.image_ref = c.image;
    have.record.size_bytes = c.size_bytes.value_or(1 << 20);
    have.record.labels[kApplySpecLabel] = id % 3 == 0 ? "another" : s.name;
    if (id % 5 == 0) have.served_by = "pid 1";
  }
  some.containers["stray"].record.labels[kApplySpecLabel] = s.name;
  for (bool prune : {false, true}) {
    auto q = make_plan(s, some, {.prune = prune, .check_files = false});
    FUZZ_CHECK(
        q.ok() || q.error().code == EINVAL || q.error().code == EBUSY || q.error().code == ENOENT,
        "plan: errno " + std::to_string(q.error().code) + " " + q.error().message);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  Result<Spec> r = Error{};
  try {
    r = parse_spec(text, "/specs");
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("parse_spec threw: ") + e.what());
  }
  if (!r.ok()) {
    FUZZ_CHECK(r.error().code == EINVAL, "errno " + std::to_string(r.error().code));
    const std::string& m = r.error().message;
    FUZZ_CHECK(!m.empty(), "an empty refusal");
    for (unsigned char c : m) FUZZ_CHECK(c >= 0x20 && c != 0x7f, "control byte in " + printable(m));
    return 0;
  }
  check_spec(*r, text);
  const std::string canonical = spec_to_json(*r).dump();
  auto again = parse_spec(canonical, "/elsewhere");
  FUZZ_CHECK(again.ok(), "the canonical form is refused: " + again.error().message + " " +
                             printable(canonical.substr(0, 300)));
  FUZZ_CHECK(same(*r, *again),
             "the canonical form reads back differently: " + printable(canonical.substr(0, 300)));
  check_plans(*r);
  return 0;
}
