// RedisStreamReplica against a real redis-server: what the stream misses before the queue's
// head is read from the log a line at a time; seqs the log does not have are skipped (a gap
// in the replica), and the queue goes on after them.
#include "audit/redis_replica.h"

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <filesystem>
#include <thread>

#include "audit/file_sink.h"
#include "tests/unit/audit/log_writer.h"
#include "tests/unit/redis_process.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;

// The stream's entries: (seq of the id, value).
std::vector<std::pair<uint64_t, std::string>> streamOf(uint16_t port, const std::string& key) {
  std::vector<std::pair<uint64_t, std::string>> out;
  redisContext* c = redisConnect("127.0.0.1", port);
  if (!c || c->err) return out;
  auto* r = static_cast<redisReply*>(redisCommand(c, "XRANGE %s - +", key.c_str()));
  for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; ++i) {
    const redisReply* e = r->element[i];
    out.emplace_back(std::stoull(e->element[0]->str), e->element[1]->element[1]->str);
  }
  if (r) freeReplyObject(r);
  redisFree(c);
  return out;
}

TEST(RedisReplicaTest, CatchesUpFromTheLogAndSkipsWhatTheLogDoesNotHave) {
  RedisProcess redis;
  ASSERT_TRUE(redis.ping()) << "redis-server did not start (is it installed?)";
  fs::path dir = fs::temp_directory_path() / ("tollgate-replica-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  options.segmentBytes = 2048;  // the catch-up crosses segments
  writeAwaited(options, 0, 30);
  auto log = readAuditLog(dir.string()).value();
  ASSERT_GT(auditSegments(dir.string()).size(), 3u);

  RedisStreamReplica::Options ro;
  ro.port = redis.port();
  ro.key = "tollgate:audit:test";
  ro.logDir = dir.string();
  {
    RedisStreamReplica replica(ro);
    replica.start();
    // The queue begins past the log's end: seqs in between are in no place.
    uint64_t head = log.size() + 10;
    replica.onDurable(head, {"{\"seq\":\"head\"}", "{\"seq\":\"next\"}"});
    ASSERT_TRUE(replica.waitReplicated(head + 1, std::chrono::seconds(10)))
        << "replicated up to " << replica.replicated();
  }
  auto stream = streamOf(redis.port(), ro.key);
  ASSERT_EQ(stream.size(), log.size() + 2);
  for (size_t i = 0; i < log.size(); ++i) {
    EXPECT_EQ(stream[i].first, i + 1);
    EXPECT_EQ(stream[i].second, log[i]);
  }
  EXPECT_EQ(stream[log.size()].first, log.size() + 10);
  EXPECT_EQ(stream.back().second, "{\"seq\":\"next\"}");
  fs::remove_all(dir);
}

// Redis replies to a command on the replica's connection, at `port`: the reply as a string.
std::string command(uint16_t port, const char* cmd) {
  redisContext* c = redisConnect("127.0.0.1", port);
  if (!c || c->err) return "";
  auto* r = static_cast<redisReply*>(redisCommand(c, cmd));
  std::string out = r && r->str ? std::string(r->str, r->len) : "";
  if (r) freeReplyObject(r);
  redisFree(c);
  return out;
}

uint64_t connectionsReceived(uint16_t port) {
  std::string info = command(port, "INFO stats");
  auto at = info.find("total_connections_received:");
  return at == std::string::npos ? 0 : std::stoull(info.substr(at + 27));
}

// XADDs Redis was sent, run or refused (Redis 7 counts a command refused for want of
// memory as rejected_calls, not calls).
uint64_t xaddsReceived(uint16_t port) {
  std::string info = command(port, "INFO commandstats");
  auto line = info.find("cmdstat_xadd:");
  if (line == std::string::npos) return 0;
  auto field = [&](const std::string& name) -> uint64_t {
    auto at = info.find(name + "=", line);
    auto end = info.find('\n', line);
    return at == std::string::npos || at > end ? 0 : std::stoull(info.substr(at + name.size() + 1));
  };
  return field("calls") + field("rejected_calls");
}

// A Redis that refuses every XADD (out of memory here; NOPERM or READONLY alike) is retried
// with a backoff, not reconnected to in a tight loop.
TEST(RedisReplicaTest, AnXaddRefusedIsRetriedWithABackoff) {
  RedisProcess redis;
  ASSERT_TRUE(redis.ping()) << "redis-server did not start (is it installed?)";
  fs::path dir = fs::temp_directory_path() / ("tollgate-replica-oom-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  writeAwaited(options, 0, 3);
  ASSERT_EQ(command(redis.port(), "CONFIG SET maxmemory-policy noeviction"), "OK");
  ASSERT_EQ(command(redis.port(), "CONFIG SET maxmemory 1"), "OK");
  RedisStreamReplica::Options ro;
  ro.port = redis.port();
  ro.key = "tollgate:audit:oom";
  ro.logDir = dir.string();
  {
    RedisStreamReplica replica(ro);
    replica.start();
    replica.onDurable(1, {"{\"seq\":1}"});
    uint64_t before = connectionsReceived(redis.port());
    uint64_t xaddsBefore = xaddsReceived(redis.port());
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    uint64_t made = connectionsReceived(redis.port()) - before;
    uint64_t tried = xaddsReceived(redis.port()) - xaddsBefore;
    // 100 ms doubling: a handful in 1.5 s (and the INFO calls' connections), not hundreds,
    // and a handful of tries, retried (a loop on one connection would send thousands).
    EXPECT_LE(made, 10u);
    EXPECT_GE(tried, 2u);
    EXPECT_LE(tried, 8u);
    EXPECT_EQ(replica.replicated(), 0u);
    command(redis.port(), "CONFIG SET maxmemory 0");  // room again: it gets through
    EXPECT_TRUE(replica.waitReplicated(1, std::chrono::seconds(10)));
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tollgate
