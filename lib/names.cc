// names.cc — name, image ref and size rules.
#include "names.h"

namespace layer {

Status validate_name(std::string_view name, std::string_view what) {
  // [a-z0-9][a-z0-9._-]{0,63} without "..": safe as a file name and an NBD export name.
  auto lower_or_digit = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  bool ok = !name.empty() && name.size() <= 64 && lower_or_digit(name[0]) &&
            name.find("..") == std::string_view::npos;
  for (char c : name) ok = ok && (lower_or_digit(c) || c == '.' || c == '_' || c == '-');
  if (name.empty()) return make_error(EINVAL, "{} must not be empty", what);
  if (!ok)
    return make_error(EINVAL,
                      "invalid {} \"{}\": use 1-64 characters a-z 0-9 . _ -, starting with a "
                      "letter or digit, without \"..\"",
                      what, name);
  return {};
}

Status validate_image_ref(std::string_view ref) {
  const auto colon = ref.find(':');
  if (colon == std::string_view::npos || ref.find(':', colon + 1) != std::string_view::npos)
    return make_error(EINVAL, "invalid image reference \"{}\": expected NAME:VERSION", ref);
  LAYER_TRY(validate_name(ref.substr(0, colon), "image name"));
  return validate_name(ref.substr(colon + 1), "image version");
}

Status validate_label(std::string_view key, std::string_view value) {
  auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  bool ok = !key.empty() && key.size() <= 63 && alnum(key[0]);
  for (char c : key) ok = ok && (alnum(c) || c == '.' || c == '_' || c == '/' || c == '-');
  if (!ok)
    return make_error(EINVAL,
                      "invalid label key \"{}\": use 1-63 characters a-z A-Z 0-9 . _ / -, "
                      "starting with a letter or digit",
                      escape_control(key));
  if (value.size() > 256)
    return make_error(EINVAL, "label \"{}\": the value is {} bytes, more than 256", key,
                      value.size());
  for (size_t i = 0; i < value.size();) {
    const auto c = static_cast<unsigned char>(value[i]);
    if (c < 0x20 || c == 0x7f)
      return make_error(EINVAL, "label \"{}\": the value holds a control character", key);
    // UTF-8: a lead byte and its continuation bytes, no overlong forms or surrogates checked
    // beyond the byte patterns (the JSON it came from was UTF-8 already).
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool good = n != 0 && i + n <= value.size();
    for (size_t k = 1; good && k < n; ++k)
      good = (static_cast<unsigned char>(value[i + k]) & 0xc0) == 0x80;
    if (!good) return make_error(EINVAL, "label \"{}\": the value is not UTF-8", key);
    i += n;
  }
  return {};
}

Status validate_snapshot_name(std::string_view name) {
  return validate_name(name, "snapshot name");
}

Result<std::optional<std::pair<std::string, std::string>>> parse_snapshot_ref(
    std::string_view ref) {
  const auto at = ref.find('@');
  if (at == std::string_view::npos) return std::optional<std::pair<std::string, std::string>>{};
  const std::string_view c = ref.substr(0, at), s = ref.substr(at + 1);
  LAYER_TRY(validate_name(c, "container name"));
  LAYER_TRY(validate_snapshot_name(s));
  return std::optional<std::pair<std::string, std::string>>{
      std::pair<std::string, std::string>{std::string(c), std::string(s)}};
}

Result<uint64_t> parse_size(std::string_view text) {
  if (text.empty()) return make_error(EINVAL, "empty size");
  uint64_t n = 0;
  size_t i = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (n > (UINT64_MAX - d) / 10) return make_error(EINVAL, "size \"{}\" is too large", text);
    n = n * 10 + d;
  }
  if (i == 0) return make_error(EINVAL, "invalid size \"{}\"", text);
  std::string_view suffix = text.substr(i);
  // "10G", "10GB" and "10GiB" all mean 10 GiB.
  if (suffix.size() == 3 && suffix.substr(1) == "iB")
    suffix = suffix.substr(0, 1);
  else if (suffix.size() == 2 && (suffix[1] == 'B' || suffix[1] == 'b'))
    suffix = suffix.substr(0, 1);
  unsigned shift = 0;
  if (suffix.empty())
    shift = 0;
  else if (suffix.size() == 1) {
    switch (suffix[0]) {
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      default:
        return make_error(EINVAL, "invalid size \"{}\": unknown suffix", text);
    }
  } else {
    return make_error(EINVAL, "invalid size \"{}\": unknown suffix", text);
  }
  if (shift && n > (UINT64_MAX >> shift))
    return make_error(EINVAL, "size \"{}\" is too large", text);
  return n << shift;
}

std::string escape_control(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
  return out;
}

}  // namespace layer
