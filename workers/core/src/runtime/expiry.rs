//! Tearing resources down when they expire. A provision with `ttl_seconds` or
//! `expires_at` schedules its expiry in the store when it ends `running`; every worker of
//! the platform looks for due expiries now and then, and the store hands each to exactly
//! one of them. The taker publishes an ordinary teardown request (request id
//! `<id>#expired`, `cause` saying why), so the teardown goes through the queue like any
//! other: retried, fenced, serialized with the provision, and reported on the status
//! topic. An expiry whose provision a teardown already tombstoned is only forgotten. Only
//! once the broker confirmed the teardown is the expiry forgotten; a taker that dies
//! before leaves it to come due again, and the teardown's fixed request id makes a second
//! copy of it a duplicate, not a second teardown.

use std::time::Duration;

use provisioner_events::{
    Operation, PlatformName, Request, RequestId, SCHEMA_VERSION, State, TeardownTarget,
    request_routing_key,
};
use tracing::{debug, error, info, warn};

use super::Worker;
use crate::{BrokerError, StoreError};

/// Expiries taken per round.
const BATCH: usize = 32;

/// How long a taken expiry waits before another worker may take it again: time enough to
/// publish one confirmed message.
pub const EXPIRY_RETRY: Duration = Duration::from_secs(60);

/// The request id of the teardown sent when `request_id`'s resource expires: readable
/// when it fits in a request id, a digest of it otherwise.
pub fn expiry_teardown_id(request_id: &str) -> String {
    expiry_teardown_id_of(request_id, 1)
}

/// How many teardowns an expiry sends, one after another failed, before it gives up.
const EXPIRY_TEARDOWNS: u32 = 5;

/// The request id of the expiry's `generation`th teardown (the next after one that
/// ended in error): `<id>#expired`, then `<id>#expired-2`…
fn expiry_teardown_id_of(request_id: &str, generation: u32) -> String {
    let purpose = match generation {
        1 => "expired".to_owned(),
        n => format!("expired-{n}"),
    };
    crate::names::follow_up_request_id(request_id, &purpose)
}

/// What an expiry does next.
enum Next {
    Send(String),
    Wait,
    GiveUp,
}

/// Whether a teardown's record says it removed its target.
fn ended_stopped(record: Option<&crate::store::RequestRecord>) -> bool {
    record
        .and_then(|r| r.result.as_ref())
        .is_some_and(|end| end.state == State::Stopped && end.error.is_none())
}

/// A teardown of the provision `target` as a request, for what depends on the request
/// alone (the buckets a teardown draws on).
pub(super) fn teardown_request(platform: PlatformName, target: &RequestId) -> Request {
    Request {
        schema_version: SCHEMA_VERSION,
        request_id: target.clone(),
        operation: Operation::Teardown,
        platform,
        spec: None,
        target_request_id: Some(target.clone()),
        resource_id: None,
        labels: Default::default(),
        deadline: None,
        tenant: None,
        dry_run: false,
        ttl_seconds: None,
        expires_at: None,
        cause: None,
        count: None,
        min_count: None,
        on_partial: None,
        fleet_member: None,
    }
}

impl Worker {
    /// Publishes a teardown of `target` that the workers send on their own (an expiry,
    /// the reconciler), with a fixed request id and a `cause` its status events repeat.
    pub(super) async fn send_teardown(
        &self,
        teardown_id: &str,
        target: &TeardownTarget,
        cause: String,
        tenant: Option<String>,
    ) -> Result<(), BrokerError> {
        let platform = self.platform.name();
        let mut teardown = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "request_id": teardown_id,
            "operation": "teardown",
            "platform": platform.as_str(),
            "cause": cause,
        });
        match target {
            TeardownTarget::Request(id) => teardown["target_request_id"] = id.as_str().into(),
            TeardownTarget::Resource(id) => teardown["resource_id"] = id.as_str().into(),
        }
        if let Some(tenant) = tenant {
            teardown["tenant"] = tenant.into();
        }
        self.publish_derived(
            &request_routing_key(platform, Operation::Teardown),
            teardown_id,
            teardown.to_string().as_bytes(),
        )
        .await
    }

    /// Publishes a request this worker derived, signed with the deployment's first key
    /// when it signs: a Lambda worker, which cannot tell the exchange a message came
    /// through, verifies every request, derived ones included.
    pub(super) async fn publish_derived(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let mut headers = std::collections::BTreeMap::new();
        if let Some(keys) = &self.config.signing {
            headers.insert(
                crate::signing::SIGNATURE_HEADER.to_owned(),
                keys.sign(routing_key, body),
            );
        }
        self.broker
            .publish_derived_request(routing_key, request_id, body, &headers)
            .await
    }

    /// Looks for due expiries every `every`, for as long as the worker runs.
    pub(super) async fn expire_forever(&self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.expire_once().await {
                debug!(error = %e, "could not look for expired resources");
            }
        }
    }

    /// One round: sends the teardown of every resource of this platform whose time is up.
    /// Returns how many it sent.
    pub async fn expire_once(&self) -> Result<usize, StoreError> {
        let platform = self.platform.name();
        // The unpublished ends too: a worker with no reaper still has them published.
        self.publish_pending_ends().await?;
        let due = self
            .store
            .take_due_expiries(platform.as_str(), BATCH, EXPIRY_RETRY)
            .await?;
        let mut sent = 0;
        for (request_id, due_at) in due {
            let forget = || async {
                if let Err(e) = self
                    .store
                    .cancel_expiry(platform.as_str(), &request_id)
                    .await
                {
                    // It comes due again, and finds what it finds then.
                    debug!(error = %e, "could not forget an expiry");
                }
            };
            let record = self.store.get(&request_id).await?;
            // A teardown in charge (it tombstoned the provision): once it removed the
            // resource the expiry is done; while it works the expiry waits (it comes due
            // again); should it fail, it lifts its tombstone and the expiry goes on.
            if let Some(by) = record.as_ref().and_then(|r| r.torn_down_by.clone()) {
                let teardown = self.store.get(&by).await?;
                let gone = record.as_ref().is_some_and(|r| r.state == State::Stopped);
                if gone || ended_stopped(teardown.as_ref()) {
                    info!(request.id = %request_id, %by, "expired, and torn down");
                    forget().await;
                    continue;
                }
                // One at work is waited for; one that failed (it lifts its tombstone) or
                // whose record is gone is followed by the expiry's own.
                if teardown.is_some_and(|t| t.result.is_none()) {
                    debug!(request.id = %request_id, %by, "expired while a teardown works on it; looking again later");
                    continue;
                }
            }
            // Only provisions' ids are scheduled; anything else was not written by us.
            let Ok(target) = RequestId::new(request_id.as_str()).map(TeardownTarget::Request)
            else {
                warn!(entry = %request_id, "an expiry that names no request; dropped");
                forget().await;
                continue;
            };
            // The expiry's teardown, or the next one when it ended without removing the
            // resource now there: in error (its tombstone lifted), or before a run of the
            // provision its record forgot (a store that lost it). Each is one request,
            // sent again only while it has no record (a copy already queued is answered
            // from the record the first makes); one at work is waited for.
            let mut next = Next::GiveUp;
            for generation in 1..=EXPIRY_TEARDOWNS {
                let id = expiry_teardown_id_of(&request_id, generation);
                match self.store.get(&id).await? {
                    None => {
                        next = Next::Send(id);
                        break;
                    }
                    Some(teardown) if teardown.result.is_none() => {
                        next = Next::Wait;
                        break;
                    }
                    Some(_) => continue,
                }
            }
            let teardown_id = match next {
                Next::Send(id) => id,
                Next::Wait => continue,
                Next::GiveUp => {
                    error!(request.id = %request_id, teardowns = EXPIRY_TEARDOWNS, "every teardown of an expired resource ended without removing it; it is left as it is, see their events");
                    forget().await;
                    continue;
                }
            };
            // The provision's tenant, so the teardown is accounted to the same one.
            let tenant = record.and_then(|r| r.result).and_then(|event| event.tenant);
            let cause = format!(
                "expired: {request_id} reached its ttl_seconds or expires_at, and is torn down"
            );
            match self
                .send_teardown(&teardown_id, &target, cause, tenant)
                .await
            {
                // The expiry stays scheduled (a while later) until the teardown removed
                // the resource: its end forgets it.
                Ok(()) => {
                    info!(request.id = %request_id, teardown = %teardown_id, late_ms = self.env.now().duration_since(due_at).unwrap_or_default().as_millis() as u64, "expired; teardown sent");
                    sent += 1;
                }
                Err(e) => warn!(
                    request.id = %request_id,
                    error = %e,
                    retry_in_s = EXPIRY_RETRY.as_secs(),
                    "could not send the teardown of an expired resource; it is tried again"
                ),
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::expiry_teardown_id;
    use provisioner_events::RequestId;

    #[test]
    fn the_expiry_teardown_id_is_a_valid_request_id_for_every_length() {
        for length in [1, 60, 120, 121, 128] {
            let id = "a".repeat(length);
            let teardown = expiry_teardown_id(&id);
            assert!(RequestId::new(teardown.as_str()).is_ok(), "{teardown}");
            assert_ne!(teardown, id);
        }
        assert_eq!(expiry_teardown_id("batch-42"), "batch-42#expired");
        assert_eq!(expiry_teardown_id("batch-7#3"), "batch-7#3.expired");
        assert_ne!(
            expiry_teardown_id(&"a".repeat(128)),
            expiry_teardown_id(&"b".repeat(128)),
            "a digest of the id, not a truncation"
        );
    }

    /// A teardown the worker sends on its own is signed with the deployment's first
    /// key, over the routing key it is published with: the Lambda form, which cannot
    /// tell it from a producer's, verifies it like any other.
    #[tokio::test]
    async fn a_derived_request_is_signed_in_a_signing_deployment() {
        use std::sync::Arc;

        use async_trait::async_trait;
        use futures_util::StreamExt;
        use provisioner_events::{PlatformName, Request, Resource, TeardownTarget};

        use crate::broker::{Broker, MemoryBroker};
        use crate::platform::{Platform, PlatformError};
        use crate::runtime::{Worker, WorkerConfig};
        use crate::signing::SigningKeys;
        use crate::store::MemoryStore;

        struct Nothing;
        #[async_trait]
        impl Platform for Nothing {
            fn name(&self) -> PlatformName {
                PlatformName::Process
            }
            fn validate(&self, _: &Request) -> Result<(), PlatformError> {
                Ok(())
            }
            async fn provision(&self, _: &Request) -> Result<Resource, PlatformError> {
                Err(PlatformError::invalid("not in this test"))
            }
            async fn teardown(
                &self,
                _: &TeardownTarget,
            ) -> Result<Option<Resource>, PlatformError> {
                Ok(None)
            }
        }

        let keys = Arc::new(
            SigningKeys::parse(
                "k1=a-secret-of-at-least-thirty-two-bytes!!",
                std::time::Duration::from_secs(60),
            )
            .expect("keys"),
        );
        let broker = MemoryBroker::new();
        let worker = Worker::new(
            Arc::new(Nothing),
            Arc::new(MemoryStore::new()),
            Arc::new(broker.clone()),
            WorkerConfig {
                signing: Some(keys.clone()),
                ..WorkerConfig::default()
            },
        );
        worker
            .send_teardown(
                "batch-42#expired",
                &TeardownTarget::Request(RequestId::new("batch-42").expect("an id")),
                "expired".into(),
                None,
            )
            .await
            .expect("sent");
        let delivery = broker
            .consume(PlatformName::Process, 1)
            .await
            .expect("consume")
            .next()
            .await
            .expect("a message")
            .expect("a delivery");
        assert!(!delivery.from_producers, "a worker's own message");
        let verified = keys
            .verify(
                delivery.signature.as_deref(),
                &delivery.routing_key,
                &delivery.body,
                std::time::SystemTime::now(),
            )
            .expect("verified");
        assert_eq!(verified.stale, None);
    }
}
