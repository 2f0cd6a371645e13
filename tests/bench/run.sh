#!/usr/bin/env bash
# Forward-proxy benchmark: in one run on loopback, an nginx origin served directly and
# through Tollgate (forward), nginx (reverse), HAProxy (reverse) and squid (forward).
# Each target: wrk with CONNS connections for DURATION (throughput, and the proxy's CPU
# time from /proc per request), then one connection for LATENCY_DURATION (p50/p99).
#
#   tests/bench/run.sh [--out FILE]      (./dev bench installs the peers and builds first)
# Environment: TOLLGATE_BIN, WORKERS (1), CONNS (64), DURATION (10s), LATENCY_DURATION (5s),
# ROUNDS (3): the targets are run in turn ROUNDS times and each figure is the median, since
# loopback figures on a shared machine move by tens of percent from one run to the next.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
root=$(cd "$here/../.." && pwd)
TOLLGATE_BIN=${TOLLGATE_BIN:-$root/build/tollgate}
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
LATENCY_DURATION=${LATENCY_DURATION:-5s}
ROUNDS=${ROUNDS:-3}
# Which targets to run; tollgate+policy is Tollgate with examples/policies/swarm.yaml and
# tests/bench/policy.yaml loaded (every call extracted and evaluated); tollgate-unaudited is
# Tollgate with `audit: {sink: memory}` (no durable stream), the peer of the audited one;
# tollgate-ramdisk is the audited one with its audit directory on a RAM file system
# (RAMDISK, /dev/shm): the same records, chain and batches, but a sync that costs nothing,
# so it tells the software's cost from the disk's cache flush (skipped when RAMDISK is not
# a tmpfs); tollgate-buffered (not run unless named) is the audited one with
# `direct_io: false` (its batches through the page cache and fdatasync, not O_DIRECT).
TARGETS=${TARGETS:-direct tollgate tollgate-unaudited tollgate-ramdisk tollgate+policy nginx haproxy squid}
RAMDISK=${RAMDISK:-/dev/shm}
OUT=""
[[ "${1:-}" == "--out" ]] && OUT=$2

for tool in wrk nginx haproxy squid curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run ./dev bench (it installs the peers)" >&2; exit 2; }
done
[[ -x "$TOLLGATE_BIN" ]] || { echo "no tollgate binary at $TOLLGATE_BIN: ./dev build" >&2; exit 2; }

work=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  if ((rc != 0)); then  # what the targets said before the run ended
    for f in "$work"/*.log "$work"/squid/cache.log; do
      [[ -s $f ]] && { echo "--- $f (last lines)" >&2; tail -n 5 "$f" >&2; }
    done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $work/origin/nginx.pid ]] && kill "$(cat "$work/origin/nginx.pid")" 2>/dev/null || true
  [[ -f $work/rp/nginx.pid ]] && kill "$(cat "$work/rp/nginx.pid")" 2>/dev/null || true
  [[ -f $work/squid/squid.pid ]] && kill "$(cat "$work/squid/squid.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$work"
  [[ -n ${ramdisk_audit:-} ]] && rm -rf "$ramdisk_audit"
}
trap cleanup EXIT
[[ -n "${KEEP:-}" ]] && trap - EXIT



origin_port=$(free_port)
nginx_conf "$work/origin" "  server { listen 127.0.0.1:$origin_port; location / { return 200 \"hello from the origin\\n\"; } }"
# The origin gets every core it wants: it must not be what limits the proxies.
sed -i "s/^worker_processes .*/worker_processes 2;/" "$work/origin/nginx.conf"
nginx -p "$work/origin" -c "$work/origin/nginx.conf"
wait_port "$origin_port"
export ORIGIN=127.0.0.1:$origin_port

# Starts a Tollgate target: VAR (its port goes in VAR_port, its pid in VAR_pid), NAME (its
# config and log files), the listener's extra keys, and the rest of its config.
start_tollgate() {  # VAR NAME LISTENER-EXTRA CONFIG
  local port admin; port=$(free_port); admin=$(free_port)
  cat > "$work/$2.yaml" <<CONF
workers: $WORKERS
log: {level: ${TOLLGATE_LOG:-warn}}
listeners: [{name: egress, kind: forward, address: "127.0.0.1:$port"$3}]
admin: {address: "127.0.0.1:$admin"}
$4
CONF
  "$TOLLGATE_BIN" run -c "$work/$2.yaml" 2>"$work/$2.log" &
  pids+=("$!")
  printf -v "$1_port" %s "$port"
  printf -v "$1_pid" %s "$!"
}
allow_origin='hosts: {allow: ["127.0.0.1"]}'
start_tollgate tollgate tollgate "" "$allow_origin
audit: {dir: \"$work/audit-tollgate\"}"
start_tollgate unaudited tollgate-unaudited "" "$allow_origin
audit: {sink: memory}"
ramdisk_audit=""
if [[ " $TARGETS " == *" tollgate-ramdisk "* ]]; then
  if [[ $(stat -f -c %T "$RAMDISK" 2>/dev/null) == tmpfs ]]; then
    ramdisk_audit=$(mktemp -d "$RAMDISK/tollgate-bench-audit.XXXXXX")
    start_tollgate ramdisk tollgate-ramdisk "" "$allow_origin
audit: {dir: \"$ramdisk_audit\"}"
  else
    echo "skipping tollgate-ramdisk: $RAMDISK is not a tmpfs" >&2
    TARGETS=${TARGETS/tollgate-ramdisk/}
  fi
fi
start_tollgate buffered tollgate-buffered "" "$allow_origin
audit: {dir: \"$work/audit-buffered\", direct_io: false}"
start_tollgate policy tollgate-policy ", identity: {header: X-Agent-Id}" \
  "policies: [\"$root/examples/policies/swarm.yaml\", \"$here/policy.yaml\"]
audit: {dir: \"$work/audit-policy\"}"

rp_port=$(free_port)
nginx_conf "$work/rp" "  upstream origin { server $ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$rp_port; location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx -p "$work/rp" -c "$work/rp/nginx.conf"

haproxy_port=$(free_port)
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  server origin $ORIGIN
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!; pids+=("$haproxy_pid")

squid_port=$(free_port)
mkdir -p "$work/squid"
cat > "$work/squid/squid.conf" <<CONF
http_port 127.0.0.1:$squid_port
pid_filename $work/squid/squid.pid
access_log none
cache_log $work/squid/cache.log
cache_store_log none
cache deny all
cache_mem 8 MB
coredump_dir $work/squid
http_access allow localhost
http_access deny all
shutdown_lifetime 1 seconds
workers $WORKERS
CONF
squid -N -f "$work/squid/squid.conf" >"$work/squid/out.log" 2>&1 &
squid_pid=$!; pids+=("$squid_pid")

for p in $tollgate_port $unaudited_port ${ramdisk_port:-} $buffered_port $policy_port $rp_port $haproxy_port $squid_port; do wait_port "$p"; done
rp_pids=$(pgrep -P "$(cat "$work/rp/nginx.pid")" | tr '\n' ' ')

# Smoke checks: every target must answer with the origin's body.
check() {  # NAME CURL-ARGS...
  local name=$1; shift
  local body; body=$(curl -s --max-time 5 "$@") || true
  [[ "$body" == "hello from the origin" ]] || { echo "$name does not proxy: got '$body'" >&2; exit 1; }
}
check direct "http://$ORIGIN/"
check tollgate --proxy "http://127.0.0.1:$tollgate_port" "http://$ORIGIN/"
check tollgate-unaudited --proxy "http://127.0.0.1:$unaudited_port" "http://$ORIGIN/"
[[ -n $ramdisk_audit ]] && check tollgate-ramdisk --proxy "http://127.0.0.1:$ramdisk_port" "http://$ORIGIN/"
check tollgate-buffered --proxy "http://127.0.0.1:$buffered_port" "http://$ORIGIN/"
check tollgate+policy --proxy "http://127.0.0.1:$policy_port" -H "X-Agent-Id: bench-agent" "http://$ORIGIN/"
check nginx "http://127.0.0.1:$rp_port/"
check haproxy "http://127.0.0.1:$haproxy_port/"
check squid --proxy "http://127.0.0.1:$squid_port" "http://$ORIGIN/"

declare -A rps p50 p99 cpu errors
run_target() {  # NAME URL FORWARD PIDS...
  local name=$1 url=$2 forward=$3; shift 3
  local script=() ; [[ $forward == 1 ]] && script=(-s "$here/forward.lua")
  local before after out
  before=$( (($#)) && cpu_ticks "$@" || echo 0)
  out=$(wrk -t2 -c"$CONNS" -d"$DURATION" "${script[@]}" "$url") ||
    { echo "wrk against $name failed: $out" >&2; exit 1; }
  after=$( (($#)) && cpu_ticks "$@" || echo 0)
  local requests; requests=$(awk '/requests in/ {print $1}' <<<"$out")
  rps[$name]+=" $(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
  errors[$name]+=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  if (($#)); then
    cpu[$name]+=" $(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')"
  fi
  out=$(FORWARD=$forward wrk -t1 -c1 -d"$LATENCY_DURATION" -s "$here/latency.lua" "$url") ||
    { echo "wrk (1 connection) against $name failed: $out" >&2; exit 1; }
  p50[$name]+=" $(sed -n 's/^LATENCY p50=\([0-9]*\).*/\1/p' <<<"$out")"
  p99[$name]+=" $(sed -n 's/^LATENCY .*p99=\([0-9]*\)/\1/p' <<<"$out")"
}

echo "running $ROUNDS rounds: $CONNS connections for $DURATION, then 1 connection for $LATENCY_DURATION, per target" >&2
squid_pids="$squid_pid $(pgrep -P "$squid_pid" | tr '\n' ' ')"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round" >&2
  for t in $TARGETS; do
    case $t in
      direct) run_target direct "http://$ORIGIN/" 0 ;;
      tollgate) run_target tollgate "http://127.0.0.1:$tollgate_port" 1 "$tollgate_pid" ;;
      tollgate-unaudited) run_target tollgate-unaudited "http://127.0.0.1:$unaudited_port" 1 "$unaudited_pid" ;;
      tollgate-ramdisk) run_target tollgate-ramdisk "http://127.0.0.1:$ramdisk_port" 1 "$ramdisk_pid" ;;
      tollgate-buffered) run_target tollgate-buffered "http://127.0.0.1:$buffered_port" 1 "$buffered_pid" ;;
      tollgate+policy) run_target tollgate+policy "http://127.0.0.1:$policy_port" 1 "$policy_pid" ;;
      # shellcheck disable=SC2086
      nginx) run_target nginx "http://127.0.0.1:$rp_port/" 0 $rp_pids ;;
      haproxy) run_target haproxy "http://127.0.0.1:$haproxy_port/" 0 "$haproxy_pid" ;;
      # shellcheck disable=SC2086
      squid) run_target squid "http://127.0.0.1:$squid_port" 1 $squid_pids ;;
    esac
  done
done
echo "per round, requests/s:" >&2
for t in $TARGETS; do
  echo "  $t:${rps[$t]}  cpu µs/req:${cpu[$t]:- -}" >&2
done
# The audited targets against the unaudited one, round by round (each pair ran minutes apart
# at most, so these move less with the machine than the medians do).
for t in tollgate tollgate-ramdisk tollgate-buffered; do
  [[ -n "${rps[$t]:-}" && -n "${rps[tollgate-unaudited]:-}" ]] || continue
  echo "  $t / tollgate-unaudited per round: $(paste -d' ' <(tr ' ' '\n' <<<"${rps[$t]# }") \
    <(tr ' ' '\n' <<<"${rps[tollgate-unaudited]# }") | awk '{printf "%.2f ", $1 / $2}')" >&2
done
for t in $TARGETS; do
  rps[$t]=$(median <<<"${rps[$t]}"); p50[$t]=$(median <<<"${p50[$t]}"); p99[$t]=$(median <<<"${p99[$t]}")
  cpu[$t]=$(median <<<"${cpu[$t]:-}")
done

table=$(
  echo "| target | mode | requests/s | p50 µs (1 conn) | p99 µs (1 conn) | proxy CPU µs/req | throughput vs direct | CPU vs nginx |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  for t in $TARGETS; do
    case $t in direct) mode="origin";; tollgate*|squid) mode="forward";; *) mode="reverse";; esac
    ratio=$(awk -v a="${rps[$t]}" -v b="${rps[direct]:-0}" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}')
    cratio="-"
    [[ ${cpu[$t]} != "-" && -n "${cpu[nginx]:-}" ]] && cratio=$(awk -v a="${cpu[$t]}" -v b="${cpu[nginx]}" 'BEGIN {printf "%.2f", a / b}')
    echo "| $t | $mode | ${rps[$t]} | ${p50[$t]} | ${p99[$t]} | ${cpu[$t]} | $ratio | $cratio |"
  done
)
echo "$table"
for t in $TARGETS; do
  [[ -n "${errors[$t]// /}" ]] && echo "note: $t: ${errors[$t]}"
done
verdict=$(
  ratio_line "Tollgate CPU/req vs nginx" "${cpu[tollgate]:-}" "${cpu[nginx]:-}" "<= 1.00"
  ratio_line "Tollgate throughput vs squid" "${rps[tollgate]:-}" "${rps[squid]:-}" ">= 5"
  ratio_line "Tollgate throughput with the audit stream vs without" "${rps[tollgate]:-}" "${rps[tollgate-unaudited]:-}" ">= 0.85"
  ratio_line "Tollgate CPU/req with the audit stream vs without" "${cpu[tollgate]:-}" "${cpu[tollgate-unaudited]:-}" "-"
  ratio_line "Tollgate throughput with the audit stream on a RAM disk vs without" "${rps[tollgate-ramdisk]:-}" "${rps[tollgate-unaudited]:-}" "-"
  ratio_line "Tollgate CPU/req with O_DIRECT audit batches vs buffered" "${cpu[tollgate]:-}" "${cpu[tollgate-buffered]:-}" "-"
  ratio_line "Tollgate throughput with O_DIRECT audit batches vs buffered" "${rps[tollgate]:-}" "${rps[tollgate-buffered]:-}" "-"
  ratio_line "Tollgate CPU/req with the swarm policy vs without" "${cpu[tollgate+policy]:-}" "${cpu[tollgate]:-}" "<= 1.10"
)
report "$table" "$verdict" "(medians of $ROUNDS rounds; workers $WORKERS, $CONNS connections, $DURATION; wrk, the origin and the proxies share $(nproc) cores)" "$OUT"
