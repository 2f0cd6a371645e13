// FileAuditSink: the durable audit stream (DESIGN §6) in a directory:
//   segment-NNNNNN.jsonl  the records, one canonical JSON line each (audit/chain.h); the
//                         one being written ends in blanks written ahead (Options::prefill)
//   LOG_ID                the log's id
//   LOCK                  flock()ed by the one process writing the log
//   keys/anchor.pub       the log's first checkpoint key (hex of the raw public key): what
//                         verifiers trust; later keys follow from key_rotation records
//   keys/ed25519.key|.pub the current checkpoint key (hex of the raw key; .key is 0600)
//   keys/ed25519.key.next a new key while it is being rotated in (0600; resolved at start)
//   torn-<ns>.bin         a torn last record found at start, moved aside
// append() renders the record's fields (on the caller's thread) and queues it in seq order
// (under a mutex); a writer thread chains and hashes the queued records and writes and
// fsyncs them in groups; checkpoints go every `checkpointEvery` records
// or `checkpointInterval`, at segment rotation and at close. At open the log is verified;
// a torn last line is moved aside and a `recovery` record appended.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "audit/audit_sink.h"
#include "audit/chain.h"
#include "audit/replica.h"
#include "common/result.h"

namespace tollgate {

class FileAuditSink : public AuditSink {
 public:
  struct Options {
    Options() = default;
    Options(std::string logDir) : dir(std::move(logDir)) {}  // NOLINT: {dir} reads well
    std::string dir;
    uint64_t checkpointEvery = 1000;
    std::chrono::milliseconds checkpointInterval{5000};
    // A segment is sealed with a checkpoint and the next one begun at this size or age (and
    // at start, when the last one was sealed at shutdown).
    uint64_t segmentBytes = 64ull << 20;
    std::chrono::milliseconds segmentAge{3'600'000};
    // Told of every durable line and every sealed segment (Redis Stream, export).
    std::vector<std::shared_ptr<AuditReplica>> replicas;
    // Group commit: a record a call waits for (AuditSync::kNow, requestDurable()) is written and
    // synced at once, or right after the sync in progress, with every record queued by then;
    // records no one waits for ride along, or are synced `lazySync` after they came.
    std::chrono::microseconds lazySync{2000};
    // At most one fsync per interval (0: none; a cap for disks where a sync is costly).
    std::chrono::microseconds syncInterval{0};
    // Blanks (kAuditPad) kept written ahead of the records, up to this much, so that a sync
    // flushes data only (0: plain appends). The segment being written ends in them; readers
    // take a segment's trailing blanks for no content, and a sealed segment has none.
    uint64_t prefill = 1ull << 20;
    // With prefill: a batch is written with O_DIRECT and RWF_DSYNC, one system call that
    // writes and syncs, without the page cache, in whole 4 KiB blocks: the block
    // the batch begins in is written again with it and its last one is filled with blanks.
    // On this VM's disk ~35 against ~50 us of kernel CPU per batch. A file system that
    // refuses O_DIRECT gets the buffered write and fdatasync.
    bool directIo = true;
    // Records queued and not yet taken by the writer, at most: past it an append waits for
    // the writer (backpressure) instead of the queue growing without bound.
    size_t maxQueued = 65536;
    // rotateKey() waits this long for its record to be durable.
    std::chrono::milliseconds rotationWait{10'000};
  };
  static Result<std::unique_ptr<FileAuditSink>> open(Options options);
  ~FileAuditSink() override;

  uint64_t append(AuditRecord record) override;
  std::vector<std::string> tail(size_t n) const override;
  // False once a write or fsync failed (the calls must then be halted).
  bool healthy() const override { return healthy_; }
  uint64_t durableSeq() const override { return durable_; }
  uint64_t lastCheckpointSeq() const override { return lastCheckpoint_; }
  void requestDurable(uint64_t seq) override;
  // How many appends waited for the writer because maxQueued records were queued.
  uint64_t backpressureWaits() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return backpressureWaits_;
  }
  void setObserver(AuditObserver* observer) override;
  // Seals the records so far with a checkpoint by the current key, appends a key_rotation
  // record to a new key, signs checkpoints with the new key from then on, and deletes the
  // old private key once the rotation record is durable. Blocks until then.
  Result<KeyRotation> rotateKey() override;

 protected:
  // Keys that are the chain's own, or repeated, are left out (they would not verify).
  uint64_t addEvent(std::string_view kind, const AuditFields& fields, AuditSync sync) override;

 private:
  explicit FileAuditSink(Options options);
  Status start();
  // Reads the log through `scan`, which verifies it from the log's anchor key, and takes the
  // private key of the key active after its rotations (finishing a rotation a crash
  // interrupted). A new log (emptyLog) gets its first key instead.
  using LogScan = std::function<Status(const Ed25519Key& anchor, ChainVerdict& verdict)>;
  Status loadKeys(bool emptyLog, const LogScan& scan);
  Status openSegment(uint64_t number);
  void closeSegment();
  // Where the blanks written ahead should end after a batch that ends at `end`
  // (prefilledTo_ when no more are due).
  uint64_t prefillTarget(uint64_t end) const;
  void prefill(uint64_t end);  // buffered: blanks after `end`, the batch's end, before its sync
  // Writes the batch at segmentSize_ and makes it durable (direct or buffered).
  bool writeBatch(std::string_view out);
  bool writeDirect(std::string_view out);

  bool rotationDue() const;  // under mutex_
  void run();

  Options options_;
  std::string logId_;
  std::unique_ptr<AuditChain> chain_;
  std::shared_ptr<const Ed25519Key> key_;  // signs the next checkpoint queued (under mutex_)
  int lockFd_ = -1;
  int segmentFd_ = -1;
  uint64_t segmentNumber_ = 0;
  uint64_t segmentSize_ = 0;
  uint64_t prefilledTo_ = 0;  // the file's size: blanks after the records up to here
  bool direct_ = false;       // the segment is written with O_DIRECT (Options::directIo)
  std::string head_;          // direct: the records in the segment's last, partial block
  struct FreeChars {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, FreeChars> blocks_;  // direct: the blocks of a batch, aligned
  size_t blocksCap_ = 0;
  std::chrono::steady_clock::time_point segmentOpened_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable drained_;  // the writer took the queue
  uint64_t backpressureWaits_ = 0;   // appends that waited for room (under mutex_)
  // A record waiting to be sealed, on the writer's thread and in seq order, then written.
  // The appending thread has rendered its fields into a template (escaping, key order: most
  // of a record's cost, and it needs no chain state); the writer fills in prev, seq and ts_ns
  // and hashes the line (the chain is sequential), so a batch's sync waits for little more
  // than its hashing.
  struct Pending {
    enum class Type { kTemplate, kLine, kCheckpoint, kRotation } type = Type::kTemplate;
    AuditTemplate record;  // kTemplate
    int64_t tsNs = 0;
    std::string line;                             // kLine: built already
    std::shared_ptr<const Ed25519Key> key, next;  // kCheckpoint: key; kRotation: key -> next
  };
  void enqueue(Pending pending);  // under mutex_
  // Sequences and queues one record (waiting while maxQueued are queued); its seq.
  uint64_t push(Pending pending, AuditSync sync);
  // Whether the writer is to be woken for a record just queued (under mutex_): at once for
  // kNow, else only when it sleeps past the deadline of the first record of a batch. True
  // once per sleep of the writer; the caller notifies wake_, after unlocking where it can.
  bool wakeWriter(AuditSync sync);
  std::vector<Pending> queue_;
  std::chrono::steady_clock::time_point queuedAt_;  // when queue_ stopped being empty
  std::atomic<uint64_t> wanted_{0};  // records up to here are waited for (written under mutex_)
  uint64_t queuedSinceCheckpoint_ = 0;
  uint64_t builtSeq_ = 0;                  // records built (and in recent_)
  mutable std::condition_variable built_;  // records queued or built since the last checkpoint
  // The last lines built, for tail(): a ring whose strings keep their capacity (no
  // allocation per line).
  class RecentLines {
   public:
    explicit RecentLines(size_t capacity) : lines_(capacity) {}
    void push(std::string_view line);
    bool empty() const { return size_ == 0; }
    const std::string& back() const;
    std::vector<std::string> last(size_t n) const;  // oldest first

   private:
    std::vector<std::string> lines_;
    size_t next_ = 0, size_ = 0;
  };
  RecentLines recent_;
  uint64_t seq_ = 0;  // last seq handed out
  bool stopping_ = false;
  bool writtenSealed_ = false;  // the segment's last line is a checkpoint (writer's own)
  bool idle_ = false;           // the writer waits for records
  std::chrono::steady_clock::time_point idleUntil_;  // until when (while idle_)
  std::atomic<bool> healthy_{true};
  std::atomic<uint64_t> durable_{0};
  std::atomic<uint64_t> lastCheckpoint_{0};  // the last durable checkpoint's seq
  AuditObserver* observer_ = nullptr;        // under mutex_
  std::thread writer_;
  std::mutex rotateMutex_;  // one rotation at a time
  // A rotation whose record was not durable within rotationWait: its key is still in
  // ed25519.key.next, and it is finished before another begins (under rotateMutex_).
  uint64_t unfinishedRotation_ = 0;
  Status finishRotation();
};

// What the segment being written is padded with after its last record (FileAuditSink::
// Options::prefill): a byte no record ends with. Readers stop at a segment's trailing run of
// it.
inline constexpr char kAuditPad = ' ';

// How many bytes of `data`, a segment's text, are records: without the trailing blanks.
size_t auditContentSize(std::string_view data);
// The same for the segment file at `path` of `size` bytes, reading back from its end.
uint64_t auditContentSize(const std::string& path, uint64_t size);

// Reads one segment's lines in order, a chunk at a time (memory: one chunk and the longest
// line), up to the end of its content (its trailing blanks are not read).
class AuditSegmentReader {
 public:
  explicit AuditSegmentReader(std::string path);
  ~AuditSegmentReader();
  AuditSegmentReader(const AuditSegmentReader&) = delete;
  AuditSegmentReader& operator=(const AuditSegmentReader&) = delete;
  // False: the file could not be opened or read (error() says why).
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  // The next line, without its newline. At the end of the content, a last line without
  // its newline (a torn write, or one being written) is returned when `partial`, else kept
  // for follow(). False at the end or on an error.
  bool next(std::string& line, bool partial = true);
  // For a segment still being written: what was appended since it was opened (or since
  // the last follow()) is read next.
  void follow();

 private:
  bool fill();
  std::string path_, error_;
  int fd_ = -1;
  uint64_t offset_ = 0, end_ = 0;  // the next byte to read; the content's end
  std::vector<char> buf_;
  size_t pos_ = 0, len_ = 0;  // unread bytes of buf_
  std::string pending_;       // a line begun in an earlier chunk
};

// The segment files of a log directory (full paths), in order.
std::vector<std::string> auditSegments(const std::string& dir);

// Reads every segment of a log directory in order, as lines. Error: unreadable directory.
Result<std::vector<std::string>> readAuditLog(const std::string& dir,
                                              std::vector<std::string>* segmentOfLine = nullptr);

// The lines of one segment file (its trailing blanks are not a line). Error: unreadable.
Result<std::vector<std::string>> readAuditSegment(const std::string& path);

// Calls fn(line, segment file name, line number within the segment) for every line of a log
// directory in order, read in chunks (memory: one chunk and the longest line), until fn
// returns false (the line may be moved from). Error: an unreadable segment.
// A last line without its newline is a line too (a torn write), unless `unfinished` is
// kSkipWhenLive and a sidecar writes the log now: then it is the record being written.
using AuditLineFn = std::function<bool(std::string& line, const std::string& segment, size_t n)>;
enum class UnfinishedLine { kRead, kSkipWhenLive };
Status forEachAuditLine(const std::string& dir, const AuditLineFn& fn,
                        UnfinishedLine unfinished = UnfinishedLine::kRead);
// Whether a process holds the log's LOCK now (a sidecar writing it), seen in /proc/locks
// without taking the lock (which could make a sidecar starting then refuse the log).
bool auditLogIsLive(const std::string& dir);

// The seq of a record line (0: not a record).
uint64_t auditRecordSeq(std::string_view line);
// The log id its first record names ("" without records).
std::string auditRecordsLogId(const std::string& dir);

// The seq of a segment's first record, read without reading the rest (0: empty or
// unreadable): with it a reader finds the segment holding a seq, not the whole log.
uint64_t auditSegmentFirstSeq(const std::string& path);

}  // namespace tollgate
