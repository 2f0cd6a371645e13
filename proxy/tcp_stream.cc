#include "proxy/tcp_stream.h"

#include <openssl/err.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>

#include "certs/openssl_error.h"

namespace tollgate {
namespace {

// One read buffer per loop thread: libuv calls alloc, read and the read callback back to
// back for one stream, and every reader consumes or copies the bytes in the callback.
constexpr size_t kReadBufferSize = 64 * 1024;
thread_local char tReadBuffer[kReadBufferSize];
// Plaintext of one socket read, delivered in one onRead (TLS records are at most 16 KiB
// each; a full 64 KiB read of records decrypts to less than that).
thread_local char tPlainBuffer[kReadBufferSize];

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

// OpenSSL's end of a stream: one BIO, read and written, on the stream's own buffers. Reads
// come from the socket read being decrypted (tlsInView_, in libuv's buffer, not copied)
// after what an earlier read left (tlsInBuf_); writes go to tlsWire_, which flushTls() hands
// to the socket. A memory BIO would copy every read in, and zero its whole buffer (grown to
// the size of the handshake's flight) at every reset.
BIO_METHOD* TcpStream::bioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "tollgate stream");
    BIO_meth_set_create(m, [](BIO* b) {
      BIO_set_init(b, 1);
      return 1;
    });
    BIO_meth_set_write(m, [](BIO* b, const char* data, int len) {
      auto* s = static_cast<TcpStream*>(BIO_get_data(b));
      BIO_clear_retry_flags(b);
      if (len <= 0) return 0;
      s->tlsWire_.append(data, static_cast<size_t>(len));
      return len;
    });
    BIO_meth_set_read(m, [](BIO* b, char* out, int len) {
      auto* s = static_cast<TcpStream*>(BIO_get_data(b));
      BIO_clear_retry_flags(b);
      if (len <= 0) return 0;
      size_t want = static_cast<size_t>(len), got = 0;
      if (!s->tlsInBuf_.empty()) {
        got = std::min(want, s->tlsInBuf_.size() - s->tlsInAt_);
        std::memcpy(out, s->tlsInBuf_.data() + s->tlsInAt_, got);
        s->tlsInAt_ += got;
        if (s->tlsInAt_ == s->tlsInBuf_.size()) {
          s->tlsInBuf_.clear();
          s->tlsInAt_ = 0;
        }
      }
      size_t more = std::min(want - got, s->tlsInView_.size());
      if (more > 0) {  // an empty view may have no data at all (memcpy wants a pointer)
        std::memcpy(out + got, s->tlsInView_.data(), more);
        s->tlsInView_.remove_prefix(more);
        got += more;
      }
      if (got == 0) {
        BIO_set_retry_read(b);  // more to come, not the end
        return -1;
      }
      return static_cast<int>(got);
    });
    BIO_meth_set_ctrl(m, [](BIO* b, int cmd, long, void*) -> long {
      auto* s = static_cast<TcpStream*>(BIO_get_data(b));
      switch (cmd) {
        case BIO_CTRL_FLUSH:
          return 1;
        case BIO_CTRL_PENDING:
          return static_cast<long>(s->tlsInPending());
        default:
          return 0;
      }
    });
    return m;
  }();
  return method;
}

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

TcpStream::~TcpStream() {
  if (ssl_) SSL_free(ssl_);
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
  wantRead_ = true;
  return syncReading();
}

void TcpStream::readStop() {
  wantRead_ = false;
  (void)syncReading();
}

int TcpStream::syncReading() {
  // A handshake reads whatever the handler wants: its answer is needed to go on.
  bool want = (wantRead_ || handshaking_) && !closing_;
  if (want == reading_) return 0;
  if (!want) {
    uv_read_stop(stream());
    reading_ = false;
    return 0;
  }
  int rc = uv_read_start(stream(), onAlloc, onReadCb);
  if (rc == 0) reading_ = true;
  return rc;
}

void TcpStream::onAlloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  buf->base = tReadBuffer;
  buf->len = kReadBufferSize;
}

void TcpStream::onReadCb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* stream = static_cast<TcpStream*>(s->data);
  if (nread == 0 || stream->closing_ || !stream->handler_) return;
  if (nread < 0) {
    stream->wantRead_ = false;
    if (stream->handshaking_) {
      stream->tlsError_ = nread == UV_EOF ? "the peer closed the connection during the handshake"
                                          : uv_strerror(static_cast<int>(nread));
      stream->failTls(static_cast<int>(nread));
      return;
    }
    int status = static_cast<int>(nread);
    // libuv reports a hang-up after a short read as the end of the stream without reading
    // on, so a reset (RST) can arrive here as UV_EOF: the socket's pending error tells.
    if (status == UV_EOF) {
      int err = 0;
      socklen_t len = sizeof err;
      uv_os_fd_t fd;
      if (uv_fileno(reinterpret_cast<uv_handle_t*>(s), &fd) == 0 &&
          ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0)
        status = uv_translate_sys_error(err);
    }
    // A TLS stream ends in order with a close_notify (SSL_read's SSL_ERROR_ZERO_RETURN,
    // which stops reading before the TCP end): the TCP end without one may be a cut.
    if (stream->ssl_ && status == UV_EOF) {
      status = UV_EPROTO;
      stream->tlsError_ = "the peer closed the connection without a TLS close_notify";
    }
    (void)stream->syncReading();
    stream->handler_->onReadEnd(*stream, status);
    return;
  }
  std::string_view data(buf->base, static_cast<size_t>(nread));
  if (stream->ssl_) {
    stream->readTls(data);
    return;
  }
  stream->handler_->onRead(*stream, data);
}

SSL* TcpStream::tlsBegin(SSL_CTX* ctx, bool server) {
  if (ssl_ || closing_) return nullptr;
  ssl_ = SSL_new(ctx);
  if (!ssl_) return nullptr;
  BIO* bio = BIO_new(bioMethod());
  if (!bio) {
    SSL_free(ssl_);
    ssl_ = nullptr;
    return nullptr;
  }
  BIO_set_data(bio, this);
  SSL_set_bio(ssl_, bio, bio);  // one reference, for both directions
  // OpenSSL takes all a read brought in one BIO read, not each record's header and body
  // apart (what it holds undecrypted is SSL_has_pending()).
  SSL_set_read_ahead(ssl_, 1);
  if (server)
    SSL_set_accept_state(ssl_);
  else
    SSL_set_connect_state(ssl_);
  return ssl_;
}

int TcpStream::tlsHandshake(std::string_view early) {
  if (!ssl_ || closing_) return UV_EINVAL;
  handshaking_ = true;
  if (int rc = syncReading(); rc != 0) return rc;
  // The first step runs now: a client's ClientHello goes out, a server reads `early`.
  readTls(early);
  return 0;
}

void TcpStream::readTls(std::string_view data) {
  if (!handler_) return;
  // OpenSSL reads `data` where it is; what it leaves (it stopped, or the stream did) is
  // kept for the next read, since the buffer is the loop's.
  tlsInView_ = data;
  struct KeepRest {
    TcpStream* s;
    ~KeepRest() {
      if (s->tlsInView_.empty()) return;
      if (s->tlsInAt_ > 0) {
        s->tlsInBuf_.erase(0, s->tlsInAt_);
        s->tlsInAt_ = 0;
      }
      s->tlsInBuf_.append(s->tlsInView_);
      s->tlsInView_ = {};
    }
  } keepRest{this};
  if (handshaking_) {
    clearOpenSslErrors();
    int r = SSL_do_handshake(ssl_);
    if (r != 1) {
      int e = SSL_get_error(ssl_, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        if (flushTls() != 0) {
          tlsError_ = "write failed during the handshake";
          failTls(UV_EPIPE);
        }
        return;
      }
      long verify = SSL_get_verify_result(ssl_);
      if (!SSL_is_server(ssl_) && verify != X509_V_OK) {
        tlsError_ = std::string("certificate verify failed: ") +
                    (verify == X509_V_ERR_APPLICATION_VERIFICATION
                         ? "the chain runs through the sidecar's own CA (tls.ca_dir), which only "
                           "agents may trust"
                         : X509_verify_cert_error_string(verify));
        ERR_clear_error();
      } else {
        tlsError_ = takeOpenSslErrors();
        if (tlsError_.empty()) tlsError_ = "handshake failed";
      }
      (void)flushTls();  // the alert, for the peer's logs
      failTls(UV_EPROTO);
      return;
    }
    handshaking_ = false;
    (void)syncReading();
    if (flushTls() != 0) {
      tlsError_ = "write failed during the handshake";
      failTls(UV_EPIPE);
      return;
    }
    handler_->onHandshake(*this, 0);
    if (closing_ || !handler_) return;
    // Plaintext appended during the handshake goes out now.
    if (!out_.empty() && flush() != 0) {
      handler_->onWriteError(*this, UV_EPIPE);
      return;
    }
  }
  // Every record this read completed, decrypted into one delivery.
  size_t plain = 0;
  for (;;) {
    if (plain == kReadBufferSize) {
      handler_->onRead(*this, std::string_view(tPlainBuffer, plain));
      plain = 0;
      if (closing_ || !handler_) return;
    }
    clearOpenSslErrors();
    int n = SSL_read(ssl_, tPlainBuffer + plain, static_cast<int>(kReadBufferSize - plain));
    if (n > 0) {
      plain += static_cast<size_t>(n);
      // Nothing is left, decrypted or not, in OpenSSL or here: another SSL_read would only
      // say SSL_ERROR_WANT_READ.
      if (!SSL_has_pending(ssl_) && tlsInPending() == 0) {
        handler_->onRead(*this, std::string_view(tPlainBuffer, plain));
        if (closing_ || !handler_) return;
        break;
      }
      continue;
    }
    int e = SSL_get_error(ssl_, n);
    if (plain > 0) {
      handler_->onRead(*this, std::string_view(tPlainBuffer, plain));
      plain = 0;
      if (closing_ || !handler_) return;
    }
    if (e == SSL_ERROR_WANT_READ) break;
    // close_notify is an orderly end; anything else a broken stream.
    if (e != SSL_ERROR_ZERO_RETURN) {
      tlsError_ = takeOpenSslErrors();
      if (tlsError_.empty()) tlsError_ = "TLS read failed";
    }
    (void)flushTls();
    wantRead_ = false;
    (void)syncReading();
    handler_->onReadEnd(*this, e == SSL_ERROR_ZERO_RETURN ? UV_EOF : UV_EPROTO);
    return;
  }
  // Session tickets, key updates: what reading made OpenSSL say.
  if (flushTls() != 0) {
    wantRead_ = false;
    (void)syncReading();
    handler_->onWriteError(*this, UV_EPIPE);
  }
}

void TcpStream::failTls(int status) {
  handshaking_ = false;
  tlsFailed_ = true;
  wantRead_ = false;
  (void)syncReading();
  if (handler_) handler_->onHandshake(*this, status < 0 ? status : UV_EPROTO);
}

int TcpStream::flushTls() {
  if (tlsWire_.empty()) return 0;
  return writeRaw(tlsWire_, &tlsWire_);
}

int TcpStream::flush() {
  if (out_.empty() || closing_) return 0;
  if (ssl_) {
    if (handshaking_) return 0;  // sent once the handshake is done
    if (tlsFailed_) return UV_EPROTO;
    clearOpenSslErrors();
    // Our BIO takes every byte: one SSL_write writes all of them.
    int n = SSL_write(ssl_, out_.data(), static_cast<int>(out_.size()));
    if (n != static_cast<int>(out_.size())) {
      tlsError_ = takeOpenSslErrors();
      return UV_EPROTO;
    }
    out_.clear();
    return flushTls();
  }
  return writeRaw(out_, &out_);
}

int TcpStream::writeRaw(std::string_view data, std::string* owner) {
  // With nothing queued, write at once: the common case then needs no write request, and
  // libuv's write completion (which re-arms epoll with one epoll_ctl per write) is skipped.
  if (tcp_.write_queue_size == 0) {
    uv_buf_t buf = uv_buf_init(const_cast<char*>(data.data()), static_cast<unsigned>(data.size()));
    int n = uv_try_write(stream(), &buf, 1);
    if (n >= 0 && static_cast<size_t>(n) == data.size()) {
      if (owner) owner->clear();
      return 0;
    }
    if (n >= 0)
      data.remove_prefix(static_cast<size_t>(n));
    else if (n != UV_EAGAIN)
      return n;
  }
  auto* req = new WriteRequest;
  if (owner) {
    // The unsent tail of the owner's buffer moves into the request without a copy.
    owner->erase(0, owner->size() - data.size());
    req->data.swap(*owner);
  } else {
    req->data.assign(data);
  }
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
  if (ssl_ && !handshaking_) {
    clearOpenSslErrors();
    (void)SSL_shutdown(ssl_);  // close_notify: the peer can tell an end from a cut
    (void)flushTls();
  }
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
  reading_ = wantRead_ = handshaking_ = false;
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
