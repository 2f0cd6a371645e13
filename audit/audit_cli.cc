#include "audit/audit_cli.h"

#include <charconv>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>

#include "audit/chain.h"
#include "audit/file_sink.h"
#include "audit/proof.h"
#include "audit/verify_state.h"

namespace tollgate {
namespace {

int usageError(std::FILE* err, const std::string& message) {
  std::fprintf(err, "tollgate: %s (see 'tollgate help')\n", message.c_str());
  return 2;
}

// The checkpoint public key in `path` (hex of the raw key); nullopt after printing why.
std::optional<Ed25519Key> loadPublicKey(const std::string& path, std::FILE* err) {
  std::ifstream in(path);
  std::string hex;
  if (!(in >> hex)) {
    std::fprintf(err, "tollgate: cannot read the public key %s\n", path.c_str());
    return std::nullopt;
  }
  auto key = Ed25519Key::fromRawPublic(fromHexBytes(hex));
  if (!key) {
    std::fprintf(err, "tollgate: %s: %s\n", path.c_str(), key.error().message.c_str());
    return std::nullopt;
  }
  return key.value();
}

struct VerifiedLog {
  std::vector<std::string> lines, segmentOf;
  ChainVerdict verdict;
};

// Reads and verifies the log in `dir`; the exit code when it cannot be read (2).
std::optional<VerifiedLog> readAndVerify(const std::string& dir, const Ed25519Key& key,
                                         std::FILE* err) {
  VerifiedLog log;
  auto lines = readAuditLog(dir, &log.segmentOf);
  if (!lines) {
    std::fprintf(err, "tollgate: %s\n", lines.error().message.c_str());
    return std::nullopt;
  }
  log.lines = std::move(lines.value());
  std::map<std::string, Ed25519Key> keys{{key.id(), key}};
  log.verdict = verifyChain(log.lines, keys);
  return log;
}

// A reason may quote a forged record's bytes: control characters are not sent to a terminal.
std::string printable(std::string text) {
  for (char& c : text) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return text;
}

// "INVALID segment-NNNNNN.jsonl:LINE (record SEQ): reason", or "INVALID DIR: reason" for a
// reason about the whole log (line 0).
int printInvalid(std::FILE* out, const VerifiedLog& log, const std::string& dir, uint64_t line,
                 const std::string& reason) {
  if (line == 0 || line > log.lines.size()) {
    std::fprintf(out, "INVALID %s: %s\n", dir.c_str(), printable(reason).c_str());
    return 1;
  }
  size_t within = 0;  // the line within its segment
  for (size_t i = 0; i < line; ++i)
    within = i > 0 && log.segmentOf[i] != log.segmentOf[i - 1] ? 1 : within + 1;
  std::fprintf(out, "INVALID %s:%zu (record %llu): %s\n", log.segmentOf[line - 1].c_str(), within,
               static_cast<unsigned long long>(line), printable(reason).c_str());
  return 1;
}

int auditVerify(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, pubkey, statePath;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--pubkey" || args[i] == "--state") {
      if (i + 1 >= args.size()) return usageError(err, std::string(args[i]) + " needs a file");
      (args[i] == "--pubkey" ? pubkey : statePath) = std::string(args[i + 1]);
      ++i;
    } else if (dir.empty() && !args[i].starts_with("-")) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "audit verify: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "audit verify needs a DIR");
  if (pubkey.empty()) pubkey = dir + "/keys/ed25519.pub";
  auto key = loadPublicKey(pubkey, err);
  if (!key) return 2;
  // The state first: a corrupt one is an error whatever the log holds.
  std::optional<TrustedCheckpoint> trusted;
  if (!statePath.empty()) {
    auto loaded = loadVerifyState(statePath);
    if (!loaded) {
      std::fprintf(err, "tollgate: %s\n", loaded.error().message.c_str());
      return 2;
    }
    trusted = loaded.value();
  }
  auto log = readAndVerify(dir, *key, err);
  if (!log) return 2;
  const ChainVerdict& v = log->verdict;
  if (!v.ok) return printInvalid(out, *log, dir, v.line, v.reason);
  if (trusted) {
    auto sv = checkTrustedCheckpoint(log->lines, *trusted);
    if (!sv.ok)
      return printInvalid(out, *log, dir, sv.line, sv.reason + " (state " + statePath + ")");
  }
  std::fprintf(
      out, "ok: %llu records, %llu checkpoints, %llu after the last checkpoint (unsealed)\n",
      static_cast<unsigned long long>(v.records), static_cast<unsigned long long>(v.checkpoints),
      static_cast<unsigned long long>(v.unsealed));
  if (statePath.empty()) return 0;
  if (v.lastCheckpoint.empty()) {
    std::fprintf(out, "state %s: no checkpoint to trust yet (not written)\n", statePath.c_str());
    return 0;
  }
  auto latest = trustedCheckpointOf(v.lastCheckpoint);
  if (!latest) {  // verifyChain() accepted it: cannot happen
    std::fprintf(err, "tollgate: the last checkpoint: %s\n", latest.error().message.c_str());
    return 1;
  }
  if (!trusted || !(latest.value() == *trusted)) {
    if (auto st = saveVerifyState(statePath, latest.value()); !st) {
      std::fprintf(err, "tollgate: %s\n", st.error().message.c_str());
      return 2;
    }
  }
  std::fprintf(out, "state %s: trusts checkpoint seq %llu (tree size %llu)%s\n", statePath.c_str(),
               static_cast<unsigned long long>(latest.value().seq),
               static_cast<unsigned long long>(latest.value().treeSize),
               !trusted                     ? ", created"
               : latest.value() == *trusted ? ", unchanged"
                                            : ", advanced");
  return 0;
}

int auditProveVerify(const std::string& proofPath, const std::string& pubkey, std::FILE* out,
                     std::FILE* err) {
  if (pubkey.empty()) return usageError(err, "audit prove --verify needs --pubkey F");
  auto key = loadPublicKey(pubkey, err);
  if (!key) return 2;
  std::ifstream in(proofPath, std::ios::binary);
  std::stringstream ss;
  if (in) ss << in.rdbuf();
  if (!in || in.bad()) {
    std::fprintf(err, "tollgate: cannot read the proof %s\n", proofPath.c_str());
    return 2;
  }
  std::string text = ss.str();
  if (!nlohmann::json::accept(text)) {
    std::fprintf(err, "tollgate: the proof %s is not JSON\n", proofPath.c_str());
    return 2;
  }
  auto proof = decodeProof(text);
  if (!proof) {
    std::fprintf(out, "INVALID proof: %s\n", proof.error().message.c_str());
    return 1;
  }
  if (auto st = verifyInclusionProof(proof.value(), *key); !st) {
    std::fprintf(out, "INVALID proof: %s\n", printable(st.error().message).c_str());
    return 1;
  }
  std::fprintf(out, "ok: record %llu is leaf %llu of the tree of size %llu signed by key %s\n",
               static_cast<unsigned long long>(proof.value().leafIndex + 1),
               static_cast<unsigned long long>(proof.value().leafIndex),
               static_cast<unsigned long long>(proof.value().treeSize), key->id().c_str());
  return 0;
}

int auditProve(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, seqArg, pubkey, proofPath;
  bool verifyMode = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--pubkey" || args[i] == "--verify") {
      if (i + 1 >= args.size()) return usageError(err, std::string(args[i]) + " needs a file");
      (args[i] == "--pubkey" ? pubkey : proofPath) = std::string(args[i + 1]);
      verifyMode = verifyMode || args[i] == "--verify";
      ++i;
    } else if (!args[i].starts_with("-") && (dir.empty() || seqArg.empty())) {
      (dir.empty() ? dir : seqArg) = std::string(args[i]);
    } else {
      return usageError(err, "audit prove: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (verifyMode) {
    if (!dir.empty()) return usageError(err, "audit prove --verify takes no DIR");
    return auditProveVerify(proofPath, pubkey, out, err);
  }
  uint64_t seq = 0;
  auto [end, ec] = std::from_chars(seqArg.data(), seqArg.data() + seqArg.size(), seq);
  if (dir.empty() || seqArg.empty() || ec != std::errc() || end != seqArg.data() + seqArg.size() ||
      seq == 0)
    return usageError(err, "audit prove needs DIR SEQ (a record's seq, from 1)");
  if (pubkey.empty()) pubkey = dir + "/keys/ed25519.pub";
  auto key = loadPublicKey(pubkey, err);
  if (!key) return 2;
  auto log = readAndVerify(dir, *key, err);
  if (!log) return 2;
  // Only a log that verifies is evidence.
  if (!log->verdict.ok) return printInvalid(out, *log, dir, log->verdict.line, log->verdict.reason);
  if (seq > log->lines.size()) {
    std::fprintf(err, "tollgate: the log has no record %llu (it has %zu)\n",
                 static_cast<unsigned long long>(seq), log->lines.size());
    return 2;
  }
  auto proof = proveInclusion(log->lines, seq);
  if (!proof) {
    std::fprintf(err, "tollgate: %s\n", proof.error().message.c_str());
    return 1;
  }
  std::fputs(encodeProof(proof.value()).c_str(), out);
  return 0;
}

}  // namespace

int auditCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  if (args.empty()) return usageError(err, "audit needs verify or prove");
  std::vector<std::string_view> rest(args.begin() + 1, args.end());
  if (args[0] == "verify") return auditVerify(rest, out, err);
  if (args[0] == "prove") return auditProve(rest, out, err);
  return usageError(err, "unknown audit command '" + std::string(args[0]) + "'");
}

}  // namespace tollgate
