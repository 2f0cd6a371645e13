#include "proxy/client_session.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstring>
#include <optional>
#include <random>
#include <unordered_map>

#include "certs/openssl_error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/sha256.h"
#include "common/units.h"
#include "policy/tool_call.h"
#include "proxy/admin_api.h"
#include "proxy/original_dst.h"
#include "proxy/worker.h"

namespace tollgate {
namespace {

constexpr uint64_t kLingerMs = 2000;
constexpr size_t kMaxPendingInput = 64 * 1024;

// The Via pseudonym of this process: a loop through the same sidecar is recognised by it.
const std::string& viaToken() {
  static const std::string token = [] {
    std::random_device rd;
    char buf[32];
    std::snprintf(buf, sizeof buf, "tollgate-%08x", rd());
    return std::string(buf);
  }();
  return token;
}

// The generator of a thread's trace and span ids, its whole state drawn from OpenSSL's CSPRNG.
// Seeded from one 32-bit word, two of some 2^16 threads across a fleet would likely start
// alike and emit the same ids. Seeded once: a draw per id would cost every request without a
// traceparent a call into OpenSSL.
std::mt19937_64 traceIdGenerator() {
  std::array<uint32_t, std::mt19937_64::state_size * 2> words;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(words.data()), sizeof words) != 1) {
    std::random_device system;  // OpenSSL could not draw: the system's source
    for (auto& w : words) w = system();
  }
  std::seed_seq seed(words.begin(), words.end());
  return std::mt19937_64(seed);
}

// `bytes` random bytes as hex digits (trace and span ids), appended to `out`.
void appendRandomHex(std::string& out, size_t bytes) {
  thread_local std::mt19937_64 rng = traceIdGenerator();
  static constexpr char kHex[] = "0123456789abcdef";
  char buf[64];
  size_t n = std::min(bytes * 2, sizeof buf);
  for (size_t i = 0; i < n; i += 16) {
    uint64_t v = rng();
    for (size_t j = i; j < std::min(i + 16, n); ++j, v >>= 4) buf[j] = kHex[v & 0xF];
  }
  out.append(buf, n);
}

bool isHex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// The fields of a valid W3C traceparent, viewing the header.
struct TraceParent {
  std::string_view version, traceId, parentId, flags;
};

// A valid W3C traceparent (Trace Context, 3.2), else nothing. Version 00 is exactly 55
// characters; a later one (ff is invalid) may say more after them, and is read as far as 00
// goes: its first 55 characters, followed by the end or a '-' (3.2.4).
std::optional<TraceParent> parseTraceparent(std::string_view tp) {
  if (tp.size() < 55 || tp[2] != '-' || tp[35] != '-' || tp[52] != '-') return std::nullopt;
  TraceParent p{tp.substr(0, 2), tp.substr(3, 32), tp.substr(36, 16), tp.substr(53, 2)};
  if (!isHex(p.version) || p.version == "ff") return std::nullopt;
  if (p.version == "00" ? tp.size() != 55 : tp.size() > 55 && tp[55] != '-') return std::nullopt;
  if (!isHex(p.traceId) || !isHex(p.parentId) || !isHex(p.flags)) return std::nullopt;
  if (p.traceId == std::string_view("00000000000000000000000000000000") ||
      p.parentId == std::string_view("0000000000000000")) {
    return std::nullopt;
  }
  return p;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// Decision counters by verdict and rule, cached per thread: no lock and no allocation
// once a rule has been seen.
prometheus::Counter& decisionCounter(Metrics& metrics, Verdict verdict, const std::string& rule) {
  thread_local std::unordered_map<std::string, prometheus::Counter*, StringHash, std::equal_to<>>
      cache[4];  // by Verdict
  auto& byRule = cache[static_cast<int>(verdict)];
  auto it = byRule.find(std::string_view(rule));
  if (it == byRule.end())
    it = byRule.emplace(rule, &metrics.decision(verdictName(verdict), rule)).first;
  return *it->second;
}

// Steps by agent class and verdict, cached per thread like the decision counters.
prometheus::Counter& agentStepCounter(Metrics& metrics, Verdict verdict,
                                      const std::string& agentClass) {
  thread_local std::unordered_map<std::string, prometheus::Counter*, StringHash, std::equal_to<>>
      cache[4];  // by Verdict
  auto& byClass = cache[static_cast<int>(verdict)];
  auto it = byClass.find(std::string_view(agentClass));
  if (it == byClass.end())
    it = byClass.emplace(agentClass, &metrics.agentStep(agentClass, verdictName(verdict))).first;
  return *it->second;
}

prometheus::Counter& haltCounter(Metrics& metrics, const std::string& reason) {
  thread_local std::unordered_map<std::string, prometheus::Counter*> cache;
  auto it = cache.find(reason);
  if (it == cache.end()) it = cache.emplace(reason, &metrics.halts(reason)).first;
  return *it->second;
}

const char* errorName(int status) {
  switch (status) {
    case 404:
      return "no_route";
    case 408:
      return "request_timeout";
    case 413:
      return "body_too_large";
    case 414:
      return "uri_too_long";
    case 431:
      return "headers_too_large";
    case 508:
      return "loop_detected";
    default:
      return "bad_request";
  }
}

// The agent named by a verified client certificate: its subject CN, or its first URI SAN
// (spiffe://…). Empty without a verified certificate.
std::string peerIdentity(SSL* ssl, bool sanUri) {
  if (!ssl || SSL_get_verify_result(ssl) != X509_V_OK) return {};
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (!cert) return {};
  if (sanUri) {
    std::string out;
    auto* names =
        static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names) && out.empty(); ++i) {
      const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
      if (name->type == GEN_URI) {
        const auto* uri = name->d.uniformResourceIdentifier;
        out.assign(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)),
                   static_cast<size_t>(ASN1_STRING_length(uri)));
      }
    }
    GENERAL_NAMES_free(names);
    return out;
  }
  X509_NAME* subject = X509_get_subject_name(cert);
  int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (i < 0) return {};
  unsigned char* utf8 = nullptr;
  int n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i)));
  if (n < 0) return {};
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
  OPENSSL_free(utf8);
  return out;
}

// The protocols a head's Upgrade headers list: how many, and how many are WebSocket.
struct UpgradeTokens {
  size_t all = 0, webSocket = 0;
};
UpgradeTokens upgradeTokens(const HttpHead& head) {
  UpgradeTokens n;
  for (size_t i = 0; i < head.size(); ++i) {
    if (!equalsIgnoreCase(head.name(i), "upgrade")) continue;
    std::string_view v = head.value(i);
    while (!v.empty()) {
      auto comma = v.find(',');
      std::string_view token = v.substr(0, comma);
      while (!token.empty() && (token.front() == ' ' || token.front() == '\t'))
        token.remove_prefix(1);
      while (!token.empty() && (token.back() == ' ' || token.back() == '\t'))
        token.remove_suffix(1);
      if (!token.empty()) ++n.all;
      if (equalsIgnoreCase(token, "websocket")) ++n.webSocket;
      if (comma == std::string_view::npos) break;
      v.remove_prefix(comma + 1);
    }
  }
  return n;
}

// Whether the request's Upgrade asks for WebSocket (RFC 6455 4.1), among what it lists.
bool isWebSocketUpgrade(const HttpHead& head) {
  return upgradeTokens(head).webSocket > 0;
}

// The route of a reverse listener for host and path. The host first, as a virtual server is
// chosen: its exact name, else the longest `*.suffix` that matches, else `*`; then, among
// that host's routes, the longest path prefix (a plain string prefix, as nginx's). So a `*`
// route never takes a request meant for a host that has routes of its own.
const RouteConfig* findRoute(const std::vector<RouteConfig>& routes, std::string_view host,
                             std::string_view path) {
  auto hostRank = [&](const std::string& h) -> size_t {  // 0: no match
    if (h == host) return std::string::npos;
    if (h.starts_with("*.") && host.size() > h.size() - 1 &&
        host.ends_with(std::string_view(h).substr(1)))
      return h.size();  // a longer suffix is more specific
    return h == "*" ? 1 : 0;
  };
  size_t bestHost = 0;
  for (const auto& r : routes) bestHost = std::max(bestHost, hostRank(r.host));
  if (bestHost == 0) return nullptr;
  const RouteConfig* best = nullptr;
  for (const auto& r : routes) {
    if (hostRank(r.host) != bestHost || !path.starts_with(r.pathPrefix)) continue;
    if (!best || r.pathPrefix.size() > best->pathPrefix.size()) best = &r;
  }
  return best;
}

// in with its bytes outside ASCII percent-encoded; in itself (no copy) when it has none.
std::string percentEncodeNonAscii(std::string in) {
  if (std::all_of(in.begin(), in.end(),
                  [](char c) { return static_cast<unsigned char>(c) < 0x80; }))
    return in;
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(in.size());
  for (char c : in) {
    auto v = static_cast<unsigned char>(c);
    if (v < 0x80) {
      out += c;
      continue;
    }
    out += '%';
    out += kHex[v >> 4];
    out += kHex[v & 0xF];
  }
  return out;
}

// RFC 9110, 9.2.2: sending one of these twice has the effect of sending it once.
bool idempotentMethod(int method) {
  switch (method) {
    case HTTP_GET:
    case HTTP_HEAD:
    case HTTP_OPTIONS:
    case HTTP_TRACE:
    case HTTP_PUT:
    case HTTP_DELETE:
      return true;
    default:
      return false;
  }
}

}  // namespace

ClientSession::ClientSession(Worker& worker, ListenerRuntime& listener, StreamPtr client)
    : worker_(worker),
      listener_(listener),
      client_(std::move(client)),
      request_(
          HttpParser::Type::kRequest,
          HttpParser::Limits{worker.config().limits.maxHeaderBytes,
                             worker.config().limits.maxHeaders, worker.config().limits.maxUriBytes},
          requestSide_),
      response_(HttpParser::Type::kResponse,
                // An upstream's response head is bounded by the same header limit, doubled.
                HttpParser::Limits{worker.config().limits.maxHeaderBytes * 2,
                                   worker.config().limits.maxHeaders * 2,
                                   worker.config().limits.maxHeaderBytes * 2},
                responseSide_) {}

ClientSession::~ClientSession() = default;

void ClientSession::start() {
  listener_.metrics->activeConnections->Increment();
  client_->setHandler(this);
  clientTimer_ = Timer::create(worker_.loop(), [this] { onClientTimer(); });
  upstreamTimer_ = Timer::create(worker_.loop(), [this] { onUpstreamTimer(); });
  clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.headerRead.count()));
  if (listener_.tls) {
    // A reverse listener terminates TLS from the first byte (header_read covers the handshake).
    if (!client_->tlsBegin(listener_.tls, true) || client_->tlsHandshake() != 0) {
      close();
      return;
    }
  }
  if (listener_.config.kind == "transparent" && !listener_.admin) {
    transparent_ = peeking_ = true;
    auto dst = getOriginalDst(client_->tcp());
    if (dst)
      originalDst_ = dst.value();
    else
      notRedirected_ = dst.error().message;
  }
  updateReading();
}

void ClientSession::drain() {
  draining_ = true;
  if (phase_ == Phase::kHead && !request_.messageInProgress() && !headReady_ && pendingIn_.empty())
    close();
}

void ClientSession::reportOutcome() {
  if (outcomeReported_ || decision_.verdict != Verdict::kAllow || decision_.rule.empty() ||
      listener_.admin)
    return;
  outcomeReported_ = true;
  Outcome outcome;
  outcome.status = status_;
  outcome.sent = upstreamSentNs_ != 0;
  // A response the upstream cut short failed, whatever its status said.
  // Sent and unanswered counts as a failure when the upstream failed (upstreamError_); when
  // the agent left first, it says nothing of the upstream.
  outcome.failed = status_ >= 500 || (outcome.sent && status_ == 0 && !upstreamError_.empty()) ||
                   (responseStarted_ && !responseDone_ && !upstreamError_.empty());
  if (responseStarted_ && upstreamHeadNs_ != 0) {
    outcome.responseHeader = [this](std::string_view name) -> std::optional<std::string> {
      const auto& head = response_.head();
      std::optional<std::string> out;
      for (size_t i = 0; i < head.size(); ++i) {
        if (!equalsIgnoreCase(head.name(i), name)) continue;
        if (out)
          *out += ", ";
        else
          out.emplace();
        *out += head.value(i);
      }
      return out;
    };
  }
  if (responseDone_ && responseBodyWant_ > 0) outcome.responseBody = responseBodyKept_;
  worker_.decider().onOutcome(callInfo(), decision_, outcome);
  // What happened to the allowed call, linked to its decision by call_seq.
  char seq[24], status[8], durationUs[24], in[24], out[24];
  auto num = [](char* buf, size_t size, uint64_t v) {
    return std::string_view(buf, static_cast<size_t>(std::to_chars(buf, buf + size, v).ptr - buf));
  };
  // The bytes the agent sent and was sent (a tunnel's whole traffic: how much left through
  // a passthrough host is an incident responder's first question).
  AuditFields fields{
      {"call_seq", num(seq, sizeof seq, auditSeq_)},
      {"status", num(status, sizeof status, static_cast<uint64_t>(std::max(0, status_)))},
      {"sent", outcome.sent ? "true" : "false"},
      {"failed", outcome.failed ? "true" : "false"},
      {"duration_us", num(durationUs, sizeof durationUs, (uv_hrtime() - startNs_) / 1000)},
      {"bytes_in", num(in, sizeof in, bytesIn_)},
      {"bytes_out", num(out, sizeof out, bytesOut_)}};
  // Why it never reached the upstream (an upstream certificate that failed verification…).
  if (!upstreamError_.empty()) fields.emplace_back("error", upstreamError_);
  worker_.audit().appendEvent("outcome", fields, AuditSync::kBatched);  // no one waits for it
}

void ClientSession::close() {
  if (closed_) return;
  if (phase_ == Phase::kTunnel) logRequest();
  // A call cut short still reports: its reservation is settled, or released if unsent.
  reportOutcome();
  closed_ = true;
  worker_.resolver().cancel(this);
  worker_.resolver().cancel(&hostCheck_);
  client_.reset();
  upstream_.reset();
  for (const auto& key : pinnedKeys_) worker_.pool().drop(key);
  clientTimer_.reset();
  upstreamTimer_.reset();
  listener_.connections.fetch_sub(1, std::memory_order_relaxed);
  listener_.metrics->activeConnections->Decrement();
  worker_.release(this);
}

std::string_view ClientSession::agent() const {
  return agent_.empty() ? std::string_view("anonymous") : agent_;
}

void ClientSession::identify() {
  agent_.clear();
  const auto& l = listener_.config;
  const auto& head = request_.head();
  if (!l.identityHeader.empty()) {
    if (auto v = head.find(l.identityHeader)) agent_.assign(*v);
  } else if (l.identityProxyBasic) {
    // The user of Proxy-Authorization: Basic (the password is not checked here).
    auto v = head.find("proxy-authorization");
    if (v && v->size() > 6 && equalsIgnoreCase(v->substr(0, 6), "basic ")) {
      auto b64 = v->substr(6);
      std::string decoded(b64.size(), '\0');
      int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(decoded.data()),
                              reinterpret_cast<const unsigned char*>(b64.data()),
                              static_cast<int>(b64.size()));
      if (n > 0) {
        decoded.resize(static_cast<size_t>(n));
        auto colon = decoded.find(':');
        if (colon != std::string::npos) agent_ = decoded.substr(0, colon);
      }
    }
  } else if (!l.identityMtls.empty()) {
    agent_ = peerIdentity(client_->ssl(), l.identityMtls == "san_uri");
  } else if (!l.identityBearer.empty()) {
    auto v = head.find("authorization");
    if (auto token = v ? bearerToken(*v) : std::nullopt) {
      auto it = l.identityBearer.find("sha256:" + sha256Hex(*token));
      if (it != l.identityBearer.end()) agent_ = it->second;
    }
  } else if (!l.identitySource.empty()) {
    auto peer = client_->peerAddress();
    auto ip = peer.substr(0, peer.rfind(':'));
    if (ip.starts_with('[')) ip = ip.substr(1, ip.size() - 2);
    if (auto it = l.identitySource.find(ip); it != l.identitySource.end()) agent_ = it->second;
  }
  // Agent ids are names, not payloads.
  if (agent_.size() > 256 ||
      agent_.find_first_of(std::string_view("\0\r\n", 3)) != std::string::npos)
    agent_.clear();
  // Inside an intercepted tunnel, a request that names no agent is the CONNECT's.
  if (agent_.empty() && intercept_) agent_ = tunnelAgent_;
}

// ---- client side -------------------------------------------------------------------------

void ClientSession::onRead(TcpStream& stream, std::string_view data) {
  if (&stream == client_.get()) {
    bytesIn_ += data.size();
    lastClientReadMs_ = uv_now(worker_.loop());
    readClient(data);
  } else if (&stream == upstream_.get()) {
    readUpstream(data);
  }
  // A tunnel's bytes are counted as they flow, not at its close an hour later.
  if (phase_ == Phase::kTunnel && !closed_) meterBytes();
}

void ClientSession::readClient(std::string_view data) {
  std::string peeked;
  if (peeking_) {
    if (!peekTransparent(data, peeked)) return;
    data = peeked;
  }
  if (blindTls_ && phase_ != Phase::kTunnel) {
    pendingIn_.append(data);  // TLS for a passthrough host, relayed once it is allowed
    // The rest waits in the socket until the tunnel opens (updateReading() reads no client
    // while deciding or connecting), so a client cannot fill memory meanwhile.
    updateReading();
    return;
  }
  switch (phase_) {
    case Phase::kLingering:
      return;
    case Phase::kTunnel:
      upstream_->append(data);
      flushUpstream();
      return;
    default:
      break;
  }
  if (parserPaused_) {
    // A complete request is in progress: hold the next ones until its response is done.
    pendingIn_.append(data);
    updateReading();
    return;
  }
  // Requests are parsed one at a time; bytes of the next one wait in pendingIn_. A local
  // reply finishes an exchange at once, so the loop goes on with the pipelined bytes
  // instead of recursing from resetExchange().
  std::string_view input = data;
  std::string held;
  parsing_ = true;
  for (;;) {
    auto out = request_.execute(input);
    if (closed_) break;
    if (out.state == HttpParser::State::kError) {
      badRequest(request_.errorStatus(), errorName(request_.errorStatus()), request_.errorReason());
      break;
    }
    if (out.state == HttpParser::State::kPaused || out.state == HttpParser::State::kUpgrade) {
      parserPaused_ = true;
      pendingIn_.append(input.substr(out.consumed));
    }
    if (headReady_ && phase_ == Phase::kHead) {
      processRequestHead();
      if (closed_) break;
    } else if (phase_ == Phase::kBuffering && (requestDone_ || bodyTruncated_)) {
      decide();
      if (closed_) break;
    } else if (phase_ == Phase::kForwarding && upstream_) {
      flushUpstream();
    }
    if (listener_.admin && requestDone_ && status_ == 0 && phase_ == Phase::kDeciding &&
        !adminWaiting_) {
      handleAdmin();
      if (closed_) break;
    }
    if (phase_ != Phase::kHead || headReady_ || pendingIn_.empty()) break;
    // An agent that does not read its answers gets no more of them: the pipelined requests
    // wait in pendingIn_ (bounded) until its queue drains (onDrained()). Answered one after
    // another (local refusals need nothing from anyone), they grew its queue without end.
    if (upstreamBlocked_) break;
    held = std::move(pendingIn_);
    pendingIn_.clear();
    input = held;
  }
  parsing_ = false;
  updateReading();
}

void ClientSession::RequestSide::onMessageBegin(HttpParser&) {
  s.startNs_ = uv_hrtime();
  s.sawBytes_ = true;
  if (!s.firstRequest_) {
    s.clientTimer_->start(static_cast<uint64_t>(s.worker_.config().timeouts.headerRead.count()));
  }
}

int ClientSession::RequestSide::onHeadersComplete(HttpParser& p) {
  const auto& head = p.head();
  const auto& limits = s.worker_.config().limits;
  std::string reason;
  if (s.listener_.admin) {
    s.headReady_ = true;
    return 0;
  }
  // The agent first: a request refused below (no route, a bad target, too large) is
  // recorded against the agent that sent it, not as anonymous.
  s.identify();
  if (s.intercept_) {
    bool mismatch = false;
    if (!parseTunnelTarget(head, s.intercept_->host, s.interceptPort_, s.target_, reason,
                           mismatch)) {
      if (!mismatch) {
        p.fail(400, reason);
        return -1;
      }
      // Domain fronting: a halt, recorded against the tunnel's authority.
      s.localHaltRule_ = "tls.host_mismatch";
      s.localHaltReason_ = reason;
      s.target_.scheme = "https";
      s.target_.host = s.intercept_->host;
      s.target_.port = s.interceptPort_;
      s.target_.key = formatHostPort(s.target_.host, s.target_.port);
      s.target_.pathQuery = "/";
      s.target_.upstreamHost = s.target_.host;
      s.target_.upstreamPort = s.target_.port;
      s.target_.upstreamTls = true;
    } else if (s.intercept_->sniMismatch) {
      s.localHaltRule_ = "tls.sni_mismatch";
      s.localHaltReason_ = "the TLS server name (SNI) is " + s.intercept_->sni +
                           ", the CONNECT was to " + s.target_.key;
    }
  } else if (s.listener_.config.kind == "reverse") {
    if (!parseReverseTarget(head, s.listener_.tls != nullptr, s.listener_.boundPort, s.target_,
                            reason)) {
      p.fail(400, reason);
      return -1;
    }
  } else if (!parseTarget(head, s.target_, reason)) {
    p.fail(400, reason);
    return -1;
  }
  if (s.transparent_ && !s.transparentTarget(p)) return -1;
  // A method override (honoured by Rails, Laravel, Express's method-override, ASP.NET) would
  // make the tool run another method than the one decided: a GET classed as a read would
  // DELETE. Refused unless it names the method itself.
  // One pass over the head (per request), the names told apart by length first.
  for (size_t i = 0; i < head.size(); ++i) {
    auto name = head.name(i);
    if (name.size() < 13 || (name[0] != 'x' && name[0] != 'X')) continue;
    if (!equalsIgnoreCase(name, "x-http-method-override") &&
        !equalsIgnoreCase(name, "x-http-method") && !equalsIgnoreCase(name, "x-method-override"))
      continue;
    auto method = llhttp_method_name(static_cast<llhttp_method_t>(head.method));
    if (!equalsIgnoreCase(head.value(i), method)) {
      p.fail(400, std::string(name) + " would run " + std::string(head.value(i)) + " where " +
                      method + " was decided: send the method itself");
      return -1;
    }
  }
  // The upstream gets the path the policy judged: dot segments resolved, duplicate slashes
  // and needless escapes gone. A path that cannot be normalised is left for the decider,
  // which halts it when policies are on.
  if (s.target_.scheme != "tunnel") {
    auto q = s.target_.pathQuery.find('?');
    auto normal = Extractor::normalisePath(std::string_view(s.target_.pathQuery).substr(0, q));
    if (!normal && s.listener_.config.kind == "reverse") {
      // A reverse listener scopes calls by path prefix: a path it cannot normalise could
      // climb out of its route at the upstream (`/public/../admin/%FF`), and without
      // policies nothing else would look at it.
      p.fail(400, "the path cannot be normalised: " + normal.error().message);
      return -1;
    }
    if (normal) {
      // The policy matched UTF-8 decoded; on the wire a path is ASCII (RFC 3986), so those
      // bytes go out escaped again, as most agents sent them.
      std::string wire = percentEncodeNonAscii(std::move(normal.value()));
      if (q != std::string::npos) wire += s.target_.pathQuery.substr(q);
      s.target_.pathQuery = std::move(wire);
    }
  }
  // A reverse listener routes by the normalised path (a dot segment cannot climb out of a
  // route's prefix), without path parameters as the policy matches it (`/admin;x/` is
  // `/admin/`'s route).
  if (s.listener_.config.kind == "reverse") {
    // The host as the routes (and the policy) are written: an IP literal in its canonical
    // form (10.0.0.01 is 10.0.0.1, fd00:0::1 is fd00::1), or another route than the one the
    // policy judged the call for could take it.
    auto canonicalHost = Extractor::canonicalHost(s.target_.host);
    const RouteConfig* route = findRoute(
        s.listener_.config.routes, canonicalHost ? canonicalHost.value() : s.target_.host,
        Extractor::withoutPathParameters(
            std::string_view(s.target_.pathQuery).substr(0, s.target_.pathQuery.find('?'))));
    if (!route) {
      p.fail(404, "no route for " + s.target_.key +
                      s.target_.pathQuery.substr(0, s.target_.pathQuery.find('?')));
      return -1;
    }
    s.target_.upstreamHost = route->upstream.host;
    s.target_.upstreamPort = route->upstream.port;
    s.target_.upstreamTls = route->upstreamTls;
    // The certificate was chosen by the SNI: a Host naming another tool is fronting.
    if (SSL* ssl = s.client_->ssl()) {
      const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
      // Compared as hosts are: without a trailing dot (the target's was removed).
      std::string_view sni = name ? name : "";
      if (sni.ends_with('.')) sni.remove_suffix(1);
      if (name && !equalsIgnoreCase(sni, s.target_.host)) {
        s.localHaltRule_ = "tls.host_mismatch";
        s.localHaltReason_ = "the Host header names " + s.target_.host +
                             ", the TLS server name (SNI) " + std::string(sni);
      }
    }
  }
  if (limits.maxBodyBytes != 0 && p.hasContentLength() && p.contentLength() > limits.maxBodyBytes) {
    p.fail(413, "request body larger than " + std::to_string(limits.maxBodyBytes) + " bytes");
    return -1;
  }
  for (size_t i = 0; i < head.size(); ++i) {
    if (equalsIgnoreCase(head.name(i), "via") &&
        head.value(i).find(viaToken()) != std::string_view::npos) {
      p.fail(508, "the request came back through this proxy");
      return -1;
    }
  }
  s.headReady_ = true;
  s.requestChunked_ = p.chunked();
  // Only WebSocket is tunnelled: what it carries is one conversation with the tool the
  // upgrade request was decided for. Another protocol (h2c: every HTTP/2 request after the
  // 101 would pass undecided) is not offered to the upstream: Upgrade is hop-by-hop, so the
  // request goes on as plain HTTP/1.1, and a 101 to it is refused.
  s.isUpgrade_ = p.upgrade() && head.method != HTTP_CONNECT && isWebSocketUpgrade(head);
  // An HTTP/1.0 client is never sent a 100 (RFC 9110, 10.1.1: the expectation is ignored).
  if (auto expect = head.find("expect"); expect && (head.versionMajor > 1 || head.versionMinor > 0))
    s.expectContinue_ = equalsIgnoreCase(*expect, "100-continue");
  auto traceparent = head.find("traceparent");
  auto parent = traceparent ? parseTraceparent(*traceparent) : std::nullopt;
  if (parent) {
    s.traceId_.assign(parent->traceId);
  } else {
    s.traceId_.clear();  // keeps its buffer from the connection's last request
    appendRandomHex(s.traceId_, 16);
  }
  if (head.method == HTTP_CONNECT) return 0;
  // Rules that look at params or MCP need the body before the decision (bounded).
  if (p.chunked() || (p.hasContentLength() && p.contentLength() > 0)) {
    s.bodyNeed_ = s.worker_.decider().bodyNeeded(s.target_.host);
  }

  // The upstream request: origin-form, canonical Host, hop-by-hop headers removed.
  auto& out = s.upOut_;
  out.clear();
  out += llhttp_method_name(static_cast<llhttp_method_t>(head.method));
  out += ' ';
  out += s.target_.pathQuery;
  out += " HTTP/1.1\r\nHost: ";
  out += s.target_.upstreamAuthority();
  out += "\r\n";
  bool hasConnection = head.find("connection").has_value();
  for (size_t i = 0; i < head.size(); ++i) {
    auto name = head.name(i);
    if (isHopByHop(name) || (hasConnection && namedByConnection(head, name))) continue;
    // A bearer token the listener identifies agents by is the sidecar's, not the tool's.
    if (!s.listener_.config.identityBearer.empty() && equalsIgnoreCase(name, "authorization"))
      continue;
    out += name;
    out += ": ";
    out += head.value(i);
    out += "\r\n";
  }
  if (s.isUpgrade_) {
    // WebSocket alone, whatever else the agent listed (`h2c, websocket`): the upstream
    // must not be offered a protocol whose requests would pass undecided.
    out += "Connection: upgrade\r\nUpgrade: websocket\r\n";
  }
  out += "Via: 1.1 ";
  out += viaToken();
  out += "\r\ntraceparent: ";
  if (parent && parent->version == "00") {
    out += *traceparent;
  } else if (parent) {
    // A later version than the one this proxy knows: passed on as what it understood of it,
    // a version 00 header with the same ids and the sampled flag (the flags' lowest bit).
    char last = parent->flags[1];
    bool sampled = ((last <= '9' ? last - '0' : last - 'a' + 10) & 1) != 0;
    out += "00-";
    out += parent->traceId;
    out += '-';
    out += parent->parentId;
    out += sampled ? "-01" : "-00";
  } else {
    out += "00-";
    out += s.traceId_;
    out += '-';
    appendRandomHex(out, 8);
    out += "-01";
  }
  out += "\r\n";
  if (s.requestChunked_) {
    // Re-chunked on the way, with the codings under the chunking kept ("gzip, chunked").
    out += "Transfer-Encoding: ";
    out += transferEncodingOf(head);
    out += "\r\n";
  } else if (p.hasContentLength()) {
    out += "Content-Length: ";
    out += std::to_string(p.contentLength());
    out += "\r\n";
  }
  out += "\r\n";
  return 0;
}

int ClientSession::RequestSide::onBody(HttpParser& p, std::string_view data) {
  s.bodyBytes_ += data.size();
  auto max = s.worker_.config().limits.maxBodyBytes;
  if (max != 0 && s.bodyBytes_ > max) {
    p.fail(413, "request body larger than " + std::to_string(max) + " bytes");
    return -1;
  }
  if (s.discardBody_ || s.listener_.admin) return 0;
  if (s.bodyNeed_ > 0 && s.phase_ <= Phase::kBuffering) {
    if (s.body_.size() + data.size() > s.bodyNeed_)
      s.bodyTruncated_ = true;
    else
      s.body_.append(data);
  }
  auto& out = (s.upstream_ && s.phase_ == Phase::kForwarding) ? s.upstream_->output() : s.upOut_;
  if (s.requestChunked_)
    appendChunk(out, data);
  else
    out += data;
  return 0;
}

int ClientSession::RequestSide::onMessageComplete(HttpParser& p) {
  s.requestDone_ = true;
  if (s.phase_ == Phase::kForwarding && !s.responseStarted_) {
    s.upstreamTimer_->start(
        static_cast<uint64_t>(s.worker_.config().timeouts.upstreamResponse.count()));
  }
  s.requestKeepAlive_ = p.keepAlive();
  if (s.requestChunked_ && !s.discardBody_ && !s.listener_.admin) {
    auto& out = (s.upstream_ && s.phase_ == Phase::kForwarding) ? s.upstream_->output() : s.upOut_;
    out += "0\r\n\r\n";
  }
  // CONNECT and upgrades end the HTTP part of the stream: llhttp pauses by itself.
  if (p.upgrade()) return 0;
  return HPE_PAUSED;
}

void ClientSession::processRequestHead() {
  phase_ = Phase::kDeciding;
  firstRequest_ = false;
  if (listener_.admin) {
    // Answered once the request is complete: a body still to come is read first (asked for
    // with a 100 when the client waits for one), within header_read.
    const auto& head = request_.head();
    if (!requestDone_) {
      auto expect = head.find("expect");
      if (expect && equalsIgnoreCase(*expect, "100-continue") &&
          (head.versionMajor > 1 || head.versionMinor > 0)) {
        client_->append("HTTP/1.1 100 Continue\r\n\r\n");
        flushClient();
        if (closed_) return;
      }
      clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.headerRead.count()));
    }
    return;
  }
  if (!localHaltRule_.empty()) {
    haltLocally(std::move(localHaltRule_), std::move(localHaltReason_));
    return;
  }
  if (request_.head().method == HTTP_CONNECT && listener_.config.interceptTls &&
      !hostMatches(listener_.config.passthrough, target_.host)) {
    startIntercept();
    return;
  }
  if (transparent_ && !intercept_) {
    // (Inside intercepted TLS the upstream's certificate must name the host instead.)
    checkTransparentHost();  // goes on with readBodyOrDecide() once the Host is checked
    return;
  }
  readBodyOrDecide();
}

void ClientSession::readBodyOrDecide() {
  if (bodyNeed_ > 0 && !requestDone_ && !bodyTruncated_) {
    // Read the body (up to the policy's bound) before deciding; a client waiting for
    // 100 Continue is told to send it.
    phase_ = Phase::kBuffering;
    clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.headerRead.count()));
    if (expectContinue_) {
      client_->append("HTTP/1.1 100 Continue\r\n\r\n");
      continueSent_ = true;
      flushClient();
    }
    return;
  }
  decide();
}

CallInfo ClientSession::callInfo() const {
  const auto& head = request_.head();
  CallInfo call;
  call.listener = listener_.config.name;
  call.agent = agent();
  call.method =
      blindTls_ ? "CONNECT" : llhttp_method_name(static_cast<llhttp_method_t>(head.method));
  call.scheme = target_.scheme;
  call.host = target_.host;
  call.port = target_.port;
  call.target = target_.pathQuery;
  call.contentType = head.find("content-type").value_or("");
  if (bodyNeed_ > 0) {
    call.bodyAvailable = true;
    call.bodyTruncated = bodyTruncated_;
    call.body = body_;
    call.bodySha256 = bodySha256_;
  }
  return call;
}

void ClientSession::decide() {
  phase_ = Phase::kDeciding;
  // Hashed once: the approval fingerprint and the audit record's params_sha256 both use it.
  if (bodyNeed_ > 0) bodySha256_ = sha256Hex(body_);
  CallInfo call = callInfo();
  ++pendingCallbacks_;
  uint64_t started = uv_hrtime();
  worker_.decider().decide(call, [this, started](Decision d) {
    --pendingCallbacks_;
    worker_.metrics().decisionSeconds().Observe(static_cast<double>(uv_hrtime() - started) / 1e9);
    if (!closed_) {
      onDecision(d);
      return;
    }
    // Closed while deciding (the agent went away while Redis answered the reserve, or the
    // drain's deadline came): an allowed call was never sent, so its budget hold is
    // released now, not committed when it expires.
    if (d.verdict == Verdict::kAllow && d.context) {
      Outcome unsent;
      unsent.sent = false;
      worker_.decider().onOutcome(callInfo(), d, unsent);
    }
  });
}

void ClientSession::onDecision(const Decision& decided) {
  Decision d = decided;
  if (d.verdict == Verdict::kAllow && !worker_.audit().healthy()) {
    // Fail closed: a call whose decision cannot be recorded durably does not go out. It was
    // allowed, so the decider hears that it was never sent (its budget hold is released).
    Outcome unsent;
    unsent.sent = false;
    worker_.decider().onOutcome(callInfo(), decided, unsent);
    d.verdict = Verdict::kHalt;
    d.context.reset();
    d.rule = "audit";
    d.agentReason.clear();
    d.reason = "audit_unavailable: the audit stream cannot be written (disk full or failing)";
  }
  decision_ = d;
  const char* verdict = verdictName(d.verdict);
  const auto& head = request_.head();
  AuditRecord record;
  record.kind = "call";
  record.agent = agent();
  record.tool = d.tool;
  record.method =
      blindTls_ ? "CONNECT" : llhttp_method_name(static_cast<llhttp_method_t>(head.method));
  record.authority = target_.key;
  record.path = redactQuery(target_.pathQuery, worker_.config().auditRedactQueryParams);
  record.decision = worker_.config().observe && d.verdict != Verdict::kAllow
                        ? std::string("observe-") + verdict
                        : verdict;
  record.rule = d.rule;
  record.reason = d.reason;
  record.policyDigest = d.policyDigest;
  if (bodyNeed_ > 0)  // decided without decide() (a local halt): hashed here
    record.paramsSha256 = "sha256:" + (bodySha256_.empty() ? sha256Hex(body_) : bodySha256_);
  // A call forwarded once its record is durable waits for it (awaitDurable below): the
  // worker asks for the sync at the end of its loop turn, so the record goes as kBatched.
  auditSeq_ = worker_.audit().append(std::move(record));

  if (d.verdict != Verdict::kAllow && !worker_.config().observe) {
    countDecision(d);
    refuse(d);
    return;
  }
  // The decision is durable before the call goes out (group commit: one fsync for every
  // call of the worker's loop turn, and for what the other workers queued meanwhile). It is
  // counted then: a record the stream fails to sync makes the call a halt, counted instead.
  if (auditSeq_ > worker_.audit().durableSeq()) {
    ++pendingCallbacks_;
    worker_.awaitDurable(auditSeq_, this);
    return;
  }
  countDecision(d);
  connectUpstream();
}

void ClientSession::onAuditDurable(AuditWait result) {
  --pendingCallbacks_;
  if (result == AuditWait::kDurable) {
    countDecision(decision_);  // decided, whether or not the agent is still there
    if (!closed_) connectUpstream();
    return;
  }
  // The stream failed before the record reached the disk: fail closed. The call was never
  // sent, so its budget hold is released.
  Decision d = decision_;
  d.verdict = Verdict::kHalt;
  d.context.reset();
  d.rule = "audit";
  d.agentReason.clear();
  d.reason = result == AuditWait::kTimedOut
                 ? "audit_unavailable: the call's audit record was not on disk within " +
                       std::to_string(Worker::kDurableWaitMs / 1000) + " s (the disk is stalled)"
                 : "audit_unavailable: the audit stream cannot be written (disk full or failing)";
  countDecision(d);
  if (closed_) return;
  reportOutcome();
  decision_ = d;
  refuse(d);
}

void ClientSession::countDecision(const Decision& d) {
  decisionCounter(worker_.metrics(), d.verdict, d.rule).Increment();
  if (!d.agentClass.empty())
    agentStepCounter(worker_.metrics(), d.verdict, d.agentClass).Increment();
  if (d.verdict != Verdict::kHalt) return;
  // A budget that cannot cover the call is a halt cause of its own (DESIGN §3), not a rule.
  bool builtin = d.rule == "default-deny" || d.rule == "extract" || d.rule == "cascade" ||
                 d.rule == "breaker" || d.rule == "budget" || d.rule == "audit" ||
                 d.rule == "approval_limit" || d.rule.starts_with("hosts.") ||
                 d.rule.starts_with("tls.") || d.rule.starts_with("transparent.");
  haltCounter(worker_.metrics(), builtin ? d.rule : std::string("rule")).Increment();
}

void ClientSession::refuse(const Decision& d) {
  if (blindTls_) {
    close();  // a TLS client: no HTTP answer it could read; the record says why
    return;
  }
  const char* verdict = verdictName(d.verdict);
  bool throttle = d.verdict == Verdict::kThrottle;
  bool approve = d.verdict == Verdict::kApprove;
  std::string body;
  JsonObject obj(body);
  obj.add("error", throttle  ? "throttled"
                   : approve ? "approval_required"
                             : "halted")
      .add("rule", d.rule)
      .add("reason", d.agentReason.empty() ? d.reason : d.agentReason)
      .add("agent", agent())
      .add("tool", d.tool)
      .add("audit_seq", auditSeq_);
  if (approve) obj.add("approval_id", d.approvalId);
  if (throttle) obj.add("retry_after", d.retryAfterSeconds);
  obj.close();
  body += '\n';
  std::string extra = "X-Tollgate-Decision: ";
  extra += verdict;
  extra += "; rule=";
  extra += d.rule;
  if (approve) {
    extra += "; approval=";
    extra += d.approvalId;
  }
  extra += "\r\n";
  if (throttle)
    extra += "Retry-After: " + std::to_string(std::max(1, d.retryAfterSeconds)) + "\r\n";
  discardBody_ = true;
  upOut_.clear();
  // With the body still to come (or held back by Expect), the connection cannot be reused.
  reply(throttle ? 429 : 403, body, extra, !requestDone_);
}

// ---- upstream side -----------------------------------------------------------------------

void ClientSession::connectUpstream() {
  phase_ = Phase::kConnecting;
  if (!retried_ && !hostUnverified_) {
    StreamPtr idle = pinned_ ? worker_.pool().take(pinKey()) : nullptr;
    if (!idle) idle = worker_.pool().take(poolKey());
    if (idle) {
      attachUpstream(std::move(idle), true);
      return;
    }
  }
  if (transparent_) {
    // Where the client dialled, not a fresh lookup of Host: checkTransparentHost() made
    // sure that the name resolves to this address.
    onResolved(0, {originalDst_});
    return;
  }
  // The lookup counts against upstream_connect too: a name server that never answers (the
  // system resolver waits for it for seconds, on libuv's few threads) ends in a 504.
  upstreamTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.upstreamConnect.count()));
  worker_.resolver().resolve(target_.upstreamHost, this);
}

void ClientSession::onResolved(int status, const std::vector<sockaddr_storage>& addrs) {
  if (closed_ || phase_ != Phase::kConnecting || upstream_) return;
  upstreamTimer_->stop();
  if (status < 0) {
    worker_.metrics().upstreamConnectErrors("dns").Increment();
    upstreamFailed(502, "upstream_unavailable",
                   "cannot resolve " + target_.upstreamHost + ": " + Resolver::describe(status));
    return;
  }
  // egress.deny_addresses: whatever name (or IP form) led here, no connection goes there.
  addrs_.clear();
  std::string denied;
  for (const auto& a : addrs) {
    const auto& ranges = worker_.config().denyAddresses;
    auto in = std::find_if(ranges.begin(), ranges.end(),
                           [&](const AddressRange& r) { return r.contains(a); });
    if (in == ranges.end()) {
      addrs_.push_back(a);
    } else if (denied.empty()) {
      denied = formatAddress(a, false) + " (in " + in->text + ")";
    }
  }
  if (addrs_.empty()) {
    worker_.metrics().upstreamConnectErrors("denied").Increment();
    upstreamFailed(
        403, "address_denied",
        target_.upstreamHost + " is " + denied + ", an address egress.deny_addresses forbids");
    return;
  }
  nextAddr_ = 0;
  connectNextAddress();
}

void ClientSession::connectNextAddress() {
  // One deadline (upstream_connect) for every address, shared among those left: an address
  // whose packets vanish (a blackholed IPv6 path in front of a working IPv4 one) costs its
  // share, and the next one is tried, where it used to take all of it and fail the call. A
  // share is at least 2 s (one lost SYN is resent after 1 s), or what is left: a name with
  // eight addresses does not leave each too little to connect over a slow path.
  uint64_t now = uv_now(worker_.loop());
  if (nextAddr_ == 0)
    connectDeadlineMs_ =
        now + static_cast<uint64_t>(worker_.config().timeouts.upstreamConnect.count());
  uint64_t remaining = connectDeadlineMs_ > now ? connectDeadlineMs_ - now : 1;
  constexpr uint64_t kMinShareMs = 2000;
  uint64_t share = std::max<uint64_t>(
      {1, remaining / (addrs_.size() - nextAddr_), std::min(remaining, kMinShareMs)});
  auto addr = addrs_[nextAddr_++];
  if (addr.ss_family == AF_INET6)
    reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port = htons(target_.upstreamPort);
  else
    reinterpret_cast<sockaddr_in*>(&addr)->sin_port = htons(target_.upstreamPort);
  upstream_ = TcpStream::create(worker_.loop());
  upstream_->setHandler(this);
  upstreamTimer_->start(share);
  if (int rc = upstream_->connect(reinterpret_cast<const sockaddr*>(&addr)); rc != 0)
    onConnect(*upstream_, rc);
}

void ClientSession::onConnect(TcpStream& stream, int status) {
  if (&stream != upstream_.get() || phase_ != Phase::kConnecting) return;
  upstreamTimer_->stop();
  if (status < 0) {
    upstream_.reset();
    if (nextAddr_ < addrs_.size()) {
      connectNextAddress();
      return;
    }
    worker_.metrics().upstreamConnectErrors(uv_err_name(status)).Increment();
    upstreamFailed(502, "upstream_unavailable", std::string("connect: ") + uv_strerror(status));
    return;
  }
  nextAddr_ = addrs_.size();  // connected: a TLS handshake that times out tries no other
  if (target_.upstreamTls) {
    startUpstreamTls();
    return;
  }
  attachUpstream(std::move(upstream_), false);
}

std::string ClientSession::pinKey() {
  static std::atomic<uint64_t> next{1};
  if (sessionId_ == 0) sessionId_ = next.fetch_add(1, std::memory_order_relaxed);
  return poolKey() + " pinned " + std::to_string(sessionId_);
}

namespace {

// Authentication that authenticates the connection rather than the request (RFC 4559;
// NTLM over HTTP): "NTLM …" or "Negotiate …" in an Authorization or WWW-Authenticate field.
bool connectionAuth(std::string_view v) {
  auto scheme = v.substr(0, v.find(' '));
  return equalsIgnoreCase(scheme, "ntlm") || equalsIgnoreCase(scheme, "negotiate");
}

bool usesConnectionAuth(const HttpHead& request, const HttpHead& response) {
  for (size_t i = 0; i < request.size(); ++i)
    if (equalsIgnoreCase(request.name(i), "authorization") && connectionAuth(request.value(i)))
      return true;
  for (size_t i = 0; i < response.size(); ++i) {
    if (!equalsIgnoreCase(response.name(i), "www-authenticate")) continue;
    // A field may list several challenges: "Negotiate, NTLM" or "Basic realm=x, NTLM".
    std::string_view v = response.value(i);
    for (size_t start = 0; start <= v.size();) {
      auto comma = v.find(',', start);
      auto part = v.substr(start, comma == std::string_view::npos ? v.npos : comma - start);
      while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
      if (connectionAuth(part)) return true;
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }
  }
  return false;
}

}  // namespace

const std::string& ClientSession::poolKey() {
  // A TLS connection is never handed to a plain-HTTP call to the same host:port, or back.
  // The common case, a plain call to where the target names, needs no new string.
  if (!target_.upstreamTls && target_.upstreamHost == target_.host &&
      target_.upstreamPort == target_.port)
    return target_.key;
  if (poolKey_.empty()) {
    poolKey_ = target_.upstreamTls ? "tls:" : "";
    poolKey_ += formatHostPort(target_.upstreamHost, target_.upstreamPort);
  }
  return poolKey_;
}

void ClientSession::startUpstreamTls() {
  SSL* ssl = upstream_->tlsBegin(worker_.tls().upstreamClient(), false);
  Status prepared =
      ssl ? worker_.tls().prepareUpstream(ssl, target_.upstreamHost, target_.upstreamPort)
          : Status(Error{-1, "SSL_new: " + takeOpenSslErrors()});
  if (!prepared) {
    upstreamFailed(502, "upstream_tls", prepared.error().message);
    return;
  }
  // The connect timeout covers the handshake too.
  upstreamTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.upstreamConnect.count()));
  if (int rc = upstream_->tlsHandshake(); rc != 0) onHandshake(*upstream_, rc);
}

void ClientSession::onHandshake(TcpStream& stream, int status) {
  if (&stream == client_.get()) {
    if (status == 0) return;
    // The agent gave up on the leaf (it does not trust the local CA, …) or sent no TLS.
    std::string why =
        intercept_ && !intercept_->error.empty() ? intercept_->error : stream.tlsError();
    worker_.metrics().tlsHandshakeFailures("agent").Increment();
    if (intercept_ && intercept_->sniMismatch && !intercept_->error.empty()) {
      // Domain fronting the CA cannot even present a leaf for (outside its name
      // constraints): no request ever comes to be halted, so the attempt is recorded here.
      refuseConnection("tls.sni_mismatch",
                       "the TLS server name (SNI) " + intercept_->sni +
                           " is not the CONNECT host " + intercept_->host +
                           ", and no leaf could be presented for it: " + why,
                       formatHostPort(intercept_->host, interceptPort_));
      return;
    }
    Log::Line(LogLevel::kInfo, "agent TLS handshake failed")
        .add("listener", listener_.config.name)
        .add("authority", intercept_ ? formatHostPort(intercept_->host, interceptPort_) : "")
        .add("agent", agent())
        .add("reason", why)
        .emit();
    close();
    return;
  }
  if (&stream != upstream_.get() || phase_ != Phase::kConnecting) return;
  upstreamTimer_->stop();
  if (status != 0) {
    // Never a silent pass: the agent is told why, and the outcome record keeps it.
    upstreamError_ = stream.tlsError().empty() ? uv_strerror(status) : stream.tlsError();
    worker_.metrics().upstreamConnectErrors("tls").Increment();
    worker_.metrics().tlsHandshakeFailures("upstream").Increment();
    upstreamFailed(502, "upstream_tls", "TLS to " + target_.key + ": " + upstreamError_);
    return;
  }
  attachUpstream(std::move(upstream_), false);
}

void ClientSession::attachUpstream(StreamPtr stream, bool reused) {
  upstream_ = std::move(stream);
  upstream_->setHandler(this);
  upstreamReused_ = reused;
  if (target_.scheme == "tunnel") {
    startTunnel();
    return;
  }
  // A pooled connection may have been closed by the upstream a moment ago; a request
  // without a body can then be sent once more on a fresh connection, if sending it twice
  // is harmless: an idempotent method (RFC 9110, 9.2.2) or one the agent marked with an
  // Idempotency-Key. A POST may have run before the close: it is answered 502, never
  // sent twice.
  if (reused && requestDone_ && bodyBytes_ == 0 && !requestChunked_ &&
      (idempotentMethod(request_.head().method) ||
       request_.head().find("idempotency-key").has_value()))
    retryHead_ = upOut_;
  sendRequest();
}

void ClientSession::sendRequest() {
  phase_ = Phase::kForwarding;
  if (expectContinue_ && !requestDone_ && !continueSent_) {
    client_->append("HTTP/1.1 100 Continue\r\n\r\n");
    flushClient();
    if (closed_) return;
  }
  upstream_->append(upOut_);
  upOut_.clear();
  upstreamSentNs_ = uv_hrtime();
  // The response timeout runs from the end of the request: an upload may take long.
  if (requestDone_) {
    upstreamTimer_->start(
        static_cast<uint64_t>(worker_.config().timeouts.upstreamResponse.count()));
  } else {
    // The body is still coming: a client that stops sending it is cut off after `idle`.
    lastClientReadMs_ = uv_now(worker_.loop());
    clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.idle.count()));
  }
  flushUpstream();
  updateReading();
}

void ClientSession::startTunnel() {
  status_ = 200;
  upstreamSentNs_ = uv_hrtime();
  enterTunnel();
  if (!blindTls_) {
    client_->append("HTTP/1.1 200 Connection established\r\n\r\n");
    flushClient();
    if (closed_) return;
  }
  if (!pendingIn_.empty()) {
    upstream_->append(pendingIn_);
    pendingIn_.clear();
    flushUpstream();
  }
  updateReading();
}

void ClientSession::haltLocally(std::string rule, std::string reason) {
  // The tunnel itself is suspect (fronting): nothing more goes over it.
  if (rule.starts_with("tls.")) closeAfterResponse_ = true;
  Decision d;
  d.verdict = Verdict::kHalt;
  d.rule = std::move(rule);
  d.reason = std::move(reason);
  d.tool = "host:" + target_.host;
  onDecision(d);
}

void ClientSession::startIntercept() {
  if (!recordIntercept(target_.host, target_.port)) return;
  status_ = 200;
  client_->append("HTTP/1.1 200 Connection established\r\n\r\n");
  flushClient();
  if (closed_) return;
  logRequest();
  // What the agent sent after the CONNECT is the start of its ClientHello.
  std::string early = std::move(pendingIn_);
  pendingIn_.clear();
  parserPaused_ = false;
  request_.reset();
  std::string host = target_.host;
  uint16_t port = target_.port;
  // The CONNECT's agent (its Proxy-Authorization, say) owns the requests inside the tunnel
  // that name none: kept across the reset, which clears the exchange's agent.
  std::string agent = std::move(agent_);
  resetExchange();
  agent_ = std::move(agent);
  beginInterceptTls(host, port, early);
}

bool ClientSession::recordIntercept(const std::string& host, uint16_t port) {
  // The leaf first: a host the CA may not sign for (name constraints) is refused here (in
  // plain HTTP after a CONNECT) instead of with a certificate the agent would reject.
  if (auto leaf = worker_.tls().leaves()->get(host); !leaf) {
    auto reason = "cannot intercept " + formatHostPort(host, port) + ": " + leaf.error().message;
    if (transparent_)
      refuseConnection("tls.intercept", reason, formatHostPort(host, port));
    else
      haltLocally("tls.intercept", reason);
    return false;
  }
  AuditRecord record;
  record.kind = "call";
  record.agent = agent();
  record.tool = "host:" + host;
  record.method = transparent_ ? "TLS" : "CONNECT";
  record.authority = formatHostPort(host, port);
  record.decision = "allow";
  record.rule = "tls.intercept";
  record.reason = "TLS intercepted: each request inside the tunnel is decided on its own";
  auditSeq_ = worker_.audit().append(std::move(record));
  decision_.verdict = Verdict::kAllow;
  decision_.rule = "tls.intercept";
  outcomeReported_ = true;  // the decider never saw the CONNECT: nothing to settle
  decisionCounter(worker_.metrics(), decision_.verdict, decision_.rule).Increment();
  return true;
}

void ClientSession::beginInterceptTls(const std::string& host, uint16_t port,
                                      std::string_view early) {
  auto& tls = worker_.tls();
  intercept_ = std::make_unique<InterceptTls>();
  intercept_->leaves = tls.leaves();
  intercept_->host = host;
  interceptPort_ = port;
  tunnelAgent_ = agent_;
  // The host's ready context (its leaf, minted by recordIntercept()): nothing is set per SSL.
  auto ctx = tls.leaves()->serverContext(host);
  SSL* ssl = ctx ? client_->tlsBegin(ctx.value().get(), true) : nullptr;
  if (!ssl) {
    Log::Line(LogLevel::kError, "cannot start the agent's TLS")
        .add("reason", ctx ? takeOpenSslErrors() : ctx.error().message)
        .emit();
    close();
    return;
  }
  prepareIntercept(ssl, intercept_.get());
  clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.headerRead.count()));
  if (client_->tlsHandshake(early) != 0) {
    close();
    return;
  }
  updateReading();
}

void ClientSession::readUpstream(std::string_view data) {
  if (phase_ == Phase::kTunnel) {
    lastUpstreamReadMs_ = uv_now(worker_.loop());
    client_->append(data);
    flushClient();
    return;
  }
  if (phase_ != Phase::kForwarding) return;
  lastUpstreamReadMs_ = uv_now(worker_.loop());
  auto out = response_.execute(data);
  if (closed_) return;
  switch (out.state) {
    case HttpParser::State::kError:
      if (!responseStarted_) {
        upstreamFailed(502, "upstream_unavailable",
                       "invalid response from upstream: " + response_.errorReason());
      } else {
        close();
      }
      return;
    case HttpParser::State::kUpgrade: {
      // 101: from here on both connections carry the upgraded protocol.
      upstreamTimer_->stop();
      enterTunnel();
      client_->append(data.substr(out.consumed));
      flushClient();
      if (closed_) return;
      if (!pendingIn_.empty()) {
        upstream_->append(pendingIn_);
        pendingIn_.clear();
        flushUpstream();
      }
      updateReading();
      return;
    }
    case HttpParser::State::kPaused:
      // Bytes after a complete response: the upstream is confused, do not reuse it.
      if (out.consumed < data.size()) response_.fail(502, "bytes after the end of the response");
      break;
    case HttpParser::State::kOk:
      break;
  }
  flushClient();
  if (closed_) return;
  if (responseDone_) finishExchange();
}

int ClientSession::ResponseSide::onHeadersComplete(HttpParser& p) {
  const auto& head = p.head();
  int status = head.status;
  if (status >= 100 && status < 200 && status != 101) {
    // 100 Continue and friends: the proxy answered Expect itself. An interim response has
    // no body (RFC 9110, 15.2): one framed with one is an upstream out of step (read as a
    // body, it could carry a whole response to the agent ahead of the real one).
    if ((p.hasContentLength() && p.contentLength() > 0) || head.find("transfer-encoding")) {
      p.fail(502, "an interim " + std::to_string(status) + " response framed with a body");
      return -1;
    }
    s.interim_ = true;
    return 1;  // no body
  }
  if (status == 101 && !s.isUpgrade_) {
    p.fail(502, "101 without an upgrade request");
    return -1;
  }
  if (status == 101 && !p.upgrade()) {
    // Without Upgrade and Connection: upgrade, llhttp goes on reading HTTP while the agent
    // would switch protocols.
    p.fail(502, "101 without Upgrade and Connection: upgrade");
    return -1;
  }
  if (auto tokens = upgradeTokens(head);
      status == 101 && (tokens.all != 1 || tokens.webSocket != 1)) {
    // Only WebSocket was asked for; a switch to anything else (h2c) would tunnel requests
    // no one decides.
    p.fail(502, "101 to " + std::string(head.find("upgrade").value_or("")) +
                    " (only websocket was asked for)");
    return -1;
  }
  s.status_ = status;
  s.upstreamHeadNs_ = uv_hrtime();
  const auto& req = s.request_.head();
  bool noBody = req.method == HTTP_HEAD || status == 204 || status == 304 || status == 101;
  // An HTTP/1.0 client knows no chunking (RFC 9112, 6.1): it gets the body close-delimited,
  // which cannot carry another transfer coding.
  bool clientChunks = req.versionMajor == 1 && req.versionMinor >= 1;
  // (A coding without chunked runs to the close, and keeps its name too.)
  if (!noBody && !clientChunks && head.find("transfer-encoding") &&
      !equalsIgnoreCase(transferEncodingOf(head), "chunked")) {
    p.fail(502, "the upstream's transfer coding " + transferEncodingOf(head) +
                    " cannot reach an HTTP/1.0 client");
    return -1;
  }
  auto& out = s.client_->output();
  out += "HTTP/1.1 ";
  out += std::to_string(status);
  out += ' ';
  // The upstream's own words (a status this proxy has no phrase for keeps its meaning).
  if (!head.reason().empty())
    out += head.reason();
  else
    out += reasonPhrase(status);
  out += "\r\n";
  bool hasConnection = head.find("connection").has_value();
  for (size_t i = 0; i < head.size(); ++i) {
    auto name = head.name(i);
    if (isHopByHop(name) || (hasConnection && namedByConnection(head, name))) continue;
    out += name;
    out += ": ";
    out += head.value(i);
    out += "\r\n";
  }
  out += "Via: 1.1 ";
  out += viaToken();
  out += "\r\n";
  if (status == 101) {
    out += "Connection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    s.responseStarted_ = true;
    return 0;
  }
  if (noBody) {
    if (p.hasContentLength())
      out += "Content-Length: " + std::to_string(p.contentLength()) + "\r\n";
  } else if (p.chunked() && clientChunks) {
    s.responseChunked_ = true;
    out += "Transfer-Encoding: ";
    out += transferEncodingOf(head);  // "gzip, chunked" stays so
    out += "\r\n";
  } else if (p.hasContentLength()) {
    out += "Content-Length: " + std::to_string(p.contentLength()) + "\r\n";
  } else if (clientChunks) {
    s.responseChunked_ = true;  // a close-delimited body goes to the client chunked
    // With its codings (Transfer-Encoding: gzip ends at the close: gzip, chunked).
    out += "Transfer-Encoding: ";
    if (head.find("transfer-encoding")) out += transferEncodingOf(head) + ", ";
    out += "chunked\r\n";
  } else {
    s.responseCloseDelimited_ = true;
  }
  bool closing = s.closeAfterResponse_ || s.draining_ || !s.requestKeepAlive_ || !s.requestDone_ ||
                 s.responseCloseDelimited_;
  if (closing)
    out += "Connection: close\r\n";
  else if (s.http10())
    out += "Connection: keep-alive\r\n";  // an HTTP/1.0 client closes without it
  out += "\r\n";
  s.noResponseBody_ = noBody;
  s.responseStarted_ = true;
  s.responseBodyWant_ = 0;
  s.responseBodyKept_.clear();
  // A body the decider reads (a cost in a field of it), as the upstream sent it: not when
  // a content or transfer coding other than chunked stands between it and its JSON.
  if (!noBody && s.decision_.verdict == Verdict::kAllow) {
    auto ce = head.find("content-encoding");
    auto te = head.find("transfer-encoding");
    if ((!ce || equalsIgnoreCase(*ce, "identity")) &&
        (!te || equalsIgnoreCase(transferEncodingOf(head), "chunked"))) {
      s.responseBodyWant_ = s.worker_.decider().responseBodyNeeded(s.decision_);
      if (p.hasContentLength() && p.contentLength() > s.responseBodyWant_) s.responseBodyWant_ = 0;
    }
  }
  return noBody ? 1 : 0;
}

int ClientSession::ResponseSide::onBody(HttpParser&, std::string_view data) {
  if (s.interim_) return 0;  // skipped (onHeadersComplete): never the agent's
  auto& out = s.client_->output();
  if (s.responseChunked_)
    appendChunk(out, data);
  else
    out += data;
  if (s.responseBodyWant_ > 0) {
    if (s.responseBodyKept_.size() + data.size() <= s.responseBodyWant_) {
      s.responseBodyKept_ += data;
    } else {
      s.responseBodyWant_ = 0;  // larger than asked for: none of it
      std::string().swap(s.responseBodyKept_);
    }
  }
  // Large bodies: hand each read to libuv at once instead of growing one buffer.
  return 0;
}

int ClientSession::ResponseSide::onMessageComplete(HttpParser&) {
  if (s.interim_) {
    s.interim_ = false;
    return 0;
  }
  if (s.status_ == 101) return 0;  // llhttp pauses for the upgrade itself
  s.responseDone_ = true;
  if (s.responseChunked_) s.client_->output() += "0\r\n\r\n";
  return HPE_PAUSED;
}

void ClientSession::onReadEnd(TcpStream& stream, int status) {
  if (&stream == client_.get()) {
    switch (phase_) {
      case Phase::kTunnel:
        tunnelClientEof_ = true;
        if (upstream_) upstream_->shutdown();
        if (status != UV_EOF)
          close();
        else if (tunnelUpstreamEof_)
          closeAfterDrain();
        return;
      case Phase::kLingering:
        clientEof_ = true;
        closeAfterDrain();  // the reply still queued goes out first
        return;
      case Phase::kBuffering:
      case Phase::kDeciding:
      case Phase::kConnecting:
      case Phase::kForwarding:
        // A client that half-closes after a complete request still gets its response.
        if (status == UV_EOF && requestDone_) {
          clientEof_ = true;
          closeAfterResponse_ = true;
          return;
        }
        close();
        return;
      case Phase::kHead:
        close();
        return;
    }
    return;
  }
  if (&stream != upstream_.get()) return;
  if (phase_ == Phase::kTunnel) {
    tunnelUpstreamEof_ = true;
    client_->shutdown();
    if (status != UV_EOF) {
      if (upstreamError_.empty())
        upstreamError_ = std::string("the upstream ended the tunnel (") + uv_err_name(status) + ")";
      close();
    } else if (tunnelClientEof_) {
      closeAfterDrain();
    }
    return;
  }
  if (phase_ != Phase::kForwarding) return;
  if (!responseStarted_) {
    retryOrFail(status);
    return;
  }
  // A close-delimited response ends at an orderly close (for TLS, a close_notify); a
  // reset or a TLS stream cut without one is a truncated response, never a complete one.
  if (status == UV_EOF) response_.finish();
  if (responseDone_) {
    upstreamReused_ = false;
    retryHead_.clear();
    flushClient();
    if (!closed_) finishExchange();
    return;
  }
  // The agent sees the cut (a chunked response without its last chunk, or fewer bytes
  // than Content-Length), and the outcome record says what it was.
  upstreamError_ = std::string("the upstream ended the response early (") + uv_err_name(status) +
                   (stream.tlsError().empty() ? "" : ": " + stream.tlsError()) + ")";
  close();
}

void ClientSession::retryOrFail(int status) {
  if (upstreamReused_ && !retryHead_.empty()) {
    upstream_.reset();
    upOut_ = std::move(retryHead_);
    retryHead_.clear();
    upstreamReused_ = false;
    retried_ = true;
    response_.reset();
    connectUpstream();
    return;
  }
  std::string reason =
      std::string("upstream closed the connection before responding (") + uv_err_name(status) + ")";
  if (upstreamReused_)
    reason +=
        "; a reused connection: the request may have run, and is sent again only when "
        "it has no body and is idempotent or carries an Idempotency-Key";
  upstreamFailed(502, "upstream_unavailable", reason);
}

void ClientSession::upstreamFailed(int status, std::string_view error, std::string_view reason) {
  upstreamTimer_->stop();
  if (upstreamError_.empty()) upstreamError_ = reason;
  upstream_.reset();
  // Inside a tunnel, or before a blind TLS relay, the agent speaks another protocol: an
  // HTTP reply there would be read as its bytes. The outcome record keeps the reason.
  if (responseStarted_ || phase_ == Phase::kTunnel || blindTls_) {
    close();
    return;
  }
  discardBody_ = true;
  upOut_.clear();
  if (listener_.config.kind != "reverse") {
    reply(status, errorBody(error, reason, target_.key), {}, !requestDone_);
    return;
  }
  // A reverse listener's clients never named its upstream: the reason would tell them the
  // internal name, address or certificate behind the route (as nginx's 502 page does not).
  // They are told what failed; the outcome record and the request log line say why.
  std::string told = error == "upstream_tls"       ? "TLS to the route's upstream failed"
                     : error == "upstream_timeout" ? "the route's upstream did not answer in time"
                     : error == "address_denied"
                         ? "the route's upstream is at an address egress.deny_addresses forbids"
                         : "the route's upstream did not answer";
  told += " (the call's outcome record has the cause)";
  reply(status, errorBody(error, told, target_.key), {}, !requestDone_);
}

void ClientSession::onUpstreamTimer() {
  auto& t = worker_.config().timeouts;
  if (phase_ == Phase::kDeciding && transparent_) {
    // The Host check's lookup did not answer within upstream_connect.
    worker_.resolver().cancel(&hostCheck_);
    onTransparentHost(UV_ETIMEDOUT, {});
  } else if (phase_ == Phase::kConnecting && !upstream_) {
    worker_.resolver().cancel(this);
    worker_.metrics().upstreamConnectErrors("dns").Increment();
    upstreamFailed(504, "upstream_timeout",
                   "cannot resolve " + target_.upstreamHost + " within " +
                       std::to_string(t.upstreamConnect.count()) + " ms");
  } else if (phase_ == Phase::kConnecting && upstream_ && nextAddr_ < addrs_.size() &&
             uv_now(worker_.loop()) < connectDeadlineMs_) {
    upstream_.reset();  // its share of the deadline is spent: the next address
    connectNextAddress();
  } else if (phase_ == Phase::kConnecting) {
    worker_.metrics().upstreamConnectErrors("timeout").Increment();
    upstreamFailed(
        504, "upstream_timeout",
        "connect did not complete within " + std::to_string(t.upstreamConnect.count()) + " ms");
  } else if (phase_ == Phase::kForwarding) {
    if (!responseStarted_) {
      upstreamFailed(504, "upstream_timeout",
                     "no response within " + std::to_string(t.upstreamResponse.count()) + " ms");
    } else {
      // The timer is not re-armed for every read; it checks how long the body has been idle.
      uint64_t idle = uv_now(worker_.loop()) - lastUpstreamReadMs_;
      auto limit = static_cast<uint64_t>(t.upstreamResponse.count());
      if (idle < limit) {
        upstreamTimer_->start(limit - idle);
        return;
      }
      close();  // the body stalled; the client sees a cut-short response
    }
  }
}

void ClientSession::releaseUpstream(bool reusable) {
  upstreamTimer_->stop();
  if (!upstream_) return;
  if (reusable && !hostUnverified_) {
    if (pinned_) {
      auto key = pinKey();
      if (std::find(pinnedKeys_.begin(), pinnedKeys_.end(), key) == pinnedKeys_.end())
        pinnedKeys_.push_back(key);
      worker_.pool().put(key, std::move(upstream_));
    } else {
      worker_.pool().put(poolKey(), std::move(upstream_));
    }
  }
  upstream_.reset();
}

// ---- ends of exchanges -------------------------------------------------------------------

void ClientSession::reply(int status, std::string_view body, std::string_view extraHeaders,
                          bool close) {
  if (responseStarted_) {
    this->close();
    return;
  }
  if (close || !requestDone_) closeAfterResponse_ = true;
  bool closing = closeAfterResponse_ || draining_ || !requestKeepAlive_;
  status_ = status;
  if (!closing && http10()) {
    std::string extra(extraHeaders);
    extra += "Connection: keep-alive\r\n";  // an HTTP/1.0 client closes without it
    appendLocalReply(localReply(status, body, extra, closing), body.size());
  } else {
    appendLocalReply(localReply(status, body, extraHeaders, closing), body.size());
  }
  responseStarted_ = responseDone_ = true;
  flushClient();
  if (!closed_) finishExchange();
}

void ClientSession::appendLocalReply(std::string out, size_t bodySize) {
  // A response to HEAD has the headers of the GET's, Content-Length included, and no body
  // (RFC 9110, 9.3.2): the agent's parser would take the body for the next response.
  if (request_.headersDone() && request_.head().method == HTTP_HEAD)
    out.resize(out.size() - bodySize);
  client_->append(out);
}

void ClientSession::badRequest(int status, std::string_view error, std::string_view reason,
                               std::string_view ruleFamily) {
  // Refused before its head was complete (a framing error, a head too large or too slow):
  // the agent the connection names (its certificate, its address, the tunnel's CONNECT), or
  // the head's so far, rather than anonymous.
  if (agent_.empty() && !listener_.admin) identify();
  AuditRecord record;
  record.kind = "call";
  record.agent = agent();
  record.method = request_.head().method >= 0 && request_.headersDone()
                      ? llhttp_method_name(static_cast<llhttp_method_t>(request_.head().method))
                      : "";
  record.authority = target_.host.empty() ? "" : target_.key;
  record.decision = "halt";
  record.rule = std::string(ruleFamily) + "." + std::string(error);
  record.reason = std::string(reason);
  decision_.verdict = Verdict::kHalt;
  decision_.rule = record.rule;  // before the record is moved away
  auditSeq_ = worker_.audit().append(std::move(record));
  // A call recorded is a call counted; a transparent listener's refusal under its own rule,
  // as its refusals of connections are.
  decisionCounter(worker_.metrics(), Verdict::kHalt, decision_.rule).Increment();
  haltCounter(worker_.metrics(), ruleFamily == "transparent" ? decision_.rule : "bad_request")
      .Increment();
  discardBody_ = true;
  std::string body;
  JsonObject(body).add("error", error).add("reason", reason).add("audit_seq", auditSeq_).close();
  body += '\n';
  reply(status, body, {}, true);
}

void ClientSession::handleAdmin() {
  // Some answers need fresh state from a store first (pools from Redis).
  auto url = request_.head().url();
  adminWaiting_ = true;
  ++pendingCallbacks_;
  worker_.admin().prepare(url.substr(0, url.find('?')), [this] {
    --pendingCallbacks_;
    adminWaiting_ = false;
    if (!closed_) answerAdmin();
  });
}

void ClientSession::answerAdmin() {
  const auto& head = request_.head();
  auto r = worker_.admin().handle(llhttp_method_name(static_cast<llhttp_method_t>(head.method)),
                                  head.url(), head.find("authorization").value_or(""));
  status_ = r.status;
  bool closing = draining_ || !requestKeepAlive_;
  appendLocalReply(localReply(r.status, r.body, {}, closing, r.contentType), r.body.size());
  responseStarted_ = responseDone_ = true;
  flushClient();
  if (!closed_) finishExchange();
}

void ClientSession::finishExchange() {
  logRequest();
  reportOutcome();
  bool upstreamReusable = upstream_ && responseDone_ && requestDone_ && response_.keepAlive() &&
                          response_.errorStatus() == 0;
  if (upstream_ && !pinned_ && usesConnectionAuth(request_.head(), response_.head()))
    pinned_ = true;  // from this exchange on: this connection's, and every later one's
  releaseUpstream(upstreamReusable);
  bool keep = !closeAfterResponse_ && requestDone_ && requestKeepAlive_ && !draining_ &&
              !responseCloseDelimited_;
  if (!keep) {
    closeAfterReply();
    return;
  }
  resetExchange();
  clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.idle.count()));
  updateReading();
}

void ClientSession::resetExchange() {
  bool upgradePaused = request_.upgrade();
  target_ = Target{};
  agent_.clear();
  decision_ = Decision{};
  auditSeq_ = 0;
  upOut_.clear();
  retryHead_.clear();
  traceId_.clear();
  poolKey_.clear();
  responseBodyWant_ = 0;
  std::string().swap(responseBodyKept_);
  upstreamError_.clear();
  localHaltRule_.clear();
  localHaltReason_.clear();
  addrs_.clear();
  nextAddr_ = 0;
  startNs_ = upstreamSentNs_ = upstreamHeadNs_ = tunnelStartNs_ = 0;
  bodyBytes_ = bytesIn_ = bytesOut_ = bytesInMetered_ = bytesOutMetered_ = 0;
  bodyNeed_ = 0;
  outcomeReported_ = false;
  body_.clear();
  bodySha256_.clear();
  bodyTruncated_ = continueSent_ = false;
  status_ = 0;
  headReady_ = requestDone_ = expectContinue_ = isUpgrade_ = discardBody_ = requestChunked_ = false;
  upstreamReused_ = retried_ = responseStarted_ = responseChunked_ = responseCloseDelimited_ =
      hostUnverified_ = false;
  responseDone_ = interim_ = noResponseBody_ = sawBytes_ = false;
  requestKeepAlive_ = true;
  // The upstream that was above its watermark is pooled or closed now: its drain will
  // never reach this session, and the next request must be read.
  clientBlocked_ = false;
  phase_ = Phase::kHead;
  response_.reset();
  if (parserPaused_) {
    if (upgradePaused)
      request_.resumeAfterUpgrade();
    else
      request_.resume();
    parserPaused_ = false;
  }
  // Pipelined requests already received are parsed now (by the loop in readClient() when
  // this exchange ended inside it), or once the agent has read its answers.
  if (!parsing_ && !pendingIn_.empty() && !upstreamBlocked_) {
    std::string held = std::move(pendingIn_);
    pendingIn_.clear();
    readClient(held);
  }
}

void ClientSession::closeAfterReply() {
  if (closed_) return;
  phase_ = Phase::kLingering;
  upstream_.reset();
  pendingIn_.clear();
  client_->shutdown();
  // Keep reading (and dropping) what the client still sends, so that closing does not
  // reset the connection before it has read the reply.
  clientBlocked_ = false;
  lingerStartMs_ = uv_now(worker_.loop());
  if (clientEof_) {
    closeAfterDrain();  // nothing more comes from the agent: closed once the reply is out
    return;
  }
  clientTimer_->start(kLingerMs);
  updateReading();
}

void ClientSession::logRequest() {
  if (status_ == 0) return;
  auto& m = *listener_.metrics;
  uint64_t now = uv_hrtime();
  m.status(status_).Increment();
  if (tunnelStartNs_ == 0)
    m.requestSeconds->Observe(static_cast<double>(now - startNs_) / 1e9);
  else
    m.tunnelSeconds->Observe(static_cast<double>(now - tunnelStartNs_) / 1e9);
  if (upstreamHeadNs_ != 0)
    m.upstreamSeconds->Observe(static_cast<double>(upstreamHeadNs_ - upstreamSentNs_) / 1e9);
  meterBytes();
  if (!Log::enabled(LogLevel::kInfo)) return;
  const auto& head = request_.head();
  Log::Line line(LogLevel::kInfo, "request");
  line.add("listener", listener_.config.name)
      .add("method", request_.headersDone()
                         ? llhttp_method_name(static_cast<llhttp_method_t>(head.method))
                         : "")
      .add("authority", target_.host.empty() ? std::string() : target_.key)
      .add("path", listener_.admin
                       ? std::string(head.url())
                       : redactQuery(target_.pathQuery, worker_.config().auditRedactQueryParams))
      .add("status", status_)
      .add("bytes_in", bytesIn_)
      .add("bytes_out", bytesOut_)
      .add("duration_us", (now - startNs_) / 1000)
      .add("upstream_us", upstreamHeadNs_ ? (upstreamHeadNs_ - upstreamSentNs_) / 1000 : 0)
      .add("decision",
           decision_.rule.empty() && listener_.admin ? "admin" : verdictName(decision_.verdict))
      .add("rule", decision_.rule)
      .add("agent", agent())
      .add("trace_id", traceId_);
  if (auditSeq_) line.add("audit_seq", auditSeq_);
  if (!upstreamError_.empty()) line.add("error", upstreamError_);
  line.emit();
}

void ClientSession::meterBytes() {
  auto& m = *listener_.metrics;
  if (bytesIn_ > bytesInMetered_) {
    m.bytesIn->Increment(static_cast<double>(bytesIn_ - bytesInMetered_));
    bytesInMetered_ = bytesIn_;
  }
  if (bytesOut_ > bytesOutMetered_) {
    m.bytesOut->Increment(static_cast<double>(bytesOut_ - bytesOutMetered_));
    bytesOutMetered_ = bytesOut_;
  }
}

// ---- flow control ------------------------------------------------------------------------

void ClientSession::flushClient() {
  if (!client_) return;
  bytesOut_ += client_->output().size();
  if (client_->flush() != 0) {
    close();
    return;
  }
  auto watermark = worker_.config().limits.writeWatermark;
  if (client_->queued() > watermark && !upstreamBlocked_) {
    upstreamBlocked_ = true;
    client_->wantDrain(watermark / 2);
    updateReading();
  }
}

void ClientSession::flushUpstream() {
  if (!upstream_) return;
  if (upstream_->flush() != 0) {
    upstreamFailed(502, "upstream_unavailable", "write to upstream failed");
    return;
  }
  auto watermark = worker_.config().limits.writeWatermark;
  if (upstream_->queued() > watermark && !clientBlocked_) {
    clientBlocked_ = true;
    upstream_->wantDrain(watermark / 2);
    updateReading();
  }
}

void ClientSession::onDrained(TcpStream& stream) {
  if (&stream == client_.get())
    upstreamBlocked_ = false;
  else if (&stream == upstream_.get())
    clientBlocked_ = false;
  if (closeWhenDrained_) {
    closeAfterDrain();
    return;
  }
  if (phase_ == Phase::kHead && !parsing_ && !parserPaused_ && !upstreamBlocked_ &&
      !pendingIn_.empty()) {
    // The agent read its answers: its pipelined requests go on.
    std::string held = std::move(pendingIn_);
    pendingIn_.clear();
    readClient(held);
    return;
  }
  updateReading();
}

void ClientSession::enterTunnel() {
  phase_ = Phase::kTunnel;
  // The request is answered once the tunnel is up: its duration is the setup, and the
  // tunnel's lifetime (up to tunnel_idle, hours) goes to a histogram of its own at the close,
  // so that request latency does not measure how long connections stay open.
  tunnelStartNs_ = uv_hrtime();
  listener_.metrics->requestSeconds->Observe(static_cast<double>(tunnelStartNs_ - startNs_) / 1e9);
  armTunnelIdle();
}

// From a tunnel's start, bytes either way keep it open; none for tunnel_idle end it.
void ClientSession::armTunnelIdle() {
  lastClientReadMs_ = lastUpstreamReadMs_ = uv_now(worker_.loop());
  clientTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.tunnelIdle.count()));
}

void ClientSession::closeAfterDrain() {
  if (closed_) return;
  bool queued = client_->queued() > 0 || (upstream_ && upstream_->queued() > 0);
  if (!queued) {
    close();
    return;
  }
  // onDrained() comes back when a queue empties (asked of those with bytes queued only: an
  // empty one answers at once); the client timer bounds the wait (idle).
  bool first = !closeWhenDrained_;
  closeWhenDrained_ = true;
  if (client_->queued() > 0) client_->wantDrain(0);
  if (upstream_ && upstream_->queued() > 0) upstream_->wantDrain(0);
  if (!first) return;
  if (!lingerStartMs_) lingerStartMs_ = uv_now(worker_.loop());
  clientTimer_->start(kLingerMs);
  updateReading();
}

void ClientSession::onWriteError(TcpStream& stream, int status) {
  if (&stream == upstream_.get() && phase_ == Phase::kForwarding && !responseStarted_) {
    retryOrFail(status);
    return;
  }
  close();
}

void ClientSession::updateReading() {
  if (closed_) return;
  // The client is read whenever its bytes have somewhere to go. While a complete request
  // is in progress, reading goes on into pendingIn_ (bounded) so that reading does not
  // stop and start again for every request.
  bool wantClient = false;
  switch (phase_) {
    case Phase::kBuffering:
      wantClient = !parserPaused_;
      break;
    case Phase::kHead:
    case Phase::kDeciding:
    case Phase::kConnecting:
    case Phase::kForwarding:
      if (parserPaused_)
        wantClient = pendingIn_.size() < kMaxPendingInput;
      else
        wantClient = phase_ == Phase::kHead || phase_ == Phase::kForwarding ||
                     (phase_ == Phase::kDeciding && listener_.admin && !requestDone_);
      break;
    case Phase::kTunnel:
      wantClient = !tunnelClientEof_;
      break;
    case Phase::kLingering:
      wantClient = true;
      break;
  }
  // Between requests, an agent whose answers pile up unread is not read either.
  if (phase_ == Phase::kHead && upstreamBlocked_) wantClient = false;
  // After the agent's FIN there is nothing to read (a read would only report it again).
  wantClient = wantClient && !clientBlocked_ && !clientEof_ && !closeWhenDrained_;
  if (wantClient) {
    if (client_->readStart() != 0) close();
  } else {
    client_->readStop();
  }
  if (closed_ || !upstream_) return;
  bool wantUpstream =
      !upstreamBlocked_ && !closeWhenDrained_ &&
      (phase_ == Phase::kForwarding || (phase_ == Phase::kTunnel && !tunnelUpstreamEof_));
  if (wantUpstream) {
    if (upstream_->readStart() != 0) close();
  } else {
    upstream_->readStop();
  }
}

void ClientSession::onClientTimer() {
  // Armed for the head (header_read), between requests (idle) and while lingering; once
  // a request is being handled the upstream timer watches it instead.
  if (phase_ == Phase::kBuffering) {
    badRequest(408, "request_timeout",
               "request body not received within " +
                   std::to_string(worker_.config().timeouts.headerRead.count()) + " ms");
    return;
  }
  if (phase_ == Phase::kDeciding && listener_.admin && !requestDone_) {
    badRequest(408, "request_timeout",
               "request body not received within " +
                   std::to_string(worker_.config().timeouts.headerRead.count()) + " ms");
    return;
  }
  if (phase_ == Phase::kForwarding && !requestDone_) {
    uint64_t idle = uv_now(worker_.loop()) - lastClientReadMs_;
    auto limit = static_cast<uint64_t>(worker_.config().timeouts.idle.count());
    if (idle < limit) {
      clientTimer_->start(limit - idle);
      return;
    }
    badRequest(408, "request_timeout", "request body stalled for " + std::to_string(idle) + " ms");
    return;
  }
  if (phase_ == Phase::kLingering || closeWhenDrained_) {
    // The reply (or a tunnel's last bytes) is written, or the peer stopped reading it for
    // `idle`: closed now, whether or not the agent ever closes its end (a lingering
    // connection held its slot forever).
    uint64_t since = uv_now(worker_.loop()) - lingerStartMs_;
    bool queued = client_->queued() > 0 || (upstream_ && upstream_->queued() > 0);
    if (queued && since < static_cast<uint64_t>(worker_.config().timeouts.idle.count())) {
      clientTimer_->start(kLingerMs);
      return;
    }
    close();
    return;
  }
  if (phase_ == Phase::kTunnel) {
    // Bytes either way keep a tunnel (CONNECT, WebSocket) open; none for tunnel_idle end it.
    uint64_t last = std::max(lastClientReadMs_, lastUpstreamReadMs_);
    uint64_t idle = uv_now(worker_.loop()) - last;
    auto limit = static_cast<uint64_t>(worker_.config().timeouts.tunnelIdle.count());
    if (idle < limit) {
      clientTimer_->start(limit - idle);
      return;
    }
    upstreamError_ = "the tunnel was idle for " + std::to_string(idle) + " ms (tunnel_idle)";
    close();
    return;
  }
  if (phase_ != Phase::kHead) return;
  if (headReady_) return;
  if (phase_ == Phase::kHead && request_.messageInProgress()) {
    badRequest(408, "request_timeout",
               "request head not received within " +
                   std::to_string(worker_.config().timeouts.headerRead.count()) + " ms");
    return;
  }
  close();
}

}  // namespace tollgate
