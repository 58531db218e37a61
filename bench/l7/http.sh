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

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

BACKEND=127.0.0.1:18280
NGINX_RP=127.0.0.1:18290
URLPATH=/api/v1/items/42

mkdir -p "$work/backend" "$work/rp"
cat > "$work/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend/nginx.pid;
error_log $work/backend/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/backend;
    server { listen $BACKEND; location / { return 200 "ok\n"; } }
}
CONF
cat > "$work/rp/nginx.conf" <<CONF
worker_processes auto;
daemon off;
pid $work/rp/nginx.pid;
error_log $work/rp/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/rp;
    proxy_temp_path $work/rp;
    upstream be { server $BACKEND; keepalive 128; keepalive_requests 1000000; }
    server {
        listen $NGINX_RP;
        location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
nginx -p "$work/backend" -c "$work/backend/nginx.conf" & pids+=($!)
nginx -p "$work/rp" -c "$work/rp/nginx.conf" & rp_pid=$!; pids+=($rp_pid)
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

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}
for p in $BACKEND $NGINX_RP "${targets[@]}"; do wait_port "$p"; done
for t in "${targets[@]}"; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$t$URLPATH")" = 200 ]
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$t/admin")" = 403 ]
done

tck=$(getconf CLK_TCK)
cpu_ticks() { # pid -> "utime stime" of the process and its child processes (nginx workers)
    local u=0 k=0 p
    for p in $1 $(pgrep -P "$1" || true); do
        read -r pu pk < <(awk '{print $14, $15}' "/proc/$p/stat")
        u=$((u + pu)); k=$((k + pk))
    done
    echo "$u $k"
}
ctx_switches() { # pid -> voluntary + involuntary context switches of all its threads and children
    local total=0 p t
    for p in $1 $(pgrep -P "$1" || true); do
        for t in /proc/"$p"/task/*; do
            total=$((total + $(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")))
        done
    done
    echo "$total"
}
wrk_run() { # target pid -> "rps p99_ms cpu_us_per_request user_us sys_us ctx_switches_per_request"
    local before after cs0 cs1
    before=$(cpu_ticks "$2"); cs0=$(ctx_switches "$2")
    wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "http://$1$URLPATH" >"$work/wrk.out"
    after=$(cpu_ticks "$2"); cs1=$(ctx_switches "$2")
    read -r u0 k0 <<<"$before"; read -r u1 k1 <<<"$after"
    awk -v ut=$((u1 - u0)) -v kt=$((k1 - k0)) -v cs=$((cs1 - cs0)) -v tck="$tck" '
        /^Requests\/sec:/ {rps=$2}
        /requests in/ {n=$1}
        $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; p99=v}
        /Non-2xx/ {bad=$NF}
        END {
            if (bad) {print "non-2xx answers: " bad > "/dev/stderr"; exit 1}
            if (!n) n = 1
            printf "%s %s %.2f %.2f %.2f %.3f\n", rps, p99, (ut+kt)/tck*1e6/n, ut/tck*1e6/n, kt/tck*1e6/n, cs/n
        }' "$work/wrk.out"
}

echo "round side rps p99_ms cpu_us/req user_us/req sys_us/req ctxsw/req | vs nginx: rps p99 cpu"
for r in $(seq "$ROUNDS"); do
    echo "$r direct $(wrk_run "$BACKEND" "${pids[0]}")"
    n=$(wrk_run "$NGINX_RP" "$rp_pid"); echo "$r nginx $n"
    read -r nr np nc _ <<<"$n"
    for i in "${!names[@]}"; do
        f=$(wrk_run "${targets[$i]}" "${vpids[$i]}")
        read -r fr fp fc _ <<<"$f"
        awk -v r="$r" -v name="${names[$i]}" -v f="$f" -v a="$fr" -v b="$nr" -v c="$fp" -v d="$np" -v e="$fc" -v g="$nc" \
            'BEGIN {printf "%s %s %s | %.2f %.2f %.2f\n", r, name, f, a/b, c/d, e/g}'
    done
done
