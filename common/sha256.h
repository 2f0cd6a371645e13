// SHA-256 as lower-case hex, for digests, fingerprints and hashed tokens.
#pragma once

#include <string>
#include <string_view>

namespace tollgate {

// The first `bytes` bytes (at most 32) of SHA-256(data), as 2 * bytes hex digits.
std::string sha256Hex(std::string_view data, size_t bytes = 32);

}  // namespace tollgate
