#!/usr/bin/env bash
# The one command that runs every test: installs and starts RabbitMQ, Redis and Podman
# (scripts/dev-services.sh) and the AWS emulators, LocalStack and moto (localstack/),
# when they are missing, then runs the whole workspace's tests against them. Extra
# arguments go to `cargo test` (e.g. `-p provisioner-core`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/dev-services.sh
bash localstack/start.sh
bash localstack/start-moto.sh

# Each test deletes its own vhost; a run that was killed leaves its vhosts behind, and
# every quorum queue in them costs the broker memory and file handles for good.
for vhost in $(rabbitmqctl -q list_vhosts --no-table-headers | grep -E '^(test|lambda|bench)-[0-9a-f]{8,10}$' || true); do
  rabbitmqctl -q delete_vhost "$vhost" </dev/null
done
# ...and the broker users a least-privilege test made (named `<user>-<run id>`).
for user in $(rabbitmqctl -q list_users --no-table-headers | awk '{print $1}' | grep -E '^provisioner-[a-z0-9-]+-[0-9a-f]{10}$' || true); do
  rabbitmqctl -q delete_user "$user" </dev/null
done

# ...and the Redis users the attack suite made from `provisioner redis-users`
# (`provisioner-<run id>-<role>`).
for user in $(redis-cli ACL USERS 2>/dev/null | grep -E '^provisioner-[0-9a-f]{10}-' || true); do
  redis-cli ACL DELUSER "$user" >/dev/null </dev/null
done

export DOCKER_HOST=${DOCKER_HOST:-unix:///run/podman/podman.sock}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
# The AWS tests talk to LocalStack (EC2) and moto (ECS) with dummy credentials, set per
# test client and per worker process, never exported here (a real AWS_* environment
# stays untouched).
export PROVISIONER_TEST_AWS_ENDPOINT=${PROVISIONER_TEST_AWS_ENDPOINT:-http://127.0.0.1:4566}
export PROVISIONER_TEST_ECS_ENDPOINT=${PROVISIONER_TEST_ECS_ENDPOINT:-http://127.0.0.1:5000}
# The moto that enforces IAM: the EC2 and ECS workers' own tests run there as users
# holding exactly their documented policies (localstack/start-moto.sh keeps the key of
# its administrator, who makes those users).
export PROVISIONER_TEST_IAM_ENDPOINT=${PROVISIONER_TEST_IAM_ENDPOINT:-http://127.0.0.1:5001}
# Tests make their own vhosts and key prefixes; AMQP_URL would only confuse the
# embedded-mode tests, which must see no services configured.
unset AMQP_URL

cargo test --workspace --locked "$@"
# The deployment forms in infra/ against the binary the tests just built (a run of
# some tests only, with arguments, may not have built it).
if [ $# -eq 0 ]; then
  PROVISIONER_BIN="${CARGO_TARGET_DIR:-target}/debug/provisioner" bash scripts/lint-infra.sh
fi
