// DeltaMap when memory runs out: a failed allocation in take_dirty, return_dirty or a mark's
// listing must never leave a marked chunk out of every future flush round. This binary
// replaces the global operator new with one that can be told to fail the Nth allocation of
// the calling thread.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <new>
#include <set>

#include "delta_map.h"

namespace {
thread_local long fail_countdown = 0;  // > 0: the countdown-th allocation from now fails
}  // namespace

void* operator new(std::size_t n) {
  if (fail_countdown > 0 && --fail_countdown == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// The replacement pair: what this operator new returns comes from malloc.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

using namespace layer;

namespace {

constexpr uint64_t kChunk = kBlocksPerChunk;

std::set<uint32_t> chunks_of(const DeltaMap::Rows& rows) {
  std::set<uint32_t> out;
  for (const auto& row : rows) out.insert(row.first);
  return out;
}

}  // namespace

TEST_CASE("DeltaMap: an allocation failing inside take_dirty loses no chunk", "[delta_map][oom]") {
  // Allocation 1 is the rows' reserve; later ones build the rows (1 KiB strings each).
  for (long nth = 1; nth <= 4; nth++) {
    CAPTURE(nth);
    DeltaMap m(4 * kChunk);
    for (uint32_t c = 0; c < 3; c++) m.set_range(c * kChunk + 5, 1, BlockState::kData);
    bool threw = false;
    fail_countdown = nth;
    try {
      (void)m.take_dirty();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    fail_countdown = 0;
    if (!threw) continue;  // nth beyond take_dirty's allocations
    CHECK_FALSE(m.lost_marks());
    CHECK(chunks_of(m.take_dirty()) == std::set<uint32_t>{0, 1, 2});
    // A later mark of a chunk is listed again as usual.
    m.set_range(2 * kChunk + 9, 1, BlockState::kZero);
    CHECK(chunks_of(m.take_dirty()) == std::set<uint32_t>{2});
  }
}

TEST_CASE("DeltaMap: a mark whose listing cannot allocate says marks are lost",
          "[delta_map][oom]") {
  DeltaMap m(4 * kChunk);
  // Allocation 1 makes chunk 1's words: failing it fails the mark before anything changes.
  fail_countdown = 1;
  CHECK_THROWS_AS(m.set_range(kChunk + 3, 1, BlockState::kData), std::bad_alloc);
  fail_countdown = 0;
  CHECK_FALSE(m.lost_marks());
  CHECK(m.take_dirty().empty());
  // Allocation 2 lists the chunk (the dirty list is empty, without capacity).
  fail_countdown = 2;
  CHECK_THROWS_AS(m.set_range(2 * kChunk + 3, 1, BlockState::kData), std::bad_alloc);
  fail_countdown = 0;
  CHECK(m.lost_marks());
}

TEST_CASE("DeltaMap: return_dirty that cannot allocate says marks are lost", "[delta_map][oom]") {
  DeltaMap m(4 * kChunk);
  m.set_range(3, 1, BlockState::kData);
  auto rows = m.take_dirty();
  REQUIRE(rows.size() == 1);
  m.set_range(kChunk + 3, 1, BlockState::kData);  // the dirty list is not empty now
  fail_countdown = 1;
  const bool ok = m.return_dirty(rows);
  fail_countdown = 0;
  CHECK_FALSE(ok);
  CHECK(m.lost_marks());
}
