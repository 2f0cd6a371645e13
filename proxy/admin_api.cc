#include "proxy/admin_api.h"

#include <uv.h>

#include <openssl/crypto.h>

#include <cerrno>
#include <charconv>

#include "common/json.h"
#include "common/sha256.h"
#include "proxy/http_message.h"
#include "proxy/version.h"
#include "proxy/worker.h"

namespace tollgate {
namespace {

// How long an answer waits for its record to be durable (one group commit, normally).
constexpr std::chrono::milliseconds kRecordWait{5000};

AdminResponse json(int status, std::string body) {
  body += '\n';
  return {status, "application/json", std::move(body)};
}

AdminResponse error(int status, std::string_view error, std::string_view reason) {
  std::string body;
  JsonObject(body).add("error", error).add("reason", reason).close();
  return json(status, std::move(body));
}

std::string_view queryParam(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    auto amp = query.find('&');
    auto pair = query.substr(0, amp);
    auto eq = pair.find('=');
    if (pair.substr(0, eq) == name)
      return eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return {};
}

// %XX sequences decoded (the audit CLI encodes every byte but letters and digits).
std::string percentDecoded(std::string_view v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] == '%' && i + 2 < v.size()) {
      int x = 0;
      auto [p, ec] = std::from_chars(v.data() + i + 1, v.data() + i + 3, x, 16);
      if (ec == std::errc() && p == v.data() + i + 3) {
        out += static_cast<char>(x);
        i += 2;
        continue;
      }
    }
    out += v[i] == '+' ? ' ' : v[i];
  }
  return out;
}

}  // namespace

AdminApi::AdminApi(Metrics& metrics, AuditSink& audit, const SharedState& shared,
                   BudgetStore* budgets, Engine* engine)
    : metrics_(metrics),
      audit_(audit),
      shared_(shared),
      budgets_(budgets),
      engine_(engine),
      startedMs_(static_cast<int64_t>(uv_hrtime() / 1'000'000)) {}

bool AdminApi::authorized(std::string_view authorization) const {
  const auto& tokens = shared_.config->adminTokens;
  auto token = bearerToken(authorization);
  if (!token) return false;
  std::string hashed = "sha256:" + sha256Hex(*token);
  bool match = false;
  for (const auto& t : tokens) {
    // Every stored hash is compared in full, in constant time.
    match |= t.size() == hashed.size() && CRYPTO_memcmp(t.data(), hashed.data(), t.size()) == 0;
  }
  return match;
}

void AdminApi::prepare(std::string_view path, std::function<void()> ready) const {
  if (budgets_ && (path == "/v1/pools" || path == "/metrics")) {
    budgets_->refresh(std::move(ready));
    return;
  }
  ready();
}

AdminResponse AdminApi::handle(std::string_view method, std::string_view target,
                               std::string_view authorization) const {
  auto q = target.find('?');
  auto path = target.substr(0, q);
  auto query = q == std::string_view::npos ? std::string_view() : target.substr(q + 1);
  bool get = method == "GET" || method == "HEAD";
  // Changes need a bearer token when tokens are configured. Approvals, key rotations and
  // report records always do: the admin listener is reachable by the agents it governs, and
  // none of them may answer its own approval, write into its audit stream or rotate its key
  // away (each rotation also holds worker 0 until its record is durable). With tokens
  // configured, reading what the calls were (the audit tail, the approvals: agents, paths,
  // reasons) needs one too; probes, metrics, status and pools stay open to kubelets and
  // scrapers.
  bool sensitiveRead = path == "/v1/audit/tail" || path.starts_with("/v1/approvals");
  bool alwaysToken = path.starts_with("/v1/approvals") || path == "/v1/audit/rotate-key" ||
                     path == "/v1/audit/report";
  if (!get || (sensitiveRead && !shared_.config->adminTokens.empty())) {
    bool needsToken = !shared_.config->adminTokens.empty() || (!get && alwaysToken);
    if (needsToken && !authorized(authorization)) {
      bool none = shared_.config->adminTokens.empty();
      return error(none ? 403 : 401, "unauthorized",
                   none ? "configure admin.tokens to use this endpoint"
                        : "a valid bearer token is required");
    }
  }

  if (path == "/healthz") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    return {200, "text/plain; charset=utf-8", "ok\n"};
  }
  if (path == "/readyz") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    if (!ready_) return {503, "text/plain; charset=utf-8", "not ready\n"};
    // Every call is halted while the audit stream cannot be written (until a restart): a
    // sidecar that can only refuse is not ready.
    if (!audit_.healthy())
      return {503, "text/plain; charset=utf-8", "not ready: audit stream unwritable\n"};
    return {200, "text/plain; charset=utf-8", "ready\n"};
  }
  if (path == "/metrics") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    if (budgets_) metrics_.setPools(budgets_->view());
    if (engine_) {
      std::vector<std::pair<std::string, int>> states;
      for (const auto& b : engine_->breakers())
        states.emplace_back(b.upstream, b.state == "open" ? 2 : b.state == "half-open" ? 1 : 0);
      metrics_.setBreakers(states);
    }
    return {200, "text/plain; version=0.0.4; charset=utf-8", metrics_.render()};
  }
  if (path == "/v1/status") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    std::string listeners = "[";
    for (const auto& l : shared_.listeners) {
      if (listeners.size() > 1) listeners += ',';
      JsonObject(listeners)
          .add("name", l->admin ? std::string("admin") : l->config.name)
          .add("kind", l->admin ? std::string("admin") : l->config.kind)
          .add("address", l->boundAddress)
          .add("connections", static_cast<uint64_t>(l->connections.load()))
          .close();
    }
    listeners += ']';
    std::string body;
    JsonObject(body)
        .add("version", kVersion)
        .add("mode", shared_.config->observe ? "observe" : "enforce")
        .add("uptime_ms", static_cast<int64_t>(uv_hrtime() / 1'000'000) - startedMs_)
        .add("ready", ready_.load())
        .addRaw("listeners", listeners)
        .close();
    return json(200, std::move(body));
  }
  if (path == "/v1/audit/tail") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    size_t n = 20;
    if (auto v = queryParam(query, "n"); !v.empty()) {
      auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (ec != std::errc() || end != v.data() + v.size() || n > 1000) {
        return error(400, "bad_request", "n must be an integer from 0 to 1000");
      }
    }
    std::string body;
    for (auto& line : audit_.tail(n)) {
      body += line;
      body += '\n';
    }
    return {200, "application/x-ndjson", std::move(body)};
  }
  if (path == "/v1/reload") {
    if (method != "POST") return error(405, "method_not_allowed", "use POST");
    if (!reload_) return error(500, "reload_failed", "no reload hook");
    ReloadOutcome outcome = reload_();
    switch (outcome.result) {
      case ReloadOutcome::Result::kReloaded:
        return json(200, R"({"reloaded":true})");
      case ReloadOutcome::Result::kNothingToReload:
        return error(409, "nothing_to_reload", outcome.error);
      case ReloadOutcome::Result::kRejected:
        break;
    }
    return error(500, "reload_failed", outcome.error);
  }
  if (path == "/v1/audit/report") {
    // `tollgate audit report --admin` while this sidecar holds the log: the report's hash
    // goes into the stream through it.
    if (method != "POST") return error(405, "method_not_allowed", "use POST");
    std::string hash(queryParam(query, "sha256"));
    if (hash.size() != 64 || hash.find_first_not_of("0123456789abcdef") != std::string::npos)
      return error(400, "bad_request", "sha256= must be 64 lower-case hex digits");
    std::string format = percentDecoded(queryParam(query, "format"));
    std::string from = percentDecoded(queryParam(query, "from"));
    std::string to = percentDecoded(queryParam(query, "to"));
    std::string file = percentDecoded(queryParam(query, "file"));
    uint64_t seq = audit_.appendEvent(
        "report",
        {{"sha256", hash}, {"format", format}, {"from", from}, {"to", to}, {"file", file}});
    if (!audit_.waitDurable(seq, kRecordWait))
      return error(503, "audit_unavailable",
                   "the report record (seq " + std::to_string(seq) + ") is not durable");
    std::string body;
    JsonObject(body).add("seq", seq).close();
    return json(200, std::move(body));
  }
  if (path == "/v1/audit/rotate-key") {
    if (method != "POST") return error(405, "method_not_allowed", "use POST");
    // Blocks this loop until the rotation record is durable: one group commit, rare.
    auto done = audit_.rotateKey();
    if (!done) {
      bool none = done.error().code == -ENOTSUP;
      return error(none ? 404 : 500, none ? "not_found" : "rotation_failed", done.error().message);
    }
    std::string body;
    JsonObject(body)
        .add("old_key_id", done.value().oldKeyId)
        .add("new_key_id", done.value().newKeyId)
        .add("seq", done.value().seq)
        .close();
    return json(200, std::move(body));
  }
  if (path == "/v1/approvals" || path.starts_with("/v1/approvals/"))
    return approvals(method, path, authorization);
  if (path == "/v1/breakers") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    if (!engine_)
      return error(404, "not_found", "breakers need a policy set (policies: in the config)");
    std::string body = "[";
    for (const auto& b : engine_->breakers()) {
      if (body.size() > 1) body += ',';
      JsonObject(body)
          .add("upstream", b.upstream)
          .add("host", b.host)
          .add("state", b.state)
          .add("consecutive_failures", static_cast<int64_t>(b.consecutiveFailures))
          .add("failures", static_cast<int64_t>(b.failures))
          .add("cooldown_ms", b.cooldownMs)
          .add("open_until_ms", b.openUntilMs)
          .add("probe_in_flight", b.probeInFlight)
          .close();
    }
    body += ']';
    return json(200, std::move(body));
  }
  if (path == "/v1/pools") {
    if (!get) return error(405, "method_not_allowed", "use GET");
    if (!budgets_)
      return error(404, "not_found", "pools need a policy set (policies: in the config)");
    std::string body = "[";
    for (const auto& b : budgets_->view()) {
      if (body.size() > 1) body += ',';
      JsonObject(body)
          .add("pool", b.pool)
          .add("dimension", b.dimension)
          .add("limit", b.limit)
          .add("committed", b.committed)
          .add("held", b.held)
          .add("remaining", b.remaining())
          .add("period_end_ms", b.periodEndMs)
          .add("tripped", b.tripped)
          .add("initialised", b.initialised)
          .add("available", b.available)
          .close();
    }
    body += ']';
    return json(200, std::move(body));
  }
  return error(404, "not_found", "no admin endpoint " + std::string(path));
}

AdminResponse AdminApi::approvals(std::string_view method, std::string_view path,
                                  std::string_view authorization) const {
  if (!engine_)
    return error(404, "not_found", "approvals need a policy set (policies: in the config)");
  if (path == "/v1/approvals") {
    if (method != "GET" && method != "HEAD") return error(405, "method_not_allowed", "use GET");
    std::string body = "[";
    for (const auto& a : engine_->approvals()) {
      if (body.size() > 1) body += ',';
      JsonObject(body)
          .add("id", a.id)
          .add("state", a.state)
          .add("agent", a.agent)
          .add("tool", a.tool)
          .add("method", a.method)
          .add("authority", a.authority)
          .add("path", a.path)
          .add("rule", a.rule)
          .add("fingerprint", a.fingerprint)
          .add("policy_digest", a.policyDigest)
          .add("created_ms", a.createdMs)
          .add("expires_ms", a.expiresMs)
          .add("lease_until_ms", a.leaseUntilMs)
          .close();
    }
    body += ']';
    return json(200, std::move(body));
  }
  // /v1/approvals/{id}/approve or /deny
  auto rest = path.substr(sizeof("/v1/approvals/") - 1);
  auto slash = rest.find('/');
  if (slash == std::string_view::npos)
    return error(404, "not_found", "use /v1/approvals/{id}/approve or /deny");
  std::string id(rest.substr(0, slash));
  auto action = rest.substr(slash + 1);
  if (method != "POST") return error(405, "method_not_allowed", "use POST");
  bool ok;
  if (action == "approve")
    ok = engine_->approve(id, std::chrono::milliseconds(0));
  else if (action == "deny")
    ok = engine_->deny(id);
  else
    return error(404, "not_found", "use /approve or /deny");
  if (!ok) return error(409, "not_pending", "no pending approval " + id);
  // The human decision is a record of its own: who (the token's fingerprint, never the
  // token), what, and the call it lets through or stops. The answer waits until it is
  // durable. (The call it lets through waits for its own record, which comes after it.)
  uint64_t seq = 0;
  for (const auto& a : engine_->approvals()) {
    if (a.id != id) continue;
    // The token as authenticated (`Bearer` and the spaces after it taken off).
    std::string approver = "sha256:" + sha256Hex(bearerToken(authorization).value_or(""), 8);
    std::string lease = std::to_string(a.leaseUntilMs);
    seq = audit_.appendEvent("approval", {{"approval_id", a.id},
                                          {"state", a.state},
                                          {"approver", approver},
                                          {"agent", a.agent},
                                          {"tool", a.tool},
                                          {"method", a.method},
                                          {"authority", a.authority},
                                          {"path", a.path},
                                          {"rule", a.rule},
                                          {"fingerprint", a.fingerprint},
                                          {"policy_digest", a.policyDigest},
                                          {"lease_until_ms", lease}});
    break;
  }
  if (seq && !audit_.waitDurable(seq, kRecordWait))
    return error(503, "audit_unavailable",
                 "the approval is in effect, but its record (seq " + std::to_string(seq) +
                     ") is not durable; calls stay halted until the audit stream is");
  std::string body;
  JsonObject(body).add("id", id).add("state", action == "approve" ? "approved" : "denied").close();
  return json(200, std::move(body));
}

}  // namespace tollgate
