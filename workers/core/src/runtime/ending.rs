//! How an attempt ends: the terminal event stored (fenced) and then published, a delayed
//! retry, or giving up; and, when a provision ends in `error` or is torn down while it
//! works, removing what it made first, so nothing is left behind an `error`.

use provisioner_events::{
    ErrorClass, ErrorInfo, Operation, Request, RequestId, Resource, State, StatusEvent,
    TeardownTarget,
};
use tracing::{debug, error, info, warn};

use super::attempt::Held;
use super::lease::{Heartbeat, LeaseSignal};
use super::platform_call::Outcome;
use super::{Abort, Worker};
use crate::broker::{Delivery, Settlement};
use crate::platform::PlatformError;
use crate::policy::{self, Decision};
use crate::store::StoreError;

/// What removing a failed provision's resources came to; its text goes into the event.
#[derive(Debug)]
pub(super) enum Removal {
    /// Not a provision (or a dry run): it made nothing.
    NothingMade,
    Removed,
    NothingLeft,
    /// It could not be done: what went wrong, and that a teardown is needed.
    Failed(String),
}

impl Removal {
    pub(super) fn failed(&self) -> bool {
        matches!(self, Removal::Failed(_))
    }
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Removal::NothingMade => f.write_str("nothing was made"),
            Removal::Removed => f.write_str("what it had made was removed"),
            Removal::NothingLeft => f.write_str("nothing of it was left"),
            Removal::Failed(why) => f.write_str(why),
        }
    }
}

impl Worker {
    /// The heartbeat stopped the work before the platform answered.
    pub(super) async fn stopped(
        &self,
        held: &mut Held<'_>,
        delivery: &Delivery,
        signal: LeaseSignal,
    ) -> Result<Settlement, Abort> {
        match signal {
            LeaseSignal::Cancelled { by } => self.cancelled(held, &by).await,
            LeaseSignal::Fenced => self.fenced_off(held).await,
            LeaseSignal::Held | LeaseSignal::Expired => {
                warn!(
                    "the lease could not be renewed before it ended; stopped the work (the next holder converges on the same resource)"
                );
                self.end_acting(held, None).await;
                Ok(Settlement::Retry {
                    delay: policy::backoff(&self.config.retry, held.attempt, self.env.jitter()),
                    attempt: held.attempt + 1,
                    waits: delivery.waits,
                })
            }
        }
    }

    /// A teardown tombstoned this provision while it worked: remove what it made and end.
    pub(super) async fn cancelled(
        &self,
        held: &mut Held<'_>,
        by: &str,
    ) -> Result<Settlement, Abort> {
        info!(%by, "torn down while being provisioned; removing what was made");
        self.end_torn_down(held, by, "while it was being provisioned")
            .await
    }

    /// Ends a provision a teardown tombstoned (`when` says when it heard), once what it
    /// made is removed. A removal that failed is tried again by the next attempt while
    /// attempts remain: the teardown counted on this provision removing what it made
    /// (it may have found nothing yet, a create landing late), so ending with
    /// "removal failed" would leave it behind.
    pub(super) async fn end_torn_down(
        &self,
        held: &mut Held<'_>,
        by: &str,
        when: &str,
    ) -> Result<Settlement, Abort> {
        let removal = self.remove_while_held(held).await;
        if removal.failed() && held.attempt < self.config.retry.max_attempts {
            warn!(%removal, "could not remove what a torn-down provision made; the next attempt tries again");
            let _ = self
                .store
                .release(held.id(), &held.fence, held.failed())
                .await;
            self.end_acting(held, None).await;
            return Ok(Settlement::Retry {
                delay: policy::backoff(&self.config.retry, held.attempt, self.env.jitter()),
                attempt: held.attempt + 1,
                waits: held.waits,
            });
        }
        let message = format!(
            "{by} tore this request down {when}; {removal}. A request id names one request for good: use a new one to provision again"
        );
        self.end_in_error(held, ErrorClass::Conflict, message, None)
            .await
    }

    /// Past the bound of attempts: the earlier ones ended without an outcome (a crash, a
    /// panic, a lost lease). End in `error`, leave nothing behind, and set the message aside.
    pub(super) async fn give_up(&self, held: &mut Held<'_>) -> Result<Settlement, Abort> {
        let attempts = held.attempt - 1;
        let removal = match held.request.operation {
            Operation::Provision => format!("; {}", self.remove_while_held(held).await),
            Operation::Describe => String::new(),
            // Its attempts died without saying what they did to the resource: one may
            // have done it all.
            _ => match held.request.target() {
                Ok(target) => format!(
                    "; what they did to {target} is not known: describe it, and send another request if need be"
                ),
                Err(_) => String::new(),
            },
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

    /// The claim is not ours any more. Usually another worker took the request over and
    /// finishes it, and this delivery is done. But a record the store lost, and that a
    /// teardown's tombstone made again, is held by nobody: then the request must be claimed
    /// afresh, or it would never end. Either way, a provision torn down meanwhile removes
    /// what it made.
    pub(super) async fn fenced_off(&self, held: &mut Held<'_>) -> Result<Settlement, Abort> {
        let record = self.store.get(held.id()).await;
        if held.request.operation == Operation::Provision
            && matches!(&record, Ok(Some(r)) if r.torn_down_by.is_some())
        {
            self.remove_what_was_made(held.request).await;
        }
        let someone_holds_it = matches!(
            &record,
            Ok(Some(r)) if r.payload_hash.is_some()
                && (r.result.is_some() || r.lease_remaining.is_some())
        );
        self.end_acting(held, None).await;
        if someone_holds_it {
            warn!("fenced off: another worker took the request over and finishes it");
            return Ok(Settlement::Ack);
        }
        warn!(
            "fenced off, and nobody holds the request (its record was lost): it is claimed afresh"
        );
        Ok(Settlement::Retry {
            delay: policy::backoff(&self.config.retry, held.attempt, self.env.jitter()),
            attempt: held.attempt + 1,
            waits: held.waits,
        })
    }

    /// Removes what the held provision made, keeping its lease meanwhile: removing waits
    /// for the API's rate-limit turn and the platform's settle time, and a lease run out
    /// meanwhile would hand the request to another worker under this one's feet.
    pub(super) async fn remove_while_held(&self, held: &Held<'_>) -> Removal {
        let renewed_from = tokio::time::Instant::now();
        let renewed = self
            .store
            .renew(held.id(), &held.fence, self.config.lease)
            .await;
        let _heartbeat = renewed.is_ok().then(|| {
            Heartbeat::start(
                self.store.clone(),
                held.id().to_owned(),
                held.fence.clone(),
                held.acting_on.as_ref().map(|t| t.to_string()),
                self.config.lease,
                renewed_from,
                false,
            )
        });
        self.remove_what_was_made(held.request).await
    }

    /// Removes whatever this provision may have made, by its request id (idempotent);
    /// says how that went, for the event.
    pub(super) async fn remove_what_was_made(&self, request: &Request) -> Removal {
        // A fleet makes nothing of its own: its members are requests of their own.
        if request.operation != Operation::Provision || request.dry_run || request.is_fleet() {
            return Removal::NothingMade;
        }
        self.remove_made_for(&request.request_id).await
    }

    /// Removes what the provision `request_id` made, each call paced as a teardown of it
    /// is. Where the platform's view of what exists may lag ([`Platform::settle_time`]),
    /// a removal that found nothing looks again after that long, so a create that lands
    /// late, or a listing that lags, is not taken for nothing left.
    ///
    /// [`Platform::settle_time`]: crate::Platform::settle_time
    pub(super) async fn remove_made_for(&self, request_id: &RequestId) -> Removal {
        let target = TeardownTarget::Request(request_id.clone());
        let teardown = super::expiry::teardown_request(self.platform.name(), request_id);
        let settle = self.platform.settle_time();
        for look in 0..2 {
            if look == 1 {
                if settle.is_zero() {
                    break;
                }
                tokio::time::sleep(settle).await;
            }
            self.pacer.pace(self.platform.rate_limits(&teardown)).await;
            let removal = tokio::time::timeout(
                self.config.operation_timeout,
                self.platform.teardown(&target),
            )
            .await;
            match removal {
                Ok(Ok(Some(_))) => return Removal::Removed,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    error!(error = %e, "could not remove what a failed provision made");
                    return Removal::Failed(format!(
                        "removing what it may have made failed ({e}): send a teardown for {request_id}"
                    ));
                }
                Err(_) => {
                    return Removal::Failed(format!(
                        "removing what it may have made took longer than {} s: send a teardown for {request_id}",
                        self.config.operation_timeout.as_secs(),
                    ));
                }
            }
        }
        Removal::NothingLeft
    }

    /// Stores and publishes a terminal `error` and ends the attempt.
    pub(super) async fn end_in_error(
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

    pub(super) async fn record_and_publish(
        &self,
        held: &mut Held<'_>,
        event: provisioner_events::StatusEvent,
    ) -> Result<Settlement, Abort> {
        let id = held.id().to_owned();
        let platform = self.platform.name();
        if let Some(at) = expiry_of(held.request, &event) {
            // Scheduled before the result is stored: a result without its schedule would
            // let the resource outlive its time. Scheduling twice only sets the time again.
            let scheduled = self
                .store_call(|| self.store.schedule_expiry(platform.as_str(), &id, at))
                .await;
            if let Err(e) = scheduled {
                self.end_acting(held, None).await;
                return Err(e.into());
            }
        }
        if held.request.operation == Operation::Teardown && event.state == State::Error {
            // A teardown that failed changes nothing about its target: its tombstone
            // goes before its end is recorded (a copy of this teardown that finds the end
            // lifts it again, should this worker die between the two). It may have left
            // one in an earlier attempt without acting on the target in this one (giving
            // up): then the target is the one it names, or the one its record keeps.
            let target = match &held.acting_on {
                Some(target) => Ok(Some(target.clone())),
                None => match &held.request.target_request_id {
                    Some(target) => Ok(Some(target.clone())),
                    None => self.recorded_target(held.request).await,
                },
            };
            let lifted = match target {
                Ok(Some(target)) => self.lift_tombstone(target.as_str(), &id).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = lifted {
                self.end_acting(held, None).await;
                return Err(e.into());
            }
        }
        let stored = self
            .store_call(|| self.store.complete(&id, &held.fence, &event))
            .await;
        match stored {
            Ok(()) => {}
            Err(StoreError::TornDown(by)) => {
                // The tombstone landed after the platform answered: this provision may
                // only end in error, with nothing left of it. That end takes the number
                // of the event that was refused, which nobody saw.
                held.seq = event.seq;
                return Box::pin(self.cancelled(held, &by)).await;
            }
            Err(StoreError::Fenced(_)) => return self.fenced_off(held).await,
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
        self.metrics.request_ended(
            Some(held.request.operation),
            event.state,
            event.error.as_ref().map(|e| e.class),
        );
        crate::fault::point("after_record");
        held.sent = true;
        let resource_state = event.error.is_none().then_some(event.state);
        // What the end frees, given back before the end goes out, so that whoever sees
        // the end sees it freed (a copy that finds the end, and the rounds that publish
        // the outbox, do the same). Should the store fail it, the end waits on the
        // outbox and the message comes again, finds the end and gives it back then.
        let mut freed = Ok(());
        if let (Some(target), Some(State::Stopped)) = (&held.acting_on, resource_state)
            && held.request.operation == Operation::Teardown
        {
            freed = self
                .forget_torn_down(platform.as_str(), target.as_str())
                .await;
        }
        if held.request.operation == Operation::Provision && event.state == State::Error {
            // A provision that ends in error leaves nothing behind, so holds nothing.
            freed = self.release_quota_of(&id).await;
        }
        if let Err(e) = freed {
            self.end_acting(held, resource_state).await;
            return Err(e.into());
        }
        let outbox = super::ends_outbox(platform);
        if let Err(e) = self.publish_end(held, &event).await {
            // The message is run again and its record answers with this end; but should
            // the message be lost too, nothing would: the end, on the outbox since it was
            // recorded, comes due at once for the housekeeping to publish.
            if let Err(store) = self
                .store
                .schedule_expiry(&outbox, &id, self.env.now())
                .await
            {
                debug!(error = %store, "could not bring an unpublished end forward on the outbox");
            }
            return Err(e.into());
        }
        if let Err(e) = self.store.cancel_expiry(&outbox, &id).await {
            // Published again when it comes due: the same event twice, taken once.
            debug!(error = %e, "could not take a published end off the outbox");
        }
        self.end_acting(held, resource_state).await;
        Ok(Settlement::Ack)
    }

    /// What a request's recorded end frees, done again for a copy that finds it ended: a
    /// teardown that stopped its target forgets the target's expiry and quota place, and
    /// a provision that ended in error gives its place back. A teardown that named a
    /// resource id finds its target in its own record (`acts_on`), since the gone
    /// resource can no longer say whose it was. A store that fails it is an error: the
    /// caller waits and comes again, since nothing else ever would.
    pub(super) async fn after_the_end(
        &self,
        request: &Request,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        let platform = self.platform.name();
        let target = || async {
            match &request.target_request_id {
                Some(target) => Ok(Some(target.clone())),
                None => self.recorded_target(request).await,
            }
        };
        match request.operation {
            Operation::Teardown if event.state == State::Stopped && event.error.is_none() => {
                if let Some(target) = target().await? {
                    self.forget_torn_down(platform.as_str(), target.as_str())
                        .await?;
                }
            }
            Operation::Provision if event.state == State::Error => {
                self.release_quota_of(request.request_id.as_str()).await?;
            }
            Operation::Teardown if event.state == State::Error => {
                if let Some(target) = target().await? {
                    self.lift_tombstone(target.as_str(), request.request_id.as_str())
                        .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers again with an end recorded before (a copy of the message, a coordinator
    /// that finds its fleet ended): gives back what it frees (its first publisher may
    /// have died first), publishes it, and takes it off the outbox.
    pub(super) async fn publish_recorded_end(
        &self,
        request: &Request,
        end: &StatusEvent,
    ) -> Result<(), Abort> {
        self.after_the_end(request, end).await?;
        self.broker.publish_status(end).await?;
        let outbox = super::ends_outbox(self.platform.name());
        if let Err(e) = self
            .store
            .cancel_expiry(&outbox, request.request_id.as_str())
            .await
        {
            // Published again when it comes due: the same event twice, taken once.
            debug!(error = %e, "could not take a published end off the outbox");
        }
        Ok(())
    }

    /// Lifts `teardown`'s tombstone from `target` (retried while the store is away).
    async fn lift_tombstone(&self, target: &str, teardown: &str) -> Result<(), StoreError> {
        self.store_call(|| self.store.lift_tombstone(target, teardown))
            .await
    }

    /// What a resource held in the store ends with it: its expiry (which would only send
    /// a teardown of what is gone) and its place in its tenant's quota.
    pub(super) async fn forget_torn_down(
        &self,
        platform: &str,
        request_id: &str,
    ) -> Result<(), StoreError> {
        if let Err(e) = self.store.cancel_expiry(platform, request_id).await {
            // It comes due, finds its resource torn down and is forgotten then.
            debug!(error = %e, "could not forget the expiry of what was torn down");
        }
        self.release_quota_of(request_id).await
    }

    /// Gives back `request_id`'s place in its tenant's quota. Retried while the store is
    /// away; past that, the caller must come back to it: a place never given back would
    /// shrink the tenant's quota for good.
    pub(super) async fn release_quota_of(&self, request_id: &str) -> Result<(), StoreError> {
        let released = self
            .store_call(|| self.store.release_quota(request_id))
            .await;
        if let Err(e) = &released {
            warn!(request.id = %request_id, error = %e, "could not give back a quota reservation yet; it is tried again");
        }
        released
    }

    /// Publishes a recorded end, and waits for the broker to confirm it together with
    /// the attempt's `working` event when that is still in flight; either one refused is
    /// the broker's trouble.
    async fn publish_end(
        &self,
        held: &Held<'_>,
        event: &StatusEvent,
    ) -> Result<(), crate::broker::BrokerError> {
        let terminal = self.broker.send_status(event).await?;
        let working = held
            .working_confirm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match working {
            Some(working) => {
                let (working, terminal) = futures_util::future::join(working, terminal).await;
                working.and(terminal)
            }
            None => terminal.await,
        }
    }

    /// Ends the actor lease on the target, recording the target's resource state after
    /// a success.
    pub(super) async fn end_acting(&self, held: &Held<'_>, resource_state: Option<State>) {
        if let Some(target) = &held.acting_on
            && let Err(e) = self
                .store
                .end_act(target.as_str(), held.actor(), resource_state)
                .await
        {
            debug!(error = %e, "could not end the actor lease; it runs out by itself");
        }
    }

    /// Turns the platform's result into the request's next step: the terminal event
    /// (stored, then published) or a delayed retry.
    pub(super) async fn finish(
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
                // An attempt that may have reached the platform before it failed (a
                // passing fault: the answer may be what was lost), or earlier attempts
                // that did: what they did to the target is not known.
                let in_doubt = failure.retryable || held.attempt > 1;
                let decision = policy::decide(
                    &failure,
                    held.attempt,
                    &self.config.retry,
                    self.env.now_utc(),
                    request.deadline,
                    self.env.jitter(),
                );
                match decision {
                    Decision::Retry { delay } => {
                        info!(error = %failure, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
                        let _ = self
                            .store
                            .release(held.id(), &held.fence, held.failed())
                            .await;
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
                            let removal = self.remove_while_held(held).await;
                            if request.operation == Operation::Provision && !request.dry_run {
                                info.message = format!("{}; {removal}", info.message);
                            }
                        }
                        if in_doubt
                            && matches!(
                                request.operation,
                                Operation::Teardown
                                    | Operation::Stop
                                    | Operation::Start
                                    | Operation::Reboot
                            )
                            && !request.dry_run
                            && let Ok(target) = request.target()
                        {
                            info.message = format!(
                                "{}; what this request's attempts did to {target} before they failed is not known: describe it, and send another request if need be",
                                info.message
                            );
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

/// When the resource a provision's terminal `event` reports should be torn down: for a
/// provision that ends `running` with a `ttl_seconds` (counted from now) or `expires_at`.
fn expiry_of(
    request: &Request,
    event: &provisioner_events::StatusEvent,
) -> Option<std::time::SystemTime> {
    // A fleet's members expire one by one; the fleet itself holds nothing.
    let running = request.operation == Operation::Provision
        && !request.dry_run
        && !request.is_fleet()
        && event.state == State::Running
        && event.error.is_none();
    running
        .then(|| request.expiry(event.timestamp))
        .flatten()
        .map(std::time::SystemTime::from)
}
