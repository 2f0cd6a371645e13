#include "policy/policy_decider.h"

#include <algorithm>
#include <charconv>
#include <limits>

#include <nlohmann/json.hpp>

#include "policy/redis_budget_store.h"

namespace tollgate {

Result<std::unique_ptr<PolicyDecider>> PolicyDecider::create(std::vector<std::string> files,
                                                             const StoreConfig& config) {
  auto set = PolicySet::load(files);
  if (!set) return set.error();
  std::unique_ptr<PolicyDecider> decider(new PolicyDecider(std::move(files), set.value()));
  if (config.backend == "redis") {
    RedisBudgetStore::Options options;
    auto urls = parseRedisUrls(config.urls);
    if (!urls) return urls.error();
    std::tie(options.seeds, options.auth) = std::move(urls.value());
    options.timeout = config.timeout;
    options.initMissing = config.initMissing;
    auto store = RedisBudgetStore::create(*set.value(), options);
    if (!store) return store.error();
    decider->budgets_ = std::move(store.value());
  } else {
    auto store = MemoryBudgetStore::create(*set.value());
    if (!store) return store.error();
    decider->budgets_ = std::move(store.value());
  }
  // Cascade quarantines reach every sidecar that shares the store.
  PolicyDecider* d = decider.get();
  d->engine_.onQuarantine = [d](const std::string& glob, std::chrono::milliseconds ttl) {
    d->budgets_->shareQuarantine(glob, ttl);
  };
  d->budgets_->onSharedQuarantine = [d](const std::string& glob, std::chrono::milliseconds ttl) {
    d->engine_.addQuarantine(glob, ttl);
  };
  return decider;
}

std::vector<Charge> PolicyDecider::chargesOf(const PolicySet& set, const ToolCall& call) const {
  // The cost of every subject of the call: its tool, and each tools/call of an MCP body (a
  // batch of N charged calls costs N times, a mixed batch the sum of its tools).
  int64_t effort = 0, risk = 0;
  auto add = [](int64_t& sum, int64_t c) {
    sum = c > 0 && sum > std::numeric_limits<int64_t>::max() - c
              ? std::numeric_limits<int64_t>::max()
              : sum + c;
  };
  auto charge = [&](const ToolDef* t) {
    if (!t) return;
    add(effort, t->cost.effort);
    add(risk, t->cost.risk);
  };
  if (call.attributedIsSubject()) charge(call.toolDef());
  for (const auto& name : call.mcpTools()) charge(mcpToolOf(set, call, name));
  if (effort == 0 && risk == 0) return {};
  const AgentDef* agent = set.findAgent(call.agent());
  if (!agent || agent->pool.empty()) return {};
  Charge c{agent->pool, effort, risk};
  // A pool with no budget on a dimension does not limit it: that part of the cost is not
  // charged (the store would otherwise halt every such call as budget_uninitialised).
  if (const PoolDef* pool = set.findPool(agent->pool)) {
    if (!pool->effort) c.effort = 0;
    if (!pool->risk) c.risk = 0;
  }
  if (c.effort == 0 && c.risk == 0) return {};
  return {c};
}

PolicyDecider::PolicyDecider(std::vector<std::string> files, std::shared_ptr<const PolicySet> set)
    : files_(std::move(files)), set_(std::move(set)) {}

Decision PolicyDecider::decideNow(const CallInfo& call) {
  Decision out;
  decide(call, [&](Decision d) { out = std::move(d); });
  return out;
}

void PolicyDecider::decide(const CallInfo& call, Done done) {
  auto set = set_.load();
  auto tc = Extractor::extract(call, *set);
  Decision d = engine_.evaluate(*set, tc);
  const AgentDef* agentDef = set->findAgent(call.agent);
  d.agentClass = agentDef ? agentDef->pattern : "unlisted";
  if (!tc || d.verdict != Verdict::kAllow) {
    done(std::move(d));
    return;
  }
  // The budget is reserved last, so that a call the rules refuse never holds any.
  auto charges = chargesOf(*set, tc.value());
  if (charges.empty()) {
    // Kept for onOutcome() when the set counts failures, so the call is not read twice.
    if (set->tracksOutcomes())
      d.context = std::make_shared<const Outcomes>(Outcomes{set, std::move(tc.value()), {}, {}});
    done(std::move(d));
    return;
  }
  auto ctx = std::make_shared<Outcomes>(
      Outcomes{set, std::move(tc.value()), newCallId(), std::move(charges)});
  budgets_->reserve(ctx->callId, ctx->charges, holdTtl,
                    [d = std::move(d), ctx, done = std::move(done)](BudgetOutcome b) mutable {
                      if (b.status == BudgetStatus::kOk) {
                        d.context = ctx;
                        done(std::move(d));
                        return;
                      }
                      // Fail open only when every pool the call is charged to says so explicitly.
                      const auto& charged = ctx->charges;
                      bool failOpen = b.status == BudgetStatus::kUnavailable && !charged.empty();
                      for (const auto& c : charged) {
                        const PoolDef* pool = ctx->set->findPool(c.pool);
                        failOpen = failOpen && pool && pool->failOpen;
                      }
                      if (failOpen) {
                        ctx->callId.clear();  // explicitly fail-open: forwarded, not charged
                        d.context = ctx;
                        d.reason = "budget store unavailable; pool " + charged.front().pool +
                                   " is fail_open";
                        done(std::move(d));
                        return;
                      }
                      Decision halt;
                      halt.verdict = Verdict::kHalt;
                      halt.rule = "budget";
                      halt.reason = std::string(budgetStatusName(b.status)) + ": " + b.reason;
                      // The store's error names its nodes: a way in for an agent to its own
                      // budgets. The agent is told the kind; the record keeps the cause.
                      if (b.status == BudgetStatus::kUnavailable)
                        halt.agentReason =
                            "budget_unavailable: the budget store did not answer (the call's "
                            "audit record has the cause)";
                      halt.tool = d.tool;
                      halt.policyDigest = d.policyDigest;
                      halt.agentClass = d.agentClass;  // a budget halt is an agent's step too
                      done(std::move(halt));
                    });
}

size_t PolicyDecider::bodyNeeded(std::string_view host) const {
  auto set = set_.load();
  // The host as the engine will match it: 167772167 or ::ffff:10.0.0.7 is 10.0.0.7, so a
  // rule on 10.0.0.7's params must have the body read for them too. A host that has no
  // canonical form is halted by the extractor; its body is read to no avail.
  auto canonical = Extractor::canonicalHost(host);
  std::string_view h = canonical ? std::string_view(canonical.value()) : host;
  return set->needsBody(h) ? set->maxBodyBytes() : 0;
}

size_t PolicyDecider::responseBodyNeeded(const Decision& decision) const {
  if (!decision.context) return 0;
  const auto& ctx = *std::static_pointer_cast<const Outcomes>(decision.context);
  const ToolDef* tool = ctx.call.toolDef();
  if (ctx.callId.empty() || !tool || !tool->cost.readsResponseBody()) return 0;
  return ctx.set->maxBodyBytes();
}

namespace {

// A non-negative integer at a dotted path of a JSON body; -1: none (the estimate stands).
int64_t costField(const nlohmann::json& body, const std::string& path) {
  if (path.empty() || body.is_discarded()) return -1;
  const nlohmann::json* node = jsonAt(body, path);
  if (!node) return -1;
  if (node->is_number_unsigned()) {
    auto v = node->get<uint64_t>();
    return v > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v);
  }
  if (node->is_number_integer() && node->get<int64_t>() >= 0) return node->get<int64_t>();
  return -1;  // a float, a string, a negative number, null: not a cost
}

}  // namespace

void PolicyDecider::onOutcome(const CallInfo&, const Decision& decision, const Outcome& outcome) {
  if (!decision.context) return;
  const auto& ctx = *std::static_pointer_cast<const Outcomes>(decision.context);
  // Recorded against the set that decided: a reload in between does not mix the two.
  if (ctx.set->tracksOutcomes()) engine_.recordOutcome(*ctx.set, ctx.call, outcome);
  if (ctx.callId.empty()) return;
  // A call that never left is refunded; any other is charged its real cost when the
  // response names it (never more than was held), else what was held.
  if (!outcome.sent) {
    budgets_->release(ctx.callId, ctx.charges, [](BudgetOutcome) {});
    return;
  }
  // No charge named: what was held is the cost (the stores read an empty list so).
  std::vector<Charge> actual;
  const ToolDef* tool = ctx.call.toolDef();
  if (tool && outcome.responseHeader &&
      (!tool->cost.effortHeader.empty() || !tool->cost.riskHeader.empty())) {
    auto read = [&](const std::string& header) -> int64_t {
      if (header.empty()) return -1;
      auto v = outcome.responseHeader(header);
      if (!v) return -1;
      // Given more than once ("3, 5"): the largest counts, as the cost never less than it.
      int64_t cost = -1;
      std::string_view rest = *v;
      while (true) {
        auto comma = rest.find(',');
        auto part = rest.substr(0, comma);
        while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
        while (!part.empty() && part.back() == ' ') part.remove_suffix(1);
        if (part.empty() || part.find_first_not_of("0123456789") != std::string_view::npos)
          return -1;  // not a plain integer: the estimate is the cost
        // A cost too large for 64 bits is still a cost, and far more than any hold.
        int64_t n = 0;
        auto parsed = std::from_chars(part.data(), part.data() + part.size(), n);
        cost = std::max(cost, parsed.ec == std::errc::result_out_of_range ? INT64_MAX : n);
        if (comma == std::string_view::npos) return cost;
        rest.remove_prefix(comma + 1);
      }
    };
    actual.reserve(ctx.charges.size());
    for (const auto& c : ctx.charges)
      actual.push_back({c.pool, read(tool->cost.effortHeader), read(tool->cost.riskHeader)});
  }
  if (tool && tool->cost.readsResponseBody() && outcome.responseBody) {
    auto body = nlohmann::json::parse(*outcome.responseBody, nullptr, /*allow_exceptions=*/false);
    int64_t effort = costField(body, tool->cost.effortField);
    int64_t risk = costField(body, tool->cost.riskField);
    if (actual.empty()) {
      for (const auto& c : ctx.charges) actual.push_back({c.pool, effort, risk});
    } else {
      for (auto& a : actual) {
        if (!tool->cost.effortField.empty()) a.effort = effort;
        if (!tool->cost.riskField.empty()) a.risk = risk;
      }
    }
  }
  budgets_->settle(ctx.callId, actual, [](BudgetOutcome) {});
}

std::string PolicyDecider::reload() {
  std::lock_guard<std::mutex> lock(reloadMutex_);
  auto set = PolicySet::load(files_);
  if (!set) return set.error().message;
  // A file that held policy and now holds nothing is a write caught between its truncation
  // and its text, far more often than a wish to drop it: as a policy it would say little
  // (or halt every call). The last good set stays; a file meant to be empty can say so in a
  // comment.
  auto active = set_.load();
  for (const auto& now : set.value()->sources()) {
    if (!now.text.empty()) continue;
    for (const auto& before : active->sources()) {
      if (before.file == now.file && !before.text.empty())
        return now.file +
               ": the file is empty now (a write in progress?); an empty policy "
               "file needs at least a comment";
    }
  }
  // Nothing changes until nothing can refuse the set: its budgets are declared last.
  if (auto st = budgets_->validate(*set.value()); !st) return st.error().message;
  if (beforeActivate) {
    std::string error = beforeActivate(*set.value(), *set_.load());
    if (!error.empty()) return error;
  }
  if (auto st = budgets_->declare(*set.value()); !st) return st.error().message;
  set_.store(set.value());
  return {};
}

}  // namespace tollgate
