// The record chain: a clean log verifies; every tampering names the first bad record.
#include "audit/chain.h"

#include "audit/canonical_json.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace tollgate {
namespace {

using Json = nlohmann::json;

class ChainTest : public ::testing::Test {
 protected:
  void SetUp() override { key = std::make_unique<Ed25519Key>(Ed25519Key::generate().value()); }
  // n call records with a checkpoint after every `every`, and one at the end.
  std::vector<std::string> log(int n, int every, AuditChain* chain = nullptr) {
    AuditChain own("log-1");
    AuditChain& c = chain ? *chain : own;
    std::vector<std::string> lines;
    for (int i = 1; i <= n; ++i) {
      lines.push_back(c.append("call",
                               {{"agent", "agent-" + std::to_string(i % 3)},
                                {"decision", i % 4 ? "allow" : "halt"},
                                {"rule", "r" + std::to_string(i)}},
                               1'000'000 + i));
      if (i % every == 0) lines.push_back(c.checkpoint(*key, 1'000'000 + i));
    }
    if (n % every) lines.push_back(c.checkpoint(*key, 1'000'000 + n));
    return lines;
  }
  std::unique_ptr<Ed25519Key> key;
};

TEST_F(ChainTest, ACleanLogVerifies) {
  auto lines = log(50, 10);
  auto v = verifyChain(lines, *key);
  EXPECT_TRUE(v.ok) << v.line << ": " << v.reason;
  EXPECT_EQ(v.records, 55u);
  EXPECT_EQ(v.checkpoints, 5u);
  EXPECT_EQ(v.unsealed, 0u);
  auto first = Json::parse(lines[0]);
  EXPECT_EQ(first["seq"], 1);
  EXPECT_EQ(first["prev"], std::string(64, '0'));
  EXPECT_EQ(first["agent"], "agent-1");
  EXPECT_TRUE(isCanonicalJson(lines[0]));
}

// The direct writer renders a record's fields apart from the chain (on the appending
// thread) and fills in prev, seq and ts_ns later: keys sorting right before and after those
// gaps, and the first and last keys, give the general writer's line, which links and hashes
// the same way.
TEST_F(ChainTest, TheTemplateFillsTheChainsValuesInKeyOrder) {
  std::vector<std::pair<std::string_view, std::string_view>> fields = {
      {"a", "1"},     {"pre", "2"}, {"prev0", "3"}, {"s", "4"},      {"seq_", "5"}, {"ts", "6"},
      {"ts_nt", "7"}, {"u", "8"},   {"w", "9"},     {"kinda", "10"}, {"log", "11"}, {"", "12"}};
  AuditChain a("log-1"), b("log-1");
  Json general = Json::object();
  for (const auto& [k, v] : fields) general[std::string(k)] = std::string(v);
  auto t = renderAuditTemplate("log-1", "call", fields);
  for (int64_t ts : {7, 5, 9}) {  // the clock stepping back is raised, as in append()
    std::string out = "x";
    size_t n = a.appendTemplate(t, ts, out);
    ASSERT_EQ(n + 1, out.size());
    std::string line = out.substr(1);
    EXPECT_TRUE(isCanonicalJson(line)) << line;
    EXPECT_EQ(line, b.append("call", general, ts));
  }
}

TEST_F(ChainTest, TheDirectWriterIsCanonicalAndEqualsTheGeneralOne) {
  const std::string tricky[] = {"plain",
                                "quote\" back\\ slash/",
                                std::string("ctl\x01\x1f\x7f\b\f\n\r\t"),
                                "caf\xc3\xa9 \xf0\x9f\x98\x80",
                                "bad\xff\xc3(utf8",
                                ""};
  for (const auto& t : tricky) {
    AuditChain a("log-1"), b("log-1");
    auto direct = a.appendStrings("call", {{"agent", t}, {"zeta", "z"}, {"path", "/p"}}, 7);
    ASSERT_TRUE(isCanonicalJson(direct)) << direct;
    // The general writer takes valid UTF-8 only: given what the direct one repaired.
    auto parsed = Json::parse(direct);
    auto general = b.append("call", {{"agent", parsed["agent"]}, {"zeta", "z"}, {"path", "/p"}}, 7);
    EXPECT_EQ(direct, general);
    if (t.find('\xff') == std::string::npos) {
      EXPECT_EQ(parsed["agent"], t);
    } else {
      EXPECT_EQ(parsed["agent"], "bad\xef\xbf\xbd\xef\xbf\xbd(utf8");  // each bad byte replaced
    }
  }
}

TEST_F(ChainTest, FieldsCannotOverrideTheChainsOwnKeys) {
  AuditChain c("log-1");
  auto line = c.append("call", {{"seq", 99}, {"prev", "x"}, {"kind", "forged"}}, 5);
  auto r = Json::parse(line);
  EXPECT_EQ(r["seq"], 1);
  EXPECT_EQ(r["kind"], "call");
  EXPECT_EQ(r["prev"], std::string(64, '0'));
}

TEST_F(ChainTest, AClockSteppingBackIsRaisedToTheLastTimestamp) {
  AuditChain c("log-1");
  std::vector<std::string> lines{c.append("call", {}, 100), c.append("call", {}, 50)};
  EXPECT_EQ(Json::parse(lines[1])["ts_ns"], 100);
  lines.push_back(c.checkpoint(*key, 10));
  EXPECT_TRUE(verifyChain(lines, *key).ok);
}

struct Expect {
  uint64_t line;
  const char* reason;
};

void expectBad(const ChainVerdict& v, Expect e) {
  EXPECT_FALSE(v.ok);
  EXPECT_EQ(v.line, e.line) << v.reason;
  EXPECT_NE(v.reason.find(e.reason), std::string::npos) << v.reason;
}

TEST_F(ChainTest, DeletionInsertionAndReorderingAreCaught) {
  auto lines = log(30, 10);
  auto deleted = lines;
  deleted.erase(deleted.begin() + 5);
  expectBad(verifyChain(deleted, *key), {6, "records missing"});
  auto inserted = lines;
  inserted.insert(inserted.begin() + 5, lines[2]);
  expectBad(verifyChain(inserted, *key), {6, "repeated or reordered"});
  auto swapped = lines;
  std::swap(swapped[3], swapped[4]);
  expectBad(verifyChain(swapped, *key), {4, "sequence broken"});
}

TEST_F(ChainTest, AnOldRecordRewrittenWithTheChainRecomputedFailsAtTheCheckpoint) {
  // The forger turns record 4's halt into an allow and recomputes every later prev, but
  // cannot sign.
  auto lines = log(12, 6);
  std::vector<std::string> forged;
  std::string prev = std::string(64, '0');
  for (size_t i = 0; i < lines.size(); ++i) {
    auto r = Json::parse(lines[i]);
    if (i == 3) {
      ASSERT_EQ(r["decision"], "halt");
      r["decision"] = "allow";
    }
    r["prev"] = prev;
    forged.push_back(r.dump());
    prev = lineHash(forged.back());
  }
  expectBad(verifyChain(forged, *key), {7, "root does not match"});
  // A plain edit without recomputing breaks the next link.
  auto edited = lines;
  auto r = Json::parse(edited[3]);
  r["decision"] = "allow";
  edited[3] = r.dump();
  expectBad(verifyChain(edited, *key), {5, "broken link"});
}

TEST_F(ChainTest, AForeignKeyAReplayedCheckpointAndAForkAreCaught) {
  auto lines = log(20, 10);
  auto other = Ed25519Key::generate().value();
  AuditChain c("log-1");
  std::vector<std::string> foreign;
  for (int i = 1; i <= 3; ++i) foreign.push_back(c.append("call", {}, i));
  foreign.push_back(c.checkpoint(other, 4));
  expectBad(verifyChain(foreign, *key), {4, "unknown key"});
  // Signed by a known id but with another key's signature.
  auto r = Json::parse(foreign[3]);
  r["key_id"] = key->id();
  foreign[3] = r.dump();
  auto fv = verifyChain(foreign, *key);
  expectBad(fv, {4, "signature does not verify"});
  // An old checkpoint replayed later, its prev and seq fixed up.
  auto replayed = lines;
  auto old = Json::parse(lines[10]);  // the first checkpoint
  old["seq"] = 22;
  old["ts_ns"] = 2'000'000;
  old["prev"] = lineHash(replayed[20]);
  replayed.push_back(old.dump());
  replayed.erase(replayed.begin() + 21);  // drop the real final checkpoint
  replayed.push_back(old.dump());
  replayed.erase(replayed.end() - 2);
  expectBad(verifyChain(replayed, *key), {22, "tree_size"});
  // A fork: two logs sharing a prefix; a checkpoint of one cannot follow the other.
  AuditChain a("log-1"), b("log-1");
  std::vector<std::string> la, lb;
  for (int i = 1; i <= 4; ++i) {
    la.push_back(a.append("call", {{"n", i}}, i));
    lb.push_back(b.append("call", {{"n", i == 4 ? 40 : i}}, i));
  }
  la.push_back(a.checkpoint(*key, 5));
  auto fork = lb;
  fork.push_back(la.back());
  expectBad(verifyChain(fork, *key), {5, "broken link"});
}

TEST_F(ChainTest, NonCanonicalAndForeignRecordsAreCaught) {
  auto lines = log(6, 3);
  auto spaced = lines;
  spaced[1].insert(1, " ");
  expectBad(verifyChain(spaced, *key), {2, "not canonical"});
  auto dup = lines;
  dup[1].insert(1, "\"agent\":\"x\",");
  expectBad(verifyChain(dup, *key), {2, "duplicate key"});
  auto otherLog = lines;
  auto r = Json::parse(otherLog[1]);
  r["log_id"] = "log-2";
  otherLog[1] = r.dump();
  expectBad(verifyChain(otherLog, *key), {2, "another log"});
  auto backwards = lines;
  r = Json::parse(backwards[1]);
  r["ts_ns"] = 5;
  backwards[1] = r.dump();
  expectBad(verifyChain(backwards, *key), {2, "time goes backwards"});
  // A seal turned into something else is no longer a record the log can hold.
  auto unsealed = lines;
  r = Json::parse(unsealed.back());
  r["kind"] = "note";
  unsealed.back() = r.dump();
  expectBad(verifyChain(unsealed, *key), {8, "unknown record kind"});
}

// Every single-bit flip anywhere in a small sealed log is detected.
TEST_F(ChainTest, EveryBitFlipOfASmallLogIsDetected) {
  auto lines = log(6, 3);
  size_t flips = 0;
  for (size_t l = 0; l < lines.size(); ++l) {
    for (size_t byte = 0; byte < lines[l].size(); ++byte) {
      for (int bit = 0; bit < 8; ++bit) {
        auto bad = lines;
        bad[l][byte] = static_cast<char>(bad[l][byte] ^ (1 << bit));
        auto v = verifyChain(bad, *key);
        ASSERT_FALSE(v.ok) << "line " << l + 1 << " byte " << byte << " bit " << bit << ": "
                           << lines[l] << " -> " << bad[l];
        ASSERT_LE(v.line, lines.size());
        ++flips;
      }
    }
  }
  EXPECT_GT(flips, 10000u);
}

}  // namespace
}  // namespace tollgate
