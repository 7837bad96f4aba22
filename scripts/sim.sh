#!/usr/bin/env bash
# The simulator (docs/simulator.md) as CI runs it, after the test suite: the kept seeds,
# seeds 0..SIM_SEEDS (default 2000), then random seeds for SIM_BUDGET seconds (default
# 120), in a debug build. A failing seed prints its history and the command that
# replays it, and fails the run.
#
#   scripts/sim.sh            the CI run
#   scripts/sim.sh --long     kept seeds and 0..SIM_SEEDS (default 100000), release build
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--long" ]; then
  exec cargo run -q -p provisioner-sim --release --locked -- \
    --kept sim/seeds.txt --seeds "${SIM_SEEDS:-100000}"
fi
cargo run -q -p provisioner-sim --locked -- --kept sim/seeds.txt --seeds "${SIM_SEEDS:-2000}"
cargo run -q -p provisioner-sim --locked -- --random --seeds 1000000000 --budget "${SIM_BUDGET:-120}"
