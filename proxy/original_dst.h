// Where a connection redirected by iptables REDIRECT was going: the destination the client
// dialled before netfilter rewrote it to the sidecar's listener (SO_ORIGINAL_DST for IPv4,
// IP6T_SO_ORIGINAL_DST for IPv6). Transparent listeners forward to that address.
#pragma once

#include <sys/socket.h>
#include <uv.h>

#include <string>

#include "common/result.h"

namespace tollgate {

// The original destination (address and port) of an accepted TCP connection. An error when
// the connection was not redirected: no NAT entry, conntrack absent, or an original
// destination that is the socket's own local address (the client dialled the listener).
Result<sockaddr_storage> getOriginalDst(int fd);
Result<sockaddr_storage> getOriginalDst(const uv_tcp_t* tcp);

// True when a and b hold the same IP (an IPv4-mapped IPv6 address equals its IPv4 form);
// ports are compared too when withPort.
bool sameAddress(const sockaddr_storage& a, const sockaddr_storage& b, bool withPort);

uint16_t portOf(const sockaddr_storage& addr);
// "ip:port", IPv6 as "[ip]:port"; without the port when port is false.
std::string formatAddress(const sockaddr_storage& addr, bool port = true);

}  // namespace tollgate
