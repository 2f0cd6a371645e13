#include "audit/merkle.h"

#include <bit>
#include <memory>

#include "common/sha256.h"

namespace tollgate {
namespace {

// The largest power of two strictly below n (n >= 2).
uint64_t split(uint64_t n) {
  return std::bit_floor(n - 1);
}

std::string_view bytes(const Hash& h) {
  return {reinterpret_cast<const char*>(h.data()), h.size()};
}

}  // namespace

Hash leafHash(std::string_view record) {
  return sha256({std::string_view("\0", 1), record});
}

Hash nodeHash(const Hash& left, const Hash& right) {
  return sha256({std::string_view("\1", 1), bytes(left), bytes(right)});
}

Hash emptyRoot() {
  return sha256({});
}

std::string toHex(const Hash& h) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(64);
  for (uint8_t b : h) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

std::optional<Hash> hashFromHex(std::string_view hex) {
  if (hex.size() != 64) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  Hash h;
  for (size_t i = 0; i < 32; ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    h[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return h;
}

Hash merkleRoot(std::span<const Hash> leaves) {
  if (leaves.empty()) return emptyRoot();
  if (leaves.size() == 1) return leaves[0];
  uint64_t k = split(leaves.size());
  return nodeHash(merkleRoot(leaves.subspan(0, k)), merkleRoot(leaves.subspan(k)));
}

std::vector<Hash> inclusionProof(std::span<const Hash> leaves, uint64_t index) {
  std::vector<Hash> path;
  if (index >= leaves.size()) return path;
  // PATH(m, D[n]): the sibling subtree roots from the leaf up, built top-down.
  std::vector<Hash> reversed;
  while (leaves.size() > 1) {
    uint64_t k = split(leaves.size());
    if (index < k) {
      reversed.push_back(merkleRoot(leaves.subspan(k)));
      leaves = leaves.subspan(0, k);
    } else {
      reversed.push_back(merkleRoot(leaves.subspan(0, k)));
      leaves = leaves.subspan(k);
      index -= k;
    }
  }
  path.assign(reversed.rbegin(), reversed.rend());
  return path;
}

bool verifyInclusion(const Hash& leaf, uint64_t index, uint64_t size, std::span<const Hash> proof,
                     const Hash& root) {
  if (index >= size) return false;
  uint64_t fn = index, sn = size - 1;
  Hash r = leaf;
  for (const Hash& p : proof) {
    if (sn == 0) return false;  // a longer proof than the tree allows
    if ((fn & 1) || fn == sn) {
      r = nodeHash(p, r);
      if (!(fn & 1)) {
        while (fn != 0 && !(fn & 1)) {
          fn >>= 1;
          sn >>= 1;
        }
      }
    } else {
      r = nodeHash(r, p);
    }
    fn >>= 1;
    sn >>= 1;
  }
  return sn == 0 && r == root;
}

void MerkleAccumulator::append(const Hash& leaf) {
  // Merge equal-sized subtrees, as binary addition carries.
  Hash h = leaf;
  for (uint64_t s = size_; s & 1; s >>= 1) {
    h = nodeHash(peaks_.back(), h);
    peaks_.pop_back();
  }
  peaks_.push_back(h);
  ++size_;
}

Hash MerkleAccumulator::root() const {
  if (peaks_.empty()) return emptyRoot();
  // The smaller subtrees hang on the right of the larger ones.
  Hash h = peaks_.back();
  for (size_t i = peaks_.size() - 1; i-- > 0;) h = nodeHash(peaks_[i], h);
  return h;
}

}  // namespace tollgate
