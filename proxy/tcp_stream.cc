#include "proxy/tcp_stream.h"

#include <cstring>

namespace tollgate {
namespace {

// One read buffer per loop thread: libuv calls alloc, read and the read callback back to
// back for one stream, and every reader consumes or copies the bytes in the callback.
constexpr size_t kReadBufferSize = 64 * 1024;
thread_local char tReadBuffer[kReadBufferSize];

struct WriteRequest {
  uv_write_t req;
  std::string data;
};

struct ConnectRequest {
  uv_connect_t req;
};

struct ShutdownRequest {
  uv_shutdown_t req;
};

}  // namespace

void StreamCloser::operator()(TcpStream* stream) const {
  if (stream) stream->close();
}

StreamPtr TcpStream::create(uv_loop_t* loop) {
  return StreamPtr(new TcpStream(loop));
}

TcpStream::TcpStream(uv_loop_t* loop) {
  uv_tcp_init(loop, &tcp_);
  tcp_.data = this;
}

int TcpStream::accept(uv_stream_t* server) {
  int rc = uv_accept(server, stream());
  if (rc == 0) {
    uv_tcp_nodelay(&tcp_, 1);
    uv_tcp_keepalive(&tcp_, 1, 60);  // dead peers of idle tunnels are found by TCP
  }
  return rc;
}

int TcpStream::connect(const sockaddr* addr) {
  auto* req = new ConnectRequest;
  int rc = uv_tcp_connect(&req->req, &tcp_, addr, onConnectCb);
  if (rc != 0) {
    delete req;
    return rc;
  }
  return 0;
}

void TcpStream::onConnectCb(uv_connect_t* req, int status) {
  auto* stream = static_cast<TcpStream*>(req->handle->data);
  delete reinterpret_cast<ConnectRequest*>(req);
  if (status == UV_ECANCELED || stream->closing_) return;
  if (status == 0) uv_tcp_nodelay(&stream->tcp_, 1);
  if (stream->handler_) stream->handler_->onConnect(*stream, status);
}

int TcpStream::readStart() {
  if (reading_ || closing_) return 0;
  int rc = uv_read_start(stream(), onAlloc, onReadCb);
  if (rc == 0) reading_ = true;
  return rc;
}

void TcpStream::readStop() {
  if (!reading_) return;
  uv_read_stop(stream());
  reading_ = false;
}

void TcpStream::onAlloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  buf->base = tReadBuffer;
  buf->len = kReadBufferSize;
}

void TcpStream::onReadCb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* stream = static_cast<TcpStream*>(s->data);
  if (nread == 0 || stream->closing_ || !stream->handler_) return;
  if (nread < 0) {
    stream->readStop();
    stream->handler_->onReadEnd(*stream, static_cast<int>(nread));
    return;
  }
  stream->handler_->onRead(*stream, std::string_view(buf->base, static_cast<size_t>(nread)));
}

int TcpStream::flush() {
  if (out_.empty() || closing_) return 0;
  // With nothing queued, write at once: the common case then needs no write request, and
  // libuv's write completion (which re-arms epoll with one epoll_ctl per write) is skipped.
  if (tcp_.write_queue_size == 0) {
    uv_buf_t buf = uv_buf_init(out_.data(), static_cast<unsigned>(out_.size()));
    int n = uv_try_write(stream(), &buf, 1);
    if (n >= 0 && static_cast<size_t>(n) == out_.size()) {
      out_.clear();
      return 0;
    }
    if (n >= 0)
      out_.erase(0, static_cast<size_t>(n));
    else if (n != UV_EAGAIN)
      return n;
  }
  auto* req = new WriteRequest;
  req->data.swap(out_);
  uv_buf_t buf = uv_buf_init(req->data.data(), static_cast<unsigned>(req->data.size()));
  int rc = uv_write(&req->req, stream(), &buf, 1, onWriteCb);
  if (rc != 0) {
    delete req;
    return rc;
  }
  return 0;
}

void TcpStream::onWriteCb(uv_write_t* req, int status) {
  auto* stream = static_cast<TcpStream*>(req->handle->data);
  delete reinterpret_cast<WriteRequest*>(req);
  if (stream->closing_ || !stream->handler_) return;
  if (status < 0) {
    stream->handler_->onWriteError(*stream, status);
    return;
  }
  stream->checkDrain();
}

void TcpStream::wantDrain(size_t lowWatermark) {
  lowWatermark_ = lowWatermark;
  wantDrain_ = true;
  checkDrain();
}

void TcpStream::checkDrain() {
  if (wantDrain_ && queued() <= lowWatermark_) {
    wantDrain_ = false;
    if (handler_) handler_->onDrained(*this);
  }
}

void TcpStream::shutdown() {
  if (shutdown_ || closing_) return;
  shutdown_ = true;
  (void)flush();
  auto* req = new ShutdownRequest;
  if (uv_shutdown(&req->req, stream(), onShutdownCb) != 0) delete req;
}

void TcpStream::onShutdownCb(uv_shutdown_t* req, int) {
  delete reinterpret_cast<ShutdownRequest*>(req);
}

void TcpStream::close() {
  if (closing_) return;
  closing_ = true;
  handler_ = nullptr;
  reading_ = false;
  uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), onCloseCb);
}

void TcpStream::onCloseCb(uv_handle_t* handle) {
  delete static_cast<TcpStream*>(handle->data);
}

std::string TcpStream::peerAddress() const {
  sockaddr_storage ss{};
  int len = sizeof ss;
  if (uv_tcp_getpeername(&tcp_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return {};
  char ip[64] = {};
  int port = 0;
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    uv_ip6_name(a, ip, sizeof ip);
    port = ntohs(a->sin6_port);
    return "[" + std::string(ip) + "]:" + std::to_string(port);
  }
  auto* a = reinterpret_cast<sockaddr_in*>(&ss);
  uv_ip4_name(a, ip, sizeof ip);
  port = ntohs(a->sin_port);
  return std::string(ip) + ":" + std::to_string(port);
}

}  // namespace tollgate
