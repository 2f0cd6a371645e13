// The audit stream's record chain (DESIGN §6), independent of files: each record is one
// line of canonical JSON with `v`, `log_id`, `seq`, `ts_ns`, `prev` (hex SHA-256 of the
// previous line; 64 zeros for the first) and `kind`, plus its fields. Every line is a leaf
// of an RFC 6962 Merkle tree. A checkpoint record commits the tree of every line before it
// (`tree_size`, `root`), links the previous checkpoint (`prev_checkpoint`) and is signed
// with Ed25519 (`key_id`, `sig` over the canonical record without `sig`).
//
// Keys rotate (DESIGN §6 "key window"): a `key_rotation` record names `old_key_id`,
// `new_key_id` and `new_public` (hex raw key) and carries `sig_old` and `sig_new`, Ed25519
// signatures by both keys over the canonical record without the two sig fields. The old key
// signs checkpoints up to the rotation, the new one from the next record on.
//
// AuditChain writes; verifyChain() checks a sequence of lines and names the first bad one.
// Kinds: call, outcome, reload, approval, checkpoint, recovery, key_rotation, report, job.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json_fwd.hpp>  // the .cc files that build or read records include json.hpp
#include <string>
#include <string_view>
#include <vector>

#include "audit/merkle.h"
#include "audit/signer.h"
#include "common/result.h"

namespace tollgate {

// A record's line without the chain's values: its fields, `kind`, `log_id` and `v` in
// canonical form, with gaps where `prev`, `seq` and `ts_ns` go. Rendering it needs no chain
// state, so the thread that has the record does it (the calls' workers); the chain fills the
// gaps in order (AuditChain::appendTemplate).
struct AuditTemplate {
  std::string text;
  uint32_t prevAt = 0, seqAt = 0, tsAt = 0;  // where each value goes, in this order
};
// Keys must not be the chain's own. Strings are escaped and invalid UTF-8 replaced.
AuditTemplate renderAuditTemplate(
    std::string_view logId, std::string_view kind,
    std::vector<std::pair<std::string_view, std::string_view>> fields);

class AuditChain {
 public:
  explicit AuditChain(std::string logId) : logId_(std::move(logId)) {}

  // The next record's line (no newline). `fields` may not set the chain's own keys; a
  // timestamp earlier than the last one is raised to it (the clock may step back).
  std::string append(std::string_view kind, nlohmann::json fields, int64_t tsNs);
  // The same for records of string fields only, written directly in canonical form (the
  // hot path: one per decision). Keys must not be the chain's own.
  std::string appendStrings(std::string_view kind,
                            std::vector<std::pair<std::string_view, std::string_view>> fields,
                            int64_t tsNs);
  // The next record from its template, appended to `out` (no newline); its length.
  size_t appendTemplate(const AuditTemplate& t, int64_t tsNs, std::string& out);
  // A signed checkpoint over every line so far.
  std::string checkpoint(const Ed25519Key& key, int64_t tsNs);
  // A key_rotation record from `oldKey` to `newKey`, signed by both.
  std::string keyRotation(const Ed25519Key& oldKey, const Ed25519Key& newKey, int64_t tsNs);

  // Continues after `lines`, a log that verifyChain() accepted; or after one more line.
  void resume(const std::vector<std::string>& lines);
  void resume(std::string_view line);

  uint64_t size() const { return tree_.size(); }
  uint64_t sinceCheckpoint() const { return sinceCheckpoint_; }
  const std::string& logId() const { return logId_; }

 private:
  // Sets the chain's own keys (the next seq, the timestamp raised monotonic, prev, kind).
  void stamp(nlohmann::json& record, std::string_view kind, int64_t tsNs);
  std::string seal(std::string line);  // links and hashes a finished line
  void sealView(std::string_view line);
  std::string logId_;
  uint64_t seq_ = 0;
  int64_t lastTs_ = 0;
  std::string prev_ = std::string(64, '0');
  std::string prevCheckpoint_ = std::string(64, '0');
  MerkleAccumulator tree_;
  uint64_t sinceCheckpoint_ = 0;
};

// One key of a log and the seqs of the checkpoints it may sign: fromSeq..toSeq (toSeq 0: to
// the end). A rotation at seq R closes the old key's window at R and opens the new one's at
// R + 1.
struct KeyWindow {
  Ed25519Key key;
  uint64_t fromSeq = 1;
  uint64_t toSeq = 0;
};
// Keys in the order they were used: the verifier's view of a log, or the windows an
// operator pins out of band (`audit verify --keyring F`).
using Keyring = std::vector<KeyWindow>;

// "K1 seq 1-120, K2 seq 121-".
std::string describeKeyring(const Keyring& keyring);
// A keyring file: [{"key_id":hex,"public":hex,"from_seq":N,"to_seq":N|null}, …]; each
// key_id must be its public key's id. Error: the first bad entry.
Result<Keyring> parseKeyring(std::string_view text);

struct ChainVerdict {
  bool ok = true;
  uint64_t line = 0;  // 1-based line of the first bad record
  std::string reason;
  uint64_t records = 0, checkpoints = 0;
  uint64_t unsealed = 0;       // records after the last checkpoint
  std::string lastCheckpoint;  // its line
  Keyring keyring;             // the keys the log used, with their windows (so far)
};

// verifyChain() a line at a time, so that a log is checked as it is read, never whole in
// memory. add() is false from the first bad line on; verdict() says why.
class ChainVerifier {
 public:
  // `pinned` (or none): as verifyChain(lines, pinned) below; it must outlive the verifier.
  explicit ChainVerifier(const Ed25519Key& anchor, const Keyring* pinned = nullptr);
  bool add(const std::string& line);
  const ChainVerdict& verdict() const { return v_; }

 private:
  ChainVerdict v_;
  const Keyring* pinned_;
  std::string logId_, prev_ = std::string(64, '0'), prevCheckpoint_ = std::string(64, '0');
  int64_t lastTs_ = 0;
  MerkleAccumulator tree_;
};

// Trusting `anchor`, the log's first key: each key_rotation must be signed by the active
// key and by the new one, which is active from then on; every checkpoint must be signed by
// the active key.
ChainVerdict verifyChain(const std::vector<std::string>& lines, const Ed25519Key& anchor);
// Trusting only the keys in `pinned`: the same, starting from its key of the lowest
// from_seq, and each checkpoint's key must also be in `pinned` with the seq inside its
// window, and each rotation's new key listed there.
ChainVerdict verifyChain(const std::vector<std::string>& lines, const Keyring& pinned);

// Whether a line (of a log that verified) is a checkpoint: canonical lines have the one form.
inline bool isCheckpointLine(std::string_view line) {
  return line.find("\"kind\":\"checkpoint\"") != std::string_view::npos;
}

// Hex SHA-256 of a line: what the next record's `prev` holds.
std::string lineHash(std::string_view line);

// Whether a parsed checkpoint record carries `key`'s Ed25519 signature (hex `sig`) over its
// canonical form without `sig`. The verifier and `audit prove --verify` both use it.
bool checkpointSignatureValid(const nlohmann::json& checkpoint, const Ed25519Key& key);

// Checks a parsed key_rotation record against the key active before it: it names that key,
// its new_key_id is new_public's id, and sig_old and sig_new verify. Returns the new key;
// error: why not (the verifier and `audit prove --verify` both use it).
Result<Ed25519Key> checkKeyRotation(const nlohmann::json& rotation, const Ed25519Key& active);

// A parsed record's string field, or "" when the record is not an object or the field is
// absent or not a string (json::value() would throw).
std::string stringField(const nlohmann::json& record, const char* key);

}  // namespace tollgate
