// A healing job as the sidecar will queue it for a runner (DESIGN §7). The queue and the
// process/QEMU backends come with the healing issue.
#pragma once

#include <chrono>
#include <string>

namespace tollgate {

struct HealingJob {
  std::string playbook;  // playbook name
  std::string trigger;   // "on_halt", "breaker_open", "budget_exhausted", "cascade"
  std::string agent;
  std::chrono::milliseconds timeout{0};
};

}  // namespace tollgate
