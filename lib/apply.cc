// apply.cc — declarative provisioning: spec parsing, planning and execution (apply.h).
#include "apply.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "images.h"
#include "import.h"
#include "index.h"
#include "locks.h"
#include "names.h"
#include "pool.h"
#include "qos.h"
#include "snapshots.h"

namespace layer {
namespace {

using json = nlohmann::json;

// A bad spec: thrown inside this file's parser only, caught in parse_spec (no exception
// leaves lib/).
struct SpecError {
  std::string message;
};

// The message is one line whatever the spec quotes (escape_control).
[[noreturn]] void bad(const std::string& field, const std::string& reason) {
  throw SpecError{escape_control(field.empty() ? reason : field + ": " + reason)};
}

// A field's path below `parent`: "containers[0]" + "image" -> "containers[0].image".
std::string sub(const std::string& parent, std::string_view key) {
  return parent.empty() ? std::string(key) : parent + "." + std::string(key);
}

// (Appended piece by piece: GCC 12's -O3 reports a false -Wrestrict on `"\"" + str + "\""`.)
std::string in_quotes(std::string_view s) {
  std::string out = "\"";
  out += escape_control(s);
  out += '"';
  return out;
}

// A JSON value in a message: short, one line.
std::string shown(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return escape_control(s);
}

// Refuses every key of object `j` (at `field`) not in `known`.
void only_keys(const json& j, const std::string& field,
               std::initializer_list<std::string_view> known) {
  for (const auto& [key, value] : j.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      std::string names;
      for (auto k : known) names += (names.empty() ? "" : ", ") + std::string(k);
      bad(sub(field, escape_control(key)), "unknown field (expected one of: " + names + ")");
    }
  }
}

const json& need_type(const json& j, const std::string& field, json::value_t type,
                      const char* what) {
  if (j.type() != type && !(type == json::value_t::number_unsigned &&
                            j.type() == json::value_t::number_integer && j.get<int64_t>() >= 0))
    bad(field, fmt::format("expected {}, got {} {}", what, j.type_name(), shown(j)));
  return j;
}

std::string get_string(const json& j, const std::string& field) {
  return need_type(j, field, json::value_t::string, "a string").get<std::string>();
}

// A whole number in [lo, hi].
uint64_t get_count(const json& j, const std::string& field, uint64_t lo, uint64_t hi) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<int64_t>() >= 0))
    bad(field, fmt::format("expected a whole number from {} to {}, got {} {}", lo, hi,
                           j.type_name(), shown(j)));
  const uint64_t v = j.get<uint64_t>();
  if (v < lo || v > hi) bad(field, fmt::format("{} is out of range: expected {} to {}", v, lo, hi));
  return v;
}

// A size: bytes as a whole number, or text parse_size reads ("512M").
uint64_t get_size(const json& j, const std::string& field) {
  if (j.is_string()) {
    auto v = parse_size(j.get<std::string>());
    if (!v) bad(field, v.error().message);
    return *v;
  }
  if (j.is_number_unsigned() || (j.is_number_integer() && j.get<int64_t>() >= 0))
    return j.get<uint64_t>();
  bad(field, fmt::format("expected a size (bytes, or text such as \"512M\"), got {} {}",
                         j.type_name(), shown(j)));
}

// A resource value given as the CLI takes it: text through `parser`, or a number.
template <typename Parser>
uint64_t get_resource(const json& j, const std::string& field, Parser parser, bool fractions) {
  std::string text;
  if (j.is_string()) {
    text = j.get<std::string>();
  } else if (j.is_number_unsigned() || (j.is_number_integer() && j.get<int64_t>() >= 0)) {
    text = std::to_string(j.get<uint64_t>());
  } else if (fractions && j.is_number_float() && std::isfinite(j.get<double>()) &&
             j.get<double>() >= 0) {
    text = fmt::format("{}", j.get<double>());
  } else {
    bad(field, fmt::format("expected {}, got {} {}",
                           fractions ? "a number or text" : "a whole number or text", j.type_name(),
                           shown(j)));
  }
  auto v = parser(text);
  if (!v) bad(field, v.error().message);
  return *v;
}

Result<uint64_t> parse_bytes_or_none(std::string_view text) {
  if (text == "none") return uint64_t{0};
  return parse_size(text);
}

Resources parse_resources(const json& j, const std::string& field) {
  need_type(j, field, json::value_t::object, "an object");
  only_keys(j, field, {"cpu", "memory", "net", "iops", "bandwidth", "priority"});
  Resources r;
  if (j.contains("cpu")) r.cpu_millis = get_resource(j["cpu"], sub(field, "cpu"), parse_cpu, true);
  if (j.contains("memory"))
    r.memory_bytes = get_resource(j["memory"], sub(field, "memory"), parse_bytes_or_none, false);
  if (j.contains("net"))
    r.net_bps = get_resource(j["net"], sub(field, "net"), parse_bytes_or_none, false);
  if (j.contains("iops")) r.iops = get_resource(j["iops"], sub(field, "iops"), parse_count, false);
  if (j.contains("bandwidth"))
    r.bandwidth = get_resource(j["bandwidth"], sub(field, "bandwidth"), parse_bytes_or_none, false);
  if (j.contains("priority"))
    r.priority = static_cast<uint8_t>(get_count(j["priority"], sub(field, "priority"), 1, 10));
  return r;
}

void check_name(const std::string& name, const std::string& field, std::string_view what) {
  const Status s = validate_name(name, what);
  if (!s) bad(field, s.error().message);
}

std::string absolute_file(const std::string& file, const std::string& base_dir) {
  std::filesystem::path p(file);
  if (p.is_relative()) p = std::filesystem::path(base_dir.empty() ? "." : base_dir) / p;
  std::error_code ec;
  auto abs = std::filesystem::absolute(p, ec);
  return (ec ? p : abs).lexically_normal().string();
}

ImageSpec parse_image(const json& j, const std::string& field, const std::string& base_dir) {
  need_type(j, field, json::value_t::object, "an object");
  only_keys(j, field, {"ref", "file", "block_size", "description"});
  ImageSpec img;
  img.field = field;
  if (!j.contains("ref")) bad(sub(field, "ref"), "missing (the image's NAME:VERSION)");
  img.ref = get_string(j["ref"], sub(field, "ref"));
  if (const Status s = validate_image_ref(img.ref); !s) bad(sub(field, "ref"), s.error().message);
  if (!j.contains("file")) bad(sub(field, "file"), "missing (the raw image file to import)");
  const std::string file = get_string(j["file"], sub(field, "file"));
  if (file.empty()) bad(sub(field, "file"), "must not be empty");
  if (file.find('\0') != std::string::npos) bad(sub(field, "file"), "holds a NUL byte");
  img.file = absolute_file(file, base_dir);
  if (j.contains("block_size")) {
    const uint64_t bs = get_size(j["block_size"], sub(field, "block_size"));
    if (bs < kMinBlockSize || bs > kMaxBlockSize || (bs & (bs - 1)) != 0)
      bad(sub(field, "block_size"),
          fmt::format("{} is not a power of two from 4K to 1M", shown(j["block_size"])));
    img.block_size = static_cast<uint32_t>(bs);
  }
  if (j.contains("description"))
    img.description = get_string(j["description"], sub(field, "description"));
  return img;
}

// The name of count entry number `n` (from `start`): the pattern with "{i}" replaced.
std::string expand(const std::string& pattern, uint64_t n) {
  const size_t at = pattern.find("{i}");
  return pattern.substr(0, at) + std::to_string(n) + pattern.substr(at + 3);
}

void parse_container(const json& j, const std::string& field, std::vector<ContainerSpec>* out) {
  need_type(j, field, json::value_t::object, "an object");
  only_keys(j, field,
            {"name", "count", "start", "image", "size", "resources", "labels", "snapshots"});
  ContainerSpec c;
  c.field = field;
  if (!j.contains("name")) bad(sub(field, "name"), "missing (the container's name)");
  const std::string name = get_string(j["name"], sub(field, "name"));
  if (!j.contains("image")) bad(sub(field, "image"), "missing (the image's NAME:VERSION)");
  c.image = get_string(j["image"], sub(field, "image"));
  if (const Status s = validate_image_ref(c.image); !s) bad(sub(field, "image"), s.error().message);
  if (j.contains("size")) {
    const uint64_t size = get_size(j["size"], sub(field, "size"));
    if (size == 0 || size % 512 != 0)
      bad(sub(field, "size"), fmt::format("{} is not a positive multiple of 512 bytes", size));
    if (size > kMaxDiskBytes)
      bad(sub(field, "size"), fmt::format("{} is larger than the limit of 16 TiB", size));
    c.size_bytes = size;
  }
  if (j.contains("resources"))
    c.resources = parse_resources(j["resources"], sub(field, "resources"));
  if (j.contains("labels")) {
    const std::string lf = sub(field, "labels");
    need_type(j["labels"], lf, json::value_t::object, "an object of strings");
    if (j["labels"].size() > kMaxApplyLabels)
      bad(lf, fmt::format("{} labels, more than {}", j["labels"].size(), kMaxApplyLabels));
    for (const auto& [key, value] : j["labels"].items()) {
      const std::string kf = sub(lf, escape_control(key));
      const std::string v = get_string(value, kf);
      if (key.starts_with("layer/"))
        bad(kf, "the prefix \"layer/\" is reserved (apply sets layer/spec itself)");
      if (const Status s = validate_label(key, v); !s) bad(kf, s.error().message);
      c.labels[key] = v;
    }
  }
  if (j.contains("snapshots")) {
    const std::string sf = sub(field, "snapshots");
    need_type(j["snapshots"], sf, json::value_t::array, "an array of snapshot names");
    if (j["snapshots"].size() > kMaxApplySnapshots)
      bad(sf, fmt::format("{} snapshots, more than {}", j["snapshots"].size(), kMaxApplySnapshots));
    for (size_t i = 0; i < j["snapshots"].size(); ++i) {
      const std::string f = fmt::format("{}[{}]", sf, i);
      const std::string s = get_string(j["snapshots"][i], f);
      check_name(s, f, "snapshot name");
      if (std::find(c.snapshots.begin(), c.snapshots.end(), s) != c.snapshots.end())
        bad(f, fmt::format("snapshot {} is listed twice", in_quotes(s)));
      c.snapshots.push_back(s);
    }
  }
  const bool has_pattern = name.find("{i}") != std::string::npos;
  if (!j.contains("count")) {
    if (j.contains("start")) bad(sub(field, "start"), "only with count");
    if (has_pattern) bad(sub(field, "name"), "a name with {i} needs count");
    check_name(name, sub(field, "name"), "container name");
    c.name = name;
    out->push_back(std::move(c));
    return;
  }
  const uint64_t count = get_count(j["count"], sub(field, "count"), 0, kMaxApplyCount);
  uint64_t start = 1;
  if (j.contains("start")) start = get_count(j["start"], sub(field, "start"), 0, 1'000'000);
  if (!has_pattern || name.find("{i}", name.find("{i}") + 3) != std::string::npos)
    bad(sub(field, "name"),
        fmt::format("with count, the name is a pattern holding {{i}} once (e.g. \"web-{{i}}\"), "
                    "not {}",
                    in_quotes(name)));
  // Checked with the first number even when count is 0 (each name made is checked below).
  check_name(expand(name, start), sub(field, "name"), "container name");
  if (out->size() + count > kMaxApplyContainers)
    bad(sub(field, "count"), fmt::format("the spec would name {} containers, more than {}",
                                         out->size() + count, kMaxApplyContainers));
  for (uint64_t n = start; n < start + count; ++n) {
    ContainerSpec one = c;
    one.name = expand(name, n);
    one.field = fmt::format("{}#{}", field, n);
    check_name(one.name, sub(field, "name"), "container name");
    out->push_back(std::move(one));
  }
}

// nlohmann keeps the last of two equal keys; a spec that says a thing twice is refused.
json parse_json(std::string_view text) {
  if (text.size() > kMaxApplySpecBytes)
    bad("", fmt::format("the spec is {} bytes, more than {}", text.size(), kMaxApplySpecBytes));
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  const json::parser_callback_t callback = [&](int /*depth*/, json::parse_event_t event,
                                               json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty() && parsed.is_string()) {
      if (!keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    std::string what = e.what();
    // "[json.exception.parse_error.101] parse error at line 1, column 2: ...": the reason only.
    if (const size_t at = what.find("] "); what.starts_with("[json.") && at != std::string::npos)
      what = what.substr(at + 2);
    bad("", "not valid JSON: " + escape_control(what));
  }
  if (!duplicate.empty())
    bad("", fmt::format("the key {} appears twice in one object", in_quotes(duplicate)));
  return j;
}

Spec parse(std::string_view text, const std::string& base_dir) {
  const json j = parse_json(text);
  need_type(j, "", json::value_t::object, "the spec to be a JSON object");
  only_keys(j, "", {"version", "name", "images", "containers"});
  if (!j.contains("version"))
    bad("version", fmt::format("missing (this build reads {})", kApplySpecVersion));
  if (get_count(j["version"], "version", 1, UINT64_MAX) != kApplySpecVersion)
    bad("version", fmt::format("{} is not a spec version this build reads ({})",
                               shown(j["version"]), kApplySpecVersion));
  Spec spec;
  if (j.contains("name")) {
    spec.name = get_string(j["name"], "name");
    check_name(spec.name, "name", "spec name");
  }
  if (j.contains("images")) {
    need_type(j["images"], "images", json::value_t::array, "an array");
    if (j["images"].size() > kMaxApplyImages)
      bad("images", fmt::format("{} images, more than {}", j["images"].size(), kMaxApplyImages));
    for (size_t i = 0; i < j["images"].size(); ++i) {
      ImageSpec img = parse_image(j["images"][i], fmt::format("images[{}]", i), base_dir);
      for (const auto& other : spec.images)
        if (other.ref == img.ref)
          bad(sub(img.field, "ref"), fmt::format("image {} is also {}", img.ref, other.field));
      spec.images.push_back(std::move(img));
    }
  }
  if (j.contains("containers")) {
    need_type(j["containers"], "containers", json::value_t::array, "an array");
    if (j["containers"].size() > kMaxApplyContainers)
      bad("containers",
          fmt::format("{} entries, more than {}", j["containers"].size(), kMaxApplyContainers));
    for (size_t i = 0; i < j["containers"].size(); ++i)
      parse_container(j["containers"][i], fmt::format("containers[{}]", i), &spec.containers);
  }
  std::map<std::string, const ContainerSpec*> seen;
  for (const auto& c : spec.containers) {
    auto [it, fresh] = seen.emplace(c.name, &c);
    if (!fresh) {
      const std::string field = c.field.substr(0, c.field.find('#'));
      const std::string other = it->second->field.substr(0, it->second->field.find('#'));
      bad(sub(field, "name"),
          fmt::format("container {} is also named by {}", in_quotes(c.name), other));
    }
  }
  return spec;
}

// The field of a spec entry for messages: "containers[1]" (count entries share it).
std::string entry(const std::string& field) { return field.substr(0, field.find('#')); }
std::string entry(const ContainerSpec& c) { return entry(c.field); }

json resources_json(const Resources& r) {
  json j = json::object();
  if (r.cpu_millis) j["cpu"] = format_cpu(r.cpu_millis);
  if (r.memory_bytes) j["memory"] = r.memory_bytes;
  if (r.net_bps) j["net"] = r.net_bps;
  if (r.iops) j["iops"] = r.iops;
  if (r.bandwidth) j["bandwidth"] = r.bandwidth;
  if (r.priority != Resources::kDefaultPriority) j["priority"] = r.priority;
  return j;
}

// The base values apply manages (not the time-bounded override).
bool same_base(const Resources& a, const Resources& b) {
  return a.cpu_millis == b.cpu_millis && a.memory_bytes == b.memory_bytes &&
         a.net_bps == b.net_bps && a.iops == b.iops && a.bandwidth == b.bandwidth &&
         a.priority == b.priority;
}

}  // namespace

Result<Spec> parse_spec(std::string_view text, const std::string& base_dir) {
  try {
    return parse(text, base_dir);
  } catch (const SpecError& e) {
    return Error{EINVAL, e.message};
  } catch (const std::exception& e) {
    // A parser surprise is still a bad spec, never an exception out of lib/.
    return make_error(EINVAL, "bad spec: {}", e.what());
  }
}

nlohmann::ordered_json spec_to_json(const Spec& spec) {
  nlohmann::ordered_json j;
  j["version"] = kApplySpecVersion;
  j["name"] = spec.name;
  j["images"] = nlohmann::ordered_json::array();
  for (const auto& img : spec.images) {
    nlohmann::ordered_json i{{"ref", img.ref}, {"file", img.file}};
    if (img.block_size) i["block_size"] = *img.block_size;
    if (!img.description.empty()) i["description"] = img.description;
    j["images"].push_back(std::move(i));
  }
  j["containers"] = nlohmann::ordered_json::array();
  for (const auto& c : spec.containers) {
    nlohmann::ordered_json o{{"name", c.name}, {"image", c.image}};
    if (c.size_bytes) o["size"] = *c.size_bytes;
    const json r = resources_json(c.resources);
    if (!r.empty()) o["resources"] = r;
    if (!c.labels.empty()) o["labels"] = c.labels;
    if (!c.snapshots.empty()) o["snapshots"] = c.snapshots;
    j["containers"].push_back(std::move(o));
  }
  return j;
}

Result<PoolState> observe_pool(Pool& pool) {
  PoolState state;
  std::map<uint64_t, std::string> by_id;
  {
    LAYER_ASSIGN(auto txn, pool.index().begin_read());
    LAYER_TRY(
        txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto img, decode_image(v, k));
          state.images[std::string(k)] = {img.size_bytes, img.block_size};
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto rec, decode_container(v, k));
          by_id[rec.id] = rec.name;
          state.containers[std::string(k)].record = std::move(rec);
          return true;
        }));
    LAYER_TRY(
        txn.scan(Db::kSnapshots, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
          LAYER_ASSIGN(auto snap, decode_snapshot(v, k));
          auto it = by_id.find(snap.container_id);
          if (it != by_id.end()) state.containers[it->second].snapshots.insert(snap.name);
          return true;
        }));
  }
  for (auto& [name, c] : state.containers) {
    LAYER_ASSIGN(const bool served, pool.locks().is_locked(LockKind::kContainer, c.record.id));
    if (served) {
      std::string holder = pool.locks().holder_of(c.record.id);
      c.served_by = holder.empty() ? "another process" : holder;
    }
  }
  return state;
}

const char* to_string(ApplyStep::Kind kind) {
  switch (kind) {
    case ApplyStep::Kind::kImport:
      return "import";
    case ApplyStep::Kind::kCreate:
      return "create";
    case ApplyStep::Kind::kResources:
      return "resources";
    case ApplyStep::Kind::kLabels:
      return "labels";
    case ApplyStep::Kind::kSnapshot:
      return "snapshot";
    case ApplyStep::Kind::kRemove:
      return "remove";
  }
  return "?";
}

std::string describe(const ApplyStep& step) {
  if (step.kind == ApplyStep::Kind::kSnapshot)
    return fmt::format("snapshot {}@{}", step.target, step.snapshot);
  return fmt::format("{} {}", to_string(step.kind), step.target);
}

Result<ApplyPlan> make_plan(const Spec& spec, const PoolState& state, const PlanOptions& options) {
  ApplyPlan plan;
  plan.spec = spec.name;
  std::vector<ApplyStep> imports, creates, resources, labels, snapshots, removals;
  // The size of every image a container may use: in the pool, or to be imported.
  std::map<std::string, uint64_t> image_size;
  for (const auto& [ref, img] : state.images) image_size[ref] = img.size_bytes;
  for (const auto& img : spec.images) {
    auto it = state.images.find(img.ref);
    if (it != state.images.end()) {
      if (img.block_size && *img.block_size != it->second.block_size)
        return make_error(EINVAL,
                          "{}.block_size: image {} exists with block size {}, not {} (apply does "
                          "not re-import an image: remove it first)",
                          img.field, img.ref, it->second.block_size, *img.block_size);
      continue;
    }
    if (options.check_files) {
      struct stat st {};
      if (::stat(img.file.c_str(), &st) != 0) {
        const int err = errno;
        Error e = sys_error(err, "{}.file: {}", img.field, escape_control(img.file));
        e.code = err == ENOENT || err == EACCES || err == ENAMETOOLONG ? err : EINVAL;
        return e;
      }
      if (S_ISREG(st.st_mode)) {
        const auto size = static_cast<uint64_t>(st.st_size);
        if (size == 0 || size % 512 != 0)
          return make_error(EINVAL,
                            "{}.file: {}: its size, {} bytes, is not a positive multiple of 512",
                            img.field, escape_control(img.file), size);
        image_size[img.ref] = size;
      } else if (!S_ISBLK(st.st_mode)) {
        return make_error(EINVAL, "{}.file: {}: not a regular file or a block device", img.field,
                          escape_control(img.file));
      }
    }
    ApplyStep s;
    s.kind = ApplyStep::Kind::kImport;
    s.field = img.field;
    s.image = img;
    s.target = img.ref;
    imports.push_back(std::move(s));
  }
  std::set<std::string> named;
  for (const auto& c : spec.containers) {
    named.insert(c.name);
    const std::string field = entry(c);
    const bool image_known = state.images.contains(c.image) ||
                             std::any_of(spec.images.begin(), spec.images.end(),
                                         [&](const ImageSpec& i) { return i.ref == c.image; });
    auto desired_labels = c.labels;
    desired_labels[kApplySpecLabel] = spec.name;
    auto it = state.containers.find(c.name);
    if (it == state.containers.end()) {
      if (!image_known)
        return make_error(ENOENT,
                          "{}.image: image {} is neither in the pool nor in the spec's images "
                          "(container {})",
                          field, c.image, in_quotes(c.name));
      auto size = image_size.find(c.image);
      if (c.size_bytes && size != image_size.end() && *c.size_bytes < size->second)
        return make_error(EINVAL, "{}.size: {} is smaller than image {} ({} bytes)", field,
                          *c.size_bytes, c.image, size->second);
      ApplyStep s;
      s.kind = ApplyStep::Kind::kCreate;
      s.field = c.field;
      s.target = c.name;
      s.container = c;
      s.container.labels = desired_labels;
      creates.push_back(std::move(s));
      for (const auto& snap : c.snapshots) {
        ApplyStep t;
        t.kind = ApplyStep::Kind::kSnapshot;
        t.field = c.field;
        t.target = c.name;
        t.snapshot = snap;
        t.new_container = true;
        snapshots.push_back(std::move(t));
      }
      continue;
    }
    const auto& have = it->second;
    const auto& rec = have.record;
    auto owner = rec.labels.find(kApplySpecLabel);
    if (owner != rec.labels.end() && owner->second != spec.name)
      return make_error(EINVAL, "{}.name: container {} is managed by spec {}, not {}", field,
                        in_quotes(c.name), in_quotes(owner->second), in_quotes(spec.name));
    if (rec.image_ref != c.image)
      return make_error(EINVAL,
                        "{}.image: container {} exists on image {}, not {} (apply does not "
                        "re-create a container: remove it first, or name its image)",
                        field, in_quotes(c.name),
                        rec.image_ref.empty() ? "- (flattened)" : rec.image_ref, c.image);
    if (c.size_bytes && *c.size_bytes != rec.size_bytes)
      return make_error(EINVAL,
                        "{}.size: container {} exists with size {} bytes, not {} (apply does not "
                        "resize)",
                        field, in_quotes(c.name), rec.size_bytes, *c.size_bytes);
    if (!same_base(rec.resources, c.resources)) {
      ApplyStep s;
      s.kind = ApplyStep::Kind::kResources;
      s.field = c.field;
      s.target = c.name;
      s.resources_from = rec.resources;
      s.resources_to = rec.resources;
      s.resources_to.cpu_millis = c.resources.cpu_millis;
      s.resources_to.memory_bytes = c.resources.memory_bytes;
      s.resources_to.net_bps = c.resources.net_bps;
      s.resources_to.iops = c.resources.iops;
      s.resources_to.bandwidth = c.resources.bandwidth;
      s.resources_to.priority = c.resources.priority;
      s.served_by = have.served_by;
      resources.push_back(std::move(s));
    }
    if (rec.labels != desired_labels) {
      ApplyStep s;
      s.kind = ApplyStep::Kind::kLabels;
      s.field = c.field;
      s.target = c.name;
      s.labels_from = rec.labels;
      s.labels_to = desired_labels;
      labels.push_back(std::move(s));
    }
    for (const auto& snap : c.snapshots) {
      if (have.snapshots.contains(snap)) continue;
      ApplyStep t;
      t.kind = ApplyStep::Kind::kSnapshot;
      t.field = c.field;
      t.target = c.name;
      t.snapshot = snap;
      t.served_by = have.served_by;
      snapshots.push_back(std::move(t));
    }
  }
  if (options.prune) {
    for (const auto& [name, have] : state.containers) {
      auto owner = have.record.labels.find(kApplySpecLabel);
      if (owner == have.record.labels.end() || owner->second != spec.name || named.contains(name))
        continue;
      if (have.served_by)
        return make_error(EBUSY,
                          "--prune: container {} is served ({}): stop serving it, or name it in "
                          "the spec",
                          in_quotes(name), *have.served_by);
      ApplyStep s;
      s.kind = ApplyStep::Kind::kRemove;
      s.target = name;
      removals.push_back(std::move(s));
    }
  }
  for (auto* group : {&imports, &creates, &resources, &labels, &snapshots, &removals})
    for (auto& s : *group) plan.steps.push_back(std::move(s));
  return plan;
}

// ---- execution ----

Status PoolApplyActions::import_image(const ImageSpec& image) {
  auto r = layer::import_image(pool_, image.ref, image.file,
                               image.block_size.value_or(kDefaultBlockSize), {}, image.description);
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::create(const ContainerSpec& c) {
  auto r = pool_.clone(c.image, c.name, c.size_bytes, c.resources, c.labels);
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::set_resources(const std::string& container, const Resources& to) {
  ResourceChange change;
  change.cpu_millis = to.cpu_millis;
  change.memory_bytes = to.memory_bytes;
  change.net_bps = to.net_bps;
  change.iops = to.iops;
  change.bandwidth = to.bandwidth;
  change.priority = to.priority;
  auto r = change_resources(pool_, container, change, now_unix_ms());
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::set_labels(const std::string& container,
                                    const std::map<std::string, std::string>& to) {
  auto r = pool_.set_labels(container, to);
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::snapshot(const std::string& container, const std::string& name) {
  LAYER_ASSIGN(const auto rec, [&]() -> Result<ContainerRecord> {
    LAYER_ASSIGN(auto txn, pool_.index().begin_read());
    return pool_.get_container(txn, container);
  }());
  // snapshot_container REQUIRES the container's exclusive lock (no server writes meanwhile).
  LAYER_ASSIGN(Lock lock, pool_.locks().try_lock(LockKind::kContainer, rec.id, true,
                                                 fmt::format("container \"{}\"", container)));
  auto r = snapshot_container(pool_, container, name);
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::remove_snapshot(const std::string& container, const std::string& name) {
  auto r = layer::remove_snapshot(pool_, container, name);
  if (!r) return std::move(r).error();
  return {};
}

Status PoolApplyActions::remove_container(const std::string& name) {
  return pool_.remove_container(name);
}

Status PoolApplyActions::remove_image(const std::string& ref) {
  return layer::remove_image(pool_, ref);
}

Status execute_plan(const ApplyPlan& plan, ApplyActions& actions, ApplyOutcome* outcome,
                    const std::function<void(const ApplyStep&)>& progress) {
  ApplyOutcome local;
  ApplyOutcome& out = outcome != nullptr ? *outcome : local;
  out = {};
  auto run = [&](const ApplyStep& s) -> Status {
    switch (s.kind) {
      case ApplyStep::Kind::kImport:
        return actions.import_image(s.image);
      case ApplyStep::Kind::kCreate:
        return actions.create(s.container);
      case ApplyStep::Kind::kResources:
        return actions.set_resources(s.target, s.resources_to);
      case ApplyStep::Kind::kLabels:
        return actions.set_labels(s.target, s.labels_to);
      case ApplyStep::Kind::kSnapshot:
        return actions.snapshot(s.target, s.snapshot);
      case ApplyStep::Kind::kRemove:
        return actions.remove_container(s.target);
    }
    return make_error(EINVAL, "unknown step");
  };
  // What undoes a done step, and its words; none for removals and for snapshots of the
  // containers this run created (their removal takes them).
  auto undo = [&](const ApplyStep& s) -> std::optional<std::pair<std::string, Status>> {
    switch (s.kind) {
      case ApplyStep::Kind::kImport:
        return std::pair{"removed image " + s.target, actions.remove_image(s.target)};
      case ApplyStep::Kind::kCreate:
        return std::pair{"removed container " + s.target, actions.remove_container(s.target)};
      case ApplyStep::Kind::kResources:
        return std::pair{"put back the resources of " + s.target,
                         actions.set_resources(s.target, s.resources_from)};
      case ApplyStep::Kind::kLabels:
        return std::pair{"put back the labels of " + s.target,
                         actions.set_labels(s.target, s.labels_from)};
      case ApplyStep::Kind::kSnapshot:
        if (s.new_container) return std::nullopt;
        return std::pair{fmt::format("removed snapshot {}@{}", s.target, s.snapshot),
                         actions.remove_snapshot(s.target, s.snapshot)};
      case ApplyStep::Kind::kRemove:
        return std::nullopt;
    }
    return std::nullopt;
  };
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    const ApplyStep& step = plan.steps[i];
    if (progress) progress(step);
    Status status = run(step);
    if (status) {
      ++out.done;
      continue;
    }
    Error error = std::move(status).error();
    size_t removals_done = 0;
    for (size_t k = i; k-- > 0;) {
      if (plan.steps[k].kind == ApplyStep::Kind::kRemove) {
        ++removals_done;
        continue;
      }
      auto u = undo(plan.steps[k]);
      if (!u) continue;
      if (u->second) {
        out.undone.push_back(u->first);
      } else {
        out.not_undone.push_back(
            fmt::format("{}: {}", describe(plan.steps[k]), u->second.error().message));
      }
    }
    out.done = removals_done;
    std::string message =
        fmt::format("{}{}: {}", describe(step),
                    step.field.empty() ? "" : " (" + entry(step.field) + ")", error.message);
    if (out.undone.empty() && out.not_undone.empty() && removals_done == 0) {
      message += "; nothing was changed";
    } else {
      // At most a few named: a message stays one readable line.
      auto list = [](const std::vector<std::string>& items) {
        std::string text;
        for (size_t n = 0; n < items.size() && n < 5; ++n) text += (n ? ", " : "") + items[n];
        if (items.size() > 5) text += fmt::format(" and {} more", items.size() - 5);
        return text;
      };
      if (!out.undone.empty()) message += "; undone: " + list(out.undone);
      if (removals_done != 0)
        message += fmt::format("; {} containers removed by --prune stay removed", removals_done);
      if (!out.not_undone.empty()) message += "; NOT undone: " + list(out.not_undone);
    }
    error.message = std::move(message);
    return error;
  }
  return {};
}

}  // namespace layer
