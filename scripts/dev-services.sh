#!/usr/bin/env bash
# Installs (when missing) and starts every service the tests need on a Debian 12 machine:
# RabbitMQ (with a TLS listener), Redis (and a TLS-only one), and Podman serving the
# Docker Engine API with a local busybox image.
# Idempotent: a second run only checks that each service answers.
# Each recipe was tried on a fresh Debian 12 machine.
set -euo pipefail

PODMAN_SOCKET_PATH=${PODMAN_SOCKET_PATH:-/run/podman/podman.sock}
BUSYBOX_IMAGE=${BUSYBOX_IMAGE:-localhost/busybox:latest}
LOG_DIR=${SERVICES_LOG_DIR:-/tmp/provisioner-services}
mkdir -p "$LOG_DIR"

say() { printf '[services] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1 \
    || { cat "$LOG_DIR/apt.log" >&2; exit 1; }
fi

# Redis with the durability the provisioner's guarantees assume (README, "Redis
# durability"): append-only, fsync every second, so a crash loses at most a second of
# acknowledged writes.
REDIS_DATA_DIR=${REDIS_DATA_DIR:-$HOME/.cache/provisioner-redis}
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting redis (append-only, fsync every second, in $REDIS_DATA_DIR)"
  mkdir -p "$REDIS_DATA_DIR"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
    --appendonly yes --appendfsync everysec --dir "$REDIS_DATA_DIR" \
    --logfile "$LOG_DIR/redis.log"
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null

# RabbitMQ: 3.10 from Debian has quorum queues, delivery limits and dead-letter exchanges.
# Debian's wrapper starts the node through `su rabbitmq`, which resets the soft limit on
# open files to 1024. RabbitMQ's file handle cache then runs dry after a few hundred
# quorum queues and the node stalls: creating a vhost, or booting, waits forever. Start
# the node as the rabbitmq user ourselves, with the soft limit raised to the hard one.
start_rabbitmq() {
  say "starting rabbitmq (about 15 s)"
  as_root su rabbitmq -s /bin/sh -c \
    'ulimit -S -n "$(ulimit -H -n)"; cd /var/lib/rabbitmq; exec /usr/sbin/rabbitmq-server -detached'
}
rabbitmq_ready() { # within $1 seconds
  # await_startup fails at once while the node has not yet registered with epmd: poll.
  local deadline=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$deadline" ]; do
    rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
# TLS, for the tests of encrypted connections: a private CA and a certificate for
# localhost and 127.0.0.1; RabbitMQ listens for TLS on 5671 beside 5672, and a second,
# TLS-only Redis answers on 6390. Clients trust the CA through SSL_CERT_FILE.
TLS_DIR=${PROVISIONER_TLS_DIR:-$HOME/.cache/provisioner-tls}
if [ ! -f "$TLS_DIR/server.pem" ]; then
  say "making a test CA and a server certificate in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=provisioner test CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    >"$TLS_DIR/server.ext"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.pem" 2>/dev/null
fi
RABBITMQ_TLS_CONF=/etc/rabbitmq/conf.d/10-provisioner-tls.conf
if [ ! -f "$RABBITMQ_TLS_CONF" ]; then
  say "configuring a TLS listener for rabbitmq on 5671"
  as_root mkdir -p /etc/rabbitmq/conf.d /etc/rabbitmq/tls
  as_root cp "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" "$TLS_DIR/server.key" /etc/rabbitmq/tls/
  as_root chown -R rabbitmq:rabbitmq /etc/rabbitmq/tls
  as_root chmod 0600 /etc/rabbitmq/tls/server.key
  printf 'listeners.ssl.default = 5671\nssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem\nssl_options.certfile = /etc/rabbitmq/tls/server.pem\nssl_options.keyfile = /etc/rabbitmq/tls/server.key\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n' \
    | as_root tee "$RABBITMQ_TLS_CONF" >/dev/null
  # A running node reads its configuration only at boot.
  if rabbitmqctl -q status >/dev/null 2>&1; then
    say "restarting rabbitmq for its TLS listener"
    timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true
  fi
fi

# The largest message the broker takes: a request is at most 256 KiB, and RabbitMQ's own
# default (16 MiB, 128 MiB before 4.0) would let one producer put that much into every
# consumer's memory before the body can be judged.
RABBITMQ_LIMITS_CONF=/etc/rabbitmq/conf.d/20-provisioner-limits.conf
if [ ! -f "$RABBITMQ_LIMITS_CONF" ]; then
  say "limiting rabbitmq's message size to 1 MiB"
  as_root mkdir -p /etc/rabbitmq/conf.d
  printf 'max_message_size = 1048576\n' | as_root tee "$RABBITMQ_LIMITS_CONF" >/dev/null
  if rabbitmqctl -q status >/dev/null 2>&1; then
    say "restarting rabbitmq for its message size limit"
    timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true
  fi
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 || start_rabbitmq
  if ! rabbitmq_ready 90; then
    # The Erlang node runs but RabbitMQ never finished booting (e.g. the stall above):
    # stop it hard and start it again.
    say "rabbitmq did not finish starting; restarting it"
    timeout 30 rabbitmqctl -q stop >/dev/null 2>&1 || true
    as_root pkill -9 -u rabbitmq -f beam.smp || true
    sleep 2
    start_rabbitmq
  fi
fi
rabbitmq_ready 120 || { say "rabbitmq does not start: see /var/log/rabbitmq/"; exit 1; }
rabbitmq-diagnostics -q listeners 2>/dev/null | grep -q 5671 \
  || { say "rabbitmq has no TLS listener on 5671 (see $RABBITMQ_TLS_CONF and /var/log/rabbitmq/)"; exit 1; }
# The management API (port 15672): clients create the queue policies through it, and the
# tests read queues' effective policies. Enabling it needs no restart.
if ! curl -sf -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview; then
  say "enabling the rabbitmq management plugin"
  as_root rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  for _ in $(seq 100); do
    curl -sf -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview && break
    sleep 0.2
  done
  curl -sf -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview \
    || { say "the rabbitmq management API does not answer on 15672"; exit 1; }
fi

# The TLS-only Redis of the TLS tests (the tests make its ACL users).
REDIS_TLS_DATA_DIR=${REDIS_TLS_DATA_DIR:-$HOME/.cache/provisioner-redis-tls}
redis_tls() { redis-cli --tls --cacert "$TLS_DIR/ca.pem" -h 127.0.0.1 -p 6390 "$@"; }
if ! redis_tls ping >/dev/null 2>&1; then
  say "starting a TLS-only redis on 6390"
  mkdir -p "$REDIS_TLS_DATA_DIR"
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port 6390 \
    --tls-cert-file "$TLS_DIR/server.pem" --tls-key-file "$TLS_DIR/server.key" \
    --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients no \
    --save "" --appendonly yes --appendfsync everysec --dir "$REDIS_TLS_DATA_DIR" \
    --logfile "$LOG_DIR/redis-tls.log"
  for _ in $(seq 50); do redis_tls ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis_tls ping >/dev/null || { say "the TLS redis does not answer: see $LOG_DIR/redis-tls.log"; exit 1; }

# Podman: the Docker Engine API on a unix socket, with runc and cgroupfs (crun and the
# default ulimits fail in this sandbox).
if [ ! -f /etc/containers/containers.conf ] || ! grep -q 'runtime = "runc"' /etc/containers/containers.conf; then
  as_root mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
    | as_root tee /etc/containers/containers.conf >/dev/null
fi
if ! podman image exists "$BUSYBOX_IMAGE"; then
  say "importing $BUSYBOX_IMAGE from /bin/busybox"
  root=$(mktemp -d)
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/"
  (cd "$root/bin" && for c in sh sleep httpd echo cat nc wget true false; do ln -sf busybox "$c"; done)
  tar -C "$root" -cf "$root.tar" .
  podman import "$root.tar" "$BUSYBOX_IMAGE" >/dev/null
  rm -rf "$root" "$root.tar"
fi
if ! curl -fsS --unix-socket "$PODMAN_SOCKET_PATH" http://d/_ping >/dev/null 2>&1; then
  say "starting podman API service on $PODMAN_SOCKET_PATH"
  as_root mkdir -p "$(dirname "$PODMAN_SOCKET_PATH")"
  rm -f "$PODMAN_SOCKET_PATH"
  nohup podman system service --time=0 "unix://$PODMAN_SOCKET_PATH" >"$LOG_DIR/podman.log" 2>&1 &
  for _ in $(seq 100); do
    curl -fsS --unix-socket "$PODMAN_SOCKET_PATH" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
curl -fsS --unix-socket "$PODMAN_SOCKET_PATH" http://d/_ping >/dev/null \
  || { say "podman API did not come up; see $LOG_DIR/podman.log"; exit 1; }

say "ready: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f (management API on 15672) REDIS_URL=redis://127.0.0.1:6379 DOCKER_HOST=unix://$PODMAN_SOCKET_PATH (TLS: amqps://…@localhost:5671, rediss://127.0.0.1:6390, SSL_CERT_FILE=$TLS_DIR/ca.pem)"
