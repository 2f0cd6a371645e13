#!/usr/bin/env bash
# The machine's durable write, without Tollgate: how long one 16 KiB write with O_DIRECT
# and O_DSYNC takes (the shape of an audit batch: a write and the device's cache flush, as
# the writer's pwritev2(RWF_DSYNC) does it), with the CPUs idle and with every CPU kept busy
# by spinning processes. The spinners run at nice 19, so the writing process wins the
# guest's scheduler whenever it wakes; a third case runs it SCHED_FIFO against spinners at
# nice 0. A flush that slows down while the CPUs are busy, although the writer is never
# kept waiting for a CPU, is slowed by what busy CPUs cost the device path itself (on a VM,
# the hypervisor's I/O emulation sharing the host's CPUs with the busy vCPUs), which no
# scheduling choice of the writer's wins back.
#
#   tests/bench/disk.sh [DIR]      (DIR: the file system to measure, default the repo's)
# Environment: COUNT (2000 writes a measurement), BS (16k), ROUNDS (3; the median is printed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
dir=${1:-$(cd "$here/../.." && pwd)}
COUNT=${COUNT:-2000}
BS=${BS:-16k}
ROUNDS=${ROUNDS:-3}
cpus=$(nproc)
file=$(mktemp "$dir/.tollgate-disk.XXXXXX")
spinners=()
stop_spinners() {
  for p in "${spinners[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${spinners[@]}"; do wait "$p" 2>/dev/null || true; done
  spinners=()
}
cleanup() { stop_spinners; rm -f "$file"; }
trap cleanup EXIT

# Preallocated and written once, as the audit writer's segments are, so every measured
# write overwrites allocated blocks and only data goes to the device.
dd if=/dev/zero of="$file" bs="$BS" count="$COUNT" oflag=direct status=none

spin() {  # NICE: one spinner per CPU, each bounded to 5 minutes
  for _ in $(seq 1 "$cpus"); do
    timeout 300 nice -n "$1" sh -c 'while :; do :; done' &
    spinners+=("$!")
  done
  sleep 0.5
}
# Microseconds per durable write: COUNT writes of BS with O_DIRECT|O_DSYNC over the file.
measure() {  # [PREFIX COMMAND...]
  local start end
  start=$(date +%s%N)
  "$@" dd if=/dev/zero of="$file" bs="$BS" count="$COUNT" oflag=direct,dsync conv=notrunc status=none
  end=$(date +%s%N)
  echo $(((end - start) / 1000 / COUNT))
}

idle=() busy=() fifo=()
for r in $(seq 1 "$ROUNDS"); do
  idle+=("$(measure)")
  spin 19
  busy+=("$(measure)")
  stop_spinners
  spin 0
  fifo+=("$(measure chrt -f 50)")
  stop_spinners
  echo "round $r: idle ${idle[-1]} µs, busy CPUs ${busy[-1]} µs, SCHED_FIFO writer on busy CPUs ${fifo[-1]} µs"
done
i=$(echo "${idle[@]}" | median) b=$(echo "${busy[@]}" | median) f=$(echo "${fifo[@]}" | median)
echo
echo "| case | µs per durable $BS write | vs idle |"
echo "|---|---:|---:|"
echo "| CPUs idle | $i | 1.00 |"
awk -v i="$i" -v b="$b" -v f="$f" 'BEGIN {
  printf "| %s | %d | %.2f |\n", "every CPU busy (spinners at nice 19)", b, b / i
  printf "| %s | %d | %.2f |\n", "every CPU busy, the writer SCHED_FIFO", f, f / i }'
echo
echo "(medians of $ROUNDS rounds of $COUNT writes on $(df --output=source "$dir" | tail -1), $cpus CPUs)"
