// output.cc — see output.h.
#include "output.h"

#include <fmt/format.h>

#include <algorithm>
#include <ctime>
#include <iostream>

namespace layer_cli {

std::string human_size(uint64_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  for (value /= 1024; value >= 1024 && unit + 1 < std::size(kUnits); value /= 1024) ++unit;
  return fmt::format("{:.1f} {}", value, kUnits[unit]);
}

std::string format_time(uint64_t unix_seconds) {
  const time_t t = static_cast<time_t>(unix_seconds);
  struct tm tm {};
  char buf[32];
  if (localtime_r(&t, &tm) == nullptr || strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm) == 0) {
    return std::to_string(unix_seconds);
  }
  return buf;
}

// Left-aligned columns separated by two spaces; the first row is the header.
void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()));
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
    }
    std::cout << line << '\n';
  }
}

// Blocks to bytes; the last block of a disk may be short, so never report more than the size.
uint64_t data_bytes(uint64_t blocks, uint32_t block_size, uint64_t size_bytes) {
  return std::min(blocks * block_size, size_bytes);
}

json image_json(const layer::ImageInfo& info) {
  const auto& img = info.image;
  const size_t colon = img.ref.find(':');
  return {{"ref", img.ref},
          {"name", img.ref.substr(0, colon)},
          {"version", colon == std::string::npos ? "" : img.ref.substr(colon + 1)},
          {"layer", info.layer.id},
          {"size", img.size_bytes},
          {"block_size", img.block_size},
          {"data_bytes", data_bytes(info.data_blocks, img.block_size, img.size_bytes)},
          {"containers", info.containers},
          {"created", img.created_unix},
          {"description", img.description}};
}

json container_json(const layer::ContainerInfo& info) {
  const auto& c = info.container;
  return {{"name", c.name},
          {"image", c.image_ref},
          {"size", c.size_bytes},
          {"block_size", c.block_size},
          {"delta_layer", c.delta_layer},
          {"delta_data_bytes", data_bytes(info.delta_data_blocks, c.block_size, c.size_bytes)},
          {"served_by", info.served_by ? json(*info.served_by) : json(nullptr)},
          {"created", c.created_unix}};
}

json access_rule_json(const layer::AccessRule& rule) {
  json j{{"rule", rule.deny ? "deny" : "allow"}, {"subject", rule.label}};
  switch (rule.subject) {
    case layer::AccessRule::Subject::kUid:
      j["uid"] = rule.id;
      break;
    case layer::AccessRule::Subject::kGid:
      j["gid"] = rule.id;
      break;
    case layer::AccessRule::Subject::kAddr:
      j["addr"] = rule.addr;
      break;
  }
  j["read_only"] = rule.read_only;
  return j;
}

// container_json plus the chain (delta first), the labels and the access rules: clone and
// inspect.
json container_detail_json(layer::Pool& pool, const layer::ContainerInfo& info) {
  json j = container_json(info);
  j["chain"] = json::array();
  for (size_t i = 0; i < info.chain.size(); ++i) {
    const auto& rec = info.chain[i];
    const uint64_t blocks = info.chain_data_blocks[i];
    j["chain"].push_back({{"layer", rec.id},
                          {"state", layer::to_string(rec.state)},
                          {"tier", layer::to_string(rec.tier)},
                          {"path", pool.layer_path(rec)},
                          {"data_bytes", data_bytes(blocks, rec.block_size, rec.size_bytes)}});
  }
  j["labels"] = json::object();
  for (const auto& [key, value] : info.container.labels) j["labels"][key] = value;
  j["access"] = json::array();
  for (const auto& rule : info.container.access) j["access"].push_back(access_rule_json(rule));
  j["resources"] = resources_json(info.container.resources, layer::now_unix_ms());
  return j;
}

json base_resources_json(const layer::Resources& r) {
  return {{"cpu", static_cast<double>(r.cpu_millis) / 1000},
          {"cpu_millis", r.cpu_millis},
          {"memory", r.memory_bytes},
          {"net", r.net_bps},
          {"iops", r.iops},
          {"bandwidth", r.bandwidth},
          {"priority", r.priority}};
}

json resources_json(const layer::Resources& r, uint64_t now_ms) {
  json j = base_resources_json(r);
  if (r.timed_active(now_ms)) {
    auto field = [](uint64_t v) { return v == layer::Resources::kKeep ? json(nullptr) : json(v); };
    j["timed"] = {{"iops", field(r.timed.iops)},
                  {"bandwidth", field(r.timed.bandwidth)},
                  {"until_ms", r.timed.until_ms},
                  {"left_s", static_cast<double>(r.timed.until_ms - now_ms) / 1000}};
  } else {
    j["timed"] = nullptr;
  }
  j["effective"] = {{"iops", r.effective_iops(now_ms)},
                    {"bandwidth", r.effective_bandwidth(now_ms)}};
  return j;
}

std::string resources_text(const layer::Resources& r, uint64_t now_ms) {
  auto rate = [](uint64_t v) { return v == 0 ? std::string("-") : human_size(v) + "/s"; };
  std::string s =
      fmt::format("cpu {}, memory {}, net {}, iops {}, bandwidth {}, priority {}",
                  r.cpu_millis == 0 ? "-" : layer::format_cpu(r.cpu_millis),
                  r.memory_bytes == 0 ? "-" : human_size(r.memory_bytes), rate(r.net_bps),
                  r.iops == 0 ? "-" : std::to_string(r.iops), rate(r.bandwidth), r.priority);
  if (r.timed_active(now_ms)) {
    std::string what;
    if (r.timed.iops != layer::Resources::kKeep)
      what += fmt::format("iops {}", r.timed.iops == 0 ? "-" : std::to_string(r.timed.iops));
    if (r.timed.bandwidth != layer::Resources::kKeep)
      what += fmt::format("{}bandwidth {}", what.empty() ? "" : ", ", rate(r.timed.bandwidth));
    s += fmt::format("; for now {} until {} ({}s left)", what, format_time(r.timed.until_ms / 1000),
                     (r.timed.until_ms - now_ms + 999) / 1000);
  }
  return s;
}

}  // namespace layer_cli
