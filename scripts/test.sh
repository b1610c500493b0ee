#!/usr/bin/env bash
# Runs every test: unit tests beside each module and integration tests that start the real server binary on
# loopback ports. Installs what the tests need on a fresh machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/cluster.rs starts its own redis-server on a loopback port (and stops it).
if ! command -v redis-server >/dev/null 2>&1; then
    echo "scripts/test.sh: installing redis-server for the cluster tests" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# Dashboard and JS client tests (tests/js_client.rs): node 20+, clients/js devDependencies (ws,
# playwright-core) and a system chromium for headless runs.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then
    echo "scripts/test.sh: installing node/npm/chromium for the dashboard and JS client tests" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm chromium >/dev/null
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "scripts/test.sh: warning: node $(node --version) is older than 20, which clients/js supports" >&2
fi
if [ ! -d clients/js/node_modules ]; then
    (cd clients/js && npm ci --no-audit --no-fund)
fi
cargo build --workspace --all-targets
cargo test --workspace --all-targets
