#include "audit/file_sink.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>  // RWF_DSYNC
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/files.h"
#include "common/log.h"
#include "common/thread_name.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;
constexpr size_t kRecent = 1000;
constexpr uint64_t kDirectBlock = 4096;  // O_DIRECT writes: offsets, lengths and memory
constexpr size_t kBlanks = 256 << 10;    // blanks written ahead, per write

uint64_t roundUpToBlock(uint64_t n) {
  return (n + kDirectBlock - 1) & ~(kDirectBlock - 1);
}

// kBlanks of kAuditPad, aligned for O_DIRECT (nullptr: out of memory).
const char* blankBlocks() {
  static const char* const blanks = [] {
    auto* p = static_cast<char*>(std::aligned_alloc(kDirectBlock, kBlanks));
    if (p != nullptr) std::memset(p, kAuditPad, kBlanks);
    return p;
  }();
  return blanks;
}

std::string sysError(const std::string& what) {
  return what + ": " + std::strerror(errno);
}

// Every file here is replaced whole (temp file, fsync, rename, directory fsync): readers and
// a restart after a crash see the old or the new bytes.
Status replaceFile(const fs::path& p, const std::string& data, mode_t mode) {
  return writeFileAtomic(p.string(), data, mode);
}

Result<Ed25519Key> readPrivateKey(const fs::path& p) {
  auto hex = readFile(p.string());
  if (!hex) return hex.error();
  if (struct stat st; ::stat(p.c_str(), &st) == 0 && (st.st_mode & 077)) {
    // Whoever reads it can sign checkpoints over a rewritten log: said, as for the CA's key.
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 0777));
    Log::Line(LogLevel::kWarn, "the audit signing key is readable by others than its owner")
        .add("path", p.string())
        .add("mode", mode)
        .emit();
  }
  auto k = Ed25519Key::fromRawPrivate(fromHexBytes(hex.value().substr(0, 64)));
  if (!k) return Error{-1, p.string() + ": " + k.error().message};
  return k;
}

// A new private key in `p` (0600, hex of the raw key), durable when this returns.
Status writePrivateKey(const fs::path& p, const Ed25519Key& key) {
  unsigned char raw[32];
  size_t len = sizeof raw;
  if (!key.exportRawPrivate(raw, &len)) return Error{-1, "cannot export the audit key"};
  std::string hex = toHexBytes({reinterpret_cast<char*>(raw), len}) + "\n";
  OPENSSL_cleanse(raw, sizeof raw);
  Status st = replaceFile(p, hex, 0600);  // a new file: created with 0600
  OPENSSL_cleanse(hex.data(), hex.size());
  return st;
}

// The number of a segment file's name ("segment-NNNNNN.jsonl", six digits or more), or 0.
uint64_t segmentNumber(std::string_view name) {
  constexpr std::string_view kPrefix = "segment-", kSuffix = ".jsonl";
  if (!name.starts_with(kPrefix) || !name.ends_with(kSuffix)) return 0;
  std::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  uint64_t n = 0;
  if (digits.size() < 6 || digits.size() > 19) return 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return 0;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  return n;
}

// In order of their numbers: segment-1000000 follows segment-999999.
std::vector<fs::path> segments(const fs::path& dir) {
  std::vector<std::pair<uint64_t, fs::path>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (uint64_t n = segmentNumber(e.path().filename().string()); n > 0)
      found.emplace_back(n, e.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  out.reserve(found.size());
  for (auto& [n, path] : found) out.push_back(std::move(path));
  return out;
}

std::string segmentName(uint64_t n) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "segment-%06llu.jsonl", static_cast<unsigned long long>(n));
  return buf;
}

}  // namespace

std::vector<std::string> auditSegments(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& p : segments(dir)) out.push_back(p.string());
  return out;
}

size_t auditContentSize(std::string_view data) {
  size_t n = data.size();
  while (n > 0 && data[n - 1] == kAuditPad) --n;
  return n;
}

namespace {

// auditContentSize() of the open file `fd` of `size` bytes, read back from its end.
uint64_t contentEnd(int fd, uint64_t size) {
  char buf[64 << 10];
  uint64_t end = size;
  while (end > 0) {
    uint64_t from = end > sizeof buf ? end - sizeof buf : 0;
    ssize_t got = ::pread(fd, buf, static_cast<size_t>(end - from), static_cast<off_t>(from));
    if (got < 0 && errno == EINTR) continue;
    if (got != static_cast<ssize_t>(end - from)) break;  // unreadable: taken as it is
    size_t kept = auditContentSize(std::string_view(buf, static_cast<size_t>(got)));
    end = from + kept;
    if (kept > 0) break;
  }
  return end;
}

}  // namespace

uint64_t auditContentSize(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return size;
  uint64_t end = contentEnd(fd, size);
  ::close(fd);
  return end;
}

Result<std::vector<std::string>> readAuditSegment(const std::string& path) {
  AuditSegmentReader reader(path);
  std::vector<std::string> lines;
  std::string line;
  while (reader.next(line)) lines.push_back(std::move(line));
  if (!reader.ok()) return Error{-1, reader.error()};
  return lines;
}

AuditSegmentReader::AuditSegmentReader(std::string path) : path_(std::move(path)), buf_(256 << 10) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    error_ = "cannot read " + path_ + ": " + std::strerror(errno);
    return;
  }
  follow();
}

AuditSegmentReader::~AuditSegmentReader() {
  if (fd_ >= 0) ::close(fd_);
}

void AuditSegmentReader::follow() {
  struct stat st;
  if (fd_ < 0 || ::fstat(fd_, &st) != 0) return;
  end_ = std::max(end_, contentEnd(fd_, static_cast<uint64_t>(st.st_size)));
}

bool AuditSegmentReader::fill() {
  for (;;) {
    if (offset_ >= end_) return false;
    size_t want = static_cast<size_t>(std::min<uint64_t>(buf_.size(), end_ - offset_));
    ssize_t got = ::pread(fd_, buf_.data(), want, static_cast<off_t>(offset_));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      if (got < 0) error_ = "cannot read " + path_ + ": " + std::strerror(errno);
      end_ = offset_;  // shorter than it was: what is there has been read
      return false;
    }
    offset_ += static_cast<uint64_t>(got);
    pos_ = 0;
    len_ = static_cast<size_t>(got);
    return true;
  }
}

bool AuditSegmentReader::next(std::string& line, bool partial) {
  if (fd_ < 0) return false;
  for (;;) {
    std::string_view data(buf_.data() + pos_, len_ - pos_);
    size_t nl = data.find('\n');
    if (nl != std::string_view::npos) {
      line = std::move(pending_);
      pending_.clear();
      line.append(data.substr(0, nl));
      pos_ += nl + 1;
      return true;
    }
    pending_.append(data);
    pos_ = len_;
    if (!fill()) {
      if (!partial || pending_.empty()) return false;
      line = std::move(pending_);
      pending_.clear();
      return true;
    }
  }
}

bool auditLogIsLive(const std::string& dir) {
  struct stat st {};
  if (::stat((fs::path(dir) / "LOCK").c_str(), &st) != 0) return false;
  auto text = readFile("/proc/locks");
  if (!text) return false;
  // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF": major:minor (hex):inode.
  std::string_view all = text.value();
  while (!all.empty()) {
    auto nl = all.find('\n');
    std::string_view line = all.substr(0, nl);
    all = nl == std::string_view::npos ? std::string_view() : all.substr(nl + 1);
    if (line.find("FLOCK") == std::string_view::npos || line.find("->") != std::string_view::npos)
      continue;  // "->": a process waiting for the lock, not holding it
    unsigned major = 0, minor = 0;
    unsigned long long inode = 0;
    for (size_t at = line.find(':'); at != std::string_view::npos; at = line.find(':', at + 1)) {
      size_t start = line.rfind(' ', at);
      std::string field(line.substr(start + 1, line.find(' ', at) - start - 1));
      if (std::sscanf(field.c_str(), "%x:%x:%llu", &major, &minor, &inode) == 3 &&
          inode == st.st_ino && major == ::major(st.st_dev) && minor == ::minor(st.st_dev))
        return true;
    }
  }
  return false;
}

Status forEachAuditLine(const std::string& dir, const AuditLineFn& fn, UnfinishedLine unfinished) {
  auto segs = segments(dir);
  bool skipUnfinished = unfinished == UnfinishedLine::kSkipWhenLive && auditLogIsLive(dir);
  // A line at a time: a segment of any size streams through.
  for (const auto& seg : segs) {
    std::string name = seg.filename().string(), line;
    AuditSegmentReader reader(seg.string());
    // A last line without its newline (a torn write) is a line too, except in the segment a
    // live sidecar writes: there it is a batch being written (an O_DIRECT write is not
    // atomic for a reader), not yet a record.
    bool partial = !(skipUnfinished && seg == segs.back());
    for (size_t n = 1; reader.next(line, partial); ++n) {
      if (!fn(line, name, n)) return Status::success();
    }
    if (!reader.ok()) return Error{-1, reader.error()};
  }
  return Status::success();
}

Result<std::vector<std::string>> readAuditLog(const std::string& dir,
                                              std::vector<std::string>* segmentOfLine) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Error{-1, dir + " is not a directory"};
  std::vector<std::string> lines;
  auto st = forEachAuditLine(dir, [&](std::string& line, const std::string& segment, size_t) {
    lines.push_back(std::move(line));
    if (segmentOfLine) segmentOfLine->push_back(segment);
    return true;
  });
  if (!st) return st.error();
  return lines;
}

std::string auditRecordsLogId(const std::string& dir) {
  std::string id;
  (void)forEachAuditLine(dir, [&](std::string& line, const std::string&, size_t) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("log_id") && j["log_id"].is_string())
      id = j["log_id"].get<std::string>();
    return false;  // the first record names the log
  });
  return id;
}

uint64_t auditRecordSeq(std::string_view line) {
  auto j = nlohmann::json::parse(line, nullptr, false);
  if (!j.is_object() || !j.contains("seq") || !j["seq"].is_number_unsigned()) return 0;
  return j["seq"].get<uint64_t>();
}

uint64_t auditSegmentFirstSeq(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  std::string line;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    std::string_view chunk(buf, static_cast<size_t>(n));
    if (line.empty() && chunk.front() == kAuditPad) break;  // blanks only: no record yet
    size_t nl = chunk.find('\n');
    line.append(chunk.substr(0, nl));
    if (nl != std::string_view::npos) break;
  }
  ::close(fd);
  return auditRecordSeq(line);
}

namespace {

// The end of a segment as a crash may leave it: the blanks written ahead of the records are
// cut off (at `keep`), and what follows the last newline before them is a torn record. Read
// back from the end: the segment is never in memory whole.
struct SegmentTail {
  uint64_t size = 0;  // the file's
  uint64_t keep = 0;  // up to the last newline of the content
  std::string torn;   // between it and the content's end
};

Result<SegmentTail> readTail(const std::string& path) {
  SegmentTail t;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{-errno, sysError("open " + path)};
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return Error{-errno, sysError("stat " + path)};
  }
  t.size = static_cast<uint64_t>(st.st_size);
  uint64_t end = contentEnd(fd, t.size);
  std::string chunk;
  uint64_t at = end;
  while (at > 0) {
    uint64_t from = at > (64 << 10) ? at - (64 << 10) : 0;
    chunk.resize(static_cast<size_t>(at - from));
    if (::pread(fd, chunk.data(), chunk.size(), static_cast<off_t>(from)) !=
        static_cast<ssize_t>(chunk.size())) {
      ::close(fd);
      return Error{-1, "cannot read " + path};
    }
    t.torn.insert(0, chunk);
    size_t nl = t.torn.rfind('\n');
    if (nl != std::string::npos) {
      t.keep = end - (t.torn.size() - nl - 1);
      t.torn.erase(0, nl + 1);
      break;
    }
    at = from;
  }
  ::close(fd);
  return t;
}

// A batch is one write of whole 4 KiB blocks, the first of them rewritten with the records
// before the batch in it, and a crash (power lost) mid-write may leave any of its blocks
// unwritten while later ones are on disk. Such a block still holds what it held: blanks
// written ahead of the records (or zeros past them), after the records of earlier batches
// when it is the batch's first. Nothing at or after it was durable (the write never
// returned), so no call waited on it. Its mark in a line: a run of blanks or zeros that ends
// on a block boundary with more of the line after it, and that begins the line or fills a
// whole block (a record never begins with a blank, and a durable one holds a block of them
// only in a string that long). The verifier fails at the line (1-based) `failed` of the
// segment, or at the next one when the torn line happened to read as a record: where the
// torn line begins, of those two (npos: neither is).
bool hasTornBlock(std::string_view line, uint64_t at) {
  auto blank = [](char c) { return c == kAuditPad || c == '\0'; };
  for (uint64_t q = (at / kDirectBlock + 1) * kDirectBlock; q < at + line.size();
       q += kDirectBlock) {
    size_t i = static_cast<size_t>(q - at);
    if (blank(line[i]) || !blank(line[i - 1])) continue;
    size_t run = i;
    while (run > 0 && blank(line[run - 1])) --run;
    if (run == 0 || i - run >= kDirectBlock) return true;
  }
  return false;
}

Result<std::string> readRange(const std::string& path, uint64_t from, uint64_t to) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{-errno, sysError("open " + path)};
  std::string text(static_cast<size_t>(to - from), '\0');
  ssize_t got = ::pread(fd, text.data(), text.size(), static_cast<off_t>(from));
  ::close(fd);
  if (got != static_cast<ssize_t>(text.size())) return Error{-1, "cannot read " + path};
  return text;
}

Result<uint64_t> findTornBatch(const std::string& path, uint64_t size, uint64_t failed) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{-errno, sysError("open " + path)};
  // Where lines failed - 1 and failed begin and where failed ends.
  uint64_t begins[2] = {std::string::npos, std::string::npos}, ends = size;
  std::string chunk(64 << 10, '\0');
  uint64_t line = 1;
  if (failed == 1) begins[1] = 0;
  if (failed == 2) begins[0] = 0;
  for (uint64_t at = 0; at < size && ends == size;) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(chunk.size(), size - at));
    if (::pread(fd, chunk.data(), want, static_cast<off_t>(at)) != static_cast<ssize_t>(want)) {
      ::close(fd);
      return Error{-1, "cannot read " + path};
    }
    for (size_t i = 0; i < want; ++i) {
      if (chunk[i] != '\n') continue;
      if (line == failed) {
        ends = at + i;
        break;
      }
      ++line;  // the next begins after this newline
      if (line + 1 == failed) begins[0] = at + i + 1;
      if (line == failed) begins[1] = at + i + 1;
    }
    at += want;
  }
  ::close(fd);
  for (int k : {1, 0}) {
    uint64_t from = begins[k], to = k == 1 ? ends : begins[1] - 1;
    if (from == std::string::npos || begins[1] == std::string::npos || to <= from) continue;
    auto text = readRange(path, from, to);
    if (!text) return text.error();
    if (hasTornBlock(text.value(), from)) return from;
  }
  return std::string::npos;
}

}  // namespace

FileAuditSink::FileAuditSink(Options options) : options_(std::move(options)), recent_(kRecent) {}

void FileAuditSink::RecentLines::push(std::string_view line) {
  lines_[next_].assign(line);
  next_ = (next_ + 1) % lines_.size();
  size_ = std::min(size_ + 1, lines_.size());
}

const std::string& FileAuditSink::RecentLines::back() const {
  return lines_[(next_ + lines_.size() - 1) % lines_.size()];
}

std::vector<std::string> FileAuditSink::RecentLines::last(size_t n) const {
  n = std::min(n, size_);
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = n; i > 0; --i) out.push_back(lines_[(next_ + lines_.size() - i) % lines_.size()]);
  return out;
}

Result<std::unique_ptr<FileAuditSink>> FileAuditSink::open(Options options) {
  std::unique_ptr<FileAuditSink> sink(new FileAuditSink(std::move(options)));
  if (auto st = sink->start(); !st) return st.error();
  return sink;
}

Status FileAuditSink::start() {
  fs::path dir = options_.dir;
  std::error_code ec;
  fs::create_directories(dir / "keys", ec);
  if (ec) return Error{-1, "audit.dir " + dir.string() + ": " + ec.message()};
  ::chmod(dir.c_str(), 0700);

  // One writer per log.
  lockFd_ = ::open((dir / "LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lockFd_ < 0) return Error{-errno, sysError("audit lock " + (dir / "LOCK").string())};
  if (::flock(lockFd_, LOCK_EX | LOCK_NB) != 0) {
    return Error{-EWOULDBLOCK,
                 "audit.dir " + dir.string() +
                     " is in use by another process (its LOCK is held): one writer per log"};
  }

  // The log's id: LOG_ID's, which must be the records' own; a log whose LOG_ID went
  // missing takes its records' id again (a new one would fork the log).
  std::string logId, recordsId = auditRecordsLogId(dir.string());
  if (fs::exists(dir / "LOG_ID")) {
    auto id = readFile((dir / "LOG_ID").string());
    if (!id) return id.error();
    logId = id.value().substr(0, id.value().find('\n'));
    if (!recordsId.empty() && recordsId != logId)
      return Error{-1, "audit.dir " + dir.string() + ": LOG_ID names log " + logId +
                           ", its records are of log " + recordsId +
                           " (restore LOG_ID, or move the log aside to start a new one)"};
  } else {
    logId = recordsId;
    if (logId.empty()) {
      unsigned char rnd[16];
      RAND_bytes(rnd, sizeof rnd);
      logId = toHexBytes({reinterpret_cast<char*>(rnd), sizeof rnd});
    }
    if (auto st = replaceFile(dir / "LOG_ID", logId + "\n", 0644); !st) return st;
  }
  logId_ = logId;
  chain_ = std::make_unique<AuditChain>(logId);

  // What is there already: a torn last line is moved aside; the rest must verify.
  auto segs = segments(dir);
  std::string tornText;  // what was moved aside (into tornFile)
  fs::path tornFile;
  auto moveAside = [&](const std::string& text) -> Status {
    if (tornFile.empty()) tornFile = dir / ("torn-" + std::to_string(wallNs()) + ".bin");
    tornText = text + tornText;
    return replaceFile(tornFile, tornText, 0600);
  };
  uint64_t kept = 0;  // the last segment's size after that
  if (!segs.empty()) {
    auto tail = readTail(segs.back().string());
    if (!tail) return tail.error();
    const SegmentTail& t = tail.value();
    if (!t.torn.empty()) {
      if (auto st = moveAside(t.torn); !st) return st;
    }
    if (t.keep < t.size && ::truncate(segs.back().c_str(), static_cast<off_t>(t.keep)) != 0)
      return Error{-errno, sysError("truncate " + segs.back().string())};
    kept = t.keep;
  }
  // The log is read a line at a time, verified and the chain resumed as it goes: a
  // long log is never in memory whole.
  auto isEmpty = [&] {
    bool empty = true;
    for (const auto& seg : segments(dir)) empty = empty && fs::file_size(seg, ec) == 0;
    return empty;
  };
  bool emptyLog = isEmpty();
  std::string badSegment;
  size_t badLine = 0;
  auto scan = [&](const Ed25519Key& anchor, ChainVerdict& verdict) -> Status {
    ChainVerifier verifier(anchor);
    badSegment.clear();
    auto st = forEachAuditLine(dir, [&](std::string& line, const std::string& segment, size_t n) {
      if (!verifier.add(line)) {
        badSegment = segment;
        badLine = n;
        return false;
      }
      chain_->resume(line);
      recent_.push(line);
      return true;
    });
    if (!st) return st;
    verdict = verifier.verdict();
    if (!verdict.ok) {
      return Error{-1, "audit log " + options_.dir + " does not verify at " + badSegment +
                           " record " + std::to_string(verdict.line) + ": " + verdict.reason +
                           " (move it aside to start a new log)"};
    }
    return Status::success();
  };
  Status loaded = loadKeys(emptyLog, scan);
  if (!loaded && !segs.empty() && badSegment == segs.back().filename().string()) {
    // A batch torn by a crash (findTornBatch()): its lines from the one its first unwritten
    // block falls in are moved aside, and the log is read again.
    auto torn = findTornBatch(segs.back().string(), kept, badLine);
    if (!torn) return torn.error();
    uint64_t from = torn.value();
    if (from < kept) {
      Log::Line(LogLevel::kWarn, "audit: a batch torn by a crash moved aside")
          .add("segment", segs.back().string())
          .add("offset", from)
          .add("bytes", kept - from)
          .emit();
      auto text = readRange(segs.back().string(), from, kept);
      if (!text) return text.error();
      if (auto st = moveAside(text.value()); !st) return st;
      if (::truncate(segs.back().c_str(), static_cast<off_t>(from)) != 0)
        return Error{-errno, sysError("truncate " + segs.back().string())};
      chain_ = std::make_unique<AuditChain>(logId);
      recent_ = RecentLines(kRecent);
      loaded = loadKeys(isEmpty(), scan);
    }
  }
  if (!loaded) return loaded;
  seq_ = chain_->size();
  queuedSinceCheckpoint_ = chain_->sinceCheckpoint();
  lastCheckpoint_ = seq_ - queuedSinceCheckpoint_;  // 0 when the log has none
  writtenSealed_ = queuedSinceCheckpoint_ == 0;
  builtSeq_ = seq_;

  segmentNumber_ = segs.empty() ? 1 : segmentNumber(segs.back().filename().string());
  // A log sealed at shutdown continues in a new segment: the last one is complete.
  bool sealed = !recent_.empty() && tornText.empty() && isCheckpointLine(recent_.back());
  if (sealed) {
    for (auto& r : options_.replicas) r->onSealed(segs.back().string());
    ++segmentNumber_;
  }
  if (auto st = openSegment(segmentNumber_); !st) return st;
  // What is on disk is durable; a recovery record queued below is not, until written (the
  // writer adds each batch's records to durable_).
  durable_ = seq_;
  if (!tornText.empty()) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++seq_;
    Pending p;
    p.type = Pending::Type::kLine;
    p.line = chain_->append("recovery",
                            {{"torn_file", tornFile.filename().string()},
                             {"torn_bytes", static_cast<uint64_t>(tornText.size())}},
                            wallNs());
    enqueue(std::move(p));
  }
  for (auto& r : options_.replicas) r->start();  // the log is this process's now
  writer_ = std::thread([this] {
    nameThisThread("tg-audit");
    run();
  });
  return Status::success();
}

Status FileAuditSink::loadKeys(bool emptyLog, const LogScan& scan) {
  fs::path keys = fs::path(options_.dir) / "keys";
  fs::path keyFile = keys / "ed25519.key", nextFile = keys / "ed25519.key.next";
  fs::path anchorFile = keys / "anchor.pub";
  std::error_code ec;
  std::optional<Ed25519Key> current, next;
  if (fs::exists(keyFile, ec)) {
    auto k = readPrivateKey(keyFile);
    if (!k) return k.error();
    current = k.value();
  }
  if (fs::exists(nextFile, ec)) {
    auto k = readPrivateKey(nextFile);
    if (k) next = k.value();  // torn by a crash before the rotation: the log cannot name it
  }
  if (emptyLog) {
    // A new log: its first key is the anchor.
    if (!current) {
      auto k = Ed25519Key::generate();
      if (!k) return k.error();
      if (auto st = writePrivateKey(keyFile, k.value()); !st) return st;
      current = k.value();
    }
    fs::remove(nextFile, ec);
    key_ = std::make_unique<Ed25519Key>(*current);
    if (auto st = replaceFile(anchorFile, toHexBytes(key_->rawPublic()) + "\n", 0644); !st)
      return st;
    return replaceFile(keys / "ed25519.pub", toHexBytes(key_->rawPublic()) + "\n", 0644);
  }
  // A log written before anchor.pub existed never rotated: its one key is the anchor.
  std::optional<Ed25519Key> anchor = current;
  bool writeAnchor = !fs::exists(anchorFile, ec);
  if (!writeAnchor) {
    auto hex = readFile(anchorFile.string());
    if (!hex) return hex.error();
    auto k = Ed25519Key::fromRawPublic(fromHexBytes(hex.value().substr(0, 64)));
    if (!k) return Error{-1, anchorFile.string() + ": " + k.error().message};
    anchor = k.value();
  }
  if (!anchor) return Error{-1, "audit log " + options_.dir + " has no key in " + keys.string()};
  ChainVerdict verdict;
  if (auto st = scan(*anchor, verdict); !st) return st;
  std::string activeId = verdict.keyring.back().key.id();
  if (current && current->id() == activeId) {
    fs::remove(nextFile, ec);  // a rotation whose record never became durable
    key_ = std::make_unique<Ed25519Key>(*current);
  } else if (next && next->id() == activeId) {
    // A rotation whose record is durable, interrupted before the old key was deleted.
    if (::rename(nextFile.c_str(), keyFile.c_str()) != 0)
      return Error{-errno, sysError("rename " + nextFile.string())};
    if (auto st = syncDir(keys.string()); !st) return st;
    key_ = std::make_unique<Ed25519Key>(*next);
  } else {
    return Error{-1, "audit log " + options_.dir + ": the private key of its active key " +
                         activeId + " is not in " + keyFile.string()};
  }
  if (writeAnchor) {
    if (auto st = replaceFile(anchorFile, toHexBytes(anchor->rawPublic()) + "\n", 0644); !st)
      return st;
  }
  return replaceFile(keys / "ed25519.pub", toHexBytes(key_->rawPublic()) + "\n", 0644);
}

Result<KeyRotation> FileAuditSink::rotateKey() {
  std::lock_guard<std::mutex> rotating(rotateMutex_);
  fs::path keys = fs::path(options_.dir) / "keys";
  fs::path keyFile = keys / "ed25519.key", nextFile = keys / "ed25519.key.next";
  // An earlier rotation that timed out holds the active key in .next until it finishes: a
  // new key written there would lose it (the next start could not sign for the log).
  if (unfinishedRotation_ != 0) {
    if (durable_ < unfinishedRotation_)
      return Error{-EAGAIN, "the key_rotation record of an earlier rotation (seq " +
                                std::to_string(unfinishedRotation_) +
                                ") is not durable yet; rotate again once it is"};
    if (auto st = finishRotation(); !st) return st.error();
  }
  if (!healthy_) return Error{-1, "the audit stream is unwritable"};
  auto next = Ed25519Key::generate();
  if (!next) return next.error();
  // The new private key is durable before the rotation record can be: after a crash, start
  // keeps whichever of the two keys the log names as active.
  if (auto st = writePrivateKey(nextFile, next.value()); !st) return st.error();
  KeyRotation done;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!healthy_) return Error{-1, "the audit stream is unwritable"};
    done.oldKeyId = key_->id();
    done.newKeyId = next.value().id();
    // Everything before the rotation is sealed by the old key.
    if (queuedSinceCheckpoint_ > 0) {
      ++seq_;
      Pending cp;
      cp.type = Pending::Type::kCheckpoint;
      cp.key = key_;
      enqueue(std::move(cp));
    }
    ++seq_;
    Pending rotation;
    rotation.type = Pending::Type::kRotation;
    rotation.key = key_;
    rotation.next = std::make_shared<Ed25519Key>(next.value());
    rotation.tsNs = wallNs();
    key_ = rotation.next;  // the next checkpoint queued is signed by the new key
    enqueue(std::move(rotation));
    done.seq = seq_;
    wanted_ = seq_;
    if (wakeWriter(AuditSync::kNow)) wake_.notify_one();
  }
  // A rotation is rare: polling keeps it out of the writer's loop.
  unfinishedRotation_ = done.seq;
  if (!waitDurable(done.seq, options_.rotationWait))
    return Error{-1, "the key_rotation record (seq " + std::to_string(done.seq) +
                         ") did not become durable; the next start keeps the key the log names"};
  if (auto st = finishRotation(); !st) return st.error();
  return done;
}

Status FileAuditSink::finishRotation() {
  // The old private key is deleted, not archived: whoever takes the disk later cannot sign
  // checkpoints of the past (forward security); verifiers need only the public keys, which
  // the rotation records chain from the anchor. (The rename replaces the file; its blocks
  // are not scrubbed.)
  fs::path keys = fs::path(options_.dir) / "keys";
  fs::path keyFile = keys / "ed25519.key", nextFile = keys / "ed25519.key.next";
  if (::rename(nextFile.c_str(), keyFile.c_str()) != 0)
    return Error{-errno, sysError("rename " + nextFile.string())};
  unfinishedRotation_ = 0;
  if (auto st = syncDir(keys.string()); !st) return st;
  std::shared_ptr<const Ed25519Key> key;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    key = key_;
  }
  return replaceFile(keys / "ed25519.pub", toHexBytes(key->rawPublic()) + "\n", 0644);
}

void FileAuditSink::closeSegment() {
  if (segmentFd_ < 0) return;
  // The blanks written ahead are cut off: a sealed segment ends with its last record.
  struct stat st;
  if (::fstat(segmentFd_, &st) == 0 && static_cast<uint64_t>(st.st_size) > segmentSize_ &&
      ::ftruncate(segmentFd_, static_cast<off_t>(segmentSize_)) == 0)
    (void)::fdatasync(segmentFd_);
  ::close(segmentFd_);
  segmentFd_ = -1;
}

uint64_t FileAuditSink::prefillTarget(uint64_t end) const {
  // Records are written over blanks written ahead of them: the sync of a batch that fits in
  // them flushes the data blocks only. An append must also commit the file's new size and
  // its new blocks (fallocate()'s blocks too, which stay "unwritten" until written): on
  // this VM's disk ~200 against ~110 us per sync, and a context switch less. While fewer
  // than half of `prefill` are ahead, a batch writes an eighth more with it (in its one
  // sync): one batch in many pays for an append and a little more, and none for much more
  // (a half at once, 512 KiB, made a sync of ~2 ms that the calls behind it waited for),
  // but the first of a segment and one larger than the blanks ahead.
  if (options_.prefill == 0 || end + options_.prefill / 2 <= prefilledTo_) return prefilledTo_;
  uint64_t step = std::min(options_.prefill, std::max<uint64_t>(options_.prefill / 8, 64 << 10));
  // A batch that did not fit pays for an append anyway: it writes the half with it.
  uint64_t to = end >= prefilledTo_ ? end + options_.prefill / 2 + step : prefilledTo_ + step;
  // A small segment is not padded far past the size that seals it.
  return std::max(prefilledTo_, std::min(to, std::max(options_.segmentBytes, end)));
}

void FileAuditSink::prefill(uint64_t end) {
  uint64_t to = direct_ ? roundUpToBlock(prefillTarget(end)) : prefillTarget(end);
  const char* blanks = blankBlocks();
  // Out of space: the records go over the blanks there are, then past them.
  for (uint64_t at = std::max(prefilledTo_, end); blanks != nullptr && at < to; at = prefilledTo_) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kBlanks, to - at));
    if (!pwriteAll(segmentFd_, std::string_view(blanks, n), at)) break;
    prefilledTo_ = at + n;
  }
}

bool FileAuditSink::writeBatch(std::string_view out) {
  if (direct_) {
    if (writeDirect(out)) return true;
    // EINVAL: the file system took O_DIRECT at fcntl() but refuses the write; buffered from
    // here on (the batch's bytes are the same either way).
    if (errno != EINVAL && errno != EOPNOTSUPP) return false;
    int flags = ::fcntl(segmentFd_, F_GETFL);
    if (flags < 0 || ::fcntl(segmentFd_, F_SETFL, flags & ~O_DIRECT) != 0) return false;
    direct_ = false;
    head_.clear();
    Log::Line(LogLevel::kInfo, "audit segment written without O_DIRECT")
        .add("dir", options_.dir)
        .add("error", "the file system refused a direct write")
        .emit();
  }
  if (!pwriteAll(segmentFd_, out, segmentSize_)) return false;
  prefill(segmentSize_ + out.size());
  return ::fdatasync(segmentFd_) == 0;
}

bool FileAuditSink::writeDirect(std::string_view out) {
  // The batch goes in whole blocks, from the one it begins in (its records before the batch
  // are head_) to the end of its last one, filled with blanks: written and synced in one
  // call. The blanks due ahead go with it when they begin where it ends, else first,
  // unsynced (the batch's sync takes them). prefilledTo_ stays on a block boundary, so the
  // file never has a hole.
  uint64_t end = segmentSize_ + out.size();
  uint64_t from = segmentSize_ - head_.size();
  uint64_t batchEnd = roundUpToBlock(end);
  uint64_t to = roundUpToBlock(prefillTarget(end));
  uint64_t stop = batchEnd;
  if (to > prefilledTo_ && prefilledTo_ <= batchEnd)
    stop = to;  // the blanks due begin where the batch ends (or it went past them)
  else
    prefill(end);  // ahead of it, if due
  size_t len = static_cast<size_t>(stop - from);
  if (len > blocksCap_) {
    size_t cap = static_cast<size_t>(roundUpToBlock(std::max<uint64_t>(len, 2 * blocksCap_)));
    void* p = std::aligned_alloc(kDirectBlock, cap);
    if (p == nullptr) return false;
    blocks_.reset(static_cast<char*>(p));
    blocksCap_ = cap;
  }
  char* b = blocks_.get();
  std::memcpy(b, head_.data(), head_.size());
  std::memcpy(b + head_.size(), out.data(), out.size());
  std::memset(b + head_.size() + out.size(), kAuditPad, len - head_.size() - out.size());
  if (!pwriteAll(segmentFd_, std::string_view(b, len), from, RWF_DSYNC)) {
    // Out of space for the blanks with it: the batch alone.
    size_t batch = static_cast<size_t>(batchEnd - from);
    if (errno != ENOSPC || len == batch ||
        !pwriteAll(segmentFd_, std::string_view(b, batch), from, RWF_DSYNC))
      return false;
    len = batch;
  }
  prefilledTo_ = std::max(prefilledTo_, from + len);
  uint64_t last = end & ~(kDirectBlock - 1);
  head_.assign(b + (last - from), end - last);
  if (blocksCap_ > (16u << 20)) {  // after a burst
    blocks_.reset();
    blocksCap_ = 0;
  }
  return true;
}

Status FileAuditSink::openSegment(uint64_t number) {
  closeSegment();
  fs::path p = fs::path(options_.dir) / segmentName(number);
  std::error_code ec;
  bool created = !fs::exists(p, ec);
  segmentFd_ = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (segmentFd_ < 0) return Error{-errno, sysError("open " + p.string())};
  // A new file's name is durable only with its directory's: the records synced into it
  // would otherwise be lost with the name on a power cut.
  if (created) {
    if (auto st = syncDir(options_.dir); !st) return st;
  }
  struct stat st;
  uint64_t size = ::fstat(segmentFd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  // Records continue after the last one (a segment begun before a restart may end in blanks).
  segmentSize_ = auditContentSize(p.string(), size);
  prefilledTo_ = size;
  segmentNumber_ = number;
  segmentOpened_ = std::chrono::steady_clock::now();
  direct_ = false;
  head_.clear();
  if (options_.directIo && options_.prefill > 0) {
    // The records in the last, partial block are written again with the next batch; the
    // file is first made to end on a block boundary (blanks), as every direct write ends.
    uint64_t last = segmentSize_ & ~(kDirectBlock - 1);
    head_.resize(segmentSize_ - last);
    uint64_t aligned = roundUpToBlock(size);
    std::string pad(aligned - size, kAuditPad);
    bool ready =
        ::pread(segmentFd_, head_.data(), head_.size(), static_cast<off_t>(last)) ==
            static_cast<ssize_t>(head_.size()) &&
        (pad.empty() || (pwriteAll(segmentFd_, pad, size) && ::fdatasync(segmentFd_) == 0));
    int flags = ::fcntl(segmentFd_, F_GETFL);
    if (ready && flags >= 0 && ::fcntl(segmentFd_, F_SETFL, flags | O_DIRECT) == 0) {
      direct_ = true;
      prefilledTo_ = aligned;
    } else {
      head_.clear();  // buffered writes
      Log::Line(LogLevel::kInfo, "audit segment written without O_DIRECT")
          .add("path", p.string())
          .add("error", std::string(std::strerror(errno)))
          .emit();
    }
  }
  return Status::success();
}

void FileAuditSink::enqueue(Pending pending) {
  if (queue_.empty()) queuedAt_ = std::chrono::steady_clock::now();
  if (pending.type == Pending::Type::kCheckpoint)
    queuedSinceCheckpoint_ = 0;
  else
    ++queuedSinceCheckpoint_;
  queue_.push_back(std::move(pending));
}

uint64_t FileAuditSink::append(AuditRecord r) {
  Pending p;
  p.record = renderAuditTemplate(logId_, r.kind.empty() ? "call" : r.kind, r.fields());
  return push(std::move(p), r.sync);
}

uint64_t FileAuditSink::push(Pending p, AuditSync sync) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (queue_.size() >= options_.maxQueued && !stopping_) {
    // Backpressure: the writer is behind (records come faster than it can write them), so
    // this thread waits for it rather than the queue growing without bound; what is queued
    // is asked for at once. Nothing is dropped: the caller, a worker's loop too, slows down.
    wanted_ = seq_;
    if (wakeWriter(AuditSync::kNow)) wake_.notify_one();
    ++backpressureWaits_;
    if (observer_) observer_->onBackpressure();
    drained_.wait(lock, [this] { return queue_.size() < options_.maxQueued || stopping_; });
  }
  p.tsNs = wallNs();
  uint64_t seq = ++seq_;
  if (sync == AuditSync::kNow) wanted_ = seq;
  enqueue(std::move(p));
  bool wake = wakeWriter(sync);
  lock.unlock();
  // Outside the lock: woken while this thread holds it, the writer preempts it (on this CPU,
  // where it is woken) only to block on the mutex and be woken again, two context switches
  // more for every batch.
  if (wake) wake_.notify_one();
  return seq;
}

bool FileAuditSink::wakeWriter(AuditSync sync) {
  // A busy writer looks at the queue when its batch is done. An idle one is woken for a
  // record someone waits for, and for the first batched one only when it would sleep past
  // that record's deadline: after a batch it naps lazySync, so under load every batch costs
  // one wakeup (the requestDurable at the end of a worker's turn), not two.
  if (!idle_ || !(sync == AuditSync::kNow ||
                  (queue_.size() == 1 && idleUntil_ > queuedAt_ + options_.lazySync)))
    return false;
  idle_ = false;  // one wakeup, however many records come before the writer runs
  return true;
}

void FileAuditSink::requestDurable(uint64_t seq) {
  if (seq <= wanted_.load(std::memory_order_relaxed)) return;  // appended as kNow: the hot path
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (seq <= wanted_ || seq <= durable_) return;
    wanted_ = std::min(seq, seq_);
    wake = wakeWriter(AuditSync::kNow);
  }
  if (wake) wake_.notify_one();  // outside the lock, as in push()
}

void FileAuditSink::setObserver(AuditObserver* observer) {
  std::lock_guard<std::mutex> lock(mutex_);
  observer_ = observer;
}

uint64_t FileAuditSink::addEvent(std::string_view kind, const AuditFields& fields, AuditSync sync) {
  std::vector<std::pair<std::string_view, std::string_view>> kept;
  kept.reserve(fields.size());
  for (const auto& [k, v] : fields) {
    bool own =
        k == "v" || k == "log_id" || k == "seq" || k == "ts_ns" || k == "prev" || k == "kind";
    bool repeated =
        std::any_of(kept.begin(), kept.end(), [&](const auto& e) { return e.first == k; });
    if (!own && !repeated) kept.emplace_back(k, v);
  }
  Pending p;
  p.record = renderAuditTemplate(logId_, kind, std::move(kept));
  return push(std::move(p), sync);
}

std::vector<std::string> FileAuditSink::tail(size_t n) const {
  std::unique_lock<std::mutex> lock(mutex_);
  // What was appended before this call is in the answer (it is built within a group commit).
  uint64_t want = seq_;
  built_.wait_for(lock, std::chrono::seconds(1), [&] { return builtSeq_ >= want; });
  return recent_.last(n);
}

bool FileAuditSink::rotationDue() const {
  return segmentSize_ > 0 &&
         (segmentSize_ >= options_.segmentBytes ||
          std::chrono::steady_clock::now() - segmentOpened_ >= options_.segmentAge);
}

void FileAuditSink::run() {
  auto lastCheckpoint = std::chrono::steady_clock::now();
  auto lastSync = std::chrono::steady_clock::time_point{};    // the last sync began
  auto lastSynced = std::chrono::steady_clock::time_point{};  // and ended
  // Kept from batch to batch with their capacity (swapped with queue_, refilled).
  std::vector<Pending> pending;
  std::string out;             // the batch's lines, each ending in a newline
  std::vector<size_t> starts;  // where each line begins in out
  for (;;) {
    bool stop;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // The next batch goes when a call waits for one of its records, when its oldest
      // record has waited lazySync, or when a checkpoint is due with no record coming.
      for (;;) {
        if (stopping_ || (!queue_.empty() && wanted_ > durable_)) break;
        auto now = std::chrono::steady_clock::now();
        auto deadline = queuedSinceCheckpoint_ > 0 ? lastCheckpoint + options_.checkpointInterval
                                                   : now + options_.checkpointInterval;
        if (!queue_.empty())
          deadline = std::min(deadline, queuedAt_ + options_.lazySync);
        else if (now < lastSynced + options_.lazySync)
          deadline = std::min(deadline, lastSynced + options_.lazySync);  // the nap
        if (now >= deadline) break;
        idle_ = true;
        idleUntil_ = deadline;
        wake_.wait_until(lock, deadline);
        idle_ = false;  // records arriving from now on join this batch without a wakeup
      }
      // The optional cap: at most one fsync per syncInterval; what arrives meanwhile joins.
      auto next = lastSync + options_.syncInterval;
      if (!stopping_ && std::chrono::steady_clock::now() < next)
        wake_.wait_until(lock, next, [this] { return stopping_; });
      auto now = std::chrono::steady_clock::now();
      uint64_t since = queuedSinceCheckpoint_;
      bool due = since >= options_.checkpointEvery ||
                 (since > 0 && now - lastCheckpoint >= options_.checkpointInterval) ||
                 (rotationDue() && since > 0) || (stopping_ && since > 0);
      if (due) {
        ++seq_;
        Pending cp;
        cp.type = Pending::Type::kCheckpoint;
        cp.key = key_;
        enqueue(std::move(cp));
        lastCheckpoint = now;
      }
      pending.swap(queue_);
      drained_.notify_all();
      stop = stopping_;
    }
    // Sealed here, in seq order, without the lock: appends go on meanwhile.
    out.clear();
    starts.clear();
    for (auto& p : pending) {
      starts.push_back(out.size());
      switch (p.type) {
        case Pending::Type::kTemplate:
          chain_->appendTemplate(p.record, p.tsNs, out);
          break;
        case Pending::Type::kLine:
          out += p.line;
          break;
        case Pending::Type::kCheckpoint:
          out += chain_->checkpoint(*p.key, wallNs());
          break;
        case Pending::Type::kRotation:
          out += chain_->keyRotation(*p.key, *p.next, p.tsNs);
          break;
      }
      out += '\n';
    }
    size_t count = pending.size();
    bool endsSealed = count > 0 && pending.back().type == Pending::Type::kCheckpoint;
    size_t lastCheckpointAt = count;  // the batch's last checkpoint (count: none)
    for (size_t i = 0; i < count; ++i)
      if (pending[i].type == Pending::Type::kCheckpoint) lastCheckpointAt = i;
    pending.clear();
    auto line = [&](size_t i) {
      size_t end = i + 1 < count ? starts[i + 1] : out.size();
      return std::string_view(out).substr(starts[i], end - starts[i] - 1);
    };
    if (count > 0) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = count > kRecent ? count - kRecent : 0; i < count; ++i)
          recent_.push(line(i));
        builtSeq_ += count;
        built_.notify_all();
      }
      bool attempted = healthy_;  // once failed, the stream stays failed: nothing is written
      bool ok = attempted;
      // The interval runs from one sync's start to the next: a sync slower than it is
      // followed at once by the next batch (measured from its end, every cycle also waited
      // the interval out, adding a millisecond to every call).
      lastSync = std::chrono::steady_clock::now();
      ok = ok && writeBatch(out);
      auto synced = std::chrono::steady_clock::now();
      lastSynced = synced;
      if (!ok && healthy_.exchange(false)) {
        Log::Line(LogLevel::kError, "audit stream unwritable")
            .add("dir", options_.dir)
            .add("error", std::string(std::strerror(errno)))
            .emit();
      }
      if (ok) {
        segmentSize_ += out.size();
        writtenSealed_ = endsSealed;
        uint64_t first = durable_ + 1;
        if (lastCheckpointAt < count) lastCheckpoint_ = first + lastCheckpointAt;
        durable_ += count;
        if (!options_.replicas.empty()) {
          std::vector<std::string> lines;
          lines.reserve(count);
          for (size_t i = 0; i < count; ++i) lines.emplace_back(line(i));
          for (auto& r : options_.replicas) r->onDurable(first, lines);
        }
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (observer_ && !attempted) {
          observer_->onDropped(count);
        } else if (observer_) {
          observer_->onBatch(count, std::chrono::duration<double>(synced - lastSync).count(), ok);
          if (ok && lastCheckpointAt < count)
            observer_->onCheckpoint(durable_ - count + 1 + lastCheckpointAt);
        }
      }
      if (out.capacity() > (16u << 20)) std::string().swap(out);  // after a burst
    }
    {
      // A full or old segment is sealed (its last record a checkpoint), the next one begun;
      // records queued meanwhile go to the next one (waiting for an empty queue, a segment
      // under steady load would never be sealed).
      std::lock_guard<std::mutex> lock(mutex_);
      if (healthy_ && !stopping_ && rotationDue() && writtenSealed_) {
        std::string sealedPath = (fs::path(options_.dir) / segmentName(segmentNumber_)).string();
        if (auto st = openSegment(segmentNumber_ + 1); st) {
          for (auto& r : options_.replicas) r->onSealed(sealedPath);
        } else if (healthy_.exchange(false)) {
          // The sealed segment is closed and no next one is open: calls halt from here on.
          Log::Line(LogLevel::kError, "audit stream unwritable")
              .add("dir", options_.dir)
              .add("error", st.error().message)
              .emit();
        }
      }
    }
    if (stop) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (queue_.empty()) break;
    }
  }
}

FileAuditSink::~FileAuditSink() {
  if (writer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    drained_.notify_all();
    writer_.join();
  }
  closeSegment();
  if (lockFd_ >= 0) ::close(lockFd_);  // releases the flock
}

}  // namespace tollgate
