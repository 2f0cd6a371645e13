#include "proxy/http_message.h"

#include <algorithm>
#include <charconv>

#include "common/json.h"
#include "common/units.h"
#include "proxy/resolver.h"

namespace tollgate {
namespace {

bool isRegNameChar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '~';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

template <class Fn>
bool forEachToken(std::string_view list, Fn fn) {
  while (!list.empty()) {
    auto comma = list.find(',');
    auto token = trim(list.substr(0, comma));
    if (!token.empty() && fn(token)) return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

// host[:port] as sent in Host: the port elided when it is the scheme's default.
std::string authorityOf(const std::string& host, uint16_t port, uint16_t defaultPort) {
  if (port != defaultPort) return formatHostPort(host, port);
  if (host.find(':') == std::string::npos) return host;
  std::string out;
  out.reserve(host.size() + 2);
  out += '[';
  out += host;
  out += ']';
  return out;
}

// Splits what follows "scheme://" in an absolute-form target into its authority and the
// origin-form path ("/" when empty, "/?q" for a bare query). No userinfo, no fragment.
bool splitAbsolute(std::string_view rest, std::string_view& authority, std::string& pathQuery,
                   std::string& reason) {
  auto pathStart = rest.find_first_of("/?#");
  authority = rest.substr(0, pathStart);
  if (authority.find('@') != std::string_view::npos) {
    reason = "userinfo in the request target";
    return false;
  }
  std::string_view path =
      pathStart == std::string_view::npos ? std::string_view() : rest.substr(pathStart);
  if (path.find('#') != std::string_view::npos) {
    reason = "fragment in the request target";
    return false;
  }
  if (path.empty())
    pathQuery = "/";
  else if (path[0] == '?')
    pathQuery = "/" + std::string(path);
  else
    pathQuery.assign(path);
  return true;
}

}  // namespace

std::string Target::authority() const {
  return authorityOf(host, port, scheme == "https" ? 443 : 80);
}

bool parseAuthority(std::string_view text, uint16_t defaultPort, std::string& host,
                    uint16_t& port) {
  std::string_view h, p;
  if (text.starts_with('[')) {
    auto close = text.find(']');
    if (close == std::string_view::npos) return false;
    h = text.substr(1, close - 1);
    auto rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest[0] != ':') return false;
      p = rest.substr(1);
      if (p.empty()) return false;
    }
    sockaddr_storage ss;
    if (!Resolver::parseLiteral(std::string(h), ss) || ss.ss_family != AF_INET6) return false;
  } else {
    auto colon = text.find(':');
    h = text.substr(0, colon);
    if (colon != std::string_view::npos) {
      p = text.substr(colon + 1);
      if (p.empty()) return false;
    }
    if (h.empty()) return false;
    for (unsigned char c : h) {
      if (!isRegNameChar(c)) return false;
    }
  }
  if (p.empty()) {
    if (defaultPort == 0) return false;
    port = defaultPort;
  } else {
    unsigned value = 0;
    auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), value);
    if (ec != std::errc() || end != p.data() + p.size() || value == 0 || value > 65535)
      return false;
    port = static_cast<uint16_t>(value);
  }
  host.assign(h);
  for (auto& c : host) c = asciiLower(c);
  if (!host.empty() && host.back() == '.') host.pop_back();
  return !host.empty();
}

namespace {

// An origin-form target as the path and query sent on. A fragment is never sent (RFC 9112
// 3.2): llhttp takes one, and the policy would match `/repos/x#/issues` against its globs
// while the upstream serves `/repos/x`.
bool takeOriginForm(std::string_view url, std::string& pathQuery, std::string& reason) {
  if (url.find('#') != std::string_view::npos) {
    reason = "fragment in the request target";
    return false;
  }
  pathQuery.assign(url);
  return true;
}

bool parseTargetParts(const HttpHead& head, Target& out, std::string& reason) {
  std::string_view url = head.url();
  size_t hosts = head.count("host");
  if (hosts > 1) {
    reason = "more than one Host header";
    return false;
  }
  auto hostHeader = head.find("host");
  if (head.method == HTTP_CONNECT) {
    out.scheme = "tunnel";
    if (!parseAuthority(url, 0, out.host, out.port)) {
      reason = "CONNECT needs host:port";
      return false;
    }
    if (hostHeader) {
      std::string h;
      uint16_t p = 0;
      if (!parseAuthority(*hostHeader, out.port, h, p) || h != out.host || p != out.port) {
        reason = "Host header disagrees with the CONNECT authority";
        return false;
      }
    }
    return true;
  }
  if (url.starts_with('/')) {
    // origin-form: the Host header names the destination.
    if (!hostHeader) {
      reason = "origin-form request without a Host header";
      return false;
    }
    out.scheme = "http";
    if (!parseAuthority(*hostHeader, 80, out.host, out.port)) {
      reason = "invalid Host header";
      return false;
    }
    return takeOriginForm(url, out.pathQuery, reason);
  }
  auto schemeEnd = url.find("://");
  if (schemeEnd == std::string_view::npos) {
    reason = "request target is neither absolute-form nor origin-form";
    return false;
  }
  std::string scheme(url.substr(0, schemeEnd));
  for (auto& c : scheme) c = asciiLower(c);
  if (scheme == "https") {
    reason = "https:// targets go through CONNECT";
    return false;
  }
  if (scheme != "http") {
    reason = "unsupported scheme " + scheme;
    return false;
  }
  std::string_view authority;
  if (!splitAbsolute(url.substr(schemeEnd + 3), authority, out.pathQuery, reason)) return false;
  out.scheme = "http";
  if (!parseAuthority(authority, 80, out.host, out.port)) {
    reason = "invalid authority in the request target";
    return false;
  }
  if (hostHeader) {
    std::string h;
    uint16_t p = 0;
    if (!parseAuthority(*hostHeader, 80, h, p) || h != out.host || p != out.port) {
      reason = "Host header disagrees with the request target";
      return false;
    }
  }
  return true;
}

}  // namespace

std::string Target::upstreamAuthority() const {
  return authorityOf(upstreamHost, upstreamPort, upstreamTls ? 443 : 80);
}

bool parseTarget(const HttpHead& head, Target& out, std::string& reason) {
  if (!parseTargetParts(head, out, reason)) return false;
  out.key = formatHostPort(out.host, out.port);
  out.upstreamHost = out.host;
  out.upstreamPort = out.port;
  return true;
}

bool parseReverseTarget(const HttpHead& head, bool tls, uint16_t port, Target& out,
                        std::string& reason) {
  std::string_view url = head.url();
  if (head.method == HTTP_CONNECT || !url.starts_with('/')) {
    reason = "a reverse listener takes origin-form requests only";
    return false;
  }
  if (head.count("host") != 1) {
    reason = "exactly one Host header is required";
    return false;
  }
  out.scheme = tls ? "https" : "http";
  if (!parseAuthority(*head.find("host"), tls ? 443 : 80, out.host, out.port)) {
    reason = "invalid Host header";
    return false;
  }
  out.port = port != 0 ? port : tls ? 443 : 80;
  if (!takeOriginForm(url, out.pathQuery, reason)) return false;
  out.key = formatHostPort(out.host, out.port);
  return true;
}

bool parseTunnelTarget(const HttpHead& head, std::string_view tunnelHost, uint16_t tunnelPort,
                       Target& out, std::string& reason, bool& mismatch) {
  mismatch = false;
  if (head.method == HTTP_CONNECT) {
    reason = "CONNECT inside an intercepted tunnel";
    return false;
  }
  std::string_view url = head.url();
  if (head.count("host") > 1) {
    reason = "more than one Host header";
    return false;
  }
  auto hostHeader = head.find("host");
  std::string_view authority;
  if (url.starts_with('/')) {
    if (!hostHeader) {
      reason = "origin-form request without a Host header";
      return false;
    }
    authority = *hostHeader;
    if (!takeOriginForm(url, out.pathQuery, reason)) return false;
  } else {
    // absolute-form: allowed when it names the tunnel (RFC 9112 §3.2.2)
    constexpr std::string_view kHttps = "https://";
    if (url.size() < kHttps.size() || !equalsIgnoreCase(url.substr(0, kHttps.size()), kHttps)) {
      reason = "inside a TLS tunnel the target is origin-form or https://";
      return false;
    }
    if (!splitAbsolute(url.substr(kHttps.size()), authority, out.pathQuery, reason)) return false;
  }
  std::string host;
  uint16_t port = 0;
  if (!parseAuthority(authority, 443, host, port)) {
    reason = "invalid Host header";
    return false;
  }
  if (hostHeader && !url.starts_with('/')) {
    std::string h;
    uint16_t p = 0;
    if (!parseAuthority(*hostHeader, 443, h, p) || h != host || p != port) {
      reason = "the Host header names " + std::string(*hostHeader) + ", the target " +
               std::string(authority);
      mismatch = true;
      return false;
    }
  }
  if (host != tunnelHost || port != tunnelPort) {
    reason = "the request names " + formatHostPort(host, port) + " inside a tunnel to " +
             formatHostPort(std::string(tunnelHost), tunnelPort);
    mismatch = true;
    return false;
  }
  out.scheme = "https";
  out.host = std::move(host);
  out.port = port;
  out.key = formatHostPort(out.host, out.port);
  out.upstreamHost = out.host;
  out.upstreamPort = out.port;
  out.upstreamTls = true;
  return true;
}

bool isHopByHop(std::string_view name) {
  // Checked for every header of every message: dispatch on the length first.
  switch (name.size()) {
    case 2:
      return equalsIgnoreCase(name, "te");
    case 4:
      return equalsIgnoreCase(name, "host");
    case 6:
      return equalsIgnoreCase(name, "expect");
    case 7:
      return equalsIgnoreCase(name, "trailer") || equalsIgnoreCase(name, "upgrade");
    case 10:
      return equalsIgnoreCase(name, "connection") || equalsIgnoreCase(name, "keep-alive");
    case 11:
      return equalsIgnoreCase(name, "traceparent");
    case 14:
      // HTTP2-Settings belongs to an h2c upgrade (RFC 7540 3.2), which is never offered on.
      return equalsIgnoreCase(name, "content-length") || equalsIgnoreCase(name, "http2-settings");
    case 16:
      return equalsIgnoreCase(name, "proxy-connection");
    case 17:
      return equalsIgnoreCase(name, "transfer-encoding");
    case 18:
      return equalsIgnoreCase(name, "proxy-authenticate");
    case 19:
      return equalsIgnoreCase(name, "proxy-authorization");
    default:
      return false;
  }
}

bool namedByConnection(const HttpHead& head, std::string_view name) {
  for (size_t i = 0; i < head.size(); ++i) {
    if (!equalsIgnoreCase(head.name(i), "connection")) continue;
    if (forEachToken(head.value(i), [&](std::string_view t) { return equalsIgnoreCase(t, name); }))
      return true;
  }
  return false;
}

bool connectionHasToken(const HttpHead& head, std::string_view token) {
  return namedByConnection(head, token);
}

std::optional<std::string_view> bearerToken(std::string_view authorization) {
  if (authorization.size() <= 7 || !equalsIgnoreCase(authorization.substr(0, 7), "bearer "))
    return std::nullopt;
  auto token = authorization.substr(7);
  token.remove_prefix(std::min(token.find_first_not_of(' '), token.size()));
  if (token.empty()) return std::nullopt;
  return token;
}

std::string transferEncodingOf(const HttpHead& head) {
  std::string out;
  for (size_t i = 0; i < head.size(); ++i) {
    if (!equalsIgnoreCase(head.name(i), "transfer-encoding")) continue;
    forEachToken(head.value(i), [&](std::string_view t) {
      if (!out.empty()) out += ", ";
      out += t;
      return false;
    });
  }
  return out.empty() ? std::string("chunked") : out;
}

const char* reasonPhrase(int status) {
  switch (status) {
    case 100:
      return "Continue";
    case 101:
      return "Switching Protocols";
    case 200:
      return "OK";
    case 201:
      return "Created";
    case 202:
      return "Accepted";
    case 204:
      return "No Content";
    case 206:
      return "Partial Content";
    case 301:
      return "Moved Permanently";
    case 302:
      return "Found";
    case 304:
      return "Not Modified";
    case 307:
      return "Temporary Redirect";
    case 308:
      return "Permanent Redirect";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 409:
      return "Conflict";
    case 413:
      return "Content Too Large";
    case 414:
      return "URI Too Long";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 508:
      return "Loop Detected";
    default:
      return "Unknown";
  }
}

std::string localReply(int status, std::string_view body, std::string_view extraHeaders, bool close,
                       std::string_view contentType) {
  std::string out;
  out.reserve(160 + body.size() + extraHeaders.size());
  out += "HTTP/1.1 ";
  out += std::to_string(status);
  out += ' ';
  out += reasonPhrase(status);
  out += "\r\nContent-Type: ";
  out += contentType;
  out += "\r\nContent-Length: ";
  out += std::to_string(body.size());
  out += "\r\n";
  out += extraHeaders;
  if (close) out += "Connection: close\r\n";
  out += "\r\n";
  out += body;
  return out;
}

std::string errorBody(std::string_view error, std::string_view reason, std::string_view upstream) {
  std::string out;
  JsonObject obj(out);
  obj.add("error", error).add("reason", reason);
  if (!upstream.empty()) obj.add("upstream", upstream);
  obj.close();
  out += '\n';
  return out;
}

void appendChunk(std::string& out, std::string_view data) {
  if (data.empty()) return;
  char buf[20];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, data.size(), 16);
  out.append(buf, end);
  out += "\r\n";
  out += data;
  out += "\r\n";
}

bool credentialName(std::string_view raw, const std::vector<std::string>& extra) {
  std::string name;  // percent-decoded, lower case: api%5Fkey and API_KEY are api_key
  name.reserve(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    char c = raw[i];
    if (c == '%' && i + 2 < raw.size() && hexValue(raw[i + 1]) >= 0 && hexValue(raw[i + 2]) >= 0) {
      c = static_cast<char>(hexValue(raw[i + 1]) * 16 + hexValue(raw[i + 2]));
      i += 2;
    } else if (c == '+') {
      c = ' ';
    }
    name += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  }
  static constexpr std::string_view kParts[] = {"token",      "secret",  "passw",    "passphrase",
                                                "apikey",     "api_key", "api-key",  "signature",
                                                "credential", "session", "assertion"};
  static constexpr std::string_view kNames[] = {"key", "sig", "code", "auth",
                                                "jwt", "pwd", "sid",  "pass"};
  for (auto part : kParts)
    if (name.find(part) != std::string::npos) return true;
  for (auto exact : kNames)
    if (name == exact) return true;
  // subscription-key, access_key, private.key: a key of some kind (monkey is not).
  for (std::string_view end : {"_key", "-key", ".key", " key"})
    if (name.ends_with(end)) return true;
  for (const auto& e : extra)
    if (e == "*" || equalsIgnoreCase(e, name)) return true;
  return false;
}

std::string redactQuery(std::string_view pathQuery, const std::vector<std::string>& extra) {
  auto q = pathQuery.find('?');
  if (q == std::string_view::npos) return std::string(pathQuery);
  std::string out(pathQuery.substr(0, q + 1));
  std::string_view rest = pathQuery.substr(q + 1);
  bool all = std::find(extra.begin(), extra.end(), "*") != extra.end();
  while (true) {
    auto amp = rest.find('&');
    std::string_view param = rest.substr(0, amp);
    auto eq = param.find('=');
    if (eq != std::string_view::npos && credentialName(param.substr(0, eq), extra)) {
      out.append(param.substr(0, eq + 1));
      out += "REDACTED";
    } else if (eq == std::string_view::npos && all && !param.empty()) {
      out += "REDACTED";  // ?sk-live-…: a bare value, when every parameter is redacted
    } else {
      out.append(param);
    }
    if (amp == std::string_view::npos) break;
    out += '&';
    rest = rest.substr(amp + 1);
  }
  return out;
}

}  // namespace tollgate
