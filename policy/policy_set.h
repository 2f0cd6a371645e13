// PolicySet: the governance policies loaded from YAML (DESIGN §4) into one immutable
// object that every worker shares. Loading validates the whole set: a bad set is an
// error naming file:line:column, never a partial set. Each set carries the digest of its
// files, recorded with every decision it makes.
#pragma once

#include <re2/re2.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/result.h"
#include "policy/time_zone.h"

namespace tollgate {

enum class ActionClass { kRead, kWrite, kDelete };
const char* actionClassName(ActionClass c);

struct SourceMark {
  std::string file;
  int line = 0;
  int column = 0;
  std::string str() const;  // "file:line:column"
};

struct Cost {
  int64_t effort = 0;
  int64_t risk = 0;
  // Response headers that carry the real cost, read when the call is settled (an integer;
  // a missing or malformed value settles at the estimate).
  std::string effortHeader;
  std::string riskHeader;
  // Or a field of the JSON response body ("usage.total_tokens": object keys, dotted), read
  // when the whole body has passed (a non-negative integer; a body that is not JSON, larger
  // than the policy's max_body_bytes, compressed or cut short settles at the estimate).
  std::string effortField;
  std::string riskField;
  bool readsResponseBody() const { return !effortField.empty() || !riskField.empty(); }
};

struct ToolDef {
  std::string name;
  std::vector<std::string> hosts;     // host patterns: exact, "*.suffix" or "*"
  std::vector<std::string> methods;   // upper-case; empty: any
  std::vector<std::string> paths;     // globs over the normalised path; empty: any
  std::vector<std::string> mcpTools;  // MCP tools/call names (globs); empty: not an MCP tool
  ActionClass actionClass = ActionClass::kRead;
  Cost cost;
  // Responses that count as failures of this tool (besides 5xx, connect errors and
  // timeouts), e.g. 409 or 422 for an API that reports errors that way.
  std::vector<int> failureStatuses;
  SourceMark mark;
};

struct Budget {
  int64_t limit = 0;
  std::chrono::milliseconds period{0};
};

struct PoolDef {
  std::string name;
  std::optional<Budget> effort;
  std::optional<Budget> risk;
  bool shared = false;  // scope: shared
  bool failOpen = false;
  SourceMark mark;
};

struct AgentDef {
  std::string pattern;  // glob over agent ids
  std::string pool;
  std::vector<std::string> neighbours;  // agent globs quarantined with it (cascade)
  SourceMark mark;
};

enum class Effect { kAllow, kHalt, kApprove };
const char* effectName(Effect e);

// One condition of a rule's `when`; all of a rule's conditions must hold.
struct Condition {
  enum class Kind { kCompare, kIn, kMatches, kFailures, kTime };
  enum class Op { kLt, kLte, kGt, kGte, kEq, kNe };
  Kind kind = Kind::kCompare;
  std::string param;  // "amount" for params.amount ("a.b" for nested)
  Op op = Op::kEq;
  double number = 0;
  std::vector<std::string> values;   // kIn
  std::shared_ptr<const RE2> regex;  // kMatches
  int64_t failures = 0;              // kFailures: agent.failures >= failures within window
  std::chrono::milliseconds window{0};
  int fromMinute = 0, toMinute = 0;      // kTime: [from, to) minutes of the day, may wrap
  uint8_t days = 0x7f;                   // kTime: bit 0 = Monday
  std::shared_ptr<const TimeZone> zone;  // kTime; null: UTC
  SourceMark mark;
  std::string describe() const;
};

struct RateLimit {
  enum class Key { kAgent, kTool, kAgentTool };
  double requests = 0;
  std::chrono::milliseconds per{0};
  double burst = 0;
  Key key = Key::kAgent;
};

struct RuleMatch {
  std::string tool;  // glob; empty: any
  std::optional<ActionClass> actionClass;
  std::string agent;  // glob; empty: any
  std::string host;   // host pattern; empty: any
  std::vector<std::string> methods;
};

struct Rule {
  std::string id;
  Effect effect = Effect::kHalt;
  RuleMatch match;
  std::vector<Condition> when;
  std::optional<RateLimit> rateLimit;
  std::string reason;
  std::chrono::milliseconds cascade{0};  // quarantine neighbours for this long on a halt
  bool needsParams = false;              // a condition reads params: the body must be read
  bool exactTool = false;                // match.tool has no wildcard
  SourceMark mark;
};

struct BreakerDef {
  std::string host;  // host pattern
  int failures = 5;
  std::chrono::milliseconds cooldown{30'000};
  SourceMark mark;
};

// One policy file as it was read: its path as named in the config and its bytes. The digest
// is computed over these, so the same sources always give the same set and digest.
struct PolicySource {
  std::string file;
  std::string text;
};

class PolicySet {
 public:
  // Loads and validates every file; the set is all of them together.
  static Result<std::shared_ptr<const PolicySet>> load(const std::vector<std::string>& files);
  // The same from sources already read (e.g. a set archived in the audit log).
  static Result<std::shared_ptr<const PolicySet>> fromSources(std::vector<PolicySource> sources);
  // For tests and `policy test`: one document from text.
  static Result<std::shared_ptr<const PolicySet>> parse(const std::string& text,
                                                        const std::string& file);

  const std::vector<ToolDef>& tools() const { return tools_; }
  const std::vector<PoolDef>& pools() const { return pools_; }
  const std::vector<AgentDef>& agents() const { return agents_; }
  const std::vector<Rule>& rules() const { return rules_; }
  const std::vector<BreakerDef>& breakers() const { return breakers_; }
  const std::string& digest() const { return digest_; }  // "sha256:<hex>"
  const std::vector<std::string>& files() const { return files_; }
  // Every file's bytes as loaded (empty for parse()): what is archived by digest.
  const std::vector<PolicySource>& sources() const { return sources_; }
  // True when some rule needs the request body (params or MCP) for a call to this host.
  bool needsBody(std::string_view host) const;
  // True when breakers or failure conditions need the outcome of calls.
  bool tracksOutcomes() const;
  // Bounds for reading the body.
  size_t maxBodyBytes() const { return maxBodyBytes_; }
  int maxJsonDepth() const { return maxJsonDepth_; }
  size_t maxJsonKeys() const { return maxJsonKeys_; }

  const ToolDef* findTool(std::string_view name) const;
  // The indexes of every rule that could match a call to `tool` of class `cls`, in file
  // order: rules naming the tool exactly, tool globs whose literal prefix the name starts
  // with, and rules naming no tool (by class, or for any class). Appends to out.
  void candidateRules(const std::string& tool, ActionClass cls, std::vector<uint32_t>& out) const;
  const PoolDef* findPool(std::string_view name) const;
  const AgentDef* findAgent(std::string_view agentId) const;  // first matching pattern

 private:
  friend class PolicyLoader;
  std::vector<ToolDef> tools_;
  std::vector<PoolDef> pools_;
  std::vector<AgentDef> agents_;
  std::vector<Rule> rules_;
  std::vector<BreakerDef> breakers_;
  std::vector<std::string> files_;
  std::vector<PolicySource> sources_;
  std::string digest_;
  std::unordered_map<std::string, std::vector<uint32_t>> rulesByTool_;  // exact tool names
  std::unordered_map<std::string, std::vector<uint32_t>>
      rulesByPrefix_;                      // tool globs by literal prefix
  std::vector<uint32_t> rulesByClass_[3];  // no tool, one class
  std::vector<uint32_t> rulesForAny_;      // no tool, any class
  size_t longestPrefix_ = 0;
  // needsBody()'s answer, derived once: host patterns whose calls a rule may read the body
  // of, tool globs that may name a host's undeclared calls ("host:NAME"), or every host.
  std::vector<std::string> bodyHosts_, bodyToolGlobs_;
  bool bodyAnyHost_ = false;
  void buildIndex();
  size_t maxBodyBytes_ = 64 * 1024;
  int maxJsonDepth_ = 32;
  size_t maxJsonKeys_ = 1000;
};

// Glob over names: '*' matches any run of characters (including '.' and '/'), '?' one.
bool globMatch(std::string_view pattern, std::string_view text);
// Host patterns: "*" any, "*.example.com" strict subdomains, else exact (case-insensitive).
bool hostMatch(std::string_view pattern, std::string_view host);

}  // namespace tollgate
