// Replay of one recorded call: the same decision, a different one under a changed set,
// and what cannot be replayed (state, a body, no set).
#include "policy/replay.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "audit/policy_archive.h"

namespace tollgate {
namespace {

constexpr const char* kPolicy = R"(
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: kb.read, match: {host: kb.internal, methods: [GET]}, class: read}
  - {name: kb.write, match: {host: kb.internal, methods: [POST]}, class: write}
  - {name: pay, match: {host: pay.internal, methods: [POST]}, class: write}
rules:
  - {id: reads, effect: allow, match: {class: read}}
  - {id: ban, effect: halt, match: {agent: "a-bad"}}
  - {id: writes, effect: allow, match: {tool: kb.write}}
  - {id: no-writes-after-failures, effect: halt, match: {tool: kb.write}, when: {agent.failures: {gte: 2, within: 1m}}}
  - {id: refunds, effect: allow, match: {tool: pay}, when: {params.amount: {lte: 200}}}
)";

RecordedCall recorded(std::string agent, std::string method, std::string authority,
                      std::string decision, std::string rule) {
  RecordedCall c;
  c.seq = 7;
  c.tsNs = 1'767'225'600'000'000'000;
  c.agent = std::move(agent);
  c.method = std::move(method);
  c.authority = std::move(authority);
  c.path = "/x";
  c.decision = std::move(decision);
  c.rule = std::move(rule);
  return c;
}

class ReplayTest : public ::testing::Test {
 protected:
  void SetUp() override { set = PolicySet::parse(kPolicy, "p.yaml").value(); }
  std::shared_ptr<const PolicySet> set;
};

TEST_F(ReplayTest, TheSameDecisionDoesNotDiffer) {
  // Each replayed (a call skipped as not replayable does not differ either) to the same
  // decision and rule.
  auto same = [&](const RecordedCall& call, const char* decision, const char* rule) {
    auto r = replayCall(call, set.get());
    EXPECT_TRUE(r.replayable) << r.whyNot;
    EXPECT_FALSE(r.differs) << r.decision << " " << r.rule;
    EXPECT_EQ(r.decision, decision);
    EXPECT_EQ(r.rule, rule);
  };
  same(recorded("a-1", "GET", "kb.internal:80", "allow", "reads"), "allow", "reads");
  same(recorded("a-bad", "GET", "kb.internal:80", "halt", "ban"), "halt", "ban");
  // Shadow mode records observe-halt: the same decision.
  same(recorded("a-bad", "GET", "kb.internal:80", "observe-halt", "ban"), "halt", "ban");
  same(recorded("a-1", "GET", "other.internal:443", "halt", "default-deny"), "halt",
       "default-deny");
}

TEST_F(ReplayTest, AChangedSetDiffers) {
  auto r = replayCall(recorded("a-bad", "GET", "kb.internal:80", "allow", "reads"), set.get());
  EXPECT_TRUE(r.replayable);
  EXPECT_TRUE(r.differs);
  EXPECT_EQ(r.decision, "halt");
  EXPECT_EQ(r.rule, "ban");
}

TEST_F(ReplayTest, StateBodiesAndMissingSetsAreNotReplayable) {
  EXPECT_EQ(
      replayCall(recorded("a-1", "GET", "kb.internal:80", "halt", "budget"), set.get()).whyNot,
      "budget pool (stateful)");
  EXPECT_EQ(
      replayCall(recorded("a-1", "GET", "kb.internal:80", "throttle", "reads"), set.get()).whyNot,
      "rate limit (stateful)");
  // Halted because the agent asked for too many approvals: a fresh engine would ask again.
  EXPECT_EQ(
      replayCall(recorded("a-1", "GET", "kb.internal:80", "halt", "approval_limit"), set.get())
          .whyNot,
      "approval limit (stateful)");
  EXPECT_FALSE(
      replayCall(recorded("a-1", "GET", "kb.internal:80", "halt", "http.bad_request"), set.get())
          .replayable);
  // The failure counter's halt cannot be reproduced by a fresh engine.
  auto r = replayCall(recorded("a-1", "POST", "kb.internal:80", "halt", "no-writes-after-failures"),
                      set.get());
  EXPECT_FALSE(r.replayable);
  EXPECT_EQ(r.whyNot, "agent failure counter (stateful)");
  r = replayCall(recorded("a-1", "POST", "pay.internal:443", "allow", "refunds"), set.get());
  EXPECT_EQ(r.whyNot, "needed a body the record does not carry");
  r = replayCall(recorded("a-1", "GET", "kb.internal:80", "allow", "reads"), nullptr,
                 "archive missing");
  EXPECT_EQ(r.whyNot, "archive missing");
  r = replayCall(recorded("a-1", "GET", "", "allow", "reads"), set.get());
  EXPECT_FALSE(r.replayable);
}

// What the proxy decided by itself, and a body it could not read, are not replayed: with
// the same policy they would be listed as differences.
TEST_F(ReplayTest, TheProxysOwnDecisionsAndUnreadableBodiesAreNotReplayable) {
  auto r = replayCall(recorded("a-1", "CONNECT", "kb.internal:443", "allow", "tls.intercept"),
                      set.get());
  EXPECT_FALSE(r.replayable);
  EXPECT_EQ(r.whyNot, "decided by the proxy, not by policy rules");
  r = replayCall(recorded("a-1", "GET", "kb.internal:80", "halt", "transparent.host_mismatch"),
                 set.get());
  EXPECT_EQ(r.whyNot, "decided by the proxy, not by policy rules");
  // A GET to kb.internal reads no body: an extract halt there is the path's, replayable.
  auto withBody = recorded("a-1", "GET", "kb.internal:80", "halt", "extract");
  withBody.hadBody = true;
  r = replayCall(withBody, set.get());
  EXPECT_EQ(r.whyNot, "needed a body the record does not carry");
  r = replayCall(recorded("a-1", "GET", "kb.internal:80", "halt", "extract"), set.get());
  EXPECT_TRUE(r.replayable);
  EXPECT_TRUE(r.differs);  // the path /x extracts cleanly now: allowed by reads
}

TEST(PolicyArchiveTest, ARoundTripReloadsTheSameDigest) {
  auto dir =
      std::filesystem::temp_directory_path() / ("tollgate-archive-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  auto set = PolicySet::fromSources({{"/etc/p.yaml", kPolicy}, {"/etc/q.yaml", "# empty\n"}});
  ASSERT_TRUE(set) << set.error().message;
  ArchivedFiles files;
  for (const auto& s : set.value()->sources()) files.emplace_back(s.file, s.text);
  ASSERT_TRUE(archivePolicySet(dir.string(), set.value()->digest(), files));
  ASSERT_TRUE(archivePolicySet(dir.string(), set.value()->digest(), files));  // idempotent
  auto back = readPolicyArchive(dir.string(), set.value()->digest());
  ASSERT_TRUE(back) << back.error().message;
  std::vector<PolicySource> sources;
  for (auto& [p, c] : back.value()) sources.push_back({p, c});
  auto again = PolicySet::fromSources(sources);
  ASSERT_TRUE(again);
  EXPECT_EQ(again.value()->digest(), set.value()->digest());
  EXPECT_FALSE(readPolicyArchive(dir.string(), "sha256:" + std::string(64, '0')));
  EXPECT_FALSE(archivePolicySet(dir.string(), "sha256:../../etc", files));
  // A traversal of a digest's length: refused by its characters, nothing written outside.
  auto outside = dir.parent_path() / (std::string(58, 'a') + ".json");
  std::filesystem::remove(outside);
  EXPECT_FALSE(archivePolicySet(dir.string(), "sha256:../../" + std::string(58, 'a'), files));
  EXPECT_FALSE(std::filesystem::exists(outside));
  EXPECT_FALSE(readPolicyArchive(dir.string(), "sha256:../../" + std::string(58, 'a')));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tollgate
