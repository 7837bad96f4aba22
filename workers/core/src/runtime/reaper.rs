//! Ending records abandoned long ago: a request in progress whose lease ended long ago
//! and that no worker came back to has lost its message (a broker that kept no copy, a
//! queue purged by hand). Left alone it would stay "in progress" for ever and whatever it
//! had made would run unaccounted for. Every worker of a platform looks for its
//! platform's such records now and then; the store lets exactly one take each over. The
//! taker removes what the request may have made and ends it in `error`, saying why.

use std::time::Duration;

use provisioner_events::{
    ErrorClass, ErrorInfo, Operation, RequestId, SCHEMA_VERSION, State, StatusEvent,
};
use tracing::{debug, info, warn};

use super::Worker;
use super::lease::Heartbeat;

/// Stops the reaper when the worker stops.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records looked at per round.
const BATCH: usize = 16;

/// The store's schedule of recorded ends not yet known to be published
/// ([`crate::store::ends_outbox`]), for `platform`.
pub fn ends_outbox(platform: provisioner_events::PlatformName) -> String {
    crate::store::ends_outbox(platform.as_str())
}

impl Worker {
    /// Looks for abandoned records every so often (a quarter of `idle`, between 1 s and
    /// a minute), for as long as the worker runs.
    pub(super) async fn reap_forever(&self, idle: Duration) {
        let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.reap_once(idle).await {
                debug!(error = %e, "could not look for abandoned requests");
            }
        }
    }

    /// One round: ends every record of this platform idle for longer than `idle`.
    /// Returns how many it ended.
    pub async fn reap_once(&self, idle: Duration) -> Result<usize, crate::StoreError> {
        let platform = self.platform.name();
        self.publish_pending_ends().await?;
        let stale = self.store.stale(platform.as_str(), idle, BATCH).await?;
        let mut ended = 0;
        for id in stale {
            let nonce = self.env.nonce();
            let reaped_from = tokio::time::Instant::now();
            let Some(reaped) = self
                .store
                .reap(&id, idle, &self.config.worker_id, &nonce, self.config.lease)
                .await?
            else {
                continue;
            };
            // The lease is kept while what it made is removed (paced, and waiting for the
            // platform to settle): a lease run out meanwhile would let a second reaper in.
            let heartbeat = Heartbeat::start(
                self.store.clone(),
                id.clone(),
                reaped.fence.clone(),
                None,
                self.config.lease,
                reaped_from,
                false,
            );
            let operation = reaped
                .routing_key
                .split_once('.')
                .and_then(|(_, op)| serde_json::from_value(serde_json::json!(op)).ok());
            let removal = match (operation, RequestId::new(id.as_str())) {
                (Some(Operation::Provision), Ok(request_id)) => {
                    format!("; {}", self.remove_made_for(&request_id).await)
                }
                _ => String::new(),
            };
            let event = StatusEvent {
                schema_version: SCHEMA_VERSION,
                request_id: id.clone(),
                operation,
                platform: platform.to_string(),
                state: State::Error,
                seq: reaped.seq,
                attempt: reaped.attempts,
                timestamp: self.env.now_utc(),
                resource: None,
                error: Some(ErrorInfo {
                    class: ErrorClass::Internal,
                    message: format!(
                        "abandoned: no worker came back to this request for over {} s after its last attempt, so its message is gone (a broker that lost it, or a queue purged){removal}. Publish it again under a new request_id",
                        idle.as_secs()
                    ),
                }),
                tenant: None,
                rejected_message: None,
                cause: None,
                fleet: None,
            };
            // What the end frees goes first (a place given back twice is given back
            // once). The end goes on the outbox as it is recorded: no message of this
            // request will come again to publish it, so a reaper that dies between
            // recording and publishing leaves it to the housekeeping.
            if operation == Some(Operation::Provision) && self.release_quota_of(&id).await.is_err()
            {
                // Still abandoned: a later round ends it.
                continue;
            }
            let outbox = ends_outbox(platform);
            let stored = self.store.complete(&id, &reaped.fence, &event).await;
            drop(heartbeat);
            if let Err(e) = stored {
                warn!(request.id = %id, error = %e, "could not end an abandoned request");
                continue;
            }
            info!(request.id = %id, "ended an abandoned request");
            self.metrics
                .request_ended(operation, State::Error, Some(ErrorClass::Internal));
            match self.broker.publish_status(&event).await {
                Ok(()) => {
                    if let Err(e) = self.store.cancel_expiry(&outbox, &id).await {
                        debug!(error = %e, "could not take a published end off the outbox");
                    }
                }
                Err(e) => {
                    warn!(request.id = %id, error = %e, "could not publish the end of an abandoned request; the next round does")
                }
            }
            ended += 1;
        }
        Ok(ended)
    }

    /// What a recorded end frees, from the end and its record alone (the outbox has no
    /// message): a provision that ended in error gives its quota place back; a teardown
    /// that stopped a target it recorded (`acts_on`, a teardown by resource id) forgets
    /// the target's expiry and quota place. (A teardown by request id names its target
    /// only in its message; the message, when it comes again, gives those back.)
    async fn free_what_an_end_frees(
        &self,
        end: &StatusEvent,
        acts_on: Option<&str>,
    ) -> Result<(), crate::StoreError> {
        match (end.operation, end.state) {
            (Some(Operation::Provision), State::Error) => {
                self.release_quota_of(end.request_id.as_str()).await
            }
            (Some(Operation::Teardown), State::Stopped) if end.error.is_none() => match acts_on {
                Some(target) => {
                    self.forget_torn_down(self.platform.name().as_str(), target)
                        .await
                }
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Publishes the recorded ends on the outbox: those a reaper recorded and could not
    /// publish (or died before it did), and those a worker could not publish. One
    /// published twice is the same event twice, which consumers take once (by its
    /// `seq`).
    pub(super) async fn publish_pending_ends(&self) -> Result<(), crate::StoreError> {
        let outbox = ends_outbox(self.platform.name());
        let due = self
            .store
            .take_due_expiries(&outbox, BATCH, super::EXPIRY_RETRY)
            .await?;
        for (id, _) in due {
            let record = self.store.get(&id).await?;
            let acts_on = record.as_ref().and_then(|r| r.acts_on.clone());
            let end = record.and_then(|r| r.result);
            // Its worker may have died before it gave back what the end frees, and its
            // message may be lost: give it back here, before the end goes out (both are
            // idempotent). A failure leaves it on the outbox for the next round.
            if let Some(end) = &end
                && let Err(e) = self.free_what_an_end_frees(end, acts_on.as_deref()).await
            {
                debug!(request.id = %id, error = %e, "could not give back what an unpublished end frees; the next round does");
                continue;
            }
            let published = match &end {
                Some(end) => self.broker.publish_status(end).await.is_ok(),
                // No end (its record since expired, or was lost): nothing to publish.
                None => true,
            };
            if published && let Err(e) = self.store.cancel_expiry(&outbox, &id).await {
                debug!(error = %e, "could not take a published end off the outbox");
            }
        }
        Ok(())
    }
}
