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
  return j;
}

}  // namespace layer_cli
