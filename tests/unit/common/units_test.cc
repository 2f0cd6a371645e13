#include "common/units.h"

#include "common/redis_url.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

TEST(ParseSize, AcceptsBinarySuffixes) {
  EXPECT_EQ(parseSize("0"), 0u);
  EXPECT_EQ(parseSize("512"), 512u);
  EXPECT_EQ(parseSize("64k"), 64u * 1024);
  EXPECT_EQ(parseSize("1m"), 1024u * 1024);
  EXPECT_EQ(parseSize("2g"), 2ull << 30);
}

TEST(ParseSize, RejectsGarbageAndOverflow) {
  EXPECT_FALSE(parseSize(""));
  EXPECT_FALSE(parseSize("k"));
  EXPECT_FALSE(parseSize("-1"));
  EXPECT_FALSE(parseSize("1.5m"));
  EXPECT_FALSE(parseSize("10x"));
  EXPECT_FALSE(parseSize("99999999999999999999g"));
}

TEST(ParseDuration, AcceptsEveryUnit) {
  using std::chrono::milliseconds;
  EXPECT_EQ(parseDuration("250ms"), milliseconds(250));
  EXPECT_EQ(parseDuration("10s"), milliseconds(10'000));
  EXPECT_EQ(parseDuration("5m"), milliseconds(300'000));
  EXPECT_EQ(parseDuration("1h"), milliseconds(3'600'000));
  EXPECT_EQ(parseDuration("30d"), milliseconds(30ll * 86'400'000));
}

TEST(ParseDuration, RejectsMissingOrUnknownUnits) {
  EXPECT_FALSE(parseDuration("10"));
  EXPECT_FALSE(parseDuration("10parsecs"));
  EXPECT_FALSE(parseDuration("ms"));
  EXPECT_FALSE(parseDuration("1.5s"));
}

TEST(ParseHostPort, HandlesIpv4Ipv6AndNames) {
  auto a = parseHostPort("127.0.0.1:15001");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 15001);
  auto b = parseHostPort("[::1]:80");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(formatHostPort(b->host, b->port), "[::1]:80");
  EXPECT_FALSE(parseHostPort("127.0.0.1"));
  EXPECT_FALSE(parseHostPort("::1:80"));
  EXPECT_FALSE(parseHostPort("host:70000"));
  EXPECT_FALSE(parseHostPort(":80"));
}

TEST(ParseRedisUrl, TakesEveryFormOfAnAddress) {
  auto expect = [](std::string_view url, const char* host, uint16_t port) {
    auto u = parseRedisUrl(url);
    ASSERT_TRUE(u) << url << ": " << u.error().message;
    EXPECT_EQ(u->address.host, host) << url;
    EXPECT_EQ(u->address.port, port) << url;
  };
  expect("redis://10.0.0.5:6380", "10.0.0.5", 6380);
  expect("redis://redis.internal", "redis.internal", 6379);
  expect("redis://[::1]:6380/", "::1", 6380);
  expect("redis://[::1]", "::1", 6379);  // the port may be left out for IPv6 too
  expect("redis://:s%40cret@[fd00::5]", "fd00::5", 6379);
  EXPECT_EQ(parseRedisUrl("redis://:s%40cret@[fd00::5]").value().auth.password, "s@cret");
  EXPECT_FALSE(parseRedisUrl("redis://[::1"));
  EXPECT_FALSE(parseRedisUrl("redis://[]"));
  EXPECT_FALSE(parseRedisUrl("redis://[::1]x"));
  EXPECT_FALSE(parseRedisUrl("redis://::1"));
  EXPECT_FALSE(parseRedisUrl("redis://host/0"));
}

TEST(RedisUrlWithPassword, PutsTheFilesPasswordIntoEachFormOfUrl) {
  auto check = [](std::string_view url, const char* user, const char* host) {
    auto with = redisUrlWithPassword(url, "p@ss:w/rd %");
    ASSERT_TRUE(with) << url << ": " << with.error().message;
    auto u = parseRedisUrl(with.value());
    ASSERT_TRUE(u) << with.value();
    EXPECT_EQ(u->auth.password, "p@ss:w/rd %") << url;
    EXPECT_EQ(u->auth.user, user) << url;
    EXPECT_EQ(u->address.host, host) << url;
  };
  check("redis://tollgate@10.0.0.5:6380", "tollgate", "10.0.0.5");  // the ACL user it goes with
  check("redis://10.0.0.5:6380", "", "10.0.0.5");
  check("10.0.0.5:6380", "", "10.0.0.5");
  check("redis://t%40g@[fd00::5]", "t@g", "fd00::5");
  // A password in the URL too: which one counts would be a guess. Neither is echoed.
  auto both = redisUrlWithPassword("redis://u:inline-secret@h:1", "file-secret");
  ASSERT_FALSE(both);
  EXPECT_EQ(both.error().message.find("secret"), std::string::npos) << both.error().message;
  EXPECT_FALSE(redisUrlWithPassword("redis://h:1", ""));
  EXPECT_FALSE(redisUrlWithPassword("redis://h/0", "pw"));
}

}  // namespace
}  // namespace tollgate
