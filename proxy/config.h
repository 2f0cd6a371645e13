// Config: the sidecar's configuration (DESIGN §9), loaded once at start into an immutable
// object that every worker shares. Every error names the file, line, column and key.
#pragma once

#include <sys/socket.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/result.h"
#include "common/units.h"

namespace tollgate {

using Millis = std::chrono::milliseconds;

// A reverse listener's route: requests for `host` (exact, "*.domain", or "*") whose path
// starts with `pathPrefix` go to `upstream`.
struct RouteConfig {
  std::string host = "*";
  std::string pathPrefix = "/";
  bool upstreamTls = false;  // https://
  HostPort upstream;
};

// An IPv4 or IPv6 network ("10.0.0.0/8", "169.254.169.254", "fe80::/10"): egress.deny_addresses.
struct AddressRange {
  int family = 0;  // AF_INET or AF_INET6
  std::array<uint8_t, 16> bytes{};
  unsigned prefix = 0;
  std::string text;  // as written
  // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it maps.
  bool contains(const sockaddr_storage& address) const;
};
std::optional<AddressRange> parseAddressRange(const std::string& text);

struct CertConfig {
  std::string cert;  // PEM: the certificate, then its chain
  std::string key;
  std::string where;  // "FILE:LINE:COL: key", for the errors of loading them
};

struct ListenerConfig {
  std::string name;
  std::string kind = "forward";
  HostPort address;
  // Agent identity, one source per listener; without one every call is "anonymous".
  std::string identityHeader;                         // identity: {header: X-Agent-Id}
  bool identityProxyBasic = false;                    // identity: {proxy_basic: true} (the user)
  std::map<std::string, std::string> identitySource;  // identity: {source: {IP: agent}}
  std::string identityMtls;  // identity: {mtls: subject_cn | san_uri} (reverse, with client_ca)
  std::map<std::string, std::string> identityBearer;  // identity: {bearer: {sha256:<hex>: agent}}
  bool interceptTls = false;
  // kind: reverse
  std::vector<CertConfig> certificates;  // tls.certificates, chosen by SNI; none: plain HTTP
  std::string clientCa;                  // tls.client_ca: agents present certificates it signed
  std::string clientCaWhere;             // "FILE:LINE:COL: key" of client_ca
  bool requireClientCert = true;         // tls.require_client_cert (with client_ca)
  std::vector<RouteConfig> routes;
  // CONNECT to these hosts is tunnelled blind even with intercept_tls ("*.d": names under d).
  std::vector<std::string> passthrough;
  uint32_t maxConnections = 10000;
};

struct LimitsConfig {
  uint64_t maxHeaderBytes = 32 * 1024;
  uint32_t maxHeaders = 100;
  uint64_t maxUriBytes = 8 * 1024;
  uint64_t maxBodyBytes = 0;  // 0: unlimited
  uint64_t writeWatermark = 256 * 1024;
  // Idle upstream connections kept per worker and upstream (host:port, TLS apart); more are
  // closed. Below the calls in flight to one upstream, connections churn: each new one
  // costs a TCP (and TLS) handshake and leaves a TIME_WAIT.
  uint32_t upstreamIdlePerHost = 1024;
};

struct TimeoutsConfig {
  Millis headerRead{10'000};
  Millis idle{60'000};
  Millis upstreamConnect{5'000};
  Millis upstreamResponse{30'000};
  Millis upstreamIdle{30'000};
  Millis dnsCache{5'000};
  Millis tunnelIdle{3'600'000};  // a tunnel (CONNECT, WebSocket) with no byte either way
  Millis shutdown{10'000};
};

struct Config {
  std::string path;  // the file it came from
  bool observe = false;
  unsigned workers = 0;  // 0: one per core
  LogLevel logLevel = LogLevel::kInfo;
  std::vector<ListenerConfig> listeners;
  bool hasAdmin = false;
  HostPort admin;
  std::vector<std::string> adminTokens;  // "sha256:<hex>" of the bearer tokens
  std::vector<std::string> allowHosts;
  std::vector<std::string> denyHosts;
  std::vector<std::string> policies;  // resolved against the config file's directory
  std::string storeBackend = "memory";
  std::vector<std::string> storeUrls;
  Millis storeTimeout{100};
  Millis storeHoldTtl{120'000};  // a hold not settled by then is committed
  bool storeInitMissing = false;
  std::string auditDir = "var/audit";
  std::string auditSink = "file";  // or "memory": not durable, development and benchmarks only
  uint64_t auditCheckpointEvery = 1000;
  Millis auditCheckpointInterval{5000};
  uint64_t auditSegmentSize = 64ull << 20;
  Millis auditSyncInterval{0};         // at most one fsync per interval (0: no cap)
  uint64_t auditPrefill = 1ull << 20;  // blanks written ahead of the records (0: appends)
  bool auditDirectIo = true;           // batches with O_DIRECT + RWF_DSYNC (with prefill)
  Millis auditSegmentAge{3'600'000};
  std::string auditReplicaUrl;  // redis://HOST:PORT, empty: no replica
  std::string auditReplicaStream = "tollgate:audit:{log_id}";
  uint64_t auditReplicaMaxlen = 0;
  std::string auditExportDir;  // empty: no export
  // Query parameters recorded as REDACTED besides the built-in credential names
  // (redactQuery); "*": every parameter.
  std::vector<std::string> auditRedactQueryParams;
  std::string tlsCaDir;                // the local CA interception mints from (tls.ca_dir)
  std::string tlsUpstreamCaFile;       // empty: the system's trust store
  std::string tlsUpstreamCaFileWhere;  // "FILE:LINE:COL: key" of it
  uint64_t tlsLeafCacheSize = 10'000;
  LimitsConfig limits;
  TimeoutsConfig timeouts;
  // Addresses no upstream connection goes to, whatever name led there (a DNS name of the
  // metadata service, an IP-literal form a host rule did not foresee).
  std::vector<AddressRange> denyAddresses;
};

Result<Config> loadConfig(const std::string& path);
// Parses YAML text; `path` is used in error messages and to resolve relative paths.
Result<Config> parseConfig(const std::string& text, const std::string& path);

}  // namespace tollgate
