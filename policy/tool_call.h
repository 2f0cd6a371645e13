// ToolCall: what the policy engine decides on. Only the Extractor can build one (the
// safe-kernel contract, DESIGN §2): it canonicalises the destination and the path so that
// a rule cannot be dodged by spelling a forbidden call differently, attributes the call to
// a tool, and parses bounded JSON params and MCP JSON-RPC calls. Anything it cannot
// normalise is an extraction error, which the engine turns into a halt.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "policy/decider.h"
#include "policy/policy_set.h"

namespace tollgate {

class ToolCall {
 public:
  const std::string& agent() const { return agent_; }
  const std::string& scheme() const { return scheme_; }
  const std::string& host() const { return host_; }
  uint16_t port() const { return port_; }
  const std::string& method() const { return method_; }
  const std::string& path() const { return path_; }  // normalised, decoded where safe
  const std::string& query() const { return query_; }
  ActionClass actionClass() const { return actionClass_; }
  const std::string& tool() const {
    return tool_;
  }  // tool name, or "host:<host>" when none matched
  const ToolDef* toolDef() const { return toolDef_; }
  const nlohmann::json& params() const { return params_; }  // null when there is no JSON body
  const std::string& mcpMethod() const { return mcpMethod_; }
  // Every tools/call in the body (a JSON-RPC batch may carry several).
  const std::vector<std::string>& mcpTools() const { return mcpTools_; }
  // Stable over equal calls: the approval lease is keyed by it.
  std::string fingerprint() const;

 private:
  friend class Extractor;
  ToolCall() = default;
  std::string agent_, scheme_, host_, method_, path_, query_, tool_, mcpMethod_;
  uint16_t port_ = 0;
  ActionClass actionClass_ = ActionClass::kRead;
  const ToolDef* toolDef_ = nullptr;
  nlohmann::json params_;
  std::vector<std::string> mcpTools_;
};

class Extractor {
 public:
  // Builds the ToolCall of `call` under `set`, or says why it cannot.
  static Result<ToolCall> extract(const CallInfo& call, const PolicySet& set);

  // Canonical host: lower-case, no trailing dot; IPv4 in any of its spellings (decimal,
  // octal, hex, short forms) as a dotted quad; IPv6 in its compressed form.
  static Result<std::string> canonicalHost(std::string_view host);
  // Normalised path: unreserved percent-escapes decoded, dot segments removed, duplicate
  // slashes collapsed. Encoded '/', '\', NUL, invalid escapes or UTF-8 are errors.
  static Result<std::string> normalisePath(std::string_view path);
};

}  // namespace tollgate
