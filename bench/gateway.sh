#!/usr/bin/env bash
# mailferry gateway benchmark: prints figures, it is not a test.
#
# Postfix's smtp-source sends MESSAGES messages of SIZE bytes at each session
# count to (a) the gateway with Redis appendfsync everysec, (b) the gateway
# with appendfsync always, (c) a private Postfix on loopback that queues
# without delivering and (d) Postfix's smtp-sink (the ceiling of this
# client), side by side in one run, and prints msgs/s, server CPU ms per
# message and the ratios b/c (target >= 4) and a/d (target >= 0.8). Then it
# holds IDLE idle connections on a fresh gateway and prints its VmRSS
# (target < 100 MB at 10,000).
#
# Usage: bench/gateway.sh [-m MESSAGES] [-s "SESSIONS ..."] [-l SIZE]
#                         [--modes "new reuse"] [--only "a b c d idle"]
#                         [--idle N] [--idle-sources 127.0.0.2,127.0.0.3]
#                         [--gateway-log-level LEVEL] [--repeat N] [--keep]
#   --modes  new: smtp-source opens one connection per message (its default);
#            reuse: smtp-source -d, messages follow each other on a session.
#   --only   run a subset (e.g. "c d" while the gateway does not build).
#   --repeat run the whole cycle N times and print medians (default 1).
#   --keep   keep the work directory (logs, configs) and print its path.
#
# Environment: MAILFERRY_BIN (default build/mailferry in the repository).
# Needs root (a private Postfix instance), redis-server, postfix, gcc.
# Every process it starts is stopped on exit; loopback only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
mailferry=${MAILFERRY_BIN:-$repo/build/mailferry}
keep=0
pyargs=()

while [ $# -gt 0 ]; do
    case "$1" in
        -m|--messages|-s|--sessions|-l|--size|--modes|--only|--idle|--idle-sources|--gateway-log-level|--timeout|--repeat)
            [ $# -ge 2 ] || { echo "gateway.sh: $1 needs a value" >&2; exit 2; }
            pyargs+=("$1" "$2"); shift 2 ;;
        --keep) keep=1; pyargs+=(--keep); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gateway.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "gateway.sh: needs root to run a private Postfix instance" >&2
    exit 2
fi

# Both sides hold one descriptor per connection: raise the limit as far as
# the hard limit allows (children inherit it).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d /tmp/mf-bench.XXXXXX)
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

gcc -std=gnu11 -O2 -Wall -Wextra -Werror -Wshadow -Wformat=2 -D_GNU_SOURCE \
    "$here/idle_conns.c" -o "$work/idle_conns"

# Not exec: the trap above must run after the driver ends.
/usr/bin/python3 "$here/gateway_bench.py" --workdir "$work" --repo "$repo" \
    --mailferry "$mailferry" --idle-bin "$work/idle_conns" "${pyargs[@]}"
