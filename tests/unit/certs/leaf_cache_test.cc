// The leaf cache: a repeat host costs no signing, the least recently used host is evicted
// beyond capacity, a leaf near its expiry is minted again (injected clock), refused hosts
// never reach the signer, the SSL_CTX it hands out completes a TLS handshake (in memory,
// ALPN http/1.1, chain verified by a client trusting the CA), and it holds up under many
// threads.
#include "certs/leaf_cache.h"

#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#include "tests/unit/certs/cert_test_util.h"

namespace tollgate {
namespace {

using namespace std::chrono_literals;

const CertClock::time_point kStart = CertClock::from_time_t(1'800'000'000);

struct FakeClock {
  std::atomic<int64_t> offsetSeconds{0};
  CertClock::time_point now() const { return kStart + std::chrono::seconds(offsetSeconds.load()); }
};

std::shared_ptr<const LocalCa> makeCa(std::vector<std::string> permits = {},
                                      CertClock::time_point now = kStart) {
  LocalCa::Options options;
  options.now = now;
  for (const auto& p : permits) options.permitted.push_back(parsePermittedName(p).value());
  return std::make_shared<const LocalCa>(std::move(LocalCa::create(options).value()));
}

std::unique_ptr<LeafCache> makeCache(std::shared_ptr<const LocalCa> ca, FakeClock* clock,
                                     size_t capacity = 10000) {
  LeafCache::Options options;
  options.capacity = capacity;
  options.clock = [clock] { return clock->now(); };
  auto cache = LeafCache::create(std::move(ca), options);
  EXPECT_TRUE(cache.ok());
  return std::move(cache.value());
}

TEST(LeafCache, RepeatHostIsServedFromTheCacheWithoutSigning) {
  FakeClock clock;
  auto ca = makeCa();
  auto cache = makeCache(ca, &clock);
  auto first = cache->get("api.example.com");
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_EQ(cache->signings(), 1u);
  for (std::string same : {"api.example.com", "API.example.com", "api.example.com."}) {
    auto again = cache->get(same);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again.value().get(), first.value().get()) << same;
  }
  EXPECT_EQ(cache->signings(), 1u);
  EXPECT_EQ(cache->hits(), 3u);
  EXPECT_EQ(testing::verifyLeaf(ca->certificate(), first.value()->certificate(), "api.example.com",
                                clock.now()),
            X509_V_OK);
  // Every leaf carries the one shared key.
  auto other = cache->get("10.0.0.1");
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other.value()->key(), cache->leafKey());
  EXPECT_EQ(first.value()->key(), cache->leafKey());
  EXPECT_EQ(cache->signings(), 2u);
}

TEST(LeafCache, EvictsTheLeastRecentlyUsedBeyondCapacity) {
  FakeClock clock;
  auto cache = makeCache(makeCa(), &clock, 3);
  for (std::string host : {"a.test", "b.test", "c.test"}) ASSERT_TRUE(cache->get(host).ok());
  ASSERT_TRUE(cache->get("a.test").ok());  // a is now the most recent; b the least
  ASSERT_TRUE(cache->get("d.test").ok());  // evicts b
  EXPECT_EQ(cache->size(), 3u);
  EXPECT_EQ(cache->signings(), 4u);
  for (std::string kept : {"a.test", "c.test", "d.test"}) ASSERT_TRUE(cache->get(kept).ok());
  EXPECT_EQ(cache->signings(), 4u);
  ASSERT_TRUE(cache->get("b.test").ok());  // minted again
  EXPECT_EQ(cache->signings(), 5u);
  EXPECT_EQ(cache->size(), 3u);
}

TEST(LeafCache, ReMintsBeforeExpiry) {
  FakeClock clock;
  auto ca = makeCa();
  auto cache = makeCache(ca, &clock);
  auto first = cache->get("api.example.com");
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first.value()->notAfter(), kStart + 24h);
  EXPECT_EQ(first.value()->notBefore(), kStart - 1h);

  clock.offsetSeconds = 22 * 3600;  // still more than an hour left
  EXPECT_EQ(cache->get("api.example.com").value().get(), first.value().get());
  EXPECT_EQ(cache->signings(), 1u);

  clock.offsetSeconds = 23 * 3600 + 1;  // within renewBefore (1h) of notAfter
  auto second = cache->get("api.example.com");
  ASSERT_TRUE(second.ok());
  EXPECT_NE(second.value().get(), first.value().get());
  EXPECT_EQ(cache->signings(), 2u);
  EXPECT_EQ(second.value()->notAfter(), clock.now() + 24h);
  EXPECT_EQ(testing::verifyLeaf(ca->certificate(), second.value()->certificate(), "api.example.com",
                                kStart + 30h),
            X509_V_OK);
  EXPECT_EQ(cache->get("api.example.com").value().get(), second.value().get());
  EXPECT_EQ(cache->signings(), 2u);

  clock.offsetSeconds = 100 * 3600;  // long expired: minted again, never served stale
  auto third = cache->get("api.example.com");
  ASSERT_TRUE(third.ok());
  EXPECT_GT(third.value()->notAfter(), clock.now());
  EXPECT_EQ(cache->signings(), 3u);
}

// The clock stepped back (NTP) past a cached leaf's notBefore (backdated 1h): it would be
// refused as not yet valid, so it is minted again rather than served.
TEST(LeafCache, ReMintsALeafThatIsNotYetValidAfterTheClockWentBack) {
  FakeClock clock;
  auto ca = makeCa({}, kStart - 240h);
  auto cache = makeCache(ca, &clock);
  auto first = cache->get("api.example.com");
  ASSERT_TRUE(first.ok());
  clock.offsetSeconds = -2 * 3600;
  auto second = cache->get("api.example.com");
  ASSERT_TRUE(second.ok());
  EXPECT_NE(second.value().get(), first.value().get());
  EXPECT_EQ(cache->signings(), 2u);
  EXPECT_LE(second.value()->notBefore(), clock.now());
}

TEST(LeafCache, RefusesHostsTheCaDoesNotPermitWithoutSigning) {
  FakeClock clock;
  auto cache = makeCache(makeCa({"example.com"}), &clock);
  EXPECT_TRUE(cache->get("api.example.com").ok());
  auto refused = cache->get("evil.com");
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("do not permit"), std::string::npos);
  EXPECT_FALSE(cache->get("127.0.0.1").ok());
  EXPECT_FALSE(cache->get("bad host").ok());
  EXPECT_FALSE(cache->get("").ok());
  EXPECT_EQ(cache->signings(), 1u);
  EXPECT_EQ(cache->size(), 1u);
}

// Drives a handshake between two in-memory SSLs; true when both finished.
bool handshake(SSL* client, SSL* server) {
  for (int i = 0; i < 100; ++i) {
    int c = SSL_do_handshake(client);
    int s = SSL_do_handshake(server);
    if (c == 1 && s == 1) return true;
    int ce = SSL_get_error(client, c), se = SSL_get_error(server, s);
    if ((c != 1 && ce != SSL_ERROR_WANT_READ && ce != SSL_ERROR_WANT_WRITE) ||
        (s != 1 && se != SSL_ERROR_WANT_READ && se != SSL_ERROR_WANT_WRITE))
      return false;
  }
  return false;
}

struct Handshake {
  bool ok = false;
  long verify = -1;
  std::string alpn;
};

// A client trusting only `ca` connects to `server` for `host`, offering h2 and http/1.1.
Handshake connect(X509* ca, SSL* server, const std::string& host) {
  SSL_CTX* cctx = SSL_CTX_new(TLS_client_method());
  X509_STORE_add_cert(SSL_CTX_get_cert_store(cctx), ca);
  SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, nullptr);
  static const unsigned char kProtos[] = {2, 'h', '2', 8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(cctx, kProtos, sizeof kProtos);
  SSL* client = SSL_new(cctx);
  SSL_set_tlsext_host_name(client, host.c_str());
  SSL_set1_host(client, host.c_str());
  SSL_set_connect_state(client);
  SSL_set_accept_state(server);
  BIO *clientBio = nullptr, *serverBio = nullptr;
  BIO_new_bio_pair(&clientBio, 0, &serverBio, 0);
  SSL_set_bio(client, clientBio, clientBio);
  SSL_set_bio(server, serverBio, serverBio);
  Handshake result;
  result.ok = handshake(client, server);
  result.verify = SSL_get_verify_result(client);
  const unsigned char* alpn = nullptr;
  unsigned int alpnLen = 0;
  SSL_get0_alpn_selected(client, &alpn, &alpnLen);
  if (alpn) result.alpn.assign(reinterpret_cast<const char*>(alpn), alpnLen);
  SSL_free(client);
  SSL_CTX_free(cctx);
  ERR_clear_error();
  return result;
}

TEST(LeafCache, ServerContextCompletesAVerifiedHandshakeWithHttp11) {
  FakeClock clock;
  // Real time here: the TLS client checks validity against its own clock.
  clock.offsetSeconds = CertClock::to_time_t(CertClock::now()) - CertClock::to_time_t(kStart);
  auto ca = makeCa({}, clock.now());
  auto cache = makeCache(ca, &clock);
  auto ctx = cache->serverContext("tools.example.com");
  ASSERT_TRUE(ctx.ok()) << ctx.error().message;
  EXPECT_EQ(cache->serverContext("tools.example.com").value().get(), ctx.value().get());
  EXPECT_EQ(SSL_CTX_get_min_proto_version(ctx.value().get()), TLS1_2_VERSION);
  EXPECT_EQ(SSL_CTX_sess_get_cache_size(ctx.value().get()), kServerSessionCache);
  STACK_OF(X509)* chain = nullptr;
  ASSERT_EQ(SSL_CTX_get0_chain_certs(ctx.value().get(), &chain), 1);
  ASSERT_EQ(sk_X509_num(chain), 1);
  EXPECT_EQ(X509_cmp(sk_X509_value(chain, 0), ca->certificate()), 0);

  SSL* server = SSL_new(ctx.value().get());
  Handshake hs = connect(ca->certificate(), server, "tools.example.com");
  SSL_free(server);
  EXPECT_TRUE(hs.ok);
  EXPECT_EQ(hs.verify, X509_V_OK);
  EXPECT_EQ(hs.alpn, "http/1.1");
}

TEST(LeafCache, ConcurrentFirstUseOfOneHostSignsOnce) {
  FakeClock clock;
  auto cache = makeCache(makeCa(), &clock);
  constexpr int kThreads = 16;
  std::barrier start(kThreads);
  std::vector<const Leaf*> seen(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      auto leaf = cache->get("same.example.com");
      seen[t] = leaf.ok() ? leaf.value().get() : nullptr;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(cache->signings(), 1u);
  for (const Leaf* leaf : seen) EXPECT_EQ(leaf, seen[0]);
  EXPECT_NE(seen[0], nullptr);
}

TEST(LeafCache, ManyThreadsWithEvictionAndRenewal) {
  FakeClock clock;
  auto ca = makeCa();
  auto cache = makeCache(ca, &clock, 16);
  constexpr int kThreads = 8, kIterations = 600, kHosts = 40;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIterations; ++i) {
        std::string host = "h" + std::to_string((i * 7 + t) % kHosts) + ".example.com";
        if (t == 0 && i % 100 == 0) clock.offsetSeconds += 12 * 3600;  // force renewals
        auto before = clock.now();
        auto leaf = cache->get(host);
        if (!leaf.ok() || leaf.value()->host() != host || leaf.value()->notAfter() <= before)
          ++failures;
        if (i % 50 == 0 && leaf.ok() && !leaf.value()->sslContext().ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LE(cache->size(), 16u);
  EXPECT_GE(cache->signings(), static_cast<uint64_t>(kHosts));
  EXPECT_LT(cache->signings(), static_cast<uint64_t>(kThreads * kIterations));
}

}  // namespace
}  // namespace tollgate
