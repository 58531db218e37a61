#!/usr/bin/env bash
# Fuzzes the policy parser briefly (default 30 s; FUZZ_SECONDS overrides) with cargo-fuzz on
# the nightly toolchain, seeded with the test fixtures and the shared policy corpus. Exits
# non-zero when the fuzzer finds a crash; the input is left under policy/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
target=parse_policies
mkdir -p "corpus/$target"
for seed in ../tests/fixtures ../../../shared/corpus; do
    if [ -d "$seed" ]; then
        find "$seed" -type f \( -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) \
            -exec sh -c 'for f; do cp "$f" "corpus/'"$target"'/seed-$(cksum < "$f" | cut -d" " -f1)"; done' _ {} +
    fi
done
echo "fuzzing $target for ${seconds}s"
cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -print_final_stats=1
