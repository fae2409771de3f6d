// fsck.h — the pool's consistency check: the index against itself and against the layer files;
// with repair, interrupted work recovered and orphan files removed (what it checks: fsck.cc).
//
// Thread-safety: safe beside servers and other commands of any process: it reads the index in
// one read transaction, and a repair re-checks each candidate in a fresh transaction and under
// the layer's lock before it changes anything.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "error.h"
#include "pool.h"

namespace layer {

struct FsckReport {
  std::vector<std::string> problems;  // one line each; empty = consistent
  std::vector<std::string> repaired;  // with repair: what was fixed (not in problems)
  uint64_t layers = 0, images = 0, containers = 0, map_rows = 0, groups_verified = 0;
};

// Checks the index against the layer files (read-only unless repair: then rolls back
// interrupted imports, finishes interrupted removals and removes orphan files; it never
// touches a layer whose lock is held, and re-checks every candidate in a fresh transaction
// before changing anything). full = also verify every checksum. Calls the test points
// "fsck.index_scanned" and "fsck.scanned". Errors: EACCES (repair on a read-only pool), EIO,
// and those of a repair that fails (an orphan that cannot be removed, say); a problem found is
// not an error.
Result<FsckReport> fsck(Pool& pool, bool full, bool repair);

}  // namespace layer
