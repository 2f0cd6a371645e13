#include "audit/redis_replica.h"

#include <hiredis.h>

#include <charconv>
#include <fstream>
#include <string_view>

#include "audit/file_sink.h"
#include "common/log.h"
#include "common/thread_name.h"

namespace tollgate {
namespace {

constexpr size_t kPipeline = 256;  // XADDs per round trip

uint64_t leadingNumber(std::string_view s) {
  uint64_t v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

}  // namespace

RedisStreamReplica::RedisStreamReplica(Options options) : options_(std::move(options)) {}

void RedisStreamReplica::start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] {
    nameThisThread("tg-replica");
    run();
  });
}

RedisStreamReplica::~RedisStreamReplica() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  disconnect();
}

void RedisStreamReplica::onDurable(uint64_t firstSeq, const std::vector<std::string>& lines) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < lines.size(); ++i) queue_.emplace_back(firstSeq + i, lines[i]);
  // Full: the oldest go; they are read back from the log once Redis keeps up again.
  while (queue_.size() > options_.queueLimit) {
    queue_.pop_front();
    dropped_.fetch_add(1);
  }
  wake_.notify_one();
}

bool RedisStreamReplica::waitReplicated(uint64_t seq, std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock(mutex_);
  return progress_.wait_for(lock, limit, [&] { return replicated_ >= seq; });
}

bool RedisStreamReplica::connect() {
  if (ctx_) return true;
  // "{log_id}" in the key is the log's id (written by the sink when it opens the log).
  if (auto at = options_.key.find("{log_id}"); at != std::string::npos) {
    std::ifstream in(options_.logDir + "/LOG_ID");
    std::string id;
    if (!(in >> id)) return false;
    options_.key.replace(at, 8, id);
  }
  timeval tv{static_cast<time_t>(options_.timeout.count() / 1000),
             static_cast<suseconds_t>(options_.timeout.count() % 1000 * 1000)};
  ctx_ = redisConnectWithTimeout(options_.host.c_str(), options_.port, tv);
  if (!ctx_ || ctx_->err) {
    if (!warnedDown_) {
      Log::Line(LogLevel::kWarn, "audit replica: Redis unreachable, records queue meanwhile")
          .add("redis", options_.host + ":" + std::to_string(options_.port))
          .add("error", std::string(ctx_ ? ctx_->errstr : "out of memory"))
          .emit();
      warnedDown_ = true;
    }
    disconnect();
    return false;
  }
  redisSetTimeout(ctx_, tv);
  if (!options_.auth.password.empty()) {
    const auto& a = options_.auth;
    auto* r = static_cast<redisReply*>(
        a.user.empty() ? redisCommand(ctx_, "AUTH %b", a.password.data(), a.password.size())
                       : redisCommand(ctx_, "AUTH %b %b", a.user.data(), a.user.size(),
                                      a.password.data(), a.password.size()));
    bool refused = !r || r->type == REDIS_REPLY_ERROR;
    if (refused && !warnedDown_) {
      Log::Line(LogLevel::kWarn, "audit replica: Redis refused the AUTH, records queue meanwhile")
          .add("redis", options_.host + ":" + std::to_string(options_.port))
          .add("error", r ? std::string(r->str, r->len) : std::string(ctx_->errstr))
          .emit();
      warnedDown_ = true;
    }
    if (r) freeReplyObject(r);
    if (refused) {
      disconnect();
      return false;
    }
  }
  // Where the stream stands: its last id is the last seq it holds.
  auto* r = static_cast<redisReply*>(
      redisCommand(ctx_, "XREVRANGE %s + - COUNT 1", options_.key.c_str()));
  bool ok = r && r->type == REDIS_REPLY_ARRAY;
  if (ok && r->elements > 0 && r->element[0]->type == REDIS_REPLY_ARRAY &&
      r->element[0]->elements > 0) {
    auto* id = r->element[0]->element[0];
    replicated_ = leadingNumber({id->str, id->len});
  } else if (ok) {
    replicated_ = 0;
  }
  if (r) freeReplyObject(r);
  if (!ok) {
    disconnect();
    return false;
  }
  if (warnedDown_) {
    Log::Line(LogLevel::kInfo, "audit replica: Redis reachable again")
        .add("stream", options_.key)
        .add("last_seq", replicated_.load())
        .emit();
    warnedDown_ = false;
  }
  return true;
}

void RedisStreamReplica::disconnect() {
  if (ctx_) redisFree(ctx_);
  ctx_ = nullptr;
}

bool RedisStreamReplica::send(uint64_t first, const std::vector<std::string>& lines) {
  std::string maxlen = std::to_string(options_.maxlen);
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string id = std::to_string(first + i) + "-0";
    if (options_.maxlen > 0) {
      redisAppendCommand(ctx_, "XADD %s MAXLEN ~ %s %s line %b", options_.key.c_str(),
                         maxlen.c_str(), id.c_str(), lines[i].data(), lines[i].size());
    } else {
      redisAppendCommand(ctx_, "XADD %s %s line %b", options_.key.c_str(), id.c_str(),
                         lines[i].data(), lines[i].size());
    }
  }
  bool ok = true;
  for (size_t i = 0; i < lines.size(); ++i) {
    void* raw = nullptr;
    if (redisGetReply(ctx_, &raw) != REDIS_OK || !raw) return false;
    auto* r = static_cast<redisReply*>(raw);
    // An id not above the stream's top: that record is there already.
    if (r->type == REDIS_REPLY_ERROR &&
        std::string_view(r->str, r->len).find("equal or smaller") == std::string_view::npos) {
      Log::Line(LogLevel::kWarn, "audit replica: XADD refused")
          .add("stream", options_.key)
          .add("error", std::string(r->str, r->len))
          .emit();
      ok = false;
    }
    freeReplyObject(r);
  }
  return ok;
}

bool RedisStreamReplica::openLogAt(uint64_t seq) {
  // The segment holding `seq`: the last one that begins at or before it.
  std::string holding;
  uint64_t first = 0;
  for (const auto& seg : auditSegments(options_.logDir)) {
    uint64_t f = auditSegmentFirstSeq(seg);
    if (f == 0) continue;  // empty (just begun)
    if (f > seq) break;
    holding = seg;
    first = f;
  }
  logReader_.reset();
  if (holding.empty()) return false;
  logReader_ = std::make_unique<AuditSegmentReader>(holding);
  readerNext_ = first;
  // A segment's lines are consecutive seqs (verified at the sink's start).
  std::string line;
  while (readerNext_ < seq && logReader_->next(line, false)) ++readerNext_;
  return readerNext_ == seq;
}

std::vector<std::string> RedisStreamReplica::readLog(uint64_t from, uint64_t to) {
  std::vector<std::string> out;
  if ((!logReader_ || readerNext_ != from) && !openLogAt(from)) return out;
  std::string line;
  bool followed = false, reopened = false;  // since the last line read
  while (from <= to) {
    if (logReader_->next(line, false)) {
      out.push_back(std::move(line));
      ++from;
      ++readerNext_;
      followed = reopened = false;
      continue;
    }
    // The end of what was there at open: the segment may have grown since, or `from`
    // begins the next one; else the log does not have it (the caller skips the gap).
    if (!followed) {
      logReader_->follow();
      followed = true;
      continue;
    }
    if (reopened || !openLogAt(from)) break;
    reopened = true;
    followed = false;
  }
  return out;
}

void RedisStreamReplica::run() {
  auto backoff = std::chrono::milliseconds(100);
  std::chrono::steady_clock::time_point deadline{};
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return stopping_.load() || !queue_.empty(); });
      // At shutdown the last records (the final checkpoint) get a moment to go out; what
      // is left then is read from the log by the next process.
      if (stopping_ && deadline == std::chrono::steady_clock::time_point{})
        deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      if (stopping_ && (queue_.empty() || std::chrono::steady_clock::now() > deadline)) return;
    }
    if (!connect()) {
      if (stopping_) return;
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait_for(lock, backoff, [this] { return stopping_.load(); });
      backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
      continue;
    }
    // The next batch: what the stream misses before the queue's head comes from the log.
    uint64_t first;
    std::vector<std::string> batch;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!queue_.empty() && queue_.front().first <= replicated_) queue_.pop_front();
      if (queue_.empty()) continue;
      first = replicated_ + 1;
      if (queue_.front().first == first) {
        for (size_t i = 0; i < queue_.size() && batch.size() < kPipeline; ++i)
          batch.push_back(queue_[i].second);
        logReader_.reset();  // caught up
      }
    }
    if (batch.empty()) {
      uint64_t head;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        head = queue_.empty() ? first : queue_.front().first;
      }
      batch = readLog(first, std::min(head - 1, first + kPipeline - 1));
      if (batch.empty()) {  // the log does not have them either: skip (a gap in the replica)
        replicated_ = head - 1;
        continue;
      }
    }
    if (!send(first, batch)) {
      // Refused (OOM, NOPERM, READONLY…) or cut off: the next try waits, as a failed connect
      // does, so that a Redis refusing every XADD is not reconnected to in a tight loop.
      disconnect();
      if (stopping_) return;
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait_for(lock, backoff, [this] { return stopping_.load(); });
      backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
      continue;
    }
    backoff = std::chrono::milliseconds(100);  // only a batch that went in resets it
    {
      std::lock_guard<std::mutex> lock(mutex_);
      replicated_ = first + batch.size() - 1;
      while (!queue_.empty() && queue_.front().first <= replicated_) queue_.pop_front();
    }
    progress_.notify_all();
  }
}

}  // namespace tollgate
