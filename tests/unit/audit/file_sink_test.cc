// FileAuditSink at start: a torn final record, cut at every byte offset (a crash in mid
// write), is moved aside whole, a recovery record says how many bytes it had, and the log
// verifies and goes on. In-process, so every offset is covered quickly; the integration
// test (test_audit_tamper.py) restarts the real binary at a sample of offsets.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "audit/file_sink.h"
#include "common/files.h"
#include "tests/unit/audit/log_writer.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;

ChainVerdict verifyDir(const fs::path& dir) {
  std::ifstream pub(dir / "keys" / "ed25519.pub");
  std::string hex;
  pub >> hex;
  auto key = Ed25519Key::fromRawPublic(fromHexBytes(hex));
  auto lines = readAuditLog(dir.string());
  if (!key || !lines) {
    ChainVerdict bad;
    bad.ok = false;
    bad.reason = "unreadable";
    return bad;
  }
  return verifyChain(lines.value(), key.value());
}

// Appends perThread call records from each of `threads` threads at once; with `await`,
// each thread waits for its record to be durable before the next, as a forwarded call does.
void appendFromThreads(FileAuditSink& sink, int threads, int perThread, bool await) {
  std::vector<std::thread> running;
  for (int t = 0; t < threads; ++t) {
    running.emplace_back([&, t] {
      for (int i = 0; i < perThread; ++i) {
        AuditRecord r;
        r.agent = "agent-" + std::to_string(t) + "-" + std::to_string(i);
        r.decision = await ? "allow" : "halt";
        r.sync = await ? AuditSync::kNow : AuditSync::kBatched;
        uint64_t seq = sink.append(r);
        while (await && sink.durableSeq() < seq) std::this_thread::yield();
      }
    });
  }
  for (auto& th : running) th.join();
}

size_t callRecords(const fs::path& dir) {
  size_t calls = 0;
  auto st = forEachAuditLine(dir.string(), [&](std::string& line, const std::string&, size_t) {
    calls += line.find("\"kind\":\"call\"") != std::string::npos;
    return true;
  });
  return st ? calls : 0;
}

TEST(FileSinkTest, ATornFinalRecordAtEveryOffsetIsMovedAsideAndRecorded) {
  fs::path base = fs::temp_directory_path() / ("tollgate-torn-" + std::to_string(::getpid()));
  fs::remove_all(base);
  {
    auto sink = FileAuditSink::open({(base / "log").string()});
    ASSERT_TRUE(sink) << sink.error().message;
    for (int i = 0; i < 5; ++i) {
      AuditRecord r;
      r.agent = "agent-" + std::to_string(i);
      r.decision = "allow";
      r.path = "/notes/" + std::to_string(i);
      sink.value()->append(r);
    }
  }  // closed: the final record is the checkpoint that seals it
  auto segs = auditSegments((base / "log").string());
  ASSERT_EQ(segs.size(), 1u);
  auto data = readFile(segs[0]).value();
  auto lines = readAuditLog((base / "log").string()).value();
  ASSERT_EQ(lines.size(), 6u);
  size_t final = lines.back().size() + 1;  // with its newline
  size_t start = data.size() - final;
  for (size_t k = 1; k < final; ++k) {
    SCOPED_TRACE("bytes of the final record written: " + std::to_string(k));
    fs::path d = base / ("copy-" + std::to_string(k));
    fs::copy(base / "log", d, fs::copy_options::recursive);
    fs::resize_file(d / fs::path(segs[0]).filename(), start + k);
    {
      auto sink = FileAuditSink::open({d.string()});
      ASSERT_TRUE(sink) << sink.error().message;
    }
    std::vector<fs::path> torn;
    for (const auto& e : fs::directory_iterator(d))
      if (e.path().filename().string().starts_with("torn-")) torn.push_back(e.path());
    ASSERT_EQ(torn.size(), 1u);
    EXPECT_EQ(readFile(torn[0].string()).value(), data.substr(start, k));
    auto after = readAuditLog(d.string()).value();
    ASSERT_GE(after.size(), 7u);  // five calls, the recovery record, a checkpoint
    auto recovery = nlohmann::json::parse(after[5]);
    EXPECT_EQ(recovery["kind"], "recovery");
    EXPECT_EQ(recovery["torn_bytes"], k);
    EXPECT_EQ(nlohmann::json::parse(after.back())["kind"], "checkpoint");
    auto v = verifyDir(d);
    EXPECT_TRUE(v.ok) << v.reason;
    fs::remove_all(d);
  }
  fs::remove_all(base);
}

// After a torn tail is moved aside, the recovery record is not durable until it is written,
// and durableSeq() counts exactly what is on disk: a call whose record is not is never
// taken for durable (it would be forwarded before its record could survive a crash).
TEST(FileSinkTest, AfterATornTailDurableSeqCountsOnlyWhatIsOnDisk) {
  fs::path base =
      fs::temp_directory_path() / ("tollgate-torn-durable-" + std::to_string(::getpid()));
  fs::remove_all(base);
  {
    auto sink = FileAuditSink::open({base.string()});
    ASSERT_TRUE(sink) << sink.error().message;
    for (int i = 0; i < 5; ++i) {
      AuditRecord r;
      r.agent = "agent-" + std::to_string(i);
      r.decision = "allow";
      sink.value()->append(r);
    }
  }  // sealed: record 6 is the closing checkpoint
  auto segs = auditSegments(base.string());
  ASSERT_EQ(segs.size(), 1u);
  auto data = readFile(segs[0]).value();
  auto lines = readAuditLog(base.string()).value();
  ASSERT_EQ(lines.size(), 6u);
  fs::resize_file(segs[0], data.size() - lines.back().size() / 2);  // the checkpoint torn
  FileAuditSink::Options options(base.string());
  options.lazySync = std::chrono::seconds(30);  // nothing is written unless waited for
  auto sink = FileAuditSink::open(options);
  ASSERT_TRUE(sink) << sink.error().message;
  // Records 1-5 are on disk; 6, the recovery record, is queued.
  EXPECT_EQ(sink.value()->durableSeq(), 5u);
  AuditRecord r;
  r.agent = "after";
  r.decision = "allow";
  uint64_t seq = sink.value()->append(r);
  ASSERT_EQ(seq, 7u);
  ASSERT_TRUE(sink.value()->waitDurable(seq, std::chrono::seconds(10)));
  EXPECT_EQ(sink.value()->durableSeq(), 7u);
  r.agent = "batched";
  uint64_t next = sink.value()->append(r);  // kBatched: waits for a later sync
  EXPECT_EQ(next, 8u);
  EXPECT_LT(sink.value()->durableSeq(), next);
  size_t onDisk = 0;
  ASSERT_TRUE(forEachAuditLine(base.string(), [&](std::string&, const std::string&, size_t) {
    ++onDisk;
    return true;
  }));
  EXPECT_EQ(onDisk, sink.value()->durableSeq());
  sink.value().reset();
  fs::remove_all(base);
}

// A log of many segments is read back a line at a time at start: it resumes where it
// was (seq, chain, tail), and a record changed in a middle segment stops the start with that
// segment's name and the record's number.
TEST(FileSinkTest, ALogOfManySegmentsResumesAndNamesTheSegmentOfABadRecord) {
  fs::path dir = fs::temp_directory_path() / ("tollgate-segs-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  options.segmentBytes = 2048;
  options.checkpointEvery = 8;
  writeAwaited(options, 0, 60);
  auto segs = auditSegments(dir.string());
  ASSERT_GT(segs.size(), 4u);
  writeAwaited(options, 60, 5);  // resumed after every segment: the chain goes on and verifies
  auto lines = readAuditLog(dir.string()).value();
  EXPECT_EQ(nlohmann::json::parse(lines.back())["kind"], "checkpoint");
  auto v = verifyDir(dir);
  EXPECT_TRUE(v.ok) << v.reason;
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    auto tail = sink.value()->tail(3);
    ASSERT_EQ(tail.size(), 3u);
    EXPECT_EQ(tail.back(), lines.back());
  }
  // One record of the second segment rewritten (same length): the start refuses the log.
  auto seg = readAuditSegment(segs[1]).value();
  std::string changed = seg[1];
  auto at = changed.find("agent-");
  ASSERT_NE(at, std::string::npos);
  changed[at] = 'A';
  auto data = readFile(segs[1]).value();
  data.replace(data.find(seg[1]), seg[1].size(), changed);
  ASSERT_TRUE(writeFileAtomic(segs[1], data, 0600));
  uint64_t badSeq = nlohmann::json::parse(seg[2])["seq"].get<uint64_t>();  // its link breaks
  auto refused = FileAuditSink::open(options);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find(fs::path(segs[1]).filename().string() + " record " +
                                         std::to_string(badSeq)),
            std::string::npos)
      << refused.error().message;
  fs::remove_all(dir);
}

// Segment numbers go past six digits: segment-1000000 follows segment-999999 (by number,
// not by name), and the log resumes after it.
TEST(FileSinkTest, SegmentNumbersGoOnPastSixDigits) {
  fs::path dir = fs::temp_directory_path() / ("tollgate-segnum-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  writeAwaited(options, 0, 3);  // sealed at close: the next start begins a new segment
  auto segs = auditSegments(dir.string());
  ASSERT_EQ(segs.size(), 1u);
  fs::rename(segs[0], dir / "segment-999999.jsonl");
  writeAwaited(options, 3, 3);
  segs = auditSegments(dir.string());
  ASSERT_EQ(segs.size(), 2u);
  EXPECT_EQ(fs::path(segs[0]).filename(), "segment-999999.jsonl");
  EXPECT_EQ(fs::path(segs[1]).filename(), "segment-1000000.jsonl");
  writeAwaited(options, 6, 3);  // resumed after segment-1000000
  segs = auditSegments(dir.string());
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_EQ(fs::path(segs[2]).filename(), "segment-1000001.jsonl");
  auto v = verifyDir(dir);
  EXPECT_TRUE(v.ok) << v.line << ": " << v.reason;
  fs::remove_all(dir);
}

// tail(n) is the last n lines of the log, oldest first: after more lines than it keeps
// (1000), written in batches of one and in one batch of 1500 (more than it keeps at once),
// and after a restart (the start fills it from the log).
TEST(FileSinkTest, TailIsTheLogsLastLinesAfterMoreThanItKeeps) {
  fs::path dir = fs::temp_directory_path() / ("tollgate-tail-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  options.checkpointEvery = 100000;
  options.lazySync = std::chrono::seconds(10);  // a record no one waits for waits for a call
  auto lastLines = [&](size_t n) {
    auto lines = readAuditLog(dir.string()).value();
    n = std::min(n, lines.size());
    return std::vector<std::string>(lines.end() - static_cast<std::ptrdiff_t>(n), lines.end());
  };
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    auto& s = *sink.value();
    for (int i = 0; i < 700; ++i) {  // one batch each
      AuditRecord r;
      r.agent = "agent-" + std::to_string(i);
      r.sync = AuditSync::kNow;
      uint64_t seq = s.append(r);
      while (s.durableSeq() < seq) std::this_thread::yield();
    }
    EXPECT_EQ(s.tail(5), lastLines(5));
    uint64_t seq = 0;
    for (int i = 700; i < 2200; ++i) {  // one batch: the writer is asked after the last
      AuditRecord r;
      r.agent = "agent-" + std::to_string(i);
      seq = s.append(r);
    }
    s.requestDurable(seq);
    while (s.durableSeq() < seq) std::this_thread::yield();
    auto all = lastLines(1000);
    EXPECT_EQ(nlohmann::json::parse(all.back())["agent"], "agent-2199");
    EXPECT_EQ(s.tail(1000), all);
    EXPECT_EQ(s.tail(5000), all);  // no more than it keeps
    EXPECT_EQ(s.tail(1), lastLines(1));
  }
  auto sink = FileAuditSink::open(options);  // sealed at close: the tail ends with the checkpoint
  ASSERT_TRUE(sink) << sink.error().message;
  auto all = lastLines(1000);
  EXPECT_EQ(nlohmann::json::parse(all.back())["kind"], "checkpoint");
  EXPECT_EQ(sink.value()->tail(1000), all);
  EXPECT_EQ(sink.value()->tail(3), lastLines(3));
  fs::remove_all(dir);
}

// Under steady load the queue is never empty when a batch is done: a full segment is still
// sealed with a checkpoint, and what was queued meanwhile begins the next one. Every segment
// but the last ends with a checkpoint, none grows far past the size, and the log verifies
// and reads back line by line (forEachAuditLine streams a segment in chunks).
TEST(FileSinkTest, SegmentsRotateUnderSteadyLoad) {
  fs::path dir = fs::temp_directory_path() / ("tollgate-rotate-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  options.segmentBytes = 16 * 1024;
  constexpr int kThreads = 4, kPerThread = 400;
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    appendFromThreads(*sink.value(), kThreads, kPerThread, true);
  }
  auto segs = auditSegments(dir.string());
  uint64_t total = 0;
  for (const auto& seg : segs) total += fs::file_size(seg);
  ASSERT_GT(segs.size(), total / options.segmentBytes / 2);
  for (size_t i = 0; i + 1 < segs.size(); ++i) {
    auto lines = readAuditSegment(segs[i]).value();
    ASSERT_FALSE(lines.empty());
    auto data = readFile(segs[i]).value();
    EXPECT_EQ(data.size(), auditContentSize(data)) << segs[i];  // sealed: no blanks
    EXPECT_EQ(nlohmann::json::parse(lines.back())["kind"], "checkpoint") << segs[i];
  }
  size_t lastN = 0;
  std::string lastSegment;
  auto st = forEachAuditLine(dir.string(), [&](std::string&, const std::string& segment, size_t n) {
    EXPECT_EQ(n, segment == lastSegment ? lastN + 1 : 1u);
    lastSegment = segment;
    lastN = n;
    return true;
  });
  ASSERT_TRUE(st);
  EXPECT_EQ(callRecords(dir), static_cast<size_t>(kThreads) * kPerThread);
  auto v = verifyDir(dir);
  EXPECT_TRUE(v.ok) << v.reason;
  fs::remove_all(dir);
}

// The segment being written ends in blanks written ahead of its records (Options::prefill):
// no reader takes them for a record (the lines, the first seq, the verifier), a sealed
// segment has none, and a log copied in mid-run, as a crash leaves it, starts again with
// the blanks cut off and a record torn in them moved aside without them.
TEST(FileSinkTest, TheSegmentBeingWrittenEndsInBlanksThatNoReaderTakesForARecord) {
  fs::path base = fs::temp_directory_path() / ("tollgate-prefill-" + std::to_string(::getpid()));
  fs::remove_all(base);
  FileAuditSink::Options options((base / "log").string());
  options.prefill = 64 * 1024;
  std::string before;                            // the segment as the sidecar left it
  const std::string torn = "{\"agent\":\"torn";  // a record's first bytes
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    appendFromThreads(*sink.value(), 2, 10, true);
    auto segs = auditSegments(options.dir);
    ASSERT_EQ(segs.size(), 1u);
    before = readFile(segs[0]).value();
    ASSERT_GE(before.size(), 64u * 1024);
    size_t content = auditContentSize(before);
    ASSERT_LT(content, before.size());
    EXPECT_EQ(before[content - 1], '\n');
    EXPECT_EQ(before.find_first_not_of(kAuditPad, content), std::string::npos);
    EXPECT_EQ(auditContentSize(segs[0], before.size()), content);
    auto lines = readAuditSegment(segs[0]).value();
    EXPECT_EQ(lines.size(), 20u);
    EXPECT_EQ(readAuditLog(options.dir).value(), lines);
    EXPECT_EQ(callRecords(base / "log"), 20u);
    EXPECT_EQ(auditSegmentFirstSeq(segs[0]), 1u);
    auto v = verifyDir(base / "log");
    EXPECT_TRUE(v.ok) << v.reason;
    // A crash now: the copy is what the disk holds; a record torn in mid write lies in the
    // blanks.
    fs::copy(base / "log", base / "crashed", fs::copy_options::recursive);
    std::string crashed = before;
    crashed.replace(content, torn.size(), torn);
    ASSERT_TRUE(
        writeFileAtomic((base / "crashed" / fs::path(segs[0]).filename()).string(), crashed, 0600));
    fs::remove(base / "crashed" / "LOCK");
  }
  // Sealed at close: the blanks are gone.
  auto sealed = readFile(auditSegments(options.dir)[0]).value();
  EXPECT_EQ(sealed.size(), auditContentSize(sealed));
  EXPECT_EQ(sealed.back(), '\n');
  EXPECT_EQ(sealed.substr(0, auditContentSize(before)), before.substr(0, auditContentSize(before)));
  {
    auto sink = FileAuditSink::open({(base / "crashed").string()});
    ASSERT_TRUE(sink) << sink.error().message;
  }
  std::vector<fs::path> asides;
  for (const auto& e : fs::directory_iterator(base / "crashed"))
    if (e.path().filename().string().starts_with("torn-")) asides.push_back(e.path());
  ASSERT_EQ(asides.size(), 1u);
  EXPECT_EQ(readFile(asides[0].string()).value(), torn);
  auto after = readAuditLog((base / "crashed").string()).value();
  ASSERT_EQ(after.size(), 22u);  // twenty calls, the recovery record, the closing checkpoint
  EXPECT_EQ(nlohmann::json::parse(after[20])["torn_bytes"], torn.size());
  for (const auto& seg : auditSegments((base / "crashed").string())) {
    auto data = readFile(seg).value();
    EXPECT_EQ(data.size(), auditContentSize(data)) << seg;
  }
  auto v = verifyDir(base / "crashed");
  EXPECT_TRUE(v.ok) << v.reason;
  fs::remove_all(base);
}

// The flags the segment being written is open with (from /proc/self/fdinfo); -1: not open.
long segmentFlags(const std::string& segment) {
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (fs::read_symlink(e.path(), ec) != fs::path(segment)) continue;
    std::ifstream info("/proc/self/fdinfo/" + e.path().filename().string());
    for (std::string key; info >> key;) {
      std::string value;
      info >> value;
      if (key == "flags:") return std::stol(value, nullptr, 8);
    }
  }
  return -1;
}

// With Options::directIo the batches go with O_DIRECT in whole blocks: the segment being
// written is always a whole number of 4 KiB blocks, each batch durable on its own (a copy
// taken then holds it), and a sink that opens a segment whose records end inside a block
// (its own, after a crash; one written with buffered appends) writes that block again with
// its next batch, so the log verifies with every record in order. The blanks kept ahead are
// there (written with a batch or ahead of it) and no block is a hole.
TEST(FileSinkTest, DirectWritesGoInWholeBlocksAndGoOnFromAPartialOne) {
  // The temporary directory, or the working directory (the build tree) where the temporary
  // one takes no O_DIRECT (a tmpfs before Linux 6.6, say).
  fs::path base;
  for (const auto& dir : {fs::temp_directory_path(), fs::current_path()}) {
    fs::path candidate = dir / ("tollgate-direct-" + std::to_string(::getpid()));
    fs::remove_all(candidate);
    fs::create_directories(candidate);
    int probe = ::open((candidate / "probe").c_str(), O_WRONLY | O_CREAT | O_DIRECT, 0600);
    if (probe >= 0) {
      ::close(probe);
      base = candidate;
      break;
    }
    fs::remove_all(candidate);
  }
  if (base.empty()) {
    if (const char* ci = std::getenv("TOLLGATE_REQUIRE_NETNS"); ci && std::string(ci) == "1")
      FAIL() << "TOLLGATE_REQUIRE_NETNS=1 but neither the temporary nor the working directory "
                "takes O_DIRECT: the direct path did not run";
    GTEST_SKIP() << "no O_DIRECT here: the direct path did not run";
  }
  auto appendAwaited = [](FileAuditSink& sink, int n, const std::string& prefix) {
    for (int i = 0; i < n; ++i) {
      AuditRecord r;
      r.agent = prefix + std::to_string(i);
      r.decision = "allow";
      r.sync = AuditSync::kNow;
      uint64_t seq = sink.append(r);
      while (sink.durableSeq() < seq) std::this_thread::yield();
    }
  };
  auto callLines = [](const fs::path& dir) {
    std::vector<std::string> calls;
    auto lines = readAuditLog(dir.string());
    if (!lines) return calls;
    for (auto& line : lines.value())
      if (line.find("\"kind\":\"call\"") != std::string::npos) calls.push_back(line);
    return calls;
  };
  FileAuditSink::Options direct((base / "direct").string());
  // Small, so that blanks come due both where a batch ends and ahead of where it ends.
  direct.prefill = 16 * 1024;
  FileAuditSink::Options buffered((base / "buffered").string());
  buffered.prefill = 0;
  buffered.directIo = false;
  {
    auto sink = FileAuditSink::open(direct);
    ASSERT_TRUE(sink) << sink.error().message;
    auto segment = auditSegments(direct.dir)[0];
    EXPECT_NE(segmentFlags(segment) & O_DIRECT, 0);
    for (int i = 0; i < 12; ++i) {  // ~12 records a block: past the first block
      appendAwaited(*sink.value(), 1, "direct-");
      EXPECT_EQ(fs::file_size(segment) % 4096, 0u);
      EXPECT_EQ(readAuditSegment(segment).value().size(), static_cast<size_t>(i + 1));
    }
    fs::copy(base / "direct", base / "direct-crashed", fs::copy_options::recursive);
    fs::remove(base / "direct-crashed" / "LOCK");
  }
  {
    auto sink = FileAuditSink::open(buffered);
    ASSERT_TRUE(sink) << sink.error().message;
    EXPECT_EQ(segmentFlags(auditSegments(buffered.dir)[0]) & O_DIRECT, 0);
    appendAwaited(*sink.value(), 7, "buffered-");
    fs::copy(base / "buffered", base / "buffered-crashed", fs::copy_options::recursive);
    fs::remove(base / "buffered-crashed" / "LOCK");
  }
  auto segment = auditSegments((base / "buffered-crashed").string())[0];
  ASSERT_NE(fs::file_size(segment) % 4096, 0u);  // records end inside a block, no blanks
  for (const char* name : {"direct-crashed", "buffered-crashed"}) {
    SCOPED_TRACE(name);
    auto before = callLines(base / name);
    FileAuditSink::Options options((base / name).string());
    options.prefill = 16 * 1024;
    {
      auto sink = FileAuditSink::open(options);
      ASSERT_TRUE(sink) << sink.error().message;
      EXPECT_NE(segmentFlags(segment = auditSegments(options.dir).back()) & O_DIRECT, 0);
      appendFromThreads(*sink.value(), 2, 100, true);
      // Whole blocks, the records, then blanks only: no hole (it would read as zeros).
      auto data = readFile(segment).value();
      EXPECT_EQ(data.size() % 4096, 0u);
      EXPECT_GT(data.size() - auditContentSize(data), 16u * 1024 / 2);
      EXPECT_EQ(data.find('\0'), std::string::npos);
      EXPECT_EQ(data.find_first_not_of(kAuditPad, auditContentSize(data)), std::string::npos);
    }
    auto after = callLines(base / name);
    ASSERT_EQ(after.size(), before.size() + 200);
    EXPECT_TRUE(std::equal(before.begin(), before.end(), after.begin()));
    auto v = verifyDir(base / name);
    EXPECT_TRUE(v.ok) << v.reason;
  }
  fs::remove_all(base);
}

// AuditSegmentReader: lines in order across its chunks (256 KiB), a last line without its
// newline given or kept (partial), the trailing blanks not read, and follow() reading what
// was written after it got to the end: what the Redis replica's catch-up reads the segment
// being written with, a line at a time.
TEST(AuditSegmentReaderTest, ReadsLinesAcrossChunksAndFollowsAGrowingSegment) {
  fs::path path = fs::temp_directory_path() / ("tollgate-reader-" + std::to_string(::getpid()));
  std::string text;
  std::vector<std::string> written;
  for (int i = 0; i < 3000; ++i) {  // ~600 KB: lines cross chunk boundaries
    written.push_back("{\"n\":" + std::to_string(i) + ",\"pad\":\"" + std::string(i % 400, 'x') +
                      "\"}");
    text += written.back() + "\n";
  }
  ASSERT_TRUE(
      writeFileAtomic(path.string(), text + "{\"torn\"" + std::string(1000, kAuditPad), 0600));
  {
    AuditSegmentReader reader(path.string());
    ASSERT_TRUE(reader.ok()) << reader.error();
    std::vector<std::string> got;
    std::string line;
    while (reader.next(line)) got.push_back(line);
    ASSERT_EQ(got.size(), written.size() + 1);
    EXPECT_EQ(std::vector<std::string>(got.begin(), got.end() - 1), written);
    EXPECT_EQ(got.back(), "{\"torn\"");  // without the blanks
  }
  AuditSegmentReader reader(path.string());
  std::string line;
  size_t n = 0;
  while (reader.next(line, false)) EXPECT_EQ(line, written[n++]);
  EXPECT_EQ(n, written.size());  // the torn line is kept
  // The rest of the record is written over the blanks, and another after it.
  std::string more = text + "{\"torn\":1}\n{\"n\":\"last\"}\n";
  ASSERT_TRUE(writeFileAtomic(path.string() + ".next", more, 0600));
  fs::copy_file(path.string() + ".next", path, fs::copy_options::overwrite_existing);
  EXPECT_FALSE(reader.next(line, false));  // not followed yet
  reader.follow();
  ASSERT_TRUE(reader.next(line, false));
  EXPECT_EQ(line, "{\"torn\":1}");
  ASSERT_TRUE(reader.next(line, false));
  EXPECT_EQ(line, "{\"n\":\"last\"}");
  EXPECT_FALSE(reader.next(line, false));
  EXPECT_FALSE(AuditSegmentReader((path.string() + ".none")).ok());
  fs::remove(path);
  fs::remove(path.string() + ".next");
}

// Appends faster than the writer (no one waits for them, as halts): past maxQueued an
// append waits for the writer instead of the queue growing without bound, and nothing is
// lost.
TEST(FileSinkTest, AFloodOfAppendsWaitsForTheWriterAndLosesNothing) {
  fs::path dir = fs::temp_directory_path() / ("tollgate-flood-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  FileAuditSink::Options options(dir.string());
  options.maxQueued = 32;
  options.lazySync = std::chrono::hours(1);  // a batched record alone would wait
  constexpr int kThreads = 2, kPerThread = 3000;
  uint64_t waits = 0;
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    appendFromThreads(*sink.value(), kThreads, kPerThread, false);
    waits = sink.value()->backpressureWaits();
  }
  EXPECT_GT(waits, 0u);
  EXPECT_EQ(callRecords(dir), static_cast<size_t>(kThreads) * kPerThread);
  auto v = verifyDir(dir);
  EXPECT_TRUE(v.ok) << v.reason;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tollgate
