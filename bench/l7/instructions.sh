#!/usr/bin/env bash
# Instructions per request of fqdnwall's HTTP/1.1 proxy (20 rules, the request matches the
# last) under callgrind: h2load sends a fixed number of HTTP/1.1 requests through the proxy to
# the nginx backend, and the proxy's instructions counted during those requests only (collection
# starts from zero after a warm-up) are divided by their number. Unlike req/s, latency and
# CPU time, the figure hardly moves when other work shares the machine, so it can compare
# changes while the machine is busy. Prints "instructions/request requests".
#   REQUESTS (default 20000), CONNS (default 32), BIN (default the release example just built,
#   SKIP_BUILD=1 to not build), ANNOTATE=file: write callgrind_annotate's per-function table
#   there (and the callgrind files beside it), PROXY_ARGS: extra l7proxy arguments.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REQUESTS=${REQUESTS:-20000}
CONNS=${CONNS:-32}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[ "${SKIP_BUILD:-0}" = 1 ] || [ -n "${BIN:-}" ] ||
    (cd "$ROOT" && cargo build --quiet --release -p l7 --example l7proxy)
BIN=${BIN:-$CARGO_TARGET_DIR/release/examples/l7proxy}

BACKEND=127.0.0.1:18480
NGINX_RP=127.0.0.1:18490 # (started by start_nginx, unused here)
PROXY=127.0.0.1:18500
URLPATH=/api/v1/items/42

# shellcheck source=bench/l7/common.sh
. "$ROOT/bench/l7/common.sh"
start_nginx
out="$work/callgrind.out"
# shellcheck disable=SC2086
valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
    "$BIN" --http "$PROXY" "$BACKEND" --http-rules 20 ${PROXY_ARGS:-} \
    >"$work/proxy.log" 2>"$work/valgrind.log" & pids+=($!)
target=$PROXY
wait_port "$BACKEND"
for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$target$URLPATH")" = 200 ] && break
    sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$target$URLPATH")" = 200 ]
# Warm-up: connections, upstream connections and lazy state set up outside the count.
h2load --h1 -n $((CONNS * 10)) -c "$CONNS" -t 1 "http://$target$URLPATH" >/dev/null
# Only this script's processes (callgrind_control without pids would reach every callgrind
# run on the machine): those writing to this run's output files.
# shellcheck disable=SC2207
ours=($(pgrep -f -- "--callgrind-out-file=$out" || true))
[ "${#ours[@]}" -gt 0 ] || { echo "no callgrind process of this run" >&2; exit 1; }
callgrind_control -z "${ours[@]}" >/dev/null
h2load --h1 -n "$REQUESTS" -c "$CONNS" -t 1 "http://$target$URLPATH" >"$work/h2load.out"
callgrind_control -d "${ours[@]}" >/dev/null
grep -q "$REQUESTS succeeded" "$work/h2load.out" || { cat "$work/h2load.out" >&2; exit 1; }
# The dumps (FILE.PID.1) are written when each process next runs.
for _ in $(seq 100); do
    compgen -G "$out.*.1" >/dev/null && break
    sleep 0.1
done
sleep 0.5
total=0
for f in "$out".*.1; do
    ir=$(awk '/^summary:/ {print $2}' "$f" | head -1)
    [ -n "$ir" ] && total=$((total + ir))
done
if [ -n "${ANNOTATE:-}" ]; then
    callgrind_annotate --threshold=100 --auto=no "$out".*.1 >"$ANNOTATE" 2>/dev/null || true
    cp "$out".*.1 "$(dirname "$ANNOTATE")/" 2>/dev/null || true
fi
awk -v t="$total" -v n="$REQUESTS" 'BEGIN {printf "%.0f %d\n", t / n, n}'
