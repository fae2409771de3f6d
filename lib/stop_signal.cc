// stop_signal.cc — StopSignal.
#include "stop_signal.h"

#include <algorithm>
#include <thread>

namespace layer {

void StopSignal::request_stop() {
  std::lock_guard<std::mutex> lk(mu_);
  stop_ = true;
  cv_.notify_all();
}

void StopSignal::wake() const {
  // Under the mutex: a waiter checks its condition under it, so it is either before the check
  // (and sees the change) or waiting (and is woken).
  std::lock_guard<std::mutex> lk(mu_);
  cv_.notify_all();
}

bool StopSignal::wait_until(std::chrono::steady_clock::time_point deadline,
                            const std::function<bool()>& until) const {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_until(lk, deadline, [&] { return stop_.load() || (until && until()); });
  return !stop_.load();
}

bool Pacer::admit(uint64_t bytes) {
  if (stop_ != nullptr && stop_->stop_requested()) return false;
  if (rate_ == 0) return true;
  const auto now = std::chrono::steady_clock::now();
  next_ = std::max(next_, now - kRateBurst);  // idle time earns no more than the burst
  const auto due = next_;
  next_ += std::chrono::nanoseconds(bytes * 1'000'000'000ULL / rate_);
  if (due <= now) return true;
  if (stop_ != nullptr) return stop_->wait_until(due);
  std::this_thread::sleep_until(due);
  return true;
}

}  // namespace layer
