#!/usr/bin/env bash
# Builds fqdnwall (release) and runs the agent in the foreground. Without arguments it uses
# /etc/fqdnwall/config.yaml if present, else the embedded default (DNS proxy on
# 127.0.0.1:5353 forwarding to the system resolver). Extra arguments go to `fqdnwall run`,
# e.g. `scripts/run.sh --config my.yaml`. Needs root (API socket in /run, state in /var/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh run
cargo build --release --bin fqdnwall
exec ./target/release/fqdnwall run "$@"
