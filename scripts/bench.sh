#!/usr/bin/env bash
# Benchmarks, one command: starts the services when missing (RabbitMQ, Redis, Podman, and
# LocalStack for the Lambda's cold start and the EC2 fleet), then prints the worker
# runtime's throughput, latency, CPU per request and memory, each beside the raw broker
# measured in the same run, the Lambda function's cold start and size, and fleets' spin-up
# beside the cloud's bucket limit and the platform's API called directly. A release build: the first one
# compiles the Lambda's AWS SDKs, which takes several minutes on 2 cores.
# BENCH_SHORT=1 is the quick mode CI runs; BENCH_REQUESTS, BENCH_ROUNDS, BENCH_BACKLOG,
# BENCH_LATENCY_SECONDS and BENCH_COLD_STARTS change the sizes (workers/core/benches/
# runtime.rs, lambda/benches/cold_start.rs), BENCH_FLEET, BENCH_EC2_FLEET and
# BENCH_DOCKER_FLEET the fleets' (workers/core/benches/fleet.rs, cli/benches/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-services.sh
# An empty account: LocalStack's calls slow down with every instance it holds.
bash localstack/start.sh --fresh
cargo bench --workspace --locked --bench runtime --bench cold_start --bench fleet \
  --bench ec2_fleet --bench docker_fleet
