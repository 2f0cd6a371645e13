// HostListDecider: the foundation's decider. Halts hosts on the deny list, allows hosts on
// the allow list, halts everything else (default deny). The policy engine replaces it.
#pragma once

#include <string>
#include <vector>

#include "policy/decider.h"

namespace tollgate {

class HostListDecider : public Decider {
 public:
  // Patterns: "*" (every host), "*.example.com" (subdomains only), or an exact host.
  HostListDecider(std::vector<std::string> allow, std::vector<std::string> deny);
  void decide(const CallInfo& call, Done done) override;
  Decision decideNow(const CallInfo& call) const;

  static bool matches(std::string_view pattern, std::string_view host);

 private:
  std::vector<std::string> allow_;
  std::vector<std::string> deny_;
};

}  // namespace tollgate
