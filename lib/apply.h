// apply.h — declarative provisioning (issue 14 item 6): `layer apply SPEC.json`.
//
// A spec (docs/apply.md, docs/apply-spec.schema.json) names images to import and containers to
// have. Three steps, each one call:
// - parse_spec: the JSON text -> Spec, every field checked; containers given by `count` and a
//   name pattern are expanded. A bad spec is one EINVAL whose message starts with the field
//   ("containers[2].resources.iops: ...").
// - make_plan: Spec + the pool's state (observe_pool) -> ApplyPlan, the steps that make the pool
//   match. An empty plan means the pool matches already (apply is idempotent). A spec that
//   cannot be met without losing data (an existing container on another image or of another
//   size, a container another spec manages, a served container to prune) is refused here, so
//   nothing is changed when anything is wrong.
// - execute_plan: runs the steps through ApplyActions in a fixed order (imports, creations,
//   resource and label changes, snapshots, removals) and, when one fails, undoes the steps this
//   run did (removes the containers and images it made, puts back resources and labels, removes
//   the snapshots it took on containers that existed) before returning the error. Removals
//   (--prune) come last and cannot be undone.
//
// Containers that apply creates or adopts carry the label kApplySpecLabel = the spec's name;
// --prune removes the containers with that label whose name the spec no longer has, and
// nothing else (containers made by hand, or by another spec, are never pruned).
//
// Thread-safety: plain values and functions; execute_plan runs on the caller's thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "error.h"
#include "records.h"

namespace layer {

class Pool;

constexpr uint64_t kApplySpecVersion = 1;
constexpr uint64_t kMaxApplyCount = 1000;      // containers one entry's `count` makes
constexpr size_t kMaxApplyContainers = 10000;  // containers one spec names, counts expanded
constexpr size_t kMaxApplyImages = 1000;
constexpr size_t kMaxApplySnapshots = 64;  // snapshot names per container entry
constexpr size_t kMaxApplyLabels = 64;     // labels per container entry
constexpr size_t kMaxApplySpecBytes = 16 << 20;
// The label of the containers a spec manages; its value is the spec's name. Spec labels may
// not use the "layer/" prefix.
constexpr const char* kApplySpecLabel = "layer/spec";

struct ImageSpec {
  std::string field;                   // "images[0]": where it is in the spec, for messages
  std::string ref;                     // NAME:VER
  std::string file;                    // made absolute against the spec's directory
  std::optional<uint32_t> block_size;  // given: an existing image must have it
  std::string description;
};

struct ContainerSpec {
  std::string field;  // "containers[1]", with the index for count entries: "containers[1]#3"
  std::string name;
  std::string image;                          // NAME:VER
  std::optional<uint64_t> size_bytes;         // given: an existing container must have it
  Resources resources;                        // base values; timed overrides are not managed
  std::map<std::string, std::string> labels;  // kApplySpecLabel not included
  std::vector<std::string> snapshots;         // to have, taken in this order when missing
};

struct Spec {
  std::string name = "default";  // the spec's name: the value of kApplySpecLabel
  std::vector<ImageSpec> images;
  std::vector<ContainerSpec> containers;  // counts expanded, in spec order
};

// Parses and checks a spec. `base_dir` is the directory relative image files are found in
// (the spec file's). Errors: EINVAL "FIELD: reason" (not JSON, an unknown or duplicate field,
// a wrong type, a bad name, size, resource or label, a duplicate name, count or totals over the
// limits above).
Result<Spec> parse_spec(std::string_view text, const std::string& base_dir);

// The spec in canonical form (counts expanded, sizes in bytes, cpu as text): parse_spec of its
// dump gives the same Spec back.
nlohmann::ordered_json spec_to_json(const Spec& spec);

// What make_plan needs of a pool.
struct PoolState {
  struct Image {
    uint64_t size_bytes = 0;
    uint32_t block_size = 0;
  };
  struct Container {
    ContainerRecord record;
    std::set<std::string> snapshots;
    std::optional<std::string> served_by;  // "pid N" while a server holds it
  };
  std::map<std::string, Image> images;
  std::map<std::string, Container> containers;
};
// One read transaction over images, containers and snapshots, and the container locks.
// Errors: EIO.
Result<PoolState> observe_pool(Pool& pool);

struct ApplyStep {
  enum class Kind { kImport, kCreate, kResources, kLabels, kSnapshot, kRemove };
  Kind kind = Kind::kImport;
  std::string field;                       // the spec field it comes from ("" for a removal)
  ImageSpec image;                         // kImport
  ContainerSpec container;                 // kCreate: as created (labels with kApplySpecLabel)
  std::string target;                      // the container's name (the image's ref for kImport)
  std::string snapshot;                    // kSnapshot
  Resources resources_from, resources_to;  // kResources
  std::map<std::string, std::string> labels_from, labels_to;  // kLabels
  bool new_container = false;            // kSnapshot of a container this plan creates
  std::optional<std::string> served_by;  // the container is served: done live by its server
};
const char* to_string(ApplyStep::Kind kind);

struct ApplyPlan {
  std::string spec;  // the spec's name
  std::vector<ApplyStep> steps;
  bool empty() const { return steps.empty(); }
};

struct PlanOptions {
  bool prune = false;       // remove the containers of this spec that it no longer names
  bool check_files = true;  // stat the image files to import (their size is the image's)
};
// The steps that make `state` match `spec`, in execution order. Errors (nothing planned):
// ENOENT (a container's image is neither in the pool nor in the spec; an image file to import
// is missing), EINVAL (an image file whose size is not a positive multiple of 512; a
// container that exists on another image or with another size; one that another spec manages;
// an image that exists with another block size; a size below its image's), EBUSY (--prune
// would remove a served container).
Result<ApplyPlan> make_plan(const Spec& spec, const PoolState& state, const PlanOptions& options);

// The changes execute_plan makes, one call each; PoolApplyActions does them on a Pool, the
// CLI routes those of served containers to their server.
class ApplyActions {
 public:
  virtual ~ApplyActions() = default;
  virtual Status import_image(const ImageSpec& image) = 0;
  // A new container with c's image, size, resources and labels (one transaction).
  virtual Status create(const ContainerSpec& c) = 0;
  virtual Status set_resources(const std::string& container, const Resources& to) = 0;
  virtual Status set_labels(const std::string& container,
                            const std::map<std::string, std::string>& to) = 0;
  virtual Status snapshot(const std::string& container, const std::string& name) = 0;
  virtual Status remove_snapshot(const std::string& container, const std::string& name) = 0;
  virtual Status remove_container(const std::string& name) = 0;
  virtual Status remove_image(const std::string& ref) = 0;
};

// The offline actions: lib/ calls on `pool` (snapshots under the container's exclusive lock:
// EBUSY when a server holds it). set_resources sets the base values and keeps a time-bounded
// change of the others.
class PoolApplyActions : public ApplyActions {
 public:
  explicit PoolApplyActions(Pool& pool) : pool_(pool) {}
  Status import_image(const ImageSpec& image) override;
  Status create(const ContainerSpec& c) override;
  Status set_resources(const std::string& container, const Resources& to) override;
  Status set_labels(const std::string& container,
                    const std::map<std::string, std::string>& to) override;
  Status snapshot(const std::string& container, const std::string& name) override;
  Status remove_snapshot(const std::string& container, const std::string& name) override;
  Status remove_container(const std::string& name) override;
  Status remove_image(const std::string& ref) override;

 protected:
  Pool& pool_;
};

struct ApplyOutcome {
  size_t done = 0;                      // steps done (and not undone)
  std::vector<std::string> undone;      // "removed container web1", ...
  std::vector<std::string> not_undone;  // undo steps that failed, with their error
};
// Runs plan's steps in order. When step k fails: undoes steps k-1..0 in reverse (a removal
// cannot be undone and is left as done), fills *outcome and returns step k's error, its
// message prefixed with the step ("create web3 (containers[2]): ...") and followed by what
// was undone, or not. `progress` (may be empty) is called before each step.
Status execute_plan(const ApplyPlan& plan, ApplyActions& actions, ApplyOutcome* outcome,
                    const std::function<void(const ApplyStep&)>& progress = {});

// "import busybox:1", "create web1", "snapshot web1@base": a step in a message.
std::string describe(const ApplyStep& step);

}  // namespace layer
