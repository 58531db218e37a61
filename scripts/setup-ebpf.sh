#!/usr/bin/env bash
# Installs what building fqdnwall's kernel programs needs, idempotently:
#   - the nightly toolchain with rust-src (the BPF target builds `core` from source),
#   - bpf-linker 0.10.0 (newer releases want an LLVM the nightly does not ship).
# Safe to run again: each step checks first and does nothing when already satisfied.
set -euo pipefail

BPF_LINKER_VERSION=0.10.0

if ! command -v rustup >/dev/null 2>&1; then
    echo "setup-ebpf: rustup is required (https://rustup.rs) to install the nightly toolchain" >&2
    exit 1
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "setup-ebpf: installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    echo "setup-ebpf: adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi

have_linker() {
    command -v bpf-linker >/dev/null 2>&1 &&
        bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"
}

if ! have_linker; then
    echo "setup-ebpf: installing bpf-linker ${BPF_LINKER_VERSION} (takes a few minutes)"
    cargo install --locked "bpf-linker@${BPF_LINKER_VERSION}"
fi

echo "setup-ebpf: nightly + rust-src + bpf-linker ${BPF_LINKER_VERSION} ready"
