// stop_signal.h — a stop request for background threads (the hasher, the heat writer, the
// tiering thread).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>

namespace layer {

// A stop request that sleepers notice at once: request_stop() wakes every wait_until. (Not
// std::stop_token: g++ 12 reports a false use-after-free inside it when built with TSan.)
// Thread-safety: safe for concurrent use.
class StopSignal {
 public:
  void request_stop();
  bool stop_requested() const { return stop_.load(); }
  // Wakes the waits so that they check their condition again.
  void wake() const;
  // Waits until `deadline`, a stop request, or `until()` (checked at the start and after each
  // wake()) returns true. Returns !stop_requested().
  bool wait_until(std::chrono::steady_clock::time_point deadline,
                  const std::function<bool()>& until = nullptr) const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<bool> stop_{false};
};

// Paces reads to a rate in bytes per second, sleeping until each read is due (idle time earns
// at most kRateBurst of catch-up); a stop request ends a sleep at once.
// Thread-safety: one thread uses one Pacer.
class Pacer {
 public:
  static constexpr std::chrono::milliseconds kRateBurst{100};
  // rate 0: unlimited. stop may be null; it must outlive the Pacer.
  Pacer(uint64_t rate_bytes_per_sec, const StopSignal* stop)
      : rate_(rate_bytes_per_sec), stop_(stop), next_(std::chrono::steady_clock::now()) {}
  // Waits until `bytes` more may be read. False: stop was requested.
  bool admit(uint64_t bytes);

 private:
  const uint64_t rate_;
  const StopSignal* stop_;
  std::chrono::steady_clock::time_point next_;  // when the bytes admitted so far are paid for
};

}  // namespace layer
