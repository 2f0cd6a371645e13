// Resolver: asynchronous DNS (uv_getaddrinfo on libuv's thread pool) with a short cache,
// one per worker loop. Concurrent lookups of one name share a request; IP literals never
// leave the loop.
#pragma once

#include <uv.h>

#include <chrono>
#include <string>
#include <unordered_map>
#include <vector>

namespace tollgate {

class Resolver {
 public:
  class Waiter {
   public:
    // status is 0 or a negative libuv code; addrs carry port 0.
    virtual void onResolved(int status, const std::vector<sockaddr_storage>& addrs) = 0;

   protected:
    ~Waiter() = default;
  };

  Resolver(uv_loop_t* loop, std::chrono::milliseconds ttl) : loop_(loop), ttl_(ttl) {}
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;
  ~Resolver();

  // Calls waiter->onResolved() before returning on a cache hit or IP literal, later otherwise.
  void resolve(const std::string& host, Waiter* waiter);
  void cancel(Waiter* waiter);

  // Parses an IPv4/IPv6 literal (port 0).
  static bool parseLiteral(const std::string& host, sockaddr_storage& out);
  size_t cached() const { return cache_.size(); }
  static constexpr size_t kMaxCached = 4096;
  // Names looked up at once by one worker, at most. A lookup holds one of libuv's pool
  // threads (shared by the process) for the system resolver's whole timeout, which the
  // caller's deadline cannot cut short: an agent naming hosts under a silent name server
  // would otherwise take every thread, and every agent's lookups would wait behind them.
  static constexpr size_t kMaxInflight = 32;
  // What resolve() answers past kMaxInflight; describe() says it in words.
  static constexpr int kBusy = UV_EBUSY;
  static std::string describe(int status);

 private:
  struct Lookup;
  struct Entry {
    std::vector<sockaddr_storage> addrs;
    uint64_t expiresMs = 0;
    int status = 0;  // a failure is remembered too (briefly), so a name that does not
                     // resolve does not take a pool thread again at every call
  };
  static void onLookup(uv_getaddrinfo_t* req, int status, addrinfo* res);
  void remember(const std::string& host, int status, const std::vector<sockaddr_storage>& addrs);

  uv_loop_t* loop_;
  std::chrono::milliseconds ttl_;
  std::unordered_map<std::string, Entry> cache_;
  std::unordered_map<std::string, Lookup*> inflight_;
};

}  // namespace tollgate
