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

}  // namespace layer
