//! Housekeeping for workers that do not run for ever. A daemon worker keeps its house
//! with background tasks ([`Worker::run`]: the reaper, the expiry sweep, the optional
//! reconciler, the fleet coordinators). The Lambda form runs only while an invocation
//! lasts, so a scheduled invocation does the same in one round: ends abandoned records,
//! sends the teardowns of what expired, takes the reconciler's turn when one is set and
//! due, and coordinates the fleets that need it until its time is up, handing any fleet
//! still growing back to the schedule for the next round. Several rounds at once (or
//! daemon workers beside them) are safe: the store hands each due expiry, abandoned
//! record and fleet to exactly one taker, and the reconciler's turn to one worker.
//!
//! Every part is cut off at the round's end: work left half done (a record being reaped,
//! a reconciliation) comes due again, as after a crash.

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
    /// Fleets taken from the schedule to coordinate (to their end, or until the round's
    /// time was up).
    pub fleets: usize,
    /// Teardowns the reconciler sent; `None` when it did not run (not set, or another
    /// worker's turn).
    pub reconciled: Option<usize>,
    /// What could not be done, in words. Each part goes on without the others; what was
    /// left comes due again for the next round.
    pub errors: Vec<String>,
}

/// Runs `round` (one batch, answering how many it handled) until a batch handles none,
/// `MAX_ROUNDS` passed or `until` comes, adding up what they handled.
async fn sweep<F, Fut, E>(
    until: Instant,
    what: &str,
    errors: &mut Vec<String>,
    mut round: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, E>>,
    E: std::fmt::Display,
{
    let mut handled = 0;
    for _ in 0..MAX_ROUNDS {
        match tokio::time::timeout_at(until, round()).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => handled += n,
            Ok(Err(e)) => {
                errors.push(format!("{what}: {e}"));
                break;
            }
            Err(_) => {
                errors.push(format!("{what}: out of time; the rest comes due again"));
                break;
            }
        }
    }
    handled
}

impl Worker {
    /// One round of the background work of a daemon worker, ending by `until`.
    pub async fn keep_house(self: &Arc<Self>, until: Instant) -> Housekeeping {
        let mut done = Housekeeping::default();
        if self.config.expire_every.is_some() {
            done.expired = sweep(until, "sending expiries", &mut done.errors, || {
                self.expire_once()
            })
            .await;
        }
        if let Some(idle) = self.config.reap_after {
            done.reaped = sweep(until, "ending abandoned requests", &mut done.errors, || {
                self.reap_once(idle)
            })
            .await;
        }
        // A run needs its second look and the time to send what it decided; one cut
        // short would hold the turn with nothing done.
        let reconcile = self.config.reconcile.as_ref().filter(|(_, options)| {
            Instant::now() + options.second_look_after + std::time::Duration::from_secs(10) < until
        });
        if let Some((every, options)) = reconcile {
            match tokio::time::timeout_at(until, self.reconcile_in_turn(*every, options)).await {
                Ok(Ok(removed)) => done.reconciled = removed,
                Ok(Err(e)) => done.errors.push(format!("reconciling: {e}")),
                Err(_) => done
                    .errors
                    .push("reconciling: out of time; the next turn looks again".into()),
            }
        }
        if Instant::now() < until {
            let (fleets, error) = self.coordinate_fleets_until(until).await;
            done.fleets = fleets;
            done.errors.extend(error);
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
