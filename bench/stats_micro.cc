// bench/stats_micro.cc — what counting one request in the I/O history costs the thread that
// serves it (docs/stats.md "Cost, measured"): the plugin's two CLOCK_MONOTONIC reads and
// IoCounters::record, in a loop, on 1 and 2 threads sharing one container's counters.
//
//   g++ -O2 -std=c++20 -Ilib -Ibuild/lib bench/stats_micro.cc build/lib/liblayer.a \
//       -lfmt -llmdb -lxxhash -lpthread -o /tmp/stats_micro && /tmp/stats_micro
#include <time.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "stats.h"

namespace {

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000 + static_cast<uint64_t>(ts.tv_nsec);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  constexpr int kRequests = 20'000'000;
  layer::IoCounters counters;
  for (int threads : {1, 2}) {
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&] {
        for (int i = 0; i < kRequests; ++i) {
          const uint64_t start = monotonic_ns();
          counters.record(layer::IoOp::kRead, 4096, monotonic_ns() - start);
        }
      });
    for (auto& t : pool) t.join();
    std::printf("%d thread(s): %.1f ns per counted request (wall time per thread)\n", threads,
                seconds_since(t0) * 1e9 / kRequests);
  }
  uint64_t sink = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kRequests; ++i) sink += monotonic_ns();
  std::printf("one clock_gettime(CLOCK_MONOTONIC): %.1f ns%s\n",
              seconds_since(t0) * 1e9 / kRequests, sink == 0 ? " " : "");
  return 0;
}
