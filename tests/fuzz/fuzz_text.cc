// fuzz_text.cc — libFuzzer target: the parsers of text that users, clients and files give:
// names, image refs NAME:VER, snapshot refs C@SNAP, NBD export names (C, C@SNAP, C@A..B),
// sizes, durations, tier names, errno names (control replies) and holder notes (run/holders).
// (Access subjects and the audit trail: fuzz_access.)
//
// Input: one selector byte (modulo kTextModes picks the parser), then the text. Each parser is held
// to a reference written here another way (a regex for names, 128-bit arithmetic for sizes and
// durations), and, where it applies, to a round trip: what parses, printed back, parses to the
// same value. A refused text is EINVAL.
#include <algorithm>
#include <optional>
#include <regex>

#include "disk.h"
#include "error.h"
#include "fuzz_inputs.h"
#include "fuzz_util.h"
#include "locks.h"
#include "names.h"
#include "records.h"
#include "tier.h"

using namespace layer;

namespace {

using u128 = unsigned __int128;

using Mode = fuzz::TextMode;
using namespace fuzz;
using fuzz::check_refusal;
using fuzz::printable;

// names.h's rule, as its comment states it: [a-z0-9][a-z0-9._-]{0,63} without "..".
bool reference_name(std::string_view s) {
  static const std::regex rule("[a-z0-9][a-z0-9._-]{0,63}");
  return s.size() <= 64 && std::regex_match(s.begin(), s.end(), rule) &&
         s.find("..") == std::string_view::npos;
}

void names(Mode mode, std::string_view text) {
  switch (mode) {
    case kName: {
      const auto r = validate_name(text, "fuzzed name");
      check_refusal(r, text, "validate_name");
      FUZZ_CHECK(r.ok() == reference_name(text), "validate_name " + printable(text));
      if (!r.ok())
        FUZZ_CHECK(r.error().message.find("fuzzed name") != std::string::npos,
                   "the message does not say what was named");
      break;
    }
    case kImageRef: {
      const auto r = validate_image_ref(text);
      check_refusal(r, text, "validate_image_ref");
      const size_t colon = text.find(':');
      const bool want = colon != std::string_view::npos && reference_name(text.substr(0, colon)) &&
                        reference_name(text.substr(colon + 1));
      FUZZ_CHECK(r.ok() == want, "validate_image_ref " + printable(text));
      break;
    }
    case kSnapshotRef: {
      const auto r = parse_snapshot_ref(text);
      check_refusal(r, text, "parse_snapshot_ref");
      const size_t at = text.find('@');
      if (at == std::string_view::npos) {
        FUZZ_CHECK(r.ok() && !r->has_value(), "parse_snapshot_ref without '@' " + printable(text));
        break;
      }
      const bool want = reference_name(text.substr(0, at)) && reference_name(text.substr(at + 1));
      FUZZ_CHECK(r.ok() == want, "parse_snapshot_ref " + printable(text));
      if (r.ok()) {
        FUZZ_CHECK(r->has_value(), "parse_snapshot_ref lost the '@' of " + printable(text));
        FUZZ_CHECK((*r)->first + "@" + (*r)->second == text,
                   "parse_snapshot_ref does not split " + printable(text));
      }
      break;
    }
    case kExportName: {
      const auto r = parse_export_name(text);
      check_refusal(r, text, "parse_export_name");
      // C, C@S or C@A..B; a snapshot name cannot hold "..", so the first ".." splits A..B.
      const size_t at = text.find('@');
      bool want = reference_name(text.substr(0, at));
      if (want && at != std::string_view::npos) {
        const std::string_view snap = text.substr(at + 1);
        const size_t dots = snap.find("..");
        want = dots == std::string_view::npos
                   ? reference_name(snap)
                   : reference_name(snap.substr(0, dots)) && reference_name(snap.substr(dots + 2));
      }
      FUZZ_CHECK(r.ok() == want, "parse_export_name " + printable(text));
      if (r.ok()) {
        std::string back = r->container;
        if (!r->snapshot.empty())
          back += "@" + (r->since.empty() ? "" : r->since + "..") + r->snapshot;
        FUZZ_CHECK(back == text, "parse_export_name does not give back " + printable(text));
        FUZZ_CHECK(r->since.empty() || !r->snapshot.empty(), "a diff export without its snapshot");
      }
      break;
    }
    default:
      std::abort();
  }
}

// parse_size's syntax (names.h): digits, then nothing, K, M, G or T (either case), optionally
// followed by B, b or (after the letter) iB; binary units. None when it does not fit 64 bits.
std::optional<uint64_t> reference_size(std::string_view text) {
  size_t i = 0;
  u128 n = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i)
    n = std::min<u128>(n * 10 + static_cast<u128>(text[i] - '0'), u128{1} << 64);
  if (i == 0) return std::nullopt;
  const std::string_view suffix = text.substr(i);
  int shift = suffix.empty() ? 0 : -1;
  const std::pair<char, int> units[] = {{'k', 10}, {'m', 20}, {'g', 30}, {'t', 40}};
  for (const auto& [letter, bits] : units)
    for (const char c : {letter, static_cast<char>(letter - 'a' + 'A')})
      for (const std::string tail : {"", "B", "b", "iB"})
        if (suffix == std::string(1, c) + tail) shift = bits;
  if (shift < 0) return std::nullopt;
  const u128 value = n << shift;
  if (value > UINT64_MAX) return std::nullopt;
  return static_cast<uint64_t>(value);
}

void sizes(std::string_view text) {
  const auto r = parse_size(text);
  check_refusal(r, text, "parse_size");
  const auto want = reference_size(text);
  FUZZ_CHECK(r.ok() == want.has_value(), "parse_size " + printable(text));
  if (!r.ok()) return;
  FUZZ_CHECK(*r == *want, "parse_size " + printable(text) + " = " + std::to_string(*r));
  const auto again = parse_size(std::to_string(*r));
  FUZZ_CHECK(again.ok() && *again == *r, "parse_size does not read back " + std::to_string(*r));
}

// "90", "90s", "10m", "2h", "7d": 1 to 12 digits and an optional unit.
std::optional<uint64_t> reference_duration(std::string_view text) {
  if (text.empty()) return std::nullopt;
  uint64_t unit = 1;
  switch (text.back()) {
    case 's':
      unit = 1;
      break;
    case 'm':
      unit = 60;
      break;
    case 'h':
      unit = 3600;
      break;
    case 'd':
      unit = 86400;
      break;
    default:
      unit = 0;
  }
  if (unit != 0) text.remove_suffix(1);
  unit = std::max<uint64_t>(unit, 1);
  if (text.empty() || text.size() > 12) return std::nullopt;
  uint64_t n = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  return n * unit;
}

// format_duration's output: digits and one unit, exactly `seconds`, in the largest unit that
// divides it.
void check_format_duration(uint64_t seconds) {
  const std::string text = format_duration(seconds);
  FUZZ_CHECK(text.size() >= 2, "format_duration(" + std::to_string(seconds) + ") = " + text);
  const char unit_char = text.back();
  const std::string_view digits = std::string_view(text).substr(0, text.size() - 1);
  FUZZ_CHECK(digits.find_first_not_of("0123456789") == std::string_view::npos,
             "format_duration(" + std::to_string(seconds) + ") = " + text);
  u128 n = 0;
  for (char c : digits) n = n * 10 + static_cast<u128>(c - '0');
  const uint64_t unit = unit_char == 'd'   ? 86400
                        : unit_char == 'h' ? 3600
                        : unit_char == 'm' ? 60
                                           : 1;
  FUZZ_CHECK(unit_char == 's' || unit != 1, "format_duration unit in " + text);
  FUZZ_CHECK(n * unit == seconds, "format_duration(" + std::to_string(seconds) + ") = " + text);
  for (const uint64_t larger : {60, 3600, 86400})
    if (larger > unit && seconds != 0)
      FUZZ_CHECK(seconds % larger != 0, "format_duration(" + std::to_string(seconds) +
                                            ") = " + text + " is not in the largest unit");
}

void durations(std::string_view text) {
  const auto r = parse_duration(text);
  check_refusal(r, text, "parse_duration");
  const auto want = reference_duration(text);
  FUZZ_CHECK(r.ok() == want.has_value(), "parse_duration " + printable(text));
  if (!r.ok()) return;
  FUZZ_CHECK(*r == *want, "parse_duration " + printable(text) + " = " + std::to_string(*r));
  check_format_duration(*r);
  // What `layer tier policy` prints, the same command takes back.
  const auto again = parse_duration(format_duration(*r));
  FUZZ_CHECK(again.ok() && *again == *r,
             "parse_duration does not read back format_duration(" + std::to_string(*r) + ")");
}

void tiers(std::string_view text) {
  const auto r = parse_tier(text);
  check_refusal(r, text, "parse_tier");
  FUZZ_CHECK(r.ok() == (text == "ssd" || text == "hdd"), "parse_tier " + printable(text));
  if (r.ok()) FUZZ_CHECK(to_string(*r) == text, "to_string(parse_tier(" + printable(text) + "))");
}

// errno names cross the control socket ("errno":"EBUSY"); a reply may hold any string.
void errnos(fuzz::FuzzInput& in) {
  const int code = static_cast<int>(static_cast<uint32_t>(in.u64()));
  const std::string name = errno_name(code);
  // errno_code knows the names of 1..255 (glibc names 0 "0"); any other code reads back as EIO.
  if (code >= 1 && code <= 255 && !name.starts_with("errno "))
    FUZZ_CHECK(errno_code(name) == code, "errno_code(errno_name(" + std::to_string(code) + "))");
  else if (name != "EIO")
    FUZZ_CHECK(errno_code(name) == EIO, "errno_code(" + name + ")");
  const std::string_view text = in.rest();
  const int back = errno_code(text);
  FUZZ_CHECK(back > 0, "errno_code(" + printable(text) + ") = " + std::to_string(back));
  if (back != EIO &&
      text != "EOPNOTSUPP")  // glibc's name of ENOTSUP's value, which we call ENOTSUP
    FUZZ_CHECK(errno_name(back) == text, "errno_name(errno_code(" + printable(text) + "))");
}

// A holder note names the pid that serves a container; the file may hold anything.
void holder_notes(std::string_view text) {
  const pid_t pid = holder_pid(text);
  u128 want = 0;
  if (text.starts_with("pid "))
    for (char c : text.substr(4)) {
      if (c < '0' || c > '9') break;
      want = std::min<u128>(want * 10 + static_cast<u128>(c - '0'), u128{1} << 64);
    }
  if (want > INT32_MAX) want = 0;
  FUZZ_CHECK(static_cast<u128>(pid) == want,
             "holder_pid(" + printable(text) + ") = " + std::to_string(pid));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  const auto mode = static_cast<Mode>(in.u8() % kTextModes);
  const std::string_view text = in.rest();
  switch (mode) {
    case kName:
    case kImageRef:
    case kSnapshotRef:
    case kExportName:
      names(mode, text);
      break;
    case kSize:
      sizes(text);
      break;
    case kDuration:
      durations(text);
      break;
    case kFormatDuration:
      check_format_duration(in.u64());
      break;
    case kTier:
      tiers(text);
      break;
    case kErrno:
      errnos(in);
      break;
    case kHolderNote:
      holder_notes(text);
      break;
    case kTextModes:
      std::abort();
  }
  return 0;
}
