#include "proxy/original_dst.h"

#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <netinet/in.h>

#include <cerrno>
#include <cstring>

namespace tollgate {
namespace {

// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it stands for.
sockaddr_storage unmapped(const sockaddr_storage& in) {
  if (in.ss_family != AF_INET6) return in;
  const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&in);
  if (!IN6_IS_ADDR_V4MAPPED(&v6->sin6_addr)) return in;
  sockaddr_storage out{};
  auto* v4 = reinterpret_cast<sockaddr_in*>(&out);
  v4->sin_family = AF_INET;
  v4->sin_port = v6->sin6_port;
  std::memcpy(&v4->sin_addr, &v6->sin6_addr.s6_addr[12], 4);
  return out;
}

Error sysError(const char* what, int err) {
  std::string msg = std::string(what) + ": " + std::strerror(err);
  // What the common errnos mean here, for the operator reading the 400.
  if (err == ENOENT)
    msg += " (no NAT entry: the connection was not redirected by iptables REDIRECT)";
  else if (err == ENOPROTOOPT)
    msg += " (netfilter connection tracking is not active for this socket)";
  return Error{-err, std::move(msg)};
}

}  // namespace

Result<sockaddr_storage> getOriginalDst(int fd) {
  sockaddr_storage local{};
  socklen_t len = sizeof local;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0)
    return sysError("getsockname", errno);
  sockaddr_storage dst{};
  // A dual-stack IPv6 socket carries IPv4 connections as mapped addresses; their NAT entry
  // is IPv4 and answers SO_ORIGINAL_DST, not the IPv6 option.
  sockaddr_storage plain = unmapped(local);
  if (plain.ss_family == AF_INET) {
    len = sizeof(sockaddr_in);
    if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &len) != 0)
      return sysError("SO_ORIGINAL_DST", errno);
    if (len != sizeof(sockaddr_in) || dst.ss_family != AF_INET)
      return Error{-1, "SO_ORIGINAL_DST: unexpected address"};
  } else if (plain.ss_family == AF_INET6) {
    len = sizeof(sockaddr_in6);
    if (getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &dst, &len) != 0)
      return sysError("IP6T_SO_ORIGINAL_DST", errno);
    if (len != sizeof(sockaddr_in6) || dst.ss_family != AF_INET6)
      return Error{-1, "IP6T_SO_ORIGINAL_DST: unexpected address"};
  } else {
    return Error{-1, "not a TCP/IP socket"};
  }
  // Connection tracking answers for connections it did not rewrite too, with the address
  // they were made to: that one is the listener itself.
  if (sameAddress(dst, plain, true))
    return Error{-1, "the connection was made to the listener itself, not redirected (" +
                         formatAddress(dst) + ")"};
  return dst;
}

Result<sockaddr_storage> getOriginalDst(const uv_tcp_t* tcp) {
  uv_os_fd_t fd;
  if (int rc = uv_fileno(reinterpret_cast<const uv_handle_t*>(tcp), &fd); rc != 0)
    return Error{rc, std::string("uv_fileno: ") + uv_strerror(rc)};
  return getOriginalDst(fd);
}

bool sameAddress(const sockaddr_storage& a, const sockaddr_storage& b, bool withPort) {
  auto x = unmapped(a), y = unmapped(b);
  if (x.ss_family != y.ss_family) return false;
  if (x.ss_family == AF_INET) {
    const auto* p = reinterpret_cast<const sockaddr_in*>(&x);
    const auto* q = reinterpret_cast<const sockaddr_in*>(&y);
    return p->sin_addr.s_addr == q->sin_addr.s_addr && (!withPort || p->sin_port == q->sin_port);
  }
  if (x.ss_family == AF_INET6) {
    const auto* p = reinterpret_cast<const sockaddr_in6*>(&x);
    const auto* q = reinterpret_cast<const sockaddr_in6*>(&y);
    return std::memcmp(&p->sin6_addr, &q->sin6_addr, sizeof p->sin6_addr) == 0 &&
           (!withPort || p->sin6_port == q->sin6_port);
  }
  return false;
}

uint16_t portOf(const sockaddr_storage& addr) {
  if (addr.ss_family == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  if (addr.ss_family == AF_INET)
    return ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  return 0;
}

std::string formatAddress(const sockaddr_storage& addr, bool port) {
  char ip[INET6_ADDRSTRLEN] = {};
  if (addr.ss_family == AF_INET6) {
    uv_ip6_name(reinterpret_cast<const sockaddr_in6*>(&addr), ip, sizeof ip);
    if (!port) return ip;
    return "[" + std::string(ip) + "]:" + std::to_string(portOf(addr));
  }
  if (addr.ss_family == AF_INET) {
    uv_ip4_name(reinterpret_cast<const sockaddr_in*>(&addr), ip, sizeof ip);
    if (!port) return ip;
    return std::string(ip) + ":" + std::to_string(portOf(addr));
  }
  return "?";
}

}  // namespace tollgate
