// checksum.h — xxh3-64 checksums of frozen layers, one per 64 KiB group (DESIGN.md
// "Checksums"). A writable delta is never hashed.
//
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

namespace layer {

// xxh3-64 of a buffer. A group that holds data never hashes to 0 in the `sums` encoding:
// a computed 0 is stored as 1 (0 means "no data in this group").
uint64_t group_checksum(const void* data, size_t len);

}  // namespace layer
