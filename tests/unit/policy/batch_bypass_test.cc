// Ways past the policy that a review found after the adversarial suite (fourteenth session):
// a JSON-RPC-shaped body taking a call out of its tool, a batch hiding a large argument
// behind a small one, a batch escaping its budget or riding on another call's approval, a
// body over the limit in one read, a host spelled as a number, a media type in capitals,
// and a number written as 42.0. Each test fails without its fix.
#include <gtest/gtest.h>

#include "policy/engine.h"
#include "policy/policy_decider.h"

#include <cstdio>

namespace tollgate {
namespace {

constexpr const char* kPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
limits: {max_body_bytes: 4k}
tools:
  - {name: crm.admin, match: {host: crm.internal, paths: ["/admin/**"]}, class: write}
  - {name: crm.lookup, match: {host: crm.internal, methods: [POST], paths: ["/mcp"], mcp_tools: [customer_lookup]}, class: read}
  - {name: mcp.pay, match: {host: mcp.internal, methods: [POST], paths: ["/mcp"], mcp_tools: ["pay"]}, class: write, cost: {effort: 10}}
  - {name: mcp.read, match: {host: mcp.internal, methods: [POST], paths: ["/mcp"], mcp_tools: ["read_*"]}, class: read}
  - {name: pay, match: {host: pay.internal, paths: ["/pay"]}, class: write}
  - {name: ledger, match: {host: 10.0.0.7, paths: ["/ledger"]}, class: write}
pools:
  - {name: swarm, effort: {limit: 1000, period: 1d}}
agents:
  - {id: "agent-*", pool: swarm}
rules:
  - {id: no-admin, effect: halt, match: {tool: crm.admin}}
  - {id: lookups, effect: allow, match: {tool: crm.lookup}}
  - {id: small-payments, effect: allow, match: {tool: mcp.pay}, when: {params.amount: {lte: 100}}}
  - {id: huge-payments, effect: halt, match: {tool: mcp.pay}, when: {params.amount: {gt: 10000}}}
  - {id: reads, effect: allow, match: {tool: mcp.read}}
  - {id: big, effect: halt, match: {tool: pay}, when: {params.amount: {gt: 1000}}}
  - {id: frozen-account, effect: halt, match: {tool: pay}, when: {params.account: {in: [42]}}}
  - {id: payments, effect: allow, match: {tool: pay}}
  - {id: ledger-limit, effect: halt, match: {host: 10.0.0.7}, when: {params.amount: {gt: 1000}}}
  - {id: ledger, effect: allow, match: {host: 10.0.0.7}}
)";

std::shared_ptr<const PolicySet> policy() {
  static auto set = PolicySet::parse(kPolicy, "bypass.yaml").value();
  return set;
}

CallInfo post(const char* host, const char* path, const std::string& body,
              const char* contentType = "application/json") {
  CallInfo c;
  c.agent = "agent-1";
  c.method = "POST";
  c.scheme = "http";
  c.host = host;
  c.port = 80;
  c.target = path;
  c.contentType = contentType;
  c.bodyAvailable = true;
  c.body = body;
  return c;
}

Decision decide(const CallInfo& c) {
  Engine engine;
  return engine.evaluate(*policy(), Extractor::extract(c, *policy()));
}

std::string call(const char* name, const std::string& arguments, int id = 1) {
  return R"({"jsonrpc":"2.0","id":)" + std::to_string(id) +
         R"(,"method":"tools/call","params":{"name":")" + name + R"(","arguments":)" + arguments +
         "}}";
}

TEST(BatchBypass, AJsonRpcBodyDoesNotTakeACallOutOfItsTool) {
  std::string body = call("customer_lookup", "{}");  // CallInfo views it
  auto c = post("crm.internal", "/admin/users/1", body);
  c.method = "DELETE";
  auto d = decide(c);
  EXPECT_EQ(d.verdict, Verdict::kHalt);
  EXPECT_EQ(d.rule, "no-admin") << d.reason;
  // The MCP endpoint itself still works.
  EXPECT_EQ(decide(post("crm.internal", "/mcp", call("customer_lookup", "{}"))).rule, "lookups");
}

TEST(BatchBypass, EveryCallOfABatchIsCheckedWithItsOwnArguments) {
  // A large payment before a small one: the allow holds for neither as a batch.
  auto d = decide(post(
      "mcp.internal", "/mcp",
      "[" + call("pay", R"({"amount":5000})", 1) + "," + call("pay", R"({"amount":1})", 2) + "]"));
  EXPECT_EQ(d.verdict, Verdict::kHalt);
  EXPECT_EQ(d.rule, "default-deny") << d.reason;
  // A halt holds when any call of the batch meets it, wherever it stands.
  d = decide(post("mcp.internal", "/mcp",
                  "[" + call("pay", R"({"amount":100000})", 1) + "," +
                      call("pay", R"({"amount":1})", 2) + "]"));
  EXPECT_EQ(d.rule, "huge-payments") << d.reason;
  d = decide(post("mcp.internal", "/mcp",
                  "[" + call("pay", R"({"amount":1})", 1) + "," +
                      call("pay", R"({"amount":100000})", 2) + "]"));
  EXPECT_EQ(d.rule, "huge-payments") << d.reason;
  // Small ones, and a read beside them, pass.
  d = decide(
      post("mcp.internal", "/mcp",
           "[" + call("pay", R"({"amount":5})", 1) + "," + call("read_notes", R"({})", 2) + "]"));
  EXPECT_EQ(d.verdict, Verdict::kAllow) << d.rule << ": " << d.reason;
}

// A decider on `text` (kPolicy) written to a file, with the memory store.
std::unique_ptr<PolicyDecider> decider(const char* text = kPolicy) {
  std::string path = ::testing::TempDir() + "batch-bypass-policy.yaml";
  std::FILE* f = std::fopen(path.c_str(), "w");
  std::fputs(text, f);
  std::fclose(f);
  auto d = PolicyDecider::create({path});
  EXPECT_TRUE(d) << d.error().message;
  return std::move(d.value());
}

int64_t held(PolicyDecider& d) {
  for (const auto& v : d.budgets().view())
    if (v.pool == "swarm" && v.dimension == "effort") return v.held + v.committed;
  return -1;
}

TEST(BatchBypass, ABatchPaysForEachOfItsCalls) {
  auto d = decider();
  EXPECT_EQ(d->decideNow(post("mcp.internal", "/mcp", call("pay", R"({"amount":5})"))).verdict,
            Verdict::kAllow);
  EXPECT_EQ(held(*d), 10);
  auto three = "[" + call("pay", R"({"amount":1})", 1) + "," + call("pay", R"({"amount":2})", 2) +
               "," + call("pay", R"({"amount":3})", 3) + "]";
  EXPECT_EQ(d->decideNow(post("mcp.internal", "/mcp", three)).verdict, Verdict::kAllow);
  EXPECT_EQ(held(*d), 40);
  // A mixed batch fits no one tool; it pays for the one that costs.
  auto mixed = "[" + call("read_a", "{}", 1) + "," + call("pay", R"({"amount":1})", 2) + "]";
  EXPECT_EQ(d->decideNow(post("mcp.internal", "/mcp", mixed)).verdict, Verdict::kAllow);
  EXPECT_EQ(held(*d), 50);
}

TEST(BatchBypass, AnApprovalCoversOnlyTheCallThatWasApproved) {
  auto fingerprint = [](const CallInfo& c) {
    return Extractor::extract(c, *policy()).value().fingerprint();
  };
  std::string one = call("pay", R"({"amount":5})");
  std::string batch = "[" + call("delete_everything", R"({"amount":5})", 1) + "," + one + "]";
  EXPECT_NE(fingerprint(post("mcp.internal", "/mcp", one)),
            fingerprint(post("mcp.internal", "/mcp", batch)));
  // A body that is not JSON is part of the call too.
  EXPECT_NE(fingerprint(post("pay.internal", "/pay", "amount=5", "text/plain")),
            fingerprint(post("pay.internal", "/pay", "amount=50000", "text/plain")));
  EXPECT_EQ(fingerprint(post("mcp.internal", "/mcp", one)),
            fingerprint(post("mcp.internal", "/mcp", one)));
}

TEST(BatchBypass, ABodyOverTheLimitIsRefusedEvenWhenNoneOfItWasKept) {
  std::string empty;
  auto c = post("pay.internal", "/pay", empty);
  c.bodyTruncated = true;  // the first read was already over max_body_bytes
  auto d = decide(c);
  EXPECT_EQ(d.rule, "extract") << d.reason;
}

TEST(BatchBypass, TheBodyIsReadForAHostSpelledAsANumber) {
  // Only a rule scoped to the host reads params here (kPolicy's tool rules would make every
  // host's body read).
  auto d = decider(R"(
apiVersion: tollgate/v1
kind: Policy
rules:
  - {id: ledger-limit, effect: halt, match: {host: 10.0.0.7}, when: {params.amount: {gt: 1000}}}
  - {id: ledger, effect: allow, match: {host: 10.0.0.7}}
)");
  EXPECT_GT(d->bodyNeeded("10.0.0.7"), 0u);
  EXPECT_EQ(d->bodyNeeded("10.0.0.8"), 0u);
  for (const char* spelling : {"167772167", "0xa000007", "::ffff:10.0.0.7", "10.7"})
    EXPECT_EQ(d->bodyNeeded(spelling), d->bodyNeeded("10.0.0.7")) << spelling;
  EXPECT_EQ(decide(post("167772167", "/ledger", R"({"amount":5000})")).rule, "ledger-limit");
}

TEST(BatchBypass, MediaTypesAreCaseInsensitive) {
  for (const char* type :
       {"Application/JSON", "APPLICATION/JSON; charset=utf-8", "application/vnd.api+JSON"}) {
    auto d = decide(post("pay.internal", "/pay", R"({"amount":5000})", type));
    EXPECT_EQ(d.rule, "big") << type << ": " << d.reason;
  }
}

TEST(BatchBypass, InComparesNumbersByValue) {
  for (const char* account : {"42", "42.0", "4.2e1", "420e-1"}) {
    auto d = decide(post("pay.internal", "/pay", std::string(R"({"account":)") + account + "}"));
    EXPECT_EQ(d.rule, "frozen-account") << account << ": " << d.reason;
  }
  EXPECT_EQ(decide(post("pay.internal", "/pay", R"({"account":43})")).rule, "payments");
  EXPECT_EQ(decide(post("pay.internal", "/pay", R"({"account":"42"})")).rule, "frozen-account");
}

}  // namespace
}  // namespace tollgate
