#!/usr/bin/env bash
# Runs the policy engine benchmarks (policy/benches/engine.rs) and prints the figures that
# bench/RESULTS.md records: the SUMMARY lines (ratios measured in one run) and criterion's
# estimates. Usage: bench/policy-engine.sh [extra cargo bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo bench -p policy --bench engine "$@" 2>&1 | tee "$log" >&2
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- policy || echo ' (policy/ modified)')"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
grep '^SUMMARY' "$log" | sed 's/^SUMMARY /- /'
grep -E '^policy/|time:' "$log" | paste - - | sed -E 's/ +/ /g; s/^/- criterion /'
