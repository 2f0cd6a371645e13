#include "proxy/config.h"

#include "common/files.h"
#include "common/redis_url.h"
#include "common/units.h"
#include "policy/redis_client.h"
#include "policy/tool_call.h"

#include "proxy/http_message.h"
#include "proxy/resolver.h"

#include <yaml-cpp/yaml.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>

namespace tollgate {
namespace {

// Thrown only inside this file, while reading a config; turned into a Result at the edge.
struct ConfigError {
  std::string message;
};

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const YAML::Node& node, const std::string& key,
                         const std::string& msg) const {
    throw ConfigError{where(node, key) + ": " + msg};
  }

  // "FILE:LINE:COL: key": where a value is, for errors found after the file is read.
  std::string where(const YAML::Node& node, const std::string& key) const {
    std::ostringstream out;
    out << path_;
    if (node.Mark().line >= 0) out << ':' << node.Mark().line + 1 << ':' << node.Mark().column + 1;
    out << ": " << key;
    return out.str();
  }

  // Calls fn(key, value) for each entry of a mapping; unknown keys are errors.
  void forEach(const YAML::Node& map, const std::string& where, const std::set<std::string>& known,
               const std::function<void(const std::string&, const YAML::Node&)>& fn) const {
    if (!map.IsMap()) fail(map, where, "expected a mapping");
    std::set<std::string> seen;
    for (const auto& kv : map) {
      auto key = kv.first.as<std::string>();
      auto full = where.empty() ? key : where + "." + key;
      if (!known.count(key)) fail(kv.first, full, "unknown key");
      // YAML would keep one of the two silently: which one the writer meant is unknown.
      if (!seen.insert(key).second) fail(kv.first, full, "duplicate key");
      fn(full, kv.second);
    }
  }

  std::string str(const YAML::Node& n, const std::string& key) const {
    if (!n.IsScalar()) fail(n, key, "expected a string");
    return n.as<std::string>();
  }

  bool boolean(const YAML::Node& n, const std::string& key) const {
    bool v;
    if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) fail(n, key, "expected true or false");
    return v;
  }

  uint64_t integer(const YAML::Node& n, const std::string& key, uint64_t max) const {
    auto v = n.IsScalar() ? parseSize(n.Scalar()) : std::nullopt;
    if (!v || n.Scalar().find_first_not_of("0123456789") != std::string::npos) {
      fail(n, key, "expected a non-negative integer");
    }
    if (*v > max) fail(n, key, "at most " + std::to_string(max));
    return *v;
  }

  uint64_t size(const YAML::Node& n, const std::string& key) const {
    auto v = n.IsScalar() ? parseSize(n.Scalar()) : std::nullopt;
    if (!v) fail(n, key, "expected a size such as 64k, 1m or 1g");
    return *v;
  }

  Millis duration(const YAML::Node& n, const std::string& key) const {
    auto v = n.IsScalar() ? parseDuration(n.Scalar()) : std::nullopt;
    if (!v) fail(n, key, "expected a duration such as 250ms, 10s, 5m, 1h or 1d");
    // Ten years: past it a deadline in steady-clock nanoseconds would overflow (a "never"
    // written as 110000d made every batch a new segment and a checkpoint).
    if (*v > Millis(3650ll * 86'400'000)) fail(n, key, "at most 3650d");
    return *v;
  }

  // An address to listen on: an IP literal (or localhost, 127.0.0.1) and a port.
  HostPort address(const YAML::Node& n, const std::string& key) const {
    auto v = n.IsScalar() ? parseHostPort(n.Scalar()) : std::nullopt;
    if (!v) fail(n, key, "expected HOST:PORT, e.g. 127.0.0.1:15001 or [::1]:15001");
    sockaddr_storage ss;
    if (v->host != "localhost" && !Resolver::parseLiteral(v->host, ss))
      fail(n, key,
           "'" + v->host +
               "' is not an IP address: a listener binds an address, e.g. "
               "127.0.0.1:15001, 0.0.0.0:15001 or [::1]:15001");
    return *v;
  }

  std::vector<std::string> strings(const YAML::Node& n, const std::string& key) const {
    if (!n.IsSequence()) fail(n, key, "expected a list of strings");
    std::vector<std::string> out;
    for (const auto& item : n) out.push_back(str(item, key));
    return out;
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A host as the config names it, as targets are compared: lower case, no trailing dot, an
// IPv6 literal without brackets, "*." allowed in front of a name. Empty when it is none.
std::string configHost(std::string host) {
  for (auto& ch : host) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  // An IP literal in its canonical form (IPv6 compressed, ::ffff:a.b.c.d as a.b.c.d), the
  // form a call's host is compared in.
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    sockaddr_storage ss;
    if (!Resolver::parseLiteral(host, ss) || ss.ss_family != AF_INET6) return {};
    auto canonical = Extractor::canonicalHost(host);
    return canonical ? canonical.value() : host;
  }
  if (sockaddr_storage ss; Resolver::parseLiteral(host, ss)) {
    auto canonical = Extractor::canonicalHost(host);
    return canonical ? canonical.value() : host;
  }
  if (host.ends_with('.')) host.pop_back();
  auto name = std::string_view(host).substr(host.starts_with("*.") ? 2 : 0);
  if (name.empty() || name.starts_with('.') || name.ends_with('.') ||
      name.find_first_of("*/:[] ") != std::string_view::npos)
    return {};
  return host;
}

// A Redis password kept in a file of its own (a mounted secret, so that the config can be
// world-readable), put into each of `urls`; the file ends where its first line does.
void withPasswordFile(const Reader& r, const YAML::Node& node, const std::string& key,
                      const std::filesystem::path& base, const std::vector<std::string*>& urls) {
  std::string path = (base / r.str(node, key)).lexically_normal().string();
  auto text = readFile(path);
  if (!text) r.fail(node, key, text.error().message);
  std::string password = text.value().substr(0, text.value().find_first_of("\r\n"));
  if (password.empty()) r.fail(node, key, path + " is empty");
  for (auto* url : urls) {
    auto with = redisUrlWithPassword(*url, password);
    if (!with) r.fail(node, key, with.error().message);
    *url = with.value();
  }
}

ListenerConfig readListener(const Reader& r, const YAML::Node& node, const std::string& where) {
  ListenerConfig l;
  bool hasAddress = false;
  YAML::Node requireNode;  // tls.require_client_cert, where it is
  bool requireSet = false;
  YAML::Node passthroughNode;  // passthrough, where it is
  auto base = std::filesystem::path(r.path()).parent_path();
  auto file = [&](const YAML::Node& v, const std::string& key) {
    return (base / r.str(v, key)).lexically_normal().string();
  };
  r.forEach(
      node, where,
      {"name", "kind", "address", "identity", "intercept_tls", "passthrough", "max_connections",
       "tls", "routes"},
      [&](const std::string& key, const YAML::Node& v) {
        if (key.ends_with(".name"))
          l.name = r.str(v, key);
        else if (key.ends_with(".kind")) {
          l.kind = r.str(v, key);
          if (l.kind != "forward" && l.kind != "transparent" && l.kind != "reverse") {
            r.fail(v, key, "expected forward, transparent or reverse");
          }
        } else if (key.ends_with(".address")) {
          l.address = r.address(v, key);
          hasAddress = true;
        } else if (key.ends_with(".identity")) {
          r.forEach(
              v, key, {"header", "proxy_basic", "source", "mtls", "bearer"},
              [&](const std::string& k, const YAML::Node& hv) {
                if (k.ends_with(".header")) {
                  l.identityHeader = r.str(hv, k);
                  // The agent id is written in every record and log line: a header that
                  // carries a credential would put the credential there.
                  for (std::string_view secret : {"authorization", "proxy-authorization", "cookie",
                                                  "x-api-key", "api-key", "x-auth-token"}) {
                    if (equalsIgnoreCase(l.identityHeader, secret) ||
                        credentialName(l.identityHeader))
                      r.fail(hv, k,
                             "'" + l.identityHeader +
                                 "' carries credentials, and the agent id is recorded and logged: "
                                 "use proxy_basic, bearer or mtls");
                  }
                } else if (k.ends_with(".mtls")) {
                  l.identityMtls = r.str(hv, k);
                  if (l.identityMtls != "subject_cn" && l.identityMtls != "san_uri")
                    r.fail(hv, k, "expected subject_cn or san_uri");
                } else if (k.ends_with(".bearer")) {
                  if (!hv.IsMap() || hv.size() == 0)
                    r.fail(hv, k, "expected a mapping from sha256:<hex> of a token to an agent id");
                  for (const auto& kv : hv) {
                    auto t = kv.first.as<std::string>();
                    if (!t.starts_with("sha256:") || t.size() != 71 ||
                        t.find_first_not_of("0123456789abcdef", 7) != std::string::npos)
                      r.fail(kv.first, k,
                             "tokens are stored hashed: sha256:<64 hex digits> (printf %s TOKEN | "
                             "sha256sum)");
                    l.identityBearer[t] = r.str(kv.second, k + "." + t);
                  }
                } else if (k.ends_with(".proxy_basic")) {
                  l.identityProxyBasic = r.boolean(hv, k);
                } else {
                  if (!hv.IsMap()) r.fail(hv, k, "expected a mapping from source IP to agent id");
                  for (const auto& kv : hv) {
                    sockaddr_storage ss;
                    auto ip = kv.first.as<std::string>();
                    if (!Resolver::parseLiteral(ip, ss))
                      r.fail(kv.first, k, "'" + ip + "' is not an IP address");
                    // Kept as a peer's address is written (FD00:0::5 is fd00::5, and
                    // ::ffff:10.0.0.5 the IPv4 peer 10.0.0.5), or it would never match.
                    char text[INET6_ADDRSTRLEN] = {};
                    if (ss.ss_family == AF_INET) {
                      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, text,
                                sizeof text);
                    } else {
                      const auto& a6 = reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr;
                      if (IN6_IS_ADDR_V4MAPPED(&a6))
                        inet_ntop(AF_INET, &a6.s6_addr[12], text, sizeof text);
                      else
                        inet_ntop(AF_INET6, &a6, text, sizeof text);
                    }
                    std::string canonical = text;
                    if (l.identitySource.count(canonical))
                      r.fail(kv.first, k, "'" + ip + "' is an address listed already");
                    l.identitySource[canonical] = r.str(kv.second, k + "." + ip);
                  }
                }
              });
          int modes = !l.identityHeader.empty() + l.identityProxyBasic + !l.identitySource.empty() +
                      !l.identityMtls.empty() + !l.identityBearer.empty();
          if (modes > 1)
            r.fail(v, key, "choose one of header, proxy_basic, source, mtls or bearer");
        } else if (key.ends_with(".intercept_tls")) {
          l.interceptTls = r.boolean(v, key);
        } else if (key.ends_with(".passthrough")) {
          passthroughNode = v;
          for (const auto& given : r.strings(v, key)) {
            auto host = configHost(given);
            if (host.empty())
              r.fail(v, key,
                     "'" + given +
                         "': expected a host name or IP address, or *.domain for every name "
                         "under it");
            l.passthrough.push_back(host);
          }
        } else if (key.ends_with(".tls")) {
          r.forEach(v, key, {"certificates", "client_ca", "require_client_cert"},
                    [&](const std::string& k, const YAML::Node& tv) {
                      if (k.ends_with(".client_ca")) {
                        l.clientCa = file(tv, k);
                        l.clientCaWhere = r.where(tv, k);
                      } else if (k.ends_with(".require_client_cert")) {
                        l.requireClientCert = r.boolean(tv, k);
                        requireNode = tv;
                        requireSet = true;
                      } else {
                        if (!tv.IsSequence() || tv.size() == 0)
                          r.fail(tv, k, "expected a non-empty list");
                        for (size_t i = 0; i < tv.size(); ++i) {
                          auto ck = k + "[" + std::to_string(i) + "]";
                          CertConfig cert;
                          cert.where = r.where(tv[i], ck);
                          r.forEach(tv[i], ck, {"cert", "key"},
                                    [&](const std::string& kk, const YAML::Node& cv) {
                                      (kk.ends_with(".cert") ? cert.cert : cert.key) = file(cv, kk);
                                    });
                          if (cert.cert.empty() || cert.key.empty())
                            r.fail(tv[i], ck, "cert and key are required");
                          l.certificates.push_back(cert);
                        }
                      }
                    });
        } else if (key.ends_with(".routes")) {
          if (!v.IsSequence() || v.size() == 0) r.fail(v, key, "expected a non-empty list");
          for (size_t i = 0; i < v.size(); ++i) {
            auto rk = key + "[" + std::to_string(i) + "]";
            RouteConfig route;
            bool hasUpstream = false;
            r.forEach(
                v[i], rk, {"host", "path_prefix", "upstream"},
                [&](const std::string& k, const YAML::Node& rv) {
                  if (k.ends_with(".host")) {
                    auto given = r.str(rv, k);
                    route.host = given == "*" ? given : configHost(given);
                    if (route.host.empty())
                      r.fail(rv, k,
                             "'" + given + "': expected a host name without a port, *.domain or *");
                  } else if (k.ends_with(".path_prefix")) {
                    route.pathPrefix = r.str(rv, k);
                    if (!route.pathPrefix.starts_with('/')) r.fail(rv, k, "must start with /");
                  } else {
                    auto url = r.str(rv, k);
                    auto sep = url.find("://");
                    auto scheme = url.substr(0, sep);
                    if (sep == std::string::npos || (scheme != "http" && scheme != "https"))
                      r.fail(rv, k, "expected http://host:port or https://host:port");
                    route.upstreamTls = scheme == "https";
                    auto authority = url.substr(sep + 3);
                    // Not echoed: what comes before an @ is a user and a password.
                    if (authority.find('@') != std::string::npos)
                      r.fail(rv, k,
                             "credentials in the URL are not supported (the upstream sees "
                             "the agent's own Authorization)");
                    if (authority.ends_with('/')) authority.pop_back();
                    if (!parseAuthority(authority, route.upstreamTls ? 443 : 80,
                                        route.upstream.host, route.upstream.port))
                      r.fail(rv, k, "'" + url + "': expected scheme://host[:port], no path");
                    hasUpstream = true;
                  }
                });
            if (!hasUpstream) r.fail(v[i], rk + ".upstream", "required");
            l.routes.push_back(std::move(route));
          }
        } else if (key.ends_with(".max_connections")) {
          l.maxConnections = static_cast<uint32_t>(r.integer(v, key, 10'000'000));
          if (l.maxConnections == 0)
            r.fail(v, key, "must be at least 1 (0 would refuse every agent)");
        }
      });
  // A list that could only be ignored is refused, as an unknown key is: a forward listener
  // without interception tunnels every CONNECT blind already, and a reverse one has none.
  if (!l.passthrough.empty() && l.kind == "reverse")
    r.fail(passthroughNode, where + ".passthrough", "only for forward and transparent listeners");
  if (!l.passthrough.empty() && l.kind == "forward" && !l.interceptTls)
    r.fail(passthroughNode, where + ".passthrough",
           "does nothing without intercept_tls: true (every CONNECT is tunnelled blind)");
  if (l.kind == "reverse") {
    if (l.routes.empty()) r.fail(node, where + ".routes", "a reverse listener needs routes");
    if (l.interceptTls)
      r.fail(node, where + ".intercept_tls", "only for forward and transparent listeners");
  } else if (!l.routes.empty() || !l.certificates.empty() || !l.clientCa.empty()) {
    r.fail(node, where + (l.routes.empty() ? ".tls" : ".routes"), "only for reverse listeners");
  }
  if (!l.identityMtls.empty() && l.clientCa.empty())
    r.fail(node, where + ".identity.mtls", "needs tls.client_ca (and tls.certificates)");
  // Without a CA to check them against, no client certificate is asked for: the promise
  // of require_client_cert would be silently broken.
  if (requireSet && l.requireClientCert && l.clientCa.empty())
    r.fail(requireNode, where + ".tls.require_client_cert", "needs tls.client_ca");
  if (!l.clientCa.empty() && l.certificates.empty())
    r.fail(node, where + ".tls.client_ca", "needs tls.certificates");
  if (l.name.empty()) r.fail(node, where + ".name", "required");
  if (!hasAddress) r.fail(node, where + ".address", "required");
  if (l.name == "admin")
    r.fail(node, where + ".name", "'admin' is reserved for the admin listener");
  return l;
}

// The host a listener binds, for comparing two of them: localhost is 127.0.0.1.
std::string bindHost(const std::string& host) {
  return host == "localhost" ? "127.0.0.1" : host;
}

// Whether two listen addresses would take the same port (one of them on every address).
bool sameBind(const HostPort& a, const HostPort& b) {
  if (a.port == 0 || a.port != b.port) return false;
  auto x = bindHost(a.host), y = bindHost(b.host);
  bool v6x = x.find(':') != std::string::npos, v6y = y.find(':') != std::string::npos;
  return x == y || (v6x == v6y && (x == "0.0.0.0" || x == "::" || y == "0.0.0.0" || y == "::"));
}

Config read(const YAML::Node& root, const Reader& r) {
  Config c;
  YAML::Node hostsNode, adminNode,
      adminTokensNode;  // where they are, when given (for the errors below)
  bool hasAdminTokens = false;
  bool hasHosts = false;
  c.path = r.path();
  auto base = std::filesystem::path(r.path()).parent_path();
  // Like every path in the file, the default audit directory is the config file's.
  c.auditDir = (base / "var/audit").lexically_normal().string();
  c.tlsCaDir = (base / "var/ca").lexically_normal().string();
  if (root.IsNull()) r.fail(root, "(root)", "the file is empty");
  r.forEach(
      root, "",
      {"mode", "workers", "log", "listeners", "admin", "hosts", "limits", "timeouts", "policies",
       "store", "audit", "tls", "egress"},
      [&](const std::string& key, const YAML::Node& v) {
        if (key == "mode") {
          auto m = r.str(v, key);
          if (m != "enforce" && m != "observe") r.fail(v, key, "expected enforce or observe");
          c.observe = m == "observe";
        } else if (key == "workers") {
          c.workers = static_cast<unsigned>(r.integer(v, key, 256));
        } else if (key == "log") {
          r.forEach(v, key, {"level"}, [&](const std::string& k, const YAML::Node& lv) {
            if (!Log::parseLevel(r.str(lv, k), c.logLevel)) {
              r.fail(lv, k, "expected debug, info, warn or error");
            }
          });
        } else if (key == "listeners") {
          if (!v.IsSequence() || v.size() == 0) r.fail(v, key, "expected a non-empty list");
          for (size_t i = 0; i < v.size(); ++i) {
            c.listeners.push_back(readListener(r, v[i], key + "[" + std::to_string(i) + "]"));
            for (size_t j = 0; j + 1 < c.listeners.size(); ++j) {
              if (c.listeners[j].name == c.listeners.back().name) {
                r.fail(v[i], key + "[" + std::to_string(i) + "].name", "duplicate listener name");
              }
              const auto& a = c.listeners[j].address;
              const auto& b = c.listeners.back().address;
              if (sameBind(a, b)) {
                r.fail(v[i]["address"], key + "[" + std::to_string(i) + "].address",
                       "the address of listener '" + c.listeners[j].name + "'");
              }
            }
          }
        } else if (key == "admin") {
          r.forEach(v, key, {"address", "tokens"}, [&](const std::string& k, const YAML::Node& av) {
            if (k == "admin.tokens") {
              adminTokensNode = av;
              hasAdminTokens = true;
              for (auto& t : r.strings(av, k)) {
                if (!t.starts_with("sha256:") || t.size() != 71 ||
                    t.find_first_not_of("0123456789abcdef", 7) != std::string::npos) {
                  r.fail(av, k,
                         "tokens are stored hashed: sha256:<64 hex digits> (printf %s TOKEN | "
                         "sha256sum)");
                }
                c.adminTokens.push_back(t);
              }
              return;
            }
            c.admin = r.address(av, k);
            c.hasAdmin = true;
            adminNode = av;
          });
        } else if (key == "hosts") {
          r.forEach(v, key, {"allow", "deny"}, [&](const std::string& k, const YAML::Node& hv) {
            auto& list = k == "hosts.allow" ? c.allowHosts : c.denyHosts;
            for (const auto& given : r.strings(hv, k)) {
              // As a call's host is compared: no scheme, port or brackets (an entry such
              // as evil.example:443 would never match, and a deny would do nothing).
              auto host = given == "*" ? given : configHost(given);
              if (host.empty())
                r.fail(hv, k,
                       "'" + given +
                           "': expected a host name or IP address (no scheme or port), "
                           "*.domain for every name under it, or *");
              list.push_back(host);
            }
          });
          hostsNode = v;
          hasHosts = true;
        } else if (key == "egress") {
          r.forEach(v, key, {"deny_addresses"}, [&](const std::string& k, const YAML::Node& ev) {
            for (const auto& given : r.strings(ev, k)) {
              auto range = parseAddressRange(given);
              if (!range)
                r.fail(ev, k,
                       "'" + given +
                           "': expected an IPv4 or IPv6 address or network "
                           "(10.0.0.0/8, 169.254.169.254, fe80::/10)");
              else
                c.denyAddresses.push_back(*range);
            }
          });
        } else if (key == "limits") {
          r.forEach(v, key,
                    {"max_header_bytes", "max_headers", "max_uri_bytes", "max_body_bytes",
                     "write_watermark", "upstream_idle_per_host"},
                    [&](const std::string& k, const YAML::Node& lv) {
                      auto& L = c.limits;
                      // A head is held whole and indexed with 32-bit offsets: 64m is
                      // far past any real one, and 0 would refuse every request.
                      auto positive = [&](uint64_t value, uint64_t max) {
                        if (value == 0) r.fail(lv, k, "must be at least 1");
                        if (value > max) r.fail(lv, k, "at most " + std::to_string(max));
                        return value;
                      };
                      if (k == "limits.max_header_bytes")
                        L.maxHeaderBytes = positive(r.size(lv, k), 64ull << 20);
                      else if (k == "limits.max_headers")
                        L.maxHeaders =
                            static_cast<uint32_t>(positive(r.integer(lv, k, 10'000), 10'000));
                      else if (k == "limits.max_uri_bytes")
                        L.maxUriBytes = positive(r.size(lv, k), 64ull << 20);
                      else if (k == "limits.max_body_bytes")
                        L.maxBodyBytes = r.size(lv, k);
                      else if (k == "limits.write_watermark")
                        L.writeWatermark = r.size(lv, k);
                      else if (k == "limits.upstream_idle_per_host")
                        L.upstreamIdlePerHost = static_cast<uint32_t>(r.integer(lv, k, 1'000'000));
                    });
          if (c.limits.maxHeaderBytes < 256) r.fail(v, key + ".max_header_bytes", "at least 256");
          if (c.limits.writeWatermark < 4096) r.fail(v, key + ".write_watermark", "at least 4k");
        } else if (key == "timeouts") {
          std::map<std::string, Millis*> fields = {
              {"header_read", &c.timeouts.headerRead},
              {"idle", &c.timeouts.idle},
              {"upstream_connect", &c.timeouts.upstreamConnect},
              {"upstream_response", &c.timeouts.upstreamResponse},
              {"upstream_idle", &c.timeouts.upstreamIdle},
              {"tunnel_idle", &c.timeouts.tunnelIdle},
              {"dns_cache", &c.timeouts.dnsCache},
              {"shutdown", &c.timeouts.shutdown}};
          std::set<std::string> known;
          for (auto& f : fields) known.insert(f.first);
          r.forEach(v, key, known, [&](const std::string& k, const YAML::Node& tv) {
            auto d = r.duration(tv, k);
            auto name = k.substr(sizeof("timeouts.") - 1);
            if (d.count() == 0 && name != "dns_cache") r.fail(tv, k, "must be greater than 0");
            *fields[name] = d;
          });
        } else if (key == "policies") {
          for (auto& p : r.strings(v, key))
            c.policies.push_back((base / p).lexically_normal().string());
        } else if (key == "store") {
          std::optional<YAML::Node> urlsNode, passwordNode;
          r.forEach(v, key,
                    {"backend", "urls", "password_file", "timeout", "init_missing", "hold_ttl"},
                    [&](const std::string& k, const YAML::Node& sv) {
                      if (k == "store.backend") {
                        c.storeBackend = r.str(sv, k);
                        if (c.storeBackend != "memory" && c.storeBackend != "redis") {
                          r.fail(sv, k, "expected memory or redis");
                        }
                      } else if (k == "store.timeout") {
                        c.storeTimeout = r.duration(sv, k);
                        if (c.storeTimeout.count() == 0) r.fail(sv, k, "must be greater than 0");
                      } else if (k == "store.hold_ttl") {
                        c.storeHoldTtl = r.duration(sv, k);
                        if (c.storeHoldTtl.count() == 0) r.fail(sv, k, "must be greater than 0");
                      } else if (k == "store.init_missing") {
                        c.storeInitMissing = r.boolean(sv, k);
                      } else if (k == "store.password_file") {
                        passwordNode = sv;
                      } else {
                        c.storeUrls = r.strings(sv, k);
                        urlsNode = sv;
                      }
                    });
          if (passwordNode) {
            std::vector<std::string*> urls;
            for (auto& u : c.storeUrls) urls.push_back(&u);
            withPasswordFile(r, *passwordNode, key + ".password_file", base, urls);
          }
          if (urlsNode) {
            if (auto p = parseRedisUrls(c.storeUrls); !p)
              r.fail(*urlsNode, key + ".urls", p.error().message);
          }
          if (c.storeBackend == "redis" && c.storeUrls.empty())
            r.fail(v, key + ".urls", "required for the redis backend");
        } else if (key == "tls") {
          r.forEach(v, key, {"ca_dir", "upstream_ca_file", "leaf_cache_size"},
                    [&](const std::string& k, const YAML::Node& tv) {
                      if (k == "tls.ca_dir")
                        c.tlsCaDir = (base / r.str(tv, k)).lexically_normal().string();
                      else if (k == "tls.upstream_ca_file") {
                        c.tlsUpstreamCaFile = (base / r.str(tv, k)).lexically_normal().string();
                        c.tlsUpstreamCaFileWhere = r.where(tv, k);
                      } else
                        c.tlsLeafCacheSize = r.integer(tv, k, 10'000'000);
                      if (k == "tls.leaf_cache_size" && c.tlsLeafCacheSize == 0)
                        r.fail(tv, k, "must be greater than 0");
                    });
        } else if (key == "audit") {
          r.forEach(v, key,
                    {"dir", "sink", "checkpoint_every", "checkpoint_interval", "segment_size",
                     "segment_age", "sync_interval", "prefill", "direct_io", "replica", "export",
                     "redact_query_params"},
                    [&](const std::string& k, const YAML::Node& av) {
                      if (k == "audit.dir") {
                        c.auditDir = (base / r.str(av, k)).lexically_normal().string();
                      } else if (k == "audit.sink") {
                        c.auditSink = r.str(av, k);
                        if (c.auditSink != "file" && c.auditSink != "memory")
                          r.fail(av, k, "expected file or memory");
                      } else if (k == "audit.checkpoint_every") {
                        c.auditCheckpointEvery = r.integer(av, k, 1'000'000);
                        if (c.auditCheckpointEvery == 0) r.fail(av, k, "must be greater than 0");
                      } else if (k == "audit.checkpoint_interval") {
                        c.auditCheckpointInterval = r.duration(av, k);
                        if (c.auditCheckpointInterval.count() == 0)
                          r.fail(av, k, "must be greater than 0");
                      } else if (k == "audit.segment_size") {
                        c.auditSegmentSize = r.size(av, k);
                        if (c.auditSegmentSize < 4096) r.fail(av, k, "at least 4k");
                      } else if (k == "audit.prefill") {
                        c.auditPrefill = r.size(av, k);
                        if (c.auditPrefill > (1ull << 30)) r.fail(av, k, "at most 1g");
                      } else if (k == "audit.direct_io") {
                        c.auditDirectIo = r.boolean(av, k);
                      } else if (k == "audit.redact_query_params") {
                        for (auto& name : r.strings(av, k)) {
                          // Compared with the names as decoded: an encoded one never matches.
                          if (name.empty() || name.find_first_of("&=?# %+") != std::string::npos)
                            r.fail(av, k, "'" + name + "': expected a query parameter name, or *");
                          for (auto& ch : name)
                            ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
                          c.auditRedactQueryParams.push_back(std::move(name));
                        }
                      } else if (k == "audit.segment_age") {
                        c.auditSegmentAge = r.duration(av, k);
                        if (c.auditSegmentAge.count() < 1000) r.fail(av, k, "at least 1s");
                      } else if (k == "audit.replica") {
                        std::optional<YAML::Node> urlNode, passwordNode;
                        r.forEach(av, k, {"url", "password_file", "stream", "maxlen"},
                                  [&](const std::string& rk, const YAML::Node& rv) {
                                    if (rk == "audit.replica.url") {
                                      c.auditReplicaUrl = r.str(rv, rk);
                                      urlNode = rv;
                                    } else if (rk == "audit.replica.password_file") {
                                      passwordNode = rv;
                                    } else if (rk == "audit.replica.stream") {
                                      c.auditReplicaStream = r.str(rv, rk);
                                      if (c.auditReplicaStream.empty())
                                        r.fail(rv, rk, "must not be empty");
                                    } else {
                                      c.auditReplicaMaxlen = r.integer(rv, rk, 1ull << 40);
                                    }
                                  });
                        if (c.auditReplicaUrl.empty()) r.fail(av, k + ".url", "required");
                        if (passwordNode)
                          withPasswordFile(r, *passwordNode, k + ".password_file", base,
                                           {&c.auditReplicaUrl});
                        if (auto p = parseRedisUrl(c.auditReplicaUrl); !p)
                          r.fail(*urlNode, k + ".url", p.error().message);  // set: required
                      } else if (k == "audit.export") {
                        r.forEach(av, k, {"dir"}, [&](const std::string& ek, const YAML::Node& ev) {
                          c.auditExportDir = (base / r.str(ev, ek)).lexically_normal().string();
                        });
                        if (c.auditExportDir.empty()) r.fail(av, k + ".dir", "required");
                      } else {
                        c.auditSyncInterval = r.duration(av, k);
                        if (c.auditSyncInterval.count() > 1000) r.fail(av, k, "at most 1s");
                      }
                    });
        }
      });
  if (c.listeners.empty()) r.fail(root, "listeners", "at least one listener is required");
  if (hasHosts && !c.policies.empty())
    r.fail(hostsNode, "hosts",
           "has no effect with policies: (the policies decide every call): remove one of them");
  if (!c.hasAdmin && hasAdminTokens)
    r.fail(adminTokensNode, "admin.tokens",
           "no admin listener without admin.address: the tokens would guard nothing");
  if (c.hasAdmin) {
    for (const auto& l : c.listeners) {
      if (sameBind(c.admin, l.address))
        r.fail(adminNode, "admin.address", "the address of listener '" + l.name + "'");
    }
  }

  return c;
}

}  // namespace

Result<Config> parseConfig(const std::string& text, const std::string& path) {
  Reader reader(path);
  try {
    YAML::Node root = YAML::Load(text);
    return read(root, reader);
  } catch (const ConfigError& e) {
    return Error{-1, e.message};
  } catch (const YAML::Exception& e) {
    std::ostringstream out;
    out << path << ':' << e.mark.line + 1 << ':' << e.mark.column + 1 << ": (yaml): " << e.msg;
    return Error{-1, out.str()};
  }
}

Result<Config> loadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error{-1, path + ": cannot open the file"};
  std::stringstream text;
  text << in.rdbuf();
  return parseConfig(text.str(), path);
}

std::optional<AddressRange> parseAddressRange(const std::string& text) {
  AddressRange r;
  r.text = text;
  std::string address = text;
  std::optional<unsigned> prefix;
  if (auto slash = text.find('/'); slash != std::string::npos) {
    address = text.substr(0, slash);
    std::string digits = text.substr(slash + 1);
    if (digits.empty() || digits.size() > 3 ||
        digits.find_first_not_of("0123456789") != std::string::npos)
      return std::nullopt;
    prefix = static_cast<unsigned>(std::stoul(digits));
  }
  if (inet_pton(AF_INET, address.c_str(), r.bytes.data()) == 1) {
    r.family = AF_INET;
    r.prefix = prefix.value_or(32);
    if (r.prefix > 32) return std::nullopt;
  } else if (inet_pton(AF_INET6, address.c_str(), r.bytes.data()) == 1) {
    r.family = AF_INET6;
    r.prefix = prefix.value_or(128);
    if (r.prefix > 128) return std::nullopt;
    // ::ffff:a.b.c.d/N (and NAT64's 64:ff9b::a.b.c.d/N) names IPv4 addresses: kept as the
    // IPv4 range, which contains() meets in every form (an IPv6 range never met them).
    // Exactly /96 (::ffff:0:0/96, 64:ff9b::/96) keeps its IPv6 meaning: as an IPv4 range
    // it would be 0.0.0.0/0, every IPv4 address.
    if (r.prefix > 96 && embedsIpv4(r.bytes.data())) {
      std::memmove(r.bytes.data(), r.bytes.data() + 12, 4);
      r.family = AF_INET;
      r.prefix -= 96;
    }
  } else {
    return std::nullopt;
  }
  return r;
}

bool AddressRange::contains(const sockaddr_storage& address) const {
  const uint8_t* given = nullptr;
  if (address.ss_family == AF_INET && family == AF_INET) {
    given = reinterpret_cast<const uint8_t*>(
        &reinterpret_cast<const sockaddr_in*>(&address)->sin_addr.s_addr);
  } else if (address.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&address)->sin6_addr.s6_addr;
    if (family == AF_INET6)
      given = v6;
    else if (embedsIpv4(v6))
      given = v6 + 12;  // ::ffff:a.b.c.d reaches a.b.c.d, and 64:ff9b::a.b.c.d through NAT64
  }
  if (!given) return false;
  unsigned full = prefix / 8, rest = prefix % 8;
  if (std::memcmp(given, bytes.data(), full) != 0) return false;
  if (rest == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (given[full] & mask) == (bytes[full] & mask);
}

}  // namespace tollgate
