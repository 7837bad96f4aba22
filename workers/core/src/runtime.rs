//! The consume loop and the life of one delivery.
//!
//! Per delivery: decode and validate → claim in the store → publish `starting` (or
//! `stopping`) → call the platform, renewing the lease meanwhile → record the terminal
//! event in the store (fenced) → publish it → settle. Bad input is rejected (an `error`
//! event and a dead letter) before anything is claimed; a failure is retried later or ends
//! the request as [`policy::decide`] says; a panic gives the delivery back.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use provisioner_events::{
    ErrorClass, ErrorInfo, Operation, Request, Resource, SCHEMA_VERSION, State, StatusEvent,
    TeardownTarget, decode_request,
};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::broker::{Broker, BrokerError, Delivery, Settlement};
use crate::platform::{Platform, PlatformError};
use crate::policy::{self, Decision, RetryPolicy};
use crate::store::{Claim, ClaimRequest, StateStore, StoreError};

/// How a worker behaves; read once at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names this worker in leases and logs; unique per process.
    pub worker_id: String,
    /// Deliveries in flight at once (the broker's prefetch).
    pub prefetch: u16,
    /// How long a claim lasts without renewal; a crashed worker's requests are taken over
    /// after this. Renewed every third of it while the platform works.
    pub lease: Duration,
    pub retry: RetryPolicy,
    /// How long to keep retrying an unavailable state store in process before giving the
    /// delivery back for a delayed retry.
    pub store_retry_budget: Duration,
    /// On shutdown, how long in-flight deliveries may take to finish.
    pub shutdown_grace: Duration,
    /// A cap on one platform call, whatever the platform's own timeouts.
    pub operation_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            prefetch: 16,
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            store_retry_budget: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// What a platform call ended with: the resource, and the state to report when it is
/// not the operation's usual one (a `describe` reports the state it found).
#[derive(Debug)]
struct Outcome {
    resource: Option<Resource>,
    state: Option<State>,
}

impl Outcome {
    fn of(resource: Resource) -> Self {
        Outcome {
            resource: Some(resource),
            state: None,
        }
    }

    fn nothing() -> Self {
        Outcome {
            resource: None,
            state: None,
        }
    }
}

/// Why handling a delivery stopped before it settled on its own terms.
#[derive(Debug, thiserror::Error)]
enum Abort {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A worker for one platform: dependencies passed in, nothing global.
pub struct Worker {
    platform: Arc<dyn Platform>,
    store: Arc<dyn StateStore>,
    broker: Arc<dyn Broker>,
    config: WorkerConfig,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("platform", &self.platform.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Stops the lease heartbeat however handling ends, a panic included: a heartbeat that
/// outlived its delivery would hold the lease forever and block every takeover.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(10);

impl Worker {
    pub fn new(
        platform: Arc<dyn Platform>,
        store: Arc<dyn StateStore>,
        broker: Arc<dyn Broker>,
        config: WorkerConfig,
    ) -> Self {
        Worker {
            platform,
            store,
            broker,
            config,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Consumes until `shutdown` resolves, reconnecting whenever the broker goes away.
    /// On shutdown: stop taking deliveries, give in-flight ones the grace period, leave the
    /// rest unacknowledged for the broker to deliver again.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let platform = self.platform.name();
        let permits = Arc::new(Semaphore::new(usize::from(self.config.prefetch.max(1))));
        let mut in_flight = JoinSet::new();
        let mut reconnect_delay = Duration::from_millis(200);
        tokio::pin!(shutdown);
        'connection: loop {
            let consumed = async {
                self.broker.declare(platform).await?;
                self.broker.consume(platform, self.config.prefetch).await
            };
            let mut deliveries = tokio::select! {
                _ = &mut shutdown => break 'connection,
                consumed = consumed => match consumed {
                    Ok(deliveries) => deliveries,
                    Err(e) => {
                        warn!(error = %e, retry_in_ms = reconnect_delay.as_millis() as u64, "cannot consume; retrying");
                        tokio::select! {
                            _ = &mut shutdown => break 'connection,
                            _ = tokio::time::sleep(reconnect_delay) => {}
                        }
                        reconnect_delay = (reconnect_delay * 2).min(RECONNECT_DELAY_MAX);
                        continue 'connection;
                    }
                },
            };
            info!(%platform, worker = %self.config.worker_id, "consuming");
            loop {
                while in_flight.try_join_next().is_some() {}
                let next = tokio::select! {
                    _ = &mut shutdown => break 'connection,
                    next = deliveries.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => {
                        reconnect_delay = Duration::from_millis(200);
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            break 'connection;
                        };
                        let worker = self.clone();
                        in_flight.spawn(async move {
                            worker.handle(delivery).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "lost the broker; reconnecting");
                        break;
                    }
                    None => {
                        warn!("the broker ended the consumer; reconnecting");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = &mut shutdown => break 'connection,
                _ = tokio::time::sleep(reconnect_delay) => {}
            }
            reconnect_delay = (reconnect_delay * 2).min(RECONNECT_DELAY_MAX);
        }
        info!(
            in_flight = in_flight.len(),
            grace_s = self.config.shutdown_grace.as_secs(),
            "shutting down"
        );
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                abandoned = in_flight.len(),
                "grace period over; unfinished deliveries go back to the queue"
            );
            in_flight.abort_all();
        }
    }

    /// Handles one delivery to the end, settling it. Never panics: a panic in a platform
    /// gives the delivery back to the broker (bounded by the queue's delivery limit).
    pub async fn handle(&self, delivery: Delivery) {
        let span = info_span!(
            "delivery",
            platform = %self.platform.name(),
            request.id = tracing::field::Empty,
            attempt = delivery.attempt,
            redelivered = delivery.redelivered,
        );
        async {
            let settlement = match AssertUnwindSafe(self.process(&delivery))
                .catch_unwind()
                .await
            {
                Ok(settlement) => settlement,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    error!(panic = %what, "handling panicked; giving the delivery back");
                    Settlement::Requeue
                }
            };
            debug!(?settlement, "settling");
            if let Err(e) = delivery.settle(settlement).await {
                warn!(error = %e, "could not settle; the broker will deliver it again");
            }
        }
        .instrument(span)
        .await
    }

    async fn process(&self, delivery: &Delivery) -> Settlement {
        let request = match decode_request(&delivery.body) {
            Ok(request) => request,
            Err(e) => {
                if let Some(id) = &e.request_id {
                    tracing::Span::current().record("request.id", id.as_str());
                }
                return self
                    .reject(
                        e.request_id.as_deref(),
                        e.platform.as_deref(),
                        e.operation,
                        ErrorClass::InvalidRequest,
                        e.message,
                        delivery.attempt,
                    )
                    .await;
            }
        };
        tracing::Span::current().record("request.id", request.request_id.as_str());
        let own = self.platform.name();
        let refusal = if request.platform != own {
            Some(PlatformError::invalid(format!(
                "this {own} worker received a request for platform {}; publish it with routing key {}",
                request.platform,
                request.routing_key()
            )))
        } else {
            self.platform.validate(&request).err()
        };
        if let Some(refusal) = refusal {
            return self
                .reject(
                    Some(request.request_id.as_str()),
                    Some(request.platform.as_str()),
                    Some(request.operation),
                    refusal.class,
                    refusal.message,
                    delivery.attempt,
                )
                .await;
        }
        match self.run_request(&request, delivery.attempt).await {
            Ok(settlement) => settlement,
            Err(Abort::Broker(e)) => {
                warn!(error = %e, "cannot publish status; giving the delivery back");
                Settlement::Requeue
            }
            Err(Abort::Store(e)) => {
                // Unreachable past the budget, or it lost our record: claim again later.
                warn!(error = %e, "state store trouble; retrying later");
                Settlement::Retry {
                    delay: self.config.retry.base_delay.max(Duration::from_secs(2)),
                    attempt: delivery.attempt,
                }
            }
        }
    }

    /// Refuses a message that is not a valid request for this worker: an `error` event
    /// (when the producer's id could be read) and a dead letter with the reason.
    async fn reject(
        &self,
        request_id: Option<&str>,
        platform: Option<&str>,
        operation: Option<Operation>,
        class: ErrorClass,
        message: String,
        attempt: u32,
    ) -> Settlement {
        warn!(error.class = %class, error.message = %message, "rejected");
        if let Some(request_id) = request_id {
            let event = StatusEvent {
                schema_version: SCHEMA_VERSION,
                request_id: request_id.to_owned(),
                operation,
                platform: platform
                    .filter(|p| {
                        !p.is_empty()
                            && p.len() <= 64
                            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    })
                    .unwrap_or("unknown")
                    .to_owned(),
                state: State::Error,
                seq: 0,
                attempt,
                timestamp: OffsetDateTime::now_utc(),
                resource: None,
                error: Some(ErrorInfo {
                    class,
                    message: message.clone(),
                }),
                tenant: None,
            };
            if let Err(e) = self.broker.publish_status(&event).await {
                warn!(error = %e, "cannot publish the rejection; giving the delivery back");
                return Settlement::Requeue;
            }
        }
        Settlement::DeadLetter {
            class,
            reason: message,
        }
    }

    fn event(
        &self,
        request: &Request,
        state: State,
        seq: u64,
        attempt: u32,
        resource: Option<Resource>,
        error: Option<ErrorInfo>,
    ) -> StatusEvent {
        StatusEvent {
            schema_version: SCHEMA_VERSION,
            request_id: request.request_id.to_string(),
            operation: Some(request.operation),
            platform: request.platform.to_string(),
            state,
            seq,
            attempt,
            timestamp: OffsetDateTime::now_utc(),
            resource,
            error,
            tenant: request.tenant.clone(),
        }
    }

    /// Calls the store, retrying in process while it is unreachable, within the budget.
    async fn store_call<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let give_up = tokio::time::Instant::now() + self.config.store_retry_budget;
        let mut pause = Duration::from_millis(100);
        loop {
            match call().await {
                Err(e) if e.is_unavailable() && tokio::time::Instant::now() + pause < give_up => {
                    debug!(error = %e, "state store unavailable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    async fn run_request(&self, request: &Request, attempt: u32) -> Result<Settlement, Abort> {
        let (working_state, done_state) = match request.operation {
            _ if request.dry_run => (State::NotStarted, State::Checked),
            Operation::Provision | Operation::Start | Operation::Reboot => {
                (State::Starting, State::Running)
            }
            Operation::Teardown | Operation::Stop => (State::Stopping, State::Stopped),
            Operation::Describe => (State::NotStarted, State::Running),
        };
        if let Some(wait) = self.target_in_progress(request).await? {
            debug!(
                wait_ms = wait.as_millis() as u64,
                "the target is still being provisioned; waiting for it"
            );
            return Ok(Settlement::Retry {
                delay: wait,
                attempt,
            });
        }
        let payload_hash = request.payload_hash();
        let id = request.request_id.as_str();
        let claim = self
            .store_call(|| {
                self.store.claim(ClaimRequest {
                    request_id: id,
                    payload_hash: &payload_hash,
                    owner: &self.config.worker_id,
                    lease: self.config.lease,
                    working_state,
                })
            })
            .await?;
        let fence = match claim {
            Claim::Claimed {
                fence, takeover, ..
            } => {
                if takeover {
                    info!(
                        fence,
                        "claimed again after an earlier attempt or a lost holder"
                    );
                }
                fence
            }
            Claim::Done(event) => {
                debug!(state = %event.state, "already finished; publishing its result again");
                self.broker.publish_status(&event).await?;
                return Ok(Settlement::Ack);
            }
            Claim::Held { remaining, owner } => {
                debug!(%owner, remaining_ms = remaining.as_millis() as u64, "held by another worker; looking again later");
                return Ok(Settlement::Retry {
                    delay: remaining.max(Duration::from_millis(500)) + Duration::from_millis(250),
                    attempt,
                });
            }
            Claim::Conflict => {
                let message = format!(
                    "request_id {id} was already used for a different request; nothing was done. Use a new request_id for a new request"
                );
                let mut event = self.event(request, State::Error, 0, attempt, None, None);
                event.error = Some(ErrorInfo {
                    class: ErrorClass::Conflict,
                    message: message.clone(),
                });
                warn!("{message}");
                self.broker.publish_status(&event).await?;
                return Ok(Settlement::DeadLetter {
                    class: ErrorClass::Conflict,
                    reason: message,
                });
            }
        };

        let (lease_lost_tx, mut lease_lost) = watch::channel(false);
        let _heartbeat = {
            let store = self.store.clone();
            let lease = self.config.lease;
            let id = id.to_owned();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match store.renew(&id, fence, lease).await {
                        Ok(()) => {}
                        Err(StoreError::Fenced(_)) => {
                            let _ = lease_lost_tx.send(true);
                            return;
                        }
                        Err(e) => debug!(error = %e, "lease renewal failed; trying again"),
                    }
                }
            }))
        };
        let outcome = async {
            let seq = self.store_call(|| self.store.next_seq(id, fence)).await?;
            self.broker
                .publish_status(&self.event(request, working_state, seq, attempt, None, None))
                .await?;
            let work = self.call_platform(request);
            let result = tokio::select! {
                result = work => Some(result),
                _ = lease_lost.wait_for(|lost| *lost) => None,
            };
            let Some(result) = result else {
                warn!("lost the lease while working; the new holder finishes the request");
                return Ok(Settlement::Ack);
            };
            self.finish(request, fence, attempt, done_state, result)
                .await
        }
        .await;
        drop(_heartbeat);
        if matches!(outcome, Err(Abort::Broker(_))) {
            // Let the redelivery claim at once instead of waiting out our lease.
            let _ = self.store.release(id, fence).await;
        }
        match outcome {
            Err(Abort::Store(StoreError::Fenced(_))) => {
                warn!("fenced off: another worker took the request over and finishes it");
                Ok(Settlement::Ack)
            }
            other => other,
        }
    }

    /// A request acting on another request's resource (teardown) waits while that one
    /// is being worked on: torn down mid-provision, the provision would make the resource
    /// again right after, and it would leak.
    async fn target_in_progress(&self, request: &Request) -> Result<Option<Duration>, Abort> {
        if request.operation == Operation::Provision {
            return Ok(None);
        }
        let Ok(TeardownTarget::Request(target)) = request.target() else {
            return Ok(None);
        };
        let record = self.store_call(|| self.store.get(target.as_str())).await?;
        Ok(record
            .filter(|record| record.result.is_none())
            .and_then(|record| record.lease_remaining)
            .map(|remaining| {
                remaining.max(Duration::from_millis(500)) + Duration::from_millis(250)
            }))
    }

    async fn call_platform(&self, request: &Request) -> Result<Outcome, PlatformError> {
        if let Some(deadline) = request.deadline
            && OffsetDateTime::now_utc() >= deadline
        {
            return Err(PlatformError::permanent(
                ErrorClass::Timeout,
                "the request's deadline passed before it could be carried out; nothing was done",
            ));
        }
        let target = || request.target().map_err(PlatformError::invalid);
        let call = async {
            if request.dry_run {
                return self
                    .platform
                    .check(request)
                    .await
                    .map(|()| Outcome::nothing());
            }
            match request.operation {
                Operation::Provision => self.platform.provision(request).await.map(Outcome::of),
                Operation::Teardown => {
                    self.platform
                        .teardown(&target()?)
                        .await
                        .map(|gone| Outcome {
                            resource: gone,
                            state: None,
                        })
                }
                Operation::Start => self.platform.start(&target()?).await.map(Outcome::of),
                Operation::Stop => self.platform.stop(&target()?).await.map(Outcome::of),
                Operation::Reboot => self.platform.reboot(&target()?).await.map(Outcome::of),
                // Nothing there is an answer too: nothing runs.
                Operation::Describe => Ok(match self.platform.describe(&target()?).await? {
                    Some(found) => Outcome {
                        state: Some(found.state),
                        resource: Some(found.resource),
                    },
                    None => Outcome {
                        state: Some(State::Stopped),
                        resource: None,
                    },
                }),
            }
        };
        match tokio::time::timeout(self.config.operation_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(PlatformError::retryable(
                ErrorClass::Timeout,
                format!(
                    "the platform call took longer than {} s",
                    self.config.operation_timeout.as_secs()
                ),
            )),
        }
    }

    /// Turns the platform's result into the request's next step: the terminal event
    /// (stored, then published) or a delayed retry.
    async fn finish(
        &self,
        request: &Request,
        fence: u64,
        attempt: u32,
        done_state: State,
        result: Result<Outcome, PlatformError>,
    ) -> Result<Settlement, Abort> {
        let id = request.request_id.as_str();
        let (state, resource, error) = match result {
            Ok(outcome) => (outcome.state.unwrap_or(done_state), outcome.resource, None),
            Err(failure) => {
                let decision = policy::decide(
                    &failure,
                    attempt,
                    &self.config.retry,
                    OffsetDateTime::now_utc(),
                    request.deadline,
                    rand::random::<f64>(),
                );
                match decision {
                    Decision::Retry { delay } => {
                        info!(error = %failure, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                        let _ = self.store.release(id, fence).await;
                        return Ok(Settlement::Retry {
                            delay,
                            attempt: attempt + 1,
                        });
                    }
                    Decision::Fail(info) => (State::Error, None, Some(info)),
                }
            }
        };
        let seq = self.store_call(|| self.store.next_seq(id, fence)).await?;
        let event = self.event(request, state, seq, attempt, resource, error);
        self.store_call(|| self.store.complete(id, fence, &event))
            .await?;
        match &event.error {
            Some(error) => {
                warn!(error.class = %error.class, error.message = %error.message, "failed")
            }
            None => info!(state = %event.state, "done"),
        }
        self.broker.publish_status(&event).await?;
        // Keep the target's record telling the truth about its resource.
        if request.operation != Operation::Provision
            && request.operation != Operation::Describe
            && !request.dry_run
            && event.error.is_none()
            && let Ok(TeardownTarget::Request(target)) = request.target()
            && let Err(e) = self
                .store
                .mark_resource_state(target.as_str(), event.state)
                .await
        {
            debug!(error = %e, "could not record the target's new state");
        }
        Ok(Settlement::Ack)
    }
}
