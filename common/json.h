// A minimal JSON writer for log lines and replies on the hot path: appends to a caller's
// string, escapes strings, never allocates beyond the output.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tollgate {

// Appends `text` as a JSON string literal (with quotes), in the canonical form of the
// audit stream (the bytes nlohmann-json writes with ensure_ascii off): `"` `\` and control
// characters escaped (\b \f \n \r \t, else \u00XX), everything else as is. Invalid UTF-8
// bytes become U+FFFD.
void appendJsonString(std::string& out, std::string_view text);

// The offset of the first byte of s that is not valid UTF-8 (overlong forms, surrogates and
// code points above U+10FFFF included), or npos.
size_t firstInvalidUtf8(std::string_view s);

// Builds one JSON object: JsonObject(out).add("k", "v").add("n", 3).close().
class JsonObject {
 public:
  explicit JsonObject(std::string& out) : out_(out) { out_ += '{'; }
  JsonObject& add(std::string_view key, std::string_view value);
  JsonObject& add(std::string_view key, const char* value) {
    return add(key, std::string_view(value));
  }
  JsonObject& add(std::string_view key, int64_t value);
  JsonObject& add(std::string_view key, uint64_t value);
  JsonObject& add(std::string_view key, int value) { return add(key, static_cast<int64_t>(value)); }
  JsonObject& add(std::string_view key, bool value);
  // Appends a pre-rendered JSON value.
  JsonObject& addRaw(std::string_view key, std::string_view json);
  void close() { out_ += '}'; }

 private:
  void key(std::string_view key);
  std::string& out_;
  bool first_ = true;
};

}  // namespace tollgate
