//! The platform-agnostic worker runtime.
//!
//! A worker consumes requests for one platform, claims each in the state store (a lease
//! with a fencing token), publishes a status event for every step, calls the platform,
//! records the result and acknowledges the delivery only after that result is stored and
//! its event confirmed by the broker. The pieces:
//!
//! - [`platform`]: the [`Platform`] trait every platform worker implements, and its errors.
//! - [`policy`]: the pure decision of what happens after a failure (retry when, or stop).
//! - [`store`]: the [`StateStore`] trait (idempotency records, leases, fencing) with an
//!   in-memory implementation; [`redis_store`] is the Redis one.
//! - [`broker`]: the [`Broker`] trait (deliveries, settlement, status publishing) with an
//!   in-memory implementation; [`amqp`] is the RabbitMQ one.
//! - [`runtime`]: the consume loop and the per-delivery state machine.
//! - [`conformance`]: the tests every platform must pass (each operation twice).
//! - [`environment`]: the wall clock and random draws, the system's or a simulation's.
//! - [`names`]: resource names and idempotency keys derived from a request id.
//! - [`batch`]: merging concurrent calls into one where a platform's API takes many.
//! - [`fault`]: crash points for the fault-injection tests (compiled out otherwise).
//! - [`trace`]: W3C trace context from a request's headers to everything it sets off.
//! - [`signing`]: signed requests (HMAC keys, verification, rotation).
//! - [`metrics`]: the worker's Prometheus metrics and its readiness.
//! - [`permissions`]: each platform's manifest of the cloud rights it uses.
//!
//! Platform crates depend only on [`platform`] and `provisioner-events`; the RabbitMQ and
//! Redis adapters sit behind the `rabbitmq` and `redis` features.

pub mod allow;
#[cfg(feature = "rabbitmq")]
pub mod amqp;
pub mod backoff;
pub mod batch;
pub mod broker;
pub mod cache;
pub mod conformance;
pub mod environment;
pub mod fault;
pub mod health;
pub mod metrics;
pub mod names;
pub mod permissions;
pub mod platform;
pub mod policy;
pub mod ratelimit;
#[cfg(feature = "redis")]
pub mod redis_store;
pub mod runtime;
pub mod signing;
pub mod store;
pub mod tenants;
pub mod trace;

pub use broker::{Broker, BrokerError, Delivery, MemoryBroker, Settlement};
pub use environment::{Environment, SystemEnvironment};
pub use platform::{Described, Finding, Outcome, Owned, Platform, PlatformError, SetupError};
pub use ratelimit::{CallPacer, PacerSlot, RateLimit, RateLimitSettings, TokenGrant};
pub use runtime::{
    Housekeeping, ReconcileDecision, ReconcileOptions, Verdict, Worker, WorkerConfig,
    expiry_teardown_id, reconcile_teardown_id,
};
pub use store::{
    Claim, DEFAULT_TENANT, Fence, MACHINES, MemoryStore, QuotaCost, QuotaGrant, QuotaUsage,
    Release, StateStore, StoreError, UnitUsage, VCPUS, cpu_millis, vcpus_cost,
};

/// Hides the password of a URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url as redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
