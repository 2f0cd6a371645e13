#!/usr/bin/env bash
# HTTPS benchmark: in one run on loopback, an nginx HTTPS origin served directly, through
# nginx terminating TLS as a reverse proxy in front of the plain-HTTP origin (and, as
# nginx-reencrypt, re-originating TLS to the HTTPS origin with verification, the work an
# intercepting proxy does), through mitmproxy (mitmdump, regular proxy mode) and through
# Tollgate (forward listener with intercept_tls, a CA from `tollgate certs init`,
# tests/bench/policy.yaml). wrk cannot speak through CONNECT, so the load is
# build/tests/https_load, which verifies every certificate chain and host name.
# Each target, in two modes:
#   keep-alive  CONNS connections for DURATION: HTTPS requests/s and the proxy's CPU per
#               request (utime+stime from /proc), then 1 connection for LATENCY_DURATION
#               (p50/p99);
#   new-conn    a new TCP connection and full TLS handshake (no resumption) per request,
#               NEW_CONNS connections: handshakes/s and CPU per handshake, then 1 connection.
# A target that fails its smoke check (Tollgate without interception) is reported and
# skipped; the others run.
#
#   tests/bench/tls.sh [--out FILE]      (./dev bench tls installs the peers and builds first)
# Environment: TOLLGATE_BIN, HTTPS_LOAD_BIN, WORKERS (1), CONNS (64), NEW_CONNS (16),
# DURATION (10), LATENCY_DURATION (3) in seconds, ROUNDS (3): every figure is the median of
# ROUNDS rounds; TARGETS (direct nginx nginx-reencrypt mitmproxy tollgate tollgate-ramdisk:
# the audit directory on RAMDISK, /dev/shm, a tmpfs); MODES (keep-alive new-conn);
# TOLLGATE_AUDIT (file; memory: no durable stream).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
root=$(cd "$here/../.." && pwd)
TOLLGATE_BIN=${TOLLGATE_BIN:-$root/build/tollgate}
HTTPS_LOAD_BIN=${HTTPS_LOAD_BIN:-$root/build/tests/https_load}
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-64}
NEW_CONNS=${NEW_CONNS:-16}
DURATION=${DURATION:-10}
LATENCY_DURATION=${LATENCY_DURATION:-3}
ROUNDS=${ROUNDS:-3}
TARGETS=${TARGETS:-direct nginx nginx-reencrypt mitmproxy tollgate tollgate-ramdisk}
RAMDISK=${RAMDISK:-/dev/shm}
MODES=${MODES:-keep-alive new-conn}
TOLLGATE_AUDIT=${TOLLGATE_AUDIT:-file}
OUT=""
[[ "${1:-}" == "--out" ]] && OUT=$2
DURATION=${DURATION%s} LATENCY_DURATION=${LATENCY_DURATION%s}  # run.sh's "10s" works too

for tool in nginx mitmdump /usr/bin/python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run ./dev bench tls (it installs the peers)" >&2; exit 2; }
done
[[ -x "$TOLLGATE_BIN" ]] || { echo "no tollgate binary at $TOLLGATE_BIN: ./dev build" >&2; exit 2; }
[[ -x "$HTTPS_LOAD_BIN" ]] || { echo "no https_load at $HTTPS_LOAD_BIN: ./dev build" >&2; exit 2; }

work=$(mktemp -d /tmp/tollgate-tlsbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for d in origin rp; do
    [[ -f $work/$d/nginx.pid ]] && kill "$(cat "$work/$d/nginx.pid")" 2>/dev/null || true
  done
  sleep 0.3
  rm -rf "$work"
  [[ -n ${ramdisk_audit:-} ]] && rm -rf "$ramdisk_audit"
}
trap cleanup EXIT
[[ -n "${KEEP:-}" ]] && trap - EXIT

json_field() { sed -n "s/.*\"$1\":\\([^,}]*\\).*/\\1/p"; }  # FIELD < one JSON line

# The origins' PKI: a test CA and a leaf for localhost / 127.0.0.1 (tests/integration/tls_fixtures.py).
PYTHONPATH=$root/tests/integration /usr/bin/python3 -c '
import sys
from tls_fixtures import TestPki
TestPki(sys.argv[1]).leaf("origin", names=("localhost",), ips=("127.0.0.1",))
' "$work/pki"
ca=$work/pki/ca.crt

# Every nginx here serves TLS with the origin's leaf, without session cache or tickets.
NGINX_HTTP_EXTRA="  ssl_certificate $work/pki/origin.crt; ssl_certificate_key $work/pki/origin.key;
  ssl_session_cache off; ssl_session_tickets off;"

# The origin: plain HTTP (behind nginx) and HTTPS (direct, and behind the intercepting proxies).
origin_port=$(free_port); origin_tls_port=$(free_port)
nginx_conf "$work/origin" "  server { listen 127.0.0.1:$origin_port; listen 127.0.0.1:$origin_tls_port ssl;
    location / { return 200 \"hello from the origin\\n\"; } }"
# The origin gets every core it wants: it must not be what limits the proxies.
sed -i "s/^worker_processes .*/worker_processes 2;/" "$work/origin/nginx.conf"
nginx -p "$work/origin" -c "$work/origin/nginx.conf"
origin_url=https://127.0.0.1:$origin_tls_port/

rp_port=$(free_port); rp_reencrypt_port=$(free_port)
nginx_conf "$work/rp" "  upstream origin { server 127.0.0.1:$origin_port; keepalive 64; }
  upstream origin_tls { server 127.0.0.1:$origin_tls_port; keepalive 64; }
  server { listen 127.0.0.1:$rp_port ssl;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }
  server { listen 127.0.0.1:$rp_reencrypt_port ssl;
    location / { proxy_pass https://origin_tls; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_ssl_verify on; proxy_ssl_trusted_certificate $ca; proxy_ssl_name localhost;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; } }"
nginx -p "$work/rp" -c "$work/rp/nginx.conf"

mitm_port=$(free_port)
mkdir -p "$work/mitm"
# Regular proxy mode, quiet, no flow file; it trusts the origins' CA for its upstream TLS.
mitmdump -q --listen-host 127.0.0.1 --listen-port "$mitm_port" --set confdir="$work/mitm" \
  --set ssl_verify_upstream_trusted_ca="$ca" --set flow_detail=0 >"$work/mitm/out.log" 2>&1 &
mitm_pid=$!; pids+=("$mitm_pid")

"$TOLLGATE_BIN" certs init "$work/tollgate-ca" >/dev/null
start_tollgate() {  # NAME AUDIT-CONFIG: its port in NAME_port (- for +), its pid in NAME_pid
  local port admin var=${1//-/_}; port=$(free_port); admin=$(free_port)
  cat > "$work/$1.yaml" <<CONF
workers: $WORKERS
log: {level: ${TOLLGATE_LOG:-warn}}
listeners: [{name: egress, kind: forward, address: "127.0.0.1:$port", intercept_tls: true, identity: {header: X-Agent-Id}}]
admin: {address: "127.0.0.1:$admin"}
policies: ["$here/policy.yaml"]
tls: {ca_dir: "$work/tollgate-ca", upstream_ca_file: "$ca"}
audit: $2
CONF
  "$TOLLGATE_BIN" run -c "$work/$1.yaml" 2>"$work/$1.log" &
  pids+=("$!")
  printf -v "${var}_port" %s "$port"
  printf -v "${var}_pid" %s "$!"
}
audit_cfg="{dir: \"$work/audit-tollgate\"}"
[[ $TOLLGATE_AUDIT == memory ]] && audit_cfg="{sink: memory}"
start_tollgate tollgate "$audit_cfg"
# tollgate-ramdisk: the same with its audit directory on a RAM file system, where a sync
# costs nothing: what the records cost without this disk's cache flushes.
ramdisk_audit=""
if [[ " $TARGETS " == *" tollgate-ramdisk "* ]]; then
  if [[ $(stat -f -c %T "$RAMDISK" 2>/dev/null) == tmpfs ]]; then
    ramdisk_audit=$(mktemp -d "$RAMDISK/tollgate-bench-audit.XXXXXX")
    start_tollgate tollgate-ramdisk "{dir: \"$ramdisk_audit\"}"
  else
    echo "skipping tollgate-ramdisk: $RAMDISK is not a tmpfs" >&2
    TARGETS=${TARGETS/tollgate-ramdisk/}
  fi
fi

for p in $origin_port $origin_tls_port $rp_port $rp_reencrypt_port $mitm_port; do wait_port "$p"; done
for _ in $(seq 1 100); do [[ -s $work/mitm/mitmproxy-ca-cert.pem ]] && break; sleep 0.05; done
rp_pids=$(pgrep -P "$(cat "$work/rp/nginx.pid")" | tr '\n' ' ')
agent=(--header "X-Agent-Id: bench-agent" --proxy-header "X-Agent-Id: bench-agent")

# Each target: https_load arguments (after the common ones) and the pids whose CPU is measured.
declare -A args cpu_pids unavailable
args[direct]="--url $origin_url --cacert $ca"
args[nginx]="--url https://127.0.0.1:$rp_port/ --cacert $ca"
args[nginx-reencrypt]="--url https://127.0.0.1:$rp_reencrypt_port/ --cacert $ca"
args[mitmproxy]="--url $origin_url --proxy http://127.0.0.1:$mitm_port --cacert $work/mitm/mitmproxy-ca-cert.pem"
args[tollgate]="--url $origin_url --proxy http://127.0.0.1:$tollgate_port --cacert $work/tollgate-ca/ca.crt"
args[tollgate-ramdisk]="--url $origin_url --proxy http://127.0.0.1:${tollgate_ramdisk_port:-0} --cacert $work/tollgate-ca/ca.crt"
cpu_pids[nginx]=$rp_pids
cpu_pids[nginx-reencrypt]=$rp_pids
cpu_pids[mitmproxy]=$mitm_pid
cpu_pids[tollgate]=$tollgate_pid
cpu_pids[tollgate-ramdisk]=${tollgate_ramdisk_pid:-}

load() {  # TARGET HTTPS_LOAD-ARGS...: one JSON line
  local t=$1; shift
  # shellcheck disable=SC2086
  "$HTTPS_LOAD_BIN" ${args[$t]} "${agent[@]}" "$@" || true
}

# Smoke checks: a few verified requests through each target; a target that fails is skipped.
for t in tollgate tollgate-ramdisk; do
  [[ " $TARGETS " == *" $t "* ]] || continue
  var=${t//-/_}; port_var=${var}_port; pid_var=${var}_pid
  if ! wait_port "${!port_var}" 2>/dev/null || ! kill -0 "${!pid_var}" 2>/dev/null; then
    unavailable[$t]="it did not start: $(tail -c 300 "$work/$t.log" | tr '\n' ' ')"
  fi
done
for t in $TARGETS; do
  [[ -n ${args[$t]:-} ]] || { echo "unknown target $t" >&2; exit 2; }
  [[ -n ${unavailable[$t]:-} ]] && continue
  out=$(load "$t" --connections 1 --threads 1 --requests 3 --duration 10)
  if [[ $(json_field requests <<<"$out") != 3 || $(json_field errors <<<"$out") != 0 || $(json_field non_2xx <<<"$out") != 0 ]]; then
    unavailable[$t]="smoke check failed: $out"
  fi
done
# https_load must refuse a certificate it cannot verify: the origin against mitmproxy's CA.
out=$("$HTTPS_LOAD_BIN" --url "$origin_url" --cacert "$work/mitm/mitmproxy-ca-cert.pem" --connections 1 --requests 1 --duration 5 || true)
[[ $(json_field requests <<<"$out") == 0 ]] || { echo "https_load accepted the origin with a wrong CA: $out" >&2; exit 1; }

active=""
for t in $TARGETS; do
  if [[ -n ${unavailable[$t]:-} ]]; then
    if [[ $t == tollgate* ]]; then
      echo "tollgate: interception not available (${unavailable[$t]})" >&2
    else
      echo "$t: not available (${unavailable[$t]})" >&2
    fi
  else
    active+=" $t"
  fi
done

declare -A rps p50 p99 cpu errors
run_target() {  # TARGET MODE
  local t=$1 mode=$2 key="$1 $2" flags=() conns=$CONNS
  [[ $mode == new-conn ]] && flags=(--new-conn) && conns=$NEW_CONNS
  # shellcheck disable=SC2086
  local pidlist=(${cpu_pids[$t]:-}) before after out n
  before=$( ((${#pidlist[@]})) && cpu_ticks "${pidlist[@]}" || echo 0)
  out=$(load "$t" "${flags[@]}" --connections "$conns" --threads 2 --duration "$DURATION")
  after=$( ((${#pidlist[@]})) && cpu_ticks "${pidlist[@]}" || echo 0)
  n=$(json_field requests <<<"$out")
  rps[$key]+=" $(json_field rps <<<"$out")"
  local e; e=$(json_field errors <<<"$out"); local x; x=$(json_field non_2xx <<<"$out")
  [[ "$e" != 0 || "$x" != 0 ]] && errors[$key]+="errors $e non-2xx $x ($(json_field first_error <<<"$out")); "
  if ((${#pidlist[@]})) && [[ -n $n && $n != 0 ]]; then
    cpu[$key]+=" $(awk -v t=$((after - before)) -v hz="$hz" -v n="$n" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')"
  fi
  out=$(load "$t" "${flags[@]}" --connections 1 --threads 1 --duration "$LATENCY_DURATION")
  p50[$key]+=" $(json_field p50_us <<<"$out")"
  p99[$key]+=" $(json_field p99_us <<<"$out")"
}

echo "running $ROUNDS rounds, per target and mode: $CONNS connections (new-conn: $NEW_CONNS) for ${DURATION}s, then 1 connection for ${LATENCY_DURATION}s" >&2
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round" >&2
  for t in $active; do
    for m in $MODES; do run_target "$t" "$m"; done
  done
done
echo "per round, requests/s:" >&2
for t in $active; do
  for m in $MODES; do
    k="$t $m"
    echo "  $k:${rps[$k]}  cpu µs/req:${cpu[$k]:- -}" >&2
    rps[$k]=$(median <<<"${rps[$k]}"); p50[$k]=$(median <<<"${p50[$k]}"); p99[$k]=$(median <<<"${p99[$k]}")
  done
done
# Tollgate's CPU against nginx's round by round (each pair ran minutes apart at most, so it
# moves less with the machine than the ratio of the medians).
for t in tollgate tollgate-ramdisk; do
  for m in $MODES; do
    [[ -n "${cpu[$t $m]:-}" && -n "${cpu[nginx $m]:-}" ]] || continue
    echo "  $t / nginx CPU per request, $m, per round: $(paste -d' ' <(tr ' ' '\n' <<<"${cpu[$t $m]# }") \
      <(tr ' ' '\n' <<<"${cpu[nginx $m]# }") | awk '{printf "%.2f ", $1 / $2}')" >&2
  done
done
for t in $active; do
  for m in $MODES; do
    k="$t $m"
    cpu[$k]=$(median <<<"${cpu[$k]:-}")
  done
done

table=$(
  echo "| target | mode | requests/s | p50 µs (1 conn) | p99 µs (1 conn) | proxy CPU µs/req | throughput vs direct | CPU vs nginx |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  for t in $TARGETS; do
    for m in $MODES; do
      k="$t $m"
      if [[ -n ${unavailable[$t]:-} ]]; then
        echo "| $t | $m | - | - | - | - | - | - |"
        continue
      fi
      ratio=$(awk -v a="${rps[$k]}" -v b="${rps[direct $m]:-0}" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}')
      cratio="-"
      [[ ${cpu[$k]} != "-" && -n "${cpu[nginx $m]:-}" && "${cpu[nginx $m]}" != "-" ]] &&
        cratio=$(awk -v a="${cpu[$k]}" -v b="${cpu[nginx $m]}" 'BEGIN {printf "%.2f", a / b}')
      echo "| $t | $m | ${rps[$k]} | ${p50[$k]} | ${p99[$k]} | ${cpu[$k]} | $ratio | $cratio |"
    done
  done
)
echo "$table"
for t in $active; do
  for m in $MODES; do
    [[ -n "${errors[$t $m]:-}" ]] && echo "note: $t $m: ${errors[$t $m]}"
  done
done
for t in $TARGETS; do
  [[ -n ${unavailable[$t]:-} && $t == tollgate ]] && echo "note: tollgate: interception not available (${unavailable[$t]})"
done
verdict=$(
  ratio_line "Tollgate CPU per HTTPS request vs nginx (keep-alive)" "${cpu[tollgate keep-alive]:-}" "${cpu[nginx keep-alive]:-}" "<= 1.50"
  ratio_line "Tollgate CPU per new HTTPS connection vs nginx" "${cpu[tollgate new-conn]:-}" "${cpu[nginx new-conn]:-}" "-"
  ratio_line "Tollgate throughput vs mitmproxy (keep-alive)" "${rps[tollgate keep-alive]:-}" "${rps[mitmproxy keep-alive]:-}" ">= 20"
  ratio_line "Tollgate new connections/s vs mitmproxy" "${rps[tollgate new-conn]:-}" "${rps[mitmproxy new-conn]:-}" ">= 20"
  ratio_line "Tollgate CPU per HTTPS request vs nginx re-encrypting (keep-alive)" "${cpu[tollgate keep-alive]:-}" "${cpu[nginx-reencrypt keep-alive]:-}" "-"
  ratio_line "Tollgate CPU per HTTPS request, audit on a RAM disk, vs nginx (keep-alive)" "${cpu[tollgate-ramdisk keep-alive]:-}" "${cpu[nginx keep-alive]:-}" "-"
  ratio_line "Tollgate CPU per new HTTPS connection, audit on a RAM disk, vs nginx" "${cpu[tollgate-ramdisk new-conn]:-}" "${cpu[nginx new-conn]:-}" "-"
)
report "$table" "$verdict" "(medians of $ROUNDS rounds; workers $WORKERS, $CONNS connections (new-conn $NEW_CONNS), ${DURATION}s; https_load, the origin and the proxies share $(nproc) cores)" "$OUT"
