#!/usr/bin/env bash
# HTTP/1.1 only, quicker than run.sh: wrk through fqdnwall's HTTP proxy (20 rules) vs nginx as a
# plain reverse proxy vs direct, same nginx backend, interleaved rounds, plus each proxy's CPU
# time per request (user+sys of the proxy's processes over the requests wrk completed), which
# other load on the machine disturbs less than req/s and latency do.
#   DUR=seconds per measurement (default 8), ROUNDS (default 3), CONNS (default 32),
#   SKIP_BUILD=1 to use the release example already built,
#   VARIANTS: fqdnwall proxies to compare in the same rounds, one per line as
#   "name|l7proxy binary|extra l7proxy arguments" (default: the example just built, defaults).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DUR=${DUR:-8}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --quiet --release -p l7 --example l7proxy)
BIN=$CARGO_TARGET_DIR/release/examples

BACKEND=127.0.0.1:18280
NGINX_RP=127.0.0.1:18290
URLPATH=/api/v1/items/42

# shellcheck source=bench/l7/common.sh
. "$ROOT/bench/l7/common.sh"
start_nginx
VARIANTS=${VARIANTS:-"fqdnwall|$BIN/l7proxy|"}
names=(); targets=(); vpids=()
port=18300
while IFS='|' read -r name bin extra; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    "$bin" --http "127.0.0.1:$port" "$BACKEND" --http-rules 20 $extra >"$work/$name.log" &
    pids+=($!); vpids+=($!); names+=("$name"); targets+=("127.0.0.1:$port")
    port=$((port + 1))
done <<<"$VARIANTS"

for p in $BACKEND $NGINX_RP "${targets[@]}"; do wait_port "$p"; done
for t in "${targets[@]}"; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$t$URLPATH")" = 200 ]
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$t/admin")" = 403 ]
done

echo "round side rps p99_ms cpu_us/req user_us/req sys_us/req ctxsw/req | vs nginx: rps p99 cpu"
for r in $(seq "$ROUNDS"); do
    echo "$r direct $(wrk_run "$BACKEND" "$be_pid" "$CONNS")"
    n=$(wrk_run "$NGINX_RP" "$rp_pid" "$CONNS"); echo "$r nginx $n"
    read -r nr np nc _ <<<"$n"
    for i in "${!names[@]}"; do
        f=$(wrk_run "${targets[$i]}" "${vpids[$i]}" "$CONNS")
        read -r fr fp fc _ <<<"$f"
        awk -v r="$r" -v name="${names[$i]}" -v f="$f" -v a="$fr" -v b="$nr" -v c="$fp" -v d="$np" -v e="$fc" -v g="$nc" \
            'BEGIN {printf "%s %s %s | %.2f %.2f %.2f\n", r, name, f, a/b, c/d, e/g}'
    done
done
