// RFC 6962 Merkle trees: known answers, the accumulator against the recursive definition,
// and inclusion proofs that verify for every leaf and fail for every mutation.
#include "audit/merkle.h"

#include <gtest/gtest.h>

namespace tollgate {
namespace {

std::string unhex(std::string_view hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out += static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16));
  return out;
}

std::vector<Hash> leaves(size_t n) {
  std::vector<Hash> out;
  for (size_t i = 0; i < n; ++i) out.push_back(leafHash("record " + std::to_string(i)));
  return out;
}

// The test vectors of Certificate Transparency's reference implementation (also computed
// here by an independent Python implementation of RFC 6962 §2.1).
TEST(Merkle, KnownRootsOfTheCertificateTransparencyVectors) {
  const char* inputs[] = {"",
                          "00",
                          "10",
                          "2021",
                          "3031",
                          "40414243",
                          "5051525354555657",
                          "606162636465666768696a6b6c6d6e6f"};
  const char* roots[] = {"6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
                         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
                         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
                         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
                         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
                         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"};
  std::vector<Hash> hashes;
  MerkleAccumulator acc;
  for (size_t i = 0; i < 8; ++i) {
    hashes.push_back(leafHash(unhex(inputs[i])));
    acc.append(hashes.back());
    EXPECT_EQ(toHex(merkleRoot(hashes)), roots[i]) << i + 1 << " leaves";
    EXPECT_EQ(toHex(acc.root()), roots[i]) << i + 1 << " leaves";
  }
  EXPECT_EQ(toHex(emptyRoot()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(toHex(MerkleAccumulator().root()), toHex(emptyRoot()));
}

TEST(Merkle, LeafAndNodeHashesAreDomainSeparated) {
  // SHA-256(0x00) and SHA-256(0x01 || a || b), by hand.
  EXPECT_EQ(toHex(leafHash("")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
  Hash a = leafHash("a"), b = leafHash("b");
  EXPECT_NE(nodeHash(a, b), nodeHash(b, a));
  EXPECT_NE(leafHash(std::string(reinterpret_cast<const char*>(a.data()), 32) +
                     std::string(reinterpret_cast<const char*>(b.data()), 32)),
            nodeHash(a, b));
}

TEST(Merkle, ThousandLeafRoot) {
  // Leaves "record 0" … "record 999"; the root from an independent Python implementation.
  auto l = leaves(1000);
  EXPECT_EQ(toHex(merkleRoot(l)),
            "997c0067c5ee716990d44a6731a704890ac7957401b97605fdf266b3cab8b4ef");
  MerkleAccumulator acc;
  for (const auto& h : l) acc.append(h);
  EXPECT_EQ(toHex(acc.root()), "997c0067c5ee716990d44a6731a704890ac7957401b97605fdf266b3cab8b4ef");
}

TEST(Merkle, TheAccumulatorMatchesTheDefinitionAtEverySize) {
  auto l = leaves(300);
  MerkleAccumulator acc;
  for (size_t n = 0; n <= l.size(); ++n) {
    ASSERT_EQ(acc.root(), merkleRoot(std::span(l).first(n))) << n;
    if (n < l.size()) acc.append(l[n]);
  }
}

TEST(Merkle, EveryInclusionProofVerifies) {
  auto l = leaves(70);
  for (uint64_t size = 1; size <= l.size(); ++size) {
    auto tree = std::span<const Hash>(l).first(size);
    Hash root = merkleRoot(tree);
    for (uint64_t i = 0; i < size; ++i) {
      auto proof = inclusionProof(tree, i);
      ASSERT_TRUE(verifyInclusion(l[i], i, size, proof, root)) << i << " of " << size;
    }
  }
  EXPECT_TRUE(inclusionProof(leaves(3), 3).empty());
}

TEST(Merkle, EveryMutationOfAProofIsRejected) {
  auto l = leaves(37);
  Hash root = merkleRoot(l);
  int checked = 0;
  for (uint64_t i = 0; i < l.size(); ++i) {
    auto proof = inclusionProof(l, i);
    const Hash& leaf = l[i];
    ASSERT_TRUE(verifyInclusion(leaf, i, l.size(), proof, root));
    // Index off by one either way.
    if (i > 0) {
      EXPECT_FALSE(verifyInclusion(leaf, i - 1, l.size(), proof, root)) << i;
    }
    EXPECT_FALSE(verifyInclusion(leaf, i + 1, l.size(), proof, root)) << i;
    // Another tree size, with the root of a tree of that size (a checkpoint binds the two):
    // the proof of one size never verifies against another checkpoint. A size of 0 or one
    // not above the index is refused outright.
    auto more = leaves(80);
    for (uint64_t size : {l.size() - 1, l.size() + 1, l.size() * 2}) {
      if (i >= size) continue;
      Hash sizedRoot = merkleRoot(std::span<const Hash>(more).first(size));
      EXPECT_FALSE(verifyInclusion(leaf, i, size, proof, sizedRoot)) << i << " size " << size;
    }
    EXPECT_FALSE(verifyInclusion(leaf, i, 0, proof, root));
    EXPECT_FALSE(verifyInclusion(leaf, i, i, proof, root));
    // Another leaf, another root.
    EXPECT_FALSE(verifyInclusion(l[(i + 1) % l.size()], i, l.size(), proof, root)) << i;
    Hash otherRoot = root;
    otherRoot[31] ^= 1;
    EXPECT_FALSE(verifyInclusion(leaf, i, l.size(), proof, otherRoot)) << i;
    // One bit flipped in each element of the path.
    for (size_t k = 0; k < proof.size(); ++k) {
      for (int bit : {0, 7, 255}) {
        auto bad = proof;
        bad[k][static_cast<size_t>(bit / 8)] ^= static_cast<uint8_t>(1 << (bit % 8));
        EXPECT_FALSE(verifyInclusion(leaf, i, l.size(), bad, root)) << i << " element " << k;
      }
    }
    // An element removed, an element added (front and back).
    for (size_t k = 0; k < proof.size(); ++k) {
      auto bad = proof;
      bad.erase(bad.begin() + static_cast<long>(k));
      EXPECT_FALSE(verifyInclusion(leaf, i, l.size(), bad, root)) << i << " without " << k;
    }
    auto longer = proof;
    longer.push_back(root);
    EXPECT_FALSE(verifyInclusion(leaf, i, l.size(), longer, root)) << i;
    longer = proof;
    longer.insert(longer.begin(), leaf);
    EXPECT_FALSE(verifyInclusion(leaf, i, l.size(), longer, root)) << i;
    ++checked;
  }
  EXPECT_EQ(checked, 37);
}

TEST(Merkle, HexRoundTrip) {
  Hash h = leafHash("x");
  EXPECT_EQ(hashFromHex(toHex(h)), h);
  EXPECT_FALSE(hashFromHex("zz"));
  EXPECT_FALSE(hashFromHex(std::string(64, 'G')));
}

}  // namespace
}  // namespace tollgate
