#!/usr/bin/env bash
# Runs every cargo-fuzz target of the repository briefly and fails when one crashes:
#   l7/fuzz      http_request (the HTTP proxy's request path), h2_frames (the HTTP/2 relay's
#                client side: frames, HPACK, streams), kafka_request (the Kafka codec)
#   policy/fuzz  parse_policies (the policy parser and its diagnostics)
#
#   scripts/fuzz.sh [TARGET...]   all targets, or only those named (e.g. kafka_request)
#
# FUZZ_SECONDS   seconds per target (default 20; 0 skips fuzzing altogether)
# FUZZ_TARGET_DIR  where the fuzz builds go (default target/fuzz)
# FUZZ_RELEASE=1 builds optimized, as `cargo fuzz` does by default: about three times the
#                compile time for a faster fuzzer; the brief run here gains little from it.
#
# Each target starts from the seeds committed under <crate>/fuzz/seeds/<target>/ (the policy
# parser also from policy/tests/fixtures and ../shared/corpus) and grows a scratch corpus in
# <crate>/fuzz/corpus/<target>/, which git ignores. A crash leaves its input under
# <crate>/fuzz/artifacts/<target>/; the script names it and how to replay it. The last line
# is the summary scripts/test.sh reads: "fuzz: N targets, no crash" or
# "fuzz: N targets, K failed (...)".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${FUZZ_SECONDS:-20}
if [ "$seconds" = 0 ]; then
    echo "fuzz: skipped (FUZZ_SECONDS=0)"
    exit 0
fi
target_dir=${FUZZ_TARGET_DIR:-$root/target/fuzz}
[[ "$target_dir" == /* ]] || target_dir=$root/$target_dir
profile=(--dev)
# Line tables are enough for a crash's backtrace, and a third of full debuginfo's disk.
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
if [ "${FUZZ_RELEASE:-0}" = 1 ]; then
    profile=(--release)
fi

./scripts/setup-fuzz.sh

# crate, target, extra libFuzzer flags, extra seed directories (relative to the crate).
targets=(
    "l7|http_request|-max_len=4096|"
    "l7|h2_frames|-max_len=4096|"
    "l7|kafka_request|-max_len=4096|"
    "policy|parse_policies|-max_len=16384|tests/fixtures ../../shared/corpus"
)

selected=()
for t in "${targets[@]}"; do
    IFS='|' read -r crate name _ _ <<<"$t"
    if (($# == 0)); then
        selected+=("$t")
        continue
    fi
    for want in "$@"; do
        if [ "$want" = "$name" ] || [ "$want" = "$crate" ]; then
            selected+=("$t")
            break
        fi
    done
done
if ((${#selected[@]} == 0)); then
    echo "fuzz: no target matches: $*" >&2
    exit 2
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failures=()
built=" "
broken=" "
for t in "${selected[@]}"; do
    IFS='|' read -r crate name flags seeds <<<"$t"
    log="$logs/$name.log"
    # One build per fuzz crate (all its targets); a crate that does not build fails each of
    # its targets.
    if [[ "$built" != *" $crate "* ]]; then
        built+="$crate "
        echo "fuzz: building $crate/fuzz"
        if ! (cd "$crate" && cargo +nightly fuzz build "${profile[@]}" --target-dir "$target_dir") \
            >"$logs/build-$crate.log" 2>&1; then
            tail -n 40 "$logs/build-$crate.log"
            broken+="$crate "
        fi
    fi
    if [[ "$broken" == *" $crate "* ]]; then
        failures+=("$crate/$name: build failed")
        continue
    fi

    corpus=("fuzz/corpus/$name")
    mkdir -p "$crate/fuzz/corpus/$name" "$crate/fuzz/artifacts/$name"
    [ -d "$crate/fuzz/seeds/$name" ] && corpus+=("fuzz/seeds/$name")
    for s in $seeds; do
        [ -d "$crate/$s" ] && corpus+=("$s")
    done
    stamp="$logs/$name.stamp"
    touch "$stamp"
    echo "fuzz: $crate/$name for ${seconds}s (seeds: ${corpus[*]:1})"
    status=0
    (cd "$crate" && cargo +nightly fuzz run "${profile[@]}" --target-dir "$target_dir" "$name" \
        "${corpus[@]}" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -malloc_limit_mb=1024 -print_final_stats=1 $flags) >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$status" -eq 0 ]; then
        echo "fuzz: $crate/$name ok (${runs:-?} inputs)"
        continue
    fi
    tail -n 60 "$log"
    artifact=$(find "$crate/fuzz/artifacts/$name" -type f -newer "$stamp" | head -n 1)
    if [ -n "$artifact" ]; then
        echo "fuzz: $crate/$name crashed on $artifact; replay: (cd $crate && cargo +nightly fuzz run ${profile[*]} $name fuzz/${artifact#"$crate/fuzz/"})"
        failures+=("$crate/$name: crash, input $artifact")
    else
        failures+=("$crate/$name: exit status $status")
    fi
done

n=${#selected[@]}
if ((${#failures[@]} == 0)); then
    echo "fuzz: $n targets, no crash"
    exit 0
fi
summary=$(printf '%s; ' "${failures[@]}")
echo "fuzz: $n targets, ${#failures[@]} failed (${summary%; })"
exit 1
