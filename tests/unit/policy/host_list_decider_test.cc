#include "policy/host_list_decider.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

CallInfo call(std::string_view host) {
  CallInfo c;
  c.host = host;
  c.port = 80;
  c.method = "GET";
  return c;
}

TEST(HostListDecider, DenyWinsOverAllow) {
  HostListDecider d({"*"}, {"evil.example"});
  auto r = d.decideNow(call("evil.example"));
  EXPECT_EQ(r.verdict, Verdict::kHalt);
  EXPECT_EQ(r.rule, "hosts.deny");
  EXPECT_EQ(r.tool, "evil.example");
  EXPECT_EQ(d.decideNow(call("good.example")).verdict, Verdict::kAllow);
}

// Every spelling of an address reaches it: a deny of it holds for all of them (each used to
// pass a deny of 127.0.0.1 with allow: ["*"]).
TEST(HostListDecider, AnAddressIsDeniedInEverySpelling) {
  HostListDecider d({"*"}, {"127.0.0.1", "2001:DB8:0::1"});
  for (const char* host : {"127.0.0.1", "2130706433", "0x7f000001", "127.1", "0177.0.0.1",
                           "::ffff:127.0.0.1", "2001:db8::1", "2001:0db8:0:0::1"}) {
    auto r = d.decideNow(call(host));
    EXPECT_EQ(r.rule, "hosts.deny") << host << ": " << r.reason;
  }
  EXPECT_EQ(d.decideNow(call("127.0.0.2")).verdict, Verdict::kAllow);
  EXPECT_EQ(d.decideNow(call("bad host")).rule, "extract");
}

TEST(HostListDecider, DefaultDeny) {
  HostListDecider d({"notes.local"}, {});
  EXPECT_EQ(d.decideNow(call("notes.local")).verdict, Verdict::kAllow);
  auto r = d.decideNow(call("other.local"));
  EXPECT_EQ(r.verdict, Verdict::kHalt);
  EXPECT_EQ(r.rule, "hosts.default-deny");
  HostListDecider none({}, {});
  EXPECT_EQ(none.decideNow(call("notes.local")).verdict, Verdict::kHalt);
}

TEST(HostListDecider, WildcardsMatchSubdomainsOnly) {
  EXPECT_TRUE(HostListDecider::matches("*.internal", "a.internal"));
  EXPECT_TRUE(HostListDecider::matches("*.internal", "a.b.internal"));
  EXPECT_FALSE(HostListDecider::matches("*.internal", "internal"));
  EXPECT_FALSE(HostListDecider::matches("*.internal", "evilinternal"));
  HostListDecider d({"Notes.Local."}, {});
  EXPECT_EQ(d.decideNow(call("notes.local")).verdict, Verdict::kAllow);
}

TEST(HostListDecider, CallsDoneOnce) {
  HostListDecider d({"*"}, {});
  int calls = 0;
  d.decide(call("x"), [&](Decision r) {
    ++calls;
    EXPECT_EQ(r.verdict, Verdict::kAllow);
  });
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace tollgate
