#!/usr/bin/env bash
# Installs what the test suite needs (idempotently), runs every test of the workspace, then
# every fuzz target briefly (scripts/fuzz.sh; FUZZ_SECONDS per target, 0 skips). Prints
# cargo's per-binary summaries, the fuzz summary and, at the end, the totals, in which each
# fuzz target counts as one test (a crash or a failed build as a failure).
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
fuzz_log="$(mktemp)"
trap 'rm -f "$log" "$fuzz_log"' EXIT
fuzz_status=0
./scripts/fuzz.sh 2>&1 | tee "$fuzz_log" || fuzz_status=$?
fuzz_summary="$(grep '^fuzz: ' "$fuzz_log" | tail -n 1 || true)"
case "$fuzz_summary" in
  "fuzz: skipped"*) ;;
  *" targets, no crash")
    passed=$((passed + ${fuzz_summary//[!0-9]/})) ;;
  *" targets, "*" failed"*)
    read -r fuzz_n fuzz_failed < <(sed -n 's/^fuzz: \([0-9]*\) targets, \([0-9]*\) failed.*/\1 \2/p' <<<"$fuzz_summary")
    passed=$((passed + fuzz_n - fuzz_failed)); failed=$((failed + fuzz_failed)) ;;
  *)
    # scripts/fuzz.sh stopped before its summary (setup or usage): one failure.
    fuzz_summary="fuzz: did not run to the end (exit status $fuzz_status)"
    failed=$((failed + 1)) ;;
esac
if [ "$fuzz_status" -ne 0 ] && [ "$status" -eq 0 ]; then
  status=$fuzz_status
fi

echo
echo "Summary of every test binary:"
grep -E '^test result:' "$log" || true
echo "$fuzz_summary"
echo
echo "${passed} passed, ${failed} failed, ${ignored} skipped"
exit "$status"
