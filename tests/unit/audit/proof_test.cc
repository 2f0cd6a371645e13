// Inclusion proofs: every sealed record of a log proves and the proof survives encoding;
// unsealed records have none; every change to a proof (index, size, path, record,
// checkpoint, key) is rejected.
#include "audit/proof.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "audit/chain.h"

namespace tollgate {
namespace {

class ProofTest : public ::testing::Test {
 protected:
  void SetUp() override {
    key = std::make_unique<Ed25519Key>(Ed25519Key::generate().value());
    for (int i = 1; i <= 20; ++i) {
      lines.push_back(chain.append("call", {{"agent", "agent-" + std::to_string(i)}}, 1000 + i));
      if (i % 7 == 0) lines.push_back(chain.checkpoint(*key, 1000 + i));
    }
    lines.push_back(chain.checkpoint(*key, 2000));                     // seq 23, tree size 22
    lines.push_back(chain.append("call", {{"agent", "late"}}, 3000));  // unsealed
  }
  InclusionProof prove(uint64_t seq) {
    auto p = proveInclusion(lines, seq);
    EXPECT_TRUE(p.ok()) << p.error().message;
    return p.value();
  }
  std::unique_ptr<Ed25519Key> key;
  AuditChain chain{"log-1"};
  std::vector<std::string> lines;
};

TEST_F(ProofTest, EverySealedRecordProvesAgainstTheLastCheckpoint) {
  for (uint64_t seq = 1; seq <= 22; ++seq) {
    InclusionProof p = prove(seq);
    EXPECT_EQ(p.leafIndex, seq - 1);
    EXPECT_EQ(p.treeSize, 22u);
    EXPECT_EQ(p.record, lines[seq - 1]);
    EXPECT_EQ(p.checkpoint, lines[22]);
    EXPECT_TRUE(verifyInclusionProof(p, *key).ok()) << seq;
    auto decoded = decodeProof(encodeProof(p));
    ASSERT_TRUE(decoded.ok()) << decoded.error().message;
    EXPECT_TRUE(verifyInclusionProof(decoded.value(), *key).ok()) << seq;
  }
}

TEST_F(ProofTest, TheProofHoldsHashesNotOtherRecords) {
  std::string text = encodeProof(prove(5));
  EXPECT_NE(text.find("agent-5"), std::string::npos);
  for (int other : {1, 4, 6, 20}) {
    EXPECT_EQ(text.find("\\\"agent-" + std::to_string(other) + "\\\""), std::string::npos) << other;
  }
}

TEST_F(ProofTest, UnsealedAndMissingRecordsHaveNoProof) {
  auto p = proveInclusion(lines, 23);  // the checkpoint itself: sealed by none after it
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message, "record 23 is not yet sealed by a checkpoint");
  p = proveInclusion(lines, 24);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message, "record 24 is not yet sealed by a checkpoint");
  EXPECT_FALSE(proveInclusion(lines, 25).ok());
  EXPECT_FALSE(proveInclusion(lines, 0).ok());
  std::vector<std::string> noCheckpoint(lines.begin(), lines.begin() + 3);
  EXPECT_FALSE(proveInclusion(noCheckpoint, 1).ok());
}

TEST(ProverTest, TheStreamedPathIsRfc6962sForEveryLeafOfEverySize) {
  auto key = Ed25519Key::generate().value();
  for (uint64_t n = 1; n <= 70; ++n) {
    AuditChain chain("log-1");
    std::vector<std::string> lines;
    std::vector<Hash> leaves;
    for (uint64_t i = 0; i < n; ++i) {
      lines.push_back(chain.append("call", {{"agent", "a" + std::to_string(i)}}, 1000));
      leaves.push_back(leafHash(lines.back()));
    }
    lines.push_back(chain.checkpoint(key, 2000));  // tree size n
    lines.push_back(chain.append("call", {{"agent", "late"}}, 3000));
    for (uint64_t m = 0; m < n; ++m) {
      InclusionProver prover(m + 1);
      for (const auto& l : lines) prover.scan(l);
      auto size = prover.sealed();
      ASSERT_TRUE(size.ok()) << size.error().message;
      EXPECT_EQ(size.value(), n);
      size_t read = 0;
      for (const auto& l : lines) {
        ++read;
        if (!prover.hash(l)) break;
      }
      EXPECT_EQ(read, n) << "the lines after the tree are not read";
      auto p = prover.proof();
      ASSERT_TRUE(p.ok()) << p.error().message;
      EXPECT_EQ(p.value().path, inclusionProof(leaves, m)) << "n " << n << " m " << m;
    }
  }
}

TEST(ProverTest, ALogChangedBetweenThePassesGivesNoProof) {
  auto key = Ed25519Key::generate().value();
  AuditChain chain("log-1");
  std::vector<std::string> lines;
  for (int i = 0; i < 5; ++i) lines.push_back(chain.append("call", {{"agent", "a"}}, 1000 + i));
  lines.push_back(chain.checkpoint(key, 2000));
  InclusionProver prover(3);
  for (const auto& l : lines) prover.scan(l);
  ASSERT_TRUE(prover.sealed().ok());
  for (size_t i = 0; i < lines.size(); ++i) {
    if (!prover.hash(i == 2 ? lines[3] : lines[i])) break;
  }
  auto p = prover.proof();
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message, "the log changed while the proof was built");
  InclusionProver short_(3);
  for (const auto& l : lines) short_.scan(l);
  ASSERT_TRUE(short_.sealed().ok());
  short_.hash(lines[0]);
  EXPECT_FALSE(short_.proof().ok());
}

TEST_F(ProofTest, EveryMutationIsRejected) {
  const InclusionProof good = prove(9);
  ASSERT_TRUE(verifyInclusionProof(good, *key).ok());
  auto rejected = [&](const InclusionProof& p, const std::string& reason) {
    auto st = verifyInclusionProof(p, *key);
    if (st.ok()) return ::testing::AssertionFailure() << "accepted";
    if (st.error().message.find(reason) == std::string::npos)
      return ::testing::AssertionFailure() << st.error().message;
    return ::testing::AssertionSuccess();
  };
  InclusionProof p = good;
  p.leafIndex += 1;
  EXPECT_TRUE(rejected(p, "not the leaf index"));
  p = good;
  p.leafIndex -= 1;
  EXPECT_TRUE(rejected(p, "not the leaf index"));
  p = good;
  p.treeSize += 1;
  EXPECT_TRUE(rejected(p, "is not the checkpoint's"));
  for (size_t i = 0; i < good.path.size(); ++i) {
    p = good;
    p.path[i][7] ^= 0x10;
    EXPECT_TRUE(rejected(p, "audit path")) << i;
  }
  p = good;
  p.path.pop_back();
  EXPECT_TRUE(rejected(p, "audit path"));
  p = good;
  p.path.push_back(p.path.back());
  EXPECT_TRUE(rejected(p, "audit path"));
  p = good;
  p.record = lines[9];  // another record at its own index, with this record's path
  p.leafIndex = 9;
  EXPECT_TRUE(rejected(p, "audit path"));
  p = good;
  p.record = lines[9];
  EXPECT_TRUE(rejected(p, "not the leaf index"));
  p = good;
  p.record.insert(1, " ");
  EXPECT_TRUE(rejected(p, "not canonical"));
  p = good;
  p.checkpoint = lines[7];  // an older checkpoint (tree size 7)
  EXPECT_TRUE(rejected(p, "is not the checkpoint's"));
  p = good;
  p.checkpoint[p.checkpoint.find("\"sig\":\"") + 7] ^= 0x01;
  EXPECT_TRUE(rejected(p, "signature"));
  p = good;
  p.checkpoint = lines[10];  // a call, not a checkpoint
  EXPECT_TRUE(rejected(p, "not a checkpoint record"));
  auto other = Ed25519Key::generate().value();
  auto st = verifyInclusionProof(good, other);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find("not by the given key"), std::string::npos);
}

TEST_F(ProofTest, MalformedProofsDoNotDecode) {
  std::string text = encodeProof(prove(3));
  EXPECT_TRUE(decodeProof(text).ok());
  for (std::string bad : {std::string("{"), std::string("[]"), std::string("{\"v\":1}"),
                          text.substr(0, text.size() / 2)}) {
    EXPECT_FALSE(decodeProof(bad).ok()) << bad;
  }
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = text;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  EXPECT_FALSE(decodeProof(replace("\"leaf_index\": 2", "\"leaf_index\": -2")).ok());
  EXPECT_FALSE(decodeProof(replace("\"path\": [", "\"path\": [\"zz\",")).ok());
  EXPECT_FALSE(decodeProof(replace("\"v\": 1", "\"v\": 2")).ok());
}

}  // namespace
}  // namespace tollgate
