// Helpers for the certs tests: verifying a leaf against a CA the way a TLS client does.
#pragma once

#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <string>

#include "certs/local_ca.h"

namespace tollgate::testing {

// X509_verify_cert of `leaf` against `ca` alone, as a TLS client checking a server for
// `host` at time `at`; the verify error (X509_V_OK when it verifies).
inline int verifyLeaf(X509* ca, X509* leaf, const std::string& host, CertClock::time_point at) {
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca);
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, leaf, nullptr);
  X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER);
  X509_STORE_CTX_set_time(ctx, 0, CertClock::to_time_t(at));
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx);
  if (X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) != 1)
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), host.size());
  int rc = X509_verify_cert(ctx);
  int error = X509_STORE_CTX_get_error(ctx);
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  return rc == 1 ? X509_V_OK : (error == X509_V_OK ? -1 : error);
}

}  // namespace tollgate::testing
