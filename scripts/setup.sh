#!/usr/bin/env bash
# Installs what fqdnwall needs on a Debian 12 machine, idempotently: nothing is downloaded
# when everything is already there.
#
#   scripts/setup.sh run    what building and running the agent needs
#   scripts/setup.sh test   that, plus the real peers the test suite drives
#                           (dig, unbound, nsd, ...)
set -euo pipefail

what="${1:-run}"

# Building: a C compiler and linker for crates with C parts, pkg-config for -sys crates.
run_packages=(gcc libc6-dev pkg-config ca-certificates iproute2 nftables)
# The test suite: the real DNS server and client the end-to-end tests drive, network tools
# (nstat comes with iproute2; python3 serves HTTP in the datapath tests; nftables for the
# NAT of `lockdown`; chattr from e2fsprogs makes the state directory refuse writes in the
# persistence tests).
test_packages=(bind9-dnsutils unbound iproute2 curl python3 nftables socat iputils-ping util-linux e2fsprogs)

case "$what" in
  run) packages=("${run_packages[@]}") ;;
  test) packages=("${run_packages[@]}" "${test_packages[@]}") ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
  # Debian starts some daemons on install; the tests start their own instances on loopback
  # and must not find the ports taken.
  for svc in unbound; do
    if command -v systemctl >/dev/null 2>&1; then
      $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: fqdnwall needs a Rust toolchain (1.95 or newer) on PATH" >&2
  exit 1
fi

here="$(cd "$(dirname "$0")" && pwd)"
# Building the workspace compiles the kernel programs (ebpf/build.rs): nightly rust-src and
# bpf-linker are needed for `run` as much as for `test`.
"$here/setup-ebpf.sh"
if [ "$what" = test ]; then
  # The L7 proxy tests drive real peers (curl, a Kafka broker and client).
  "$here/setup-l7.sh"
  # scripts/test.sh ends with the fuzz targets (scripts/fuzz.sh): cargo-fuzz.
  "$here/setup-fuzz.sh"
fi
