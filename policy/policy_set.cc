#include "policy/policy_set.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "common/json.h"
#include "common/sha256.h"
#include "common/units.h"
#include "policy/tool_call.h"

namespace tollgate {

const char* actionClassName(ActionClass c) {
  switch (c) {
    case ActionClass::kRead:
      return "read";
    case ActionClass::kWrite:
      return "write";
    case ActionClass::kDelete:
      return "delete";
  }
  return "read";
}

const char* effectName(Effect e) {
  switch (e) {
    case Effect::kAllow:
      return "allow";
    case Effect::kHalt:
      return "halt";
    case Effect::kApprove:
      return "approve";
  }
  return "halt";
}

std::string SourceMark::str() const {
  return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

std::string Condition::describe() const {
  static const char* ops[] = {"<", "<=", ">", ">=", "==", "!="};
  switch (kind) {
    case Kind::kCompare: {
      std::ostringstream o;
      o << "params." << param << ' ' << ops[static_cast<int>(op)] << ' ' << number;
      return o.str();
    }
    case Kind::kIn:
      return "params." + param + " in the allowed values";
    case Kind::kMatches:
      return "params." + param + " matches " + (regex ? regex->pattern() : "");
    case Kind::kFailures:
      return "agent.failures >= " + std::to_string(failures) + " within " +
             std::to_string(window.count() / 1000) + "s";
    case Kind::kTime:
      return "inside the time window";
  }
  return "condition";
}

namespace {

bool globImpl(std::string_view p, std::string_view t, char sep) {
  // Iterative glob with backtracking on the last star.
  size_t pi = 0, ti = 0, starP = std::string_view::npos, starT = 0;
  bool starCrosses = false;
  while (ti < t.size()) {
    if (pi < p.size() && p[pi] == '*') {
      starCrosses = sep == 0 || (pi + 1 < p.size() && p[pi + 1] == '*');
      while (pi < p.size() && p[pi] == '*') ++pi;
      starP = pi;
      starT = ti;
      continue;
    }
    if (pi < p.size() && (p[pi] == '?' || p[pi] == t[ti]) &&
        !(p[pi] == '?' && sep && t[ti] == sep)) {
      ++pi;
      ++ti;
      continue;
    }
    if (starP != std::string_view::npos && (starCrosses || t[starT] != sep)) {
      ++starT;
      ti = starT;
      pi = starP;
      continue;
    }
    return false;
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

}  // namespace

bool globMatch(std::string_view pattern, std::string_view text) {
  return globImpl(pattern, text, 0);
}

bool hostMatch(std::string_view pattern, std::string_view host) {
  auto eq = [](std::string_view a, std::string_view b) {
    auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; };
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                              [&](char x, char y) { return lower(x) == lower(y); });
  };
  if (pattern == "*") return true;
  if (pattern.starts_with("*.")) {
    auto suffix = pattern.substr(1);
    return host.size() > suffix.size() && eq(host.substr(host.size() - suffix.size()), suffix);
  }
  return eq(pattern, host);
}

// Path globs: '*' stays inside one segment, '**' crosses segments.
bool pathGlobMatch(std::string_view pattern, std::string_view path) {
  return globImpl(pattern, path, '/');
}

bool PolicySet::needsBody(std::string_view host) const {
  if (bodyAnyHost_) return true;
  for (const auto& p : bodyHosts_)
    if (hostMatch(p, host)) return true;
  if (bodyToolGlobs_.empty()) return false;
  std::string undeclared = "host:" + std::string(host);
  for (const auto& g : bodyToolGlobs_)
    if (globMatch(g, undeclared)) return true;
  return false;
}

bool PolicySet::tracksOutcomes() const {
  if (!breakers_.empty()) return true;
  for (const auto& t : tools_) {
    if (!t.failureStatuses.empty()) return true;
  }
  for (const auto& r : rules_) {
    for (const auto& c : r.when) {
      if (c.kind == Condition::Kind::kFailures) return true;
    }
  }
  return false;
}

void PolicySet::candidateRules(const std::string& tool, ActionClass cls,
                               std::vector<uint32_t>& out) const {
  auto add = [&](const std::vector<uint32_t>& v) { out.insert(out.end(), v.begin(), v.end()); };
  if (auto it = rulesByTool_.find(tool); it != rulesByTool_.end()) add(it->second);
  for (size_t len = 0; len <= std::min(tool.size(), longestPrefix_); ++len) {
    if (auto it = rulesByPrefix_.find(tool.substr(0, len)); it != rulesByPrefix_.end())
      add(it->second);
  }
  add(rulesByClass_[static_cast<int>(cls)]);
  add(rulesForAny_);
}

void PolicySet::buildIndex() {
  // Where a body must be read (needsBody()): a rule reading params, or an approve rule
  // (an approval covers the call's exact body), may match a call to the hosts it names, the
  // hosts of the tools its tool glob names (none named: any host; a glob may also name a
  // host's undeclared calls), or, naming neither, the hosts of the declared tools of its
  // class; and an MCP tool's hosts always (the body names the tools).
  for (const auto& r : rules_) {
    if (!r.needsParams && r.effect != Effect::kApprove) continue;
    if (!r.match.host.empty()) {
      bodyHosts_.push_back(r.match.host);
      continue;
    }
    bool named = false;
    for (const auto& t : tools_) {
      bool fits = r.match.tool.empty()
                      ? !r.match.actionClass || t.actionClass == *r.match.actionClass
                      : globMatch(r.match.tool, t.name);
      if (!fits) continue;
      named = true;
      bodyHosts_.insert(bodyHosts_.end(), t.hosts.begin(), t.hosts.end());
    }
    if (!r.match.tool.empty()) {
      if (!named) bodyAnyHost_ = true;
      // Only a glob whose literal prefix fits "host:NAME" can name undeclared calls.
      std::string_view prefix =
          std::string_view(r.match.tool)
              .substr(0, std::min(r.match.tool.find_first_of("*?["), r.match.tool.size()));
      constexpr std::string_view kUndeclared = "host:";
      if (kUndeclared.starts_with(prefix) || prefix.starts_with(kUndeclared))
        bodyToolGlobs_.push_back(r.match.tool);
    }
  }
  for (const auto& t : tools_)
    if (!t.mcpTools.empty()) bodyHosts_.insert(bodyHosts_.end(), t.hosts.begin(), t.hosts.end());
  std::sort(bodyHosts_.begin(), bodyHosts_.end());
  bodyHosts_.erase(std::unique(bodyHosts_.begin(), bodyHosts_.end()), bodyHosts_.end());
  for (uint32_t i = 0; i < rules_.size(); ++i) {
    auto& r = rules_[i];
    const auto& tool = r.match.tool;
    auto wildcard = tool.find_first_of("*?");
    r.exactTool = !tool.empty() && wildcard == std::string::npos;
    if (r.exactTool) {
      rulesByTool_[tool].push_back(i);
    } else if (!tool.empty()) {
      rulesByPrefix_[tool.substr(0, wildcard)].push_back(i);
      longestPrefix_ = std::max(longestPrefix_, wildcard);
    } else if (r.match.actionClass) {
      rulesByClass_[static_cast<int>(*r.match.actionClass)].push_back(i);
    } else {
      rulesForAny_.push_back(i);
    }
  }
}

const ToolDef* PolicySet::findTool(std::string_view name) const {
  for (const auto& t : tools_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const PoolDef* PolicySet::findPool(std::string_view name) const {
  for (const auto& p : pools_) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

const AgentDef* PolicySet::findAgent(std::string_view agentId) const {
  for (const auto& a : agents_) {
    if (globMatch(a.pattern, agentId)) return &a;
  }
  return nullptr;
}

struct PolicyError {
  std::string message;
};

// Reads one policy document into a set, with file:line:column on every error.
class PolicyLoader {
 public:
  PolicyLoader(PolicySet& set, std::string file) : set_(set), file_(std::move(file)) {}

  void load(const YAML::Node& root) {
    if (!root.IsMap())
      fail(root, "(document)", "expected a mapping with apiVersion, kind and the policy");
    forEach(root, "",
            {"apiVersion", "kind", "metadata", "tools", "pools", "agents", "rules", "breakers",
             "limits"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key == "apiVersion") {
                if (str(v, key) != "tollgate/v1") fail(v, key, "expected tollgate/v1");
              } else if (key == "kind") {
                if (str(v, key) != "Policy") fail(v, key, "expected Policy");
              } else if (key == "metadata") {
                forEach(v, key, {"name", "description"},
                        [&](const std::string& k, const YAML::Node& mv) { str(mv, k); });
              } else if (key == "tools") {
                list(v, key, [&](const std::string& k, const YAML::Node& n) { tool(n, k); });
              } else if (key == "pools") {
                list(v, key, [&](const std::string& k, const YAML::Node& n) { pool(n, k); });
              } else if (key == "agents") {
                list(v, key, [&](const std::string& k, const YAML::Node& n) { agent(n, k); });
              } else if (key == "rules") {
                list(v, key, [&](const std::string& k, const YAML::Node& n) { rule(n, k); });
              } else if (key == "breakers") {
                list(v, key, [&](const std::string& k, const YAML::Node& n) { breaker(n, k); });
              } else if (key == "limits") {
                forEach(v, key, {"max_body_bytes", "max_json_depth", "max_json_keys"},
                        [&](const std::string& k, const YAML::Node& lv) {
                          if (k.ends_with("max_body_bytes")) {
                            // 0 would read no body, so no params condition could hold and
                            // a halt on params would never fire. The body is held whole in
                            // memory: the cap is the config's for what it holds whole (a head).
                            auto bytes = size(lv, k);
                            if (bytes == 0 || bytes > (64ull << 20))
                              fail(lv, k, "must be from 1 to 64m");
                            set_.maxBodyBytes_ = static_cast<size_t>(bytes);
                          } else if (k.ends_with("max_json_keys"))
                            set_.maxJsonKeys_ = static_cast<size_t>(integer(lv, k, 1, 1'000'000));
                          else
                            set_.maxJsonDepth_ = static_cast<int>(integer(lv, k, 1, 256));
                        });
              }
            });
    if (!root["apiVersion"]) fail(root, "apiVersion", "required (tollgate/v1)");
    if (!root["kind"]) fail(root, "kind", "required (Policy)");
  }

 private:
  SourceMark mark(const YAML::Node& n) const {
    return {file_, n.Mark().line + 1, n.Mark().column + 1};
  }

  [[noreturn]] void fail(const YAML::Node& n, const std::string& key,
                         const std::string& msg) const {
    throw PolicyError{mark(n).str() + ": " + key + ": " + msg};
  }

  void forEach(const YAML::Node& map, const std::string& where, const std::set<std::string>& known,
               const std::function<void(const std::string&, const YAML::Node&)>& fn) const {
    if (!map.IsMap()) fail(map, where.empty() ? "(document)" : where, "expected a mapping");
    // Keys with a second spelling that sets the same value: given both, one list is lost.
    static const std::map<std::string, std::string> kAliases = {{"method", "methods"},
                                                                {"methods", "method"},
                                                                {"neighbors", "neighbours"},
                                                                {"neighbours", "neighbors"}};
    std::set<std::string> seen;
    for (const auto& kv : map) {
      auto key = kv.first.as<std::string>();
      auto full = where.empty() ? key : where + "." + key;
      if (!known.count(key)) fail(kv.first, full, "unknown key");
      // yaml-cpp keeps both entries and the last wins: `effect: halt, ..., effect: allow`
      // would load as an allow. Which one the writer meant is unknown.
      if (!seen.insert(key).second) fail(kv.first, full, "duplicate key");
      if (auto alias = kAliases.find(key);
          alias != kAliases.end() && known.count(alias->second) && seen.count(alias->second))
        fail(kv.first, full, "duplicate key (" + alias->second + " and " + key + " are one key)");
      fn(full, kv.second);
    }
  }

  void list(const YAML::Node& seq, const std::string& key,
            const std::function<void(const std::string&, const YAML::Node&)>& fn) const {
    if (!seq.IsSequence()) fail(seq, key, "expected a list");
    for (size_t i = 0; i < seq.size(); ++i) fn(key + "[" + std::to_string(i) + "]", seq[i]);
  }

  std::string str(const YAML::Node& n, const std::string& key) const {
    if (!n.IsScalar()) fail(n, key, "expected a string");
    return n.Scalar();
  }

  std::vector<std::string> strings(const YAML::Node& n, const std::string& key) const {
    if (n.IsScalar()) return {n.Scalar()};
    if (!n.IsSequence()) fail(n, key, "expected a string or a list of strings");
    std::vector<std::string> out;
    for (const auto& item : n) out.push_back(str(item, key));
    return out;
  }

  // A list that must name something: empty, it would mean "any" (methods, paths) or
  // "never" (in, days), so a rule would silently match everything or do nothing.
  std::vector<std::string> someStrings(const YAML::Node& n, const std::string& key,
                                       const std::string& what) const {
    auto out = strings(n, key);
    if (out.empty()) fail(n, key, "expected at least one " + what);
    return out;
  }

  int64_t integer(const YAML::Node& n, const std::string& key, int64_t min, int64_t max) const {
    int64_t v = 0;
    if (!n.IsScalar() || !YAML::convert<int64_t>::decode(n, v)) fail(n, key, "expected an integer");
    if (v < min || v > max)
      fail(n, key, "must be from " + std::to_string(min) + " to " + std::to_string(max));
    return v;
  }

  double number(const YAML::Node& n, const std::string& key) const {
    double v = 0;
    if (!n.IsScalar() || !YAML::convert<double>::decode(n, v)) fail(n, key, "expected a number");
    // .nan compares false with everything and .inf bounds nothing: the condition would
    // never hold, or always.
    if (!std::isfinite(v)) fail(n, key, "expected a finite number");
    return v;
  }

  uint64_t size(const YAML::Node& n, const std::string& key) const {
    auto v = n.IsScalar() ? parseSize(n.Scalar()) : std::nullopt;
    if (!v) fail(n, key, "expected a size such as 64k or 1m");
    return *v;
  }

  std::chrono::milliseconds duration(const YAML::Node& n, const std::string& key) const {
    auto v = n.IsScalar() ? parseDuration(n.Scalar()) : std::nullopt;
    if (!v || v->count() <= 0) fail(n, key, "expected a duration such as 30s, 10m, 1h or 1d");
    // Ten years, as in the config: past it `now + duration` in milliseconds (a cascade's
    // end, a breaker's cooldown, a rate limit's refill) could overflow 64 bits.
    if (*v > std::chrono::milliseconds(3650ll * 86'400'000)) fail(n, key, "at most 3650d");
    return *v;
  }

  ActionClass actionClass(const YAML::Node& n, const std::string& key) const {
    auto s = str(n, key);
    if (s == "read") return ActionClass::kRead;
    if (s == "write") return ActionClass::kWrite;
    if (s == "delete") return ActionClass::kDelete;
    fail(n, key, "expected read, write or delete");
  }

  std::vector<std::string> methods(const YAML::Node& n, const std::string& key) const {
    auto out = someStrings(n, key, "method (leave it out for any method)");
    for (auto& m : out) {
      std::transform(m.begin(), m.end(), m.begin(),
                     [](unsigned char c) { return std::toupper(c); });
      if (m.empty() || m.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ") != std::string::npos) {
        fail(n, key, "'" + m + "' is not an HTTP method");
      }
    }
    return out;
  }

  // A host pattern in the form a call's host is compared in (Extractor::canonicalHost):
  // lower case, no trailing dot, an IP literal canonical (IPv4 in any spelling as a dotted
  // quad, IPv6 compressed without brackets). Written otherwise it would never match a call,
  // and a halt written so would silently do nothing: what cannot be a host is refused.
  std::string host(const YAML::Node& n, const std::string& key) const {
    auto given = str(n, key);
    auto refuse = [&](const std::string& why) {
      fail(n, key, "'" + given + "' is not a host pattern: " + why);
    };
    std::string h = given;
    std::transform(h.begin(), h.end(), h.begin(), [](unsigned char c) { return std::tolower(c); });
    if (h.find("://") != std::string::npos)
      refuse("write the host alone, without a scheme (e.g. evil.example)");
    if (h.find('/') != std::string::npos)
      refuse("write the host alone, without a path (a tool's match.paths holds paths)");
    if (h == "*") return h;
    if (h.starts_with("*.")) {
      auto name = h.substr(2);
      if (name.ends_with('.')) name.pop_back();
      if (name.find(':') != std::string::npos)
        refuse("a wildcard names domains, without a port (e.g. *.example.com)");
      if (name.empty() || name.starts_with('.') || name.find("..") != std::string::npos ||
          name.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-._") != std::string::npos)
        refuse("expected *.DOMAIN, e.g. *.example.com");
      return "*." + name;
    }
    if (h.find('*') != std::string::npos)
      refuse("'*' stands alone or in front of a domain, as in *.example.com");
    // "[::1]:443", "evil.example:443": a port (one colon is no IPv6 address).
    if (h.starts_with('[') ? h.find("]:") != std::string::npos
                           : std::count(h.begin(), h.end(), ':') == 1)
      refuse("write it without a port (a host pattern matches every port)");
    if (h.size() > 2 && h.front() == '[' && h.back() == ']') {
      h = h.substr(1, h.size() - 2);
      if (h.find(':') == std::string::npos) refuse("brackets hold an IPv6 address");
    }
    if (h.empty() || h.starts_with('.') || h.find("..") != std::string::npos)
      refuse("expected a host name, an IP address, '*' or '*.DOMAIN'");
    auto canonical = Extractor::canonicalHost(h);
    if (!canonical) refuse(canonical.error().message);
    return canonical.value();
  }

  void tool(const YAML::Node& n, const std::string& where) {
    ToolDef t;
    t.mark = mark(n);
    bool hasMatch = false;
    forEach(n, where, {"name", "match", "class", "cost", "description", "failure"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key.ends_with(".failure")) {
                forEach(v, key, {"statuses"}, [&](const std::string& k, const YAML::Node& fv) {
                  for (auto& st : strings(fv, k)) {
                    int code = 0;
                    try {
                      code = std::stoi(st);
                    } catch (...) {
                      code = 0;
                    }
                    if (code < 100 || code > 599) fail(fv, k, "'" + st + "' is not an HTTP status");
                    t.failureStatuses.push_back(code);
                  }
                });
              } else if (key.ends_with(".name"))
                t.name = str(v, key);
              else if (key.ends_with(".class"))
                t.actionClass = actionClass(v, key);
              else if (key.ends_with(".description"))
                str(v, key);
              else if (key.ends_with(".cost")) {
                forEach(v, key,
                        {"effort", "risk", "effort_header", "risk_header", "effort_field",
                         "risk_field"},
                        [&](const std::string& k, const YAML::Node& cv) {
                          auto field = [&] {
                            auto f = str(cv, k);
                            if (f.empty() || f.front() == '.' || f.back() == '.' ||
                                f.find("..") != std::string::npos)
                              fail(cv, k,
                                   "expected a field of the JSON response body, its keys "
                                   "joined by dots (usage.total_tokens)");
                            return f;
                          };
                          if (k.ends_with("effort_header"))
                            t.cost.effortHeader = str(cv, k);
                          else if (k.ends_with("risk_header"))
                            t.cost.riskHeader = str(cv, k);
                          else if (k.ends_with("effort_field"))
                            t.cost.effortField = field();
                          else if (k.ends_with("risk_field"))
                            t.cost.riskField = field();
                          else
                            (k.ends_with("effort") ? t.cost.effort : t.cost.risk) =
                                integer(cv, k, 0, int64_t{1} << 40);
                        });
                if ((!t.cost.effortHeader.empty() && !t.cost.effortField.empty()) ||
                    (!t.cost.riskHeader.empty() && !t.cost.riskField.empty()))
                  fail(v, key, "a cost is read from a header or from a body field, not both");
              } else if (key.ends_with(".match")) {
                hasMatch = true;
                forEach(v, key, {"host", "hosts", "methods", "paths", "path", "mcp_tools"},
                        [&](const std::string& k, const YAML::Node& mv) {
                          if (k.ends_with(".host") || k.ends_with(".hosts")) {
                            if (mv.IsSequence()) {
                              for (const auto& item : mv) t.hosts.push_back(host(item, k));
                            } else {
                              t.hosts.push_back(host(mv, k));
                            }
                          } else if (k.ends_with(".methods")) {
                            t.methods = methods(mv, k);
                          } else if (k.ends_with(".paths") || k.ends_with(".path")) {
                            for (auto& p :
                                 someStrings(mv, k, "path glob (leave it out for any path)")) {
                              if (!p.starts_with('/')) fail(mv, k, "path globs start with /");
                              t.paths.push_back(p);
                            }
                          } else {
                            t.mcpTools = someStrings(
                                mv, k, "MCP tool name (leave it out for a tool that is not MCP)");
                          }
                        });
              }
            });
    if (t.name.empty()) fail(n, where + ".name", "required");
    if (!hasMatch || t.hosts.empty())
      fail(n, where + ".match.host", "required: the tool's host (or hosts)");
    if (set_.findTool(t.name)) fail(n, where + ".name", "duplicate tool '" + t.name + "'");
    set_.tools_.push_back(std::move(t));
  }

  void pool(const YAML::Node& n, const std::string& where) {
    PoolDef p;
    p.mark = mark(n);
    forEach(n, where, {"name", "effort", "risk", "scope", "fail_open"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key.ends_with(".name"))
                p.name = str(v, key);
              else if (key.ends_with(".scope")) {
                auto s = str(v, key);
                if (s != "local" && s != "shared") fail(v, key, "expected local or shared");
                p.shared = s == "shared";
              } else if (key.ends_with(".fail_open")) {
                bool b = false;
                if (!YAML::convert<bool>::decode(v, b)) fail(v, key, "expected true or false");
                p.failOpen = b;
              } else {
                Budget b;
                bool hasLimit = false;
                forEach(v, key, {"limit", "period"},
                        [&](const std::string& k, const YAML::Node& bv) {
                          if (k.ends_with(".limit")) {
                            b.limit = integer(bv, k, 0, int64_t{1} << 50);
                            hasLimit = true;
                          } else {
                            b.period = duration(bv, k);
                          }
                        });
                if (!hasLimit) fail(v, key + ".limit", "required");
                if (b.period.count() == 0) fail(v, key + ".period", "required");
                (key.ends_with(".effort") ? p.effort : p.risk) = b;
              }
            });
    if (p.name.empty()) fail(n, where + ".name", "required");
    if (set_.findPool(p.name)) fail(n, where + ".name", "duplicate pool '" + p.name + "'");
    set_.pools_.push_back(std::move(p));
  }

  void agent(const YAML::Node& n, const std::string& where) {
    AgentDef a;
    a.mark = mark(n);
    forEach(n, where, {"id", "pool", "neighbours", "neighbors"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key.ends_with(".id"))
                a.pattern = str(v, key);
              else if (key.ends_with(".pool"))
                a.pool = str(v, key);
              else
                a.neighbours = strings(v, key);
            });
    if (a.pattern.empty()) fail(n, where + ".id", "required");
    set_.agents_.push_back(std::move(a));
  }

  Condition::Op op(const std::string& name) const {
    if (name == "lt") return Condition::Op::kLt;
    if (name == "lte") return Condition::Op::kLte;
    if (name == "gt") return Condition::Op::kGt;
    if (name == "gte") return Condition::Op::kGte;
    if (name == "eq") return Condition::Op::kEq;
    return Condition::Op::kNe;
  }

  static int minuteOfDay(const std::string& hhmm) {
    if (hhmm.size() != 5 || hhmm[2] != ':') return -1;
    int h = (hhmm[0] - '0') * 10 + (hhmm[1] - '0'), m = (hhmm[3] - '0') * 10 + (hhmm[4] - '0');
    if (!std::isdigit(static_cast<unsigned char>(hhmm[0])) ||
        !std::isdigit(static_cast<unsigned char>(hhmm[1])) ||
        !std::isdigit(static_cast<unsigned char>(hhmm[3])) ||
        !std::isdigit(static_cast<unsigned char>(hhmm[4])) || h > 24 || m > 59 ||
        (h == 24 && m != 0)) {
      return -1;
    }
    return h * 60 + m;
  }

  void conditions(const YAML::Node& n, const std::string& where, Rule& r) {
    if (!n.IsMap()) fail(n, where, "expected a mapping of conditions");
    if (n.size() == 0) fail(n, where, "expected at least one condition (leave when out for none)");
    std::set<std::string> seen;
    for (const auto& kv : n) {
      auto name = kv.first.as<std::string>();
      auto key = where + "." + name;
      const auto& v = kv.second;
      if (!seen.insert(name).second) fail(kv.first, key, "duplicate key");
      if (name == "agent.failures") {
        Condition c;
        c.kind = Condition::Kind::kFailures;
        c.mark = mark(kv.first);
        bool hasCount = false;
        forEach(v, key, {"gte", "within"}, [&](const std::string& k, const YAML::Node& cv) {
          if (k.ends_with(".gte")) {
            c.failures = integer(cv, k, 1, 1'000'000);
            hasCount = true;
          } else {
            c.window = duration(cv, k);
          }
        });
        if (!hasCount) fail(v, key + ".gte", "required");
        if (c.window.count() == 0) fail(v, key + ".within", "required");
        r.when.push_back(std::move(c));
      } else if (name == "time") {
        Condition c;
        c.kind = Condition::Kind::kTime;
        c.mark = mark(kv.first);
        bool hasBetween = false;
        forEach(v, key, {"between", "days", "tz"}, [&](const std::string& k, const YAML::Node& tv) {
          if (k.ends_with(".between")) {
            auto b = strings(tv, k);
            if (b.size() != 2) fail(tv, k, "expected [\"HH:MM\", \"HH:MM\"]");
            c.fromMinute = minuteOfDay(b[0]);
            c.toMinute = minuteOfDay(b[1]);
            if (c.fromMinute < 0 || c.toMinute < 0) fail(tv, k, "times are HH:MM, 00:00 to 24:00");
            // Such a window holds at no minute of the day: its rule would never apply.
            if (c.fromMinute == c.toMinute || (c.fromMinute == 24 * 60 && c.toMinute == 0))
              fail(tv, k, "the start and the end are the same time: the window is empty");
            hasBetween = true;
          } else if (k.ends_with(".days")) {
            static const char* names[] = {"mon", "tue", "wed", "thu", "fri", "sat", "sun"};
            c.days = 0;
            for (auto& d : someStrings(tv, k, "day")) {
              auto it = std::find(std::begin(names), std::end(names), d);
              if (it == std::end(names)) fail(tv, k, "days are mon, tue, wed, thu, fri, sat, sun");
              c.days |= static_cast<uint8_t>(1u << (it - std::begin(names)));
            }
          } else {
            auto zone = TimeZone::load(str(tv, k));
            if (!zone) fail(tv, k, zone.error().message);
            c.zone = zone.value();
          }
        });
        if (!hasBetween) fail(v, key + ".between", "required");
        r.when.push_back(std::move(c));
      } else if (name.starts_with("params.") && name.size() > 7) {
        auto param = name.substr(7);
        // Without a comparison the rule would be unconditional, not bounded.
        if (v.IsMap() && v.size() == 0)
          fail(v, key, "expected a comparison: lt, lte, gt, gte, eq, ne, in or matches");
        forEach(v, key, {"lt", "lte", "gt", "gte", "eq", "ne", "in", "matches"},
                [&](const std::string& k, const YAML::Node& pv) {
                  Condition c;
                  c.param = param;
                  c.mark = mark(pv);
                  auto opName = k.substr(k.rfind('.') + 1);
                  if (opName == "in") {
                    c.kind = Condition::Kind::kIn;
                    c.values = someStrings(pv, k, "value");
                  } else if (opName == "matches") {
                    c.kind = Condition::Kind::kMatches;
                    RE2::Options options;
                    options.set_log_errors(false);
                    auto re = std::make_shared<RE2>(str(pv, k), options);
                    if (!re->ok()) fail(pv, k, "invalid regular expression: " + re->error());
                    c.regex = std::move(re);
                  } else {
                    c.kind = Condition::Kind::kCompare;
                    c.op = op(opName);
                    c.number = number(pv, k);
                  }
                  r.when.push_back(std::move(c));
                });
        r.needsParams = true;
      } else {
        fail(kv.first, key, "unknown condition (agent.failures, time, or params.NAME)");
      }
    }
  }

  void rule(const YAML::Node& n, const std::string& where) {
    Rule r;
    r.mark = mark(n);
    bool hasEffect = false;
    std::optional<YAML::Node> rateLimitNode, cascadeNode;  // checked against the effect
    forEach(n, where,
            {"id", "effect", "match", "when", "rate_limit", "reason", "cascade", "description"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key.ends_with(".id"))
                r.id = str(v, key);
              else if (key.ends_with(".reason") || key.ends_with(".description")) {
                auto s = str(v, key);
                if (key.ends_with(".reason")) r.reason = s;
              } else if (key.ends_with(".effect")) {
                auto e = str(v, key);
                if (e == "allow")
                  r.effect = Effect::kAllow;
                else if (e == "halt" || e == "deny")
                  r.effect = Effect::kHalt;
                else if (e == "approve")
                  r.effect = Effect::kApprove;
                else
                  fail(v, key, "expected allow, halt or approve");
                hasEffect = true;
              } else if (key.ends_with(".match")) {
                forEach(v, key, {"tool", "class", "agent", "host", "methods", "method"},
                        [&](const std::string& k, const YAML::Node& mv) {
                          if (k.ends_with(".tool"))
                            r.match.tool = str(mv, k);
                          else if (k.ends_with(".class"))
                            r.match.actionClass = actionClass(mv, k);
                          else if (k.ends_with(".agent"))
                            r.match.agent = str(mv, k);
                          else if (k.ends_with(".host"))
                            r.match.host = host(mv, k);
                          else
                            r.match.methods = methods(mv, k);
                        });
              } else if (key.ends_with(".when")) {
                conditions(v, key, r);
              } else if (key.ends_with(".rate_limit")) {
                rateLimitNode = v;
                RateLimit rl;
                bool hasRequests = false;
                forEach(v, key, {"requests", "per", "burst", "key"},
                        [&](const std::string& k, const YAML::Node& rv) {
                          if (k.ends_with(".requests")) {
                            rl.requests = static_cast<double>(integer(rv, k, 1, 1'000'000'000));
                            hasRequests = true;
                          } else if (k.ends_with(".per")) {
                            rl.per = duration(rv, k);
                          } else if (k.ends_with(".burst")) {
                            rl.burst = static_cast<double>(integer(rv, k, 1, 1'000'000'000));
                          } else {
                            auto s = str(rv, k);
                            if (s == "agent")
                              rl.key = RateLimit::Key::kAgent;
                            else if (s == "tool")
                              rl.key = RateLimit::Key::kTool;
                            else if (s == "agent+tool")
                              rl.key = RateLimit::Key::kAgentTool;
                            else
                              fail(rv, k, "expected agent, tool or agent+tool");
                          }
                        });
                if (!hasRequests) fail(v, key + ".requests", "required");
                if (rl.per.count() == 0) fail(v, key + ".per", "required");
                if (rl.burst == 0) rl.burst = rl.requests;
                r.rateLimit = rl;
              } else if (key.ends_with(".cascade")) {
                cascadeNode = v;
                forEach(v, key, {"quarantine"}, [&](const std::string& k, const YAML::Node& cv) {
                  r.cascade = duration(cv, k);
                });
              }
            });
    if (r.id.empty()) fail(n, where + ".id", "required");
    if (!hasEffect) fail(n, where + ".effect", "required (allow, halt or approve)");
    // The engine applies them to those effects alone: elsewhere they would be ignored.
    if (rateLimitNode && r.effect != Effect::kAllow)
      fail(*rateLimitNode, where + ".rate_limit",
           "only an allow rule is rate limited (this rule is " + std::string(effectName(r.effect)) +
               ")");
    if (cascadeNode && r.effect != Effect::kHalt)
      fail(*cascadeNode, where + ".cascade",
           "only a halt quarantines neighbours (this rule is " + std::string(effectName(r.effect)) +
               ")");
    for (const auto& other : set_.rules_) {
      if (other.id == r.id)
        fail(n, where + ".id",
             "duplicate rule id '" + r.id + "' (first at " + other.mark.str() + ")");
    }
    set_.rules_.push_back(std::move(r));
  }

  void breaker(const YAML::Node& n, const std::string& where) {
    BreakerDef b;
    b.mark = mark(n);
    forEach(n, where, {"host", "failures", "cooldown"},
            [&](const std::string& key, const YAML::Node& v) {
              if (key.ends_with(".host"))
                b.host = host(v, key);
              else if (key.ends_with(".failures"))
                b.failures = static_cast<int>(integer(v, key, 1, 1'000'000));
              else
                b.cooldown = duration(v, key);
            });
    if (b.host.empty()) fail(n, where + ".host", "required");
    set_.breakers_.push_back(std::move(b));
  }

  PolicySet& set_;
  std::string file_;
};

namespace {

// References between sections: every rule's tool, agent pools, costs with a cap.
void crossCheck(const PolicySet& set) {
  for (const auto& a : set.agents()) {
    if (!a.pool.empty() && !set.findPool(a.pool)) {
      throw PolicyError{a.mark.str() + ": agents: unknown pool '" + a.pool + "'"};
    }
  }
  for (const auto& r : set.rules()) {
    if (!r.match.tool.empty() && r.match.tool.find_first_of("*?") == std::string::npos &&
        !set.findTool(r.match.tool)) {
      throw PolicyError{r.mark.str() + ": rules: rule '" + r.id + "' names unknown tool '" +
                        r.match.tool + "'"};
    }
  }
}

}  // namespace

Result<std::shared_ptr<const PolicySet>> PolicySet::parse(const std::string& text,
                                                          const std::string& file) {
  auto set = std::make_shared<PolicySet>();
  try {
    for (const auto& doc : YAML::LoadAll(text)) {
      PolicyLoader(*set, file).load(doc);
    }
    crossCheck(*set);
  } catch (const PolicyError& e) {
    return Error{-1, e.message};
  } catch (const YAML::Exception& e) {
    return Error{-1, file + ":" + std::to_string(e.mark.line + 1) + ":" +
                         std::to_string(e.mark.column + 1) + ": (yaml): " + e.msg};
  }
  set->buildIndex();
  set->files_ = {file};
  set->digest_ = "sha256:" + sha256Hex(file + '\0' + text);
  return std::shared_ptr<const PolicySet>(std::move(set));
}

Result<std::shared_ptr<const PolicySet>> PolicySet::load(const std::vector<std::string>& files) {
  std::vector<PolicySource> sources;
  for (const auto& file : files) {
    // A directory opens on Linux and reads as nothing: it would load as an empty policy
    // (every call halted by default-deny, or `policy check` saying ok).
    if (std::error_code ec; std::filesystem::is_directory(file, ec))
      return Error{-1, file + ": is a directory"};
    std::ifstream in(file);
    if (!in) return Error{-1, file + ": cannot open the file"};
    std::stringstream text;
    text << in.rdbuf();
    // Policy text is UTF-8 (the audit archive keeps it as JSON strings): a stray byte is an
    // error here, with its place, not a reload refused later by the archive.
    std::string content = text.str();
    if (size_t bad = firstInvalidUtf8(content); bad != std::string::npos) {
      size_t line = 1, lineStart = 0;
      for (size_t i = 0; i < bad; ++i) {
        if (content[i] == '\n') {
          ++line;
          lineStart = i + 1;
        }
      }
      return Error{-1, file + ":" + std::to_string(line) + ":" +
                           std::to_string(bad - lineStart + 1) +
                           ": not UTF-8 text (policy files are UTF-8)"};
    }
    sources.push_back({file, std::move(content)});
  }
  return fromSources(std::move(sources));
}

Result<std::shared_ptr<const PolicySet>> PolicySet::fromSources(std::vector<PolicySource> sources) {
  auto set = std::make_shared<PolicySet>();
  std::string all;
  size_t current = 0;  // the file being read, for the parser's errors
  try {
    for (current = 0; current < sources.size(); ++current) {
      const auto& source = sources[current];
      for (const auto& doc : YAML::LoadAll(source.text)) {
        if (doc.IsNull()) continue;
        PolicyLoader(*set, source.file).load(doc);
      }
      all += source.file;
      all += '\0';
      all += source.text;
      all += '\0';
    }
    crossCheck(*set);
  } catch (const PolicyError& e) {
    return Error{-1, e.message};
  } catch (const YAML::Exception& e) {
    std::string file = sources.empty() ? "" : sources[std::min(sources.size() - 1, current)].file;
    return Error{-1, file + ":" + std::to_string(e.mark.line + 1) + ":" +
                         std::to_string(e.mark.column + 1) + ": (yaml): " + e.msg};
  }
  set->buildIndex();
  for (const auto& source : sources) set->files_.push_back(source.file);
  set->sources_ = std::move(sources);
  set->digest_ = "sha256:" + sha256Hex(all);
  return std::shared_ptr<const PolicySet>(std::move(set));
}

}  // namespace tollgate
