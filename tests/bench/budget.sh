#!/usr/bin/env bash
# Budget benchmark: in one run on loopback, the same policy through Tollgate without a
# cost (unbudgeted), with the cost charged to a memory pool, and charged to a shared pool
# in a local redis-server. Each target: wrk with CONNS connections for DURATION (requests/s,
# Tollgate's CPU per request, and for Redis its CPU and its script calls per request), then
# one connection for LATENCY_DURATION (p50/p99, and the latency a budget adds).
#
#   tests/bench/budget.sh [--out FILE]    (./dev bench budget installs the peers and builds)
# Environment: TOLLGATE_BIN, WORKERS (1), CONNS (64), DURATION (10s), LATENCY_DURATION (5s),
# ROUNDS (3): each figure is the median of ROUNDS rounds (each round starting one target on,
# so that in 3 rounds each target runs once in each place).
# PIN=1 gives redis-server the last core to itself and runs everything else on the others
# (as when Redis is on its own host); by default all processes share every core.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
on_port_timeout() { tail -n 5 "$work"/*.log >&2; }
root=$(cd "$here/../.." && pwd)
TOLLGATE_BIN=${TOLLGATE_BIN:-$root/build/tollgate}
WORKERS=${WORKERS:-1}
CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
LATENCY_DURATION=${LATENCY_DURATION:-5s}
ROUNDS=${ROUNDS:-3}
TARGETS="unbudgeted memory redis"
PIN=${PIN:-0}
OUT=""
[[ "${1:-}" == "--out" ]] && OUT=$2
cores=$(nproc)
on_rest=() on_redis=()
if [[ $PIN == 1 ]]; then
  (( cores >= 2 )) || { echo "PIN=1 needs at least 2 cores" >&2; exit 2; }
  on_rest=(taskset -c "0-$((cores - 2))") on_redis=(taskset -c "$((cores - 1))")
fi

for tool in wrk nginx redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run ./dev bench (it installs the peers)" >&2; exit 2; }
done
[[ -x "$TOLLGATE_BIN" ]] || { echo "no tollgate binary at $TOLLGATE_BIN: ./dev build" >&2; exit 2; }

work=$(mktemp -d /tmp/tollgate-budget-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $work/origin/nginx.pid ]] && kill "$(cat "$work/origin/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$work"
}
trap cleanup EXIT


origin_port=$(free_port)
mkdir -p "$work/origin/logs"
cat > "$work/origin/nginx.conf" <<CONF
worker_processes 2;
error_log $work/origin/logs/error.log;
pid $work/origin/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/origin/body; proxy_temp_path $work/origin/proxy;
  fastcgi_temp_path $work/origin/fcgi; uwsgi_temp_path $work/origin/uwsgi; scgi_temp_path $work/origin/scgi;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$origin_port; location / { return 200 "hello from the origin\n"; } }
}
CONF
"${on_rest[@]}" nginx -p "$work/origin" -c "$work/origin/nginx.conf"
wait_port "$origin_port"
export ORIGIN=127.0.0.1:$origin_port

redis_port=$(free_port)
"${on_redis[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --logfile "$work/redis-server.log" &
redis_pid=$!; pids+=("$redis_pid")
wait_port "$redis_port"

sed -e 's/, cost: {effort: 1}//' -e 's/scope: shared/scope: local/' "$here/budget-policy.yaml" > "$work/unbudgeted.yaml"
sed 's/scope: shared/scope: local/' "$here/budget-policy.yaml" > "$work/memory.yaml"
cp "$here/budget-policy.yaml" "$work/redis.yaml"
declare -A port pid admin
for t in $TARGETS; do
  port[$t]=$(free_port) admin[$t]=$(free_port)
  store="{backend: memory}"
  [[ $t == redis ]] && store="{backend: redis, urls: [\"redis://127.0.0.1:$redis_port\"]}"
  cat > "$work/$t-tollgate.yaml" <<CONF
workers: $WORKERS
log: {level: warn}
listeners: [{name: egress, kind: forward, address: "127.0.0.1:${port[$t]}", identity: {header: X-Agent-Id}}]
admin: {address: "127.0.0.1:${admin[$t]}"}
policies: ["$work/$t.yaml"]
store: $store
audit: {dir: "$work/audit-$t"}
CONF
done
"$TOLLGATE_BIN" pools init -c "$work/redis-tollgate.yaml" >/dev/null
for t in $TARGETS; do
  "${on_rest[@]}" "$TOLLGATE_BIN" run -c "$work/$t-tollgate.yaml" 2>"$work/$t.log" &
  pid[$t]=$!; pids+=("${pid[$t]}")
done
for t in $TARGETS; do wait_port "${port[$t]}"; done
for t in $TARGETS; do
  body=$(curl -s --max-time 5 --proxy "http://127.0.0.1:${port[$t]}" -H "X-Agent-Id: bench-agent" "http://$ORIGIN/") || true
  [[ "$body" == "hello from the origin" ]] || { echo "$t does not proxy: got '$body'" >&2; exit 1; }
done

# The store's reserve latency as the sidecar sees it: "sum count" of its histogram.
reserve_latency() {
  curl -s "http://127.0.0.1:${admin[redis]}/metrics" |
    awk '/^tollgate_budget_store_seconds_sum\{op="reserve"\}/ {s = $2} /^tollgate_budget_store_seconds_count\{op="reserve"\}/ {c = $2} END {print s + 0, c + 0}'
}
evals() { redis-cli -p "$redis_port" info commandstats | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}'; }
declare -A rps p50 p99 cpu rcpu trips errors
reserve_us=""
echo "running $ROUNDS rounds: $CONNS connections for $DURATION, then 1 connection for $LATENCY_DURATION, per target" >&2
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round" >&2
  # Each round starts one target further on (unbudgeted memory redis, memory redis
  # unbudgeted, redis unbudgeted memory, …): this VM's speed drifts by several percent over
  # a round, and a target that ran first in more rounds than its peers (as unbudgeted did
  # when even rounds only ran in reverse) would take more of that drift than they do.
  read -ra targets <<<"$TARGETS"
  shift_by=$(( (round - 1) % ${#targets[@]} ))
  order="${targets[*]:shift_by} ${targets[*]:0:shift_by}"
  for t in $order; do
    before=$(cpu_ticks "${pid[$t]}"); rbefore=$(cpu_ticks "$redis_pid"); ebefore=$(evals); lbefore=$(reserve_latency)
    out=$("${on_rest[@]}" wrk -t2 -c"$CONNS" -d"$DURATION" -s "$here/forward.lua" "http://127.0.0.1:${port[$t]}")
    after=$(cpu_ticks "${pid[$t]}"); rafter=$(cpu_ticks "$redis_pid"); eafter=$(evals); lafter=$(reserve_latency)
    [[ $t == redis ]] && reserve_us+=" $(awk -v a="$lbefore" -v b="$lafter" 'BEGIN {split(a, x, " "); split(b, y, " "); if (y[2] > x[2]) printf "%.0f", (y[1] - x[1]) / (y[2] - x[2]) * 1e6}')"
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps[$t]+=" $(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
    errors[$t]+=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    cpu[$t]+=" $(awk -v d=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')"
    rcpu[$t]+=" $(awk -v d=$((rafter - rbefore)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')"
    trips[$t]+=" $(awk -v d=$((eafter - ebefore)) -v n="$requests" 'BEGIN {printf "%.2f", d / n}')"
    out=$(FORWARD=1 "${on_rest[@]}" wrk -t1 -c1 -d"$LATENCY_DURATION" -s "$here/latency.lua" "http://127.0.0.1:${port[$t]}")
    p50[$t]+=" $(sed -n 's/^LATENCY p50=\([0-9]*\).*/\1/p' <<<"$out")"
    p99[$t]+=" $(sed -n 's/^LATENCY .*p99=\([0-9]*\)/\1/p' <<<"$out")"
  done
done
# The ratio round by round (each round runs the targets back to back): on a noisy machine
# the spread says as much as the median.
round_ratios=$(awk -v a="${rps[redis]}" -v b="${rps[unbudgeted]}" 'BEGIN {
  n = split(a, x, " "); split(b, y, " "); met = 0
  for (i = 1; i <= n; i++) { r = x[i] / y[i]; printf " %.2f", r; if (r >= 0.80) met++ }
  printf "; %d of %d rounds at or above 0.80", met, n }')
echo "per round, requests/s:" >&2
for t in $TARGETS; do
  echo "  $t:${rps[$t]}  cpu µs/req:${cpu[$t]}" >&2
  for v in rps p50 p99 cpu rcpu trips; do
    declare -n a=$v
    a[$t]=$(median <<<"${a[$t]}")
  done
done
table=$(
  echo "| target | requests/s | vs unbudgeted | p50 µs (1 conn) | p99 µs (1 conn) | Tollgate CPU µs/req | Redis CPU µs/req | Redis scripts/req |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for t in $TARGETS; do
    ratio=$(awk -v a="${rps[$t]}" -v b="${rps[unbudgeted]}" 'BEGIN {printf "%.2f", a / b}')
    echo "| $t | ${rps[$t]} | $ratio | ${p50[$t]} | ${p99[$t]} | ${cpu[$t]} | ${rcpu[$t]} | ${trips[$t]} |"
  done
)
echo "$table"
for t in $TARGETS; do
  [[ -n "${errors[$t]// /}" ]] && echo "note: $t: ${errors[$t]}"
done
verdict=$(
  awk -v a="${rps[redis]}" -v b="${rps[unbudgeted]}" 'BEGIN {printf "budgeted (Redis) throughput vs unbudgeted: %.2fx (target >= 0.80)\n", a / b}'
  echo "budgeted (Redis) vs unbudgeted per round:$round_ratios"
  awk -v a="${p50[redis]}" -v b="${p50[unbudgeted]}" -v c="${p99[redis]}" -v d="${p99[unbudgeted]}" \
    'BEGIN {printf "latency a Redis budget adds: p50 +%d µs, p99 +%d µs\n", a - b, c - d}'
  echo "Redis scripts per budgeted call: ${trips[redis]} (reserve before the call: the one round trip on the request path; settle after the response, pipelined)"
  echo "a reserve under load takes $(median <<<"$reserve_us") µs on average from the sidecar's side (per round:$reserve_us)"
)
if [[ $PIN == 1 ]]; then
  footer="(medians of $ROUNDS rounds; workers $WORKERS, $CONNS connections, $DURATION; redis-server alone on core $((cores - 1)), wrk, nginx and Tollgate on cores 0-$((cores - 2)))"
else
  footer="(medians of $ROUNDS rounds; workers $WORKERS, $CONNS connections, $DURATION; wrk, nginx, redis and Tollgate share $cores cores)"
fi
report "$table" "$verdict" "$footer" "$OUT"
