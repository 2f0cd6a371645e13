// Engine defects a review found (fifteenth session), each test failing without its fix: an
// approval that did not bind the body, a batch hiding a call that needs a human behind one
// that does not, quarantine entries piling up with every halt, breakers moved by outcomes
// that say nothing of the upstream, and a rate limit of days that wrapped an int.
#include <gtest/gtest.h>

#include <cstdio>

#include "policy/engine.h"
#include "policy/policy_decider.h"

namespace tollgate {
namespace {

constexpr const char* kPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: bank.transfer, match: {host: bank.internal, methods: [POST], paths: ["/transfer"]}, class: write}
  - {name: kb.read, match: {host: kb.internal, methods: [GET]}, class: read}
  - {name: mcp.pay, match: {host: mcp.internal, methods: [POST], paths: ["/mcp"], mcp_tools: ["pay"]}, class: write}
  - {name: pay, match: {host: pay.internal, methods: [POST], paths: ["/pay"]}, class: write}
agents:
  - {id: "a-*", neighbours: ["b-*", "c-*"]}
rules:
  - {id: transfers-need-a-human, effect: approve, match: {tool: bank.transfer}}
  - {id: reads, effect: allow, match: {tool: kb.read}, rate_limit: {requests: 1, per: 30d}}
  - {id: payments, effect: allow, match: {tool: mcp.pay}}
  - {id: big-payments-need-a-human, effect: approve, match: {tool: mcp.pay}, when: {params.amount: {gt: 1000}}}
  - {id: ban, effect: halt, match: {agent: "a-bad"}, cascade: {quarantine: 1m}}
  - {id: pay, effect: allow, match: {tool: pay}}
breakers:
  - {host: pay.internal, failures: 2, cooldown: 10s}
)";

std::shared_ptr<const PolicySet> policy() {
  static auto set = PolicySet::parse(kPolicy, "review.yaml").value();
  return set;
}

// `body` must outlive the CallInfo (which views it).
CallInfo request(const char* agent, const char* method, const char* host, const char* path,
                 const std::string& body = std::string()) {
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
  return c;
}

std::string call(const char* name, const std::string& arguments, int id = 1) {
  return R"({"jsonrpc":"2.0","id":)" + std::to_string(id) +
         R"(,"method":"tools/call","params":{"name":")" + name + R"(","arguments":)" + arguments +
         "}}";
}

// An approve rule with no params condition: the body must still be read, since the
// approval's fingerprint covers it (unread, another body rode on the approval).
TEST(EngineReview, AnApprovalBindsTheBodyEvenWithoutParamsConditions) {
  EXPECT_TRUE(policy()->needsBody("bank.internal"));
  EXPECT_FALSE(policy()->needsBody("kb.internal")) << "no approve rule or params reach it";
  Engine engine;
  const std::string approved = R"({"to":"A","amount":10})",
                    changed = R"({"to":"B","amount":1000000})";
  auto first = request("a-1", "POST", "bank.internal", "/transfer", approved);
  auto d = engine.evaluate(*policy(), Extractor::extract(first, *policy()));
  ASSERT_EQ(d.verdict, Verdict::kApprove) << d.rule << ": " << d.reason;
  ASSERT_TRUE(engine.approve(d.approvalId, std::chrono::minutes(60)));
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(first, *policy())).verdict,
            Verdict::kAllow);
  auto other = request("a-1", "POST", "bank.internal", "/transfer", changed);
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(other, *policy())).verdict,
            Verdict::kApprove);
}

// A rule naming neither a tool nor a host matches declared tools only: the body is read on
// the hosts of the tools it can match (of its class), not on every host.
TEST(EngineReview, AClassOnlyApproveReadsBodiesOnItsToolsHostsOnly) {
  auto set = PolicySet::parse(R"(
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: tickets.delete, match: {host: tickets.internal, methods: [DELETE]}, class: delete}
  - {name: kb.read, match: {host: kb.internal, methods: [GET]}, class: read}
rules:
  - {id: deletes-need-a-human, effect: approve, match: {class: delete, agent: "support-*"}}
  - {id: reads, effect: allow, match: {class: read}}
  - {id: anything, effect: allow, match: {host: "*"}}
)",
                              "class.yaml")
                 .value();
  EXPECT_TRUE(set->needsBody("tickets.internal"));
  EXPECT_FALSE(set->needsBody("kb.internal"));
  EXPECT_FALSE(set->needsBody("127.0.0.1"));
}

// A conditioned approve gates a batch when any of its calls meets the condition, as a halt
// does: [pay 5, pay 5000] needs a human as pay 5000 alone does.
TEST(EngineReview, ABatchCannotHideACallThatNeedsAHuman) {
  Engine engine;
  const std::string big = call("pay", R"({"amount":5000})"), five = call("pay", R"({"amount":5})");
  auto alone = request("a-1", "POST", "mcp.internal", "/mcp", big);
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(alone, *policy())).verdict,
            Verdict::kApprove);
  std::string batch =
      "[" + call("pay", R"({"amount":5})", 1) + "," + call("pay", R"({"amount":5000})", 2) + "]";
  auto hidden = request("a-1", "POST", "mcp.internal", "/mcp", batch);
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(hidden, *policy())).verdict,
            Verdict::kApprove);
  auto small = request("a-1", "POST", "mcp.internal", "/mcp", five);
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(small, *policy())).verdict,
            Verdict::kAllow);
}

// Every halt of a cascading agent used to append one quarantine entry per neighbour (and
// publish it): an agent retrying at 1k req/s grew the list every call scans to 600k.
TEST(EngineReview, AHaltingAgentKeepsOneQuarantinePerNeighbour) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  int published = 0;
  engine.onQuarantine = [&](const std::string&, std::chrono::milliseconds) { ++published; };
  auto bad = request("a-bad", "GET", "kb.internal", "/");
  for (int i = 0; i < 10'000; ++i) {
    ASSERT_EQ(engine.evaluate(*policy(), Extractor::extract(bad, *policy())).rule, "ban");
    now += 1;
  }
  EXPECT_LE(published, 2 * 11);  // two neighbours, once a second over these 10 s at most
  EXPECT_EQ(engine.quarantineEntries(), 2u);
  auto neighbour = request("b-1", "GET", "kb.internal", "/");
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(neighbour, *policy())).rule, "cascade");
  now += 60'000;  // a minute after the last halt: the quarantine ends
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(neighbour, *policy())).rule, "reads");
}

// Outcomes that say nothing of the upstream (never sent; or sent and the agent left before
// any answer) neither close a breaker nor count against it.
TEST(EngineReview, AnOutcomeThatSaysNothingOfTheUpstreamMovesNoBreaker) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  const std::string one = R"({"amount":1})";
  auto pay = request("a-1", "POST", "pay.internal", "/pay", one);
  auto decideAndReport = [&](Outcome o) {
    auto call = Extractor::extract(pay, *policy());
    auto d = engine.evaluate(*policy(), call);
    if (d.verdict == Verdict::kAllow) engine.recordOutcome(*policy(), call.value(), o);
    return d;
  };
  decideAndReport(Outcome{502, true});
  decideAndReport(Outcome{0, false, false});  // the agent left while it was connecting
  decideAndReport(Outcome{0, false, true});   // sent; the agent left before the answer
  decideAndReport(Outcome{502, true});        // the second failure in a row: open
  EXPECT_EQ(decideAndReport(Outcome{200, false}).rule, "breaker");
  now += 10'001;  // half-open: the probe's agent leaves before it is sent
  EXPECT_EQ(decideAndReport(Outcome{0, false, false}).verdict, Verdict::kAllow);
  EXPECT_EQ(decideAndReport(Outcome{502, true}).verdict, Verdict::kAllow);  // the real probe
  EXPECT_EQ(decideAndReport(Outcome{200, false}).rule, "breaker");          // failed: open again
}

// requests: 1 per 30d: the wait of billions of ms wrapped an int negative and let every
// call through.
TEST(EngineReview, ARateLimitOfDaysThrottles) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  auto read = request("a-1", "GET", "kb.internal", "/doc");
  EXPECT_EQ(engine.evaluate(*policy(), Extractor::extract(read, *policy())).verdict,
            Verdict::kAllow);
  now += 1000;
  auto d = engine.evaluate(*policy(), Extractor::extract(read, *policy()));
  EXPECT_EQ(d.verdict, Verdict::kThrottle);
  EXPECT_GT(d.retryAfterSeconds, 29 * 86'400);
}

// State keyed by what agents choose is forgotten once it no longer counts: each new
// fingerprint (a query string, say) made an approval that was never removed, and every
// approve evaluation scanned them all.
TEST(EngineReview, ApprovalsAreForgottenAnHourAfterTheyEnd) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  const std::string body = R"({"amount":1})";
  std::vector<std::string> paths, agents;
  for (int i = 0; i < 500; ++i) {
    paths.push_back("/transfer?n=" + std::to_string(i));
    agents.push_back("a-" + std::to_string(i % 5));  // 100 each: the most one agent may ask
  }
  for (size_t i = 0; i < paths.size(); ++i) {
    auto c = request(agents[i].c_str(), "POST", "bank.internal", paths[i].c_str(), body);
    ASSERT_EQ(engine.evaluate(*policy(), Extractor::extract(c, *policy())).verdict,
              Verdict::kApprove);
  }
  EXPECT_EQ(engine.approvals().size(), 500u);
  now += 15 * 60'000 + 3'600'000 + 60'001;  // void after 15 min, listed an hour more
  auto read = request("a-1", "GET", "kb.internal", "/");
  engine.evaluate(*policy(), Extractor::extract(read, *policy()));
  EXPECT_EQ(engine.approvals().size(), 0u);
}

// Breakers keyed by host:port were made by every decision under a breakers: entry, so an
// agent calling pay.internal:1 … :65535 (or names under a glob) grew /v1/breakers and the
// breaker_state series without end. A breaker is now made by an outcome, and one not open
// that no outcome reached for 15 minutes is forgotten.
TEST(EngineReview, BreakersAreMadeByOutcomesAndForgottenWhenIdle) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  const std::string one = R"({"amount":1})";
  for (int port = 1; port <= 300; ++port) {
    auto c = request("a-1", "POST", "pay.internal", "/pay", one);
    c.port = static_cast<uint16_t>(port);
    ASSERT_EQ(engine.evaluate(*policy(), Extractor::extract(c, *policy())).verdict,
              Verdict::kAllow);
  }
  EXPECT_TRUE(engine.breakers().empty()) << "decided, never answered: nothing to keep";
  auto report = [&](uint16_t port, Outcome o) {
    auto c = request("a-1", "POST", "pay.internal", "/pay", one);
    c.port = port;
    auto call = Extractor::extract(c, *policy());
    auto d = engine.evaluate(*policy(), call);
    if (d.verdict == Verdict::kAllow) engine.recordOutcome(*policy(), call.value(), o);
    return d;
  };
  for (uint16_t port = 1; port <= 50; ++port) report(port, Outcome{200, false});
  report(80, Outcome{502, true});
  report(80, Outcome{502, true});  // open for 10 s
  EXPECT_EQ(engine.breakers().size(), 51u);
  now += 15 * 60'000 - 1'000;      // just before the sweep would forget 80 too:
  report(80, Outcome{502, true});  // its cooldown long past, a half-open probe that fails
  now += 60'001 + 1'000;
  report(7, Outcome{200, false});  // the next minute's sweep runs in this evaluation
  auto left = engine.breakers();
  ASSERT_EQ(left.size(), 2u);
  EXPECT_EQ(left[0].upstream, "pay.internal:7");
  EXPECT_EQ(left[1].upstream, "pay.internal:80");
  EXPECT_EQ(left[1].consecutiveFailures, 3);  // its failures remembered, not reset
}

// An approved call returned at once: past every allow rule's rate limit (a lease let it be
// made without limit), and past a half-open breaker's one-probe gate.
TEST(EngineReview, AnApprovedCallMeetsRateLimitsAndTheBreakersProbe) {
  auto set = PolicySet::parse(R"(
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: bank.transfer, match: {host: bank.internal, methods: [POST], paths: ["/transfer"]}, class: write}
rules:
  - {id: transfers-need-a-human, effect: approve, match: {tool: bank.transfer}}
  - {id: two-an-hour, effect: allow, match: {tool: bank.transfer}, rate_limit: {requests: 2, per: 1h}}
breakers:
  - {host: bank.internal, failures: 1, cooldown: 10s}
)",
                              "approved.yaml")
                 .value();
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  const std::string body = R"({"to":"A","amount":10})";
  auto transfer = request("a-1", "POST", "bank.internal", "/transfer", body);
  auto decide = [&] { return engine.evaluate(*set, Extractor::extract(transfer, *set)); };
  auto d = decide();
  ASSERT_EQ(d.verdict, Verdict::kApprove);
  ASSERT_TRUE(engine.approve(d.approvalId, std::chrono::minutes(60)));
  d = decide();
  EXPECT_EQ(d.verdict, Verdict::kAllow);
  EXPECT_EQ(d.rule, "transfers-need-a-human");
  EXPECT_EQ(d.approvalId, engine.approvals()[0].id);
  EXPECT_EQ(decide().verdict, Verdict::kAllow);
  EXPECT_EQ(decide().verdict, Verdict::kThrottle) << "two an hour, approved or not";
  // The breaker: a failure opens it; after the cooldown one approved call is the probe.
  now += 3'600'000 / 2 + 1;  // a token back
  auto call = Extractor::extract(transfer, *set);
  engine.recordOutcome(*set, call.value(), Outcome{502, true});
  EXPECT_EQ(decide().rule, "breaker");
  now += 10'001;
  EXPECT_EQ(decide().verdict, Verdict::kAllow);  // the probe
  now += 1'000;                                  // the probe still out
  EXPECT_EQ(decide().rule, "breaker") << "half-open: one probe at a time";
}

// Approvals are keyed by what the agent chooses (a query string makes a new one), and every
// call an approve rule met scanned them all under the engine's lock: at most 100 are asked
// per agent within their 15 minutes, and 10 000 kept, past which the call is halted.
TEST(EngineReview, ApprovalsAskedAreCappedPerAgentAndInAll) {
  int64_t now = 1'000'000;
  Engine engine([&] { return now; });
  engine.maxApprovals = 250;
  const std::string body = R"({"amount":1})";
  auto ask = [&](const std::string& agent, int n) {
    std::string path = "/transfer?n=" + std::to_string(n);
    auto c = request(agent.c_str(), "POST", "bank.internal", path.c_str(), body);
    return engine.evaluate(*policy(), Extractor::extract(c, *policy()));
  };
  for (int i = 0; i < 100; ++i) ASSERT_EQ(ask("a-1", i).verdict, Verdict::kApprove) << i;
  auto d = ask("a-1", 100);
  EXPECT_EQ(d.verdict, Verdict::kHalt);
  EXPECT_EQ(d.rule, "approval_limit");
  EXPECT_NE(d.reason.find("agent a-1 has asked for 100 approvals"), std::string::npos) << d.reason;
  EXPECT_EQ(ask("a-1", 5).verdict, Verdict::kApprove) << "one already asked is still pending";
  EXPECT_EQ(ask("a-2", 0).verdict, Verdict::kApprove) << "another agent is not held up";
  for (int i = 1; i < 100; ++i) ask("a-2", i);
  for (int i = 0; i < 49; ++i) ask("a-3", i);
  EXPECT_EQ(engine.approvals().size(), 249u);
  EXPECT_EQ(ask("a-3", 49).verdict, Verdict::kApprove);
  d = ask("a-4", 0);  // 250 kept
  EXPECT_EQ(d.rule, "approval_limit");
  EXPECT_NE(d.reason.find("250 approvals are kept"), std::string::npos) << d.reason;
  // Once they are void (15 min) and an hour past, they go, and the agents may ask again.
  now += 15 * 60'000 + 3'600'000 + 1;
  EXPECT_EQ(ask("a-1", 100).verdict, Verdict::kApprove);
  EXPECT_EQ(engine.approvals().size(), 1u);
}

}  // namespace
}  // namespace tollgate
