#include "audit/chain.h"

#include <algorithm>
#include <charconv>
#include <set>

#include "audit/canonical_json.h"
#include "common/json.h"
#include "common/sha256.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;
const char* const kOwnKeys[] = {"v", "log_id", "seq", "ts_ns", "prev", "kind"};
// Every kind a log may hold; anything else is a forgery (e.g. a checkpoint renamed to
// pass as an unsealed record).
const std::set<std::string> kKinds = {"call",         "outcome",    "reload",
                                      "approval",     "checkpoint", "recovery",
                                      "key_rotation", "report",     "job"};

std::string canonical(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::strict);
}

}  // namespace

std::string lineHash(std::string_view line) {
  return sha256Hex(line);
}

bool checkpointSignatureValid(const Json& checkpoint, const Ed25519Key& key) {
  if (!checkpoint.is_object() || !checkpoint.contains("sig") || !checkpoint["sig"].is_string())
    return false;
  std::string sig = fromHexBytes(checkpoint["sig"].get<std::string>());
  Json body = checkpoint;
  body.erase("sig");
  return sig.size() == 64 && key.verify(canonical(body), sig);
}

std::string AuditChain::seal(std::string line) {
  prev_ = lineHash(line);
  tree_.append(leafHash(line));
  ++sinceCheckpoint_;
  return line;
}

void AuditChain::resume(const std::vector<std::string>& lines) {
  for (const auto& line : lines) {
    Json r = Json::parse(line);
    seq_ = r["seq"].get<uint64_t>();
    lastTs_ = std::max(lastTs_, r["ts_ns"].get<int64_t>());
    prev_ = lineHash(line);
    tree_.append(leafHash(line));
    ++sinceCheckpoint_;
    if (r["kind"] == "checkpoint") {
      prevCheckpoint_ = prev_;
      sinceCheckpoint_ = 0;
    }
  }
}

void AuditChain::stamp(Json& record, std::string_view kind, int64_t tsNs) {
  lastTs_ = std::max(lastTs_, tsNs);
  record["v"] = 1;
  record["log_id"] = logId_;
  record["seq"] = ++seq_;
  record["ts_ns"] = lastTs_;
  record["prev"] = prev_;
  record["kind"] = std::string(kind);
}

std::string AuditChain::append(std::string_view kind, Json fields, int64_t tsNs) {
  Json record = fields.is_object() ? std::move(fields) : Json::object();
  stamp(record, kind, tsNs);
  return seal(canonical(record));
}

std::string AuditChain::appendStrings(
    std::string_view kind, std::vector<std::pair<std::string_view, std::string_view>> fields,
    int64_t tsNs) {
  lastTs_ = std::max(lastTs_, tsNs);
  ++seq_;
  // The chain's own keys, rendered, then every key in byte order.
  char seqBuf[24], tsBuf[24];
  auto seqEnd = std::to_chars(seqBuf, seqBuf + sizeof seqBuf, seq_).ptr;
  auto tsEnd = std::to_chars(tsBuf, tsBuf + sizeof tsBuf, lastTs_).ptr;
  struct Entry {
    std::string_view key, value;
    bool raw;  // a number, written as is
  };
  std::vector<Entry> entries;
  entries.reserve(fields.size() + 6);
  for (const auto& [k, v] : fields) entries.push_back({k, v, false});
  entries.push_back({"kind", kind, false});
  entries.push_back({"log_id", logId_, false});
  entries.push_back({"prev", prev_, false});
  entries.push_back({"seq", {seqBuf, static_cast<size_t>(seqEnd - seqBuf)}, true});
  entries.push_back({"ts_ns", {tsBuf, static_cast<size_t>(tsEnd - tsBuf)}, true});
  entries.push_back({"v", "1", true});
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.key < b.key; });
  std::string line;
  line.reserve(512);
  line += '{';
  for (size_t i = 0; i < entries.size(); ++i) {
    if (i) line += ',';
    appendJsonString(line, entries[i].key);
    line += ':';
    if (entries[i].raw)
      line += entries[i].value;
    else
      appendJsonString(line, entries[i].value);
  }
  line += '}';
  return seal(std::move(line));
}

std::string AuditChain::checkpoint(const Ed25519Key& key, int64_t tsNs) {
  Json body = {{"tree_size", tree_.size()},
               {"root", toHex(tree_.root())},
               {"prev_checkpoint", prevCheckpoint_},
               {"key_id", key.id()}};
  stamp(body, "checkpoint", tsNs);
  body["sig"] = toHexBytes(key.sign(canonical(body)));
  std::string line = seal(canonical(body));
  prevCheckpoint_ = lineHash(line);
  sinceCheckpoint_ = 0;
  return line;
}

ChainVerdict verifyChain(const std::vector<std::string>& lines,
                         const std::map<std::string, Ed25519Key>& keys) {
  ChainVerdict v;
  auto bad = [&](uint64_t line, std::string reason) {
    v.ok = false;
    v.line = line;
    v.reason = std::move(reason);
    return v;
  };
  std::string logId, prev = std::string(64, '0'), prevCheckpoint = std::string(64, '0');
  int64_t lastTs = 0;
  MerkleAccumulator tree;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string& line = lines[i];
    uint64_t n = i + 1;
    auto canon = canonicalJson(line);
    if (!canon) return bad(n, "not a JSON record: " + canon.error().message);
    if (canon.value() != line) return bad(n, "not canonical JSON (the record was rewritten)");
    Json r = Json::parse(line);
    if (!r.is_object()) return bad(n, "not a JSON object");
    for (const char* k : kOwnKeys) {
      if (!r.contains(k)) return bad(n, std::string("missing \"") + k + "\"");
    }
    if (r["v"] != 1) return bad(n, "unknown record version");
    if (!r["seq"].is_number_unsigned() || !r["ts_ns"].is_number_integer() ||
        !r["prev"].is_string() || !r["log_id"].is_string() || !r["kind"].is_string())
      return bad(n, "a chain field has the wrong type");
    if (!kKinds.count(r["kind"].get<std::string>()))
      return bad(n, "unknown record kind \"" + r["kind"].get<std::string>() + "\"");
    if (i == 0) logId = r["log_id"].get<std::string>();
    if (r["log_id"] != logId)
      return bad(n, "record of another log (" + r["log_id"].get<std::string>() + ")");
    uint64_t seq = r["seq"].get<uint64_t>();
    if (seq != n) {
      return bad(n, "sequence broken: expected seq " + std::to_string(n) + ", found " +
                        std::to_string(seq) +
                        (seq > n ? " (records missing)" : " (records repeated or reordered)"));
    }
    if (r["prev"] != prev)
      return bad(n, "broken link: prev is not the hash of record " + std::to_string(n - 1));
    int64_t ts = r["ts_ns"].get<int64_t>();
    if (ts < lastTs) return bad(n, "time goes backwards (ts_ns below the previous record's)");
    lastTs = ts;
    if (r["kind"] == "checkpoint") {
      if (!r.contains("tree_size") || !r.contains("root") || !r.contains("prev_checkpoint") ||
          !r.contains("key_id") || !r.contains("sig") || !r["sig"].is_string() ||
          !r["key_id"].is_string() || !r["root"].is_string())
        return bad(n, "checkpoint without tree_size, root, prev_checkpoint, key_id and sig");
      if (r["tree_size"] != tree.size())
        return bad(n, "checkpoint tree_size " + r["tree_size"].dump() + " is not the " +
                          std::to_string(tree.size()) +
                          " records before it (a replayed checkpoint?)");
      if (r["root"] != toHex(tree.root()))
        return bad(n,
                   "checkpoint root does not match the records before it (a record was changed)");
      if (r["prev_checkpoint"] != prevCheckpoint)
        return bad(n, "checkpoint does not link the previous checkpoint (a fork or a replay)");
      auto key = keys.find(r["key_id"].get<std::string>());
      if (key == keys.end())
        return bad(n, "checkpoint signed by an unknown key " + r["key_id"].get<std::string>());
      if (!checkpointSignatureValid(r, key->second))
        return bad(n, "checkpoint signature does not verify");
      prevCheckpoint = lineHash(line);
      ++v.checkpoints;
      v.unsealed = 0;
      v.lastCheckpoint = line;
    } else {
      ++v.unsealed;
    }
    prev = lineHash(line);
    tree.append(leafHash(line));
    ++v.records;
  }
  return v;
}

}  // namespace tollgate
