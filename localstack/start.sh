#!/usr/bin/env bash
# Installs (pinned to versions found working; newer dependency releases break it) and starts LocalStack on the
# host for the EC2 API, when it is not already answering. Idempotent.
#   --fresh          restart the LocalStack this script started, for an empty account: its
#                    calls slow down with every instance it ever held (a DescribeInstances
#                    walks them all), so long scenarios and benchmarks start from none. A
#                    LocalStack started otherwise (compose, a container) is left as it is.
#   LOCALSTACK_VENV  where the virtualenv lives (default ~/.cache/provisioner-localstack)
#   LOCALSTACK_PORT  gateway port on 127.0.0.1 (default 4566)
set -euo pipefail

VENV=${LOCALSTACK_VENV:-$HOME/.cache/provisioner-localstack}
PORT=${LOCALSTACK_PORT:-4566}
LOG_DIR=${SERVICES_LOG_DIR:-/tmp/provisioner-services}
mkdir -p "$LOG_DIR"
health="http://127.0.0.1:$PORT/_localstack/health"

say() { printf '[localstack] %s\n' "$*" >&2; }

# The LocalStack this script started on this port, by the pid it wrote.
pid_file="$LOG_DIR/localstack-$PORT.pid"
ours() {
  local pid
  pid=$(cat "$pid_file" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "localstack.runtime.main" \
    && echo "$pid"
}

if [ "${1:-}" = "--fresh" ]; then
  if pid=$(ours); then
    say "restarting our LocalStack (pid $pid) for an empty account"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
      sleep 1
    fi
    if kill -0 "$pid" 2>/dev/null; then
      say "LocalStack (pid $pid) did not stop"
      exit 1
    fi
  elif curl -fsS -m 2 -o /dev/null "$health" 2>/dev/null; then
    say "the LocalStack on $PORT was not started by this script: left as it is, not emptied"
  fi
fi

if curl -fsS -m 2 "$health" 2>/dev/null | grep -q '"ec2": "\(available\|running\)"'; then
  exit 0
fi

if ! "$VENV/bin/python" -c 'import localstack' 2>/dev/null; then
  say "installing localstack-core 4.14.0 into $VENV (a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "localstack-core[runtime]==4.14.0" "cbor2==5.6.5" "cryptography==43.0.3" \
    "pyopenssl==24.2.1" "service_identity==24.1.0" >"$LOG_DIR/localstack-pip.log" 2>&1 \
    || { tail -30 "$LOG_DIR/localstack-pip.log" >&2; exit 1; }
fi

say "starting LocalStack on 127.0.0.1:$PORT"
GATEWAY_LISTEN="127.0.0.1:$PORT" SERVICES=ec2,iam,sts EAGER_SERVICE_LOADING=1 \
  nohup "$VENV/bin/python" -m localstack.runtime.main >"$LOG_DIR/localstack.log" 2>&1 &
echo $! >"$pid_file"
for _ in $(seq 180); do
  if curl -fsS -m 2 "$health" 2>/dev/null | grep -q '"ec2": "\(available\|running\)"'; then
    say "ready: AWS_ENDPOINT_URL=http://127.0.0.1:$PORT"
    exit 0
  fi
  sleep 1
done
say "LocalStack did not become ready; see $LOG_DIR/localstack.log"
tail -30 "$LOG_DIR/localstack.log" >&2
exit 1
