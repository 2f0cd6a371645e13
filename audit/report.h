// `tollgate audit report`: a compliance summary of an audit log over a period (DESIGN §6):
// identity, key fingerprints, the verifier's result, decisions by decision and rule, halts
// as risk events, policy changes, human approvals, gaps, and a table mapping EU AI Act
// Art. 12/19 and ISO/IEC 42001 to the evidence in the log. The pure parts (time parsing,
// the period's summary, rendering) are here for tests; the command is in audit_cli.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tollgate {

// Nanoseconds since the epoch from RFC 3339 ("2026-03-02T10:00:00Z", fractions and
// "+01:00" offsets allowed) or unix seconds ("1767225600"). nullopt: neither.
std::optional<int64_t> parseReportTime(std::string_view text);
// RFC 3339 in UTC with seconds: "2026-03-02T10:00:00Z".
std::string formatReportTime(int64_t ns);

struct ReportGap {
  int64_t fromNs = 0, toNs = 0;
  uint64_t afterSeq = 0;  // 0: from the start of the period
};

// What the records of a period [fromNs, toNs] say. Records are the parsed lines in order.
struct ReportSummary {
  uint64_t records = 0, calls = 0, checkpoints = 0;
  uint64_t firstSeq = 0, lastSeq = 0;
  int64_t firstTs = 0, lastTs = 0;
  std::map<std::string, uint64_t> byDecision;
  std::map<std::pair<std::string, std::string>, uint64_t> byRule;  // (decision, rule)
  std::vector<nlohmann::json> halts, reloads, approvals, recoveries, keyRotations, reports;
  std::vector<ReportGap> gaps;
  std::vector<std::string> digests;  // policy digests the period's calls name, sorted
};

constexpr int64_t kWholeLogFrom = std::numeric_limits<int64_t>::min();
constexpr int64_t kWholeLogTo = std::numeric_limits<int64_t>::max();

// Gaps are silences longer than gapNs between the period's records, and, for a bounded
// period, between its bounds and its first and last records. Fed the records one at a time,
// in order (a log of any length: only the counts and the listed events are kept).
class AuditSummarizer {
 public:
  AuditSummarizer(int64_t fromNs, int64_t toNs, int64_t gapNs);
  void add(const nlohmann::json& record);
  ReportSummary finish();

 private:
  ReportSummary s_;
  std::set<std::string> digests_;
  int64_t fromNs_, toNs_, gapNs_;
  bool bounded_;
  int64_t prevTs_;
  uint64_t prevSeq_ = 0;
  bool havePrev_;
};

// The same over parsed records in memory.
ReportSummary summarizeAudit(const std::vector<nlohmann::json>& records, int64_t fromNs,
                             int64_t toNs, int64_t gapNs);

// Everything the report states besides the summary.
struct ReportContext {
  std::string version, hostname, generatedAt, dir, logId;
  std::vector<std::pair<std::string, std::string>> keys;  // key id, sha256 fingerprint
  bool verified = false;
  std::string verifier;  // the verifier's one-line result
  uint64_t unsealed = 0;
  int64_t fromNs = kWholeLogFrom, toNs = kWholeLogTo;
  int64_t gapNs = 0;
  std::map<std::string, bool> archived;  // policy digest -> archived in DIR/policies
};

// The report as a JSON document; md and html are rendered from it.
nlohmann::json reportDocument(const ReportContext& ctx, const ReportSummary& s);
std::string renderReport(const nlohmann::json& doc, std::string_view format);  // md|html|json

}  // namespace tollgate
