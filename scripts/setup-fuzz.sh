#!/usr/bin/env bash
# Installs what scripts/fuzz.sh needs, idempotently: cargo-fuzz 0.13.2 (builds with the
# stable toolchain; the fuzz targets themselves build with the nightly that setup-ebpf.sh
# installs, for -Zsanitizer and the coverage instrumentation).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

if ! rustup toolchain list | grep -q '^nightly'; then
    "$(dirname "$0")/setup-ebpf.sh"
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz ${CARGO_FUZZ_VERSION}\$"; then
    echo "setup-fuzz: installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
    cargo install --locked "cargo-fuzz@${CARGO_FUZZ_VERSION}"
fi
