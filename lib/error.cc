#include "error.h"

#include <cstring>

namespace layer {

Error sys_error(int code, std::string_view what) {
  // strerrordesc_np, not strerror: no locale lookup (strerror's takes glibc's locale lock,
  // which wedges nbdkit's exit when the ASan runtime is preloaded), and thread-safe.
  const char* text = ::strerrordesc_np(code);
  if (!text) return Error{code, fmt::format("{}: error {}", what, code)};
  return Error{code, fmt::format("{}: {}", what, text)};
}

std::string errno_name(int code) {
  if (code == ENOTSUP) return "ENOTSUP";  // glibc names the shared value EOPNOTSUPP
  const char* name = ::strerrorname_np(code);
  return name != nullptr ? name : fmt::format("errno {}", code);
}

int errno_code(std::string_view name) {
  if (name == "ENOTSUP") return ENOTSUP;
  for (int code = 1; code < 256; ++code) {
    const char* known = ::strerrorname_np(code);
    if (known != nullptr && name == known) return code;
  }
  return EIO;
}

}  // namespace layer
