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
#   nat OUTPUT -> TOLLGATE_OUTPUT (the first rule of OUTPUT):
#     traffic of the sidecar's uid                  RETURN  (its own upstream calls)
#     to loopback (127.0.0.0/8, ::1, out via lo)    RETURN  (local, not outbound)
#     tcp to each port of --ports (default 80,443)  REDIRECT to --port (default 15001)
#   filter OUTPUT -> TOLLGATE_LOCKDOWN (the first rule of OUTPUT; unless --no-lockdown):
#     traffic of the sidecar's uid                  RETURN
#     to loopback, or out via lo                    RETURN  (redirected traffic is to loopback)
#     IPv6 neighbour discovery from the kernel      RETURN  (RS, NS, NA; hop limit 255, to
#                                                            where ND goes)
#     replies on established connections            RETURN  (inbound connections keep working)
#     DNS (udp and tcp 53) to the resolvers         RETURN  (--dns-servers; default: the
#                                                            nameservers of /etc/resolv.conf)
#     anything else                                 REJECT  (tcp reset for TCP)
#
# Every uid but the sidecar's is redirected and locked down. That holds an agent only if it
# runs as another uid and cannot become one (runAsNonRoot; allowPrivilegeEscalation: false,
# so no CAP_SETUID and no setuid binaries), and holds neither CAP_NET_ADMIN (it could change
# these rules) nor CAP_NET_RAW (an AF_PACKET socket sends past netfilter's OUTPUT hooks):
# drop all capabilities from the agent's container.
#
# Without the lockdown, a port outside --ports (8080, 8443, ...) and any UDP go out
# untouched: the lockdown is on by default because "the agent cannot opt out" needs it. DNS
# stays open to the resolvers only, and a resolver can still carry data out in the names it
# looks up; pass --dns-servers none where the sidecar and the agent need no DNS (or a
# resolver on loopback).
#
# The sidecar's transparent listeners must accept on 127.0.0.1:PORT and [::1]:PORT, where
# REDIRECT sends locally made connections.
#
# Fails closed. Every argument is checked before anything is touched (exit 2). Each family's
# chains and jumps are then written by one `iptables-restore --noflush` (`ip6tables-restore`),
# which commits a table whole or not at all, so a re-run never shows an emptied chain; the
# filter table goes first. If a family cannot be set up (no ip6tables, no IPv6 nat table, a
# rule the kernel refuses), the script puts a bare lockdown there instead (the sidecar's uid
# and loopback only, everything else rejected) and exits 1; an init container that exits 1
# also keeps the agent from starting.
#
# Idempotent: running it again with the same options changes nothing, each jump exists once;
# with other options it leaves exactly what those options ask for. Nothing but the two chains
# and the jumps to them is touched; --uninstall removes those and nothing else. Needs
# CAP_NET_ADMIN (an init container with securityContext.capabilities.add: [NET_ADMIN]). When
# the kernel has no IPv6, IPv6 is skipped with a note (there is no IPv6 to bypass through).
set -u

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
# A bad argument: said before anything is changed.
bad() {
  echo "transparent-init: $*" >&2
  exit 2
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

# Decimal without leading zeros (which some parsers read as octal), at most MAX.
is_number() {
  case "$1" in ''|*[!0-9]*|0?*) return 1 ;; esac
  [ ${#1} -le 10 ] && [ "$1" -le "$2" ]
}

is_port() {
  is_number "$1" 65535 && [ "$1" -ge 1 ]
}

is_ipv4() {
  case "$1" in ''|*[!0-9.]*|.*|*.|*..*) return 1 ;; esac
  old_ifs=$IFS
  IFS=.
  # shellcheck disable=SC2086 # split on the dots (no glob characters got this far)
  set -- $1
  IFS=$old_ifs
  [ $# -eq 4 ] || return 1
  for octet; do
    is_number "$octet" 255 || return 1
  done
}

# An IPv6 address as iptables takes it: hex groups, one "::" at most, an IPv4 tail allowed,
# no zone (%eth0) and no prefix.
is_ipv6() {
  case "$1" in ''|*[!0-9a-fA-F:.]*|*:::*|*::*::*|:[!:]*|*[!:]:) return 1 ;; esac
  addr=$1
  case "$addr" in
    *.*) v4=${addr##*:}; is_ipv4 "$v4" || return 1; addr=${addr%"$v4"}0:0 ;;
  esac
  case "$addr" in
    *::*) head=${addr%%::*}; tail=${addr#*::}; most=7 ;;
    *) head=$addr; tail=; most=8 ;;
  esac
  n=0
  for part in "$head" "$tail"; do
    [ -n "$part" ] || continue
    old_ifs=$IFS
    IFS=:
    # shellcheck disable=SC2086 # split on the colons (no glob characters got this far)
    set -- $part
    IFS=$old_ifs
    for group; do
      case "$group" in ''|?????*|*[!0-9a-fA-F]*) return 1 ;; esac
      n=$((n + 1))
    done
  done
  if [ "$most" = 8 ]; then [ "$n" -eq 8 ]; else [ "$n" -le 7 ]; fi
}

if [ "$uninstall" = 0 ]; then
  # 4294967295 is (uid_t)-1, no one's uid.
  is_number "$uid" 4294967294 || bad "--uid (or TOLLGATE_UID) must be the sidecar's numeric uid, not '$uid'"
  is_port "$port" || bad "--port: not a port: '$port'"
  case "$ports" in ''|,*|*,|*,,*) bad "--ports: a comma-separated list of ports, not '$ports'" ;; esac
  for p in $(echo "$ports" | tr ',' ' '); do
    is_port "$p" || bad "--ports: not a port: '$p'"
  done
  case "$lockdown" in 0|1) ;; *) bad "TOLLGATE_LOCKDOWN must be 0 or 1, not '$lockdown'" ;; esac
  dns_from=--dns-servers
  if [ -z "$dns" ]; then
    # A link-local resolver's zone (fe80::1%eth0) is not something iptables can match.
    dns=$(awk '$1 == "nameserver" { sub(/%.*/, "", $2); printf "%s%s", sep, $2; sep = "," }' \
      /etc/resolv.conf 2>/dev/null || true)
    dns_from="the nameservers of /etc/resolv.conf"
  fi
  [ "$dns" = none ] && dns=
  case "$dns" in ,*|*,|*,,*) bad "$dns_from: a comma-separated list of addresses, not '$dns'" ;; esac
  for server in $(echo "$dns" | tr ',' ' '); do
    is_ipv4 "$server" || is_ipv6 "$server" || bad "$dns_from: not an IPv4 or IPv6 address: '$server'"
  done
fi

have_ipv6() {
  [ -e /proc/net/if_inet6 ]
}

# jump_lines TOOL TABLE CHAIN: the restore lines that leave one jump from OUTPUT to CHAIN,
# as OUTPUT's first rule; none when it is so already (a re-run then changes nothing there).
jump_lines() {
  "$1" -w -t "$2" -S OUTPUT 2>/dev/null | awk -v jump="-A OUTPUT -j $3" '
    /^-A OUTPUT / { rules++; if ($0 == jump) { jumps++; if (rules == 1) first = 1 } }
    END {
      if (first && jumps == 1) exit
      for (i = 0; i < jumps; i++) print "-D OUTPUT -j " substr(jump, 13)
      print "-I OUTPUT 1 -j " substr(jump, 13)
    }'
}

# removal_lines TOOL TABLE CHAIN: the restore lines that remove CHAIN and every jump to it.
removal_lines() {
  "$1" -w -t "$2" -S OUTPUT 2>/dev/null | awk -v jump="-A OUTPUT -j $3" '
    $0 == jump { print "-D OUTPUT -j " substr(jump, 13) }'
  if "$1" -w -t "$2" -S "$3" >/dev/null 2>&1; then
    echo "-F $3"
    echo "-X $3"
  fi
}

# table TABLE LINES: a restore section, or nothing when there is nothing to do in TABLE.
table() {
  [ -n "$2" ] || return 0
  printf '*%s\n%s\nCOMMIT\n' "$1" "$2"
}

# install_rules TOOL LOOPBACK FAMILY: the whole restore input for iptables (4) or ip6tables (6).
# The filter table comes first: if the nat table then fails, egress is already locked down.
install_rules() {
  t=$1
  if [ "$lockdown" = 1 ]; then
    echo "*filter"
    echo ":$FILTER_CHAIN - [0:0]"
    echo "-A $FILTER_CHAIN -m owner --uid-owner $uid -j RETURN"
    # Redirected connections show here with their new, loopback, destination but still the
    # outbound interface: -o lo alone would not let them through.
    echo "-A $FILTER_CHAIN -d $2 -j RETURN"
    echo "-A $FILTER_CHAIN -o lo -j RETURN"
    if [ "$3" = 6 ]; then
      # Neighbour discovery, without which IPv6 would not work for the sidecar either, as the
      # kernel sends it: from a socket of its own with no file behind it (the owner match
      # below takes that and nothing a process sends, raw sockets included), with hop limit
      # 255 (RFC 4861: anything else is dropped) and to where ND goes: RS to all-routers, NS
      # to a solicited-node group or, for NUD, to a neighbour's unicast address, NA to
      # all-nodes or to the soliciting neighbour. Hop limit 255 alone would not keep a packet
      # on the link (a router forwards it); the owner match is what carries nothing out.
      nd="-p ipv6-icmp -m icmp6 --icmpv6-type"
      kernel="-m hl --hl-eq 255 -m owner ! --uid-owner 0-4294967294"
      echo "-A $FILTER_CHAIN -d ff02::2/128 $nd router-solicitation $kernel -j RETURN"
      echo "-A $FILTER_CHAIN -d ff02::1:ff00:0/104 $nd neighbour-solicitation $kernel -j RETURN"
      echo "-A $FILTER_CHAIN ! -d ff00::/8 $nd neighbour-solicitation $kernel -j RETURN"
      echo "-A $FILTER_CHAIN -d ff02::1/128 $nd neighbour-advertisement $kernel -j RETURN"
      echo "-A $FILTER_CHAIN ! -d ff00::/8 $nd neighbour-advertisement $kernel -j RETURN"
    fi
    echo "-A $FILTER_CHAIN -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    for server in $(echo "$dns" | tr ',' ' '); do
      case "$server" in
        *:*) [ "$3" = 6 ] || continue ;;
        *) [ "$3" = 4 ] || continue ;;
      esac
      echo "-A $FILTER_CHAIN -d $server -p udp -m udp --dport 53 -j RETURN"
      echo "-A $FILTER_CHAIN -d $server -p tcp -m tcp --dport 53 -j RETURN"
    done
    echo "-A $FILTER_CHAIN -p tcp -j REJECT --reject-with tcp-reset"
    echo "-A $FILTER_CHAIN -j REJECT"
    jump_lines "$t" filter "$FILTER_CHAIN"
    echo "COMMIT"
  else
    table filter "$(removal_lines "$t" filter "$FILTER_CHAIN")"
  fi
  echo "*nat"
  echo ":$NAT_CHAIN - [0:0]"
  echo "-A $NAT_CHAIN -m owner --uid-owner $uid -j RETURN"
  echo "-A $NAT_CHAIN -d $2 -j RETURN"
  echo "-A $NAT_CHAIN -o lo -j RETURN"
  for p in $(echo "$ports" | tr ',' ' '); do
    echo "-A $NAT_CHAIN -p tcp -m tcp --dport $p -j REDIRECT --to-ports $port"
  done
  jump_lines "$t" nat "$NAT_CHAIN"
  echo "COMMIT"
}

# bare_lockdown_rules TOOL LOOPBACK OWNER: what is left when the full rules could not be
# installed: loopback (and, with OWNER=1, the sidecar's uid) pass, everything else is
# rejected. Without OWNER the sidecar is cut off too, for a kernel without the owner match.
bare_lockdown_rules() {
  echo "*filter"
  echo ":$FILTER_CHAIN - [0:0]"
  [ "$3" = 1 ] && echo "-A $FILTER_CHAIN -m owner --uid-owner $uid -j RETURN"
  echo "-A $FILTER_CHAIN -d $2 -j RETURN"
  echo "-A $FILTER_CHAIN -o lo -j RETURN"
  echo "-A $FILTER_CHAIN -j REJECT"
  jump_lines "$1" filter "$FILTER_CHAIN"
  echo "COMMIT"
}

# restore TOOL RULES: applies RULES in one transaction; on failure says why on stderr.
restore() {
  if ! command -v "$1-restore" >/dev/null 2>&1; then
    echo "transparent-init: $1-restore: not found" >&2
    return 127
  fi
  printf '%s\n' "$2" | "$1-restore" -w --noflush
}

# apply_family TOOL LOOPBACK FAMILY NAME: installs one family, or fails closed.
apply_family() {
  if restore "$1" "$(install_rules "$1" "$2" "$3")"; then
    return 0
  fi
  for owner in 1 0; do
    if restore "$1" "$(bare_lockdown_rules "$1" "$2" "$owner")" 2>/dev/null; then
      who="every uid"
      [ "$owner" = 1 ] && who="every uid but $uid"
      echo "transparent-init: $4: the rules could not be installed; $4 egress of $who" \
        "is rejected instead" >&2
      return 1
    fi
  done
  echo "transparent-init: $4: the rules could not be installed, nor a lockdown:" \
    "$4 EGRESS IS NOT BLOCKED; do not start the agent" >&2
  return 1
}

# remove_family TOOL: removes both chains and their jumps in one transaction.
remove_family() {
  rules="$(table filter "$(removal_lines "$1" filter "$FILTER_CHAIN")")
$(table nat "$(removal_lines "$1" nat "$NAT_CHAIN")")"
  [ -z "$(echo "$rules" | tr -d '\n')" ] || restore "$1" "$rules"
}

if [ "$uninstall" = 1 ]; then
  status=0
  remove_family iptables || status=1
  if have_ipv6; then
    remove_family ip6tables || status=1
  fi
  if [ "$status" = 0 ]; then
    echo "transparent-init: removed $NAT_CHAIN and $FILTER_CHAIN"
  else
    echo "transparent-init: --uninstall failed; the rules that were there are still there" >&2
  fi
  exit "$status"
fi

status=0
apply_family iptables 127.0.0.0/8 4 IPv4 || status=1
if have_ipv6; then
  apply_family ip6tables ::1/128 6 IPv6 || status=1
else
  echo "transparent-init: the kernel has no IPv6; only IPv4 is redirected" >&2
fi
[ "$status" = 0 ] || exit 1
echo "transparent-init: tcp ports $ports -> $port for every uid but $uid;" \
  "lockdown $( [ "$lockdown" = 1 ] && echo "on (dns: ${dns:-none})" || echo off)"
