// The verifier's state: encoded and read back exactly, written atomically, corrupt files
// refused; a log that still holds the trusted checkpoint passes, and truncation, rollback,
// forks and another log are each caught with their reason.
#include "audit/verify_state.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "audit/chain.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;

class VerifyStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    key = std::make_unique<Ed25519Key>(Ed25519Key::generate().value());
    dir = fs::temp_directory_path() / ("verify-state-test-" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  // `n` calls on `chain`, then a checkpoint.
  void extend(AuditChain& chain, std::vector<std::string>& lines, int n, const char* agent) {
    for (int i = 0; i < n; ++i)
      lines.push_back(chain.append("call", {{"agent", agent}}, 1000 + lines.size()));
    lines.push_back(chain.checkpoint(*key, 1000 + lines.size()));
  }
  TrustedCheckpoint trustLast(const std::vector<std::string>& lines) {
    return trustedCheckpointOf(lines.back()).value();
  }
  std::unique_ptr<Ed25519Key> key;
  fs::path dir;
};

TEST_F(VerifyStateTest, EncodesAndDecodesExactly) {
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  extend(chain, lines, 4, "a");
  TrustedCheckpoint t = trustLast(lines);
  EXPECT_EQ(t.logId, "log-1");
  EXPECT_EQ(t.treeSize, 4u);
  EXPECT_EQ(t.seq, 5u);
  EXPECT_EQ(t.hash, lineHash(lines.back()));
  auto back = decodeVerifyState(encodeVerifyState(t));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back.value(), t);
  EXPECT_FALSE(trustedCheckpointOf(lines.front()).ok());  // a call is not a checkpoint
}

TEST_F(VerifyStateTest, CorruptStatesAreRefused) {
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  extend(chain, lines, 2, "a");
  std::string good = encodeVerifyState(trustLast(lines));
  for (std::string bad : {std::string(""), std::string("{"), std::string("[]"),
                          good.substr(0, good.size() / 2), std::string("{\"v\":1}")}) {
    EXPECT_FALSE(decodeVerifyState(bad).ok()) << bad;
  }
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  EXPECT_FALSE(decodeVerifyState(replace("\"v\":1", "\"v\":2")).ok());
  EXPECT_FALSE(decodeVerifyState(replace("\"seq\":3", "\"seq\":4")).ok());
  EXPECT_FALSE(decodeVerifyState(replace("\"tree_size\":2", "\"tree_size\":-2")).ok());
  EXPECT_FALSE(decodeVerifyState(replace("\"root\":\"", "\"root\":\"x")).ok());
  EXPECT_FALSE(
      decodeVerifyState(replace("\"checkpoint_hash\":\"", "\"checkpoint_hash\":\"0")).ok());
  EXPECT_FALSE(decodeVerifyState(replace("{", "{\"extra\":1,")).ok());
}

TEST_F(VerifyStateTest, SavedAtomicallyAndLoaded) {
  std::string path = (dir / "state.json").string();
  auto none = loadVerifyState(path);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none.value().has_value());  // first run: no state yet
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  extend(chain, lines, 3, "a");
  ASSERT_TRUE(saveVerifyState(path, trustLast(lines)).ok());
  extend(chain, lines, 3, "a");
  ASSERT_TRUE(saveVerifyState(path, trustLast(lines)).ok());
  auto loaded = loadVerifyState(path);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message;
  ASSERT_TRUE(loaded.value().has_value());
  EXPECT_EQ(*loaded.value(), trustLast(lines));
  EXPECT_FALSE(fs::exists(path + ".tmp"));  // renamed into place
  std::ofstream(path) << "{\"v\":1,";
  auto corrupt = loadVerifyState(path);
  ASSERT_FALSE(corrupt.ok());
  EXPECT_NE(corrupt.error().message.find("corrupt"), std::string::npos);
  EXPECT_FALSE(saveVerifyState((dir / "missing" / "state.json").string(), trustLast(lines)).ok());
}

TEST_F(VerifyStateTest, TheSameLogAndItsContinuationsPass) {
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  extend(chain, lines, 5, "a");
  TrustedCheckpoint t = trustLast(lines);
  EXPECT_TRUE(checkTrustedCheckpoint(lines, t).ok);
  extend(chain, lines, 5, "a");
  lines.push_back(chain.append("call", {{"agent", "unsealed"}}, 5000));
  EXPECT_TRUE(checkTrustedCheckpoint(lines, t).ok) << checkTrustedCheckpoint(lines, t).reason;
}

TEST_F(VerifyStateTest, TruncationIsCaught) {
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  extend(chain, lines, 5, "a");
  extend(chain, lines, 5, "a");
  TrustedCheckpoint t = trustLast(lines);
  for (size_t keep : {size_t{0}, size_t{6}, lines.size() - 1}) {
    std::vector<std::string> cut(lines.begin(), lines.begin() + keep);
    auto v = checkTrustedCheckpoint(cut, t);
    EXPECT_FALSE(v.ok) << keep;
    EXPECT_NE(v.reason.find("truncated"), std::string::npos) << v.reason;
  }
}

TEST_F(VerifyStateTest, RollbackForkAndAnotherLogAreCaught) {
  AuditChain chain("log-1");
  std::vector<std::string> base;
  extend(chain, base, 3, "a");
  std::vector<std::string> trustedLog = base, fork = base;
  AuditChain a("log-1"), b("log-1");
  a.resume(base);
  b.resume(base);
  extend(a, trustedLog, 3, "a");
  extend(b, fork, 3, "b");  // the same size, other records
  TrustedCheckpoint t = trustLast(trustedLog);
  auto v = checkTrustedCheckpoint(fork, t);
  EXPECT_FALSE(v.ok);
  EXPECT_EQ(v.line, t.seq);
  EXPECT_NE(v.reason.find("fork: the checkpoint at tree size 7 has root"), std::string::npos)
      << v.reason;

  // Rolled back and rewritten longer: another record where the checkpoint was.
  std::vector<std::string> rewritten = base;
  AuditChain c("log-1");
  c.resume(base);
  extend(c, rewritten, 6, "c");
  v = checkTrustedCheckpoint(rewritten, t);
  EXPECT_FALSE(v.ok);
  EXPECT_NE(v.reason.find("is gone"), std::string::npos) << v.reason;

  // The same records, another checkpoint line (a later timestamp).
  std::vector<std::string> resealed(trustedLog.begin(), trustedLog.end() - 1);
  AuditChain d("log-1");
  d.resume(std::vector<std::string>(resealed));
  resealed.push_back(d.checkpoint(*key, 99'999));
  v = checkTrustedCheckpoint(resealed, t);
  EXPECT_FALSE(v.ok);
  EXPECT_NE(v.reason.find("is not the trusted one"), std::string::npos) << v.reason;

  AuditChain other("log-2");
  std::vector<std::string> otherLog;
  extend(other, otherLog, 10, "a");
  v = checkTrustedCheckpoint(otherLog, t);
  EXPECT_FALSE(v.ok);
  EXPECT_NE(v.reason.find("another log"), std::string::npos) << v.reason;
}

}  // namespace
}  // namespace tollgate
