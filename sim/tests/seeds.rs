//! The simulator in the test suite: every kept seed (`sim/seeds.txt`, each a history that
//! once broke the promise) replays clean, and so does a fixed range of seeds. A failure
//! prints the command that replays the seed with its history.

use provisioner_sim::run_seed;

/// Seeds every `cargo test` runs, past the kept ones; `.ci/run` runs far more (see
/// `scripts/sim.sh`).
const FIXED_RANGE: std::ops::Range<u64> = 0..150;

fn kept_seeds() -> Vec<(u64, String)> {
    let text = include_str!("../seeds.txt");
    text.lines()
        .filter_map(|line| {
            let (seed, why) = line.split_once('#').unwrap_or((line, ""));
            let seed: u64 = seed.trim().parse().ok()?;
            Some((seed, why.trim().to_owned()))
        })
        .collect()
}

fn check(seed: u64, why: &str) {
    let outcome = run_seed(seed, false);
    assert!(
        outcome.verdict.is_clean(),
        "seed {seed} ({why}) breaks the promise:\n  {}\nreplay: cargo run -p provisioner-sim --release -- --seed {seed} --history",
        outcome.verdict.violations.join("\n  ")
    );
}

#[test]
fn every_kept_seed_replays_clean() {
    let kept = kept_seeds();
    assert!(!kept.is_empty(), "sim/seeds.txt lists no seed");
    for (seed, why) in kept {
        check(seed, &why);
    }
}

#[test]
fn a_fixed_range_of_seeds_runs_clean() {
    for seed in FIXED_RANGE {
        check(seed, "fixed range");
    }
}

#[test]
fn a_seed_is_one_history() {
    for seed in [3, 41, 977] {
        let first = run_seed(seed, true);
        let again = run_seed(seed, true);
        assert!(!first.history.is_empty());
        assert_eq!(
            first.history, again.history,
            "seed {seed} ran two different histories"
        );
    }
}
