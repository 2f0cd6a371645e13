#include "proxy/metrics.h"

#include <prometheus/text_serializer.h>

#include <algorithm>
#include <map>
#include <set>

namespace tollgate {
namespace {

const prometheus::Histogram::BucketBoundaries& latencyBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
      0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
  return b;
}

// Tunnels live from under a second (a CONNECT for one HTTPS exchange) to tunnel_idle (1h)
// and more.
const prometheus::Histogram::BucketBoundaries& tunnelBuckets() {
  static const prometheus::Histogram::BucketBoundaries b = {0.1, 1,   5,   10,   30,
                                                            60,  300, 600, 1800, 3600};
  return b;
}

}  // namespace

prometheus::Counter& Metrics::Listener::status(int code) {
  if (code < 100 || code >= 600) code = 599;
  auto* c = byStatus[static_cast<size_t>(code)].load(std::memory_order_acquire);
  if (!c) {
    // Family::Add returns the same metric for the same labels, so a race only repeats work.
    c = &requests->Add({{"listener", name}, {"status", std::to_string(code)}});
    byStatus[static_cast<size_t>(code)].store(c, std::memory_order_release);
  }
  return *c;
}

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  requests_ = &prometheus::BuildCounter()
                   .Name("tollgate_requests_total")
                   .Help("Requests answered, by listener and status")
                   .Register(r);
  requestSeconds_ =
      &prometheus::BuildHistogram()
           .Name("tollgate_request_duration_seconds")
           .Help(
               "Time from the request head to the end of the response (for a tunnel, to its "
               "establishment)")
           .Register(r);
  tunnelSeconds_ = &prometheus::BuildHistogram()
                        .Name("tollgate_tunnel_duration_seconds")
                        .Help(
                            "Lifetime of a tunnel (CONNECT, WebSocket), from its "
                            "establishment to its close")
                        .Register(r);
  upstreamSeconds_ = &prometheus::BuildHistogram()
                          .Name("tollgate_upstream_duration_seconds")
                          .Help("Time from sending the request upstream to the response head")
                          .Register(r);
  active_ = &prometheus::BuildGauge()
                 .Name("tollgate_active_connections")
                 .Help("Open client connections, by listener")
                 .Register(r);
  rejected_ = &prometheus::BuildCounter()
                   .Name("tollgate_connections_rejected_total")
                   .Help("Connections refused because the listener was at max_connections")
                   .Register(r);
  bytes_ = &prometheus::BuildCounter()
                .Name("tollgate_bytes_total")
                .Help("Bytes received from (in) and sent to (out) clients, by listener")
                .Register(r);
  connectErrors_ = &prometheus::BuildCounter()
                        .Name("tollgate_upstream_connect_errors_total")
                        .Help("Upstream connections that failed, by reason")
                        .Register(r);
  tlsFailures_ = &prometheus::BuildCounter()
                      .Name("tollgate_tls_handshake_failures_total")
                      .Help("TLS handshakes that failed, by side (agent: intercepted, upstream)")
                      .Register(r);
  decisions_ = &prometheus::BuildCounter()
                    .Name("tollgate_decisions_total")
                    .Help("Decisions, by decision and rule")
                    .Register(r);
  agentSteps_ = &prometheus::BuildCounter()
                     .Name("tollgate_agent_steps_total")
                     .Help(
                         "Calls decided (an agent's steps), by agent class (the agents: entry "
                         "the agent matched, unlisted for none) and decision")
                     .Register(r);
  reloads_ = &prometheus::BuildCounter()
                  .Name("tollgate_reloads_total")
                  .Help("Reload attempts, by result")
                  .Register(r);
  poolLimit_ = &prometheus::BuildGauge()
                    .Name("tollgate_pool_limit")
                    .Help("Budget limit per period, by pool and dimension")
                    .Register(r);
  poolCommitted_ = &prometheus::BuildGauge()
                        .Name("tollgate_pool_committed")
                        .Help("Budget committed this period, by pool and dimension")
                        .Register(r);
  poolHeld_ = &prometheus::BuildGauge()
                   .Name("tollgate_pool_held")
                   .Help("Budget held by calls in flight")
                   .Register(r);
  breakerState_ = &prometheus::BuildGauge()
                       .Name("tollgate_breaker_state")
                       .Help("Circuit breaker per upstream: 0 closed, 1 half-open, 2 open")
                       .Register(r);
  poolRemaining_ = &prometheus::BuildGauge()
                        .Name("tollgate_pool_remaining")
                        .Help("Budget left this period: limit - committed - held")
                        .Register(r);
  poolAvailable_ = &prometheus::BuildGauge()
                        .Name("tollgate_pool_available")
                        .Help(
                            "1 when the budget store answered for the pool at this scrape; 0: "
                            "the other pool gauges are its last answer")
                        .Register(r);
  poolTripped_ = &prometheus::BuildGauge()
                      .Name("tollgate_pool_tripped")
                      .Help("1 while the pool is tripped by an overrun this period")
                      .Register(r);
  poolInitialised_ = &prometheus::BuildGauge()
                          .Name("tollgate_pool_initialised")
                          .Help(
                              "1 when the pool exists in the store; 0: calls are halted "
                              "(budget_uninitialised) until `tollgate pools init`")
                          .Register(r);
  poolSpent_ = &prometheus::BuildCounter()
                    .Name("tollgate_pool_spent_total")
                    .Help(
                        "Budget committed across periods (its rate is the drain rate; "
                        "pool_committed resets at each period), seen at the scrapes")
                    .Register(r);
  budgetOps_ = &prometheus::BuildCounter()
                    .Name("tollgate_budget_operations_total")
                    .Help(
                        "Budget store operations (reserve, settle, release) by result; "
                        "budget_unavailable counts store errors and timeouts")
                    .Register(r);
  budgetSeconds_ = &prometheus::BuildHistogram()
                        .Name("tollgate_budget_store_seconds")
                        .Help("Budget store latency by operation")
                        .Register(r);
  halts_ = &prometheus::BuildCounter()
                .Name("tollgate_halts_total")
                .Help("Halted calls, by reason")
                .Register(r);
  decisionSeconds_ = &prometheus::BuildHistogram()
                          .Name("tollgate_policy_evaluation_seconds")
                          .Help("Time to decide a call (extraction and policy evaluation)")
                          .Register(r)
                          .Add({}, prometheus::Histogram::BucketBoundaries{
                                       0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005,
                                       0.0001, 0.001, 0.01});
  auditRecords_ = &prometheus::BuildCounter()
                       .Name("tollgate_audit_records_total")
                       .Help("Audit records made durable (written and fsynced)")
                       .Register(r)
                       .Add({});
  auditBatches_ = &prometheus::BuildCounter()
                       .Name("tollgate_audit_batches_total")
                       .Help("Audit group commits: one write and one fsync each")
                       .Register(r)
                       .Add({});
  auditFailures_ = &prometheus::BuildCounter()
                        .Name("tollgate_audit_write_failures_total")
                        .Help("Audit batches that could not be written or fsynced")
                        .Register(r)
                        .Add({});
  auditDropped_ = &prometheus::BuildCounter()
                       .Name("tollgate_audit_dropped_records_total")
                       .Help(
                           "Audit records made after the stream failed, never written (their "
                           "calls were halted with audit_unavailable)")
                       .Register(r)
                       .Add({});
  auditBackpressure_ = &prometheus::BuildCounter()
                            .Name("tollgate_audit_backpressure_waits_total")
                            .Help(
                                "Audit appends that waited for the writer: records came "
                                "faster than the disk took them")
                            .Register(r)
                            .Add({});
  auditFsync_ = &prometheus::BuildHistogram()
                     .Name("tollgate_audit_fsync_seconds")
                     .Help("Time of one audit batch's fsync")
                     .Register(r)
                     .Add({}, prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005,
                                                                      0.001, 0.0025, 0.005, 0.01,
                                                                      0.025, 0.05, 0.1, 0.25, 1});
  auditLastCheckpoint_ = &prometheus::BuildGauge()
                              .Name("tollgate_audit_last_checkpoint_seq")
                              .Help("Seq of the last signed checkpoint written")
                              .Register(r)
                              .Add({});
  auditHealthy_ = &prometheus::BuildGauge()
                       .Name("tollgate_audit_healthy")
                       .Help("1 while the audit stream can be written; 0: calls are halted")
                       .Register(r)
                       .Add({});
  auditHealthy_->Set(1);
  replicaSeq_ = &prometheus::BuildGauge()
                     .Name("tollgate_audit_replica_seq")
                     .Help("Last audit seq known to be in the Redis Stream replica")
                     .Register(r)
                     .Add({});
  replicaLag_ = &prometheus::BuildGauge()
                     .Name("tollgate_audit_replica_lag_records")
                     .Help("Durable audit records not yet in the Redis Stream replica")
                     .Register(r)
                     .Add({});
  replicaDropped_ = &prometheus::BuildGauge()
                         .Name("tollgate_audit_replica_dropped_records")
                         .Help("Records dropped from the replica's queue (read back from the log)")
                         .Register(r)
                         .Add({});
  leafCached_ = &prometheus::BuildGauge()
                     .Name("tollgate_tls_leaf_cache_entries")
                     .Help("Hosts whose intercepting leaf certificate is cached")
                     .Register(r)
                     .Add({});
  leafSignings_ = &prometheus::BuildCounter()
                       .Name("tollgate_tls_leaf_signings_total")
                       .Help("Leaf certificates signed by the local CA")
                       .Register(r)
                       .Add({});
  leafHits_ = &prometheus::BuildCounter()
                   .Name("tollgate_tls_leaf_cache_hits_total")
                   .Help("Intercepted connections served a cached leaf")
                   .Register(r)
                   .Add({});
}

void Metrics::tlsLeaves(uint64_t cached, uint64_t signings, uint64_t hits) {
  leafCached_->Set(static_cast<double>(cached));
  if (signings > leafSigningsSeen_)
    leafSignings_->Increment(static_cast<double>(signings - leafSigningsSeen_));
  if (hits > leafHitsSeen_) leafHits_->Increment(static_cast<double>(hits - leafHitsSeen_));
  leafSigningsSeen_ = signings;
  leafHitsSeen_ = hits;
}

void Metrics::auditBatch(size_t records, double fsyncSeconds, bool ok) {
  if (!ok) {
    auditFailures_->Increment();
    auditHealthy_->Set(0);
    return;
  }
  auditRecords_->Increment(static_cast<double>(records));
  auditBatches_->Increment();
  auditFsync_->Observe(fsyncSeconds);
}

Metrics::Listener& Metrics::addListener(const std::string& name) {
  auto l = std::make_unique<Listener>();
  l->name = name;
  l->requests = requests_;
  l->requestSeconds = &requestSeconds_->Add({{"listener", name}}, latencyBuckets());
  l->upstreamSeconds = &upstreamSeconds_->Add({{"listener", name}}, latencyBuckets());
  l->tunnelSeconds = &tunnelSeconds_->Add({{"listener", name}}, tunnelBuckets());
  l->activeConnections = &active_->Add({{"listener", name}});
  l->connectionsRejected = &rejected_->Add({{"listener", name}});
  l->bytesIn = &bytes_->Add({{"listener", name}, {"direction", "in"}});
  l->bytesOut = &bytes_->Add({{"listener", name}, {"direction", "out"}});
  listeners_.push_back(std::move(l));
  return *listeners_.back();
}

prometheus::Counter& Metrics::upstreamConnectErrors(const std::string& reason) {
  return connectErrors_->Add({{"reason", reason}});
}

prometheus::Counter& Metrics::tlsHandshakeFailures(const std::string& side) {
  return tlsFailures_->Add({{"side", side}});
}

prometheus::Counter& Metrics::decision(const std::string& decision, const std::string& rule) {
  return decisions_->Add({{"decision", decision}, {"rule", rule}});
}

prometheus::Counter& Metrics::agentStep(const std::string& agentClass,
                                        const std::string& decision) {
  return agentSteps_->Add({{"agent_class", agentClass}, {"decision", decision}});
}

int64_t Metrics::spentSince(PoolSeries& s, const BudgetView& v) {
  if (v.spent >= 0) {  // the store counts every commit: exact
    int64_t add = std::max<int64_t>(0, v.spent - s.spentSeen);
    s.spentSeen = v.spent;
    return add;
  }
  // From committed, which restarts at 0 each period: its rise since the last view, or all of
  // it in a new period or after a reset (`pools init --reset`). A budget missing from the
  // store has spent nothing: what it has once initialised is new.
  if (!v.initialised) {
    s.seen = true;
    s.committedSeen = 0;
    s.periodEndSeen = -1;
    return 0;
  }
  int64_t add = 0;
  if (s.seen) {
    bool samePeriod = v.periodEndMs == s.periodEndSeen && v.committed >= s.committedSeen;
    add = samePeriod ? v.committed - s.committedSeen : v.committed;
  }
  s.seen = true;
  s.committedSeen = v.committed;
  s.periodEndSeen = v.periodEndMs;
  return add;
}

void Metrics::setPools(const std::vector<BudgetView>& views) {
  std::set<std::pair<std::string, std::string>> listed;
  for (const auto& v : views) {
    auto& s = pools_[{v.pool, v.dimension}];
    listed.insert({v.pool, v.dimension});
    std::map<std::string, std::string> labels{{"pool", v.pool}, {"dimension", v.dimension}};
    if (!s.available) s.available = &poolAvailable_->Add(labels);
    s.available->Set(v.available ? 1 : 0);
    // The figures of a store that did not answer are unknown, not zero.
    if (!v.available) continue;
    if (!s.limit) {
      s.limit = &poolLimit_->Add(labels);
      s.committed = &poolCommitted_->Add(labels);
      s.held = &poolHeld_->Add(labels);
      s.remaining = &poolRemaining_->Add(labels);
      s.tripped = &poolTripped_->Add(labels);
      s.initialised = &poolInitialised_->Add(labels);
      s.spent = &poolSpent_->Add(labels);
    }
    s.limit->Set(static_cast<double>(v.limit));
    s.committed->Set(static_cast<double>(v.committed));
    s.held->Set(static_cast<double>(v.held));
    s.remaining->Set(static_cast<double>(v.remaining()));
    s.tripped->Set(v.tripped ? 1 : 0);
    s.initialised->Set(v.initialised ? 1 : 0);
    s.spent->Increment(static_cast<double>(spentSince(s, v)));
  }
  // A budget the policies no longer have would otherwise export its last figures forever.
  for (auto it = pools_.begin(); it != pools_.end();) {
    if (listed.contains(it->first)) {
      ++it;
      continue;
    }
    const PoolSeries& s = it->second;
    poolAvailable_->Remove(s.available);
    if (s.limit) {
      poolSpent_->Remove(s.spent);
      poolLimit_->Remove(s.limit);
      poolCommitted_->Remove(s.committed);
      poolHeld_->Remove(s.held);
      poolRemaining_->Remove(s.remaining);
      poolTripped_->Remove(s.tripped);
      poolInitialised_->Remove(s.initialised);
    }
    it = pools_.erase(it);
  }
}

void Metrics::setBreakers(const std::vector<std::pair<std::string, int>>& states) {
  std::set<std::string> listed;
  for (const auto& [upstream, state] : states) {
    auto& gauge = breakers_[upstream];
    if (!gauge) gauge = &breakerState_->Add({{"upstream", upstream}});
    gauge->Set(state);
    listed.insert(upstream);
  }
  for (auto it = breakers_.begin(); it != breakers_.end();) {
    if (listed.contains(it->first)) {
      ++it;
      continue;
    }
    breakerState_->Remove(it->second);
    it = breakers_.erase(it);
  }
}

void Metrics::budgetOperation(const std::string& op, const std::string& result, double seconds) {
  // Two per budgeted call: the series are looked up once, not per call.
  static const char* const kOps[] = {"reserve", "settle", "release"};
  static const char* const kResults[] = {"ok",
                                         "budget_exhausted",
                                         "budget_tripped",
                                         "budget_uninitialised",
                                         "budget_unavailable",
                                         "unknown_call"};
  size_t o = 0, r = 0;
  while (o < 3 && op != kOps[o]) ++o;
  while (r < 6 && result != kResults[r]) ++r;
  static const prometheus::Histogram::BucketBoundaries buckets{
      0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25};
  if (o == 3 || r == 6) {
    budgetOps_->Add({{"op", op}, {"result", result}}).Increment();
    budgetSeconds_->Add({{"op", op}}, buckets).Observe(seconds);
    return;
  }
  auto* counter = budgetCounters_[o][r].load(std::memory_order_acquire);
  if (!counter) {
    counter = &budgetOps_->Add({{"op", op}, {"result", result}});
    budgetCounters_[o][r].store(counter, std::memory_order_release);
  }
  counter->Increment();
  auto* histogram = budgetHistograms_[o].load(std::memory_order_acquire);
  if (!histogram) {
    histogram = &budgetSeconds_->Add({{"op", op}}, buckets);
    budgetHistograms_[o].store(histogram, std::memory_order_release);
  }
  histogram->Observe(seconds);
}

prometheus::Counter& Metrics::halts(const std::string& reason) {
  return halts_->Add({{"reason", reason}});
}

prometheus::Counter& Metrics::reloads(bool ok) {
  return reloads_->Add({{"result", ok ? "ok" : "error"}});
}

void Metrics::auditReplica(uint64_t replicatedSeq, uint64_t durableSeq, uint64_t dropped) {
  replicaSeq_->Set(static_cast<double>(replicatedSeq));
  replicaLag_->Set(
      static_cast<double>(durableSeq > replicatedSeq ? durableSeq - replicatedSeq : 0));
  replicaDropped_->Set(static_cast<double>(dropped));
}

std::string Metrics::render() const {
  for (const auto& hook : renderHooks_) hook();
  prometheus::TextSerializer serializer;
  return serializer.Serialize(registry_->Collect());
}

}  // namespace tollgate
