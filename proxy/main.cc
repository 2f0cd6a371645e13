// The tollgate binary: `tollgate run -c FILE`, `tollgate --version`, `tollgate help`.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "audit/audit_cli.h"
#include "certs/certs_cli.h"
#include "policy/policy_cli.h"
#include "policy/policy_set.h"
#include "policy/redis_budget_store.h"
#include "policy/replay.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "proxy/version.h"

namespace {

constexpr const char* kUsage = R"(tollgate — governs what AI agents do over the network

usage:
  tollgate run -c FILE            run the sidecar with the config FILE (YAML)
  tollgate policy check FILE...   validate policies: schema, references, lints
  tollgate policy test FILE...    run policy table tests (kind: PolicyTest)
  tollgate pools init -c FILE [--reset]
                                  create the config's pools that are missing from its Redis
                                  store with zero spend (--reset: all of them, spend erased)
  tollgate audit verify DIR [--pubkey F | --keyring F] [--state F]
                                  check an audit log: canonical records, hash links, Merkle
                                  roots and signatures of its checkpoints, key rotations and
                                  key windows (first key: F, or DIR/keys/anchor.pub;
                                  --keyring F: keys pinned with their windows, JSON);
                                  --state F: also check it still holds the checkpoint F
                                  trusts (truncation, rollback, fork), then trust its last
                                  one; 0 valid, 1 invalid, 2 unreadable
  tollgate audit prove DIR SEQ [--pubkey F | --keyring F]
                                  print (JSON) an inclusion proof of record SEQ against the
                                  last checkpoint; 1 when it is not yet sealed by one
  tollgate audit prove --verify PROOF --pubkey F|--keyring F
                                  check a proof without the log; 0 valid, 1 invalid,
                                  2 unreadable
  tollgate audit rotate-key DIR   rotate the checkpoint key of a log no process holds (a
                                  running sidecar: POST /v1/audit/rotate-key); 0 rotated,
                                  1 in use, invalid or failed, 2 usage
  tollgate audit replay DIR [--policy FILE...]
                                  re-evaluate every recorded call with the policy set of its
                                  recorded digest (archived in DIR/policies), or with the
                                  given set, and list the decisions that would differ;
                                  0 none differ, 1 some differ, 2 unreadable
  tollgate audit report DIR [--from T] [--to T] [--format md|html|json] [--out F]
                        [--gap DURATION] [--pubkey F] [--admin HOST:PORT [--token T]]
                                  compliance summary of the period (T: RFC 3339 or unix
                                  seconds; default the whole log); its sha256 is appended to
                                  the log as a report record (through the running sidecar's
                                  admin API with --admin);
                                  0 ok, 1 the log does not verify, 2 usage or unreadable
  tollgate certs init DIR [--permit NAME]... [--name CN] [--force]
                                  create the local CA for TLS interception in DIR (0700):
                                  ca.key (0600, ECDSA P-256) and ca.crt (0644); --permit
                                  limits what it may sign (example.com: it and its
                                  subdomains, .internal: only subdomains, 10.0.0.0/8: those
                                  addresses; a name type not permitted is excluded); prints
                                  how to make agents trust it; refuses to replace an existing
                                  CA without --force; 0 created, 1 failed or exists, 2 usage
  tollgate certs mint DIR HOST [--key-out F]
                                  debugging: print (PEM) a leaf for HOST (DNS name or IP) as
                                  the sidecar would mint it from DIR's CA; --key-out F writes
                                  the shared leaf key (0600); 1 when the CA does not permit HOST
  tollgate --version              print the version
  tollgate help                   print this help

exit codes: 0 success, 1 failure at run time, 2 usage or configuration error
)";

int usageError(const std::string& message) {
  std::fprintf(stderr, "tollgate: %s\n\n%s", message.c_str(), kUsage);
  return 2;
}

int runCommand(const std::vector<std::string_view>& args) {
  std::string configPath;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "-c" || args[i] == "--config") {
      if (i + 1 >= args.size()) return usageError("-c needs a file");
      configPath = std::string(args[++i]);
    } else if (args[i].starts_with("--config=")) {
      configPath = std::string(args[i].substr(9));
    } else {
      return usageError("run: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (configPath.empty()) return usageError("run needs -c FILE");
  auto config = tollgate::loadConfig(configPath);
  if (!config) {
    std::fprintf(stderr, "tollgate: %s\n", config.error().message.c_str());
    return 2;
  }
  tollgate::Server server(std::move(config.value()));
  if (auto st = server.init(); !st) {
    std::fprintf(stderr, "tollgate: %s\n", st.error().message.c_str());
    // Another process holds what this one needs (a second sidecar on the same config: its
    // audit log's lock is met before its ports): 1, as when a port is taken, not a bad config.
    return st.error().code == -EWOULDBLOCK ? 1 : 2;
  }
  return server.run();
}

int poolsInit(const std::vector<std::string_view>& args) {
  std::string configPath;
  bool reset = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "-c" || args[i] == "--config") {
      if (i + 1 >= args.size()) return usageError("-c needs a file");
      configPath = std::string(args[++i]);
    } else if (args[i] == "--reset") {
      reset = true;
    } else {
      return usageError("pools init: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (configPath.empty()) return usageError("pools init needs -c FILE");
  auto config = tollgate::loadConfig(configPath);
  if (!config) {
    std::fprintf(stderr, "tollgate: %s\n", config.error().message.c_str());
    return 2;
  }
  const auto& c = config.value();
  if (c.storeBackend != "redis" || c.policies.empty()) {
    std::fprintf(stderr, "tollgate: pools init needs store.backend: redis and policies: in %s\n",
                 configPath.c_str());
    return 2;
  }
  auto set = tollgate::PolicySet::load(c.policies);
  if (!set) {
    std::fprintf(stderr, "tollgate: %s\n", set.error().message.c_str());
    return 2;
  }
  tollgate::RedisBudgetStore::Options options;
  std::tie(options.seeds, options.auth) = tollgate::parseRedisUrls(c.storeUrls).value();
  options.timeout = c.storeTimeout;
  auto result = tollgate::RedisBudgetStore::initPools(*set.value(), options, reset);
  if (!result) {
    std::fprintf(stderr, "tollgate: %s\n", result.error().message.c_str());
    return 1;
  }
  for (const auto& r : result.value()) {
    std::printf(
        "%s: %s\n", r.pool.c_str(),
        r.created ? (reset ? "reset to zero spend" : "created with zero spend") : "exists, kept");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // libuv's thread pool (name lookups; 4 threads by default, shared by every worker) is read
  // from the environment at its first use. A lookup holds a thread for the system
  // resolver's whole timeout, so the workers' lookups in flight (Resolver::kMaxInflight
  // each) get threads enough for two workers; an operator's own setting wins.
  ::setenv("UV_THREADPOOL_SIZE", "64", 0);
  std::vector<std::string_view> args(argv + 1, argv + argc);
  if (args.empty()) return usageError("no command");
  auto cmd = args[0];
  if (cmd == "--version" || cmd == "version") {
    std::printf("tollgate %s\n", tollgate::kVersion);
    return 0;
  }
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd == "run") return runCommand({args.begin() + 1, args.end()});
  if (cmd == "policy") {
    if (args.size() < 2) return usageError("policy needs check or test");
    std::vector<std::string> files(args.begin() + 2, args.end());
    if (args[1] == "check") return tollgate::policyCheck(files, stdout, stderr);
    if (args[1] == "test") return tollgate::policyTest(files, stdout, stderr);
    return usageError("unknown policy command '" + std::string(args[1]) + "'");
  }
  if (cmd == "audit") {
    // Replay needs the policy engine, so it lives in policy/ (audit/ never includes it).
    if (args.size() >= 2 && args[1] == "replay")
      return tollgate::auditReplay({args.begin() + 2, args.end()}, stdout, stderr);
    return tollgate::auditCommand({args.begin() + 1, args.end()}, stdout, stderr);
  }
  if (cmd == "certs") return tollgate::certsCommand({args.begin() + 1, args.end()}, stdout, stderr);
  if (cmd == "pools") {
    if (args.size() < 2 || args[1] != "init") return usageError("pools needs init");
    return poolsInit({args.begin() + 2, args.end()});
  }
  return usageError("unknown command '" + std::string(cmd) + "'");
}
