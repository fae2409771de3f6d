// fuzz_inputs.h — the selector bytes that start the inputs of fuzz_records and fuzz_text, shared
// with fuzz_seeds, which writes their seed corpora.
#pragma once

#include <cstdint>

namespace fuzz {

// fuzz_records: (first byte & 0x7f) % kRecordKinds picks the decoder.
enum RecordKind : uint8_t {
  kLayer,
  kImage,
  kContainer,
  kSnapshot,
  kIntent,
  kHeat,
  kTierPolicy,
  kSums,
  kMapRow,
  kStale,
  kRestore,
  kRecordKinds
};

// fuzz_text: first byte % kTextModes picks the parser.
enum TextMode : uint8_t {
  kName,
  kImageRef,
  kSnapshotRef,
  kExportName,
  kSize,
  kDuration,
  kFormatDuration,
  kTier,
  kErrno,
  kHolderNote,
  kTextModes
};

// fuzz_access: first byte % kAccessModes picks what is fuzzed.
enum AccessMode : uint8_t {
  kAccessSubject,
  kAccessPolicy,
  kAccessDecision,
  kAuditLog,
  kAccessModes
};

// fuzz_control: an even first byte fuzzes the server, an odd one the client.
constexpr uint8_t kControlServer = 0;
constexpr uint8_t kControlClient = 1;

}  // namespace fuzz
