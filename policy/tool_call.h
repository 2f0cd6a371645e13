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

// The value at "a.b.c" (object keys joined by dots) in a JSON document, or null: a rule's
// params.* condition, a cost's response-body field.
const nlohmann::json* jsonAt(const nlohmann::json& doc, std::string_view path);

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
  // Every tools/call in the body (a JSON-RPC batch may carry several), and the arguments of
  // each (null where it gives none), in the same order.
  const std::vector<std::string>& mcpTools() const { return mcpTools_; }
  // The set's MCP tools whose host, methods and paths fit this request, in set order: found
  // once per call, not once per tools/call of a batch (each a match of every path glob
  // against a path of up to max_uri_bytes).
  const std::vector<const ToolDef*>& mcpFits() const { return mcpFits_; }
  const std::vector<nlohmann::json>& mcpArguments() const { return mcpArguments_; }
  // Whether the tool the host, method and path chose is a subject of the decision beside
  // the MCP tools its body calls: always, unless it is the MCP tool those calls belong to
  // (or no tool was chosen and the body calls MCP tools).
  bool attributedIsSubject() const {
    return mcpTools_.empty() || (toolDef_ && toolDef_->mcpTools.empty());
  }
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
  std::vector<const ToolDef*> mcpFits_;
  std::vector<nlohmann::json> mcpArguments_;
  std::string bodyDigest_;  // of the body read, as sent (for the approval fingerprint)
};

// The MCP tool of the set that a tools/call of `name` in `call` belongs to: the first tool
// whose mcp_tools name it and whose host, methods and paths fit the call (an MCP tool of
// this very endpoint); null when none does.
const ToolDef* mcpToolOf(const PolicySet& set, const ToolCall& call, std::string_view name);

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
  // A normalised path as servers that strip path parameters see it (Tomcat, Jetty, Spring:
  // `/admin;x/users` is `/admin/users`): what rules and routes match, so a parameter cannot
  // take a call out of a deny; the path sent on keeps them.
  static std::string withoutPathParameters(std::string_view path);
};

}  // namespace tollgate
