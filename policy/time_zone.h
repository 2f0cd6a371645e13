// TimeZone: UTC offsets of an IANA zone, read from the system's TZif files
// (/usr/share/zoneinfo), without touching the process-wide TZ (workers run in parallel).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"

namespace tollgate {

class TimeZone {
 public:
  static Result<std::shared_ptr<const TimeZone>> load(const std::string& name);
  // The offset from UTC, in seconds, at the given UTC time.
  int32_t offsetAt(int64_t utcSeconds) const;
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::vector<int64_t> transitions_;  // UTC seconds, ascending
  std::vector<int32_t> offsets_;      // offset from each transition on
  int32_t initial_ = 0;
};

}  // namespace tollgate
