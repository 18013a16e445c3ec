#!/usr/bin/env bash
# mailferry relay benchmark: prints figures, it is not a test.
#
# (1) Throughput: messages per second from a full queue through one router
# to Postfix's smtp-sink, side by side in one run: "direct" (route
# transport = smtp to the sink) and "tunnel" (route transport = relay:
# mutual TLS to `mailferry relay`, which delivers to the sink as the MX of
# the recipient domain, served by dnsmasq). Prints seconds, msgs/s, CPU ms
# per message (router + redis-server; relay; sink) and tunnel/direct.
#
# (2) Latency of the tunnel hop with warm connections: one client runs
# transactions one after another (MAIL, RCPT, DATA pipelined, then the
# content) on one open connection, to the sink directly and through the
# tunnel (TLS with the router's client certificate, the relay keeping its
# MX connection open), and prints p50, p90, p99 and the mean of each and of
# the difference. Target: the hop adds under 2 ms at p50.
#
# Usage: bench/relay_bench.sh [-m MESSAGES] [-l SIZE] [--connections N]
#                             [--latency N] [--only "direct tunnel latency"]
#                             [--repeat N] [--timeout SECONDS] [--keep]
#   -m             messages per throughput measurement (default 5000)
#   -l             payload bytes per message (default 2048)
#   --connections  the route's max_connections and the relay's
#                  mx_max_connections_per_domain (default 20)
#   --latency      transactions per latency measurement (default 2000)
#   --only         run a subset: direct, tunnel, latency
#   --repeat       run the whole cycle N times and print medians (default 1)
#   --keep         keep the work directory (logs, configs) and print its path
#
# Environment: MAILFERRY_BIN (default build/mailferry in the repository);
# mailferryctl is taken from the same directory (it makes the tunnel's
# certificates). Build both with: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release &&
# cmake --build build -j2
# Needs root (smtp-sink runs as the postfix user), redis-server, dnsmasq,
# postfix (smtp-sink). Every process it starts is stopped on exit; loopback
# only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/benchlib.sh
. "$here/benchlib.sh"

bench_parse_args relay_bench.sh "-m --messages -l --size --connections --latency --only \
    --repeat --timeout" "$@"
if [ "$(id -u)" -ne 0 ]; then
    echo "relay_bench.sh: needs root (smtp-sink drops to the postfix user)" >&2
    exit 2
fi
bench_setup mf-relaybench

# Not exec: the EXIT trap must run after the driver ends.
/usr/bin/python3 "$here/relay_bench.py" --workdir "$work" --repo "$repo" \
    --mailferry "$mailferry" "${pyargs[@]}"
