#!/usr/bin/env bash
# The long fault scenarios and the fuzzers, after the main suite (`.ci/run` calls both):
# duplicate storms through three workers, each request published 1 to 5 times — on the
# Kubernetes API server of the tests (STORM_REQUESTS, default 10000), real containers on
# Podman (STORM_DOCKER_REQUESTS, 500) and instances on LocalStack (STORM_EC2_REQUESTS,
# 200); RabbitMQ restarted with 1,000 requests in flight; a flood of hostile messages
# (HOSTILE_MESSAGES, default 100000); the benchmarks in their quick mode; then every fuzz
# target for FUZZ_SECONDS (default 60) from its committed corpus. Services start as for
# scripts/test.sh, which runs the scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."

# The main suite left thousands of instances on LocalStack, whose every call then costs
# more (the EC2 storm took 116 s on a fresh one and 1036 s on a day-old one): start from
# an empty account.
bash localstack/start.sh --fresh
export STORM_REQUESTS=${STORM_REQUESTS:-10000}
export HOSTILE_MESSAGES=${HOSTILE_MESSAGES:-100000}
bash scripts/test.sh --test long_faults -- --ignored --test-threads=1 --nocapture
bash scripts/test.sh --test fleet -- --ignored --test-threads=1
# The benchmarks' quick mode, in the test build: it proves they still run (their figures
# come from scripts/bench.sh's release build).
BENCH_SHORT=1 bash scripts/test.sh --bench runtime --bench cold_start --bench fleet \
  --bench ec2_fleet --bench docker_fleet
bash scripts/fuzz.sh
