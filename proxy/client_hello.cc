#include "proxy/client_hello.h"

#include <arpa/inet.h>

#include <algorithm>

namespace tollgate {
namespace {

constexpr uint8_t kHandshakeRecord = 0x16;
constexpr uint8_t kClientHelloType = 0x01;
constexpr size_t kRecordHeader = 5;
constexpr size_t kMaxRecordBody = 1 << 14;  // RFC 8446 §5.1
constexpr uint16_t kServerNameExt = 0;
constexpr uint16_t kAlpnExt = 16;

// A bounds-checked cursor: every read fails, rather than reads past the end, when the
// bytes are not there.
class Cursor {
 public:
  explicit Cursor(std::string_view bytes) : b_(bytes) {}
  size_t left() const { return b_.size(); }
  bool u8(uint8_t& v) {
    if (b_.empty()) return false;
    v = static_cast<uint8_t>(b_[0]);
    b_.remove_prefix(1);
    return true;
  }
  bool u16(uint16_t& v) {
    if (b_.size() < 2) return false;
    v = static_cast<uint16_t>(static_cast<uint8_t>(b_[0]) << 8 | static_cast<uint8_t>(b_[1]));
    b_.remove_prefix(2);
    return true;
  }
  bool take(size_t n, std::string_view& out) {
    if (b_.size() < n) return false;
    out = b_.substr(0, n);
    b_.remove_prefix(n);
    return true;
  }
  // A vector<floor..ceiling> with a length prefix of 1 or 2 bytes.
  bool vec(int prefix, size_t floor, size_t ceiling, std::string_view& out) {
    uint16_t n = 0;
    if (prefix == 1) {
      uint8_t n8 = 0;
      if (!u8(n8)) return false;
      n = n8;
    } else if (!u16(n)) {
      return false;
    }
    return n >= floor && n <= ceiling && take(n, out);
  }

 private:
  std::string_view b_;
};

ClientHello malformed(std::string error) {
  ClientHello h;
  h.status = ClientHello::Status::kMalformed;
  h.error = std::move(error);
  return h;
}

bool isIpLiteral(const std::string& name) {
  unsigned char buf[16];
  return inet_pton(AF_INET, name.c_str(), buf) == 1 || inet_pton(AF_INET6, name.c_str(), buf) == 1;
}

// A host_name as RFC 6066 wants it (ASCII DNS name) or an IP literal; returns an error text.
std::string checkServerName(std::string_view raw, ClientHello& h) {
  std::string name(raw);
  for (auto& c : name) c = (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
  if (isIpLiteral(name)) {
    h.serverName = name;
    h.serverNameIsIp = true;
    return {};
  }
  if (name.size() > 1 && name.back() == '.') name.pop_back();
  if (name.size() > 253) return "SNI host name longer than 253 characters";
  size_t label = 0;
  for (char c : name) {
    if (c == '.') {
      if (label == 0) return "SNI host name has an empty label";
      label = 0;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok) return "SNI host name has a character that is not allowed in a DNS name";
    if (++label > 63) return "SNI host name has a label longer than 63 characters";
  }
  if (label == 0) return "SNI host name has an empty label";
  h.serverName = std::move(name);
  return {};
}

std::string parseServerName(std::string_view data, ClientHello& h) {
  Cursor c(data);
  std::string_view list, name;
  uint8_t type = 0;
  if (!c.vec(2, 1, 0xFFFF, list) || c.left() != 0) return "server_name list length is wrong";
  Cursor l(list);
  // One host_name and nothing else: OpenSSL and BoringSSL refuse other lists too, and a
  // second name would make "the" server name ambiguous.
  if (!l.u8(type) || type != 0) return "server_name entry is not a host_name";
  if (!l.vec(2, 1, 0xFFFF, name)) return "server_name host_name length is wrong";
  if (l.left() != 0) return "server_name list has more than one entry";
  return checkServerName(name, h);
}

std::string parseAlpn(std::string_view data, ClientHello& h) {
  Cursor c(data);
  std::string_view list;
  if (!c.vec(2, 2, 0xFFFF, list) || c.left() != 0) return "ALPN list length is wrong";
  Cursor l(list);
  while (l.left() > 0) {
    std::string_view proto;
    if (!l.vec(1, 1, 0xFF, proto)) return "ALPN protocol length is wrong";
    h.alpn.emplace_back(proto);
  }
  return {};
}

// The ClientHello body (after the 4-byte handshake header), RFC 8446 §4.1.2.
ClientHello parseBody(std::string_view body) {
  ClientHello h;
  Cursor c(body);
  std::string_view random, sessionId, suites, compression, extensions;
  if (!c.u16(h.legacyVersion) || (h.legacyVersion >> 8) != 3)
    return malformed("ClientHello version is not 3.x");
  if (!c.take(32, random)) return malformed("ClientHello too short for its random");
  if (!c.vec(1, 0, 32, sessionId)) return malformed("ClientHello session id length is wrong");
  if (!c.vec(2, 2, 0xFFFE, suites) || suites.size() % 2 != 0)
    return malformed("ClientHello cipher suites length is wrong");
  if (!c.vec(1, 1, 0xFF, compression))
    return malformed("ClientHello compression methods length is wrong");
  if (c.left() != 0) {
    // Extensions are optional before TLS 1.3; when present they fill the rest exactly.
    if (!c.vec(2, 0, 0xFFFF, extensions) || c.left() != 0)
      return malformed("ClientHello extensions length is wrong");
  }
  Cursor e(extensions);
  std::vector<uint16_t> seen;
  while (e.left() > 0) {
    uint16_t type = 0;
    std::string_view data;
    if (!e.u16(type) || !e.vec(2, 0, 0xFFFF, data))
      return malformed("ClientHello extension length is wrong");
    seen.push_back(type);
    std::string error;
    if (type == kServerNameExt)
      error = parseServerName(data, h);
    else if (type == kAlpnExt)
      error = parseAlpn(data, h);
    if (!error.empty()) return malformed(error);
  }
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end())
    return malformed("ClientHello has an extension twice");
  h.status = ClientHello::Status::kComplete;
  return h;
}

}  // namespace

ClientHello peekClientHello(std::string_view bytes) {
  if (bytes.empty()) return {};
  if (static_cast<uint8_t>(bytes[0]) != kHandshakeRecord) {
    ClientHello h;
    h.status = ClientHello::Status::kNotTls;
    return h;
  }
  // The handshake message may span several records: gather their bodies, checking each
  // header and the message's own header as soon as their bytes are there.
  std::string hs;
  size_t pos = 0, records = 0, need = 0;  // need: the whole message's size, once known
  while (true) {
    std::string_view rest = bytes.substr(pos);
    if (rest.size() >= 1 && static_cast<uint8_t>(rest[0]) != kHandshakeRecord)
      return malformed("a record that is not a handshake record before the ClientHello ended");
    if (rest.size() >= 2 && static_cast<uint8_t>(rest[1]) != 3)
      return malformed("record version is not 3.x");
    if (rest.size() >= 3 && static_cast<uint8_t>(rest[2]) > 4)
      return malformed("record version is not 3.x");
    if (rest.size() < kRecordHeader) return {};
    size_t length =
        static_cast<size_t>(static_cast<uint8_t>(rest[3])) << 8 | static_cast<uint8_t>(rest[4]);
    if (length == 0) return malformed("empty handshake record");
    if (length > kMaxRecordBody) return malformed("record longer than 16384 bytes");
    if (++records > kMaxClientHelloRecords)
      return malformed("ClientHello split into too many records");
    std::string_view fragment = rest.substr(kRecordHeader, length);
    hs.append(fragment);
    if (hs.size() >= 1 && static_cast<uint8_t>(hs[0]) != kClientHelloType)
      return malformed("first handshake message is not a ClientHello");
    if (need == 0 && hs.size() >= 4) {
      need =
          4 + (static_cast<size_t>(static_cast<uint8_t>(hs[1])) << 16 |
               static_cast<size_t>(static_cast<uint8_t>(hs[2])) << 8 | static_cast<uint8_t>(hs[3]));
      if (need > kMaxClientHelloBytes) return malformed("ClientHello larger than 16 KiB");
    }
    if (need != 0 && hs.size() > need)
      return malformed("bytes after the ClientHello in its record");
    if (fragment.size() < length) return {};  // the record is not all here yet
    pos += kRecordHeader + length;
    if (need != 0 && hs.size() == need) break;
  }
  ClientHello h = parseBody(std::string_view(hs).substr(4));
  if (h.status == ClientHello::Status::kComplete) h.length = pos;
  return h;
}

}  // namespace tollgate
