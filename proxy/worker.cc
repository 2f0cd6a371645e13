#include "proxy/worker.h"

#include <sys/resource.h>

#include "common/log.h"
#include "common/thread_name.h"
#include "proxy/client_session.h"
#include "proxy/http_message.h"

namespace tollgate {
namespace {

constexpr uint64_t kLogFlushMs = 200;
constexpr int kBacklog = 1024;

}  // namespace

Worker::Worker(SharedState& shared, unsigned index)
    : shared_(shared),
      index_(index),
      resolver_(&loop_.loop, shared.config->timeouts.dnsCache),
      pool_(&loop_.loop, shared.config->timeouts.upstreamIdle,
            shared.config->limits.upstreamIdlePerHost) {
  if (struct rlimit rl; ::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
                        rl.rlim_cur < static_cast<rlim_t>(INT32_MAX)) {
    fdLimit_ = static_cast<uint64_t>(rl.rlim_cur);
    fdWarnAt_ = static_cast<int>(rl.rlim_cur / 10 * 9);
  }
  uv_async_init(&loop_.loop, &drainAsync_,
                [](uv_async_t* a) { static_cast<Worker*>(a->data)->beginDrain(); });
  drainAsync_.data = this;
  uv_async_init(&loop_.loop, &durableAsync_,
                [](uv_async_t* a) { static_cast<Worker*>(a->data)->wakeDurable(); });
  durableAsync_.data = this;
  uv_unref(reinterpret_cast<uv_handle_t*>(&durableAsync_));
  uv_check_init(&loop_.loop, &check_);
  check_.data = this;
  uv_check_start(&check_, onCheck);
  uv_unref(reinterpret_cast<uv_handle_t*>(&check_));
  uv_prepare_init(&loop_.loop, &prepare_);
  prepare_.data = this;
  uv_prepare_start(&prepare_, onPrepare);
  uv_unref(reinterpret_cast<uv_handle_t*>(&prepare_));
  logFlush_ = Timer::create(&loop_.loop, [this] {
    Log::flushThread();
    logFlush_->start(kLogFlushMs);
  });
  logFlush_->unref();
}

Worker::LoopHolder::LoopHolder() {
  uv_loop_init(&loop);
}

Worker::LoopHolder::~LoopHolder() {
  // Handles closed during teardown need one more turn to run their close callbacks.
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}

Worker::~Worker() {
  join();
  for (auto* s : released_) delete s;
  released_.clear();
}

void Worker::start() {
  thread_ = std::thread([this] {
    nameThisThread("tg-worker-" + std::to_string(index_));
    run();
  });
}

void Worker::requestDrain() {
  uv_async_send(&drainAsync_);
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::run() {
  Log::setThreadBuffered(true);
  shared_.decider->attachLoop(&loop_.loop);
  openListeners();
  logFlush_->start(kLogFlushMs);
  uv_run(&loop_.loop, UV_RUN_DEFAULT);
  for (auto* s : released_) delete s;
  released_.clear();
  Log::setThreadBuffered(false);
}

void Worker::openListeners() {
  for (auto& rt : shared_.listeners) {
    if (index_ >= rt->fds.size() || rt->fds[index_] < 0) continue;
    auto* l = new Listening{{}, this, rt.get()};
    uv_tcp_init(&loop_.loop, &l->handle);
    l->handle.data = l;
    int rc = uv_tcp_open(&l->handle, rt->fds[index_]);
    if (rc == 0) rt->fds[index_] = -1;  // libuv owns and closes it now
    if (rc == 0) rc = uv_listen(reinterpret_cast<uv_stream_t*>(&l->handle), kBacklog, onConnection);
    if (rc != 0) {
      Log::Line(LogLevel::kError, "listen failed")
          .add("listener", rt->admin ? std::string("admin") : rt->config.name)
          .add("error", std::string(uv_strerror(rc)))
          .emit();
    }
    listening_.push_back(l);
  }
}

void Worker::warnRefused(Listening* l) {
  uint64_t now = uv_now(&l->worker->loop_.loop);
  if (l->warnedMs != 0 && now - l->warnedMs < kRefusalLogMs) return;
  const auto& rt = *l->runtime;
  auto line = Log::Line(LogLevel::kWarn, l->refused > 0 || l->acceptErrors > 0
                                             ? "connections refused"
                                             : "open-file limit nearly reached");
  line.add("listener", rt.admin ? std::string("admin") : rt.config.name);
  if (l->refused > 0)
    line.add("at_max_connections", l->refused)
        .add("max_connections", static_cast<uint64_t>(rt.config.maxConnections));
  if (l->acceptErrors > 0)
    line.add("accept_errors", l->acceptErrors).add("error", std::string(uv_strerror(l->lastError)));
  if (l->nearFdLimit > 0) {
    line.add("near_open_file_limit", l->nearFdLimit).add("open_file_limit", l->worker->fdLimit_);
  }
  if (l->nearFdLimit > 0 || l->lastError == UV_EMFILE || l->lastError == UV_ENFILE)
    line.add("hint",
             "connections past the open-file limit are closed unanswered: raise it "
             "(ulimit -n, LimitNOFILE) or lower max_connections");
  line.emit();
  l->refused = l->acceptErrors = l->nearFdLimit = 0;
  l->warnedMs = now;
}

void Worker::onConnection(uv_stream_t* server, int status) {
  auto* l = static_cast<Listening*>(server->data);
  Worker* w = l->worker;
  if (status < 0) {
    // Out of descriptors (libuv then accepts and closes what waits, with its reserve one)
    // or another accept error: the agents see their connection closed, the operator this.
    ++l->acceptErrors;
    l->lastError = status;
    warnRefused(l);
    return;
  }
  StreamPtr stream = TcpStream::create(&w->loop_.loop);
  // During the drain only the admin listener is open (/readyz answers 503 there).
  if (stream->accept(server) != 0 || (w->draining_ && !l->runtime->admin)) return;
  uv_os_fd_t fd = -1;
  if (uv_fileno(reinterpret_cast<uv_handle_t*>(stream->tcp()), &fd) == 0 && fd >= w->fdWarnAt_) {
    ++l->nearFdLimit;
    warnRefused(l);
  }
  auto& rt = *l->runtime;
  uint32_t open = rt.connections.fetch_add(1, std::memory_order_relaxed) + 1;
  if (!rt.admin && open > rt.config.maxConnections) {
    rt.connections.fetch_sub(1, std::memory_order_relaxed);
    rt.metrics->connectionsRejected->Increment();
    ++l->refused;
    warnRefused(l);
    stream->append(localReply(503,
                              errorBody("too_many_connections",
                                        "listener " + rt.config.name + " is at max_connections (" +
                                            std::to_string(rt.config.maxConnections) + ")"),
                              {}, true));
    (void)stream->flush();
    stream->shutdown();
    return;  // the StreamPtr closes it
  }
  auto* session = new ClientSession(*w, rt, std::move(stream));
  w->sessions_.insert(session);
  if (w->draining_) session->markDraining();
  session->start();
}

void Worker::release(ClientSession* session) {
  sessions_.erase(session);
  released_.push_back(session);
}

void Worker::awaitDurable(uint64_t seq, ClientSession* session) {
  uint64_t now = uv_now(&loop_.loop);
  if (durableWaiters_.empty()) {
    if (!durableTimer_) {
      durableTimer_ = Timer::create(&loop_.loop, [this] { expireDurableWaiters(); });
      // Stopped lazily (it goes off for nothing), it would hold a draining loop for up to
      // kDurableWaitMs; the waiting sessions keep the loop alive while it matters.
      durableTimer_->unref();
    }
    durableTimer_->start(kDurableWaitMs);
  }
  durableWaiters_.push_back({seq, session, now});
  durableWanted_ = std::max(durableWanted_, seq);  // asked for in onPrepare
  // Seen by the writer before it reads durableSeq() again: either it wakes us, or the
  // record is durable already and the check below finds it.
  durableWaiting_.store(true);
  if (shared_.audit->durableSeq() >= seq || !shared_.audit->healthy())
    uv_async_send(&durableAsync_);  // answered on the next turn, not inside the caller
}

void Worker::notifyDurable() {
  if (durableWaiting_.load()) uv_async_send(&durableAsync_);
}

void Worker::wakeDurable() {
  uint64_t durable = shared_.audit->durableSeq();
  bool healthy = shared_.audit->healthy();
  while (!durableWaiters_.empty() && (durableWaiters_.front().seq <= durable || !healthy)) {
    auto w = durableWaiters_.front();
    durableWaiters_.pop_front();
    w.session->onAuditDurable(w.seq <= durable ? AuditWait::kDurable : AuditWait::kFailed);
  }
  if (durableWaiters_.empty()) {
    durableWaiting_.store(false);
    if (durableTimer_) durableTimer_->stop();
  } else if (durableTimer_) {
    uint64_t waited = uv_now(&loop_.loop) - durableWaiters_.front().sinceMs;
    durableTimer_->start(waited >= kDurableWaitMs ? 0 : kDurableWaitMs - waited);
  }
}

void Worker::expireDurableWaiters() {
  wakeDurable();  // what became durable meanwhile goes on
  uint64_t now = uv_now(&loop_.loop);
  while (!durableWaiters_.empty() && now - durableWaiters_.front().sinceMs >= kDurableWaitMs) {
    auto w = durableWaiters_.front();
    durableWaiters_.pop_front();
    w.session->onAuditDurable(AuditWait::kTimedOut);
  }
  if (durableWaiters_.empty()) {
    durableWaiting_.store(false);
  } else {
    durableTimer_->start(kDurableWaitMs - (now - durableWaiters_.front().sinceMs));
  }
}

void Worker::onCheck(uv_check_t* check) {
  auto* w = static_cast<Worker*>(check->data);
  w->freeReleased();
  if (w->draining_) w->finishIfIdle();
}

void Worker::onPrepare(uv_prepare_t* prepare) {
  // Right before the loop polls: the turn is done, and every call it decided waits for one
  // sync. Asked for per call instead, the writer would sync the first call of a turn alone
  // and the rest after it: twice the fsyncs, and twice the wakeups.
  auto* w = static_cast<Worker*>(prepare->data);
  if (w->durableWanted_ > w->durableRequested_) {
    w->durableRequested_ = w->durableWanted_;
    w->shared_.audit->requestDurable(w->durableWanted_);
  }
}

void Worker::freeReleased() {
  if (released_.empty()) return;
  std::vector<ClientSession*> keep;
  for (auto* s : released_) {
    if (s->busy())
      keep.push_back(s);
    else
      delete s;
  }
  released_.swap(keep);
}

void Worker::closeListening(Listening* l) {
  uv_close(reinterpret_cast<uv_handle_t*>(&l->handle),
           [](uv_handle_t* h) { delete static_cast<Listening*>(h->data); });
}

void Worker::beginDrain() {
  if (draining_) return;
  draining_ = true;
  // The admin listener stays open until the last connection is done, so that /readyz says
  // 503 to the load balancer and /metrics still answers meanwhile.
  std::vector<Listening*> admin;
  for (auto* l : listening_) {
    if (l->runtime->admin)
      admin.push_back(l);
    else
      closeListening(l);
  }
  listening_.swap(admin);
  std::vector<ClientSession*> open(sessions_.begin(), sessions_.end());
  for (auto* s : open) s->drain();
  deadline_ = Timer::create(&loop_.loop, [this] {
    std::vector<ClientSession*> left(sessions_.begin(), sessions_.end());
    if (!left.empty()) {
      Log::Line(LogLevel::kWarn, "shutdown deadline: closing connections")
          .add("worker", static_cast<int64_t>(index_))
          .add("connections", static_cast<uint64_t>(left.size()))
          .emit();
    }
    for (auto* s : left) s->close();
    pastDeadline_ = true;  // no more waiting for the other workers either
    finishIfIdle();
  });
  deadline_->start(static_cast<uint64_t>(shared_.config->timeouts.shutdown.count()));
  finishIfIdle();
}

void Worker::finishIfIdle() {
  if (stopped_ || !sessions_.empty()) return;
  // The worker with the admin listener keeps it open (for /readyz's 503) until the others
  // have stopped: it looks again every 20 ms.
  if (!listening_.empty() && shared_.workersServing.load() > 1 && !pastDeadline_) {
    if (!lastOut_) lastOut_ = Timer::create(&loop_.loop, [this] { finishIfIdle(); });
    lastOut_->start(20);
    return;
  }
  stopped_ = true;
  lastOut_.reset();
  shared_.workersServing.fetch_sub(1);
  for (auto* l : listening_) closeListening(l);
  listening_.clear();
  freeReleased();
  pool_.closeAll();
  shared_.decider->detachLoop([] {});
  deadline_.reset();
  logFlush_.reset();
  uv_close(reinterpret_cast<uv_handle_t*>(&drainAsync_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&durableAsync_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&check_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&prepare_), nullptr);
}

}  // namespace tollgate
