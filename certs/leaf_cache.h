// LeafCache: leaf certificates for intercepted TLS, minted on demand from the LocalCa for the
// SNI (or CONNECT host) and kept in a bounded LRU cache shared by every worker thread, so a
// repeat host costs a lookup, not a signature.
//
// All leaves share one ECDSA P-256 key, generated when the cache is created and kept only in
// memory. A leaf lives `lifetime` (24h) with notBefore backdated (1h) for clock skew; an
// entry within `renewBefore` of its notAfter is minted again on its next use (meanwhile the
// still-valid old leaf keeps being served to other threads).
//
// How the proxy uses it (the wiring is the proxy's, certs/ knows nothing of it): one
// LeafCache created at startup from LocalCa::load(dir), shared by every worker, with
// Options::configureContext installing the proxy's servername callback on each leaf's
// SSL_CTX. An intercepted connection's SSL is made from serverContext(host) of the CONNECT
// host; an SNI naming another host switches it with SSL_set_SSL_CTX in that callback.
// A host the CA's name constraints do not permit is an error here: the proxy should then
// refuse the interception (a halt with a reason), not present a certificate agents reject.
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "certs/local_ca.h"
#include "common/result.h"

namespace tollgate {

using SslCtxPtr = std::shared_ptr<SSL_CTX>;

// One minted leaf: certificate, the shared key, the issuing CA (the chain), and the server
// SSL_CTX built from them on first use. Immutable once built; shared by the cache and every
// connection that uses it.
class Leaf {
 public:
  // `configure` (may be empty) is applied to the SSL_CTX once it is built.
  Leaf(std::string host, X509Ptr cert, EVP_PKEY* key, X509* issuer,
       std::function<void(SSL_CTX*)> configure = {});
  ~Leaf();
  Leaf(const Leaf&) = delete;
  Leaf& operator=(const Leaf&) = delete;

  const std::string& host() const { return host_; }
  X509* certificate() const { return cert_.get(); }
  EVP_PKEY* key() const { return key_; }
  X509* issuer() const { return issuer_; }
  CertClock::time_point notBefore() const { return notBefore_; }
  CertClock::time_point notAfter() const { return notAfter_; }

  // A server SSL_CTX for this host: min TLS 1.2, ALPN selects http/1.1, chain leaf + CA.
  // Built once (thread-safe), then the same context is returned.
  Result<SslCtxPtr> sslContext() const;

 private:
  std::string host_;
  X509Ptr cert_;
  EVP_PKEY* key_;  // one reference held
  X509* issuer_;   // one reference held
  CertClock::time_point notBefore_, notAfter_;
  std::function<void(SSL_CTX*)> configure_;
  mutable std::once_flag ctxOnce_;
  mutable SslCtxPtr ctx_;
  mutable std::string ctxError_;
};

using LeafPtr = std::shared_ptr<const Leaf>;

// A server SSL_CTX with `leaf`'s certificate, key and chain (what Leaf::sslContext caches).
Result<SslCtxPtr> makeServerContext(const Leaf& leaf);
// What every intercepting server context has: TLS 1.2+, no renegotiation, ALPN http/1.1.
Status configureServerContext(SSL_CTX* ctx);
// Sessions a server context keeps for resumption without tickets, at most.
inline constexpr long kServerSessionCache = 4096;

class LeafCache {
 public:
  struct Options {
    size_t capacity = 10000;
    std::chrono::seconds lifetime = std::chrono::hours(24);
    std::chrono::seconds backdate = std::chrono::hours(1);
    std::chrono::seconds renewBefore = std::chrono::hours(1);
    std::function<CertClock::time_point()> clock = [] { return CertClock::now(); };
    // Applied to each leaf's server SSL_CTX when it is built (the proxy's callbacks): a
    // connection then starts from its host's ready context, with nothing set per SSL.
    std::function<void(SSL_CTX*)> configureContext;
  };

  // Generates the shared leaf key.
  static Result<std::unique_ptr<LeafCache>> create(std::shared_ptr<const LocalCa> ca,
                                                   Options options);
  static Result<std::unique_ptr<LeafCache>> create(std::shared_ptr<const LocalCa> ca) {
    return create(std::move(ca), Options());
  }

  // The leaf for `host` (a DNS name or IP literal, see parseLeafHost), from the cache or
  // minted now. Errors: an invalid host, a host the CA does not permit, a signing failure.
  // Concurrent misses on one host wait for a single signing.
  Result<LeafPtr> get(std::string_view host);
  // get(host)->sslContext(): the ready server SSL_CTX for the SNI callback.
  Result<SslCtxPtr> serverContext(std::string_view host);

  EVP_PKEY* leafKey() const { return key_.get(); }
  const LocalCa& ca() const { return *ca_; }
  size_t size() const;
  uint64_t signings() const { return signings_.load(std::memory_order_relaxed); }
  uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }

 private:
  LeafCache(std::shared_ptr<const LocalCa> ca, Options options, EvpPkeyPtr key)
      : ca_(std::move(ca)), options_(std::move(options)), key_(std::move(key)) {}

  Result<LeafPtr> mint(const LeafHost& host);

  struct Entry {
    LeafPtr leaf;                                 // null until the first mint lands
    std::shared_future<Result<LeafPtr>> pending;  // valid while a mint is in flight
    uint64_t generation = 0;                      // which mint owns `pending`
    std::list<std::string>::iterator lru;
  };

  std::shared_ptr<const LocalCa> ca_;
  Options options_;
  EvpPkeyPtr key_;
  mutable std::mutex mu_;
  std::list<std::string> lru_;  // front = most recently used
  std::unordered_map<std::string, Entry> entries_;
  uint64_t nextGeneration_ = 0;
  std::atomic<uint64_t> signings_{0}, hits_{0};
};

}  // namespace tollgate
