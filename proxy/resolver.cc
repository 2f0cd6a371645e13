#include "proxy/resolver.h"

#include <algorithm>
#include <cstring>

namespace tollgate {

struct Resolver::Lookup {
  uv_getaddrinfo_t req;
  Resolver* owner;
  std::string host;
  std::vector<Waiter*> waiters;
};

Resolver::~Resolver() {
  // Lookups still on the thread pool finish after the resolver; they must not touch it.
  for (auto& [host, lookup] : inflight_) lookup->owner = nullptr;
}

bool Resolver::parseLiteral(const std::string& host, sockaddr_storage& out) {
  std::memset(&out, 0, sizeof out);
  // uv_inet_pton stops at a zone id (fe80::1%eth0) and takes anything after it: an address
  // whose bytes would reach the records and the upstream's Host unchecked, and whose zone
  // would be dropped. Zones are not supported.
  if (host.find('%') != std::string::npos) return false;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&out);
  if (uv_inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 0) {
    v4->sin_family = AF_INET;
    return true;
  }
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&out);
  if (uv_inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 0) {
    v6->sin6_family = AF_INET6;
    return true;
  }
  return false;
}

void Resolver::resolve(const std::string& host, Waiter* waiter) {
  sockaddr_storage literal;
  if (parseLiteral(host, literal)) {
    waiter->onResolved(0, {literal});
    return;
  }
  uint64_t now = uv_now(loop_);
  if (auto it = cache_.find(host); it != cache_.end()) {
    if (it->second.expiresMs > now) {
      waiter->onResolved(it->second.status, it->second.addrs);
      return;
    }
    cache_.erase(it);
  }
  if (auto it = inflight_.find(host); it != inflight_.end()) {
    it->second->waiters.push_back(waiter);
    return;
  }
  if (inflight_.size() >= kMaxInflight) {
    waiter->onResolved(kBusy, {});
    return;
  }
  auto* lookup = new Lookup{{}, this, host, {waiter}};
  lookup->req.data = lookup;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  int rc = uv_getaddrinfo(loop_, &lookup->req, onLookup, host.c_str(), nullptr, &hints);
  if (rc != 0) {
    delete lookup;
    waiter->onResolved(rc, {});
    return;
  }
  inflight_[host] = lookup;
}

std::string Resolver::describe(int status) {
  if (status == kBusy)
    return "too many name lookups in flight (" + std::to_string(kMaxInflight) + " per worker)";
  return uv_strerror(status);
}

void Resolver::remember(const std::string& host, int status,
                        const std::vector<sockaddr_storage>& addrs) {
  uint64_t now = uv_now(loop_);
  // Bounded: agents choose the names (a transparent listener looks up every Host), so
  // expired entries go when the cache is full, and past that a name is not kept.
  if (cache_.size() >= kMaxCached) {
    std::erase_if(cache_, [now](const auto& entry) { return entry.second.expiresMs <= now; });
    if (cache_.size() >= kMaxCached) return;
  }
  // A failure for at most kNegativeMs: the name may come to resolve.
  constexpr uint64_t kNegativeMs = 5'000;
  auto ttl = static_cast<uint64_t>(ttl_.count());
  cache_[host] = {addrs, now + (status == 0 ? ttl : std::min(ttl, kNegativeMs)), status};
}

void Resolver::cancel(Waiter* waiter) {
  for (auto& [host, lookup] : inflight_) {
    auto& w = lookup->waiters;
    w.erase(std::remove(w.begin(), w.end(), waiter), w.end());
  }
}

void Resolver::onLookup(uv_getaddrinfo_t* req, int status, addrinfo* res) {
  auto* lookup = static_cast<Lookup*>(req->data);
  std::vector<sockaddr_storage> addrs;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
    sockaddr_storage ss{};
    std::memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    addrs.push_back(ss);
  }
  uv_freeaddrinfo(res);
  Resolver* self = lookup->owner;
  if (self) {
    self->inflight_.erase(lookup->host);
    if (status == 0 && addrs.empty()) status = UV_EAI_NONAME;
    if (self->ttl_.count() > 0 && status != UV_ECANCELED)
      self->remember(lookup->host, status, addrs);
    // A waiter may cancel others while being called; walk a copy that cancel() cannot touch.
    auto waiters = std::move(lookup->waiters);
    for (auto* w : waiters) w->onResolved(status, addrs);
  }
  delete lookup;
}

}  // namespace tollgate
