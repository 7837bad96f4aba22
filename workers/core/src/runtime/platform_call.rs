//! The platform side of an attempt: the call an operation makes, bounded by the
//! operation timeout and the request's deadline; `describe` waiting for a settled state;
//! and who made a resource named by id.

use std::time::Duration;

use provisioner_events::{
    ErrorClass, Operation, Request, RequestId, Resource, State, TeardownTarget,
};
use tracing::Instrument;

use super::Worker;
use crate::platform::PlatformError;
use crate::store::StoreError;

/// What a platform call ended with: the resource, and the state to report when it is
/// not the operation's usual one (a `describe` reports the state it found).
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) resource: Option<Resource>,
    pub(super) state: Option<State>,
}

impl Outcome {
    pub(super) fn of(resource: Resource) -> Self {
        Outcome {
            resource: Some(resource),
            state: None,
        }
    }

    pub(super) fn nothing() -> Self {
        Outcome {
            resource: None,
            state: None,
        }
    }
}

impl Worker {
    /// The request whose resource a request names by `resource_id` acts on, as the
    /// platform's ownership tags tell: it serializes with that request (and a teardown
    /// tombstones it) as if it had named `target_request_id`.
    pub(super) async fn resource_owner(
        &self,
        request: &Request,
    ) -> Result<Option<RequestId>, PlatformError> {
        let acts = matches!(
            request.operation,
            Operation::Teardown | Operation::Stop | Operation::Start | Operation::Reboot
        );
        let Ok(TeardownTarget::Resource(resource_id)) = request.target() else {
            return Ok(None);
        };
        if !acts || request.dry_run {
            return Ok(None);
        }
        match tokio::time::timeout(
            self.config.operation_timeout,
            self.platform.owner_of(&resource_id),
        )
        .await
        {
            Ok(owner) => owner,
            Err(_) => Err(PlatformError::retryable(
                ErrorClass::Timeout,
                format!("looking up who made {resource_id} took too long"),
            )),
        }
    }

    /// The request a teardown by resource id tombstoned in an earlier attempt, as its
    /// own record keeps it: the owner of a resource that is gone. A store that cannot
    /// answer is an error, not "none": the end would then free nothing, for good.
    pub(super) async fn recorded_target(
        &self,
        request: &Request,
    ) -> Result<Option<RequestId>, StoreError> {
        if request.operation != Operation::Teardown
            || !matches!(request.target(), Ok(TeardownTarget::Resource(_)))
        {
            return Ok(None);
        }
        let record = self
            .store_call(|| self.store.get(request.request_id.as_str()))
            .await?;
        Ok(record
            .and_then(|r| r.acts_on)
            .and_then(|id| RequestId::new(id).ok()))
    }

    pub(super) async fn call_platform(&self, request: &Request) -> Result<Outcome, PlatformError> {
        if let Some(deadline) = request.deadline
            && self.env.now_utc() >= deadline
        {
            return Err(PlatformError::permanent(
                ErrorClass::Timeout,
                "the request's deadline passed before it could be carried out; nothing was done",
            ));
        }
        if request.operation == Operation::Provision
            && let Some(expires_at) = request.expires_at
            && self.env.now_utc() >= expires_at
        {
            return Err(PlatformError::permanent(
                ErrorClass::Timeout,
                "the request's expires_at passed before it could be provisioned; nothing was made",
            ));
        }
        let target = || request.target().map_err(PlatformError::from);
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
                    let target = target()?;
                    let mut gone = self.platform.teardown(&target).await?;
                    // Nothing found by the request's tags may be a create still landing
                    // or a listing that lags (its provision may have ended in error a
                    // moment ago): one more look once the platform has settled, as the
                    // removal of a failed provision's resources does, before `stopped`
                    // says nothing of it is left.
                    let settle = self.platform.settle_time();
                    if gone.is_none()
                        && matches!(target, TeardownTarget::Request(_))
                        && !settle.is_zero()
                    {
                        tokio::time::sleep(settle).await;
                        self.pacer.pace(self.platform.rate_limits(request)).await;
                        gone = self.platform.teardown(&target).await?;
                    }
                    Ok(Outcome {
                        resource: gone,
                        state: None,
                    })
                }
                Operation::Start => self.platform.start(&target()?).await.map(Outcome::of),
                Operation::Stop => self.platform.stop(&target()?).await.map(Outcome::of),
                Operation::Reboot => self.platform.reboot(&target()?).await.map(Outcome::of),
                Operation::Describe => self.describe_settled(&target()?).await,
            }
        };
        // A span of its own, so a trace shows the platform's share of the delivery.
        let span = tracing::info_span!(
            "platform_call",
            operation = %request.operation,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            error.class = tracing::field::Empty,
        );
        let timed = tokio::time::timeout(self.config.operation_timeout, call)
            .instrument(span.clone())
            .await;
        let result = match timed {
            Ok(result) => result,
            Err(_) => Err(PlatformError::retryable(
                ErrorClass::Timeout,
                format!(
                    "the platform call took longer than {} s",
                    self.config.operation_timeout.as_secs()
                ),
            )),
        };
        if let Err(e) = &result {
            span.record("otel.status_code", "ERROR");
            span.record("error.class", e.class.as_str());
        }
        result
    }

    /// `describe` ends in a terminal state: a resource in transition (starting,
    /// stopping) is looked at again until it settles, within `describe_settle`.
    pub(super) async fn describe_settled(
        &self,
        target: &TeardownTarget,
    ) -> Result<Outcome, PlatformError> {
        let give_up = tokio::time::Instant::now() + self.config.describe_settle;
        let mut pause = Duration::from_millis(500);
        loop {
            let Some(found) = self.platform.describe(target).await? else {
                // Nothing there is an answer too: nothing runs.
                return Ok(Outcome {
                    state: Some(State::Stopped),
                    resource: None,
                });
            };
            if found.state.is_terminal() {
                return Ok(Outcome {
                    state: Some(found.state),
                    resource: Some(found.resource),
                });
            }
            if tokio::time::Instant::now() + pause > give_up {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "{target} is still {} after {} s; describe it again later",
                        found.state,
                        self.config.describe_settle.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}
