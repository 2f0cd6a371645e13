#!/bin/sh
# transparent-init.sh — what Tollgate's init container runs in a pod (or any network
# namespace) so that the agent cannot call out except through the sidecar.
#
#   transparent-init.sh --uid UID [--port PORT] [--ports 80,443] [--no-lockdown]
#                       [--dns-servers IP,IP|none]
#   transparent-init.sh --uninstall
#
# Environment equivalents: TOLLGATE_UID, TOLLGATE_PORT, TOLLGATE_PORTS, TOLLGATE_LOCKDOWN=0|1,
# TOLLGATE_DNS_SERVERS. Arguments win over the environment.
#
# What it installs, for IPv4 (iptables) and IPv6 (ip6tables) alike:
#
#   nat OUTPUT -> TOLLGATE_OUTPUT (inserted first):
#     traffic of the sidecar's uid                  RETURN  (its own upstream calls)
#     to loopback (127.0.0.0/8, ::1, out via lo)    RETURN  (local, not outbound)
#     tcp to each port of --ports (default 80,443)  REDIRECT to --port (default 15001)
#   filter OUTPUT -> TOLLGATE_LOCKDOWN (inserted first; unless --no-lockdown):
#     traffic of the sidecar's uid                  RETURN
#     to loopback, or out via lo                    RETURN  (redirected traffic is to loopback)
#     IPv6 neighbour discovery (RS, NS, NA)         RETURN
#     replies on established connections            RETURN  (inbound connections keep working)
#     DNS (udp and tcp 53) to the resolvers         RETURN  (--dns-servers; default: the
#                                                            nameservers of /etc/resolv.conf)
#     anything else                                 REJECT  (tcp reset for TCP)
#
# Every user but the sidecar's uid is redirected, root included. Without the lockdown, a
# port outside --ports (8080, 8443, ...) and any UDP go out untouched: the lockdown is on by
# default because "the agent cannot opt out" needs it. DNS stays open to the resolvers only,
# and a resolver can still carry data out in the names it looks up; pass --dns-servers none
# where the sidecar and the agent need no DNS (or a resolver on loopback).
#
# The sidecar's transparent listeners must accept on 127.0.0.1:PORT and [::1]:PORT, where
# REDIRECT sends locally made connections.
#
# Idempotent: the chains are flushed and refilled, each jump exists once; running it again
# with other options leaves exactly what those options ask for. --uninstall removes the two
# chains and their jumps and nothing else. Needs CAP_NET_ADMIN (an init container with
# securityContext.capabilities.add: [NET_ADMIN]). When the kernel has no IPv6, IPv6 is
# skipped with a note (there is no IPv6 to bypass through).
set -eu

NAT_CHAIN=TOLLGATE_OUTPUT
FILTER_CHAIN=TOLLGATE_LOCKDOWN

uid=${TOLLGATE_UID:-}
port=${TOLLGATE_PORT:-15001}
ports=${TOLLGATE_PORTS:-80,443}
lockdown=${TOLLGATE_LOCKDOWN:-1}
dns=${TOLLGATE_DNS_SERVERS:-}
uninstall=0

usage() {
  sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "transparent-init: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --uid) [ $# -ge 2 ] || usage; uid=$2; shift 2 ;;
    --port) [ $# -ge 2 ] || usage; port=$2; shift 2 ;;
    --ports) [ $# -ge 2 ] || usage; ports=$2; shift 2 ;;
    --dns-servers) [ $# -ge 2 ] || usage; dns=$2; shift 2 ;;
    --lockdown) lockdown=1; shift ;;
    --no-lockdown) lockdown=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) usage ;;
    *) echo "transparent-init: unknown argument: $1" >&2; usage ;;
  esac
done

is_port() {
  case "$1" in ''|*[!0-9]*) return 1 ;; esac
  [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

if [ "$uninstall" = 0 ]; then
  case "$uid" in ''|*[!0-9]*) die "--uid (or TOLLGATE_UID) must be the sidecar's numeric uid" ;; esac
  is_port "$port" || die "--port: not a port: $port"
  for p in $(echo "$ports" | tr ',' ' '); do
    is_port "$p" || die "--ports: not a port: $p"
  done
  [ -n "$(echo "$ports" | tr -d ', ')" ] || die "--ports: empty"
  case "$lockdown" in 0|1) ;; *) die "TOLLGATE_LOCKDOWN must be 0 or 1" ;; esac
  if [ -z "$dns" ]; then
    dns=$(awk '$1 == "nameserver" { printf "%s%s", sep, $2; sep = "," }' /etc/resolv.conf 2>/dev/null || true)
  fi
  [ "$dns" = none ] && dns=
fi

have_ipv6() {
  [ -e /proc/net/if_inet6 ]
}

# remove_chain TOOL TABLE CHAIN: every jump from OUTPUT to CHAIN, then the chain itself.
remove_chain() {
  while "$1" -w -t "$2" -D OUTPUT -j "$3" 2>/dev/null; do :; done
  if "$1" -w -t "$2" -n -L "$3" >/dev/null 2>&1; then
    "$1" -w -t "$2" -F "$3"
    "$1" -w -t "$2" -X "$3"
  fi
}

# fresh_chain TOOL TABLE CHAIN: an empty chain that OUTPUT jumps to first, exactly once.
fresh_chain() {
  "$1" -w -t "$2" -N "$3" 2>/dev/null || "$1" -w -t "$2" -F "$3"
  while "$1" -w -t "$2" -D OUTPUT -j "$3" 2>/dev/null; do :; done
  "$1" -w -t "$2" -I OUTPUT 1 -j "$3"
}

# install_family TOOL LOOPBACK FAMILY: both chains for iptables (4) or ip6tables (6).
install_family() {
  t=$1
  fresh_chain "$t" nat "$NAT_CHAIN"
  "$t" -w -t nat -A "$NAT_CHAIN" -m owner --uid-owner "$uid" -j RETURN
  "$t" -w -t nat -A "$NAT_CHAIN" -d "$2" -j RETURN
  "$t" -w -t nat -A "$NAT_CHAIN" -o lo -j RETURN
  for p in $(echo "$ports" | tr ',' ' '); do
    "$t" -w -t nat -A "$NAT_CHAIN" -p tcp --dport "$p" -j REDIRECT --to-ports "$port"
  done
  if [ "$lockdown" = 0 ]; then
    remove_chain "$t" filter "$FILTER_CHAIN"
    return
  fi
  fresh_chain "$t" filter "$FILTER_CHAIN"
  "$t" -w -t filter -A "$FILTER_CHAIN" -m owner --uid-owner "$uid" -j RETURN
  # Redirected connections show here with their new, loopback, destination but still the
  # outbound interface: -o lo alone would not let them through.
  "$t" -w -t filter -A "$FILTER_CHAIN" -d "$2" -j RETURN
  "$t" -w -t filter -A "$FILTER_CHAIN" -o lo -j RETURN
  if [ "$3" = 6 ]; then
    # Neighbour discovery: the kernel sends it for every uid's traffic (from a root-owned
    # socket); without it IPv6 would not work for the sidecar either.
    for type in router-solicitation neighbour-solicitation neighbour-advertisement; do
      "$t" -w -t filter -A "$FILTER_CHAIN" -p ipv6-icmp --icmpv6-type "$type" -j RETURN
    done
  fi
  "$t" -w -t filter -A "$FILTER_CHAIN" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
  for server in $(echo "$dns" | tr ',' ' '); do
    case "$server" in
      *:*) [ "$3" = 6 ] || continue ;;
      *) [ "$3" = 4 ] || continue ;;
    esac
    "$t" -w -t filter -A "$FILTER_CHAIN" -d "$server" -p udp --dport 53 -j RETURN
    "$t" -w -t filter -A "$FILTER_CHAIN" -d "$server" -p tcp --dport 53 -j RETURN
  done
  "$t" -w -t filter -A "$FILTER_CHAIN" -p tcp -j REJECT --reject-with tcp-reset
  "$t" -w -t filter -A "$FILTER_CHAIN" -j REJECT
}

if [ "$uninstall" = 1 ]; then
  remove_chain iptables nat "$NAT_CHAIN"
  remove_chain iptables filter "$FILTER_CHAIN"
  if have_ipv6; then
    remove_chain ip6tables nat "$NAT_CHAIN"
    remove_chain ip6tables filter "$FILTER_CHAIN"
  fi
  echo "transparent-init: removed $NAT_CHAIN and $FILTER_CHAIN"
  exit 0
fi

install_family iptables 127.0.0.0/8 4
if have_ipv6; then
  install_family ip6tables ::1/128 6
else
  echo "transparent-init: the kernel has no IPv6; only IPv4 is redirected" >&2
fi
echo "transparent-init: tcp ports $ports -> $port for every uid but $uid;" \
  "lockdown $( [ "$lockdown" = 1 ] && echo "on (dns: ${dns:-none})" || echo off)"
