// Unit tests for lib/apply.h: the spec parser (every refusal names its field), the planner
// against a real pool (idempotence: a second plan is empty; conflicts refused before anything
// changes) and execute_plan's undo when a step fails half-way.
#include "apply.h"

#include <catch2/catch.hpp>
#include <fstream>

#include "fsck.h"
#include "images.h"
#include "pool.h"
#include "snapshots.h"
#include "test_util.h"

using namespace layer;

namespace {

Spec parse_ok(const std::string& text, const std::string& base = "/specs") {
  auto r = parse_spec(text, base);
  if (!r) FAIL("parse_spec failed: " << r.error().message << "\n" << text);
  return std::move(r).value();
}

// The refusal's message, which must start with `field` (and be EINVAL, on one line).
std::string refusal(const std::string& text, const std::string& field) {
  auto r = parse_spec(text, "/specs");
  INFO(text);
  REQUIRE(!r.ok());
  INFO(r.error().message);
  CHECK(r.error().code == EINVAL);
  CHECK(r.error().message.find('\n') == std::string::npos);
  if (!field.empty()) CHECK(r.error().message.starts_with(field + ":"));
  return r.error().message;
}

std::string with_container(const std::string& fields) {
  return R"({"version":1,"containers":[{"name":"web1","image":"busybox:1")" +
         (fields.empty() ? "" : "," + fields) + "}]}";
}

}  // namespace

TEST_CASE("apply spec: a full spec parses; counts expand; paths resolve", "[apply]") {
  const Spec s = parse_ok(R"({
    "version": 1, "name": "web",
    "images": [{"ref": "busybox:1", "file": "img/busybox.img", "block_size": "64K",
                "description": "rootfs"},
               {"ref": "alpine:3", "file": "/abs/alpine.raw"}],
    "containers": [
      {"name": "db", "image": "alpine:3", "size": "128M",
       "resources": {"cpu": 0.5, "memory": "1G", "net": 1000, "iops": 2000,
                     "bandwidth": "50M", "priority": 7},
       "labels": {"role": "db", "tier/x": "a b"}, "snapshots": ["base", "later"]},
      {"name": "web-{i}", "count": 3, "image": "busybox:1", "resources": {"cpu": "2"}},
      {"name": "w{i}x", "count": 2, "start": 9, "image": "busybox:1"},
      {"name": "none-{i}", "count": 0, "image": "busybox:1"}
    ]})");
  CHECK(s.name == "web");
  REQUIRE(s.images.size() == 2);
  CHECK(s.images[0].file == "/specs/img/busybox.img");
  CHECK(s.images[0].block_size == 65536u);
  CHECK(s.images[1].file == "/abs/alpine.raw");
  CHECK(!s.images[1].block_size);
  REQUIRE(s.containers.size() == 6);
  const auto& db = s.containers[0];
  CHECK(db.size_bytes == (128u << 20));
  CHECK(db.resources.cpu_millis == 500);
  CHECK(db.resources.memory_bytes == (1u << 30));
  CHECK(db.resources.net_bps == 1000);
  CHECK(db.resources.iops == 2000);
  CHECK(db.resources.bandwidth == (50u << 20));
  CHECK(db.resources.priority == 7);
  CHECK(db.labels.at("tier/x") == "a b");
  CHECK(db.snapshots == std::vector<std::string>{"base", "later"});
  CHECK(s.containers[1].name == "web-1");
  CHECK(s.containers[3].name == "web-3");
  CHECK(s.containers[3].resources.cpu_millis == 2000);
  CHECK(s.containers[4].name == "w9x");
  CHECK(s.containers[5].name == "w10x");
  CHECK(s.containers[5].field == "containers[2]#10");

  // The canonical form reads back to the same spec.
  const Spec again = parse_ok(spec_to_json(s).dump());
  REQUIRE(again.containers.size() == s.containers.size());
  for (size_t i = 0; i < s.containers.size(); ++i) {
    CHECK(again.containers[i].name == s.containers[i].name);
    CHECK(again.containers[i].resources == s.containers[i].resources);
    CHECK(again.containers[i].labels == s.containers[i].labels);
    CHECK(again.containers[i].size_bytes == s.containers[i].size_bytes);
    CHECK(again.containers[i].snapshots == s.containers[i].snapshots);
  }
  CHECK(again.images[0].file == s.images[0].file);

  // The defaults: no name, nothing to have.
  const Spec empty = parse_ok(R"({"version":1})");
  CHECK(empty.name == "default");
  CHECK(empty.containers.empty());
}

TEST_CASE("apply spec: every refusal names its field", "[apply]") {
  refusal("[1,2]", "");  // not an object: no field, still one line
  refusal("{\"version\":1,", "");
  CHECK(refusal("{\"version\":1,", "").find("not valid JSON") != std::string::npos);
  refusal("{}", "version");
  refusal(R"({"version":2})", "version");
  refusal(R"({"version":"1"})", "version");
  refusal(R"({"version":1,"bogus":1})", "bogus");
  refusal(R"({"version":1,"version":1})", "");  // duplicate key
  refusal(R"({"version":1,"name":"Bad Name"})", "name");
  refusal(R"({"version":1,"images":{}})", "images");
  refusal(R"({"version":1,"images":[{"file":"x"}]})", "images[0].ref");
  refusal(R"({"version":1,"images":[{"ref":"busybox"}]})", "images[0].ref");
  refusal(R"({"version":1,"images":[{"ref":"busybox:1"}]})", "images[0].file");
  refusal(R"({"version":1,"images":[{"ref":"busybox:1","file":7}]})", "images[0].file");
  refusal(R"({"version":1,"images":[{"ref":"busybox:1","file":"x","block_size":"3K"}]})",
          "images[0].block_size");
  refusal(R"({"version":1,"images":[{"ref":"busybox:1","file":"x","extra":0}]})",
          "images[0].extra");
  refusal(R"({"version":1,"images":[{"ref":"b:1","file":"x"},{"ref":"b:1","file":"y"}]})",
          "images[1].ref");
  refusal(R"({"version":1,"containers":[{"image":"busybox:1"}]})", "containers[0].name");
  refusal(R"({"version":1,"containers":[{"name":"web1"}]})", "containers[0].image");
  refusal(with_container(R"("imag":"x")"), "containers[0].imag");
  refusal(R"({"version":1,"containers":[{"name":"Web1","image":"busybox:1"}]})",
          "containers[0].name");
  refusal(R"({"version":1,"containers":[{"name":"web1","image":"busybox"}]})",
          "containers[0].image");
  refusal(with_container(R"("size":"12")"), "containers[0].size");
  refusal(with_container(R"("size":-512)"), "containers[0].size");
  refusal(with_container(R"("size":"20T")"), "containers[0].size");
  refusal(with_container(R"("resources":{"iops":"lots"})"), "containers[0].resources.iops");
  refusal(with_container(R"("resources":{"iops":1.5})"), "containers[0].resources.iops");
  refusal(with_container(R"("resources":{"cpu":-1})"), "containers[0].resources.cpu");
  refusal(with_container(R"("resources":{"cpu":"0.0001"})"), "containers[0].resources.cpu");
  refusal(with_container(R"("resources":{"priority":11})"), "containers[0].resources.priority");
  refusal(with_container(R"("resources":{"priority":0})"), "containers[0].resources.priority");
  refusal(with_container(R"("resources":{"disk":1})"), "containers[0].resources.disk");
  refusal(with_container(R"("resources":[])"), "containers[0].resources");
  refusal(with_container(R"("labels":{"role":1})"), "containers[0].labels.role");
  refusal(with_container(R"("labels":{"-x":"a"})"), "containers[0].labels.-x");
  refusal(with_container(R"("labels":{"layer/spec":"other"})"), "containers[0].labels.layer/spec");
  refusal(with_container(R"("labels":{"k":"a\nb"})"), "containers[0].labels.k");
  refusal(with_container(R"("snapshots":"base")"), "containers[0].snapshots");
  refusal(with_container(R"("snapshots":["base","Bad"])"), "containers[0].snapshots[1]");
  refusal(with_container(R"("snapshots":["base","base"])"), "containers[0].snapshots[1]");
  refusal(with_container(R"("start":3)"), "containers[0].start");
  refusal(R"({"version":1,"containers":[{"name":"web-{i}","image":"busybox:1"}]})",
          "containers[0].name");
  refusal(with_container(R"("count":2)"), "containers[0].name");  // no {i}
  refusal(R"({"version":1,"containers":[{"name":"w{i}{i}","count":2,"image":"b:1"}]})",
          "containers[0].name");
  refusal(R"({"version":1,"containers":[{"name":"w{i}","count":1001,"image":"b:1"}]})",
          "containers[0].count");
  refusal(R"({"version":1,"containers":[{"name":"w{i}","count":-1,"image":"b:1"}]})",
          "containers[0].count");
  refusal(R"({"version":1,"containers":[{"name":"w{i}","count":"2","image":"b:1"}]})",
          "containers[0].count");
  // A pattern whose names grow too long.
  refusal(R"({"version":1,"containers":[{"name":")" + std::string(63, 'a') +
              R"({i}","count":20,"start":5,"image":"b:1"}]})",
          "containers[0].name");
  // Duplicates, also through a count.
  CHECK(refusal(R"({"version":1,"containers":[{"name":"web-2","image":"b:1"},
                   {"name":"web-{i}","count":3,"image":"b:1"}]})",
                "containers[1].name")
            .find("containers[0]") != std::string::npos);
  // More than kMaxApplyContainers in total.
  std::string many = R"({"version":1,"containers":[)";
  for (int i = 0; i < 11; ++i)
    many += fmt::format(R"({}{{"name":"g{}-{{i}}","count":1000,"image":"b:1"}})", i ? "," : "", i);
  refusal(many + "]}", "containers[10].count");
}

namespace {

struct PoolFixture {
  test::TempDir dir;
  std::unique_ptr<Pool> pool;
  std::string image_file;
  PoolFixture() {
    MUST(Pool::create(dir.sub("pool"), "", ""));
    pool = MUST(Pool::open(dir.sub("pool"), {}));
    image_file = dir.sub("base.img");
    std::vector<uint8_t> content(1 << 20, 0);
    for (size_t i = 0; i < content.size(); i += 4096) content[i] = static_cast<uint8_t>(i >> 12);
    test::write_raw_image(image_file, content, {{0, content.size()}});
  }
  std::string spec_text(const std::string& containers, const std::string& images = "") const {
    return fmt::format(R"({{"version":1,"name":"t","images":[{{"ref":"base:1","file":"{}"}}{}],
                          "containers":[{}]}})",
                       image_file, images, containers);
  }
  ApplyPlan plan(const std::string& text, bool prune = false) {
    const Spec spec = parse_ok(text);
    const PoolState state = MUST(observe_pool(*pool));
    return MUST(make_plan(spec, state, {.prune = prune}));
  }
  void apply(const std::string& text, bool prune = false) {
    PoolApplyActions actions(*pool);
    ApplyOutcome outcome;
    MUST(execute_plan(plan(text, prune), actions, &outcome));
  }
  // Everything apply may change, as one comparable value.
  // with_layers: the delta layers and generations too (an undone snapshot leaves a new delta).
  std::string snapshot_of_pool(bool with_layers = true) {
    const PoolState s = MUST(observe_pool(*pool));
    std::string out;
    for (const auto& [ref, img] : s.images)
      out += fmt::format("image {} {}\n", ref, img.size_bytes);
    for (const auto& [name, c] : s.containers) {
      out += fmt::format("container {} {} {}\n", name, c.record.image_ref, c.record.size_bytes);
      if (with_layers)
        out += fmt::format("  delta {} gen {}\n", c.record.delta_layer, c.record.generation);
      for (const auto& [k, v] : c.record.labels) out += fmt::format("  label {}={}\n", k, v);
      out +=
          fmt::format("  res {} {} {} {}\n", c.record.resources.cpu_millis, c.record.resources.iops,
                      c.record.resources.bandwidth, c.record.resources.priority);
      for (const auto& snap : c.snapshots) out += "  snap " + snap + "\n";
    }
    return out;
  }
};

std::vector<std::string> kinds(const ApplyPlan& p) {
  std::vector<std::string> out;
  for (const auto& s : p.steps) out.push_back(describe(s));
  return out;
}

// Actions that fail at the n-th call (counting every call), with ENOSPC.
class FailingActions : public PoolApplyActions {
 public:
  FailingActions(Pool& pool, int fail_at) : PoolApplyActions(pool), fail_at_(fail_at) {}
  Status import_image(const ImageSpec& i) override {
    return tick() ? PoolApplyActions::import_image(i) : full();
  }
  Status create(const ContainerSpec& c) override {
    return tick() ? PoolApplyActions::create(c) : full();
  }
  Status set_resources(const std::string& c, const Resources& r) override {
    return tick() ? PoolApplyActions::set_resources(c, r) : full();
  }
  Status set_labels(const std::string& c, const std::map<std::string, std::string>& l) override {
    return tick() ? PoolApplyActions::set_labels(c, l) : full();
  }
  Status snapshot(const std::string& c, const std::string& s) override {
    return tick() ? PoolApplyActions::snapshot(c, s) : full();
  }

 private:
  bool tick() { return ++calls_ != fail_at_; }
  static Status full() { return make_error(ENOSPC, "injected: no space left"); }
  int fail_at_;
  int calls_ = 0;
};

}  // namespace

TEST_CASE("apply: creates what the spec names; a second plan is empty", "[apply]") {
  PoolFixture f;
  const std::string text = f.spec_text(
      R"({"name":"web1","image":"base:1","size":"2M","resources":{"iops":100,"cpu":2},
          "labels":{"role":"web"},"snapshots":["s1","s2"]},
         {"name":"w-{i}","count":2,"image":"base:1"})");
  ApplyPlan p = f.plan(text);
  CHECK(kinds(p) == std::vector<std::string>{"import base:1", "create web1", "create w-1",
                                             "create w-2", "snapshot web1@s1", "snapshot web1@s2"});
  f.apply(text);
  const auto info = MUST(f.pool->inspect("web1"));
  CHECK(info.container.size_bytes == (2u << 20));
  CHECK(info.container.resources.iops == 100);
  CHECK(info.container.resources.cpu_millis == 2000);
  CHECK(info.container.labels.at("role") == "web");
  CHECK(info.container.labels.at(kApplySpecLabel) == "t");
  CHECK(MUST(list_snapshots(*f.pool, "web1")).snapshots.size() == 2);

  const std::string before = f.snapshot_of_pool();
  CHECK(f.plan(text).empty());
  CHECK(f.plan(text, true).empty());
  f.apply(text);
  CHECK(f.snapshot_of_pool() == before);
  auto fsck_result = MUST(fsck(*f.pool, false, false));
  CHECK(fsck_result.problems.empty());
}

TEST_CASE("apply: changes resources and labels in place; prunes only its own", "[apply]") {
  PoolFixture f;
  f.apply(f.spec_text(R"({"name":"a","image":"base:1","resources":{"iops":100}},
                         {"name":"b","image":"base:1"})"));
  MUST(f.pool->clone("base:1", "handmade", std::nullopt));
  const LayerId delta = MUST(f.pool->inspect("a")).container.delta_layer;
  const std::string changed =
      f.spec_text(R"({"name":"a","image":"base:1","resources":{"iops":200},"labels":{"x":"y"}})");
  ApplyPlan p = f.plan(changed, true);
  CHECK(kinds(p) == std::vector<std::string>{"resources a", "labels a", "remove b"});
  REQUIRE(p.steps[0].resources_from.iops == 100);
  REQUIRE(p.steps[0].resources_to.iops == 200);
  // Without --prune, b stays.
  CHECK(kinds(f.plan(changed)) == std::vector<std::string>{"resources a", "labels a"});
  f.apply(changed, true);
  const auto a = MUST(f.pool->inspect("a"));
  CHECK(a.container.delta_layer == delta);  // changed, not re-created
  CHECK(a.container.resources.iops == 200);
  CHECK(a.container.labels.at("x") == "y");
  CHECK_ERRNO(f.pool->inspect("b"), ENOENT);
  MUST(f.pool->inspect("handmade"));  // not this spec's: never pruned
  CHECK(f.plan(changed, true).empty());

  // A hand-made container the spec names is adopted (labelled), then left alone.
  const std::string adopt = f.spec_text(
      R"({"name":"a","image":"base:1","resources":{"iops":200},"labels":{"x":"y"}},
         {"name":"handmade","image":"base:1"})");
  CHECK(kinds(f.plan(adopt)) == std::vector<std::string>{"labels handmade"});
  f.apply(adopt);
  CHECK(f.plan(adopt, true).empty());
}

TEST_CASE("apply: conflicts are refused before anything changes", "[apply]") {
  PoolFixture f;
  f.apply(f.spec_text(R"({"name":"a","image":"base:1"})"));
  MUST(f.pool->clone("base:1", "other", std::nullopt, {}, {{kApplySpecLabel, "another"}}));
  auto refused = [&](const std::string& text, int code, const std::string& field) {
    const Spec spec = parse_ok(text);
    auto r = make_plan(spec, MUST(observe_pool(*f.pool)), {.prune = true});
    INFO(text);
    REQUIRE(!r.ok());
    INFO(r.error().message);
    CHECK(r.error().code == code);
    CHECK(r.error().message.starts_with(field));
  };
  // Another image; another size; a missing image; a container another spec manages.
  refused(f.spec_text(R"({"name":"a","image":"base:2"})",
                      R"(,{"ref":"base:2","file":")" + f.image_file + "\"}"),
          EINVAL, "containers[0].image");
  refused(f.spec_text(R"({"name":"a","image":"base:1","size":"4M"})"), EINVAL,
          "containers[0].size");
  refused(f.spec_text(R"({"name":"n","image":"nope:1"})"), ENOENT, "containers[0].image");
  refused(f.spec_text(R"({"name":"other","image":"base:1"})"), EINVAL, "containers[0].name");
  refused(f.spec_text(R"({"name":"n","image":"base:1","size":"512K"})"), EINVAL,
          "containers[0].size");
  // An image file that is missing, or of a size that is not whole sectors.
  refused(f.spec_text("", R"(,{"ref":"new:1","file":")" + f.dir.sub("missing.img") + "\"}"), ENOENT,
          "images[1].file");
  {
    std::ofstream odd(f.dir.sub("odd.img"));
    odd << "123";
  }
  refused(f.spec_text("", R"(,{"ref":"new:1","file":")" + f.dir.sub("odd.img") + "\"}"), EINVAL,
          "images[1].file");
  // An image the pool has, with another block size.
  refused(fmt::format(R"({{"version":1,"name":"t","images":[{{"ref":"base:1","file":"{}",
                           "block_size":"8K"}}]}})",
                      f.image_file),
          EINVAL, "images[0].block_size");
}

TEST_CASE("apply: a step failing half-way undoes what the run did", "[apply]") {
  PoolFixture f;
  f.apply(f.spec_text(R"({"name":"old","image":"base:1","resources":{"iops":5}})"));
  const std::string before = f.snapshot_of_pool(false);
  const std::string text =
      f.spec_text(R"({"name":"old","image":"base:1","resources":{"iops":6},"labels":{"l":"1"},
                      "snapshots":["s"]},
                     {"name":"n-{i}","count":3,"image":"base:2","snapshots":["first"]})",
                  R"(,{"ref":"base:2","file":")" + f.image_file + "\"}");
  const ApplyPlan p = f.plan(text);
  // import, 3 creates, resources, labels, 4 snapshots.
  REQUIRE(p.steps.size() == 10);
  for (int fail_at = 1; fail_at <= static_cast<int>(p.steps.size()); ++fail_at) {
    DYNAMIC_SECTION("failing at step " << fail_at) {
      FailingActions actions(*f.pool, fail_at);
      ApplyOutcome outcome;
      const Status s = execute_plan(p, actions, &outcome);
      REQUIRE(!s.ok());
      CHECK(s.error().code == ENOSPC);
      INFO(s.error().message);
      CHECK(s.error().message.find("injected") != std::string::npos);
      CHECK(outcome.not_undone.empty());
      CHECK(f.snapshot_of_pool(false) == before);
      auto fsck_result = MUST(fsck(*f.pool, false, false));
      for (const auto& problem : fsck_result.problems) UNSCOPED_INFO(problem);
      CHECK(fsck_result.problems.empty());
    }
  }
  f.apply(text);
  CHECK(f.plan(text).empty());
}
