// AdminApi: the admin listener's endpoints (/healthz, /readyz, /metrics, /v1/status,
// /v1/audit/tail, POST /v1/reload, POST /v1/audit/rotate-key). Served by the same sessions and HTTP
// code as the proxy.
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <string_view>

#include "audit/audit_sink.h"
#include "policy/budget_store.h"
#include "policy/engine.h"
#include "proxy/metrics.h"

namespace tollgate {

struct SharedState;

struct AdminResponse {
  int status = 200;
  std::string contentType = "application/json";
  std::string body;
};

class AdminApi {
 public:
  // engine: the policy engine for /v1/approvals, or null without policies.
  AdminApi(Metrics& metrics, AuditSink& audit, const SharedState& shared, BudgetStore* budgets,
           Engine* engine);
  // authorization: the request's Authorization header value (may be empty).
  AdminResponse handle(std::string_view method, std::string_view target,
                       std::string_view authorization = {}) const;
  // Runs `ready` once what handle() will read for `path` is fresh (at once for most paths;
  // after a read of the shared store for /v1/pools and /metrics). On the caller's loop.
  void prepare(std::string_view path, std::function<void()> ready) const;

 private:
  AdminResponse approvals(std::string_view method, std::string_view path,
                          std::string_view authorization) const;
  bool authorized(std::string_view authorization) const;

 public:
  void setReady(bool ready) { ready_ = ready; }
  // What POST /v1/reload did: 200 when the set was swapped, 409 when the config names no
  // policies (nothing can be reloaded), 500 when the new set was rejected.
  struct ReloadOutcome {
    enum class Result { kReloaded, kNothingToReload, kRejected } result = Result::kReloaded;
    std::string error;  // why, unless kReloaded
  };
  void setReloadHook(std::function<ReloadOutcome()> hook) { reload_ = std::move(hook); }

 private:
  // setPools() is called on /metrics, by worker 0 alone (it serves the admin listener).
  Metrics& metrics_;
  AuditSink& audit_;
  const SharedState& shared_;
  BudgetStore* budgets_;
  Engine* engine_;
  std::atomic<bool> ready_{false};
  std::function<ReloadOutcome()> reload_;
  int64_t startedMs_;
};

}  // namespace tollgate
