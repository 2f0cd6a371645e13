// Metrics: the budget pools' series as /metrics renders them from the store's view, across
// reloads (a pool that goes away takes its series with it) and store outages.
#include "proxy/metrics.h"

#include <gtest/gtest.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace tollgate {
namespace {

BudgetView budget(std::string pool, std::string dimension, int64_t limit, int64_t committed,
                  int64_t held) {
  BudgetView v;
  v.pool = std::move(pool);
  v.dimension = std::move(dimension);
  v.limit = limit;
  v.committed = committed;
  v.held = held;
  v.periodEndMs = 3'600'000;
  return v;
}

// The value of one series as rendered, e.g. value(m, "tollgate_pool_held", "team", "effort").
std::optional<double> value(const Metrics& m, const std::string& name, const std::string& pool,
                            const std::string& dimension) {
  std::string series = name + "{dimension=\"" + dimension + "\",pool=\"" + pool + "\"} ";
  std::istringstream text(m.render());
  for (std::string line; std::getline(text, line);) {
    if (line.starts_with(series)) return std::stod(line.substr(series.size()));
  }
  return std::nullopt;
}

TEST(MetricsPoolsTest, ShowsWhatTheViewShows) {
  Metrics m;
  auto effort = budget("team", "effort", 10, 6, 1);
  effort.tripped = true;
  auto risk = budget("team", "risk", 100, 0, 0);
  risk.initialised = false;
  m.setPools({effort, risk});
  EXPECT_EQ(value(m, "tollgate_pool_limit", "team", "effort"), 10);
  EXPECT_EQ(value(m, "tollgate_pool_committed", "team", "effort"), 6);
  EXPECT_EQ(value(m, "tollgate_pool_held", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_remaining", "team", "effort"), 3);
  EXPECT_EQ(value(m, "tollgate_pool_available", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_tripped", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_initialised", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_tripped", "team", "risk"), 0);
  EXPECT_EQ(value(m, "tollgate_pool_initialised", "team", "risk"), 0);
}

// A reload that renames a pool, or drops one of its budgets: the old series are gone, not
// frozen at their last figures.
TEST(MetricsPoolsTest, ABudgetNoLongerInTheViewLosesItsSeries) {
  Metrics m;
  m.setPools({budget("team", "effort", 10, 6, 0), budget("team", "risk", 100, 2, 0)});
  m.setPools({budget("crew", "effort", 10, 0, 0)});
  for (const char* name : {"tollgate_pool_limit", "tollgate_pool_committed", "tollgate_pool_held",
                           "tollgate_pool_remaining", "tollgate_pool_available",
                           "tollgate_pool_tripped", "tollgate_pool_initialised"}) {
    EXPECT_EQ(value(m, name, "team", "effort"), std::nullopt) << name;
    EXPECT_EQ(value(m, name, "team", "risk"), std::nullopt) << name;
    EXPECT_TRUE(value(m, name, "crew", "effort").has_value()) << name;
  }
  // Back again: series anew.
  m.setPools({budget("team", "effort", 10, 7, 0)});
  EXPECT_EQ(value(m, "tollgate_pool_committed", "team", "effort"), 7);
  EXPECT_EQ(value(m, "tollgate_pool_limit", "crew", "effort"), std::nullopt);
}

// The store did not answer: pool_available says so, and the figures stay the last answer's
// (the view's zeros are unknowns); a budget never answered for has no figures yet.
TEST(MetricsPoolsTest, AStoreThatDoesNotAnswerShowsAsUnavailable) {
  Metrics m;
  m.setPools({budget("team", "effort", 10, 6, 1)});
  auto down = budget("team", "effort", 10, 0, 0);
  down.available = false;
  down.initialised = false;
  auto neverSeen = budget("crew", "effort", 5, 0, 0);
  neverSeen.available = false;
  m.setPools({down, neverSeen});
  EXPECT_EQ(value(m, "tollgate_pool_available", "team", "effort"), 0);
  EXPECT_EQ(value(m, "tollgate_pool_committed", "team", "effort"), 6);
  EXPECT_EQ(value(m, "tollgate_pool_remaining", "team", "effort"), 3);
  EXPECT_EQ(value(m, "tollgate_pool_initialised", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_available", "crew", "effort"), 0);
  EXPECT_EQ(value(m, "tollgate_pool_committed", "crew", "effort"), std::nullopt);
  m.setPools({budget("team", "effort", 10, 8, 0)});
  EXPECT_EQ(value(m, "tollgate_pool_available", "team", "effort"), 1);
  EXPECT_EQ(value(m, "tollgate_pool_committed", "team", "effort"), 8);
}

// The memory store counts every commit (spent): the counter is that count, across the
// periods, from the first scrape on.
TEST(MetricsPoolsTest, SpentIsTheStoresOwnCountWhenItHasOne) {
  Metrics m;
  auto v = budget("team", "effort", 10, 8, 0);
  v.spent = 8;
  m.setPools({v});
  EXPECT_EQ(value(m, "tollgate_pool_spent_total", "team", "effort"), 8);
  v.committed = 3;  // a new period: committed started again
  v.periodEndMs += 3'600'000;
  v.spent = 11;
  m.setPools({v});
  EXPECT_EQ(value(m, "tollgate_pool_spent_total", "team", "effort"), 11);
}

// Redis: no count of its own (other sidecars commit too), so the counter adds the rise of
// committed between scrapes; a new period or a reset starts from zero again.
TEST(MetricsPoolsTest, SpentFollowsCommittedAcrossPeriodsAndResets) {
  Metrics m;
  auto spent = [&] { return value(m, "tollgate_pool_spent_total", "team", "effort"); };
  auto v = budget("team", "effort", 100, 5, 0);
  m.setPools({v});
  EXPECT_EQ(spent(), 0);  // spent before this process looked: a base, not news
  v.committed = 9;
  m.setPools({v});
  EXPECT_EQ(spent(), 4);
  v.committed = 3;  // rolled over: what the new period has is new
  v.periodEndMs += 3'600'000;
  m.setPools({v});
  EXPECT_EQ(spent(), 7);
  auto down = v;
  down.available = false;
  down.committed = 0;
  m.setPools({down});  // nothing known: nothing counted, the base kept
  EXPECT_EQ(spent(), 7);
  v.committed = 6;
  m.setPools({v});
  EXPECT_EQ(spent(), 10);
  v.committed = 1;  // reset within the period (`pools init --reset`)
  m.setPools({v});
  EXPECT_EQ(spent(), 11);
  auto missing = v;  // flushed: nothing spent until it is initialised again
  missing.initialised = false;
  missing.committed = 0;
  m.setPools({missing});
  EXPECT_EQ(spent(), 11);
  v.committed = 2;
  m.setPools({v});
  EXPECT_EQ(spent(), 13);
}

// Breakers are swept from the engine when idle (agents choose the ports and names): their
// series go with them, or each upstream an agent made up would stay in /metrics for good.
TEST(MetricsBreakersTest, ABreakerTheEngineNoLongerListsLosesItsSeries) {
  Metrics m;
  auto series = [&](const std::string& upstream) -> std::optional<double> {
    std::string prefix = "tollgate_breaker_state{upstream=\"" + upstream + "\"} ";
    std::istringstream text(m.render());
    for (std::string line; std::getline(text, line);) {
      if (line.starts_with(prefix)) return std::stod(line.substr(prefix.size()));
    }
    return std::nullopt;
  };
  m.setBreakers({{"pay.internal:1", 0}, {"pay.internal:2", 2}});
  EXPECT_EQ(series("pay.internal:1"), 0);
  EXPECT_EQ(series("pay.internal:2"), 2);
  m.setBreakers({{"pay.internal:2", 1}});
  EXPECT_EQ(series("pay.internal:1"), std::nullopt);
  EXPECT_EQ(series("pay.internal:2"), 1);
}

}  // namespace
}  // namespace tollgate
