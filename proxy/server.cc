#include "proxy/server.h"

#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <thread>

#include "audit/dir_export.h"
#include "audit/file_sink.h"
#include "audit/policy_archive.h"
#include "audit/redis_replica.h"
#include "common/log.h"
#include "policy/host_list_decider.h"
#include "policy/redis_client.h"
#include "proxy/policy_watch.h"
#include "proxy/resolver.h"

namespace tollgate {
namespace {

// Every connection is a file descriptor, two while a call is forwarded. The soft open-file
// limit (1024 under systemd and many shells) is raised to the hard one, as nginx's
// worker_rlimit_nofile and HAProxy do; a hard limit below the listeners' max_connections is
// said once, since connections beyond it would be refused before the 503 could be sent.
void raiseOpenFileLimit(const Config& config) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  uint64_t before = rl.rlim_cur;
  if (rl.rlim_cur < rl.rlim_max) {
    rlimit want = rl;
    want.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &want) == 0) rl = want;
  }
  uint64_t needed = 64;  // listeners, the audit log, Redis, the admin API
  for (const auto& l : config.listeners) needed += l.maxConnections;
  bool low = rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < needed;
  Log::Line line(low ? LogLevel::kWarn : LogLevel::kDebug, "open-file limit");
  line.add("soft_was", before)
      .add("soft", static_cast<uint64_t>(rl.rlim_cur))
      .add("needed", needed);
  if (low)
    line.add("hint",
             "below the listeners' max_connections: raise the hard limit (ulimit -Hn, systemd "
             "LimitNOFILE=, docker --ulimit nofile=) or lower max_connections");
  line.emit();
}

// A listening socket with SO_REUSEPORT, so every worker can own one on the same port.
Result<int> listenSocket(const HostPort& address, bool reusePort) {
  sockaddr_storage ss;
  if (!Resolver::parseLiteral(address.host, ss)) {
    if (address.host == "localhost")
      Resolver::parseLiteral("127.0.0.1", ss);
    else
      return Error{-1, "address " + address.host + " is not an IP literal"};
  }
  socklen_t len;
  if (ss.ss_family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port = htons(address.port);
    len = sizeof(sockaddr_in6);
  } else {
    reinterpret_cast<sockaddr_in*>(&ss)->sin_port = htons(address.port);
    len = sizeof(sockaddr_in);
  }
  int fd = ::socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Error{-errno, std::string("socket: ") + std::strerror(errno)};
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (reusePort) ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (ss.ss_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    int err = errno;
    ::close(fd);
    return Error{-err,
                 "bind " + formatHostPort(address.host, address.port) + ": " + std::strerror(err)};
  }
  return fd;
}

uint16_t boundPort(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return 0;
  return ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

}  // namespace

Server::Server(Config config) : config_(std::move(config)) {
  shared_.config = &config_;
  shared_.metrics = &metrics_;
}

Status Server::init() {
  // TLS first: a missing CA for an intercepting listener stops startup before anything opens.
  auto tls = TlsContexts::create(config_);
  if (!tls) return tls.error();
  tls_ = std::move(tls.value());
  shared_.tls = tls_.get();
  if (LeafCache* leaves = tls_->leaves()) {
    metrics_.addRenderHook(
        [this, leaves] { metrics_.tlsLeaves(leaves->size(), leaves->signings(), leaves->hits()); });
  }
  // The durable audit stream: a log that cannot be opened, locked or verified stops startup.
  if (config_.auditSink == "memory") {
    Log::Line(LogLevel::kWarn,
              "audit records kept in memory only: not durable, never in production")
        .emit();
    audit_ = std::make_unique<MemoryAuditSink>();
  } else {
    FileAuditSink::Options options;
    options.dir = config_.auditDir;
    options.checkpointEvery = config_.auditCheckpointEvery;
    options.checkpointInterval = config_.auditCheckpointInterval;
    options.segmentBytes = config_.auditSegmentSize;
    options.syncInterval = config_.auditSyncInterval;
    options.prefill = config_.auditPrefill;
    options.directIo = config_.auditDirectIo;
    options.segmentAge = config_.auditSegmentAge;
    if (!config_.auditReplicaUrl.empty()) {
      RedisStreamReplica::Options ro;
      auto url = parseRedisUrl(config_.auditReplicaUrl).value();
      ro.host = url.address.host;
      ro.port = url.address.port;
      ro.auth = url.auth;
      ro.key = config_.auditReplicaStream;
      ro.maxlen = config_.auditReplicaMaxlen;
      ro.logDir = config_.auditDir;
      auto replica = std::make_shared<RedisStreamReplica>(ro);
      options.replicas.push_back(replica);
      metrics_.addRenderHook([this, weak = std::weak_ptr<RedisStreamReplica>(replica)] {
        if (auto r = weak.lock())
          metrics_.auditReplica(r->replicated(), audit_->durableSeq(), r->dropped());
      });
    }
    if (!config_.auditExportDir.empty()) {
      auto exporter = DirectoryExport::open(config_.auditDir, config_.auditExportDir);
      if (!exporter) return exporter.error();
      options.replicas.push_back(exporter.value());
    }
    auto audit = FileAuditSink::open(options);
    if (!audit) return audit.error();
    audit_ = std::move(audit.value());
  }
  shared_.audit = audit_.get();
  metrics_.addRenderHook(
      [this] { metrics_.auditState(audit_->healthy(), audit_->lastCheckpointSeq()); });
  if (!config_.policies.empty()) {
    StoreConfig store{config_.storeBackend, config_.storeUrls, config_.storeTimeout,
                      config_.storeInitMissing};
    auto policy = PolicyDecider::create(config_.policies, store);
    if (!policy) return policy.error();
    policy_ = policy.value().get();
    policy_->holdTtl = config_.storeHoldTtl;
    policy_->budgets().observer = [m = &metrics_](const std::string& op, BudgetStatus s,
                                                  double seconds) {
      m->budgetOperation(op, budgetStatusName(s), seconds);
    };
    // Every set is archived in the audit log before it decides anything (audit replay).
    std::string error = activatePolicies(*policy_->current(), "", "startup");
    if (!error.empty()) return Error{-1, error};
    policy_->beforeActivate = [this](const PolicySet& next, const PolicySet& previous) {
      return activatePolicies(next, previous.digest(), reloadTrigger_);
    };
    decider_ = std::move(policy.value());
    Log::Line(LogLevel::kInfo, "policies loaded")
        .add("files", static_cast<uint64_t>(config_.policies.size()))
        .add("digest", policy_->current()->digest())
        .emit();
  } else {
    decider_ = std::make_unique<HostListDecider>(config_.allowHosts, config_.denyHosts);
  }
  shared_.decider = decider_.get();
  admin_ = std::make_unique<AdminApi>(metrics_, *audit_, shared_,
                                      policy_ ? &policy_->budgets() : nullptr,
                                      policy_ ? &policy_->engine() : nullptr);
  admin_->setReloadHook([this] { return reload("admin"); });
  shared_.admin = admin_.get();
  return Status::success();
}

Server::~Server() {
  for (auto& rt : shared_.listeners) {
    for (int fd : rt->fds) {
      if (fd >= 0) ::close(fd);
    }
  }
}

Status Server::bindListeners(unsigned workers) {
  auto bindOne = [&](ListenerRuntime& rt, const HostPort& address, unsigned count) -> Status {
    HostPort addr = address;
    // The workers' sockets share the port through SO_REUSEPORT, which would also let another
    // process of this user (a second sidecar started on the same config) join the group and
    // take a share of the agents' connections. A plain bind first finds anyone already on
    // the port; that other process does the same, so neither order shares.
    if (addr.port != 0) {
      auto probe = listenSocket(addr, false);
      if (!probe) return probe.error();
      ::close(*probe);
    }
    for (unsigned i = 0; i < count; ++i) {
      auto fd = listenSocket(addr, true);
      if (!fd) return fd.error();
      if (::listen(*fd, 1024) != 0) {
        ::close(*fd);
        return Error{-errno, std::string("listen: ") + std::strerror(errno)};
      }
      // With port 0, the first socket picks the port and the others join it.
      if (i == 0) addr.port = boundPort(*fd);
      rt.fds.push_back(*fd);
    }
    rt.boundAddress = formatHostPort(addr.host, addr.port);
    rt.boundPort = addr.port;
    rt.workers = count;
    return Status::success();
  };
  for (const auto& l : config_.listeners) {
    auto rt = std::make_unique<ListenerRuntime>();
    rt->config = l;
    rt->tls = tls_ ? tls_->listenerServer(l.name) : nullptr;
    rt->metrics = &metrics_.addListener(l.name);
    auto st = bindOne(*rt, l.address, workers);
    shared_.listeners.push_back(std::move(rt));
    if (!st) return Error{st.error().code, "listener " + l.name + ": " + st.error().message};
  }
  if (config_.hasAdmin) {
    auto rt = std::make_unique<ListenerRuntime>();
    rt->admin = true;
    rt->config.name = "admin";
    rt->metrics = &metrics_.addListener("admin");
    auto st = bindOne(*rt, config_.admin, 1);  // the admin listener is served by worker 0
    shared_.listeners.push_back(std::move(rt));
    if (!st) return Error{st.error().code, "admin: " + st.error().message};
  }
  return Status::success();
}

void Server::AuditWatch::onBatch(size_t records, double fsyncSeconds, bool ok) {
  server_.metrics_.auditBatch(records, fsyncSeconds, ok);
  for (auto& w : server_.workers_) w->notifyDurable();
}

void Server::AuditWatch::onDropped(size_t records) {
  server_.metrics_.auditDropped(records);
  for (auto& w : server_.workers_) w->notifyDurable();  // the calls waiting see the failure
}

void Server::AuditWatch::onCheckpoint(uint64_t seq) {
  server_.metrics_.auditCheckpoint(seq);
}

void Server::AuditWatch::onBackpressure() {
  server_.metrics_.auditBackpressure();
}

std::string Server::activatePolicies(const PolicySet& next, const std::string& previousDigest,
                                     const char* trigger) {
  // Archived next to the log it decides for (a log kept in memory has no archive).
  if (config_.auditSink == "file") {
    ArchivedFiles files;
    for (const auto& s : next.sources()) files.emplace_back(s.file, s.text);
    if (auto st = archivePolicySet(config_.auditDir, next.digest(), files); !st)
      return st.error().message;
  }
  std::string archive = "policies/" + next.digest().substr(7) + ".json";
  audit_->appendEvent("reload", {{"digest", next.digest()},
                                 {"previous_digest", previousDigest},
                                 {"result", "ok"},
                                 {"trigger", trigger},
                                 {"archive", archive}});
  return {};
}

AdminApi::ReloadOutcome Server::reload(const char* trigger) {
  using Reload = AdminApi::ReloadOutcome;
  if (!policy_) {
    // Saying "reloaded" here would tell an operator who edited the hosts: lists that they
    // are in force; they are not until a restart.
    std::string why =
        "the config names no policies: hosts: lists and the rest of the config are read at "
        "start only; restart the sidecar to change them";
    Log::Line(LogLevel::kWarn, "reload: nothing to reload")
        .add("trigger", trigger)
        .add("reason", why)
        .emit();
    return {Reload::Result::kNothingToReload, std::move(why)};
  }
  std::lock_guard<std::mutex> lock(reloadMutex_);
  reloadTrigger_ = trigger;
  std::string error = decider_->reload();
  if (!error.empty()) {
    // The last good set stays active: the record names it as the digest after the reload.
    const std::string& active = policy_->current()->digest();
    audit_->appendEvent("reload", {{"digest", active},
                                   {"previous_digest", active},
                                   {"result", "rejected"},
                                   {"trigger", trigger},
                                   {"error", error}});
    Log::Line(LogLevel::kWarn, "reload rejected").add("error", error).emit();
    metrics_.reloads(false).Increment();
    return {Reload::Result::kRejected, std::move(error)};
  }
  Log::Line line(LogLevel::kInfo, "reload");
  line.add("result", "ok");
  line.add("digest", policy_->current()->digest());
  line.emit();
  metrics_.reloads(true).Increment();
  return {};
}

int Server::run() {
  Log::setLevel(config_.logLevel);
  std::signal(SIGPIPE, SIG_IGN);
  raiseOpenFileLimit(config_);
  uv_loop_t loop;
  uv_loop_init(&loop);
  struct Signals {
    uv_signal_t term, intr, hup;
    Server* server;
    std::vector<std::unique_ptr<Worker>>* workers;
    PolicyWatch* policyWatch = nullptr;
    bool stopping = false;
  } signals{};
  signals.server = this;
  signals.workers = &workers_;
  auto stop = [](uv_signal_t* h, int signum) {
    auto* s = static_cast<Signals*>(h->data);
    if (s->stopping) return;  // a second signal: the drain goes on to its end
    s->stopping = true;
    Log::Line(LogLevel::kInfo, "shutting down")
        .add("signal", std::string(strsignal(signum)))
        .emit();
    s->server->admin_->setReady(false);
    for (auto& w : *s->workers) w->requestDrain();
    // The signal handles stay installed until the workers are done (closed, their signals
    // would get the default action back: a second SIGTERM, or a SIGHUP, would kill the
    // process mid-drain, before the audit stream's last checkpoint); they only no longer
    // keep this loop running.
    uv_unref(reinterpret_cast<uv_handle_t*>(&s->term));
    uv_unref(reinterpret_cast<uv_handle_t*>(&s->intr));
    uv_unref(reinterpret_cast<uv_handle_t*>(&s->hup));
    if (s->policyWatch) s->policyWatch->close();
  };
  for (auto* h : {&signals.term, &signals.intr, &signals.hup}) {
    uv_signal_init(&loop, h);
    h->data = &signals;
  }
  // Handled before "listening" is logged: a signal sent as soon as the sidecar says it
  // listens must not meet the default action (SIGHUP would end the process).
  uv_signal_start(&signals.term, stop, SIGTERM);
  uv_signal_start(&signals.intr, stop, SIGINT);
  uv_signal_start(
      &signals.hup,
      [](uv_signal_t* h, int) {
        auto* s = static_cast<Signals*>(h->data);
        if (!s->stopping) s->server->reload("sighup");
      },
      SIGHUP);
  unsigned workers =
      config_.workers ? config_.workers : std::max(1u, std::thread::hardware_concurrency());
  if (auto st = bindListeners(workers); !st) {
    Log::Line(LogLevel::kError, "cannot listen").add("error", st.error().message).emit();
    for (auto* h : {&signals.term, &signals.intr, &signals.hup})
      uv_close(reinterpret_cast<uv_handle_t*>(h), nullptr);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return 1;
  }
  // Edits of the policy files, once whole (PolicyWatch): watched before "listening" is
  // logged, so that an edit made as soon as the sidecar says it listens is not missed (its
  // events wait for the loop to run).
  PolicyWatch policyWatch(&loop, config_.policies, [this] { reload("file"); });
  if (!config_.policies.empty()) policyWatch.start();
  signals.policyWatch = &policyWatch;
  for (auto& rt : shared_.listeners) {
    Log::Line(LogLevel::kInfo, "listening")
        .add("listener", rt->config.name)
        .add("kind", rt->admin ? std::string("admin") : rt->config.kind)
        .add("address", rt->boundAddress)
        .add("workers", static_cast<uint64_t>(rt->workers))
        .emit();
  }
  shared_.workersServing = workers;
  for (unsigned i = 0; i < workers; ++i) workers_.push_back(std::make_unique<Worker>(shared_, i));
  // Told of batches before any worker runs: a call accepted at once (from the listen
  // backlog) must not wait for a later batch to hear that its record is durable.
  audit_->setObserver(&auditWatch_);
  for (auto& w : workers_) w->start();
  admin_->setReady(true);
  uv_run(&loop, UV_RUN_DEFAULT);
  for (auto& w : workers_) w->join();
  audit_->setObserver(nullptr);
  workers_.clear();
  audit_.reset();  // sealed by its last checkpoint while the signals are still caught
  for (auto* h : {&signals.term, &signals.intr, &signals.hup})
    uv_close(reinterpret_cast<uv_handle_t*>(h), nullptr);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  Log::Line(LogLevel::kInfo, "stopped").emit();
  return 0;
}

}  // namespace tollgate
