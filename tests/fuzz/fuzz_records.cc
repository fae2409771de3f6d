// fuzz_records.cc — libFuzzer target: the decoding of index values (records.h: layers, images,
// containers, snapshots, intents, heat, the tier policy, sums, stale and restore marks; and the
// `maps` rows of block_map.h), which come from disk and are untrusted (docs/format.md).
//
// Input: one selector byte, then the value. The selector's low 7 bits modulo kRecordKinds pick the
// decoder (fuzz_seeds.cc writes one seed per kind with this byte in front); its high bit, for a
// layer, asks for the id after the one the record holds, which decode_layer must refuse.
//
// Properties, beyond no crash, leak or undefined behaviour:
// - a refused value is Error{EIO} (records.h);
// - a value that decodes re-encodes to the same bytes: every encoding is canonical, except a
//   container's labels given out of order or twice, a 1 KiB map row whose blocks all share one
//   state (the encoder writes 1 byte), and rows of a record's first layout, without the fields
//   added at its end since (a container's access rules, the tier policy's move_rate). For
//   those, the re-encoding must decode, and re-encode to itself.
// - a value that decodes is refused once one byte shorter (truncated) or one byte longer
//   (trailing bytes): no record is a prefix of another of its kind.
// - decoded enums hold values their to_string knows.
#include <cstring>

#include "block_map.h"
#include "fuzz_inputs.h"
#include "fuzz_util.h"
#include "records.h"
#include "tier.h"

using namespace layer;

namespace {

using Kind = fuzz::RecordKind;
using namespace fuzz;

std::string describe(const Error& e) {
  return e.message + " (errno " + std::to_string(e.code) + ")";
}

// Decodes `bytes` as `kind`; the error, or the canonical re-encoding of what was decoded.
struct Decoded {
  bool ok = false;
  Error error;
  std::string reencoded;
};

template <typename T, typename Encode>
Decoded from(Result<T> r, Encode encode) {
  Decoded d;
  d.ok = r.ok();
  if (d.ok)
    d.reencoded = encode(*r);
  else
    d.error = r.error();
  return d;
}

Decoded decode(Kind kind, std::string_view bytes, bool wrong_id) {
  switch (kind) {
    case kLayer: {
      uint64_t id = 0;  // the id the record holds (bytes 1..8), so that it can decode
      for (size_t i = 1; i < 9 && i < bytes.size(); ++i)
        id = id << 8 | static_cast<uint8_t>(bytes[i]);
      if (wrong_id) ++id;
      auto r = decode_layer(bytes, id);
      if (r) {
        FUZZ_CHECK(r->id == id, "decode_layer kept a record of another id");
        FUZZ_CHECK(std::strcmp(to_string(r->state), "invalid") != 0, "layer state out of range");
        FUZZ_CHECK(r->tier == Tier::kSsd || r->tier == Tier::kHdd, "tier out of range");
      }
      return from(std::move(r), [](const LayerRecord& v) { return encode(v); });
    }
    case kImage:
      return from(decode_image(bytes, "fuzz:1"), [](const ImageRecord& v) { return encode(v); });
    case kContainer:
      return from(decode_container(bytes, "fuzz"),
                  [](const ContainerRecord& v) { return encode(v); });
    case kSnapshot:
      return from(decode_snapshot(bytes, snapshot_key(7, "fuzz")),
                  [](const SnapshotRecord& v) { return encode(v); });
    case kIntent: {
      auto r = decode_intent(bytes, 1);
      if (r) {
        const auto k = static_cast<uint8_t>(r->kind);
        FUZZ_CHECK(k >= 1 && k <= 5, "intent kind " + std::to_string(k) + " out of range");
      }
      return from(std::move(r), [](const IntentRecord& v) { return encode(v); });
    }
    case kHeat:
      return from(decode_heat(bytes, 1), [](const HeatRecord& v) { return encode(v); });
    case kTierPolicy: {
      auto r = decode_tier_policy(bytes);
      if (r) {
        FUZZ_CHECK(static_cast<uint8_t>(r->high_water) <= 2, "high-water kind out of range");
        // What `layer tier policy` does with a stored policy: check it, print it.
        (void)validate_tier_policy(*r);
        (void)format_duration(r->cold_after_s);
        (void)format_duration(r->half_life_s);
      }
      return from(std::move(r), [](const TierPolicy& v) { return encode(v); });
    }
    case kSums: {
      auto r = decode_sums(bytes);
      if (r) FUZZ_CHECK(r->size() <= kSumsPerRow, "more sums than a row holds");
      return from(std::move(r), [](const std::vector<uint64_t>& v) { return encode_sums(v); });
    }
    case kMapRow: {
      auto r = decode_chunk(bytes);
      if (r)
        for (uint32_t i = 0; i < kBlocksPerChunk; ++i)
          FUZZ_CHECK(std::strcmp(to_string(r->get(i)), "invalid") != 0,
                     "block " + std::to_string(i) + " decoded in state 11");
      return from(std::move(r), [](const ChunkBits& v) { return encode_chunk(v); });
    }
    case kStale:
      return from(decode_stale(bytes), [](const StaleRecord& v) { return encode(v); });
    case kRestore:
      return from(decode_restore(bytes), [](const RestoreRecord& v) { return encode(v); });
    case kRecordKinds:
      break;
  }
  std::abort();
}

// The encodings that are not canonical (see the top of the file): true when `bytes` is one.
bool allowed_to_differ(Kind kind, std::string_view bytes) {
  if (kind == kMapRow) {
    if (bytes.size() != kChunkBytes) return false;
    // Uniform: every byte the same, and each of its four 2-bit fields the same state.
    const auto b = static_cast<uint8_t>(bytes[0]);
    for (char c : bytes)
      if (static_cast<uint8_t>(c) != b) return false;
    return b == 0x00 || b == 0x55 || b == 0xaa;
  }
  if (kind == kTierPolicy) {
    // A policy of the first layout, without move_rate: it re-encodes with the default.
    return bytes.size() + 8 == encode(*decode_tier_policy(bytes)).size();
  }
  if (kind != kContainer) return false;
  // Walk the labels the way the format lays them out: the encoding of the same container
  // without labels and rules ends with the label count and the rule count, both 0.
  auto r = decode_container(bytes, "fuzz");
  ContainerRecord bare = *r;
  bare.labels.clear();
  bare.access.clear();
  size_t pos = encode(bare).size() - 4;
  auto u32 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t i = 0; i < 4; ++i) v = v << 8 | static_cast<uint8_t>(bytes[at + i]);
    return v;
  };
  const uint32_t count = u32(pos - 4);
  std::string_view previous;
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t key_len = u32(pos);
    const std::string_view key = bytes.substr(pos + 4, key_len);
    pos += 4 + key_len;
    pos += 4 + u32(pos);                          // the value
    if (i > 0 && !(previous < key)) return true;  // out of order, or twice
    previous = key;
  }
  // A row of the first layout ends with the labels: it re-encodes with an empty rule list.
  return pos == bytes.size();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t selector = data[0];
  const auto kind = static_cast<Kind>((selector & 0x7f) % kRecordKinds);
  const bool wrong_id = (selector & 0x80) != 0;
  const std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);

  const Decoded d = decode(kind, bytes, wrong_id);
  if (!d.ok) {
    FUZZ_CHECK(d.error.code == EIO, "refused with " + describe(d.error) + ", not EIO");
    FUZZ_CHECK(!d.error.message.empty(), "an error without a message");
    return 0;
  }
  FUZZ_CHECK(!(kind == kLayer && wrong_id), "decode_layer accepted a record of another id");
  if (d.reencoded != bytes) {
    FUZZ_CHECK(allowed_to_differ(kind, bytes),
               "kind " + std::to_string(kind) + ": re-encoding differs from a canonical input");
    // Not canonical: the canonical form must itself decode, to the same canonical form.
    const Decoded again = decode(kind, d.reencoded, false);
    FUZZ_CHECK(again.ok, "the re-encoding does not decode: " + describe(again.error));
    FUZZ_CHECK(again.reencoded == d.reencoded, "the re-encoding does not round-trip");
  }

  // A value that decodes is never empty (it starts with the record version).
  const Decoded shorter = decode(kind, bytes.substr(0, bytes.size() - 1), wrong_id);
  FUZZ_CHECK(!shorter.ok,
             "kind " + std::to_string(kind) + ": a value one byte shorter decodes too");
  FUZZ_CHECK(shorter.error.code == EIO, "truncation gives " + describe(shorter.error));
  std::string longer(bytes);
  longer.push_back('\0');
  const Decoded extended = decode(kind, longer, wrong_id);
  FUZZ_CHECK(!extended.ok,
             "kind " + std::to_string(kind) + ": a value with a trailing byte decodes");
  FUZZ_CHECK(extended.error.code == EIO, "a trailing byte gives " + describe(extended.error));
  return 0;
}
