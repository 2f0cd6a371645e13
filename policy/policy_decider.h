// PolicyDecider: the Decider backed by the policy engine. Holds the active PolicySet
// behind an atomic pointer: a reload validates the whole new set and swaps it in at once
// for every worker; calls being decided keep the set they started with; a set that does
// not load is rejected and the last good one stays.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/result.h"
#include "policy/budget_store.h"
#include "policy/decider.h"
#include "policy/engine.h"
#include "policy/policy_set.h"
#include "policy/tool_call.h"

namespace tollgate {

// The config's `store:` section.
struct StoreConfig {
  std::string backend = "memory";  // or "redis"
  std::vector<std::string> urls;
  std::chrono::milliseconds timeout{100};
  bool initMissing = false;
};

class PolicyDecider : public Decider {
 public:
  static Result<std::unique_ptr<PolicyDecider>> create(std::vector<std::string> files,
                                                       const StoreConfig& store = {});

  void decide(const CallInfo& call, Done done) override;
  size_t bodyNeeded(std::string_view host) const override;
  size_t responseBodyNeeded(const Decision& decision) const override;
  void onOutcome(const CallInfo& call, const Decision& decision, const Outcome& outcome) override;
  std::string reload() override;
  void attachLoop(uv_loop_s* loop) override { budgets_->attach(loop); }
  void detachLoop(std::function<void()> done) override { budgets_->detach(std::move(done)); }

  Decision decideNow(const CallInfo& call);
  std::shared_ptr<const PolicySet> current() const { return set_.load(); }
  Engine& engine() { return engine_; }
  BudgetStore& budgets() { return *budgets_; }

  // How long a reservation is held before it is committed anyway (the call may have run).
  std::chrono::milliseconds holdTtl{120'000};
  // Called by reload() with a new valid set before it becomes active (so before any decision
  // carries its digest), e.g. to archive it; an error message rejects the set.
  std::function<std::string(const PolicySet& next, const PolicySet& previous)> beforeActivate;

 private:
  PolicyDecider(std::vector<std::string> files, std::shared_ptr<const PolicySet> set);
  // What onOutcome() needs of an allowed call: the set that decided, the call itself and,
  // when it was charged, its reservation.
  struct Outcomes {
    std::shared_ptr<const PolicySet> set;
    ToolCall call;
    std::string callId;           // empty: not charged
    std::vector<Charge> charges;  // what the reserve held, for the settle or release
  };
  std::vector<Charge> chargesOf(const PolicySet& set, const ToolCall& call) const;
  std::vector<std::string> files_;
  std::mutex reloadMutex_;  // reloads come from signals, the file watch and the admin API
  std::atomic<std::shared_ptr<const PolicySet>> set_;
  Engine engine_;
  std::unique_ptr<BudgetStore> budgets_;
};

}  // namespace tollgate
