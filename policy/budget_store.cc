#include "policy/budget_store.h"

#include <pthread.h>
#include <sys/random.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>

#include "common/clock.h"

namespace tollgate {
namespace {

BudgetOutcome refuse(BudgetStatus status, const std::string& pool, std::string reason) {
  return BudgetOutcome{status, pool, std::move(reason), 0};
}

constexpr char kHex[] = "0123456789abcdef";

std::string randomPrefix() {
  unsigned char bytes[8];
  if (::getrandom(bytes, sizeof bytes, 0) != static_cast<ssize_t>(sizeof bytes)) {
    std::random_device rd;
    for (auto& b : bytes) b = static_cast<unsigned char>(rd());
  }
  std::string out;
  for (unsigned char b : bytes) {
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out + '-';
}

std::string& callIdPrefix() {
  static std::string prefix = [] {
    ::pthread_atfork(nullptr, nullptr, [] { callIdPrefix() = randomPrefix(); });
    return randomPrefix();
  }();
  return prefix;
}

}  // namespace

std::string newCallId() {
  // Short enough for std::string's inline buffer (15 characters: no allocation per call):
  // the process's prefix cut to 4 hex digits, and the counter in hex.
  static std::atomic<uint64_t> counter{0};
  uint64_t n = counter.fetch_add(1, std::memory_order_relaxed);
  char buf[32];
  char* end = buf + sizeof buf;
  char* p = end;
  do {
    *--p = kHex[n & 15];
    n >>= 4;
  } while (n != 0);
  *--p = '-';
  p -= 4;
  std::copy_n(callIdPrefix().data(), 4, p);
  return std::string(p, static_cast<size_t>(end - p));
}

std::string newHolderId() {
  static std::atomic<uint64_t> counter{0};
  return callIdPrefix() + std::to_string(counter.fetch_add(1, std::memory_order_relaxed));
}

namespace {
uint64_t idOf(const std::string& callId) {
  uint64_t id = std::hash<std::string>{}(callId);
  return id ? id : 1;
}
}  // namespace

bool FinishedCalls::Table::contains(uint64_t id) const {
  if (slots.empty()) return false;
  for (size_t at = id & kMask;; at = (at + 1) & kMask) {
    if (slots[at] == id) return true;
    if (slots[at] == 0) return false;
  }
}

void FinishedCalls::Table::insert(uint64_t id) {
  if (slots.empty()) slots.assign(kMask + 1, 0);
  for (size_t at = id & kMask;; at = (at + 1) & kMask) {
    if (slots[at] == id) return;
    if (slots[at] == 0) {
      slots[at] = id;
      ++count;
      return;
    }
  }
}

namespace {
// The counter of an id this process minted (newCallId: the prefix's first 4 hex digits, '-',
// up to 9 hex digits), or false.
bool ownCounter(const std::string& id, uint64_t* n) {
  if (id.size() < 6 || id.size() > 14 || id[4] != '-' ||
      std::memcmp(id.data(), callIdPrefix().data(), 4) != 0) {
    return false;
  }
  uint64_t v = 0;
  for (size_t i = 5; i < id.size(); ++i) {
    char c = id[i];
    uint64_t d;
    if (c >= '0' && c <= '9')
      d = static_cast<uint64_t>(c - '0');
    else if (c >= 'a' && c <= 'f')
      d = static_cast<uint64_t>(c - 'a' + 10);
    else
      return false;
    v = v << 4 | d;
  }
  *n = v;
  return true;
}
}  // namespace

bool FinishedCalls::contains(const std::string& callId) const {
  if (uint64_t n; ownCounter(callId, &n)) {
    if (n >= newest_) return false;          // newer than every finished one
    if (newest_ - n > kWindow) return true;  // minted long before the window
    return (recent_[n % kWindow / 64] >> (n % 64) & 1) != 0;
  }
  uint64_t id = idOf(callId);
  return now_.contains(id) || before_.contains(id);
}

void FinishedCalls::insert(const std::string& callId) {
  if (uint64_t n; ownCounter(callId, &n)) {
    if (recent_.empty()) recent_.assign(kWindow / 64, 0);
    if (n >= newest_) {
      // The window moves up to n: the bits of the counters it takes in are cleared.
      if (n + 1 - newest_ >= kWindow) {
        std::fill(recent_.begin(), recent_.end(), 0);
      } else {
        for (uint64_t c = newest_; c < n; ++c) recent_[c % kWindow / 64] &= ~(1ull << (c % 64));
      }
      newest_ = n + 1;
    } else if (newest_ - n > kWindow) {
      return;  // counted as finished already
    }
    recent_[n % kWindow / 64] |= 1ull << (n % 64);
    return;
  }
  if (now_.count >= kGeneration) {
    std::swap(now_, before_);
    std::fill(now_.slots.begin(), now_.slots.end(), 0);
    now_.count = 0;
  }
  now_.insert(idOf(callId));
}

const char* budgetStatusName(BudgetStatus s) {
  switch (s) {
    case BudgetStatus::kOk:
      return "ok";
    case BudgetStatus::kExhausted:
      return "budget_exhausted";
    case BudgetStatus::kTripped:
      return "budget_tripped";
    case BudgetStatus::kUninitialised:
      return "budget_uninitialised";
    case BudgetStatus::kUnavailable:
      return "budget_unavailable";
    case BudgetStatus::kUnknownCall:
      return "unknown_call";
  }
  return "budget_unavailable";
}

Result<std::unique_ptr<MemoryBudgetStore>> MemoryBudgetStore::create(const PolicySet& set,
                                                                     Clock clock) {
  std::unique_ptr<MemoryBudgetStore> store(
      new MemoryBudgetStore(clock ? std::move(clock) : Clock(wallMs)));
  if (auto st = store->declare(set); !st) return st.error();
  return store;
}

Status MemoryBudgetStore::validate(const PolicySet& set) const {
  for (const auto& p : set.pools()) {
    if (p.shared) {
      return Error{
          -1,
          p.mark.str() + ": pool '" + p.name +
              "' is declared scope: shared, which the memory store cannot be (use store: redis)"};
    }
  }
  return Status::success();
}

Status MemoryBudgetStore::declare(const PolicySet& set) {
  if (auto st = validate(set); !st) return st;
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  // A pool the set no longer has keeps its account (and spend, should it come back), unseen.
  declared_.clear();
  for (const auto& p : set.pools()) {
    auto add = [&](const char* dim, const std::optional<Budget>& b) {
      if (!b) return;
      declared_.insert(p.name + "/" + dim);
      auto& account = budgets_[p.name + "/" + dim];  // an existing pool keeps its spend
      account.limit = b->limit;
      if (account.periodMs != b->period.count()) {
        // A period that ended under the old length ends now: its spend and trip go with it,
        // not into the new period.
        if (account.periodMs > 0) roll(account, now);
        account.periodMs = b->period.count();
        account.periodStartMs = now - now % account.periodMs;
      }
    };
    add("effort", p.effort);
    add("risk", p.risk);
  }
  return Status::success();
}

void MemoryBudgetStore::roll(Account& b, int64_t now) {
  if (now < b.periodStartMs + b.periodMs) return;
  b.periodStartMs = now - now % b.periodMs;
  b.committed = 0;
  b.tripped = false;
}

void MemoryBudgetStore::expireHolds(int64_t now) {
  if (now < nextExpiryMs_) return;
  nextExpiryMs_ = INT64_MAX;
  for (auto it = holds_.begin(); it != holds_.end();) {
    if (it->second.expiresMs > now) {
      nextExpiryMs_ = std::min(nextExpiryMs_, it->second.expiresMs);
      ++it;
      continue;
    }
    // The call may have run: its hold is committed, not refunded, in the current period
    // (rolled first: a commit into a period that has ended would be lost at its roll).
    for (const auto& [key, amount] : it->second.amounts) {
      auto& b = budgets_[key];
      roll(b, now);
      b.held -= amount;
      b.committed += amount;
      b.spent += amount;
    }
    done_.insert(it->first);
    expired_.add(it->first, std::move(it->second));
    it = holds_.erase(it);
  }
}

BudgetOutcome MemoryBudgetStore::reserveNow(const std::string& callId,
                                            const std::vector<Charge>& charges,
                                            std::chrono::milliseconds holdTtl) {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  expireHolds(now);
  if (holds_.count(callId)) return {};  // the same call again: already held
  if (done_.contains(callId))
    return refuse(BudgetStatus::kUnknownCall, "", "call " + callId + " was already settled");
  // Check every budget first: all or nothing.
  Hold hold;
  hold.expiresMs = now + holdTtl.count();
  for (const auto& c : charges) {
    if (c.effort <= 0 && c.risk <= 0) continue;
    // An overrun on either dimension trips the whole pool (a dimension the policy has: one
    // a reload removed keeps its account, should it come back, but halts nothing meanwhile).
    for (const char* dim : {"effort", "risk"}) {
      auto it = budgets_.find(c.pool + "/" + dim);
      if (it == budgets_.end() || !declared_.contains(it->first)) continue;
      roll(it->second, now);
      if (it->second.tripped) {
        return refuse(BudgetStatus::kTripped, c.pool,
                      "pool " + c.pool + " was tripped by an overrun this period");
      }
    }
    for (const auto& [dim, amount] :
         {std::pair<const char*, int64_t>{"effort", c.effort}, {"risk", c.risk}}) {
      if (amount <= 0) continue;
      auto it = budgets_.find(c.pool + "/" + dim);
      if (it == budgets_.end()) {
        return refuse(BudgetStatus::kUninitialised, c.pool,
                      "pool " + c.pool + " has no " + dim + " budget in the store");
      }
      auto& b = it->second;
      if (b.committed + b.held + amount > b.limit) {
        return refuse(BudgetStatus::kExhausted, c.pool,
                      "pool " + c.pool + " " + dim + ": " + std::to_string(b.committed + b.held) +
                          " of " + std::to_string(b.limit) + " spent or held, " +
                          std::to_string(amount) + " more asked");
      }
      hold.amounts.emplace_back(it->first, amount);
    }
  }
  for (const auto& [key, amount] : hold.amounts) budgets_[key].held += amount;
  nextExpiryMs_ = std::min(nextExpiryMs_, hold.expiresMs);
  holds_.emplace(callId, std::move(hold));
  return {};
}

BudgetOutcome MemoryBudgetStore::settleNow(const std::string& callId,
                                           const std::vector<Charge>& actual) {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  expireHolds(now);
  auto it = holds_.find(callId);
  // The real cost of one budget of a hold: without one, the estimate is the cost.
  auto costOf = [&](const std::string& pool, const std::string& dim, int64_t held) {
    int64_t cost = held;
    for (const auto& c : actual) {
      if (c.pool == pool) cost = dim == "effort" ? c.effort : c.risk;
    }
    return cost < 0 ? held : cost;
  };
  if (it == holds_.end()) {
    // After its hold expired (and was committed): only an overrun is still news.
    auto late = expired_.take(callId);
    BudgetOutcome out;
    for (const auto& [key, held] : late.value_or(Hold{}).amounts) {
      auto slash = key.find('/');
      std::string pool = key.substr(0, slash), dim = key.substr(slash + 1);
      int64_t cost = costOf(pool, dim, held);
      if (cost <= held) continue;
      auto& b = budgets_[key];
      roll(b, now);
      b.tripped = true;
      out.addOverrun(cost - held);
      out.pool = pool;
    }
    if (out.overrun == 0)
      return refuse(BudgetStatus::kUnknownCall, "", "no hold for call " + callId);
    out.reason = "call " + callId + " cost " + std::to_string(out.overrun) +
                 " more than was held (settled after its hold expired)";
    return out;
  }
  BudgetOutcome out;
  for (const auto& [key, held] : it->second.amounts) {
    auto slash = key.find('/');
    std::string pool = key.substr(0, slash), dim = key.substr(slash + 1);
    int64_t cost = costOf(pool, dim, held);
    auto& b = budgets_[key];
    roll(b, now);  // a call that ran across the period's end is paid for in the new one
    b.held -= held;
    b.committed += std::min(cost, held);
    b.spent += std::min(cost, held);
    if (cost > held) {
      // Never commit more than was held; record the overrun and trip the pool.
      out.addOverrun(cost - held);
      out.pool = pool;
      b.tripped = true;
    }
  }
  holds_.erase(it);
  done_.insert(callId);
  if (out.overrun > 0)
    out.reason = "call " + callId + " cost " + std::to_string(out.overrun) + " more than was held";
  return out;
}

BudgetOutcome MemoryBudgetStore::releaseNow(const std::string& callId) {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  expireHolds(now);
  auto it = holds_.find(callId);
  if (it == holds_.end()) {
    done_.insert(callId);  // a reserve arriving late for this call is refused
    return refuse(BudgetStatus::kUnknownCall, "", "no hold for call " + callId);
  }
  for (const auto& [key, amount] : it->second.amounts) budgets_[key].held -= amount;
  holds_.erase(it);
  done_.insert(callId);
  return {};
}

void MemoryBudgetStore::reserve(const std::string& callId, const std::vector<Charge>& charges,
                                std::chrono::milliseconds holdTtl, Done done) {
  uint64_t started = uv_hrtime();
  auto out = reserveNow(callId, charges, holdTtl);
  if (observer) observer("reserve", out.status, static_cast<double>(uv_hrtime() - started) / 1e9);
  done(std::move(out));
}

void MemoryBudgetStore::settle(const std::string& callId, const std::vector<Charge>& actual,
                               Done done) {
  uint64_t started = uv_hrtime();
  auto out = settleNow(callId, actual);
  if (observer) observer("settle", out.status, static_cast<double>(uv_hrtime() - started) / 1e9);
  done(std::move(out));
}

void MemoryBudgetStore::release(const std::string& callId, const std::vector<Charge>&, Done done) {
  uint64_t started = uv_hrtime();
  auto out = releaseNow(callId);
  if (observer) observer("release", out.status, static_cast<double>(uv_hrtime() - started) / 1e9);
  done(std::move(out));
}

std::vector<BudgetView> MemoryBudgetStore::view() const {
  int64_t now = clock_();
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<BudgetView> out;
  for (const auto& [key, account] : budgets_) {
    if (!declared_.contains(key)) continue;
    Account b = account;
    roll(b, now);  // as the next operation will see it: a period that has ended is gone
    auto slash = key.find('/');
    out.push_back({key.substr(0, slash), key.substr(slash + 1), b.limit, b.committed, b.held,
                   b.periodStartMs + b.periodMs, b.tripped});
    out.back().spent = b.spent;
  }
  return out;
}

}  // namespace tollgate
