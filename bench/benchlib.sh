# Shared part of bench/gateway.sh and bench/router.sh; sourced, not run.
# shellcheck shell=bash disable=SC2034,SC2154
#
# The including script sets `set -euo pipefail`, documents its usage in the
# comment block from its second line down to that `set` line (printed by
# --help), and then calls, in this order:
#   bench_parse_args NAME "OPTIONS WITH A VALUE" "$@"
#       collects the options the Python driver takes into the array pyargs
#       (--keep also sets keep=1); an unknown option or a missing value
#       exits with status 2.
#   bench_setup PREFIX
#       requires root, raises the descriptor limit and creates the work
#       directory /tmp/PREFIX.XXXXXX in $work, removed on exit unless --keep;
#       the EXIT trap also stops what the driver recorded in $work/pids and
#       any Postfix instance left in $work/postfix-*.

# $here is bench/, set by the including script before it sources this file.
repo=$(cd "$here/.." && pwd)
mailferry=${MAILFERRY_BIN:-$repo/build/mailferry}
keep=0
pyargs=()

bench_parse_args() {
    local name=$1 valued=" $2 " opt
    shift 2
    while [ $# -gt 0 ]; do
        opt=$1
        case "$opt" in
            --keep) keep=1; pyargs+=(--keep); shift ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *)
                if [[ "$valued" != *" $opt "* ]]; then
                    echo "$name: unknown option $opt (see --help)" >&2
                    exit 2
                fi
                [ $# -ge 2 ] || { echo "$name: $opt needs a value" >&2; exit 2; }
                pyargs+=("$opt" "$2"); shift 2 ;;
        esac
    done
    bench_name=$name
}

bench_cleanup() {
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

bench_setup() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$bench_name: needs root to run a private Postfix instance" >&2
        exit 2
    fi

    # Both sides hold one descriptor per connection: raise the limit as far
    # as the hard limit allows (children inherit it).
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

    work=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$work"   # the postfix user must traverse it

    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}
