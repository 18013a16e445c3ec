#!/bin/bash
# Finds or starts a Docker engine for mailferry's Docker Compose setup
# (docker/docker-compose.yml) and its test (tests/docker/test_compose.py).
#
#   eval "$(scripts/docker-engine.sh start)"   # sets DOCKER_HOST when needed
#   scripts/docker-engine.sh stop              # stops the engine it started
#   scripts/docker-engine.sh status
#
# start, in order:
#   1. An engine that already answers `docker info` (the default socket or
#      $DOCKER_HOST) is used as it is. So is an engine this script started
#      earlier and that is still running.
#   2. Otherwise, as root on Debian 12, it installs docker.io and iptables
#      from Debian when dockerd is missing and starts a private dockerd with
#      its data under $MAILFERRY_DOCKER_DIR (default /var/lib/mailferry-docker),
#      listening only on the Unix socket $MAILFERRY_DOCKER_DIR/docker.sock.
#      It runs without iptables rules, masquerading or IP forwarding:
#      containers reach each other and the ports they publish on 127.0.0.1
#      (through docker-proxy), nothing else. dockerd still needs the iptables
#      program for the DNS resolver inside each container's own namespace.
#      The data root persists, so images and build cache survive a restart.
#   3. `docker compose` must work: when neither the Compose v2 plugin nor
#      docker-compose v1 exists it installs Debian's docker-compose (v1) and
#      a small `docker compose` plugin that hands over to it.
#   4. The base image debian:bookworm-slim must exist. An engine that can
#      reach a registry pulls it; when that fails (or for the private engine,
#      which has no route out) the image is made with debootstrap from this
#      machine's apt mirror and tagged debian:bookworm-slim and
#      debian:bookworm. The root file system is kept under the data folder,
#      so this happens once.
#
# Only "export DOCKER_HOST=..." lines go to stdout; progress goes to stderr.
# Image builds that run apt-get need host networking (`network: host` in the
# compose build section), because the private engine gives containers no
# route out.
set -euo pipefail

dir=${MAILFERRY_DOCKER_DIR:-/var/lib/mailferry-docker}
sock=$dir/docker.sock
pidfile=$dir/dockerd.pid
rootfs=$dir/rootfs
base_image=debian:bookworm-slim

say() { echo "docker-engine: $*" >&2; }
die() { say "$*"; exit 1; }

# Installs the named Debian packages (as root, non-interactively).
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "installing $* needs root"
    say "installing $*"
    # docker.io would start the system's own dockerd (iptables rules and
    # all) from its maintainer scripts; policy-rc.d forbids service starts
    # during the install.
    local created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
            -y -qq --no-install-recommends "$@" >&2 || rc=$?
    [ "$created_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || die "apt-get install $* failed"
}

# Whether the private engine this script starts is running.
private_running() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1
}

start_private() {
    local need=()
    command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
    command -v iptables >/dev/null 2>&1 || need+=(iptables)
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
    command -v docker >/dev/null 2>&1 || apt_install docker.io

    mkdir -p "$dir"
    chmod 711 "$dir"
    # A dockerd that died leaves its pid file and socket behind.
    rm -f "$pidfile" "$sock"
    say "starting dockerd (data root $dir/data, log $dir/dockerd.log)"
    setsid dockerd \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$pidfile" \
        --host "unix://$sock" \
        --iptables=false --ip-masq=false --ip-forward=false \
        >>"$dir/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 120); do
        DOCKER_HOST=unix://$sock docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    tail -20 "$dir/dockerd.log" >&2 || true
    die "dockerd did not answer within 60 s; see $dir/dockerd.log"
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        return 0
    fi
    command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
    # The docker CLI looks for plugins here; this one forwards
    # `docker compose ARGS` to docker-compose v1.
    local plug=/usr/local/lib/docker/cli-plugins/docker-compose
    if [ "$(id -u)" -eq 0 ] && [ ! -e "$plug" ]; then
        mkdir -p "${plug%/*}"
        cat >"$plug" <<'EOF'
#!/bin/sh
# `docker compose` forwarded to docker-compose v1 (scripts/docker-engine.sh).
if [ "${1:-}" = docker-cli-plugin-metadata ]; then
    echo '{"SchemaVersion":"0.1.0","Vendor":"mailferry","Version":"v1-shim","ShortDescription":"docker-compose v1"}'
    exit 0
fi
shift
exec docker-compose "$@"
EOF
        chmod 755 "$plug"
    fi
    docker compose version >/dev/null 2>&1 ||
        die "neither 'docker compose' nor a usable docker-compose was found"
}

# The apt mirror this machine uses (deb822 sources first, then the one-line
# format), for debootstrap.
apt_mirror() {
    local m
    m=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v -- '-security' | head -n1 | awk '{print $1}') || true
    [ -n "$m" ] || m=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null) || true
    echo "${m:-http://deb.debian.org/debian}"
}

ensure_base_image() {
    local private=$1
    docker image inspect "$base_image" >/dev/null 2>&1 && return 0
    if [ "$private" = 0 ]; then
        say "pulling $base_image"
        if timeout 300 docker pull -q "$base_image" >&2; then
            return 0
        fi
        say "cannot pull $base_image; making it with debootstrap"
    fi
    if [ ! -x "$rootfs/bin/sh" ]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        local mirror tmp
        mirror=$(apt_mirror)
        tmp=$rootfs.tmp
        rm -rf "$tmp"
        mkdir -p "$dir"
        say "debootstrap bookworm from $mirror (log $dir/debootstrap.log)"
        debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$dir/debootstrap.log" 2>&1 ||
            die "debootstrap failed; see $dir/debootstrap.log"
        # Like the official slim image: no cached package lists or archives.
        rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/archives/*.deb
        mv "$tmp" "$rootfs"
    fi
    say "importing $rootfs as $base_image"
    tar -C "$rootfs" --numeric-owner -c . |
        docker import --change 'CMD ["bash"]' - "$base_image" >/dev/null
    docker tag "$base_image" debian:bookworm
}

cmd_start() {
    local private=0
    if [ -n "${DOCKER_HOST:-}" ] && docker info >/dev/null 2>&1; then
        say "using the engine at $DOCKER_HOST"
    elif [ -z "${DOCKER_HOST:-}" ] && command -v docker >/dev/null 2>&1 &&
         docker info >/dev/null 2>&1; then
        say "using the engine at the default socket"
    else
        private=1
        export DOCKER_HOST=unix://$sock
        if private_running; then
            say "using the engine started earlier ($sock)"
        else
            start_private
        fi
    fi
    ensure_compose
    ensure_base_image "$private"
    if [ -n "${DOCKER_HOST:-}" ]; then
        echo "export DOCKER_HOST=$DOCKER_HOST"
    fi
}

cmd_stop() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || { say "no engine started here"; return 0; }
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping dockerd (pid $pid)"
        # dockerd stops the running containers (SIGTERM, then SIGKILL after
        # their stop timeout) before it exits.
        kill -TERM "$pid"
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) did not exit"
    fi
    rm -f "$pidfile"
    umount "$dir/exec/netns/default" 2>/dev/null || true
    ip link del docker0 2>/dev/null || true
}

cmd_status() {
    if private_running; then
        echo "private engine running: DOCKER_HOST=unix://$sock (pid $(cat "$pidfile"))"
    elif docker info >/dev/null 2>&1; then
        echo "engine reachable at ${DOCKER_HOST:-the default socket}"
    else
        echo "no engine"
        return 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
