// fuzz_keys.cc — libFuzzer target: the index's key encoding (index.h's key_u64, key_u64_u32
// and their decoders; records.h's snapshot_key), on which every range scan relies.
//
// Input: any bytes. Properties:
// - decode_key_u64 takes exactly the 8-byte keys, decode_key_u64_u32 exactly the 12-byte ones,
//   and encoding what they decode gives the key back;
// - byte order of keys is numeric order (LMDB compares keys with memcmp): for two pairs read
//   from the input, key order equals the order of the (id, n) pairs, and of the ids alone;
// - snapshot_key(id, name) is key_u64(id) followed by the name, so a container's snapshots are
//   exactly the keys with its 8-byte prefix.
#include <tuple>

#include "fuzz_util.h"
#include "index.h"
#include "records.h"

using namespace layer;

namespace {

int sign(int c) { return (c > 0) - (c < 0); }

template <typename T>
int order(const T& a, const T& b) {
  return a < b ? -1 : (b < a ? 1 : 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);

  const auto u64 = decode_key_u64(bytes);
  FUZZ_CHECK(u64.has_value() == (size == 8),
             "decode_key_u64 of " + std::to_string(size) + " bytes");
  if (u64) FUZZ_CHECK(key_u64(*u64) == bytes, "key_u64(decode_key_u64(k)) != k");
  const auto pair = decode_key_u64_u32(bytes);
  FUZZ_CHECK(pair.has_value() == (size == 12),
             "decode_key_u64_u32 of " + std::to_string(size) + " bytes");
  if (pair)
    FUZZ_CHECK(key_u64_u32(pair->first, pair->second) == bytes,
               "key_u64_u32(decode_key_u64_u32(k)) != k");

  fuzz::FuzzInput in(data, size);
  const uint64_t id_a = in.u64(), id_b = in.u64();
  const uint32_t n_a = static_cast<uint32_t>(in.u64()), n_b = static_cast<uint32_t>(in.u64());
  const std::string ka = key_u64_u32(id_a, n_a), kb = key_u64_u32(id_b, n_b);
  FUZZ_CHECK(ka.size() == 12 && kb.size() == 12, "key_u64_u32 is not 12 bytes");
  FUZZ_CHECK(sign(ka.compare(kb)) == order(std::tie(id_a, n_a), std::tie(id_b, n_b)),
             "key_u64_u32 byte order differs from (id, n) order");
  FUZZ_CHECK(sign(key_u64(id_a).compare(key_u64(id_b))) == order(id_a, id_b),
             "key_u64 byte order differs from numeric order");
  const auto back = decode_key_u64_u32(ka);
  FUZZ_CHECK(back && back->first == id_a && back->second == n_a, "key_u64_u32 does not decode");

  const std::string_view name = in.rest();
  const std::string snap = snapshot_key(id_a, name);
  FUZZ_CHECK(snap.size() == 8 + name.size(), "snapshot_key length");
  FUZZ_CHECK(snap.starts_with(key_u64(id_a)), "snapshot_key lacks its container's prefix");
  FUZZ_CHECK(snap.substr(8) == name, "snapshot_key does not end with the name");
  FUZZ_CHECK(id_a == id_b || !snap.starts_with(key_u64(id_b)),
             "snapshot_key starts with another container's prefix");
  return 0;
}
