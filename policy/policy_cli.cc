#include "policy/policy_cli.h"

#include <yaml-cpp/yaml.h>

#include <charconv>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>

#include "common/units.h"
#include "policy/engine.h"
#include "policy/policy_set.h"
#include "policy/tool_call.h"

namespace tollgate {
namespace {

struct Finding {
  SourceMark mark;
  std::string message;
};

// Whether a tool glob can match some name that begins with `prefix`.
bool globCanStartWith(std::string_view glob, std::string_view prefix) {
  if (prefix.empty()) return true;
  if (glob.empty()) return false;
  if (glob[0] == '*')
    return globCanStartWith(glob.substr(1), prefix) || globCanStartWith(glob, prefix.substr(1));
  if (glob[0] == '?' || glob[0] == prefix[0])
    return globCanStartWith(glob.substr(1), prefix.substr(1));
  return false;
}

// Lints beyond what loading checks: rules that can never match, allows hidden behind an
// unconditional halt, cascade cycles, costs that no pool caps.
std::vector<Finding> lint(const PolicySet& set) {
  std::vector<Finding> out;
  for (const auto& r : set.rules()) {
    if (!r.match.tool.empty()) {
      bool any = std::any_of(set.tools().begin(), set.tools().end(), [&](const ToolDef& t) {
        return globMatch(r.match.tool, t.name) &&
               (!r.match.actionClass || *r.match.actionClass == t.actionClass);
      });
      // The engine names a call to no declared tool host:HOST (of its method's class) and an
      // MCP tools/call no tool declares mcp:NAME (a write): a glob that can name those, such
      // as "host:*" or "mcp:*", matches calls that no tool declares.
      any = any || globCanStartWith(r.match.tool, "host:") ||
            ((!r.match.actionClass || *r.match.actionClass == ActionClass::kWrite) &&
             globCanStartWith(r.match.tool, "mcp:"));
      if (!any)
        out.push_back(
            {r.mark, "rule '" + r.id + "' can never match: no tool fits its tool and class"});
    }
  }
  for (const auto& allow : set.rules()) {
    if (allow.effect != Effect::kAllow) continue;
    for (const auto& h : set.rules()) {
      if (h.effect != Effect::kHalt || !h.when.empty()) continue;
      const auto& a = allow.match;
      const auto& m = h.match;
      bool covers = (m.tool.empty() || (!a.tool.empty() && globMatch(m.tool, a.tool))) &&
                    (!m.actionClass || m.actionClass == a.actionClass) &&
                    (m.agent.empty() || (!a.agent.empty() && globMatch(m.agent, a.agent))) &&
                    (m.host.empty() || (!a.host.empty() && hostMatch(m.host, a.host))) &&
                    (m.methods.empty() ||
                     (!a.methods.empty() &&
                      std::all_of(a.methods.begin(), a.methods.end(), [&](const std::string& x) {
                        return std::find(m.methods.begin(), m.methods.end(), x) != m.methods.end();
                      })));
      if (covers) {
        out.push_back({allow.mark, "allow rule '" + allow.id +
                                       "' is shadowed by the unconditional halt '" + h.id + "' (" +
                                       h.mark.str() + ")"});
        break;
      }
    }
  }
  // Cascade: agent A quarantines its neighbours; a cycle quarantines everyone forever.
  std::map<std::string, std::vector<std::string>> edges;
  for (const auto& a : set.agents()) {
    for (const auto& n : a.neighbours) {
      for (const auto& b : set.agents()) {
        if (globMatch(n, b.pattern) || n == b.pattern) edges[a.pattern].push_back(b.pattern);
      }
    }
  }
  std::set<std::string> done, onPath;
  std::function<bool(const std::string&)> cyclic = [&](const std::string& v) {
    if (onPath.count(v)) return true;
    if (done.count(v)) return false;
    onPath.insert(v);
    for (const auto& w : edges[v]) {
      if (cyclic(w)) return true;
    }
    onPath.erase(v);
    done.insert(v);
    return false;
  };
  for (const auto& a : set.agents()) {
    done.clear();
    onPath.clear();
    if (cyclic(a.pattern)) {
      out.push_back({a.mark, "cascade cycle: agent '" + a.pattern +
                                 "' can quarantine itself through its neighbours"});
      break;
    }
  }
  for (const auto& t : set.tools()) {
    if (t.cost.effort == 0 && t.cost.risk == 0) continue;
    bool capped = std::any_of(set.agents().begin(), set.agents().end(), [&](const AgentDef& a) {
      const PoolDef* p = a.pool.empty() ? nullptr : set.findPool(a.pool);
      return p && (t.cost.effort == 0 || p->effort) && (t.cost.risk == 0 || p->risk);
    });
    if (!capped)
      out.push_back({t.mark, "tool '" + t.name + "' has a cost that no agent's pool caps"});
  }
  return out;
}

struct Url {
  std::string scheme = "http", host, target = "/";
  uint16_t port = 80;
};

bool parseUrl(const std::string& url, Url& out) {
  auto sep = url.find("://");
  if (sep == std::string::npos) return false;
  out.scheme = url.substr(0, sep);
  if (out.scheme != "http" && out.scheme != "https") return false;
  out.port = out.scheme == "https" ? 443 : 80;
  auto rest = url.substr(sep + 3);
  auto slash = rest.find_first_of("/?");
  auto authority = rest.substr(0, slash);
  if (slash != std::string::npos) out.target = rest.substr(slash);
  if (out.target.starts_with('?')) out.target = "/" + out.target;
  // A port: 1-65535 in digits only (":x", ":" or ":70000" is no URL).
  auto port = [&](const std::string& digits) {
    unsigned value = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (ec != std::errc() || end != digits.data() + digits.size() || value == 0 || value > 65535)
      return false;
    out.port = static_cast<uint16_t>(value);
    return true;
  };
  if (authority.starts_with('[')) {
    auto close = authority.find(']');
    if (close == std::string::npos) return false;
    out.host = authority.substr(1, close - 1);
    if (close + 1 < authority.size() &&
        (authority[close + 1] != ':' || !port(authority.substr(close + 2))))
      return false;
  } else {
    auto colon = authority.rfind(':');
    out.host = authority.substr(0, colon);
    if (colon != std::string::npos && !port(authority.substr(colon + 1))) return false;
  }
  return !out.host.empty();
}

std::string str(const YAML::Node& n, const char* key, const std::string& fallback = "") {
  return n[key] && n[key].IsScalar() ? n[key].Scalar() : fallback;
}

// "FILE:LINE:COL: KEY: MESSAGE", as policy files report their errors.
std::string errorAt(const std::string& file, const YAML::Node& n, const std::string& key,
                    const std::string& message) {
  return file + ":" + std::to_string(n.Mark().line + 1) + ":" +
         std::to_string(n.Mark().column + 1) + ": " + key + ": " + message;
}

// The first unknown or repeated key of a mapping (a misspelt `outcom:` or `rul:` would be
// ignored, and the case would test something else than it says), or "".
std::string checkKeys(const std::string& file, const YAML::Node& map, const std::string& where,
                      const std::set<std::string>& known) {
  if (!map || !map.IsMap()) return {};  // what is not a mapping is refused where it is read
  std::set<std::string> seen;
  for (const auto& kv : map) {
    auto key = kv.first.Scalar();
    auto full = where.empty() ? key : where + "." + key;
    if (!known.count(key)) return errorAt(file, kv.first, full, "unknown key");
    if (!seen.insert(key).second) return errorAt(file, kv.first, full, "duplicate key");
  }
  return {};
}

// The shape of a test file, before any case runs: its keys at every level, and a non-empty
// list of policies (none, or a scalar, tested against an empty set: every halt passed).
std::string checkTestFile(const std::string& file, const YAML::Node& doc) {
  if (auto e = checkKeys(file, doc, "", {"apiVersion", "kind", "policies", "tests"}); !e.empty())
    return e;
  const auto& policies = doc["policies"];
  if (!policies.IsSequence() || policies.size() == 0)
    return errorAt(file, policies, "policies", "expected a non-empty list of policy files");
  for (const auto& p : policies) {
    if (!p.IsScalar() || p.Scalar().empty())
      return errorAt(file, p, "policies", "expected a policy file's path");
  }
  for (size_t i = 0; i < doc["tests"].size(); ++i) {
    const auto& t = doc["tests"][i];
    auto where = "tests[" + std::to_string(i) + "]";
    if (!t.IsMap()) return errorAt(file, t, where, "expected a mapping (a test case)");
    const YAML::Node call = t["call"];
    auto e = checkKeys(file, t, where,
                       {"name", "at", "call", "times", "outcome", "status", "advance", "expect"});
    if (e.empty())
      e = checkKeys(file, call, where + ".call", {"agent", "method", "url", "body", "headers"});
    if (e.empty() && call && call.IsMap())
      e = checkKeys(file, call["headers"], where + ".call.headers", {"Content-Type"});
    if (e.empty()) e = checkKeys(file, t["expect"], where + ".expect", {"decision", "rule"});
    if (!e.empty()) return e;
  }
  return {};
}

// One test file: every case runs in order against one engine, so rate limits and failure
// counters carry from case to case as they would in the sidecar.
// A file that is not a test file (exit 2) is said on `err`; results and failures on `out`.
int runTestFile(const std::string& file, std::FILE* out, std::FILE* err, int& passed, int& failed) {
  YAML::Node doc;
  try {
    doc = YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    std::fprintf(err, "%s:%d:%d: (yaml): %s\n", file.c_str(), e.mark.line + 1, e.mark.column + 1,
                 e.msg.c_str());
    return 2;
  }
  if (str(doc, "kind") != "PolicyTest" || !doc["policies"] || !doc["tests"] ||
      !doc["tests"].IsSequence()) {
    std::fprintf(err, "%s: expected kind: PolicyTest with policies: [...] and tests: [...]\n",
                 file.c_str());
    return 2;
  }
  if (auto error = checkTestFile(file, doc); !error.empty()) {
    std::fprintf(err, "%s\n", error.c_str());
    return 2;
  }
  auto base = std::filesystem::path(file).parent_path();
  std::vector<std::string> files;
  for (const auto& p : doc["policies"])
    files.push_back((base / p.Scalar()).lexically_normal().string());
  auto set = PolicySet::load(files);
  if (!set) {
    std::fprintf(out, "%s\n", set.error().message.c_str());
    return 1;
  }
  int64_t now = 1'767'225'600'000;  // 2026-01-01T00:00:00Z unless a case says otherwise
  Engine engine([&] { return now; });
  for (const auto& t : doc["tests"]) {
    auto name = str(t, "name", "(unnamed)");
    // A case that cannot be read (times: three, a missing expect:) fails with the reason,
    // instead of the exception ending the run.
    try {
      const auto& c = t["call"];
      Url url;
      if (!c || !parseUrl(str(c, "url"), url)) {
        std::fprintf(out, "FAIL %s: %s: call.url must be an http(s) URL\n", file.c_str(),
                     name.c_str());
        ++failed;
        continue;
      }
      if (t["at"]) {
        // An ISO date-time in UTC: "2026-03-02T10:00:00Z".
        std::tm tm{};
        if (!strptime(t["at"].Scalar().c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm)) {
          std::fprintf(out, "FAIL %s: %s: at: expected YYYY-MM-DDTHH:MM:SSZ\n", file.c_str(),
                       name.c_str());
          ++failed;
          continue;
        }
        now = static_cast<int64_t>(timegm(&tm)) * 1000;
      }
      std::string method = str(c, "method", "GET"), agent = str(c, "agent", "anonymous"),
                  body = str(c, "body");
      std::string contentType = c["headers"] && c["headers"]["Content-Type"]
                                    ? c["headers"]["Content-Type"].Scalar()
                                : body.empty() ? ""
                                               : "application/json";
      CallInfo call;
      call.listener = "test";
      call.agent = agent;
      call.method = method;
      call.scheme = url.scheme == "https" ? "tunnel" : "http";
      call.host = url.host;
      call.port = url.port;
      call.target = url.target;
      call.contentType = contentType;
      if (url.scheme == "https") call.scheme = "http";  // inside an intercepted tunnel
      call.bodyAvailable = !body.empty();
      call.body = body;
      call.bodyTruncated = body.size() > set.value()->maxBodyBytes();
      int times = t["times"] ? t["times"].as<int>() : 1;
      // 0 evaluated nothing and compared the expectation with an empty decision.
      if (times < 1) throw std::runtime_error("times: expected at least 1");
      // Any other word (a misspelt "faild") reported the calls as succeeded.
      if (t["outcome"] && t["outcome"].Scalar() != "failed")
        throw std::runtime_error("outcome: expected failed (status: N reports another answer)");
      Decision d;
      for (int i = 0; i < times; ++i) {
        auto tc = Extractor::extract(call, *set.value());
        d = engine.evaluate(*set.value(), tc);
        if (tc && d.verdict == Verdict::kAllow && (t["outcome"] || t["status"])) {
          Outcome o;
          o.failed = t["outcome"] && t["outcome"].Scalar() == "failed";
          o.status = t["status"] ? t["status"].as<int>() : o.failed ? 502 : 200;
          o.failed |= o.status >= 500;
          engine.recordOutcome(*set.value(), tc.value(), o);
        }
        if (t["advance"]) {
          auto step = parseDuration(t["advance"].Scalar());
          if (!step) throw std::runtime_error("advance: expected a duration such as 10s or 1h");
          now += step->count();
        }
      }
      if (!t["expect"] || !t["expect"].IsMap() || !t["expect"]["decision"])
        throw std::runtime_error("expect: {decision: …} is required");
      std::string want = str(t["expect"], "decision"), wantRule = str(t["expect"], "rule");
      bool ok = want == verdictName(d.verdict) && (wantRule.empty() || wantRule == d.rule);
      if (ok) {
        ++passed;
        std::fprintf(out, "ok   %s: %s\n", file.c_str(), name.c_str());
      } else {
        ++failed;
        std::fprintf(out, "FAIL %s: %s: expected %s%s%s, got %s (rule %s: %s)\n", file.c_str(),
                     name.c_str(), want.c_str(), wantRule.empty() ? "" : " by ", wantRule.c_str(),
                     verdictName(d.verdict), d.rule.c_str(), d.reason.c_str());
      }
    } catch (const std::exception& e) {
      ++failed;
      std::fprintf(out, "FAIL %s: %s: the case cannot be read: %s\n", file.c_str(), name.c_str(),
                   e.what());
    }
  }
  return 0;
}

}  // namespace

int policyCheck(const std::vector<std::string>& files, std::FILE* out, std::FILE* err) {
  if (files.empty()) {
    std::fprintf(err, "usage: tollgate policy check FILE...\n");
    return 2;
  }
  for (const auto& f : files) {
    if (!std::filesystem::exists(f)) {
      std::fprintf(err, "%s: no such file\n", f.c_str());
      return 2;
    }
    if (std::filesystem::is_directory(f)) {
      std::fprintf(err, "%s: is a directory\n", f.c_str());
      return 2;
    }
  }
  auto set = PolicySet::load(files);
  if (!set) {
    std::fprintf(out, "%s\n", set.error().message.c_str());
    return 1;
  }
  auto findings = lint(*set.value());
  for (const auto& f : findings)
    std::fprintf(out, "%s: %s\n", f.mark.str().c_str(), f.message.c_str());
  if (!findings.empty()) return 1;
  std::fprintf(out, "ok: %zu tools, %zu pools, %zu agents, %zu rules, %zu breakers (%s)\n",
               set.value()->tools().size(), set.value()->pools().size(),
               set.value()->agents().size(), set.value()->rules().size(),
               set.value()->breakers().size(), set.value()->digest().c_str());
  return 0;
}

int policyTest(const std::vector<std::string>& files, std::FILE* out, std::FILE* err) {
  if (files.empty()) {
    std::fprintf(err, "usage: tollgate policy test FILE...\n");
    return 2;
  }
  int passed = 0, failed = 0;
  for (const auto& f : files) {
    int rc = runTestFile(f, out, err, passed, failed);
    if (rc == 2) return 2;
    if (rc == 1) ++failed;
  }
  std::fprintf(out, "%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace tollgate
