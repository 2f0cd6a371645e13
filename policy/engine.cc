#include "policy/engine.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <random>

#include "common/clock.h"
#include "common/units.h"

namespace tollgate {
namespace {

std::string randomId() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "apr_";
  uint64_t v = rng();
  for (int i = 0; i < 16; ++i, v >>= 4) out += kHex[v & 0xF];
  return out;
}

Decision halt(std::string rule, std::string reason, const std::string& tool) {
  Decision d;
  d.verdict = Verdict::kHalt;
  d.rule = std::move(rule);
  d.reason = std::move(reason);
  d.tool = tool;
  return d;
}

}  // namespace

Engine::Engine(Clock clock) : clock_(clock ? std::move(clock) : Clock(wallMs)) {}

bool Engine::conditionHolds(const Condition& c, const ToolCall& call, const nlohmann::json& params,
                            int64_t nowMs, std::string& error) const {
  switch (c.kind) {
    case Condition::Kind::kFailures:
      return failuresWithin(call.agent(), c.window, nowMs) >= c.failures;
    case Condition::Kind::kTime: {
      int64_t secs = nowMs / 1000;
      int64_t local = secs + (c.zone ? c.zone->offsetAt(secs) : 0);
      int64_t days = local >= 0 ? local / 86400 : (local - 86399) / 86400;
      int minute = static_cast<int>((local - days * 86400) / 60);
      int weekday =
          static_cast<int>(((days % 7) + 7 + 3) % 7);  // 1970-01-01 was a Thursday; 0 = Monday
      bool inWindow = c.fromMinute <= c.toMinute ? (minute >= c.fromMinute && minute < c.toMinute)
                                                 : (minute >= c.fromMinute || minute < c.toMinute);
      // A window across midnight belongs to the day it started on.
      if (c.fromMinute > c.toMinute && minute < c.toMinute) weekday = (weekday + 6) % 7;
      return inWindow && (c.days & (1u << weekday));
    }
    default:
      break;
  }
  // Parameter conditions: a missing parameter does not satisfy the condition (so it never
  // allows); a parameter of the wrong type is an error, and an error halts.
  const nlohmann::json* v = params.is_null() ? nullptr : jsonAt(params, c.param);
  if (!v) return false;
  switch (c.kind) {
    case Condition::Kind::kCompare: {
      if (!v->is_number()) {
        error = "params." + c.param + " is not a number";
        return false;
      }
      double x = v->get<double>();
      if (!std::isfinite(x)) {
        error = "params." + c.param + " is not finite";
        return false;
      }
      switch (c.op) {
        case Condition::Op::kLt:
          return x < c.number;
        case Condition::Op::kLte:
          return x <= c.number;
        case Condition::Op::kGt:
          return x > c.number;
        case Condition::Op::kGte:
          return x >= c.number;
        case Condition::Op::kEq:
          return x == c.number;
        case Condition::Op::kNe:
          return x != c.number;
      }
      return false;
    }
    case Condition::Kind::kIn: {
      if (v->is_number()) {
        // By value: 42, 42.0 and 4.2e1 are one number (as to the tools that read them).
        double x = v->get<double>();
        return std::any_of(c.values.begin(), c.values.end(), [&](const std::string& s) {
          double y = 0;
          auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), y);
          return ec == std::errc() && end == s.data() + s.size() && y == x;
        });
      }
      std::string s = v->is_string() ? v->get<std::string>() : v->dump();
      return std::find(c.values.begin(), c.values.end(), s) != c.values.end();
    }
    case Condition::Kind::kMatches:
      if (!v->is_string()) {
        error = "params." + c.param + " is not a string";
        return false;
      }
      return RE2::FullMatch(v->get<std::string>(), *c.regex);
    default:
      return false;
  }
}

int Engine::failuresWithin(const std::string& agent, std::chrono::milliseconds window,
                           int64_t nowMs) const {
  auto it = failures_.find(agent);
  if (it == failures_.end()) return 0;
  int64_t since = nowMs - window.count();
  return static_cast<int>(
      std::count_if(it->second.begin(), it->second.end(), [&](int64_t t) { return t >= since; }));
}

void Engine::quarantineNeighbours(const PolicySet& set, const std::string& agent,
                                  std::chrono::milliseconds ttl, int64_t nowMs) {
  const AgentDef* def = set.findAgent(agent);
  if (!def) return;
  int64_t until = nowMs + ttl.count();
  for (const auto& n : def->neighbours) {
    // One entry per neighbour, its end moved on: an agent that keeps being halted must not
    // grow the list every call scans (nor publish for every halt: once a second at most).
    auto it = std::find_if(quarantine_.begin(), quarantine_.end(),
                           [&](const auto& q) { return q.first == n; });
    if (it != quarantine_.end()) {
      if (until < it->second + 1000) continue;
      it->second = until;
    } else {
      quarantine_.emplace_back(n, until);
    }
    if (onQuarantine) onQuarantine(n, ttl);
  }
}

void Engine::addQuarantine(const std::string& glob, std::chrono::milliseconds ttl) {
  int64_t until = clock_() + ttl.count();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [pattern, end] : quarantine_) {
    if (pattern == glob) {
      end = std::max(end, until);
      return;
    }
  }
  quarantine_.emplace_back(glob, until);
}

Decision Engine::evaluate(const PolicySet& set, const Result<ToolCall>& result) {
  if (!result) {
    auto d =
        halt("extract", "the call cannot be read safely: " + result.error().message, "unknown");
    d.policyDigest = set.digest();
    return d;
  }
  const ToolCall& call = result.value();
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  auto finish = [&](Decision d) {
    d.policyDigest = set.digest();
    if (d.tool.empty()) d.tool = call.tool();
    return d;
  };

  if (now - sweptMs_ >= 60'000) sweep(now);
  // Cascade quarantine.
  quarantine_.erase(std::remove_if(quarantine_.begin(), quarantine_.end(),
                                   [&](auto& q) { return q.second <= now; }),
                    quarantine_.end());
  for (const auto& [pattern, until] : quarantine_) {
    if (globMatch(pattern, call.agent())) {
      return finish(halt("cascade",
                         "agent " + call.agent() + " is quarantined for another " +
                             std::to_string((until - now + 999) / 1000) +
                             "s after a neighbour's halt",
                         call.tool()));
    }
  }
  // Circuit breakers.
  Breaker* probe = nullptr;  // set when this call would be a half-open breaker's probe
  std::string upstream;
  if (!set.breakers().empty()) upstream = formatHostPort(call.host(), call.port());
  for (const auto& b : set.breakers()) {
    if (!hostMatch(b.host, call.host())) continue;
    // A breaker is made by an outcome, not by a decision: an upstream no call reached (a
    // port or name an agent made up, a call the rules halt) has none to keep.
    auto found = breakers_.find(upstream);
    if (found == breakers_.end()) break;
    auto& state = found->second;
    noteDef(state, b);
    if (state.openUntilMs > now) {
      return finish(halt("breaker",
                         "circuit breaker for " + upstream + " is open after " +
                             std::to_string(state.consecutive) + " failures",
                         call.tool()));
    }
    if (state.openUntilMs != 0) {
      // Half-open: one probe goes through; the others wait for its outcome (or, should the
      // probe never report, for another cooldown).
      if (state.probeSinceMs != 0 && now - state.probeSinceMs < b.cooldown.count()) {
        return finish(
            halt("breaker", "circuit breaker for " + upstream + " is half-open", call.tool()));
      }
      probe = &state;
    }
    break;
  }

  // Every rule whose match fits.
  const Rule* halting = nullptr;
  const Rule* approving = nullptr;
  auto& allows = allows_;
  allows.clear();
  std::string haltReason;
  auto fits = [&](const Rule& r, const std::string& tool, ActionClass cls, bool declared) {
    const auto& m = r.match;
    // A call to no declared tool is matched only by rules that name a tool or host: a rule
    // such as {class: read} must not open every GET on the internet.
    if (m.tool.empty() && m.host.empty() && !declared) return false;
    // Cheapest checks first.
    if (m.actionClass && *m.actionClass != cls) return false;
    if (!m.methods.empty() &&
        std::find(m.methods.begin(), m.methods.end(), call.method()) == m.methods.end()) {
      return false;
    }
    if (!m.tool.empty() && !(r.exactTool ? m.tool == tool : globMatch(m.tool, tool))) return false;
    if (!m.agent.empty() && !globMatch(m.agent, call.agent())) return false;
    if (!m.host.empty() && !hostMatch(m.host, call.host())) return false;
    return true;
  };
  // The subjects of the call: the tool it was attributed to or, for MCP, every tool it
  // calls (a batch is allowed only when each of its tools is). An MCP tool that no tool
  // declares is an undeclared write.
  auto& subjects = subjects_;
  subjects.clear();
  // A JSON-RPC body names the tools it calls. When the call was attributed to the MCP tool
  // those names belong to, they are its subjects. Otherwise the tool its host, method and
  // path chose stays a subject too: a JSON-RPC-shaped body must not take a DELETE to
  // /admin/ out of its tool (and out of the halts on it). Each tools/call is a subject of
  // its own, with its own arguments (below).
  size_t firstMcp = 0;  // the index of the first tools/call's subject
  if (call.attributedIsSubject()) {
    subjects.push_back({call.tool(), call.actionClass(), call.toolDef() != nullptr});
    firstMcp = 1;
  }
  for (const auto& name : call.mcpTools()) {
    const ToolDef* t = mcpToolOf(set, call, name);
    subjects.push_back(t ? Subject{t->name, t->actionClass, true}
                         : Subject{"mcp:" + name, ActionClass::kWrite, false});
  }
  // Candidate rules: those indexed under a subject's tool name, and those that name no
  // exact tool; walked in file order so the reported rule does not depend on the index.
  auto& candidates = candidates_;
  candidates.clear();
  for (const auto& subject : subjects) set.candidateRules(subject.tool, subject.cls, candidates);
  std::sort(candidates.begin(), candidates.end());
  candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
  for (uint32_t index : candidates) {
    const Rule& r = set.rules()[index];
    bool matched = false;
    for (const auto& subject : subjects)
      matched |= fits(r, subject.tool, subject.cls, subject.declared);
    if (!matched) continue;
    // The conditions, on the params of each subject the rule fits: the attributed tool's
    // (the body's fields) and each tools/call's own arguments. An allow or approve holds
    // when they hold for every one of them, a halt when they hold for any: a batch cannot
    // hide a large payment behind a small one.
    bool holds = true;
    std::string error;
    if (!r.when.empty()) {
      bool any = false, all = true;
      for (size_t i = 0; i < subjects.size() && error.empty(); ++i) {
        if (!fits(r, subjects[i].tool, subjects[i].cls, subjects[i].declared)) continue;
        const nlohmann::json& params =
            i < firstMcp ? call.params() : call.mcpArguments()[i - firstMcp];
        bool each = true;
        for (const auto& c : r.when) {
          if (!conditionHolds(c, call, params, now, error)) {
            each = false;
            break;
          }
        }
        any |= each;
        all &= each;
      }
      // An approve gates like a halt: one call of a batch that needs a human is enough.
      holds = r.effect == Effect::kAllow ? all : any;
    }
    if (!error.empty()) {
      // A rule that cannot be evaluated halts, whatever its effect.
      if (!halting) {
        halting = &r;
        haltReason = "rule " + r.id + " could not be evaluated: " + error;
      }
      continue;
    }
    if (!holds) continue;
    if (r.effect == Effect::kHalt) {
      if (!halting) {
        halting = &r;
        haltReason = r.reason.empty() ? "halted by rule " + r.id : r.reason;
      }
    } else if (r.effect == Effect::kApprove) {
      if (!approving) approving = &r;
      for (auto& subject : subjects)
        subject.allowed |= fits(r, subject.tool, subject.cls, subject.declared);
    } else {
      allows.push_back(&r);
      for (auto& subject : subjects)
        subject.allowed |= fits(r, subject.tool, subject.cls, subject.declared);
    }
  }
  if (halting) {
    if (halting->cascade.count() > 0)
      quarantineNeighbours(set, call.agent(), halting->cascade, now);
    return finish(halt(halting->id, haltReason, call.tool()));
  }
  for (const auto& subject : subjects) {
    if (!subject.allowed) {
      return finish(halt("default-deny",
                         "no rule allows " + subject.tool + " for agent " + call.agent(),
                         subject.tool));
    }
  }
  // An approved call goes on to the rate limits and the breaker's probe like any allowed
  // one: a lease lets the call be made again, not made without limit, and a half-open
  // breaker still lets one call through at a time.
  const std::string* approvedAs = nullptr;
  std::string fp, approvalKey;
  if (approving) {
    fp = call.fingerprint();
    approvalKey = fp + '\n' + set.digest();
    auto latest = latestApproval_.find(approvalKey);
    auto found =
        latest == latestApproval_.end() ? approvals_.end() : approvals_.find(latest->second);
    if (found != approvals_.end()) {
      const Approval& a = found->second;
      if (a.state == "approved" && a.leaseUntilMs > now) {
        approvedAs = &found->first;
      } else if (a.state == "pending" && a.expiresMs > now) {
        Decision d;
        d.verdict = Verdict::kApprove;
        d.rule = approving->id;
        d.reason =
            approving->reason.empty() ? "this call needs a human's approval" : approving->reason;
        d.approvalId = a.id;
        return finish(d);
      }
    }
  }
  if (approving && !approvedAs) {
    auto& asked = approvalsAsked_[call.agent()];
    while (!asked.empty() && asked.front() <= now - approvalTtl.count()) asked.pop_front();
    // At the cap, what an hour has voided goes at once (at most once a second), not at the
    // next minute's sweep.
    if (approvals_.size() >= maxApprovals && now - sweptMs_ >= 1000) sweep(now);
    if (asked.size() >= maxApprovalsPerAgent || approvals_.size() >= maxApprovals) {
      bool agentCap = asked.size() >= maxApprovalsPerAgent;
      return finish(halt("approval_limit",
                         agentCap ? "agent " + call.agent() + " has asked for " +
                                        std::to_string(asked.size()) + " approvals in the last " +
                                        std::to_string(approvalTtl.count() / 60'000) +
                                        " minutes: no more are queued until those expire"
                                  : std::to_string(approvals_.size()) +
                                        " approvals are kept: no more are queued until the "
                                        "oldest are forgotten",
                         call.tool()));
    }
    asked.push_back(now);
    Approval a;
    a.id = randomId();
    a.fingerprint = fp;
    a.agent = call.agent();
    a.tool = call.tool();
    a.method = call.method();
    a.authority = formatHostPort(call.host(), call.port());  // [v6]:port, as call records
    a.path = call.path();
    a.rule = approving->id;
    a.policyDigest = set.digest();
    a.createdMs = now;
    a.expiresMs = now + approvalTtl.count();
    approvals_[a.id] = a;
    latestApproval_[approvalKey] = a.id;
    Decision d;
    d.verdict = Verdict::kApprove;
    d.rule = approving->id;
    d.reason = approving->reason.empty() ? "this call needs a human's approval" : approving->reason;
    d.approvalId = a.id;
    return finish(d);
  }
  if (allows.empty() && !approvedAs)
    return finish(halt("default-deny",
                       "no rule allows " + call.tool() + " for agent " + call.agent(),
                       call.tool()));

  // Rate limits of every matching allow: all are charged only when all have a token.
  int64_t retryAfterMs = 0;
  const Rule* limiting = nullptr;
  std::vector<Bucket*> charge;
  for (const Rule* r : allows) {
    if (!r->rateLimit) continue;
    const auto& rl = *r->rateLimit;
    std::string key = r->id + '|';
    if (rl.key != RateLimit::Key::kTool) key += call.agent();
    key += '|';
    if (rl.key != RateLimit::Key::kAgent) key += call.tool();
    auto [it, created] = buckets_.try_emplace(key);
    Bucket& b = it->second;
    double perMs = rl.requests / static_cast<double>(rl.per.count());
    if (created) {
      b.tokens = rl.burst;
      b.lastMs = now;
    }
    b.tokens = std::min(rl.burst, b.tokens + static_cast<double>(now - b.lastMs) * perMs);
    b.lastMs = now;
    // Full again after (burst - tokens) / perMs (one token, the charge to come, counted).
    b.fullMs = now + static_cast<int64_t>(std::ceil((rl.burst - b.tokens + 1.0) / perMs));
    if (b.tokens < 1.0) {
      // In 64 bits: a period of days is billions of ms (an int wrapped, and allowed the call).
      auto wait = static_cast<int64_t>(std::ceil((1.0 - b.tokens) / perMs));
      if (wait > retryAfterMs) {
        retryAfterMs = wait;
        limiting = r;
      }
    } else {
      charge.push_back(&b);
    }
  }
  if (limiting) {
    Decision d;
    d.verdict = Verdict::kThrottle;
    d.rule = limiting->id;
    d.reason = "rate limit of rule " + limiting->id + " exceeded";
    d.retryAfterSeconds = static_cast<int>(
        std::clamp<int64_t>((retryAfterMs + 999) / 1000, 1, std::numeric_limits<int>::max()));
    return finish(d);
  }
  for (auto* b : charge) b->tokens -= 1.0;
  if (probe) probe->probeSinceMs = now;
  Decision d;
  d.verdict = Verdict::kAllow;
  if (approvedAs) {
    d.rule = approving->id;
    d.reason = "approved as " + *approvedAs;
    d.approvalId = *approvedAs;
  } else {
    d.rule = allows.front()->id;
  }
  return finish(d);
}

void Engine::recordOutcome(const PolicySet& set, const ToolCall& call, const Outcome& reported) {
  Outcome outcome = reported;
  if (const ToolDef* tool = call.toolDef()) {
    // Statuses the tool declares as failures count like 5xx.
    const auto& statuses = tool->failureStatuses;
    outcome.failed |= std::find(statuses.begin(), statuses.end(), outcome.status) != statuses.end();
  }
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  if (outcome.failed) {
    auto& times = failures_[call.agent()];
    times.push_back(now);
    // Keep a day at most and a bounded number per agent.
    while (!times.empty() && (times.front() < now - 86'400'000 || times.size() > 10'000))
      times.pop_front();
  }
  // Nothing of the upstream learnt: never sent (the agent left while it was decided, the
  // audit failed, a denied address), or sent and the agent left before any answer. Such an
  // outcome neither closes a breaker nor counts against it; a probe that said nothing
  // leaves the half-open breaker to the next call.
  bool neutral = !outcome.failed && (!outcome.sent || outcome.status == 0);
  std::string upstream = formatHostPort(call.host(), call.port());
  for (const auto& b : set.breakers()) {
    if (!hostMatch(b.host, call.host())) continue;
    auto found = breakers_.find(upstream);
    if (found == breakers_.end() && neutral) break;  // nothing learnt, nothing to keep
    auto& state = found != breakers_.end() ? found->second : breakers_[upstream];
    noteDef(state, b);
    state.lastMs = now;
    if (neutral) {
      state.probeSinceMs = 0;
      break;
    }
    if (outcome.failed) {
      ++state.consecutive;
      if (state.probeSinceMs != 0 || state.consecutive >= b.failures)
        state.openUntilMs = now + b.cooldown.count();
    } else {
      state.consecutive = 0;
      state.openUntilMs = 0;
    }
    state.probeSinceMs = 0;
    break;
  }
}

void Engine::sweep(int64_t nowMs) {
  sweptMs_ = nowMs;
  constexpr int64_t kKeep = 3'600'000;  // answered or void approvals stay listed an hour
  std::erase_if(approvals_, [&](const auto& entry) {
    const Approval& a = entry.second;
    int64_t end = a.state == "approved" ? a.leaseUntilMs : a.expiresMs;
    return end + kKeep < nowMs;
  });
  std::erase_if(latestApproval_,
                [&](const auto& entry) { return !approvals_.contains(entry.second); });
  std::erase_if(approvalsAsked_, [&](const auto& entry) {
    return entry.second.empty() || entry.second.back() <= nowMs - approvalTtl.count();
  });
  std::erase_if(buckets_, [&](const auto& entry) { return entry.second.fullMs <= nowMs; });
  std::erase_if(failures_, [&](const auto& entry) {
    return entry.second.empty() || entry.second.back() < nowMs - 86'400'000;
  });
  // A breaker not open (closed, or half-open with its cooldown long over) that no outcome
  // reached for a while: an agent choosing ports or names under a breakers: entry made one
  // each, listed in /v1/breakers and /metrics for good.
  std::erase_if(breakers_, [&](const auto& entry) {
    return entry.second.openUntilMs <= nowMs && entry.second.lastMs + kBreakerIdleMs < nowMs;
  });
}

void Engine::noteDef(Breaker& state, const BreakerDef& def) {
  if (state.host != def.host) state.host = def.host;
  state.failures = def.failures;
  state.cooldownMs = def.cooldown.count();
}

std::vector<BreakerView> Engine::breakers() const {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<BreakerView> out;
  out.reserve(breakers_.size());
  for (const auto& [upstream, b] : breakers_) {
    BreakerView v;
    v.upstream = upstream;
    v.host = b.host;
    v.state = b.openUntilMs > now ? "open" : b.openUntilMs != 0 ? "half-open" : "closed";
    v.consecutiveFailures = b.consecutive;
    v.failures = b.failures;
    v.cooldownMs = b.cooldownMs;
    v.openUntilMs = b.openUntilMs;
    v.probeInFlight = b.probeSinceMs != 0;
    out.push_back(std::move(v));
  }
  std::sort(out.begin(), out.end(),
            [](const BreakerView& a, const BreakerView& b) { return a.upstream < b.upstream; });
  return out;
}

std::vector<Approval> Engine::approvals() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Approval> out;
  for (const auto& [id, a] : approvals_) out.push_back(a);
  return out;
}

bool Engine::approve(const std::string& id, std::chrono::milliseconds lease) {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = approvals_.find(id);
  if (it == approvals_.end() || it->second.state != "pending" || it->second.expiresMs <= now)
    return false;
  it->second.state = "approved";
  it->second.leaseUntilMs = now + (lease.count() > 0 ? lease : defaultLease).count();
  return true;
}

bool Engine::deny(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = approvals_.find(id);
  if (it == approvals_.end() || it->second.state != "pending") return false;
  it->second.state = "denied";
  return true;
}

}  // namespace tollgate
