#!/usr/bin/env bash
# Cluster figures in one command: one redis-server and three densepush nodes on loopback (A takes the
# publishes, B and C hold the clients; B reaches Redis through scripts/cut-proxy.py so its link can be cut),
# two load generators (clients on B and on C, each publishing to its own users through A's admin API), and
# a single node without Redis under the same load as the baseline.
#
# Usage: scripts/cluster-bench.sh [N] [--messages M] [--publishers P] [--rate R] [--payload-bytes B]
#                                 [--cut-secs S] [--window-len L] [--scenarios single,cluster,cut,cut-window]
#                                 [--out DIR]
#   N                 connections per receiving node (default 2000)
#   --messages M      unicast publishes per generator (default 40000)
#   --publishers P    concurrent publishers per generator (default 4)
#   --rate R          publishes per second per generator, paced (default 0: as fast as the admin API answers)
#   --payload-bytes B payload size (default 64)
#   --cut-secs S      how long B's link to Redis is cut in the cut scenarios (default 2)
#   --window-len L    cluster.bus_max_len in the cut-window scenario (default 5000; the others use 1000000)
#   --scenarios LIST  which scenarios to run, in this order (default all four):
#       single      one node, no Redis: clients and publishes on the same node (the baseline)
#       cluster     three nodes, nothing cut
#       cut         three nodes, B's Redis link cut for S seconds once a quarter of the publishes are out
#       cut-window  the same with a window (cluster.bus_max_len) that the cut exceeds: B's clients are told
#   --out DIR         keep the generators' JSON reports and the node logs there (default: a temp dir, removed)
#
# Environment:
#   SERVER_BIN=PATH   run this densepush binary instead of building one (e.g. an older version to compare)
#   LEGACY_CONFIG=1   leave cluster.bus_max_len out of the nodes' config (versions with the pub/sub bus refuse it)
#
# Prints one summary per scenario: publishes/s (both generators together), delivery latency p50/p99 on each
# receiving node (end to end, publish call to client), lost/duplicated/reordered, server closes by code,
# Redis CPU per publish (INFO cpu, user+sys, over the whole run: both generators' publishes, three readers),
# and B's bus counters (gaps, connections told, stalls). Needs redis-server, python3, jq.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=2000
MESSAGES=40000
PUBLISHERS=4
RATE=0
PAYLOAD=64
CUT_SECS=2
WINDOW_LEN=5000
SCENARIOS=single,cluster,cut,cut-window
OUT=

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
say() { echo "cluster-bench: $*" >&2; }

if [[ ${1:-} =~ ^[0-9]+$ ]]; then N=$1; shift; fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --messages) MESSAGES=$2; shift 2 ;;
        --publishers) PUBLISHERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --payload-bytes) PAYLOAD=$2; shift 2 ;;
        --cut-secs) CUT_SECS=$2; shift 2 ;;
        --window-len) WINDOW_LEN=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) say "unknown option $1"; usage >&2; exit 2 ;;
    esac
done
for tool in redis-server redis-cli python3 jq; do
    command -v "$tool" >/dev/null || { say "$tool is missing"; exit 2; }
done

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
[[ $TARGET == /* ]] || TARGET=$REPO/$TARGET
PACKAGES=(-p densepush-loadtest)
[[ -n ${SERVER_BIN:-} ]] || PACKAGES+=(-p densepush)
say "building ${PACKAGES[*]} (release)"
(cd "$REPO" && cargo build --release "${PACKAGES[@]}" >&2)
SERVER=${SERVER_BIN:-$TARGET/release/densepush}
GENERATOR=$TARGET/release/densepush-loadtest
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TMP=$(mktemp -d "${TMPDIR:-/tmp}/densepush-cluster-bench.XXXXXX")
[[ -n $OUT ]] && mkdir -p "$OUT"
OUT=${OUT:-$TMP}
PIDS=()

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_node NAME REDIS_URL BUS_MAX_LEN: starts a node (REDIS_URL empty = no cluster); sets NODE_PID,
# NODE_CLIENT, NODE_ADMIN.
start_node() {
    local name=$1 url=$2 len=$3
    cat >"$TMP/$name.toml" <<EOF
[server]
listen = "127.0.0.1:0"
reactors = 1
[auth]
mode = "none"
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
[cluster]
redis_url = "$url"
node_id = "$name"
EOF
    [[ ${LEGACY_CONFIG:-0} == 1 ]] || echo "bus_max_len = $len" >>"$TMP/$name.toml"
    "$SERVER" --config "$TMP/$name.toml" >"$TMP/$name.out" 2>"$OUT/$name.log" &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    local line=
    for _ in $(seq 100); do
        line=$(grep -m1 '^densepush listening ' "$TMP/$name.out" 2>/dev/null || true)
        [[ -n $line ]] && break
        sleep 0.1
    done
    [[ -n $line ]] || { say "node $name did not start:"; cat "$OUT/$name.log" >&2; exit 1; }
    NODE_CLIENT=$(sed -E 's/.* client=([^ ]+).*/\1/' <<<"$line")
    NODE_ADMIN=$(sed -E 's/.* admin=([^ ]+).*/\1/' <<<"$line")
}

metric() { # metric ADMIN NAME: a sample from /metrics (0 if absent)
    curl -s "http://$1/metrics" | awk -v n="$2" '$1 == n { print $2; found = 1 } END { if (!found) print 0 }'
}

redis_cpu() { redis-cli -p "$REDIS_PORT" INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f", s }'; }

# generate NAME CLIENT ADMIN FIRST_USER: one generator in the background; sets GEN_PID.
generate() {
    "$GENERATOR" --server "$2" --admin "$3" --conns "$N" --first-user "$4" --channels 0 \
        --phases connect,unicast --unicast-messages "$MESSAGES" --publishers "$PUBLISHERS" --unicast-rate "$RATE" \
        --payload-bytes "$PAYLOAD" --quiet --json-file "$OUT/$1.json" --max-seconds 600 \
        --phase-timeout-secs 120 >/dev/null 2>"$OUT/$1.stderr" &
    GEN_PID=$!
}

summary() { # summary SCENARIO REPORTS...: one line per generator, then the total
    local scenario=$1; shift
    local total=0
    for report in "$@"; do
        jq -r --arg s "$scenario" --arg r "$(basename "$report" .json)" '
            "\($s) \($r): publishes/s \(.unicast.publishes_per_sec | floor), delivery p50 \(.unicast.delivery.latency.p50_us) us p99 \(.unicast.delivery.latency.p99_us) us max \(.unicast.delivery.latency.max_us) us, lost \(.headline.lost) dup \(.headline.duplicated) reordered \(.headline.reordered), server closes \(.health.server_closes | tostring), connections checked \(.unicast.delivery.conns_checked)"' "$report"
        total=$(jq -r --argjson t "$total" '$t + .unicast.publishes_per_sec' "$report")
    done
    printf '%s total: publishes/s %.0f\n' "$scenario" "$total"
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --loglevel warning --dir "$TMP" >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
PROXY_PORT=$(free_port)
python3 "$REPO/scripts/cut-proxy.py" "$PROXY_PORT" "$REDIS_PORT" --cut-secs "$CUT_SECS" >"$OUT/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
sleep 0.3

run_single() {
    start_node single "" 100000
    local pid=$NODE_PID client=$NODE_CLIENT admin=$NODE_ADMIN
    generate single-1 "$client" "$admin" 0; local g1=$GEN_PID
    generate single-2 "$client" "$admin" 1000000; local g2=$GEN_PID
    wait "$g1" || true; wait "$g2" || true
    kill -TERM "$pid"; wait "$pid" || true
    summary single "$OUT/single-1.json" "$OUT/single-2.json"
}

run_cluster() { # run_cluster SCENARIO BUS_MAX_LEN CUT(0/1)
    local scenario=$1 len=$2 cut=$3
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    start_node "$scenario-a" "redis://127.0.0.1:$REDIS_PORT" "$len"
    local a_pid=$NODE_PID a_admin=$NODE_ADMIN
    start_node "$scenario-b" "redis://127.0.0.1:$PROXY_PORT" "$len"
    local b_pid=$NODE_PID b_client=$NODE_CLIENT b_admin=$NODE_ADMIN
    start_node "$scenario-c" "redis://127.0.0.1:$REDIS_PORT" "$len"
    local c_pid=$NODE_PID c_client=$NODE_CLIENT
    redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    local cpu0; cpu0=$(redis_cpu)
    generate "$scenario-on-b" "$b_client" "$a_admin" 0; local gb=$GEN_PID
    generate "$scenario-on-c" "$c_client" "$a_admin" 1000000; local gc=$GEN_PID
    if ((cut)); then
        # Once a quarter of all publishes are out, cut B off for CUT_SECS.
        local quarter=$((MESSAGES / 2)) published=0
        while ((published < quarter)); do
            sleep 0.05
            published=$(metric "$a_admin" densepush_cluster_published_total)
            published=${published%.*}
        done
        kill -USR1 "$PROXY_PID"
        say "$scenario: cut B's link at $published publishes for ${CUT_SECS}s"
    fi
    wait "$gb" || true; wait "$gc" || true
    local cpu1; cpu1=$(redis_cpu)
    local publishes; publishes=$(metric "$a_admin" densepush_cluster_published_total)
    local bus_bytes bus_len
    bus_bytes=$(redis-cli -p "$REDIS_PORT" MEMORY USAGE densepush:bus SAMPLES 0 | tr -d '\r')
    bus_len=$(redis-cli -p "$REDIS_PORT" XLEN densepush:bus | tr -d '\r')
    if [[ $bus_bytes =~ ^[0-9]+$ ]] && ((bus_len > 0)); then
        echo "$scenario redis: the bus holds $bus_len entries in $bus_bytes bytes ($((bus_bytes / bus_len)) per entry, payload $PAYLOAD)"
    fi
    summary "$scenario" "$OUT/$scenario-on-b.json" "$OUT/$scenario-on-c.json"
    python3 -c "import sys; c0, c1, n = map(float, sys.argv[1:]); print(f'$scenario redis: {(c1 - c0) * 1e6 / max(n, 1):.1f} us CPU per publish ({n:.0f} publishes, {c1 - c0:.2f} s)')" "$cpu0" "$cpu1" "$publishes"
    redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | grep -E '^cmdstat_(evalsha|eval|xadd|xread|xrevrange|xrange|publish|ping)' \
        | sed "s/^/$scenario redis /" >"$OUT/$scenario-commandstats.txt"
    local m
    for m in densepush_cluster_bus_gaps_total{reason=\"trimmed\"} densepush_cluster_bus_gaps_total{reason=\"new_epoch\"} \
        densepush_cluster_bus_lost_entries_total densepush_cluster_missed_closes_total \
        densepush_cluster_missed_resyncs_total densepush_cluster_bus_stalls_total \
        densepush_cluster_bus_pending_high_water densepush_cluster_connects_total; do
        echo "$scenario node B: $m $(metric "$b_admin" "$m")"
    done
    kill -TERM "$a_pid" "$b_pid" "$c_pid"; wait "$a_pid" "$b_pid" "$c_pid" || true
}

IFS=, read -ra WANTED <<<"$SCENARIOS"
for scenario in "${WANTED[@]}"; do
    case $scenario in
        single) run_single ;;
        cluster) run_cluster cluster 1000000 0 ;;
        cut) run_cluster cut 1000000 1 ;;
        cut-window) run_cluster cut-window "$WINDOW_LEN" 1 ;;
        *) say "unknown scenario $scenario"; exit 2 ;;
    esac
done
