# Redis for docker-compose.yml, from Debian's redis-server (7.0) on the same
# base as mailferry's image. The configuration (append-only file on) is
# mounted from docker/redis.conf.
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
# redis-server saves nothing more on SIGTERM than the AOF already holds and
# exits at once.
STOPSIGNAL SIGTERM
CMD ["redis-server", "/etc/redis/mailferry.conf"]
