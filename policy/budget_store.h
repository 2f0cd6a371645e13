// BudgetStore: effort and risk budgets of pools (DESIGN §5), charged before a call is sent.
// reserve() holds the call's estimated cost on every pool it is charged to, all or nothing;
// settle() commits at most what was held once the real cost is known (more is an overrun,
// which trips the pool); release() returns the hold of a call that was provably never
// sent. Every operation is idempotent by call id. A hold that outlives its TTL is
// committed, not refunded: the call may have run. Periods roll over by the store's clock.
//
// MemoryBudgetStore is the embedded, one-process backend; it refuses pools declared
// `scope: shared`, so that a local store is never mistaken for a shared one. The Redis
// backend (next) runs the same state machine in Redis Functions.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/result.h"
#include "policy/policy_set.h"

namespace tollgate {

// An amount charged to one pool. In settle(), a negative amount means "what was held", and so
// does a pool left out of the list (an empty list: every pool is charged what it held).
struct Charge {
  std::string pool;
  int64_t effort = 0;
  int64_t risk = 0;
};

enum class BudgetStatus {
  kOk,
  kExhausted,      // committed + held + amount would exceed a limit
  kTripped,        // the pool was tripped by an overrun in this period
  kUninitialised,  // the pool does not exist in the store (never created at zero spend)
  kUnavailable,    // the store cannot answer (fail closed)
  kUnknownCall,    // settle/release of a call with no hold (already settled, expired, never held)
};
const char* budgetStatusName(BudgetStatus s);

// A call id unique in this process: a short random prefix of the process and a counter, at
// most 15 characters (up to 2^36 calls), so it needs no allocation. Ids are the stores'
// idempotency keys; they never leave the process that made them (the memory store is one
// process's, and the Redis store keeps its calls itself: Redis sees per-worker holders).
std::string newCallId();
// A name unique among every sidecar that shares a pool, for a worker's holder record: a
// 64-bit random prefix of the process (drawn again in a forked child) and a counter.
std::string newHolderId();

// The ids of finished calls (settled, released, expired), so that a reserve of one is
// refused. The process's own ids (newCallId) are minted in rising order: one finished is a
// bit in a window of the 2^17 counters below the newest finished one (16 KB), an id newer
// than every finished one is known unfinished without a lookup, and one older than the
// window counts as finished (it was minted long before: no reserve of it is new). Other ids
// are kept by a 64-bit hash, the last 50 000 to 100 000, in two generations of a fixed
// open-addressing table each (2^17 slots). Nothing allocates per call.
class FinishedCalls {
 public:
  bool contains(const std::string& callId) const;
  void insert(const std::string& callId);

 private:
  static constexpr uint64_t kWindow = 1 << 17;
  static constexpr size_t kGeneration = 50'000;
  static constexpr size_t kMask = (1 << 17) - 1;
  struct Table {
    std::vector<uint64_t> slots;  // 0: empty (an id hashing to 0 is kept as 1)
    size_t count = 0;
    bool contains(uint64_t id) const;
    void insert(uint64_t id);
  };
  std::vector<uint64_t> recent_;  // own ids: kWindow bits, by counter % kWindow
  uint64_t newest_ = 0;           // 1 + the highest own counter finished (0: none yet)
  Table now_, before_;            // other ids
};

// The holds of calls that expired, the last kMax of them by call id: a settle that arrives
// after its call's hold expired (a response that outlived the hold's TTL) finds what was
// held, so that a real cost above it still trips the pool. The hold itself was committed.
template <typename T>
class RecentlyExpired {
 public:
  void add(const std::string& callId, T holds) {
    while (order_.size() >= kMax) {
      map_.erase(order_.front());
      order_.pop_front();
    }
    order_.push_back(callId);
    map_.insert_or_assign(callId, std::move(holds));
  }
  // What the call held, once: taken out.
  std::optional<T> take(const std::string& callId) {
    auto it = map_.find(callId);
    if (it == map_.end()) return std::nullopt;
    std::optional<T> out(std::move(it->second));
    map_.erase(it);
    return out;
  }

 private:
  static constexpr size_t kMax = 16384;
  std::deque<std::string> order_;
  std::unordered_map<std::string, T> map_;
};

struct BudgetOutcome {
  BudgetStatus status = BudgetStatus::kOk;
  std::string pool;     // the pool that refused
  std::string reason;   // for people
  int64_t overrun = 0;  // settle: cost above the hold, recorded and tripping the pool
  // Adds a cost above a hold (> 0), saturating: two costs of 19 digits do not wrap.
  void addOverrun(int64_t more) {
    overrun = overrun > INT64_MAX - more ? INT64_MAX : overrun + more;
  }
};

struct BudgetView {
  std::string pool;
  std::string dimension;  // "effort" or "risk"
  int64_t limit = 0, committed = 0, held = 0;
  int64_t periodEndMs = 0;
  bool tripped = false;
  bool initialised = true;  // false: missing from the store (halted until `pools init`)
  bool available = true;    // false: the store did not answer; the figures are unknown
  // What was committed over every period since the store started, when the store sees every
  // commit (the memory store); -1 when it does not (Redis: other sidecars commit too, and
  // expired holds are committed inside its scripts).
  int64_t spent = -1;
  int64_t remaining() const { return limit - committed - held; }
};

class BudgetStore {
 public:
  using Done = std::function<void(BudgetOutcome)>;
  virtual ~BudgetStore() = default;
  virtual void reserve(const std::string& callId, const std::vector<Charge>& charges,
                       std::chrono::milliseconds holdTtl, Done done) = 0;
  // `actual`: the call's charges (the same pools as reserved) with the real cost.
  virtual void settle(const std::string& callId, const std::vector<Charge>& actual, Done done) = 0;
  // `charges`: the pools reserved (a shared store finds the hold by them).
  virtual void release(const std::string& callId, const std::vector<Charge>& charges,
                       Done done) = 0;
  // The last known state of every pool; refresh() first for a fresh one.
  virtual std::vector<BudgetView> view() const = 0;
  virtual void refresh(std::function<void()> done) { done(); }
  // A worker loop starts (attach) or stops (detach, `done` once its handles are closed)
  // using the store on the calling thread.
  virtual void attach(uv_loop_t* /*loop*/) {}
  virtual void detach(std::function<void()> done) { done(); }
  // Shares a cascade quarantine with every sidecar on the store (a shared store only).
  virtual void shareQuarantine(const std::string& /*glob*/, std::chrono::milliseconds /*ttl*/) {}
  // Told of quarantines shared by other sidecars (and, once, by this one), on a worker thread.
  std::function<void(const std::string& glob, std::chrono::milliseconds ttl)> onSharedQuarantine;
  // Told the result and duration of every operation (from worker threads): for metrics.
  std::function<void(const std::string& op, BudgetStatus, double seconds)> observer;
  // Whether the set's pools can be declared, changing nothing: a reload checks it before it
  // archives the set, and declares only once nothing else can refuse it.
  virtual Status validate(const PolicySet& set) const = 0;
  // Makes the set's pools known after a reload (validate() first). The memory store creates
  // the new ones and lists only the set's; a shared store only checks (pools are initialised
  // on purpose).
  virtual Status declare(const PolicySet& set) = 0;
};

class MemoryBudgetStore : public BudgetStore {
 public:
  using Clock = std::function<int64_t()>;  // milliseconds
  // Declares the set's pools; a pool with `scope: shared` is refused.
  static Result<std::unique_ptr<MemoryBudgetStore>> create(const PolicySet& set,
                                                           Clock clock = nullptr);

  void reserve(const std::string& callId, const std::vector<Charge>& charges,
               std::chrono::milliseconds holdTtl, Done done) override;
  void settle(const std::string& callId, const std::vector<Charge>& actual, Done done) override;
  void release(const std::string& callId, const std::vector<Charge>& charges, Done done) override;
  std::vector<BudgetView> view() const override;
  Status validate(const PolicySet& set) const override;
  Status declare(const PolicySet& set) override;

  // Synchronous forms (the memory store answers at once).
  BudgetOutcome reserveNow(const std::string& callId, const std::vector<Charge>& charges,
                           std::chrono::milliseconds holdTtl);
  BudgetOutcome settleNow(const std::string& callId, const std::vector<Charge>& actual);
  BudgetOutcome releaseNow(const std::string& callId);

 private:
  struct Account {
    int64_t limit = 0;
    int64_t periodMs = 0;
    int64_t periodStartMs = 0;
    int64_t committed = 0;
    int64_t held = 0;
    int64_t spent = 0;  // committed over every period: committed resets at each roll
    bool tripped = false;
  };
  struct Hold {
    int64_t expiresMs = 0;
    std::vector<std::pair<std::string, int64_t>> amounts;  // budget key ("pool/effort") -> amount
  };
  explicit MemoryBudgetStore(Clock clock) : clock_(std::move(clock)) {}
  static void roll(Account& b, int64_t now);
  void expireHolds(int64_t now);

  Clock clock_;
  mutable std::mutex mutex_;
  std::map<std::string, Account> budgets_;  // "pool/effort", "pool/risk"
  std::set<std::string> declared_;          // the active set's budgets: what view() lists
  std::unordered_map<std::string, Hold> holds_;
  FinishedCalls done_;                // settled, released or expired: a late retry is refused
  RecentlyExpired<Hold> expired_;     // for settles that come after their hold expired
  int64_t nextExpiryMs_ = INT64_MAX;  // no hold expires before this
};

}  // namespace tollgate
