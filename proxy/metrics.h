// Metrics: the prometheus-cpp registry shared by all workers (its metrics are atomic), the
// families the proxy exports, and the text rendering served on /metrics.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "policy/budget_store.h"

namespace tollgate {

class Metrics {
 public:
  struct Listener {
    prometheus::Family<prometheus::Counter>* requests = nullptr;
    std::array<std::atomic<prometheus::Counter*>, 600> byStatus{};
    prometheus::Histogram* requestSeconds = nullptr;
    prometheus::Histogram* upstreamSeconds = nullptr;
    prometheus::Histogram* tunnelSeconds = nullptr;
    prometheus::Gauge* activeConnections = nullptr;
    prometheus::Counter* connectionsRejected = nullptr;
    prometheus::Counter* bytesIn = nullptr;
    prometheus::Counter* bytesOut = nullptr;
    std::string name;
    prometheus::Counter& status(int code);
  };

  Metrics();
  Listener& addListener(const std::string& name);
  prometheus::Counter& upstreamConnectErrors(const std::string& reason);
  prometheus::Counter& tlsHandshakeFailures(const std::string& side);
  prometheus::Counter& decision(const std::string& decision, const std::string& rule);
  // An agent's step (a decided call) by its agents: entry and the decision.
  prometheus::Counter& agentStep(const std::string& agentClass, const std::string& decision);
  prometheus::Counter& reloads(bool ok);
  // Halts by reason: the decider's built-in reasons (default-deny, extract, cascade,
  // breaker, budget), "rule" for a policy rule, "bad_request" for traffic the proxy refused.
  prometheus::Counter& halts(const std::string& reason);
  prometheus::Histogram& decisionSeconds() { return *decisionSeconds_; }
  // One budget store operation: its op, result (ok, budget_exhausted, …) and duration.
  void budgetOperation(const std::string& op, const std::string& result, double seconds);
  // A circuit breaker's state for an upstream: 0 closed, 1 half-open, 2 open.
  // The breakers' states (upstream, 0 closed, 1 half-open, 2 open) as the engine lists them:
  // the series of one it no longer has (swept when idle) go too, or agent-chosen upstreams
  // would each leave a series for good.
  void setBreakers(const std::vector<std::pair<std::string, int>>& states);
  // Budget accounts as GET /v1/pools shows them, from the store's view when /metrics is read
  // (by one thread). A pool or dimension missing from the view (a reload removed or renamed
  // it) loses its series; while the store does not answer, only pool_available changes (0)
  // and the other gauges keep the store's last answer. pool_spent_total adds what was
  // committed since the last view: the store's own count (spent) when it has one, else the
  // rise of committed, all of it after a new period or a reset (so the spend between the
  // last view of a period and its end is missed).
  void setPools(const std::vector<BudgetView>& views);
  // The audit stream's writer: a batch made durable (or failed), a checkpoint written.
  void auditBatch(size_t records, double fsyncSeconds, bool ok);
  void auditCheckpoint(uint64_t seq) { auditLastCheckpoint_->Set(static_cast<double>(seq)); }
  // The stream's state as the sink reports it, refreshed at every render: a failure outside
  // a batch (a segment that cannot be opened at rotation) shows too, and the last
  // checkpoint's seq is the log's, not 0, after a restart.
  void auditState(bool healthy, uint64_t lastCheckpointSeq) {
    auditHealthy_->Set(healthy ? 1 : 0);
    auditLastCheckpoint_->Set(static_cast<double>(lastCheckpointSeq));
  }
  void auditDropped(size_t records) { auditDropped_->Increment(static_cast<double>(records)); }
  void auditBackpressure() { auditBackpressure_->Increment(); }
  // The Redis Stream replica: the last seq known in the stream, records the writer has
  // made durable, and records dropped from its queue (read back from the log later).
  void auditReplica(uint64_t replicatedSeq, uint64_t durableSeq, uint64_t dropped);
  // The interception leaf cache: hosts cached, and its signings and hits since start.
  void tlsLeaves(uint64_t cached, uint64_t signings, uint64_t hits);
  // Called at the start of every render(), to refresh gauges read from elsewhere.
  void addRenderHook(std::function<void()> hook) { renderHooks_.push_back(std::move(hook)); }
  std::string render() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* requestSeconds_;
  prometheus::Family<prometheus::Histogram>* upstreamSeconds_;
  prometheus::Family<prometheus::Histogram>* tunnelSeconds_;
  prometheus::Family<prometheus::Gauge>* active_;
  prometheus::Family<prometheus::Counter>* rejected_;
  prometheus::Family<prometheus::Counter>* bytes_;
  prometheus::Family<prometheus::Counter>* connectErrors_;
  prometheus::Family<prometheus::Counter>* tlsFailures_;
  prometheus::Family<prometheus::Counter>* decisions_;
  prometheus::Family<prometheus::Counter>* agentSteps_;
  prometheus::Family<prometheus::Counter>* reloads_;
  prometheus::Family<prometheus::Counter>* halts_;
  prometheus::Histogram* decisionSeconds_;
  prometheus::Family<prometheus::Gauge>* poolLimit_;
  prometheus::Family<prometheus::Gauge>* poolCommitted_;
  prometheus::Family<prometheus::Gauge>* poolHeld_;
  prometheus::Family<prometheus::Gauge>* poolRemaining_;
  prometheus::Family<prometheus::Gauge>* poolAvailable_;
  prometheus::Family<prometheus::Gauge>* poolTripped_;
  prometheus::Family<prometheus::Gauge>* poolInitialised_;
  prometheus::Family<prometheus::Counter>* poolSpent_;
  // A budget's series; null until the store has answered for it (available: from the first view).
  struct PoolSeries {
    prometheus::Gauge* available = nullptr;
    prometheus::Gauge* limit = nullptr;
    prometheus::Gauge* committed = nullptr;
    prometheus::Gauge* held = nullptr;
    prometheus::Gauge* remaining = nullptr;
    prometheus::Gauge* tripped = nullptr;
    prometheus::Gauge* initialised = nullptr;
    prometheus::Counter* spent = nullptr;
    // What pool_spent_total counted from: the store's spent, or committed in a period.
    int64_t spentSeen = 0, committedSeen = 0, periodEndSeen = 0;
    bool seen = false;  // committedSeen is a base (the first view sets it, counting nothing)
  };
  std::map<std::pair<std::string, std::string>, PoolSeries> pools_;  // by pool, dimension
  // What pool_spent_total adds for a view (and the base for the next).
  static int64_t spentSince(PoolSeries& s, const BudgetView& v);
  prometheus::Family<prometheus::Gauge>* breakerState_;
  std::map<std::string, prometheus::Gauge*> breakers_;  // by upstream (render()'s thread)
  prometheus::Family<prometheus::Counter>* budgetOps_;
  prometheus::Family<prometheus::Histogram>* budgetSeconds_;
  std::atomic<prometheus::Counter*> budgetCounters_[3][6] = {};
  std::atomic<prometheus::Histogram*> budgetHistograms_[3] = {};
  prometheus::Counter* auditRecords_;
  prometheus::Counter* auditBatches_;
  prometheus::Counter* auditFailures_;
  prometheus::Counter* auditDropped_;
  prometheus::Counter* auditBackpressure_;
  prometheus::Histogram* auditFsync_;
  prometheus::Gauge* auditLastCheckpoint_;
  prometheus::Gauge* auditHealthy_;
  prometheus::Gauge* replicaSeq_;
  prometheus::Gauge* replicaLag_;
  prometheus::Gauge* replicaDropped_;
  std::vector<std::function<void()>> renderHooks_;
  prometheus::Gauge* leafCached_;
  prometheus::Counter* leafSignings_;
  prometheus::Counter* leafHits_;
  uint64_t leafSigningsSeen_ = 0, leafHitsSeen_ = 0;  // render() is called by one thread
  std::vector<std::unique_ptr<Listener>> listeners_;
};

}  // namespace tollgate
