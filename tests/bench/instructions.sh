#!/usr/bin/env bash
# User-space instructions per intercepted HTTPS request, counted by callgrind: a figure that
# does not move with the machine's speed, for A/B comparisons of changes too small for the
# wall-clock benchmarks (tls.sh's CPU per request moves by ±15% between rounds here).
# Each binary runs the HTTPS setup of tls.sh (intercept_tls, tests/bench/policy.yaml, the
# file audit stream) under `valgrind --tool=callgrind`, once with SMALL and once with LARGE
# requests (8 keep-alive connections); the difference over LARGE - SMALL requests is the
# cost of a request without the start-up. Both threads (worker and audit writer) count.
# Valgrind has no SHA-NI: OpenSSL's SHA-256 runs its generic code under it, so hashing
# weighs more here than on the hardware.
#
#   tests/bench/instructions.sh [TOLLGATE_BIN ...]   (default: build/tollgate)
# Environment: SMALL (500), LARGE (3000), KEEP_PROFILES=DIR (callgrind outputs kept there,
# for callgrind_annotate).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
root=$(cd "$here/../.." && pwd)
HTTPS_LOAD_BIN=${HTTPS_LOAD_BIN:-$root/build/tests/https_load}
SMALL=${SMALL:-500}
LARGE=${LARGE:-3000}
WORKERS=1
bins=("$@")
((${#bins[@]})) || bins=("$root/build/tollgate")
for tool in valgrind nginx /usr/bin/python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run ./dev bench (it installs the peers)" >&2; exit 2; }
done
[[ -x "$HTTPS_LOAD_BIN" ]] || { echo "no https_load at $HTTPS_LOAD_BIN: ./dev build" >&2; exit 2; }

work=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
vg_pid=""
cleanup() {
  [[ -n $vg_pid ]] && kill "$vg_pid" 2>/dev/null || true
  [[ -f $work/origin/nginx.pid ]] && kill "$(cat "$work/origin/nginx.pid")" 2>/dev/null || true
  sleep 0.2
  rm -rf "$work"
}
trap cleanup EXIT

PYTHONPATH=$root/tests/integration /usr/bin/python3 -c '
import sys
from tls_fixtures import TestPki
TestPki(sys.argv[1]).leaf("origin", names=("localhost",), ips=("127.0.0.1",))
' "$work/pki"
NGINX_HTTP_EXTRA="  ssl_certificate $work/pki/origin.crt; ssl_certificate_key $work/pki/origin.key;
  ssl_session_cache off; ssl_session_tickets off;"
origin_port=$(free_port)
nginx_conf "$work/origin" "  server { listen 127.0.0.1:$origin_port ssl; location / { return 200 \"hello from the origin\\n\"; } }"
nginx -p "$work/origin" -c "$work/origin/nginx.conf"
wait_port "$origin_port"

# Instructions of one run of BIN for N requests (callgrind's total over every thread).
count() {  # BIN N TAG
  local bin=$1 n=$2 dir=$work/run-$3
  mkdir -p "$dir"
  "$bin" certs init "$dir/ca" >/dev/null
  local port admin
  port=$(free_port) admin=$(free_port)
  cat > "$dir/tollgate.yaml" <<CONF
workers: 1
log: {level: warn}
listeners: [{name: egress, kind: forward, address: "127.0.0.1:$port", intercept_tls: true, identity: {header: X-Agent-Id}}]
admin: {address: "127.0.0.1:$admin"}
policies: ["$here/policy.yaml"]
tls: {ca_dir: "$dir/ca", upstream_ca_file: "$work/pki/ca.crt"}
audit: {dir: "$dir/audit"}
CONF
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$bin" run -c "$dir/tollgate.yaml" \
    2>"$dir/valgrind.log" &
  vg_pid=$!
  for _ in $(seq 1 600); do port_open "$port" && break; sleep 0.1; done
  local out
  out=$("$HTTPS_LOAD_BIN" --url "https://127.0.0.1:$origin_port/" --proxy "http://127.0.0.1:$port" \
    --cacert "$dir/ca/ca.crt" --header "X-Agent-Id: bench-agent" --proxy-header "X-Agent-Id: bench-agent" \
    --connections 8 --threads 1 --requests "$n" --duration 300)
  kill -TERM "$vg_pid"
  wait "$vg_pid" || true
  vg_pid=""
  [[ $(sed -n 's/.*"requests":\([0-9]*\).*/\1/p' <<<"$out") == "$n" ]] ||
    { echo "$bin: $n requests asked, got: $out" >&2; exit 1; }
  [[ -n "${KEEP_PROFILES:-}" ]] && mkdir -p "$KEEP_PROFILES" && cp "$dir/callgrind.out" "$KEEP_PROFILES/$3.out"
  sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$dir/callgrind.out"
}

echo "| binary | instructions per request | vs the first |"
echo "|---|---:|---:|"
first=""
i=0
for bin in "${bins[@]}"; do
  i=$((i + 1))
  small=$(count "$bin" "$SMALL" "$i-small")
  large=$(count "$bin" "$LARGE" "$i-large")
  per=$(( (large - small) / (LARGE - SMALL) ))
  [[ -z $first ]] && first=$per
  awk -v b="$bin" -v p="$per" -v f="$first" 'BEGIN {printf "| %s | %d | %.3f |\n", b, p, p / f}'
done
echo "(callgrind, user space of every thread: ($LARGE - $SMALL requests) over 8 keep-alive connections)"
