#!/usr/bin/env bash
# DNS forwarding benchmark: dnsperf through fqdnwall vs through dnsdist vs through dnsmasq
# (cache-size=0) vs straight to the upstream vs through a floor relay that only receives and
# sends (dnsproxy/examples/floor_relay.rs: what any forwarder's two thread wake-ups per query
# cost on this machine), with the same query file and the same upstream (unbound,
# authoritative for a generated zone), all in one run, on loopback.
#
# For each target it measures
#   1. throughput: dnsperf with 100 outstanding queries for DURATION seconds -> queries/s;
#   2. latency at a fixed rate (RATE q/s, default 20000) -> p50 / p99 from dnsperf -v per-query
#      latencies, and the p50 added over the direct path;
# and reports the ratios fqdnwall/dnsdist (qps) and fqdnwall/direct (latency).
#
# Usage:
#   bench/dns/run.sh [--fqdnwall BIN] [--config FILE] [--example] [--duration S] [--rate QPS]
#                    [--rounds N] [--out FILE]
#   --fqdnwall BIN  the fqdnwall binary (default: target/release/fqdnwall); run as
#                   `BIN run --config FILE`
#   --config FILE   its config; dns.listen must include 127.0.0.1:25301 and dns.upstreams
#                   127.0.0.1:25300 (the upstream this script starts). Default: a generated
#                   config (datapath none) with a policy of 1,000 DNS patterns and a toFQDNs
#                   selector, the bench client 127.0.0.2 as its endpoint.
#   --example       measure dnsproxy/examples/allow_all (the proxy crate alone, allow-all
#                   policy, learning into an in-memory table) instead of the fqdnwall binary
#   --rounds N      interleaved rounds per measurement, the median is reported (default 3)
#   --out FILE      append the results as a Markdown section to FILE (e.g. bench/RESULTS.md)
#   --cpu-wake-latency US
#                   hold a CPU wake-up latency bound of US microseconds (PM QoS,
#                   /dev/cpu_dma_latency; root) for the whole run, so every target is measured
#                   with idle CPUs that wake within it, and give the generated fqdnwall config
#                   `dns.cpuWakeLatency: USus` (fqdnwall's own way of taking that bound under load)
#
# Client and servers share this machine's cores, so every figure is relative: compare the rows
# of one run, never runs on different machines.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FW_BIN="$ROOT/target/release/fqdnwall"
FW_CONFIG=""
EXAMPLE=0
DURATION=10
RATE=20000
ROUNDS=3
OUT=""
WAKE_US=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fqdnwall) FW_BIN=$2; shift 2 ;;
    --config) FW_CONFIG=$2; shift 2 ;;
    --example) EXAMPLE=1; shift ;;
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --cpu-wake-latency) WAKE_US=$2; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

UP=127.0.0.1:25300
FW=127.0.0.1:25301
DD=127.0.0.1:25302
DM=127.0.0.1:25303
FL=127.0.0.1:25304
METRICS=127.0.0.1:25309
CLIENT=127.0.0.2

need() {
  local bin=$1 pkg=$2
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get install -y -qq "$pkg" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$pkg" >/dev/null; }
    else
      echo "run.sh: $bin missing: apt-get install $pkg" >&2; exit 2
    fi
  fi
}
need unbound unbound
need dnsperf dnsperf
need dnsdist dnsdist
need dnsmasq dnsmasq
need dig bind9-dnsutils
export PATH="$PATH:/usr/sbin"

if [ -n "$WAKE_US" ]; then
  case "$WAKE_US" in *[!0-9]*|'') echo "run.sh: --cpu-wake-latency takes microseconds, e.g. 0" >&2; exit 2 ;; esac
  # The bound holds while fd 9 stays open, i.e. for this script's life. The kernel takes it as
  # a native-endian 32-bit integer (little-endian on x86).
  exec 9>/dev/cpu_dma_latency
  printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((WAKE_US & 255)) $(((WAKE_US >> 8) & 255)) \
    $(((WAKE_US >> 16) & 255)) $(((WAKE_US >> 24) & 255)))" >&9
fi
WAKE_NOTE=""
[ -n "$WAKE_US" ] && WAKE_NOTE=" CPU wake-up latency bound of ${WAKE_US} µs held for the whole run (\`--cpu-wake-latency ${WAKE_US}\`: PM QoS, idle CPUs poll instead of halting), for every target alike; fqdnwall's config has \`dns.cpuWakeLatency: ${WAKE_US}us\`."

WORK=$(mktemp -d /tmp/fqdnwall-dnsbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the zone and the query file -------------------------------------------------------------
{
  echo '$ORIGIN bench.test.'
  echo '$TTL 300'
  echo '@ IN SOA ns.bench.test. admin.bench.test. 1 3600 600 86400 300'
  echo '@ IN NS ns.bench.test.'
  echo 'ns IN A 127.0.0.1'
  for i in $(seq 1 1000); do
    echo "h$i IN A 198.18.$((i / 256)).$((i % 256))"
  done
  for i in $(seq 1 100); do
    echo "c$i IN CNAME h$i.bench.test."
  done
} > "$WORK/bench.zone"
{
  for i in $(seq 1 1000); do echo "h$i.bench.test A"; done
  for i in $(seq 1 100); do echo "c$i.bench.test A"; done
} | shuf --random-source=<(yes) > "$WORK/queries.txt"

# --- the upstream ----------------------------------------------------------------------------
cat > "$WORK/unbound.conf" <<CONF
server:
  interface: ${UP%:*}@${UP#*:}
  port: ${UP#*:}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$WORK"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  # Large socket buffers: a single-threaded server on a loaded machine must not drop bursts.
  so-rcvbuf: 4m
  so-sndbuf: 4m
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-ip6: no
  local-zone: "test." nodefault
auth-zone:
  name: "bench.test."
  zonefile: "$WORK/bench.zone"
  for-downstream: yes
  for-upstream: yes
remote-control:
  control-enable: no
CONF
unbound -d -c "$WORK/unbound.conf" >"$WORK/unbound.log" 2>&1 &
PIDS+=($!)

wait_dns() { # addr
  local addr=$1
  for _ in $(seq 1 100); do
    if dig +short +tries=1 +time=1 -b "$CLIENT" -p "${addr#*:}" "@${addr%:*}" h1.bench.test A 2>/dev/null | grep -q '^198\.18\.'; then
      return 0
    fi
    sleep 0.1
  done
  echo "run.sh: nothing answers on $addr" >&2
  return 1
}
wait_dns "$UP"

# --- the peers -------------------------------------------------------------------------------
start_fqdnwall() {
  if [ "$EXAMPLE" = 1 ]; then
    (cd "$ROOT" && cargo build -q --release -p dnsproxy --example allow_all)
    local bin
    bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/allow_all"
    RUST_LOG=warn "$bin" --listen "$FW" --upstream "$UP" >"$WORK/fqdnwall.out" 2>"$WORK/fqdnwall.log" &
    FW_PID=$!
  else
    [ -x "$FW_BIN" ] || { echo "run.sh: $FW_BIN is not an executable (build with cargo build --release, or pass --fqdnwall/--example)" >&2; exit 2; }
    if [ -z "$FW_CONFIG" ]; then
      FW_CONFIG="$WORK/fqdnwall.yaml"
      mkdir -p "$WORK/policies" "$WORK/state"
      cat > "$FW_CONFIG" <<CONF
policyDir: policies/
stateDir: $WORK/state
apiSocket: $WORK/api.sock
datapath: none
dns:
  listen: ["$FW"]
  upstreams: ["$UP"]
  transparent: false
  responseMaxDelay: 100ms${WAKE_US:+
  cpuWakeLatency: ${WAKE_US}us}
endpoints:
  - name: bench
    namespace: default
    labels: {app: bench}
    ips: ["$CLIENT"]
metrics:
  listen: $METRICS
CONF
      {
        echo 'apiVersion: cilium.io/v2'
        echo 'kind: CiliumNetworkPolicy'
        echo 'metadata: {name: bench-dns, namespace: default}'
        echo 'spec:'
        echo '  endpointSelector: {matchLabels: {app: bench}}'
        echo '  egress:'
        echo '  - toEntities: [all]'
        echo "    toPorts: [{ports: [{port: \"${UP#*:}\", protocol: ANY}], rules: {dns: ["
        for i in $(seq 1 999); do echo "      {matchPattern: \"*.p$i.example.com\"},"; done
        echo '      {matchPattern: "*.bench.test"}]}}]'
        echo '  - toFQDNs: [{matchPattern: "*.bench.test"}]'
        echo '    toPorts: [{ports: [{port: "443", protocol: TCP}]}]'
      } > "$WORK/policies/bench.yaml"
    fi
    "$FW_BIN" run --config "$FW_CONFIG" >"$WORK/fqdnwall.out" 2>"$WORK/fqdnwall.log" &
    FW_PID=$!
  fi
  PIDS+=("$FW_PID")
}

start_dnsdist() {
  cat > "$WORK/dnsdist.conf" <<CONF
setLocal("$DD")
-- Health-check with a name the upstream serves (the default asks the root, which it does not).
newServer({address="$UP", checkName="h1.bench.test.", checkType="A"})
setACL({"127.0.0.0/8"})
setSecurityPollSuffix("")
CONF
  dnsdist --supervised --disable-syslog -C "$WORK/dnsdist.conf" >"$WORK/dnsdist.log" 2>&1 &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
}

# The floor: a relay that only receives and sends (dnsproxy/examples/floor_relay.rs). What it
# adds over direct is what any forwarder pays on this machine (two thread wake-ups per query).
start_floor() {
  (cd "$ROOT" && cargo build -q --release -p dnsproxy --example floor_relay)
  "${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/floor_relay" "$FL" "$UP" >"$WORK/floor.log" 2>&1 &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
}

start_dnsmasq() {
  dnsmasq -k --no-resolv --no-hosts --server="${UP%:*}#${UP#*:}" --listen-address="${DM%:*}" \
    --port="${DM#*:}" --bind-interfaces --cache-size=0 --dns-forward-max=10000 \
    --pid-file="$WORK/dnsmasq.pid" --user=root >"$WORK/dnsmasq.log" 2>&1 &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
}

# --- measuring -------------------------------------------------------------------------------
# CPU time (clock ticks, all threads) a process has used so far; 0 for no process.
cpu_ticks() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"
}
# dnsperf_max ADDR PID -> "qps avg_latency_s lost cpu_us_per_query"
dnsperf_max() {
  local addr=$1 pid=${2:-} before after
  before=$(cpu_ticks "$pid")
  dnsperf -s "${addr%:*}" -p "${addr#*:}" -a "$CLIENT" -d "$WORK/queries.txt" -l "$DURATION" \
    -c 4 -q 100 > "$WORK/max.out" 2>&1
  after=$(cpu_ticks "$pid")
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v haspid="${pid:+1}" '
      /Queries per second:/ {q=$4}
      /Queries completed:/ {done=$3}
      /Average Latency \(s\):/ {l=$4}
      /Queries lost:/ {lost=$3}
      END {cpu = (haspid && done > 0) ? sprintf("%.1f", ticks / hz * 1e6 / done) : "-"; print q, l, lost, cpu}' "$WORK/max.out"
}
# dnsperf_rate ADDR -> "p50_us p99_us lost"
dnsperf_rate() {
  local addr=$1
  dnsperf -s "${addr%:*}" -p "${addr#*:}" -a "$CLIENT" -d "$WORK/queries.txt" -l "$DURATION" \
    -c 4 -q 1000 -Q "$RATE" -v 2>/dev/null > "$WORK/rate.out"
  local lost
  lost=$(awk '/Queries lost:/ {print $3}' "$WORK/rate.out")
  awk '/^> / {print $NF * 1e6}' "$WORK/rate.out" | sort -n > "$WORK/lat.txt"
  local n
  n=$(wc -l < "$WORK/lat.txt")
  if [ "$n" -eq 0 ]; then echo "- - $lost"; return; fi
  local p50 p99
  p50=$(sed -n "$(( (n * 50 + 99) / 100 ))p" "$WORK/lat.txt")
  p99=$(sed -n "$(( (n * 99 + 99) / 100 ))p" "$WORK/lat.txt")
  printf '%.0f %.0f %s\n' "$p50" "$p99" "$lost"
}

# All servers run side by side (idle when not measured) and the measurements are interleaved
# round by round, so a burst of other load on the machine hits every target alike; each figure
# is the median of its rounds.
declare -A QPS AVG P50 P99 LOSTM LOSTR
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else print v[int((NR+1)/2)]}'; }

start_fqdnwall
if [ "$EXAMPLE" = 1 ]; then FW_LABEL="dnsproxy allow_all example"; else FW_LABEL="fqdnwall run"; fi
start_dnsdist; DD_PID=$PEER_PID
start_dnsmasq; DM_PID=$PEER_PID
start_floor; FL_PID=$PEER_PID
declare -A ADDR=([direct]=$UP [fqdnwall]=$FW [dnsdist]=$DD [dnsmasq]=$DM [floor]=$FL)
declare -A PID=([direct]="" [fqdnwall]=$FW_PID [dnsdist]=$DD_PID [dnsmasq]=$DM_PID [floor]=$FL_PID)
declare -A CPU
TARGETS="direct fqdnwall dnsdist dnsmasq floor"
for t in $TARGETS; do wait_dns "${ADDR[$t]}"; done

for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    read -r q a l c < <(dnsperf_max "${ADDR[$t]}" "${PID[$t]}")
    echo "$q" >> "$WORK/qps.$t"; echo "$a" >> "$WORK/avg.$t"; echo "$l" >> "$WORK/lostm.$t"
    echo "$c" >> "$WORK/cpu.$t"
    echo "round $round $t: $q q/s, avg $a s, lost $l, $c us CPU per query" >&2
  done
done
for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    read -r p50 p99 l < <(dnsperf_rate "${ADDR[$t]}")
    echo "$p50" >> "$WORK/p50.$t"; echo "$p99" >> "$WORK/p99.$t"; echo "$l" >> "$WORK/lostr.$t"
    echo "round $round $t at $RATE q/s: p50 $p50 us, p99 $p99 us, lost $l" >&2
  done
done
for t in $TARGETS; do
  QPS[$t]=$(median < "$WORK/qps.$t"); AVG[$t]=$(median < "$WORK/avg.$t")
  P50[$t]=$(median < "$WORK/p50.$t"); P99[$t]=$(median < "$WORK/p99.$t")
  LOSTM[$t]=$(median < "$WORK/lostm.$t"); LOSTR[$t]=$(median < "$WORK/lostr.$t")
  CPU[$t]=$(median < "$WORK/cpu.$t")
done

HOLD=""
if [ "$EXAMPLE" = 0 ] && command -v curl >/dev/null; then
  HOLD=$(curl -s "http://$METRICS/metrics" | grep -i 'hold' | grep -v '^#' || true)
fi
kill -TERM "$FW_PID" 2>/dev/null || true
wait "$FW_PID" 2>/dev/null || true
if [ "$EXAMPLE" = 1 ]; then HOLD=$(cat "$WORK/fqdnwall.out"); fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "-" && b != "-") printf "%.2f", a / b; else print "-" }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-") printf "%+d", a - b; else print "-" }'; }

REPORT=$(
  echo "### DNS forwarding: $FW_LABEL vs dnsdist vs dnsmasq vs direct$( [ -n "$WAKE_US" ] && echo ", CPU wake-up bound ${WAKE_US} µs") ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Method: \`bench/dns/run.sh$( [ "$EXAMPLE" = 1 ] && echo ' --example')\`; upstream unbound $(unbound -V | awk 'NR==1{print $2}') (1 thread, authoritative zone of 1,000 A names + 100 CNAMEs); $(wc -l < "$WORK/queries.txt") distinct A queries, looped;"
  echo "dnsperf $(dnsperf -h 2>&1 | awk '/^Version/{print $2}'), client $CLIENT; throughput: 4 clients, 100 outstanding, ${DURATION} s; latency: fixed ${RATE} q/s for ${DURATION} s, per-query latencies from \`dnsperf -v\`; targets interleaved, median of ${ROUNDS} rounds."
  echo "dnsdist $(dnsdist --version | awk 'NR==1{print $2}') (no packet cache), dnsmasq $(dnsmasq --version | awk 'NR==1{print $3}') (cache-size=0, dns-forward-max=10000); floor relay: \`dnsproxy/examples/floor_relay.rs\`, one thread blocking in recv on each of its two sockets, nothing parsed. $(nproc) cores shared by client and servers; load average at the end: $LOAD.$WAKE_NOTE"
  echo "Forwarder CPU per query: user+system CPU time of the forwarder's process (all threads) during the throughput runs, divided by the queries completed: the figure least disturbed by other load on the machine."
  echo
  echo "| target | q/s (max) | vs dnsdist | forwarder CPU per query (µs) | avg latency (ms) at max | p50 at ${RATE} q/s (µs) | p99 (µs) | p50 added vs direct (µs) | lost (max / rate) |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for t in $TARGETS; do
    name=$t; [ "$t" = fqdnwall ] && name="$FW_LABEL"; [ "$t" = floor ] && name="floor relay (receive and send only)"
    printf '| %s | %.0f | %s | %s | %.3f | %s | %s | %s | %s / %s |\n' "$name" "${QPS[$t]:-0}" "$(ratio "${QPS[$t]:-0}" "${QPS[dnsdist]:-0}")" "${CPU[$t]}" \
      "$(awk -v a="${AVG[$t]:-0}" 'BEGIN{print a*1000}')" "${P50[$t]}" "${P99[$t]}" "$(added "${P50[$t]}" "${P50[direct]}")" "${LOSTM[$t]}" "${LOSTR[$t]}"
  done
  echo
  if [ -n "$HOLD" ]; then
    echo "Hold time (answer to enforceable) and counters reported by $FW_LABEL after the run:"
    echo
    echo '```'
    echo "$HOLD"
    echo '```'
  fi
)
echo "$REPORT"
if [ -n "$OUT" ]; then
  { echo; echo "$REPORT"; } >> "$OUT"
fi
