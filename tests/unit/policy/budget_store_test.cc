#include "policy/budget_store.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <random>
#include <set>

namespace tollgate {
namespace {

constexpr const char* kPools = R"(
apiVersion: tollgate/v1
kind: Policy
pools:
  - {name: team, effort: {limit: 100, period: 1h}, risk: {limit: 10, period: 1d}}
  - {name: other, effort: {limit: 5, period: 1h}}
)";

class MemoryBudgetStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    set = PolicySet::parse(kPools, "pools.yaml").value();
    store = std::move(MemoryBudgetStore::create(*set, [this] { return now; }).value());
  }
  const BudgetView& budget(const std::string& pool, const std::string& dim) {
    views = store->view();
    for (const auto& v : views) {
      if (v.pool == pool && v.dimension == dim) return v;
    }
    throw std::runtime_error("no such budget");
  }
  std::shared_ptr<const PolicySet> set;
  int64_t now = 1'767'225'600'000;  // 2026-01-01T00:00:00Z
  std::unique_ptr<MemoryBudgetStore> store;
  std::vector<BudgetView> views;
  const std::chrono::milliseconds ttl{30'000};
};

TEST_F(MemoryBudgetStoreTest, ReserveHoldsAndSettleCommitsAtMostTheHold) {
  EXPECT_EQ(store->reserveNow("c1", {{"team", 40, 2}}, ttl).status, BudgetStatus::kOk);
  EXPECT_EQ(budget("team", "effort").held, 40);
  EXPECT_EQ(budget("team", "risk").held, 2);
  auto settled = store->settleNow("c1", {{"team", 25, 1}});
  EXPECT_EQ(settled.status, BudgetStatus::kOk);
  EXPECT_EQ(budget("team", "effort").committed, 25);
  EXPECT_EQ(budget("team", "effort").held, 0);
  EXPECT_EQ(budget("team", "risk").committed, 1);
}

TEST_F(MemoryBudgetStoreTest, RefusesWithoutChangingAnythingWhenOnePoolIsShort) {
  ASSERT_EQ(store->reserveNow("c1", {{"other", 4, 0}}, ttl).status, BudgetStatus::kOk);
  auto r = store->reserveNow("c2", {{"team", 10, 0}, {"other", 2, 0}}, ttl);
  EXPECT_EQ(r.status, BudgetStatus::kExhausted);
  EXPECT_EQ(r.pool, "other");
  EXPECT_EQ(budget("team", "effort").held, 0);  // all or nothing
  EXPECT_EQ(budget("other", "effort").held, 4);
}

TEST_F(MemoryBudgetStoreTest, IdempotentByCallId) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  EXPECT_EQ(budget("team", "effort").held, 10);
  ASSERT_EQ(store->settleNow("c1", {{"team", 10, 0}}).status, BudgetStatus::kOk);
  EXPECT_EQ(store->settleNow("c1", {{"team", 10, 0}}).status, BudgetStatus::kUnknownCall);
  EXPECT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kUnknownCall);
  EXPECT_EQ(budget("team", "effort").committed, 10);  // charged once
}

TEST_F(MemoryBudgetStoreTest, ReleaseRefundsOnlyWhatWasNeverSent) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 30, 0}}, ttl).status, BudgetStatus::kOk);
  EXPECT_EQ(store->releaseNow("c1").status, BudgetStatus::kOk);
  EXPECT_EQ(budget("team", "effort").held, 0);
  EXPECT_EQ(budget("team", "effort").committed, 0);
  EXPECT_EQ(store->releaseNow("c1").status, BudgetStatus::kUnknownCall);
}

TEST_F(MemoryBudgetStoreTest, ExpiredHoldsAreCommittedNotRefunded) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 30, 0}}, ttl).status, BudgetStatus::kOk);
  now += 30'001;
  EXPECT_EQ(budget("team", "effort").held, 30);  // the view does not expire holds by itself
  EXPECT_EQ(store->settleNow("c1", {{"team", 1, 0}}).status, BudgetStatus::kUnknownCall);
  EXPECT_EQ(budget("team", "effort").committed, 30);
  EXPECT_EQ(budget("team", "effort").held, 0);
}

// A response that outlived its hold's TTL: the hold was committed at its expiry; a real
// cost above it, named by the late settle, still trips the pool.
TEST_F(MemoryBudgetStoreTest, ALateSettleAboveTheExpiredHoldTripsThePool) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->reserveNow("c2", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  now += 30'001;
  EXPECT_EQ(store->settleNow("c1", {{"team", 4, 0}}).status, BudgetStatus::kUnknownCall);
  EXPECT_FALSE(budget("team", "effort").tripped);
  auto late = store->settleNow("c2", {{"team", 25, 0}});
  EXPECT_EQ(late.status, BudgetStatus::kOk);
  EXPECT_EQ(late.overrun, 15);
  EXPECT_EQ(late.pool, "team");
  EXPECT_EQ(budget("team", "effort").committed, 20);  // the holds, committed at their expiry
  EXPECT_TRUE(budget("team", "effort").tripped);
  EXPECT_EQ(store->settleNow("c2", {{"team", 25, 0}}).status, BudgetStatus::kUnknownCall);
}

TEST_F(MemoryBudgetStoreTest, OverrunIsRecordedAndTripsThePool) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  auto s = store->settleNow("c1", {{"team", 25, 0}});
  EXPECT_EQ(s.overrun, 15);
  EXPECT_EQ(budget("team", "effort").committed, 10);
  EXPECT_TRUE(budget("team", "effort").tripped);
  EXPECT_EQ(store->reserveNow("c2", {{"team", 1, 0}}, ttl).status, BudgetStatus::kTripped);
  now += 3'600'000;  // the next period clears the trip and the spend
  EXPECT_EQ(store->reserveNow("c3", {{"team", 1, 0}}, ttl).status, BudgetStatus::kOk);
}

// Real costs of 19 digits in both dimensions: the overrun saturates instead of wrapping to
// a negative sum (which a late settle took for "no overrun"), and the pool trips.
TEST_F(MemoryBudgetStoreTest, HugeOverrunsInBothDimensionsSaturate) {
  constexpr int64_t kHuge = INT64_MAX;
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 2}}, ttl).status, BudgetStatus::kOk);
  auto s = store->settleNow("c1", {{"team", kHuge, kHuge}});
  EXPECT_EQ(s.overrun, kHuge);
  EXPECT_TRUE(budget("team", "effort").tripped);
  now += 24 * 3'600'000;  // both periods over: a fresh pool
  ASSERT_EQ(store->reserveNow("c2", {{"team", 10, 2}}, ttl).status, BudgetStatus::kOk);
  now += 30'001;  // its hold expires and is committed; the response comes after
  auto late = store->settleNow("c2", {{"team", kHuge, kHuge}});
  EXPECT_EQ(late.status, BudgetStatus::kOk);
  EXPECT_EQ(late.overrun, kHuge);
  EXPECT_TRUE(budget("team", "risk").tripped);
}

// A trip counts on the dimensions the policy has: a pool whose tripped dimension a reload
// removed is not halted by it (the Redis store never rolled such a flag, and halted the pool
// for good), and the other way round alike.
TEST_F(MemoryBudgetStoreTest, ATripOnADimensionTheReloadRemovedHaltsNothing) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 1}}, ttl).status, BudgetStatus::kOk);
  ASSERT_GT(store->settleNow("c1", {{"team", 25, 1}}).overrun, 0);  // effort trips
  EXPECT_EQ(store->reserveNow("c2", {{"team", 0, 1}}, ttl).status, BudgetStatus::kTripped);
  auto riskOnly = PolicySet::parse(R"(
apiVersion: tollgate/v1
kind: Policy
pools:
  - {name: team, risk: {limit: 10, period: 1d}}
)",
                                   "pools.yaml")
                      .value();
  ASSERT_TRUE(store->declare(*riskOnly));
  EXPECT_EQ(store->reserveNow("c3", {{"team", 0, 1}}, ttl).status, BudgetStatus::kOk);
  ASSERT_TRUE(store->declare(*set));  // effort back, still tripped this period
  EXPECT_EQ(store->reserveNow("c4", {{"team", 0, 1}}, ttl).status, BudgetStatus::kTripped);
}

// A reload that changes a period's length after the old period ended: that period's spend
// and trip end with it, not carried into the new one (a pool tripped at 09:10 of an hourly
// period, reloaded at 11:00 as daily, stayed halted until midnight).
TEST_F(MemoryBudgetStoreTest, ANewPeriodLengthEndsAnOldPeriodThatEnded) {
  ASSERT_EQ(store->reserveNow("c1", {{"other", 2, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_GT(store->settleNow("c1", {{"other", 4, 0}}).overrun, 0);
  now += 2 * 3'600'000;  // the hourly period ended; nothing ran since
  auto daily = PolicySet::parse(R"(
apiVersion: tollgate/v1
kind: Policy
pools:
  - {name: team, effort: {limit: 100, period: 1h}, risk: {limit: 10, period: 1d}}
  - {name: other, effort: {limit: 5, period: 1d}}
)",
                                "pools.yaml")
                   .value();
  ASSERT_TRUE(store->declare(*daily));
  EXPECT_FALSE(budget("other", "effort").tripped);
  EXPECT_EQ(budget("other", "effort").committed, 0);
  EXPECT_EQ(store->reserveNow("c2", {{"other", 5, 0}}, ttl).status, BudgetStatus::kOk);
}

TEST_F(MemoryBudgetStoreTest, PeriodsRollOnTheirBoundaries) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 100, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->settleNow("c1", {}).status, BudgetStatus::kOk);
  EXPECT_EQ(store->reserveNow("c2", {{"team", 1, 0}}, ttl).status, BudgetStatus::kExhausted);
  now += 3'600'000;
  EXPECT_EQ(store->reserveNow("c3", {{"team", 100, 0}}, ttl).status, BudgetStatus::kOk);
}

// A call reserved in one period and settled in the next is paid for in the next: its
// settle, its overrun's trip and an expired hold are committed after the roll, never into
// the period that has ended (whose roll would drop them).
TEST_F(MemoryBudgetStoreTest, WhatIsSettledAfterAPeriodsEndCountsInTheNewPeriod) {
  now += 3'600'000 - 1'000;  // a second before the hour
  ASSERT_EQ(store->reserveNow("c1", {{"team", 10, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->reserveNow("c2", {{"team", 5, 1}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->reserveNow("c3", {{"team", 6, 0}}, std::chrono::milliseconds(500)).status,
            BudgetStatus::kOk);
  ASSERT_EQ(store->reserveNow("c4", {{"team", 60, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->settleNow("c4", {}).status, BudgetStatus::kOk);  // spent in the first hour
  now += 2'000;
  EXPECT_EQ(store->settleNow("c1", {{"team", 8, -1}}).status, BudgetStatus::kOk);
  EXPECT_EQ(store->settleNow("c2", {{"team", 9, -1}}).overrun, 4);
  EXPECT_EQ(budget("team", "effort").committed, 8 + 5 + 6);
  EXPECT_EQ(budget("team", "effort").held, 0);
  // What the first hour committed is still in the spend across periods (the drain rate).
  EXPECT_EQ(budget("team", "effort").spent, 60 + 8 + 5 + 6);
  EXPECT_EQ(budget("team", "risk").spent, 1);
  EXPECT_TRUE(budget("team", "effort").tripped);
  // The trip was on effort; a call that asks only risk is refused too: the pool tripped.
  EXPECT_EQ(store->reserveNow("c5", {{"team", 0, 1}}, ttl).status, BudgetStatus::kTripped);
}

TEST_F(MemoryBudgetStoreTest, TheViewShowsTheCurrentPeriod) {
  ASSERT_EQ(store->reserveNow("c1", {{"team", 30, 0}}, ttl).status, BudgetStatus::kOk);
  ASSERT_EQ(store->settleNow("c1", {}).status, BudgetStatus::kOk);
  int64_t end = budget("team", "effort").periodEndMs;
  now = end;
  EXPECT_EQ(budget("team", "effort").committed, 0);
  EXPECT_EQ(budget("team", "effort").periodEndMs, end + 3'600'000);
}

TEST_F(MemoryBudgetStoreTest, UnknownPoolsAreUninitialisedNotZero) {
  auto r = store->reserveNow("c1", {{"ghost", 1, 0}}, ttl);
  EXPECT_EQ(r.status, BudgetStatus::kUninitialised);
  EXPECT_EQ(r.pool, "ghost");
}

// Call ids are the stores' idempotency keys within the process that made them: unique there,
// and short enough to need no allocation per call.
TEST(CallIds, AreUniqueInAProcessAndShort) {
  std::set<std::string> ids;
  for (int i = 0; i < 100000; ++i) ids.insert(newCallId());
  EXPECT_EQ(ids.size(), 100000u);
  std::string id = newCallId();
  EXPECT_LE(id.size(), 15u) << id;
  EXPECT_EQ(id.find('-'), 4u) << id;
}

// Finished call ids are remembered for 50 000 to 100 000 calls after them, then forgotten
// (bounded memory); an id never finished is never taken for one.
TEST(FinishedCalls, RemembersTheLastGenerationsAndNothingElse) {
  FinishedCalls done;
  for (int i = 0; i < 120000; ++i) done.insert("f" + std::to_string(i));
  for (int i = 100000; i < 120000; ++i) ASSERT_TRUE(done.contains("f" + std::to_string(i))) << i;
  EXPECT_TRUE(done.contains("f60000"));
  EXPECT_FALSE(done.contains("f10"));  // two generations ago
  for (int i = 0; i < 100000; ++i) ASSERT_FALSE(done.contains("n" + std::to_string(i))) << i;
}

// The process's own ids are minted in rising order: a finished one is remembered in a window
// of 2^17 ids below the newest finished one, one newer than every finished one is not
// finished, and one minted before the window counts as finished.
TEST(FinishedCalls, KnowsTheProcesssOwnIdsByTheirOrder) {
  FinishedCalls done;
  std::string a = newCallId(), b = newCallId(), c = newCallId();
  EXPECT_FALSE(done.contains(a));
  done.insert(b);
  EXPECT_TRUE(done.contains(b));
  EXPECT_FALSE(done.contains(a));  // older, not finished
  EXPECT_FALSE(done.contains(c));  // newer than every finished one
  done.insert(a);
  EXPECT_TRUE(done.contains(a));
  std::vector<std::string> later;
  for (int i = 0; i < 140000; ++i) later.push_back(newCallId());
  done.insert(later[5]);
  done.insert(later[70000]);
  EXPECT_FALSE(done.contains(later[69999]));
  EXPECT_FALSE(done.contains(c));  // still in the window
  done.insert(later.back());       // the window moves past a, b and c
  EXPECT_TRUE(done.contains(c));   // minted too long before: no reserve of it is new
  EXPECT_TRUE(done.contains(later[70000]));
  EXPECT_FALSE(done.contains(later[139998]));
  // The bits the window took in were cleared: its old ids do not show through.
  done.insert(later[139998]);
  EXPECT_FALSE(done.contains(later[139997]));
  EXPECT_FALSE(done.contains(later[100000]));
  EXPECT_FALSE(done.contains(later[131077]));  // where later[5]'s bit was
}

// Holder names tell the workers of every sidecar on a pool apart: each process (a forked
// one too) draws its own random prefix.
TEST(HolderIds, AreUniqueInAProcessAndAcrossProcesses) {
  std::set<std::string> ids;
  for (int i = 0; i < 1000; ++i) ids.insert(newHolderId());
  EXPECT_EQ(ids.size(), 1000u);
  std::string mine = newHolderId();
  ASSERT_EQ(mine.find('-'), 16u) << mine;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t child = ::fork();
  if (child == 0) {
    std::string id = newHolderId();
    ssize_t n = ::write(fds[1], id.data(), id.size());
    ::_exit(n == static_cast<ssize_t>(id.size()) ? 0 : 1);
  }
  ::close(fds[1]);
  char buf[64] = {};
  ssize_t n = ::read(fds[0], buf, sizeof buf - 1);
  ::close(fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_GT(n, 17) << "no id from the child";
  std::string theirs(buf, static_cast<size_t>(n));
  EXPECT_NE(theirs.substr(0, 17), mine.substr(0, 17)) << theirs << " vs " << mine;
}

TEST(MemoryBudgetStore, RefusesSharedPools) {
  auto set = PolicySet::parse(R"(
apiVersion: tollgate/v1
kind: Policy
pools: [{name: swarm, scope: shared, effort: {limit: 10, period: 1h}}]
)",
                              "shared.yaml")
                 .value();
  auto store = MemoryBudgetStore::create(*set);
  ASSERT_FALSE(store);
  EXPECT_NE(store.error().message.find("scope: shared"), std::string::npos);
  EXPECT_EQ(store.error().message.rfind("shared.yaml:4:", 0), 0u) << store.error().message;
}

// Random reserves, settles and releases (5 000 of them): committed + held
// never exceeds the limit, and committed is exactly what the settled calls cost.
TEST_F(MemoryBudgetStoreTest, NeverOverspendsUnderRandomOperations) {
  std::mt19937 rng(7);
  std::vector<std::pair<std::string, int64_t>> open;
  int64_t expectedCommitted = 0;
  int refused = 0;
  for (int i = 0; i < 5000; ++i) {
    int op = static_cast<int>(rng() % 3);
    if (op == 0 || open.empty()) {
      int64_t amount = 1 + static_cast<int64_t>(rng() % 20);
      std::string id = "c" + std::to_string(i);
      if (store->reserveNow(id, {{"team", amount, 0}}, ttl).status == BudgetStatus::kOk) {
        open.emplace_back(id, amount);
      } else {
        ++refused;
      }
    } else {
      size_t k = rng() % open.size();
      auto [id, held] = open[k];
      open.erase(open.begin() + static_cast<std::ptrdiff_t>(k));
      if (op == 1) {
        int64_t cost =
            static_cast<int64_t>(rng() % static_cast<uint64_t>(held + 1));  // at most the hold
        ASSERT_EQ(store->settleNow(id, {{"team", cost, 0}}).status, BudgetStatus::kOk);
        expectedCommitted += std::min(cost, held);
      } else {
        ASSERT_EQ(store->releaseNow(id).status, BudgetStatus::kOk);
      }
    }
    const auto& b = budget("team", "effort");
    ASSERT_LE(b.committed + b.held, b.limit);
    ASSERT_EQ(b.committed, expectedCommitted) << "at operation " << i;
    ASSERT_FALSE(b.tripped);
  }
  EXPECT_GT(refused, 100);  // the limit was reached again and again
}

}  // namespace
}  // namespace tollgate
