//! Fleets: one request for many resources, carried out as one request per member.
//!
//! A provision with `count` N > 1 is a fleet. The worker that receives it claims it like
//! any request, keeps the request in the store, publishes the `starting` event and the N
//! member requests (`<id>#0` … `<id>#N-1`, each with `fleet_member`) through the broker,
//! and hands the fleet over: its claim is given back and the fleet is put on the
//! platform's schedule of fleets to coordinate. The members are ordinary requests, so
//! they spread over every worker of the platform, each with its own idempotency record,
//! retries, quota place, expiry and status events — and a fleet is never larger than N,
//! since member `i` is one request id whatever is redelivered or taken over.
//!
//! Coordinating is a task of the long-running workers ([`Worker::run`]), and of the
//! Lambda form's scheduled invocations ([`Worker::keep_house`]): one of them
//! takes the fleet from the schedule (the store hands each due entry to exactly one
//! worker), claims the fleet under a heartbeat, and reads its members' records twice a
//! second. A coordinator that runs only so long (an invocation) gives the fleet back to
//! the schedule when its time is up, without counting an attempt. It publishes the fleet's progress (`starting` events counting members by
//! state) whenever the counts change, and its one terminal event — `running` with every
//! member listed, or `error` — once every member has ended. When more members failed
//! than `count - min_count` allows, `on_partial: rollback` tears every other member down
//! (those not begun are tombstoned and never make anything) before the fleet ends in
//! `error`; `keep` leaves them running. A coordinator that dies leaves its entry to come
//! due again after a lease: another worker claims the fleet, publishes again the members
//! that have no record yet (a duplicate is answered from its record), and goes on.
//!
//! A teardown naming a fleet's request id is a fleet too: its members tear down
//! `<fleet>#<i>` each, and it ends `stopped` once all of them did.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use provisioner_events::{
    ErrorClass, ErrorInfo, FleetCounts, FleetMember, FleetStatus, MemberResource, OnPartial,
    Operation, PlatformName, Request, RequestId, Resource, State, StatusEvent, TeardownTarget,
    request_routing_key,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::attempt::Held;
use super::lease::{Heartbeat, LeaseSignal};
use super::{Abort, Worker};
use crate::broker::Settlement;
use crate::store::{Claim, ClaimRequest, Release, RequestRecord, StoreError, TargetGrant};

/// How often a coordinator reads its members' records.
const POLL: Duration = Duration::from_millis(500);
/// How often a worker looks for fleets that no one coordinates.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Fleets one look takes at most.
const TAKE_AT_ONCE: usize = 16;
/// How long after its time is up a coordinator may take to hand its fleet back.
const HAND_OVER_GRACE: Duration = Duration::from_secs(2);
/// Member messages in flight to the broker at once.
const PUBLISH_AT_ONCE: usize = 32;

/// How a coordinator's following of its fleet ended.
enum Followed {
    /// Every member ended: the fleet's terminal event, to record and publish.
    Ended(Box<StatusEvent>),
    /// The lease says stop (lost, or a teardown tombstoned the fleet).
    LeaseLost,
    /// The coordinator's time is up; the fleet goes on without it.
    TimeUp,
}

/// The store's schedule of the platform's fleets to coordinate. It is the same kind of
/// schedule as expiries (a set of ids by due time, each due entry handed to one taker),
/// under a name of its own.
pub fn fleet_schedule(platform: PlatformName) -> String {
    format!("{platform}/fleets")
}

/// When a fleet watcher and its coordinators give their fleets back to the schedule: at
/// the instant a Lambda round ends, when a daemon worker is told to stop, or never. A
/// fleet given back is refunded its attempt: handing over is not failing.
#[derive(Debug, Clone)]
pub(super) struct Deadline {
    at: watch::Receiver<Option<Instant>>,
    /// Set from the start (a round that runs only so long), not on a stop.
    bounded: bool,
}

impl Deadline {
    /// A round that ends at `until`.
    pub(super) fn at(until: Instant) -> Self {
        Deadline {
            at: watch::channel(Some(until)).1,
            bounded: true,
        }
    }

    /// Never, until the worker says when (its shutdown).
    pub(super) fn on_stop(stop: watch::Receiver<Option<Instant>>) -> Self {
        Deadline {
            at: stop,
            bounded: false,
        }
    }

    fn instant(&self) -> Option<Instant> {
        *self.at.borrow()
    }

    fn passed(&self) -> bool {
        self.instant().is_some_and(|at| Instant::now() >= at)
    }

    /// Resolves when the deadline comes.
    async fn reached(&mut self) {
        loop {
            if let Some(at) = self.instant() {
                return tokio::time::sleep_until(at).await;
            }
            if self.at.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// What a fleet request does with its members.
#[derive(Debug, Clone)]
enum Plan {
    /// Make `count` resources.
    Provision {
        min_count: u32,
        on_partial: OnPartial,
    },
    /// Tear down every member of the fleet `target`.
    Teardown { target: RequestId },
}

/// A fleet request and its members.
#[derive(Debug, Clone)]
pub(super) struct Fleet {
    request: Request,
    count: u32,
    plan: Plan,
}

impl Fleet {
    fn provision(request: Request) -> Fleet {
        Fleet {
            count: request.count.unwrap_or(1),
            plan: Plan::Provision {
                min_count: request.fleet_min_count(),
                on_partial: request.on_partial.unwrap_or_default(),
            },
            request,
        }
    }

    fn id(&self) -> &str {
        self.request.request_id.as_str()
    }

    /// The state the fleet's events report while its members are at work.
    fn working_state(&self) -> State {
        match self.plan {
            Plan::Provision { .. } => State::Starting,
            Plan::Teardown { .. } => State::Stopping,
        }
    }

    fn member_ids(&self) -> Vec<String> {
        (0..self.count)
            .map(|i| self.request.request_id.member(i).to_string())
            .collect()
    }

    /// The request of member `index`.
    fn member(&self, index: u32) -> Request {
        let fleet_member = Some(FleetMember {
            fleet_request_id: self.request.request_id.clone(),
            index,
            count: self.count,
        });
        let request_id = self.request.request_id.member(index);
        match &self.plan {
            Plan::Provision { .. } => Request {
                request_id,
                count: None,
                min_count: None,
                on_partial: None,
                fleet_member,
                ..self.request.clone()
            },
            Plan::Teardown { target } => Request {
                request_id,
                target_request_id: Some(target.member(index)),
                fleet_member,
                ..self.request.clone()
            },
        }
    }

    /// The id of the teardown that rolls member `index` back.
    fn rollback_id(&self, index: u32) -> String {
        crate::names::follow_up_request_id(
            self.request.request_id.member(index).as_str(),
            "rollback",
        )
    }
}

/// Where a fleet's rollback teardowns stand.
enum Rollbacks {
    /// Every one ended: these members' rollback failed (their resource may still be
    /// there).
    Ended(Vec<u32>),
    /// Some are at work, or have no record (`unseen`: their message or record lost).
    Pending { unseen: Vec<u32> },
}

/// Where a member is, from its record.
fn member_state(record: Option<&RequestRecord>) -> State {
    match record {
        None => State::NotStarted,
        // Only a tombstone: its provision has not arrived yet.
        Some(record) if record.payload_hash.is_none() => State::NotStarted,
        Some(record) => match &record.result {
            Some(result) if result.state == State::Error => State::Error,
            // Ended: the resource's state now (a later teardown makes it `stopped`).
            Some(_) => record.state,
            None => record.state,
        },
    }
}

/// A record no worker attends to: only a tombstone (its request not seen yet), or a
/// request not ended whose lease is out.
fn unattended(record: &RequestRecord) -> bool {
    record.payload_hash.is_none() || record.result.is_none() && record.lease_remaining.is_none()
}

/// What one look at the members found.
struct Look {
    states: Vec<State>,
    counts: FleetCounts,
    /// Every member has ended (its record holds its result).
    all_ended: bool,
}

impl Look {
    fn of(records: &[Option<RequestRecord>]) -> Look {
        let mut counts = FleetCounts::default();
        let states: Vec<State> = records
            .iter()
            .map(|record| {
                let state = member_state(record.as_ref());
                counts.add(state);
                state
            })
            .collect();
        let all_ended = records
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.result.is_some()));
        Look {
            states,
            counts,
            all_ended,
        }
    }
}

impl Worker {
    /// The fleet `request` is, if it is one: a provision of several, or a teardown whose
    /// target (`acting_on`) is a fleet's provision.
    pub(super) async fn fleet_of(
        &self,
        request: &Request,
        acting_on: Option<&RequestId>,
    ) -> Result<Result<Option<Fleet>, String>, Abort> {
        if request.is_fleet() {
            return Ok(Ok(Some(Fleet::provision(request.clone()))));
        }
        let Some(target) = acting_on.filter(|_| request.operation == Operation::Teardown) else {
            return Ok(Ok(None));
        };
        let Some(stored) = self.read_fleet(target.as_str()).await? else {
            return Ok(Ok(None));
        };
        let provision = match stored {
            Ok(provision) => provision,
            Err(reason) => {
                self.metrics.store_entry_refused("fleet");
                return Ok(Err(format!(
                    "the stored request of fleet {target} is not one a worker of this deployment kept ({reason}), so nothing is torn down from it; tear its members down by their ids (<id>#<i>) or resource ids"
                )));
            }
        };
        Ok(Ok(provision.is_fleet().then(|| Fleet {
            count: provision.count.unwrap_or(1),
            plan: Plan::Teardown {
                target: target.clone(),
            },
            request: request.clone(),
        })))
    }

    /// The fleet's own delivery: keep the request, say `starting` (or `stopping`),
    /// publish every member, and hand the coordination to whichever worker takes it from
    /// the schedule. Settles the delivery as soon as the members are with the broker.
    pub(super) async fn hand_off_fleet(
        &self,
        held: &mut Held<'_>,
        fleet: Fleet,
    ) -> Result<Settlement, Abort> {
        let platform = self.platform.name();
        let schedule = fleet_schedule(platform);
        let id = fleet.id().to_owned();
        if fleet.request.request_id.is_member() {
            let message = format!(
                "{id} names a fleet member; a teardown of a whole fleet needs an id without '#'"
            );
            return self
                .end_in_error(held, ErrorClass::InvalidRequest, message, None)
                .await;
        }
        let json = serde_json::to_string(&fleet.request)
            .map_err(|e| StoreError::Corrupt(format!("cannot serialize the fleet: {e}")))?;
        let json = self.seal_fleet(&id, &json, self.env.now());
        let handed = async {
            self.store_call(|| self.store.put_fleet(&id, &json)).await?;
            // If this worker dies before handing over, the fleet still comes due.
            let later = self.env.now() + self.config.lease;
            self.store_call(|| self.store.schedule_expiry(&schedule, &id, later))
                .await?;
            let working = self.fleet_event(
                &fleet,
                held,
                None,
                FleetCounts {
                    not_started: fleet.count,
                    ..FleetCounts::default()
                },
            );
            held.sent = true;
            let confirm = self.broker.send_status(&working).await?;
            self.publish_members(&fleet, (0..fleet.count).collect())
                .await?;
            confirm.await?;
            Ok::<_, Abort>(())
        }
        .await;
        self.end_acting(held, None).await;
        // A failure goes back to the caller, which gives the claim back.
        handed?;
        // Given back with its attempt: coordinating it is the next attempt's work.
        let _ = self
            .store
            .release(&id, &held.fence, Release::HandedOver)
            .await;
        if let Err(e) = self
            .store_call(|| self.store.schedule_expiry(&schedule, &id, self.env.now()))
            .await
        {
            // It comes due a lease later all the same.
            warn!(error = %e, "could not hand the fleet over at once");
        }
        info!(
            members = fleet.count,
            "fleet handed over; its members are queued"
        );
        Ok(Settlement::Ack)
    }

    /// Whether `id` is a fleet handed over to its coordinators (its request is kept).
    pub(super) async fn is_handed_over_fleet(&self, id: &str) -> bool {
        matches!(self.store.fleet(id).await, Ok(Some(_)))
    }

    /// The name a fleet's stored request is sealed under: its kind, platform and id.
    fn fleet_entry(&self, id: &str) -> String {
        format!("fleet {}/{id}", self.platform.name())
    }

    /// The fleet's request as the store keeps it: sealed with the signing keys when the
    /// deployment signs (see [`crate::signing::SigningKeys::seal`]), at `at`.
    fn seal_fleet(&self, id: &str, json: &str, at: SystemTime) -> String {
        match &self.config.signing {
            Some(keys) => keys.seal(&self.fleet_entry(id), json, at),
            None => json.to_owned(),
        }
    }

    /// The fleet request the store keeps under `id`, checked as a message is before
    /// anything is done with it: sealed by a worker of this deployment (when it signs),
    /// readable, valid, and a request of this platform under this id. `Ok(None)` when
    /// there is none; `Ok(Some(Err(reason)))` when what is there is not to be acted on.
    pub(super) async fn read_fleet(
        &self,
        id: &str,
    ) -> Result<Option<Result<Request, String>>, Abort> {
        let Some(stored) = self.store_call(|| self.store.fleet(id)).await? else {
            return Ok(None);
        };
        let what = self.fleet_entry(id);
        let (body, reseal) = match &self.config.signing {
            Some(keys) => match keys.open(&what, &stored, self.env.now(), self.config.retention) {
                Ok(opened) => (
                    opened.body,
                    (!opened.current_key).then_some(opened.sealed_at),
                ),
                Err(reason) => return Ok(Some(Err(reason))),
            },
            None => (crate::signing::unsealed_body(&stored), None),
        };
        let request: Request = match serde_json::from_str(body) {
            Ok(request) => request,
            Err(e) => return Ok(Some(Err(format!("it is not a request: {e}")))),
        };
        if request.request_id.as_str() != id || request.platform != self.platform.name() {
            return Ok(Some(Err(format!(
                "it is the request {} of platform {}, kept under {what}",
                request.request_id, request.platform
            ))));
        }
        if let Err(invalid) = request.validate() {
            return Ok(Some(Err(format!("it is not a valid request: {invalid}"))));
        }
        if let Some(sealed_at) = reseal {
            // Sealed with a key being retired: sealed again with the current one, so the
            // old key can go while the fleet lives on — at its first seal's time, so it
            // lives no longer than that allowed.
            let json = self.seal_fleet(id, body, sealed_at);
            if let Err(e) = self.store.put_fleet(id, &json).await {
                debug!(error = %e, "could not seal a fleet again with the current key");
            }
        }
        Ok(Some(Ok(request)))
    }

    /// Publishes the requests of the members at `indexes`, confirmed.
    async fn publish_members(&self, fleet: &Fleet, indexes: Vec<u32>) -> Result<(), Abort> {
        let routing_key = request_routing_key(self.platform.name(), fleet.request.operation);
        futures_util::stream::iter(indexes)
            .map(|index| {
                let member = fleet.member(index);
                let routing_key = &routing_key;
                async move {
                    let body = serde_json::to_vec(&member).map_err(|e| {
                        StoreError::Corrupt(format!("cannot serialize a member: {e}"))
                    })?;
                    self.publish_derived(routing_key, member.request_id.as_str(), &body)
                        .await?;
                    Ok::<_, Abort>(())
                }
            })
            .buffer_unordered(PUBLISH_AT_ONCE)
            .try_collect::<()>()
            .await
    }

    /// An event of the fleet with its counts: its end when `ending` says so, else a
    /// progress event in the working state.
    fn fleet_event(
        &self,
        fleet: &Fleet,
        held: &mut Held<'_>,
        ending: Option<(State, Option<Resource>, Option<ErrorInfo>)>,
        counts: FleetCounts,
    ) -> StatusEvent {
        let (state, resource, error) = ending.unwrap_or((fleet.working_state(), None, None));
        let seq = held.next_seq();
        let mut event = self.event(&fleet.request, state, seq, held.attempt, resource, error);
        event.fleet = Some(FleetStatus {
            request_id: fleet.id().to_owned(),
            count: fleet.count,
            index: None,
            min_count: match fleet.plan {
                Plan::Provision { min_count, .. } => Some(min_count),
                Plan::Teardown { .. } => None,
            },
            members: Some(counts),
        });
        event
    }

    /// Takes fleets that no one coordinates from the schedule, for as long as the worker
    /// runs. When `stop` says when (the worker drains), every coordinator hands its fleet
    /// back to the schedule in good order (no attempt counted) for another worker; one
    /// dropped where it stands (a crash) leaves its lease to run out.
    pub(super) async fn watch_fleets_forever(
        self: Arc<Self>,
        stop: watch::Receiver<Option<Instant>>,
    ) {
        self.watch_fleets(Deadline::on_stop(stop)).await;
    }

    /// Coordinates the fleets that come due until `until`, for a worker that runs only
    /// so long (a scheduled Lambda invocation): returns at once when there is nothing to
    /// coordinate, else when every fleet it took has ended or at `until`, when each
    /// coordinator still following its fleet hands it back to the schedule, due at
    /// once, for the next invocation or any daemon worker to go on with. Returns how many
    /// fleets it took, and why it could not look for them if it could not.
    pub async fn coordinate_fleets_until(
        self: &Arc<Self>,
        until: Instant,
    ) -> (usize, Option<String>) {
        self.clone().watch_fleets(Deadline::at(until)).await
    }

    /// Takes due fleets from the schedule and coordinates each, until the deadline (see
    /// [`Worker::coordinate_fleets_until`]).
    async fn watch_fleets(self: Arc<Self>, mut until: Deadline) -> (usize, Option<String>) {
        let schedule = fleet_schedule(self.platform.name());
        let mut coordinators = JoinSet::new();
        let coordinating = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
        let mut taken = 0;
        let mut trouble = None;
        loop {
            while coordinators.try_join_next().is_some() {}
            if until.passed() {
                break;
            }
            // Only as many as this worker may still coordinate; the rest stay due.
            let room = self
                .config
                .fleet_coordinators
                .max(1)
                .saturating_sub(coordinators.len())
                .min(TAKE_AT_ONCE);
            let due = if room == 0 {
                Vec::new()
            } else {
                match self
                    .store
                    .take_due_expiries(&schedule, room, self.config.lease)
                    .await
                {
                    Ok(due) => due,
                    Err(e) => {
                        debug!(error = %e, "could not look for fleets to coordinate");
                        trouble = Some(format!("looking for fleets to coordinate: {e}"));
                        Vec::new()
                    }
                }
            };
            if until.bounded && due.is_empty() && coordinators.is_empty() {
                break;
            }
            for (id, _) in due {
                if !coordinating
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone())
                {
                    continue;
                }
                taken += 1;
                let worker = self.clone();
                let coordinating = coordinating.clone();
                let until = until.clone();
                let span = info_span!("fleet", platform = %self.platform.name(), request.id = %id);
                coordinators.spawn(
                    async move {
                        if let Err(e) = worker.coordinate(&id, until).await {
                            warn!(error = %e, "coordinating the fleet stopped; it comes due again");
                        }
                        coordinating
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                    }
                    .instrument(span),
                );
            }
            tokio::select! {
                biased;
                _ = until.reached() => {}
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
        }
        // Past `until`: each coordinator hands its fleet back on its own, at its next
        // look. One still busy (publishing, the store slow) after a grace is stopped
        // where it is; its fleet comes due again after a lease, as after a crash.
        let grace = tokio::time::sleep(HAND_OVER_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                biased;
                joined = coordinators.join_next() => if joined.is_none() { break },
                _ = &mut grace => {
                    warn!(left = coordinators.len(), "coordinators still busy at the round's end; stopped");
                    coordinators.abort_all();
                    break;
                }
            }
        }
        (taken, trouble)
    }

    /// Coordinates the fleet `id` to its end, until its lease is lost, or until `until`,
    /// when it gives the fleet back to the schedule, due at once.
    async fn coordinate(&self, id: &str, until: Deadline) -> Result<(), Abort> {
        let platform = self.platform.name();
        let schedule = fleet_schedule(platform);
        let forget = || async {
            if let Err(e) = self.store.cancel_expiry(&schedule, id).await {
                debug!(error = %e, "could not take a fleet off the schedule");
            }
        };
        // After this coordinator ended the fleet: off the schedule only once the store
        // holds the end. One fenced off meanwhile leaves the fleet on the schedule, for
        // whoever holds it or the next coordinator.
        let forget_if_ended = || async {
            if matches!(self.store.get(id).await, Ok(Some(r)) if r.result.is_some()) {
                forget().await;
            }
        };
        let Some(stored) = self.read_fleet(id).await? else {
            warn!("a scheduled fleet whose request is gone; dropped");
            forget().await;
            return Ok(());
        };
        let request = match stored {
            Ok(request) => request,
            Err(reason) => {
                // Not what a worker of this deployment kept: planted or altered by a
                // holder of the store's credentials. Nothing of it is acted on.
                error!(%reason, "a scheduled fleet whose stored request is not one a worker kept; dropped, nothing published");
                self.metrics.store_entry_refused("fleet");
                forget().await;
                return Ok(());
            }
        };
        let target = request.target_request_id.clone();
        let fleet = match self.fleet_of(&request, target.as_ref()).await? {
            Ok(fleet) => fleet,
            Err(reason) => {
                error!(%reason, "a scheduled fleet teardown whose target's stored request is not one a worker kept; dropped");
                forget().await;
                return Ok(());
            }
        };
        if fleet.is_none() && request.operation != Operation::Teardown {
            warn!("a scheduled request that is no fleet; dropped");
            forget().await;
            return Ok(());
        }
        let working_state = fleet.as_ref().map_or(State::Stopping, Fleet::working_state);
        let nonce = self.env.nonce();
        let claimed_before = tokio::time::Instant::now();
        // Sent again (same nonce) while the store is unreachable: a claim whose reply was
        // lost is answered the same, instead of counting another attempt a lease later.
        let payload_hash = request.payload_hash();
        let routing_key = request.routing_key();
        let claim = self
            .store_call(|| {
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
        let (fence, seq, attempt, torn_down_by, handed_over) = match claim {
            Claim::Claimed {
                fence,
                seq,
                attempt,
                torn_down_by,
                handed_over,
                ..
            } => (fence, seq, attempt, torn_down_by, handed_over),
            // Another worker coordinates it, and its entry comes due again meanwhile.
            Claim::Held { .. } => return Ok(()),
            Claim::Done(event) => {
                // Ended before: but the coordinator that recorded the end may have died
                // (or the broker refused it) before its event went out. Publish it again
                // (a copy is the same event) and only then take the fleet off the schedule.
                self.publish_recorded_end(&request, &event).await?;
                forget().await;
                return Ok(());
            }
            Claim::Conflict => {
                forget().await;
                return Ok(());
            }
        };
        let mut held = Held {
            request: &request,
            fence,
            attempt,
            seq,
            acting_on: None,
            claimed_before,
            working_confirm: std::sync::Mutex::new(None),
            waits: 0,
            sent: false,
        };
        let Some(fleet) = fleet else {
            // A teardown of a fleet the store no longer knows (its request was lost with
            // the store's data): its members cannot be listed. It ends, saying so.
            let message = format!(
                "the fleet {} it tears down is no longer known to the state store (its request was lost), so its members cannot be listed: tear them down by their request ids (<fleet>#<index>)",
                target.map(|t| t.to_string()).unwrap_or_default()
            );
            self.end_in_error(&mut held, ErrorClass::Internal, message, None)
                .await?;
            forget_if_ended().await;
            return Ok(());
        };
        if let (Some(by), Plan::Provision { .. }) = (&torn_down_by, &fleet.plan) {
            self.fleet_torn_down(&mut held, by).await?;
            forget_if_ended().await;
            return Ok(());
        }
        if attempt > self.config.retry.max_attempts {
            // One look before giving up: when every member has ended (and none is to be
            // rolled back), the fleet's end is known, whatever befell its coordinators.
            let records = self.store.get_many(&fleet.member_ids()).await?;
            let look = Look::of(&records);
            let rollback = match fleet.plan {
                Plan::Provision {
                    min_count,
                    on_partial: OnPartial::Rollback,
                } => look.counts.error > fleet.count - min_count,
                _ => false,
            };
            if look.all_ended && !rollback {
                let end = self.fleet_outcome(&mut held, &fleet, &records, &look, None);
                self.record_and_publish(&mut held, end).await?;
                forget_if_ended().await;
                return Ok(());
            }
            let message = format!(
                "gave up coordinating the fleet after {} attempts that ended without an outcome (workers crashed or lost their leases; see their logs). Its members are as their own events say: tear the fleet down to remove them",
                attempt - 1
            );
            self.end_in_error(&mut held, ErrorClass::Internal, message, None)
                .await?;
            forget_if_ended().await;
            return Ok(());
        }
        if let Plan::Teardown { target } = &fleet.plan {
            let grant = self
                .store
                .act_on(target.as_str(), held.actor(), self.config.lease, true)
                .await?;
            match grant {
                TargetGrant::Granted => held.acting_on = Some(target.clone()),
                TargetGrant::Busy { remaining, by } => {
                    debug!(%by, "the fleet is being worked on; looking again soon");
                    let soon = self.env.now() + remaining.min(self.config.lease / 3);
                    self.give_back(&held, seq, soon).await;
                    return Ok(());
                }
            }
        }
        let heartbeat = Heartbeat::start(
            self.store.clone(),
            id.to_owned(),
            held.fence.clone(),
            held.acting_on.as_ref().map(|t| t.to_string()),
            self.config.lease,
            claimed_before,
            matches!(fleet.plan, Plan::Provision { .. }),
        );
        if attempt > 1 && !handed_over {
            // Taken over after a worker died: publish again whatever it may not have. (A
            // fleet handed over in good order, between Lambda rounds, keeps the attempt
            // count of an earlier failure but has nothing in doubt.)
            let records = self.store.get_many(&fleet.member_ids()).await?;
            let missing: Vec<u32> = (0..fleet.count)
                .filter(|i| records[*i as usize].is_none())
                .collect();
            info!(
                attempt,
                missing = missing.len(),
                "took the fleet over; publishing again the members without a record"
            );
            self.publish_members(&fleet, missing).await?;
        }
        let ended = self.follow(&mut held, &fleet, &heartbeat, until).await;
        let signal = heartbeat.stop();
        match ended {
            Ok(Followed::Ended(event)) => {
                self.record_and_publish(&mut held, *event).await?;
                forget_if_ended().await;
            }
            Ok(Followed::TimeUp) => {
                // An orderly hand-over, not a failed attempt: the claim gives its attempt
                // back, so the next coordinator neither counts it toward the bound nor
                // takes the fleet for abandoned.
                info!("out of time; the fleet goes back to the schedule for the next coordinator");
                self.give_back(&held, seq, self.env.now()).await;
                self.end_acting(&held, None).await;
            }
            Ok(Followed::LeaseLost) => match signal {
                LeaseSignal::Cancelled { by } => {
                    self.fleet_torn_down(&mut held, &by).await?;
                    forget_if_ended().await;
                }
                other => {
                    warn!(signal = ?other, "lost the fleet's lease; another worker takes it over");
                    self.end_acting(&held, None).await;
                }
            },
            Err(e) => {
                // A broker that would not take an event is no failure of the fleet's: its
                // next coordinator goes on where this one stopped, without an attempt.
                let how = match (&e, held.seq == seq) {
                    (Abort::Broker(_), true) => Release::Untried,
                    (Abort::Broker(_), false) => Release::HandedOver,
                    (Abort::Store(_), true) => Release::FailedUnsent,
                    (Abort::Store(_), false) => Release::Failed,
                };
                let _ = self.store.release(id, &held.fence, how).await;
                self.end_acting(&held, None).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives the fleet's claim back without counting an attempt (nothing failed) and
    /// puts it on the schedule due `at`, for the next coordinator. `first_seq` is the
    /// number the claim took: if no event used it, it is given back too. Should either
    /// fail, its entry still comes due a lease after it was taken.
    async fn give_back(&self, held: &Held<'_>, first_seq: u64, at: SystemTime) {
        let id = held.id();
        let how = if held.seq == first_seq {
            Release::Untried
        } else {
            Release::HandedOver
        };
        if let Err(e) = self.store.release(id, &held.fence, how).await {
            debug!(error = %e, "could not give the fleet's claim back");
        }
        let schedule = fleet_schedule(self.platform.name());
        if let Err(e) = self.store.schedule_expiry(&schedule, id, at).await {
            debug!(error = %e, "could not put the fleet back on the schedule");
        }
    }

    /// A teardown of the fleet tombstoned it: it ends in `error`; the teardown removes
    /// the members.
    async fn fleet_torn_down(&self, held: &mut Held<'_>, by: &str) -> Result<(), Abort> {
        let message = format!(
            "{by} tore this fleet down before it finished; the teardown removes its members"
        );
        self.end_in_error(held, ErrorClass::Conflict, message, None)
            .await
            .map(drop)
    }

    /// Follows the members until the fleet ends (its terminal event, to record and
    /// publish), the lease says stop, or `until` comes.
    async fn follow(
        &self,
        held: &mut Held<'_>,
        fleet: &Fleet,
        heartbeat: &Heartbeat,
        mut until: Deadline,
    ) -> Result<Followed, Abort> {
        let time_up = until.reached();
        tokio::pin!(time_up);
        let ids = fleet.member_ids();
        let mut signal = heartbeat.signal();
        let mut published: Option<FleetCounts> = None;
        let mut rolled_back: HashSet<u32> = HashSet::new();
        // When this coordinator last sent each member's rollback.
        let mut rollback_sent: std::collections::HashMap<u32, Instant> = Default::default();
        // The claim reserved the first event's seq; every later one is reserved in turn.
        let mut reserved = true;
        let mut moved_at = tokio::time::Instant::now();
        loop {
            let records = match self.store.get_many(&ids).await {
                Ok(records) => records,
                Err(e) => {
                    debug!(error = %e, "could not read the members; trying again");
                    tokio::select! {
                        biased;
                        _ = signal.lost() => return Ok(Followed::LeaseLost),
                        _ = &mut time_up => return Ok(Followed::TimeUp),
                        _ = tokio::time::sleep(POLL) => continue,
                    }
                }
            };
            // Rollbacks an earlier coordinator of this fleet sent and that reached their
            // member (its tombstone names them) are not sent again by this one.
            for (index, record) in (0..fleet.count).zip(&records) {
                if record.as_ref().and_then(|r| r.torn_down_by.as_deref())
                    == Some(fleet.rollback_id(index).as_str())
                {
                    rolled_back.insert(index);
                }
            }
            let look = Look::of(&records);
            if published != Some(look.counts) {
                if !reserved {
                    held.seq = self.store.next_seq(fleet.id(), &held.fence).await?;
                }
                reserved = false;
                let event = self.fleet_event(fleet, held, None, look.counts);
                held.sent = true;
                self.broker.publish_status(&event).await?;
                published = Some(look.counts);
                moved_at = tokio::time::Instant::now();
            }
            let rollback = match fleet.plan {
                Plan::Provision {
                    min_count,
                    on_partial: OnPartial::Rollback,
                } => look.counts.error > fleet.count - min_count,
                _ => false,
            };
            if rollback {
                // Every member not gone already, the failed ones too: a provision that
                // failed may say its own removal failed, and the fleet's end says every
                // member was torn down.
                let to_remove: Vec<u32> = (0..fleet.count)
                    .filter(|i| {
                        look.states[*i as usize] != State::Stopped && !rolled_back.contains(i)
                    })
                    .collect();
                for index in to_remove {
                    self.send_rollback(fleet, index).await?;
                    rolled_back.insert(index);
                    rollback_sent.insert(index, Instant::now());
                }
            }
            let rollback_ended = match rollback {
                true if look.all_ended => match self.rollbacks_ended(fleet, &rolled_back).await? {
                    Rollbacks::Ended(failed) => Some(failed),
                    Rollbacks::Pending { unseen } => {
                        // A rollback teardown with no record: its message or its record
                        // was lost. Sent again (the same request) a lease after the last.
                        for index in unseen {
                            let due = rollback_sent
                                .get(&index)
                                .is_none_or(|at| at.elapsed() >= self.config.lease);
                            if due {
                                self.send_rollback(fleet, index).await?;
                                rollback_sent.insert(index, Instant::now());
                            }
                        }
                        None
                    }
                },
                _ => None,
            };
            if look.all_ended && (!rollback || rollback_ended.is_some()) {
                return Ok(Followed::Ended(Box::new(self.fleet_outcome(
                    held,
                    fleet,
                    &records,
                    &look,
                    rollback_ended.as_deref(),
                ))));
            }
            if moved_at.elapsed() >= self.config.fleet_stall {
                // Nothing moved for a long while: a member message may have been lost
                // (a queue purged, a broker's data lost). Publishing again a member with
                // no record is safe: a copy already queued is answered from the record
                // the first one makes. A member known only by a tombstone (rolled back
                // before its provision came) is one too: its provision ends at once. So
                // is one not ended that nobody holds: its message may have been lost
                // between two attempts (a copy still queued finds it held, or ended).
                let unseen: Vec<u32> = (0..fleet.count)
                    .filter(|i| records[*i as usize].as_ref().is_none_or(unattended))
                    .collect();
                if !unseen.is_empty() {
                    warn!(
                        unseen = unseen.len(),
                        stalled_s = self.config.fleet_stall.as_secs(),
                        "no member moved for a while and some are in no worker's hands: publishing them again"
                    );
                    self.publish_members(fleet, unseen).await?;
                }
                // The same for rollback teardowns that nobody holds.
                if !rolled_back.is_empty() {
                    for index in self.unattended_rollbacks(fleet, &rolled_back).await? {
                        self.send_rollback(fleet, index).await?;
                        rollback_sent.insert(index, Instant::now());
                    }
                }
                moved_at = tokio::time::Instant::now();
            }
            tokio::select! {
                biased;
                _ = signal.lost() => return Ok(Followed::LeaseLost),
                _ = &mut time_up => return Ok(Followed::TimeUp),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Whether every rollback teardown sent has ended (a member it could not remove stays
    /// listed as running).
    /// Sends the teardown that rolls member `index` back.
    async fn send_rollback(&self, fleet: &Fleet, index: u32) -> Result<(), Abort> {
        let cause = format!(
            "rollback: fleet {} cannot reach its min_count, so every member is removed",
            fleet.id()
        );
        let target = TeardownTarget::Request(fleet.request.request_id.member(index));
        self.send_teardown(
            &fleet.rollback_id(index),
            &target,
            cause,
            fleet.request.tenant.clone(),
        )
        .await?;
        Ok(())
    }

    /// Where the rollback teardowns sent stand.
    async fn rollbacks_ended(
        &self,
        fleet: &Fleet,
        rolled_back: &HashSet<u32>,
    ) -> Result<Rollbacks, Abort> {
        let mut sent: Vec<u32> = rolled_back.iter().copied().collect();
        sent.sort_unstable();
        let ids: Vec<String> = sent.iter().map(|i| fleet.rollback_id(*i)).collect();
        let records = self.store.get_many(&ids).await?;
        let mut failed = Vec::new();
        let mut unseen = Vec::new();
        let mut at_work = false;
        for (index, record) in sent.iter().zip(&records) {
            match record {
                None => unseen.push(*index),
                Some(record) => match &record.result {
                    None => at_work = true,
                    Some(end) if end.error.is_some() => failed.push(*index),
                    Some(_) => {}
                },
            }
        }
        Ok(if unseen.is_empty() && !at_work {
            Rollbacks::Ended(failed)
        } else {
            Rollbacks::Pending { unseen }
        })
    }

    /// The rollback teardowns sent that have a record, have not ended and are in no
    /// worker's hands: their message may have been lost between two attempts.
    async fn unattended_rollbacks(
        &self,
        fleet: &Fleet,
        rolled_back: &HashSet<u32>,
    ) -> Result<Vec<u32>, Abort> {
        let mut sent: Vec<u32> = rolled_back.iter().copied().collect();
        sent.sort_unstable();
        let ids: Vec<String> = sent.iter().map(|i| fleet.rollback_id(*i)).collect();
        let records = self.store.get_many(&ids).await?;
        Ok(sent
            .into_iter()
            .zip(records)
            .filter(|(_, record)| record.as_ref().is_some_and(unattended))
            .map(|(index, _)| index)
            .collect())
    }

    /// The fleet's terminal event, once every member ended.
    fn fleet_outcome(
        &self,
        held: &mut Held<'_>,
        fleet: &Fleet,
        records: &[Option<RequestRecord>],
        look: &Look,
        rolled_back: Option<&[u32]>,
    ) -> StatusEvent {
        let members: Vec<MemberResource> = (0..fleet.count)
            .map(|index| {
                let record = records[index as usize].as_ref();
                let result = record.and_then(|r| r.result.as_ref());
                let made = result.and_then(|r| r.resource.as_ref());
                MemberResource {
                    request_id: fleet.request.request_id.member(index).to_string(),
                    index,
                    state: look.states[index as usize],
                    id: made.map(|r| r.id.clone()),
                    name: made.map(|r| r.name.clone()),
                    address: made.and_then(|r| r.address.clone()),
                    error: result.and_then(|r| r.error.clone()),
                }
            })
            .collect();
        let counts = look.counts;
        // Members whose provision succeeded: the fleet's success is theirs, whatever
        // happened to their resources since (an expiry, a teardown of one member).
        let ran = records
            .iter()
            .filter(|r| {
                r.as_ref()
                    .and_then(|r| r.result.as_ref())
                    .is_some_and(|e| e.state == State::Running && e.error.is_none())
            })
            .count() as u32;
        // The failure most worth reporting: the first that is not a rollback's doing.
        let failure = members
            .iter()
            .filter_map(|m| m.error.as_ref().map(|e| (m, e)))
            .find(|(_, e)| e.class != ErrorClass::Conflict)
            .or_else(|| {
                members
                    .iter()
                    .find_map(|m| m.error.as_ref().map(|e| (m, e)))
            });
        let first_failure = failure
            .map(|(m, e)| {
                format!(
                    " First failure: member {} ({}): {}",
                    m.index, e.class, e.message
                )
            })
            .unwrap_or_default();
        let class = failure
            .map(|(_, e)| e.class)
            .unwrap_or(ErrorClass::Internal);
        let resource = Resource {
            id: fleet.id().to_owned(),
            name: fleet.id().to_owned(),
            members,
            ..Resource::default()
        };
        let (state, error) = match &fleet.plan {
            Plan::Provision { min_count, .. } if rolled_back.is_some() => {
                let removal = match rolled_back.unwrap_or_default() {
                    [] => "every member was torn down".to_owned(),
                    failed => format!(
                        "the rollback could not tear down members {failed:?} (see their rollback teardowns' errors): send a teardown of the fleet"
                    ),
                };
                (
                    State::Error,
                    Some(ErrorInfo {
                        class,
                        message: format!(
                            "{} of {} members failed, more than min_count {min_count} allows; {removal} (on_partial rollback).{first_failure}",
                            counts.error, fleet.count
                        ),
                    }),
                )
            }
            Plan::Provision { min_count, .. } if ran < *min_count => (
                State::Error,
                Some(ErrorInfo {
                    class,
                    message: format!(
                        "{ran} of {} members ran, fewer than min_count {min_count}; they are kept (on_partial keep): tear the fleet down to remove them.{first_failure}",
                        fleet.count
                    ),
                }),
            ),
            Plan::Provision { .. } => (State::Running, None),
            Plan::Teardown { .. } if counts.stopped == fleet.count => (State::Stopped, None),
            Plan::Teardown { target } => (
                State::Error,
                Some(ErrorInfo {
                    class,
                    message: format!(
                        "{} of {} members of fleet {target} could not be torn down; send this teardown again under a new request id to retry them.{first_failure}",
                        fleet.count - counts.stopped,
                        fleet.count
                    ),
                }),
            ),
        };
        self.fleet_event(fleet, held, Some((state, Some(resource), error)), counts)
    }
}
