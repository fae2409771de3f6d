// heat.h — how hot each layer is: counted per layer on the I/O path, in memory, and persisted
// to the `heat` db every few seconds by one small transaction on the committer thread, off the
// I/O path (DESIGN.md "Tiering mover").
//
// Counting: a Disk's view holds one HeatCounter per layer it reads (its chain's and its
// delta's), taken from the pool's HeatTable, so every disk of a process that reads a layer (a
// shared base under many clones) adds to the same counter, and every process adds to the same
// row: a shared base's heat is the sum of its users'. An op is one read or write of a run of
// consecutive blocks held by one layer — one pread or pwrite of its file, which is what a
// slow tier pays for. The counters are relaxed atomics: one add per run.
//
// Rates: each row keeps exponentially decayed rates (ops/s and bytes/s, read and write): with
// tau = half_life / ln 2, a flush of n ops after dt seconds makes rate = rate * e^(-dt/tau) +
// n / tau, so a steady rate converges to itself and an idle layer halves every half-life. The
// access time is the time of the flush that carried the counts (a few seconds' precision).
//
// Thread-safety: HeatCounter and HeatTable are safe for concurrent use.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "error.h"
#include "records.h"
#include "stop_signal.h"

namespace layer {

class Pool;

// What one layer saw since the last drain.
struct HeatCounts {
  uint64_t read_ops = 0;
  uint64_t read_bytes = 0;
  uint64_t write_ops = 0;
  uint64_t write_bytes = 0;
  bool empty() const { return read_ops == 0 && write_ops == 0; }
};

class HeatCounter {
 public:
  void add_read(uint64_t bytes) {
    read_ops_.fetch_add(1, std::memory_order_relaxed);
    read_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  }
  void add_write(uint64_t bytes) {
    write_ops_.fetch_add(1, std::memory_order_relaxed);
    write_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  }
  // Returns the counts and resets them (each add lands in exactly one drain).
  HeatCounts drain();
  // Adds counts back (a persist that failed).
  void give_back(const HeatCounts& c);

 private:
  std::atomic<uint64_t> read_ops_{0}, read_bytes_{0}, write_ops_{0}, write_bytes_{0};
};

// The process's counters, one per layer.
class HeatTable {
 public:
  // The counter of layer id (made on first use; kept while anyone holds it or it has counts).
  std::shared_ptr<HeatCounter> counter(LayerId id);
  // Every layer's counts since the last drain (layers with none are left out); counters no
  // one else holds are forgotten.
  std::vector<std::pair<LayerId, HeatCounts>> drain();
  void give_back(const std::vector<std::pair<LayerId, HeatCounts>>& counts);

 private:
  std::mutex mu_;
  std::map<LayerId, std::shared_ptr<HeatCounter>> counters_;  // GUARDED_BY(mu_)
};

// A rate decayed from `since` to `now` with the given half-life (seconds; 0: no decay).
double decay(double rate, uint64_t since, uint64_t now, uint64_t half_life_s);
// The row with its rates decayed to `now` (rate_unix = now).
HeatRecord decayed(const HeatRecord& r, uint64_t now, uint64_t half_life_s);
// Adds counts seen up to `now` to a row: totals, decayed rates, access time.
void add_counts(HeatRecord& r, const HeatCounts& c, uint64_t now, uint64_t half_life_s);

// Drains the pool's HeatTable into the `heat` db: one transaction on the committer thread,
// none when nothing was counted. Counts of layers whose row is gone (dropped meanwhile) are
// discarded. On a failed transaction the counts go back to the table. Errors: those of the
// transaction; EACCES (read-only pool).
Status persist_heat(Pool& pool, uint64_t now);

// Records that layer `id` moved to another tier at `now` (the policy treats a move like an
// access: no demotion of a layer just promoted). Errors: those of the transaction.
Status note_moved(Pool& pool, LayerId id, uint64_t now);

// A server's heat writer: a thread calling persist_heat every `interval`; the destructor
// persists once more and joins it.
// REQUIRES: the Pool outlives it.
class HeatPersister {
 public:
  struct Options {
    std::chrono::milliseconds interval{5000};
    // Called on the persister's thread when a persist fails.
    std::function<void(const std::string& line)> log_error;
  };
  // Errors: EAGAIN/ENOMEM when no thread can be started.
  static Result<std::unique_ptr<HeatPersister>> start(Pool& pool, Options options);
  ~HeatPersister();
  HeatPersister(const HeatPersister&) = delete;
  HeatPersister& operator=(const HeatPersister&) = delete;

 private:
  HeatPersister(Pool& pool, Options options) : pool_(pool), options_(std::move(options)) {}
  void run();

  Pool& pool_;
  const Options options_;
  StopSignal stop_;
  std::thread thread_;
};

}  // namespace layer
