//! `provisioner-sim`: runs seeds of the simulator and reports what the oracle found.
//!
//! ```sh
//! cargo run -p provisioner-sim --release -- --seeds 10000      # seeds 0..10000
//! cargo run -p provisioner-sim --release -- --seed 4242 --history   # replay one
//! cargo run -p provisioner-sim --release -- --random --budget 120  # random seeds for 2 min
//! ```
//!
//! Exits 1 when a seed breaks an invariant, printing the seed, the command that replays
//! it and the history that led there.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use provisioner_sim::run_seed;

#[derive(Debug, Parser)]
#[command(about = "Runs the worker runtime under seeded faults and judges every run")]
struct Args {
    /// Replay this one seed (with its history on failure, or always with --history).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Start the range at a random seed (printed, so the run can be repeated).
    #[arg(long)]
    random: bool,
    /// Stop after this many seconds of wall time, whatever is left of the range.
    #[arg(long)]
    budget: Option<u64>,
    /// Also replay the seeds kept in this file (one per line, `#` comments).
    #[arg(long)]
    kept: Option<std::path::PathBuf>,
    /// Print the history of the run (with --seed).
    #[arg(long)]
    history: bool,
    /// Run each seed twice and fail if the two histories differ.
    #[arg(long)]
    check_determinism: bool,
    /// Go on after a failing seed, printing one line per violation (for triage).
    #[arg(long)]
    keep_going: bool,
    /// On a failing seed, print its violations only, not its history.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        return replay(seed, args.history);
    }
    let mut seeds: Vec<u64> = Vec::new();
    if let Some(path) = &args.kept {
        match std::fs::read_to_string(path) {
            Ok(text) => seeds.extend(kept_seeds(&text)),
            Err(e) => {
                eprintln!("cannot read {}: {e}", path.display());
                return ExitCode::from(64);
            }
        }
    }
    let from = if args.random {
        let from = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
            % (1 << 48);
        println!("random range from seed {from}");
        from
    } else {
        args.from
    };
    seeds.extend(from..from.saturating_add(args.seeds));
    let started = Instant::now();
    let budget = args.budget.map(Duration::from_secs);
    let mut ran = 0u64;
    let mut failed = 0u64;
    let mut simulated = Duration::ZERO;
    let mut totals = provisioner_sim::oracle::Stats::default();
    for seed in seeds {
        if budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        let outcome = match std::panic::catch_unwind(|| run_seed(seed, args.check_determinism)) {
            Ok(outcome) => outcome,
            Err(_) => {
                eprintln!("seed {seed}: the simulator panicked");
                eprintln!(
                    "replay: cargo run -p provisioner-sim --release -- --seed {seed} --history"
                );
                return ExitCode::FAILURE;
            }
        };
        if args.check_determinism {
            let again = run_seed(seed, true);
            if again.history != outcome.history {
                eprintln!("seed {seed}: two runs of the seed differ");
                if let Some((i, (a, b))) = outcome
                    .history
                    .iter()
                    .zip(&again.history)
                    .enumerate()
                    .find(|(_, (a, b))| a != b)
                {
                    eprintln!("first difference at line {i}:\n  {a}\n  {b}");
                }
                return ExitCode::FAILURE;
            }
        }
        ran += 1;
        simulated += outcome.simulated;
        add(&mut totals, &outcome.verdict.stats);
        if !outcome.verdict.is_clean() {
            if args.keep_going {
                failed += 1;
                for violation in &outcome.verdict.violations {
                    println!("seed {seed}: {violation}");
                }
                continue;
            }
            if args.quiet {
                for violation in &outcome.verdict.violations {
                    println!("seed {seed}: {violation}");
                }
                println!("seed {seed} broke the promise");
            } else {
                report_failure(seed);
            }
            return ExitCode::FAILURE;
        }
    }
    let wall = started.elapsed();
    if failed > 0 {
        println!("{failed} of {ran} seeds broke the promise");
        return ExitCode::FAILURE;
    }
    println!(
        "{ran} seeds clean in {:.1} s ({:.1} seeds/s, {:.0} h simulated)",
        wall.as_secs_f64(),
        ran as f64 / wall.as_secs_f64().max(1e-9),
        simulated.as_secs_f64() / 3600.0
    );
    println!("{totals}");
    ExitCode::SUCCESS
}

fn add(totals: &mut provisioner_sim::oracle::Stats, stats: &provisioner_sim::oracle::Stats) {
    totals.messages += stats.messages;
    totals.requests += stats.requests;
    totals.events += stats.events;
    totals.instances += stats.instances;
    totals.cloud_calls += stats.cloud_calls;
    totals.crashes += stats.crashes;
    totals.throttled += stats.throttled;
    totals.excused += stats.excused;
    totals.flagged += stats.flagged;
    for (kind, n) in &stats.outcomes {
        *totals.outcomes.entry(kind.clone()).or_default() += n;
    }
    for (kind, n) in &stats.faults {
        *totals.faults.entry(kind).or_default() += n;
    }
}

/// Seeds from a kept-seeds file: the first word of each line that is not a comment.
fn kept_seeds(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
}

/// Runs a failing seed again with its history and prints everything.
fn report_failure(seed: u64) {
    let outcome = run_seed(seed, true);
    for line in &outcome.history {
        println!("{line}");
    }
    println!("\nseed {seed} broke the promise:");
    for violation in &outcome.verdict.violations {
        println!("  - {violation}");
    }
    println!("run: {}", outcome.verdict.stats);
    println!("replay: cargo run -p provisioner-sim --release -- --seed {seed} --history");
}

fn replay(seed: u64, history: bool) -> ExitCode {
    let outcome = run_seed(seed, true);
    if history || !outcome.verdict.is_clean() {
        for line in &outcome.history {
            println!("{line}");
        }
    }
    println!("seed {seed}: {}", outcome.verdict.stats);
    if outcome.verdict.is_clean() {
        println!("clean");
        ExitCode::SUCCESS
    } else {
        for violation in &outcome.verdict.violations {
            println!("  - {violation}");
        }
        ExitCode::FAILURE
    }
}
