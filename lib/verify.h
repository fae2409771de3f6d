// verify.h — checksum verification of reads from frozen layers (plugin verify=on, DESIGN.md
// "Checksums"): a read from a `frozen` layer first verifies each 64 KiB group it touches
// against the layer's `sums`, once per group per process; a group that does not match fails
// the read with EIO (and every later read of it), and the rest of the layer is served.
//
// Once verified, a group is trusted for the life of the process: its bytes are then in the
// page cache, which verification cannot protect, and re-reading 64 KiB for every 4 KiB read
// would cost 16 times the I/O. `layer scrub` re-reads everything from the device.
// frozen-unhashed layers have no checksums yet and are not verified; a disk verifies a layer
// hashed while it is open from its next view on (snapshot, move or reopen).
//
// Thread-safety: LayerVerifier and VerifierTable are safe for concurrent use.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "error.h"
#include "layer_file.h"
#include "records.h"

namespace layer {

class Index;

class LayerVerifier {
 public:
  LayerVerifier(Index& index, const LayerRecord& layer);
  // Verifies the groups of [offset, offset+len) not verified yet, reading them from `file`.
  // Errors: EIO naming the layer, the group's offset and both checksums; those of the reads
  // and of the index.
  Status check(LayerFile& file, uint64_t offset, uint64_t len);
  uint64_t groups_verified() const { return verified_count_.load(std::memory_order_relaxed); }

 private:
  // The checksum of group g (0: none), loading its row on first use.
  Result<uint64_t> sum_of(uint64_t g);

  Index& index_;
  const LayerRecord layer_;
  std::unique_ptr<std::atomic<uint64_t>[]> verified_;  // a bit per group
  std::atomic<uint64_t> verified_count_{0};
  std::mutex mu_;
  std::map<uint32_t, std::vector<uint64_t>> rows_;  // GUARDED_BY(mu_): loaded sums rows
};

// One verifier per layer per process, shared by every disk that reads it.
class VerifierTable {
 public:
  std::shared_ptr<LayerVerifier> get(Index& index, const LayerRecord& layer);

 private:
  std::mutex mu_;
  std::map<LayerId, std::weak_ptr<LayerVerifier>> verifiers_;  // GUARDED_BY(mu_)
};

}  // namespace layer
