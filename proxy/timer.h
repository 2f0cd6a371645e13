// Timer: a heap-only wrapper around a libuv timer, freed in its close callback.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>

namespace tollgate {

class Timer;
struct TimerCloser {
  void operator()(Timer* timer) const;
};
using TimerPtr = std::unique_ptr<Timer, TimerCloser>;

class Timer {
 public:
  using Callback = std::function<void()>;
  static TimerPtr create(uv_loop_t* loop, Callback callback);
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Calls back once, `ms` after this (loop time); a later start() or stop() replaces it.
  // Both are lazy: libuv's timer stays set where it is when that is no later than needed
  // (it is set again for the rest when it goes off), and a stopped one goes off for
  // nothing. A stopped timer keeps the loop alive until then: close() it to end.
  void start(uint64_t ms);
  void stop();
  // Keeps the loop from waiting on this timer alone.
  void unref() { uv_unref(reinterpret_cast<uv_handle_t*>(&timer_)); }
  void close();

 private:
  Timer(uv_loop_t* loop, Callback callback);
  ~Timer() = default;
  static void onTimer(uv_timer_t* timer);
  uv_timer_t timer_;
  Callback callback_;
  uint64_t due_ = 0;    // loop time the callback is due at
  bool armed_ = false;  // started and not stopped or called back since
};

}  // namespace tollgate
