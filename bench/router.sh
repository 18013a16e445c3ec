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
# shellcheck source=bench/benchlib.sh
. "$here/benchlib.sh"

bench_parse_args router.sh "-m --messages -l --size --connections --concurrency --batch --appendfsync \
    --router-log-level --only --repeat --timeout" "$@"
bench_setup mf-rbench

# Not exec: the EXIT trap must run after the driver ends.
/usr/bin/python3 "$here/router_bench.py" --workdir "$work" --repo "$repo" \
    --mailferry "$mailferry" "${pyargs[@]}"
