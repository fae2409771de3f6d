// clone_many POOL IMAGE PREFIX COUNT — clones IMAGE COUNT times as PREFIX0, PREFIX1, ... through
// the library, from several threads so the committer groups the clones into few transactions
// (the CLI in a loop takes seconds per thousand). A test helper, not a tool.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "pool.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: clone_many POOL IMAGE PREFIX COUNT\n");
    return 2;
  }
  auto pool = layer::Pool::open(argv[1], layer::Pool::OpenOptions{});
  if (!pool.ok()) {
    std::fprintf(stderr, "clone_many: %s\n", pool.error().message.c_str());
    return 1;
  }
  const std::string image = argv[2], prefix = argv[3];
  const long count = std::strtol(argv[4], nullptr, 10);
  std::atomic<long> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 32; ++t) {
    threads.emplace_back([&] {
      for (long i; !failed && (i = next++) < count;) {
        auto r = (*pool)->clone(image, prefix + std::to_string(i), std::nullopt);
        if (!r.ok()) {
          std::fprintf(stderr, "clone_many: %s\n", r.error().message.c_str());
          failed = true;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  return failed ? 1 : 0;
}
