#include "proxy/http_message.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

struct Noop : HttpParser::Handler {
  void onMessageBegin(HttpParser&) override {}
  int onHeadersComplete(HttpParser&) override { return 0; }
  int onBody(HttpParser&, std::string_view) override { return 0; }
  int onMessageComplete(HttpParser&) override { return HPE_PAUSED; }
};

// Parses one request head and runs parseTarget on it.
struct Parsed {
  bool ok;
  Target target;
  std::string reason;
};

Parsed target(const std::string& head) {
  Noop n;
  HttpParser::Limits l;
  HttpParser p(HttpParser::Type::kRequest, l, n);
  auto out = p.execute(head);
  EXPECT_NE(out.state, HttpParser::State::kError) << head;
  Parsed r;
  r.ok = parseTarget(p.head(), r.target, r.reason);
  return r;
}

TEST(ParseTarget, AbsoluteForm) {
  auto r = target("GET http://Notes.Local.:8080/a?b=1 HTTP/1.1\r\nHost: notes.local:8080\r\n\r\n");
  ASSERT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.target.host, "notes.local");
  EXPECT_EQ(r.target.port, 8080);
  EXPECT_EQ(r.target.pathQuery, "/a?b=1");
  EXPECT_EQ(r.target.authority(), "notes.local:8080");
}

TEST(ParseTarget, DefaultsPortAndPath) {
  auto r = target("GET http://a.example HTTP/1.1\r\n\r\n");
  ASSERT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.target.port, 80);
  EXPECT_EQ(r.target.pathQuery, "/");
  EXPECT_EQ(r.target.authority(), "a.example");
}

TEST(ParseTarget, OriginFormUsesHost) {
  auto r = target("GET /x HTTP/1.1\r\nHost: [::1]:81\r\n\r\n");
  ASSERT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.target.host, "::1");
  EXPECT_EQ(r.target.key, "[::1]:81");
}

TEST(ParseTarget, Connect) {
  auto r = target("CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n");
  ASSERT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.target.scheme, "tunnel");
  EXPECT_EQ(r.target.port, 443);
}

TEST(ParseTarget, RejectsAmbiguity) {
  EXPECT_FALSE(target("GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n").ok);
  EXPECT_FALSE(target("GET http://a.example/ HTTP/1.1\r\nHost: a.example:81\r\n\r\n").ok);
  EXPECT_FALSE(
      target("GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n").ok);
  EXPECT_FALSE(target("GET http://user@a.example/ HTTP/1.1\r\n\r\n").ok);
  EXPECT_FALSE(target("GET / HTTP/1.1\r\n\r\n").ok);
  EXPECT_FALSE(target("GET https://a.example/ HTTP/1.1\r\n\r\n").ok);
  EXPECT_FALSE(target("CONNECT a.example HTTP/1.1\r\n\r\n").ok);
  EXPECT_FALSE(target("GET http://a_b!.example/ HTTP/1.1\r\n\r\n").ok);
}

// A request inside a tunnel to api.example:443 (intercepted CONNECT).
struct Tunnel {
  bool ok;
  bool mismatch;
  Target target;
  std::string reason;
};

Tunnel inTunnel(const std::string& head, uint16_t port = 443) {
  Noop n;
  HttpParser::Limits l;
  HttpParser p(HttpParser::Type::kRequest, l, n);
  EXPECT_NE(p.execute(head).state, HttpParser::State::kError) << head;
  Tunnel t{};
  t.ok = parseTunnelTarget(p.head(), "api.example", port, t.target, t.reason, t.mismatch);
  return t;
}

TEST(ParseTunnelTarget, OriginAndAbsoluteFormNamingTheTunnel) {
  auto t = inTunnel("GET /v1/x?y=1 HTTP/1.1\r\nHost: API.example\r\n\r\n");
  ASSERT_TRUE(t.ok) << t.reason;
  EXPECT_EQ(t.target.scheme, "https");
  EXPECT_EQ(t.target.key, "api.example:443");
  EXPECT_EQ(t.target.authority(), "api.example");  // 443 is https's default
  EXPECT_TRUE(t.target.upstreamTls);
  EXPECT_EQ(t.target.upstreamHost, "api.example");
  t = inTunnel("GET https://api.example:8443 HTTP/1.1\r\nHost: api.example:8443\r\n\r\n", 8443);
  ASSERT_TRUE(t.ok) << t.reason;
  EXPECT_EQ(t.target.pathQuery, "/");
  EXPECT_EQ(t.target.authority(), "api.example:8443");
}

TEST(ParseTunnelTarget, AnotherHostIsAMismatchNotABadRequest) {
  for (const char* head : {"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                           "GET / HTTP/1.1\r\nHost: api.example:444\r\n\r\n",
                           "GET https://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                           "GET https://api.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"}) {
    auto t = inTunnel(head);
    EXPECT_FALSE(t.ok) << head;
    EXPECT_TRUE(t.mismatch) << head << ": " << t.reason;
  }
  for (const char* head :
       {"GET / HTTP/1.1\r\n\r\n", "GET http://api.example/ HTTP/1.1\r\nHost: api.example\r\n\r\n",
        "GET https://u@api.example/ HTTP/1.1\r\nHost: api.example\r\n\r\n",
        "CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n"}) {
    auto t = inTunnel(head);
    EXPECT_FALSE(t.ok) << head;
    EXPECT_FALSE(t.mismatch) << head << ": " << t.reason;
  }
}

TEST(ParseReverseTarget, HostNamesTheToolAndTheDefaultPortFollowsTls) {
  Noop n;
  HttpParser::Limits l;
  HttpParser p(HttpParser::Type::kRequest, l, n);
  ASSERT_NE(p.execute("GET /a HTTP/1.1\r\nHost: Tickets.Example\r\n\r\n").state,
            HttpParser::State::kError);
  Target t;
  std::string reason;
  ASSERT_TRUE(parseReverseTarget(p.head(), true, 0, t, reason)) << reason;
  EXPECT_EQ(t.key, "tickets.example:443");
  ASSERT_TRUE(parseReverseTarget(p.head(), false, 0, t, reason)) << reason;
  EXPECT_EQ(t.key, "tickets.example:80");
  HttpParser q(HttpParser::Type::kRequest, l, n);
  ASSERT_NE(q.execute("GET http://x.example/ HTTP/1.1\r\nHost: x.example\r\n\r\n").state,
            HttpParser::State::kError);
  EXPECT_FALSE(parseReverseTarget(q.head(), true, 0, t, reason));
}

TEST(ParseReverseTarget, ThePortIsTheListenersWhateverHostSays) {
  Noop n;
  HttpParser::Limits l;
  for (const char* host : {"tickets.example", "tickets.example:8443", "tickets.example:1"}) {
    HttpParser p(HttpParser::Type::kRequest, l, n);
    std::string req = std::string("GET /a HTTP/1.1\r\nHost: ") + host + "\r\n\r\n";
    ASSERT_NE(p.execute(req).state, HttpParser::State::kError);
    Target t;
    std::string reason;
    ASSERT_TRUE(parseReverseTarget(p.head(), true, 8443, t, reason)) << reason;
    EXPECT_EQ(t.port, 8443) << host;
    EXPECT_EQ(t.key, "tickets.example:8443") << host;
  }
}

// llhttp takes `#` in an origin-form target; no form of target sends a fragment on (the
// policy would match `/repos/x#/issues`, the upstream serve `/repos/x`).
TEST(Targets, AFragmentIsRefusedInEveryForm) {
  const std::string forward = "GET /repos/x#/issues HTTP/1.1\r\nHost: api.example\r\n\r\n";
  auto r = target(forward);
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.reason, "fragment in the request target");
  r = target("GET http://api.example/repos/x#/issues HTTP/1.1\r\nHost: api.example\r\n\r\n");
  EXPECT_FALSE(r.ok);
  auto t = inTunnel(forward);
  EXPECT_FALSE(t.ok);
  EXPECT_FALSE(t.mismatch);
  EXPECT_EQ(t.reason, "fragment in the request target");
  Noop n;
  HttpParser::Limits l;
  HttpParser p(HttpParser::Type::kRequest, l, n);
  ASSERT_NE(p.execute(forward).state, HttpParser::State::kError);
  Target rt;
  std::string reason;
  EXPECT_FALSE(parseReverseTarget(p.head(), true, 0, rt, reason));
  EXPECT_EQ(reason, "fragment in the request target");
  // `#` percent-encoded is a path character like any other.
  r = target("GET /repos/x%23/issues HTTP/1.1\r\nHost: api.example\r\n\r\n");
  EXPECT_TRUE(r.ok) << r.reason;
}

TEST(HopByHop, ConnectionNamedHeadersAreFound) {
  Noop n;
  HttpParser::Limits l;
  HttpParser p(HttpParser::Type::kRequest, l, n);
  (void)p.execute("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Foo\r\nX-Foo: 1\r\n\r\n");
  EXPECT_TRUE(namedByConnection(p.head(), "x-foo"));
  EXPECT_FALSE(namedByConnection(p.head(), "x-bar"));
  EXPECT_TRUE(isHopByHop("Proxy-Authorization"));
  EXPECT_TRUE(isHopByHop("TE"));
  EXPECT_FALSE(isHopByHop("Authorization"));
}

TEST(LocalReply, CarriesLengthAndClose) {
  auto r = localReply(403, "{}", "X-A: b\r\n", true);
  EXPECT_EQ(
      r,
      "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-A: b\r\n"
      "Connection: close\r\n\r\n{}");
}

// What the audit stream and the logs keep of a target: credentials in the query are not.
TEST(RedactQuery, CredentialValuesAreNotKept) {
  EXPECT_EQ(redactQuery("/v1/search", {}), "/v1/search");
  EXPECT_EQ(redactQuery("/v1/search?q=x&api_key=sk-live-123&page=2", {}),
            "/v1/search?q=x&api_key=REDACTED&page=2");
  // However spelt: case, percent-encoding, a name that contains a credential word.
  EXPECT_EQ(redactQuery("/a?API%5FKEY=1&X-Amz-Signature=2&access_token=3&client_secret=4", {}),
            "/a?API%5FKEY=REDACTED&X-Amz-Signature=REDACTED&access_token=REDACTED&"
            "client_secret=REDACTED");
  EXPECT_EQ(redactQuery("/cb?code=abc&state=s&sig=9&key=k&monkey=m", {}),
            "/cb?code=REDACTED&state=s&sig=REDACTED&key=REDACTED&monkey=m");
  // A name alone, an empty value, an empty parameter: kept as they came.
  EXPECT_EQ(redactQuery("/a?token&password=&&x=1", {}), "/a?token&password=REDACTED&&x=1");
  EXPECT_EQ(redactQuery("/a?", {}), "/a?");
  // The operator's own names, and every parameter.
  EXPECT_EQ(redactQuery("/a?tenant=acme&q=1", {"tenant"}), "/a?tenant=REDACTED&q=1");
  EXPECT_EQ(redactQuery("/a?q=1&b=2&&sk-live-9", {"*"}), "/a?q=REDACTED&b=REDACTED&&REDACTED");
  // Keys of every kind, and passes.
  EXPECT_EQ(redactQuery("/a?subscription-key=1&access_key=2&Private.Key=3&pass=4&passphrase=5&"
                        "client_assertion=6&passenger=7",
                        {}),
            "/a?subscription-key=REDACTED&access_key=REDACTED&Private.Key=REDACTED&"
            "pass=REDACTED&passphrase=REDACTED&client_assertion=REDACTED&passenger=7");
  // The path is not touched, even when it looks like a query.
  EXPECT_EQ(redactQuery("/token=abc/x?id=1", {}), "/token=abc/x?id=1");
}

}  // namespace
}  // namespace tollgate
