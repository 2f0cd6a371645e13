// Canonical JSON: known answers, and everything the audit stream must refuse.
#include "audit/canonical_json.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

TEST(CanonicalJson, KnownAnswers) {
  struct Case {
    const char* in;
    const char* out;
  } cases[] = {
      {R"({"b":1,"a":2})", R"({"a":2,"b":1})"},
      {" { \"z\" : [ 1 , 2 ] ,\n \"a\" : { \"y\" : null , \"x\" : true } } ",
       R"({"a":{"x":true,"y":null},"z":[1,2]})"},
      {R"({"s":"caf\u00e9 \ud83d\ude00"})", "{\"s\":\"caf\xc3\xa9 \xf0\x9f\x98\x80\"}"},
      {R"({"s":"tab\tnl\nquote\"back\\slash\/ctl\u0001"})",
       R"({"s":"tab\tnl\nquote\"back\\slash/ctl\u0001"})"},
      {R"({"n":-0,"m":-12,"u":18446744073709551615})",
       R"({"m":-12,"n":0,"u":18446744073709551615})"},
      {R"({"B":1,"a":1,"_":1,"aa":1})", R"({"B":1,"_":1,"a":1,"aa":1})"},  // by byte
      {"[]", "[]"},
      {"{}", "{}"},
  };
  for (const auto& c : cases) {
    auto r = canonicalJson(c.in);
    ASSERT_TRUE(r) << c.in << ": " << r.error().message;
    EXPECT_EQ(r.value(), c.out) << c.in;
    EXPECT_TRUE(isCanonicalJson(c.out)) << c.out;
  }
}

TEST(CanonicalJson, RefusesWhatARecordMayNotBe) {
  struct Case {
    const char* in;
    const char* why;
  } cases[] = {
      {R"({"a":1,"a":2})", "duplicate key"},
      {R"({"x":{"a":1,"b":{"a":1},"a":3}})", "duplicate key"},
      {R"({"a":1.5})", "not an integer"},
      {R"({"a":1e3})", "not an integer"},
      {R"({"a":NaN})", ""},
      {"{\"a\":\"\xff\"}", "UTF-8"},
      {"{\"a\":\"\xc3\"}", "UTF-8"},
      {R"({"a":1} trailing)", ""},
      {R"({"a":)", ""},
      {"", ""},
  };
  for (const auto& c : cases) {
    auto r = canonicalJson(c.in);
    ASSERT_FALSE(r) << c.in;
    EXPECT_NE(r.error().message.find(c.why), std::string::npos)
        << c.in << ": " << r.error().message;
  }
  std::string deep(100, '[');
  deep += std::string(100, ']');
  auto r = canonicalJson(deep, 64);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("too deep"), std::string::npos);
  // The limit itself: 64 levels are a record's, 65 are not.
  auto nested = [](int n) { return std::string(n, '[') + std::string(n, ']'); };
  EXPECT_TRUE(canonicalJson(nested(64), 64));
  EXPECT_FALSE(canonicalJson(nested(65), 64));
}

TEST(CanonicalJson, OnlyTheCanonicalBytesAreCanonical) {
  EXPECT_TRUE(isCanonicalJson(R"({"a":1,"b":[true,false]})"));
  EXPECT_FALSE(isCanonicalJson(R"({"b":[true,false],"a":1})"));  // order
  EXPECT_FALSE(isCanonicalJson(R"({"a": 1})"));                  // whitespace
  EXPECT_FALSE(isCanonicalJson(R"({"a":"\u0041"})"));            // needless escape
  EXPECT_FALSE(isCanonicalJson(R"({"a":-0})"));                  // -0 is 0
  EXPECT_FALSE(isCanonicalJson("{\"a\":1}\n"));                  // trailing newline
}

}  // namespace
}  // namespace tollgate
