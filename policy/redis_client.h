// RedisClient: hiredis's asynchronous API on one libuv loop, for the budget store. One
// client per worker loop; it is not thread-safe and calls back on its own loop only.
//
// It speaks to a standalone Redis or to a Redis Cluster without being told which: a command
// goes to the node that owns its routing key's slot once the slot map is known (CLUSTER
// SLOTS), to the first seed before; MOVED updates the map and is followed, ASK is followed
// with ASKING. Scripts go by EVALSHA and fall back to EVAL on NOSCRIPT (a restarted or
// flushed server). Every request has a deadline: past it the request fails, the connection
// it waits on is dropped (its server may be paused or gone) and that node's breaker opens
// for a backoff of 100 ms doubling to 1 s, during which requests to it fail at once. The
// next request after the backoff reconnects. Failures are reported, never retried here.
#pragma once

#include <uv.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/redis_url.h"
#include "common/result.h"
#include "common/units.h"

struct redisAsyncContext;

namespace tollgate {

struct RedisReply {
  enum class Type { kNil, kStatus, kError, kInteger, kString, kArray };
  Type type = Type::kNil;
  int64_t integer = 0;
  std::string str;  // status, error or string
  std::vector<RedisReply> elements;
  bool isError() const { return type == Type::kError; }
};

// A Lua script sent by EVALSHA with its SHA-1 computed once.
struct RedisScript {
  explicit RedisScript(std::string source);
  std::string source;
  std::string sha1;
};

// Slot of a key in Redis Cluster: CRC16 (XMODEM) of its hash tag, modulo 16384.
uint16_t redisKeySlot(std::string_view key);

// Queues AUTH on a new connection, ahead of every command after it (nothing without a
// password). fn gets its reply.
void redisSendAuth(redisAsyncContext* ac, const RedisAuth& auth,
                   void (*fn)(redisAsyncContext*, void*, void*), void* data);

class RedisClient {
 public:
  struct Options {
    std::vector<HostPort> seeds;
    std::chrono::milliseconds timeout{100};
    RedisAuth auth;
  };
  // Error: the server's error reply, or a transport failure (connection, timeout, breaker).
  // A failure with code kNotRun is one the command certainly did not run in: it was never
  // sent, was refused before it ran (TRYAGAIN, CLUSTERDOWN) or waited to be sent again when
  // its deadline came; any other (a timeout on the wire, a connection lost) may have run.
  // (An error reply, a value, never ran either, unless a script failed part way.)
  using Callback = std::function<void(Result<RedisReply>)>;
  static constexpr int kNotRun = -EAGAIN;

  RedisClient(uv_loop_t* loop, Options options);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Sends argv to the node owning routingKey's slot (any node when routingKey is empty).
  void command(std::string_view routingKey, std::vector<std::string> argv, Callback cb);
  // EVALSHA the script with keys and args (all keys must share one slot).
  void eval(const RedisScript& script, std::vector<std::string> keys, std::vector<std::string> args,
            Callback cb);
  // Writes what was queued to every connected node now, instead of on the loop's next
  // turn (a batch sent at the end of a turn then costs one turn less).
  void flushWrites();
  // Fails what is pending (graceful: waits for it, within its deadlines), closes every
  // connection and handle; `closed` runs once the loop has released them. The client may
  // be destroyed from `closed`.
  void close(std::function<void()> closed, bool graceful = false);
  // True once some node answered since the last failure (for tests and readiness).
  bool healthy() const { return healthy_; }
  size_t pending() const { return pending_.size(); }

 private:
  struct Node;
  struct LoopEvents;
  struct Request;
  using RequestPtr = std::shared_ptr<Request>;
  struct InFlight;
  struct Later;

  void send(const RequestPtr& r);
  Node* route(const Request& r);
  Node* node(const std::string& host, uint16_t port);
  bool connect(Node* n);
  void dropNode(Node* n, const std::string& why);
  void finish(const RequestPtr& r, Result<RedisReply> result);
  void retryLater(const RequestPtr& r);
  void onReply(InFlight* f, void* reply);
  void armTimer();
  void onTimer();
  void refreshSlots();
  void applySlots(const RedisReply& reply, const Node* from);
  static void onConnect(const redisAsyncContext* ac, int status);
  static void onAuth(redisAsyncContext* ac, void* reply, void* node);
  static void onDisconnect(const redisAsyncContext* ac, int status);
  static void onReplyThunk(redisAsyncContext* ac, void* reply, void* privdata);
  static int64_t nowMs();
  void armFlush();  // flushWrites() before the loop polls again, or right after this poll

  uv_loop_t* loop_;
  Options options_;
  std::map<std::string, std::unique_ptr<Node>> nodes_;  // "host:port"
  std::vector<Node*> slots_;                            // 16384 entries once known
  std::list<RequestPtr> pending_;                       // in deadline order
  uv_timer_t* timer_ = nullptr;                         // deadlines; freed by its close callback
  std::set<uv_timer_t*> waiting_;                       // requests resent after TRYAGAIN
  uv_prepare_t* flushPrepare_ = nullptr;  // both armed while queued commands wait (armFlush)
  uv_check_t* flushCheck_ = nullptr;
  bool flushArmed_ = false;
  bool writing_ = false;  // in redisAsyncHandleWrite: what it could not write polls for writability
  bool refreshing_ = false;
  bool slotsAsked_ = false;
  // A node failed (refused, reset, timed out): the slot map may be stale (a failover), so
  // the next send asks CLUSTER SLOTS again (of the next seed when the failed one was it).
  bool refreshWanted_ = false;
  void nodeFailed(Node* n);
  bool closing_ = false;
  std::function<void()> closeWhenIdle_;
  bool healthy_ = false;
  size_t nextSeed_ = 0;
  std::string wire_;  // the command being queued, formatted (hiredis copies it)
};

}  // namespace tollgate
