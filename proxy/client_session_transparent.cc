// ClientSession, the part only transparent listeners use (DESIGN §1): connections that
// iptables REDIRECT sent here. The client believes it is talking to the tool itself, so
// nothing in its bytes can be trusted to say where it meant to go except the address it
// dialled (the original destination): TLS is recognised from the first bytes, a request's
// Host must name that address, and the upstream connection goes to it.
#include "common/log.h"
#include "proxy/client_session.h"
#include "proxy/original_dst.h"
#include "proxy/worker.h"

namespace tollgate {

// Returns true when `held` (the bytes read so far) is to be parsed as HTTP. Otherwise the
// connection waits for more bytes, has been refused, or has gone to onTransparentTls().
bool ClientSession::peekTransparent(std::string_view data, std::string& held) {
  if (peeked_.empty()) startNs_ = uv_hrtime();
  peeked_.append(data);
  // Bounded: past kMaxClientHelloPeekBytes the parser answers kMalformed, and the header
  // read timer closes a connection whose hello stops half way.
  auto hello = peekClientHello(peeked_);
  if (hello.status == ClientHello::Status::kNeedMore) return false;
  peeking_ = false;
  if (hello.status == ClientHello::Status::kNotTls) {
    if (!notRedirected_.empty()) {
      // Dialled the listener itself: there is no destination to check or forward to, and
      // forwarding to ourselves would loop.
      badRequest(400, "not_redirected",
                 "not a redirected connection (a transparent listener only takes connections "
                 "iptables REDIRECT sent to it; dialling it directly would loop): " +
                     notRedirected_,
                 "transparent");
      return false;
    }
    held = std::move(peeked_);
    peeked_.clear();
    return true;
  }
  auto authority = formatAddress(originalDst_);
  if (!notRedirected_.empty()) {
    refuseConnection("transparent.not_redirected", "not a redirected connection: " + notRedirected_,
                     "");
  } else if (hello.status == ClientHello::Status::kMalformed) {
    refuseConnection("transparent.bad_tls", "malformed TLS ClientHello: " + hello.error, authority);
  } else {
    std::string bytes = std::move(peeked_);
    peeked_.clear();
    onTransparentTls(hello, std::move(bytes));
  }
  return false;
}

// A redirected connection whose first bytes are a TLS ClientHello: intercepted like a
// CONNECT to the name in its SNI (the dialled address without one) and the dialled port.
// The upstream connection goes to the dialled address and its certificate must carry that
// name, so an SNI naming another host than the one dialled fails there (502 upstream_tls).
// `peeked` holds every byte read so far: the handshake starts from them.
void ClientSession::onTransparentTls(const ClientHello& hello, std::string peeked) {
  auto port = portOf(originalDst_);
  std::string host =
      hello.serverName.empty() ? formatAddress(originalDst_, false) : hello.serverName;
  if (hostMatches(listener_.config.passthrough, host)) {
    // Clients that pin certificates: decided at host level like a CONNECT to the SNI's name,
    // then relayed to the dialled address without looking inside.
    blindTls_ = true;
    target_.scheme = "tunnel";
    target_.host = host;
    target_.port = port;
    target_.key = formatHostPort(host, port);
    target_.upstreamHost = host;
    target_.upstreamPort = port;
    pendingIn_ = std::move(peeked);
    headReady_ = true;
    // Nothing inside is verified, so the SNI must name the dialled address, as Host must.
    phase_ = Phase::kDeciding;
    checkTransparentHost();
    return;
  }
  if (!listener_.config.interceptTls) {
    refuseConnection("transparent.tls",
                     "TLS on a transparent listener without intercept_tls: nothing inside it could "
                     "be governed",
                     formatHostPort(host, port));
    return;
  }
  if (hello.serverNameIsIp) {
    sockaddr_storage named;
    if (!Resolver::parseLiteral(hello.serverName, named) ||
        !sameAddress(named, originalDst_, false)) {
      refuseConnection("tls.sni_mismatch",
                       "the TLS server name (SNI) " + hello.serverName +
                           " is not the address the client dialled (" +
                           formatAddress(originalDst_) + ")",
                       formatHostPort(host, port));
      return;
    }
  }
  if (!recordIntercept(host, port)) return;
  beginInterceptTls(host, port, peeked);
}

// Ends a connection that never became an HTTP exchange: an audit record, a counter, a log
// line, then close (there is no protocol to answer in).
void ClientSession::refuseConnection(std::string_view rule, std::string_view reason,
                                     std::string authority) {
  AuditRecord record;
  record.kind = "call";
  record.agent = agent();
  record.authority = std::move(authority);
  record.decision = "halt";
  record.rule = std::string(rule);
  record.reason = std::string(reason);
  Log::Line(LogLevel::kWarn, "connection refused")
      .add("listener", listener_.config.name)
      .add("peer", client_->peerAddress())
      .add("authority", record.authority)
      .add("rule", record.rule)
      .add("reason", record.reason)
      .emit();
  Decision d;
  d.verdict = Verdict::kHalt;
  d.rule = record.rule;
  auditSeq_ = worker_.audit().append(std::move(record));
  countDecision(d);  // under its own rule (tls.*, transparent.*), as a call's halt is
  close();
}

// Called from onHeadersComplete(): the request goes to the original destination's port
// whatever the Host header says; checkTransparentHost() then checks the name.
bool ClientSession::transparentTarget(HttpParser& p) {
  if (p.head().method == HTTP_CONNECT) {
    p.fail(400, "CONNECT on a transparent listener (the client did not dial a proxy)");
    return false;
  }
  target_.port = portOf(originalDst_);
  target_.key = formatHostPort(target_.host, target_.port);
  target_.upstreamPort = target_.port;
  return true;
}

// Anti-spoofing: a request may only name a host that is the address the client dialled, or
// it could reach one server while the policy judged another. An IP literal must be that
// address; a name must resolve to it; an explicit Host port must be the port dialled.
void ClientSession::checkTransparentHost() {
  if (auto host = request_.head().find("host")) {
    std::string name;
    uint16_t port = 0;
    if (parseAuthority(*host, 0, name, port) && port != target_.port) {
      onTransparentHost(UV_EINVAL, {});
      return;
    }
  }
  // Bounded like a connect: a name server that never answers ends in a halt.
  upstreamTimer_->start(static_cast<uint64_t>(worker_.config().timeouts.upstreamConnect.count()));
  worker_.resolver().resolve(target_.host, &hostCheck_);
}

void ClientSession::HostCheck::onResolved(int status, const std::vector<sockaddr_storage>& addrs) {
  s.onTransparentHost(status, addrs);
}

void ClientSession::onTransparentHost(int status, const std::vector<sockaddr_storage>& addrs) {
  if (closed_ || phase_ != Phase::kDeciding) return;
  upstreamTimer_->stop();
  for (const auto& a : addrs) {
    if (status == 0 && sameAddress(a, originalDst_, false)) {
      readBodyOrDecide();
      return;
    }
  }
  auto dialled = formatAddress(originalDst_);
  std::string reason = "Host '" + target_.host +
                       "' does not name the address the client dialled (" + dialled + "): ";
  if (status == UV_EINVAL) {
    reason += "the Host header names another port";
  } else if (status < 0) {
    reason += "it does not resolve (" + Resolver::describe(status) + ")";
  } else if (sockaddr_storage literal; Resolver::parseLiteral(target_.host, literal)) {
    reason += "it is another address";
  } else {
    reason += "it resolves to";
    for (const auto& a : addrs) reason += " " + formatAddress(a, false);
  }
  hostUnverified_ = true;  // observe mode forwards it anyway: not through the pool
  Decision d;
  d.verdict = Verdict::kHalt;
  d.rule = "transparent.host_mismatch";
  d.reason = std::move(reason);
  d.tool = "host:" + target_.host;
  onDecision(d);
}

}  // namespace tollgate
