#include "common/json.h"

#include <gtest/gtest.h>

#include <string>

namespace tollgate {
namespace {

TEST(Json, EscapesControlCharactersAndQuotes) {
  std::string out;
  appendJsonString(out, "a\"b\\c\nd\x01");
  EXPECT_EQ(out, R"("a\"b\\c\nd\u0001")");
}

TEST(Json, KeepsValidUtf8AndReplacesInvalidBytes) {
  std::string out;
  appendJsonString(out, "caf\xc3\xa9 \xff");
  EXPECT_EQ(out, "\"caf\xc3\xa9 \xef\xbf\xbd\"");
  out.clear();
  appendJsonString(out, "\xed\xa0\x80");  // a UTF-16 surrogate encoded in UTF-8
  EXPECT_EQ(out, "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
  out.clear();
  appendJsonString(out, "\b\f\x7f");  // as canonical JSON writes them
  EXPECT_EQ(out, R"("\b\f)"
                 "\x7f\"");
}

TEST(Json, EveryByteAtEveryPlaceOfALongRunIsEscapedAsAlone) {
  // Plain runs are scanned eight bytes at a time: one byte of every value, at every offset
  // in and after the first two words, with the words around it plain.
  auto alone = [](unsigned char c) -> std::string {
    static constexpr char kHex[] = "0123456789abcdef";
    switch (c) {
      case '"':
        return "\\\"";
      case '\\':
        return "\\\\";
      case '\b':
        return "\\b";
      case '\f':
        return "\\f";
      case '\n':
        return "\\n";
      case '\r':
        return "\\r";
      case '\t':
        return "\\t";
    }
    if (c < 0x20) return std::string("\\u00") + kHex[c >> 4] + kHex[c & 0xF];
    if (c >= 0x80) return "\xef\xbf\xbd";  // a lone byte of UTF-8 is invalid
    return std::string(1, static_cast<char>(c));
  };
  for (int c = 0; c < 256; ++c) {
    for (size_t at = 0; at < 19; ++at) {
      std::string text(21, 'a');
      text[at] = static_cast<char>(c);
      std::string out;
      appendJsonString(out, text);
      std::string want = "\"" + text.substr(0, at) + alone(static_cast<unsigned char>(c)) +
                         text.substr(at + 1) + "\"";
      ASSERT_EQ(out, want) << "byte " << c << " at " << at;
    }
  }
  // Two in one word, and valid UTF-8 across a word's end; nothing at all.
  std::string out;
  appendJsonString(out, std::string_view());
  EXPECT_EQ(out, "\"\"");
  out.clear();
  appendJsonString(out, "abcdef\"\\ghijklm\xc3\xa9nop");
  EXPECT_EQ(out, "\"abcdef\\\"\\\\ghijklm\xc3\xa9nop\"");
}

TEST(Json, BuildsObjects) {
  std::string out;
  JsonObject(out)
      .add("s", "x")
      .add("n", int64_t{-3})
      .add("u", uint64_t{7})
      .add("b", true)
      .addRaw("r", "[1]")
      .close();
  EXPECT_EQ(out, R"({"s":"x","n":-3,"u":7,"b":true,"r":[1]})");
}

}  // namespace
}  // namespace tollgate
