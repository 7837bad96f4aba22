#!/usr/bin/env bash
# Benchmarks, one command: starts the services when missing, then prints the worker
# runtime's throughput as a ratio against the raw broker measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-services.sh
cargo bench -p provisioner-core --bench throughput --locked
