// The wall clock as integers: what records, periods and timestamps carry (the sidecar's own
// timers use libuv's monotonic clock instead).
#pragma once

#include <chrono>
#include <cstdint>

namespace tollgate {

// Milliseconds since the Unix epoch.
inline int64_t wallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Nanoseconds since the Unix epoch.
inline int64_t wallNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace tollgate
