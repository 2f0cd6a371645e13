// Parsing of the configuration's size ("64k", "1g") and duration ("250ms", "10s", "1h")
// values, and of HOST:PORT addresses.
#pragma once

#include <chrono>
#include <cstdint>
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

// A hex digit's value (either case), or -1.
inline int hexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace tollgate
