// capacity.h — a pool's capacities and the admission of containers' reservations against them
// (issue 14 item 2; docs/design.md "Resources and QoS", "Capacity, admission and lending").
//
// The pool's config (`meta` rows "capacity.iops", "capacity.bandwidth", "capacity.ssd_bytes",
// "capacity.overcommit", set by `layer pool set`) says what the host's storage gives: requests
// per second, bytes per second, bytes of the ssd tier. A container reserves its iops and
// bandwidth (qos.h: while a time-bounded change is in force, the larger of it and the base) and,
// while its delta layer lives on the ssd tier, its disk size of ssd bytes. Admission: a clone,
// a `layer set`, or a `layer apply` that would take the sum of a dimension's reservations past
// capacity × overcommit is refused (ENOSPC), in the transaction that would write it, so two
// CLIs cannot both pass the check. On a dimension with a capacity, a container must reserve
// something: an unlimited one (0) is refused, since it could take the whole device and break
// every other container's reservation.
//
// Thread-safety: plain functions over the caller's transaction.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "error.h"
#include "index.h"
#include "records.h"

namespace layer {

class Pool;

// What the pool's storage gives. 0: no capacity (nothing is admitted against it, nothing lent).
struct PoolCapacity {
  static constexpr uint64_t kDefaultOvercommitMilli = 1000;
  uint64_t iops = 0;       // requests per second
  uint64_t bandwidth = 0;  // bytes per second read and written
  uint64_t ssd_bytes = 0;  // bytes of the ssd tier
  // Admission allows reservations up to capacity × overcommit_milli / 1000.
  uint64_t overcommit_milli = kDefaultOvercommitMilli;
  // The admission limit of a capacity (0: none).
  uint64_t limit(uint64_t capacity) const {
    return static_cast<uint64_t>(static_cast<unsigned __int128>(capacity) * overcommit_milli /
                                 1000);
  }
  bool operator==(const PoolCapacity&) const = default;
};

// What a container reserves, or the sum over a pool's containers.
struct Reservation {
  uint64_t iops = 0, bandwidth = 0, ssd_bytes = 0;
  // Containers without an iops / bandwidth reservation (unlimited).
  uint64_t unlimited_iops = 0, unlimited_bandwidth = 0;
};

// The capacities stored in the pool's meta (defaults when unset). Errors: EIO (a corrupt value).
Result<PoolCapacity> load_capacity(ReadTxn& txn);
Result<PoolCapacity> load_capacity(Pool& pool);
// A change of the capacities: the fields given (0 clears a capacity; overcommit 0: the default).
struct CapacityChange {
  std::optional<uint64_t> iops, bandwidth, ssd_bytes, overcommit_milli;
  bool empty() const { return !iops && !bandwidth && !ssd_bytes && !overcommit_milli; }
};
// Applies `c` in one transaction, refusing (ENOSPC, nothing changed) a capacity × overcommit
// below what the containers reserve now, or a capacity on a dimension some container does not
// reserve (unlimited). Returns the capacities after. Errors: ENOSPC, EROFS, EINVAL (empty).
Result<PoolCapacity> change_capacity(Pool& pool, const CapacityChange& c, uint64_t now_ms);

// What container `rec` reserves at `now_ms`; `delta_on_ssd`: its delta layer is on the ssd tier.
Reservation reservation_of(const ContainerRecord& rec, bool delta_on_ssd, uint64_t now_ms);
// The sum of every container's reservation but `except`'s.
Result<Reservation> sum_reservations(ReadTxn& txn, uint64_t now_ms, std::string_view except = {});
// The admission check of container `rec` (new, or changed from `before`: null for a new one)
// in `txn`, before its row is written: for each dimension with a capacity whose reservation
// `rec` raises, refuses (ENOSPC naming the dimension, the figures and the container) an
// unlimited reservation or a sum past capacity × overcommit. A change that raises nothing is
// never refused (a pool already over, e.g. after a delta moved to ssd, still takes a priority
// change). Errors: ENOSPC, those of the reads.
Status check_admission(ReadTxn& txn, const ContainerRecord& rec, const ContainerRecord* before,
                       uint64_t now_ms);

// "1.5" -> 1500 thousandths ("none": the default, 1). Errors: EINVAL.
Result<uint64_t> parse_overcommit(std::string_view text);

}  // namespace layer
