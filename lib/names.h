// names.h — the rules for names the user gives: containers, snapshots, image refs, sizes.
//
// Names end up in NBD export names, CLI arguments and messages, so one rule covers all of
// them: [a-z0-9][a-z0-9._-]{0,63} without "..".
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "error.h"

namespace layer {

// Names of containers and snapshots, image names and versions: [a-z0-9][a-z0-9._-]{0,63}
// without "..". Errors: EINVAL naming `what` and the rule.
Status validate_name(std::string_view name, std::string_view what);
// validate_name(name, "snapshot name").
Status validate_snapshot_name(std::string_view name);
// "name:version" -> checked. Errors: EINVAL.
Status validate_image_ref(std::string_view ref);
// A container label (records.h ContainerRecord::labels): the key 1-63 characters
// [a-zA-Z0-9._/-] starting with a letter or digit; the value at most 256 bytes of UTF-8
// without control characters. Errors: EINVAL naming the key and the rule.
Status validate_label(std::string_view key, std::string_view value);
// "CONTAINER@SNAP" split; std::nullopt when `ref` has no '@'. Errors: EINVAL for bad names.
Result<std::optional<std::pair<std::string, std::string>>> parse_snapshot_ref(std::string_view ref);
// Parses sizes like "4096", "512M", "10G", "1T" (binary units). Errors: EINVAL.
Result<uint64_t> parse_size(std::string_view text);
// `text` with its control characters (below 0x20, and 0x7f) as \xNN: for a line of a log or a
// table that quotes what a client or a file gave (an export name with a newline stays one line).
std::string escape_control(std::string_view text);

}  // namespace layer
