#include "audit/audit_sink.h"

#include <chrono>

#include "common/json.h"

namespace tollgate {

uint64_t MemoryAuditSink::append(const AuditRecord& r) {
  auto ts = std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t seq = ++seq_;
  std::string line;
  // Keys in sorted order, as the canonical records of the audit stream will be.
  JsonObject(line)
      .add("agent", r.agent)
      .add("authority", r.authority)
      .add("decision", r.decision)
      .add("kind", r.kind)
      .add("method", r.method)
      .add("path", r.path)
      .add("reason", r.reason)
      .add("rule", r.rule)
      .add("seq", seq)
      .add("tool", r.tool)
      .add("ts_ns", static_cast<int64_t>(ts))
      .close();
  recent_.push_back(std::move(line));
  if (recent_.size() > keep_) recent_.pop_front();
  return seq;
}

std::vector<std::string> MemoryAuditSink::tail(size_t n) const {
  std::lock_guard<std::mutex> lock(mutex_);
  n = std::min(n, recent_.size());
  return {recent_.end() - static_cast<std::ptrdiff_t>(n), recent_.end()};
}

}  // namespace tollgate
