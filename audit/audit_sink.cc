#include "audit/audit_sink.h"

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/json.h"

namespace tollgate {

std::string AuditRecord::toJson() const {
  std::string line;
  JsonObject obj(line);
  obj.add("agent", agent)
      .add("authority", authority)
      .add("decision", decision)
      .add("kind", kind)
      .add("method", method);
  if (!paramsSha256.empty()) obj.add("params_sha256", paramsSha256);
  obj.add("path", path)
      .add("policy_digest", policyDigest)
      .add("reason", reason)
      .add("rule", rule)
      .add("seq", seq)
      .add("tool", tool)
      .add("ts_ns", tsNs)
      .close();
  return line;
}

AuditFields AuditRecord::fields() const {
  AuditFields out;
  out.reserve(10);
  out.assign({{"agent", agent},
              {"authority", authority},
              {"decision", decision},
              {"method", method},
              {"path", path},
              {"policy_digest", policyDigest},
              {"reason", reason},
              {"rule", rule},
              {"tool", tool}});
  if (!paramsSha256.empty()) out.emplace_back("params_sha256", paramsSha256);
  return out;
}

uint64_t MemoryAuditSink::append(AuditRecord r) {
  r.tsNs = wallNs();
  std::lock_guard<std::mutex> lock(mutex_);
  r.seq = ++seq_;
  recent_.push_back(std::move(r));
  if (recent_.size() > keep_) recent_.pop_front();
  return seq_;
}

uint64_t MemoryAuditSink::durableSeq() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return seq_;
}

uint64_t MemoryAuditSink::addEvent(std::string_view kind, const AuditFields& fields, AuditSync) {
  int64_t ts = wallNs();
  nlohmann::json j = nlohmann::json::object();  // keys sorted, as the stream's records
  for (const auto& [k, v] : fields) j[std::string(k)] = std::string(v);
  j["kind"] = std::string(kind);
  j["ts_ns"] = ts;
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t seq = ++seq_;
  j["seq"] = seq;
  recent_.push_back(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (recent_.size() > keep_) recent_.pop_front();
  return seq;
}

std::vector<std::string> MemoryAuditSink::tail(size_t n) const {
  std::lock_guard<std::mutex> lock(mutex_);
  n = std::min(n, recent_.size());
  std::vector<std::string> out;
  out.reserve(n);
  for (auto it = recent_.end() - static_cast<std::ptrdiff_t>(n); it != recent_.end(); ++it) {
    if (const auto* r = std::get_if<AuditRecord>(&*it))
      out.push_back(r->toJson());
    else
      out.push_back(std::get<std::string>(*it));
  }
  return out;
}

}  // namespace tollgate
