#!/usr/bin/env bash
# Runs every test: unit tests beside each module and integration tests that start the real server binary on
# loopback ports. Installs what the tests need on a fresh machine first (Debian 12; as root, or with sudo).
# Every step is skipped when what it installs is already there, so running it again installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# System packages:
#   redis-server  tests/cluster.rs starts its own on a loopback port (and stops it);
#   chromium      tests/interop.rs runs examples/browser.html in it, headless (no browser download: the
#                 Debian package, driven by playwright-core);
#   nodejs, npm   the Node `ws` client and the browser driver (tests/js);
#   python3-venv  a virtualenv for the Python `websockets` client; curl for the README's command lines;
#   openssl       tests/interop.rs connects `openssl s_client` to the wss:// listener.
packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
[ -x /usr/bin/chromium ] || packages+=(chromium)
{ command -v node && command -v npm; } >/dev/null 2>&1 || packages+=(nodejs npm)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3 python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
    echo "scripts/test.sh: installing ${packages[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# Python `websockets` (client scripts in tests/clients, and the README's `python3 -m websockets` line) and
# `cryptography` (tests/clients/jose_sign.py signs the identity-provider tokens of tests/idp.rs), in a
# virtualenv under target/ so the system Python is left alone.
if ! target/pyenv/bin/python -c 'import websockets.sync.client, cryptography.x509' >/dev/null 2>&1; then
    echo "scripts/test.sh: installing python websockets and cryptography into target/pyenv" >&2
    python3 -m venv target/pyenv
    target/pyenv/bin/pip install -q websockets cryptography
fi

# Node `ws` and `playwright-core`, at the versions in tests/js/package-lock.json.
if [ ! -d tests/js/node_modules/ws ] || [ ! -d tests/js/node_modules/playwright-core ]; then
    echo "scripts/test.sh: installing tests/js node modules" >&2
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

# Dashboard and JS client tests (tests/js_client.rs): node 20+ and clients/js devDependencies (ws,
# playwright-core); chromium comes with the system packages above.
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "scripts/test.sh: warning: node $(node --version) is older than 20, which clients/js supports" >&2
fi
if [ ! -d clients/js/node_modules ]; then
    (cd clients/js && npm ci --no-audit --no-fund)
fi
cargo build --workspace --all-targets
cargo test --workspace --all-targets
