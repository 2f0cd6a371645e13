#include "policy/host_list_decider.h"

#include <algorithm>
#include <cctype>

namespace tollgate {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

}  // namespace

const char* verdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kAllow:
      return "allow";
    case Verdict::kHalt:
      return "halt";
    case Verdict::kThrottle:
      return "throttle";
    case Verdict::kApprove:
      return "approve";
  }
  return "halt";
}

HostListDecider::HostListDecider(std::vector<std::string> allow, std::vector<std::string> deny) {
  for (auto& p : allow) allow_.push_back(lower(std::move(p)));
  for (auto& p : deny) deny_.push_back(lower(std::move(p)));
}

bool HostListDecider::matches(std::string_view pattern, std::string_view host) {
  if (pattern == "*") return true;
  if (pattern.starts_with("*.")) {
    auto suffix = pattern.substr(1);  // ".example.com"
    return host.size() > suffix.size() && host.ends_with(suffix);
  }
  return pattern == host;
}

Decision HostListDecider::decideNow(const CallInfo& call) const {
  Decision d;
  d.tool = std::string(call.host);
  for (const auto& p : deny_) {
    if (matches(p, call.host)) {
      d.verdict = Verdict::kHalt;
      d.rule = "hosts.deny";
      d.reason = "host " + std::string(call.host) + " is on the deny list";
      return d;
    }
  }
  for (const auto& p : allow_) {
    if (matches(p, call.host)) {
      d.verdict = Verdict::kAllow;
      d.rule = "hosts.allow";
      return d;
    }
  }
  d.verdict = Verdict::kHalt;
  d.rule = "hosts.default-deny";
  d.reason = "host " + std::string(call.host) + " is not on the allow list";
  return d;
}

void HostListDecider::decide(const CallInfo& call, Done done) {
  done(decideNow(call));
}

}  // namespace tollgate
