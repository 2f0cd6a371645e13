#include "policy/replay.h"

#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "audit/chain.h"
#include "audit/file_sink.h"
#include "audit/policy_archive.h"
#include "policy/engine.h"
#include "policy/tool_call.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;

// "host:port", "[v6]:port": as the proxy records a call's authority.
bool splitAuthority(const std::string& authority, std::string& host, uint16_t& port) {
  auto colon = authority.rfind(':');
  if (colon == std::string::npos || colon + 1 >= authority.size()) return false;
  host = authority.substr(0, colon);
  if (host.starts_with('[') && host.ends_with(']')) host = host.substr(1, host.size() - 2);
  auto digits = authority.substr(colon + 1);
  if (digits.size() > 5 || digits.find_first_not_of("0123456789") != std::string::npos)
    return false;
  unsigned long p = std::stoul(digits);
  if (p == 0 || p > 65535 || host.empty()) return false;
  port = static_cast<uint16_t>(p);
  return true;
}

bool hasFailureCondition(const PolicySet& set, const std::string& ruleId) {
  for (const auto& r : set.rules()) {
    if (r.id != ruleId) continue;
    for (const auto& c : r.when) {
      if (c.kind == Condition::Kind::kFailures) return true;
    }
  }
  return false;
}

// Whether the decision on this call could depend on its body: an MCP tool (named in the
// body) or a rule that could match it reading params.
bool needsBody(const PolicySet& set, const ToolCall& call) {
  if (call.toolDef() && !call.toolDef()->mcpTools.empty()) return true;
  std::vector<uint32_t> candidates;
  set.candidateRules(call.tool(), call.actionClass(), candidates);
  for (uint32_t i : candidates) {
    const Rule& r = set.rules()[i];
    if (r.needsParams && (r.match.agent.empty() || globMatch(r.match.agent, call.agent())) &&
        (r.match.host.empty() || hostMatch(r.match.host, call.host())))
      return true;
  }
  return false;
}

ReplayResult notReplayable(std::string why) {
  ReplayResult r;
  r.whyNot = std::move(why);
  return r;
}

int usageError(std::FILE* err, const std::string& message) {
  std::fprintf(err, "tollgate: %s (see 'tollgate help')\n", message.c_str());
  return 2;
}

}  // namespace

ReplayResult replayCall(const RecordedCall& call, const PolicySet* set,
                        const std::string& missing) {
  std::string recorded = call.decision;
  if (recorded.starts_with("observe-")) recorded = recorded.substr(8);  // shadow mode
  // Decisions that did not come from the rules alone.
  if (call.rule.starts_with("http."))
    return notReplayable("malformed request (not decided by policy)");
  // The proxy's own checks: a CONNECT intercepted (its requests are decided one by one), a
  // TLS name or a transparent destination that disagrees with Host. No rule decided them.
  if (call.rule.starts_with("tls.") || call.rule.starts_with("transparent."))
    return notReplayable("decided by the proxy, not by policy rules");
  // A body the proxy could not read safely (duplicate keys, bad JSON, too deep) halts it;
  // the record has the body's hash only.
  if (call.rule == "extract" && call.hadBody)
    return notReplayable("needed a body the record does not carry");
  if (call.rule == "budget") return notReplayable("budget pool (stateful)");
  if (call.rule == "cascade") return notReplayable("cascade quarantine (stateful)");
  if (call.rule == "breaker") return notReplayable("circuit breaker (stateful)");
  if (call.rule == "approval_limit") return notReplayable("approval limit (stateful)");
  if (call.rule == "audit") return notReplayable("audit stream unavailable at the time");
  if (recorded == "throttle") return notReplayable("rate limit (stateful)");
  if (!set) return notReplayable(missing);
  std::string host;
  uint16_t port = 0;
  if (!splitAuthority(call.authority, host, port))
    return notReplayable("no destination in the record");

  CallInfo info;
  info.listener = "replay";
  info.agent = call.agent;
  info.method = call.method;
  info.scheme = call.method == "CONNECT" ? "tunnel" : "http";
  info.host = host;
  info.port = port;
  info.target = call.path;
  int64_t nowMs = call.tsNs / 1'000'000;
  Engine engine([nowMs] { return nowMs; });  // fresh: no state carries from call to call
  auto tc = Extractor::extract(info, *set);
  if (tc && needsBody(*set, tc.value()))
    return notReplayable("needed a body the record does not carry");
  Decision d = engine.evaluate(*set, tc);

  ReplayResult r;
  r.replayable = true;
  r.decision = verdictName(d.verdict);
  r.rule = d.rule;
  r.differs = r.decision != recorded || r.rule != call.rule;
  if (r.differs) {
    // An approved call is allowed by its rule for a lease; a fresh engine asks again.
    if (recorded == "allow" && d.verdict == Verdict::kApprove && d.rule == call.rule)
      return notReplayable("approved by a human (lease)");
    if (hasFailureCondition(*set, call.rule) || hasFailureCondition(*set, d.rule))
      return notReplayable("agent failure counter (stateful)");
  }
  return r;
}

int auditReplay(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir;
  std::vector<std::string> policyFiles;
  bool policyMode = false;
  // DIR first; every argument after --policy is a policy file.
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--policy") {
      policyMode = true;
    } else if (args[i].starts_with("-")) {
      return usageError(err, "audit replay: unknown argument '" + std::string(args[i]) + "'");
    } else if (policyMode) {
      policyFiles.emplace_back(args[i]);
    } else if (dir.empty()) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "audit replay: unexpected argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "audit replay needs a DIR (before --policy)");
  if (policyMode && policyFiles.empty()) return usageError(err, "--policy needs a FILE");

  std::shared_ptr<const PolicySet> given;
  if (policyMode) {
    auto set = PolicySet::load(policyFiles);
    if (!set) {
      std::fprintf(err, "tollgate: %s\n", set.error().message.c_str());
      return 2;
    }
    given = set.value();
    std::fprintf(out, "replaying against the given policy set %s\n", given->digest().c_str());
  }
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "LOG_ID", ec)) {
    std::fprintf(err, "tollgate: %s is not an audit log (no LOG_ID)\n", dir.c_str());
    return 2;
  }
  struct Archived {
    std::shared_ptr<const PolicySet> set;
    std::string missing;
  };
  std::map<std::string, Archived> archives;
  bool tampered = false;
  auto setFor = [&](const std::string& digest) -> const Archived& {
    auto it = archives.find(digest);
    if (it != archives.end()) return it->second;
    Archived a;
    if (digest.empty()) {
      a.missing = "no policy set (decided by the host lists)";
    } else if (auto files = readPolicyArchive(dir, digest); !files) {
      a.missing = files.error().message.starts_with("archive missing")
                      ? "archive missing for " + digest
                      : files.error().message;
    } else {
      std::vector<PolicySource> sources;
      for (auto& [path, content] : files.value()) sources.push_back({path, content});
      auto set = PolicySet::fromSources(std::move(sources));
      if (!set) {
        a.missing = "archived set " + digest + " does not load: " + set.error().message;
      } else {
        a.set = set.value();
        if (a.set->digest() != digest) {
          // Replayed anyway, so the changed rules show, but the run fails.
          tampered = true;
          std::fprintf(out,
                       "warning: the archive of %s hashes to %s: it was changed after it was "
                       "written\n",
                       digest.c_str(), a.set->digest().c_str());
        }
      }
    }
    return archives.emplace(digest, std::move(a)).first->second;
  };

  uint64_t replayed = 0, differ = 0, skipped = 0;
  std::map<std::string, uint64_t> why;
  // Streamed a line at a time: a log of any length replays.
  uint64_t at = 0;
  bool notJson = false;
  auto read = forEachAuditLine(
      dir,
      [&](std::string& line, const std::string&, size_t) {
        ++at;
        Json r = Json::parse(line, nullptr, false);
        if (r.is_discarded() || !r.is_object()) {
          notJson = true;
          return false;
        }
        if (stringField(r, "kind") != "call") return true;
        RecordedCall c;
        // verifyChain() checks these types; replay reads an unverified log without throwing.
        if (r.contains("seq") && r["seq"].is_number_unsigned()) c.seq = r["seq"].get<uint64_t>();
        if (r.contains("ts_ns") && r["ts_ns"].is_number_integer())
          c.tsNs = r["ts_ns"].get<int64_t>();
        c.agent = stringField(r, "agent");
        c.method = stringField(r, "method");
        c.authority = stringField(r, "authority");
        c.path = stringField(r, "path");
        c.decision = stringField(r, "decision");
        c.rule = stringField(r, "rule");
        c.digest = stringField(r, "policy_digest");
        c.hadBody = !stringField(r, "params_sha256").empty();
        ReplayResult res;
        if (given) {
          res = replayCall(c, given.get());
        } else {
          const Archived& a = setFor(c.digest);
          res = replayCall(c, a.set.get(), a.missing);
        }
        if (!res.replayable) {
          ++skipped;
          ++why[res.whyNot];
          return true;
        }
        ++replayed;
        if (res.differs) {
          ++differ;
          std::fprintf(out, "seq %llu: recorded %s by %s, replayed %s by %s (%s %s %s%s)\n",
                       static_cast<unsigned long long>(c.seq), c.decision.c_str(), c.rule.c_str(),
                       res.decision.c_str(), res.rule.c_str(), c.agent.c_str(), c.method.c_str(),
                       c.authority.c_str(), c.path.c_str());
        }
        return true;
      },
      UnfinishedLine::kSkipWhenLive);
  if (!read) {
    std::fprintf(err, "tollgate: %s\n", read.error().message.c_str());
    return 2;
  }
  if (notJson) {
    std::fprintf(err, "tollgate: %s: record %llu is not JSON (run audit verify)\n", dir.c_str(),
                 static_cast<unsigned long long>(at));
    return 2;
  }
  std::string reasons;
  for (const auto& [w, n] : why) {
    reasons += reasons.empty() ? " (" : "; ";
    reasons += std::to_string(n) + " " + w;
  }
  if (!reasons.empty()) reasons += ")";
  std::fprintf(out, "%llu calls replayed, %llu differ, %llu not replayable%s\n",
               static_cast<unsigned long long>(replayed), static_cast<unsigned long long>(differ),
               static_cast<unsigned long long>(skipped), reasons.c_str());
  if (tampered) std::fprintf(out, "FAILED: a policy archive does not match its digest\n");
  return differ > 0 || tampered ? 1 : 0;
}

}  // namespace tollgate
