// Disguises of forbidden calls: every one must be halted, never allowed. Each is either
// normalised onto the rule it tried to dodge or refused by the extractor.
#include <gtest/gtest.h>

#include "policy/engine.h"

namespace tollgate {
namespace {

constexpr const char* kPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
limits: {max_body_bytes: 4k, max_json_depth: 16, max_json_keys: 50}
tools:
  - {name: api.public, match: {host: api.internal, methods: [GET], paths: ["/public/**"]}, class: read}
  - {name: api.admin, match: {host: api.internal, paths: ["/admin/**"]}, class: write}
  - {name: metadata, match: {host: 169.254.169.254}, class: read}
  - {name: local.admin, match: {host: 127.0.0.1, paths: ["/admin/**"]}, class: write}
  - {name: local.public, match: {host: 127.0.0.1, methods: [GET], paths: ["/public/**"]}, class: read}
  - {name: mcp.read, match: {host: mcp.internal, methods: [POST], paths: ["/mcp"], mcp_tools: ["read_*"]}, class: read}
  - {name: mcp.delete, match: {host: mcp.internal, methods: [POST], paths: ["/mcp"], mcp_tools: ["delete_*"]}, class: delete}
  - {name: pay, match: {host: pay.internal, methods: [POST], paths: ["/pay"]}, class: write}
rules:
  - {id: big-payments, effect: halt, match: {tool: pay}, when: {params.amount: {gt: 100}}}
  - {id: payments, effect: allow, match: {tool: pay}}
  - {id: public, effect: allow, match: {tool: "*.public"}}
  - {id: mcp-reads, effect: allow, match: {tool: mcp.read}}
  - {id: no-admin, effect: halt, match: {tool: api.admin}}
  - {id: no-metadata, effect: halt, match: {tool: metadata}}
  - {id: no-local-admin, effect: halt, match: {tool: local.admin}}
  - {id: no-mcp-delete, effect: halt, match: {tool: mcp.delete}}
)";

struct Disguise {
  const char* name;
  const char* host;
  const char* path;
  const char* method = "GET";
  const char* body = "";
  const char* contentType = "application/json";
  const char* expectedRule = nullptr;  // the rule it must land on (null: any halt)
};

class Disguises : public ::testing::TestWithParam<Disguise> {};

TEST_P(Disguises, AreHalted) {
  static auto set = PolicySet::parse(kPolicy, "adversarial.yaml").value();
  const auto& g = GetParam();
  CallInfo c;
  c.agent = "agent-x";
  c.method = g.method;
  c.scheme = "http";
  c.host = g.host;
  c.port = 80;
  c.target = g.path;
  c.contentType = g.contentType;
  std::string body = g.body;
  if (body == "DEEP") body = std::string(100, '[') + std::string(100, ']');
  if (body == "HUGE") body = "{\"pad\":\"" + std::string(8000, 'a') + "\"}";
  if (body == "LONGNAME")
    body = R"({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_)" +
           std::string(295, 'a') + "\"}}";
  if (body == "WIDE") {
    body = "{";
    for (int i = 0; i < 60; ++i) body += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":1";
    body += "}";
  }
  c.bodyAvailable = !body.empty();
  c.body = body;
  c.bodyTruncated = body.size() > set->maxBodyBytes();
  Engine engine;
  auto d = engine.evaluate(*set, Extractor::extract(c, *set));
  EXPECT_EQ(d.verdict, Verdict::kHalt)
      << g.name << ": " << verdictName(d.verdict) << " by " << d.rule;
  if (g.expectedRule) {
    EXPECT_EQ(d.rule, g.expectedRule) << g.name << ": " << d.reason;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Extraction, Disguises,
    ::testing::Values(
        // Paths onto /admin on api.internal.
        Disguise{"dot-dot", "api.internal", "/public/../admin/users", "GET", "", "", "no-admin"},
        Disguise{"encoded dot-dot", "api.internal", "/public/%2e%2e/admin/users", "GET", "", "",
                 "no-admin"},
        Disguise{"upper-case encoded dot-dot", "api.internal", "/public/%2E%2E/admin/users", "GET",
                 "", "", "no-admin"},
        Disguise{"half-encoded dot-dot", "api.internal", "/public/.%2e/admin/users", "GET", "", "",
                 "no-admin"},
        Disguise{"double slash before dot-dot", "api.internal", "/public//../admin/users", "GET",
                 "", "", "no-admin"},
        Disguise{"leading double slash", "api.internal", "//admin/users", "GET", "", "",
                 "no-admin"},
        Disguise{"dot segment", "api.internal", "/./admin/users", "GET", "", "", "no-admin"},
        Disguise{"inner dot segment", "api.internal", "/admin/./users", "GET", "", "", "no-admin"},
        Disguise{"encoded letters", "api.internal", "/%61dmin/users", "GET", "", "", "no-admin"},
        Disguise{"dot-dot past the root", "api.internal", "/../../admin/users", "GET", "", "",
                 "no-admin"},
        Disguise{"encoded slash", "api.internal", "/public/..%2fadmin/users", "GET", "", "",
                 "extract"},
        Disguise{"encoded slash lower", "api.internal", "/public/%2fadmin", "GET", "", "",
                 "extract"},
        Disguise{"encoded backslash", "api.internal", "/public/%5c..%5cadmin", "GET", "", "",
                 "extract"},
        Disguise{"raw backslash", "api.internal", "/public\\..\\admin", "GET", "", "", "extract"},
        Disguise{"encoded NUL", "api.internal", "/public/%00/../admin", "GET", "", "", "extract"},
        Disguise{"invalid escape", "api.internal", "/public/%zz/../admin", "GET", "", "",
                 "extract"},
        Disguise{"truncated escape", "api.internal", "/public/%2", "GET", "", "", "extract"},
        Disguise{"overlong UTF-8 dots", "api.internal", "/public/%c0%ae%c0%ae/admin", "GET", "", "",
                 "extract"},
        Disguise{"invalid UTF-8", "api.internal", "/public/%ff/../../admin", "GET", "", "",
                 "extract"},
        Disguise{"path parameter dot-dot", "api.internal", "/public/..;/admin/users", "GET", "", "",
                 "extract"},
        Disguise{"upper-case path", "api.internal", "/ADMIN/users"},
        // Path parameters, which Tomcat, Jetty and Spring strip before routing.
        Disguise{"path parameter", "api.internal", "/admin;x/users", "GET", "", "", "no-admin"},
        Disguise{"path parameters everywhere", "api.internal", "/admin;a=1/users;b", "GET", "", "",
                 "no-admin"},
        Disguise{"empty segment with a parameter", "api.internal", "/;x/admin/users", "GET", "", "",
                 "no-admin"},
        Disguise{"encoded-letter path parameter", "api.internal", "/%61dmin;jsessionid=1/users",
                 "GET", "", "", "no-admin"},
        // Hosts onto the metadata address.
        Disguise{"decimal IPv4", "2852039166", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"hex IPv4", "0xA9FEA9FE", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"octal IPv4", "0251.0376.0251.0376", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"short IPv4", "169.254.43518", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"dotted hex IPv4", "0xa9.0xfe.0xa9.0xfe", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"IPv4-mapped IPv6", "::ffff:169.254.169.254", "/latest", "GET", "", "",
                 "no-metadata"},
        Disguise{"trailing dot", "169.254.169.254.", "/latest", "GET", "", "", "no-metadata"},
        Disguise{"upper-case host", "API.INTERNAL", "/admin/users", "GET", "", "", "no-admin"},
        Disguise{"host with trailing dot", "api.internal.", "/admin/users", "GET", "", "",
                 "no-admin"},
        // Hosts onto 127.0.0.1/admin.
        Disguise{"short loopback", "127.1", "/admin/x", "GET", "", "", "no-local-admin"},
        Disguise{"decimal loopback", "2130706433", "/admin/x", "GET", "", "", "no-local-admin"},
        Disguise{"hex loopback", "0x7f000001", "/admin/x", "GET", "", "", "no-local-admin"},
        Disguise{"octal loopback", "017700000001", "/admin/x", "GET", "", "", "no-local-admin"},
        Disguise{"mapped loopback", "::ffff:127.0.0.1", "/admin/x", "GET", "", "",
                 "no-local-admin"},
        Disguise{"mapped loopback in hex", "::ffff:7f00:1", "/admin/x", "GET", "", "",
                 "no-local-admin"},
        Disguise{"loopback via public", "127.0.0.1", "/public/../admin/x", "GET", "", "",
                 "no-local-admin"},
        // MCP.
        Disguise{"MCP delete", "mcp.internal", "/mcp", "POST",
                 R"({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}})",
                 "application/json", "no-mcp-delete"},
        Disguise{"MCP batch hiding a delete", "mcp.internal", "/mcp", "POST",
                 R"([{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_a"}},)"
                 R"({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_b"}}])",
                 "application/json", "no-mcp-delete"},
        Disguise{"MCP batch hiding an undeclared tool", "mcp.internal", "/mcp", "POST",
                 R"([{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_a"}},)"
                 R"({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"wipe"}}])",
                 "application/json", "default-deny"},
        Disguise{
            "MCP name escaped in JSON", "mcp.internal", "/mcp", "POST",
            R"({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete\u005fall"}})",
            "application/json", "no-mcp-delete"},
        Disguise{
            "MCP duplicate name key", "mcp.internal", "/mcp", "POST",
            R"({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_a","name":"delete_b"}})",
            "application/json", "extract"},
        // JSON under another media type, or none: many servers parse it anyway (Express's
        // json({type: '*/*'}), Flask's get_json(force=True)), so the policy reads it too.
        Disguise{"JSON params as text/plain", "pay.internal", "/pay", "POST", R"({"amount": 5000})",
                 "text/plain", "big-payments"},
        Disguise{"JSON params without a content type", "pay.internal", "/pay", "POST",
                 R"( {"amount": 5000})", "", "big-payments"},
        Disguise{"JSON params as a form", "pay.internal", "/pay", "POST", R"({"amount": 5000})",
                 "application/x-www-form-urlencoded", "big-payments"},
        Disguise{"JSON params with a NaN, as text/plain", "pay.internal", "/pay", "POST",
                 R"({"amount": 5000, "x": NaN})", "text/plain", "extract"},
        Disguise{"MCP delete as text/plain", "mcp.internal", "/mcp", "POST",
                 R"({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}})",
                 "text/plain", "no-mcp-delete"},
        Disguise{"MCP method in other case", "mcp.internal", "/mcp", "POST",
                 R"({"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"read_a"}})",
                 "application/json", "default-deny"},
        Disguise{"deeply nested body", "mcp.internal", "/mcp", "POST", "DEEP", "application/json",
                 "extract"},
        Disguise{"MCP tool name of 300 bytes", "mcp.internal", "/mcp", "POST", "LONGNAME",
                 "application/json", "extract"},
        Disguise{"oversized body", "mcp.internal", "/mcp", "POST", "HUGE", "application/json",
                 "extract"},
        Disguise{"invalid JSON", "mcp.internal", "/mcp", "POST",
                 "{\"jsonrpc\":", "application/json", "extract"}),
    [](const ::testing::TestParamInfo<Disguise>& param) {
      std::string name = param.param.name;
      for (auto& ch : name) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

TEST(Extraction, NormalisedCallsStillReachTheirAllowedTool) {
  auto set = PolicySet::parse(kPolicy, "adversarial.yaml").value();
  for (const char* path : {"/public/a", "/public/./a", "/public//a", "/public/b/../a",
                           "/%70ublic/a", "/public;v=2/a", "/public/a;jsessionid=x"}) {
    CallInfo c;
    c.agent = "agent-x";
    c.method = "GET";
    c.scheme = "http";
    c.host = "api.internal";
    c.port = 80;
    c.target = path;
    auto tc = Extractor::extract(c, *set);
    ASSERT_TRUE(tc) << path << ": " << tc.error().message;
    EXPECT_EQ(tc.value().path(), "/public/a") << path;
    EXPECT_EQ(tc.value().tool(), "api.public") << path;
  }
}

TEST(Extraction, PathParametersAreNotMatched) {
  EXPECT_EQ(Extractor::withoutPathParameters("/a/b"), "/a/b");
  EXPECT_EQ(Extractor::withoutPathParameters("/a;x/b;y=1"), "/a/b");
  EXPECT_EQ(Extractor::withoutPathParameters("/a;x/"), "/a/");
  EXPECT_EQ(Extractor::withoutPathParameters("/;x"), "/");
  EXPECT_EQ(Extractor::withoutPathParameters("/;x/a"), "/a");
  EXPECT_EQ(Extractor::withoutPathParameters("/"), "/");
}

TEST(Extraction, CanonicalHosts) {
  EXPECT_EQ(Extractor::canonicalHost("127.1").value(), "127.0.0.1");
  EXPECT_EQ(Extractor::canonicalHost("0x7f.1").value(), "127.0.0.1");
  EXPECT_EQ(Extractor::canonicalHost("[::1]").ok(), false);
  EXPECT_EQ(Extractor::canonicalHost("0:0:0:0:0:0:0:1").value(), "::1");
  EXPECT_EQ(Extractor::canonicalHost("Example.COM.").value(), "example.com");
  EXPECT_FALSE(Extractor::canonicalHost("256.1.1.1").ok());
  EXPECT_FALSE(Extractor::canonicalHost("1.2.3.4.5").ok());
  EXPECT_FALSE(Extractor::canonicalHost("a b").ok());
  // An IPv6 address that reaches an IPv4 host is that host: mapped, and NAT64's well-known
  // prefix (RFC 6052); a local NAT64 prefix is not known here.
  EXPECT_EQ(Extractor::canonicalHost("::ffff:a9fe:a9fe").value(), "169.254.169.254");
  EXPECT_EQ(Extractor::canonicalHost("64:ff9b::a00:5").value(), "10.0.0.5");
  EXPECT_EQ(Extractor::canonicalHost("64:FF9B::10.0.0.5").value(), "10.0.0.5");
  EXPECT_EQ(Extractor::canonicalHost("64:ff9b:1::a00:5").value(), "64:ff9b:1::a00:5");
}

}  // namespace
}  // namespace tollgate
