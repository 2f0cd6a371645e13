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
  uv_timer_start(&timer_, onTimer, ms, 0);
}

void Timer::stop() {
  uv_timer_stop(&timer_);
}

void Timer::onTimer(uv_timer_t* t) {
  auto* self = static_cast<Timer*>(t->data);
  if (self->callback_) self->callback_();
}

void Timer::close() {
  callback_ = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(&timer_),
           [](uv_handle_t* h) { delete static_cast<Timer*>(h->data); });
}

}  // namespace tollgate
