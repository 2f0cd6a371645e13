// `tollgate audit replay DIR [--policy FILE...]`: re-evaluates every call recorded in an
// audit log with the policy set of its recorded digest, loaded from the log's policy
// archive (audit/policy_archive.h), or with the given set, and lists each decision that
// would differ.
//
// It lives in policy/ because it needs both the policy engine and the audit log: policy/
// depends on audit/ (the log reader and the archive) and audit/ never on policy/, so the
// dependencies still point one way; `tollgate audit replay` is dispatched here by main.cc,
// the other audit subcommands by audit/audit_cli.
//
// Replay is of the stateless policy decision only: each call is evaluated by a fresh
// engine at its recorded time. What depended on state — budgets, rate limits, failure
// counters, breakers, cascade quarantines, human approvals — or on the body (which the
// record does not carry) is counted as not replayable, with the reason.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "policy/policy_set.h"

namespace tollgate {

// What a call record holds (audit/chain.h, kind "call").
struct RecordedCall {
  uint64_t seq = 0;
  int64_t tsNs = 0;
  std::string agent, method, authority, path, decision, rule, digest;
  bool hadBody = false;  // the proxy read its body (the record has params_sha256)
};

struct ReplayResult {
  bool replayable = false;
  std::string whyNot;  // when not replayable: a short reason, the summary's category
  std::string decision, rule;
  bool differs = false;
};

// Replays one call with `set` (null: the set is unavailable, `missing` says why).
ReplayResult replayCall(const RecordedCall& call, const PolicySet* set,
                        const std::string& missing = "");

int auditReplay(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err);

}  // namespace tollgate
