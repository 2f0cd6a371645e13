#include "certs/leaf_cache.h"

#include <openssl/err.h>

#include <ctime>

#include "certs/openssl_error.h"

namespace tollgate {
namespace {

CertClock::time_point asTimePoint(const ASN1_TIME* time) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(time, &tm) != 1) return {};
  return CertClock::from_time_t(timegm(&tm));
}

// The proxy speaks HTTP/1.1 to agents: pick it when offered; otherwise no ALPN at all (the
// client then decides whether it can go on without h2).
int selectHttp11(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                 unsigned int inlen, void*) {
  static const unsigned char kHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, outlen, kHttp11, sizeof kHttp11, in, inlen) ==
          OPENSSL_NPN_NEGOTIATED &&
      *outlen == 8 && selected != nullptr) {
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
  }
  return SSL_TLSEXT_ERR_NOACK;
}

}  // namespace

Leaf::Leaf(std::string host, X509Ptr cert, EVP_PKEY* key, X509* issuer,
           std::function<void(SSL_CTX*)> configure)
    : host_(std::move(host)),
      cert_(std::move(cert)),
      key_(key),
      issuer_(issuer),
      configure_(std::move(configure)) {
  EVP_PKEY_up_ref(key_);
  X509_up_ref(issuer_);
  notBefore_ = asTimePoint(X509_get0_notBefore(cert_.get()));
  notAfter_ = asTimePoint(X509_get0_notAfter(cert_.get()));
}

Leaf::~Leaf() {
  EVP_PKEY_free(key_);
  X509_free(issuer_);
}

Status configureServerContext(SSL_CTX* ctx) {
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1)
    return Error{-1, "SSL_CTX: " + takeOpenSslErrors()};
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_alpn_select_cb(ctx, selectHttp11, nullptr);
  // TLS 1.2 clients without tickets are resumed from a cache on the server (~1-2 KiB a
  // session; OpenSSL keeps 20 480 by default): agents open the sessions, so fewer.
  SSL_CTX_sess_set_cache_size(ctx, kServerSessionCache);
  return Status::success();
}

Result<SslCtxPtr> makeServerContext(const Leaf& leaf) {
  SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()), SSL_CTX_free);
  bool ok = ctx != nullptr && configureServerContext(ctx.get()).ok() &&
            SSL_CTX_use_certificate(ctx.get(), leaf.certificate()) == 1 &&
            SSL_CTX_use_PrivateKey(ctx.get(), leaf.key()) == 1 &&
            SSL_CTX_add1_chain_cert(ctx.get(), leaf.issuer()) == 1 &&
            SSL_CTX_check_private_key(ctx.get()) == 1;
  if (!ok) return Error{-1, "SSL_CTX for " + leaf.host() + ": " + takeOpenSslErrors()};
  return ctx;
}

Result<SslCtxPtr> Leaf::sslContext() const {
  std::call_once(ctxOnce_, [this] {
    auto ctx = makeServerContext(*this);
    if (ctx) {
      ctx_ = std::move(ctx.value());
      if (configure_) configure_(ctx_.get());
    } else
      ctxError_ = ctx.error().message;
  });
  if (!ctx_) return Error{-1, ctxError_};
  return ctx_;
}

Result<std::unique_ptr<LeafCache>> LeafCache::create(std::shared_ptr<const LocalCa> ca,
                                                     Options options) {
  if (!ca) return Error{-1, "leaf cache: no CA"};
  if (options.capacity == 0) return Error{-1, "leaf cache: capacity must be at least 1"};
  if (options.renewBefore >= options.lifetime)
    return Error{-1, "leaf cache: renewBefore must be shorter than the lifetime"};
  auto key = generateP256Key();
  if (!key) return key.error();
  return std::unique_ptr<LeafCache>(
      new LeafCache(std::move(ca), std::move(options), std::move(key.value())));
}

size_t LeafCache::size() const {
  std::lock_guard lock(mu_);
  return entries_.size();
}

Result<LeafPtr> LeafCache::mint(const LeafHost& host) {
  LocalCa::LeafOptions leafOptions;
  leafOptions.now = options_.clock();
  leafOptions.lifetime = options_.lifetime;
  leafOptions.backdate = options_.backdate;
  auto cert = ca_->signLeaf(host, key_.get(), leafOptions);
  signings_.fetch_add(1, std::memory_order_relaxed);
  if (!cert) return cert.error();
  return LeafPtr(std::make_shared<const Leaf>(host.name, std::move(cert.value()), key_.get(),
                                              ca_->certificate(), options_.configureContext));
}

Result<LeafPtr> LeafCache::get(std::string_view hostText) {
  auto host = parseLeafHost(hostText);
  if (!host) return host.error();
  if (!ca_->permits(host.value()))
    return Error{-1, "the local CA's name constraints do not permit " + host->name};

  std::promise<Result<LeafPtr>> promise;
  std::shared_future<Result<LeafPtr>> waitFor;
  uint64_t generation = 0;
  {
    std::lock_guard lock(mu_);
    auto now = options_.clock();
    auto it = entries_.find(host->name);
    if (it != entries_.end()) {
      Entry& e = it->second;
      lru_.splice(lru_.begin(), lru_, e.lru);
      // Not yet valid either, when the clock was stepped back past the leaf's backdated
      // notBefore (agents would refuse it until then): minted again.
      bool begun = e.leaf && e.leaf->notBefore() <= now;
      bool fresh = begun && now + options_.renewBefore < e.leaf->notAfter();
      bool stillValid = begun && now < e.leaf->notAfter();
      if (fresh || (stillValid && e.pending.valid())) {
        hits_.fetch_add(1, std::memory_order_relaxed);
        return e.leaf;
      }
      if (e.pending.valid()) {
        waitFor = e.pending;
      } else {
        e.pending = promise.get_future().share();
        e.generation = generation = ++nextGeneration_;
      }
    } else {
      lru_.push_front(host->name);
      Entry e;
      e.lru = lru_.begin();
      e.pending = promise.get_future().share();
      e.generation = generation = ++nextGeneration_;
      entries_.emplace(host->name, std::move(e));
      while (entries_.size() > options_.capacity) {
        entries_.erase(lru_.back());
        lru_.pop_back();
      }
    }
  }
  if (waitFor.valid()) return waitFor.get();

  // This thread mints; the lock is not held while signing.
  auto minted = mint(host.value());
  {
    std::lock_guard lock(mu_);
    auto it = entries_.find(host->name);
    // The entry may have been evicted meanwhile: the leaf is still returned, just not kept.
    if (it != entries_.end() && it->second.generation == generation) {
      Entry& e = it->second;
      e.pending = {};
      if (minted) {
        e.leaf = minted.value();
      } else if (!e.leaf) {
        lru_.erase(e.lru);
        entries_.erase(it);
      }
    }
  }
  promise.set_value(minted);
  return minted;
}

Result<SslCtxPtr> LeafCache::serverContext(std::string_view host) {
  auto leaf = get(host);
  if (!leaf) return leaf.error();
  return leaf.value()->sslContext();
}

}  // namespace tollgate
