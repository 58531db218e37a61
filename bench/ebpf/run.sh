#!/usr/bin/env bash
# eBPF datapath on the wire: iperf3 TCP throughput and TCP request/response latency
# (sockperf ping-pong) through one veth, with fqdnwall's endpoint programs attached (1,000
# policy entries for the endpoint, 1,000+ ipcache entries) vs the same veth without programs.
# Both sides in the same run, in interleaved rounds (the order alternates per round); the
# figures are medians over the rounds.
#
# Topology (two network namespaces of our own, nothing else touched):
#   client ns  eth0 10.231.7.2/24 ──veth── server ns  fwb0 10.231.7.1/24
# fwb0 is the client endpoint's host-side interface: ebpf/examples/bench_endpoint.rs loads
# the datapath with a private pin dir, attaches the endpoint programs to it through TCX
# (tc ingress = the endpoint's egress, tc egress = its ingress; both enforced) and removes
# everything when it is stopped. iperf3 and sockperf servers listen in the server ns.
#
# Root only. Installs iperf3 and sockperf (Debian) when missing. Prints a Markdown section.
#   DUR=seconds per measurement (default 10), ROUNDS (default 4), ENTRIES (policy entries,
#   default 1000), IPCACHE (/32 entries besides the server's, default 1000),
#   SKIP_BUILD=1 to use the release example already built.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-4}
ENTRIES=${ENTRIES:-1000}
IPCACHE=${IPCACHE:-1000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

if [ "$(id -u)" != 0 ]; then
    echo "bench/ebpf/run.sh: needs root (network namespaces, eBPF)" >&2
    exit 1
fi
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v sockperf >/dev/null || need+=(sockperf)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
fi
[ "${SKIP_BUILD:-0}" = 1 ] ||
    (cd "$ROOT" && cargo build --quiet --release -p ebpf --example bench_endpoint)
BIN=$CARGO_TARGET_DIR/release/examples/bench_endpoint

CLI=fwb-cli-$$
SRV=fwb-srv-$$
PIN=/sys/fs/bpf/fqdnwall-bench-veth-$$
CLI_IP=10.231.7.2
SRV_IP=10.231.7.1
IPERF_PORT=5201
RR_PORT=11111
work=$(mktemp -d)
pids=()
dp_pid=

stop_datapath() {
    if [ -n "$dp_pid" ]; then
        kill -TERM "$dp_pid" 2>/dev/null || true
        wait "$dp_pid" 2>/dev/null || true
        dp_pid=
    fi
}
cleanup() {
    stop_datapath
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$CLI" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
    # Only if the example could not unload (killed hard): its pins.
    if [ -d "$PIN" ]; then
        rm -f "$PIN"/links/* "$PIN"/maps/* 2>/dev/null || true
        rmdir "$PIN"/links "$PIN"/maps "$PIN" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$CLI"
ip netns add "$SRV"
ip -n "$CLI" link set lo up
ip -n "$SRV" link set lo up
ip -n "$SRV" link add fwb0 type veth peer name eth0 netns "$CLI"
ip -n "$SRV" addr add "$SRV_IP/24" dev fwb0
ip -n "$CLI" addr add "$CLI_IP/24" dev eth0
ip -n "$SRV" link set fwb0 up
ip -n "$CLI" link set eth0 up

ip netns exec "$SRV" iperf3 -s -B "$SRV_IP" -p "$IPERF_PORT" >"$work/iperf3-server.log" 2>&1 &
pids+=($!)
ip netns exec "$SRV" sockperf server --tcp -i "$SRV_IP" -p "$RR_PORT" >"$work/sockperf-server.log" 2>&1 &
pids+=($!)

# Waits until a TCP connect from the client ns to the port succeeds.
wait_port() {
    for _ in $(seq 100); do
        if ip netns exec "$CLI" timeout 1 bash -c "exec 3<>/dev/tcp/$SRV_IP/$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on $SRV_IP:$1" >&2
    return 1
}

start_datapath() {
    "$BIN" --netns "$SRV" --ifname fwb0 --pin "$PIN" --server "$SRV_IP" \
        --ports "$IPERF_PORT,$RR_PORT" --entries "$ENTRIES" --ipcache "$IPCACHE" \
        >"$work/dp.log" 2>&1 &
    dp_pid=$!
    for _ in $(seq 300); do
        if grep -qs '^ready' "$work/dp.log"; then return 0; fi
        if ! kill -0 "$dp_pid" 2>/dev/null; then
            cat "$work/dp.log" >&2
            echo "bench_endpoint exited before it was ready" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "bench_endpoint not ready after 30 s" >&2
    exit 1
}

# Echoes bits per second received by the server side.
run_iperf() {
    ip netns exec "$CLI" iperf3 -c "$SRV_IP" -p "$IPERF_PORT" -t "$DUR" -O 1 -J >"$work/iperf.json"
    jq '.end.sum_received.bits_per_second' "$work/iperf.json"
}

# Echoes "p50_us p99_us transactions_per_s" (round trips, not half round trips).
run_rr() {
    ip netns exec "$CLI" sockperf ping-pong --tcp -i "$SRV_IP" -p "$RR_PORT" -t "$DUR" \
        -m 64 --full-rtt >"$work/rr.log" 2>&1
    awk '
        /percentile 50.000 =/ { p50 = $NF }
        /percentile 99.000 =/ { p99 = $NF }
        /\[Valid Duration\]/ {
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^RunTime=/) { split($i, a, "="); t = a[2] }
                if ($i ~ /^ReceivedMessages=/) { split($i, b, "="); n = b[2] }
            }
        }
        END {
            if (p50 == "" || p99 == "" || t == "" || t == 0) exit 1
            printf "%s %s %.0f\n", p50, p99, n / t
        }' "$work/rr.log" || { cat "$work/rr.log" >&2; echo "cannot parse sockperf output" >&2; exit 1; }
}

wait_port "$IPERF_PORT"
wait_port "$RR_PORT"

# The programs must really be in the path: with them, a port without a policy entry is
# dropped (the connect times out); without them, the server ns refuses it at once.
start_datapath
if ip netns exec "$CLI" timeout 1 bash -c "exec 3<>/dev/tcp/$SRV_IP/5999" 2>/dev/null; then
    echo "port 5999 reachable with the programs attached: not enforcing" >&2
    exit 1
elif [ $? != 124 ]; then
    echo "port 5999 refused instead of dropped with the programs attached" >&2
    exit 1
fi
stop_datapath
if ip netns exec "$CLI" timeout 1 bash -c "exec 3<>/dev/tcp/$SRV_IP/5999" 2>/dev/null; [ $? = 124 ]; then
    echo "port 5999 still dropped after the programs were removed" >&2
    exit 1
fi

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$work/rows"
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="with without"; else order="without with"; fi
    for side in $order; do
        [ "$side" = with ] && start_datapath
        bps=$(run_iperf)
        rr=$(run_rr)
        read -r p50 p99 tps <<<"$rr"
        if [ "$side" = with ]; then
            stop_datapath
            # Counters of the entries the flows matched: proof they went through the programs.
            grep -E '^entry identity' "$work/dp.log" >>"$work/counters" || {
                cat "$work/dp.log" >&2
                echo "the allowing entries counted no packets" >&2
                exit 1
            }
        fi
        echo "$r $side $bps $p50 $p99 $tps" >>"$work/rows"
        echo "round $r $side: $(awk -v b="$bps" 'BEGIN{printf "%.2f", b/1e9}') Gbit/s, rtt p50 $p50 us p99 $p99 us, $tps trans/s" >&2
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$work/rows" "$DUR" "$ROUNDS" "$ENTRIES" "$IPCACHE" "$commit" "$load_start" "$load_end" <<'PY'
import statistics, sys, datetime, platform
rows_path, dur, rounds, entries, ipcache, commit, ls, le = sys.argv[1:9]
rows = [l.split() for l in open(rows_path) if l.strip()]
by = {"with": [], "without": []}
for r, side, bps, p50, p99, tps in rows:
    by[side].append((int(r), float(bps), float(p50), float(p99), float(tps)))
def med(side, i):
    return statistics.median(x[i] for x in by[side])
w = {k: med("with", i) for k, i in (("bps", 1), ("p50", 2), ("p99", 3), ("tps", 4))}
o = {k: med("without", i) for k, i in (("bps", 1), ("p50", 2), ("p99", 3), ("tps", 4))}
today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(f"Measured {today} at commit {commit}, kernel {platform.release()}, load average "
      f"{ls} at the start and {le} at the end (1/5/15 min).\n")
print(f"Method: `bench/ebpf/run.sh` (DUR={dur}s per measurement, ROUNDS={rounds}, the order of "
      f"the two sides alternating per round; medians over the rounds). {entries} policy "
      f"entries for the endpoint, {ipcache} + 1 ipcache /32 entries and 3 LPM prefixes; both "
      "directions enforced.\n")
print("| veth, one TCP flow | iperf3 Gbit/s | RR p50 µs | RR p99 µs | transactions/s |")
print("| --- | ---: | ---: | ---: | ---: |")
print(f"| without programs | {o['bps']/1e9:.2f} | {o['p50']:.1f} | {o['p99']:.1f} | {o['tps']:.0f} |")
print(f"| with programs, {entries} entries | {w['bps']/1e9:.2f} | {w['p50']:.1f} | {w['p99']:.1f} | {w['tps']:.0f} |")
thr = w['bps'] / o['bps']
r50 = w['p50'] / o['p50']
r99 = w['p99'] / o['p99']
rtps = w['tps'] / o['tps']
print(f"| ratio with / without | {thr:.3f} | {r50:.3f} | {r99:.3f} | {rtps:.3f} |")
# Each round measures both sides back to back: the median of the per-round ratios is less
# exposed to the machine's load drifting between rounds.
pair = {}
for r, side, bps, p50, p99, tps in rows:
    pair.setdefault(r, {})[side] = [float(bps), float(p50), float(p99), float(tps)]
pr = [[p["with"][i] / p["without"][i] for i in range(4)] for p in pair.values() if len(p) == 2]
m = [statistics.median(x[i] for x in pr) for i in range(4)]
print(f"| median of per-round ratios | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} |")
print()
print("Per round (Gbit/s; p50/p99 µs; transactions/s):\n")
print("| round | side | Gbit/s | p50 | p99 | trans/s |")
print("| ---: | --- | ---: | ---: | ---: | ---: |")
for r, side, bps, p50, p99, tps in rows:
    print(f"| {r} | {side} | {float(bps)/1e9:.2f} | {float(p50):.1f} | {float(p99):.1f} | {float(tps):.0f} |")
print()
ok_thr = "met" if thr >= 0.95 else "NOT met"
ok_lat = "met" if max(r50, r99) <= 1.1 else "NOT met"
print(f"Goals: throughput ≥ 0.95×: {ok_thr} ({thr:.3f}×); latency ≤ 1.1×: {ok_lat} "
      f"(p50 {r50:.3f}×, p99 {r99:.3f}×).")
PY
echo >&2
echo "packet counters of the allowing entries, per 'with' phase:" >&2
cat "$work/counters" >&2
