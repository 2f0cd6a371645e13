// Key rotation (DESIGN §6 "key window"): a key_rotation record signed by the active key and
// the new one hands over checkpoint signing; the verifier derives each key's window from the
// anchor and rejects forged rotations, retired keys, missing rotations and checkpoints
// outside a pinned keyring's windows. Proofs carry the rotations from the anchor. The file
// sink rotates, deletes the old private key and finishes a rotation a crash interrupted.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "audit/chain.h"
#include "audit/file_sink.h"
#include "audit/proof.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;

class KeyRotationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    k1 = std::make_unique<Ed25519Key>(Ed25519Key::generate().value());
    k2 = std::make_unique<Ed25519Key>(Ed25519Key::generate().value());
    evil = std::make_unique<Ed25519Key>(Ed25519Key::generate().value());
  }
  void calls(int n) {
    for (int i = 0; i < n; ++i)
      lines.push_back(chain.append("call", {{"agent", "a" + std::to_string(lines.size())}},
                                   1000 + static_cast<int64_t>(lines.size())));
  }
  // seq 1-5 calls, 6 checkpoint (k1), 7 rotation k1 -> k2, 8-12 calls, 13 checkpoint (k2).
  void rotatedLog() {
    calls(5);
    lines.push_back(chain.checkpoint(*k1, 2000));
    lines.push_back(chain.keyRotation(*k1, *k2, 2001));
    calls(5);
    lines.push_back(chain.checkpoint(*k2, 3000));
  }
  // The rotation line (seq 7) with `field` set to `value`, re-serialised canonically.
  std::vector<std::string> withRotationField(const std::string& field, const std::string& value) {
    auto out = lines;
    auto r = Json::parse(out[6]);
    r[field] = value;
    out[6] = r.dump();
    return out;
  }
  // A signature by `key` over the rotation record without its two sig fields.
  std::string signRotation(const Ed25519Key& key, Json r) {
    r.erase("sig_old");
    r.erase("sig_new");
    return toHexBytes(key.sign(r.dump()));
  }
  static void expectBad(const ChainVerdict& v, uint64_t line, const std::string& reason) {
    EXPECT_FALSE(v.ok);
    EXPECT_EQ(v.line, line) << v.reason;
    EXPECT_NE(v.reason.find(reason), std::string::npos) << v.reason;
  }
  std::unique_ptr<Ed25519Key> k1, k2, evil;
  AuditChain chain{"log-1"};
  std::vector<std::string> lines;
};

TEST_F(KeyRotationTest, ARotationSignedByBothKeysHandsOverTheCheckpoints) {
  rotatedLog();
  auto r = Json::parse(lines[6]);
  EXPECT_EQ(r["kind"], "key_rotation");
  EXPECT_EQ(r["old_key_id"], k1->id());
  EXPECT_EQ(r["new_key_id"], k2->id());
  EXPECT_EQ(r["new_public"], toHexBytes(k2->rawPublic()));
  auto v = verifyChain(lines, *k1);
  ASSERT_TRUE(v.ok) << v.line << ": " << v.reason;
  EXPECT_EQ(v.checkpoints, 2u);
  ASSERT_EQ(v.keyring.size(), 2u);
  EXPECT_EQ(v.keyring[0].key.id(), k1->id());
  EXPECT_EQ(v.keyring[0].fromSeq, 1u);
  EXPECT_EQ(v.keyring[0].toSeq, 7u);
  EXPECT_EQ(v.keyring[1].key.id(), k2->id());
  EXPECT_EQ(v.keyring[1].fromSeq, 8u);
  EXPECT_EQ(v.keyring[1].toSeq, 0u);
  EXPECT_EQ(describeKeyring(v.keyring), k1->id() + " seq 1-7, " + k2->id() + " seq 8-");
  // The new key is the anchor of nothing: trusting it alone, the first checkpoint fails.
  expectBad(verifyChain(lines, *k2), 6, "unknown key");
}

TEST_F(KeyRotationTest, AForgedSigOldIsCaught) {
  rotatedLog();
  // The forger signs with a key of their own in place of the active key.
  auto forged = withRotationField("sig_old", signRotation(*evil, Json::parse(lines[6])));
  expectBad(verifyChain(forged, *k1), 7, "key rotation not signed by the active key");
  // Or hands over to their own key: sig_new is theirs, sig_old cannot be.
  AuditChain c("log-1");
  std::vector<std::string> own;
  own.push_back(c.append("call", {}, 1));
  own.push_back(c.checkpoint(*k1, 2));
  own.push_back(c.keyRotation(*evil, *k2, 3));
  expectBad(verifyChain(own, *k1), 3, "key rotation not signed by the active key");
}

TEST_F(KeyRotationTest, AForgedSigNewIsCaught) {
  rotatedLog();
  auto forged = withRotationField("sig_new", signRotation(*evil, Json::parse(lines[6])));
  expectBad(verifyChain(forged, *k1), 7, "key rotation not signed by the new key");
  // A new_public swapped for another key: its id no longer matches.
  auto swapped = withRotationField("new_public", toHexBytes(evil->rawPublic()));
  expectBad(verifyChain(swapped, *k1), 7, "new_key_id is not the id of new_public");
}

TEST_F(KeyRotationTest, TheRetiredKeyCannotSignAfterItsWindow) {
  calls(2);
  lines.push_back(chain.checkpoint(*k1, 2000));
  lines.push_back(chain.keyRotation(*k1, *k2, 2001));  // seq 4
  calls(2);
  lines.push_back(chain.checkpoint(*k1, 3000));  // seq 7, by the retired key
  expectBad(
      verifyChain(lines, *k1), 7,
      "checkpoint signed by key " + k1->id() + " outside its validity window (retired at seq 4)");
}

TEST_F(KeyRotationTest, WithoutItsRotationRecordTheNewKeysCheckpointsFail) {
  // The record cut out of a log: the gap is found at its place.
  rotatedLog();
  auto cut = lines;
  cut.erase(cut.begin() + 6);
  expectBad(verifyChain(cut, *k1), 7, "records missing");
  // A writer (or forger) that switches keys without the record.
  AuditChain c("log-1");
  std::vector<std::string> skipped;
  for (int i = 1; i <= 3; ++i) skipped.push_back(c.append("call", {}, i));
  skipped.push_back(c.checkpoint(*k1, 4));
  for (int i = 5; i <= 7; ++i) skipped.push_back(c.append("call", {}, i));
  skipped.push_back(c.checkpoint(*k2, 8));  // seq 8
  expectBad(verifyChain(skipped, *k1), 8, "checkpoint signed by an unknown key " + k2->id());
}

TEST_F(KeyRotationTest, ARotationBackToARetiredKeyIsRefused) {
  rotatedLog();
  lines.push_back(chain.keyRotation(*k2, *k1, 4000));  // seq 14
  expectBad(verifyChain(lines, *k1), 14, "which this log retired at seq 7");
}

TEST_F(KeyRotationTest, APinnedKeyringChecksEveryWindow) {
  rotatedLog();
  Keyring exact{{*k1, 1, 7}, {*k2, 8, 0}};
  auto v = verifyChain(lines, exact);
  EXPECT_TRUE(v.ok) << v.line << ": " << v.reason;
  // k1 pinned to seqs 1-5: its checkpoint at seq 6 is outside.
  Keyring shortK1{{*k1, 1, 5}, {*k2, 6, 0}};
  expectBad(verifyChain(lines, shortK1), 6, "outside its validity window (seq 1-5 in the keyring)");
  // k2 pinned from seq 20 only.
  Keyring lateK2{{*k1, 1, 7}, {*k2, 20, 0}};
  expectBad(verifyChain(lines, lateK2), 13,
            "checkpoint signed by key " + k2->id() + " outside its validity window");
  // k2 not pinned at all: the rotation to it is refused.
  Keyring onlyK1{{*k1, 1, 0}};
  expectBad(verifyChain(lines, onlyK1), 7, "which the keyring does not list");
  // The keyring file form.
  std::string text = Json::array({{{"key_id", k1->id()},
                                   {"public", toHexBytes(k1->rawPublic())},
                                   {"from_seq", 1},
                                   {"to_seq", 7}},
                                  {{"key_id", k2->id()},
                                   {"public", toHexBytes(k2->rawPublic())},
                                   {"from_seq", 8},
                                   {"to_seq", nullptr}}})
                         .dump();
  auto parsed = parseKeyring(text);
  ASSERT_TRUE(parsed) << parsed.error().message;
  ASSERT_EQ(parsed.value().size(), 2u);
  EXPECT_EQ(parsed.value()[1].toSeq, 0u);
  EXPECT_TRUE(verifyChain(lines, parsed.value()).ok);
  auto wrongId = Json::parse(text);
  wrongId[1]["key_id"] = k1->id();
  auto bad = parseKeyring(wrongId.dump());
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("key_id is not the id of its public key"), std::string::npos);
  EXPECT_FALSE(parseKeyring("[]"));
  EXPECT_FALSE(parseKeyring(R"([{"key_id":"x","public":"00","from_seq":1}])"));
}

TEST_F(KeyRotationTest, AProofAcrossARotationCarriesItAndVerifiesFromTheAnchor) {
  rotatedLog();
  auto p = proveInclusion(lines, 2);
  ASSERT_TRUE(p) << p.error().message;
  EXPECT_EQ(p.value().checkpoint, lines[12]);  // signed by k2
  ASSERT_EQ(p.value().rotations.size(), 1u);
  EXPECT_EQ(p.value().rotations[0], lines[6]);
  auto signer = verifyInclusionProof(p.value(), *k1);
  ASSERT_TRUE(signer) << signer.error().message;
  EXPECT_EQ(signer.value(), k2->id());
  auto decoded = decodeProof(encodeProof(p.value()));
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_TRUE(verifyInclusionProof(decoded.value(), *k1));
  // Without the rotation the anchor cannot vouch for k2.
  auto stripped = p.value();
  stripped.rotations.clear();
  auto st = verifyInclusionProof(stripped, *k1);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("not by the given key"), std::string::npos);
  // A forged rotation to the forger's key, with a checkpoint they signed.
  auto forged = p.value();
  auto r = Json::parse(forged.rotations[0]);
  r["sig_old"] = signRotation(*evil, r);
  forged.rotations[0] = r.dump();
  st = verifyInclusionProof(forged, *k1);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("not signed by the active key"), std::string::npos);
  // With a pinned keyring the checkpoint's seq must be inside k2's window.
  Keyring pinned{{*k1, 1, 7}, {*k2, 8, 10}};
  st = verifyInclusionProof(p.value(), *k1, &pinned);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("outside its validity window"), std::string::npos);
}

// --- the file sink --------------------------------------------------------------------------

class SinkRotationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = std::filesystem::temp_directory_path() /
          ("tollgate-key-rotation-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir);
  }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::string read(const std::string& name) {
    std::ifstream in(dir / "keys" / name);
    std::string s;
    in >> s;
    return s;
  }
  Ed25519Key publicKey(const std::string& name) {
    return Ed25519Key::fromRawPublic(fromHexBytes(read(name))).value();
  }
  std::filesystem::path dir;
};

TEST_F(SinkRotationTest, RotateKeySealsSwapsAndDeletesTheOldKey) {
  std::string oldPrivate, newId;
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
    EXPECT_EQ(read("anchor.pub"), read("ed25519.pub"));
    oldPrivate = read("ed25519.key");
    sink.value()->append(AuditRecord{});
    sink.value()->append(AuditRecord{});
    auto done = sink.value()->rotateKey();
    ASSERT_TRUE(done) << done.error().message;
    EXPECT_EQ(done.value().seq, 4u);  // 2 calls, the old key's checkpoint, the rotation
    EXPECT_EQ(done.value().oldKeyId, publicKey("anchor.pub").id());
    EXPECT_EQ(done.value().newKeyId, publicKey("ed25519.pub").id());
    EXPECT_GE(sink.value()->durableSeq(), 4u);
    newId = done.value().newKeyId;
    sink.value()->append(AuditRecord{});
  }
  EXPECT_NE(read("ed25519.key"), oldPrivate);  // the old private key is gone
  EXPECT_FALSE(std::filesystem::exists(dir / "keys" / "ed25519.key.next"));
  auto mode = std::filesystem::status(dir / "keys" / "ed25519.key").permissions();
  EXPECT_EQ(mode & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  auto lines = readAuditLog(dir.string());
  ASSERT_TRUE(lines);
  auto v = verifyChain(lines.value(), publicKey("anchor.pub"));
  ASSERT_TRUE(v.ok) << v.line << ": " << v.reason;
  ASSERT_EQ(v.keyring.size(), 2u);
  EXPECT_EQ(v.keyring[1].key.id(), newId);
  EXPECT_EQ(Json::parse(lines.value().back())["key_id"], newId);  // sealed by the new key
  // The log continues with the new key.
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
    sink.value()->append(AuditRecord{});
  }
  lines = readAuditLog(dir.string());
  EXPECT_TRUE(verifyChain(lines.value(), publicKey("anchor.pub")).ok);
}

TEST_F(SinkRotationTest, StartFinishesOrDropsAnInterruptedRotation) {
  std::string oldPrivate, newPrivate;
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
    oldPrivate = read("ed25519.key");
    sink.value()->append(AuditRecord{});
    ASSERT_TRUE(sink.value()->rotateKey());
  }
  newPrivate = read("ed25519.key");
  auto keys = dir / "keys";
  auto put = [&](const std::string& name, const std::string& hex) {
    std::ofstream(keys / name) << hex << "\n";
    std::filesystem::permissions(
        keys / name, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  };
  // Crashed after the rotation record was durable, before the old key was deleted.
  put("ed25519.key", oldPrivate);
  put("ed25519.key.next", newPrivate);
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
  }
  EXPECT_EQ(read("ed25519.key"), newPrivate);
  EXPECT_FALSE(std::filesystem::exists(keys / "ed25519.key.next"));
  // Crashed before the record was durable: the next key is not the log's and is dropped.
  put("ed25519.key.next", oldPrivate);
  {
    auto sink = FileAuditSink::open({dir.string()});
    ASSERT_TRUE(sink) << sink.error().message;
  }
  EXPECT_EQ(read("ed25519.key"), newPrivate);
  EXPECT_FALSE(std::filesystem::exists(keys / "ed25519.key.next"));
  // Only the retired key left: the log cannot continue.
  put("ed25519.key", oldPrivate);
  auto sink = FileAuditSink::open({dir.string()});
  ASSERT_FALSE(sink);
  EXPECT_NE(sink.error().message.find("the private key of its active key"), std::string::npos)
      << sink.error().message;
}

TEST_F(SinkRotationTest, ARotationThatTimedOutIsFinishedBeforeAnotherBegins) {
  // The disk is slow (one sync a second) and a rotation gives up waiting for its record;
  // a retry must not write a new key over the one the log now names (in .next), or the
  // next start cannot sign for the log.
  FileAuditSink::Options options(dir.string());
  options.syncInterval = std::chrono::milliseconds(1000);
  options.rotationWait = std::chrono::milliseconds(50);
  std::string active;
  {
    auto sink = FileAuditSink::open(options);
    ASSERT_TRUE(sink) << sink.error().message;
    uint64_t seq = sink.value()->append(AuditRecord{});
    sink.value()->requestDurable(seq);
    for (int i = 0; i < 500 && sink.value()->durableSeq() < seq; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_GE(sink.value()->durableSeq(), seq);
    // The next sync is due a second after that one: the rotation times out.
    auto first = sink.value()->rotateKey();
    ASSERT_FALSE(first);
    EXPECT_NE(first.error().message.find("did not become durable"), std::string::npos);
    active = Ed25519Key::fromRawPrivate(fromHexBytes(read("ed25519.key.next"))).value().id();
    auto again = sink.value()->rotateKey();
    ASSERT_FALSE(again);
    EXPECT_NE(again.error().message.find("not durable yet"), std::string::npos)
        << again.error().message;
  }
  auto lines = readAuditLog(dir.string());
  ASSERT_TRUE(lines);
  auto v = verifyChain(lines.value(), publicKey("anchor.pub"));
  ASSERT_TRUE(v.ok) << v.line << ": " << v.reason;
  EXPECT_EQ(v.keyring.back().key.id(), active);
  // The next start finds the log's active key (finishing the rotation) and signs with it.
  auto sink = FileAuditSink::open(options);
  ASSERT_TRUE(sink) << sink.error().message;
  EXPECT_EQ(publicKey("ed25519.pub").id(), active);
}

TEST(MemorySinkRotationTest, AMemorySinkHasNoKeysToRotate) {
  MemoryAuditSink sink;
  auto done = sink.rotateKey();
  ASSERT_FALSE(done);
  EXPECT_EQ(done.error().code, -ENOTSUP);
}

}  // namespace
}  // namespace tollgate
