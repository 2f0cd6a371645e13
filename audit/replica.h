// Where audit records go after they are durable in the local log: a Redis Stream replica
// and an export of sealed segments and checkpoints (to a directory now, an S3 bucket with
// Object Lock later, behind the same interface). Neither is a trust root: the local log and
// its signed checkpoints are; a copy is checked with `tollgate audit verify` like the log.
//
// The audit writer calls these on its thread; implementations hand the work to their own
// thread and never block it (a slow or absent Redis must not slow the calls).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tollgate {

class AuditReplica {
 public:
  virtual ~AuditReplica() = default;
  // Called once, when the audit writer holds the log (its lock taken, a torn tail moved
  // aside), before any onDurable(): an implementation reads the log (a catch-up) only from
  // then on, so a second process refused the log never touches the copy.
  virtual void start() {}
  // Lines just made durable, in order; the first has seq `firstSeq`.
  virtual void onDurable(uint64_t firstSeq, const std::vector<std::string>& lines) = 0;
  // A segment file was sealed (it ends with a checkpoint and is never written again).
  virtual void onSealed(const std::string& /*path*/) {}
};

}  // namespace tollgate
