// stats_seed POOL CONTAINER DAYS BUSY_FROM BUSY_TO BUSY_OPS IDLE_OPS — writes a synthetic daily
// pattern into CONTAINER's I/O history through lib/stats's own writer API (StatsTable counters
// and persist_stats, as the server's writer does), for test_predict.sh: for every whole hour
// of the last DAYS days before the current one, two minute rows (at :00 and :30) of BUSY_OPS
// 4 KiB reads each when the hour of the day (UTC) is in [BUSY_FROM, BUSY_TO), IDLE_OPS
// otherwise. A test helper, not a tool.
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

#include "pool.h"
#include "stats.h"

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr,
                 "usage: stats_seed POOL CONTAINER DAYS BUSY_FROM BUSY_TO BUSY_OPS IDLE_OPS\n");
    return 2;
  }
  auto pool = layer::Pool::open(argv[1], layer::Pool::OpenOptions{});
  if (!pool.ok()) {
    std::fprintf(stderr, "stats_seed: %s\n", pool.error().message.c_str());
    return 1;
  }
  const std::string name = argv[2];
  const long days = std::strtol(argv[3], nullptr, 10);
  const long busy_from = std::strtol(argv[4], nullptr, 10),
             busy_to = std::strtol(argv[5], nullptr, 10);
  const long busy_ops = std::strtol(argv[6], nullptr, 10),
             idle_ops = std::strtol(argv[7], nullptr, 10);
  uint64_t id = 0;
  {
    auto txn = (*pool)->index().begin_read();
    if (!txn.ok()) return 1;
    auto c = (*pool)->get_container(*txn, name);
    if (!c.ok()) {
      std::fprintf(stderr, "stats_seed: %s\n", c.error().message.c_str());
      return 1;
    }
    id = c->id;
  }
  layer::StatsTable table;
  auto counters = table.acquire(id, name);
  const uint64_t now_hour = static_cast<uint64_t>(std::time(nullptr)) / 3600;
  for (uint64_t h = now_hour - static_cast<uint64_t>(days) * 24; h < now_hour; ++h) {
    const long hour_of_day = static_cast<long>(h % 24);
    const long ops = hour_of_day >= busy_from && hour_of_day < busy_to ? busy_ops : idle_ops;
    for (uint64_t minute : {h * 60, h * 60 + 30}) {
      for (long i = 0; i < ops; ++i) counters->record(layer::IoOp::kRead, 4096, 100'000);
      auto s = layer::persist_stats(**pool, table, minute);
      if (!s.ok()) {
        std::fprintf(stderr, "stats_seed: %s\n", s.error().message.c_str());
        return 1;
      }
    }
  }
  return 0;
}
