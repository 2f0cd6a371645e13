#include "audit/chain.h"

#include <algorithm>
#include <charconv>
#include <iterator>
#include <nlohmann/json.hpp>
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
  sealView(line);
  return line;
}

void AuditChain::sealView(std::string_view line) {
  sha256HexInto(line, prev_);  // lineHash(line), in prev_'s own buffer
  tree_.append(leafHash(line));
  ++sinceCheckpoint_;
}

void AuditChain::resume(const std::vector<std::string>& lines) {
  for (const auto& line : lines) resume(line);
}

void AuditChain::resume(std::string_view line) {
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

AuditTemplate renderAuditTemplate(
    std::string_view logId, std::string_view kind,
    std::vector<std::pair<std::string_view, std::string_view>> fields) {
  // The chain's own keys (prev, seq and ts_ns left as gaps), then every key in byte order.
  enum class Value { kString, kRaw, kPrev, kSeq, kTs };
  struct Entry {
    std::string_view key, value;
    Value how;
  };
  // The caller's fields, sorted (they mostly come sorted), merged with the chain's keys.
  // Keys mostly differ in their first byte: compared there without a call to memcmp.
  auto less = [](std::string_view a, std::string_view b) {
    if (!a.empty() && !b.empty() && a[0] != b[0])
      return static_cast<unsigned char>(a[0]) < static_cast<unsigned char>(b[0]);
    return a < b;
  };
  auto byKey = [&](const auto& a, const auto& b) { return less(a.first, b.first); };
  if (!std::is_sorted(fields.begin(), fields.end(), byKey))
    std::sort(fields.begin(), fields.end(), byKey);
  const Entry own[] = {{"kind", kind, Value::kString}, {"log_id", logId, Value::kString},
                       {"prev", {}, Value::kPrev},     {"seq", {}, Value::kSeq},
                       {"ts_ns", {}, Value::kTs},      {"v", "1", Value::kRaw}};
  // On the stack for any record a call makes (this runs for every call).
  Entry small[32];
  std::vector<Entry> large;
  Entry* entries = small;
  if (fields.size() + std::size(own) > std::size(small)) {
    large.resize(fields.size() + std::size(own));
    entries = large.data();
  }
  size_t count = 0, o = 0;
  for (const auto& [k, v] : fields) {
    while (o < std::size(own) && less(own[o].key, k)) entries[count++] = own[o++];
    entries[count++] = {k, v, Value::kString};
  }
  while (o < std::size(own)) entries[count++] = own[o++];
  AuditTemplate t;
  std::string& line = t.text;
  line.reserve(512);
  line += '{';
  for (size_t i = 0; i < count; ++i) {
    if (i) line += ',';
    appendJsonString(line, entries[i].key);
    line += ':';
    switch (entries[i].how) {
      case Value::kString:
        appendJsonString(line, entries[i].value);
        break;
      case Value::kRaw:
        line += entries[i].value;
        break;
      case Value::kPrev:  // a hex string
        line += "\"\"";
        t.prevAt = static_cast<uint32_t>(line.size() - 1);
        break;
      case Value::kSeq:
        t.seqAt = static_cast<uint32_t>(line.size());
        break;
      case Value::kTs:
        t.tsAt = static_cast<uint32_t>(line.size());
        break;
    }
  }
  line += '}';
  return t;
}

size_t AuditChain::appendTemplate(const AuditTemplate& t, int64_t tsNs, std::string& out) {
  lastTs_ = std::max(lastTs_, tsNs);
  ++seq_;
  char seqBuf[24], tsBuf[24];
  auto seqEnd = std::to_chars(seqBuf, seqBuf + sizeof seqBuf, seq_).ptr;
  auto tsEnd = std::to_chars(tsBuf, tsBuf + sizeof tsBuf, lastTs_).ptr;
  std::string_view text = t.text;
  size_t start = out.size();
  out.append(text.substr(0, t.prevAt));
  out += prev_;
  out.append(text.substr(t.prevAt, t.seqAt - t.prevAt));
  out.append(seqBuf, seqEnd);
  out.append(text.substr(t.seqAt, t.tsAt - t.seqAt));
  out.append(tsBuf, tsEnd);
  out.append(text.substr(t.tsAt));
  sealView(std::string_view(out).substr(start));
  return out.size() - start;
}

std::string AuditChain::appendStrings(
    std::string_view kind, std::vector<std::pair<std::string_view, std::string_view>> fields,
    int64_t tsNs) {
  std::string line;
  appendTemplate(renderAuditTemplate(logId_, kind, std::move(fields)), tsNs, line);
  return line;
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

std::string AuditChain::keyRotation(const Ed25519Key& oldKey, const Ed25519Key& newKey,
                                    int64_t tsNs) {
  Json body = {{"old_key_id", oldKey.id()},
               {"new_key_id", newKey.id()},
               {"new_public", toHexBytes(newKey.rawPublic())}};
  stamp(body, "key_rotation", tsNs);
  std::string signedPart = canonical(body);
  body["sig_old"] = toHexBytes(oldKey.sign(signedPart));
  body["sig_new"] = toHexBytes(newKey.sign(signedPart));
  return seal(canonical(body));
}

Result<Ed25519Key> checkKeyRotation(const Json& r, const Ed25519Key& active) {
  for (const char* k : {"old_key_id", "new_key_id", "new_public", "sig_old", "sig_new"}) {
    if (!r.contains(k) || !r[k].is_string())
      return Error{-1,
                   "key rotation without old_key_id, new_key_id, new_public, sig_old and sig_new"};
  }
  std::string oldId = r["old_key_id"].get<std::string>();
  std::string newId = r["new_key_id"].get<std::string>();
  if (oldId != active.id())
    return Error{-1, "key rotation not signed by the active key " + active.id() +
                         " (it names the old key " + oldId + ")"};
  auto newKey = Ed25519Key::fromRawPublic(fromHexBytes(r["new_public"].get<std::string>()));
  if (!newKey) return Error{-1, "key rotation whose new_public is not an Ed25519 public key"};
  if (newKey.value().id() != newId)
    return Error{-1, "key rotation whose new_key_id is not the id of new_public"};
  if (newId == active.id()) return Error{-1, "key rotation to the active key itself"};
  Json body = r;
  body.erase("sig_old");
  body.erase("sig_new");
  std::string signedPart = canonical(body);
  std::string sigOld = fromHexBytes(r["sig_old"].get<std::string>());
  std::string sigNew = fromHexBytes(r["sig_new"].get<std::string>());
  if (sigOld.size() != 64 || !active.verify(signedPart, sigOld))
    return Error{-1, "key rotation not signed by the active key " + active.id()};
  if (sigNew.size() != 64 || !newKey.value().verify(signedPart, sigNew))
    return Error{-1, "key rotation not signed by the new key " + newId};
  return newKey.value();
}

std::string describeKeyring(const Keyring& keyring) {
  std::string out;
  for (const auto& w : keyring) {
    if (!out.empty()) out += ", ";
    out += w.key.id() + " seq " + std::to_string(w.fromSeq) + "-" +
           (w.toSeq ? std::to_string(w.toSeq) : std::string());
  }
  return out;
}

Result<Keyring> parseKeyring(std::string_view text) {
  Json j = Json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array() || j.empty())
    return Error{-1, "a keyring is a non-empty JSON array of {key_id, public, from_seq, to_seq}"};
  Keyring ring;
  for (size_t i = 0; i < j.size(); ++i) {
    const Json& e = j[i];
    std::string where = "keyring entry " + std::to_string(i + 1) + ": ";
    if (!e.is_object() || !e.contains("key_id") || !e["key_id"].is_string() ||
        !e.contains("public") || !e["public"].is_string() || !e.contains("from_seq") ||
        !e["from_seq"].is_number_unsigned())
      return Error{-1, where + "needs key_id, public and from_seq"};
    auto key = Ed25519Key::fromRawPublic(fromHexBytes(e["public"].get<std::string>()));
    if (!key) return Error{-1, where + "public is not a hex Ed25519 public key"};
    if (key.value().id() != e["key_id"].get<std::string>())
      return Error{-1, where + "key_id is not the id of its public key"};
    uint64_t from = e["from_seq"].get<uint64_t>(), to = 0;
    if (e.contains("to_seq") && !e["to_seq"].is_null()) {
      if (!e["to_seq"].is_number_unsigned()) return Error{-1, where + "to_seq is not a seq"};
      to = e["to_seq"].get<uint64_t>();
    }
    if (from == 0 || (to != 0 && to < from))
      return Error{-1, where + "from_seq must be at least 1 and to_seq at least from_seq"};
    for (const auto& w : ring) {
      if (w.key.id() == key.value().id()) return Error{-1, where + "the key is listed twice"};
    }
    ring.push_back({key.value(), from, to});
  }
  return ring;
}

namespace {

std::string window(const KeyWindow& w) {
  return "seq " + std::to_string(w.fromSeq) + "-" + (w.toSeq ? std::to_string(w.toSeq) : "");
}

const KeyWindow* findKey(const Keyring& ring, const std::string& id) {
  for (const auto& w : ring) {
    if (w.key.id() == id) return &w;
  }
  return nullptr;
}

}  // namespace

ChainVerifier::ChainVerifier(const Ed25519Key& anchor, const Keyring* pinned) : pinned_(pinned) {
  // The derived keyring: the anchor from seq 1, each rotation's new key after it.
  v_.keyring.push_back({anchor, 1, 0});
}

bool ChainVerifier::add(const std::string& line) {
  if (!v_.ok) return false;
  auto bad = [this](uint64_t at, std::string reason) {
    v_.ok = false;
    v_.line = at;
    v_.reason = std::move(reason);
    return false;
  };
  uint64_t n = v_.records + 1;
  auto canon = canonicalJson(line);
  if (!canon) return bad(n, "not a JSON record: " + canon.error().message);
  if (canon.value() != line) return bad(n, "not canonical JSON (the record was rewritten)");
  Json r = Json::parse(line);
  if (!r.is_object()) return bad(n, "not a JSON object");
  for (const char* k : kOwnKeys) {
    if (!r.contains(k)) return bad(n, std::string("missing \"") + k + "\"");
  }
  if (r["v"] != 1) return bad(n, "unknown record version");
  if (!r["seq"].is_number_unsigned() || !r["ts_ns"].is_number_integer() || !r["prev"].is_string() ||
      !r["log_id"].is_string() || !r["kind"].is_string())
    return bad(n, "a chain field has the wrong type");
  if (!kKinds.count(r["kind"].get<std::string>()))
    return bad(n, "unknown record kind \"" + r["kind"].get<std::string>() + "\"");
  if (n == 1) logId_ = r["log_id"].get<std::string>();
  if (r["log_id"] != logId_)
    return bad(n, "record of another log (" + r["log_id"].get<std::string>() + ")");
  uint64_t seq = r["seq"].get<uint64_t>();
  if (seq != n) {
    return bad(n, "sequence broken: expected seq " + std::to_string(n) + ", found " +
                      std::to_string(seq) +
                      (seq > n ? " (records missing)" : " (records repeated or reordered)"));
  }
  if (r["prev"] != prev_)
    return bad(n, "broken link: prev is not the hash of record " + std::to_string(n - 1));
  int64_t ts = r["ts_ns"].get<int64_t>();
  if (ts < lastTs_) return bad(n, "time goes backwards (ts_ns below the previous record's)");
  lastTs_ = ts;
  if (r["kind"] == "checkpoint") {
    if (!r.contains("tree_size") || !r.contains("root") || !r.contains("prev_checkpoint") ||
        !r.contains("key_id") || !r.contains("sig") || !r["sig"].is_string() ||
        !r["key_id"].is_string() || !r["root"].is_string())
      return bad(n, "checkpoint without tree_size, root, prev_checkpoint, key_id and sig");
    if (r["tree_size"] != tree_.size())
      return bad(n, "checkpoint tree_size " + r["tree_size"].dump() + " is not the " +
                        std::to_string(tree_.size()) +
                        " records before it (a replayed checkpoint?)");
    if (r["root"] != toHex(tree_.root()))
      return bad(n, "checkpoint root does not match the records before it (a record was changed)");
    if (r["prev_checkpoint"] != prevCheckpoint_)
      return bad(n, "checkpoint does not link the previous checkpoint (a fork or a replay)");
    std::string keyId = r["key_id"].get<std::string>();
    const KeyWindow& active = v_.keyring.back();
    if (keyId != active.key.id()) {
      const KeyWindow* used = findKey(v_.keyring, keyId);
      if (used)
        return bad(n, "checkpoint signed by key " + keyId +
                          " outside its validity window (retired at seq " +
                          std::to_string(used->toSeq) + ")");
      if (pinned_ && findKey(*pinned_, keyId))
        return bad(n, "checkpoint signed by key " + keyId + " before any key rotation to it" +
                          " (the active key is " + active.key.id() + ")");
      return bad(n, "checkpoint signed by an unknown key " + keyId);
    }
    if (pinned_) {
      const KeyWindow* w = findKey(*pinned_, keyId);
      if (!w)
        return bad(n, "checkpoint signed by key " + keyId + ", which the keyring does not list");
      if (seq < w->fromSeq || (w->toSeq && seq > w->toSeq))
        return bad(n, "checkpoint signed by key " + keyId + " outside its validity window (" +
                          window(*w) + " in the keyring)");
    }
    if (!checkpointSignatureValid(r, active.key))
      return bad(n, "checkpoint signature does not verify");
    prevCheckpoint_ = lineHash(line);
    ++v_.checkpoints;
    v_.unsealed = 0;
    v_.lastCheckpoint = line;
  } else if (r["kind"] == "key_rotation") {
    auto next = checkKeyRotation(r, v_.keyring.back().key);
    if (!next) return bad(n, next.error().message);
    std::string newId = next.value().id();
    if (const KeyWindow* used = findKey(v_.keyring, newId))
      return bad(n, "key rotation to key " + newId + ", which this log retired at seq " +
                        std::to_string(used->toSeq));
    if (pinned_) {
      const KeyWindow* o = findKey(*pinned_, v_.keyring.back().key.id());
      if (o && (seq < o->fromSeq || (o->toSeq && seq > o->toSeq)))
        return bad(n, "key rotation signed by key " + o->key.id() +
                          " outside its validity window (" + window(*o) + " in the keyring)");
      const KeyWindow* w = findKey(*pinned_, newId);
      if (!w || w->key.rawPublic() != next.value().rawPublic())
        return bad(n, "key rotation to key " + newId + ", which the keyring does not list");
    }
    v_.keyring.back().toSeq = seq;
    v_.keyring.push_back({next.value(), seq + 1, 0});
    ++v_.unsealed;
  } else {
    ++v_.unsealed;
  }
  prev_ = lineHash(line);
  tree_.append(leafHash(line));
  ++v_.records;
  return true;
}

namespace {

ChainVerdict verifyChainImpl(const std::vector<std::string>& lines, const Ed25519Key& anchor,
                             const Keyring* pinned) {
  ChainVerifier verifier(anchor, pinned);
  for (const auto& line : lines) {
    if (!verifier.add(line)) break;
  }
  return verifier.verdict();
}

}  // namespace

ChainVerdict verifyChain(const std::vector<std::string>& lines, const Ed25519Key& anchor) {
  return verifyChainImpl(lines, anchor, nullptr);
}

ChainVerdict verifyChain(const std::vector<std::string>& lines, const Keyring& pinned) {
  if (pinned.empty()) {
    ChainVerdict v;
    v.ok = false;
    v.reason = "an empty keyring trusts no key";
    return v;
  }
  // The chain starts from the pinned key of the lowest from_seq.
  const KeyWindow* first = &pinned.front();
  for (const auto& w : pinned) {
    if (w.fromSeq < first->fromSeq) first = &w;
  }
  return verifyChainImpl(lines, first->key, &pinned);
}

std::string stringField(const nlohmann::json& record, const char* key) {
  if (!record.is_object()) return {};
  auto it = record.find(key);
  return it != record.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace tollgate
