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
cargo build --workspace --all-targets
cargo test --workspace --all-targets
