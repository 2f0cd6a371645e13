#include "proxy/tls.h"

#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>

#include "certs/openssl_error.h"
#include "common/log.h"
#include "policy/tool_call.h"
#include "proxy/resolver.h"

namespace tollgate {
namespace {

// Called during the ClientHello: an SNI that names another host than the CONNECT gets a leaf
// for what it names (so the agent's TLS completes and it can be told why it is halted), and
// the mismatch is noted for the session.
int onServerName(SSL* ssl, int* alert, void*) {
  auto* state = static_cast<InterceptTls*>(SSL_get_app_data(ssl));
  if (!state) return SSL_TLSEXT_ERR_OK;
  const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  if (!name || !*name) return SSL_TLSEXT_ERR_OK;
  std::string sni(name);
  for (auto& c : sni) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (sni.ends_with('.')) sni.pop_back();
  state->sni = sni;
  if (sni == state->host) return SSL_TLSEXT_ERR_OK;
  state->sniMismatch = true;
  auto ctx = state->leaves->serverContext(sni);
  if (!ctx || SSL_set_SSL_CTX(ssl, ctx.value().get()) == nullptr) {
    state->error = ctx ? "cannot present a leaf for " + sni : ctx.error().message;
    *alert = SSL_AD_UNRECOGNIZED_NAME;
    return SSL_TLSEXT_ERR_ALERT_FATAL;
  }
  return SSL_TLSEXT_ERR_OK;
}

// The pool key ("host:port") of an upstream SSL, freed with it.
int upstreamKeyIndex() {
  static const int index = SSL_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<std::string*>(ptr);
      });
  return index;
}

// The system's trust store, as OpenSSL was built to find it, without the SSL_CERT_FILE and
// SSL_CERT_DIR that SSL_CTX_set_default_verify_paths() honours: those are the agents' (they
// are told to put the local CA there), and the sidecar may share their environment.
bool loadSystemTrust(SSL_CTX* ctx) {
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  X509_LOOKUP* file = X509_STORE_add_lookup(store, X509_LOOKUP_file());
  X509_LOOKUP* dir = X509_STORE_add_lookup(store, X509_LOOKUP_hash_dir());
  if (!file || !dir) return false;
  (void)X509_LOOKUP_load_file(file, X509_get_default_cert_file(), X509_FILETYPE_PEM);  // may lack
  bool ok = X509_LOOKUP_add_dir(dir, X509_get_default_cert_dir(), X509_FILETYPE_PEM) == 1;
  ERR_clear_error();
  return ok;
}

std::string fmtMode(unsigned mode) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", mode);
  return buf;
}

}  // namespace

int TlsContexts::verifyUpstream(int ok, X509_STORE_CTX* store) {
  auto* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* t = ssl ? static_cast<TlsContexts*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl))) : nullptr;
  X509* cert = X509_STORE_CTX_get_current_cert(store);
  if (t && t->ownCaKey_ && cert && EVP_PKEY_eq(X509_get0_pubkey(cert), t->ownCaKey_) == 1) {
    X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  return ok;
}

Result<std::unique_ptr<TlsContexts>> TlsContexts::create(const Config& config) {
  std::unique_ptr<TlsContexts> t(new TlsContexts);
  // Upstreams: every https:// call is verified, whichever listener it came from.
  t->upstreamClient_ = SSL_CTX_new(TLS_client_method());
  if (!t->upstreamClient_) return Error{-1, "SSL_CTX: " + takeOpenSslErrors()};
  SSL_CTX_set_min_proto_version(t->upstreamClient_, TLS1_2_VERSION);
  SSL_CTX_set_verify(t->upstreamClient_, SSL_VERIFY_PEER, verifyUpstream);
  SSL_CTX_set_options(t->upstreamClient_, SSL_OP_NO_RENEGOTIATION);
  static const unsigned char kHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(t->upstreamClient_, kHttp11, sizeof kHttp11);
  // Sessions are kept here, by name and port, not in OpenSSL's cache (which is by session id).
  SSL_CTX_set_session_cache_mode(t->upstreamClient_,
                                 SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_set_app_data(t->upstreamClient_, t.get());
  SSL_CTX_sess_set_new_cb(t->upstreamClient_, onNewSession);
  (void)upstreamKeyIndex();
  if (!config.tlsUpstreamCaFile.empty()) {
    if (SSL_CTX_load_verify_locations(t->upstreamClient_, config.tlsUpstreamCaFile.c_str(),
                                      nullptr) != 1) {
      return Error{-1, config.tlsUpstreamCaFileWhere + ": cannot load " + config.tlsUpstreamCaFile +
                           ": " + takeOpenSslErrors()};
    }
  } else if (!loadSystemTrust(t->upstreamClient_)) {
    return Error{-1, "the system's trust store: " + takeOpenSslErrors()};
  }

  for (const auto& l : config.listeners) {
    if (l.certificates.empty()) continue;
    auto lt = std::make_unique<ListenerTls>();
    lt->listener = l.name;
    for (const auto& c : l.certificates) {
      SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
      if (!ctx) return Error{-1, "SSL_CTX: " + takeOpenSslErrors()};
      lt->contexts.push_back(ctx);
      if (auto st = configureServerContext(ctx); !st) return st.error();
      if (SSL_CTX_use_certificate_chain_file(ctx, c.cert.c_str()) != 1 ||
          SSL_CTX_use_PrivateKey_file(ctx, c.key.c_str(), SSL_FILETYPE_PEM) != 1 ||
          SSL_CTX_check_private_key(ctx) != 1) {
        return Error{
            -1, c.where + ": cannot load " + c.cert + " / " + c.key + ": " + takeOpenSslErrors()};
      }
      std::string context = "tollgate-" + l.name;
      SSL_CTX_set_session_id_context(ctx, reinterpret_cast<const unsigned char*>(context.data()),
                                     static_cast<unsigned>(std::min<size_t>(context.size(), 32)));
      if (!l.clientCa.empty()) {
        STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(l.clientCa.c_str());
        if (!names || SSL_CTX_load_verify_locations(ctx, l.clientCa.c_str(), nullptr) != 1) {
          if (names) sk_X509_NAME_pop_free(names, X509_NAME_free);
          return Error{
              -1, l.clientCaWhere + ": cannot load " + l.clientCa + ": " + takeOpenSslErrors()};
        }
        SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(
            ctx, SSL_VERIFY_PEER | (l.requireClientCert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
            nullptr);
      }
    }
    SSL_CTX_set_tlsext_servername_callback(lt->contexts.front(), selectBySni);
    SSL_CTX_set_tlsext_servername_arg(lt->contexts.front(), lt.get());
    t->listenerTls_.push_back(std::move(lt));
  }

  bool intercepts = false;
  for (const auto& l : config.listeners) intercepts |= l.interceptTls;
  if (!intercepts) return t;
  auto ca = LocalCa::load(config.tlsCaDir);
  if (!ca) {
    return Error{-1, config.path + ": tls.ca_dir: " + ca.error().message +
                         " (a listener has intercept_tls; create the CA with `tollgate certs "
                         "init " +
                         config.tlsCaDir + "`)"};
  }
  LeafCache::Options options;
  options.capacity = config.tlsLeafCacheSize;
  options.configureContext = [](SSL_CTX* ctx) {
    static const unsigned char kContext[] = "tollgate-intercept";
    SSL_CTX_set_session_id_context(ctx, kContext, sizeof kContext - 1);
    SSL_CTX_set_tlsext_servername_callback(ctx, onServerName);
    // One TLS 1.3 ticket (OpenSSL sends two): an agent can resume, and a full handshake
    // does not pay for a second ticket it may never use.
    SSL_CTX_set_num_tickets(ctx, 1);
  };
  if (struct stat st;
      ::stat((config.tlsCaDir + "/ca.key").c_str(), &st) == 0 && (st.st_mode & 077)) {
    // Whoever reads it can mint certificates every agent trusts (a secret volume mounted
    // with its default mode 0644, say): said, not refused.
    Log::Line(LogLevel::kWarn, "the local CA's private key is readable by others than its owner")
        .add("path", config.tlsCaDir + "/ca.key")
        .add("mode", fmtMode(st.st_mode & 0777))
        .emit();
  }
  t->ownCaKey_ = X509_get_pubkey(ca.value().certificate());
  auto leaves = LeafCache::create(std::make_shared<const LocalCa>(std::move(ca.value())), options);
  if (!leaves) return leaves.error();
  t->leaves_ = std::move(leaves.value());
  return t;
}

TlsContexts::~TlsContexts() {
  EVP_PKEY_free(ownCaKey_);
  for (auto& [key, session] : sessions_) SSL_SESSION_free(session);
  SSL_CTX_free(upstreamClient_);
}

SSL_CTX* TlsContexts::listenerServer(const std::string& listener) const {
  for (const auto& lt : listenerTls_)
    if (lt->listener == listener) return lt->contexts.front();
  return nullptr;
}

int TlsContexts::selectBySni(SSL* ssl, int*, void* arg) {
  auto* lt = static_cast<ListenerTls*>(arg);
  const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  if (!name || lt->contexts.size() == 1) return SSL_TLSEXT_ERR_OK;  // the first certificate
  for (auto* ctx : lt->contexts) {
    X509* cert = SSL_CTX_get0_certificate(ctx);
    if (cert && X509_check_host(cert, name, 0, 0, nullptr) == 1) {
      if (ctx != SSL_get_SSL_CTX(ssl)) SSL_set_SSL_CTX(ssl, ctx);
      break;
    }
  }
  return SSL_TLSEXT_ERR_OK;
}

void prepareIntercept(SSL* ssl, InterceptTls* state) {
  SSL_set_app_data(ssl, state);
}

Status prepareUpstream(SSL* ssl, std::string_view host) {
  std::string name(host);
  sockaddr_storage ss;
  if (Resolver::parseLiteral(name, ss)) {
    if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name.c_str()) != 1)
      return Error{-1, "upstream " + name + ": " + takeOpenSslErrors()};
    return Status::success();
  }
  SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  if (SSL_set_tlsext_host_name(ssl, name.c_str()) != 1 || SSL_set1_host(ssl, name.c_str()) != 1)
    return Error{-1, "upstream " + name + ": " + takeOpenSslErrors()};
  return Status::success();
}

int TlsContexts::onNewSession(SSL* ssl, SSL_SESSION* session) {
  auto* self = static_cast<TlsContexts*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  auto* key = static_cast<std::string*>(SSL_get_ex_data(ssl, upstreamKeyIndex()));
  if (!self || !key || !SSL_SESSION_is_resumable(session)) return 0;
  // A copy: OpenSSL marks a connection's own session not resumable when the connection ends
  // without close_notify (an upstream that just closes), which would spoil the kept one.
  SSL_SESSION* copy = SSL_SESSION_dup(session);
  if (!copy) return 0;
  std::lock_guard lock(self->sessionsMu_);
  auto it = self->sessions_.find(*key);
  if (it != self->sessions_.end()) {
    SSL_SESSION_free(it->second);
    it->second = copy;
  } else {
    if (self->sessions_.size() >= kMaxSessions) {
      SSL_SESSION_free(self->sessions_.begin()->second);
      self->sessions_.erase(self->sessions_.begin());
    }
    self->sessions_.emplace(*key, copy);
  }
  return 0;  // OpenSSL keeps its own reference
}

Status TlsContexts::prepareUpstream(SSL* ssl, const std::string& host, uint16_t port) {
  if (auto s = tollgate::prepareUpstream(ssl, host); !s) return s;
  auto* key = new std::string(host + ":" + std::to_string(port));
  SSL_set_ex_data(ssl, upstreamKeyIndex(), key);
  SSL_SESSION* copy = nullptr;
  {
    std::lock_guard lock(sessionsMu_);
    if (auto it = sessions_.find(*key); it != sessions_.end()) copy = SSL_SESSION_dup(it->second);
  }
  if (copy) {
    SSL_set_session(ssl, copy);  // takes its own reference
    SSL_SESSION_free(copy);
  }
  return Status::success();
}

bool hostMatches(const std::vector<std::string>& patterns, std::string_view given) {
  // In canonical form, as the entries are (configHost()): [2001:db8:0::1] is 2001:db8::1.
  auto canonical = Extractor::canonicalHost(given);
  std::string_view host = canonical ? std::string_view(canonical.value()) : given;
  for (const auto& p : patterns) {
    if (p.starts_with("*.")) {
      auto domain = std::string_view(p).substr(1);  // ".domain"
      if (host.size() > domain.size() && host.ends_with(domain)) return true;
    } else if (host == p) {
      return true;
    }
  }
  return false;
}

}  // namespace tollgate
