// AuditSink: where every decision is recorded. Today an in-memory sink that numbers the
// records and keeps the most recent ones for the admin API; the hash-chained, signed,
// durable stream (DESIGN §6) replaces it behind this interface.
#pragma once

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "common/result.h"

namespace tollgate {

// When a record is synced to disk: at once (a call waits for it before it is forwarded, or
// it is a rare event someone may read back at once), or with the next batch, which records
// no one waits for (outcomes, halts) join, at the latest a moment later (FileAuditSink's
// lazySync).
enum class AuditSync { kNow, kBatched };

// A record's fields: string keys and values (the keys not the chain's own: v, log_id, seq,
// ts_ns, prev, kind).
using AuditFields = std::vector<std::pair<std::string_view, std::string_view>>;

struct AuditRecord {
  std::string kind;  // "call"
  std::string agent, tool, method, authority, path, decision, rule, reason;
  std::string policyDigest;
  // "sha256:<hex>" of the call's body as the policy read it (a tool call's params travel in
  // it); empty when the body was not read, and then not recorded.
  std::string paramsSha256;
  uint64_t seq = 0;  // set by the sink
  int64_t tsNs = 0;  // set by the sink
  // kNow: synced at once. kBatched: with the next sync, when requestDurable() asks for it
  // (a worker asks once per loop turn for the calls it forwards), or lazySync after it came.
  AuditSync sync = AuditSync::kBatched;
  // One JSON line, keys sorted as the canonical records of the audit stream will be.
  std::string toJson() const;
  // The record's fields as the stream writes them (params_sha256 only when there is one);
  // views into this record.
  AuditFields fields() const;
};

// Told by a sink's writer as records become durable; methods run on the writer's thread and
// must be quick and thread-safe.
class AuditObserver {
 public:
  virtual ~AuditObserver() = default;
  // A batch was written: `records` are durable now (ok), or the stream failed (!ok).
  virtual void onBatch(size_t records, double fsyncSeconds, bool ok) = 0;
  // A checkpoint with this seq was written into the stream (durable).
  virtual void onCheckpoint(uint64_t /*seq*/) {}
  // Records queued after the stream failed, never written (their calls were halted).
  virtual void onDropped(size_t /*records*/) {}
  // An append waited for the writer (the queue was full); on the appending thread.
  virtual void onBackpressure() {}
};

// What a checkpoint key rotation did: the key_rotation record's seq and the two key ids.
struct KeyRotation {
  std::string oldKeyId, newKeyId;
  uint64_t seq = 0;
};

class AuditSink {
 public:
  virtual ~AuditSink() = default;
  // Records one decision and returns its sequence number (1, 2, …).
  virtual uint64_t append(AuditRecord record) = 0;
  // Records an event of another kind (reload, report, …; one of audit/chain.h's kinds) with
  // string fields, in order with the calls; returns its sequence number.
  uint64_t appendEvent(std::string_view kind, const AuditFields& fields,
                       AuditSync sync = AuditSync::kNow) {
    return addEvent(kind, fields, sync);
  }
  // The last n records, oldest first, each as one JSON line.
  virtual std::vector<std::string> tail(size_t n) const = 0;
  // False while records cannot be made durable: calls are then halted (fail closed).
  virtual bool healthy() const { return true; }
  // Every record up to this seq is durable; a call is forwarded only once its record is.
  virtual uint64_t durableSeq() const = 0;
  // The seq of the last checkpoint on disk (0: none), this process's or an earlier one's.
  virtual uint64_t lastCheckpointSeq() const { return 0; }
  // Someone waits for the records up to `seq` to be durable: sync them at once.
  virtual void requestDurable(uint64_t /*seq*/) {}
  // Blocks until every record up to `seq` is durable: false when the sink turns unhealthy or
  // the timeout passes first. For the admin API's rare records, never the request path.
  bool waitDurable(uint64_t seq, std::chrono::milliseconds timeout) {
    requestDurable(seq);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (durableSeq() < seq) {
      if (!healthy() || std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
  }
  // The observer (or none) told of every batch from now on; set and cleared while the
  // sink lives, it must outlive the setting.
  virtual void setObserver(AuditObserver* /*observer*/) {}
  // Replaces the checkpoint signing key by a new one (a key_rotation record signed by both),
  // once that record is durable. Error: the sink has no keys, or the rotation failed.
  virtual Result<KeyRotation> rotateKey() {
    return Error{-ENOTSUP, "this audit sink keeps no signed log (audit.sink: memory)"};
  }

 protected:
  virtual uint64_t addEvent(std::string_view kind, const AuditFields& fields, AuditSync sync) = 0;
};

class MemoryAuditSink : public AuditSink {
 public:
  explicit MemoryAuditSink(size_t keep = 1000) : keep_(keep) {}
  uint64_t append(AuditRecord record) override;
  std::vector<std::string> tail(size_t n) const override;
  uint64_t durableSeq() const override;

 protected:
  uint64_t addEvent(std::string_view kind, const AuditFields& fields, AuditSync sync) override;

 private:
  size_t keep_;
  mutable std::mutex mutex_;
  uint64_t seq_ = 0;
  // Calls rendered only when read; events (rare) rendered at once.
  std::deque<std::variant<AuditRecord, std::string>> recent_;
};

}  // namespace tollgate
