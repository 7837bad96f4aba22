#!/usr/bin/env bash
# Installs (pinned) and starts moto's server on the host for the ECS API, when it is not
# already answering: LocalStack's community edition has no ECS any more, moto serves it.
# Starts a second one that enforces IAM, for the workers' tests to run as a user holding
# exactly the documented policy. Idempotent.
#   MOTO_VENV      where the virtualenv lives (default ~/.cache/provisioner-moto)
#   MOTO_PORT      port on 127.0.0.1 (default 5000): any credentials are accepted
#   MOTO_IAM_PORT  port of the one that enforces IAM (default 5001); the credentials of
#                  its administrator, who makes the tests' users, are written to
#                  $SERVICES_LOG_DIR/moto-iam-<port>-admin.json
set -euo pipefail

VENV=${MOTO_VENV:-$HOME/.cache/provisioner-moto}
PORT=${MOTO_PORT:-5000}
IAM_PORT=${MOTO_IAM_PORT:-5001}
LOG_DIR=${SERVICES_LOG_DIR:-/tmp/provisioner-services}
mkdir -p "$LOG_DIR"
# moto answers its own dashboard path without credentials; ECS needs a signed call.
probe="http://127.0.0.1:$PORT/moto-api/"

say() { printf '[moto] %s\n' "$*" >&2; }

# moto moves an ECS task one step towards STOPPED each time it is described (a simulation
# meant for waiters); real tasks stay RUNNING until stopped. Make moto's tasks do that.
keep_tasks_running() {
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$1/moto-api/state-manager/set-transition" \
    -d '{"model_name":"ecs::task","transition":{"progression":"manual","times":1000000}}'
}

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

# moto refuses a call its IAM policies do not allow with `AccessDenied` in an XML body,
# for every service; EC2 answers `UnauthorizedOperation` (HTTP 403, the EC2 error format)
# and ECS `AccessDeniedException` (HTTP 400, JSON), which is what the workers classify.
# Answer as those two do, once per install.
"$VENV/bin/python" - <<'PY'
import pathlib, moto.iam.access_control as m
path = pathlib.Path(m.__file__)
text = path.read_text()
old = """    def _raise_access_denied(self) -> None:
        raise AccessDeniedError(user_arn=self._access_key.arn, action=self._action)
"""
new = """    def _raise_access_denied(self) -> None:  # provisioner patch: the services' own codes
        from moto.core.exceptions import JsonRESTError, _RESTError
        from xmltodict import unparse
        message = f"User: {self._access_key.arn} is not authorized to perform: {self._action}"
        if self._service == "ec2":
            error = _RESTError("UnauthorizedOperation", "You are not authorized to perform this operation. " + message)
            error.description = unparse({"Response": {"Errors": {"Error": {"Code": "UnauthorizedOperation", "Message": error.message}}, "RequestID": "00000000-0000-0000-0000-000000000000"}}, full_document=True)
            error.code = 403
            raise error
        if self._service == "ecs":
            error = JsonRESTError("AccessDeniedException", message)
            error.code = 400
            raise error
        raise AccessDeniedError(user_arn=self._access_key.arn, action=self._action)
"""
if old in text:
    text = text.replace(old, new, 1)
elif "provisioner patch: the services' own codes" not in text:
    raise SystemExit("moto's IAM access control changed; review localstack/start-moto.sh")
# Conditions as IAM evaluates them: a key the request does not carry matches nothing, so
# the condition is false, except for the negated operators, `...IfExists` and
# `Null: true` (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html);
# moto takes it as met. And a statement whose condition is false does not apply, which
# for an Allow means it grants nothing (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html);
# moto counts it as an explicit deny.
old_absent = """            if not condition.verify_condition(actual_values):
                return False
"""
new_absent = """            if not actual_values:  # provisioner patch: an absent key matches nothing
                operator = condition._condition
                expected = condition._expected_value
                if operator.endswith("IfExists") or "Not" in operator or (
                        operator == "Null" and str(expected[0]).lower() == "true"):
                    continue
                return False
            if not condition.verify_condition(actual_values):
                return False
"""
old_unmet = """            if not self._check_conditions(incoming_condition_values):
                return PermissionResult.DENIED
"""
new_unmet = """            if not self._check_conditions(incoming_condition_values):
                return PermissionResult.NEUTRAL  # provisioner patch: not met, not applied
"""
for before, after, mark in ((old_absent, new_absent, "an absent key matches nothing"),
                            (old_unmet, new_unmet, "not met, not applied")):
    if before in text:
        text = text.replace(before, after, 1)
    elif mark not in text:
        raise SystemExit("moto's IAM conditions changed; review localstack/start-moto.sh")
path.write_text(text)
PY

# Starts moto on port $1 unless it answers already; waits until it does.
start() {
  local port=$1 log="$LOG_DIR/moto-$1.log"
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
    keep_tasks_running "$port"
    return 0
  fi
  say "starting moto on 127.0.0.1:$port"
  nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  for _ in $(seq 60); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null; then
      keep_tasks_running "$port"
      say "ready: AWS_ENDPOINT_URL=http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.5
  done
  say "moto did not become ready on $port; see $log"
  tail -30 "$log" >&2
  exit 1
}

start "$PORT"
start "$IAM_PORT"

# The IAM-enforcing moto. moto checks every call against the caller's IAM policies once
# INITIAL_NO_AUTH_ACTION_COUNT calls have been made (unset: never), and its
# /moto-api/reset-auth sets that count. With enforcement off, make an administrator and
# keep its key; then turn enforcement on (count 0), so any other key is refused. Done
# again whenever the kept key does not work or an unknown key is not refused (a restarted
# moto, a lost file).
ADMIN_FILE="$LOG_DIR/moto-iam-$IAM_PORT-admin.json"
"$VENV/bin/python" - "$IAM_PORT" "$ADMIN_FILE" <<'PY'
import json, sys, urllib.request
import boto3, botocore.exceptions

port, admin_file = sys.argv[1], sys.argv[2]
endpoint = f"http://127.0.0.1:{port}"

def iam(key, secret):
    return boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret)

def refused(client):
    try:
        client.list_users()
        return False
    except botocore.exceptions.ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 403)

def enforce(count):
    urllib.request.urlopen(urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=str(count).encode(), method="POST",
        headers={"Content-Type": "text/plain"})).read()

try:
    admin = json.load(open(admin_file))
    ready = not refused(iam(admin["access_key_id"], admin["secret_access_key"])) \
        and refused(iam("AKIAUNKNOWNUNKNOWN00", "unknown"))
except (OSError, ValueError, KeyError):
    ready = False
if not ready:
    enforce("inf")
    client = iam("test", "test")
    try:
        client.create_user(UserName="provisioner-test-admin")
    except client.exceptions.EntityAlreadyExistsException:
        pass
    client.put_user_policy(UserName="provisioner-test-admin", PolicyName="everything",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = client.create_access_key(UserName="provisioner-test-admin")["AccessKey"]
    with open(admin_file, "w") as out:
        json.dump({"access_key_id": key["AccessKeyId"],
                   "secret_access_key": key["SecretAccessKey"]}, out)
    enforce(0)
    if not refused(iam("AKIAUNKNOWNUNKNOWN00", "unknown")):
        sys.exit("moto on port %s does not enforce IAM after reset-auth" % port)
    print(f"[moto] IAM enforced on {endpoint}; its administrator's key is in {admin_file}",
          file=sys.stderr)
PY
