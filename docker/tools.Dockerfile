# Helpers for docker-compose.yml, on the same Debian base as mailferry's
# image: the one-shot "setup" service (demo CA and certificates, the
# submission users file; docker/setup.sh) and the peers of the demo profile:
# a recording MX ("sink", tests/integration/mx_recorder.py on aiosmtpd),
# dnsmasq as the demo's DNS, and the email API (the project's fake
# providers, tests/integration/fake_*.py, served by docker/fakeapi.py).
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openssl python3 python3-aiosmtpd dnsmasq-base socat ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY tests/integration/mx_recorder.py tests/integration/fake_*.py docker/fakeapi.py docker/setup.sh \
     /usr/local/lib/mailferry/
RUN chmod 0755 /usr/local/lib/mailferry/*
