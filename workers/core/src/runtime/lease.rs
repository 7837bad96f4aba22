//! The lease heartbeat of one attempt: renews the claim (and the actor lease on a target)
//! every third of the lease, and tells the attempt to stop when it must.
//!
//! The lease is kept by a local deadline as well as by the store's answer: a renewal
//! that does not come back before the lease would end — Redis unreachable, slow or
//! partitioned away — stops the work, because by then another worker may take the request
//! over. The deadline counts from before the claim was sent, and stops a margin early, so
//! this worker gives up no later than the store lets the lease go.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::store::{Actor, Fence, Renewal, StateStore, StoreError};

/// What the heartbeat knows of the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LeaseSignal {
    /// Ours.
    Held,
    /// Ours, but a teardown (this request id) tombstoned the request: stop and end.
    Cancelled { by: String },
    /// Another worker holds it now: stop; it finishes the request.
    Fenced,
    /// Not renewed in time (or the record is gone): stop; the request comes round again.
    Expired,
}

/// A running heartbeat; stopped when dropped, a panic included — a heartbeat that
/// outlived its attempt would hold the lease forever and block every takeover.
pub(super) struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    signal: watch::Receiver<LeaseSignal>,
}

/// Waits for the signal to stop.
pub(super) struct SignalWatch(watch::Receiver<LeaseSignal>);

impl SignalWatch {
    /// Resolves when the work must stop, with why.
    pub(super) async fn lost(&mut self) -> LeaseSignal {
        let changed = self
            .0
            .wait_for(|s| *s != LeaseSignal::Held)
            .await
            .map(|signal| signal.clone());
        match changed {
            Ok(signal) => signal,
            Err(_) => std::future::pending().await,
        }
    }
}

/// Pause between renewals that failed for want of an answer.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

impl Heartbeat {
    /// Starts renewing `request_id`'s lease, held since no later than `claimed_before`.
    /// `acting_on` names a target whose actor lease is renewed too; `cancellable` says
    /// whether a tombstone stops the work (provisions only).
    pub(super) fn start(
        store: std::sync::Arc<dyn StateStore>,
        request_id: String,
        fence: Fence,
        acting_on: Option<String>,
        lease: Duration,
        claimed_before: Instant,
        cancellable: bool,
    ) -> Self {
        let (sender, signal) = watch::channel(LeaseSignal::Held);
        let margin = (lease / 10).max(Duration::from_millis(100));
        let task = tokio::spawn(async move {
            // The latest instant this worker may still count the lease as its own.
            let mut valid_until = claimed_before + lease;
            // A third of the lease after the claim, or at once when that is past (the
            // steps before took long): waiting a third from now could let it run out.
            let mut next = claimed_before + lease / 3;
            loop {
                let stop_at = valid_until.checked_sub(margin).unwrap_or(valid_until);
                tokio::time::sleep_until(next.min(stop_at)).await;
                let sent = Instant::now();
                if sent >= stop_at {
                    sender.send_replace(LeaseSignal::Expired);
                    return;
                }
                match tokio::time::timeout(stop_at - sent, store.renew(&request_id, &fence, lease))
                    .await
                {
                    Ok(Ok(renewal)) => {
                        valid_until = sent + lease;
                        next = sent + lease / 3;
                        if let Renewal::Cancelled { by } = renewal
                            && cancellable
                            && *sender.borrow() == LeaseSignal::Held
                        {
                            sender.send_replace(LeaseSignal::Cancelled { by });
                        }
                        if let Some(target) = &acting_on {
                            let actor = Actor {
                                request_id: &request_id,
                                nonce: &fence.nonce,
                            };
                            if let Err(e) = store.renew_act(target, actor, lease).await {
                                debug!(error = %e, "could not renew the actor lease on the target");
                            }
                        }
                    }
                    Ok(Err(StoreError::Fenced(_))) => {
                        sender.send_replace(LeaseSignal::Fenced);
                        return;
                    }
                    Ok(Err(StoreError::Missing(_))) => {
                        sender.send_replace(LeaseSignal::Expired);
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "lease renewal failed; trying again");
                        next = Instant::now() + RETRY_PAUSE;
                    }
                    Err(_) => {
                        debug!("lease renewal unanswered; trying again");
                        next = Instant::now();
                    }
                }
            }
        });
        Heartbeat { task, signal }
    }

    pub(super) fn signal(&self) -> SignalWatch {
        SignalWatch(self.signal.clone())
    }

    /// Stops renewing; the last signal says whether a tombstone landed meanwhile.
    pub(super) fn stop(self) -> LeaseSignal {
        self.task.abort();
        self.signal.borrow().clone()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
