// Decider: the one question the proxy asks for every request, before any byte of it goes
// upstream: may this call go out? Implementations live in policy/; the proxy knows only
// this interface.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace tollgate {

// What the proxy knows about a call when it asks. Views are valid during decide() only.
struct CallInfo {
  std::string_view listener;
  std::string_view agent;   // from the listener's identity source, "anonymous" without one
  std::string_view method;  // "GET", "CONNECT", …
  std::string_view scheme;  // "http", or "tunnel" for CONNECT
  std::string_view host;    // lower-case, IPv6 without brackets
  uint16_t port = 0;
  std::string_view target;  // path and query as received
};

enum class Verdict { kAllow, kHalt, kThrottle };

struct Decision {
  Verdict verdict = Verdict::kHalt;
  std::string rule;           // id of the rule that decided
  std::string reason;         // for people: why
  std::string tool;           // the tool the call was attributed to
  int retryAfterSeconds = 0;  // for kThrottle
};

const char* verdictName(Verdict verdict);

class Decider {
 public:
  using Done = std::function<void(Decision)>;
  virtual ~Decider() = default;
  // Calls done exactly once, possibly before returning, always on the caller's loop thread.
  virtual void decide(const CallInfo& call, Done done) = 0;
};

}  // namespace tollgate
