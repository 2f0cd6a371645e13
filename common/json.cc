#include "common/json.h"

#include <array>
#include <charconv>
#include <cstdint>
#include <cstring>

namespace tollgate {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 when it is invalid.
size_t utf8Length(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t len;
  uint32_t min;
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) {
    len = 2;
    min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3;
    min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4;
    min = 0x10000;
  } else
    return 0;
  if (i + len > s.size()) return 0;
  uint32_t cp = c & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) {
    auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

}  // namespace

size_t firstInvalidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t len = utf8Length(s, i);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Bytes copied as they are: printable ASCII other than " and \.
constexpr std::array<bool, 256> kPlain = [] {
  std::array<bool, 256> t{};
  for (int c = 0x20; c < 0x80; ++c) t[static_cast<size_t>(c)] = c != '"' && c != '\\';
  return t;
}();

namespace {

// Whether all eight bytes of x are plain (kPlain), tested at once: no high bit (UTF-8), no
// byte below 0x20, no quote and no backslash. Each test is exact as a yes or no.
inline bool plain8(uint64_t x) {
  constexpr uint64_t k01 = 0x0101010101010101ull, k80 = 0x8080808080808080ull;
  auto hasZero = [](uint64_t y) { return (y - k01) & ~y & k80; };
  auto hasBelow = [](uint64_t y, uint64_t n) { return (y - k01 * n) & ~y & k80; };
  return ((x & k80) | hasBelow(x, 0x20) | hasZero(x ^ (k01 * '"')) | hasZero(x ^ (k01 * '\\'))) ==
         0;
}

// How many bytes at the start of `text` are plain, found eight at a time.
size_t plainPrefix(std::string_view text) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  size_t run = 0;
  for (uint64_t x; run + 8 <= text.size(); run += 8) {
    std::memcpy(&x, bytes + run, 8);
    if (!plain8(x)) break;
  }
  while (run < text.size() && kPlain[bytes[run]]) ++run;
  return run;
}

}  // namespace

void appendJsonString(std::string& out, std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  size_t plain = plainPrefix(text);
  if (plain == text.size()) {
    // Nearly every string (keys, names, paths): one growth of `out` and one copy.
    size_t at = out.size();
    out.resize(at + text.size() + 2);
    char* p = out.data() + at;
    p[0] = '"';
    if (!text.empty()) std::memcpy(p + 1, text.data(), text.size());
    p[text.size() + 1] = '"';
    return;
  }
  out += '"';
  out.append(text.data(), plain);
  for (size_t i = plain; i < text.size();) {
    // The common case: a run of plain bytes, copied at once.
    size_t run = i + plainPrefix(text.substr(i));
    if (run > i) {
      out.append(text.data() + i, run - i);
      i = run;
      continue;
    }
    auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80) {
      size_t len = utf8Length(text, i);
      if (len == 0) {
        out += "\xef\xbf\xbd";  // U+FFFD, as itself
        ++i;
      } else {
        out.append(text.substr(i, len));
        i += len;
      }
      continue;
    }
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:  // the other control characters
        out += "\\u00";
        out += kHex[c >> 4];
        out += kHex[c & 0xF];
    }
    ++i;
  }
  out += '"';
}

void JsonObject::key(std::string_view key) {
  if (!first_) out_ += ',';
  first_ = false;
  appendJsonString(out_, key);
  out_ += ':';
}

JsonObject& JsonObject::add(std::string_view k, std::string_view value) {
  key(k);
  appendJsonString(out_, value);
  return *this;
}

JsonObject& JsonObject::add(std::string_view k, int64_t value) {
  key(k);
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
  out_.append(buf, end);
  return *this;
}

JsonObject& JsonObject::add(std::string_view k, uint64_t value) {
  key(k);
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
  out_.append(buf, end);
  return *this;
}

JsonObject& JsonObject::add(std::string_view k, bool value) {
  key(k);
  out_ += value ? "true" : "false";
  return *this;
}

JsonObject& JsonObject::addRaw(std::string_view k, std::string_view json) {
  key(k);
  out_ += json;
  return *this;
}

}  // namespace tollgate
