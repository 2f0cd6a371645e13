// LocalCa: the operator's local certificate authority for TLS interception (DESIGN §1). It
// owns an ECDSA P-256 key and a self-signed CA certificate, optionally name-constrained to
// the hosts the operator permits, and signs the short-lived leaf certificates that the proxy
// presents to agents. `tollgate certs init DIR` creates one (DIR/ca.key, DIR/ca.crt); the
// sidecar loads it with LocalCa::load and mints through LeafCache (certs/leaf_cache.h).
//
// A LocalCa is immutable after creation, so one instance may be shared by every worker
// thread (signing with a shared EVP_PKEY is thread-safe in OpenSSL 3).
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace tollgate {

struct EvpPkeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
struct X509Free {
  void operator()(X509* cert) const { X509_free(cert); }
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;

using CertClock = std::chrono::system_clock;

// A fresh ECDSA P-256 key pair.
Result<EvpPkeyPtr> generateP256Key();

// PEM text of a certificate, and of a private key (PKCS#8, unencrypted).
std::string certificateToPem(X509* cert);
std::string privateKeyToPem(EVP_PKEY* key);

// "SHA256:AB:CD:…" of the certificate's DER, as `openssl x509 -fingerprint -sha256` prints.
std::string certificateFingerprint(X509* cert);

// A host a leaf can be minted for: a DNS name (lowercase, no trailing dot, at most 253
// characters, labels of letters, digits, '-' and '_') or an IP literal (IPv4, or IPv6 with
// or without brackets, kept in the canonical text form). `name` is the cache key.
struct LeafHost {
  std::string name;
  bool isIp = false;
  std::vector<unsigned char> ipBytes;  // 4 or 16 bytes when isIp
};
Result<LeafHost> parseLeafHost(std::string_view host);

// One permitted subtree of the CA's name constraints, parsed from an operator's --permit:
// "example.com" (that name and every name under it), ".internal" (every name under it, not
// the name itself), "10.0.0.0/8", "fd00::/8" or a single address.
struct PermittedName {
  bool isIp = false;
  std::string dns;                      // lowercase, when !isIp
  std::vector<unsigned char> ip, mask;  // 4 or 16 bytes each, when isIp
  std::string text() const;
};
Result<PermittedName> parsePermittedName(std::string_view text);

class LocalCa {
 public:
  struct Options {
    std::string commonName = "Tollgate local CA";
    // Empty: no name constraints. Otherwise the CA may only sign for these names; the name
    // type (DNS or IP) that has no entry here is excluded entirely, so a CA limited to
    // example.com cannot vouch for any IP address either.
    std::vector<PermittedName> permitted;
    std::chrono::hours validity{24 * 3650};
    CertClock::time_point now = CertClock::now();
  };

  // Generates the key and the self-signed certificate.
  static Result<LocalCa> create(const Options& options);
  // Reads DIR/ca.crt and DIR/ca.key (written by write()); checks they belong together.
  static Result<LocalCa> load(const std::string& dir);

  // Writes DIR/ca.key (0600) and DIR/ca.crt (0644) into DIR (created 0700). Refuses when
  // either file exists unless `force`; each file is written whole then renamed into place.
  Status write(const std::string& dir, bool force) const;

  X509* certificate() const { return cert_.get(); }
  EVP_PKEY* key() const { return key_.get(); }
  const std::vector<PermittedName>& permitted() const { return permitted_; }

  // Whether the name constraints allow `host` (true when the CA has none). Mirrors what
  // a verifier does with the constraints, so the proxy can refuse before it signs.
  bool permits(const LeafHost& host) const;

  struct LeafOptions {
    CertClock::time_point now = CertClock::now();
    std::chrono::seconds lifetime = std::chrono::hours(24);
    std::chrono::seconds backdate = std::chrono::hours(1);  // clock skew between hosts
  };
  // Signs a leaf for `host` with the public half of `leafKey`: SAN = the DNS name or IP,
  // EKU serverAuth, CA:FALSE, a random 128-bit serial, valid from now-backdate to
  // now+lifetime. Does NOT check permits(): callers that serve traffic go through
  // LeafCache, which does; this is the raw signing step (tests mint forbidden names here).
  Result<X509Ptr> signLeaf(const LeafHost& host, EVP_PKEY* leafKey,
                           const LeafOptions& options) const;

 private:
  LocalCa(EvpPkeyPtr key, X509Ptr cert, std::vector<PermittedName> permitted)
      : key_(std::move(key)), cert_(std::move(cert)), permitted_(std::move(permitted)) {}

  EvpPkeyPtr key_;
  X509Ptr cert_;
  std::vector<PermittedName> permitted_;
};

}  // namespace tollgate
