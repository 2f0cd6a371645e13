// TLS as the proxy speaks it, built once at start and shared by every worker:
//   - interception: a server context without a certificate of its own; each connection gets
//     the leaf minted for the CONNECT host (LeafCache), and a servername callback notes an
//     SNI that names another host (domain fronting: the session halts it);
//   - upstreams: a client context that verifies the chain (the system's trust store or
//     tls.upstream_ca_file) and, per connection, the host name or IP the call was for.
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "certs/leaf_cache.h"
#include "common/result.h"
#include "proxy/config.h"

namespace tollgate {

class TlsContexts {
 public:
  // Loads the local CA when a listener intercepts; errors name the config key.
  static Result<std::unique_ptr<TlsContexts>> create(const Config& config);
  ~TlsContexts();
  TlsContexts(const TlsContexts&) = delete;
  TlsContexts& operator=(const TlsContexts&) = delete;

  // The leaves of intercepted connections; null when no listener intercepts.
  // A reverse listener's server context (its certificates by SNI, mTLS); null: plain HTTP.
  SSL_CTX* listenerServer(const std::string& listener) const;
  LeafCache* leaves() const { return leaves_.get(); }
  SSL_CTX* upstreamClient() const { return upstreamClient_; }
  // prepareUpstream() for host:port, plus the TLS session kept from an earlier connection
  // to the same name and port, so a new upstream connection resumes (no key exchange or
  // chain verification again; the session was verified for that name).
  Status prepareUpstream(SSL* ssl, const std::string& host, uint16_t port);

 private:
  TlsContexts() = default;
  // One context per certificate; the first answers every ClientHello and its servername
  // callback switches to the one whose names cover the SNI.
  struct ListenerTls {
    ListenerTls() = default;
    ListenerTls(const ListenerTls&) = delete;
    ListenerTls& operator=(const ListenerTls&) = delete;
    ~ListenerTls() {
      for (auto* ctx : contexts) SSL_CTX_free(ctx);
    }
    std::string listener;
    std::vector<SSL_CTX*> contexts;
  };
  static int selectBySni(SSL* ssl, int* alert, void* arg);
  // Refuses an upstream chain that runs through the local CA (by its key), however it came
  // to be trusted: that CA is the agents' to trust, never the sidecar's.
  static int verifyUpstream(int ok, X509_STORE_CTX* store);
  static int onNewSession(SSL* ssl, SSL_SESSION* session);
  // Upstream sessions by "host:port", bounded; taken by any worker.
  static constexpr size_t kMaxSessions = 10'000;
  std::mutex sessionsMu_;
  std::unordered_map<std::string, SSL_SESSION*> sessions_;
  std::vector<std::unique_ptr<ListenerTls>> listenerTls_;
  SSL_CTX* upstreamClient_ = nullptr;
  std::unique_ptr<LeafCache> leaves_;
  EVP_PKEY* ownCaKey_ = nullptr;  // the local CA's public key (with leaves_)
};

// The state of one intercepted handshake, the servername callback's app data.
struct InterceptTls {
  LeafCache* leaves = nullptr;
  std::string host;  // the CONNECT host: the leaf presented unless the SNI names another
  std::string sni;   // what the agent sent, empty without SNI
  bool sniMismatch = false;
  std::string error;  // a leaf that could not be minted
};

// Hooks the servername callback of `ssl` (made from the leaf context of state->host) to
// `state`, which must outlive the handshake.
void prepareIntercept(SSL* ssl, InterceptTls* state);
// SNI (names only, never IPs) and the name the upstream's certificate must carry.
Status prepareUpstream(SSL* ssl, std::string_view host);

// Whether `host` matches one of `patterns` ("name" exactly, "*.domain" every name under it).
bool hostMatches(const std::vector<std::string>& patterns, std::string_view host);

}  // namespace tollgate
