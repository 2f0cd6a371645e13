// RFC 6962 Merkle trees over the audit stream's records (DESIGN §6): a leaf hash is
// SHA-256(0x00 ‖ record), a node hash SHA-256(0x01 ‖ left ‖ right), and the tree over n
// leaves splits at the largest power of two below n. The writer keeps a MerkleAccumulator
// (O(log n) per record); the verifier and `audit prove` use the functions over leaf hashes.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate {

using Hash = std::array<uint8_t, 32>;

Hash leafHash(std::string_view record);
Hash nodeHash(const Hash& left, const Hash& right);
// SHA-256 of nothing: the root of the empty tree.
Hash emptyRoot();
std::string toHex(const Hash& h);
std::optional<Hash> hashFromHex(std::string_view hex);

// The root over leaf hashes (MTH of RFC 6962 §2.1).
Hash merkleRoot(std::span<const Hash> leaves);

// The audit path of leaf `index` in the tree over `leaves` (PATH of RFC 6962 §2.1.1).
// Empty when index is out of range.
std::vector<Hash> inclusionProof(std::span<const Hash> leaves, uint64_t index);

// Whether `proof` shows `leaf` at `index` in the tree of `size` leaves with `root`
// (RFC 9162 §2.1.3.2). Any change to index, size, leaf, root or proof fails.
bool verifyInclusion(const Hash& leaf, uint64_t index, uint64_t size, std::span<const Hash> proof,
                     const Hash& root);

// The root of a growing tree, kept as the perfect subtrees of its size's binary form.
class MerkleAccumulator {
 public:
  void append(const Hash& leaf);
  Hash root() const;
  uint64_t size() const { return size_; }

 private:
  std::vector<Hash> peaks_;  // one per set bit of size_, largest subtree first
  uint64_t size_ = 0;
};

}  // namespace tollgate
