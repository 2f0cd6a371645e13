// Names the calling thread (Linux keeps 15 characters), so that `top -H`, `ps -L`, perf and
// gdb tell Tollgate's threads apart: tg-worker-N, tg-audit, tg-replica, tg-export.
#pragma once

#include <pthread.h>

#include <string>

namespace tollgate {

inline void nameThisThread(const std::string& name) {
  ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace tollgate
