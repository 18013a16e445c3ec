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
# shellcheck source=bench/benchlib.sh
. "$here/benchlib.sh"

bench_parse_args gateway.sh "-m --messages -s --sessions -l --size --modes --only --idle \
    --idle-sources --gateway-log-level --timeout --repeat" "$@"
bench_setup mf-bench

gcc -std=gnu11 -O2 -Wall -Wextra -Werror -Wshadow -Wformat=2 -D_GNU_SOURCE \
    "$here/idle_conns.c" -o "$work/idle_conns"

# Not exec: the EXIT trap must run after the driver ends.
/usr/bin/python3 "$here/gateway_bench.py" --workdir "$work" --repo "$repo" \
    --mailferry "$mailferry" --idle-bin "$work/idle_conns" "${pyargs[@]}"
