#!/usr/bin/env bash
# mailferry DKIM benchmark: prints figures, it is not a test.
#
# 1. Signatures per second of gateway/dkim.c on one thread, for 2 KB and
#    100 KB messages, with RSA 2048 (libopendkim), Ed25519 (OpenSSL) and
#    both on one message (bench/dkim_bench.c).
# 2. The gateway's accept rate with signing off, with one RSA key and with
#    RSA + Ed25519 (bench/dkim_bench.py): Postfix's smtp-source against
#    `mailferry gateway` and a private redis-server on loopback.
#
# Usage: bench/dkim_bench.sh [--seconds S] [--sizes "2048 102400"]
#                            [-m MESSAGES] [-l SIZE] [-s SESSIONS]
#                            [--modes "off rsa both"] [--repeat N] [--keep]
#   --seconds, --sizes   part 1: time per figure (default 2) and sizes
#   -m, -l, -s           part 2: messages (default 20000), their size
#                        (default 2048) and smtp-source sessions (default 20)
#   --only "sign accept" run one part only
#
# Environment: MAILFERRY_BIN (default build/mailferry in the repository).
# Needs gcc, libopendkim-dev, openssl, redis-server and Postfix's
# smtp-source; loopback only. Every process it starts is stopped on exit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
mailferry=${MAILFERRY_BIN:-$repo/build/mailferry}
keep=0
only="sign accept"
signargs=()
pyargs=()

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds|--sizes)
            [ $# -ge 2 ] || { echo "dkim_bench.sh: $1 needs a value" >&2; exit 2; }
            signargs+=("$1" "$2"); shift 2 ;;
        -m|--messages|-l|--size|-s|--sessions|--modes|--repeat|--timeout)
            [ $# -ge 2 ] || { echo "dkim_bench.sh: $1 needs a value" >&2; exit 2; }
            pyargs+=("$1" "$2"); shift 2 ;;
        --only)
            [ $# -ge 2 ] || { echo "dkim_bench.sh: $1 needs a value" >&2; exit 2; }
            only=$2; shift 2 ;;
        --keep) keep=1; pyargs+=(--keep); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "dkim_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /tmp/mf-dkim-bench.XXXXXX)
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    # Backstop: the driver stops what it started; this catches what is left
    # if it was killed. Only PIDs it recorded, still running that program.
    if [ -f "$work/pids" ]; then
        while read -r pid comm; do
            if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
                kill -TERM "$pid" 2>/dev/null || true
            fi
        done < "$work/pids"
    fi
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

if [[ " $only " == *" sign "* ]]; then
    gcc -std=gnu11 -O2 -Wall -Wextra -Werror -Wshadow -Wformat=2 -D_GNU_SOURCE -I"$repo" \
        "$here/dkim_bench.c" "$repo/gateway/dkim.c" "$repo/lib/xmalloc.c" "$repo/lib/buf.c" \
        "$repo/lib/log.c" -luv -lopendkim -lcrypto -o "$work/dkim_bench"
    "$work/dkim_bench" --dir "$work" "${signargs[@]}"
    echo
fi
if [[ " $only " == *" accept "* ]]; then
    /usr/bin/python3 "$here/dkim_bench.py" --workdir "$work" --repo "$repo" \
        --mailferry "$mailferry" "${pyargs[@]}"
fi
