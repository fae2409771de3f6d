// failpoint.cc — LAYER_FAILPOINT, read at the first point and again at each rearm.
#include "failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace layer {
namespace {

struct Armed {
  std::string name;
  uint64_t nth = 1;
  std::atomic<uint64_t> passes{0};

  explicit Armed(std::string_view spec) {
    if (const auto at = spec.rfind('@'); at != std::string_view::npos) {
      char* end = nullptr;
      const std::string count(spec.substr(at + 1));
      const unsigned long long n = std::strtoull(count.c_str(), &end, 10);
      if (!count.empty() && *end == '\0' && n > 0) {
        nth = n;
        spec = spec.substr(0, at);
      }
    }
    name = std::string(spec);
  }
};

Armed* from_env() {
  const char* env = std::getenv("LAYER_FAILPOINT");
  if (env == nullptr || *env == '\0') return nullptr;
  // Replaced ones stay reachable (a thread may still be reading one): rearming is for tests.
  static std::mutex mu;
  static std::vector<std::unique_ptr<Armed>> all;
  std::lock_guard lock(mu);
  return all.emplace_back(std::make_unique<Armed>(env)).get();
}

std::atomic<Armed*>& armed() {
  static std::atomic<Armed*> a{from_env()};  // thread-safe initialisation
  return a;
}

}  // namespace

void failpoint(std::string_view point) {
  Armed* a = armed().load(std::memory_order_acquire);
  if (a == nullptr || point != a->name) return;
  if (a->passes.fetch_add(1, std::memory_order_relaxed) + 1 == a->nth) ::kill(::getpid(), SIGKILL);
}

void rearm_failpoint() { armed().store(from_env(), std::memory_order_release); }

}  // namespace layer
