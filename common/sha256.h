// SHA-256: raw digests over several parts, and lower-case hex, for digests, fingerprints,
// hashed tokens and the audit stream's hash chain and Merkle tree (its hot path).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace tollgate {

using Sha256Digest = std::array<uint8_t, 32>;

// SHA-256 of the concatenated parts. The algorithm is fetched from OpenSSL once and each
// thread reuses one context: the implicit fetch of EVP_sha256() per call costs a lock.
Sha256Digest sha256(std::initializer_list<std::string_view> parts);

// The first `bytes` bytes (at most 32) of SHA-256(data), as 2 * bytes hex digits.
std::string sha256Hex(std::string_view data, size_t bytes = 32);
// The same, all 64 digits, into `out` (its capacity kept: no allocation once it has some).
void sha256HexInto(std::string_view data, std::string& out);

}  // namespace tollgate
