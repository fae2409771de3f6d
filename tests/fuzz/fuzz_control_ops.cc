// fuzz_control_ops.cc — libFuzzer target: the plugin's control requests (plugin/control_ops.cc,
// handle_control) on a real pool: what a server does when something on its control socket asks
// for a snapshot, rollback, commit, flatten, snapshot rm, merge or tier move.
//
// Input: either one JSON request (when it starts with '{'; other JSON, and what is not JSON,
// is fuzz_control's business and skipped), or, for any other first byte, the choices that build
// one (request_from below): each known key absent, or a value of some JSON type, drawn from
// the names the pool holds or not; so that every op meets every wrong type of every field
// within seconds, which raw JSON mutation seldom reaches.
// The pool lives in a temp dir for the whole run: image "base:1" (1 MiB), container "c0" on it
// with snapshot "s0", container "c1" on "c0@s0". Requests change it for real; after
// kMaxChanges requests that did, it is made afresh, so runs stay fast and a crash seldom
// depends on more than the last few hundred inputs. (A crash that needs the state a run built
// may not repeat from its input alone: run the corpus again, or -runs with the input.)
//
// Properties, beyond no crash, leak or undefined behaviour:
// - the handler answers every request with an object whose "ok" is a boolean; an error reply
//   has a positive "code", its "errno" and a message (control_status reads it back so);
// - no exception leaves the handler (one would reach the client as EIO: a request with a field
//   of the wrong type must be EINVAL);
// - a request with a field its op reads (docs/cli-spec.md) of the wrong type fails with EINVAL:
//   it is neither done as if the field were absent nor refused for some other reason;
// - after a request that succeeded, fsck finds the pool consistent.
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <string_view>
#include <vector>

#include "control.h"
#include "control_ops.h"
#include "fsck.h"
#include "fuzz_util.h"
#include "import.h"
#include "qos.h"
#include "snapshots.h"

using namespace layer;
using nlohmann::json;

namespace {

constexpr int kMaxChanges = 200;

std::string temp_base() {
  const char* base = std::getenv("TMPDIR");
  return base && *base ? base : "/tmp";
}

template <typename T>
T must(Result<T> r, const char* what) {
  FUZZ_CHECK(r.ok(), std::string(what) + ": " + r.error().message);
  return std::move(r).value();
}
void must(Status s, const char* what) {
  FUZZ_CHECK(s.ok(), std::string(what) + ": " + s.error().message);
}

// A pool with two containers and a snapshot, made and removed by the fuzz target.
class World {
 public:
  World() { make(); }
  ~World() {
    clear();
    // What the run reached beyond the request checks (for scripts/fuzz's log).
    std::fprintf(
        stderr,
        "fuzz_control_ops: %llu requests changed a pool (each checked by fsck), %llu pools made\n",
        static_cast<unsigned long long>(total_changes_), static_cast<unsigned long long>(pools_));
  }

  layer_plugin::ControlContext context() { return {*pool_, *disks_, nullptr, limiters_}; }
  Pool& pool() { return *pool_; }
  void changed() {
    ++total_changes_;
    if (++changes_ >= kMaxChanges) {
      clear();
      make();
    }
  }

 private:
  void make() {
    std::string pattern = temp_base() + "/layer-fuzz-ops-XXXXXX";
    FUZZ_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp " + pattern);
    dir_ = pattern;
    const std::string root = dir_ + "/pool";
    must(Pool::create(root, "", ""), "Pool::create");
    pool_ = must(Pool::open(root, {}), "Pool::open");
    // 1 MiB: every other 4 KiB block holds data.
    const std::string image = dir_ + "/base.raw";
    const int fd = ::open(image.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FUZZ_CHECK(fd >= 0 && ::ftruncate(fd, 1 << 20) == 0, "create " + image);
    const std::string block(4096, 'x');
    for (off_t off = 0; off < (1 << 20); off += 8192)
      FUZZ_CHECK(::pwrite(fd, block.data(), block.size(), off) == 4096, "write " + image);
    ::close(fd);
    must(import_image(*pool_, "base:1", image, 4096, nullptr), "import base:1");
    std::filesystem::remove(image);
    must(pool_->clone("base:1", "c0", std::nullopt), "clone c0");
    must(snapshot_container(*pool_, "c0", "s0"), "snapshot c0@s0");
    must(pool_->clone("c0@s0", "c1", std::nullopt), "clone c1");
    disks_ = std::make_unique<DiskTable>(*pool_);
    changes_ = 0;
    ++pools_;
  }
  void clear() {
    disks_.reset();
    pool_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string dir_;
  std::unique_ptr<Pool> pool_;
  std::unique_ptr<DiskTable> disks_;
  LimiterTable limiters_;  // the "resources" requests apply to it
  int changes_ = 0;
  uint64_t total_changes_ = 0, pools_ = 0;
};

World& world() {
  static World w;
  return w;
}

// The fields each op reads, with their type: "layer" and "rate" unsigned numbers, the rest
// strings.
// A name of a field of `request`'s op that is present with another type, or nullptr.
const char* mistyped_field(const json& request) {
  static const std::map<std::string, std::vector<const char*>> fields = {
      {"snapshot", {"container", "name"}},
      {"rollback", {"container", "name", "keep_as"}},
      {"commit", {"container", "image", "description"}},
      {"flatten", {"container"}},
      {"snapshot-rm", {"container", "name"}},
      {"merge", {"container"}},
      {"move", {"layer", "tier", "container", "rate"}},
      {"moved", {"layer"}},
      {"resources", {"container"}},
      {"fold", {"container"}},
  };
  const auto op = request.find("op");
  if (op == request.end() || !op->is_string()) return nullptr;
  const auto it = fields.find(op->get<std::string>());
  if (it == fields.end()) return nullptr;
  for (const char* key : it->second) {
    const auto field = request.find(key);
    if (field == request.end()) continue;
    const bool ok = std::string_view(key) == "layer" || std::string_view(key) == "rate"
                        ? field->is_number_unsigned()
                        : field->is_string();
    if (!ok) return key;
  }
  return nullptr;
}

// A request built from the input's bytes: for each key a choice of absent, a likely value, any
// printable string, or a number, bool, null, array or object.
json request_from(fuzz::FuzzInput& in) {
  static const std::vector<std::pair<const char*, std::vector<const char*>>> keys = {
      {"op",
       {"snapshot", "rollback", "commit", "flatten", "snapshot-rm", "merge", "move", "moved",
        "resources", "fold"}},
      {"container", {"c0", "c1", "c2", "C0", ""}},
      {"name", {"s0", "s1", "k", "s0..s1", ""}},
      {"keep_as", {"k", "s0", "s1", ""}},
      {"image", {"base:1", "base:2", "new:1", "new", ""}},
      {"description", {"", "a description"}},
      {"layer", {"1", "3"}},  // a string: the wrong type (numbers: cases 3 and 4)
      {"tier", {"ssd", "hdd", "nvme"}},
      {"rate", {"64M"}},  // a string: the wrong type (numbers: cases 3 and 4)
  };
  json request = json::object();
  for (const auto& [key, likely] : keys) {
    switch (in.u8() % 10) {
      case 0:
        break;  // absent
      case 1:
        request[key] = likely[in.u8() % likely.size()];
        break;
      case 2: {
        std::string text(in.u8() % 16, ' ');
        for (char& c : text) c = static_cast<char>(0x20 + in.u8() % 0x5f);
        request[key] = text;
        break;
      }
      case 3:
        request[key] = static_cast<uint64_t>(in.u8() % 8);  // layer ids of a small pool
        break;
      case 4:
        request[key] = in.u64();
        break;
      case 5:
        request[key] = -static_cast<int64_t>(in.u8()) - 1;
        break;
      case 6:
        request[key] = static_cast<double>(in.u8()) + 0.5;
        break;
      case 7:
        request[key] = (in.u8() & 1) != 0;
        break;
      case 8:
        request[key] = nullptr;
        break;
      case 9:
        request[key] = in.u8() & 1 ? json::array({1}) : json::object({{"op", "merge"}});
        break;
    }
  }
  return request;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  json request;
  if (data[0] == '{') {
    try {
      request = json::parse(data, data + size);
    } catch (const json::exception&) {
      return 0;
    }
  } else {
    fuzz::FuzzInput in(data + 1, size - 1);
    request = request_from(in);
  }
  // A move paced at a few bytes per second takes days, as asked: not a hang to report. 64 MiB/s
  // copies the pool's 1 MiB layers in milliseconds.
  if (const auto rate = request.find("rate"); request.value("op", json()) == "move" &&
                                              rate != request.end() && rate->is_number_unsigned() &&
                                              *rate != 0 && *rate < (uint64_t{64} << 20))
    return 0;
  World& w = world();
  json reply;
  try {
    reply = layer_plugin::handle_control(w.context(), request);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, "handle_control threw on " + request.dump() + ": " + e.what());
  }
  FUZZ_CHECK(reply.is_object() && reply.contains("ok") && reply["ok"].is_boolean(),
             "a reply without a boolean ok: " + reply.dump());
  const Status status = control_status(reply);
  if (const char* key = mistyped_field(request))
    FUZZ_CHECK(!reply["ok"].get<bool>() && reply["code"] == EINVAL,
               std::string("a request whose \"") + key +
                   "\" has the wrong type: " + request.dump() + " -> " + reply.dump());
  if (!reply["ok"].get<bool>()) {
    FUZZ_CHECK(!status.ok() && status.error().code > 0,
               "an error reply control_status does not read");
    FUZZ_CHECK(reply.contains("code") && reply["code"].is_number_integer() &&
                   reply.contains("errno") && reply["errno"].is_string() &&
                   reply.contains("message") && reply["message"].is_string() &&
                   !reply["message"].get<std::string>().empty(),
               "an error reply without code, errno and message: " + reply.dump());
    return 0;
  }
  FUZZ_CHECK(status.ok(), "control_status refuses a success: " + reply.dump());
  const auto report = must(fsck(w.pool(), false, false), "fsck");
  std::string problems;
  for (const auto& p : report.problems) problems += "\n  " + p;
  FUZZ_CHECK(report.problems.empty(), "after " + request.dump() + ", fsck finds:" + problems);
  w.changed();
  return 0;
}
