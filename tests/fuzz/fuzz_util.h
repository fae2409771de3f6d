// fuzz_util.h — what the libFuzzer targets share: a check that aborts with its reason (so
// libFuzzer saves the input as a crash), and a reader over the input bytes.
//
// Thread-safety: FuzzInput is a plain value; FUZZ_CHECK may be used from any thread.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

// A property that must hold for every input: when it does not, says which and where, then
// aborts (libFuzzer reports a crash and writes the input as crash-<sha1>).
#define FUZZ_CHECK(cond, ...)                                                               \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: %s\n", __FILE__, __LINE__, #cond, \
                   std::string(__VA_ARGS__).c_str());                                       \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

namespace fuzz {

// The input as bytes to take from the front; reads past the end give zeroes and an empty rest.
class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : in_(reinterpret_cast<const char*>(data), size) {}
  uint8_t u8() {
    if (in_.empty()) return 0;
    const auto v = static_cast<uint8_t>(in_[0]);
    in_.remove_prefix(1);
    return v;
  }
  uint64_t u64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | u8();
    return v;
  }
  // The bytes not taken yet.
  std::string_view rest() const { return in_; }

 private:
  std::string_view in_;
};

// `s` quoted, with bytes outside printable ASCII as \xNN.
inline std::string printable(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    }
  }
  return out + "\"";
}

// A parser's refusal of `text` must be EINVAL (a Result or Status `r`).
template <typename R>
void check_refusal(const R& r, std::string_view text, const char* what) {
  if (!r.ok())
    FUZZ_CHECK(r.error().code == EINVAL, std::string(what) + " " + printable(text) + ": errno " +
                                             std::to_string(r.error().code) + ", not EINVAL");
}

}  // namespace fuzz
