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
    /// The claim's nonce, when a claim took it: the same claim sent again is the same
    /// reservation.
    pub nonce: Option<String>,
    /// Whether the taker heard it took the number: a claim whose every reply was lost
    /// left the worker not knowing (as if Redis had gone away right after it was applied).
    pub heard: bool,
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
                nonce: None,
                heard: true,
            });
    }

    /// `by`'s claim `nonce` took number `seq` of `request_id` now; `heard`: its reply
    /// reached the worker. The same claim again (its nonce) is the same reservation, heard
    /// once any of its replies was.
    pub fn claimed(&self, request_id: &str, seq: u64, by: &str, nonce: &str, heard: bool) {
        let at = self.clock.elapsed();
        let mut reservations = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        let again = reservations.iter_mut().find(|r| {
            r.request_id == request_id && r.seq == seq && r.nonce.as_deref() == Some(nonce)
        });
        match again {
            Some(first) => first.heard |= heard,
            None => reservations.push(Reservation {
                request_id: request_id.to_owned(),
                seq,
                by: by.to_owned(),
                at,
                nonce: Some(nonce.to_owned()),
                heard,
            }),
        }
    }

    /// The work of process `who` is frozen from now for `pause`. Its calls in flight
    /// still land meanwhile (a paused process stops at its next step boundary): a
    /// number one of them takes is taken by a process disrupted after taking it.
    pub fn paused(&self, who: &str, pause: Duration) {
        let at = self.clock.elapsed();
        self.disrupted_at(who, [at, at + pause]);
    }

    /// The work of process `who` was disrupted now.
    pub fn disrupted(&self, who: &str) {
        self.disrupted_at(who, [self.clock.elapsed()]);
    }

    fn disrupted_at(&self, who: &str, at: impl IntoIterator<Item = Duration>) {
        self.disruptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(who.to_owned())
            .or_default()
            .extend(at);
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
                if !r.heard {
                    return Some(format!(
                        "{} took it at {:?} and never heard so (the claim's replies were lost)",
                        r.by, r.at
                    ));
                }
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
