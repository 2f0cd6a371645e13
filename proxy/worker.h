// Worker: one thread, one libuv loop, its own SO_REUSEPORT listening sockets, DNS cache and
// upstream pool. Sessions belong to the worker that accepted them and are deleted by it on
// a later loop turn, never inside their own callbacks.
#pragma once

#include <openssl/ssl.h>
#include <uv.h>

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "audit/audit_sink.h"
#include "policy/decider.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "proxy/resolver.h"
#include "proxy/timer.h"
#include "proxy/upstream_pool.h"

namespace tollgate {

class ClientSession;
class AdminApi;
class TlsContexts;

// A listener as all workers share it: its config, counters and bound address.
struct ListenerRuntime {
  ListenerConfig config;
  bool admin = false;
  std::atomic<uint32_t> connections{0};
  Metrics::Listener* metrics = nullptr;
  SSL_CTX* tls = nullptr;  // a reverse listener's TLS (TlsContexts owns it); null: plain
  std::string boundAddress;
  uint16_t boundPort = 0;
  // One listening socket per worker (admin: worker 0 only); -1 once the worker's loop owns it.
  std::vector<int> fds;
  unsigned workers = 0;
};

// What the workers share; owned by the Server, outlives the workers.
struct SharedState {
  const Config* config = nullptr;
  Metrics* metrics = nullptr;
  Decider* decider = nullptr;
  AuditSink* audit = nullptr;
  AdminApi* admin = nullptr;
  TlsContexts* tls = nullptr;
  std::vector<std::unique_ptr<ListenerRuntime>> listeners;
  // Workers whose loops still serve: the one with the admin listener, draining, stops last.
  std::atomic<unsigned> workersServing{0};
};

class Worker {
 public:
  Worker(SharedState& shared, unsigned index);
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker();

  void start();
  // Thread-safe: stop accepting, finish in-flight requests, then exit the loop. Sessions
  // still open after `deadline` are closed.
  void requestDrain();
  void join();

  uv_loop_t* loop() { return &loop_.loop; }
  const Config& config() const { return *shared_.config; }
  Metrics& metrics() { return *shared_.metrics; }
  Decider& decider() { return *shared_.decider; }
  AuditSink& audit() { return *shared_.audit; }
  AdminApi& admin() { return *shared_.admin; }
  TlsContexts& tls() { return *shared_.tls; }
  Resolver& resolver() { return resolver_; }
  UpstreamPool& pool() { return pool_; }
  bool draining() const { return draining_; }
  unsigned index() const { return index_; }

  // Called by a session that has closed its handles; it is deleted on the next loop turn.
  void release(ClientSession* session);

  // Calls session->onAuditDurable(result) once audit record `seq` is durable, the audit
  // stream has failed, or kDurableWaitMs have passed (a disk that stalls without an error:
  // the call is then refused, fail closed, rather than held for as long as the disk takes).
  // Seqs awaited by one worker only grow (its records are made in order). The session stays
  // busy, and so alive, until then. The sync is asked for once at the end of the loop turn,
  // for every call the turn decided: one fsync takes them all.
  void awaitDurable(uint64_t seq, ClientSession* session);
  static constexpr uint64_t kDurableWaitMs = 10'000;
  // Thread-safe, from the audit writer: records became durable, or the stream failed.
  void notifyDurable();

 private:
  struct Listening {
    uv_tcp_t handle;
    Worker* worker;
    ListenerRuntime* runtime;
    // Connections refused since the last warning, and when it was (loop ms): a flood is
    // one line every kRefusalLogMs, not one per connection.
    uint64_t refused = 0, acceptErrors = 0, nearFdLimit = 0;
    uint64_t warnedMs = 0;
    int lastError = 0;
  };
  // Descriptors are numbered lowest first: one accepted at this number or above means the
  // open-file limit is near. libuv accepts and closes, unseen, what comes past the limit
  // (its reserve-descriptor trick), so this is the warning the operator gets.
  int fdWarnAt_ = INT32_MAX;
  uint64_t fdLimit_ = 0;
  static constexpr uint64_t kRefusalLogMs = 10'000;
  // Logs (at most once per kRefusalLogMs per listener and worker) what was refused.
  static void warnRefused(Listening* l);
  void run();
  void openListeners();
  static void onConnection(uv_stream_t* server, int status);
  static void closeListening(Listening* l);
  static void onCheck(uv_check_t* check);
  static void onPrepare(uv_prepare_t* prepare);
  void wakeDurable();
  void beginDrain();
  void finishIfIdle();
  void freeReleased();

  // The loop is initialised before, and closed after, every member that uses it.
  struct LoopHolder {
    LoopHolder();
    ~LoopHolder();
    LoopHolder(const LoopHolder&) = delete;
    LoopHolder& operator=(const LoopHolder&) = delete;
    uv_loop_t loop;
  };

  SharedState& shared_;
  unsigned index_;
  LoopHolder loop_;
  uv_async_t drainAsync_;
  uv_async_t durableAsync_;
  struct DurableWaiter {
    uint64_t seq;
    ClientSession* session;
    uint64_t sinceMs;  // loop time
  };
  std::deque<DurableWaiter> durableWaiters_;
  TimerPtr durableTimer_;  // the oldest waiter's kDurableWaitMs
  void expireDurableWaiters();
  std::atomic<bool> durableWaiting_{false};
  uint64_t durableWanted_ = 0;     // the highest seq a call of this worker waits for
  uint64_t durableRequested_ = 0;  // asked of the audit sink (before the loop polls)
  uv_check_t check_;
  uv_prepare_t prepare_;
  Resolver resolver_;
  UpstreamPool pool_;
  TimerPtr logFlush_;
  TimerPtr deadline_;
  TimerPtr lastOut_;  // the admin worker's wait, draining, for the others to stop
  std::vector<Listening*> listening_;
  std::unordered_set<ClientSession*> sessions_;
  std::vector<ClientSession*> released_;
  std::thread thread_;
  bool draining_ = false;
  bool stopped_ = false;
  bool pastDeadline_ = false;  // timeouts.shutdown has passed
};

}  // namespace tollgate
