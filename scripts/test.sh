#!/usr/bin/env bash
# Installs what the test suite needs (idempotently) and runs every test of the workspace.
# Prints cargo's per-binary summaries and, at the end, the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

passed=0; failed=0; ignored=0
while read -r p f i; do
  passed=$((passed + p)); failed=$((failed + f)); ignored=$((ignored + i))
done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log")

echo
echo "Summary of every test binary:"
grep -E '^test result:' "$log" || true
echo
echo "${passed} passed, ${failed} failed, ${ignored} skipped"
exit "$status"
