// FileAuditSink::appendEvent: an event record is chained in order with the calls and still
// verifies when a caller passes the chain's own or repeated keys (they are left out).
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

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
