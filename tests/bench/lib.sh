# shellcheck shell=bash disable=SC2034
# Helpers shared by the benchmark scripts (sourced by run.sh, budget.sh, tls.sh).

# A free port on 127.0.0.1 (the kernel picks it).
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Waits up to 10 s for PORT; on failure calls on_port_timeout if the script defines it.
wait_port() {
  for _ in $(seq 1 200); do port_open "$1" && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2
  declare -F on_port_timeout >/dev/null && on_port_timeout
  return 1
}
# CPU ticks (utime + stime of every thread) of a list of pids; a pid that is gone is an
# error that names it (a target that died must not end the run without a word).
cpu_ticks() {
  local t=0 p
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || { echo "process $p exited during the benchmark" >&2; return 1; }
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $t
}
hz=$(getconf CLK_TCK)
# The median of the numbers on stdin (space or line separated); "-" for none.
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "-"; else print a[int((NR + 1) / 2)]}'; }
# "LABEL: A/B x (target TARGET)", nothing when A or B is missing.
ratio_line() {  # LABEL A B TARGET
  [[ -n "$2" && -n "$3" && "$2" != "-" && "$3" != "-" ]] || return 0
  awk -v l="$1" -v a="$2" -v b="$3" -v t="$4" 'BEGIN {printf "%s: %.2fx (target %s)\n", l, a / b, t}'
}
# Prints VERDICT and FOOTER, and writes TABLE and VERDICT to OUT when it is set.
report() {  # TABLE VERDICT FOOTER OUT
  echo "$2"
  echo "$3"
  if [[ -n "$4" ]]; then
    { echo "$1"; echo; echo "$2"; } > "$4"
  fi
}
# An nginx config in DIR: WORKERS workers, no access log, long keep-alive; BODY (servers,
# upstreams) and the script's NGINX_HTTP_EXTRA lines go in its http block.
nginx_conf() {  # DIR BODY
  mkdir -p "$1/logs"
  cat > "$1/nginx.conf" <<CONF
worker_processes $WORKERS;
error_log $1/logs/error.log;
pid $1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
${NGINX_HTTP_EXTRA:-}
$2
}
CONF
}
