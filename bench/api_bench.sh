#!/usr/bin/env bash
# mailferry api transport benchmark: prints figures, it is not a test.
#
# Messages per second through the api transport (libcurl multi-socket on
# libuv, HTTPS with keep-alive) to the fake provider API of the integration
# tests (tests/integration/fake_<provider>.py, which checks every request
# against the provider's documentation), at each concurrency (the route's
# max_connections). One recipient per message, so messages/s is requests/s.
# After each run it prints how many TCP connections the fake accepted
# (keep-alive: the concurrency, not the message count; with one fake).
# Target: >= 2,000 messages/s at concurrency 64 with 2 KB messages.
#
# Usage: bench/api_bench.sh [-p PROVIDER] [-m MESSAGES] [-l SIZE]
#                           [-c "1 16 64"] [--fakes N] [--keep]
#   -p        sendgrid (default), postmark, mailgun, ses or webhook
#   -m        messages per run (default 20000)
#   -l        message size in bytes (default 2048)
#   -c        concurrencies (default "1 16 64")
#   --fakes   fake server processes sharing the port (SO_REUSEPORT;
#             default 1). Python's fake is usually the slower side.
#   --keep    keep the work directory and print its path
#
# Environment: MAILFERRY_BUILD, a CMake build directory of mailferry
# (default build/ in the repository): the program links its libmfnet.a and
# libmfcore.a. Needs gcc, openssl, curl and Debian's python3; loopback only.
# Every process it starts is stopped on exit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
build=${MAILFERRY_BUILD:-$repo/build}
provider=sendgrid
messages=20000
size=2048
conc="1 16 64"
nfakes=1
keep=0

while [ $# -gt 0 ]; do
    case "$1" in
        -p) provider=$2; shift 2 ;;
        -m) messages=$2; shift 2 ;;
        -l) size=$2; shift 2 ;;
        -c) conc=$2; shift 2 ;;
        --fakes) nfakes=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "api_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for lib in "$build/libmfnet.a" "$build/libmfcore.a"; do
    [ -f "$lib" ] || { echo "api_bench.sh: $lib not found (set MAILFERRY_BUILD)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/mf-apibench.XXXXXX)
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
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

# A test CA and a certificate for 127.0.0.1.
(
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.crt -days 2 -subj "/CN=mailferry bench CA" \
        -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout server.key -out server.csr -subj "/CN=localhost"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.crt -days 2 -extfile ext
) >"$work/pki.log" 2>&1 || { cat "$work/pki.log" >&2; exit 1; }

# The benchmark program, linked with the transport of the build.
gcc -std=gnu11 -O2 -D_GNU_SOURCE -I"$repo" "$here/api_bench.c" \
    "$build/libmfnet.a" "$build/libmfcore.a" \
    $(pkg-config --libs libuv openssl hiredis jansson libcurl gmime-3.0 inih libxcrypt libcares) \
    -lhttp_parser -lm -o "$work/api_bench"

secret="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
extra=()
[ "$provider" = ses ] && extra=(--extra access_key_id=AKIDBENCH)
for i in $(seq 1 "$nfakes"); do
    /usr/bin/python3 "$repo/tests/integration/fake_api.py" --provider "$provider" --port "$port" \
        --cert "$work/server.crt" --key "$work/server.key" --secret "$secret" --no-record \
        --reuse-port "${extra[@]}" >"$work/fake$i.log" 2>&1 &
    pids+=($!)
done
for i in $(seq 1 "$nfakes"); do
    for _ in $(seq 1 100); do
        grep -q READY "$work/fake$i.log" 2>/dev/null && break
        sleep 0.05
    done
    grep -q READY "$work/fake$i.log" || { cat "$work/fake$i.log" >&2; exit 1; }
done
url="https://127.0.0.1:$port"
[ "$provider" = webhook ] && url="$url/hook"

stats() {
    # The fake's count of accepted connections (this query's own included).
    curl -s --cacert "$work/ca.crt" "https://127.0.0.1:$port/_fake/stats" |
        /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["connections"])'
}

echo "fake $provider API: $nfakes process(es) on 127.0.0.1:$port; $(nproc) CPU(s)"
first=1
for c in $conc; do
    [ "$nfakes" = 1 ] && before=$(stats)
    if [ "$first" = 1 ]; then
        "$work/api_bench" --provider "$provider" --base-url "$url" --ca-file "$work/ca.crt" \
            --secret "$secret" --messages "$messages" --size "$size" --concurrency "$c"
        first=0
    else
        "$work/api_bench" --provider "$provider" --base-url "$url" --ca-file "$work/ca.crt" \
            --secret "$secret" --messages "$messages" --size "$size" --concurrency "$c" | tail -1
    fi
    if [ "$nfakes" = 1 ]; then
        after=$(stats)
        echo "             (TCP connections the fake accepted during the run: $((after - before - 1)))"
    fi
done
