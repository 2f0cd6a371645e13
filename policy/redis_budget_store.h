// RedisBudgetStore: the shared backend of BudgetStore (DESIGN §5). Every operation goes in a
// Lua script run atomically by Redis on the keys of one pool, which share the hash tag
// `{pool}` so that the script also runs on Redis Cluster:
//   tollgate:{P}:b  hash: <dim>:committed, :held, :period, :start, :tripped; `created` (the
//                   budget's epoch); and per holder (a worker of a sidecar) `L:<holder>` =
//                   "effort:risk:expiry:fence:last:applied", what it holds and until when
//   tollgate:{P}:h  hash: call id -> "effort:risk:expiry", the holds of releases up to
//                   4d1b2b4 (one per call; their sidecars may still run during an upgrade)
//   tollgate:{P}:x  sorted set: the expiry of holds written as "effort:risk" before 2026-11-29
//   tollgate:{P}:d, :m, :n  the settled call ids of older releases (created at init for
//                   them; never read here)
// (`h`, `x`, `d`, `m` and `n` hold a sentinel member `_`, so that the keys always exist.)
//
// A sidecar's worker keeps its calls itself: Redis sees a reserve as amounts to check and add
// to the holder's record, and a finish (settle, release, expiry) as amounts to move from the
// record to `committed`, never a call id. A call id is minted by one sidecar and operated on
// by it alone, so idempotency (a call reserved twice is charged once; a finished call is
// never reserved again) is kept where the id is. The worker commits its calls' expired holds
// itself; a holder's record expires when its last hold does, and a stopped sidecar's
// records are committed by the next batch of any sidecar (at most once a second) or a view.
// A batch whose answer is lost (a timeout, a dropped connection, an error) may or may not
// have run: the next batch on its pools carries a sync, which sets the record to what the
// worker knows it holds, commits what the lost batches committed unless the record's
// `applied` says they ran, and fences older batches off. A pool whose `b` hash is missing
// (never initialised, flushed, restarted without persistence) is never recreated by a
// call: calls are refused as budget_uninitialised until `tollgate pools init` (initPools)
// creates it, or the config says `init_missing: true`; the holds of a budget flushed or
// reset go with it.
//
// Each worker loop has its own RedisClient and holder (attach/detach); the limits and
// periods come from the policy set (declare), the spend from Redis.
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
    RedisAuth auth;
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
  Status validate(const PolicySet& set) const override;
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
  static Result<std::vector<InitResult>> initSpecs(const std::vector<PoolSpec>& specs,
                                                   const Options& options, bool reset);
  struct PerLoop;
  struct Batch;
  struct BatchOp;
  struct Holder;
  struct Call;
  struct Subscriber;

  explicit RedisBudgetStore(Options options) : options_(std::move(options)) {}
  PerLoop* local() const;
  Batch* batchFor(PerLoop* l, const std::vector<Charge>& pools, std::string* key,
                  BudgetOutcome* refusal);
  void enqueue(PerLoop* l, Batch& batch, std::string spec, BatchOp op);
  void finish(PerLoop* l, char kind, const std::string& callId, const std::vector<Charge>* actual,
              Done done);
  void settleLate(PerLoop* l, const std::string& callId, const Call& call,
                  const std::vector<Charge>& actual, Done done);
  static void remember(PerLoop* l, const std::string& callId);
  void expireCalls(PerLoop* l);
  void armExpiry(PerLoop* l);
  void syncDirty(PerLoop* l);
  // Sends the waiting batches (force: even those that wait for an answer; empty: those with
  // no operations, a sync alone).
  void flush(PerLoop* l, bool force = false, bool write = true, bool empty = false);
  void flushOnce(PerLoop* l, bool force, bool write, bool empty);
  void send(PerLoop* l, const std::string& key, Batch batch);
  void answer(PerLoop* l, const std::string& key, Batch& batch, const Result<RedisReply>& r);
  std::shared_ptr<const std::vector<PoolSpec>> specs() const;
  static Result<std::vector<PoolSpec>> specsOf(const PolicySet& set);
  // The keys and arguments of a one-pool init or view call of the script.
  static std::pair<std::vector<std::string>, std::vector<std::string>> poolCall(
      const char* op, const char* mode, const PoolSpec& spec);

  Options options_;
  mutable std::mutex mutex_;
  std::shared_ptr<const std::vector<PoolSpec>> specs_;
  std::vector<BudgetView> cache_;          // the last view read from Redis
  std::atomic<uint64_t> specsVersion_{0};  // bumped by each declare()
  std::atomic<bool> subscribed_{false};
};

}  // namespace tollgate
