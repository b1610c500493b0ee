#!/usr/bin/env bash
# Issue 15's comparison in one go: densepush builds against the bare mio loop (loadtest's densepush-bare),
# the same generator, interleaved runs so that the noise of a shared machine falls on all of them alike.
#
# Usage: scripts/bench-unicast.sh OUT_DIR RUNS N NAME=BINARY... [-- generator options]
#   e.g. scripts/bench-unicast.sh /tmp/b 3 15000 before=/x/densepush after=target/release/densepush \
#        bare=target/release/densepush-bare -- --unicast-messages 40000
# Each densepush binary runs with 1 and 2 reactors, the bare loop once (it has one thread); reports go to
# OUT_DIR/NAME-rR-runK.json. Summarise with scripts/bench-summary.py OUT_DIR.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$1 RUNS=$2 N=$3
shift 3
TARGETS=()
while [[ $# -gt 0 && $1 != -- ]]; do TARGETS+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
mkdir -p "$OUT"
LOADTEST_BIN=${LOADTEST_BIN:-$REPO/target/release/densepush-loadtest}
for run in $(seq "$RUNS"); do
    for target in "${TARGETS[@]}"; do
        name=${target%%=*} bin=${target#*=}
        reactors=(1 2)
        [[ $name == bare* ]] && reactors=(1)
        for r in "${reactors[@]}"; do
            echo "bench: run $run $name reactors $r" >&2
            DENSEPUSH_BIN=$bin LOADTEST_BIN=$LOADTEST_BIN timeout 600 "$REPO/scripts/loadtest.sh" "$N" --reactors "$r" \
                --max-seconds 500 --json-file "$OUT/$name-r$r-run$run.json" --quiet "$@" >/dev/null 2>&1 \
                || echo "bench: $name r$r run $run exited $?" >&2
        done
    done
done
