#include "policy/host_list_decider.h"

#include <algorithm>
#include <cctype>

#include "policy/tool_call.h"

namespace tollgate {
namespace {

// A pattern as hosts are compared: lower case, no trailing dot, an IP literal in its
// canonical form (the one a call's host is brought to).
std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (!s.empty() && s.back() == '.') s.pop_back();
  if (s.find(':') != std::string::npos ||
      (!s.empty() && std::isdigit(static_cast<unsigned char>(s[0])))) {
    if (auto canonical = Extractor::canonicalHost(s)) return canonical.value();
  }
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
  // Compared in canonical form, as a policy compares it: 2130706433, 0x7f000001, 127.1,
  // 0177.0.0.1 and ::ffff:127.0.0.1 are all 127.0.0.1 (and reach it), and must meet its deny.
  auto canonical = Extractor::canonicalHost(call.host);
  if (!canonical) {
    d.tool = std::string(call.host);
    d.verdict = Verdict::kHalt;
    d.rule = "extract";
    d.reason = "the call cannot be read safely: " + canonical.error().message;
    return d;
  }
  const std::string& host = canonical.value();
  d.tool = host;
  for (const auto& p : deny_) {
    if (matches(p, host)) {
      d.verdict = Verdict::kHalt;
      d.rule = "hosts.deny";
      d.reason = "host " + host + " is on the deny list";
      return d;
    }
  }
  for (const auto& p : allow_) {
    if (matches(p, host)) {
      d.verdict = Verdict::kAllow;
      d.rule = "hosts.allow";
      return d;
    }
  }
  d.verdict = Verdict::kHalt;
  d.rule = "hosts.default-deny";
  d.reason = "host " + host + " is not on the allow list";
  return d;
}

void HostListDecider::decide(const CallInfo& call, Done done) {
  done(decideNow(call));
}

}  // namespace tollgate
