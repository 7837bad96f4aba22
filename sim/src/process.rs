//! One worker process of a run, as the outside world sees it: alive, paused (a zombie to
//! be: stopped by a GC pause, SIGSTOP or a hypervisor, its timers still counting), or
//! crashed. Every call the worker makes to the store, the broker or the cloud passes its
//! process's [`boundary`](Process::boundary) before it starts and after it answers, so a
//! crash can strike between any two steps that touch the world — before a call, or after
//! the call took effect and before the worker heard the answer — and a paused process
//! touches nothing until it resumes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    Alive,
    /// Stopped until this instant; its calls wait.
    Paused(Instant),
    Crashed,
}

/// A worker process (one incarnation of a worker slot).
#[derive(Debug)]
pub struct Process {
    /// `w<slot>.<incarnation>`: also the worker id it runs under.
    pub name: String,
    life: watch::Sender<Life>,
    /// Chance of a crash at each boundary while faults are on.
    crash_chance: f64,
    rng: Mutex<Rng>,
    /// Whether this run's faults are still being injected (shared by the run).
    faults_on: std::sync::Arc<AtomicBool>,
    /// Where the crash struck, for the history.
    crashed_at: Mutex<Option<String>>,
}

impl Process {
    pub fn new(
        name: String,
        crash_chance: f64,
        rng: Rng,
        faults_on: std::sync::Arc<AtomicBool>,
    ) -> Self {
        Process {
            name,
            life: watch::channel(Life::Alive).0,
            crash_chance,
            rng: Mutex::new(rng),
            faults_on,
            crashed_at: Mutex::new(None),
        }
    }

    pub fn life(&self) -> Life {
        *self.life.borrow()
    }

    pub fn is_crashed(&self) -> bool {
        self.life() == Life::Crashed
    }

    /// Where the process crashed, if it did at a boundary.
    pub fn crashed_at(&self) -> Option<String> {
        self.crashed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Crashes the process now: every call of it waits for ever from here on, and the
    /// supervisor drops its tasks.
    pub fn crash(&self, at: &str) {
        if self.is_crashed() {
            return;
        }
        *self.crashed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(at.to_owned());
        self.life.send_replace(Life::Crashed);
    }

    pub fn pause_until(&self, until: Instant) {
        if !self.is_crashed() {
            self.life.send_replace(Life::Paused(until));
        }
    }

    pub fn resume(&self) {
        if let Life::Paused(_) = self.life() {
            self.life.send_replace(Life::Alive);
        }
    }

    /// Resolves when the process has crashed.
    pub async fn crashed(&self) {
        let mut life = self.life.subscribe();
        let _ = life.wait_for(|l| *l == Life::Crashed).await;
    }

    /// A step boundary: waits while the process is paused, never returns once it has
    /// crashed, and may crash it here (`at` names the place).
    pub async fn boundary(&self, at: &str) {
        loop {
            match self.life() {
                Life::Crashed => return std::future::pending().await,
                Life::Paused(until) => {
                    let mut life = self.life.subscribe();
                    tokio::select! {
                        biased;
                        _ = life.wait_for(|l| !matches!(l, Life::Paused(_))) => {}
                        _ = tokio::time::sleep_until(until) => self.resume(),
                    }
                }
                Life::Alive => break,
            }
        }
        if self.crash_chance > 0.0
            && self.faults_on.load(Ordering::Relaxed)
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .chance(self.crash_chance)
        {
            self.crash(at);
            std::future::pending::<()>().await;
        }
    }
}
