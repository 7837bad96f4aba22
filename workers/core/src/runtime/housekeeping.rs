//! Housekeeping for workers that do not run for ever. A daemon worker keeps its house
//! with background tasks ([`Worker::run`]: the reaper, the expiry sweep, the optional
//! reconciler, the fleet coordinators). The Lambda form runs only while an invocation
//! lasts, so a scheduled invocation does the same in one round: ends abandoned records,
//! sends the teardowns of what expired, takes the reconciler's turn when one is set and
//! due, and coordinates the fleets that need it until its time is up, handing any fleet
//! still growing back to the schedule for the next round. Several rounds at once (or
//! daemon workers beside them) are safe: the store hands each due expiry, abandoned
//! record and fleet to exactly one taker, and the reconciler's turn to one worker.

use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Worker;

/// Rounds of one sweep at most: each takes a batch, and a batch that found nothing ends
/// the sweep sooner.
const MAX_ROUNDS: usize = 64;

/// What one round of housekeeping did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Housekeeping {
    /// Abandoned records ended in `error` (see the reaper).
    pub reaped: usize,
    /// Teardowns sent for resources whose time was up.
    pub expired: usize,
    /// Fleets coordinated (to their end, or until the round's time was up).
    pub fleets: usize,
    /// Teardowns the reconciler sent; `None` when it did not run (not set, or another
    /// worker's turn).
    pub reconciled: Option<usize>,
    /// What could not be done, in words. Each part goes on without the others; what was
    /// left comes due again for the next round.
    pub errors: Vec<String>,
}

impl Worker {
    /// One round of the background work of a daemon worker, ending by `until`.
    pub async fn keep_house(self: &Arc<Self>, until: Instant) -> Housekeeping {
        let mut done = Housekeeping::default();
        let time_left = || Instant::now() < until;
        if self.config.expire_every.is_some() {
            for _ in 0..MAX_ROUNDS {
                match self.expire_once().await {
                    Ok(0) => break,
                    Ok(sent) => done.expired += sent,
                    Err(e) => {
                        done.errors
                            .push(format!("looking for expired resources: {e}"));
                        break;
                    }
                }
                if !time_left() {
                    break;
                }
            }
        }
        if let Some(idle) = self.config.reap_after.filter(|_| time_left()) {
            for _ in 0..MAX_ROUNDS {
                match self.reap_once(idle).await {
                    Ok(0) => break,
                    Ok(ended) => done.reaped += ended,
                    Err(e) => {
                        done.errors
                            .push(format!("looking for abandoned requests: {e}"));
                        break;
                    }
                }
                if !time_left() {
                    break;
                }
            }
        }
        if let Some((every, options)) = &self.config.reconcile {
            // A run needs its second look and the time to send what it decided.
            let needs = options.second_look_after + std::time::Duration::from_secs(10);
            if Instant::now() + needs < until {
                match self.take_reconcile_turn(*every, options).await {
                    Ok(true) => match self.reconcile(options).await {
                        Ok(decisions) => {
                            done.reconciled = Some(
                                decisions
                                    .iter()
                                    .filter(|d| d.verdict == super::Verdict::Removed)
                                    .count(),
                            );
                        }
                        Err(e) => done.errors.push(format!("reconciling: {e}")),
                    },
                    Ok(false) => {}
                    Err(e) => done
                        .errors
                        .push(format!("taking the reconciler's turn: {e}")),
                }
            }
        }
        if time_left() {
            done.fleets = self.coordinate_fleets_until(until).await;
        }
        if done.errors.is_empty() {
            info!(
                reaped = done.reaped,
                expired = done.expired,
                fleets = done.fleets,
                reconciled = ?done.reconciled,
                "housekeeping done"
            );
        } else {
            warn!(errors = ?done.errors, "housekeeping done, in part");
        }
        done
    }
}
