// ClientSession: one client connection and the requests on it, one at a time. It parses a
// request, asks the Decider, forwards the request to a pooled upstream connection and
// streams the response back (re-framing bodies, removing hop-by-hop headers), or answers
// locally. Pipelined requests wait in the parser until the previous response is done, so
// responses go out in order. CONNECT and allowed upgrades become two-way tunnels.
//
// Ownership: the session owns its client stream, the upstream stream while attached, and
// its timers. It is deleted by its Worker on a later loop turn after close().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "policy/decider.h"
#include "proxy/client_hello.h"
#include "proxy/http_message.h"
#include "proxy/http_parser.h"
#include "proxy/resolver.h"
#include "proxy/tcp_stream.h"
#include "proxy/timer.h"
#include "proxy/tls.h"

namespace tollgate {

class Worker;
struct ListenerRuntime;

// How a call's wait for its audit record ended (Worker::awaitDurable()).
enum class AuditWait { kDurable, kFailed, kTimedOut };

class ClientSession final : public TcpStream::Handler, public Resolver::Waiter {
 public:
  ClientSession(Worker& worker, ListenerRuntime& listener, StreamPtr client);
  ClientSession(const ClientSession&) = delete;
  ClientSession& operator=(const ClientSession&) = delete;
  ~ClientSession();

  void start();
  // Graceful shutdown: close now when idle, else after the current response.
  void drain();
  // Accepted during the drain (the admin listener stays open for /readyz): one exchange.
  void markDraining() { draining_ = true; }
  // Closes everything now. Idempotent.
  void close();
  bool closed() const { return closed_; }
  // True while a callback from outside (a decider) is still to come.
  bool busy() const { return pendingCallbacks_ > 0; }
  // The worker's answer to awaitDurable(): the call's audit record is durable, or not.
  void onAuditDurable(AuditWait result);

 private:
  // In order: a request's head is read, its body maybe buffered for the decision, then it
  // is decided, connected and forwarded (or tunnelled), or the connection lingers to close.
  enum class Phase { kHead, kBuffering, kDeciding, kConnecting, kForwarding, kTunnel, kLingering };

  // The parsers call back into these adapters, one per direction.
  struct RequestSide : HttpParser::Handler {
    explicit RequestSide(ClientSession& session) : s(session) {}
    void onMessageBegin(HttpParser&) override;
    int onHeadersComplete(HttpParser&) override;
    int onBody(HttpParser&, std::string_view data) override;
    int onMessageComplete(HttpParser&) override;
    ClientSession& s;
  };
  struct ResponseSide : HttpParser::Handler {
    explicit ResponseSide(ClientSession& session) : s(session) {}
    void onMessageBegin(HttpParser&) override {}
    int onHeadersComplete(HttpParser&) override;
    int onBody(HttpParser&, std::string_view data) override;
    int onMessageComplete(HttpParser&) override;
    ClientSession& s;
  };

  // TcpStream::Handler, for both the client and the upstream stream.
  void onConnect(TcpStream& stream, int status) override;
  void onRead(TcpStream& stream, std::string_view data) override;
  void onReadEnd(TcpStream& stream, int status) override;
  void onDrained(TcpStream& stream) override;
  void onWriteError(TcpStream& stream, int status) override;
  void onHandshake(TcpStream& stream, int status) override;
  // Resolver::Waiter
  void onResolved(int status, const std::vector<sockaddr_storage>& addrs) override;

  void readClient(std::string_view data);
  void readUpstream(std::string_view data);
  void processRequestHead();
  void readBodyOrDecide();
  CallInfo callInfo() const;
  void decide();
  void onDecision(const Decision& decision);
  // Answers a call that was not allowed (403, 429) from its decision.
  void refuse(const Decision& decision);
  // Counts a call's final decision (decisions, agent steps, halts): once per call.
  void countDecision(const Decision& decision);
  void connectUpstream();
  void connectNextAddress();
  void attachUpstream(StreamPtr stream, bool reused);
  void sendRequest();
  void startTunnel();
  // CONNECT with intercept_tls: 200, then the agent's TLS is terminated with a minted leaf
  // and the requests inside are read and decided one by one.
  void startIntercept();
  // The audit record of an interception (false: refused, e.g. a host the CA may not sign).
  bool recordIntercept(const std::string& host, uint16_t port);
  // Terminates the agent's TLS with the leaf for host; `early`: its first bytes, if read.
  void beginInterceptTls(const std::string& host, uint16_t port, std::string_view early);
  // Halts the current request without asking the decider (a rule of the proxy's own).
  void haltLocally(std::string rule, std::string reason);
  void startUpstreamTls();
  // The upstream pool's key for this call's upstream.
  const std::string& poolKey();
  void finishExchange();
  void resetExchange();
  void retryOrFail(int status);
  void upstreamFailed(int status, std::string_view error, std::string_view reason);
  void reply(int status, std::string_view body, std::string_view extraHeaders, bool close);
  void appendLocalReply(std::string out, size_t bodySize);
  void badRequest(int status, std::string_view error, std::string_view reason,
                  std::string_view ruleFamily = "http");
  void handleAdmin();
  void answerAdmin();
  void closeAfterReply();
  void logRequest();
  // Adds the exchange's bytes not yet counted to tollgate_bytes_total.
  void meterBytes();
  void reportOutcome();
  void updateReading();
  void flushClient();
  void flushUpstream();
  void onClientTimer();
  void onUpstreamTimer();
  void releaseUpstream(bool reusable);
  std::string_view agent() const;
  void identify();
  // The request is HTTP/1.0: its keep-alive must be confirmed in the response.
  bool http10() const {
    return request_.headersDone() && request_.head().versionMajor == 1 &&
           request_.head().versionMinor == 0;
  }

  // Transparent listeners (DESIGN §1): the first bytes tell TLS from HTTP, a request's Host
  // must name the address the client dialled, and the upstream is that address.
  struct HostCheck : Resolver::Waiter {
    explicit HostCheck(ClientSession& session) : s(session) {}
    void onResolved(int status, const std::vector<sockaddr_storage>& addrs) override;
    ClientSession& s;
  };
  bool peekTransparent(std::string_view data, std::string& held);
  bool transparentTarget(HttpParser& p);
  void checkTransparentHost();
  void onTransparentHost(int status, const std::vector<sockaddr_storage>& addrs);
  void onTransparentTls(const ClientHello& hello, std::string peeked);
  void refuseConnection(std::string_view rule, std::string_view reason, std::string authority);

  Worker& worker_;
  ListenerRuntime& listener_;
  StreamPtr client_;
  StreamPtr upstream_;
  TimerPtr clientTimer_;
  TimerPtr upstreamTimer_;
  RequestSide requestSide_{*this};
  ResponseSide responseSide_{*this};
  HttpParser request_;
  HttpParser response_;
  Phase phase_ = Phase::kHead;

  // The exchange in progress.
  Target target_;
  std::string agent_;  // from the listener's identity source; empty: anonymous
  Decision decision_;
  uint64_t auditSeq_ = 0;
  std::string upOut_;      // request bytes produced before the upstream is attached
  std::string pendingIn_;  // client bytes after a complete request (pipelining, tunnels)
  std::string upPending_;  // upstream bytes after the 101 head of an upgrade
  std::string retryHead_;  // request head kept for one retry on a stale pooled connection
  std::string traceId_;
  std::string upstreamError_;  // why the call failed before it reached the upstream
  std::string poolKey_;        // see poolKey()
  // The response body as the decider asked for it (a cost read from a field of it): kept
  // while responseBodyWant_ > 0, which drops to 0 when the body cannot be had whole.
  size_t responseBodyWant_ = 0;
  std::string responseBodyKept_;
  // An upstream connection that carried connection-based authentication (NTLM, Negotiate)
  // is this client connection's alone: it goes back to the pool under a key of its own
  // (pinKey()), dropped when the client connection closes, so no other agent's call is
  // sent as the one who authenticated it.
  bool pinned_ = false;
  uint64_t sessionId_ = 0;               // for pinKey(); unique in the process
  std::vector<std::string> pinnedKeys_;  // dropped from the pool at close()
  std::string pinKey();
  std::string localHaltRule_, localHaltReason_;  // set while a request is parsed
  std::vector<sockaddr_storage> addrs_;
  size_t nextAddr_ = 0;             // addrs_.size() once connected: no fallback past it
  uint64_t connectDeadlineMs_ = 0;  // upstream_connect from the first address's attempt
  uint64_t startNs_ = 0, upstreamSentNs_ = 0, upstreamHeadNs_ = 0;
  uint64_t tunnelStartNs_ = 0;  // when the tunnel came up; 0: not a tunnel
  uint64_t bodyBytes_ = 0;
  size_t bodyNeed_ = 0;         // body bytes the decider wants to see (0: it streams)
  std::string body_;            // the body as read for the decider
  std::string bodySha256_;      // its hash (hex), for the decider and the audit record
  bool bodyTruncated_ = false;  // the body was larger than bodyNeed_
  bool continueSent_ = false;
  bool outcomeReported_ = false;
  uint64_t lastUpstreamReadMs_ = 0;
  uint64_t lastClientReadMs_ = 0;
  uint64_t bytesIn_ = 0, bytesOut_ = 0;
  uint64_t bytesInMetered_ = 0, bytesOutMetered_ = 0;  // of those, in tollgate_bytes_total
  int status_ = 0;
  int pendingCallbacks_ = 0;
  bool headReady_ = false;
  bool requestDone_ = false;
  bool requestKeepAlive_ = true;
  bool expectContinue_ = false;
  bool isUpgrade_ = false;
  bool discardBody_ = false;  // answered locally; the rest of the body is dropped
  bool requestChunked_ = false;
  bool upstreamReused_ = false;
  bool retried_ = false;
  // Transparent, observe mode: Host does not name the dialled address, yet the call goes on
  // (to the dialled address). Its connection is neither taken from nor given to the pool,
  // whose keys are host names: another agent's call to that name must not reach it.
  bool hostUnverified_ = false;
  bool parsing_ = false;
  bool adminWaiting_ = false;     // an admin answer waits for AdminApi::prepare()
  bool parserPaused_ = false;     // the request parser stopped after a complete request
  bool responseStarted_ = false;  // any byte of the response went to the client
  bool responseChunked_ = false;  // re-chunking the body for the client
  bool responseCloseDelimited_ = false;
  bool responseDone_ = false;
  bool interim_ = false;
  bool noResponseBody_ = false;
  bool tunnelClientEof_ = false, tunnelUpstreamEof_ = false;
  // Both ends of a tunnel ended, or the agent half-closed after its request: what is still
  // queued goes out before the close (closing cancels it).
  bool closeWhenDrained_ = false;
  bool clientEof_ = false;  // the agent sent its FIN
  void closeAfterDrain();
  // The tunnel is up (CONNECT answered, or a 101 passed on): its setup is the request's
  // duration.
  void enterTunnel();
  void armTunnelIdle();
  uint64_t lingerStartMs_ = 0;                            // when closeAfterReply() began the linger
  bool clientBlocked_ = false, upstreamBlocked_ = false;  // backpressure
  bool sawBytes_ = false;
  bool firstRequest_ = true;
  bool draining_ = false;
  bool closeAfterResponse_ = false;
  bool closed_ = false;

  // An intercepted tunnel, for every request inside it.
  std::unique_ptr<InterceptTls> intercept_;
  uint16_t interceptPort_ = 0;
  std::string tunnelAgent_;  // identified on the CONNECT, for requests that name none

  // Transparent listeners only.
  bool transparent_ = false;
  bool peeking_ = false;            // the first bytes are still being looked at
  std::string peeked_;              // what was read while peeking
  sockaddr_storage originalDst_{};  // where the client connected before the REDIRECT
  std::string notRedirected_;       // why there is no original destination; empty: there is
  HostCheck hostCheck_{*this};
  bool blindTls_ = false;  // TLS to a passthrough host: decided as a CONNECT, relayed blind
};

}  // namespace tollgate
