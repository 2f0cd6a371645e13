#include "audit/audit_cli.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>
#include <cctype>
#include <charconv>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>

#include "audit/chain.h"
#include "audit/file_sink.h"
#include "audit/policy_archive.h"
#include "audit/proof.h"
#include "audit/report.h"
#include "audit/verify_state.h"
#include "common/clock.h"
#include "common/files.h"
#include "common/sha256.h"
#include "common/units.h"

#ifndef TOLLGATE_VERSION
#define TOLLGATE_VERSION "unknown"
#endif

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

// What a verifier trusts: the log's first key (rotations chain from it), or keys pinned with
// their windows (--keyring F).
struct Trust {
  std::optional<Ed25519Key> anchor;
  std::optional<Keyring> pinned;
  ChainVerdict verify(const std::vector<std::string>& lines) const {
    return pinned ? verifyChain(lines, *pinned) : verifyChain(lines, *anchor);
  }
  const Ed25519Key& first() const {
    if (anchor) return *anchor;
    const KeyWindow* w = &pinned->front();
    for (const auto& k : *pinned) {
      if (k.fromSeq < w->fromSeq) w = &k;
    }
    return w->key;
  }
};

// --keyring F, else --pubkey F, else the log's anchor (DIR/keys/anchor.pub, or
// DIR/keys/ed25519.pub for a log written before anchor.pub existed); nullopt after printing
// why.
std::optional<Trust> loadTrust(const std::string& dir, const std::string& pubkey,
                               const std::string& keyring, std::FILE* err) {
  Trust t;
  if (!keyring.empty()) {
    std::ifstream in(keyring, std::ios::binary);
    std::stringstream ss;
    if (in) ss << in.rdbuf();
    if (!in) {
      std::fprintf(err, "tollgate: cannot read the keyring %s\n", keyring.c_str());
      return std::nullopt;
    }
    auto ring = parseKeyring(ss.str());
    if (!ring) {
      std::fprintf(err, "tollgate: %s: %s\n", keyring.c_str(), ring.error().message.c_str());
      return std::nullopt;
    }
    t.pinned = ring.value();
    return t;
  }
  std::string path = pubkey;
  if (path.empty()) {
    std::error_code ec;
    path = dir + "/keys/anchor.pub";
    if (!std::filesystem::exists(path, ec)) path = dir + "/keys/ed25519.pub";
  }
  t.anchor = loadPublicKey(path, err);
  if (!t.anchor) return std::nullopt;
  return t;
}

// A reason may quote a forged record's bytes: control characters are not sent to a terminal.
std::string printable(std::string text) {
  for (char& c : text) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return text;
}

// Where a line of the log is: its segment and its line within it.
struct LineAt {
  std::string segment;
  size_t within = 0;
};

// "INVALID segment-NNNNNN.jsonl:LINE (record SEQ): reason", or "INVALID DIR: reason" for a
// reason about the whole log (line 0, or no place known).
int printInvalid(std::FILE* out, const std::string& dir, uint64_t line, const LineAt* at,
                 const std::string& reason) {
  if (line == 0 || !at) {
    std::fprintf(out, "INVALID %s: %s\n", dir.c_str(), printable(reason).c_str());
    return 1;
  }
  std::fprintf(out, "INVALID %s:%zu (record %llu): %s\n", at->segment.c_str(), at->within,
               static_cast<unsigned long long>(line), printable(reason).c_str());
  return 1;
}

// Streams the log in DIR a line at a time through a verifier of `trust`, calling
// Whether dir is an audit log (a directory with a LOG_ID, or with segments); says why not.
bool isAuditLog(const std::string& dir, std::FILE* err) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    std::fprintf(err, "tollgate: %s is not a directory\n", dir.c_str());
    return false;
  }
  if (!std::filesystem::exists(std::filesystem::path(dir) / "LOG_ID", ec) &&
      auditRecordsLogId(dir).empty()) {
    std::fprintf(err, "tollgate: %s is not an audit log (no LOG_ID, no records)\n", dir.c_str());
    return false;
  }
  return true;
}

// fn(line, segment, n) for each line that verifies. Returns nullopt when the whole log
// verified (verdict in *verdict), else the exit code after saying why: 2 DIR is not a
// directory or cannot be read, 1 INVALID (with the place of the first bad line).
std::optional<int> streamVerified(const std::string& dir, const Trust& trust, std::FILE* out,
                                  std::FILE* err, ChainVerdict* verdict, const AuditLineFn& fn) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    std::fprintf(err, "tollgate: %s is not a directory\n", dir.c_str());
    return 2;
  }
  if (trust.pinned && trust.pinned->empty())
    return printInvalid(out, dir, 0, nullptr, "an empty keyring trusts no key");
  ChainVerifier verifier(trust.first(), trust.pinned ? &*trust.pinned : nullptr);
  LineAt bad;
  auto read = forEachAuditLine(
      dir,
      [&](std::string& line, const std::string& segment, size_t n) {
        if (!verifier.add(line)) {
          bad = {segment, n};
          return false;
        }
        return fn(line, segment, n);
      },
      UnfinishedLine::kSkipWhenLive);
  if (!read) {
    std::fprintf(err, "tollgate: %s\n", read.error().message.c_str());
    return 2;
  }
  *verdict = verifier.verdict();
  if (!verdict->ok) return printInvalid(out, dir, verdict->line, &bad, verdict->reason);
  // LOG_ID is what the writer and `audit report` stamp new records with: it must be the
  // records' own id, or the next record forks the log.
  std::ifstream idFile(std::filesystem::path(dir) / "LOG_ID");
  std::string fileId, recordsId = auditRecordsLogId(dir);
  if (idFile >> fileId && !recordsId.empty() && fileId != recordsId)
    return printInvalid(out, dir, 0, nullptr,
                        "LOG_ID names log " + fileId + ", the records are of log " + recordsId);
  return std::nullopt;
}

int auditVerify(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, pubkey, statePath, keyring;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--pubkey" || args[i] == "--state" || args[i] == "--keyring") {
      if (i + 1 >= args.size()) return usageError(err, std::string(args[i]) + " needs a file");
      (args[i] == "--pubkey"  ? pubkey
       : args[i] == "--state" ? statePath
                              : keyring) = std::string(args[i + 1]);
      ++i;
    } else if (dir.empty() && !args[i].starts_with("-")) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "audit verify: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "audit verify needs a DIR");
  if (!pubkey.empty() && !keyring.empty())
    return usageError(err, "audit verify takes --pubkey or --keyring, not both");
  if (!isAuditLog(dir, err)) return 2;  // before its keys, which are read from it
  auto trust = loadTrust(dir, pubkey, keyring, err);
  if (!trust) return 2;
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
  // Streamed a line at a time: a log of any length verifies. Kept on the way: what the
  // state check needs, and where the lines it can name are.
  uint64_t count = 0;
  std::string firstLine, atTrusted;
  LineAt first, trustedAt;
  ChainVerdict v;
  auto failed = streamVerified(dir, *trust, out, err, &v,
                               [&](std::string& line, const std::string& segment, size_t n) {
                                 ++count;
                                 if (count == 1) {
                                   firstLine = line;
                                   first = {segment, n};
                                 }
                                 if (trusted && count == trusted->seq) {
                                   atTrusted = line;
                                   trustedAt = {segment, n};
                                 }
                                 return true;
                               });
  if (failed) return *failed;
  if (trusted) {
    auto sv = checkTrustedCheckpoint(firstLine, count, atTrusted, *trusted);
    const LineAt* where = sv.line == 1 ? &first : sv.line == trusted->seq ? &trustedAt : nullptr;
    if (!sv.ok)
      return printInvalid(out, dir, sv.line, where, sv.reason + " (state " + statePath + ")");
  }
  std::fprintf(
      out, "ok: %llu records, %llu checkpoints, %llu after the last checkpoint (unsealed)\n",
      static_cast<unsigned long long>(v.records), static_cast<unsigned long long>(v.checkpoints),
      static_cast<unsigned long long>(v.unsealed));
  std::fprintf(out, "keys: %s\n", describeKeyring(v.keyring).c_str());
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

int auditProveVerify(const std::string& proofPath, const std::string& pubkey,
                     const std::string& keyring, std::FILE* out, std::FILE* err) {
  if (pubkey.empty() == keyring.empty())
    return usageError(err, "audit prove --verify needs --pubkey F or --keyring F");
  auto trust = loadTrust({}, pubkey, keyring, err);
  if (!trust) return 2;
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
  auto signer = verifyInclusionProof(proof.value(), trust->first(),
                                     trust->pinned ? &*trust->pinned : nullptr);
  if (!signer) {
    std::fprintf(out, "INVALID proof: %s\n", printable(signer.error().message).c_str());
    return 1;
  }
  std::fprintf(out, "ok: record %llu is leaf %llu of the tree of size %llu signed by key %s\n",
               static_cast<unsigned long long>(proof.value().leafIndex + 1),
               static_cast<unsigned long long>(proof.value().leafIndex),
               static_cast<unsigned long long>(proof.value().treeSize), signer.value().c_str());
  return 0;
}

int auditProve(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, seqArg, pubkey, proofPath, keyring;
  bool verifyMode = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--pubkey" || args[i] == "--verify" || args[i] == "--keyring") {
      if (i + 1 >= args.size()) return usageError(err, std::string(args[i]) + " needs a file");
      (args[i] == "--pubkey"    ? pubkey
       : args[i] == "--keyring" ? keyring
                                : proofPath) = std::string(args[i + 1]);
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
    return auditProveVerify(proofPath, pubkey, keyring, out, err);
  }
  uint64_t seq = 0;
  auto [end, ec] = std::from_chars(seqArg.data(), seqArg.data() + seqArg.size(), seq);
  if (dir.empty() || seqArg.empty() || ec != std::errc() || end != seqArg.data() + seqArg.size() ||
      seq == 0)
    return usageError(err, "audit prove needs DIR SEQ (a record's seq, from 1)");
  if (!pubkey.empty() && !keyring.empty())
    return usageError(err, "audit prove takes --pubkey or --keyring, not both");
  if (!isAuditLog(dir, err)) return 2;
  auto trust = loadTrust(dir, pubkey, keyring, err);
  if (!trust) return 2;
  // The log read twice, a line at a time: verified while the prover scans it (only a log
  // that verifies is evidence), then hashed up to the last checkpoint's tree size.
  InclusionProver prover(seq);
  uint64_t count = 0;
  ChainVerdict v;
  auto failed =
      streamVerified(dir, *trust, out, err, &v, [&](std::string& line, const std::string&, size_t) {
        ++count;
        prover.scan(line);
        return true;
      });
  if (failed) return *failed;
  if (seq > count) {
    std::fprintf(err, "tollgate: the log has no record %llu (it has %llu)\n",
                 static_cast<unsigned long long>(seq), static_cast<unsigned long long>(count));
    return 2;
  }
  auto sealed = prover.sealed();
  if (sealed) {
    auto read = forEachAuditLine(
        dir, [&](std::string& line, const std::string&, size_t) { return prover.hash(line); },
        UnfinishedLine::kSkipWhenLive);
    if (!read) {
      std::fprintf(err, "tollgate: %s\n", read.error().message.c_str());
      return 2;
    }
  }
  auto proof = sealed ? prover.proof() : Result<InclusionProof>(sealed.error());
  if (!proof) {
    std::fprintf(err, "tollgate: %s\n", proof.error().message.c_str());
    return 1;
  }
  std::fputs(encodeProof(proof.value()).c_str(), out);
  return 0;
}

// Every byte but letters and digits as %XX, for a query value.
std::string percentEncoded(std::string_view v) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : v) {
    if (std::isalnum(c)) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    }
  }
  return out;
}

// POSTs `target` to a sidecar's admin API at HOST:PORT; the response's status and body.
Result<std::pair<int, std::string>> postAdmin(const std::string& hostPort,
                                              const std::string& target, const std::string& token) {
  auto hp = parseHostPort(hostPort);
  if (!hp) return Error{-1, "--admin: expected HOST:PORT, got '" + hostPort + "'"};
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(hp->host.c_str(), std::to_string(hp->port).c_str(), &hints, &res) != 0 || !res)
    return Error{-1, "cannot resolve " + hp->host};
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{10, 0};
  bool ok = fd >= 0 && ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 &&
            ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0 &&
            ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  freeaddrinfo(res);
  std::string request = "POST " + target + " HTTP/1.1\r\nHost: " + hostPort +
                        "\r\nContent-Length: 0\r\nConnection: close\r\n";
  if (!token.empty()) request += "Authorization: Bearer " + token + "\r\n";
  request += "\r\n";
  ok = ok && writeAll(fd, request);
  std::string response;
  char buf[4096];
  for (ssize_t n; ok && (n = ::read(fd, buf, sizeof buf)) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      ok = false;
      break;
    }
    response.append(buf, static_cast<size_t>(n));
  }
  if (fd >= 0) ::close(fd);
  if (!ok || !response.starts_with("HTTP/1.1 ") || response.size() < 12)
    return Error{-1, "no answer from the admin API at " + hostPort};
  auto bodyAt = response.find("\r\n\r\n");
  return std::pair<int, std::string>{
      std::atoi(response.substr(9, 3).c_str()),
      bodyAt == std::string::npos ? std::string() : response.substr(bodyAt + 4)};
}

int auditReport(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, pubkey, outFile, format = "md", admin, token;
  std::string fromText, toText;
  int64_t fromNs = kWholeLogFrom, toNs = kWholeLogTo;
  int64_t gapNs = 3600LL * 1'000'000'000;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string v;
    if (args[i] == "--from" || args[i] == "--to" || args[i] == "--format" || args[i] == "--out" ||
        args[i] == "--gap" || args[i] == "--pubkey" || args[i] == "--admin" ||
        args[i] == "--token") {
      std::string flag(args[i]);
      if (i + 1 >= args.size()) return usageError(err, flag + " needs a value");
      v = std::string(args[++i]);
      if (flag == "--from" || flag == "--to") {
        auto t = parseReportTime(v);
        if (!t)
          return usageError(err, flag + ": expected RFC 3339 or unix seconds, got '" + v + "'");
        (flag == "--from" ? fromNs : toNs) = *t;
        (flag == "--from" ? fromText : toText) = v;
      } else if (flag == "--format") {
        if (v != "md" && v != "html" && v != "json")
          return usageError(err, "--format is md, html or json");
        format = v;
      } else if (flag == "--out") {
        outFile = v;
      } else if (flag == "--admin") {
        admin = v;
      } else if (flag == "--token") {
        token = v;
      } else if (flag == "--gap") {
        auto d = parseDuration(v);
        // At most ~292 years: the gap is kept in int64 nanoseconds.
        if (!d || d->count() <= 0 || d->count() > INT64_MAX / 1'000'000)
          return usageError(err, "--gap needs a duration such as 1h");
        gapNs = static_cast<int64_t>(d->count()) * 1'000'000;
      } else {
        pubkey = v;
      }
    } else if (dir.empty() && !args[i].starts_with("-")) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "audit report: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "audit report needs a DIR");
  if (fromNs > toNs) return usageError(err, "--from is after --to");
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "LOG_ID", ec)) {
    std::fprintf(err, "tollgate: %s is not an audit log (no LOG_ID)\n", dir.c_str());
    return 2;
  }
  auto trust = loadTrust(dir, pubkey, {}, err);
  if (!trust) return 2;
  ReportContext ctx;
  ctx.version = TOLLGATE_VERSION;
  char host[256] = {0};
  ctx.hostname = ::gethostname(host, sizeof host - 1) == 0 ? host : "unknown";
  int64_t now = wallNs();
  ctx.generatedAt = formatReportTime(now);
  ctx.dir = dir;
  // The records' own id (LOG_ID says the same of a sound log; verify checks that).
  ctx.logId = auditRecordsLogId(dir);
  if (ctx.logId.empty()) {
    std::ifstream idIn(std::filesystem::path(dir) / "LOG_ID");
    std::getline(idIn, ctx.logId);
  }
  ctx.fromNs = fromNs;
  // A period reaching into the future ends now, so the silence after the log is not inflated.
  ctx.toNs = toNs != kWholeLogTo ? std::min(toNs, now) : toNs;
  ctx.gapNs = gapNs;
  // Streamed a line at a time: verified up to its first bad record, and
  // every record summarized (a report on a log that does not verify says so, and still
  // counts what it holds).
  ChainVerifier verifier(trust->first());
  AuditSummarizer summarizer(ctx.fromNs, ctx.toNs, gapNs);
  LineAt bad;
  auto read = forEachAuditLine(
      dir,
      [&](std::string& line, const std::string& segment, size_t n) {
        if (verifier.verdict().ok && !verifier.add(line)) bad = {segment, n};
        auto r = nlohmann::json::parse(line, nullptr, false);
        if (!r.is_discarded() && r.is_object()) summarizer.add(r);
        return true;
      },
      UnfinishedLine::kSkipWhenLive);
  if (!read) {
    std::fprintf(err, "tollgate: %s\n", read.error().message.c_str());
    return 2;
  }
  const ChainVerdict& v = verifier.verdict();
  // Every key the log used (as far as it verifies), the anchor first.
  for (const auto& w : v.keyring)
    ctx.keys.push_back({w.key.id(), "sha256:" + sha256Hex(w.key.rawPublic())});
  ctx.verified = v.ok;
  if (v.ok) {
    ctx.verifier = std::to_string(v.records) + " records, " + std::to_string(v.checkpoints) +
                   " checkpoints, " + std::to_string(v.unsealed) + " unsealed";
  } else {
    ctx.verifier =
        "INVALID at " + bad.segment + " record " + std::to_string(v.line) + ": " + v.reason;
  }
  ctx.unsealed = v.unsealed;
  auto summary = summarizer.finish();
  for (const auto& d : summary.digests) {
    std::string p = policyArchivePath(dir, d);
    ctx.archived[d] = !p.empty() && std::filesystem::exists(p, ec);
  }
  std::string report = renderReport(reportDocument(ctx, summary), format);

  if (outFile.empty()) {
    std::fwrite(report.data(), 1, report.size(), out);
  } else {
    std::ofstream o(outFile, std::ios::binary | std::ios::trunc);
    if (!(o << report) || !o.flush()) {
      std::fprintf(err, "tollgate: cannot write %s\n", outFile.c_str());
      return 2;
    }
  }
  // The report's hash goes into the log it reports on, when no sidecar holds the log.
  std::string hash = sha256Hex(report);
  if (!v.ok) {
    std::fprintf(err,
                 "note: the report's hash sha256:%s was not appended: the log does not verify\n",
                 hash.c_str());
  } else {
    FileAuditSink::Options options;
    options.dir = dir;
    auto sink = FileAuditSink::open(options);
    std::string file = outFile.empty() ? std::string("-") : outFile;
    if (!sink && !admin.empty()) {
      // The log is held (a sidecar runs on it): the hash goes in through its admin API.
      if (token.empty() && std::getenv("TOLLGATE_ADMIN_TOKEN"))
        token = std::getenv("TOLLGATE_ADMIN_TOKEN");
      auto r = postAdmin(admin,
                         "/v1/audit/report?sha256=" + hash + "&format=" + format +
                             "&from=" + percentEncoded(fromText) + "&to=" + percentEncoded(toText) +
                             "&file=" + percentEncoded(file),
                         token);
      if (!r || r.value().first != 200) {
        std::fprintf(
            err, "note: the report's hash sha256:%s could not be appended through %s: %s\n",
            hash.c_str(), admin.c_str(), r ? r.value().second.c_str() : r.error().message.c_str());
      } else {
        auto doc = nlohmann::json::parse(r.value().second, nullptr, false);
        std::fprintf(err, "report sha256:%s appended to the log as record %llu (through %s)\n",
                     hash.c_str(),
                     static_cast<unsigned long long>(doc.is_object() ? doc.value("seq", 0ull) : 0),
                     admin.c_str());
      }
    } else if (!sink) {
      std::fprintf(err, "note: the report's hash sha256:%s could not be appended to the log: %s\n",
                   hash.c_str(), sink.error().message.c_str());
    } else {
      uint64_t seq = sink.value()->appendEvent("report", {{"sha256", hash},
                                                          {"format", format},
                                                          {"from", fromText},
                                                          {"to", toText},
                                                          {"file", file}});
      sink.value().reset();  // written, sealed by a checkpoint and fsynced at close
      std::fprintf(err, "report sha256:%s appended to the log as record %llu\n", hash.c_str(),
                   static_cast<unsigned long long>(seq));
    }
  }
  return v.ok ? 0 : 1;
}

int auditRotateKey(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir;
  for (auto a : args) {
    if (!dir.empty() || a.starts_with("-"))
      return usageError(err, "audit rotate-key: unknown argument '" + std::string(a) + "'");
    dir = std::string(a);
  }
  if (dir.empty()) return usageError(err, "audit rotate-key needs a DIR");
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "LOG_ID", ec)) {
    std::fprintf(err, "tollgate: %s is not an audit log (no LOG_ID)\n", dir.c_str());
    return 2;
  }
  // Opening verifies the log and takes its LOCK: a running sidecar rotates through its admin
  // API instead (POST /v1/audit/rotate-key).
  auto sink = FileAuditSink::open(FileAuditSink::Options(dir));
  if (!sink) {
    std::fprintf(err, "tollgate: %s\n", sink.error().message.c_str());
    return 1;
  }
  auto done = sink.value()->rotateKey();
  sink.value().reset();  // the rotation sealed by a checkpoint of the new key, fsynced
  if (!done) {
    std::fprintf(err, "tollgate: key rotation failed: %s\n", done.error().message.c_str());
    return 1;
  }
  std::fprintf(out, "rotated at record %llu: old key %s, new key %s\n",
               static_cast<unsigned long long>(done.value().seq), done.value().oldKeyId.c_str(),
               done.value().newKeyId.c_str());
  return 0;
}

}  // namespace

int auditCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  if (args.empty())
    return usageError(err, "audit needs verify, prove, replay, report or rotate-key");
  std::vector<std::string_view> rest(args.begin() + 1, args.end());
  if (args[0] == "verify") return auditVerify(rest, out, err);
  if (args[0] == "prove") return auditProve(rest, out, err);
  if (args[0] == "report") return auditReport(rest, out, err);
  if (args[0] == "rotate-key") return auditRotateKey(rest, out, err);
  return usageError(err, "unknown audit command '" + std::string(args[0]) + "'");
}

}  // namespace tollgate
