// The report's pure logic: time parsing, the period's filter, counts and gaps.
#include "audit/report.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

using Json = nlohmann::json;
constexpr int64_t kS = 1'000'000'000;

Json call(uint64_t seq, int64_t ts, const std::string& decision, const std::string& rule) {
  return {{"seq", seq},
          {"ts_ns", ts},
          {"kind", "call"},
          {"agent", "a"},
          {"decision", decision},
          {"rule", rule},
          {"policy_digest", "sha256:d"}};
}

Json event(uint64_t seq, int64_t ts, const std::string& kind) {
  return {{"seq", seq}, {"ts_ns", ts}, {"kind", kind}};
}

TEST(ReportTimeTest, ParsesRfc3339AndUnixSeconds) {
  EXPECT_EQ(parseReportTime("1767225600"), 1'767'225'600 * kS);
  EXPECT_EQ(parseReportTime("2026-01-01T00:00:00Z"), 1'767'225'600 * kS);
  EXPECT_EQ(parseReportTime("2026-01-01T01:00:00+01:00"), 1'767'225'600 * kS);
  EXPECT_EQ(parseReportTime("2025-12-31T23:00:00-01:00"), 1'767'225'600 * kS);
  EXPECT_EQ(parseReportTime("2026-01-01T00:00:00.25Z"), 1'767'225'600 * kS + kS / 4);
  EXPECT_EQ(parseReportTime("2026-01-01T00:00:00.000000001Z"), 1'767'225'600 * kS + 1);
  for (const char* bad :
       {"", "yesterday", "2026-01-01", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z",
        "2026-01-01T00:00:00Zjunk", "2026-01-01T00:00:00.Z", "-5",
        // days a month does not have, offsets beyond a day, times beyond int64 nanoseconds
        "2026-02-29T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-06T00:00:00+99:99",
        "2026-12-06T00:00:00+24:00", "9999-12-31T23:59:59Z", "99999999999"})
    EXPECT_FALSE(parseReportTime(bad)) << bad;
  EXPECT_TRUE(parseReportTime("2024-02-29T00:00:00Z"));  // a leap year's
  EXPECT_TRUE(parseReportTime("2262-01-01T00:00:00Z"));
  EXPECT_EQ(formatReportTime(1'767'225'600 * kS + 5), "2026-01-01T00:00:00Z");
}

TEST(ReportSummaryTest, CountsByDecisionAndRuleAndListsEvents) {
  Json rotation = event(9, 18 * kS, "key_rotation");
  rotation["old_key_id"] = "k1";
  rotation["new_key_id"] = "k2";
  std::vector<Json> log = {event(1, 10 * kS, "reload"),
                           call(2, 11 * kS, "allow", "r1"),
                           call(3, 12 * kS, "halt", "deny"),
                           call(4, 13 * kS, "allow", "r1"),
                           call(5, 14 * kS, "observe-halt", "deny"),
                           event(6, 15 * kS, "checkpoint"),
                           event(7, 16 * kS, "approval"),
                           event(8, 17 * kS, "recovery"),
                           rotation};
  auto s = summarizeAudit(log, kWholeLogFrom, kWholeLogTo, 3600 * kS);
  EXPECT_EQ(s.records, 9u);
  ASSERT_EQ(s.keyRotations.size(), 1u);  // with the keys the record names
  EXPECT_EQ(s.keyRotations[0]["old_key_id"], "k1");
  EXPECT_EQ(s.keyRotations[0]["new_key_id"], "k2");
  EXPECT_EQ(s.calls, 4u);
  EXPECT_EQ(s.checkpoints, 1u);
  EXPECT_EQ(s.byDecision,
            (std::map<std::string, uint64_t>{{"allow", 2}, {"halt", 1}, {"observe-halt", 1}}));
  EXPECT_EQ((s.byRule[{"allow", "r1"}]), 2u);
  EXPECT_EQ((s.byRule[{"halt", "deny"}]), 1u);
  ASSERT_EQ(s.halts.size(), 2u);
  EXPECT_EQ(s.halts[0]["seq"], 3);
  EXPECT_EQ(s.halts[1]["seq"], 5);
  EXPECT_EQ(s.reloads.size(), 1u);
  EXPECT_EQ(s.approvals.size(), 1u);
  EXPECT_EQ(s.recoveries.size(), 1u);
  EXPECT_EQ(s.digests, std::vector<std::string>{"sha256:d"});
  EXPECT_TRUE(s.gaps.empty());
  EXPECT_EQ(s.firstSeq, 1u);
  EXPECT_EQ(s.lastSeq, 9u);
}

TEST(ReportSummaryTest, ThePeriodIsInclusiveAndFiltersEverything) {
  std::vector<Json> log;
  for (uint64_t i = 1; i <= 10; ++i)
    log.push_back(call(i, static_cast<int64_t>(i) * kS, i % 2 ? "allow" : "halt", "r"));
  auto s = summarizeAudit(log, 3 * kS, 6 * kS, 3600 * kS);
  EXPECT_EQ(s.calls, 4u);
  EXPECT_EQ(s.firstSeq, 3u);
  EXPECT_EQ(s.lastSeq, 6u);
  EXPECT_EQ(s.byDecision["allow"], 2u);
  EXPECT_EQ(s.byDecision["halt"], 2u);
  auto none = summarizeAudit(log, 20 * kS, 30 * kS, 3600 * kS);
  EXPECT_EQ(none.records, 0u);
}

TEST(ReportSummaryTest, GapsAreSilencesLongerThanTheThreshold) {
  std::vector<Json> log = {call(1, 100 * kS, "allow", "r"), call(2, 110 * kS, "allow", "r"),
                           call(3, 200 * kS, "allow", "r"), call(4, 230 * kS, "allow", "r")};
  auto s = summarizeAudit(log, kWholeLogFrom, kWholeLogTo, 30 * kS);
  ASSERT_EQ(s.gaps.size(), 1u);  // 30 s exactly is not longer than the threshold
  EXPECT_EQ(s.gaps[0].fromNs, 110 * kS);
  EXPECT_EQ(s.gaps[0].toNs, 200 * kS);
  EXPECT_EQ(s.gaps[0].afterSeq, 2u);
  // A bounded period also counts the silence at its start and its end.
  auto b = summarizeAudit(log, 0, 400 * kS, 60 * kS);
  ASSERT_EQ(b.gaps.size(), 3u);
  EXPECT_EQ(b.gaps[0].fromNs, 0);
  EXPECT_EQ(b.gaps[0].afterSeq, 0u);
  EXPECT_EQ(b.gaps[1].afterSeq, 2u);
  EXPECT_EQ(b.gaps[2].toNs, 400 * kS);
  // An end without a start: the silence from the last record to the end counts too.
  auto to = summarizeAudit(log, kWholeLogFrom, 400 * kS, 60 * kS);
  ASSERT_EQ(to.gaps.size(), 2u);
  EXPECT_EQ(to.gaps[1].fromNs, 230 * kS);
  EXPECT_EQ(to.gaps[1].toNs, 400 * kS);
  // A bounded period without records is one gap.
  auto empty = summarizeAudit(log, 500 * kS, 900 * kS, 60 * kS);
  ASSERT_EQ(empty.gaps.size(), 1u);
  EXPECT_EQ(empty.gaps[0].toNs - empty.gaps[0].fromNs, 400 * kS);
}

TEST(ReportRenderTest, EveryFormatCarriesTheCountsAndTheMapping) {
  std::vector<Json> log = {call(1, 11 * kS, "allow", "r1"), call(2, 12 * kS, "halt", "deny|x")};
  ReportContext ctx;
  ctx.logId = "log-1";
  ctx.verified = true;
  ctx.verifier = "2 records";
  auto doc = reportDocument(ctx, summarizeAudit(log, kWholeLogFrom, kWholeLogTo, 0));
  auto md = renderReport(doc, "md");
  EXPECT_NE(md.find("| halt | deny\\|x | 1 |"), std::string::npos) << md;
  EXPECT_NE(md.find("Art. 19(1)"), std::string::npos);
  auto html = renderReport(doc, "html");
  EXPECT_NE(html.find("<td>allow</td><td>1</td>"), std::string::npos);
  auto json = Json::parse(renderReport(doc, "json"));
  EXPECT_EQ(json["decisions"]["calls"], 2);
  EXPECT_EQ(json["risk_events"].size(), 1u);
}

}  // namespace
}  // namespace tollgate
