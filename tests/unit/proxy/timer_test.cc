// Timer on a real libuv loop: start() and stop() are lazy (libuv's timer is left where it is
// when that is early enough), so what must hold is when the callback runs, and how often.
#include <gtest/gtest.h>
#include <uv.h>

#include <functional>
#include <vector>

#include "proxy/timer.h"

namespace tollgate {
namespace {

class TimerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    uv_loop_init(&loop_);
    begin_ = uv_now(&loop_);
    timer_ = Timer::create(&loop_, [this] {
      ++fired_;
      firedAt_ = uv_now(&loop_);
    });
  }
  void TearDown() override {
    timer_.reset();
    uv_run(&loop_, UV_RUN_DEFAULT);  // close callbacks
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }
  // Calls fn at each of `at` (ms of loop time from now).
  void at(std::vector<uint64_t> times, std::function<void()> fn) {
    for (auto ms : times) {
      auto* t = new uv_timer_t;
      uv_timer_init(&loop_, t);
      t->data = new std::function<void()>(fn);
      uv_timer_start(
          t,
          [](uv_timer_t* h) {
            auto* f = static_cast<std::function<void()>*>(h->data);
            (*f)();
            delete f;
            uv_close(reinterpret_cast<uv_handle_t*>(h),
                     [](uv_handle_t* c) { delete reinterpret_cast<uv_timer_t*>(c); });
          },
          ms, 0);
    }
  }
  uv_loop_t loop_;
  uint64_t begin_ = 0;  // loop time at the start
  TimerPtr timer_;      // the timer under test: counts its callbacks
  int fired_ = 0;
  uint64_t firedAt_ = 0;  // loop time of the last callback
};

// Pushed back before it is due, again and again: it calls back once, at the last deadline.
TEST_F(TimerTest, PushedBackItCallsBackOnceAtTheLastDeadline) {
  uint64_t lastPush = 0;
  timer_->start(40);
  at({10, 20, 30, 50}, [&] {
    lastPush = uv_now(&loop_);
    timer_->start(40);
  });
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_EQ(fired_, 1);
  EXPECT_GE(lastPush, begin_ + 50);
  EXPECT_GE(firedAt_, lastPush + 40);
}

// Brought forward: it calls back at the earlier deadline, not the one it was set for.
TEST_F(TimerTest, BroughtForwardItCallsBackAtTheEarlierDeadline) {
  timer_->start(5000);
  timer_->start(10);
  uv_run(&loop_, UV_RUN_DEFAULT);  // ends when it has called back (5 s if it kept 5000)
  EXPECT_EQ(fired_, 1);
  EXPECT_GE(firedAt_, begin_ + 10);
  EXPECT_LT(firedAt_, begin_ + 2000);
}

// Stopped, it never calls back (libuv's timer goes off for nothing); started again after
// the stop, it does, once, at the new deadline.
TEST_F(TimerTest, StoppedItNeverCallsBackAndStartedAgainItDoes) {
  timer_->start(20);
  timer_->stop();
  uv_run(&loop_, UV_RUN_DEFAULT);  // past the first deadline
  EXPECT_EQ(fired_, 0);
  EXPECT_GE(uv_now(&loop_), begin_ + 20);
  timer_->start(30);
  at({10}, [&] { timer_->stop(); });
  at({15}, [&] { timer_->start(30); });  // before the stale deadline: it is pushed back
  uint64_t restart = uv_now(&loop_);
  uv_run(&loop_, UV_RUN_DEFAULT);
  EXPECT_EQ(fired_, 1);
  EXPECT_GE(firedAt_, restart + 15 + 30);
}

}  // namespace
}  // namespace tollgate
