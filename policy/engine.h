// Engine: evaluates a ToolCall against a PolicySet (DESIGN §3): deny-overrides with default
// deny, every matching rule evaluated, a rule that errors counts as a halt, rate limits as
// token buckets (the tightest wins), failure counters, circuit breakers per upstream,
// cascade quarantine, and human approvals with leases. The policy set is immutable; the
// engine holds the state that outlives one call, behind one mutex.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/result.h"
#include "policy/decider.h"
#include "policy/policy_set.h"
#include "policy/tool_call.h"

namespace tollgate {

struct Approval {
  std::string id;
  std::string fingerprint;
  std::string agent, tool, method, authority, path, rule, policyDigest;
  int64_t createdMs = 0;
  int64_t expiresMs = 0;          // a pending approval nobody answered is void after this
  std::string state = "pending";  // pending | approved | denied
  int64_t leaseUntilMs = 0;       // approved: the same call is allowed until then
};

// A circuit breaker's state for one upstream (GET /v1/breakers, tollgate_breaker_state).
struct BreakerView {
  std::string upstream;  // host:port
  std::string host;      // the breakers: entry it matched
  std::string state;     // closed | open | half-open
  int consecutiveFailures = 0;
  int failures = 0;  // the entry's threshold
  int64_t cooldownMs = 0;
  int64_t openUntilMs = 0;     // open: when it turns half-open; 0 when closed
  bool probeInFlight = false;  // half-open: the one probe call is out
};

class Engine {
 public:
  using Clock = std::function<int64_t()>;  // wall-clock milliseconds
  explicit Engine(Clock clock = nullptr);

  Decision evaluate(const PolicySet& set, const Result<ToolCall>& call);
  void recordOutcome(const PolicySet& set, const ToolCall& call, const Outcome& outcome);

  // Quarantines agents matching `glob` for `ttl` (a neighbour's halt on another sidecar).
  void addQuarantine(const std::string& glob, std::chrono::milliseconds ttl);
  // Told of every quarantine a cascade starts here, to share it with other sidecars.
  std::function<void(const std::string& glob, std::chrono::milliseconds ttl)> onQuarantine;

  std::vector<Approval> approvals() const;
  // Quarantines in force or not yet swept (one per agent glob).
  size_t quarantineEntries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return quarantine_.size();
  }
  // Every upstream a breaker has seen, by upstream.
  std::vector<BreakerView> breakers() const;
  // Returns false when there is no pending approval with this id.
  bool approve(const std::string& id, std::chrono::milliseconds lease);
  bool deny(const std::string& id);

  std::chrono::milliseconds approvalTtl{15 * 60 * 1000};
  std::chrono::milliseconds defaultLease{60 * 60 * 1000};
  // Approvals asked are keyed by what agents choose (a query string makes a new one): at
  // most this many per agent within approvalTtl, and this many kept in all; past either a
  // call that needs a new one is halted (rule approval_limit) instead of queued.
  size_t maxApprovalsPerAgent = 100;
  size_t maxApprovals = 10'000;

 private:
  struct Bucket {
    double tokens = 0;
    int64_t lastMs = 0;
    int64_t fullMs = 0;  // when it will be full again: a full bucket is forgotten
  };
  struct Breaker {
    int consecutive = 0;
    int64_t openUntilMs = 0;   // open while now < openUntilMs
    int64_t probeSinceMs = 0;  // half-open: when the probe call went out
    // The breakers: entry it last matched, copied (a reload frees the set's own).
    std::string host;
    int failures = 0;
    int64_t cooldownMs = 0;
    int64_t lastMs = 0;  // the last outcome reported
  };
  static void noteDef(Breaker& state, const BreakerDef& def);
  // A subject of a call: the tool it was attributed to or, for MCP, each tool it calls.
  struct Subject {
    std::string tool;
    ActionClass cls;
    bool declared;  // a tool of the set, not an undeclared host or MCP tool
    bool allowed = false;
  };
  // `params`: the fields the condition reads (the call's, or one tools/call's arguments).
  bool conditionHolds(const Condition& c, const ToolCall& call, const nlohmann::json& params,
                      int64_t nowMs, std::string& error) const;
  int failuresWithin(const std::string& agent, std::chrono::milliseconds window,
                     int64_t nowMs) const;
  void quarantineNeighbours(const PolicySet& set, const std::string& agent,
                            std::chrono::milliseconds ttl, int64_t nowMs);
  // Once a minute (under mutex_): forgets what agent-chosen keys left behind and no longer
  // counts (approvals an hour past their end, full buckets, failures older than a day,
  // breakers not open with no outcome for kBreakerIdleMs).
  void sweep(int64_t nowMs);
  int64_t sweptMs_ = 0;
  static constexpr int64_t kBreakerIdleMs = 15 * 60'000;

  Clock clock_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::deque<int64_t>> failures_;  // agent -> failure times
  std::unordered_map<std::string, Bucket> buckets_;                // rule|key -> bucket
  std::unordered_map<std::string, Breaker> breakers_;              // host:port -> breaker
  std::vector<std::pair<std::string, int64_t>> quarantine_;        // agent glob, until
  std::map<std::string, Approval> approvals_;                      // id -> approval
  // fingerprint '\n' policy digest -> the latest approval asked for it (one lookup per call,
  // not a scan of every approval under the lock).
  std::unordered_map<std::string, std::string> latestApproval_;
  std::unordered_map<std::string, std::deque<int64_t>> approvalsAsked_;  // agent -> times
  uint64_t approvalCounter_ = 0;
  // evaluate()'s working lists, kept with their capacity from call to call (under mutex_).
  std::vector<Subject> subjects_;
  std::vector<uint32_t> candidates_;
  std::vector<const Rule*> allows_;
};

}  // namespace tollgate
