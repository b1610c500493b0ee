#!/usr/bin/env bash
# The densepush load test in one command: builds the server and the load generator in release mode, starts
# the server on loopback with a benchmark config (auth mode "none", ephemeral ports), drives N connections
# through the generator's phases, prints the summary, and stops the server with SIGTERM.
#
# Usage: scripts/loadtest.sh [N] [--reactors R] [generator options...]
#   N                   connections (default 15000); must come first
#   --reactors R        server reactor threads (default 0 = one per CPU core)
#   --compression       the server gets websocket.compression = true and the generator offers
#                       permessage-deflate (and inflates what arrives); add --json-payload for payloads that
#                       compress like real JSON notifications
#   --tls               connect over wss:// (the server gets a throwaway P-256 certificate made with openssl,
#                       and the generator connects to its TLS listener); add --tls-resume to resume sessions
#   --upgrade-at K      live-upgrade the server (`densepush upgrade`, same binary) once K messages have been
#                       published to everyone: with --phases connect,broadcast --broadcast-interval-ms 10
#                       --broadcast-messages 600 the report's delivery latency max is the longest pause clients saw,
#                       and its exactly-once check covers the handoff; the upgrade's own figures go to stderr
#   anything else goes to densepush-loadtest unchanged, e.g. --payload-bytes 256, --phases connect,idle,
#   --json (report as JSON on stdout), --workers 2, --idle-secs 5, --conns-per-user 2; see
#   `densepush-loadtest --help`.
#
# Environment:
#   DENSEPUSH_BIN       server binary to use instead of building REPO/target/release/densepush
#   LOADTEST_BIN        generator binary to use instead of building REPO/target/release/densepush-loadtest
#   CARGO_TARGET_DIR    where cargo builds (default REPO/target)
#   LOADTEST_KEEP_TMP=1 keep the temp dir with the config and the server log
#
# Exit status: the generator's (0 all checks passed, 1 a check failed, 2 setup error), or 1 if the server
# failed to start or to stop cleanly.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=15000
REACTORS=0
TLS=0
COMPRESSION=false
UPGRADE_AT=0
PASS=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
say() { echo "loadtest.sh: $*" >&2; }

if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    N=$1
    shift
fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --reactors) REACTORS=${2:?--reactors needs a value}; shift 2 ;;
        --reactors=*) REACTORS=${1#*=}; shift ;;
        --tls) TLS=1; PASS+=("$1"); shift ;;
        --compression) COMPRESSION=true; PASS+=("$1"); shift ;;
        --upgrade-at) UPGRADE_AT=${2:?--upgrade-at needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
[[ $REACTORS =~ ^[0-9]+$ ]] || { say "--reactors must be a number"; exit 2; }
[[ $UPGRADE_AT =~ ^[0-9]+$ ]] || { say "--upgrade-at must be a number"; exit 2; }

# ---- build ------------------------------------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
[[ $TARGET == /* ]] || TARGET=$REPO/$TARGET
PACKAGES=()
[[ -n ${DENSEPUSH_BIN:-} ]] || PACKAGES+=(-p densepush)
[[ -n ${LOADTEST_BIN:-} ]] || PACKAGES+=(-p densepush-loadtest)
if [[ ${#PACKAGES[@]} -gt 0 ]]; then
    say "building ${PACKAGES[*]} (release)"
    (cd "$REPO" && cargo build --release "${PACKAGES[@]}" >&2)
fi
SERVER=${DENSEPUSH_BIN:-$TARGET/release/densepush}
GENERATOR=${LOADTEST_BIN:-$TARGET/release/densepush-loadtest}
for bin in "$SERVER" "$GENERATOR"; do
    [[ -x $bin ]] || { say "$bin is not an executable"; exit 2; }
done

# ---- limits -----------------------------------------------------------------------------------------------
# Each connection costs the server one descriptor, and the server is one process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
if [[ $FD_LIMIT != unlimited ]] && ((N + 100 > FD_LIMIT)); then
    say "$N connections need more than the open-files limit of $FD_LIMIT per process;"
    say "raise it (ulimit -n, LimitNOFILE=, scripts/tune-host.sh for fs.nr_open) or use a smaller N"
    exit 2
fi

# ---- server -----------------------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/densepush-loadtest.XXXXXX")
SERVER_PID=
SHUTDOWN_MS=5000

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID status=0
    SERVER_PID=
    # After a live upgrade the serving process is the successor, not our child: signal it, wait for it to go,
    # and reap the first process (it exited when the successor took over).
    if [[ -s $TMP/serving.pid ]] && [[ $(cat "$TMP/serving.pid") != "$pid" ]]; then
        local first=$pid
        pid=$(cat "$TMP/serving.pid")
        wait "$first" || status=$?
        ((status == 0)) || say "the first server process exited with status $status after handing over"
        kill -TERM "$pid" 2>/dev/null || return "$status"
        for _ in $(seq $((SHUTDOWN_MS / 100 + 50))); do
            kill -0 "$pid" 2>/dev/null || return "$status"
            sleep 0.1
        done
        say "server did not exit after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        return 1
    fi
    kill -TERM "$pid" 2>/dev/null || return 0
    # SIGTERM drains: give it the shutdown timeout plus a margin, then insist.
    for _ in $(seq $((SHUTDOWN_MS / 100 + 50))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "server did not exit after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" || status=$?
    return "$status"
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_server || true
    if [[ ${LOADTEST_KEEP_TMP:-0} == 1 ]]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$TMP/config.toml" <<EOF
# Benchmark configuration written by scripts/loadtest.sh. Timers are left at their defaults.
[server]
listen = "127.0.0.1:0"
reactors = $REACTORS
shutdown_timeout_ms = $SHUTDOWN_MS

[websocket]
compression = $COMPRESSION

[auth]
mode = "none"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"
EOF
if ((TLS)); then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null || { say "openssl could not make a certificate"; exit 2; }
    cat >>"$TMP/config.toml" <<EOF

[tls]
listen = "127.0.0.1:0"
cert_file = "$TMP/cert.pem"
key_file = "$TMP/key.pem"
EOF
fi

# The server reads every DENSEPUSH_* variable as a config override and refuses unknown ones, so this script's
# own DENSEPUSH_BIN must not reach it.
env -u DENSEPUSH_BIN "$SERVER" --config "$TMP/config.toml" >"$TMP/server.out" 2>"$TMP/server.log" &
SERVER_PID=$!

LISTENING=
for _ in $(seq 100); do
    LISTENING=$(grep -m1 '^densepush listening ' "$TMP/server.out" || true)
    [[ -n $LISTENING ]] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
if [[ -z $LISTENING ]]; then
    say "server did not start; its log:"
    cat "$TMP/server.log" >&2
    exit 1
fi
CLIENT_ADDR=$(sed -E 's/.* client=([^ ]+).*/\1/' <<<"$LISTENING")
if ((TLS)); then
    CLIENT_ADDR=$(sed -E 's/.* tls=([^ ]+).*/\1/' <<<"$LISTENING")
fi
ADMIN_ADDR=$(sed -E 's/.* admin=([^ ]+).*/\1/' <<<"$LISTENING")
say "server pid $SERVER_PID, reactors $REACTORS (0 = per core), clients $CLIENT_ADDR, admin $ADMIN_ADDR"

# ---- upgrade (optional) -----------------------------------------------------------------------------------
# Polls /metrics over bash's /dev/tcp (no curl on a clean machine) until K broadcasts were published, then
# upgrades and records the pid now serving for stop_server.
published_to_all() {
    local host=${ADMIN_ADDR%:*} port=${ADMIN_ADDR##*:} line
    exec 3<>"/dev/tcp/$host/$port" || return 1
    printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    line=$(grep -m1 '^densepush_messages_published_total{target="all"}' <&3 || true)
    exec 3<&-
    echo "${line##* }"
}
UPGRADER=
if ((UPGRADE_AT > 0)); then
    (
        until [[ -n ${n:-} ]] && ((n >= UPGRADE_AT)); do
            [[ -e $TMP/generator.done ]] && { say "only ${n:-0} broadcasts published: no upgrade"; exit 1; }
            sleep 0.05
            n=$(published_to_all || true)
        done
        say "upgrading after $n broadcasts"
        if env -u DENSEPUSH_BIN "$SERVER" upgrade --config "$TMP/config.toml" --admin "$ADMIN_ADDR" \
            --pid "$SERVER_PID" >"$TMP/upgrade.out" 2>&1; then
            say "$(cat "$TMP/upgrade.out")"
            grep -h 'handed over in' "$TMP/server.log" | tail -1 | sed 's/^/loadtest.sh: server: /' >&2 || true
            sed -E 's/.*process ([0-9]+) took over.*/\1/' "$TMP/upgrade.out" >"$TMP/serving.pid"
        else
            say "upgrade failed: $(cat "$TMP/upgrade.out")"
        fi
    ) &
    UPGRADER=$!
fi

# ---- load -------------------------------------------------------------------------------------------------
STATUS=0
"$GENERATOR" --server "$CLIENT_ADDR" --admin "$ADMIN_ADDR" --server-pid "$SERVER_PID" --conns "$N" \
    "${PASS[@]}" || STATUS=$?

if [[ -n $UPGRADER ]]; then
    touch "$TMP/generator.done"
    wait "$UPGRADER" || true
    [[ -s $TMP/serving.pid ]] || { say "the live upgrade did not happen"; ((STATUS != 0)) || STATUS=1; }
fi

SERVER_STATUS=0
stop_server || SERVER_STATUS=$?
if ((SERVER_STATUS != 0)); then
    say "server exited with status $SERVER_STATUS after SIGTERM; last log lines:"
    tail -20 "$TMP/server.log" >&2
    ((STATUS != 0)) || STATUS=1
fi
exit "$STATUS"
