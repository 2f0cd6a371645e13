// TcpStream's TLS layer on real sockets (127.0.0.1 port 0, one libuv loop): a server stream
// with a leaf from a LocalCa and a client stream that verifies it, both ends TcpStream.
#include <gtest/gtest.h>
#include <openssl/ssl.h>
#include <uv.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "certs/leaf_cache.h"
#include "certs/local_ca.h"
#include "proxy/tcp_stream.h"
#include "proxy/tls.h"

namespace tollgate {
namespace {

// Records what a stream tells its handler.
struct Recorder : TcpStream::Handler {
  std::string data;
  int handshake = 1;  // 1: not yet
  int readEnd = 1;
  int connectStatus = 1;
  std::function<void(TcpStream&)> onConnected;
  std::function<void(TcpStream&, std::string_view)> onData;
  void onConnect(TcpStream& s, int status) override {
    connectStatus = status;
    if (onConnected) onConnected(s);
  }
  void onRead(TcpStream& s, std::string_view d) override {
    data.append(d);
    if (onData) onData(s, d);
  }
  void onReadEnd(TcpStream&, int status) override { readEnd = status; }
  void onDrained(TcpStream&) override {}
  void onWriteError(TcpStream&, int) override {}
  void onHandshake(TcpStream&, int status) override { handshake = status; }
};

class TlsStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    LocalCa::Options options;
    auto ca = LocalCa::create(options);
    ASSERT_TRUE(ca.ok()) << ca.error().message;
    caCert_ = ca->certificate();
    X509_up_ref(caCert_);
    auto cache = LeafCache::create(std::make_shared<const LocalCa>(std::move(ca.value())));
    ASSERT_TRUE(cache.ok());
    leaves_ = std::move(cache.value());
    auto ctx = leaves_->serverContext("localhost");
    ASSERT_TRUE(ctx.ok()) << ctx.error().message;
    serverCtx_ = ctx.value();
    clientCtx_ = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(clientCtx_, SSL_VERIFY_PEER, nullptr);
    X509_STORE_add_cert(SSL_CTX_get_cert_store(clientCtx_), caCert_);

    ASSERT_EQ(uv_tcp_init(&loop_, &listener_), 0);
    listener_.data = this;
    sockaddr_in addr{};
    uv_ip4_addr("127.0.0.1", 0, &addr);
    ASSERT_EQ(uv_tcp_bind(&listener_, reinterpret_cast<sockaddr*>(&addr), 0), 0);
    ASSERT_EQ(uv_listen(reinterpret_cast<uv_stream_t*>(&listener_), 8,
                        [](uv_stream_t* l, int) {
                          auto* self = static_cast<TlsStreamTest*>(l->data);
                          self->server_ = TcpStream::create(&self->loop_);
                          ASSERT_EQ(self->server_->accept(l), 0);
                          self->server_->setHandler(&self->serverSide_);
                          ASSERT_NE(self->server_->tlsBegin(self->serverCtx_.get(), true), nullptr);
                          ASSERT_EQ(self->server_->tlsHandshake(), 0);
                          ASSERT_EQ(self->server_->readStart(), 0);
                        }),
              0);
    int len = sizeof addr;
    uv_tcp_getsockname(&listener_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
  }

  void TearDown() override {
    client_.reset();
    server_.reset();
    uv_close(reinterpret_cast<uv_handle_t*>(&listener_), nullptr);
    uv_run(&loop_, UV_RUN_DEFAULT);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
    SSL_CTX_free(clientCtx_);
    X509_free(caCert_);
  }

  // Connects a client stream that starts TLS for `name` once connected.
  void connect(const std::string& name) {
    client_ = TcpStream::create(&loop_);
    client_->setHandler(&clientSide_);
    clientSide_.onConnected = [this, name](TcpStream& s) {
      SSL* ssl = s.tlsBegin(clientCtx_, false);
      ASSERT_NE(ssl, nullptr);
      ASSERT_TRUE(prepareUpstream(ssl, name).ok());
      ASSERT_EQ(s.tlsHandshake(), 0);
    };
    sockaddr_in addr{};
    uv_ip4_addr("127.0.0.1", port_, &addr);
    ASSERT_EQ(client_->connect(reinterpret_cast<sockaddr*>(&addr)), 0);
  }

  // Runs the loop until `done` or 5 s (a ticking timer keeps the loop from blocking).
  void runUntil(const std::function<bool()>& done) {
    uv_timer_t tick;
    uv_timer_init(&loop_, &tick);
    uv_timer_start(
        &tick, [](uv_timer_t*) {}, 10, 10);
    uint64_t deadline = uv_hrtime() + 5'000'000'000ull;
    while (!done() && uv_hrtime() < deadline) uv_run(&loop_, UV_RUN_ONCE);
    uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
    uv_run(&loop_, UV_RUN_NOWAIT);
    ASSERT_TRUE(done()) << "timed out";
  }

  uv_loop_t loop_;
  uv_tcp_t listener_;
  int port_ = 0;
  X509* caCert_ = nullptr;
  std::unique_ptr<LeafCache> leaves_;
  SslCtxPtr serverCtx_;
  SSL_CTX* clientCtx_ = nullptr;
  StreamPtr server_, client_;
  Recorder serverSide_, clientSide_;
};

TEST_F(TlsStreamTest, HandshakeThenPlaintextBothWaysAndDataAppendedEarlyWaits) {
  connect("localhost");
  // Appended before the handshake is done: sent once it is, encrypted.
  runUntil([&] { return client_ && client_->ssl() != nullptr; });
  client_->append("hello over tls");
  ASSERT_EQ(client_->flush(), 0);
  runUntil([&] { return serverSide_.data == "hello over tls"; });
  EXPECT_EQ(clientSide_.handshake, 0);
  EXPECT_EQ(serverSide_.handshake, 0);
  EXPECT_TRUE(client_->tlsReady());
  // A large reply: many records, re-assembled in order.
  std::string big(1 << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<char>('a' + (i / 4096) % 26);
  ASSERT_EQ(client_->readStart(), 0);
  server_->append(big);
  ASSERT_EQ(server_->flush(), 0);
  runUntil([&] { return clientSide_.data.size() >= big.size(); });
  EXPECT_EQ(clientSide_.data, big);
}

TEST_F(TlsStreamTest, ShutdownSendsCloseNotifyWhichReadsAsEof) {
  connect("localhost");
  runUntil([&] { return clientSide_.handshake == 0 && serverSide_.handshake == 0; });
  ASSERT_EQ(client_->readStart(), 0);
  server_->append("bye");
  server_->shutdown();
  runUntil([&] { return clientSide_.readEnd != 1; });
  EXPECT_EQ(clientSide_.data, "bye");
  EXPECT_EQ(clientSide_.readEnd, UV_EOF);
}

TEST_F(TlsStreamTest, AWrongNameFailsTheClientHandshakeWithTheReason) {
  connect("other.example");
  runUntil([&] { return clientSide_.handshake != 1; });
  EXPECT_EQ(clientSide_.handshake, UV_EPROTO);
  EXPECT_NE(client_->tlsError().find("hostname mismatch"), std::string::npos)
      << client_->tlsError();
  EXPECT_FALSE(client_->tlsReady());
  // The server hears of it too (the client's alert).
  runUntil([&] { return serverSide_.handshake != 1; });
  EXPECT_NE(serverSide_.handshake, 0);
}

TEST_F(TlsStreamTest, AnUntrustedIssuerFailsVerification) {
  // A client that trusts nothing.
  SSL_CTX_free(clientCtx_);
  clientCtx_ = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_verify(clientCtx_, SSL_VERIFY_PEER, nullptr);
  connect("localhost");
  runUntil([&] { return clientSide_.handshake != 1; });
  EXPECT_EQ(clientSide_.handshake, UV_EPROTO);
  EXPECT_NE(client_->tlsError().find("certificate verify failed"), std::string::npos)
      << client_->tlsError();
}

TEST_F(TlsStreamTest, PlainBytesToATlsServerFailItsHandshake) {
  client_ = TcpStream::create(&loop_);
  client_->setHandler(&clientSide_);
  clientSide_.onConnected = [](TcpStream& s) {
    s.append("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    ASSERT_EQ(s.flush(), 0);
  };
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", port_, &addr);
  ASSERT_EQ(client_->connect(reinterpret_cast<sockaddr*>(&addr)), 0);
  runUntil([&] { return serverSide_.handshake != 1; });
  EXPECT_EQ(serverSide_.handshake, UV_EPROTO);
  EXPECT_FALSE(server_->tlsError().empty());
  EXPECT_TRUE(serverSide_.data.empty());
}

TEST_F(TlsStreamTest, RecordsSplitAndJoinedAnyWayAcrossReadsDecryptInOrder) {
  // A blocking client on its own thread: after the handshake it writes three records
  // itself, in pieces that split a header, split a body and join records in one read.
  std::thread client([&] {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port_));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL* ssl = SSL_new(clientCtx_);
    ASSERT_TRUE(prepareUpstream(ssl, "localhost").ok());
    SSL_set_fd(ssl, fd);
    ASSERT_EQ(SSL_connect(ssl), 1);
    BIO* records = BIO_new(BIO_s_mem());
    SSL_set0_wbio(ssl, records);
    for (const char* part : {"first record|", "second|", "third and last"})
      ASSERT_GT(SSL_write(ssl, part, static_cast<int>(std::strlen(part))), 0);
    char* bytes = nullptr;
    long size = BIO_get_mem_data(records, &bytes);
    std::string wire(bytes, static_cast<size_t>(size));
    // 1 byte of the first header; the rest of it and 4 bytes of its body; the rest of the
    // first record with the whole second and 2 bytes of the third; then the rest.
    size_t first = 5 + ((static_cast<uint8_t>(wire[3]) << 8) | static_cast<uint8_t>(wire[4]));
    size_t cuts[] = {1, 9, first + (wire.size() - first) / 2 + 2, wire.size()};
    size_t at = 0;
    for (size_t cut : cuts) {
      ASSERT_EQ(::send(fd, wire.data() + at, cut - at, 0), static_cast<ssize_t>(cut - at));
      at = cut;
      std::this_thread::sleep_for(std::chrono::milliseconds(30));  // one read each
    }
    SSL_free(ssl);
    ::close(fd);
  });
  runUntil([&] { return serverSide_.data.size() >= 35 || serverSide_.readEnd != 1; });
  client.join();
  EXPECT_EQ(serverSide_.handshake, 0);
  EXPECT_EQ(serverSide_.data, "first record|second|third and last");
}

}  // namespace
}  // namespace tollgate
