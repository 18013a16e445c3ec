#!/bin/sh
# Install every Debian package that mailferry needs to build, run and test.
# Idempotent: packages already present are skipped. Run as root on Debian 12.
set -eu

PKGS="
build-essential cmake pkg-config clang libclang-rt-14-dev
libuv1-dev libssl-dev libhiredis-dev libcmocka-dev libc-ares-dev
libcurl4-openssl-dev libjansson-dev libinih-dev libhttp-parser-dev
libopendkim-dev libgmime-3.0-dev libcrypt-dev
redis-server openssl ca-certificates
swaks libnet-ssleay-perl curl python3 python3-pytest python3-aiosmtpd python3-dkim python3-nacl python3-dnspython
dnsmasq-base postfix opendkim-tools iproute2 procps
prometheus
"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs Debian packages)" >&2
    exit 1
fi

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    exit 0
fi

echo "setup: installing$missing" >&2

# Installing postfix must not start a system-wide MTA on port 25: tests run
# private instances (postfix -c DIR) and smtp-sink. Likewise prometheus,
# installed only for promtool (the tests check /metrics with it), must not
# start its server. policy-rc.d forbids service starts during the install;
# debconf skips the mailer configuration.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing

if [ "$created_policy" = 1 ]; then
    rm -f /usr/sbin/policy-rc.d
fi
