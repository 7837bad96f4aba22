//! What a worker counts and times, for Prometheus, and whether it is ready for work.
//!
//! One [`Metrics`] per worker process (the [`Worker`](crate::Worker) makes it; the CLI
//! serves it at `/metrics` in the OpenMetrics text format). Every family carries the
//! `platform` label, so several workers scraped together stay apart:
//!
//! | family | labels | what |
//! |---|---|---|
//! | `provisioner_requests_total` | operation, outcome, error_class | requests that ended: `running`, `stopped`, `error` (with its class), `rejected` |
//! | `provisioner_deliveries_total` | settlement | deliveries settled: `ack`, `retry`, `requeue`, `dead_letter` |
//! | `provisioner_delivery_duration_seconds` | settlement | one delivery, received to settled |
//! | `provisioner_platform_call_duration_seconds` | operation, outcome | the platform's call for a request (health waits included), `ok` or the error class |
//! | `provisioner_health_wait_duration_seconds` | outcome | inside a provision's call, the wait for the new resource to run and answer its health check (`ready` or `not_ready`) |
//! | `provisioner_in_flight` | | deliveries being worked on |
//! | `provisioner_dead_letters_total` | error_class | messages set aside, by why |
//! | `provisioner_lease_takeovers_total` | | requests claimed again after another attempt or a lost holder |
//! | `provisioner_rate_limit_wait_seconds` | | how long calls waited for their rate-limit tokens |
//! | `provisioner_reconnects_total` | peer | reconnections to the `broker`, retries of the `store` |
//! | `provisioner_store_entries_refused_total` | kind | entries read back from the store that were not acted on: unsealed, altered, moved or stale (`fleet`) — someone wrote the store who is not a worker |
//!
//! [`Health`] is what `/live` and `/ready` answer: ready only while the worker consumes
//! from a broker that takes its publishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use provisioner_events::{ErrorClass, Operation, PlatformName, State};

use crate::broker::Settlement;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlatformLabel {
    platform: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    platform: String,
    operation: String,
    outcome: String,
    error_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SettlementLabels {
    platform: String,
    settlement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    platform: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    platform: String,
    error_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    platform: String,
    peer: String,
}

/// Buckets from 5 ms to about 45 min: a container starts in a second, a VM in minutes.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

/// Buckets from 1 ms to about 30 s: a rate-limit wait is short or the message is parked.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// A worker's counters and timings (see the module's doc).
pub struct Metrics {
    platform: String,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    deliveries: Family<SettlementLabels, Counter>,
    delivery_seconds: Family<SettlementLabels, Histogram>,
    platform_call_seconds: Family<CallLabels, Histogram>,
    in_flight: Family<PlatformLabel, Gauge>,
    dead_letters: Family<ClassLabels, Counter>,
    takeovers: Family<PlatformLabel, Counter>,
    rate_limit_wait_seconds: Family<PlatformLabel, Histogram>,
    health_wait_seconds: Family<OutcomeLabels, Histogram>,
    reconnects: Family<PeerLabels, Counter>,
    store_entries_refused: Family<KindLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    platform: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    platform: String,
    outcome: String,
}

tokio::task_local! {
    /// The worker's metrics and the cancel signal of the platform call running in this
    /// task.
    static PLATFORM_CALL: PlatformCallScope;
}

struct PlatformCallScope {
    metrics: Arc<Metrics>,
    cancel: tokio::sync::watch::Receiver<bool>,
}

/// A platform's health wait cut short because a teardown cancelled the request: the
/// resource need not become ready any more, only be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitCancelled;

impl std::fmt::Display for WaitCancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped waiting: a teardown cancelled the request")
    }
}

/// Runs a platform call so that the health waits inside it ([`health_wait`]) are
/// recorded in `metrics` and end at once when `cancel` turns true. Cancelling this way,
/// instead of dropping the call, lets a create or start already sent to the platform
/// finish, so what it made can be removed after, not land after the removal.
pub(crate) async fn platform_call_scope<F: std::future::Future>(
    metrics: Arc<Metrics>,
    cancel: tokio::sync::watch::Receiver<bool>,
    call: F,
) -> F::Output {
    PLATFORM_CALL
        .scope(PlatformCallScope { metrics, cancel }, call)
        .await
}

/// Times a platform's wait for a resource it made to run and answer its health check
/// (a probe, polling for RUNNING or an available rollout), as
/// `provisioner_health_wait_duration_seconds`, and ends it with [`WaitCancelled`] when a
/// teardown cancels the request meanwhile. Platforms wrap their waits in it; outside a
/// worker's platform call (a test, a tool) it only runs `wait`.
pub async fn health_wait<T, E: From<WaitCancelled>>(
    wait: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = std::time::Instant::now();
    let cancel = PLATFORM_CALL.try_with(|scope| scope.cancel.clone()).ok();
    let result = match cancel {
        Some(mut cancel) => tokio::select! {
            biased;
            result = wait => result,
            _ = cancel.wait_for(|cancelled| *cancelled) => Err(E::from(WaitCancelled)),
        },
        None => wait.await,
    };
    let outcome = if result.is_ok() { "ready" } else { "not_ready" };
    let _ = PLATFORM_CALL.try_with(|scope| scope.metrics.health_waited(outcome, started.elapsed()));
    result
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The families of a worker of `platform`, registered and at zero.
    pub fn new(platform: PlatformName) -> Self {
        let mut registry = Registry::with_prefix("provisioner");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests that ended, by operation, outcome and error class",
            requests.clone(),
        );
        let deliveries = Family::<SettlementLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Deliveries settled, by how",
            deliveries.clone(),
        );
        let delivery_seconds =
            Family::<SettlementLabels, Histogram>::new_with_constructor(duration_histogram as _);
        registry.register(
            "delivery_duration_seconds",
            "One delivery, received to settled",
            delivery_seconds.clone(),
        );
        let platform_call_seconds =
            Family::<CallLabels, Histogram>::new_with_constructor(duration_histogram as _);
        registry.register(
            "platform_call_duration_seconds",
            "The platform's call for a request, health waits included",
            platform_call_seconds.clone(),
        );
        let in_flight = Family::<PlatformLabel, Gauge>::default();
        registry.register("in_flight", "Deliveries being worked on", in_flight.clone());
        let dead_letters = Family::<ClassLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Messages set aside on the dead-letter queue, by why",
            dead_letters.clone(),
        );
        let takeovers = Family::<PlatformLabel, Counter>::default();
        registry.register(
            "lease_takeovers",
            "Requests claimed again after an earlier attempt or a lost holder",
            takeovers.clone(),
        );
        let rate_limit_wait_seconds =
            Family::<PlatformLabel, Histogram>::new_with_constructor(wait_histogram as _);
        registry.register(
            "rate_limit_wait_seconds",
            "How long calls waited for their rate-limit tokens",
            rate_limit_wait_seconds.clone(),
        );
        let health_wait_seconds =
            Family::<OutcomeLabels, Histogram>::new_with_constructor(duration_histogram as _);
        registry.register(
            "health_wait_duration_seconds",
            "Inside a provision, the wait for the new resource to run and answer its health check",
            health_wait_seconds.clone(),
        );
        let reconnects = Family::<PeerLabels, Counter>::default();
        registry.register(
            "reconnects",
            "Reconnections to the broker and retries of the state store",
            reconnects.clone(),
        );
        let store_entries_refused = Family::<KindLabels, Counter>::default();
        registry.register(
            "store_entries_refused",
            "Entries read back from the store and not acted on: not sealed by a worker, altered, moved or stale",
            store_entries_refused.clone(),
        );
        let metrics = Metrics {
            platform: platform.to_string(),
            registry,
            requests,
            deliveries,
            delivery_seconds,
            platform_call_seconds,
            in_flight,
            dead_letters,
            takeovers,
            rate_limit_wait_seconds,
            health_wait_seconds,
            reconnects,
            store_entries_refused,
        };
        // Present from the first scrape, not only once something happened.
        drop(metrics.in_flight.get_or_create(&metrics.platform_label()));
        drop(metrics.takeovers.get_or_create(&metrics.platform_label()));
        metrics
    }

    fn platform_label(&self) -> PlatformLabel {
        PlatformLabel {
            platform: self.platform.clone(),
        }
    }

    /// Every family in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A request ended with `state` (and `class` when in error).
    pub(crate) fn request_ended(
        &self,
        operation: Option<Operation>,
        state: State,
        class: Option<ErrorClass>,
    ) {
        self.count_request(operation, state.to_string(), class);
    }

    /// A message was refused before any work: it ends `rejected`.
    pub(crate) fn request_rejected(&self, operation: Option<Operation>, class: ErrorClass) {
        self.count_request(operation, "rejected".into(), Some(class));
    }

    fn count_request(
        &self,
        operation: Option<Operation>,
        outcome: String,
        class: Option<ErrorClass>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                platform: self.platform.clone(),
                operation: operation.map(|o| o.to_string()).unwrap_or_default(),
                outcome,
                error_class: class.map(|c| c.to_string()).unwrap_or_default(),
            })
            .inc();
    }

    /// A delivery was settled after `took`.
    pub(crate) fn delivery_settled(&self, settlement: &Settlement, took: Duration) {
        let name = match settlement {
            Settlement::Ack => "ack",
            Settlement::Retry { .. } => "retry",
            Settlement::Requeue => "requeue",
            Settlement::DeadLetter { class, .. } => {
                self.dead_letters
                    .get_or_create(&ClassLabels {
                        platform: self.platform.clone(),
                        error_class: class.to_string(),
                    })
                    .inc();
                "dead_letter"
            }
        };
        let labels = SettlementLabels {
            platform: self.platform.clone(),
            settlement: name.into(),
        };
        self.deliveries.get_or_create(&labels).inc();
        self.delivery_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A delivery started (`true`) or ended (`false`).
    pub(crate) fn in_flight(&self, started: bool) {
        let gauge = self.in_flight.get_or_create(&self.platform_label());
        if started {
            gauge.inc();
        } else {
            gauge.dec();
        }
    }

    /// The platform's call for an `operation` took `took` and ended `ok` or in `class`.
    pub(crate) fn platform_call(
        &self,
        operation: Operation,
        class: Option<ErrorClass>,
        took: Duration,
    ) {
        self.platform_call_seconds
            .get_or_create(&CallLabels {
                platform: self.platform.clone(),
                operation: operation.to_string(),
                outcome: class.map_or_else(|| "ok".to_owned(), |c| c.to_string()),
            })
            .observe(took.as_secs_f64());
    }

    /// A request was claimed again after another attempt or a lost holder.
    pub(crate) fn takeover(&self) {
        self.takeovers.get_or_create(&self.platform_label()).inc();
    }

    /// A call waited `took` for its rate-limit tokens.
    pub(crate) fn rate_limit_wait(&self, took: Duration) {
        self.rate_limit_wait_seconds
            .get_or_create(&self.platform_label())
            .observe(took.as_secs_f64());
    }

    /// A health wait ended `outcome` after `took`.
    fn health_waited(&self, outcome: &str, took: Duration) {
        self.health_wait_seconds
            .get_or_create(&OutcomeLabels {
                platform: self.platform.clone(),
                outcome: outcome.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// An entry of `kind` read back from the store was refused (see
    /// [`crate::signing::SigningKeys::open`]).
    pub(crate) fn store_entry_refused(&self, kind: &str) {
        self.store_entries_refused
            .get_or_create(&KindLabels {
                platform: self.platform.clone(),
                kind: kind.into(),
            })
            .inc();
    }

    /// The worker connected to its `peer` again (`broker`), or retried it (`store`).
    pub(crate) fn reconnect(&self, peer: &str) {
        self.reconnects
            .get_or_create(&PeerLabels {
                platform: self.platform.clone(),
                peer: peer.into(),
            })
            .inc();
    }
}

/// Whether a worker lives and takes work: what `/live` and `/ready` answer.
#[derive(Debug, Clone, Default)]
pub struct Health {
    consuming: Arc<AtomicBool>,
}

impl Health {
    /// Ready: consuming from a broker that takes its publishes.
    pub fn ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_count_and_encode_with_the_platform() {
        let metrics = Metrics::new(PlatformName::Docker);
        let fresh = metrics.encode();
        assert!(
            fresh.contains("provisioner_in_flight{platform=\"docker\"} 0"),
            "{fresh}"
        );
        metrics.in_flight(true);
        metrics.request_ended(Some(Operation::Provision), State::Running, None);
        metrics.request_ended(
            Some(Operation::Provision),
            State::Error,
            Some(ErrorClass::Quota),
        );
        metrics.request_rejected(None, ErrorClass::InvalidRequest);
        metrics.delivery_settled(
            &Settlement::DeadLetter {
                class: ErrorClass::InvalidRequest,
                reason: "bad".into(),
            },
            Duration::from_millis(3),
        );
        metrics.platform_call(Operation::Provision, None, Duration::from_millis(1500));
        let text = metrics.encode();
        for line in [
            "provisioner_in_flight{platform=\"docker\"} 1",
            "provisioner_requests_total{platform=\"docker\",operation=\"provision\",outcome=\"running\",error_class=\"\"} 1",
            "provisioner_requests_total{platform=\"docker\",operation=\"provision\",outcome=\"error\",error_class=\"quota\"} 1",
            "provisioner_requests_total{platform=\"docker\",operation=\"\",outcome=\"rejected\",error_class=\"invalid_request\"} 1",
            "provisioner_deliveries_total{platform=\"docker\",settlement=\"dead_letter\"} 1",
            "provisioner_dead_letters_total{platform=\"docker\",error_class=\"invalid_request\"} 1",
            "provisioner_platform_call_duration_seconds_count{platform=\"docker\",operation=\"provision\",outcome=\"ok\"} 1",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        let health = Health::default();
        assert!(!health.ready());
        health.set_consuming(true);
        assert!(health.clone().ready());
    }
}
