// Unit tests for lib/dirty_tracker.h: marks taken back as runs (across words, pages and the
// end), each mark taken exactly once while threads mark and take at once, and a TrackingFile
// marking what its writes and punches touch, and nothing for reads.
#include <algorithm>
#include <atomic>
#include <thread>

#include "dirty_tracker.h"
#include "test_util.h"

using namespace layer;

TEST_CASE("a dirty tracker returns what was marked, as runs, and clears it", "[delta_move]") {
  DirtyTracker t(3 * DirtyTracker::kBlocksPerPage + 10);
  CHECK(MUST(t.take()).empty());
  REQUIRE_OK(t.mark(5, 3));
  REQUIRE_OK(t.mark(8, 1));                                       // touches the run before: one run
  REQUIRE_OK(t.mark(60, 10));                                     // across a word
  REQUIRE_OK(t.mark(DirtyTracker::kBlocksPerPage - 2, 4));        // across a page
  REQUIRE_OK(t.mark(3 * DirtyTracker::kBlocksPerPage + 8, 100));  // clamped to the end
  REQUIRE_OK(t.mark(0, 64));
  CHECK(t.count() == 64 + 10 - 4 + 4 + 2);
  const DirtyTracker::Runs want = {
      {0, 70}, {DirtyTracker::kBlocksPerPage - 2, 4}, {3 * DirtyTracker::kBlocksPerPage + 8, 2}};
  CHECK(MUST(t.take()) == want);
  CHECK(t.count() == 0);
  CHECK(MUST(t.take()).empty());

  // Marks from many threads at once: every one is taken exactly once.
  std::atomic<bool> stop{false};
  std::vector<uint64_t> seen(3 * DirtyTracker::kBlocksPerPage + 10, 0);
  std::vector<std::thread> markers;
  for (int i = 0; i < 3; ++i)
    markers.emplace_back([&, i] {
      for (uint64_t b = static_cast<uint64_t>(i); b < seen.size(); b += 3) (void)t.mark(b, 1);
    });
  std::thread taker([&] {
    while (!stop)
      for (const auto& [first, n] : MUST(t.take()))
        for (uint64_t b = first; b < first + n; ++b) seen[b]++;
  });
  for (auto& m : markers) m.join();
  stop = true;
  taker.join();
  for (const auto& [first, n] : MUST(t.take()))
    for (uint64_t b = first; b < first + n; ++b) seen[b]++;
  CHECK(std::all_of(seen.begin(), seen.end(), [](uint64_t n) { return n == 1; }));
}

TEST_CASE("a tracking file marks the blocks its writes and punches touch", "[delta_move]") {
  test::TempDir tmp;
  LocalStore store(tmp.path());
  auto inner = MUST(store.create(1, 64 * 4096));
  auto tracker = std::make_shared<DirtyTracker>(64);
  TrackingFile f(inner, tracker, 4096);
  const std::vector<uint8_t> data(5000, 7);
  REQUIRE_OK(f.write(data.data(), data.size(), 4096 * 3 + 100));  // blocks 3 and 4
  REQUIRE_OK(f.punch(4096 * 10, 4096 * 2));
  CHECK(MUST(tracker->take()) == DirtyTracker::Runs{{3, 2}, {10, 2}});
  std::vector<uint8_t> back(5000);
  REQUIRE_OK(f.read(back.data(), back.size(), 4096 * 3 + 100));
  CHECK(back == data);
  CHECK(MUST(tracker->take()).empty());  // reads mark nothing
}
