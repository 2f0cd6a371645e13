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
