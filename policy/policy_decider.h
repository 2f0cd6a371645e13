// PolicyDecider: the Decider backed by the policy engine. Holds the active PolicySet
// behind an atomic pointer: a reload validates the whole new set and swaps it in at once
// for every worker; calls being decided keep the set they started with; a set that does
// not load is rejected and the last good one stays.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "policy/decider.h"
#include "policy/engine.h"
#include "policy/policy_set.h"
#include "policy/tool_call.h"

namespace tollgate {

class PolicyDecider : public Decider {
 public:
  static Result<std::unique_ptr<PolicyDecider>> create(std::vector<std::string> files);

  void decide(const CallInfo& call, Done done) override;
  size_t bodyNeeded(std::string_view host) const override;
  void onOutcome(const CallInfo& call, const Decision& decision, const Outcome& outcome) override;
  std::string reload() override;

  Decision decideNow(const CallInfo& call);
  std::shared_ptr<const PolicySet> current() const { return set_.load(); }
  Engine& engine() { return engine_; }

 private:
  PolicyDecider(std::vector<std::string> files, std::shared_ptr<const PolicySet> set);
  // What onOutcome() needs of an allowed call: the set that decided and the call itself.
  struct Outcomes {
    std::shared_ptr<const PolicySet> set;
    ToolCall call;
  };
  std::vector<std::string> files_;
  std::atomic<std::shared_ptr<const PolicySet>> set_;
  Engine engine_;
};

}  // namespace tollgate
