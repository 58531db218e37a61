#!/usr/bin/env bash
# Runs each L7 fuzz target briefly (default 30 s each; FUZZ_SECONDS overrides) with
# cargo-fuzz on the nightly toolchain. Exits non-zero when a target finds a crash; the
# input is left under l7/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
for target in http_request kafka_request; do
    mkdir -p "corpus/$target"
    echo "fuzzing $target for ${seconds}s"
    cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1
done
