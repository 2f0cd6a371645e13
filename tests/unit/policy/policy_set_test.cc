#include "policy/policy_set.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "policy/engine.h"
#include "policy/tool_call.h"

namespace tollgate {
namespace {

// Every policy below starts with these two lines: its own text begins on line 3.
constexpr const char* kHeader = "apiVersion: tollgate/v1\nkind: Policy\n";

Result<std::shared_ptr<const PolicySet>> parse(const std::string& body) {
  return PolicySet::parse(kHeader + body, "p.yaml");
}

// The error a policy is refused with, or "" when it loads.
std::string errorOf(const std::string& body) {
  auto set = parse(body);
  return set ? "" : set.error().message;
}

TEST(PolicySetLoad, ADuplicateKeyIsRefusedWithItsPlace) {
  // yaml-cpp keeps both entries and the last one wins: this halt used to load as an allow.
  EXPECT_EQ(errorOf("tools: [{name: pay, match: {host: pay.internal}}]\n"
                    "rules:\n"
                    "  - {id: refunds, effect: halt, match: {tool: pay}, effect: allow}\n"),
            "p.yaml:5:53: rules[0].effect: duplicate key");
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 1m}\nlimits: {max_body_bytes: 1k}\n"),
            "p.yaml:4:1: limits: duplicate key");
  EXPECT_EQ(errorOf("rules:\n"
                    "  - id: r\n"
                    "    effect: allow\n"
                    "    match: {host: a.example}\n"
                    "    when: {params.x: {lte: 5}, params.x: {gte: 500}}\n"),
            "p.yaml:7:32: rules[0].when.params.x: duplicate key");
  EXPECT_EQ(errorOf("rules:\n"
                    "  - id: r\n"
                    "    effect: allow\n"
                    "    match: {host: a.example}\n"
                    "    when: {params.x: {lte: 5, lte: 500}}\n"),
            "p.yaml:7:31: rules[0].when.params.x.lte: duplicate key");
}

TEST(PolicySetLoad, TwoSpellingsOfOneKeyAreADuplicate) {
  // Each spelling replaced the other's list: this halt used to cover PUT alone.
  EXPECT_EQ(errorOf("rules:\n"
                    "  - {id: r, effect: halt, match: {host: a.example, methods: [DELETE], "
                    "method: PUT}}\n"),
            "p.yaml:4:71: rules[0].match.method: duplicate key (methods and method are one key)");
  EXPECT_EQ(errorOf("agents: [{id: a, neighbors: [b], neighbours: [c]}]\n"),
            "p.yaml:3:34: agents[0].neighbours: duplicate key (neighbors and neighbours are one "
            "key)");
  // Spellings that add to each other (host and hosts, path and paths) stay allowed.
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example, hosts: [b.example]}}]\n"), "");
}

TEST(PolicySetLoad, BodyLimitsAreBounded) {
  // 0 read no body, so params conditions never held: a halt on params did nothing.
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 0}\n"),
            "p.yaml:3:26: limits.max_body_bytes: must be from 1 to 64m");
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 65m}\n"),
            "p.yaml:3:26: limits.max_body_bytes: must be from 1 to 64m");
  EXPECT_EQ(errorOf("limits: {max_json_depth: 0}\n"),
            "p.yaml:3:26: limits.max_json_depth: must be from 1 to 256");
  EXPECT_EQ(errorOf("limits: {max_json_keys: 0}\n"),
            "p.yaml:3:25: limits.max_json_keys: must be from 1 to 1000000");
  auto set = parse("limits: {max_body_bytes: 64m}\n");
  ASSERT_TRUE(set) << set.error().message;
  EXPECT_EQ(set.value()->maxBodyBytes(), 64u << 20);
}

TEST(PolicySetLoad, ADirectoryIsNoPolicyFile) {
  // It opens and reads as nothing: it used to load as an empty set (every call halted).
  auto dir = std::filesystem::temp_directory_path() / "tollgate-policy-dir-test";
  std::filesystem::create_directories(dir);
  auto set = PolicySet::load({dir.string()});
  std::filesystem::remove(dir);
  ASSERT_FALSE(set);
  EXPECT_EQ(set.error().message, dir.string() + ": is a directory");
}

// The decision of one GET by agent-1 to http://HOST/ under the policy.
Decision decide(const PolicySet& set, const std::string& host) {
  CallInfo c;
  c.agent = "agent-1";
  c.method = "GET";
  c.scheme = "http";
  c.host = host;
  c.port = 80;
  c.target = "/";
  Engine engine;
  return engine.evaluate(set, Extractor::extract(c, set));
}

TEST(PolicySetLoad, HostsAreComparedInTheCallsCanonicalForm) {
  // Each halt was compared as written with the call's canonical host, so it never fired.
  auto set = parse(R"(tools:
  - {name: notes, match: {host: [NOTES.Local., "[::FFFF:10.0.0.7]"]}}
rules:
  - {id: all, effect: allow, match: {host: "*"}}
  - {id: upper, effect: halt, match: {host: Evil.Example.}}
  - {id: v6, effect: halt, match: {host: "[::1]"}}
  - {id: hex, effect: halt, match: {host: "0x7f000001"}}
  - {id: long-v6, effect: halt, match: {host: "2001:DB8:0:0:0:0:0:1"}}
  - {id: sub, effect: halt, match: {host: "*.Bad.Example."}}
  - {id: notes, effect: halt, match: {tool: notes}}
breakers:
  - {host: Pay.Internal.}
)");
  ASSERT_TRUE(set) << set.error().message;
  const auto& rules = set.value()->rules();
  EXPECT_EQ(rules[1].match.host, "evil.example");
  EXPECT_EQ(rules[2].match.host, "::1");
  EXPECT_EQ(rules[3].match.host, "127.0.0.1");
  EXPECT_EQ(rules[4].match.host, "2001:db8::1");
  EXPECT_EQ(rules[5].match.host, "*.bad.example");
  EXPECT_EQ(set.value()->tools()[0].hosts, (std::vector<std::string>{"notes.local", "10.0.0.7"}));
  EXPECT_EQ(set.value()->breakers()[0].host, "pay.internal");
  EXPECT_EQ(decide(*set.value(), "evil.example").rule, "upper");
  EXPECT_EQ(decide(*set.value(), "::1").rule, "v6");
  EXPECT_EQ(decide(*set.value(), "2130706433").rule, "hex");
  EXPECT_EQ(decide(*set.value(), "2001:db8::1").rule, "long-v6");
  EXPECT_EQ(decide(*set.value(), "api.bad.example").rule, "sub");
  EXPECT_EQ(decide(*set.value(), "notes.local").rule, "notes");
  EXPECT_EQ(decide(*set.value(), "167772167").rule, "notes");  // 10.0.0.7
  EXPECT_EQ(decide(*set.value(), "good.example").verdict, Verdict::kAllow);
}

TEST(PolicySetLoad, CanonicalHostPatternsAreKeptAsWritten) {
  auto set = parse(R"(rules:
  - {id: a, effect: halt, match: {host: notes.local}}
  - {id: b, effect: halt, match: {host: "*.example.com"}}
  - {id: c, effect: halt, match: {host: "*"}}
  - {id: d, effect: halt, match: {host: 10.0.0.7}}
  - {id: e, effect: halt, match: {host: "::1"}}
  - {id: f, effect: halt, match: {host: my_host-1.internal}}
)");
  ASSERT_TRUE(set) << set.error().message;
  std::vector<std::string> hosts;
  for (const auto& r : set.value()->rules()) hosts.push_back(r.match.host);
  EXPECT_EQ(hosts, (std::vector<std::string>{"notes.local", "*.example.com", "*", "10.0.0.7", "::1",
                                             "my_host-1.internal"}));
}

TEST(PolicySetLoad, WhatCannotBeAHostIsRefused) {
  auto rule = [](const std::string& host) {
    return errorOf("rules: [{id: r, effect: halt, match: {host: \"" + host + "\"}}]\n");
  };
  EXPECT_EQ(rule("evil.example:443"),
            "p.yaml:3:45: rules[0].match.host: 'evil.example:443' is not a host pattern: write it "
            "without a port (a host pattern matches every port)");
  EXPECT_EQ(rule("[::1]:443"),
            "p.yaml:3:45: rules[0].match.host: '[::1]:443' is not a host pattern: write it without "
            "a port (a host pattern matches every port)");
  EXPECT_EQ(rule("http://evil.example"),
            "p.yaml:3:45: rules[0].match.host: 'http://evil.example' is not a host pattern: write "
            "the host alone, without a scheme (e.g. evil.example)");
  EXPECT_NE(rule("evil.example/admin").find("without a path"), std::string::npos);
  EXPECT_NE(rule("api.*.example.com").find("'*' stands alone or in front"), std::string::npos);
  EXPECT_NE(rule("*example.com").find("'*' stands alone or in front"), std::string::npos);
  EXPECT_NE(rule("*.example.com:443").find("without a port"), std::string::npos);
  EXPECT_NE(rule("*.").find("expected *.DOMAIN"), std::string::npos);
  EXPECT_NE(rule(".example.com").find("expected a host name"), std::string::npos);
  EXPECT_NE(rule("").find("expected a host name"), std::string::npos);
  EXPECT_NE(rule("[evil.example]").find("brackets hold an IPv6 address"), std::string::npos);
  EXPECT_NE(rule("evil example").find("invalid character"), std::string::npos);
  EXPECT_NE(rule("1.2.3.4.5").find("invalid IPv4 address"), std::string::npos);
  EXPECT_NE(rule("fe80::1::2").find("invalid IPv6 address"), std::string::npos);
  // The same check for a tool's hosts (each list item at its place) and a breaker's.
  EXPECT_EQ(errorOf("tools: [{name: t, match: {hosts: [a.example, \"b.example:80\"]}}]\n"),
            "p.yaml:3:46: tools[0].match.hosts: 'b.example:80' is not a host pattern: write it "
            "without a port (a host pattern matches every port)");
  EXPECT_NE(errorOf("breakers: [{host: \"http://pay.internal\"}]\n").find("breakers[0].host: "),
            std::string::npos);
}

TEST(PolicySetLoad, ConditionsAndListsThatWouldDoNothingAreRefused) {
  // Each loaded before: the rule matched everything, or its halt could never fire.
  struct Case {
    std::string rule, error;
  };
  const std::string head = "rules:\n  - id: r\n    effect: halt\n    match: {host: a.example}\n";
  for (const auto& c : std::vector<Case>{
           {"    when: {params.amount: {}}\n",
            "p.yaml:7:27: rules[0].when.params.amount: expected a comparison: lt, lte, gt, gte, "
            "eq, ne, in or matches"},
           {"    when: {}\n",
            "p.yaml:7:11: rules[0].when: expected at least one condition (leave when out for "
            "none)"},
           {"    when: {params.currency: {in: []}}\n",
            "p.yaml:7:34: rules[0].when.params.currency.in: expected at least one value"},
           {"    when: {params.amount: {gt: .nan}}\n",
            "p.yaml:7:32: rules[0].when.params.amount.gt: expected a finite number"},
           {"    when: {params.amount: {lte: .inf}}\n",
            "p.yaml:7:33: rules[0].when.params.amount.lte: expected a finite number"},
           {"    when: {params.amount: {gt: -.Inf}}\n",
            "p.yaml:7:32: rules[0].when.params.amount.gt: expected a finite number"},
           {"    when: {time: {between: [\"09:00\", \"17:00\"], days: []}}\n",
            "p.yaml:7:54: rules[0].when.time.days: expected at least one day"},
           {"    when: {time: {between: [\"10:00\", \"10:00\"]}}\n",
            "p.yaml:7:28: rules[0].when.time.between: the start and the end are the same time: "
            "the window is empty"},
           {"    when: {time: {between: [\"24:00\", \"00:00\"]}}\n",
            "p.yaml:7:28: rules[0].when.time.between: the start and the end are the same time: "
            "the window is empty"},
       }) {
    EXPECT_EQ(errorOf(head + c.rule), c.error) << c.rule;
  }
  EXPECT_EQ(errorOf("rules: [{id: r, effect: halt, match: {host: a.example, methods: []}}]\n"),
            "p.yaml:3:65: rules[0].match.methods: expected at least one method (leave it out for "
            "any method)");
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example, methods: []}}]\n"),
            "p.yaml:3:53: tools[0].match.methods: expected at least one method (leave it out for "
            "any method)");
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example, paths: []}}]\n"),
            "p.yaml:3:51: tools[0].match.paths: expected at least one path glob (leave it out for "
            "any path)");
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example, mcp_tools: []}}]\n"),
            "p.yaml:3:55: tools[0].match.mcp_tools: expected at least one MCP tool name (leave it "
            "out for a tool that is not MCP)");
  // A cost read from the response: a field path, from a header or a field, not both.
  EXPECT_NE(errorOf("tools: [{name: t, match: {host: a.example}, cost: {effort: 1, effort_field: "
                    "usage..tokens}}]\n")
                .find("tools[0].cost.effort_field: expected a field of the JSON response body"),
            std::string::npos);
  EXPECT_NE(errorOf("tools: [{name: t, match: {host: a.example}, cost: {effort: 1, effort_field: "
                    "usage.total_tokens, effort_header: X-Cost}}]\n")
                .find("tools[0].cost: a cost is read from a header or from a body field, not both"),
            std::string::npos);
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example}, cost: {effort: 1, effort_field: "
                    "usage.total_tokens, risk_header: X-Risk}}]\n"),
            "");
  // What still loads: a whole day, a window across midnight, one from midnight.
  EXPECT_EQ(errorOf(head + "    when: {time: {between: [\"00:00\", \"24:00\"]}}\n"), "");
  EXPECT_EQ(errorOf(head + "    when: {time: {between: [\"22:00\", \"06:00\"]}}\n"), "");
  EXPECT_EQ(errorOf(head + "    when: {time: {between: [\"24:00\", \"06:00\"]}}\n"), "");
}

TEST(PolicySetLoad, RateLimitsAndCascadesOnlyWhereTheyApply) {
  // The engine rate-limits allows and cascades halts only: elsewhere they were ignored.
  EXPECT_EQ(errorOf("rules: [{id: r, effect: halt, match: {host: a.example},\n"
                    "         rate_limit: {requests: 1, per: 1m}}]\n"),
            "p.yaml:4:22: rules[0].rate_limit: only an allow rule is rate limited (this rule is "
            "halt)");
  EXPECT_EQ(errorOf("rules: [{id: r, effect: approve, match: {host: a.example},\n"
                    "         rate_limit: {requests: 1, per: 1m}}]\n"),
            "p.yaml:4:22: rules[0].rate_limit: only an allow rule is rate limited (this rule is "
            "approve)");
  EXPECT_EQ(errorOf("rules: [{id: r, effect: allow, match: {host: a.example},\n"
                    "         cascade: {quarantine: 5m}}]\n"),
            "p.yaml:4:19: rules[0].cascade: only a halt quarantines neighbours (this rule is "
            "allow)");
  EXPECT_NE(errorOf("rules: [{id: r, effect: approve, match: {host: a.example},\n"
                    "         cascade: {quarantine: 5m}}]\n")
                .find("rules[0].cascade: only a halt quarantines neighbours"),
            std::string::npos);
  // Where they apply, in any order of the keys.
  EXPECT_EQ(errorOf("rules:\n"
                    "  - {id: a, rate_limit: {requests: 1, per: 1m}, effect: allow, match: {host: "
                    "a.example}}\n"
                    "  - {id: h, cascade: {quarantine: 5m}, effect: deny, match: {host: "
                    "b.example}}\n"),
            "");
}

TEST(PolicySetLoad, DurationsAreAtMostTenYears) {
  // Near 2^63 ms, `now + duration` overflowed in the cascade, breaker and rate-limit sums.
  const std::string tooLong = "106751991167d";  // the largest whole number of days in int64 ms
  for (const auto& [body, key] : std::vector<std::pair<std::string, std::string>>{
           {"rules: [{id: r, effect: halt, match: {host: a.example}, cascade: {quarantine: D}}]\n",
            "rules[0].cascade.quarantine"},
           {"rules: [{id: r, effect: allow, match: {host: a.example}, rate_limit: {requests: 1, "
            "per: D}}]\n",
            "rules[0].rate_limit.per"},
           {"rules: [{id: r, effect: halt, match: {host: a.example}, when: {agent.failures: "
            "{gte: 1, within: D}}}]\n",
            "rules[0].when.agent.failures.within"},
           {"breakers: [{host: a.example, cooldown: D}]\n", "breakers[0].cooldown"},
           {"pools: [{name: p, effort: {limit: 1, period: D}}]\n", "pools[0].effort.period"},
       }) {
    auto with = [&](const std::string& d) {
      auto text = body;
      text.replace(text.find(": D") + 2, 1, d);
      return errorOf(text);
    };
    EXPECT_NE(with(tooLong).find(key + ": at most 3650d"), std::string::npos) << with(tooLong);
    EXPECT_NE(with("3651d").find(key + ": at most 3650d"), std::string::npos) << key;
    EXPECT_EQ(with("3650d"), "") << key;
  }
}

}  // namespace
}  // namespace tollgate
