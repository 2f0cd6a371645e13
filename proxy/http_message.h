// Helpers for the proxy's HTTP messages: the request target (absolute-form, origin-form with
// Host, CONNECT authority), hop-by-hop header filtering, reason phrases and local replies.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "proxy/http_parser.h"

namespace tollgate {

struct Target {
  std::string scheme;  // "http", "https" (inside an intercepted tunnel) or "tunnel"
  std::string host;    // lower-case, no trailing dot, IPv6 without brackets
  uint16_t port = 0;
  std::string pathQuery;          // origin-form; empty for CONNECT
  std::string key;                // "host:port" (IPv6 bracketed), for records and logs
  std::string authority() const;  // host:port as sent upstream in Host (default port elided)
  // Where the call goes: the same host and port, except behind a reverse listener's route.
  std::string upstreamHost;
  uint16_t upstreamPort = 0;
  bool upstreamTls = false;
  std::string upstreamAuthority() const;
};

// Parses and validates a request's target against its Host header(s). On failure returns
// false and sets reason (the request is then a 400).
bool parseTarget(const HttpHead& head, Target& out, std::string& reason);

// A request inside a TLS tunnel the proxy intercepted (CONNECT host:port): origin-form with a
// Host that names the tunnel's authority, or absolute-form https://that-authority/…. The
// target's scheme is "https". On failure returns false with reason; `mismatch` is set when
// the request names another host than the tunnel (domain fronting), which is a halt rather
// than a bad request.
bool parseTunnelTarget(const HttpHead& head, std::string_view tunnelHost, uint16_t tunnelPort,
                       Target& out, std::string& reason, bool& mismatch);

// A request to a reverse listener: origin-form with a Host (the public name of the tool),
// default port 443 with TLS, else 80. The upstream is the route's, set by the caller.
// The port is the listener's (`port`, 0: the scheme's default), whatever Host says: routes,
// breakers and the audit's authority must not depend on a port the agent makes up.
bool parseReverseTarget(const HttpHead& head, bool tls, uint16_t port, Target& out,
                        std::string& reason);

// Parses "host[:port]" (port optional when defaultPort != 0). Lower-cases the host.
bool parseAuthority(std::string_view text, uint16_t defaultPort, std::string& host, uint16_t& port);

// True for headers that never cross the proxy (RFC 9110 §7.6.1) or that it rewrites itself.
bool isHopByHop(std::string_view name);
// True when `name` is one of the comma-separated tokens of the Connection header(s).
bool namedByConnection(const HttpHead& head, std::string_view name);
// The token of an `Authorization: Bearer TOKEN` value (the scheme in any case, one or more
// spaces after it, RFC 9110 11.4), or nothing.
std::optional<std::string_view> bearerToken(std::string_view authorization);
// The Transfer-Encoding of a chunked message as it is sent on: its codings in order, the
// final chunked included ("gzip, chunked"); "chunked" when it names none.
std::string transferEncodingOf(const HttpHead& head);
bool connectionHasToken(const HttpHead& head, std::string_view token);

const char* reasonPhrase(int status);

// A complete local reply: status line, JSON content type, Content-Length, extra header
// lines (each ending in \r\n), Connection: close when closing.
std::string localReply(int status, std::string_view body, std::string_view extraHeaders, bool close,
                       std::string_view contentType = "application/json");

// {"error":…,"reason":…} plus an optional upstream.
std::string errorBody(std::string_view error, std::string_view reason,
                      std::string_view upstream = {});

void appendChunk(std::string& out, std::string_view data);

// Whether a query parameter's (or a header's) name says it carries a credential: when,
// percent-decoded and in lower case, it contains token, secret, passw, passphrase, apikey,
// api_key, api-key, signature, credential, session or assertion, ends in _key, -key, .key,
// or is key, sig, code, auth, jwt, pwd, sid or pass, or is one of `extra` (compared in lower
// case; "*" names every parameter).
bool credentialName(std::string_view raw, const std::vector<std::string>& extra = {});

// The request target as the audit stream and the logs keep it: the value of each query
// parameter whose name is a credentialName() replaced by REDACTED (with "*" in `extra`, a
// parameter without a value too). Parameters are split at & only. The path is kept as it
// came: a credential in a path segment cannot be told from an id.
std::string redactQuery(std::string_view pathQuery, const std::vector<std::string>& extra);

}  // namespace tollgate
