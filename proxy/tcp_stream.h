// TcpStream: a heap-only wrapper around a libuv TCP handle. libuv points into it, so it is
// never copied or moved; it is created by create() and ended only by close(), which clears
// the handler and frees the wrapper in libuv's close callback. Output is gathered with
// append() and sent by flush() as one write; each write request owns its bytes and frees
// them in its callback whatever the status.
#pragma once

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
  bool reading() const { return reading_; }

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
  ~TcpStream() = default;
  friend struct StreamCloser;

  static void onAlloc(uv_handle_t* handle, size_t suggested, uv_buf_t* buf);
  static void onReadCb(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void onWriteCb(uv_write_t* req, int status);
  static void onConnectCb(uv_connect_t* req, int status);
  static void onShutdownCb(uv_shutdown_t* req, int status);
  static void onCloseCb(uv_handle_t* handle);
  void checkDrain();

  uv_tcp_t tcp_;
  Handler* handler_ = nullptr;
  std::string out_;
  size_t lowWatermark_ = 0;
  bool wantDrain_ = false;
  bool reading_ = false;
  bool shutdown_ = false;
  bool closing_ = false;
};

}  // namespace tollgate
