// Tests: call records appended to a FileAuditSink opened on `options`, each waited for
// until durable (as a forwarded call waits), then the sink closed (the log sealed).
#pragma once

#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "audit/file_sink.h"

namespace tollgate {

// Records agent-`from` … agent-(from+n-1), decision allow.
inline void writeAwaited(const FileAuditSink::Options& options, int from, int n) {
  auto sink = FileAuditSink::open(options);
  ASSERT_TRUE(sink) << sink.error().message;
  for (int i = from; i < from + n; ++i) {
    AuditRecord r;
    r.agent = "agent-" + std::to_string(i);
    r.decision = "allow";
    r.sync = AuditSync::kNow;
    uint64_t seq = sink.value()->append(r);
    while (sink.value()->durableSeq() < seq) std::this_thread::yield();
  }
}

}  // namespace tollgate
