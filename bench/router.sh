#!/usr/bin/env bash
# mailferry router benchmark: prints figures, it is not a test.
#
# Messages per second from a full queue, through an SMTP client, to
# Postfix's smtp-sink, side by side in one run: mailferry with one router,
# with two routers (consumers r1 and r2), and a private Postfix relaying the
# same number of messages from its own queue (filled first with
# defer_transports = smtp, then flushed). Prints seconds, msgs/s, CPU ms per
# message (routers + redis-server; every Postfix process; the sink apart)
# and the ratios mailferry(1)/postfix (target >= 3) and
# mailferry(2)/mailferry(1) (target >= 1.8).
#
# Usage: bench/router.sh [-m MESSAGES] [-l SIZE] [--connections N]
#                        [--concurrency N] [--batch N]
#                        [--appendfsync everysec|always|no]
#                        [--router-log-level LEVEL] [--only "postfix 1 2"]
#                        [--repeat N] [--timeout SECONDS] [--keep]
#   -m             messages per measurement (default 20000)
#   -l             payload bytes per message (default 2048)
#   --connections  SMTP connections to the sink: each router's route
#                  max_connections and Postfix's
#                  smtp_destination_concurrency_limit (default 20)
#   --concurrency, --batch   [router] concurrency and batch (100, 32)
#   --only         run a subset: postfix, 1 (one router), 2 (two routers)
#   --repeat       run the whole cycle N times and print medians (default 1)
#   --keep         keep the work directory (logs, configs) and print its path
#
# Environment: MAILFERRY_BIN (default build/mailferry in the repository).
# Build it with: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release &&
# cmake --build build -j2
# Needs root (a private Postfix instance), redis-server, postfix.
# Every process it starts is stopped on exit; loopback only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
mailferry=${MAILFERRY_BIN:-$repo/build/mailferry}
keep=0
pyargs=()

while [ $# -gt 0 ]; do
    case "$1" in
        -m|--messages|-l|--size|--connections|--concurrency|--batch|--appendfsync|--router-log-level|--only|--repeat|--timeout)
            [ $# -ge 2 ] || { echo "router.sh: $1 needs a value" >&2; exit 2; }
            pyargs+=("$1" "$2"); shift 2 ;;
        --keep) keep=1; pyargs+=(--keep); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "router.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "router.sh: needs root to run a private Postfix instance" >&2
    exit 2
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d /tmp/mf-rbench.XXXXXX)
chmod 755 "$work"   # the postfix user must traverse it

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    # Backstop: the Python driver stops everything itself; this catches what
    # is left if it was killed. Only PIDs it recorded, and only while they
    # still run the program recorded for them.
    if [ -f "$work/pids" ]; then
        while read -r pid comm; do
            if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
                kill -TERM "$pid" 2>/dev/null || true
            fi
        done < "$work/pids"
    fi
    for pf in "$work"/postfix-*; do
        if [ -f "$pf/etc/main.cf" ] && [ -f "$pf/queue/pid/master.pid" ]; then
            /usr/sbin/postfix -c "$pf/etc" abort >/dev/null 2>&1 || true
        fi
    done
    if [ "$keep" = 1 ]; then
        echo "work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Not exec: the trap above must run after the driver ends.
/usr/bin/python3 "$here/router_bench.py" --workdir "$work" --repo "$repo" \
    --mailferry "$mailferry" "${pyargs[@]}"
