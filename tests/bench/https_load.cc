// https_load: an HTTPS load generator that can go through an HTTP CONNECT proxy, which wrk
// cannot. Each connection sends a CONNECT to the proxy (with --proxy), then makes a TLS
// handshake with the origin's name (certificate chain and host name verified against
// --cacert, or the system store), then sends HTTP/1.1 keep-alive GETs one after the other.
// With --new-conn every request gets a new TCP connection and a full handshake (TLS session
// resumption is never used, so that mode measures full handshakes per second).
//
//   https_load --url https://HOST:PORT/PATH [--proxy http://HOST:PORT] [--cacert FILE]
//              [--connections N] [--threads T] [--duration S] [--requests N] [--new-conn]
//              [--header 'Name: value']... [--proxy-header 'Name: value']...
//              [--timeout S] [--max-errors N]
//
// Prints one JSON line: requests (responses received, any status), errors (connections or
// exchanges that failed: refused, proxy refusal, TLS or verification failure, timeout, a
// malformed or cut response), non_2xx, handshakes, seconds, rps, p50_us / p99_us (latency of
// a request from its write to the response's end; with --new-conn from the connect), and
// first_error. Bounded: it stops at --duration (default 10 s, at most 3600) or after
// --requests, and early if --max-errors (100) fail before any request succeeds. Exit 0 when
// requests were answered and none failed or was non-2xx, 1 otherwise, 2 on usage errors.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "llhttp.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Endpoint {
  std::string host;  // without brackets
  uint16_t port = 0;
  sockaddr_storage addr{};
  socklen_t addrLen = 0;
};

struct Options {
  Endpoint origin;
  std::string path = "/";
  bool viaProxy = false;
  Endpoint proxy;
  std::string cacert;
  int connections = 16;
  int threads = 2;
  double duration = 10;
  uint64_t requests = 0;  // 0: no limit but the duration
  bool newConn = false;
  std::vector<std::string> headers;
  std::vector<std::string> proxyHeaders;
  double timeout = 5;
  uint64_t maxErrors = 100;
};

// Shared by every worker: the stop flag, the request budget and the first error's text.
struct Shared {
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> claimed{0};
  std::atomic<uint64_t> answered{0};
  std::atomic<uint64_t> failed{0};
  std::mutex errorLock;
  std::string firstError;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "https_load: %s\nusage: https_load --url https://HOST:PORT/PATH [--proxy "
               "http://HOST:PORT] [--cacert FILE] [--connections N] [--threads T] [--duration S] "
               "[--requests N] [--new-conn] [--header 'N: v']... [--proxy-header 'N: v']... "
               "[--timeout S] [--max-errors N]\n",
               why.c_str());
  std::exit(2);
}

// Splits SCHEME://HOST[:PORT][/PATH] (HOST may be [v6]); the path defaults to "/".
bool parseUrl(const std::string& url, const std::string& scheme, uint16_t defaultPort, Endpoint& ep,
              std::string& path) {
  const std::string prefix = scheme + "://";
  if (url.rfind(prefix, 0) != 0) return false;
  std::string rest = url.substr(prefix.size());
  const size_t slash = rest.find('/');
  path = slash == std::string::npos ? "/" : rest.substr(slash);
  std::string authority = rest.substr(0, slash);
  std::string port;
  if (!authority.empty() && authority[0] == '[') {
    const size_t close = authority.find(']');
    if (close == std::string::npos) return false;
    ep.host = authority.substr(1, close - 1);
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') return false;
      port = authority.substr(close + 2);
    }
  } else {
    const size_t colon = authority.rfind(':');
    ep.host = authority.substr(0, colon);
    if (colon != std::string::npos) port = authority.substr(colon + 1);
  }
  if (ep.host.empty()) return false;
  ep.port = defaultPort;
  if (!port.empty()) {
    char* end = nullptr;
    const long p = std::strtol(port.c_str(), &end, 10);
    if (*end != '\0' || p <= 0 || p > 65535) return false;
    ep.port = static_cast<uint16_t>(p);
  }
  return true;
}

bool resolve(Endpoint& ep) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(ep.port);
  const int rc = getaddrinfo(ep.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    std::fprintf(stderr, "https_load: cannot resolve %s: %s\n", ep.host.c_str(), gai_strerror(rc));
    return false;
  }
  std::memcpy(&ep.addr, res->ai_addr, res->ai_addrlen);
  ep.addrLen = res->ai_addrlen;
  freeaddrinfo(res);
  return true;
}

bool isIpLiteral(const std::string& host) {
  in6_addr v6{};
  in_addr v4{};
  return inet_pton(AF_INET, host.c_str(), &v4) == 1 || inet_pton(AF_INET6, host.c_str(), &v6) == 1;
}

std::string authority(const Endpoint& ep) {
  const bool v6 = ep.host.find(':') != std::string::npos;
  return (v6 ? "[" + ep.host + "]" : ep.host) + ":" + std::to_string(ep.port);
}

double number(const char* flag, const char* value, double lo, double hi) {
  char* end = nullptr;
  const double v = std::strtod(value, &end);
  if (end == value || *end != '\0' || v < lo || v > hi)
    usage(std::string(flag) + " wants a number in [" + std::to_string(lo) + ", " +
          std::to_string(hi) + "]");
  return v;
}

Options parseOptions(int argc, char** argv) {
  Options o;
  std::string url;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--url") {
      url = value();
    } else if (a == "--proxy") {
      std::string ignored;
      if (!parseUrl(value(), "http", 80, o.proxy, ignored)) usage("--proxy wants http://HOST:PORT");
      o.viaProxy = true;
    } else if (a == "--cacert") {
      o.cacert = value();
    } else if (a == "--connections") {
      o.connections = static_cast<int>(number("--connections", value(), 1, 10000));
    } else if (a == "--threads") {
      o.threads = static_cast<int>(number("--threads", value(), 1, 64));
    } else if (a == "--duration") {
      o.duration = number("--duration", value(), 0.1, 3600);
    } else if (a == "--requests") {
      o.requests = static_cast<uint64_t>(number("--requests", value(), 1, 1e10));
    } else if (a == "--new-conn") {
      o.newConn = true;
    } else if (a == "--header") {
      o.headers.emplace_back(value());
    } else if (a == "--proxy-header") {
      o.proxyHeaders.emplace_back(value());
    } else if (a == "--timeout") {
      o.timeout = number("--timeout", value(), 0.1, 600);
    } else if (a == "--max-errors") {
      o.maxErrors = static_cast<uint64_t>(number("--max-errors", value(), 1, 1e10));
    } else {
      usage("unknown option " + a);
    }
  }
  if (url.empty()) usage("--url is required");
  if (!parseUrl(url, "https", 443, o.origin, o.path)) usage("--url wants https://HOST[:PORT]/PATH");
  for (const auto& h : o.headers)
    if (h.find(':') == std::string::npos || h.find_first_of("\r\n") != std::string::npos)
      usage("--header wants 'Name: value'");
  if (!resolve(o.viaProxy ? o.proxy : o.origin)) std::exit(2);
  o.threads = std::min(o.threads, o.connections);
  return o;
}

std::string sslErrors() {
  std::string out;
  char buf[256];
  while (const unsigned long e = ERR_get_error()) {
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

enum class State { kIdle, kConnect, kProxyWrite, kProxyRead, kHandshake, kWrite, kRead, kDone };

// One client connection and the request on it; owned by its Worker.
struct Connection {
  int fd = -1;
  SSL* ssl = nullptr;
  State state = State::kIdle;
  std::string proxyIn;
  size_t written = 0;
  llhttp_t parser{};
  bool complete = false;
  bool keepAlive = true;
  Clock::time_point started;
  Clock::time_point lastIo;
};

// One thread: an epoll loop over its connections, each a state machine driven until it
// would block (edge-triggered).
class Worker {
 public:
  Worker(const Options& o, Shared& shared, SSL_CTX* ctx, int connections, Clock::time_point end)
      : o_(o), shared_(shared), ctx_(ctx), end_(end), conns_(connections) {
    llhttp_settings_init(&settings_);
    settings_.on_message_complete = [](llhttp_t* p) {
      auto* c = static_cast<Connection*>(p->data);
      c->complete = true;
      c->keepAlive = llhttp_should_keep_alive(p) != 0;
      return 0;
    };
    request_ = "GET " + o.path + " HTTP/1.1\r\nHost: " +
               (o.origin.port == 443 ? o.origin.host : authority(o.origin)) +
               "\r\nUser-Agent: https_load\r\n";
    for (const auto& h : o.headers) request_ += h + "\r\n";
    request_ += "\r\n";
    connect_ =
        "CONNECT " + authority(o.origin) + " HTTP/1.1\r\nHost: " + authority(o.origin) + "\r\n";
    for (const auto& h : o.proxyHeaders) connect_ += h + "\r\n";
    connect_ += "\r\n";
  }

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  ~Worker() {
    for (auto& c : conns_) closeConnection(c);
    if (epoll_ >= 0) close(epoll_);
  }

  void run() {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) {
      noteError("epoll_create1: " + std::string(std::strerror(errno)));
      return;
    }
    for (auto& c : conns_) retry_.push_back(&c);
    std::vector<epoll_event> events(256);
    auto lastSweep = Clock::now();
    while (!shared_.stop.load(std::memory_order_relaxed)) {
      const auto now = Clock::now();
      if (now >= end_) break;
      std::vector<Connection*> pending;
      pending.swap(retry_);
      for (Connection* c : pending) advance(*c);
      if (std::all_of(conns_.begin(), conns_.end(),
                      [](const Connection& c) { return c.state == State::kDone; }))
        break;
      const int wait = retry_.empty() ? 20 : 0;
      const int n = epoll_wait(epoll_, events.data(), static_cast<int>(events.size()), wait);
      for (int i = 0; i < n; ++i) advance(*static_cast<Connection*>(events[i].data.ptr));
      if (Clock::now() - lastSweep > std::chrono::milliseconds(100)) {
        lastSweep = Clock::now();
        sweepTimeouts(lastSweep);
      }
    }
  }

  uint64_t answered() const { return answered_; }
  uint64_t failed() const { return failed_; }
  uint64_t non2xx() const { return non2xx_; }
  uint64_t handshakes() const { return handshakes_; }
  std::vector<uint32_t>& latencies() { return latencies_; }

 private:
  // Takes one request from the budget; false once the run is over.
  bool claim() {
    if (shared_.stop.load(std::memory_order_relaxed) || Clock::now() >= end_) return false;
    if (o_.requests == 0) return true;
    return shared_.claimed.fetch_add(1, std::memory_order_relaxed) < o_.requests;
  }

  void noteError(const std::string& what) {
    std::lock_guard<std::mutex> lock(shared_.errorLock);
    if (shared_.firstError.empty()) shared_.firstError = what;
  }

  void fail(Connection& c, const std::string& what) {
    ++failed_;
    noteError(what);
    c.state = State::kIdle;  // before closing: no close_notify on a failed connection
    const uint64_t failedAll = shared_.failed.fetch_add(1, std::memory_order_relaxed) + 1;
    if (failedAll >= o_.maxErrors && shared_.answered.load(std::memory_order_relaxed) == 0)
      shared_.stop.store(true, std::memory_order_relaxed);
    closeConnection(c);
    retry_.push_back(&c);
  }

  void closeConnection(Connection& c) {
    if (c.ssl != nullptr) {
      if (c.state == State::kWrite || c.state == State::kRead) SSL_shutdown(c.ssl);
      SSL_free(c.ssl);
      c.ssl = nullptr;
    }
    if (c.fd >= 0) close(c.fd);
    c.fd = -1;
  }

  void sweepTimeouts(Clock::time_point now) {
    const auto limit = std::chrono::duration<double>(o_.timeout);
    for (auto& c : conns_)
      if (c.state != State::kIdle && c.state != State::kDone && now - c.lastIo > limit)
        fail(c, "timeout: no progress for " + std::to_string(o_.timeout) + " s");
  }

  // Opens the TCP connection (to the proxy or the origin); false when it failed (recorded).
  bool startConnect(Connection& c) {
    const Endpoint& to = o_.viaProxy ? o_.proxy : o_.origin;
    c.fd = socket(to.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd < 0) {
      fail(c, "socket: " + std::string(std::strerror(errno)));
      return false;
    }
    const int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c.fd, reinterpret_cast<const sockaddr*>(&to.addr), to.addrLen) != 0 &&
        errno != EINPROGRESS) {
      fail(c, "connect " + authority(to) + ": " + std::strerror(errno));
      return false;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = &c;
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, c.fd, &ev) != 0) {
      fail(c, "epoll_ctl: " + std::string(std::strerror(errno)));
      return false;
    }
    c.state = State::kConnect;
    c.lastIo = Clock::now();
    return true;
  }

  bool startTls(Connection& c) {
    c.ssl = SSL_new(ctx_);
    if (c.ssl == nullptr || SSL_set_fd(c.ssl, c.fd) != 1) {
      fail(c, "SSL_new: " + sslErrors());
      return false;
    }
    const std::string& host = o_.origin.host;
    if (isIpLiteral(host)) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c.ssl), host.c_str());
    } else {
      SSL_set_tlsext_host_name(c.ssl, host.c_str());
      SSL_set1_host(c.ssl, host.c_str());
    }
    c.state = State::kHandshake;
    return true;
  }

  void beginWrite(Connection& c) {
    c.state = State::kWrite;
    c.written = 0;
    c.complete = false;
    llhttp_init(&c.parser, HTTP_RESPONSE, &settings_);
    c.parser.data = &c;
    if (!o_.newConn) c.started = Clock::now();
  }

  // The TLS error of a failed SSL call as text: the verification result when that failed.
  std::string tlsFailure(Connection& c, int rc) {
    const int err = SSL_get_error(c.ssl, rc);
    const long verify = SSL_get_verify_result(c.ssl);
    if (c.state == State::kHandshake && verify != X509_V_OK)
      return "certificate verification failed: " +
             std::string(X509_verify_cert_error_string(verify));
    std::string detail = sslErrors();
    if (err == SSL_ERROR_SYSCALL && detail.empty())
      detail = errno != 0 ? std::strerror(errno) : "connection closed";
    if (err == SSL_ERROR_ZERO_RETURN) detail = "closed by the peer";
    return (c.state == State::kHandshake ? "TLS handshake: " : "TLS: ") + detail;
  }

  void finishResponse(Connection& c) {
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - c.started);
    latencies_.push_back(static_cast<uint32_t>(std::min<int64_t>(us.count(), UINT32_MAX)));
    ++answered_;
    shared_.answered.fetch_add(1, std::memory_order_relaxed);
    const unsigned status = llhttp_get_status_code(&c.parser);
    if (status < 200 || status > 299) ++non2xx_;
    if (o_.newConn || !c.keepAlive) closeConnection(c);
    c.state = State::kIdle;
  }

  void advance(Connection& c) {
    char buf[16384];
    for (;;) {
      switch (c.state) {
        case State::kDone:
          return;
        case State::kIdle:
          if (!claim()) {
            closeConnection(c);
            c.state = State::kDone;
            return;
          }
          if (c.fd >= 0) {
            beginWrite(c);
            break;
          }
          if (o_.newConn) c.started = Clock::now();
          if (!startConnect(c)) return;
          break;
        case State::kConnect: {
          int err = 0;
          socklen_t len = sizeof err;
          getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
          if (err == EINPROGRESS || err == EALREADY) return;
          if (err != 0) {
            fail(c, "connect " + authority(o_.viaProxy ? o_.proxy : o_.origin) + ": " +
                        std::strerror(err));
            return;
          }
          // Writable means connected; anything else is not yet.
          sockaddr_storage peer{};
          socklen_t peerLen = sizeof peer;
          if (getpeername(c.fd, reinterpret_cast<sockaddr*>(&peer), &peerLen) != 0) return;
          c.written = 0;
          if (o_.viaProxy) {
            c.state = State::kProxyWrite;
          } else if (!startTls(c)) {
            return;
          }
          break;
        }
        case State::kProxyWrite: {
          const ssize_t n = write(c.fd, connect_.data() + c.written, connect_.size() - c.written);
          if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            fail(c, "write CONNECT: " + std::string(std::strerror(errno)));
            return;
          }
          c.lastIo = Clock::now();
          c.written += static_cast<size_t>(n);
          if (c.written == connect_.size()) {
            c.state = State::kProxyRead;
            c.proxyIn.clear();
          }
          break;
        }
        case State::kProxyRead: {
          const ssize_t n = read(c.fd, buf, sizeof buf);
          if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            fail(c, "read CONNECT reply: " + std::string(std::strerror(errno)));
            return;
          }
          if (n == 0) {
            fail(c, "the proxy closed the connection before answering CONNECT");
            return;
          }
          c.lastIo = Clock::now();
          c.proxyIn.append(buf, static_cast<size_t>(n));
          const size_t end = c.proxyIn.find("\r\n\r\n");
          if (end == std::string::npos) {
            if (c.proxyIn.size() > 16384) fail(c, "CONNECT reply head over 16 KiB");
            break;
          }
          const std::string line = c.proxyIn.substr(0, c.proxyIn.find("\r\n"));
          if (line.size() < 12 || line.rfind("HTTP/1.", 0) != 0 || line[9] != '2') {
            fail(c, "the proxy refused CONNECT: " + line);
            return;
          }
          if (end + 4 != c.proxyIn.size()) {
            fail(c, "bytes after the CONNECT reply before the TLS handshake");
            return;
          }
          if (!startTls(c)) return;
          break;
        }
        case State::kHandshake: {
          ERR_clear_error();
          const int rc = SSL_connect(c.ssl);
          if (rc == 1) {
            ++handshakes_;
            c.lastIo = Clock::now();
            beginWrite(c);
            break;
          }
          const int err = SSL_get_error(c.ssl, rc);
          if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
          fail(c, tlsFailure(c, rc));
          return;
        }
        case State::kWrite: {
          ERR_clear_error();
          const int rc = SSL_write(c.ssl, request_.data() + c.written,
                                   static_cast<int>(request_.size() - c.written));
          if (rc <= 0) {
            const int err = SSL_get_error(c.ssl, rc);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
            fail(c, tlsFailure(c, rc));
            return;
          }
          c.lastIo = Clock::now();
          c.written += static_cast<size_t>(rc);
          if (c.written == request_.size()) c.state = State::kRead;
          break;
        }
        case State::kRead: {
          ERR_clear_error();
          const int rc = SSL_read(c.ssl, buf, sizeof buf);
          if (rc <= 0) {
            const int err = SSL_get_error(c.ssl, rc);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
            if ((err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL) &&
                llhttp_finish(&c.parser) == HPE_OK && c.complete) {
              c.keepAlive = false;
              finishResponse(c);
              break;
            }
            fail(c, "response cut: " + tlsFailure(c, rc));
            return;
          }
          c.lastIo = Clock::now();
          const llhttp_errno_t perr = llhttp_execute(&c.parser, buf, static_cast<size_t>(rc));
          if (perr != HPE_OK) {
            fail(c, std::string("malformed response: ") + llhttp_errno_name(perr) + " " +
                        llhttp_get_error_reason(&c.parser));
            return;
          }
          if (c.complete) finishResponse(c);
          break;
        }
      }
    }
  }

  const Options& o_;
  Shared& shared_;
  SSL_CTX* ctx_;
  Clock::time_point end_;
  std::vector<Connection> conns_;
  std::vector<Connection*> retry_;
  llhttp_settings_t settings_{};
  std::string request_;
  std::string connect_;
  int epoll_ = -1;
  uint64_t answered_ = 0;
  uint64_t failed_ = 0;
  uint64_t non2xx_ = 0;
  uint64_t handshakes_ = 0;
  std::vector<uint32_t> latencies_;
};

std::string jsonString(const std::string& s) {
  std::string out = "\"";
  for (const unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\u%04x", ch);
      out += esc;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

uint32_t percentile(std::vector<uint32_t>& v, double q) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parseOptions(argc, argv);
  signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                        &SSL_CTX_free);
  if (!ctx) {
    std::fprintf(stderr, "https_load: SSL_CTX_new: %s\n", sslErrors().c_str());
    return 2;
  }
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  // No resumption in any mode: every handshake made is a full one.
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_TICKET);
  static const unsigned char kAlpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ctx.get(), kAlpn, sizeof kAlpn);
  const int loaded = o.cacert.empty()
                         ? SSL_CTX_set_default_verify_paths(ctx.get())
                         : SSL_CTX_load_verify_locations(ctx.get(), o.cacert.c_str(), nullptr);
  if (loaded != 1) {
    std::fprintf(stderr, "https_load: cannot load CA certificates %s: %s\n", o.cacert.c_str(),
                 sslErrors().c_str());
    return 2;
  }

  Shared shared;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(o.duration));
  std::vector<std::unique_ptr<Worker>> workers;
  for (int t = 0; t < o.threads; ++t) {
    const int n = o.connections / o.threads + (t < o.connections % o.threads ? 1 : 0);
    workers.push_back(std::make_unique<Worker>(o, shared, ctx.get(), n, end));
  }
  std::vector<std::thread> threads;
  for (auto& w : workers) threads.emplace_back([&w] { w->run(); });
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  uint64_t requests = 0, errors = 0, non2xx = 0, handshakes = 0;
  std::vector<uint32_t> latencies;
  for (auto& w : workers) {
    requests += w->answered();
    errors += w->failed();
    non2xx += w->non2xx();
    handshakes += w->handshakes();
    latencies.insert(latencies.end(), w->latencies().begin(), w->latencies().end());
  }
  workers.clear();
  const uint32_t p50 = percentile(latencies, 0.50);
  const uint32_t p99 = percentile(latencies, 0.99);
  std::printf(
      "{\"requests\":%llu,\"errors\":%llu,\"non_2xx\":%llu,\"handshakes\":%llu,"
      "\"seconds\":%.3f,\"rps\":%.1f,\"p50_us\":%u,\"p99_us\":%u,\"connections\":%d,"
      "\"mode\":\"%s\",\"first_error\":%s}\n",
      static_cast<unsigned long long>(requests), static_cast<unsigned long long>(errors),
      static_cast<unsigned long long>(non2xx), static_cast<unsigned long long>(handshakes), seconds,
      seconds > 0 ? static_cast<double>(requests) / seconds : 0.0, p50, p99, o.connections,
      o.newConn ? "new-conn" : "keep-alive",
      shared.firstError.empty() ? "null" : jsonString(shared.firstError).c_str());
  return requests > 0 && errors == 0 && non2xx == 0 ? 0 : 1;
}
