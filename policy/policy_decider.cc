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
  return engine_.evaluate(*set, Extractor::extract(call, *set));
}

void PolicyDecider::decide(const CallInfo& call, Done done) {
  done(decideNow(call));
}

size_t PolicyDecider::bodyNeeded(std::string_view host) const {
  auto set = set_.load();
  return set->needsBody(host) ? set->maxBodyBytes() : 0;
}

void PolicyDecider::onOutcome(const CallInfo& call, const Decision&, const Outcome& outcome) {
  auto set = set_.load();
  if (!set->tracksOutcomes()) return;
  auto tc = Extractor::extract(call, *set);
  if (tc) engine_.recordOutcome(*set, tc.value(), outcome);
}

std::string PolicyDecider::reload() {
  auto set = PolicySet::load(files_);
  if (!set) return set.error().message;
  set_.store(set.value());
  return {};
}

}  // namespace tollgate
