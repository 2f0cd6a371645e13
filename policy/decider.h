// Decider: the one question the proxy asks for every request, before any byte of it goes
// upstream: may this call go out? Implementations live in policy/; the proxy knows only
// this interface.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

struct uv_loop_s;

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
  std::string_view contentType;
  // The body, when the decider asked for it (needsBody) and the proxy read it.
  bool bodyAvailable = false;
  bool bodyTruncated = false;  // larger than the bound the decider gave
  std::string_view body;
  // sha256 hex of `body` when the proxy has it already (it records it in the audit record);
  // empty: the decider hashes the body itself if it needs to.
  std::string_view bodySha256;
};

enum class Verdict { kAllow, kHalt, kThrottle, kApprove };

struct Decision {
  Verdict verdict = Verdict::kHalt;
  std::string rule;    // id of the rule that decided
  std::string reason;  // for people: why
  // What the agent's refusal says instead of `reason`, when that names what an agent must
  // not learn (the budget store's address); empty: `reason`. The audit record keeps `reason`.
  std::string agentReason;
  std::string tool;           // the tool the call was attributed to
  int retryAfterSeconds = 0;  // for kThrottle
  std::string approvalId;     // for kApprove
  std::string policyDigest;   // the policy set that decided
  // The agents: entry (its id glob) the call's agent matched, "unlisted" for none; empty
  // without policies. tollgate_agent_steps_total counts by it.
  std::string agentClass;
  // The decider's own state for this call, handed back with onOutcome(); opaque to the proxy.
  std::shared_ptr<const void> context;
};

// What happened to an allowed call, for failure counters and circuit breakers.
struct Outcome {
  int status = 0;       // the upstream's status, 0 when there was none
  bool failed = false;  // 5xx, connect error or timeout
  bool sent = true;     // false only when no byte of the call reached an upstream
  // A header of the upstream response, while onOutcome() runs (null without a response);
  // given more than once, its values joined with ", " (RFC 9110, 5.3).
  std::function<std::optional<std::string>(std::string_view)> responseHeader;
  // The whole response body, when responseBodyNeeded() asked for it and it came whole,
  // uncompressed and within that size; valid while onOutcome() runs.
  std::optional<std::string_view> responseBody;
};

const char* verdictName(Verdict verdict);

class Decider {
 public:
  using Done = std::function<void(Decision)>;
  virtual ~Decider() = default;
  // Calls done exactly once, possibly before returning, always on the caller's loop thread.
  virtual void decide(const CallInfo& call, Done done) = 0;
  // Whether decide() needs the body of a call to this host, and at most how many bytes.
  virtual size_t bodyNeeded(std::string_view /*host*/) const { return 0; }
  // Whether onOutcome() needs the response body of an allowed call, and at most how many
  // bytes of it (a larger body is not kept: the outcome has none).
  virtual size_t responseBodyNeeded(const Decision& /*decision*/) const { return 0; }
  // Reports the outcome of a call that was allowed.
  virtual void onOutcome(const CallInfo& /*call*/, const Decision& /*decision*/,
                         const Outcome& /*outcome*/) {}
  // A worker loop starts or stops deciding on the calling thread (e.g. for per-loop
  // connections); `done` runs once the loop's handles are released.
  virtual void attachLoop(uv_loop_s* /*loop*/) {}
  virtual void detachLoop(std::function<void()> done) { done(); }
  // Re-reads the policies; returns an error message, or empty when the new set is active.
  virtual std::string reload() { return {}; }
};

}  // namespace tollgate
