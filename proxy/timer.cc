#include "proxy/timer.h"

namespace tollgate {

void TimerCloser::operator()(Timer* timer) const {
  if (timer) timer->close();
}

TimerPtr Timer::create(uv_loop_t* loop, Callback callback) {
  return TimerPtr(new Timer(loop, std::move(callback)));
}

Timer::Timer(uv_loop_t* loop, Callback callback) : callback_(std::move(callback)) {
  uv_timer_init(loop, &timer_);
  timer_.data = this;
}

void Timer::start(uint64_t ms) {
  uint64_t now = uv_now(timer_.loop);
  due_ = now + ms;
  armed_ = true;
  // Set to go off no later: it keeps its place in libuv's timer heap and, going off early,
  // is set again for the rest. A timeout pushed back on every request (idle, response)
  // then costs no heap update per request.
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(&timer_)) &&
      now + uv_timer_get_due_in(&timer_) <= due_)
    return;
  uv_timer_start(&timer_, onTimer, ms, 0);
}

void Timer::stop() {
  armed_ = false;  // left in the heap: it goes off for nothing, or start() takes it again
}

void Timer::onTimer(uv_timer_t* t) {
  auto* self = static_cast<Timer*>(t->data);
  if (!self->armed_) return;
  uint64_t now = uv_now(t->loop);
  if (now < self->due_) {
    uv_timer_start(t, onTimer, self->due_ - now, 0);
    return;
  }
  self->armed_ = false;
  if (self->callback_) self->callback_();
}

void Timer::close() {
  callback_ = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(&timer_),
           [](uv_handle_t* h) { delete static_cast<Timer*>(h->data); });
}

}  // namespace tollgate
