//! What the oracle must know of a run besides its outcome: which worker process took
//! which status number (`seq`) of which request, and when each process's work was
//! disrupted (a crash, a freeze, a dropped connection, a store or broker call that
//! failed). A request's numbers run 1, 2, 3… without a gap, except where the process that
//! took a number was disrupted before it could send that number's event: then the
//! number is skipped (the contract says so), and only then.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provisioner_events::StatusEvent;

use crate::clock::Clock;

fn key_of(event: &StatusEvent) -> String {
    serde_json::to_string(event).unwrap_or_default()
}

/// A status number taken by a worker process.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub request_id: String,
    pub seq: u64,
    pub by: String,
    pub at: Duration,
}

#[derive(Debug)]
pub struct Witness {
    clock: Arc<Clock>,
    reservations: Mutex<Vec<Reservation>>,
    disruptions: Mutex<BTreeMap<String, Vec<Duration>>>,
    /// When each terminal event was recorded, by the event (its JSON).
    recorded: Mutex<BTreeMap<String, Duration>>,
}

impl Witness {
    pub fn new(clock: Arc<Clock>) -> Arc<Self> {
        Arc::new(Witness {
            clock,
            reservations: Mutex::new(Vec::new()),
            disruptions: Mutex::new(BTreeMap::new()),
            recorded: Mutex::new(BTreeMap::new()),
        })
    }

    /// A terminal event was recorded in the store now.
    pub fn ended(&self, event: &StatusEvent) {
        let at = self.clock.elapsed();
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key_of(event))
            .or_insert(at);
    }

    /// When a terminal event was recorded.
    pub fn recorded(&self, event: &StatusEvent) -> Option<Duration> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key_of(event))
            .copied()
    }

    /// `by` took number `seq` of `request_id` now.
    pub fn reserved(&self, request_id: &str, seq: u64, by: &str) {
        let at = self.clock.elapsed();
        self.reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Reservation {
                request_id: request_id.to_owned(),
                seq,
                by: by.to_owned(),
                at,
            });
    }

    /// The work of process `who` was disrupted now.
    pub fn disrupted(&self, who: &str) {
        let at = self.clock.elapsed();
        self.disruptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(who.to_owned())
            .or_default()
            .push(at);
    }

    /// Why number `seq` of `request_id` may be missing: the process that took it was
    /// disrupted after taking it. `None` when nothing explains the gap.
    pub fn explains_gap(&self, request_id: &str, seq: u64) -> Option<String> {
        let reservations = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        let disruptions = self.disruptions.lock().unwrap_or_else(|e| e.into_inner());
        reservations
            .iter()
            .filter(|r| r.request_id == request_id && r.seq == seq)
            .find_map(|r| {
                disruptions
                    .get(&r.by)
                    .and_then(|times| times.iter().find(|t| **t >= r.at))
                    .map(|t| format!("{} took it at {:?} and was disrupted at {t:?}", r.by, r.at))
            })
    }

    /// Who took number `seq` of `request_id`, for a report.
    pub fn takers(&self, request_id: &str, seq: u64) -> Vec<Reservation> {
        self.reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r.request_id == request_id && r.seq == seq)
            .cloned()
            .collect()
    }
}
