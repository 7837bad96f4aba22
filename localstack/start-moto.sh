#!/usr/bin/env bash
# Installs (pinned) and starts moto's server on the host for the ECS API, when it is not
# already answering: LocalStack's community edition has no ECS any more, moto serves it.
# Idempotent.
#   MOTO_VENV  where the virtualenv lives (default ~/.cache/provisioner-moto)
#   MOTO_PORT  port on 127.0.0.1 (default 5000)
set -euo pipefail

VENV=${MOTO_VENV:-$HOME/.cache/provisioner-moto}
PORT=${MOTO_PORT:-5000}
LOG_DIR=${SERVICES_LOG_DIR:-/tmp/provisioner-services}
mkdir -p "$LOG_DIR"
# moto answers its own dashboard path without credentials; ECS needs a signed call.
probe="http://127.0.0.1:$PORT/moto-api/"

say() { printf '[moto] %s\n' "$*" >&2; }

# moto moves an ECS task one step towards STOPPED each time it is described (a simulation
# meant for waiters); real tasks stay RUNNING until stopped. Make moto's tasks do that.
keep_tasks_running() {
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$PORT/moto-api/state-manager/set-transition" \
    -d '{"model_name":"ecs::task","transition":{"progression":"manual","times":1000000}}'
}

if curl -fsS -o /dev/null "$probe" 2>/dev/null; then
  keep_tasks_running
  exit 0
fi

if ! "$VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
  say "installing moto[server] 5.2.1 into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==5.2.1" \
    >"$LOG_DIR/moto-pip.log" 2>&1 || { tail -30 "$LOG_DIR/moto-pip.log" >&2; exit 1; }
fi

# moto 5.2 (5.2.5 too) answers an ECS task's container `cpu` and `memory` as JSON numbers
# where the ECS API (and so aws-sdk-ecs) has strings; the SDK then refuses every RunTask
# and DescribeTasks answer. Patch the two fields to strings, once per install.
"$VENV/bin/python" - <<'PY'
import pathlib, moto.ecs.models as m
path = pathlib.Path(m.__file__)
text = path.read_text()
old_cpu = '        self.cpu = container_def.get("cpu")\n'
old_memory = '        self.memory = container_def.get("memory")\n'
if old_cpu in text:
    text = text.replace(old_cpu, '        self.cpu = None if container_def.get("cpu") is None else str(container_def.get("cpu"))  # provisioner patch\n')
    text = text.replace(old_memory, '        self.memory = None if container_def.get("memory") is None else str(container_def.get("memory"))  # provisioner patch\n', 1)
    path.write_text(text)
elif "provisioner patch" not in text:
    raise SystemExit("moto's ECS Container model changed; review localstack/start-moto.sh")
PY

say "starting moto on 127.0.0.1:$PORT"
nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$LOG_DIR/moto.log" 2>&1 &
for _ in $(seq 60); do
  if curl -fsS -o /dev/null "$probe" 2>/dev/null; then
    keep_tasks_running
    say "ready: AWS_ENDPOINT_URL=http://127.0.0.1:$PORT"
    exit 0
  fi
  sleep 0.5
done
say "moto did not become ready; see $LOG_DIR/moto.log"
tail -30 "$LOG_DIR/moto.log" >&2
exit 1
