// TcpStream: a heap-only wrapper around a libuv TCP handle. libuv points into it, so it is
// never copied or moved; it is created by create() and ended only by close(), which clears
// the handler and frees the wrapper in libuv's close callback. Output is gathered with
// append() and sent by flush() as one write; each write request owns its bytes and frees
// them in its callback whatever the status.
//
// TLS is a layer inside the stream (startTls): OpenSSL reads and writes the stream's own
// buffers through a BIO of ours, the socket stays libuv's. The handler then reads and appends
// plaintext; the stream reads during the handshake whatever the handler asked, and every socket
// read is delivered as one onRead of the plaintext it carried, as without TLS.
#pragma once

#include <openssl/ssl.h>
#include <uv.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace tollgate {

class TcpStream;

struct StreamCloser {
  void operator()(TcpStream* stream) const;
};
using StreamPtr = std::unique_ptr<TcpStream, StreamCloser>;

class TcpStream {
 public:
  class Handler {
   public:
    virtual void onConnect(TcpStream& stream, int status) = 0;
    virtual void onRead(TcpStream& stream, std::string_view data) = 0;
    // UV_EOF for an orderly end, another negative libuv code for an error.
    virtual void onReadEnd(TcpStream& stream, int status) = 0;
    // The write queue fell to or below the low watermark after wantDrain().
    virtual void onDrained(TcpStream& stream) = 0;
    // A write failed; the stream is unusable.
    virtual void onWriteError(TcpStream& stream, int status) = 0;
    // The TLS handshake ended: 0, or UV_EPROTO (tlsError() says why) or a libuv error.
    virtual void onHandshake(TcpStream& stream, int status) {
      (void)stream;
      (void)status;
    }

   protected:
    ~Handler() = default;
  };

  static StreamPtr create(uv_loop_t* loop);
  TcpStream(const TcpStream&) = delete;
  TcpStream& operator=(const TcpStream&) = delete;

  void setHandler(Handler* handler) { handler_ = handler; }
  uv_stream_t* stream() { return reinterpret_cast<uv_stream_t*>(&tcp_); }
  uv_tcp_t* tcp() { return &tcp_; }

  [[nodiscard]] int accept(uv_stream_t* server);
  [[nodiscard]] int connect(const sockaddr* addr);
  [[nodiscard]] int readStart();
  void readStop();

  // TLS, in two steps: tlsBegin() makes the SSL (the caller sets SNI, the name to verify,
  // the certificate, app data), tlsHandshake() starts it. `early` are bytes of the peer's
  // that were read before TLS began (a ClientHello that came with the CONNECT). Appended
  // plaintext waits until the handshake is done. Returns null / a libuv error.
  SSL* tlsBegin(SSL_CTX* ctx, bool server);
  [[nodiscard]] int tlsHandshake(std::string_view early = {});
  SSL* ssl() const { return ssl_; }
  bool tlsReady() const { return ssl_ != nullptr && !handshaking_ && !tlsFailed_; }
  // Why the handshake or a later read failed.
  const std::string& tlsError() const { return tlsError_; }

  void append(std::string_view data) { out_.append(data); }
  std::string& output() { return out_; }
  // Sends everything appended so far. Returns a libuv error code or 0.
  int flush();
  size_t queued() const { return out_.size() + tcp_.write_queue_size; }
  // Asks for onDrained() once the queue is at or below lowWatermark.
  void wantDrain(size_t lowWatermark);
  // Half-closes the write side after the queued writes.
  void shutdown();
  bool shutdownSent() const { return shutdown_; }
  void close();

  // Local or peer address as "ip:port" (empty on error).
  std::string peerAddress() const;

 private:
  explicit TcpStream(uv_loop_t* loop);
  ~TcpStream();
  friend struct StreamCloser;

  static void onAlloc(uv_handle_t* handle, size_t suggested, uv_buf_t* buf);
  static void onReadCb(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void onWriteCb(uv_write_t* req, int status);
  static void onConnectCb(uv_connect_t* req, int status);
  static void onShutdownCb(uv_shutdown_t* req, int status);
  static void onCloseCb(uv_handle_t* handle);
  void checkDrain();
  int syncReading();
  // Hands `data` to the socket; what cannot be written now is queued (taken from `owner`,
  // whose bytes `data` is, without a copy).
  int writeRaw(std::string_view data, std::string* owner = nullptr);
  // Sends what OpenSSL wrote into its output BIO.
  int flushTls();
  void readTls(std::string_view data);
  void failTls(int status);
  // The BIO that OpenSSL reads and writes through (one method for every stream).
  static BIO_METHOD* bioMethod();
  // Bytes of the peer's not yet given to OpenSSL.
  size_t tlsInPending() const { return tlsInBuf_.size() - tlsInAt_ + tlsInView_.size(); }

  uv_tcp_t tcp_;
  Handler* handler_ = nullptr;
  std::string out_;
  size_t lowWatermark_ = 0;
  bool wantDrain_ = false;
  bool wantRead_ = false;  // what the handler asked
  bool reading_ = false;   // what libuv does
  bool shutdown_ = false;
  bool closing_ = false;
  SSL* ssl_ = nullptr;
  // socket -> OpenSSL: the read being decrypted, after the bytes an earlier one left
  std::string_view tlsInView_;
  std::string tlsInBuf_;
  size_t tlsInAt_ = 0;   // where tlsInBuf_'s unread bytes begin
  std::string tlsWire_;  // OpenSSL -> socket: records not yet handed to the socket
  bool handshaking_ = false;
  bool tlsFailed_ = false;  // the handshake failed: nothing more is sent or read
  std::string tlsError_;
};

}  // namespace tollgate
