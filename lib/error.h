// error.h — the error type of lib/: Error{code, message} and Result<T>.
//
// Every lib/ call that can fail returns Result<T>: a value or an Error whose `code` is an errno
// value (EIO for corruption and I/O failures, ENOENT for missing objects, EINVAL for bad input,
// EEXIST, EBUSY for objects in use, ENOSPC, ENOTSUP for unsupported formats) and whose `message`
// names the thing and the reason. No exception crosses lib/.
//
// Thread-safety: values; no shared state.
#pragma once

#include <fmt/format.h>

#include <cerrno>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace layer {

struct Error {
  int code = EIO;
  std::string message;
};

// Builds an Error from an errno code and a fmt format string.
template <typename... Args>
Error make_error(int code, fmt::format_string<Args...> format, Args&&... args) {
  return Error{code, fmt::format(format, std::forward<Args>(args)...)};
}

// An Error whose message ends with strerror(code): "open tiers/ssd/7.layer: No such file".
Error sys_error(int code, std::string_view what);
// sys_error(errno, "open {}", path): formats after `code` is taken, so a formatting step that
// changes errno (an allocation) cannot change the error reported.
template <typename... Args>
Error sys_error(int code, fmt::format_string<Args...> format, Args&&... args) {
  return sys_error(code, std::string_view(fmt::format(format, std::forward<Args>(args)...)));
}

// The symbolic name of an errno value ("EBUSY"; "ENOTSUP" for ENOTSUP), or "errno N".
std::string errno_name(int code);
// The errno value errno_name gives `name` for; EIO for a name it does not know.
int errno_code(std::string_view name);

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  // REQUIRES: ok().
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  // REQUIRES: !ok().
  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const& { return error_; }
  Error&& error() && { return std::move(error_); }

 private:
  Error error_;
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace layer

// Propagates an error: `LAYER_TRY(f());` returns f()'s Error from the enclosing function.
#define LAYER_TRY(expr)                                             \
  do {                                                              \
    auto layer_try_r_ = (expr);                                     \
    if (!layer_try_r_.ok()) return std::move(layer_try_r_).error(); \
  } while (0)

#define LAYER_CONCAT_INNER(a, b) a##b
#define LAYER_CONCAT(a, b) LAYER_CONCAT_INNER(a, b)
// `LAYER_ASSIGN(auto x, f());` declares x from f()'s value or returns its Error.
#define LAYER_ASSIGN(decl, expr) \
  LAYER_ASSIGN_IMPL(LAYER_CONCAT(layer_assign_r_, __LINE__), decl, expr)
#define LAYER_ASSIGN_IMPL(tmp, decl, expr)      \
  auto tmp = (expr);                            \
  if (!tmp.ok()) return std::move(tmp).error(); \
  decl = std::move(tmp).value()
