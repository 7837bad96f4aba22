//! The history of a run: what was published, which faults struck, what the workers asked
//! the store, the broker and the cloud, and what they answered, in virtual time. Kept
//! only when asked for (`--history`, or the replay of a failing seed): a run is
//! deterministic, so the replay writes the very history the failing run had.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::clock::Clock;

#[derive(Debug)]
pub struct History {
    clock: Arc<Clock>,
    lines: Option<Mutex<Vec<String>>>,
}

impl History {
    pub fn new(clock: Arc<Clock>, keep: bool) -> Arc<Self> {
        Arc::new(History {
            clock,
            lines: keep.then(|| Mutex::new(Vec::new())),
        })
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Notes what `who` did; `what` is only formatted when the history is kept.
    pub fn note(&self, who: &str, what: impl FnOnce() -> String) {
        if let Some(lines) = &self.lines {
            let at = self.clock.elapsed();
            let mut line = String::new();
            let _ = write!(line, "{:>9.3}s {who:<8} {}", at.as_secs_f64(), what());
            lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .as_ref()
            .map(|lines| lines.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }
}
