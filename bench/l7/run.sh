#!/usr/bin/env bash
# L7 proxy benchmarks, every side of each ratio measured in the same run on this machine:
#   1. HTTP/1.1: wrk through fqdnwall's HTTP proxy (20 rules) vs nginx as a plain reverse
#      proxy vs direct, same nginx backend.
#   2. HTTP/2: h2load through the proxy vs direct, same nginx h2c backend.
#   3. Kafka: produce throughput (l7/examples/kafka_load.rs, acks=1) through the Kafka proxy
#      (role produce on the topic, so every request is decoded and matched) vs direct to tansu.
# Prints a Markdown section for bench/RESULTS.md. Needs scripts/setup-l7.sh. Loopback only.
#   DUR=seconds per measurement (default 10), ROUNDS (default 2; the median-rps round is kept),
#   SKIP_BUILD=1 to use the release examples already built.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --quiet --release -p l7 --examples)
BIN=$CARGO_TARGET_DIR/release/examples

BACKEND=127.0.0.1:18080
BACKEND_H2=127.0.0.1:18081
NGINX_RP=127.0.0.1:18090
PROXY=127.0.0.1:18100
PROXY_H2=127.0.0.1:18101
BROKER=127.0.0.1:19092
KPROXY=127.0.0.1:19192
URLPATH=/api/v1/items/42

# shellcheck source=bench/l7/common.sh
. "$ROOT/bench/l7/common.sh"
start_nginx
"$BIN/l7proxy" --http "$PROXY" "$BACKEND" --http-rules 20 >"$work/proxy.log" & px_pid=$!; pids+=($px_pid)
"$BIN/l7proxy" --http "$PROXY_H2" "$BACKEND_H2" --http-rules 20 >"$work/proxy-h2.log" & pids+=($!)

for p in $BACKEND $BACKEND_H2 $NGINX_RP $PROXY $PROXY_H2; do wait_port "$p"; done
# Policy sanity: the bench path is allowed, another is denied.
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$PROXY$URLPATH")" = 200 ]
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$PROXY/admin")" = 403 ]

median_of() { # lines "rps p99" -> the line with the median rps
    sort -n -k1,1 | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'
}

declare -A H1
for name in direct nginx fqdnwall; do : > "$work/h1.$name"; done
for _ in $(seq "$ROUNDS"); do
    # rps p99 CPU per request (the first three of wrk_run's figures)
    wrk_run "$BACKEND" "$be_pid" | cut -d' ' -f1-3 >>"$work/h1.direct"
    wrk_run "$NGINX_RP" "$rp_pid" | cut -d' ' -f1-3 >>"$work/h1.nginx"
    wrk_run "$PROXY" "$px_pid" | cut -d' ' -f1-3 >>"$work/h1.fqdnwall"
done
for name in direct nginx fqdnwall; do H1[$name]=$(median_of <"$work/h1.$name"); done

h2_run() { # target -> "rps mean_ms"
    h2load -n $((DUR * 20000)) -c 16 -m 16 -t 1 "http://$1$URLPATH" >"$work/h2.out" 2>&1
    local rps mean
    rps=$(awk '/^finished in/ {gsub(/,/,""); print $4}' "$work/h2.out")
    mean=$(awk '/^time for request:/ {v=$5; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)}; print v}' "$work/h2.out")
    grep -q "succeeded, 0 failed\|0 failed" "$work/h2.out" || { cat "$work/h2.out" >&2; exit 1; }
    echo "$rps $mean"
}
: > "$work/h2.direct"; : > "$work/h2.fqdnwall"
for _ in $(seq "$ROUNDS"); do
    h2_run "$BACKEND_H2" >>"$work/h2.direct"
    h2_run "$PROXY_H2" >>"$work/h2.fqdnwall"
done
H2D=$(median_of <"$work/h2.direct"); H2P=$(median_of <"$work/h2.fqdnwall")

# Kafka.
tansu broker --listener-url "tcp://$BROKER" --advertised-listener-url "tcp://$BROKER" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 & pids+=($!)
wait_port "$BROKER"
"$BIN/l7proxy" --kafka "$KPROXY" "$BROKER" --kafka-topic bench >"$work/kproxy.log" & pids+=($!)
wait_port "$KPROXY"
out=$(python3 "$ROOT/l7/tests/kafka_client.py" create "$BROKER" bench)
[ "$out" = OK ] || { echo "creating the topic: $out" >&2; exit 1; }
: > "$work/k.direct"; : > "$work/k.fqdnwall"
kafka_run() { # target -> "records_per_sec mb_per_sec errors"
    "$BIN/kafka_load" "$1" bench "$DUR" 4 100 100 8 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["records_per_sec"], d["mb_per_sec"], d["errors"])'
}
for _ in $(seq "$ROUNDS"); do
    kafka_run "$BROKER" >>"$work/k.direct"
    kafka_run "$KPROXY" >>"$work/k.fqdnwall"
done
KD=$(median_of <"$work/k.direct"); KP=$(median_of <"$work/k.fqdnwall")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
read -r d_rps d_p99 d_cpu <<<"${H1[direct]}"
read -r n_rps n_p99 n_cpu <<<"${H1[nginx]}"
read -r f_rps f_p99 f_cpu <<<"${H1[fqdnwall]}"
read -r h2d_rps h2d_mean <<<"$H2D"
read -r h2p_rps h2p_mean <<<"$H2P"
read -r kd_rps kd_mb kd_err <<<"$KD"
read -r kp_rps kp_mb kp_err <<<"$KP"

cat <<MD
### L7 proxies ($(date -u +%Y-%m-%d), commit $(cd "$ROOT" && git rev-parse --short HEAD))

Method: \`bench/l7/run.sh\` (DUR=${DUR}s per measurement, ${ROUNDS} interleaved rounds, median-rps
round kept), release build, everything on loopback of this 2-core machine (load generator,
proxy and backend share the cores). Backend: nginx 1 worker returning 200 "ok". fqdnwall's
HTTP proxy runs the non-transparent mode (\`l7/examples/l7proxy.rs\`: each connection goes to the
least busy of its single-threaded runtimes, one per two CPUs, \`l7::ConnectionWorkers::for_node\`) with 20 HTTP rules (the
request matches the last); nginx reverse proxy: \`worker_processes auto\`, upstream keepalive.
CPU per request: user+sys time of the server's processes over the requests wrk completed (less
disturbed by other load on the machine than req/s and latency).

| HTTP/1.1, wrk -t1 -c32 | req/s | p99 ms | CPU us/req | rps vs nginx | p99 vs nginx | CPU vs nginx |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| direct to backend | $d_rps | $d_p99 | $d_cpu | | | |
| nginx reverse proxy | $n_rps | $n_p99 | $n_cpu | 1.00 | 1.00 | 1.00 |
| fqdnwall HTTP proxy, 20 rules | $f_rps | $f_p99 | $f_cpu | $(ratio "$f_rps" "$n_rps") | $(ratio "$f_p99" "$n_p99") | $(ratio "$f_cpu" "$n_cpu") |

| HTTP/2, h2load -c16 -m16 | req/s | mean ms | vs direct |
| --- | ---: | ---: | ---: |
| direct to backend | $h2d_rps | $h2d_mean | 1.00 |
| fqdnwall HTTP proxy, 20 rules | $h2p_rps | $h2p_mean | $(ratio "$h2p_rps" "$h2d_rps") |

| Kafka produce (acks=1, 4 conns, 8 in flight, 100 x 100 B records per request) | records/s | MB/s | errors | vs direct |
| --- | ---: | ---: | ---: | ---: |
| direct to tansu | $kd_rps | $kd_mb | $kd_err | 1.00 |
| fqdnwall Kafka proxy (role produce, topic rule) | $kp_rps | $kp_mb | $kp_err | $(ratio "$kp_rps" "$kd_rps") |
MD
