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

/// Stops the reaper when the worker stops.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records looked at per round.
const BATCH: usize = 16;

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
        let stale = self.store.stale(platform.as_str(), idle, BATCH).await?;
        let mut ended = 0;
        for id in stale {
            let nonce = self.env.nonce();
            let Some(reaped) = self
                .store
                .reap(&id, idle, &self.config.worker_id, &nonce, self.config.lease)
                .await?
            else {
                continue;
            };
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
            if let Err(e) = self.store.complete(&id, &reaped.fence, &event).await {
                warn!(request.id = %id, error = %e, "could not end an abandoned request");
                continue;
            }
            info!(request.id = %id, "ended an abandoned request");
            self.metrics
                .request_ended(operation, State::Error, Some(ErrorClass::Internal));
            if operation == Some(Operation::Provision) {
                self.release_quota_of(&id).await;
            }
            if let Err(e) = self.broker.publish_status(&event).await {
                warn!(request.id = %id, error = %e, "could not publish the end of an abandoned request; it is recorded");
            }
            ended += 1;
        }
        Ok(ended)
    }
}
