// Server: the sidecar process. Binds the listeners (one SO_REUSEPORT socket per worker),
// starts the workers, and runs the main thread's loop for signals: SIGTERM/SIGINT drain
// and stop, SIGHUP calls the reload hook.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "audit/audit_sink.h"
#include "common/result.h"
#include "policy/decider.h"
#include "policy/policy_decider.h"
#include "proxy/admin_api.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "proxy/tls.h"
#include "proxy/worker.h"

namespace tollgate {

class Server {
 public:
  explicit Server(Config config);
  // Loads what the config names (the policy set); a bad set is an error with file:line.
  Status init();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  ~Server();

  // Runs until SIGTERM/SIGINT; returns the process exit code.
  int run();

 private:
  Status bindListeners(unsigned workers);
  // Re-reads the policies; `trigger` (sighup, file, admin) goes into the reload record.
  // Without policies in the config (hosts: lists, read at start only) nothing is reloaded.
  AdminApi::ReloadOutcome reload(const char* trigger);
  // Archives a set about to become active and records its reload record; an error rejects it.
  std::string activatePolicies(const PolicySet& next, const std::string& previousDigest,
                               const char* trigger);

  Config config_;
  Metrics metrics_;
  std::unique_ptr<Decider> decider_;
  PolicyDecider* policy_ = nullptr;  // decider_, when the config names policies
  std::unique_ptr<AuditSink> audit_;
  std::unique_ptr<TlsContexts> tls_;
  SharedState shared_;
  std::unique_ptr<AdminApi> admin_;
  std::vector<std::unique_ptr<Worker>> workers_;
  // Hears the audit writer: metrics, and wakes the workers whose calls wait on a record.
  class AuditWatch : public AuditObserver {
   public:
    explicit AuditWatch(Server& server) : server_(server) {}
    void onBatch(size_t records, double fsyncSeconds, bool ok) override;
    void onDropped(size_t records) override;
    void onCheckpoint(uint64_t seq) override;
    void onBackpressure() override;

   private:
    Server& server_;
  };
  AuditWatch auditWatch_{*this};
  std::mutex reloadMutex_;
  const char* reloadTrigger_ = "";  // of the reload in progress, under reloadMutex_
};

}  // namespace tollgate
