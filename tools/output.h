// output.h — the CLI's human and JSON output: sizes, times, tables, and the JSON objects of
// images and containers (shapes in docs/cli-spec.md).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "images.h"
#include "pool.h"
#include "qos.h"
#include "records.h"

namespace layer_cli {

// ordered_json keeps the fields in the order of docs/cli-spec.md.
using json = nlohmann::ordered_json;

// "64.0 MiB", "0 B".
std::string human_size(uint64_t bytes);
// Local time "YYYY-MM-DD HH:MM".
std::string format_time(uint64_t unix_seconds);
// Prints rows (the first is the header) with aligned columns on stdout.
void print_table(const std::vector<std::vector<std::string>>& rows);
// Blocks to bytes, never more than the disk's size (its last block may be short).
uint64_t data_bytes(uint64_t blocks, uint32_t block_size, uint64_t size_bytes);
// The JSON of `image ls` entries and `image import`.
json image_json(const layer::ImageInfo& info);
// The JSON of `ls` entries.
json container_json(const layer::ContainerInfo& info);
// One access rule: {"rule":"allow"|"deny","subject":"user:alice","uid":N|"gid":N|"addr":CIDR,
// "read_only":B}.
json access_rule_json(const layer::AccessRule& rule);
// container_json plus the chain (delta first), labels, access rules and resources: `clone`,
// `inspect`.
json container_detail_json(layer::Pool& pool, const layer::ContainerInfo& info);
// A container's resources at `now_ms` (0: unset / unlimited): {"cpu":X,"cpu_millis":N,
// "memory":N,"net":N,"iops":N,"bandwidth":N,"priority":N,"timed":null|{"iops":N|null,
// "bandwidth":N|null,"until_ms":N,"left_s":X},"effective":{"iops":N,"bandwidth":N}}.
json resources_json(const layer::Resources& r, uint64_t now_ms);
// The base allocations alone (no timed override): what `layer apply` plans with.
json base_resources_json(const layer::Resources& r);
// The same on one line: "cpu 2, memory 1.0 GiB, ..., priority 5; for now iops 4000 until ...".
std::string resources_text(const layer::Resources& r, uint64_t now_ms);

}  // namespace layer_cli
