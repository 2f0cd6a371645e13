#include "common/json.h"

#include <gtest/gtest.h>

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
