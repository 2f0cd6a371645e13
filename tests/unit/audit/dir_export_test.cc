// DirectoryExport: sealed segments copied byte for byte and every checkpoint once, in order;
// a restart exports only what is new (after the last checkpoint there), and an append to
// checkpoints.jsonl cut short by a crash is cut off before the next one.
#include "audit/dir_export.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "audit/file_sink.h"
#include "common/files.h"
#include "tests/unit/audit/log_writer.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> checkpointsOf(const std::vector<std::string>& lines) {
  std::vector<std::string> out;
  for (const auto& l : lines)
    if (isCheckpointLine(l)) out.push_back(l);
  return out;
}

std::vector<std::string> exportedCheckpoints(const fs::path& to) {
  auto data = readFile((to / "checkpoints.jsonl").string());
  std::vector<std::string> out;
  if (!data) return out;
  std::string_view d(data.value());
  while (!d.empty()) {
    size_t nl = d.find('\n');
    out.emplace_back(d.substr(0, nl));
    d.remove_prefix(nl == std::string_view::npos ? d.size() : nl + 1);
  }
  return out;
}

void exportOnce(const fs::path& log, const fs::path& to) {
  auto e = DirectoryExport::open(log.string(), to.string());
  ASSERT_TRUE(e) << e.error().message;
  e.value()->start();
  e.value()->flush();
}

// Nothing is read or written before start(): a second sidecar refused the log (its lock
// held by the first) never touches the export.
TEST(DirectoryExportTest, NothingHappensBeforeStart) {
  fs::path base = fs::temp_directory_path() / ("tollgate-export0-" + std::to_string(::getpid()));
  fs::remove_all(base);
  FileAuditSink::Options options((base / "log").string());
  options.segmentBytes = 2048;
  options.checkpointEvery = 8;
  writeAwaited(options, 0, 40);
  {
    auto e = DirectoryExport::open(options.dir, (base / "out").string());
    ASSERT_TRUE(e) << e.error().message;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_FALSE(fs::exists(base / "out" / "checkpoints.jsonl"));
    EXPECT_TRUE(auditSegments((base / "out").string()).empty());
  }
  {
    auto first = FileAuditSink::open(options);  // the log's writer
    ASSERT_TRUE(first) << first.error().message;
    options.replicas = {DirectoryExport::open(options.dir, (base / "out").string()).value()};
    auto second = FileAuditSink::open(options);
    ASSERT_FALSE(second);
    EXPECT_FALSE(fs::exists(base / "out" / "checkpoints.jsonl"));
  }
  fs::remove_all(base);
}

TEST(DirectoryExportTest, ARestartExportsWhatIsNewAndCutsATornAppend) {
  fs::path base = fs::temp_directory_path() / ("tollgate-export-" + std::to_string(::getpid()));
  fs::remove_all(base);
  FileAuditSink::Options options((base / "log").string());
  options.segmentBytes = 2048;
  options.checkpointEvery = 8;
  writeAwaited(options, 0, 40);
  exportOnce(base / "log", base / "out");
  auto segs = auditSegments(options.dir);
  ASSERT_GT(segs.size(), 3u);
  for (size_t i = 0; i + 1 < segs.size(); ++i) {  // the newest is not sealed for export yet
    auto copy = readFile((base / "out" / fs::path(segs[i]).filename()).string());
    ASSERT_TRUE(copy) << segs[i];
    EXPECT_EQ(copy.value(), readFile(segs[i]).value()) << segs[i];
  }
  auto all = checkpointsOf(readAuditLog(options.dir).value());
  EXPECT_EQ(exportedCheckpoints(base / "out"), all);

  // More records, and a crash in mid append to checkpoints.jsonl.
  writeAwaited(options, 40, 40);
  {
    int fd = ::open((base / "out" / "checkpoints.jsonl").c_str(), O_WRONLY | O_APPEND);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(writeAll(fd, "{\"kind\":\"checkp"));
    ::close(fd);
  }
  exportOnce(base / "log", base / "out");
  all = checkpointsOf(readAuditLog(options.dir).value());
  EXPECT_EQ(exportedCheckpoints(base / "out"), all);  // each once, in order, nothing torn
  segs = auditSegments(options.dir);
  for (size_t i = 0; i + 1 < segs.size(); ++i)
    EXPECT_TRUE(fs::exists(base / "out" / fs::path(segs[i]).filename())) << segs[i];

  // A copy of another size is somebody else's: left alone.
  std::string name = fs::path(segs[0]).filename().string();
  ASSERT_TRUE(writeFileAtomic((base / "out" / name).string(), "not the segment\n", 0600));
  exportOnce(base / "log", base / "out");
  EXPECT_EQ(readFile((base / "out" / name).string()).value(), "not the segment\n");
  fs::remove_all(base);
}

}  // namespace
}  // namespace tollgate
