#!/bin/bash
# Quick start: sets up the machine, builds mailferry, starts an embedded
# Redis (appendonly on, data under var/) and runs gateway and router
# ("mailferry all") in the foreground on 127.0.0.1. Ctrl-C stops them.
#
# The router sends everything to one smarthost route: MAILFERRY_SMARTHOST
# (host:port) when set, else a local sink (Postfix's smtp-sink) that writes
# each delivered message to var/sink/, so you can watch mail go through.
#
# Environment: MAILFERRY_SMTP_PORT (default 2525), MAILFERRY_REDIS_PORT
# (default 6380), MAILFERRY_SMARTHOST (default: the local sink on 2526).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
smtp_port=${MAILFERRY_SMTP_PORT:-2525}
redis_port=${MAILFERRY_REDIS_PORT:-6380}

"$top/scripts/setup.sh"
cmake -S "$top" -B "$top/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$top/build" -j"$(nproc)" >/dev/null

mkdir -p "$top/var/redis"
if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
    redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$top/var/redis" \
        --appendonly yes --appendfsync everysec --save '' \
        --daemonize yes --pidfile "$top/var/redis/redis.pid" \
        --logfile "$top/var/redis/redis.log"
    for _ in $(seq 50); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
sink_pid=
cleanup() {
    [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null
    kill "$(cat "$top/var/redis/redis.pid" 2>/dev/null)" 2>/dev/null || true
}
trap cleanup EXIT

smarthost=${MAILFERRY_SMARTHOST:-}
if [ -z "$smarthost" ]; then
    mkdir -p "$top/var/sink"
    chmod 777 "$top/var/sink"
    smarthost=127.0.0.1:2526
    /usr/sbin/smtp-sink -u postfix -d "$top/var/sink/%Y%m%d-%H%M%S." 127.0.0.1:2526 100 &
    sink_pid=$!
fi

cat > "$top/var/mailferry.conf" <<CONF
# Written by scripts/quickstart.sh; see conf/mailferry.conf for every key.
[queue]
redis = redis://127.0.0.1:$redis_port/0

[gateway]
listen = 127.0.0.1:$smtp_port
allowed_networks = 127.0.0.0/8, ::1
hostname = localhost

[router]
hostname = localhost

[route primary]
transport = smtp
host = $smarthost
tls = opportunistic
CONF

echo "mailferry: Redis on 127.0.0.1:$redis_port (data in var/redis, appendonly yes)"
echo "mailferry: submit mail to smtp://127.0.0.1:$smtp_port (no AUTH needed from 127.0.0.0/8)"
echo "mailferry: e.g. swaks --server 127.0.0.1:$smtp_port --from app@example.com --to user@example.net"
echo "mailferry: delivering through smtp://$smarthost${sink_pid:+ (local sink: messages land in var/sink/)}"
"$top/build/mailferry" all --config "$top/var/mailferry.conf"
