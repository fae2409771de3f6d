#include "error.h"

#include <cstring>

namespace layer {

Error sys_error(int code, std::string_view what) {
  return Error{code, fmt::format("{}: {}", what, std::strerror(code))};
}

}  // namespace layer
