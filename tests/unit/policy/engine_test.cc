#include "policy/engine.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

constexpr const char* kPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: kb.read, match: {host: kb.internal, methods: [GET]}, class: read}
  - {name: kb.write, match: {host: kb.internal, methods: [POST]}, class: write}
  - {name: pay, match: {host: pay.internal, methods: [POST], paths: ["/refunds"]}, class: write}
agents:
  - {id: "a-*", neighbours: ["b-*"]}
  - {id: "b-*"}
rules:
  - {id: reads, effect: allow, match: {class: read}}
  - {id: writes, effect: allow, match: {tool: kb.write}, rate_limit: {requests: 2, per: 1m}}
  - {id: refunds, effect: allow, match: {tool: pay}, when: {params.amount: {lte: 200}, params.currency: {in: [EUR]}}}
  - {id: iban, effect: halt, match: {tool: pay}, when: {params.iban: {matches: "XX.*"}}}
  - {id: ban, effect: halt, match: {agent: "a-bad"}, cascade: {quarantine: 1m}}
  - {id: no-writes-after-failures, effect: halt, match: {class: write}, when: {agent.failures: {gte: 2, within: 1m}}}
  - {id: night, effect: halt, match: {tool: kb.write}, when: {time: {between: ["22:00", "06:00"], tz: Europe/Berlin}}}
breakers:
  - {host: pay.internal, failures: 2, cooldown: 10s}
)";

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = PolicySet::parse(kPolicy, "p.yaml");
    ASSERT_TRUE(s) << s.error().message;
    set = s.value();
  }
  Decision decide(const std::string& agent, const std::string& method, const std::string& host,
                  const std::string& path = "/", const std::string& body = "") {
    CallInfo c;
    c.agent = agent;
    c.method = method;
    c.scheme = "http";
    c.host = host;
    c.port = 80;
    c.target = path;
    c.contentType = "application/json";
    c.bodyAvailable = !body.empty();
    c.body = body;
    last = std::make_unique<Result<ToolCall>>(Extractor::extract(c, *set));
    return engine.evaluate(*set, *last);
  }
  void fail() { engine.recordOutcome(*set, last->value(), Outcome{502, true}); }
  void succeed() { engine.recordOutcome(*set, last->value(), Outcome{200, false}); }

  std::shared_ptr<const PolicySet> set;
  int64_t now = 1'767'261'600'000;  // 2026-01-01T10:00:00Z, 11:00 in Berlin
  Engine engine{[this] { return now; }};
  std::unique_ptr<Result<ToolCall>> last;
};

TEST_F(EngineTest, DefaultDenyAndAllow) {
  EXPECT_EQ(decide("a-1", "GET", "kb.internal").verdict, Verdict::kAllow);
  auto d = decide("a-1", "GET", "elsewhere.example");
  EXPECT_EQ(d.verdict, Verdict::kHalt);
  EXPECT_EQ(d.rule, "default-deny");
  EXPECT_EQ(d.policyDigest, set->digest());
}

TEST_F(EngineTest, DenyOverridesWhateverTheOrder) {
  auto d = decide("a-bad", "GET", "kb.internal");
  EXPECT_EQ(d.verdict, Verdict::kHalt);
  EXPECT_EQ(d.rule, "ban");
}

TEST_F(EngineTest, ParamConditionsAndErrorsHalt) {
  EXPECT_EQ(decide("a-1", "POST", "pay.internal", "/refunds", R"({"amount":150,"currency":"EUR"})")
                .verdict,
            Verdict::kAllow);
  EXPECT_EQ(
      decide("a-1", "POST", "pay.internal", "/refunds", R"({"amount":250,"currency":"EUR"})").rule,
      "default-deny");
  EXPECT_EQ(
      decide("a-1", "POST", "pay.internal", "/refunds", R"({"amount":150,"currency":"USD"})").rule,
      "default-deny");
  // A missing parameter never satisfies an allow; a mistyped one is an error, which halts.
  EXPECT_EQ(decide("a-1", "POST", "pay.internal", "/refunds", R"({"currency":"EUR"})").rule,
            "default-deny");
  auto mistyped =
      decide("a-1", "POST", "pay.internal", "/refunds", R"({"amount":"150","currency":"EUR"})");
  EXPECT_EQ(mistyped.verdict, Verdict::kHalt);
  EXPECT_EQ(mistyped.rule, "refunds");
  EXPECT_NE(mistyped.reason.find("not a number"), std::string::npos);
  auto regex = decide("a-1", "POST", "pay.internal", "/refunds",
                      R"({"amount":1,"currency":"EUR","iban":"XX123"})");
  EXPECT_EQ(regex.rule, "iban");
  // A non-string iban makes the halt rule unevaluable: halted, not allowed.
  EXPECT_EQ(
      decide("a-1", "POST", "pay.internal", "/refunds", R"({"amount":1,"currency":"EUR","iban":5})")
          .verdict,
      Verdict::kHalt);
}

TEST_F(EngineTest, RateLimitRefills) {
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kAllow);
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kAllow);
  auto d = decide("a-1", "POST", "kb.internal");
  EXPECT_EQ(d.verdict, Verdict::kThrottle);
  EXPECT_EQ(d.retryAfterSeconds, 30);  // 2 per minute: one token every 30 s
  EXPECT_EQ(decide("a-2", "POST", "kb.internal").verdict, Verdict::kAllow);  // per agent
  now += 30'000;
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kAllow);
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kThrottle);
}

TEST_F(EngineTest, FailuresWithinAWindow) {
  decide("a-1", "POST", "kb.internal");
  fail();
  now += 1000;
  decide("a-1", "POST", "kb.internal");
  fail();
  now += 30'000;
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").rule, "no-writes-after-failures");
  EXPECT_EQ(decide("a-1", "GET", "kb.internal").verdict, Verdict::kAllow);
  now += 31'000;  // the first failure left the window
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kAllow);
}

TEST_F(EngineTest, BreakerOpensHalfOpensAndCloses) {
  const std::string body = R"({"amount":1,"currency":"EUR"})";
  // Failures from different agents, so that only the breaker reacts.
  decide("a-1", "POST", "pay.internal", "/refunds", body);
  fail();
  decide("a-2", "POST", "pay.internal", "/refunds", body);
  fail();
  EXPECT_EQ(decide("a-3", "POST", "pay.internal", "/refunds", body).rule, "breaker");
  now += 10'001;
  EXPECT_EQ(decide("a-3", "POST", "pay.internal", "/refunds", body).verdict,
            Verdict::kAllow);  // the probe
  EXPECT_EQ(decide("a-4", "POST", "pay.internal", "/refunds", body).rule,
            "breaker");  // others wait for it
  decide("a-3", "POST", "pay.internal", "/refunds", body);
  succeed();
  EXPECT_EQ(decide("a-4", "POST", "pay.internal", "/refunds", body).verdict, Verdict::kAllow);
}

TEST_F(EngineTest, AFailedProbeReopensTheBreaker) {
  const std::string body = R"({"amount":1,"currency":"EUR"})";
  for (const char* agent : {"a-1", "a-2"}) {
    decide(agent, "POST", "pay.internal", "/refunds", body);
    fail();
  }
  now += 10'001;
  EXPECT_EQ(decide("a-3", "POST", "pay.internal", "/refunds", body).verdict, Verdict::kAllow);
  fail();
  EXPECT_EQ(decide("a-4", "POST", "pay.internal", "/refunds", body).rule, "breaker");
  now += 10'001;
  EXPECT_EQ(decide("a-4", "POST", "pay.internal", "/refunds", body).verdict, Verdict::kAllow);
}

TEST_F(EngineTest, CascadeQuarantinesNeighboursForTheTtl) {
  EXPECT_EQ(decide("a-bad", "GET", "kb.internal").rule, "ban");
  EXPECT_EQ(decide("b-1", "GET", "kb.internal").rule, "cascade");
  EXPECT_EQ(decide("a-1", "GET", "kb.internal").verdict, Verdict::kAllow);  // not a neighbour
  now += 60'001;
  EXPECT_EQ(decide("b-1", "GET", "kb.internal").verdict, Verdict::kAllow);
}

TEST_F(EngineTest, TimeWindowInAZone) {
  now = 1'767'294'000'000;  // 2026-01-01T19:00:00Z = 20:00 in Berlin
  EXPECT_EQ(decide("a-1", "POST", "kb.internal").verdict, Verdict::kAllow);
  now = 1'767'304'800'000;  // 22:00Z = 23:00 in Berlin
  EXPECT_EQ(decide("a-2", "POST", "kb.internal").rule, "night");
  now = 1'767'322'800'000;  // 03:00Z = 04:00 in Berlin (the window wraps midnight)
  EXPECT_EQ(decide("a-3", "POST", "kb.internal").rule, "night");
}

constexpr const char* kApprovalPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
tools: [{name: kb.delete, match: {host: kb.internal, methods: [DELETE]}, class: delete}]
rules: [{id: human, effect: approve, match: {tool: kb.delete}}]
)";

TEST(EngineApproval, LeaseAllowsTheSameCallUntilItExpires) {
  auto set = PolicySet::parse(kApprovalPolicy, "a.yaml").value();
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  CallInfo c;
  c.agent = "a-1";
  c.method = "DELETE";
  c.scheme = "http";
  c.host = "kb.internal";
  c.port = 80;
  c.target = "/x";
  auto d = engine.evaluate(*set, Extractor::extract(c, *set));
  ASSERT_EQ(d.verdict, Verdict::kApprove);
  auto id = d.approvalId;
  EXPECT_EQ(engine.evaluate(*set, Extractor::extract(c, *set)).approvalId,
            id);  // same pending approval
  EXPECT_TRUE(engine.approve(id, std::chrono::minutes(5)));
  EXPECT_FALSE(engine.approve(id, std::chrono::minutes(5)));  // no longer pending
  EXPECT_EQ(engine.evaluate(*set, Extractor::extract(c, *set)).verdict, Verdict::kAllow);
  c.target = "/y";  // a different call is not covered
  EXPECT_EQ(engine.evaluate(*set, Extractor::extract(c, *set)).verdict, Verdict::kApprove);
  c.target = "/x";
  now += 5 * 60'000 + 1;
  EXPECT_EQ(engine.evaluate(*set, Extractor::extract(c, *set)).verdict, Verdict::kApprove);
}

TEST(EngineApproval, DeniedApprovalStaysHalted) {
  auto set = PolicySet::parse(kApprovalPolicy, "a.yaml").value();
  Engine engine;
  CallInfo c;
  c.agent = "a-1";
  c.method = "DELETE";
  c.scheme = "http";
  c.host = "kb.internal";
  c.port = 80;
  c.target = "/x";
  auto d = engine.evaluate(*set, Extractor::extract(c, *set));
  EXPECT_TRUE(engine.deny(d.approvalId));
  auto again = engine.evaluate(*set, Extractor::extract(c, *set));
  EXPECT_EQ(again.verdict, Verdict::kApprove);
  EXPECT_NE(again.approvalId, d.approvalId);
}

}  // namespace
}  // namespace tollgate
