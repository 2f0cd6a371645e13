// FileAuditSink::appendEvent: an event record is chained in order with the calls and still
// verifies when a caller passes the chain's own or repeated keys (they are left out). And the
// group commit: a record a call waits for is synced at once, a batched one waits for it.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "audit/file_sink.h"

namespace tollgate {
namespace {

TEST(FileSinkEventTest, EventsAreChainedAndVerify) {
  auto dir = std::filesystem::temp_directory_path() /
             ("tollgate-sink-event-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
    AuditRecord call;
    call.agent = "a";
    call.decision = "allow";
    EXPECT_EQ(sink.value()->append(call), 1u);
    EXPECT_EQ(sink.value()->appendEvent(
                  "reload", {{"digest", "d"}, {"seq", "99"}, {"kind", "call"}, {"digest", "e"}}),
              2u);
  }
  auto lines = readAuditLog(dir.string());
  ASSERT_TRUE(lines);
  ASSERT_EQ(lines.value().size(), 3u);  // call, reload, the checkpoint at close
  auto r = nlohmann::json::parse(lines.value()[1]);
  EXPECT_EQ(r["kind"], "reload");
  EXPECT_EQ(r["seq"], 2);
  EXPECT_EQ(r["digest"], "d");
  std::ifstream pub(dir / "keys" / "ed25519.pub");
  std::string hex;
  pub >> hex;
  auto key = Ed25519Key::fromRawPublic(fromHexBytes(hex));
  ASSERT_TRUE(key);
  auto v = verifyChain(lines.value(), key.value());
  EXPECT_TRUE(v.ok) << v.reason;
  std::filesystem::remove_all(dir);
}

bool durableWithin(const AuditSink& sink, uint64_t seq, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (sink.durableSeq() < seq && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return sink.durableSeq() >= seq;
}

TEST(FileSinkSyncTest, BatchedRecordsWaitForARecordACallWaitsFor) {
  auto dir =
      std::filesystem::temp_directory_path() / ("tollgate-sink-sync-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    FileAuditSink::Options options(dir.string());
    options.lazySync = std::chrono::hours(1);  // a batched record alone is never synced
    auto opened = FileAuditSink::open(options);
    ASSERT_TRUE(opened) << opened.error().message;
    auto& sink = *opened.value();
    AuditRecord halted;  // a halt: answered without waiting for its record
    halted.decision = "halt";
    uint64_t first = sink.append(halted);
    uint64_t outcome = sink.appendEvent("outcome", {{"call_seq", "0"}}, AuditSync::kBatched);
    EXPECT_FALSE(durableWithin(sink, first, std::chrono::milliseconds(100)));
    // An allowed call's record goes at once, and the batched ones before it with it.
    AuditRecord allowed;
    allowed.decision = "allow";
    allowed.sync = AuditSync::kNow;
    uint64_t awaited = sink.append(allowed);
    EXPECT_TRUE(durableWithin(sink, awaited, std::chrono::seconds(10)));
    EXPECT_GT(awaited, outcome);
    // A batched record someone asks for (Worker::awaitDurable) goes at once too; so does an
    // event, which is kNow unless its caller says otherwise.
    uint64_t later = sink.append(halted);
    EXPECT_FALSE(durableWithin(sink, later, std::chrono::milliseconds(50)));
    sink.requestDurable(later);
    EXPECT_TRUE(durableWithin(sink, later, std::chrono::seconds(10)));
    uint64_t reload = sink.appendEvent("reload", {{"digest", "d"}});
    EXPECT_TRUE(durableWithin(sink, reload, std::chrono::seconds(10)));
  }
  // Nothing was lost at close: every record, then the closing checkpoint.
  auto lines = readAuditLog(dir.string());
  ASSERT_TRUE(lines);
  EXPECT_EQ(lines.value().size(), 6u);
  std::filesystem::remove_all(dir);
}

TEST(FileSinkSyncTest, ABatchedRecordGoesWithinLazySyncAfterABatchAndWhenIdle) {
  auto dir =
      std::filesystem::temp_directory_path() / ("tollgate-sink-lazy-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    FileAuditSink::Options options(dir.string());
    options.lazySync = std::chrono::milliseconds(400);
    auto opened = FileAuditSink::open(options);
    ASSERT_TRUE(opened) << opened.error().message;
    auto& sink = *opened.value();
    AuditRecord allowed;
    allowed.sync = AuditSync::kNow;
    ASSERT_TRUE(durableWithin(sink, sink.append(allowed), std::chrono::seconds(10)));
    // Right after a batch the writer naps lazySync and is not woken for a batched record:
    // the nap ends in time for it, and not before it is due.
    AuditRecord outcome;
    uint64_t napped = sink.append(outcome);
    EXPECT_FALSE(durableWithin(sink, napped, std::chrono::milliseconds(100)));
    EXPECT_TRUE(durableWithin(sink, napped, std::chrono::seconds(10)));
    // Long after any batch the writer sleeps until a checkpoint is due: the first batched
    // record wakes it to keep the record's deadline.
    std::this_thread::sleep_for(std::chrono::milliseconds(900));
    uint64_t idle = sink.append(outcome);
    EXPECT_FALSE(durableWithin(sink, idle, std::chrono::milliseconds(100)));
    EXPECT_TRUE(durableWithin(sink, idle, std::chrono::seconds(2)));
  }
  std::filesystem::remove_all(dir);
}

TEST(MemorySinkEventTest, EventsShareTheSequence) {
  MemoryAuditSink sink;
  EXPECT_EQ(sink.append(AuditRecord{}), 1u);
  EXPECT_EQ(sink.appendEvent("reload", {{"digest", "d"}}), 2u);
  auto tail = sink.tail(2);
  ASSERT_EQ(tail.size(), 2u);
  auto r = nlohmann::json::parse(tail[1]);
  EXPECT_EQ(r["kind"], "reload");
  EXPECT_EQ(r["digest"], "d");
  EXPECT_EQ(r["seq"], 2);
}

}  // namespace
}  // namespace tollgate
