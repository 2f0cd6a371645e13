// RedisClient against a real redis-server: what a loop turn queues is written without anyone
// calling flushWrites(), whatever phase of the loop queued it, and a write the socket cannot
// take at once is finished when it can. (The client polls its sockets for writability only
// then; a command left unwritten would wait for its deadline and fail.)
#include <gtest/gtest.h>
#include <uv.h>

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "policy/redis_client.h"
#include "tests/unit/redis_process.h"

namespace tollgate {
namespace {

class RedisClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(redis.ping()) << "redis-server did not start (is it installed?)";
    uv_loop_init(&loop);
    RedisClient::Options options;
    options.seeds = {HostPort{"127.0.0.1", redis.port()}};
    options.timeout = std::chrono::milliseconds(3000);
    client = std::make_unique<RedisClient>(&loop, options);
    // Connected first: while a connect is in progress the socket is polled for writing
    // anyway, which would hide a command left unwritten.
    bool ready = false;
    client->command("", {"PING"}, [&](Result<RedisReply> r) { ready = r.ok(); });
    ASSERT_TRUE(runUntil([&] { return ready; }));
  }
  void TearDown() override {
    bool closed = false;
    client->close([&] { closed = true; });
    while (!closed) uv_run(&loop, UV_RUN_ONCE);
    uv_run(&loop, UV_RUN_DEFAULT);
    client.reset();
    EXPECT_EQ(uv_loop_close(&loop), 0);
  }
  // Runs the loop until `done`; false past 5 s of loop time (a command never written).
  template <typename Done>
  bool runUntil(Done done) {
    uint64_t until = uv_now(&loop) + 5000;
    while (!done() && uv_now(&loop) < until) uv_run(&loop, UV_RUN_ONCE);
    return done();
  }
  RedisProcess redis;
  uv_loop_t loop;
  std::unique_ptr<RedisClient> client;
};

// Queued in a timer callback, before the loop polls: written before the poll waits.
TEST_F(RedisClientTest, ACommandQueuedInATimerIsWrittenBeforeThePollWaits) {
  Result<RedisReply> got = Error{-1, "no answer"};
  bool answered = false;
  uint64_t queuedAt = 0;
  uv_timer_t timer;
  uv_timer_init(&loop, &timer);
  struct Ctx {
    RedisClient* client;
    Result<RedisReply>* got;
    bool* answered;
    uint64_t* queuedAt;
  } ctx{client.get(), &got, &answered, &queuedAt};
  timer.data = &ctx;
  uv_timer_start(
      &timer,
      [](uv_timer_t* t) {
        auto* c = static_cast<Ctx*>(t->data);
        *c->queuedAt = uv_now(t->loop);
        c->client->command("", {"PING"}, [c](Result<RedisReply> r) {
          *c->got = std::move(r);
          *c->answered = true;
        });
      },
      10, 0);
  ASSERT_TRUE(runUntil([&] { return answered; }));
  ASSERT_TRUE(got) << got.error().message;
  EXPECT_EQ(got.value().str, "PONG");
  EXPECT_LT(uv_now(&loop), queuedAt + 2000);  // not freed by the request's deadline
  bool timerClosed = false;
  timer.data = &timerClosed;
  uv_close(reinterpret_cast<uv_handle_t*>(&timer),
           [](uv_handle_t* h) { *static_cast<bool*>(h->data) = true; });
  while (!timerClosed) uv_run(&loop, UV_RUN_ONCE);  // before the timer leaves the stack
}

// Queued in a reply callback (after the poll): 200 commands, each sent from the reply to
// the one before, all answered in order.
TEST_F(RedisClientTest, CommandsQueuedInReplyCallbacksAreWritten) {
  int answered = 0;
  std::string error;
  std::function<void(Result<RedisReply>)> next = [&](Result<RedisReply> r) {
    if (!r || r.value().integer != answered + 1) {
      error = r ? "INCR gave " + std::to_string(r.value().integer) : r.error().message;
      return;
    }
    if (++answered < 200) client->command("chain", {"INCR", "chain"}, next);
  };
  client->command("chain", {"INCR", "chain"}, next);
  ASSERT_TRUE(runUntil([&] { return answered == 200 || !error.empty(); })) << answered;
  EXPECT_EQ(error, "");
  EXPECT_EQ(answered, 200);
}

// A 16 MiB value is more than the socket takes at once: the rest goes as it drains.
TEST_F(RedisClientTest, AWriteTheSocketCannotTakeAtOnceIsFinished) {
  std::string big(16 << 20, 'x');
  big[12345] = 'y';
  bool set = false;
  Result<RedisReply> back = Error{-1, "no answer"};
  bool answered = false;
  client->command("big", {"SET", "big", big}, [&](Result<RedisReply> r) {
    set = r && r.value().str == "OK";
    client->command("big", {"GETRANGE", "big", "12340", "12349"}, [&](Result<RedisReply> g) {
      back = std::move(g);
      answered = true;
    });
  });
  ASSERT_TRUE(runUntil([&] { return answered; }));
  EXPECT_TRUE(set);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back.value().str, "xxxxxyxxxx");
}

// A request queued behind the CLUSTER SLOTS of a new client (which waits 5 timeouts) fails
// at its own deadline, not at that one's.
TEST_F(RedisClientTest, ARequestBehindASlowClusterSlotsFailsAtItsOwnDeadline) {
  redisContext* admin = redisConnect("127.0.0.1", redis.port());
  ASSERT_TRUE(admin && !admin->err);
  auto* paused = static_cast<redisReply*>(redisCommand(admin, "CLIENT PAUSE 800 ALL"));
  ASSERT_TRUE(paused && paused->type == REDIS_REPLY_STATUS);
  freeReplyObject(paused);
  RedisClient::Options options;
  options.seeds = {HostPort{"127.0.0.1", redis.port()}};
  options.timeout = std::chrono::milliseconds(100);
  RedisClient fresh(&loop, options);  // its first send asks CLUSTER SLOTS first
  bool failed = false;
  uint64_t started = uv_now(&loop), answered = 0;
  fresh.command("k", {"PING"}, [&](Result<RedisReply> r) {
    failed = !r.ok();
    answered = uv_now(&loop);
  });
  ASSERT_TRUE(runUntil([&] { return answered != 0; }));
  EXPECT_TRUE(failed);
  EXPECT_LT(answered - started, 350u);  // 100 ms and the timer's slack; 500 before
  bool closed = false;
  fresh.close([&] { closed = true; });
  while (!closed) uv_run(&loop, UV_RUN_ONCE);
  redisFree(admin);
}

// A seed that accepts connections and never answers (its host hung, packets dropped) is
// rotated away from after a timeout, as a seed that refuses is: the next seed serves.
TEST_F(RedisClientTest, ASeedThatNeverAnswersIsLeftForTheNextOne) {
  int hole = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(hole, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(hole, 16), 0);  // the kernel completes handshakes; no one reads
  socklen_t len = sizeof a;
  ::getsockname(hole, reinterpret_cast<sockaddr*>(&a), &len);
  RedisClient::Options options;
  options.seeds = {HostPort{"127.0.0.1", ntohs(a.sin_port)}, HostPort{"127.0.0.1", redis.port()}};
  options.timeout = std::chrono::milliseconds(100);
  RedisClient fresh(&loop, options);
  int ok = 0, failed = 0;
  for (int i = 0; i < 10 && ok == 0; ++i) {
    bool done = false;
    fresh.command("k", {"PING"}, [&](Result<RedisReply> r) {
      (r.ok() ? ok : failed)++;
      done = true;
    });
    ASSERT_TRUE(runUntil([&] { return done; }));
  }
  EXPECT_EQ(ok, 1) << failed << " failed first";
  EXPECT_LE(failed, 2);
  bool closed = false;
  fresh.close([&] { closed = true; });
  while (!closed) uv_run(&loop, UV_RUN_ONCE);
  ::close(hole);
}

}  // namespace
}  // namespace tollgate
