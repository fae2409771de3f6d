// hasher.h — checksums for frozen layers that have none yet (DESIGN.md "Checksums").
//
// Import hashes its layer as it copies it. Every other way of freezing a layer (snapshot,
// commit, a kept rollback, a merge, flatten) leaves it frozen-unhashed: hash_layer reads the
// 64 KiB groups of such a layer that hold data blocks and writes their xxh3-64 to `sums`,
// exactly as import does (the same groups, each hashed over the layer file's bytes, so holes
// and zero blocks inside a group count as zeroes; the last group is cut at the layer's size),
// then switches the layer to frozen. fsck --full verifies the result like an import's.
//
// Crash safety: the rows go in bounded transactions, each of which first re-reads the layer's
// `layers` row and writes nothing unless it still exists and is still frozen-unhashed; a final
// transaction re-checks again and sets the state. A drop or merge removes the `layers` row
// before it deletes the layer's `maps` and `sums` rows, so a layer dropped meanwhile never
// keeps orphan sums rows. A crash leaves a frozen-unhashed layer with some sums rows, which
// fsck accepts (it verifies only frozen layers) and the next run overwrites.
//
// Locking: none. A merge, a drop or a snapshot removal may take the layer away while it is
// hashed (they need its exclusive lock, which the hasher never holds, so it never makes them
// wait or leave a layer hidden); the hasher then finds its `layers` row gone (or its file gone
// before it opened it) and reports kGone.
//
// Thread-safety: the functions may run on any thread, concurrently with everything else on the
// pool (servers, CLI commands, other hashers; two hashers of one layer write the same rows).
// BackgroundHasher is safe for concurrent nudge() calls.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "error.h"
#include "pool.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

// Checksum rows per transaction: each covers up to 4 MiB of data, so a transaction commits at
// most 1 GiB of hashing (and 128 KiB of rows) — few commits, little lost to a crash.
constexpr size_t kHashRowsPerTxn = 256;
// The server's default rate (plugin parameter hash-rate).
constexpr uint64_t kDefaultHashRateBytes = 64ULL << 20;

struct HashOptions {
  // Bytes read per second at most; 0: unlimited.
  uint64_t rate_bytes_per_sec = 0;
  // When set: stops the work between two reads (and wakes a rate-limit sleep) once requested;
  // the rows already committed stay (a later run overwrites them). Must outlive the call.
  const StopSignal* stop = nullptr;
  // Sums rows per transaction, 1 to kMaxRowsPerTxn (tests make it small to stop in between).
  size_t rows_per_txn = kHashRowsPerTxn;
  // hash_pending: skip layers that any lock holder holds, also shared ones (a running server
  // reads them, and its own hasher hashes them): what `layer gc` wants.
  bool skip_held = false;
};

struct HashResult {
  enum class Outcome {
    kHashed,   // the layer is now frozen, with checksums
    kAlready,  // it was already frozen with checksums (another hasher, or an import's)
    kGone,     // it was dropped or merged away before or while it was hashed: not an error
    kStopped,  // options.stop was requested: some rows may be written, the state is unchanged
  };
  Outcome outcome = Outcome::kHashed;
  uint64_t bytes = 0;   // data read and hashed
  uint64_t groups = 0;  // 64 KiB groups hashed
};

// Hashes frozen-unhashed layer `id` (see above). Test points: "hash.rows-committed" after each
// transaction of sums rows, "hash.all-rows-committed" when every row is written and the state
// is not yet switched. Errors: EINVAL (a writable
// layer: a delta is never hashed), EIO (the file is missing although the index says it holds
// data, a read fails, a corrupt row), ENOSPC, EACCES (read-only pool).
Result<HashResult> hash_layer(Pool& pool, LayerId id, const HashOptions& options = {});

struct HashPendingReport {
  struct Layer {
    LayerId id = 0;
    uint64_t bytes = 0;
    uint64_t groups = 0;
  };
  std::vector<Layer> hashed;        // oldest first
  uint64_t bytes = 0;               // data read, in all
  std::vector<LayerId> held;        // skipped with skip_held: a lock holder (a server) reads it
  std::vector<std::string> failed;  // one line per layer whose hashing failed ("layer N: ...")
  bool stopped = false;             // options.stop ended the pass early
  // Frozen-unhashed layers left (held, failed, or not reached) when the pass ended.
  uint64_t still_unhashed = 0;
};

// Hashes every frozen-unhashed layer, oldest first (with HashOptions::skip_held, not those
// that someone holds). One layer's failure does not stop the others: it is reported in
// `failed`. Errors: EIO (the index cannot be read), EACCES (read-only pool).
Result<HashPendingReport> hash_pending(Pool& pool, const HashOptions& options = {});

// How many layers are frozen-unhashed. Errors: EIO.
Result<uint64_t> count_unhashed(Pool& pool);

// Lowers the calling thread to the idle I/O class (ioprio_set IOPRIO_CLASS_IDLE) and nice 19,
// so its reads wait behind every other I/O of the disk (where the I/O scheduler honours
// classes: BFQ; mq-deadline and none ignore it, and the rate limit is what protects them).
// Errors: the errno of ioprio_set or setpriority (the other one is still attempted).
Status lower_thread_priority();

// A server's hasher: a thread that runs hash_pending when started, every `interval`, and soon
// after nudge() (a live snapshot, commit or merge made a new frozen-unhashed layer), at idle
// I/O priority and nice 19, rate-limited. The destructor stops it promptly (a hash in progress
// stops between two reads, a rate-limit sleep wakes) and joins it.
// REQUIRES: the Pool outlives it.
class BackgroundHasher {
 public:
  struct Options {
    HashOptions hash;  // rate and batch size; its stop signal is replaced by the hasher's
    std::chrono::milliseconds interval{5000};
    // Called on the hasher thread: what a pass did (debug), and failures (error = true).
    std::function<void(bool error, const std::string& line)> log;
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<BackgroundHasher>> start(Pool& pool, Options options);
  ~BackgroundHasher();
  BackgroundHasher(const BackgroundHasher&) = delete;
  BackgroundHasher& operator=(const BackgroundHasher&) = delete;

  // Asks for a pass as soon as the current one (if any) is over.
  void nudge();

 private:
  BackgroundHasher(Pool& pool, Options options) : pool_(pool), options_(std::move(options)) {}
  void run();
  void log(bool error, const std::string& line) const;

  Pool& pool_;
  const Options options_;
  StopSignal stop_;
  std::atomic<bool> nudged_{false};
  std::thread thread_;
};

}  // namespace layer
