// Parsing of the configuration's size ("64k", "1g") and duration ("250ms", "10s", "1h")
// values, and of HOST:PORT addresses.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace tollgate {

// Bytes; suffixes k, m, g are binary (1k = 1024). Returns nullopt on bad syntax or overflow.
std::optional<uint64_t> parseSize(std::string_view text);

// Milliseconds; suffixes ms, s, m, h, d are required. Returns nullopt on bad syntax.
std::optional<std::chrono::milliseconds> parseDuration(std::string_view text);

struct HostPort {
  std::string host;  // without brackets for IPv6 literals
  uint16_t port = 0;
};

// "127.0.0.1:15001", "[::1]:80", "name:8080". The port is required.
std::optional<HostPort> parseHostPort(std::string_view text);

// Formats HOST:PORT, bracketing IPv6 literals.
std::string formatHostPort(std::string_view host, uint16_t port);

// Whether an IPv6 address (its 16 bytes) reaches an IPv4 one, in its last 4 bytes:
// IPv4-mapped (::ffff:a.b.c.d), or in NAT64's well-known prefix (64:ff9b::a.b.c.d, RFC
// 6052), which a NAT64 gateway (and DNS64 answers for IPv4-only names) sends to a.b.c.d.
inline bool embedsIpv4(const uint8_t* v6) {
  static constexpr uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  static constexpr uint8_t kNat64[12] = {0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0};
  return std::memcmp(v6, kMapped, 12) == 0 || std::memcmp(v6, kNat64, 12) == 0;
}

// A hex digit's value (either case), or -1.
inline int hexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace tollgate
