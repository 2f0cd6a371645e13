// A TLS ClientHello read without consuming it: transparent listeners peek at a
// connection's first bytes to tell TLS from plain HTTP and to learn the server name the
// client asked for (SNI) before deciding how to handle the connection. The parser is pure
// (bytes in, verdict out), reads only inside the given buffer and bounds what it accepts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate {

// The largest ClientHello handshake message accepted (header included); real ones are a
// few hundred bytes to ~2 KiB with post-quantum key shares.
inline constexpr size_t kMaxClientHelloBytes = 16 * 1024;
// Records a ClientHello may be split into; with their headers this bounds what a caller
// ever has to buffer while peeking.
inline constexpr size_t kMaxClientHelloRecords = 64;
inline constexpr size_t kMaxClientHelloPeekBytes =
    kMaxClientHelloBytes + 5 * kMaxClientHelloRecords;

struct ClientHello {
  enum class Status {
    kNotTls,     // the first byte is not a TLS handshake record: some other protocol
    kNeedMore,   // a TLS handshake so far; more bytes are needed to read the ClientHello
    kMalformed,  // it starts as TLS but breaks the format (error says how)
    kComplete,   // a whole ClientHello; the fields below are set
  };
  Status status = Status::kNeedMore;
  std::string error;              // kMalformed: what was wrong
  size_t length = 0;              // kComplete: bytes of the records that carry the ClientHello
  uint16_t legacyVersion = 0;     // client_version (0x0303 for TLS 1.2 and 1.3)
  std::string serverName;         // SNI host_name, lower-case, no trailing dot; empty: none
  bool serverNameIsIp = false;    // the SNI is an IPv4/IPv6 literal (RFC 6066 forbids it)
  std::vector<std::string> alpn;  // offered ALPN protocols, in order; empty: no ALPN
};

ClientHello peekClientHello(std::string_view bytes);

}  // namespace tollgate
