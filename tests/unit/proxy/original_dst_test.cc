#include "proxy/original_dst.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace tollgate {
namespace {

// An fd closed at the end of the scope.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

sockaddr_storage ip(const char* text, uint16_t port) {
  sockaddr_storage ss{};
  if (std::strchr(text, ':')) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    inet_pton(AF_INET6, text, &a->sin6_addr);
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    inet_pton(AF_INET, text, &a->sin_addr);
  }
  return ss;
}

// Whatever connection tracking says about a connection nobody redirected (no entry, no
// conntrack, or the listener's own address), the answer is an error, never an address.
void expectNotRedirected(int family, const char* loopback) {
  Fd listener(socket(family, SOCK_STREAM, 0));
  ASSERT_GE(listener.fd, 0);
  auto addr = ip(loopback, 0);
  socklen_t len = family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  if (bind(listener.fd, reinterpret_cast<sockaddr*>(&addr), len) != 0)
    GTEST_SKIP() << loopback << " is not available here";
  ASSERT_EQ(listen(listener.fd, 1), 0);
  ASSERT_EQ(getsockname(listener.fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  Fd client(socket(family, SOCK_STREAM, 0));
  ASSERT_EQ(connect(client.fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
  Fd accepted(accept(listener.fd, nullptr, nullptr));
  ASSERT_GE(accepted.fd, 0);
  auto dst = getOriginalDst(accepted.fd);
  ASSERT_FALSE(dst.ok()) << "an original destination for a direct connection: "
                         << formatAddress(dst.value());
  EXPECT_FALSE(dst.error().message.empty());
}

TEST(OriginalDst, DirectIpv4ConnectionIsNotRedirected) {
  expectNotRedirected(AF_INET, "127.0.0.1");
}

TEST(OriginalDst, DirectIpv6ConnectionIsNotRedirected) {
  expectNotRedirected(AF_INET6, "::1");
}

TEST(OriginalDst, NonTcpSocketsAndBadFdsAreErrors) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, pair), 0);
  Fd a(pair[0]), b(pair[1]);
  auto dst = getOriginalDst(a.fd);
  ASSERT_FALSE(dst.ok());
  EXPECT_NE(dst.error().message.find("not a TCP/IP socket"), std::string::npos)
      << dst.error().message;
  dst = getOriginalDst(-1);
  ASSERT_FALSE(dst.ok());
  EXPECT_NE(dst.error().message.find("getsockname"), std::string::npos);
}

TEST(OriginalDst, AddressesCompareAcrossIpv4MappedForms) {
  EXPECT_TRUE(sameAddress(ip("10.0.0.2", 80), ip("::ffff:10.0.0.2", 80), true));
  EXPECT_TRUE(sameAddress(ip("10.0.0.2", 80), ip("10.0.0.2", 8080), false));
  EXPECT_FALSE(sameAddress(ip("10.0.0.2", 80), ip("10.0.0.2", 8080), true));
  EXPECT_FALSE(sameAddress(ip("10.0.0.2", 80), ip("10.0.0.3", 80), false));
  EXPECT_TRUE(sameAddress(ip("fd00::2", 80), ip("fd00::2", 80), true));
  EXPECT_FALSE(sameAddress(ip("fd00::2", 80), ip("::ffff:253.0.0.2", 80), true));
  EXPECT_EQ(formatAddress(ip("fd00::2", 443)), "[fd00::2]:443");
  EXPECT_EQ(formatAddress(ip("10.0.0.2", 80)), "10.0.0.2:80");
  EXPECT_EQ(formatAddress(ip("10.0.0.2", 80), false), "10.0.0.2");
  EXPECT_EQ(portOf(ip("fd00::2", 443)), 443);
}

}  // namespace
}  // namespace tollgate
