// DirectoryExport: copies the audit log's sealed segments and every checkpoint to another
// directory (a mounted archive volume; an S3 exporter with Object Lock uses the same
// AuditReplica interface later). The copy verifies on its own with `tollgate audit verify`:
//   segment-NNNNNN.jsonl  each sealed segment, byte for byte (temp file, fsync, rename)
//   checkpoints.jsonl     every checkpoint line, in order, fsynced (the signed tree heads,
//                         for a reader that holds no segment)
//   LOG_ID, keys/*.pub    the log's id and public keys
// At start it exports every sealed segment that is missing there (after downtime or a
// crash). Work is done on its own thread; a failure is logged and retried at the next
// seal, never blocking the audit writer.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "audit/replica.h"
#include "common/result.h"

namespace tollgate {

class DirectoryExport : public AuditReplica {
 public:
  // `logDir`: the log's directory; `to`: the export directory (created).
  static Result<std::shared_ptr<DirectoryExport>> open(std::string logDir, std::string to);
  ~DirectoryExport() override;

  void start() override;  // the catch-up, then the work queued
  void onDurable(uint64_t firstSeq, const std::vector<std::string>& lines) override;
  void onSealed(const std::string& path) override;
  // Waits until the work queued so far is done (tests, shutdown); after start().
  void flush();

 private:
  DirectoryExport(std::string logDir, std::string to);
  void run();
  Status copySegment(const std::string& path);
  Status appendCheckpoints(const std::vector<std::string>& lines);
  void catchUp();  // every sealed segment not yet exported
  // The seq of the last checkpoint exported (0: none), read from checkpoints.jsonl the first
  // time, which also cuts off an append a crash left torn there.
  uint64_t lastCheckpoint();

  struct Seal {
    std::string path;
  };
  using Task = std::variant<Seal, std::vector<std::string>>;  // or checkpoint lines

  std::string logDir_, to_;
  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::deque<Task> tasks_;
  bool busy_ = false;
  uint64_t last_ = 0;  // lastCheckpoint(), read from the file once (export thread)
  bool lastKnown_ = false;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace tollgate
