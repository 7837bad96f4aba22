//! The contract between the runtime and a platform: the [`Platform`] trait.
//!
//! Every operation must be idempotent: the same request id converges on the same
//! resource (names and tags are derived from it), and tearing down what is already gone
//! succeeds. The runtime may call any operation again after a crash or a retry.

use std::time::Duration;

use async_trait::async_trait;
use provisioner_events::spec::PlatformSpec;
use provisioner_events::{
    ErrorClass, Invalid, PlatformName, Request, RequestId, Resource, State, TeardownTarget,
};

/// A provision request's spec, read as platform `S`'s and checked: what is wrong with it
/// is the request's fault (`invalid_request`). Every platform reads its spec this way.
pub fn spec_of<S: PlatformSpec>(request: &Request) -> Result<S, PlatformError> {
    request.spec_as::<S>().map_err(PlatformError::from)
}

/// A refusal at validation is the request's fault, whichever check found it.
impl From<Invalid> for PlatformError {
    fn from(refusal: Invalid) -> Self {
        PlatformError::invalid(refusal.0)
    }
}

/// Why a platform could not be set up from its configuration, when a worker starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// A setting is missing or wrong (no region, no project, an unusable credential, a
    /// malformed endpoint): the operator must change the configuration.
    #[error("{0}")]
    Config(String),
    /// The configuration is usable but the platform's endpoint does not answer now (the
    /// Docker engine is down): starting again later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl SetupError {
    pub fn config(message: impl Into<String>) -> Self {
        SetupError::Config(message.into())
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        SetupError::Unavailable(message.into())
    }
}

/// A bare message is a configuration problem: what a setting lacks or gets wrong.
impl From<String> for SetupError {
    fn from(message: String) -> Self {
        SetupError::Config(message)
    }
}

impl From<&str> for SetupError {
    fn from(message: &str) -> Self {
        SetupError::Config(message.to_owned())
    }
}

/// A failure from a platform, classified where it happened, while the typed error of the
/// SDK was still at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct PlatformError {
    pub class: ErrorClass,
    /// Whether the same call may succeed later (network faults, throttling, capacity).
    pub retryable: bool,
    /// What went wrong and what a person can do about it.
    pub message: String,
    /// The platform asked us to wait at least this long (throttling).
    pub retry_after: Option<Duration>,
}

impl From<crate::metrics::WaitCancelled> for PlatformError {
    fn from(cancelled: crate::metrics::WaitCancelled) -> Self {
        PlatformError::permanent(ErrorClass::Conflict, cancelled.to_string())
    }
}

impl PlatformError {
    /// A permanent failure of the given class: no retry.
    pub fn permanent(class: ErrorClass, message: impl Into<String>) -> Self {
        PlatformError {
            class,
            retryable: false,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The request (or its spec) is refused: fix it and send a new request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::permanent(ErrorClass::InvalidRequest, message)
    }

    /// A passing fault: retried with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        PlatformError {
            class: ErrorClass::Transient,
            retryable: true,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A retryable failure of a specific class (throttled, capacity).
    pub fn retryable(class: ErrorClass, message: impl Into<String>) -> Self {
        PlatformError {
            class,
            retryable: true,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unsupported(platform: PlatformName, operation: &str) -> Self {
        Self::permanent(
            ErrorClass::Unsupported,
            format!("the {platform} platform does not support {operation} yet"),
        )
    }
}

/// What `describe` found: the resource and the life-cycle state it is in now (an EC2
/// instance may be `stopped`, a container `running`), which the `describe` request's
/// terminal event reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub state: State,
    pub resource: Resource,
}

/// A resource the provisioner made, as [`Platform::owned`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Owned {
    pub resource: Resource,
    /// The request its ownership marks name.
    pub request_id: RequestId,
    /// When the platform made it, where the platform says.
    pub created: Option<std::time::SystemTime>,
}

/// One platform's implementation. The runtime owns queueing, claiming, retries and status;
/// a platform only talks to its API.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    fn name(&self) -> PlatformName;

    /// Checks the request's spec, and the worker's own policy (allow-lists, refused
    /// privileges), before anything is claimed or touched. Errors here are permanent.
    fn validate(&self, request: &Request) -> Result<(), PlatformError>;

    /// The API token buckets carrying `request` out draws on (see [`crate::ratelimit`]),
    /// with the cloud's documented sizes and rates. None by default: the platform has no
    /// published limits worth pacing for.
    fn rate_limits(&self, _request: &Request) -> Vec<crate::ratelimit::RateLimit> {
        Vec::new()
    }

    /// What a provision of `request` holds of its tenant's quota beyond its one machine,
    /// in units this platform defines (EC2: the `vcpus` of its instance type). Asked
    /// before anything is made, only for provisions naming a tenant. Nothing by default.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<crate::store::QuotaCost, PlatformError> {
        let _ = request;
        Ok(crate::store::QuotaCost::new())
    }

    /// How long the platform may go on showing nothing of a resource that a create call
    /// made: a create whose answer was lost may still land, and listings by ownership tag
    /// may lag behind what exists (EC2's eventual consistency). When removing what a
    /// failed provision made finds nothing, the runtime looks again after this long
    /// before it says nothing was left. Zero (the default) for platforms whose lookups see
    /// what exists at once: names derived from the request id, read back by name.
    fn settle_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Hands the platform the runtime's pacer, for calls it makes beyond the one paced
    /// per request (a batched launch). Platforms that make no such calls ignore it.
    fn use_pacer(&self, pacer: std::sync::Arc<dyn crate::ratelimit::CallPacer>) {
        let _ = pacer;
    }

    /// Makes the resource of `request` and waits until it is ready. Called again for the
    /// same request (retry, takeover), it finds what it made before instead of making more.
    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError>;

    /// Removes the target. Already gone is success (`Ok(None)`); otherwise returns what
    /// was removed.
    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError>;

    /// The resource of a target and its state as they are now, or `None` when there is
    /// none.
    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        let _ = target;
        Err(PlatformError::unsupported(self.name(), "describe"))
    }

    /// The request a resource was made for, read from its ownership tags or labels, or
    /// `None` when there is no such resource (or the platform cannot tell). A request
    /// that names a `resource_id` then serializes with that request and, for a teardown,
    /// tombstones it, exactly as one naming `target_request_id`.
    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let _ = resource_id;
        Ok(None)
    }

    /// Every resource this worker's platform holds that the provisioner made.
    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        Err(PlatformError::unsupported(self.name(), "list"))
    }

    /// Every resource of this platform that carries the provisioner's ownership marks,
    /// with the request they name and when it was made: what the reconciler compares
    /// with the records. A resource whose marks cannot be read is left out, so it is
    /// never touched.
    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        Err(PlatformError::unsupported(self.name(), "reconcile"))
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let _ = target;
        Err(PlatformError::unsupported(self.name(), "start"))
    }

    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let _ = target;
        Err(PlatformError::unsupported(self.name(), "stop"))
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let _ = target;
        Err(PlatformError::unsupported(self.name(), "reboot"))
    }

    /// A `dry_run` request: whether `request` would succeed, asking the platform where it
    /// can tell (EC2's `DryRun`), without creating or changing anything. `validate` has
    /// passed already. Platforms that cannot ask say so instead of guessing.
    async fn check(&self, request: &Request) -> Result<(), PlatformError> {
        let _ = request;
        Err(PlatformError::unsupported(self.name(), "dry runs"))
    }

    /// Every right this platform's worker and its checks use on the cloud's API: the
    /// manifest the documented policies are generated from or checked against, and the
    /// test doubles grant. Empty for platforms that act on this host only.
    fn permissions(&self) -> &'static [crate::permissions::Permission] {
        &[]
    }

    /// Checks, before any request, that this worker can work: where it will act (account,
    /// project, region, namespace), with which credentials, and whether it holds the
    /// rights its operations need, as far as the platform can tell without changing
    /// anything. `provisioner check` prints these; a worker logs them at start.
    async fn preflight(&self) -> Vec<Finding> {
        vec![Finding::warn(
            "setup",
            format!("the {} platform has no setup checks", self.name()),
        )]
    }
}

/// How one check of [`Platform::preflight`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Not known to be wrong, but worth a look (a right that cannot be checked here).
    Warn,
    /// The worker will fail at this: the detail says what to fix.
    Fail,
}

/// One finding of [`Platform::preflight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. `credentials` or `ec2:DescribeInstances`.
    pub check: String,
    pub outcome: Outcome,
    /// What was found; for a failure, what is wrong and what to do about it.
    pub detail: String,
}

impl Finding {
    pub fn pass(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Outcome::Pass, detail)
    }

    pub fn warn(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Outcome::Warn, detail)
    }

    pub fn fail(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Outcome::Fail, detail)
    }

    fn new(check: impl Into<String>, outcome: Outcome, detail: impl Into<String>) -> Self {
        Finding {
            check: check.into(),
            outcome,
            detail: detail.into(),
        }
    }

    /// A platform call's answer as a finding: allowed, or refused with what to grant.
    pub fn of_call<T>(check: &str, result: Result<T, PlatformError>, passed: &str) -> Self {
        match result {
            Ok(_) => Self::pass(check, passed),
            Err(e) if e.class == ErrorClass::Permission => Self::fail(
                check,
                format!(
                    "refused: {} — grant the worker's identity this right",
                    e.message
                ),
            ),
            Err(e) => Self::fail(check, e.message),
        }
    }
}
