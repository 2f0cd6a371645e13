#include "proxy/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/redis_url.h"

#include "proxy/resolver.h"

namespace tollgate {
namespace {

// The sidecar example of DESIGN §9, as written.
constexpr const char* kDesignExample = R"(# tollgate.yaml — the sidecar
mode: enforce                     # enforce | observe
workers: 2
listeners:
  - name: egress
    kind: forward                 # forward | transparent | reverse
    address: 127.0.0.1:15001
    identity: {header: X-Agent-Id}
    intercept_tls: false          # true: terminate CONNECT with the local CA
admin:
  address: 127.0.0.1:15000
policies: [policy.yaml]           # paths relative to this file
store: {backend: memory}          # or {backend: redis, urls: [redis://127.0.0.1:6379]}
audit: {dir: var/audit}
)";

TEST(Config, AcceptsTheDesignExample) {
  auto c = parseConfig(kDesignExample, "/etc/tollgate/tollgate.yaml");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_FALSE(c->observe);
  EXPECT_EQ(c->workers, 2u);
  ASSERT_EQ(c->listeners.size(), 1u);
  EXPECT_EQ(c->listeners[0].name, "egress");
  EXPECT_EQ(c->listeners[0].address.port, 15001);
  EXPECT_EQ(c->listeners[0].identityHeader, "X-Agent-Id");
  EXPECT_TRUE(c->hasAdmin);
  EXPECT_EQ(c->admin.port, 15000);
  ASSERT_EQ(c->policies.size(), 1u);
  EXPECT_EQ(c->policies[0], "/etc/tollgate/policy.yaml");
  EXPECT_EQ(c->auditDir, "/etc/tollgate/var/audit");
  EXPECT_EQ(c->storeBackend, "memory");
}

TEST(Config, ReadsLimitsAndTimeouts) {
  auto c = parseConfig(R"(
listeners: [{name: a, address: "127.0.0.1:0"}]
limits: {max_header_bytes: 4k, max_headers: 20, max_uri_bytes: 1k, max_body_bytes: 1m, write_watermark: 64k}
timeouts: {header_read: 1s, idle: 2s, upstream_connect: 250ms, upstream_response: 1m, shutdown: 3s}
hosts: {allow: ["*"], deny: [evil.example]}
log: {level: warn}
)",
                       "t.yaml");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->limits.maxHeaderBytes, 4096u);
  EXPECT_EQ(c->limits.maxHeaders, 20u);
  EXPECT_EQ(c->limits.maxBodyBytes, 1u << 20);
  EXPECT_EQ(c->timeouts.upstreamConnect.count(), 250);
  EXPECT_EQ(c->timeouts.upstreamResponse.count(), 60'000);
  EXPECT_EQ(c->denyHosts, std::vector<std::string>{"evil.example"});
  EXPECT_EQ(c->logLevel, LogLevel::kWarn);
}

TEST(Config, ReadsTheAuditStreamKeys) {
  auto c = parseConfig(R"(
listeners: [{name: a, address: "127.0.0.1:0"}]
audit: {dir: logs/audit, checkpoint_every: 500, checkpoint_interval: 2s, segment_size: 16m, sync_interval: 0ms, prefill: 0, direct_io: false}
)",
                       "/etc/tollgate/t.yaml");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->auditDir, "/etc/tollgate/logs/audit");
  EXPECT_EQ(c->auditSink, "file");
  EXPECT_EQ(c->auditCheckpointEvery, 500u);
  EXPECT_EQ(c->auditCheckpointInterval.count(), 2000);
  EXPECT_EQ(c->auditSegmentSize, 16u << 20);
  EXPECT_EQ(c->auditSyncInterval.count(), 0);
  EXPECT_EQ(c->auditPrefill, 0u);
  EXPECT_FALSE(c->auditDirectIo);
  auto defaults = parseConfig("listeners: [{name: a, address: \"127.0.0.1:0\"}]\n", "t.yaml");
  ASSERT_TRUE(defaults) << defaults.error().message;
  EXPECT_EQ(defaults->auditPrefill, 1u << 20);
  EXPECT_TRUE(defaults->auditDirectIo);
}

TEST(Config, AcceptsTransparentListeners) {
  auto c = parseConfig(R"(
listeners:
  - {name: egress, kind: forward, address: "127.0.0.1:15002"}
  - {name: redirected, kind: transparent, address: "127.0.0.1:15001", identity: {source: {"127.0.0.1": agent-1}}}
  - {name: redirected6, kind: transparent, address: "[::1]:15001", intercept_tls: true}
)",
                       "t.yaml");
  ASSERT_TRUE(c) << c.error().message;
  ASSERT_EQ(c->listeners.size(), 3u);
  EXPECT_EQ(c->listeners[0].kind, "forward");
  EXPECT_EQ(c->listeners[1].kind, "transparent");
  EXPECT_EQ(c->listeners[1].identitySource.at("127.0.0.1"), "agent-1");
  EXPECT_EQ(c->listeners[2].kind, "transparent");
  EXPECT_EQ(c->listeners[2].address.host, "::1");
  EXPECT_TRUE(c->listeners[2].interceptTls);
}

// Hosts in passthrough lists and routes are compared with targets as targets are kept:
// lower case, no trailing dot, IPv6 without brackets.
TEST(Config, HostsAreKeptAsTargetsAreCompared) {
  auto c = parseConfig(R"(
listeners:
  - {name: f, address: "127.0.0.1:0", intercept_tls: true, passthrough: [Bank.Example., "*.pay.example", "[::1]", "::2", 10.0.0.1, "[2001:DB8:0::1]", "::ffff:10.0.0.2"]}
  - name: r
    kind: reverse
    address: "127.0.0.1:0"
    routes: [{host: Tickets.Test., upstream: "http://127.0.0.1:1"}, {host: "*", upstream: "http://127.0.0.1:2"}]
)",
                       "t.yaml");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->listeners[0].passthrough,
            (std::vector<std::string>{"bank.example", "*.pay.example", "::1", "::2", "10.0.0.1",
                                      "2001:db8::1", "10.0.0.2"}));
  EXPECT_EQ(c->listeners[1].routes[0].host, "tickets.test");
  EXPECT_EQ(c->listeners[1].routes[1].host, "*");
}

// Addresses that reach an IPv4 host through IPv6 (::ffff:a.b.c.d, NAT64's 64:ff9b::a.b.c.d)
// are that host to egress.deny_addresses, however the range or the resolved address is
// written; and identity.source keys are kept as a peer's address is written.
sockaddr_storage addressOf(const std::string& text) {
  sockaddr_storage ss{};
  EXPECT_TRUE(Resolver::parseLiteral(text, ss)) << text;
  return ss;
}

TEST(Config, AddressRangesMeetEveryFormOfAnIpv4Address) {
  auto metadata = parseAddressRange("::ffff:169.254.169.254");
  ASSERT_TRUE(metadata);
  EXPECT_TRUE(metadata->contains(addressOf("169.254.169.254")));
  EXPECT_TRUE(metadata->contains(addressOf("::ffff:169.254.169.254")));
  EXPECT_TRUE(metadata->contains(addressOf("64:ff9b::a9fe:a9fe")));
  EXPECT_FALSE(metadata->contains(addressOf("169.254.169.253")));
  auto nat64 = parseAddressRange("64:ff9b::10.0.0.0/104");
  ASSERT_TRUE(nat64);
  EXPECT_TRUE(nat64->contains(addressOf("10.1.2.3")));
  EXPECT_FALSE(nat64->contains(addressOf("11.0.0.1")));
  auto tens = parseAddressRange("10.0.0.0/8");
  ASSERT_TRUE(tens);
  EXPECT_TRUE(tens->contains(addressOf("64:ff9b::a00:5")));
  EXPECT_TRUE(tens->contains(addressOf("::ffff:10.0.0.5")));
  EXPECT_FALSE(tens->contains(addressOf("64:ff9c::a00:5")));
  EXPECT_FALSE(tens->contains(addressOf("::a00:5")));  // IPv4-compatible: long deprecated
  auto v6 = parseAddressRange("fd00::/8");
  ASSERT_TRUE(v6);
  EXPECT_TRUE(v6->contains(addressOf("fd12::1")));
  EXPECT_FALSE(v6->contains(addressOf("10.0.0.1")));
  EXPECT_FALSE(parseAddressRange("::ffff:10.0.0.0/129"));
  // Exactly /96 keeps its IPv6 meaning (as IPv4 it would be 0.0.0.0/0): the mapped forms.
  auto mapped = parseAddressRange("::ffff:0:0/96");
  ASSERT_TRUE(mapped);
  EXPECT_FALSE(mapped->contains(addressOf("10.0.0.1")));
  EXPECT_TRUE(mapped->contains(addressOf("::ffff:10.0.0.1")));
}

TEST(Config, IdentitySourcesAreKeptAsPeersAreWritten) {
  auto c = parseConfig(R"(
listeners:
  - name: t
    kind: transparent
    address: "127.0.0.1:0"
    identity: {source: {"FD00:0::5": a, "::ffff:10.0.0.5": b, "10.0.0.6": c}}
)",
                       "t.yaml");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(
      c->listeners[0].identitySource,
      (std::map<std::string, std::string>{{"fd00::5", "a"}, {"10.0.0.5", "b"}, {"10.0.0.6", "c"}}));
  auto twice = parseConfig(R"(
listeners:
  - name: t
    kind: transparent
    address: "127.0.0.1:0"
    identity: {source: {"10.0.0.5": a, "::ffff:10.0.0.5": b}}
)",
                           "t.yaml");
  ASSERT_FALSE(twice);
  EXPECT_NE(twice.error().message.find("listed already"), std::string::npos)
      << twice.error().message;
  sockaddr_storage ss;
  EXPECT_FALSE(Resolver::parseLiteral("fe80::1%eth0", ss));
  EXPECT_FALSE(Resolver::parseLiteral("::1%25x", ss));
  EXPECT_TRUE(Resolver::parseLiteral("fe80::1", ss));
}

struct BadCase {
  const char* yaml;
  const char* expected;  // substring of the error
};

class ConfigErrors : public ::testing::TestWithParam<BadCase> {};

TEST(Config, CredentialsAreNeitherEchoedNorRecorded) {
  auto c = parseConfig(
      "listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
      "[{upstream: 'https://svc:hunter2@10.0.0.7'}]}]\n",
      "bad.yaml");
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().message.find("hunter2"), std::string::npos) << c.error().message;
  auto ok = parseConfig(
      "listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {redact_query_params: [Tenant, "
      "'*']}\n",
      "t.yaml");
  ASSERT_TRUE(ok) << ok.error().message;
  EXPECT_EQ(ok->auditRedactQueryParams, (std::vector<std::string>{"tenant", "*"}));
}

TEST(Config, RedisPasswordsComeFromFilesOfTheirOwn) {
  // A mounted secret, relative to the config's directory, its first line the password.
  auto dir = std::filesystem::temp_directory_path() / ("tollgate-cfg-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir / "secrets");
  std::ofstream(dir / "secrets" / "redis") << "s3cret:@/\n";
  std::ofstream(dir / "empty") << "\n";
  auto load = [&](const std::string& yaml) {
    std::ofstream(dir / "t.yaml") << "listeners: [{name: a, address: '127.0.0.1:0'}]\n" << yaml;
    return loadConfig((dir / "t.yaml").string());
  };
  auto c = load(
      "store: {backend: redis, password_file: secrets/redis,\n"
      "        urls: ['redis://tollgate@10.0.0.5:6379', 'redis://tollgate@10.0.0.6:6379']}\n"
      "audit: {replica: {url: 'redis://10.0.0.7', password_file: secrets/redis}}\n");
  ASSERT_TRUE(c) << c.error().message;
  auto store = parseRedisUrls(c->storeUrls);
  ASSERT_TRUE(store) << store.error().message;
  EXPECT_EQ(store->second, (RedisAuth{"tollgate", "s3cret:@/"}));
  EXPECT_EQ(store->first.size(), 2u);
  EXPECT_EQ(parseRedisUrl(c->auditReplicaUrl)->auth, (RedisAuth{"", "s3cret:@/"}));
  // A user without a password, and no file: refused as before.
  EXPECT_FALSE(load("store: {backend: redis, urls: ['redis://tollgate@10.0.0.5:6379']}\n"));
  auto expectError = [&](const std::string& yaml, const std::string& expected) {
    auto bad = load(yaml);
    ASSERT_FALSE(bad) << yaml;
    EXPECT_NE(bad.error().message.find(expected), std::string::npos) << bad.error().message;
    EXPECT_EQ(bad.error().message.find("s3cret"), std::string::npos) << bad.error().message;
  };
  expectError("store: {backend: redis, urls: [redis://h:1], password_file: nope}\n",
              "t.yaml:2:61: store.password_file: cannot read " + (dir / "nope").string());
  expectError("store: {backend: redis, urls: [redis://h:1], password_file: empty}\n",
              "store.password_file: " + (dir / "empty").string() + " is empty");
  expectError(
      "store: {backend: redis, urls: ['redis://:inline@h:1'], password_file: secrets/redis}\n",
      "store.password_file: redis url: has a password of its own");
  expectError("audit: {replica: {url: 'redis://:x@h', password_file: secrets/redis}}\n",
              "audit.replica.password_file: redis url: has a password of its own");
  std::filesystem::remove_all(dir);
}

TEST_P(ConfigErrors, NameFileLineAndKey) {
  auto c = parseConfig(GetParam().yaml, "bad.yaml");
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().message.find(GetParam().expected), std::string::npos) << c.error().message;
  EXPECT_EQ(c.error().message.rfind("bad.yaml:", 0), 0u) << c.error().message;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrors,
    ::testing::Values(
        BadCase{"listners: []\n", "bad.yaml:1:1: listners: unknown key"},
        BadCase{
            "listeners: [{name: a, address: '127.0.0.1:0'}]\ntimeouts: {header_read: 10parsecs}\n",
            "bad.yaml:2:25: timeouts.header_read: expected a duration"},
        BadCase{"listeners: [{name: a, address: nowhere}]\n",
                "listeners[0].address: expected HOST:PORT"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\nworkers: many\n",
                "workers: expected a non-negative integer"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\nmode: yolo\n",
                "mode: expected enforce or observe"},
        BadCase{"listeners: [{name: a}]\n", "listeners[0].address: required"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0'}]\n",
                "bad.yaml:1:13: listeners[0].routes: a reverse listener needs routes"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'http://x:1'}], identity: {mtls: san_uri}}]\n",
                "listeners[0].identity.mtls: needs tls.client_ca"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0', passthrough: ['a/b']}]\n",
                "listeners[0].passthrough: 'a/b': expected a host name"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0', passthrough: ['bank:443']}]\n",
                "listeners[0].passthrough: 'bank:443': expected a host name"},
        // Seventeenth session: credentials that would be written down.
        BadCase{
            "listeners: [{name: a, address: '127.0.0.1:0', identity: {header: Authorization}}]\n",
            "listeners[0].identity.header: 'Authorization' carries credentials"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'https://svc:pw@10.0.0.7'}]}]\n",
                "listeners[0].routes[0].upstream: credentials in the URL are not supported"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\n"
                "audit: {redact_query_params: ['a=b']}\n",
                "audit.redact_query_params: 'a=b': expected a query parameter name"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\n"
                "audit: {redact_query_params: ['api%5Fkey']}\n",
                "audit.redact_query_params: 'api%5Fkey': expected a query parameter name"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'http://10.0.0.7'}], identity: {bearer: {tool-token-123: agent}}}]\n",
                "listeners[0].identity.bearer: tokens are stored hashed: sha256:<64 hex digits>"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\n"
                "admin: {address: '127.0.0.1:0', tokens: ['sha256:ABC']}\n",
                "admin.tokens: tokens are stored hashed"},
        BadCase{
            "listeners: [{name: a, address: '127.0.0.1:0', identity: {header: X-Vault-Token}}]\n",
            "listeners[0].identity.header: 'X-Vault-Token' carries credentials"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'https://svc:pa/ss@10.0.0.7'}]}]\n",
                "listeners[0].routes[0].upstream: credentials in the URL are not supported"},
        // Seventeenth session: keys that could only be ignored.
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0', passthrough: [bank.example]}]\n",
                "bad.yaml:1:60: listeners[0].passthrough: does nothing without intercept_tls"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'http://x:1'}], passthrough: [bank.example]}]\n",
                "listeners[0].passthrough: only for forward and transparent listeners"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\n"
                "admin: {tokens: ['sha256:"
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa']}\n",
                "bad.yaml:2:17: admin.tokens: no admin listener without admin.address"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{host: 'kb.test:8443', upstream: 'http://x:1'}]}]\n",
                "listeners[0].routes[0].host: 'kb.test:8443': expected a host name without a port"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{host: 'kb.*.test', upstream: 'http://x:1'}]}]\n",
                "listeners[0].routes[0].host: 'kb.*.test': expected"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\nworkers: 2\nworkers: 4\n",
                "bad.yaml:3:1: workers: duplicate key"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\ntls: {leaf_cache_size: 0}\n",
                "tls.leaf_cache_size: must be greater than 0"},
        BadCase{"listeners: [{name: a, kind: sideways, address: '127.0.0.1:0'}]\n",
                "listeners[0].kind: expected forward, transparent or reverse"},
        BadCase{
            "listeners: [{name: a, address: '127.0.0.1:0'}, {name: a, address: '127.0.0.1:0'}]\n",
            "duplicate listener name"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:8080'},\n"
                "            {name: b, address: '127.0.0.1:8080'}]\n",
                "bad.yaml:2:32: listeners[1].address: the address of listener 'a'"},
        BadCase{"listeners: [{name: a, kind: reverse, address: '127.0.0.1:0', routes: "
                "[{upstream: 'http://x:1'}], tls: {certificates: [{cert: c, key: k}], "
                "require_client_cert: true}}]\n",
                "listeners[0].tls.require_client_cert: needs tls.client_ca"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\nstore: {backend: redis}\n",
                "store.urls: required"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {sink: s3}\n",
                "bad.yaml:2:15: audit.sink: expected file or memory"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {checkpoint_every: 0}\n",
                "audit.checkpoint_every: must be greater than 0"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {sync_interval: 2s}\n",
                "audit.sync_interval: at most 1s"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {prefill: lots}\n",
                "audit.prefill: expected a size"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'}]\naudit: {prefill: 2g}\n",
                "audit.prefill: at most 1g"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:0'\n", "(yaml)"},
        BadCase{"", "the file is empty"},
        // Fourteenth session: what loaded and then failed at run time, or meant nothing.
        BadCase{"listeners: [{name: a, address: 'myhost:15001'}]\n",
                "bad.yaml:1:32: listeners[0].address: 'myhost' is not an IP address"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\nadmin: {address: '[nope]:2'}\n",
                "admin.address: 'nope' is not an IP address"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\n"
                "hosts: {allow: ['*'], deny: ['evil.example:443']}\n",
                "hosts.deny: 'evil.example:443': expected a host name or IP address"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\n"
                "hosts: {deny: ['https://evil.example']}\n",
                "hosts.deny: 'https://evil.example'"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\npolicies: [p.yaml]\n"
                "hosts: {deny: [evil.example]}\n",
                "bad.yaml:3:8: hosts: has no effect with policies:"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:15001'}]\n"
                "admin: {address: 'localhost:15001'}\n",
                "admin.address: the address of listener 'a'"},
        BadCase{"listeners: [{name: a, address: '0.0.0.0:15001'}, {name: b, address: "
                "'127.0.0.1:15001'}]\n",
                "listeners[1].address: the address of listener 'a'"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1', max_connections: 0}]\n",
                "listeners[0].max_connections: must be at least 1"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\nlimits: {max_headers: 0}\n",
                "limits.max_headers: must be at least 1"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\nlimits: {max_uri_bytes: 0}\n",
                "limits.max_uri_bytes: must be at least 1"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\n"
                "limits: {max_header_bytes: 8589934592g}\n",
                "limits.max_header_bytes: at most 67108864"},
        BadCase{"listeners: [{name: a, address: '127.0.0.1:1'}]\naudit: {segment_age: 110000d}\n",
                "audit.segment_age: at most 3650d"}));

}  // namespace
}  // namespace tollgate
