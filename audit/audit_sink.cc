#include "audit/audit_sink.h"

#include <chrono>

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

uint64_t MemoryAuditSink::append(AuditRecord r) {
  r.tsNs = std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
               .count();
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

std::vector<std::string> MemoryAuditSink::tail(size_t n) const {
  std::lock_guard<std::mutex> lock(mutex_);
  n = std::min(n, recent_.size());
  std::vector<std::string> out;
  out.reserve(n);
  for (auto it = recent_.end() - static_cast<std::ptrdiff_t>(n); it != recent_.end(); ++it)
    out.push_back(it->toJson());
  return out;
}

}  // namespace tollgate
