// scrub.h — reads frozen layers back and verifies each 64 KiB group against its checksum in
// `sums` (DESIGN.md "Checksums"): silent corruption of a layer file is found before a client
// reads it, with the containers, snapshots and images it affects.
//
// No lock is taken: a frozen layer's bytes never change, and a layer dropped or moved while it
// is scrubbed is re-read from its row (a moved one from its new tier; a dropped one is "gone",
// not an error). Layers without checksums (writable deltas, frozen-unhashed layers) are
// skipped with the reason; `layer gc` or a server's hasher checksums the latter.
//
// Thread-safety: safe beside servers and other commands of any process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "error.h"
#include "pool.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

struct ScrubOptions {
  uint64_t rate_bytes_per_sec = 0;   // 0: unlimited
  const StopSignal* stop = nullptr;  // must outlive the call
};

struct ScrubMismatch {
  uint64_t offset = 0;  // of the 64 KiB group in the layer
  uint64_t want = 0;    // the checksum in `sums`
  uint64_t got = 0;     // what the data hashes to
};

struct ScrubLayer {
  LayerRecord layer;
  std::string skipped;  // non-empty: not verified, and why
  uint64_t groups = 0;  // groups verified
  uint64_t bytes = 0;   // bytes read
  std::vector<ScrubMismatch> mismatches;
  std::vector<std::string> errors;  // read errors (EIO from the device, a missing file)
  std::vector<std::string> users;   // containers, snapshots and images reading it (layers.h)
  bool bad() const { return !mismatches.empty() || !errors.empty(); }
};

struct ScrubReport {
  std::vector<ScrubLayer> layers;  // in the order asked for
  uint64_t groups = 0;
  uint64_t bytes = 0;
  bool stopped = false;  // options.stop ended it early
  bool clean() const {
    for (const auto& l : layers)
      if (l.bad()) return false;
    return true;
  }
};

// Verifies `ids` (every layer of the pool when empty), in order. A damaged layer does not stop
// the others. Errors: ENOENT (an id that is not a layer), EIO (the index cannot be read).
Result<ScrubReport> scrub(Pool& pool, const std::vector<LayerId>& ids, const ScrubOptions& options);

}  // namespace layer
