//! One attempt at a request, from the claim to the settlement.
//!
//! Claim → (past the attempt bound: give up) → (tombstoned provision: end, nothing made)
//! → (acting on another request's resource: take the actor lease) → working event →
//! platform call under the lease heartbeat → terminal event stored (fenced) and published,
//! or a retry. A provision that ends in `error` leaves nothing behind: what it may have
//! made is removed first. A panic anywhere after the claim counts as a failed attempt.
//!
//! This module holds the claim and the order of the steps; the platform call is in
//! `platform_call`, and how an attempt ends (recorded, published, retried, cleaned up)
//! in `ending`.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use provisioner_events::{ErrorClass, Operation, Request, RequestId, State, TeardownTarget};
use tracing::{debug, error, info};

use super::lease::{Heartbeat, LeaseSignal};
use super::pacing::Pacing;
use super::{Abort, Worker, panic_text};
use crate::broker::{Delivery, PendingConfirm, Settlement};
use crate::platform::PlatformError;
use crate::policy;
use crate::store::{
    Actor, Claim, ClaimRequest, Fence, QuotaGrant, Release, StoreError, TargetGrant,
};

/// How long a create call dropped halfway may still take to land on the platform.
const LATE_CREATE: Duration = Duration::from_secs(2);

/// How long a cancelled platform call may take to finish the step it is in (a create,
/// a start) before it is dropped where it stands. Its health wait ends at once.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// The claim this attempt holds.
pub(super) struct Held<'a> {
    pub(super) request: &'a Request,
    pub(super) fence: Fence,
    pub(super) attempt: u32,
    /// The next `seq` to use.
    pub(super) seq: u64,
    /// The target's request id, when this request holds the actor lease on it.
    pub(super) acting_on: Option<RequestId>,
    /// An instant no later than the store started the lease.
    pub(super) claimed_before: tokio::time::Instant,
    /// The confirm of the working event (`starting`, `stopping`), awaited with the
    /// terminal event's rather than before the platform call: nothing depends on it
    /// until then, and two confirms in flight together cost one wait.
    /// (In a mutex only to make `Held` shareable; it is reached through `&mut`.)
    pub(super) working_confirm: std::sync::Mutex<Option<PendingConfirm>>,
    /// How often the delivery was parked before (none for a fleet's coordinator).
    pub(super) waits: u32,
    /// Whether this attempt began to send an event (then the number it took is used).
    pub(super) sent: bool,
}

impl Held<'_> {
    pub(super) fn id(&self) -> &str {
        self.request.request_id.as_str()
    }

    pub(super) fn actor(&self) -> Actor<'_> {
        Actor {
            request_id: self.request.request_id.as_str(),
            nonce: &self.fence.nonce,
        }
    }

    /// How to give the claim back after the attempt failed: with the status number its
    /// claim took, too, when it never began to send an event (a publish that timed out
    /// may have gone out, so beginning counts).
    pub(super) fn failed(&self) -> Release {
        if self.sent {
            Release::Failed
        } else {
            Release::FailedUnsent
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
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
    /// The nonce of this delivery's claim: that of the request's unanswered claim, if
    /// there is one, else a new one. It is taken: the same nonce is the same claimant,
    /// so two copies in flight at once must not both send it.
    fn claim_nonce(&self, id: &str) -> String {
        let mut unanswered = self
            .unanswered_claims
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        unanswered.remove(id).unwrap_or_else(|| self.env.nonce())
    }

    /// Before the platform is touched: when the steps since the claim took a third of
    /// the lease or more (a slow store, a long wait for a target), the lease is renewed
    /// here, so a lease that ran out meanwhile is found now, not after the platform call
    /// (the heartbeat, a task of its own, might not run before the call starts). `Some`:
    /// how the delivery ends, the request being another worker's now.
    async fn lease_still_ours(&self, held: &mut Held<'_>) -> Result<Option<Settlement>, Abort> {
        let lease = self.config.lease;
        if tokio::time::Instant::now() < held.claimed_before + lease / 3 {
            return Ok(None);
        }
        let sent = tokio::time::Instant::now();
        let renewed = self
            .store_call(|| self.store.renew(held.id(), &held.fence, lease))
            .await;
        match renewed {
            // A tombstone (`Cancelled`) is the heartbeat's to report, at its first renewal.
            Ok(_) => held.claimed_before = sent,
            Err(StoreError::Fenced(_) | StoreError::Missing(_)) => {
                return self.fenced_off(held).await.map(Some);
            }
            Err(e) => {
                self.end_acting(held, None).await;
                return Err(e.into());
            }
        }
        if let Some(target) = &held.acting_on
            && let Err(e) = self
                .store
                .renew_act(target.as_str(), held.actor(), lease)
                .await
        {
            debug!(error = %e, "could not renew the actor lease on the target; the heartbeat tries again");
        }
        Ok(None)
    }

    /// Whether a message about to wait again has waited its fill (`max_waits`).
    fn waited_enough(&self, delivery: &Delivery) -> bool {
        delivery.waits.saturating_add(1) > self.config.max_waits
    }

    /// Remembers a claim that got no answer, for the next copy to send again.
    fn claim_answered(&self, id: &str, nonce: &str, answered: bool) {
        if answered {
            return;
        }
        let mut unanswered = self
            .unanswered_claims
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if unanswered.len() >= super::UNANSWERED_CLAIMS {
            // Rare (the store failing thousands of claims): forgetting them all is as
            // good as choosing, and bounded.
            unanswered.clear();
        }
        unanswered.insert(id.to_owned(), nonce.to_owned());
    }

    pub(super) async fn run_request(
        &self,
        request: &Request,
        delivery: &Delivery,
    ) -> Result<Settlement, Abort> {
        let (working_state, _) = states_of(request);
        let id = request.request_id.as_str();
        let payload_hash = request.payload_hash();
        if request.is_fleet()
            && let Some(settlement) = self.fleet_copy(request, &payload_hash).await?
        {
            return Ok(settlement);
        }
        let routing_key = request.routing_key();
        let nonce = self.claim_nonce(id);
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
            .await;
        self.claim_answered(id, &nonce, claim.is_ok());
        let (fence, seq, attempt, torn_down_by) = match claim? {
            Claim::Claimed {
                fence,
                seq,
                attempt,
                takeover,
                torn_down_by,
                ..
            } => {
                if takeover {
                    self.metrics.takeover();
                    info!(
                        fence = fence.counter,
                        attempt, "claimed again after an earlier attempt or a lost holder"
                    );
                }
                (fence, seq, attempt, torn_down_by)
            }
            Claim::Done(event) => {
                debug!(state = %event.state, "already finished; publishing its result again");
                // The first delivery may have died between recording its end and what
                // follows it: give back what the end frees (both are idempotent).
                self.publish_recorded_end(request, &event).await?;
                return Ok(Settlement::Ack);
            }
            Claim::Held { remaining, .. } if self.is_handed_over_fleet(id).await => {
                // A copy of a fleet's message: the fleet is in a worker's hands. Its
                // holder may have died between keeping the fleet and scheduling it, so
                // make sure it comes due once that holder's lease is out (scheduling
                // again only moves the time).
                let schedule = super::fleet_schedule(self.platform.name());
                let due = self.env.now() + remaining;
                self.store_call(|| self.store.schedule_expiry(&schedule, id, due))
                    .await?;
                debug!("a fleet already handed over; this copy has nothing to do");
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
            waits: delivery.waits,
            sent: false,
        };
        // From here on this worker holds the lease: whatever happens, including a panic,
        // the attempt ends in a settlement that lets the request go on or end.
        match AssertUnwindSafe(self.attempt(&mut held, delivery, torn_down_by))
            .catch_unwind()
            .await
        {
            Ok(Ok(settlement)) => Ok(settlement),
            Ok(Err(abort)) => {
                // The broker or the store failed the attempt, not the request: its claim
                // goes back with the attempt refunded (the number it took too, if it sent
                // nothing), and the message waits (counted toward MAX_WAITS), so an
                // outage neither burns the request's attempts nor leaves it held until its
                // lease runs out.
                let how = if held.sent {
                    Release::HandedOver
                } else {
                    Release::Untried
                };
                let _ = self.store.release(id, &held.fence, how).await;
                self.end_acting(&held, None).await;
                Err(abort)
            }
            Err(panic) => {
                let what = panic_text(panic.as_ref());
                error!(panic = %what, "the attempt panicked; it counts as failed");
                let _ = self.store.release(id, &held.fence, held.failed()).await;
                self.end_acting(&held, None).await;
                Ok(Settlement::Retry {
                    delay: policy::backoff(&self.config.retry, attempt, self.env.jitter()),
                    attempt: attempt + 1,
                    waits: delivery.waits,
                })
            }
        }
    }

    /// A copy of a fleet's message, once the fleet is kept: its coordinators carry it on,
    /// so the copy claims nothing (a claim would count an attempt against the fleet, and
    /// past the bound give it up). It publishes the fleet's end again if there is one,
    /// and otherwise makes sure the fleet is on the schedule (its first holder may have
    /// died between keeping and scheduling it). `None`: not such a copy.
    async fn fleet_copy(
        &self,
        request: &Request,
        payload_hash: &str,
    ) -> Result<Option<Settlement>, Abort> {
        let id = request.request_id.as_str();
        let record = self.store_call(|| self.store.get(id)).await?;
        let Some(record) = record.filter(|r| r.payload_hash.as_deref() == Some(payload_hash))
        else {
            return Ok(None);
        };
        if let Some(end) = record.result {
            debug!(state = %end.state, "the fleet ended before; publishing its end again");
            self.publish_recorded_end(request, &end).await?;
            return Ok(Some(Settlement::Ack));
        }
        if !self.is_handed_over_fleet(id).await {
            return Ok(None);
        }
        let schedule = super::fleet_schedule(self.platform.name());
        let due = self.env.now() + record.lease_remaining.unwrap_or_default();
        self.store_call(|| self.store.schedule_expiry(&schedule, id, due))
            .await?;
        debug!("a fleet already handed over; this copy has nothing to do");
        Ok(Some(Settlement::Ack))
    }

    async fn attempt(
        &self,
        held: &mut Held<'_>,
        delivery: &Delivery,
        torn_down_by: Option<String>,
    ) -> Result<Settlement, Abort> {
        let request = held.request;
        let (working_state, done_state) = states_of(request);
        // Past the bound, a request acting on a resource has one last try, whose failure
        // (a panic included) ends it: an earlier attempt may have half done its work (a
        // teardown that removed the resource and died before recording it), and only
        // carrying it out says what became of the resource. After that, or for a
        // provision, give up.
        let acts_on_a_resource = matches!(
            request.operation,
            Operation::Teardown | Operation::Stop | Operation::Start | Operation::Reboot
        ) && !request.dry_run;
        let last_try = acts_on_a_resource && held.attempt == self.config.retry.max_attempts + 1;
        if held.attempt > self.config.retry.max_attempts && !last_try {
            return self.give_up(held).await;
        }
        crate::fault::point("after_claim");
        if let Some(by) = torn_down_by
            && request.operation == Operation::Provision
        {
            // Usually nothing was made. But an earlier attempt (or one whose record the
            // store lost) may have made something the teardown did not see: look, and
            // remove it.
            return self.end_torn_down(held, &by, "before it could run").await;
        }
        if request.operation == Operation::Provision
            && !request.dry_run
            && !request.is_fleet()
            && let Some(tenant) = &request.tenant
        {
            // Reserved before anything is made, atomically against the tenant's limit;
            // a retry of this request holds the same reservation.
            let id = held.id().to_owned();
            let cost = match self.platform.quota_cost(request).await {
                Ok(cost) => cost,
                Err(failure) => return self.finish(held, delivery, done_state, Err(failure)).await,
            };
            let grant = self
                .store_call(|| self.store.reserve_quota(tenant, &id, &held.fence, &cost))
                .await;
            let grant = match grant {
                Err(StoreError::Fenced(_)) => return self.fenced_off(held).await,
                grant => grant?,
            };
            if let QuotaGrant::Exceeded {
                unit,
                limit,
                used,
                wanted,
            } = grant
            {
                let message = if unit == crate::store::MACHINES {
                    format!(
                        "tenant {tenant} holds {used} of its {limit} machines; nothing was made. Tear one of them down, or raise the quota (provisioner quota set {tenant} <limit>)"
                    )
                } else {
                    format!(
                        "tenant {tenant} holds {used} of its {limit} {unit} and this provision needs {wanted} more; nothing was made. Tear some down, or raise the quota (provisioner quota set {tenant} <limit> --unit {unit})"
                    )
                };
                return self
                    .end_in_error(held, ErrorClass::Quota, message, None)
                    .await;
            }
        }
        let target = match acted_on(request) {
            Some(target) => Some(target),
            None => match self.resource_owner(request).await {
                Ok(Some(owner)) => Some(owner),
                // Gone already: an earlier attempt of this teardown may have removed it
                // and died before its end freed what the owner held.
                Ok(None) => self.recorded_target(request).await?,
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
                    if self.waited_enough(delivery) {
                        // This request holds its own record, which a message set aside
                        // would leave in progress for good: it ends, saying why.
                        let message = format!(
                            "its target {target} was being worked on (lately by {by}) each of the {} times this request looked, so nothing was done to it; send it again once the target is free",
                            delivery.waits + 1
                        );
                        return self
                            .end_in_error(held, ErrorClass::Timeout, message, None)
                            .await;
                    }
                    // Not an attempt: give it back and look again once the target's
                    // worker has had time to see a tombstone or finish.
                    let _ = self
                        .store
                        .release(held.id(), &held.fence, Release::Untried)
                        .await;
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

        match self.fleet_of(request, held.acting_on.as_ref()).await? {
            Ok(Some(fleet)) => return self.hand_off_fleet(held, fleet).await,
            Ok(None) => {}
            Err(reason) => {
                return self
                    .end_in_error(held, ErrorClass::Permission, reason, None)
                    .await;
            }
        }
        let limits = self.rate_limits_of(request);
        let pace = match self.reserve_tokens(&limits).await {
            Pacing::Go(wait) => {
                self.metrics.rate_limit_wait(wait);
                wait
            }
            Pacing::Later(again) => {
                if self.waited_enough(delivery) {
                    let message = format!(
                        "the platform's API rate limit was taken further ahead each of the {} times this request looked, so nothing was done; send it again when the platform is less busy",
                        delivery.waits + 1
                    );
                    return self
                        .end_in_error(held, ErrorClass::Throttled, message, None)
                        .await;
                }
                // Not an attempt: the queue holds it until its tokens come near.
                let _ = self
                    .store
                    .release(held.id(), &held.fence, Release::Untried)
                    .await;
                self.end_acting(held, None).await;
                return Ok(self
                    .wait_again(
                        request,
                        delivery,
                        again,
                        "the platform's API rate limit is taken further ahead".into(),
                    )
                    .await);
            }
        };
        if let Some(settlement) = self.lease_still_ours(held).await? {
            return Ok(settlement);
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
            held.sent = true;
            let confirm = self.broker.send_status(&working).await?;
            *held
                .working_confirm
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()) = Some(confirm);
            let mut signal = heartbeat.signal();
            let (cancel, cancelled) = tokio::sync::watch::channel(false);
            let call = AssertUnwindSafe(async {
                // Slept under the heartbeat: the lease is kept while waiting our turn,
                // and a teardown that comes meanwhile ends the wait (nothing was sent).
                let mut cancel_seen = cancelled.clone();
                tokio::select! {
                    biased;
                    _ = cancel_seen.wait_for(|cancelled| *cancelled) => {}
                    _ = tokio::time::sleep(pace) => {}
                }
                if *cancelled.borrow() {
                    return Err(crate::metrics::WaitCancelled.into());
                }
                let called = std::time::Instant::now();
                let result = crate::metrics::platform_call_scope(
                    self.metrics.clone(),
                    cancelled.clone(),
                    self.call_platform(request),
                )
                .await;
                self.metrics.platform_call(
                    request.operation,
                    result.as_ref().err().map(|e| e.class),
                    called.elapsed(),
                );
                self.adapt_rates(limits, &result);
                result
            })
            .catch_unwind();
            let panicked = |panic: Box<dyn std::any::Any + Send>| {
                Err(PlatformError::retryable(
                    ErrorClass::Internal,
                    format!(
                        "the worker panicked calling the platform: {}",
                        panic_text(panic.as_ref())
                    ),
                ))
            };
            let mut call = std::pin::pin!(call);
            tokio::select! {
                biased;
                result = &mut call => Ok(Ok(result.unwrap_or_else(panicked))),
                lost = signal.lost() => {
                    if let LeaseSignal::Cancelled { .. } = lost {
                        // A create or start already sent lands on the platform whether
                        // we wait or not. So, still under the lease (the teardown waits
                        // for it), let the call finish its step (its health wait ends
                        // at once), and `cancelled` removes what it made after. Only a
                        // call stuck past the grace is dropped where it stands: then
                        // remove, and give a late create time to land before the
                        // removal `cancelled` does after.
                        cancel.send_replace(true);
                        if tokio::time::timeout(CANCEL_GRACE, &mut call).await.is_err() {
                            self.remove_what_was_made(request).await;
                            tokio::time::sleep(LATE_CREATE).await;
                        }
                    }
                    Ok::<_, Abort>(Err(lost))
                }
            }
        }
        .await;
        let signal = heartbeat.stop();
        crate::fault::point("after_platform_call");
        let result = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(signal)) => return self.stopped(held, delivery, signal).await,
            // Given back (with the attempt refunded) by the caller.
            Err(abort) => return Err(abort),
        };
        if let LeaseSignal::Cancelled { by } = signal
            && request.operation == Operation::Provision
        {
            return self.cancelled(held, &by).await;
        }
        self.finish(held, delivery, done_state, result).await
    }
}
