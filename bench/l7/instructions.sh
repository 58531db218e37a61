#!/usr/bin/env bash
# Instructions per request of fqdnwall's HTTP proxy (20 rules, the request matches the
# last) under callgrind: h2load sends a fixed number of HTTP/1.1 requests (PROTO=h2: HTTP/2
# streams over h2c, as bench/l7/run.sh sends them) through the proxy to the nginx backend, and
# the proxy's instructions counted during those requests only (collection starts from zero
# after a warm-up; the connections are new ones, so their setup is counted too) are divided
# by their number. Unlike req/s, latency and CPU time, the figure hardly moves when other work
# shares the machine, so it can compare changes while the machine is busy. Prints "instructions/request requests".
#   PROTO=h1 (default; h2load --h1 -c CONNS) or h2 (h2load -c CONNS -m STREAMS against nginx's
#   h2c server), REQUESTS (default 20000), CONNS (default 32, 16 for h2), STREAMS (h2's
#   concurrent streams per connection, default 16), BIN (default the release example just
#   built, SKIP_BUILD=1 to not build), ANNOTATE=file: write callgrind_annotate's per-function table
#   there (and the callgrind files beside it), PROXY_ARGS: extra l7proxy arguments.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REQUESTS=${REQUESTS:-20000}
PROTO=${PROTO:-h1}
case "$PROTO" in
h1) CONNS=${CONNS:-32}; H2LOAD=(h2load --h1 -c "$CONNS" -t 1) ;;
h2) CONNS=${CONNS:-16}; H2LOAD=(h2load -c "$CONNS" -m "${STREAMS:-16}" -t 1) ;;
*) echo "PROTO=$PROTO: expected h1 or h2" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[ "${SKIP_BUILD:-0}" = 1 ] || [ -n "${BIN:-}" ] ||
    (cd "$ROOT" && cargo build --quiet --release -p l7 --example l7proxy)
BIN=${BIN:-$CARGO_TARGET_DIR/release/examples/l7proxy}

BACKEND=127.0.0.1:18480
BACKEND_H2=127.0.0.1:18481
NGINX_RP=127.0.0.1:18490 # (started by start_nginx, unused here)
PROXY=127.0.0.1:18500
URLPATH=/api/v1/items/42

# shellcheck source=bench/l7/common.sh
. "$ROOT/bench/l7/common.sh"
start_nginx
UPSTREAM=$BACKEND
[ "$PROTO" = h1 ] || UPSTREAM=$BACKEND_H2
out="$work/callgrind.out"
# shellcheck disable=SC2086
valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
    "$BIN" --http "$PROXY" "$UPSTREAM" --http-rules 20 ${PROXY_ARGS:-} \
    >"$work/proxy.log" 2>"$work/valgrind.log" & pids+=($!)
target=$PROXY
wait_port "$UPSTREAM"
CURL=(curl -s -o /dev/null -w '%{http_code}')
[ "$PROTO" = h1 ] || CURL+=(--http2-prior-knowledge)
for _ in $(seq 300); do
    [ "$("${CURL[@]}" "http://$target$URLPATH")" = 200 ] && break
    sleep 0.2
done
[ "$("${CURL[@]}" "http://$target$URLPATH")" = 200 ]
# Warm-up: connections, upstream connections and lazy state set up outside the count.
"${H2LOAD[@]}" -n $((CONNS * 10)) "http://$target$URLPATH" >/dev/null
# Only this script's processes (callgrind_control without pids would reach every callgrind
# run on the machine): those writing to this run's output files.
# shellcheck disable=SC2207
ours=($(pgrep -f -- "--callgrind-out-file=$out" || true))
[ "${#ours[@]}" -gt 0 ] || { echo "no callgrind process of this run" >&2; exit 1; }
callgrind_control -z "${ours[@]}" >/dev/null
"${H2LOAD[@]}" -n "$REQUESTS" "http://$target$URLPATH" >"$work/h2load.out"
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
