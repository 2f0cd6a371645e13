#!/usr/bin/env bash
# Installs what Tollgate needs to build and test, from Debian 12's packages. Idempotent:
# it asks apt only for what is missing. Pass --bench for the benchmark's peers too.
set -euo pipefail

packages=(build-essential cmake ninja-build pkg-config git curl ca-certificates openssl
  python3 python3-yaml python3-jsonschema python3-cryptography python3-requests iproute2 iptables procps
  libuv1-dev libssl-dev libyaml-cpp-dev libhiredis-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev libre2-dev
  node-llhttp redis-server faketime)
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(nginx-light haproxy squid wrk mitmproxy valgrind)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "installing: ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
