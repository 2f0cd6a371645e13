#include "audit/report.h"

#include <algorithm>
#include <cctype>
#include <ctime>
#include <set>

#include "audit/chain.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;

uint64_t seqOf(const Json& r) {
  auto it = r.find("seq");
  return it != r.end() && it->is_number_unsigned() ? it->get<uint64_t>() : 0;
}

int64_t tsOf(const Json& r) {
  auto it = r.find("ts_ns");
  return it != r.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}

// The fields of a record worth listing: its own, with seq and a readable time.
Json listed(const Json& r, std::initializer_list<const char*> keys) {
  Json out = {{"seq", seqOf(r)}, {"time", formatReportTime(tsOf(r))}};
  for (const char* k : keys) {
    if (r.contains(k)) out[k] = r[k];
  }
  return out;
}

std::string cell(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  return v.dump();
}

using Table = std::pair<std::vector<std::string>, std::vector<std::vector<std::string>>>;

Table tableOf(const Json& rows, const std::vector<std::string>& columns) {
  Table t{columns, {}};
  for (const auto& r : rows) {
    std::vector<std::string> line;
    for (const auto& c : columns) line.push_back(r.contains(c) ? cell(r[c]) : "");
    t.second.push_back(std::move(line));
  }
  return t;
}

std::string mdEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '|')
      out += "\\|";
    else if (c == '\n' || c == '\r')
      out += ' ';
    else
      out += c;
  }
  return out;
}

std::string htmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// One renderer for both text formats: headings, paragraphs and tables.
struct Writer {
  bool html;
  std::string out;
  void heading(int level, const std::string& text) {
    if (html)
      out += "<h" + std::to_string(level) + ">" + htmlEscape(text) + "</h" + std::to_string(level) +
             ">\n";
    else
      out += std::string(static_cast<size_t>(level), '#') + " " + text + "\n\n";
  }
  void para(const std::string& text) {
    if (html)
      out += "<p>" + htmlEscape(text) + "</p>\n";
    else
      out += text + "\n\n";
  }
  void table(const Table& t, const std::string& empty) {
    if (t.second.empty()) {
      para(empty);
      return;
    }
    if (html) {
      out += "<table>\n<tr>";
      for (const auto& h : t.first) out += "<th>" + htmlEscape(h) + "</th>";
      out += "</tr>\n";
      for (const auto& row : t.second) {
        out += "<tr>";
        for (const auto& c : row) out += "<td>" + htmlEscape(c) + "</td>";
        out += "</tr>\n";
      }
      out += "</table>\n";
      return;
    }
    out += "|";
    for (const auto& h : t.first) out += " " + mdEscape(h) + " |";
    out += "\n|";
    for (size_t i = 0; i < t.first.size(); ++i) out += "---|";
    out += "\n";
    for (const auto& row : t.second) {
      out += "|";
      for (const auto& c : row) out += " " + mdEscape(c) + " |";
      out += "\n";
    }
    out += "\n";
  }
};

}  // namespace

std::optional<int64_t> parseReportTime(std::string_view text) {
  if (text.empty()) return std::nullopt;
  // Times are int64 nanoseconds: up to 2262-04-11T23:47:16Z.
  constexpr int64_t kMaxSeconds = INT64_MAX / 1'000'000'000 - 1;
  if (text.find_first_not_of("0123456789") == std::string_view::npos) {
    if (text.size() > 11) return std::nullopt;
    int64_t secs = std::stoll(std::string(text));
    if (secs > kMaxSeconds) return std::nullopt;
    return secs * 1'000'000'000;
  }
  // YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)
  auto digits = [&](size_t pos, size_t n, int& v) {
    if (pos + n > text.size()) return false;
    v = 0;
    for (size_t i = pos; i < pos + n; ++i) {
      if (!std::isdigit(static_cast<unsigned char>(text[i]))) return false;
      v = v * 10 + (text[i] - '0');
    }
    return true;
  };
  std::tm tm{};
  int y, mo, d, h, mi, s;
  if (text.size() < 20 || !digits(0, 4, y) || text[4] != '-' || !digits(5, 2, mo) ||
      text[7] != '-' || !digits(8, 2, d) || (text[10] != 'T' && text[10] != 't') ||
      !digits(11, 2, h) || text[13] != ':' || !digits(14, 2, mi) || text[16] != ':' ||
      !digits(17, 2, s))
    return std::nullopt;
  // The days of the month (February 29 only in a leap year).
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  if (mo < 1 || mo > 12 || d < 1 || d > kDays[mo - 1] + (mo == 2 && leap) || h > 23 || mi > 59 ||
      s > 60)
    return std::nullopt;
  size_t pos = 19;
  int64_t fraction = 0;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    int64_t scale = 100'000'000;
    size_t start = pos;
    while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
      fraction += (text[pos] - '0') * scale;
      scale /= 10;
      ++pos;
    }
    if (pos == start) return std::nullopt;
  }
  int64_t offset = 0;
  if (pos < text.size() && (text[pos] == 'Z' || text[pos] == 'z')) {
    ++pos;
  } else if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) {
    int oh, om;
    if (!digits(pos + 1, 2, oh) || pos + 3 >= text.size() || text[pos + 3] != ':' ||
        !digits(pos + 4, 2, om))
      return std::nullopt;
    if (oh > 23 || om > 59) return std::nullopt;
    offset = (oh * 3600 + om * 60) * (text[pos] == '+' ? 1 : -1);
    pos += 6;
  } else {
    return std::nullopt;
  }
  if (pos != text.size()) return std::nullopt;
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  int64_t secs = static_cast<int64_t>(timegm(&tm)) - offset;
  if (secs < 0 || secs > kMaxSeconds) return std::nullopt;
  return secs * 1'000'000'000 + fraction;
}

std::string formatReportTime(int64_t ns) {
  std::time_t secs = static_cast<std::time_t>(ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

AuditSummarizer::AuditSummarizer(int64_t fromNs, int64_t toNs, int64_t gapNs)
    : fromNs_(fromNs),
      toNs_(toNs),
      gapNs_(gapNs),
      bounded_(fromNs != kWholeLogFrom),
      prevTs_(fromNs),
      havePrev_(bounded_) {}

void AuditSummarizer::add(const Json& r) {
  ReportSummary& s = s_;
  int64_t ts = tsOf(r);
  if (ts < fromNs_ || ts > toNs_) return;
  uint64_t seq = seqOf(r);
  if (s.records == 0) {
    s.firstSeq = seq;
    s.firstTs = ts;
  }
  ++s.records;
  s.lastSeq = seq;
  s.lastTs = ts;
  if (gapNs_ > 0 && havePrev_ && ts - prevTs_ > gapNs_) s.gaps.push_back({prevTs_, ts, prevSeq_});
  havePrev_ = true;
  prevTs_ = ts;
  prevSeq_ = seq;

  std::string kind = stringField(r, "kind");
  if (kind == "call") {
    ++s.calls;
    std::string decision = stringField(r, "decision"), rule = stringField(r, "rule");
    ++s.byDecision[decision];
    ++s.byRule[{decision, rule}];
    if (decision == "halt" || decision == "observe-halt")
      s.halts.push_back(listed(
          r, {"agent", "tool", "method", "authority", "path", "decision", "rule", "reason"}));
    if (!stringField(r, "policy_digest").empty()) digests_.insert(stringField(r, "policy_digest"));
  } else if (kind == "checkpoint") {
    ++s.checkpoints;
  } else if (kind == "reload") {
    s.reloads.push_back(
        listed(r, {"trigger", "result", "digest", "previous_digest", "error", "archive"}));
  } else if (kind == "approval") {
    Json a = r;
    for (const char* k : {"v", "log_id", "prev", "kind"}) a.erase(k);
    a["time"] = formatReportTime(ts);
    s.approvals.push_back(std::move(a));
  } else if (kind == "recovery") {
    s.recoveries.push_back(listed(r, {"torn_file", "torn_bytes"}));
  } else if (kind == "key_rotation") {
    s.keyRotations.push_back(listed(r, {"old_key_id", "new_key_id"}));
  } else if (kind == "report") {
    s.reports.push_back(listed(r, {"sha256", "format", "from", "to"}));
  }
}

ReportSummary AuditSummarizer::finish() {
  // The silence from the last record (or the period's start) to the end of a period with
  // an end (--to with or without --from).
  if (gapNs_ > 0 && havePrev_ && toNs_ != kWholeLogTo && toNs_ - prevTs_ > gapNs_)
    s_.gaps.push_back({prevTs_, toNs_, prevSeq_});
  s_.digests.assign(digests_.begin(), digests_.end());
  return std::move(s_);
}

ReportSummary summarizeAudit(const std::vector<Json>& records, int64_t fromNs, int64_t toNs,
                             int64_t gapNs) {
  AuditSummarizer summarizer(fromNs, toNs, gapNs);
  for (const auto& r : records) summarizer.add(r);
  return summarizer.finish();
}

Json reportDocument(const ReportContext& ctx, const ReportSummary& s) {
  Json doc;
  doc["title"] = "Tollgate audit report";
  doc["system"] = {{"product", "tollgate"},
                   {"version", ctx.version},
                   {"hostname", ctx.hostname},
                   {"generated_at", ctx.generatedAt},
                   {"audit_dir", ctx.dir}};
  Json keys = Json::array();
  for (const auto& [id, fp] : ctx.keys) keys.push_back({{"key_id", id}, {"fingerprint", fp}});
  doc["log"] = {{"log_id", ctx.logId},
                {"keys", keys},
                {"verification", {{"ok", ctx.verified}, {"result", ctx.verifier}}},
                {"unsealed_tail", ctx.unsealed}};
  doc["period"] = {
      {"from", ctx.fromNs == kWholeLogFrom ? "start of the log" : formatReportTime(ctx.fromNs)},
      {"to", ctx.toNs == kWholeLogTo ? "end of the log" : formatReportTime(ctx.toNs)},
      {"records", s.records},
      {"first_seq", s.firstSeq},
      {"last_seq", s.lastSeq},
      {"first_record", s.records ? formatReportTime(s.firstTs) : ""},
      {"last_record", s.records ? formatReportTime(s.lastTs) : ""},
      {"checkpoints", s.checkpoints}};
  Json byRule = Json::array();
  for (const auto& [k, n] : s.byRule)
    byRule.push_back({{"decision", k.first}, {"rule", k.second}, {"count", n}});
  doc["decisions"] = {{"calls", s.calls}, {"by_decision", s.byDecision}, {"by_rule", byRule}};
  doc["risk_events"] = s.halts;
  doc["policy_changes"] = s.reloads;
  Json sets = Json::array();
  uint64_t archived = 0;
  for (const auto& d : s.digests) {
    auto it = ctx.archived.find(d);
    bool a = it != ctx.archived.end() && it->second;
    archived += a;
    sets.push_back({{"digest", d}, {"archived", a}});
  }
  doc["policy_sets"] = sets;
  doc["approvals"] = s.approvals;
  Json silences = Json::array();
  for (const auto& g : s.gaps)
    silences.push_back({{"from", formatReportTime(g.fromNs)},
                        {"to", formatReportTime(g.toNs)},
                        {"after_seq", g.afterSeq},
                        {"seconds", (g.toNs - g.fromNs) / 1'000'000'000}});
  doc["gaps"] = {{"threshold_seconds", ctx.gapNs / 1'000'000'000},
                 {"silences", silences},
                 {"recoveries", s.recoveries},
                 {"unsealed_tail", ctx.unsealed}};
  doc["key_rotations"] = s.keyRotations;
  doc["earlier_reports"] = s.reports;

  auto n = [](uint64_t v) { return std::to_string(v); };
  std::string span = s.records ? formatReportTime(s.firstTs) + " to " + formatReportTime(s.lastTs)
                               : "no records in the period";
  std::string verdict =
      ctx.verified ? "verified (" + ctx.verifier + ")" : "DOES NOT VERIFY (" + ctx.verifier + ")";
  std::string fp = ctx.keys.empty() ? "no key" : ctx.keys.front().second;
  doc["compliance"] = Json::array({
      {{"framework", "EU AI Act"},
       {"requirement", "Art. 12(1) automatic recording of events over the lifetime of the system"},
       {"evidence", n(s.records) + " records (seq " + n(s.firstSeq) + "-" + n(s.lastSeq) + ", " +
                        span +
                        ") written by the sidecar itself, each call's record made "
                        "durable before the call was forwarded; hash-chained, " +
                        n(s.checkpoints) + " signed checkpoints"}},
      {{"framework", "EU AI Act"},
       {"requirement",
        "Art. 12(2) traceability: events that may present a risk or a "
        "substantial modification"},
       {"evidence", n(s.calls) +
                        " calls each with agent, tool, destination, decision, rule, "
                        "reason and policy digest; " +
                        n(s.halts.size()) + " halts listed as risk events; " + n(s.reloads.size()) +
                        " policy loads/reloads recorded"}},
      {{"framework", "EU AI Act"},
       {"requirement", "Art. 12(2)(c), Art. 14 monitoring of operation and human oversight"},
       {"evidence", n(s.approvals.size()) +
                        " human approval records; decisions counted by "
                        "rule; " +
                        n(archived) + " of " + n(s.digests.size()) +
                        " policy sets archived by digest for replay (tollgate audit replay)"}},
      {{"framework", "EU AI Act"},
       {"requirement",
        "Art. 19(1) retention of automatically generated logs (at least six "
        "months)"},
       {"evidence", "the log in " + ctx.dir + " spans " + span +
                        "; retention of the directory (or its export) for at least six months is "
                        "the deployer's; the verifier proves it complete and unaltered"}},
      {{"framework", "ISO/IEC 42001"},
       {"requirement", "Annex A.6.2.8 AI system recording of event logs"},
       {"evidence", "log " + ctx.logId + ", " + verdict + "; checkpoint key fingerprint " + fp}},
      {{"framework", "ISO/IEC 42001"},
       {"requirement",
        "Annex A.6.2.6 AI system operation and monitoring; clause 9.1 monitoring "
        "and measurement"},
       {"evidence", n(s.gaps.size()) + " gaps longer than " + n(ctx.gapNs / 1'000'000'000) +
                        " s, " + n(s.recoveries.size()) + " recoveries, " + n(ctx.unsealed) +
                        " unsealed records at the tail; this report's hash appended to the log"}},
  });
  return doc;
}

std::string renderReport(const Json& doc, std::string_view format) {
  if (format == "json") return doc.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  Writer w{format == "html", {}};
  if (w.html)
    w.out +=
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Tollgate audit "
        "report</title>\n<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:2px 6px;text-align:left}</style></head><body>\n";
  w.heading(1, "Tollgate audit report");
  const auto& sys = doc["system"];
  const auto& log = doc["log"];
  const auto& period = doc["period"];
  w.heading(2, "System and log");
  Table id{{"item", "value"},
           {{"product", "tollgate " + cell(sys["version"])},
            {"hostname", cell(sys["hostname"])},
            {"generated at", cell(sys["generated_at"])},
            {"audit directory", cell(sys["audit_dir"])},
            {"log id", cell(log["log_id"])},
            {"verifier", std::string(log["verification"]["ok"].get<bool>() ? "ok: " : "FAILED: ") +
                             cell(log["verification"]["result"])},
            {"unsealed tail", cell(log["unsealed_tail"]) + " records after the last checkpoint"},
            {"period", cell(period["from"]) + " to " + cell(period["to"])},
            {"records in the period",
             cell(period["records"]) + " (seq " + cell(period["first_seq"]) + "-" +
                 cell(period["last_seq"]) + ", " + cell(period["first_record"]) + " to " +
                 cell(period["last_record"]) + ")"},
            {"checkpoints in the period", cell(period["checkpoints"])}}};
  w.table(id, "");
  w.heading(3, "Keys");
  w.table(tableOf(log["keys"], {"key_id", "fingerprint"}), "No key.");
  w.heading(2, "Decisions");
  Json byDecision = Json::array();
  for (const auto& [k, v] : doc["decisions"]["by_decision"].items())
    byDecision.push_back({{"decision", k}, {"count", v}});
  w.para("Calls: " + cell(doc["decisions"]["calls"]));
  w.table(tableOf(byDecision, {"decision", "count"}), "No calls.");
  w.heading(3, "By rule");
  w.table(tableOf(doc["decisions"]["by_rule"], {"decision", "rule", "count"}), "No calls.");
  w.heading(2, "Risk events (halts)");
  w.table(tableOf(doc["risk_events"], {"seq", "time", "agent", "tool", "method", "authority",
                                       "path", "rule", "reason"}),
          "No halts.");
  w.heading(2, "Policy changes");
  w.table(tableOf(doc["policy_changes"],
                  {"seq", "time", "trigger", "result", "digest", "previous_digest", "error"}),
          "No policy loads or reloads.");
  w.heading(3, "Policy sets used");
  w.table(tableOf(doc["policy_sets"], {"digest", "archived"}), "No policy set decided a call.");
  w.heading(2, "Human approvals");
  w.table(tableOf(doc["approvals"],
                  {"seq", "time", "approval_id", "state", "approver", "agent", "tool", "rule"}),
          "No approval records.");
  w.heading(2, "Earlier reports");
  w.table(tableOf(doc["earlier_reports"], {"seq", "time", "sha256", "format", "from", "to"}),
          "No report recorded in the period before this one.");
  w.heading(2, "Gaps");
  w.para("Silences longer than " + cell(doc["gaps"]["threshold_seconds"]) + " s:");
  w.table(tableOf(doc["gaps"]["silences"], {"from", "to", "seconds", "after_seq"}),
          "No silence longer than the threshold.");
  w.heading(3, "Recoveries");
  w.table(tableOf(doc["gaps"]["recoveries"], {"seq", "time", "torn_file", "torn_bytes"}),
          "No recovery records.");
  w.para("Unsealed tail: " + cell(doc["gaps"]["unsealed_tail"]) +
         " records after the last signed checkpoint.");
  w.heading(2, "Regulatory mapping");
  w.table(tableOf(doc["compliance"], {"framework", "requirement", "evidence"}), "");
  if (w.html) w.out += "</body></html>\n";
  return w.out;
}

}  // namespace tollgate
