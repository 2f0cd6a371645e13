#include "proxy/client_hello.h"

#include <gtest/gtest.h>
#include <openssl/ssl.h>

#include <memory>
#include <random>

namespace tollgate {
namespace {

using Status = ClientHello::Status;

struct HelloOptions {
  const char* sni = nullptr;
  std::vector<std::string> alpn;
  size_t maxFragment = 0;  // 0: OpenSSL's default (one record)
  int maxVersion = 0;      // 0: the newest
};

// A real ClientHello: what OpenSSL's client writes on its first handshake step, caught on a
// memory BIO (no socket, no bytes copied from elsewhere).
std::string openSslClientHello(const HelloOptions& o) {
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()),
                                                        SSL_CTX_free);
  EXPECT_TRUE(ctx);
  if (o.maxVersion) SSL_CTX_set_max_proto_version(ctx.get(), o.maxVersion);
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl(SSL_new(ctx.get()), SSL_free);
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl.get(), rbio, wbio);  // the SSL owns both now
  SSL_set_connect_state(ssl.get());
  if (o.sni) {
    EXPECT_EQ(SSL_set_tlsext_host_name(ssl.get(), o.sni), 1);
  }
  if (!o.alpn.empty()) {
    std::string wire;
    for (const auto& p : o.alpn) {
      wire += static_cast<char>(p.size());
      wire += p;
    }
    EXPECT_EQ(SSL_set_alpn_protos(ssl.get(), reinterpret_cast<const unsigned char*>(wire.data()),
                                  static_cast<unsigned>(wire.size())),
              0);
  }
  if (o.maxFragment) {
    EXPECT_EQ(SSL_set_max_send_fragment(ssl.get(), o.maxFragment), 1);
  }
  EXPECT_EQ(SSL_do_handshake(ssl.get()), -1);
  EXPECT_EQ(SSL_get_error(ssl.get(), -1), SSL_ERROR_WANT_READ);
  char* data = nullptr;
  long n = BIO_get_mem_data(wbio, &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string u16(size_t v) {
  return {static_cast<char>(v >> 8 & 0xFF), static_cast<char>(v & 0xFF)};
}
std::string u24(size_t v) {
  return {static_cast<char>(v >> 16 & 0xFF), static_cast<char>(v >> 8 & 0xFF),
          static_cast<char>(v & 0xFF)};
}

// Hand-built pieces, for shapes OpenSSL will not produce.
std::string extension(uint16_t type, const std::string& data) {
  return u16(type) + u16(data.size()) + data;
}
std::string sniExtension(const std::string& name) {
  std::string entry = std::string(1, '\0') + u16(name.size()) + name;
  return extension(0, u16(entry.size()) + entry);
}
std::string helloBody(const std::string& extensions, bool withExtensions = true) {
  std::string body = "\x03\x03" + std::string(32, 'r') + std::string(1, '\0');  // no session id
  body += u16(2) + "\x13\x01";                                                  // one suite
  body += std::string("\x01\x00", 2);                                           // null compression
  if (withExtensions) body += u16(extensions.size()) + extensions;
  return body;
}
std::string handshake(const std::string& body) {
  return "\x01" + u24(body.size()) + body;
}
// The handshake bytes framed in records of at most `fragment` bytes.
std::string records(const std::string& hs, size_t fragment = 16384) {
  std::string out;
  for (size_t i = 0; i < hs.size(); i += fragment) {
    auto piece = hs.substr(i, fragment);
    out += "\x16\x03\x01" + u16(piece.size()) + piece;
  }
  return out;
}
// The handshake message inside a single-record hello.
std::string unframe(const std::string& hello) {
  return hello.substr(5);
}
size_t countRecords(const std::string& bytes) {
  size_t n = 0;
  for (size_t pos = 0; pos + 5 <= bytes.size(); ++n)
    pos += 5 + (static_cast<uint8_t>(bytes[pos + 3]) << 8 | static_cast<uint8_t>(bytes[pos + 4]));
  return n;
}

TEST(ClientHello, ReadsSniAndAlpnFromARealClientHello) {
  auto bytes = openSslClientHello({"Tools.Example.COM", {"h2", "http/1.1"}});
  auto h = peekClientHello(bytes);
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "tools.example.com");
  EXPECT_FALSE(h.serverNameIsIp);
  EXPECT_EQ(h.alpn, (std::vector<std::string>{"h2", "http/1.1"}));
  EXPECT_EQ(h.legacyVersion, 0x0303);
  EXPECT_EQ(h.length, bytes.size());
}

TEST(ClientHello, Tls12HelloWithoutSniOrAlpn) {
  auto bytes = openSslClientHello({nullptr, {}, 0, TLS1_2_VERSION});
  auto h = peekClientHello(bytes);
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "");
  EXPECT_TRUE(h.alpn.empty());
}

TEST(ClientHello, IpLiteralSniIsReportedAsSuch) {
  for (const char* ip : {"10.1.2.3", "fd00::2"}) {
    auto h = peekClientHello(openSslClientHello({ip, {}}));
    ASSERT_EQ(h.status, Status::kComplete) << h.error;
    EXPECT_EQ(h.serverName, ip);
    EXPECT_TRUE(h.serverNameIsIp);
  }
}

TEST(ClientHello, OtherProtocolsAreNotTls) {
  EXPECT_EQ(peekClientHello("").status, Status::kNeedMore);
  EXPECT_EQ(peekClientHello("G").status, Status::kNotTls);
  EXPECT_EQ(peekClientHello("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, Status::kNotTls);
  EXPECT_EQ(peekClientHello("\x80\x2e\x01\x03\x01").status, Status::kNotTls);  // SSLv2 hello
  EXPECT_EQ(peekClientHello(std::string("\x17\x03\x03\x00\x01x", 6)).status, Status::kNotTls);
  EXPECT_EQ(peekClientHello(std::string(1, '\x16')).status, Status::kNeedMore);
}

TEST(ClientHello, EveryTruncationNeedsMoreBytes) {
  auto bytes = openSslClientHello({"tools.example.com", {"h2"}});
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto h = peekClientHello(std::string_view(bytes).substr(0, n));
    ASSERT_EQ(h.status, Status::kNeedMore) << "at " << n << ": " << h.error;
  }
}

TEST(ClientHello, BytesAfterTheHelloAreNotItsBusiness) {
  auto bytes = openSslClientHello({"a.example", {}});
  auto h = peekClientHello(bytes + "\x17\x03\x03\x00\x05hello");
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.length, bytes.size());
}

TEST(ClientHello, SplitOverRecordsByOpenSsl) {
  // A long ALPN list makes the hello larger than OpenSSL's smallest fragment (512).
  std::vector<std::string> protocols;
  for (int i = 0; i < 40; ++i) protocols.push_back("protocol-number-" + std::to_string(i));
  auto bytes = openSslClientHello({"split.example", protocols, 512});
  ASSERT_GT(countRecords(bytes), 1u);
  auto h = peekClientHello(bytes);
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "split.example");
  EXPECT_EQ(h.alpn, protocols);
  EXPECT_EQ(h.length, bytes.size());
}

TEST(ClientHello, SplitOverRecordsOfAnySize) {
  auto hs = unframe(openSslClientHello({"split.example", {"h2"}}));
  for (size_t fragment : {1, 2, 3, 4, 5, 7, 31, 100, 255, 1000}) {
    auto bytes = records(hs, fragment);
    auto h = peekClientHello(bytes);
    if (countRecords(bytes) > kMaxClientHelloRecords) {
      EXPECT_EQ(h.status, Status::kMalformed) << fragment;
      continue;
    }
    ASSERT_EQ(h.status, Status::kComplete) << fragment << ": " << h.error;
    EXPECT_EQ(h.serverName, "split.example");
    for (size_t n = 0; n < bytes.size(); ++n)
      ASSERT_EQ(peekClientHello(std::string_view(bytes).substr(0, n)).status, Status::kNeedMore)
          << fragment << " at " << n;
  }
}

TEST(ClientHello, HandBuiltShapes) {
  // No extensions at all (allowed before TLS 1.3).
  auto h = peekClientHello(records(handshake(helloBody("", false))));
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "");
  h = peekClientHello(records(handshake(helloBody(sniExtension("notes.local.")))));
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "notes.local");  // the trailing dot is dropped
}

TEST(ClientHello, RejectsMalformedShapes) {
  auto bad = [](const std::string& bytes) {
    auto h = peekClientHello(bytes);
    EXPECT_FALSE(h.error.empty());
    return h.status;
  };
  auto hello = [](const std::string& ext) { return records(handshake(helloBody(ext))); };
  EXPECT_EQ(bad(hello(sniExtension("a.example") + sniExtension("b.example"))), Status::kMalformed);
  EXPECT_EQ(bad(hello(sniExtension(std::string("good.example\0evil.example", 25)))),
            Status::kMalformed);
  EXPECT_EQ(bad(hello(sniExtension("a..example"))), Status::kMalformed);
  EXPECT_EQ(bad(hello(sniExtension("a example"))), Status::kMalformed);
  EXPECT_EQ(bad(hello(sniExtension(""))), Status::kMalformed);
  EXPECT_EQ(bad(hello(sniExtension(std::string(64, 'a') + ".example"))), Status::kMalformed);
  // Two names in one server_name list.
  std::string two = std::string(1, '\0') + u16(1) + "a" + std::string(1, '\0') + u16(1) + "b";
  EXPECT_EQ(bad(hello(extension(0, u16(two.size()) + two))), Status::kMalformed);
  // An empty server_name (what a server sends back, never a client).
  EXPECT_EQ(bad(hello(extension(0, ""))), Status::kMalformed);
  EXPECT_EQ(bad(hello(extension(16, u16(3) + "\x02h2" + "x"))), Status::kMalformed);
  EXPECT_EQ(bad(hello(extension(16, u16(1) + std::string(1, '\0')))), Status::kMalformed);
  EXPECT_EQ(bad(hello(extension(7, "x") + extension(7, "y"))), Status::kMalformed);
  // Extensions block longer or shorter than what is left.
  auto body = helloBody(sniExtension("a.example"));
  EXPECT_EQ(bad(records(handshake(body + "x"))), Status::kMalformed);
  EXPECT_EQ(bad(records(handshake(body.substr(0, body.size() - 1)))), Status::kMalformed);
  // Record layer: empty record, too long, wrong version, wrong message, alert in between.
  EXPECT_EQ(bad(std::string("\x16\x03\x01\x00\x00", 5)), Status::kMalformed);
  EXPECT_EQ(bad(std::string("\x16\x03\x01\x40\x01", 5)), Status::kMalformed);
  EXPECT_EQ(bad(std::string("\x16\x02", 2)), Status::kMalformed);
  EXPECT_EQ(bad(std::string("\x16\x03\x09", 3)), Status::kMalformed);
  EXPECT_EQ(bad(std::string("\x16\x03\x01\x00\x04\x02\x00\x00\x00", 9)), Status::kMalformed);
  auto hs = handshake(helloBody(sniExtension("a.example")));
  auto split = records(hs.substr(0, 10)) + std::string("\x15\x03\x03\x00\x02\x02\x28", 7) +
               records(hs.substr(10));
  EXPECT_EQ(bad(split), Status::kMalformed);
  // A second handshake message after the ClientHello, in the same record.
  EXPECT_EQ(bad(records(hs + handshake("x"))), Status::kMalformed);
}

TEST(ClientHello, SizeIsCappedBeforeTheBytesArrive) {
  // A header announcing a message over the cap is refused at once, not waited for.
  std::string head = std::string("\x16\x03\x01\x40\x00\x01", 6) + u24(kMaxClientHelloBytes - 3);
  EXPECT_EQ(peekClientHello(head).status, Status::kMalformed);
  head = std::string("\x16\x03\x01\x40\x00\x01", 6) + u24(kMaxClientHelloBytes - 4);
  EXPECT_EQ(peekClientHello(head).status, Status::kNeedMore);
  // A hello of exactly the cap, padded with an unknown extension, is read.
  std::string base = helloBody(sniExtension("big.example"));
  size_t pad = kMaxClientHelloBytes - 4 - base.size() - 4;
  auto h = peekClientHello(records(
      handshake(helloBody(sniExtension("big.example") + extension(21, std::string(pad, 0))))));
  ASSERT_EQ(h.status, Status::kComplete) << h.error;
  EXPECT_EQ(h.serverName, "big.example");
}

void checkInvariants(std::string_view bytes) {
  auto h = peekClientHello(bytes);
  switch (h.status) {
    case Status::kComplete:
      ASSERT_LE(h.length, bytes.size());
      ASSERT_LE(h.length, kMaxClientHelloPeekBytes);
      break;
    case Status::kNeedMore:
      // A caller never has to hold more than the peek bound.
      ASSERT_LT(bytes.size(), kMaxClientHelloPeekBytes);
      break;
    case Status::kMalformed:
      ASSERT_FALSE(h.error.empty());
      break;
    case Status::kNotTls:
      ASSERT_NE(bytes[0], '\x16');
      break;
  }
}

TEST(ClientHello, EveryBitFlipIsHandled) {
  auto bytes = openSslClientHello({"flip.example", {"h2", "http/1.1"}});
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto flipped = bytes;
      flipped[i] = static_cast<char>(flipped[i] ^ (1 << bit));
      ASSERT_NO_FATAL_FAILURE(checkInvariants(flipped)) << i << ":" << bit;
    }
  }
}

TEST(ClientHello, RandomInputsAndMutations) {
  std::mt19937 rng(20240611);
  auto real = openSslClientHello({"fuzz.example", {"h2"}});
  std::uniform_int_distribution<int> byte(0, 255);
  for (int round = 0; round < 20000; ++round) {
    std::string input;
    if (round % 2 == 0) {
      // Random bytes behind a plausible record header.
      input = std::string("\x16\x03\x01", 3);
      size_t n = rng() % 600;
      for (size_t i = 0; i < n; ++i) input += static_cast<char>(byte(rng));
    } else {
      // The real hello with a few random edits, a cut, or a spliced copy of itself.
      input = real;
      for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k)
        input[rng() % input.size()] = static_cast<char>(byte(rng));
      if (rng() % 5 == 0) input.insert(rng() % input.size(), real.substr(0, rng() % real.size()));
      if (rng() % 3 == 0) input.resize(rng() % input.size());
    }
    if (input.empty()) continue;
    ASSERT_NO_FATAL_FAILURE(checkInvariants(input)) << "round " << round;
  }
}

}  // namespace
}  // namespace tollgate
