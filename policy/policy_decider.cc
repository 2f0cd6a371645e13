#include "policy/policy_decider.h"

namespace tollgate {

Result<std::unique_ptr<PolicyDecider>> PolicyDecider::create(std::vector<std::string> files) {
  auto set = PolicySet::load(files);
  if (!set) return set.error();
  return std::unique_ptr<PolicyDecider>(new PolicyDecider(std::move(files), set.value()));
}

PolicyDecider::PolicyDecider(std::vector<std::string> files, std::shared_ptr<const PolicySet> set)
    : files_(std::move(files)), set_(std::move(set)) {}

Decision PolicyDecider::decideNow(const CallInfo& call) {
  auto set = set_.load();
  auto tc = Extractor::extract(call, *set);
  Decision d = engine_.evaluate(*set, tc);
  // Kept for onOutcome() when the set counts failures, so the call is not read twice.
  if (tc && d.verdict == Verdict::kAllow && set->tracksOutcomes()) {
    d.context = std::make_shared<const Outcomes>(Outcomes{set, std::move(tc.value())});
  }
  return d;
}

void PolicyDecider::decide(const CallInfo& call, Done done) {
  done(decideNow(call));
}

size_t PolicyDecider::bodyNeeded(std::string_view host) const {
  auto set = set_.load();
  return set->needsBody(host) ? set->maxBodyBytes() : 0;
}

void PolicyDecider::onOutcome(const CallInfo&, const Decision& decision, const Outcome& outcome) {
  if (!decision.context) return;
  const auto& ctx = *std::static_pointer_cast<const Outcomes>(decision.context);
  // Recorded against the set that decided: a reload in between does not mix the two.
  engine_.recordOutcome(*ctx.set, ctx.call, outcome);
}

std::string PolicyDecider::reload() {
  auto set = PolicySet::load(files_);
  if (!set) return set.error().message;
  set_.store(set.value());
  return {};
}

}  // namespace tollgate
