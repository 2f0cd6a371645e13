// RedisBudgetStore: the shared backend of BudgetStore (DESIGN §5). Every operation is one
// Lua script run atomically by Redis on the keys of one pool, which share the hash tag
// `{pool}` so that the script also runs on Redis Cluster:
//   tollgate:{P}:b  hash: <dim>:committed, :held, :period, :start, :tripped; `created`
//   tollgate:{P}:h  hash: call id -> "effort:risk:expiry" held (expiry: ms, Redis time)
//   tollgate:{P}:x  sorted set: the expiry of holds written as "effort:risk" by releases
//                   before 2026-11-29 (their sidecars may still run during an upgrade)
//   tollgate:{P}:m  hash: settled, released or expired call ids; at 50 000 it becomes
//   tollgate:{P}:n  (the generation before, dropped then): 50 000 to 100 000 remembered
//   tollgate:{P}:d  sorted set: the settled call ids of releases before 2026-11-30 (never
//                   read here: a call id is operated on by the sidecar that minted it)
// (`h`, `x`, `d`, `m` and `n` hold a sentinel member `_`, so that the keys always exist;
// h's is longer than a listpack takes, so that h is a hash table, not a list scanned.) A
// batch commits the expired holds of its own calls first, and looks for other expired
// holds at most once a second (the `swept` field of `b`), so that no index of expiries has
// to be kept per call; the view commits them all.
// The script runs the same state machine as MemoryBudgetStore, on Redis's clock. A pool
// whose `b` hash is missing (never initialised, flushed, restarted without persistence) is
// never recreated by a call: calls are refused as budget_uninitialised until `tollgate pools
// init` (initPools) creates it, or the config says `init_missing: true`.
//
// Each worker loop has its own RedisClient (attach/detach); the limits and periods come from
// the policy set (declare), the spend from Redis. A settle or release that finds the store
// unavailable is retried when the store answers again (bounded); a reserve that timed out is
// released then, since its call was halted and never sent.
#pragma once

#include <uv.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/result.h"
#include "policy/budget_store.h"
#include "policy/redis_client.h"

namespace tollgate {

class RedisBudgetStore : public BudgetStore {
 public:
  struct Options {
    std::vector<HostPort> seeds;
    std::chrono::milliseconds timeout{100};
    bool initMissing = false;  // create pools missing at start (store.init_missing)
  };
  static Result<std::unique_ptr<RedisBudgetStore>> create(const PolicySet& set, Options options);
  ~RedisBudgetStore() override;

  void reserve(const std::string& callId, const std::vector<Charge>& charges,
               std::chrono::milliseconds holdTtl, Done done) override;
  void settle(const std::string& callId, const std::vector<Charge>& actual, Done done) override;
  void release(const std::string& callId, const std::vector<Charge>& charges, Done done) override;
  std::vector<BudgetView> view() const override;
  void refresh(std::function<void()> done) override;
  Status declare(const PolicySet& set) override;
  void attach(uv_loop_t* loop) override;
  void shareQuarantine(const std::string& glob, std::chrono::milliseconds ttl) override;
  void detach(std::function<void()> done) override;

  struct InitResult {
    std::string pool;
    bool created = false;  // false: it existed and was kept
  };
  // Creates the set's pools that are missing from Redis (all of them with reset), with zero
  // spend, on a private loop; blocks until done. For `tollgate pools init` and init_missing.
  static Result<std::vector<InitResult>> initPools(const PolicySet& set, const Options& options,
                                                   bool reset);

 private:
  struct PoolSpec {
    std::string name;
    int64_t effortLimit = -1, effortPeriodMs = 0;  // limit -1: the pool has no such budget
    int64_t riskLimit = -1, riskPeriodMs = 0;
    bool failOpen = false;
    uint16_t slot = 0;  // its keys' Redis Cluster slot
  };
  struct Retry {
    bool settle;  // else release
    std::string callId;
    std::vector<Charge> charges;
  };
  struct PerLoop;
  struct Batch;
  struct BatchOp;
  struct Subscriber;

  explicit RedisBudgetStore(Options options) : options_(std::move(options)) {}
  PerLoop* local() const;
  void run(const char* op, const std::string& callId, const std::vector<Charge>& charges,
           int64_t ttlMs, Done done);
  void flush(PerLoop* l, bool force = false, bool write = true);
  void send(PerLoop* l, const std::string& key, Batch batch);
  void answer(PerLoop* l, const std::string& key, std::vector<BatchOp>& ops,
              const Result<RedisReply>& r);
  void retryLater(PerLoop* l, Retry retry);
  void flushRetries(PerLoop* l);
  std::shared_ptr<const std::vector<PoolSpec>> specs() const;
  static Result<std::vector<PoolSpec>> specsOf(const PolicySet& set);
  // The keys and arguments of a one-pool init or view call of the script.
  static std::pair<std::vector<std::string>, std::vector<std::string>> poolCall(
      const char* op, const char* mode, const PoolSpec& spec);

  Options options_;
  mutable std::mutex mutex_;
  std::shared_ptr<const std::vector<PoolSpec>> specs_;
  std::vector<BudgetView> cache_;  // the last view read from Redis
  std::atomic<bool> subscribed_{false};
};

}  // namespace tollgate
