// UpstreamPool: idle keep-alive connections to upstreams, per worker, keyed by
// "host:port". An idle connection is watched for reads: any byte or EOF from it means the
// upstream gave it up, and it is closed. Idle connections expire after upstream_idle.
#pragma once

#include <uv.h>

#include <chrono>
#include <string>
#include <unordered_map>
#include <vector>

#include "proxy/tcp_stream.h"
#include "proxy/timer.h"

namespace tollgate {

class UpstreamPool final : public TcpStream::Handler {
 public:
  UpstreamPool(uv_loop_t* loop, std::chrono::milliseconds idleTimeout, size_t maxIdlePerKey);
  UpstreamPool(const UpstreamPool&) = delete;
  UpstreamPool& operator=(const UpstreamPool&) = delete;
  ~UpstreamPool();

  // An idle connection for key, or null.
  StreamPtr take(const std::string& key);
  void put(const std::string& key, StreamPtr stream);
  // Closes every idle connection kept under key.
  void drop(const std::string& key);
  void closeAll();
  size_t idleCount() const;

 private:
  struct Idle {
    StreamPtr stream;
    uint64_t sinceMs;
  };
  void remove(TcpStream& stream);
  void sweep();

  void onConnect(TcpStream&, int) override {}
  void onRead(TcpStream& stream, std::string_view) override { remove(stream); }
  void onReadEnd(TcpStream& stream, int) override { remove(stream); }
  void onDrained(TcpStream&) override {}
  void onWriteError(TcpStream& stream, int) override { remove(stream); }

  uv_loop_t* loop_;
  std::chrono::milliseconds idleTimeout_;
  size_t maxIdlePerKey_;
  std::unordered_map<std::string, std::vector<Idle>> idle_;
  std::unordered_map<TcpStream*, std::string> keys_;
  TimerPtr sweeper_;
};

}  // namespace tollgate
