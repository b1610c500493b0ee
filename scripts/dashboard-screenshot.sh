#!/usr/bin/env bash
# Regenerates docs/dashboard.png: runs the dashboard browser test with a minute of synthetic traffic and saves a
# screenshot of the page. Needs what scripts/test.sh installs (node, clients/js/node_modules, chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build
cd clients/js
DP_TEST_BIN="${CARGO_TARGET_DIR:-../../target}/debug/densepush" \
DP_SCREENSHOT="$PWD/../../docs/dashboard.png" \
    node --test --test-name-pattern="chart moves" test/dashboard.test.mjs
echo "wrote docs/dashboard.png"
