//! The simulator: the real worker runtime — [`Worker`](provisioner_core::Worker) with its
//! claims, leases, tombstones, fleets, expiries, quotas, rate limits, reconciler and
//! reaper — several workers at once, over a broker and a state store with RabbitMQ's and
//! Redis's semantics and a simulated cloud, on one thread and virtual time, under faults
//! a seed draws, judged by an oracle. One seed is one exact history: run it again and
//! the same things happen in the same order.
//!
//! The layout:
//!
//! - [`run`]: one run — the world a seed draws, the workers' supervision (crash,
//!   restart, drain), the producers and the operator, settling, then the oracle;
//! - [`config`]: the drawn configuration and fault rates; [`workload`]: the drawn
//!   requests; [`faults`]: the timed faults;
//! - [`broker`], [`store`], [`cloud`] (with [`platform`], the cloud's worker): the world
//!   the workers act on, each with its faults; [`process`]: a worker process's life and
//!   the step boundaries where a crash strikes;
//! - [`oracle`]: the invariants, and [`witness`], what it must know of a run; [`clock`], [`rng`], [`history`]: virtual time, seeded
//!   draws and the record of a run.

pub mod broker;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod faults;
pub mod history;
pub mod oracle;
pub mod platform;
pub mod process;
pub mod rng;
pub mod run;
pub mod store;
pub mod witness;
pub mod workload;

pub use run::{Outcome, run_seed};
