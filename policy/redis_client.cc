#include "policy/redis_client.h"

// hiredis's C headers (its event hooks on the loop are RedisClient::LoopEvents).
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "common/log.h"

namespace tollgate {
namespace {

constexpr int kSlots = 16384;
constexpr int kMaxRedirects = 5;
constexpr int64_t kBackoffMinMs = 100;
constexpr int64_t kBackoffMaxMs = 1000;
constexpr int64_t kTryAgainMs = 10;

uint16_t crc16(std::string_view s) {
  uint16_t crc = 0;
  for (unsigned char c : s) {
    crc ^= static_cast<uint16_t>(c << 8);
    for (int i = 0; i < 8; ++i)
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
  }
  return crc;
}

RedisReply convert(const redisReply* r) {
  RedisReply out;
  switch (r->type) {
    case REDIS_REPLY_STATUS:
      out.type = RedisReply::Type::kStatus;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ERROR:
      out.type = RedisReply::Type::kError;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = RedisReply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_STRING:
      out.type = RedisReply::Type::kString;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ARRAY:
      out.type = RedisReply::Type::kArray;
      out.elements.reserve(r->elements);
      for (size_t i = 0; i < r->elements; ++i) out.elements.push_back(convert(r->element[i]));
      break;
    default:
      out.type = RedisReply::Type::kNil;
  }
  return out;
}

// argv in the protocol's form, into out (cleared): hiredis's own formatter builds it with a
// printf-like call per argument, which a batch of budget operations paid ~100 times.
void formatCommand(const std::vector<std::string>& argv, std::string& out) {
  size_t size = 16;
  for (const auto& a : argv) size += a.size() + 24;
  out.resize(size);
  char* p = out.data();
  auto number = [&p](char mark, size_t n) {
    *p++ = mark;
    p = std::to_chars(p, p + 20, n).ptr;
    *p++ = '\r';
    *p++ = '\n';
  };
  number('*', argv.size());
  for (const auto& a : argv) {
    number('$', a.size());
    if (!a.empty()) std::memcpy(p, a.data(), a.size());
    p += a.size();
    *p++ = '\r';
    *p++ = '\n';
  }
  out.resize(static_cast<size_t>(p - out.data()));
}

// "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381" -> host, port.
bool parseRedirect(std::string_view err, std::string& host, uint16_t& port) {
  auto sp = err.rfind(' ');
  if (sp == std::string_view::npos) return false;
  auto addr = err.substr(sp + 1);
  auto colon = addr.rfind(':');
  if (colon == std::string_view::npos) return false;
  host.assign(addr.substr(0, colon));
  auto p = addr.substr(colon + 1);
  auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
  return ec == std::errc() && end == p.data() + p.size();
}

}  // namespace

RedisScript::RedisScript(std::string src) : source(std::move(src)) {
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(source.data()), source.size(), digest);
  static const char* hex = "0123456789abcdef";
  for (unsigned char b : digest) {
    sha1 += hex[b >> 4];
    sha1 += hex[b & 15];
  }
}

uint16_t redisKeySlot(std::string_view key) {
  auto open = key.find('{');
  if (open != std::string_view::npos) {
    auto close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1)
      key = key.substr(open + 1, close - open - 1);
  }
  return crc16(key) % kSlots;
}

void redisSendAuth(redisAsyncContext* ac, const RedisAuth& auth,
                   void (*fn)(redisAsyncContext*, void*, void*), void* data) {
  if (auth.password.empty()) return;
  if (auth.user.empty()) {
    redisAsyncCommand(ac, fn, data, "AUTH %b", auth.password.data(), auth.password.size());
  } else {
    redisAsyncCommand(ac, fn, data, "AUTH %b %b", auth.user.data(), auth.user.size(),
                      auth.password.data(), auth.password.size());
  }
}

struct RedisClient::Node {
  RedisClient* client;
  std::string host;
  uint16_t port;
  std::string name;
  redisAsyncContext* ac = nullptr;
  int64_t openUntilMs = 0;  // breaker: no connection attempts before this
  int64_t backoffMs = 0;
  std::string lastError;
};

// hiredis's event hooks on the loop, in place of its libuv adapter. The socket is polled for
// reading all along, and for writing only while a connect is in progress or when a write
// could not be taken whole. Commands a loop turn queues are written by flushWrites(), at the
// latest right before the loop polls again (armFlush). hiredis's adapter restarted its poll
// handle for every command batch, twice (to write, and after writing), and libuv
// re-registers a restarted handle with epoll at the next poll (an ADD that fails, then a
// MOD): ~0.5 epoll_ctl per budgeted call.
struct RedisClient::LoopEvents {
  RedisClient* client;
  redisAsyncContext* ac;  // null once hiredis let go of it (cleanup)
  uv_poll_t poll;
  int watched = 0;         // what the poll handle watches
  bool read = false;       // hiredis wants to read
  bool pollWrite = false;  // and to be told when it can write

  static LoopEvents* of(void* privdata) { return static_cast<LoopEvents*>(privdata); }
  void update() {
    int e = (read ? UV_READABLE : 0) | (pollWrite ? UV_WRITABLE : 0);
    if (e == watched) return;
    watched = e;
    if (e)
      uv_poll_start(&poll, e, onPoll);
    else
      uv_poll_stop(&poll);
  }
  static void onPoll(uv_poll_t* handle, int status, int events) {
    auto* le = static_cast<LoopEvents*>(handle->data);
    int ev = status < 0 ? le->watched : events;  // an error: hiredis's read or write finds it
    if (le->ac && (ev & UV_READABLE)) redisAsyncHandleRead(le->ac);
    if (le->ac && (ev & UV_WRITABLE)) {
      le->client->writing_ = true;
      redisAsyncHandleWrite(le->ac);
      le->client->writing_ = false;
    }
  }
  static void addRead(void* p) {
    of(p)->read = true;
    of(p)->update();
  }
  static void delRead(void* p) {
    of(p)->read = false;
    of(p)->update();
  }
  static void addWrite(void* p) {
    auto* le = of(p);
    if (!(le->ac->c.flags & REDIS_CONNECTED) || le->client->writing_) {
      le->pollWrite = true;  // the connect's end, or the rest of a write
      le->update();
    } else {
      le->client->armFlush();  // a command queued: written at the turn's end
    }
  }
  static void delWrite(void* p) {
    of(p)->pollWrite = false;
    of(p)->update();
  }
  static void cleanup(void* p) {
    auto* le = of(p);
    le->ac = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(&le->poll),
             [](uv_handle_t* h) { delete static_cast<LoopEvents*>(h->data); });
  }
  static bool attach(RedisClient* client, redisAsyncContext* ac, uv_loop_t* loop) {
    auto* le = new LoopEvents{client, ac, {}};
    if (uv_poll_init_socket(loop, &le->poll, ac->c.fd) != 0) {
      delete le;
      return false;
    }
    le->poll.data = le;
    ac->ev.data = le;
    ac->ev.addRead = addRead;
    ac->ev.delRead = delRead;
    ac->ev.addWrite = addWrite;
    ac->ev.delWrite = delWrite;
    ac->ev.cleanup = cleanup;
    return true;
  }
};

struct RedisClient::Request {
  std::vector<std::string> argv;
  std::string routingKey;
  Callback cb;
  int64_t deadlineMs = 0;
  int redirects = 0;
  bool asking = false;
  Node* askNode = nullptr;
  const RedisScript* script = nullptr;  // argv[1] is its sha1 while EVALSHA
  bool done = false;
  bool queued = false;  // in pending_, at pos
  bool onWire = false;  // sent, its reply not read yet: it may run
  std::list<RequestPtr>::iterator pos;
  Node* sentTo = nullptr;
};

// What hiredis carries for one sent command; freed by its reply callback.
struct RedisClient::InFlight {
  RedisClient* client;
  RequestPtr request;
  Node* node;
};

RedisClient::RedisClient(uv_loop_t* loop, Options options)
    : loop_(loop), options_(std::move(options)) {
  timer_ = new uv_timer_t;
  uv_timer_init(loop_, timer_);
  timer_->data = this;
  flushPrepare_ = new uv_prepare_t;
  uv_prepare_init(loop_, flushPrepare_);
  flushPrepare_->data = this;
  flushCheck_ = new uv_check_t;
  uv_check_init(loop_, flushCheck_);
  flushCheck_->data = this;
}

void RedisClient::armFlush() {
  if (flushArmed_ || closing_) return;
  flushArmed_ = true;
  uv_prepare_start(flushPrepare_,
                   [](uv_prepare_t* h) { static_cast<RedisClient*>(h->data)->flushWrites(); });
  uv_check_start(flushCheck_,
                 [](uv_check_t* h) { static_cast<RedisClient*>(h->data)->flushWrites(); });
}

RedisClient::~RedisClient() {
  // close() must have run; a client destroyed without it leaks nothing but its timer.
  for (auto& [name, n] : nodes_) {
    if (n->ac) {
      auto* ac = n->ac;
      n->ac = nullptr;
      redisAsyncFree(ac);
    }
  }
}

int64_t RedisClient::nowMs() {
  return static_cast<int64_t>(uv_hrtime() / 1'000'000);
}

RedisClient::Node* RedisClient::node(const std::string& host, uint16_t port) {
  std::string name = formatHostPort(host, port);
  auto& n = nodes_[name];
  if (!n) n.reset(new Node{this, host, port, name, nullptr, 0, 0, {}});
  return n.get();
}

void RedisClient::command(std::string_view routingKey, std::vector<std::string> argv, Callback cb) {
  auto r = std::make_shared<Request>();
  r->argv = std::move(argv);
  r->routingKey = std::string(routingKey);
  r->cb = std::move(cb);
  r->deadlineMs = nowMs() + options_.timeout.count();
  send(r);
}

void RedisClient::eval(const RedisScript& script, std::vector<std::string> keys,
                       std::vector<std::string> args, Callback cb) {
  auto r = std::make_shared<Request>();
  r->argv.reserve(3 + keys.size() + args.size());
  r->argv.push_back("EVALSHA");
  r->argv.push_back(script.sha1);
  r->argv.push_back(std::to_string(keys.size()));
  if (!keys.empty()) r->routingKey = keys.front();
  for (auto& k : keys) r->argv.push_back(std::move(k));
  for (auto& a : args) r->argv.push_back(std::move(a));
  r->script = &script;
  r->cb = std::move(cb);
  r->deadlineMs = nowMs() + options_.timeout.count();
  send(r);
}

RedisClient::Node* RedisClient::route(const Request& r) {
  if (r.asking && r.askNode) return r.askNode;
  if (!r.routingKey.empty() && !slots_.empty()) {
    if (Node* n = slots_[redisKeySlot(r.routingKey)]) return n;
  }
  const auto& seed = options_.seeds[nextSeed_ % options_.seeds.size()];
  return node(seed.host, seed.port);
}

bool RedisClient::connect(Node* n) {
  redisAsyncContext* ac = redisAsyncConnect(n->host.c_str(), n->port);
  if (!ac) {
    n->lastError = "out of memory";
    return false;
  }
  if (ac->err) {
    n->lastError = ac->errstr;
    redisAsyncFree(ac);
    return false;
  }
  if (!LoopEvents::attach(this, ac, loop_)) {
    n->lastError = "cannot attach to the loop";
    redisAsyncFree(ac);
    return false;
  }
  ac->data = n;
  redisAsyncSetConnectCallback(ac, onConnect);
  redisAsyncSetDisconnectCallback(ac, onDisconnect);
  n->ac = ac;
  // First on the connection, so that every command after it is authenticated.
  redisSendAuth(ac, options_.auth, onAuth, n);
  return true;
}

void RedisClient::onAuth(redisAsyncContext* ac, void* raw, void* data) {
  auto* r = static_cast<redisReply*>(raw);
  auto* n = static_cast<Node*>(data);
  if (!r || r->type != REDIS_REPLY_ERROR || n->ac != ac) return;
  // The commands behind it fail on their own (NOAUTH); the node's error says why.
  n->client->dropNode(n, "AUTH refused: " + std::string(r->str, r->len));
}

void RedisClient::onConnect(const redisAsyncContext* ac, int status) {
  auto* n = static_cast<Node*>(ac->data);
  if (status == REDIS_OK) return;
  // hiredis frees the context after this callback and fails what was queued on it.
  if (n->ac == ac) {
    n->ac = nullptr;
    n->lastError = ac->errstr;
    n->backoffMs = std::clamp(n->backoffMs * 2, kBackoffMinMs, kBackoffMaxMs);
    n->openUntilMs = nowMs() + n->backoffMs;
    n->client->healthy_ = false;
    n->client->nodeFailed(n);
  }
}

void RedisClient::nodeFailed(Node* n) {
  // The seed that failed is not asked again first; another one is.
  if (options_.seeds.size() > 1) {
    const auto& seed = options_.seeds[nextSeed_ % options_.seeds.size()];
    if (seed.host == n->host && seed.port == n->port) ++nextSeed_;
  }
  // In a cluster, a master that fails may have been replaced by its replica: no live node
  // would ever send the MOVED that tells, so the map is asked for again.
  if (!slots_.empty()) refreshWanted_ = true;
}

void RedisClient::onDisconnect(const redisAsyncContext* ac, int status) {
  auto* n = static_cast<Node*>(ac->data);
  if (n->ac != ac) return;  // dropped on purpose; already accounted for
  n->ac = nullptr;
  if (status != REDIS_OK) {
    n->lastError = ac->errstr;
    n->backoffMs = std::clamp(n->backoffMs * 2, kBackoffMinMs, kBackoffMaxMs);
    n->openUntilMs = nowMs() + n->backoffMs;
    n->client->healthy_ = false;
    n->client->nodeFailed(n);
  }
}

void RedisClient::dropNode(Node* n, const std::string& why) {
  n->lastError = why;
  n->backoffMs = std::clamp(n->backoffMs * 2, kBackoffMinMs, kBackoffMaxMs);
  n->openUntilMs = nowMs() + n->backoffMs;
  healthy_ = false;
  if (auto* ac = n->ac) {
    n->ac = nullptr;
    redisAsyncFree(ac);  // fails every command still queued on it
  }
}

void RedisClient::send(const RequestPtr& r) {
  if (closing_) {
    finish(r, Error{kNotRun, "redis client is closing"});
    return;
  }
  if (!slotsAsked_ || (refreshWanted_ && !refreshing_)) {
    slotsAsked_ = true;  // a standalone server answers with an error, which is ignored
    refreshWanted_ = false;
    refreshSlots();
  }
  Node* n = route(*r);
  if (!n->ac) {
    if (nowMs() < n->openUntilMs) {
      finish(r, Error{kNotRun, "redis " + n->name + " unavailable (" + n->lastError +
                                   "; retrying in " + std::to_string(n->openUntilMs - nowMs()) +
                                   " ms)"});
      return;
    }
    if (!connect(n)) {
      n->backoffMs = std::clamp(n->backoffMs * 2, kBackoffMinMs, kBackoffMaxMs);
      n->openUntilMs = nowMs() + n->backoffMs;
      finish(r, Error{kNotRun, "redis " + n->name + ": " + n->lastError});
      return;
    }
  }
  if (!r->queued) {
    pending_.push_back(r);
    r->pos = std::prev(pending_.end());
    r->queued = true;
    armTimer();
  }
  if (r->asking) redisAsyncCommand(n->ac, nullptr, nullptr, "ASKING");
  std::string& wire = wire_;
  formatCommand(r->argv, wire);
  auto* f = new InFlight{this, r, n};
  r->sentTo = n;
  if (redisAsyncFormattedCommand(n->ac, onReplyThunk, f, wire.data(), wire.size()) != REDIS_OK) {
    delete f;
    finish(r, Error{kNotRun, "redis " + n->name + ": cannot queue the command"});
    return;
  }
  r->onWire = true;
}

void RedisClient::flushWrites() {
  if (flushArmed_) {
    flushArmed_ = false;
    uv_prepare_stop(flushPrepare_);
    uv_check_stop(flushCheck_);
  }
  writing_ = true;
  for (auto& [name, n] : nodes_) {
    // Only once connected: hiredis would take a connect in progress for a done one.
    if (n->ac && (n->ac->c.flags & REDIS_CONNECTED)) redisAsyncHandleWrite(n->ac);
  }
  writing_ = false;
}

void RedisClient::onReplyThunk(redisAsyncContext*, void* reply, void* privdata) {
  auto* f = static_cast<InFlight*>(privdata);
  f->client->onReply(f, reply);
}

void RedisClient::onReply(InFlight* f, void* raw) {
  std::unique_ptr<InFlight> owned(f);
  RequestPtr r = f->request;
  Node* n = f->node;
  if (r->done) return;         // timed out already
  if (raw) r->onWire = false;  // answered: whatever comes next is decided here
  if (!raw) {
    // The connection went away with the command on it.
    finish(r, Error{-1, "redis " + n->name + ": connection lost" +
                            (n->lastError.empty() ? "" : " (" + n->lastError + ")")});
    return;
  }
  RedisReply reply = convert(static_cast<redisReply*>(raw));
  n->backoffMs = 0;
  healthy_ = true;
  if (reply.isError()) {
    std::string_view e = reply.str;
    std::string host;
    uint16_t port = 0;
    bool moved = e.starts_with("MOVED "), ask = e.starts_with("ASK ");
    if ((moved || ask) && parseRedirect(e, host, port) && r->redirects < kMaxRedirects) {
      ++r->redirects;
      if (host.empty()) host = n->host;
      Node* to = node(host, port);
      if (moved) {
        if (slots_.empty()) slots_.assign(kSlots, nullptr);
        slots_[redisKeySlot(r->routingKey)] = to;
        r->asking = false;
        refreshSlots();
      } else {
        r->asking = true;
        r->askNode = to;
      }
      send(r);
      return;
    }
    if (e.starts_with("NOSCRIPT") && r->script && r->argv[0] == "EVALSHA") {
      // The server lost its script cache (restart, SCRIPT FLUSH): send the source once.
      r->argv[0] = "EVAL";
      r->argv[1] = r->script->source;
      send(r);
      return;
    }
    if (e.starts_with("TRYAGAIN") && nowMs() + kTryAgainMs < r->deadlineMs) {
      // A slot being migrated: its keys are split for a moment. Again shortly, in time.
      retryLater(r);
      return;
    }
    if (e.starts_with("TRYAGAIN") || e.starts_with("CLUSTERDOWN")) {
      finish(r, Error{kNotRun, "redis " + n->name + ": " + reply.str});
      return;
    }
    if ((e.starts_with("NOAUTH") || e.find("unauthenticated") != std::string_view::npos) &&
        options_.auth.password.empty())
      reply.str += " (this Redis asks for a password: redis://[USER]:PASSWORD@HOST:PORT)";
  }
  r->asking = false;
  finish(r, std::move(reply));
}

// A request waiting to be resent after TRYAGAIN.
struct RedisClient::Later {
  RedisClient* client;
  RequestPtr request;
  uv_timer_t timer;
};

void RedisClient::retryLater(const RequestPtr& r) {
  auto* later = new Later{this, r, {}};
  uv_timer_init(loop_, &later->timer);
  later->timer.data = later;
  waiting_.insert(&later->timer);
  uv_timer_start(
      &later->timer,
      [](uv_timer_t* t) {
        auto* l = static_cast<Later*>(t->data);
        l->client->waiting_.erase(t);
        if (!l->request->done) l->client->send(l->request);
        uv_close(reinterpret_cast<uv_handle_t*>(t),
                 [](uv_handle_t* h) { delete static_cast<Later*>(h->data); });
      },
      kTryAgainMs, 0);
}

void RedisClient::finish(const RequestPtr& r, Result<RedisReply> result) {
  if (r->done) return;
  r->done = true;
  if (r->queued) {
    pending_.erase(r->pos);
    r->queued = false;
  }
  auto cb = std::move(r->cb);
  if (cb) cb(std::move(result));
  if (pending_.empty() && closeWhenIdle_) armTimer();
}

void RedisClient::armTimer() {
  if (pending_.empty() && closeWhenIdle_ && !closing_) {
    uv_timer_start(
        timer_, [](uv_timer_t* t) { static_cast<RedisClient*>(t->data)->onTimer(); }, 0, 0);
    return;
  }
  if (pending_.empty() || closing_) {
    uv_timer_stop(timer_);
    return;
  }
  // The earliest deadline: requests are queued in the order they are sent, not of their
  // deadlines (CLUSTER SLOTS waits 5 timeouts, a redirected request keeps its own).
  int64_t earliest = pending_.front()->deadlineMs;
  for (const auto& r : pending_) earliest = std::min(earliest, r->deadlineMs);
  int64_t wait = std::max<int64_t>(0, earliest - nowMs());
  uv_timer_start(
      timer_, [](uv_timer_t* t) { static_cast<RedisClient*>(t->data)->onTimer(); },
      static_cast<uint64_t>(wait) + 1, 0);
}

void RedisClient::onTimer() {
  if (pending_.empty() && closeWhenIdle_) {
    auto closed = std::move(closeWhenIdle_);
    closeWhenIdle_ = nullptr;
    close(std::move(closed));
    return;
  }
  int64_t now = nowMs();
  std::vector<Node*> stuck;
  // Every request past its deadline, wherever it stands in the queue: one behind a slow
  // CLUSTER SLOTS must not wait for that one's longer deadline.
  std::vector<RequestPtr> expired;
  for (const auto& r : pending_)
    if (r->deadlineMs <= now) expired.push_back(r);
  for (const auto& r : expired) {
    if (r->done) continue;  // finished by an earlier one's callback
    if (r->sentTo && std::find(stuck.begin(), stuck.end(), r->sentTo) == stuck.end())
      stuck.push_back(r->sentTo);
    // Waiting to be sent again (after TRYAGAIN), it did not run; on the wire it may have.
    finish(r, Error{r->onWire ? -1 : kNotRun,
                    "redis " + (r->sentTo ? r->sentTo->name : std::string("?")) +
                        ": no answer within " + std::to_string(options_.timeout.count()) + " ms"});
  }
  // A node that does not answer in time is paused, overloaded or gone: drop its
  // connection so nothing else waits on it, and let the breaker space the retries.
  for (Node* n : stuck) {
    dropNode(n, "timed out");
    nodeFailed(n);  // a seed whose packets vanish is rotated away from like a refused one
  }
  armTimer();
}

void RedisClient::refreshSlots() {
  if (refreshing_ || closing_) return;
  refreshing_ = true;
  auto r = std::make_shared<Request>();
  r->argv = {"CLUSTER", "SLOTS"};
  r->deadlineMs = nowMs() + options_.timeout.count() * 5;
  r->cb = [this](Result<RedisReply> reply) {
    refreshing_ = false;
    if (reply && !reply.value().isError()) applySlots(reply.value(), nullptr);
  };
  send(r);
}

void RedisClient::applySlots(const RedisReply& reply, const Node*) {
  if (reply.type != RedisReply::Type::kArray) return;
  std::vector<Node*> slots(kSlots, nullptr);
  for (const auto& range : reply.elements) {
    if (range.elements.size() < 3 || range.elements[2].elements.size() < 2) continue;
    int64_t from = range.elements[0].integer, to = range.elements[1].integer;
    const auto& master = range.elements[2];
    std::string host = master.elements[0].str;
    auto port = static_cast<uint16_t>(master.elements[1].integer);
    if (host.empty() || host == "?") host = options_.seeds.front().host;
    Node* n = node(host, port);
    for (int64_t s = std::max<int64_t>(0, from); s <= std::min<int64_t>(kSlots - 1, to); ++s)
      slots[static_cast<size_t>(s)] = n;
  }
  slots_.swap(slots);
}

void RedisClient::close(std::function<void()> closed, bool graceful) {
  if (graceful && !pending_.empty()) {
    closeWhenIdle_ = closed ? std::move(closed) : [] {};
    return;
  }
  closing_ = true;
  for (uv_timer_t* t : waiting_) {
    uv_close(reinterpret_cast<uv_handle_t*>(t),
             [](uv_handle_t* h) { delete static_cast<Later*>(h->data); });
  }
  waiting_.clear();
  std::vector<RequestPtr> left(pending_.begin(), pending_.end());
  for (auto& r : left) finish(r, Error{r->onWire ? -1 : kNotRun, "redis client closed"});
  for (auto& [name, n] : nodes_) {
    if (auto* ac = n->ac) {
      n->ac = nullptr;
      redisAsyncFree(ac);
    }
  }
  uv_close(reinterpret_cast<uv_handle_t*>(flushPrepare_),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_prepare_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(flushCheck_),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_check_t*>(h); });
  flushPrepare_ = nullptr;
  flushCheck_ = nullptr;
  struct Closing {
    std::function<void()> closed;
  };
  timer_->data = new Closing{std::move(closed)};
  uv_close(reinterpret_cast<uv_handle_t*>(timer_), [](uv_handle_t* h) {
    auto* c = static_cast<Closing*>(h->data);
    delete reinterpret_cast<uv_timer_t*>(h);
    auto fn = std::move(c->closed);
    delete c;
    if (fn) fn();
  });
  timer_ = nullptr;
}

}  // namespace tollgate
