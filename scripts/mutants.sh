#!/usr/bin/env bash
# The oracle's power, measured: applies each hand-made mutation of sim/mutations.txt (a
# broken rule of the runtime or the store) to a copy of the tree, builds the simulator
# on it, and runs the kept seeds and seeds 0..MUTANT_SEEDS (default 3000) until one
# breaks an invariant. A mutation is killed when a seed does; the report says which
# seed, and the figure goes into the README ("The simulator"). About a minute a
# mutation on 2 cores (one build of the core and the simulator each), and its first
# run builds their dependencies into "$CARGO_TARGET_DIR/mutants" (about 4 minutes).
# A seed's history moves when the code does, so a kept seed may stop killing the
# mutation it was kept for: MUTANT_PROFILE=release with a larger MUTANT_SEEDS searches
# further (about 250 seeds a second), and the seed it reports is the one to keep.
#
#   scripts/mutants.sh [NAME...]     all mutations, or only these
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seeds=${MUTANT_SEEDS:-3000}
profile=${MUTANT_PROFILE:-debug}
profile_flag=(); [ "$profile" = release ] && profile_flag=(--release)
base=${CARGO_TARGET_DIR:-$root/target}
export CARGO_TARGET_DIR="$base/mutants"
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-1}
tree=${MUTANT_TREE:-${TMPDIR:-/tmp}/provisioner-mutants}
mkdir -p "$tree"
# The tree as it is now (uncommitted changes included), without builds or history.
tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$tree" -xf -

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <(python3 scripts/mutate.py list sim/mutations.txt)
fi
killed=0; survived=0; stale=0; report=""
for name in "${names[@]}"; do
  # Start from the tree as it is, then break one rule.
  file=$(awk -v n="=== $name" '$0==n{f=1;next} f&&/^file: /{print $2; exit}' sim/mutations.txt)
  cp "$root/$file" "$tree/$file"
  if ! python3 scripts/mutate.py apply sim/mutations.txt "$name" "$tree"; then
    stale=$((stale + 1)); report+="stale     $name"$'\n'; continue
  fi
  if ! cargo build -q "${profile_flag[@]}" -p provisioner-sim --manifest-path "$tree/Cargo.toml" 2>"$tree/build.log"; then
    cat "$tree/build.log" >&2
    echo "$name: does not build" >&2; exit 1
  fi
  out=$("$CARGO_TARGET_DIR/$profile/provisioner-sim" --kept "$tree/sim/seeds.txt" --seeds "$seeds" --quiet || true)
  seed=$(grep -oE '^seed [0-9]+ broke the promise' <<<"$out" | awk '{print $2}' || true)
  if [ -n "$seed" ]; then
    killed=$((killed + 1))
    why=$(grep -E "^seed $seed: " <<<"$out" | head -1 | cut -c1-160)
    report+="killed    $name by seed $seed: ${why#seed $seed: }"$'\n'
  else
    survived=$((survived + 1)); report+="SURVIVED  $name"$'\n'
  fi
  cp "$root/$file" "$tree/$file"
done
printf '%s' "$report"
echo "mutations: $killed killed, $survived survived, $stale stale of ${#names[@]} (seeds: kept + 0..$seeds)"
[ "$survived" -eq 0 ]
