#include "checksum.h"

#include <xxhash.h>

namespace layer {

uint64_t group_checksum(const void* data, size_t len) {
  const uint64_t h = XXH3_64bits(data, len);
  return h == 0 ? 1 : h;  // 0 is reserved for "no data in this group"
}

}  // namespace layer
