#!/bin/sh
# One-shot "setup" service of docker/docker-compose.yml: makes what the
# mailferry containers need on the shared volume "pki" (mounted here at
# $PKI_DIR, read-only in the others at /etc/mailferry/pki):
#
#   ca.crt                   a private CA for this Compose setup only
#   gateway.crt/.key         the gateway's certificate for STARTTLS (587)
#                            and implicit TLS (465): gateway, localhost,
#                            127.0.0.1 and $GATEWAY_HOSTNAME
#   relay.crt/.key           the relay's server certificate (relay,
#                            $RELAY_HOSTNAME), for the mutual-TLS tunnel
#   router.crt/.key          the router's client certificate for that tunnel
#   fakeapi.crt/.key         the demo API's server certificate (fakeapi)
#   users                    the submission users file: one user
#                            $MAILFERRY_DEMO_USER allowed every sender domain
#
# Files that exist are kept, so certificates survive `docker compose up`
# again; `docker compose down -v` removes the volume and starts over. The
# users file is rewritten when MAILFERRY_DEMO_PASSWORD is set; when it is
# not and no users file exists, a random password is made and printed
# (`docker compose logs setup`). Private keys and the users file belong to
# $MAILFERRY_UID (the image's "mailferry" user) with mode 0600, because
# mailferry refuses key and users files that others can read.
set -eu

dir=${PKI_DIR:-/pki}
uid=${MAILFERRY_UID:-10025}
user=${MAILFERRY_DEMO_USER:-demo}
gateway_name=${GATEWAY_HOSTNAME:-mail.mailferry.test}
relay_name=${RELAY_HOSTNAME:-relay.mailferry.test}
days=3650

say() { echo "setup: $*"; }

mkdir -p "$dir"
chmod 0755 "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/ca.key" ]; then
    say "making the CA"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" \
        -subj "/O=mailferry/CN=mailferry Compose CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 0600 "$dir/ca.key"
fi

# cert NAME CN EKU SAN: a key and a certificate signed by the CA.
cert() {
    name=$1 cn=$2 eku=$3 san=$4
    if [ -s "$dir/$name.crt" ] && [ -s "$dir/$name.key" ]; then
        return 0
    fi
    say "making the $name certificate ($cn${san:+, $san})"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$eku"
        [ -z "$san" ] || echo "subjectAltName=$san"
    } >"$tmp/$name.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/$name.key" -out "$tmp/$name.csr" -subj "/O=mailferry/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$tmp/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$days" -sha256 \
        -extfile "$tmp/$name.ext" -out "$dir/$name.crt" 2>/dev/null
    chown "$uid:$uid" "$dir/$name.key"
    chmod 0600 "$dir/$name.key"
    chmod 0644 "$dir/$name.crt"
}

cert gateway "$gateway_name" serverAuth \
    "DNS:$gateway_name,DNS:gateway,DNS:localhost,IP:127.0.0.1"
cert relay "$relay_name" serverAuth "DNS:$relay_name,DNS:relay"
cert router router.mailferry.test clientAuth ""
cert fakeapi fakeapi serverAuth "DNS:fakeapi"
chmod 0644 "$dir/ca.crt"

# The users file: "user:crypt-hash:domains" (README, "Running mailferry").
if [ -n "${MAILFERRY_DEMO_PASSWORD:-}" ] || [ ! -s "$dir/users" ]; then
    password=${MAILFERRY_DEMO_PASSWORD:-}
    if [ -z "$password" ]; then
        password=$(openssl rand -base64 18 | tr -d '/+=' | cut -c1-20)
        say "submission user $user, password $password (made now; set MAILFERRY_DEMO_PASSWORD to choose one)"
    else
        say "submission user $user, password from MAILFERRY_DEMO_PASSWORD"
    fi
    hash=$(printf '%s\n' "$password" | openssl passwd -6 -stdin)
    printf '%s:%s:*\n' "$user" "$hash" >"$tmp/users"
    chown "$uid:$uid" "$tmp/users"
    chmod 0600 "$tmp/users"
    mv "$tmp/users" "$dir/users"
fi
say "done: $(cd "$dir" && echo *)"
