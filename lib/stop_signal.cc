// stop_signal.cc — StopSignal.
#include "stop_signal.h"

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

}  // namespace layer
