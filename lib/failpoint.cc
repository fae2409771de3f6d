// failpoint.cc — LAYER_FAILPOINT, read once.
#include "failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace layer {
namespace {

struct Armed {
  std::string name;  // empty: none
  uint64_t nth = 1;
  std::atomic<uint64_t> passes{0};

  Armed() {
    const char* env = std::getenv("LAYER_FAILPOINT");
    if (env == nullptr) return;
    std::string_view spec(env);
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

const Armed& armed() {
  static Armed a;  // thread-safe initialisation
  return a;
}

}  // namespace

void failpoint(std::string_view point) {
  const Armed& a = armed();
  if (a.name.empty() || point != a.name) return;
  if (const_cast<Armed&>(a).passes.fetch_add(1, std::memory_order_relaxed) + 1 == a.nth)
    ::kill(::getpid(), SIGKILL);
}

}  // namespace layer
