// A proxy between a Redis client under test and a real redis-server on loopback that can
// refuse one script call for good: while `refuse` is set, the first EVALSHA (or EVAL) it sees
// is answered `-TRYAGAIN` by the proxy itself, never reaching Redis, and so is every later
// command with the same bytes (that call sent again); everything else is forwarded. So one
// batch certainly never runs while the ones after it do, as when a slot migration keeps
// answering TRYAGAIN to one batch that later ones pass by. Each connection is served one
// command at a time (its replies stay in order); after SUBSCRIBE it is relayed as bytes.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tollgate {

class RedisFaultProxy {
 public:
  explicit RedisFaultProxy(uint16_t redisPort) : redisPort_(redisPort) {
    listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(listener_, 16);
    socklen_t len = sizeof a;
    ::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { acceptLoop(); });
  }
  ~RedisFaultProxy() {
    stop_ = true;
    acceptor_.join();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : served_) t.join();
    ::close(listener_);
  }
  RedisFaultProxy(const RedisFaultProxy&) = delete;
  RedisFaultProxy& operator=(const RedisFaultProxy&) = delete;

  uint16_t port() const { return port_; }
  std::atomic<bool> refuse{false};
  std::atomic<int> refused{0};  // answers the proxy gave itself

 private:
  // The length of the RESP value at `at` in `buf`, or 0 while it is incomplete.
  static size_t valueLength(const std::string& buf, size_t at) {
    if (at >= buf.size()) return 0;
    size_t eol = buf.find("\r\n", at);
    if (eol == std::string::npos) return 0;
    char type = buf[at];
    if (type == '+' || type == '-' || type == ':') return eol + 2 - at;
    long n = std::stol(buf.substr(at + 1, eol - at - 1));
    size_t next = eol + 2;
    if (type == '$') {
      if (n < 0) return next - at;
      return buf.size() >= next + static_cast<size_t>(n) + 2 ? next + n + 2 - at : 0;
    }
    for (long i = 0; i < n; ++i) {  // '*': its elements
      size_t len = valueLength(buf, next);
      if (len == 0) return 0;
      next += len;
    }
    return next - at;
  }
  // The first element of a command (its name), upper-cased.
  static std::string nameOf(const std::string& command) {
    size_t dollar = command.find("\r\n$");
    if (dollar == std::string::npos) return "";
    size_t start = command.find("\r\n", dollar + 2) + 2;
    size_t end = command.find("\r\n", start);
    std::string name = command.substr(start, end - start);
    for (auto& c : name) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return name;
  }
  // Reads until buf holds a whole value; false at the end of the connection or on stop.
  bool readValue(int fd, std::string& buf, std::string& value) {
    for (;;) {
      if (size_t len = valueLength(buf, 0)) {
        value = buf.substr(0, len);
        buf.erase(0, len);
        return true;
      }
      pollfd p{fd, POLLIN, 0};
      int ready = ::poll(&p, 1, 50);
      if (stop_) return false;
      if (ready <= 0) continue;
      char chunk[65536];
      ssize_t got = ::read(fd, chunk, sizeof chunk);
      if (got <= 0) return false;
      buf.append(chunk, static_cast<size_t>(got));
    }
  }
  static bool writeAll(int fd, const std::string& data) {
    for (size_t done = 0; done < data.size();) {
      ssize_t n = ::write(fd, data.data() + done, data.size() - done);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return true;
  }
  void acceptLoop() {
    while (!stop_) {
      pollfd p{listener_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int client = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) continue;
      std::lock_guard<std::mutex> lock(mu_);
      served_.emplace_back([this, client] { serve(client); });
    }
  }
  void relay(int a, int b) {  // bytes both ways, until either end closes
    char chunk[65536];
    while (!stop_) {
      pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (::poll(p, 2, 50) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP))) continue;
        ssize_t got = ::read(p[i].fd, chunk, sizeof chunk);
        if (got <= 0 || !writeAll(p[1 - i].fd, std::string(chunk, static_cast<size_t>(got))))
          return;
      }
    }
  }
  void serve(int client) {
    int server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(redisPort_);
    if (::connect(server, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      std::string fromClient, fromServer, command, reply;
      while (readValue(client, fromClient, command)) {
        std::string name = nameOf(command);
        if (refuse && (name == "EVALSHA" || name == "EVAL")) {
          std::lock_guard<std::mutex> lock(mu_);
          if (target_.empty()) target_ = command;
          if (command == target_) {
            ++refused;
            if (!writeAll(client, "-TRYAGAIN refused by the test's proxy\r\n")) break;
            continue;
          }
        }
        if (!writeAll(server, command)) break;
        if (name == "SUBSCRIBE" || name == "PSUBSCRIBE") {
          if (!fromClient.empty() && !writeAll(server, fromClient)) break;
          relay(client, server);
          break;
        }
        if (!readValue(server, fromServer, reply) || !writeAll(client, reply)) break;
      }
    }
    ::close(server);
    ::close(client);
  }

  uint16_t redisPort_, port_ = 0;
  int listener_ = -1;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::string target_;  // the refused command's bytes
  std::thread acceptor_;
  std::vector<std::thread> served_;
};

}  // namespace tollgate
