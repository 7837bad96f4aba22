//! The consume loop and the life of one delivery.
//!
//! Per delivery: decode and validate → claim in the store → publish `starting` (or
//! `stopping`) → call the platform, renewing the lease meanwhile → record the terminal
//! event in the store (fenced) → publish it, and wait for both events' confirms → settle.
//! The working event's confirm is not awaited before the platform call: nothing depends
//! on it until the terminal event, and two confirms awaited together cost one wait.
//! Bad input is rejected (an `error` event naming the refused message, and a dead
//! letter) before anything is claimed; a failure is retried later or ends the request as
//! [`policy::decide`] says.
//!
//! Every way a request can go round without ending is bounded by the worker itself, not
//! by the broker's delivery count: attempts (every claim, whatever ended the one before —
//! a failure, a crash, a panic, a lost lease) by `retry.max_attempts`, and parks without
//! an attempt (held by another worker, target busy, store or broker away) by
//! `max_waits`.
//!
//! The pieces: this file (configuration, the loop, rejections), [`attempt`] (one claimed
//! attempt from claim to settlement), [`lease`] (the heartbeat that keeps the lease and
//! stops the work when it cannot), [`reaper`] (ending records abandoned long ago),
//! [`housekeeping`] (the background work in one round, for workers that do not run for
//! ever: the Lambda form).
//!
//! Every `select!` here is `biased` (the branches are tried in the order written, the
//! one that must win first), and the wall clock and random draws come from the worker's
//! [`Environment`](crate::Environment): tokio would otherwise draw the order of ready
//! branches at random, and the simulator could not replay a seed's history exactly.

mod attempt;
mod ending;
mod expiry;
pub use expiry::{EXPIRY_RETRY, expiry_teardown_id};
mod fleet;
pub use fleet::fleet_schedule;
mod housekeeping;
pub use housekeeping::Housekeeping;
mod lease;
mod pacing;
mod platform_call;
mod reconcile;
pub use reconcile::{ReconcileDecision, ReconcileOptions, Verdict, reconcile_teardown_id};
mod reaper;
pub use reaper::ends_outbox;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use provisioner_events::{
    ErrorClass, ErrorInfo, Operation, RejectedMessage, Request, Resource, SCHEMA_VERSION, State,
    StatusEvent, TeardownTarget, decode_request,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::broker::{Broker, BrokerError, Delivery, Settlement};
use crate::platform::{Platform, PlatformError};
use crate::policy::RetryPolicy;
use crate::store::{StateStore, StoreError};

/// How a worker behaves; read once at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names this worker in leases and logs; unique per process.
    pub worker_id: String,
    /// Deliveries in flight at once (the broker's prefetch).
    pub prefetch: u16,
    /// How long a claim lasts without renewal; a crashed worker's requests are taken over
    /// after this. Renewed every third of it while the platform works; when it cannot be
    /// renewed before it ends, the work stops.
    pub lease: Duration,
    /// Attempts (claims) per request, and the backoff between them.
    pub retry: RetryPolicy,
    /// Times a message may be parked without an attempt (held, target busy, store or
    /// broker away) before it is refused.
    pub max_waits: u32,
    /// How long to keep retrying an unavailable state store in process before giving the
    /// delivery back for a delayed retry.
    pub store_retry_budget: Duration,
    /// On shutdown, how long in-flight deliveries may take to finish.
    pub shutdown_grace: Duration,
    /// A cap on one platform call, whatever the platform's own timeouts. Keep it below
    /// the broker's `consumer_timeout`.
    pub operation_timeout: Duration,
    /// How long the store keeps finished records; a message published longer ago is not
    /// run again.
    pub retention: Duration,
    /// A record in progress whose lease ended this long ago, with no worker back for it,
    /// is ended in `error` and what it made removed. `None`: never.
    pub reap_after: Option<Duration>,
    /// How long `describe` waits for a resource in transition to settle.
    pub describe_settle: Duration,
    /// How often to look for resources whose `ttl_seconds` or `expires_at` is up, and
    /// send their teardown. `None`: never (another worker of the platform must).
    pub expire_every: Option<Duration>,
    /// How often to reconcile the platform's resources with the records, and how
    /// carefully. `None`: never (`provisioner reconcile` still can).
    pub reconcile: Option<(Duration, ReconcileOptions)>,
    /// Pacing of the platform's API calls by its token buckets: the platform's defaults,
    /// overridden, or off.
    pub rate_limits: crate::ratelimit::RateLimitSettings,
    /// How long a fleet's coordinator waits with no member moving before it publishes
    /// again the members that have no record (their message may have been lost).
    pub fleet_stall: Duration,
    /// The most fleets this worker coordinates at once; a due fleet beyond it stays on
    /// the schedule for another worker (or this one, once one of its fleets ended), so
    /// a flood of fleets cannot make one worker hold a coordinator for each.
    pub fleet_coordinators: usize,
    /// When set, only requests signed with one of these keys run (see
    /// [`crate::signing`]); the rest are refused with class `permission`.
    pub signing: Option<Arc<crate::signing::SigningKeys>>,
    /// When set, a producer may name only the tenant its key or broker user is bound to
    /// (see [`crate::tenants`]); the rest are refused with class `permission`.
    pub tenants: Option<Arc<crate::tenants::TenantBinding>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            prefetch: 16,
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            max_waits: 500,
            store_retry_budget: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(15 * 60),
            retention: crate::store::DEFAULT_RETENTION,
            reap_after: Some(Duration::from_secs(3600)),
            describe_settle: Duration::from_secs(60),
            expire_every: Some(Duration::from_secs(1)),
            reconcile: None,
            rate_limits: crate::ratelimit::RateLimitSettings::default(),
            fleet_stall: Duration::from_secs(180),
            fleet_coordinators: 64,
            signing: None,
            tenants: None,
        }
    }
}

impl WorkerConfig {
    /// Sets the background work as the daemon's and the Lambda form's settings of the
    /// same names say, in seconds (0: never): `REAP_AFTER_SECONDS` (at least two leases,
    /// so a live holder is never taken for gone), `RECONCILE_EVERY_SECONDS` and
    /// `RECONCILE_MIN_AGE_SECONDS`. Set the lease first.
    pub fn with_background(
        mut self,
        reap_after_seconds: u64,
        reconcile_every_seconds: u64,
        reconcile_min_age_seconds: u64,
    ) -> Result<Self, String> {
        let reap_after = Duration::from_secs(reap_after_seconds);
        if reap_after_seconds != 0 && reap_after < 2 * self.lease {
            return Err(format!(
                "REAP_AFTER_SECONDS {reap_after_seconds} must be 0 (never) or at least two leases"
            ));
        }
        self.reap_after = (reap_after_seconds > 0).then_some(reap_after);
        self.reconcile = (reconcile_every_seconds > 0).then(|| {
            (
                Duration::from_secs(reconcile_every_seconds),
                ReconcileOptions {
                    min_age: Duration::from_secs(reconcile_min_age_seconds),
                    ..ReconcileOptions::default()
                },
            )
        });
        Ok(self)
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

/// What a refusal says: the error and what the event can tell of the message.
#[derive(Debug)]
struct Refusal<'a> {
    request_id: Option<&'a str>,
    operation: Option<Operation>,
    class: ErrorClass,
    message: String,
}

/// A worker for one platform: dependencies passed in, nothing global.
pub struct Worker {
    platform: Arc<dyn Platform>,
    store: Arc<dyn StateStore>,
    broker: Arc<dyn Broker>,
    config: WorkerConfig,
    metrics: Arc<crate::metrics::Metrics>,
    health: crate::metrics::Health,
    /// The wall clock and random draws: the system's, or a simulation's.
    env: Arc<dyn crate::Environment>,
    /// Paces the calls the runtime makes on its own (removing what a failed provision
    /// made), as the platform's own extra calls are.
    pacer: Arc<dyn crate::ratelimit::CallPacer>,
    /// Claims whose answer never came (the store failed, or the worker gave up on it while
    /// stopping), by request id: the store may have granted them. The next delivery of
    /// the request sends the same claim (same nonce), so a claim granted unseen is
    /// answered again rather than left to run out, its `starting` number never published.
    unanswered_claims: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// Unanswered claims remembered at most; past it they are all forgotten (each then
/// costs one lease's wait and a gap in its numbers, no more).
const UNANSWERED_CLAIMS: usize = 4096;

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("platform", &self.platform.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(10);
/// How often a worker checks whether the broker still blocks publishing.
const BLOCKED_POLL: Duration = Duration::from_secs(1);

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    pub fn new(
        platform: Arc<dyn Platform>,
        store: Arc<dyn StateStore>,
        broker: Arc<dyn Broker>,
        config: WorkerConfig,
    ) -> Self {
        let pacer = Worker::call_pacer(store.clone(), platform.name(), config.rate_limits.clone());
        platform.use_pacer(pacer.clone());
        let metrics = Arc::new(crate::metrics::Metrics::new(platform.name()));
        Worker {
            platform,
            store,
            broker,
            config,
            metrics,
            health: crate::metrics::Health::default(),
            env: Arc::new(crate::SystemEnvironment),
            pacer,
            unanswered_claims: Default::default(),
        }
    }

    /// The same worker reading the wall clock and drawing random numbers from `env` (the
    /// simulator's virtual clock and seeded generator) instead of the system's.
    pub fn with_environment(mut self, env: Arc<dyn crate::Environment>) -> Self {
        self.env = env;
        self
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The worker's counters and timings, for a `/metrics` endpoint.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// Whether the worker takes work, for `/ready`.
    pub fn health(&self) -> crate::metrics::Health {
        self.health.clone()
    }

    /// Consumes until `shutdown` resolves, reconnecting whenever the broker goes away, and
    /// ends abandoned records meanwhile. On shutdown: cancel the consumer, give in-flight
    /// deliveries the grace period to settle on their still-open channel, leave the rest
    /// unacknowledged for the broker to deliver again.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let platform = self.platform.name();
        let permits = Arc::new(Semaphore::new(usize::from(self.config.prefetch.max(1))));
        let mut in_flight = JoinSet::new();
        let mut reconnect_delay = Duration::from_millis(200);
        let _reaper = self.config.reap_after.map(|idle| {
            let worker = self.clone();
            reaper::AbortOnDrop(tokio::spawn(async move { worker.reap_forever(idle).await }))
        });
        let _reconciler = self.config.reconcile.clone().map(|(every, options)| {
            let worker = self.clone();
            reaper::AbortOnDrop(tokio::spawn(async move {
                worker.reconcile_forever(every, options).await
            }))
        });
        let _expirer = self.config.expire_every.map(|every| {
            let worker = self.clone();
            reaper::AbortOnDrop(tokio::spawn(
                async move { worker.expire_forever(every).await },
            ))
        });
        // On shutdown the fleets' coordinators hand their fleets back in good order,
        // within the grace period, instead of leaving their leases to run out.
        let (stop_fleets, fleets_stop) = tokio::sync::watch::channel(None);
        let mut fleets = {
            let worker = self.clone();
            reaper::AbortOnDrop(tokio::spawn(worker.watch_fleets_forever(fleets_stop)))
        };
        tokio::pin!(shutdown);
        'connection: loop {
            let consumed = async {
                self.broker.declare(platform).await?;
                self.broker.consume(platform, self.config.prefetch).await
            };
            let mut deliveries = tokio::select! {
                biased;
                _ = &mut shutdown => break 'connection,
                consumed = consumed => match consumed {
                    Ok(deliveries) => deliveries,
                    Err(e) => {
                        self.metrics.reconnect("broker");
                        warn!(error = %e, retry_in_ms = reconnect_delay.as_millis() as u64, "cannot consume; retrying");
                        tokio::select! {
                            biased;
                            _ = &mut shutdown => break 'connection,
                            _ = tokio::time::sleep(reconnect_delay) => {}
                        }
                        reconnect_delay = (reconnect_delay * 2).min(RECONNECT_DELAY_MAX);
                        continue 'connection;
                    }
                },
            };
            info!(%platform, worker = %self.config.worker_id, "consuming");
            self.health.set_consuming(true);
            loop {
                while in_flight.try_join_next().is_some() {}
                // While the broker blocks publishing (a memory or disk alarm), every status
                // event and retry would hang or fail: take no new work until it clears.
                if let Some(reason) = self.broker.blocked() {
                    warn!(%reason, "the broker blocks publishing; taking no work until it clears");
                    self.health.set_consuming(false);
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut shutdown => break 'connection,
                            _ = tokio::time::sleep(BLOCKED_POLL) => {}
                        }
                        if self.broker.blocked().is_none() {
                            info!("the broker publishes again; taking work");
                            self.health.set_consuming(true);
                            break;
                        }
                    }
                }
                let next = tokio::select! {
                    biased;
                    _ = &mut shutdown => break 'connection,
                    next = deliveries.next() => next,
                    // Look at the broker's state now and then, not only when work comes.
                    _ = tokio::time::sleep(BLOCKED_POLL) => continue,
                };
                match next {
                    Some(Ok(delivery)) => {
                        reconnect_delay = Duration::from_millis(200);
                        let permit = tokio::select! {
                            biased;
                            _ = &mut shutdown => {
                                // Never started: straight back to the queue.
                                if let Err(e) = delivery.settle(Settlement::Requeue).await {
                                    warn!(error = %e, "could not give an unstarted delivery back; the broker redelivers it when the channel closes");
                                }
                                break 'connection;
                            }
                            permit = permits.clone().acquire_owned() => permit,
                        };
                        let Ok(permit) = permit else {
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
            // Dropping the stream cancels the consumer; deliveries in flight keep their
            // channel open until they are settled.
            drop(deliveries);
            self.health.set_consuming(false);
            self.metrics.reconnect("broker");
            tokio::select! {
                biased;
                _ = &mut shutdown => break 'connection,
                _ = tokio::time::sleep(reconnect_delay) => {}
            }
            reconnect_delay = (reconnect_delay * 2).min(RECONNECT_DELAY_MAX);
        }
        self.health.set_consuming(false);
        info!(
            in_flight = in_flight.len(),
            grace_s = self.config.shutdown_grace.as_secs(),
            "shutting down: consumer cancelled, letting in-flight requests finish"
        );
        stop_fleets.send_replace(Some(tokio::time::Instant::now()));
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while in_flight.join_next().await.is_some() {}
            let _ = (&mut fleets.0).await;
        })
        .await;
        if drained.is_err() {
            warn!(
                abandoned = in_flight.len(),
                "grace period over; unfinished deliveries go back to the queue and their leases run out"
            );
            in_flight.abort_all();
        }
    }

    /// Handles one delivery to the end, settling it. Never panics: a panic after a claim
    /// counts as a failed attempt (see [`attempt`]); one before it (decoding, validation)
    /// dead-letters the message with the reason, since it would panic again.
    pub async fn handle(&self, delivery: Delivery) {
        let span = info_span!(
            "delivery",
            platform = %self.platform.name(),
            request.id = tracing::field::Empty,
            attempt = tracing::field::Empty,
            redelivered = delivery.redelivered,
            waits = delivery.waits,
            trace_id = tracing::field::Empty,
        );
        // A child of the producer's trace (or the first span of a new one); every event
        // and message this delivery publishes names the span as its parent.
        if let Some(trace_id) = crate::trace::continue_trace(&span, &delivery.trace) {
            span.record("trace_id", trace_id.as_str());
        }
        async {
            crate::fault::point("after_receive");
            let received = std::time::Instant::now();
            self.metrics.in_flight(true);
            let settlement = match AssertUnwindSafe(self.process(&delivery))
                .catch_unwind()
                .await
            {
                Ok(settlement) => settlement,
                Err(panic) => {
                    let what = panic_text(panic.as_ref());
                    error!(panic = %what, "handling panicked before any claim; dead-lettering the message");
                    Settlement::DeadLetter {
                        class: ErrorClass::Internal,
                        reason: format!(
                            "the worker panicked handling this message ({what}); it would again, so it is set aside. This is a bug: please report it with the message"
                        ),
                    }
                }
            };
            debug!(?settlement, "settling");
            self.metrics.delivery_settled(&settlement, received.elapsed());
            self.metrics.in_flight(false);
            if settlement == Settlement::Ack {
                crate::fault::point("after_publish");
            }
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
                // A body that cannot be read (too big, not JSON) is answered under its
                // AMQP message_id, the request id by the contract, so a producer waiting
                // on its request hears why instead of timing out.
                let request_id = e.request_id.clone().or_else(|| delivery.message_id.clone());
                if let Some(id) = &request_id {
                    tracing::Span::current().record("request.id", id.as_str());
                }
                return self
                    .refuse(
                        delivery,
                        Refusal {
                            request_id: request_id.as_deref(),
                            operation: e.operation,
                            class: ErrorClass::InvalidRequest,
                            message: e.message,
                        },
                    )
                    .await;
            }
        };
        tracing::Span::current().record("request.id", request.request_id.as_str());
        // A deployment that signs runs nothing a producer did not sign; the refusal
        // answers this message only, so a forgery cannot end the real request.
        let mut signed_at = None;
        let mut signed_by = None;
        if let Some(keys) = &self.config.signing
            && delivery.from_producers
        {
            let refusal = match keys.verify(
                delivery.signature.as_deref(),
                &delivery.routing_key,
                &delivery.body,
                self.env.now(),
            ) {
                Err(why) => Some(why),
                Ok(verified) => {
                    signed_at = Some(verified.signed_at);
                    signed_by = Some(verified.key_id);
                    match verified.stale {
                        None => None,
                        // Too old to run, unless this is a request already accepted (a
                        // delivery again after a worker died with it): its record
                        // answers it, and a replay of it changes nothing.
                        Some(why) => match self.store.get(request.request_id.as_str()).await {
                            Ok(Some(record))
                                if record.payload_hash.as_deref()
                                    == Some(request.payload_hash().as_str()) =>
                            {
                                None
                            }
                            Ok(_) => Some(why),
                            Err(e) => {
                                return self
                                    .wait_again(
                                        &request,
                                        delivery,
                                        self.config.retry.base_delay.max(Duration::from_secs(2)),
                                        format!("the state store failed: {e}"),
                                    )
                                    .await;
                            }
                        },
                    }
                }
            };
            if let Some(why) = refusal {
                return self
                    .refuse(
                        delivery,
                        Self::refusal_of(&request, ErrorClass::Permission, why),
                    )
                    .await;
            }
        }
        // Ids under '#', `fleet_member` and `cause` are the workers' own: a producer that
        // took one first would make an expiry, rollback or reconcile never happen.
        if delivery.from_producers
            && !delivery.way_in_unknown
            && let Err(why) = request.check_from_producer()
        {
            return self
                .refuse(
                    delivery,
                    Self::refusal_of(&request, ErrorClass::InvalidRequest, why.0),
                )
                .await;
        }
        // A deployment that binds producers to tenants lets each name only its own, and
        // act only on what its own tenant made.
        if let Some(binding) = &self.config.tenants
            && delivery.from_producers
            && !delivery.way_in_unknown
        {
            match binding.check(
                signed_by.as_deref(),
                delivery.publisher.as_deref(),
                request.tenant.as_deref(),
            ) {
                Err(why) => {
                    return self
                        .refuse(
                            delivery,
                            Self::refusal_of(&request, ErrorClass::Permission, why),
                        )
                        .await;
                }
                Ok(crate::tenants::Bound::Tenant(own))
                    if request.operation != Operation::Provision =>
                {
                    if let Some(settlement) =
                        self.refuse_unless_owned(&request, delivery, own).await
                    {
                        return settlement;
                    }
                }
                Ok(_) => {}
            }
        }
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
                .refuse(
                    delivery,
                    Self::refusal_of(&request, refusal.class, refusal.message),
                )
                .await;
        }
        if let Some(settlement) = self.refuse_if_too_old(&request, delivery, signed_at).await {
            return settlement;
        }
        match self.run_request(&request, delivery).await {
            Ok(settlement) => settlement,
            Err(Abort::Broker(e)) => {
                warn!(error = %e, "cannot publish status; trying again later");
                self.wait_again(
                    &request,
                    delivery,
                    self.config.retry.base_delay.max(Duration::from_secs(2)),
                    format!("the broker did not take a status event: {e}"),
                )
                .await
            }
            Err(Abort::Store(e)) => {
                // Unreachable past the budget, or it lost our record: claim again later.
                warn!(error = %e, "state store trouble; trying again later");
                self.wait_again(
                    &request,
                    delivery,
                    self.config.retry.base_delay.max(Duration::from_secs(2)),
                    format!("the state store failed: {e}"),
                )
                .await
            }
        }
    }

    /// For a producer bound to tenant `own`: refuses a request acting on a resource
    /// unless its target's recorded end names `own` (a running provision of its
    /// tenant). A target not known to be its own (another tenant's, still being made,
    /// never made, or a resource the provisioner did not make) is refused: a bound
    /// producer acts only on what is shown to be its tenant's.
    async fn refuse_unless_owned(
        &self,
        request: &Request,
        delivery: &Delivery,
        own: &str,
    ) -> Option<Settlement> {
        let later = |why: String| async move {
            self.wait_again(
                request,
                delivery,
                self.config.retry.base_delay.max(Duration::from_secs(2)),
                why,
            )
            .await
        };
        let target = match request.target() {
            Ok(TeardownTarget::Request(id)) => Some(id.to_string()),
            Ok(TeardownTarget::Resource(resource_id)) => {
                match tokio::time::timeout(
                    self.config.operation_timeout,
                    self.platform.owner_of(&resource_id),
                )
                .await
                {
                    Ok(Ok(owner)) => owner.map(|id| id.to_string()),
                    Ok(Err(e)) if !e.retryable => None,
                    Ok(Err(e)) => {
                        return Some(
                            later(format!("looking up who made {resource_id}: {}", e.message))
                                .await,
                        );
                    }
                    Err(_) => {
                        return Some(
                            later(format!("looking up who made {resource_id} took too long")).await,
                        );
                    }
                }
            }
            Err(_) => return None,
        };
        let owner_tenant = match target.as_deref() {
            None => None,
            Some(id) => match self.store.get(id).await {
                Ok(record) => record.and_then(|r| r.result).and_then(|end| end.tenant),
                Err(e) => return Some(later(format!("the state store failed: {e}")).await),
            },
        };
        if owner_tenant.as_deref() == Some(own) {
            return None;
        }
        let message = format!(
            "the producer is bound to tenant {own:?}, and {} is not known to be {own:?}'s (another tenant's, not made yet, or not the provisioner's): a bound producer acts only on its own tenant's resources",
            target
                .as_deref()
                .map_or_else(|| "the resource".to_owned(), |id| format!("request {id}"))
        );
        Some(
            self.refuse(
                delivery,
                Self::refusal_of(request, ErrorClass::Permission, message),
            )
            .await,
        )
    }

    fn refusal_of(request: &Request, class: ErrorClass, message: String) -> Refusal<'_> {
        Refusal {
            request_id: Some(request.request_id.as_str()),
            operation: Some(request.operation),
            class,
            message,
        }
    }

    /// A message published longer ago than the store keeps records may be a request that
    /// already ran and whose record is gone: answer it from its record if there is one,
    /// and otherwise refuse it rather than run it again.
    /// The time judged is the earlier of the AMQP `timestamp` and the signed time: the
    /// timestamp is not signed, and a producer that leaves it out is not spared the check.
    async fn refuse_if_too_old(
        &self,
        request: &Request,
        delivery: &Delivery,
        signed_at: Option<std::time::SystemTime>,
    ) -> Option<Settlement> {
        let published = match (delivery.published_at, signed_at) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let age = self.env.now().duration_since(published).ok()?;
        if age <= self.config.retention {
            return None;
        }
        if let Ok(Some(record)) = self.store.get(request.request_id.as_str()).await
            && let Some(result) = record.result
        {
            return Some(match self.broker.publish_status(&result).await {
                Ok(()) => Settlement::Ack,
                Err(e) => {
                    self.wait_again(
                        request,
                        delivery,
                        Duration::from_secs(2),
                        format!("the broker did not take a status event: {e}"),
                    )
                    .await
                }
            });
        }
        let message = format!(
            "the message was published {} h ago, longer than the {} h the state store keeps records: it may have run already, so it is not run again. Send a new request_id",
            age.as_secs() / 3600,
            self.config.retention.as_secs() / 3600
        );
        Some(
            self.refuse(
                delivery,
                Self::refusal_of(request, ErrorClass::InvalidRequest, message),
            )
            .await,
        )
    }

    /// Parks a message that could not be worked on now (no attempt was made) to come back
    /// after `delay`; past `max_waits` it is refused with `why`.
    async fn wait_again(
        &self,
        request: &Request,
        delivery: &Delivery,
        delay: Duration,
        why: String,
    ) -> Settlement {
        let waits = delivery.waits.saturating_add(1);
        // Set aside as a message: what waits here holds no record of its own (another
        // worker holds the request, or the store was away). One that holds its record
        // ends it instead (`waited_enough`).
        if waits > self.config.max_waits {
            let message = format!(
                "this message waited {} times without an attempt and is set aside; the last reason: {why}. If another worker holds the request, it finishes it; otherwise publish it again",
                delivery.waits
            );
            return self
                .refuse(
                    delivery,
                    Self::refusal_of(request, ErrorClass::Internal, message),
                )
                .await;
        }
        debug!(delay_ms = delay.as_millis() as u64, waits, %why, "waiting");
        Settlement::Retry {
            delay,
            attempt: delivery.attempt,
            waits,
        }
    }

    /// Refuses a message: an `error` event naming the refused message (when the
    /// producer's id could be read) and a dead letter with the reason.
    async fn refuse(&self, delivery: &Delivery, refusal: Refusal<'_>) -> Settlement {
        let Refusal {
            request_id,
            operation,
            class,
            message,
        } = refusal;
        warn!(error.class = %class, error.message = %message, "refused");
        self.metrics.request_rejected(operation, class);
        if let Some(request_id) = request_id {
            let event = StatusEvent {
                schema_version: SCHEMA_VERSION,
                request_id: bounded_text(request_id, MAX_ECHOED_ID_BYTES),
                operation,
                // The refusing worker's platform, whatever the body claims: the message
                // was in its queue, and its broker user may publish only its own
                // platform's status keys.
                platform: self.platform.name().to_string(),
                state: State::Error,
                seq: 0,
                attempt: delivery.attempt,
                timestamp: self.env.now_utc(),
                resource: None,
                error: Some(ErrorInfo {
                    class,
                    message: message.clone(),
                }),
                tenant: None,
                rejected_message: Some(RejectedMessage::of(&delivery.body)),
                cause: None,
                fleet: None,
            };
            if let Err(e) = self.broker.publish_status(&event).await {
                // The dead letter still carries the reason; the event is only a courtesy.
                warn!(error = %e, "cannot publish the refusal; dead-lettering all the same");
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
            timestamp: self.env.now_utc(),
            resource,
            error,
            tenant: request.tenant.clone(),
            rejected_message: None,
            cause: request.cause.clone(),
            fleet: fleet_status_of(request),
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
                    self.metrics.reconnect("store");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }
}

/// What a request's events say of its fleet: a member's index, or a fleet's size (its
/// coordinator adds the counts).
fn fleet_status_of(request: &Request) -> Option<provisioner_events::FleetStatus> {
    if let Some(member) = &request.fleet_member {
        return Some(provisioner_events::FleetStatus {
            request_id: member.fleet_request_id.to_string(),
            count: member.count,
            index: Some(member.index),
            min_count: None,
            members: None,
        });
    }
    request.is_fleet().then(|| provisioner_events::FleetStatus {
        request_id: request.request_id.to_string(),
        count: request.count.unwrap_or(1),
        index: None,
        min_count: Some(request.fleet_min_count()),
        members: None,
    })
}

/// How much of an unreadable message's `request_id` a refusal echoes: enough to know it
/// by, never enough to push the event or its message id past what AMQP carries.
const MAX_ECHOED_ID_BYTES: usize = 200;

/// `text` cut to at most `max` bytes on a character boundary, marked when cut.
fn bounded_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::bounded_text;

    #[test]
    fn echoed_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded_text("short", 10), "short");
        let cut = bounded_text(&"é".repeat(300), 200);
        assert!(cut.len() <= 200, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
