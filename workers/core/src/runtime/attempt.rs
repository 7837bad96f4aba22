//! One attempt at a request, from the claim to the settlement.
//!
//! Claim → (past the attempt bound: give up) → (tombstoned provision: end, nothing made)
//! → (acting on another request's resource: take the actor lease) → working event →
//! platform call under the lease heartbeat → terminal event stored (fenced) and published,
//! or a retry. A provision that ends in `error` leaves nothing behind: what it may have
//! made is removed first. A panic anywhere after the claim counts as a failed attempt.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use provisioner_events::{
    ErrorClass, ErrorInfo, Operation, Request, RequestId, Resource, State, TeardownTarget,
};
use time::OffsetDateTime;
use tracing::{debug, error, info, warn};

use super::lease::{Heartbeat, LeaseSignal};
use super::{Abort, Worker, panic_text};
use crate::broker::{Delivery, PendingConfirm, Settlement};
use crate::platform::PlatformError;
use crate::policy::{self, Decision};
use crate::store::{Actor, Claim, ClaimRequest, Fence, StoreError, TargetGrant};

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

/// The claim this attempt holds.
struct Held<'a> {
    request: &'a Request,
    fence: Fence,
    attempt: u32,
    /// The next `seq` to use.
    seq: u64,
    /// The target's request id, when this request holds the actor lease on it.
    acting_on: Option<RequestId>,
    /// An instant no later than the store started the lease.
    claimed_before: tokio::time::Instant,
    /// The confirm of the working event (`starting`, `stopping`), awaited with the
    /// terminal event's rather than before the platform call: nothing depends on it
    /// until then, and two confirms in flight together cost one wait.
    /// (In a mutex only to make `Held` shareable; it is reached through `&mut`.)
    working_confirm: std::sync::Mutex<Option<PendingConfirm>>,
}

impl Held<'_> {
    fn id(&self) -> &str {
        self.request.request_id.as_str()
    }

    fn actor(&self) -> Actor<'_> {
        Actor {
            request_id: self.request.request_id.as_str(),
            nonce: &self.fence.nonce,
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }
}

/// The states an operation works in and ends in.
fn states_of(request: &Request) -> (State, State) {
    match request.operation {
        _ if request.dry_run => (State::NotStarted, State::Checked),
        Operation::Provision | Operation::Start | Operation::Reboot => {
            (State::Starting, State::Running)
        }
        Operation::Teardown | Operation::Stop => (State::Stopping, State::Stopped),
        Operation::Describe => (State::NotStarted, State::Running),
    }
}

/// The request whose resource this one changes, when it names it by request id.
fn acted_on(request: &Request) -> Option<RequestId> {
    match request.operation {
        Operation::Teardown | Operation::Stop | Operation::Start | Operation::Reboot
            if !request.dry_run =>
        {
            match request.target() {
                Ok(TeardownTarget::Request(target)) => Some(target),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Worker {
    pub(super) async fn run_request(
        &self,
        request: &Request,
        delivery: &Delivery,
    ) -> Result<Settlement, Abort> {
        let (working_state, _) = states_of(request);
        let id = request.request_id.as_str();
        let payload_hash = request.payload_hash();
        let routing_key = request.routing_key();
        let nonce = Fence::new_nonce();
        // Taken before each try, so the local lease deadline never outlives the store's.
        let claimed_before = std::sync::Mutex::new(tokio::time::Instant::now());
        let claim = self
            .store_call(|| {
                *claimed_before.lock().unwrap_or_else(|e| e.into_inner()) =
                    tokio::time::Instant::now();
                self.store.claim(ClaimRequest {
                    request_id: id,
                    payload_hash: &payload_hash,
                    owner: &self.config.worker_id,
                    nonce: &nonce,
                    lease: self.config.lease,
                    working_state,
                    routing_key: &routing_key,
                })
            })
            .await?;
        let (fence, seq, attempt, torn_down_by) = match claim {
            Claim::Claimed {
                fence,
                seq,
                attempt,
                takeover,
                torn_down_by,
            } => {
                if takeover {
                    info!(
                        fence = fence.counter,
                        attempt, "claimed again after an earlier attempt or a lost holder"
                    );
                }
                (fence, seq, attempt, torn_down_by)
            }
            Claim::Done(event) => {
                debug!(state = %event.state, "already finished; publishing its result again");
                self.broker.publish_status(&event).await?;
                return Ok(Settlement::Ack);
            }
            Claim::Held { remaining, owner } => {
                let delay = remaining.max(Duration::from_millis(500)) + Duration::from_millis(250);
                return Ok(self
                    .wait_again(request, delivery, delay, format!("{owner} holds it"))
                    .await);
            }
            Claim::Conflict => {
                let message = format!(
                    "request_id {id} was already used for a different request; nothing was done. Use a new request_id for a new request"
                );
                return Ok(self
                    .refuse(
                        delivery,
                        Self::refusal_of(request, ErrorClass::Conflict, message),
                    )
                    .await);
            }
        };
        tracing::Span::current().record("attempt", attempt);
        let mut held = Held {
            request,
            fence,
            attempt,
            seq,
            acting_on: None,
            claimed_before: *claimed_before.lock().unwrap_or_else(|e| e.into_inner()),
            working_confirm: std::sync::Mutex::new(None),
        };
        // From here on this worker holds the lease: whatever happens, including a panic,
        // the attempt ends in a settlement that lets the request go on or end.
        match AssertUnwindSafe(self.attempt(&mut held, delivery, torn_down_by))
            .catch_unwind()
            .await
        {
            Ok(settlement) => settlement,
            Err(panic) => {
                let what = panic_text(panic.as_ref());
                error!(panic = %what, "the attempt panicked; it counts as failed");
                let _ = self.store.release(id, &held.fence, false).await;
                self.end_acting(&held, None).await;
                Ok(Settlement::Retry {
                    delay: policy::backoff(&self.config.retry, attempt, rand::random()),
                    attempt: attempt + 1,
                    waits: delivery.waits,
                })
            }
        }
    }

    async fn attempt(
        &self,
        held: &mut Held<'_>,
        delivery: &Delivery,
        torn_down_by: Option<String>,
    ) -> Result<Settlement, Abort> {
        let request = held.request;
        let (working_state, done_state) = states_of(request);
        if held.attempt > self.config.retry.max_attempts {
            return self.give_up(held).await;
        }
        crate::fault::point("after_claim");
        if let Some(by) = torn_down_by
            && request.operation == Operation::Provision
        {
            let message = format!(
                "{by} tore this request down before it could run; nothing was made. A request id names one request for good: use a new one to provision again"
            );
            return self
                .end_in_error(held, ErrorClass::Conflict, message, None)
                .await;
        }
        let target = match acted_on(request) {
            Some(target) => Some(target),
            None => match self.resource_owner(request).await {
                Ok(owner) => owner,
                Err(failure) => return self.finish(held, delivery, done_state, Err(failure)).await,
            },
        };
        if let Some(target) = target {
            let grant = self
                .store_call(|| {
                    self.store.act_on(
                        target.as_str(),
                        held.actor(),
                        self.config.lease,
                        request.operation == Operation::Teardown,
                    )
                })
                .await?;
            match grant {
                TargetGrant::Granted => held.acting_on = Some(target),
                TargetGrant::Busy { remaining, by } => {
                    // Not an attempt: give it back and look again once the target's
                    // worker has had time to see a tombstone or finish.
                    let _ = self.store.release(held.id(), &held.fence, true).await;
                    let delay = remaining.min(self.config.lease / 3) + Duration::from_millis(250);
                    return Ok(self
                        .wait_again(
                            request,
                            delivery,
                            delay,
                            format!("its target {target} is being worked on by {by}"),
                        )
                        .await);
                }
            }
        }

        let heartbeat = Heartbeat::start(
            self.store.clone(),
            held.id().to_owned(),
            held.fence.clone(),
            held.acting_on.as_ref().map(|t| t.to_string()),
            self.config.lease,
            held.claimed_before,
            request.operation == Operation::Provision,
        );
        let working = self.event(
            request,
            working_state,
            held.next_seq(),
            held.attempt,
            None,
            None,
        );
        let outcome = async {
            let confirm = self.broker.send_status(&working).await?;
            *held.working_confirm.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(confirm);
            let mut signal = heartbeat.signal();
            let call = AssertUnwindSafe(self.call_platform(request)).catch_unwind();
            tokio::select! {
                result = call => Ok(Ok(result.unwrap_or_else(|panic| {
                    Err(PlatformError::retryable(
                        ErrorClass::Internal,
                        format!("the worker panicked calling the platform: {}", panic_text(panic.as_ref())),
                    ))
                }))),
                lost = signal.lost() => Ok::<_, Abort>(Err(lost)),
            }
        }
        .await;
        let signal = heartbeat.stop();
        crate::fault::point("after_platform_call");
        let result = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(signal)) => return self.stopped(held, delivery, signal).await,
            Err(abort) => {
                // Let the redelivery claim at once instead of waiting out our lease.
                let _ = self.store.release(held.id(), &held.fence, false).await;
                self.end_acting(held, None).await;
                return Err(abort);
            }
        };
        if let LeaseSignal::Cancelled { by } = signal
            && request.operation == Operation::Provision
        {
            return self.cancelled(held, &by).await;
        }
        self.finish(held, delivery, done_state, result).await
    }

    /// The request whose resource a request names by `resource_id` acts on, as the
    /// platform's ownership tags tell: it serializes with that request (and a teardown
    /// tombstones it) as if it had named `target_request_id`.
    async fn resource_owner(&self, request: &Request) -> Result<Option<RequestId>, PlatformError> {
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

    /// The heartbeat stopped the work before the platform answered.
    async fn stopped(
        &self,
        held: &mut Held<'_>,
        delivery: &Delivery,
        signal: LeaseSignal,
    ) -> Result<Settlement, Abort> {
        match signal {
            LeaseSignal::Cancelled { by } => self.cancelled(held, &by).await,
            LeaseSignal::Fenced => {
                warn!("another worker took the request over; it finishes it");
                if self.torn_down(held.id()).await {
                    self.remove_what_was_made(held.request).await;
                }
                Ok(Settlement::Ack)
            }
            LeaseSignal::Held | LeaseSignal::Expired => {
                warn!(
                    "the lease could not be renewed before it ended; stopped the work (the next holder converges on the same resource)"
                );
                self.end_acting(held, None).await;
                Ok(Settlement::Retry {
                    delay: policy::backoff(&self.config.retry, held.attempt, rand::random()),
                    attempt: held.attempt + 1,
                    waits: delivery.waits,
                })
            }
        }
    }

    /// A teardown tombstoned this provision while it worked: remove what it made and end.
    async fn cancelled(&self, held: &mut Held<'_>, by: &str) -> Result<Settlement, Abort> {
        info!(%by, "torn down while being provisioned; removing what was made");
        let removal = self.remove_what_was_made(held.request).await;
        let message = format!(
            "{by} tore this request down while it was being provisioned; {removal}. A request id names one request for good: use a new one to provision again"
        );
        self.end_in_error(held, ErrorClass::Conflict, message, None)
            .await
    }

    /// Past the bound of attempts: the earlier ones ended without an outcome (a crash, a
    /// panic, a lost lease). End in `error`, leave nothing behind, and set the message aside.
    async fn give_up(&self, held: &mut Held<'_>) -> Result<Settlement, Abort> {
        let attempts = held.attempt - 1;
        let removal = if held.request.operation == Operation::Provision {
            format!("; {}", self.remove_what_was_made(held.request).await)
        } else {
            String::new()
        };
        let message = format!(
            "gave up after {attempts} attempts that ended without an outcome (a worker crashed, panicked or lost its lease each time; see the workers' logs for request {}){removal}",
            held.id()
        );
        let settlement = self
            .end_in_error(held, ErrorClass::Internal, message.clone(), None)
            .await?;
        Ok(match settlement {
            Settlement::Ack => Settlement::DeadLetter {
                class: ErrorClass::Internal,
                reason: message,
            },
            other => other,
        })
    }

    /// Whether a teardown tombstoned `request_id` (read after being fenced off).
    async fn torn_down(&self, request_id: &str) -> bool {
        matches!(
            self.store.get(request_id).await,
            Ok(Some(record)) if record.torn_down_by.is_some()
        )
    }

    /// Removes whatever this provision may have made, by its request id (idempotent);
    /// says how that went, for the event.
    async fn remove_what_was_made(&self, request: &Request) -> String {
        if request.operation != Operation::Provision || request.dry_run {
            return "nothing was made".into();
        }
        let target = TeardownTarget::Request(request.request_id.clone());
        let removal = tokio::time::timeout(
            self.config.operation_timeout,
            self.platform.teardown(&target),
        )
        .await;
        match removal {
            Ok(Ok(Some(_))) => "what it had made was removed".into(),
            Ok(Ok(None)) => "nothing of it was left".into(),
            Ok(Err(e)) => {
                error!(error = %e, "could not remove what a failed provision made");
                format!(
                    "removing what it may have made failed ({e}): send a teardown for {}",
                    request.request_id
                )
            }
            Err(_) => format!(
                "removing what it may have made took longer than {} s: send a teardown for {}",
                self.config.operation_timeout.as_secs(),
                request.request_id
            ),
        }
    }

    /// Stores and publishes a terminal `error` and ends the attempt.
    async fn end_in_error(
        &self,
        held: &mut Held<'_>,
        class: ErrorClass,
        message: String,
        resource: Option<Resource>,
    ) -> Result<Settlement, Abort> {
        let event = self.event(
            held.request,
            State::Error,
            held.next_seq(),
            held.attempt,
            resource,
            Some(ErrorInfo { class, message }),
        );
        self.record_and_publish(held, event).await
    }

    async fn record_and_publish(
        &self,
        held: &mut Held<'_>,
        event: provisioner_events::StatusEvent,
    ) -> Result<Settlement, Abort> {
        let id = held.id().to_owned();
        let stored = self
            .store_call(|| self.store.complete(&id, &held.fence, &event))
            .await;
        match stored {
            Ok(()) => {}
            Err(StoreError::TornDown(by)) => {
                // The tombstone landed after the platform answered: this provision may
                // only end in error, with nothing left of it.
                return Box::pin(self.cancelled(held, &by)).await;
            }
            Err(StoreError::Fenced(_)) => {
                warn!("fenced off: another worker took the request over and finishes it");
                if held.request.operation == Operation::Provision && self.torn_down(&id).await {
                    self.remove_what_was_made(held.request).await;
                }
                return Ok(Settlement::Ack);
            }
            Err(e) => {
                self.end_acting(held, None).await;
                return Err(e.into());
            }
        }
        match &event.error {
            Some(error) => {
                warn!(error.class = %error.class, error.message = %error.message, "failed")
            }
            None => info!(state = %event.state, "done"),
        }
        crate::fault::point("after_record");
        let terminal = self.broker.send_status(&event).await?;
        let working = held
            .working_confirm
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match working {
            // Both in flight at once; either one refused is the broker's trouble, and the
            // message is run again (its record answers with this result).
            Some(working) => {
                let (working, terminal) = futures_util::future::join(working, terminal).await;
                working.and(terminal)?;
            }
            None => terminal.await?,
        }
        let resource_state = event.error.is_none().then_some(event.state);
        self.end_acting(held, resource_state).await;
        Ok(Settlement::Ack)
    }

    /// Ends the actor lease on the target, recording the target's resource state after
    /// a success.
    async fn end_acting(&self, held: &Held<'_>, resource_state: Option<State>) {
        if let Some(target) = &held.acting_on
            && let Err(e) = self
                .store
                .end_act(target.as_str(), held.actor(), resource_state)
                .await
        {
            debug!(error = %e, "could not end the actor lease; it runs out by itself");
        }
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
                Operation::Describe => self.describe_settled(&target()?).await,
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

    /// `describe` ends in a terminal state: a resource in transition (starting,
    /// stopping) is looked at again until it settles, within `describe_settle`.
    async fn describe_settled(&self, target: &TeardownTarget) -> Result<Outcome, PlatformError> {
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

    /// Turns the platform's result into the request's next step: the terminal event
    /// (stored, then published) or a delayed retry.
    async fn finish(
        &self,
        held: &mut Held<'_>,
        delivery: &Delivery,
        done_state: State,
        result: Result<Outcome, PlatformError>,
    ) -> Result<Settlement, Abort> {
        let request = held.request;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(failure) => {
                let decision = policy::decide(
                    &failure,
                    held.attempt,
                    &self.config.retry,
                    OffsetDateTime::now_utc(),
                    request.deadline,
                    rand::random::<f64>(),
                );
                match decision {
                    Decision::Retry { delay } => {
                        info!(error = %failure, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                        let _ = self.store.release(held.id(), &held.fence, false).await;
                        self.end_acting(held, None).await;
                        return Ok(Settlement::Retry {
                            delay,
                            attempt: held.attempt + 1,
                            waits: delivery.waits,
                        });
                    }
                    Decision::Fail(mut info) => {
                        // A provision that ends in error leaves nothing behind; a conflict
                        // may be someone else's resource (or a stopped one of ours).
                        if info.class != ErrorClass::Conflict {
                            let removal = self.remove_what_was_made(request).await;
                            if request.operation == Operation::Provision && !request.dry_run {
                                info.message = format!("{}; {removal}", info.message);
                            }
                        }
                        let class = info.class;
                        let reason = info.message.clone();
                        let settlement = self
                            .end_in_error(held, info.class, info.message, None)
                            .await?;
                        // A worker bug (a panic, an answer it cannot read) is also set
                        // aside for an operator, with the reason.
                        return Ok(match settlement {
                            Settlement::Ack if class == ErrorClass::Internal => {
                                Settlement::DeadLetter { class, reason }
                            }
                            other => other,
                        });
                    }
                }
            }
        };
        let event = self.event(
            request,
            outcome.state.unwrap_or(done_state),
            held.next_seq(),
            held.attempt,
            outcome.resource,
            None,
        );
        self.record_and_publish(held, event).await
    }
}
