#include "audit/dir_export.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "audit/file_sink.h"
#include "common/files.h"
#include "common/log.h"
#include "common/thread_name.h"

namespace tollgate {
namespace fs = std::filesystem;

DirectoryExport::DirectoryExport(std::string logDir, std::string to)
    : logDir_(std::move(logDir)), to_(std::move(to)) {}

Result<std::shared_ptr<DirectoryExport>> DirectoryExport::open(std::string logDir, std::string to) {
  std::error_code ec;
  fs::create_directories(fs::path(to) / "keys", ec);
  if (ec) return Error{-1, "audit.export.dir " + to + ": " + ec.message()};
  if (fs::equivalent(logDir, to, ec))
    return Error{-1, "audit.export.dir " + to + " is the log's own directory"};
  return std::shared_ptr<DirectoryExport>(new DirectoryExport(std::move(logDir), std::move(to)));
}

void DirectoryExport::start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] {
    nameThisThread("tg-export");
    run();
  });
}

DirectoryExport::~DirectoryExport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void DirectoryExport::onDurable(uint64_t /*firstSeq*/, const std::vector<std::string>& lines) {
  std::vector<std::string> checkpoints;
  for (const auto& l : lines)
    if (isCheckpointLine(l)) checkpoints.push_back(l);
  if (checkpoints.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  tasks_.emplace_back(std::move(checkpoints));
  wake_.notify_one();
}

void DirectoryExport::onSealed(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  tasks_.emplace_back(Seal{path});
  wake_.notify_one();
}

void DirectoryExport::flush() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [this] { return tasks_.empty() && !busy_; });
}

void DirectoryExport::run() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    busy_ = true;
  }
  catchUp();
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      busy_ = false;
      idle_.notify_all();
      wake_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and everything done
      task = std::move(tasks_.front());
      tasks_.pop_front();
      busy_ = true;
    }
    Status st = std::holds_alternative<Seal>(task)
                    ? copySegment(std::get<Seal>(task).path)
                    : appendCheckpoints(std::get<std::vector<std::string>>(task));
    if (!st) {
      Log::Line(LogLevel::kError, "audit export failed")
          .add("to", to_)
          .add("error", st.error().message)
          .emit();
    }
  }
}

void DirectoryExport::catchUp() {
  auto segs = auditSegments(logDir_);
  // Every segment but the newest is sealed; the newest is reported by the writer when it is.
  for (size_t i = 0; i + 1 < segs.size(); ++i) {
    if (auto st = copySegment(segs[i]); !st) {
      Log::Line(LogLevel::kError, "audit export failed")
          .add("to", to_)
          .add("error", st.error().message)
          .emit();
    }
  }
  // The checkpoints after the last one exported, read from the segments that can hold
  // them: a restart reads what is new, not the whole log.
  uint64_t last = lastCheckpoint();
  std::vector<std::string> checkpoints;
  for (size_t i = 0; i < segs.size(); ++i) {
    uint64_t next = i + 1 < segs.size() ? auditSegmentFirstSeq(segs[i + 1]) : 0;
    if (next != 0 && next <= last + 1) continue;  // every record of it is before `last`
    AuditSegmentReader reader(segs[i]);
    std::string line;
    while (reader.next(line, false))  // whole lines only
      if (isCheckpointLine(line) && auditRecordSeq(line) > last) checkpoints.push_back(line);
  }
  if (auto st = appendCheckpoints(checkpoints); !st) {
    Log::Line(LogLevel::kError, "audit export failed")
        .add("to", to_)
        .add("error", st.error().message)
        .emit();
  }
}

Status DirectoryExport::copySegment(const std::string& path) {
  fs::path from(path), to = fs::path(to_) / fs::path(path).filename();
  std::error_code ec;
  // The log's id and public keys go along, so that the copy verifies on its own.
  for (const auto& name : {std::string("LOG_ID")}) {
    if (fs::exists(fs::path(logDir_) / name, ec))
      fs::copy_file(fs::path(logDir_) / name, fs::path(to_) / name,
                    fs::copy_options::overwrite_existing, ec);
  }
  for (const auto& e : fs::directory_iterator(fs::path(logDir_) / "keys", ec)) {
    if (e.path().extension() == ".pub")
      fs::copy_file(e.path(), fs::path(to_) / "keys" / e.path().filename(),
                    fs::copy_options::overwrite_existing, ec);
  }
  uint64_t size = fs::file_size(from, ec);
  if (ec) return Error{-1, "cannot read " + from.string() + ": " + ec.message()};
  if (fs::exists(to, ec)) {
    // A sealed segment never changes: a copy of another size is somebody else's.
    if (fs::file_size(to, ec) == size) return Status::success();
    return Error{
        -1, to.string() + " exists and differs from the sealed " + from.string() + ": left alone"};
  }
  return copyFileAtomic(from.string(), to.string(), 0600);
}

uint64_t DirectoryExport::lastCheckpoint() {
  if (lastKnown_) return last_;
  // The seq of the last whole line of checkpoints.jsonl, read from its end.
  fs::path file = fs::path(to_) / "checkpoints.jsonl";
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    struct stat st;
    std::string tail(64 << 10, '\0');
    if (::fstat(fd, &st) == 0) {
      off_t from = std::max<off_t>(0, st.st_size - static_cast<off_t>(tail.size()));
      ssize_t got = ::pread(fd, tail.data(), tail.size(), from);
      tail.resize(got > 0 ? static_cast<size_t>(got) : 0);
      size_t end = tail.rfind('\n');  // a line without its newline is not whole
      if (end != std::string::npos) {
        size_t start = end == 0 ? std::string::npos : tail.rfind('\n', end - 1);
        start = start == std::string::npos ? 0 : start + 1;
        last_ = auditRecordSeq(std::string_view(tail).substr(start, end - start));
      }
      // An append cut short (a crash) is cut off, so that the next line starts a line.
      off_t whole = end == std::string::npos ? from : from + static_cast<off_t>(end) + 1;
      if (whole < st.st_size && (end != std::string::npos || from == 0))
        (void)::truncate(file.c_str(), whole);
    }
    ::close(fd);
  }
  lastKnown_ = true;
  return last_;
}

Status DirectoryExport::appendCheckpoints(const std::vector<std::string>& lines) {
  // Only checkpoints after the last one already there: catch-up and the writer overlap.
  uint64_t last = lastCheckpoint();
  std::string out;
  for (const auto& l : lines) {
    if (auditRecordSeq(l) > last) {
      out += l;
      out += '\n';
      last = auditRecordSeq(l);
    }
  }
  if (out.empty()) return Status::success();
  fs::path file = fs::path(to_) / "checkpoints.jsonl";
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return Error{-errno, "open " + file.string() + ": " + std::strerror(errno)};
  bool ok = writeAll(fd, out) && ::fdatasync(fd) == 0;
  int saved = errno;
  ::close(fd);
  if (!ok) return Error{-saved, "append " + file.string() + ": " + std::strerror(saved)};
  last_ = last;
  return Status::success();
}

}  // namespace tollgate
