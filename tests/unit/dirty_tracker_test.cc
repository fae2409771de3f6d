// Unit tests for lib/dirty_tracker.h: marks taken back as runs (across words, pages and the
// end), each mark taken exactly once while threads mark and take at once, and a TrackingFile
// marking what its writes and punches touch, and nothing for reads; once mirroring, writing both
// files, keeping a failure of the copy, and holding off the writes of locked blocks.
#include <algorithm>
#include <atomic>
#include <filesystem>
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

namespace {

// A file whose writes fail with ENOSPC on demand, and which counts the writes that land while
// `inside` is set.
class WatchedFile : public ForwardingFile {
 public:
  explicit WatchedFile(std::shared_ptr<LayerFile> inner) : ForwardingFile(std::move(inner)) {}
  Status write(const void* buf, uint64_t len, uint64_t offset) override {
    if (inside.load()) overlaps++;
    if (fail.load()) return make_error(ENOSPC, "write {}: no space (injected)", inner_->path());
    return inner_->write(buf, len, offset);
  }
  std::atomic<bool> inside{false}, fail{false};
  std::atomic<int> overlaps{0};
};

}  // namespace

TEST_CASE("a mirroring tracking file writes both files; a failure of the copy is kept",
          "[delta_move]") {
  test::TempDir tmp;
  LocalStore src_store(tmp.sub("a")), copy_store(tmp.sub("b"));
  std::filesystem::create_directories(tmp.sub("a"));
  std::filesystem::create_directories(tmp.sub("b"));
  auto inner = MUST(src_store.create(1, 64 * 4096));
  auto copy = std::make_shared<WatchedFile>(MUST(copy_store.create(1, 64 * 4096)));
  auto tracker = std::make_shared<DirtyTracker>(64);
  TrackingFile f(inner, tracker, 4096);
  f.start_mirror(copy);
  const std::vector<uint8_t> data(6000, 9);
  REQUIRE_OK(f.write(data.data(), data.size(), 4096 * 2 + 10));
  REQUIRE_OK(f.punch(4096 * 20, 4096));
  CHECK(MUST(tracker->take()).empty());  // mirrored: nothing left to copy
  std::vector<uint8_t> a(64 * 4096), b(64 * 4096);
  REQUIRE_OK(inner->read(a.data(), a.size(), 0));
  REQUIRE_OK(copy->read(b.data(), b.size(), 0));
  CHECK(a == b);
  REQUIRE_OK(f.mirror_error());

  // The copy refuses a write: the write itself succeeds (the inner file is the one that
  // counts), its blocks are marked for the mover to copy again, and the mover learns why.
  copy->fail = true;
  REQUIRE_OK(f.write(data.data(), 100, 4096 * 30));
  copy->fail = false;
  CHECK(MUST(tracker->take()) == DirtyTracker::Runs{{30, 1}});
  CHECK(f.mirror_error().error().code == ENOSPC);

  // with_blocks_locked holds off the mirrored writes of its blocks, and only those.
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (int i = 0; i < 3; ++i)
    writers.emplace_back([&, i] {
      std::vector<uint8_t> buf(4096, static_cast<uint8_t>(i + 1));
      while (!stop) (void)f.write(buf.data(), buf.size(), 4096 * 5);
    });
  for (int i = 0; i < 2000; ++i)
    REQUIRE_OK(f.with_blocks_locked(4, 3, [&]() -> Status {
      copy->inside = true;
      for (int k = 0; k < 50; ++k) std::this_thread::yield();
      copy->inside = false;
      return {};
    }));
  stop = true;
  for (auto& w : writers) w.join();
  CHECK(copy->overlaps.load() == 0);
}
