#include "audit/proof.h"

#include <nlohmann/json.hpp>

#include "audit/canonical_json.h"
#include "audit/chain.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;

bool unsignedField(const Json& j, const char* key, uint64_t* out) {
  if (!j.is_object()) return false;
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned()) return false;
  *out = it->get<uint64_t>();
  return true;
}

Error invalid(std::string message) {
  return Error{-1, std::move(message)};
}

// The subtrees whose roots make the audit path of leaf m in the tree over leaves
// [begin, begin + n), from the leaf up (PATH of RFC 6962 §2.1.1).
void pathRanges(uint64_t m, uint64_t begin, uint64_t n,
                std::vector<std::pair<uint64_t, uint64_t>>& out) {
  if (n <= 1) return;
  uint64_t k = 1;
  while (k * 2 < n) k *= 2;
  if (m < k) {
    pathRanges(m, begin, k, out);
    out.emplace_back(begin + k, begin + n);
  } else {
    pathRanges(m - k, begin + k, n - k, out);
    out.emplace_back(begin, begin + k);
  }
}

}  // namespace

void InclusionProver::scan(const std::string& line) {
  ++scanned_;
  if (scanned_ == seq_) record_ = line;
  // A canonical line names its kind once, and a value cannot hold these bytes (its quotes
  // are escaped): only candidates are parsed.
  if (line.find("\"kind\":\"checkpoint\"") != std::string::npos) {
    Json r = Json::parse(line, nullptr, false);
    uint64_t size = 0;
    if (stringField(r, "kind") == "checkpoint" && unsignedField(r, "tree_size", &size)) {
      checkpoint_ = line;
      treeSize_ = size;
      rotationsBefore_ = rotations_.size();
    }
  } else if (line.find("\"kind\":\"key_rotation\"") != std::string::npos) {
    Json r = Json::parse(line, nullptr, false);
    if (stringField(r, "kind") == "key_rotation") rotations_.push_back(line);
  }
}

Result<uint64_t> InclusionProver::sealed() {
  if (seq_ == 0 || seq_ > scanned_)
    return invalid("the log has no record " + std::to_string(seq_) + " (it has " +
                   std::to_string(scanned_) + ")");
  if (checkpoint_.empty() || seq_ > treeSize_ || treeSize_ > scanned_)
    return invalid("record " + std::to_string(seq_) + " is not yet sealed by a checkpoint");
  ranges_.clear();
  pathRanges(seq_ - 1, 0, treeSize_, ranges_);
  roots_.assign(ranges_.size(), Hash{});
  open_.assign(ranges_.size(), MerkleAccumulator());
  hashed_ = 0;
  sealed_ = true;
  return treeSize_;
}

bool InclusionProver::hash(std::string_view line) {
  if (!sealed_ || hashed_ >= treeSize_) return false;
  uint64_t i = hashed_++;
  if (i + 1 == seq_) {
    if (line != record_) record_.clear();  // the log changed between the passes
  } else {
    // The ranges are disjoint: at most one holds leaf i.
    for (size_t r = 0; r < ranges_.size(); ++r) {
      if (i < ranges_[r].first || i >= ranges_[r].second) continue;
      open_[r].append(leafHash(line));
      if (i + 1 == ranges_[r].second) roots_[r] = open_[r].root();
      break;
    }
  }
  return hashed_ < treeSize_;
}

Result<InclusionProof> InclusionProver::proof() {
  if (!sealed_) return invalid("the proof was not built");
  if (hashed_ != treeSize_ || record_.empty())
    return invalid("the log changed while the proof was built");
  InclusionProof p{record_, seq_ - 1, treeSize_, roots_, checkpoint_, {}};
  for (size_t i = 0; i < rotationsBefore_; ++i) p.rotations.push_back(rotations_[i]);
  return p;
}

Result<InclusionProof> proveInclusion(const std::vector<std::string>& lines, uint64_t seq) {
  InclusionProver prover(seq);
  for (const auto& l : lines) prover.scan(l);
  auto size = prover.sealed();
  if (!size) return size.error();
  for (const auto& l : lines) {
    if (!prover.hash(l)) break;
  }
  return prover.proof();
}

std::string encodeProof(const InclusionProof& p) {
  Json path = Json::array();
  for (const Hash& h : p.path) path.push_back(toHex(h));
  Json j = {{"v", 1},
            {"leaf_index", p.leafIndex},
            {"tree_size", p.treeSize},
            {"record", p.record},
            {"path", std::move(path)},
            {"checkpoint", p.checkpoint}};
  if (!p.rotations.empty()) j["rotations"] = p.rotations;
  return j.dump(2) + "\n";
}

Result<InclusionProof> decodeProof(std::string_view text) {
  Json j = Json::parse(text, nullptr, false);
  if (j.is_discarded()) return invalid("not JSON");
  if (!j.is_object()) return invalid("not a proof object");
  if (!j.contains("v") || j["v"] != 1) return invalid("unknown proof version");
  InclusionProof p;
  if (!unsignedField(j, "leaf_index", &p.leafIndex))
    return invalid("missing or bad \"leaf_index\"");
  if (!unsignedField(j, "tree_size", &p.treeSize)) return invalid("missing or bad \"tree_size\"");
  if (!j.contains("record") || !j["record"].is_string()) return invalid("missing \"record\"");
  p.record = j["record"].get<std::string>();
  if (!j.contains("checkpoint") || !j["checkpoint"].is_string())
    return invalid("missing \"checkpoint\"");
  p.checkpoint = j["checkpoint"].get<std::string>();
  if (!j.contains("path") || !j["path"].is_array()) return invalid("missing \"path\"");
  for (const Json& h : j["path"]) {
    auto hash = h.is_string() ? hashFromHex(h.get<std::string>()) : std::nullopt;
    if (!hash) return invalid("a path element is not a hex SHA-256");
    p.path.push_back(*hash);
  }
  if (j.contains("rotations")) {
    if (!j["rotations"].is_array()) return invalid("\"rotations\" is not an array");
    for (const Json& r : j["rotations"]) {
      if (!r.is_string()) return invalid("a rotation is not a record line");
      p.rotations.push_back(r.get<std::string>());
    }
  }
  return p;
}

Result<std::string> verifyInclusionProof(const InclusionProof& p, const Ed25519Key& anchor,
                                         const Keyring* pinned) {
  if (!isCanonicalJson(p.checkpoint)) return invalid("the checkpoint is not canonical JSON");
  Json cp = Json::parse(p.checkpoint, nullptr, false);
  uint64_t cpSize = 0, cpSeq = 0;
  if (stringField(cp, "kind") != "checkpoint" || !unsignedField(cp, "tree_size", &cpSize) ||
      !unsignedField(cp, "seq", &cpSeq) || stringField(cp, "log_id").empty())
    return invalid("the checkpoint is not a checkpoint record");
  auto root = hashFromHex(stringField(cp, "root"));
  if (!root) return invalid("the checkpoint has no root");
  // The key chain from the anchor to the checkpoint's key.
  Ed25519Key key = anchor;
  uint64_t lastSeq = 0;
  for (size_t i = 0; i < p.rotations.size(); ++i) {
    std::string which = "rotation " + std::to_string(i + 1) + ": ";
    if (!isCanonicalJson(p.rotations[i])) return invalid(which + "not canonical JSON");
    Json r = Json::parse(p.rotations[i], nullptr, false);
    uint64_t rseq = 0;
    if (stringField(r, "kind") != "key_rotation" || !unsignedField(r, "seq", &rseq))
      return invalid(which + "not a key_rotation record");
    if (stringField(r, "log_id") != stringField(cp, "log_id"))
      return invalid(which + "a record of another log than the checkpoint");
    if (rseq <= lastSeq || rseq >= cpSeq)
      return invalid(which + "seq " + std::to_string(rseq) +
                     " is not after the previous rotation and before the checkpoint");
    auto next = checkKeyRotation(r, key);
    if (!next) return invalid(which + next.error().message);
    key = next.value();
    lastSeq = rseq;
  }
  if (stringField(cp, "key_id") != key.id())
    return invalid("the checkpoint is signed by key " + stringField(cp, "key_id") + ", not by " +
                   (p.rotations.empty() ? "the given key " : "the key its rotations lead to ") +
                   key.id());
  if (!checkpointSignatureValid(cp, key))
    return invalid("the checkpoint signature does not verify");
  if (pinned) {
    const KeyWindow* w = nullptr;
    for (const auto& k : *pinned) {
      if (k.key.id() == key.id()) w = &k;
    }
    if (!w) return invalid("the checkpoint's key " + key.id() + " is not in the keyring");
    if (cpSeq < w->fromSeq || (w->toSeq && cpSeq > w->toSeq))
      return invalid("the checkpoint (seq " + std::to_string(cpSeq) + ") is signed by key " +
                     key.id() + " outside its validity window in the keyring");
  }
  if (p.treeSize != cpSize)
    return invalid("tree size " + std::to_string(p.treeSize) + " is not the checkpoint's " +
                   std::to_string(cpSize));
  if (p.leafIndex >= p.treeSize)
    return invalid("leaf index " + std::to_string(p.leafIndex) + " is outside the tree of size " +
                   std::to_string(p.treeSize));
  if (!isCanonicalJson(p.record)) return invalid("the record is not canonical JSON");
  Json rec = Json::parse(p.record, nullptr, false);
  uint64_t seq = 0;
  if (!unsignedField(rec, "seq", &seq)) return invalid("the record has no seq");
  if (stringField(rec, "log_id") != stringField(cp, "log_id"))
    return invalid("the record is of another log than the checkpoint");
  if (seq != p.leafIndex + 1)
    return invalid("the record has seq " + std::to_string(seq) + ", not the leaf index " +
                   std::to_string(p.leafIndex) + " + 1");
  if (!verifyInclusion(leafHash(p.record), p.leafIndex, p.treeSize, p.path, *root))
    return invalid(
        "the audit path does not lead from the record's leaf hash to the checkpoint's "
        "root");
  return key.id();
}

}  // namespace tollgate
