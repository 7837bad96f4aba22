#!/usr/bin/env bash
# Fuzzes the wire contract for a bounded time: every cargo-fuzz target in fuzz/, starting
# from its committed corpus (fuzz/corpus/<target>), FUZZ_SECONDS each (default 60).
# Installs cargo-fuzz when missing. libFuzzer runs without a sanitizer (the code under
# test is safe Rust: a panic is the failure looked for), which works on a stable
# toolchain; a crash leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-60}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
# cargo-fuzz asks for flags only nightly allows unless the compiler is told otherwise.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/fuzz}
for target in $(cargo fuzz list); do
  # Work on a copy, so new inputs found in CI do not change the checkout.
  corpus=$(mktemp -d)
  cp -r "corpus/$target/." "$corpus/"
  echo "[fuzz] $target for ${seconds}s from $(ls "corpus/$target" | wc -l) committed inputs" >&2
  cargo fuzz run --sanitizer none "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len=300000 -timeout=10 -print_final_stats=1
  rm -rf "$corpus"
done
