// RedisStreamReplica: every durable audit line XADDed to a Redis Stream, for readers that
// want the decisions live (SIEM shippers, dashboards, other sidecars). Never a trust root:
// the entries are the log's canonical lines, checked with the log's keys like the log.
//
// The entry id is `SEQ-0`, so the stream holds each record once and in order: after a
// reconnect the replica asks for the stream's last id and goes on from there, reading
// what the stream misses from the log's segments (what was queued while Redis was away,
// or dropped when the queue was full). One connection on its own thread; the audit writer
// only appends to a bounded queue.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "audit/file_sink.h"
#include "audit/replica.h"
#include "common/redis_url.h"
#include "common/result.h"

struct redisContext;

namespace tollgate {

class RedisStreamReplica : public AuditReplica {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    uint16_t port = 6379;
    RedisAuth auth;       // AUTH on each connection when it has a password
    std::string key;      // the stream, e.g. tollgate:audit:<log id>
    uint64_t maxlen = 0;  // approximate cap on the stream's length (0: none)
    std::string logDir;   // where to read what the stream misses
    size_t queueLimit = 100'000;
    std::chrono::milliseconds timeout{1000};
  };
  explicit RedisStreamReplica(Options options);
  ~RedisStreamReplica() override;
  void start() override;  // connects, catches up, then sends what comes

  void onDurable(uint64_t firstSeq, const std::vector<std::string>& lines) override;

  // Seq of the last record known to be in the stream; records dropped from the queue.
  uint64_t replicated() const { return replicated_; }
  uint64_t dropped() const { return dropped_; }
  // Waits until every record handed over is in the stream, or `limit` passes.
  bool waitReplicated(uint64_t seq, std::chrono::milliseconds limit);

 private:
  void run();
  bool connect();
  void disconnect();
  // Sends lines[i] as seq first+i; false on a transport or server error.
  bool send(uint64_t first, const std::vector<std::string>& lines);
  // The lines with seq in [from, to] read from the log: from the segment holding `from` and
  // the ones after it, a line at a time (a catch-up must not read a segment, let alone the
  // log, into memory). Consecutive calls go on where the last one stopped.
  std::vector<std::string> readLog(uint64_t from, uint64_t to);
  // Opens the segment holding `seq` and reads up to it; false when the log does not have it.
  bool openLogAt(uint64_t seq);

  Options options_;
  redisContext* ctx_ = nullptr;
  std::mutex mutex_;
  std::condition_variable wake_, progress_;
  std::deque<std::pair<uint64_t, std::string>> queue_;  // (seq, line)
  std::atomic<bool> stopping_{false};                   // written under mutex_, read without it too
  std::atomic<uint64_t> replicated_{0}, dropped_{0};
  bool warnedDown_ = false;
  std::unique_ptr<AuditSegmentReader> logReader_;  // while catching up: where it reads…
  uint64_t readerNext_ = 0;                        // …and the seq of its next line
  std::thread thread_;
};

}  // namespace tollgate
