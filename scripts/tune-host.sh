#!/usr/bin/env bash
# Kernel settings a densepush density host needs (millions of mostly idle TCP connections), each with the
# reason it matters. Limits are only ever raised, never lowered.
#
# Usage: scripts/tune-host.sh [--dry-run]
#   --dry-run   print each setting's current and proposed value and change nothing (no root needed)
#   (default)   apply with `sysctl -w` (root needed)
#
# Nothing here is permanent: values last until reboot and nothing is written under /etc. To keep them, put the
# `key = value` lines this script prints into /etc/sysctl.d/90-densepush.conf yourself.
# Per-process descriptors are a separate limit: run densepush with LimitNOFILE (see scripts/densepush.service)
# or `ulimit -n`; fs.nr_open below is the ceiling those can reach.
set -euo pipefail

DRY_RUN=0
case ${1:-} in
    --dry-run | -n) DRY_RUN=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    "") ;;
    *) echo "tune-host.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac
if ((DRY_RUN == 0)) && [[ $(id -u) != 0 ]]; then
    echo "tune-host.sh: applying needs root; use --dry-run to only look" >&2
    exit 1
fi

PAGE=$(getconf PAGESIZE)
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
MEM_PAGES=$((MEM_KB * 1024 / PAGE))

CHANGES=0
FAILED=0
CONF_LINES=()

proc_file() { echo "/proc/sys/${1//.//}"; }

current() {
    local file
    file=$(proc_file "$1")
    if [[ -r $file ]]; then
        tr -s ' \t' ' ' <"$file" | sed 's/ *$//'
    fi
}

report() { # key current proposed action reason
    printf '%-40s %-26s %-26s %-8s %s\n' "$1" "${2:-absent}" "$3" "$4" "$5"
    [[ $4 == absent ]] || CONF_LINES+=("$1 = $3")
}

apply() { # key value
    if ((DRY_RUN)); then
        return 0
    fi
    if sysctl -q -w "$1=$2" >/dev/null; then
        CHANGES=$((CHANGES + 1))
    else
        echo "tune-host.sh: could not set $1 (read-only in this namespace or container?)" >&2
        FAILED=$((FAILED + 1))
    fi
}

# raise KEY VALUE REASON: a single number, raised to VALUE if lower.
raise() {
    local key=$1 want=$2 reason=$3 now
    now=$(current "$key")
    if [[ -z $now ]]; then
        report "$key" "" "$want" "absent" "$reason"
    elif ((now >= want)); then
        report "$key" "$now" "$want" "keep" "$reason"
    else
        report "$key" "$now" "$want" "set" "$reason"
        apply "$key" "$want"
    fi
}

# triple KEY "A B C" REASON: a three-number setting, set when any of the three is below the proposal (values
# already above it are kept).
triple() {
    local key=$1 want=$2 reason=$3 now out=() i
    now=$(current "$key")
    if [[ -z $now ]]; then
        report "$key" "" "$want" "absent" "$reason"
        return
    fi
    local -a have prop
    read -r -a have <<<"$now"
    read -r -a prop <<<"$want"
    local change=0
    for i in 0 1 2; do
        if ((have[i] < prop[i])); then
            out+=("${prop[i]}")
            change=1
        else
            out+=("${have[i]}")
        fi
    done
    if ((change)); then
        report "$key" "$now" "${out[*]}" "set" "$reason"
        apply "$key" "${out[*]}"
    else
        report "$key" "$now" "${out[*]}" "keep" "$reason"
    fi
}

# exact KEY VALUE REASON: a setting that is not a plain limit.
exact() {
    local key=$1 want=$2 reason=$3 now
    now=$(current "$key")
    if [[ -z $now ]]; then
        report "$key" "" "$want" "absent" "$reason"
    elif [[ $now == "$want" ]]; then
        report "$key" "$now" "$want" "keep" "$reason"
    else
        report "$key" "$now" "$want" "set" "$reason"
        apply "$key" "$want"
    fi
}

printf '%-40s %-26s %-26s %-8s %s\n' "setting" "current" "proposed" "action" "why"

raise fs.file-max 12000000 \
    "system-wide open files: every connection is one descriptor"
raise fs.nr_open 10485760 \
    "per-process descriptor ceiling: LimitNOFILE/ulimit -n cannot go above it, and one process holds every connection"
raise fs.epoll.max_user_watches 10485760 \
    "each connection is one epoll registration, counted per user"
raise net.core.somaxconn 65535 \
    "caps the listen backlog densepush asks for (65535): reconnect storms after a restart or network blip"
raise net.ipv4.tcp_max_syn_backlog 65535 \
    "half-open connections queued while a reconnect storm is accepted"
raise net.core.netdev_max_backlog 65536 \
    "packets queued per CPU before the stack processes them: bursts of pushes and of SYNs"
# tcp_mem is in pages, for all TCP sockets together: 10% / 25% / 50% of RAM.
triple net.ipv4.tcp_mem "$((MEM_PAGES / 10)) $((MEM_PAGES / 4)) $((MEM_PAGES / 2))" \
    "pages all TCP buffers may use (min/pressure/max): a broadcast briefly queues data on every socket; past max the kernel drops and stalls"
triple net.ipv4.tcp_rmem "4096 16384 6291456" \
    "per-socket receive buffer min/default/max: clients send almost nothing, and under pressure every socket must keep its minimum"
triple net.ipv4.tcp_wmem "4096 16384 4194304" \
    "per-socket send buffer min/default/max: pushes are small; the minimum is what each socket keeps under memory pressure"
exact net.ipv4.ip_local_port_range "1024 65535" \
    "ephemeral ports for outbound connections (load generators, proxies, health checks from this host)"
exact net.ipv4.tcp_tw_reuse 1 \
    "let outbound connections reuse TIME_WAIT ports (load generators and proxies reconnecting)"
raise net.ipv4.tcp_max_orphans 262144 \
    "sockets closed by the server but not yet finished: a mass disconnect must not reset them early"
if [[ -e /proc/sys/net/netfilter/nf_conntrack_max ]]; then
    raise net.netfilter.nf_conntrack_max 4194304 \
        "connection tracking is loaded: a full table silently drops new connections"
else
    report net.netfilter.nf_conntrack_max "" "-" "absent" "conntrack not loaded: nothing to size (not loaded by this script)"
fi

echo
echo "# To keep these across reboots, put them in /etc/sysctl.d/90-densepush.conf:"
printf '%s\n' "${CONF_LINES[@]}"
if ((DRY_RUN)); then
    echo
    echo "dry run: nothing changed. Run as root without --dry-run to apply until the next reboot."
else
    echo
    echo "applied $CHANGES setting(s) until the next reboot; $FAILED failed."
fi
((FAILED == 0))
