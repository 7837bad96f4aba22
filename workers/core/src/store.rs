//! The state store: one idempotency record per request id, with a lease and a fencing
//! token, so a duplicate never runs twice, a crashed worker's request is taken over, and a
//! worker that lost its lease cannot overwrite the new holder's work.
//!
//! What a record holds, and the rules every implementation keeps:
//!
//! - **Fence.** A claim gets the record's next fence counter and the claimer's own random
//!   nonce; every later write must present both. The nonce makes a holder's token unique
//!   for good: if the record is lost (a Redis without persistence restarts, an eviction, a
//!   failover to a lagging replica) the counter starts again at 1, but a zombie still
//!   holding the old counter has another nonce and is refused.
//! - **Attempts.** Every claim counts one attempt, whatever ended the one before (a failed
//!   platform call, a crash, a panic, a lost lease), so the runtime can bound them itself
//!   instead of relying on the broker's delivery count. A claim given back at once because
//!   its target was busy is refunded.
//! - **Sequence.** A claim reserves the next status `seq` for the working event; the
//!   holder numbers its later events itself (no one else writes while it holds the lease)
//!   and `complete` records the terminal event's `seq`.
//! - **Tombstone and actor.** A request acting on another request's resource (teardown,
//!   stop, start, reboot) takes the *actor* lease on the target's record, so two of them
//!   never act on one resource at once and neither runs while the target's provision does.
//!   A teardown also leaves a tombstone: a provision that has not finished ends without
//!   making anything, and one in flight is told to stop ([`Renewal::Cancelled`]).
//! - **Lifecycle.** Finished records (and tombstones) expire after the retention period;
//!   records in progress are indexed by lease end per platform, so ones abandoned long ago
//!   can be found and ended ([`StateStore::stale`], [`StateStore::reap`]).
//!
//! [`StateStore`] is implemented by [`MemoryStore`] (embedded mode, unit tests) and by
//! `redis_store::RedisStore`; both pass the same conformance tests (`tests/store.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use provisioner_events::{State, StatusEvent};
use tokio::time::Instant;

use crate::ratelimit::{RateLimit, TokenGrant};

/// Proof of holding a request: the record's fence counter and the claimer's own nonce.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Fence {
    pub counter: u64,
    pub nonce: String,
}

impl Fence {
    /// A fresh random nonce for a claim, from the system's random numbers (the runtime
    /// draws its own from its [`Environment`](crate::Environment)).
    pub fn new_nonce() -> String {
        let system: &dyn crate::Environment = &crate::SystemEnvironment;
        system.nonce()
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.counter, self.nonce)
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker now holds the request.
    Claimed {
        fence: Fence,
        /// The `seq` reserved for this attempt's working event; later events of the
        /// attempt continue from it.
        seq: u64,
        /// Which attempt this is, counting every earlier claim (1 for the first).
        attempt: u32,
        /// An earlier holder's lease had expired or been released.
        takeover: bool,
        /// The last holder gave the claim back in good order, its attempt refunded (a
        /// hand-over or an untried claim, not a failure): nothing it was doing is in doubt.
        handed_over: bool,
        /// A teardown (this request id) tore the request's resource down before it could
        /// finish: end without making anything.
        torn_down_by: Option<String>,
    },
    /// The request finished before: here is its terminal event, to publish again.
    Done(Box<StatusEvent>),
    /// Another worker (`owner`) holds a live lease for this long still, or a request
    /// acting on this one's resource does.
    Held { remaining: Duration, owner: String },
    /// The request id was used before with a different payload.
    Conflict,
}

/// What the store knows of a request, for `provisioner status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub state: State,
    pub owner: Option<String>,
    pub fence: u64,
    pub seq: u64,
    pub attempts: u32,
    /// The payload hash of the request the record is for (none while only a tombstone).
    pub payload_hash: Option<String>,
    /// Time left on the current holder's lease, if it is live.
    pub lease_remaining: Option<Duration>,
    pub result: Option<StatusEvent>,
    /// The teardown that tore this request's resource down.
    pub torn_down_by: Option<String>,
    /// The request acting on this one's resource now, if its lease is live.
    pub actor: Option<String>,
    /// For a teardown: the request whose resource it tears (or tore) down, as its
    /// [`StateStore::act_on`] named it. Kept because a teardown that named a resource id
    /// cannot learn its owner again once the resource is gone, and its end must still
    /// free what the owner held (its expiry, its quota place).
    pub acts_on: Option<String>,
}

/// How a holder gives its claim back before its request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The attempt failed or was cut short: it counts toward the bound, and what it began
    /// is in doubt.
    Failed,
    /// The attempt failed before it sent any event: it counts, and the status number its
    /// claim took is given back, so the request's events stay numbered without a gap.
    FailedUnsent,
    /// Given back before anything was tried or sent (its target busy, its rate-limit
    /// turn too far off): the attempt and the status number (`seq`) the claim took are
    /// both refunded, so the request's events stay numbered without a gap, and the next
    /// claim hears that nothing is in doubt (`handed_over`).
    Untried,
    /// Handed over in good order after sending events (a fleet between coordinators):
    /// the attempt is refunded and the next claim hears so (`handed_over`); the numbers
    /// it used stay used.
    HandedOver,
}

/// What a holder hears when it renews its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours for another lease.
    Renewed,
    /// Still ours, but a teardown (this request id) tombstoned the request: stop, make
    /// nothing more, and end.
    Cancelled { by: String },
}

/// The answer to [`StateStore::act_on`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetGrant {
    /// The actor lease on the target is ours.
    Granted,
    /// The target's provision, or another request acting on it (`by`), is at work for
    /// this long still. A teardown's tombstone is in place all the same.
    Busy { remaining: Duration, by: String },
}

/// A request acting on another request's resource.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub request_id: &'a str,
    /// The actor's own fence nonce: its actor lease is as unique as its claim.
    pub nonce: &'a str,
}

/// A stale record taken over by [`StateStore::reap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub fence: Fence,
    /// The `seq` reserved for the event that ends it.
    pub seq: u64,
    /// The routing key of the request as claimed (`<platform>.<operation>`).
    pub routing_key: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A newer holder took the request over: this worker's write was refused.
    #[error("fenced off: the request was taken over by another worker (token {0} is stale)")]
    Fenced(Fence),
    /// The request was torn down (by this teardown) while it was worked on: it may end
    /// only in `error`.
    #[error("the request was torn down by {0} while it was being worked on")]
    TornDown(String),
    /// The request's record is gone (a store that lost data); the request must be
    /// claimed again.
    #[error("the record of request {0} is gone from the state store")]
    Missing(String),
    /// The store could not be reached or answered late; worth retrying.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something this version does not understand.
    #[error("state store error: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Parameters of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub request_id: &'a str,
    pub payload_hash: &'a str,
    pub owner: &'a str,
    /// The claimer's random nonce ([`Fence::new_nonce`]).
    pub nonce: &'a str,
    pub lease: Duration,
    /// The state recorded while the request is worked on (`starting`, `stopping`).
    pub working_state: State,
    /// `<platform>.<operation>`: which platform's workers may reap the record if it is
    /// abandoned, and what it was.
    pub routing_key: &'a str,
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Atomically: create the record, or report it done / held / conflicting, or take it
    /// over (new fence) when the holder's lease has expired. Counts an attempt and
    /// reserves the working event's `seq`. The same claim sent again (same nonce: its
    /// reply was lost) gets the same answer, and counts and reserves nothing more.
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError>;

    /// Extends the holder's lease; says when a teardown tombstoned the request meanwhile.
    async fn renew(
        &self,
        request_id: &str,
        fence: &Fence,
        lease: Duration,
    ) -> Result<Renewal, StoreError>;

    /// Records the terminal event (its `seq` included) and ends the lease, for the holder
    /// only. A tombstoned provision may only end in `error` ([`StoreError::TornDown`]); a
    /// tombstone on any other request (a teardown named as a target) does not stop it.
    /// The same end sent again (its reply was lost) is answered as the first was, and
    /// changes nothing, whatever landed in between. The end goes on its platform's
    /// [`ends_outbox`] in the same step.
    async fn complete(
        &self,
        request_id: &str,
        fence: &Fence,
        event: &StatusEvent,
    ) -> Result<(), StoreError>;

    /// Ends the lease early so a retry can claim at once, as `release` says: the attempt
    /// failed, or was given back untried (attempt and `seq` refunded), or handed over in
    /// good order (attempt refunded).
    async fn release(
        &self,
        request_id: &str,
        fence: &Fence,
        release: Release,
    ) -> Result<(), StoreError>;

    /// Takes the actor lease on `target`'s record (created if it has none yet), unless
    /// the target's provision or another actor is at work. With `tombstone` (a teardown)
    /// the tombstone is left in any case, so the target's provision never makes anything
    /// again, and the actor's own record, when it has one (the actor claimed itself
    /// first), keeps `target` ([`RequestRecord::acts_on`]), busy or granted.
    async fn act_on(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
        tombstone: bool,
    ) -> Result<TargetGrant, StoreError>;

    /// Extends the actor lease; refused ([`StoreError::Fenced`]) when it is not ours any more.
    async fn renew_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
    ) -> Result<(), StoreError>;

    /// Takes `teardown`'s part out of the tombstone on `target`: a teardown that ended in
    /// error changes nothing about its target (its provision may still run, its expiry
    /// stays, the reconciler keeps what it holds). Several teardowns may tombstone one
    /// target; the tombstone goes only with the last of them, so one that failed never
    /// lifts what another that succeeded relies on (a kept simulator seed: the provision
    /// redelivered after such a lift ran again, past a teardown's `stopped`).
    async fn lift_tombstone(&self, target: &str, teardown: &str) -> Result<(), StoreError>;

    /// Ends the actor lease. `resource_state` (after a successful teardown, stop, start)
    /// records the state the target's resource is in now; the target's own stored result
    /// stays as it was.
    async fn end_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        resource_state: Option<State>,
    ) -> Result<(), StoreError>;

    /// Requests of `platform` in progress whose lease ended more than `idle` ago, oldest
    /// first, at most `limit`.
    async fn stale(
        &self,
        platform: &str,
        idle: Duration,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// Takes over a record [`StateStore::stale`] listed, if it is still stale, without the
    /// request's payload (its message is gone). The caller ends it with `complete`.
    async fn reap(
        &self,
        request_id: &str,
        idle: Duration,
        owner: &str,
        nonce: &str,
        lease: Duration,
    ) -> Result<Option<Reaped>, StoreError>;

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError>;

    /// The records of many requests at once (a fleet's members), in the order asked.
    async fn get_many(
        &self,
        request_ids: &[String],
    ) -> Result<Vec<Option<RequestRecord>>, StoreError> {
        let mut records = Vec::with_capacity(request_ids.len());
        for id in request_ids {
            records.push(self.get(id).await?);
        }
        Ok(records)
    }

    /// Reserves the next status `seq` for the holder's next event, for a holder that
    /// publishes more than a working and a terminal event (a fleet's progress), so a
    /// worker taking the request over numbers its events after them.
    async fn next_seq(&self, request_id: &str, fence: &Fence) -> Result<u64, StoreError>;

    /// Keeps the request (JSON) of a fleet, or of a teardown of one, for the retention
    /// period: whoever takes its coordination over, and any later teardown, reads it.
    async fn put_fleet(&self, request_id: &str, request_json: &str) -> Result<(), StoreError>;

    /// The request [`put_fleet`](StateStore::put_fleet) kept, if `request_id` is a fleet's.
    async fn fleet(&self, request_id: &str) -> Result<Option<String>, StoreError>;

    /// Reserves `limit.cost` tokens of the API bucket `key` (see [`crate::ratelimit`]):
    /// now, after a wait of at most `max_wait`, or not at all when the tokens are further
    /// ahead than that.
    async fn take_tokens(
        &self,
        key: &str,
        limit: &RateLimit,
        max_wait: Duration,
    ) -> Result<TokenGrant, StoreError>;

    /// Adapts the bucket's refill rate to the platform's answer: halved after a throttling
    /// answer (never under [`RateLimit::floor`]), a twentieth of the default back after a
    /// call that was not throttled (never over the default).
    async fn adapt_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        throttled: bool,
    ) -> Result<(), StoreError>;

    /// Remembers for `ttl` that the queue message `key` was handed on (finished, parked or
    /// dead-lettered), for consumers that cannot settle messages one by one: when the
    /// Lambda's RabbitMQ event source delivers a whole batch again, every instance knows
    /// which of its messages must not be parked or dead-lettered a second time.
    async fn remember_handed_on(&self, key: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Whether [`StateStore::remember_handed_on`] saw `key` within its `ttl`.
    async fn was_handed_on(&self, key: &str) -> Result<bool, StoreError>;

    /// Takes the turn named `key` for `hold`, unless another caller holds it: true when
    /// this caller got it. For periodic jobs of which one worker of many should run at a
    /// time (the reconciler); the turn is never released early, only expires.
    async fn take_turn(&self, key: &str, hold: Duration) -> Result<bool, StoreError>;

    /// Schedules the teardown of `request_id`'s resource (a provision of `platform`) at
    /// `at`, replacing an earlier time. Kept in the store, so the schedule outlives every
    /// worker.
    async fn schedule_expiry(
        &self,
        platform: &str,
        request_id: &str,
        at: SystemTime,
    ) -> Result<(), StoreError>;

    /// Takes up to `limit` of `platform`'s expiries that are due, with the time each was
    /// due. Taking one moves it `retry_in` later in the same step, so of several workers
    /// asking at once exactly one gets it; it comes due again only if its taker did not
    /// [`cancel_expiry`](StateStore::cancel_expiry) it within `retry_in` (it died before
    /// sending the teardown).
    async fn take_due_expiries(
        &self,
        platform: &str,
        limit: usize,
        retry_in: Duration,
    ) -> Result<Vec<(String, SystemTime)>, StoreError>;

    /// Forgets `request_id`'s expiry: its teardown was sent, or it was torn down already.
    async fn cancel_expiry(&self, platform: &str, request_id: &str) -> Result<(), StoreError>;

    /// Reserves one of `tenant`'s machines and `cost` of its other units for the
    /// provision `request_id`, atomically with the check of every unit against the
    /// tenant's limit for it (its own, else the default set for [`DEFAULT_TENANT`]). A
    /// request holds at most one reservation, so a retry reserves nothing more.
    ///
    /// Only the request's holder reserves (`fence`, as its other writes): a holder taken
    /// over meanwhile, whose request may have ended and given its place back already,
    /// must not take one again that nothing would ever give back.
    async fn reserve_quota(
        &self,
        tenant: &str,
        request_id: &str,
        fence: &Fence,
        cost: &QuotaCost,
    ) -> Result<QuotaGrant, StoreError>;

    /// Gives back what `request_id` reserved, if anything: its resource is gone.
    async fn release_quota(&self, request_id: &str) -> Result<(), StoreError>;

    /// Sets `tenant`'s limit of `unit` ([`MACHINES`] or a platform's, e.g. `vcpus`;
    /// `None`: no limit of its own), or the default limit of every tenant without one
    /// when `tenant` is [`DEFAULT_TENANT`].
    async fn set_quota(
        &self,
        tenant: &str,
        unit: &str,
        limit: Option<u64>,
    ) -> Result<(), StoreError>;

    /// `tenant`'s limits (its own or the default) and what it holds, by unit.
    async fn quota(&self, tenant: &str) -> Result<QuotaUsage, StoreError>;
}

/// The schedule (of the same kind as the expiries') of recorded ends not yet known to be
/// published, for a platform: [`StateStore::complete`] puts each end there in the same
/// step as it records it, due [`ENDS_GRACE`] later; its publisher takes it off once the
/// broker confirmed it. One still there when due was never confirmed (its worker died
/// between recording and publishing, or the broker refused it, and its message may be
/// lost too): the housekeeping rounds publish it.
pub fn ends_outbox(platform: &str) -> String {
    format!("{platform}/ends")
}

/// How long after its recording an end waits on the outbox for its publisher.
pub const ENDS_GRACE: Duration = Duration::from_secs(60);

/// The tenant name whose quota is the default of every tenant without one of its own.
pub const DEFAULT_TENANT: &str = "*";

/// The unit every provision holds one of: a machine (a container, an instance, a task).
pub const MACHINES: &str = "machines";

/// What a provision holds of its tenant's quota beyond its one machine: units a platform
/// defines and how many of each (`vcpus` → 4).
pub type QuotaCost = BTreeMap<String, u64>;

/// The unit of virtual CPUs, the same on every platform that defines it: a resource's
/// vCPUs rounded up to whole ones (a quarter-vCPU task holds one), so a tenant's `vcpus`
/// quota never lets more run than it says.
pub const VCPUS: &str = "vcpus";

/// A cost of `millicpus` thousandths of a vCPU in [`VCPUS`], rounded up.
pub fn vcpus_cost(millicpus: u64) -> QuotaCost {
    QuotaCost::from([(VCPUS.to_owned(), millicpus.div_ceil(1000))])
}

/// Thousandths of a CPU in a CPU amount written as Kubernetes writes quantities (`250m`,
/// `0.5`, `2`, `1k`) or as Cloud Run and ACI take them; `None` when it is not one or is
/// beyond any machine.
pub fn cpu_millis(quantity: &str) -> Option<u64> {
    let quantity = quantity.trim();
    let (number, scale) = match quantity.strip_suffix('m') {
        Some(number) => (number, 1.0),
        None => {
            let split = quantity
                .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
                .unwrap_or(quantity.len());
            let (number, suffix) = quantity.split_at(split);
            let factor = match suffix {
                "" => 1.0,
                "k" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "Ki" => 1024.0,
                "Mi" => 1024.0 * 1024.0,
                _ => return None,
            };
            (number, factor * 1000.0)
        }
    };
    let value: f64 = number.parse().ok()?;
    let millis = (value * scale).ceil();
    // A million CPUs is no machine's: anything above is a mistake, not a cost.
    (value.is_finite() && value >= 0.0 && millis <= 1e9).then_some(millis as u64)
}

/// Whether `unit` can name a quota: lower-case letters, digits, `_` and `-`, at most 32.
pub fn valid_quota_unit(unit: &str) -> bool {
    !unit.is_empty()
        && unit.len() <= 32
        && unit
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The answer to [`StateStore::reserve_quota`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaGrant {
    Granted,
    /// The tenant holds `used` of its `limit` of `unit` already, and the provision wanted
    /// `wanted` more.
    Exceeded {
        unit: String,
        limit: u64,
        used: u64,
        wanted: u64,
    },
}

/// A tenant's quota and what it holds of it: machines, and any other unit with a limit or
/// holdings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuotaUsage {
    /// The machines' limit. `None`: no limit (neither its own nor a default).
    pub limit: Option<u64>,
    /// Machines held.
    pub used: u64,
    /// Other units, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, UnitUsage>,
}

/// One unit's limit and holdings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UnitUsage {
    pub limit: Option<u64>,
    pub used: u64,
}

#[derive(Debug, Clone, Default)]
struct MemoryRecord {
    /// Empty for a record a tombstone made before its request arrived.
    payload_hash: String,
    owner: String,
    lease_until: Option<Instant>,
    fence: Fence,
    seq: u64,
    attempts: u32,
    state: Option<State>,
    routing_key: String,
    result: Option<StatusEvent>,
    tombstone: Option<String>,
    /// Other teardowns that tombstoned it while `tombstone` was in place: each keeps it
    /// there should the holder fail and lift its part.
    tombstone_also: Vec<String>,
    actor: Option<(String, String, Instant)>,
    acts_on: Option<String>,
    /// Released with a refund, until the next claim.
    handed_over: bool,
    expires: Option<Instant>,
}

impl MemoryRecord {
    fn lease_live(&self, now: Instant) -> Option<Duration> {
        self.lease_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    fn actor_live(&self, now: Instant) -> Option<(&str, Duration)> {
        self.actor
            .as_ref()
            .filter(|(_, _, until)| *until > now)
            .map(|(id, _, until)| (id.as_str(), *until - now))
    }

    fn in_progress(&self) -> bool {
        !self.payload_hash.is_empty() && self.result.is_none()
    }
}

/// The state store of the embedded mode and of unit tests: the same semantics as Redis,
/// on a mutex.
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<String, MemoryRecord>>,
    /// Handed-on message keys and when they are forgotten.
    handed_on: Mutex<HashMap<String, Instant>>,
    /// Turns taken and when they end.
    turns: Mutex<HashMap<String, Instant>>,
    /// Scheduled expiries by (platform, request id).
    expiries: Mutex<HashMap<(String, String), SystemTime>>,
    /// Tenants' limits, and which tenant each holding request counts against.
    quotas: Mutex<Quotas>,
    /// Fleets' requests by request id (kept for good: a memory store lives one run).
    fleets: Mutex<HashMap<String, String>>,
    /// API token buckets by key: tokens, when last counted, refill rate.
    buckets: Mutex<HashMap<String, (f64, Instant, f64)>>,
    retention: Duration,
    /// The wall clock of the schedules (Redis's `TIME` in the Redis store).
    env: std::sync::Arc<dyn crate::Environment>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_retention(DEFAULT_RETENTION)
    }
}

/// How long finished records (and tombstones) are kept by default: a week, long enough
/// for any redelivery.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The actor lease on `record` for `actor`, unless its provision or another actor is
    /// at work.
    fn grant_actor(
        record: &mut MemoryRecord,
        actor: Actor<'_>,
        lease: Duration,
        now: Instant,
    ) -> TargetGrant {
        if record.in_progress()
            && let Some(remaining) = record.lease_live(now)
        {
            return TargetGrant::Busy {
                remaining,
                by: record.owner.clone(),
            };
        }
        if let Some((other, remaining)) = record.actor_live(now)
            && other != actor.request_id
        {
            return TargetGrant::Busy {
                remaining,
                by: other.to_owned(),
            };
        }
        record.actor = Some((
            actor.request_id.to_owned(),
            actor.nonce.to_owned(),
            now + lease,
        ));
        TargetGrant::Granted
    }

    pub fn with_retention(retention: Duration) -> Self {
        MemoryStore {
            records: Mutex::new(HashMap::new()),
            handed_on: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            expiries: Mutex::new(HashMap::new()),
            quotas: Mutex::new(Quotas::default()),
            fleets: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            retention,
            env: std::sync::Arc::new(crate::SystemEnvironment),
        }
    }

    /// The same store reading the wall clock from `env` (a simulation's virtual clock).
    /// Leases and retention run on tokio's clock, which a paused runtime makes virtual.
    pub fn with_environment(mut self, env: std::sync::Arc<dyn crate::Environment>) -> Self {
        self.env = env;
        self
    }

    /// Loses the record of `request_id`, as a Redis without persistence (or an eviction)
    /// loses a key: what the simulator's faults do. The schedules, quotas and fleets keep
    /// their own keys.
    pub fn lose_record(&self, request_id: &str) -> bool {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id)
            .is_some()
    }

    /// Loses the request kept for fleet `request_id`, as a lost key does.
    pub fn lose_fleet(&self, request_id: &str) -> bool {
        self.fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id)
            .is_some()
    }

    /// Who holds `request_id` now (its lease live), if anyone: for a simulation to pick
    /// a record in progress.
    pub fn holder(&self, request_id: &str) -> Option<String> {
        let now = Instant::now();
        self.records()
            .get(request_id)
            .filter(|r| r.in_progress() && r.lease_live(now).is_some())
            .map(|r| r.owner.clone())
    }

    /// The ids of every record held now, sorted (for a simulation to pick one to lose).
    pub fn record_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.records().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether a request of this id was claimed since its record was made: false for none,
    /// and for a record only a teardown's tombstone or an actor made (no payload yet).
    pub fn was_claimed(&self, request_id: &str) -> bool {
        self.records()
            .get(request_id)
            .is_some_and(|r| !r.payload_hash.is_empty())
    }

    /// The entries of the schedule `name` (a platform's expiries, or its fleets'
    /// schedule), sorted by id.
    pub fn scheduled(&self, name: &str) -> Vec<(String, SystemTime)> {
        let mut entries: Vec<(String, SystemTime)> = self
            .expiries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((schedule, _), _)| schedule == name)
            .map(|((_, id), at)| (id.clone(), *at))
            .collect();
        entries.sort();
        entries
    }

    /// Loses everything, as a Redis without persistence does when it restarts.
    pub fn lose_everything(&self) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.handed_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.turns.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.expiries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        *self.quotas.lock().unwrap_or_else(|e| e.into_inner()) = Quotas::default();
        self.fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryRecord>> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        records.retain(|_, r| r.expires.is_none_or(|at| at > now));
        records
    }

    fn with_holder<T>(
        &self,
        request_id: &str,
        fence: &Fence,
        f: impl FnOnce(&mut MemoryRecord) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut records = self.records();
        held_by(&records, request_id, fence)?;
        match records.get_mut(request_id) {
            Some(record) => f(record),
            None => Err(StoreError::Missing(request_id.to_owned())),
        }
    }
}

/// Whether `fence` holds `request_id`'s record: `Missing` when there is none, or only a
/// tombstone made it (never claimed: no holder, as in Redis); `Fenced` when another
/// claim took it.
fn held_by(
    records: &HashMap<String, MemoryRecord>,
    request_id: &str,
    fence: &Fence,
) -> Result<(), StoreError> {
    match records.get(request_id) {
        Some(record) if record.fence.counter == 0 => {
            Err(StoreError::Missing(request_id.to_owned()))
        }
        Some(record) if record.fence == *fence => Ok(()),
        Some(_) => Err(StoreError::Fenced(fence.clone())),
        None => Err(StoreError::Missing(request_id.to_owned())),
    }
}

#[derive(Debug, Default)]
struct Quotas {
    /// (tenant, unit) → limit.
    limits: HashMap<(String, String), u64>,
    /// request id → (tenant, what it holds beyond its machine).
    holders: HashMap<String, (String, QuotaCost)>,
}

impl Quotas {
    fn limit(&self, tenant: &str, unit: &str) -> Option<u64> {
        self.limits
            .get(&(tenant.to_owned(), unit.to_owned()))
            .or_else(|| {
                self.limits
                    .get(&(DEFAULT_TENANT.to_owned(), unit.to_owned()))
            })
            .copied()
    }

    fn used(&self, tenant: &str, unit: &str) -> u64 {
        self.holders
            .values()
            .filter(|(t, _)| t == tenant)
            .map(|(_, cost)| {
                if unit == MACHINES {
                    1
                } else {
                    cost.get(unit).copied().unwrap_or(0)
                }
            })
            .sum()
    }
}

fn platform_of(routing_key: &str) -> &str {
    routing_key.split('.').next().unwrap_or_default()
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut records = self.records();
        let record = records.entry(claim.request_id.to_owned()).or_default();
        let existed = !record.payload_hash.is_empty();
        if existed {
            if record.payload_hash != claim.payload_hash {
                return Ok(Claim::Conflict);
            }
            if let Some(result) = &record.result {
                return Ok(Claim::Done(Box::new(result.clone())));
            }
            if record.fence.nonce == claim.nonce {
                // This very claim again (its first reply was lost): the same answer,
                // nothing counted twice.
                record.lease_until = Some(now + claim.lease);
                return Ok(Claim::Claimed {
                    fence: record.fence.clone(),
                    seq: record.seq,
                    attempt: record.attempts,
                    takeover: record.fence.counter > 1,
                    handed_over: false,
                    torn_down_by: record.tombstone.clone(),
                });
            }
            if let Some(remaining) = record.lease_live(now) {
                return Ok(Claim::Held {
                    remaining,
                    owner: record.owner.clone(),
                });
            }
        }
        // A stop or start acting on the resource goes first; a tombstoned request needs
        // no wait, it ends without touching the platform.
        if record.tombstone.is_none()
            && let Some((actor, remaining)) = record.actor_live(now)
        {
            return Ok(Claim::Held {
                remaining,
                owner: actor.to_owned(),
            });
        }
        record.payload_hash = claim.payload_hash.to_owned();
        record.owner = claim.owner.to_owned();
        record.lease_until = Some(now + claim.lease);
        record.fence = Fence {
            counter: record.fence.counter + 1,
            nonce: claim.nonce.to_owned(),
        };
        record.attempts += 1;
        record.seq += 1;
        record.state = Some(claim.working_state);
        record.routing_key = claim.routing_key.to_owned();
        record.expires = None;
        Ok(Claim::Claimed {
            fence: record.fence.clone(),
            seq: record.seq,
            attempt: record.attempts,
            takeover: existed,
            handed_over: std::mem::take(&mut record.handed_over),
            torn_down_by: record.tombstone.clone(),
        })
    }

    async fn renew(
        &self,
        request_id: &str,
        fence: &Fence,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.with_holder(request_id, fence, |r| {
            r.lease_until = Some(Instant::now() + lease);
            Ok(match (&r.tombstone, &r.result) {
                (Some(by), None) => Renewal::Cancelled { by: by.clone() },
                _ => Renewal::Renewed,
            })
        })
    }

    async fn next_seq(&self, request_id: &str, fence: &Fence) -> Result<u64, StoreError> {
        self.with_holder(request_id, fence, |r| {
            r.seq += 1;
            Ok(r.seq)
        })
    }

    async fn put_fleet(&self, request_id: &str, request_json: &str) -> Result<(), StoreError> {
        self.fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.to_owned(), request_json.to_owned());
        Ok(())
    }

    async fn fleet(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .fleets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(request_id)
            .cloned())
    }

    async fn take_tokens(
        &self,
        key: &str,
        limit: &RateLimit,
        max_wait: Duration,
    ) -> Result<TokenGrant, StoreError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket =
            buckets
                .entry(key.to_owned())
                .or_insert((limit.capacity, now, limit.refill_per_second));
        let rate = bucket.2.min(limit.refill_per_second);
        let elapsed_ms = now.duration_since(bucket.1).as_millis() as u64;
        let (tokens, grant) = crate::ratelimit::reserve(
            bucket.0,
            0,
            elapsed_ms,
            limit.capacity,
            rate,
            limit.cost,
            max_wait.as_millis() as u64,
        );
        *bucket = (tokens, now, rate);
        Ok(grant)
    }

    async fn adapt_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        throttled: bool,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket =
            buckets
                .entry(key.to_owned())
                .or_insert((limit.capacity, now, limit.refill_per_second));
        let elapsed = now.duration_since(bucket.1).as_secs_f64();
        let tokens = (bucket.0 + elapsed * bucket.2).min(limit.capacity);
        *bucket = if throttled {
            (tokens.min(0.0), now, (bucket.2 / 2.0).max(limit.floor()))
        } else {
            let rate = (bucket.2 + limit.refill_per_second / 20.0).min(limit.refill_per_second);
            (tokens, now, rate)
        };
        Ok(())
    }

    async fn complete(
        &self,
        request_id: &str,
        fence: &Fence,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        let retention = self.retention;
        self.with_holder(request_id, fence, |r| {
            // The same end again (its first reply was lost): done already, whatever came
            // since (a tombstone landing after it changes nothing of it).
            if r.result.as_ref() == Some(event) {
                return Ok(());
            }
            // A tombstone stops a provision only: a teardown (or stop, start, reboot)
            // named as another teardown's target acts on no resource of its own, and
            // ends as it ends.
            if let Some(by) = &r.tombstone
                && event.state != State::Error
                && r.routing_key.ends_with(".provision")
            {
                return Err(StoreError::TornDown(by.clone()));
            }
            r.state = Some(event.state);
            r.seq = r.seq.max(event.seq);
            r.result = Some(event.clone());
            r.lease_until = None;
            r.owner.clear();
            r.expires = Some(Instant::now() + retention);
            self.expiries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    (ends_outbox(&event.platform), request_id.to_owned()),
                    self.env.now() + ENDS_GRACE,
                );
            Ok(())
        })
    }

    async fn release(
        &self,
        request_id: &str,
        fence: &Fence,
        release: Release,
    ) -> Result<(), StoreError> {
        self.with_holder(request_id, fence, |r| {
            r.lease_until = Some(Instant::now());
            let refund = matches!(release, Release::Untried | Release::HandedOver);
            if refund {
                r.attempts = r.attempts.saturating_sub(1);
            }
            if matches!(release, Release::Untried | Release::FailedUnsent) {
                r.seq = r.seq.saturating_sub(1);
            }
            r.handed_over = refund;
            Ok(())
        })
    }

    async fn act_on(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
        tombstone: bool,
    ) -> Result<TargetGrant, StoreError> {
        let now = Instant::now();
        let retention = self.retention;
        let mut records = self.records();
        let record = records
            .entry(target.to_owned())
            .or_insert_with(|| MemoryRecord {
                expires: Some(now + retention),
                state: Some(State::NotStarted),
                ..MemoryRecord::default()
            });
        if tombstone && record.tombstone.is_none() {
            record.tombstone = Some(actor.request_id.to_owned());
        } else if tombstone
            && record.tombstone.as_deref() != Some(actor.request_id)
            && !record.tombstone_also.iter().any(|t| t == actor.request_id)
        {
            // Another teardown's tombstone: this one joins it, so it stays if that one
            // fails and lifts its part.
            record.tombstone_also.push(actor.request_id.to_owned());
        }
        let grant = Self::grant_actor(record, actor, lease, now);
        if tombstone && let Some(own) = records.get_mut(actor.request_id) {
            own.acts_on = Some(target.to_owned());
        }
        Ok(grant)
    }

    async fn renew_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut records = self.records();
        match records.get_mut(target).and_then(|r| r.actor.as_mut()) {
            Some((id, nonce, until)) if id == actor.request_id && nonce == actor.nonce => {
                *until = Instant::now() + lease;
                Ok(())
            }
            _ => Err(StoreError::Fenced(Fence {
                counter: 0,
                nonce: actor.nonce.to_owned(),
            })),
        }
    }

    async fn lift_tombstone(&self, target: &str, teardown: &str) -> Result<(), StoreError> {
        let mut records = self.records();
        if let Some(record) = records.get_mut(target) {
            let joined = record.tombstone_also.iter().any(|t| t == teardown);
            record.tombstone_also.retain(|t| t != teardown);
            if record.tombstone.as_deref() == Some(teardown) {
                record.tombstone = if record.tombstone_also.is_empty() {
                    None
                } else {
                    Some(record.tombstone_also.remove(0))
                };
            } else if !joined {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn end_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        resource_state: Option<State>,
    ) -> Result<(), StoreError> {
        let mut records = self.records();
        if let Some(record) = records.get_mut(target)
            && record
                .actor
                .as_ref()
                .is_some_and(|(id, nonce, _)| id == actor.request_id && nonce == actor.nonce)
        {
            record.actor = None;
            if let Some(state) = resource_state
                && record.result.is_some()
            {
                record.state = Some(state);
            }
        }
        Ok(())
    }

    async fn stale(
        &self,
        platform: &str,
        idle: Duration,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let now = Instant::now();
        let records = self.records();
        let mut stale: Vec<(Instant, String)> = records
            .iter()
            .filter(|(_, r)| r.in_progress() && platform_of(&r.routing_key) == platform)
            .filter_map(|(id, r)| {
                let ended = r.lease_until.unwrap_or(now);
                (ended + idle <= now).then(|| (ended, id.clone()))
            })
            .collect();
        stale.sort();
        Ok(stale.into_iter().take(limit).map(|(_, id)| id).collect())
    }

    async fn reap(
        &self,
        request_id: &str,
        idle: Duration,
        owner: &str,
        nonce: &str,
        lease: Duration,
    ) -> Result<Option<Reaped>, StoreError> {
        let now = Instant::now();
        let mut records = self.records();
        let Some(record) = records.get_mut(request_id) else {
            return Ok(None);
        };
        let ended = record.lease_until.unwrap_or(now);
        if !record.in_progress() || ended + idle > now {
            return Ok(None);
        }
        record.owner = owner.to_owned();
        record.lease_until = Some(now + lease);
        record.fence = Fence {
            counter: record.fence.counter + 1,
            nonce: nonce.to_owned(),
        };
        record.seq += 1;
        Ok(Some(Reaped {
            fence: record.fence.clone(),
            seq: record.seq,
            routing_key: record.routing_key.clone(),
            attempts: record.attempts,
        }))
    }

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let now = Instant::now();
        let records = self.records();
        Ok(records.get(request_id).map(|r| RequestRecord {
            state: r.state.unwrap_or(State::NotStarted),
            owner: (!r.owner.is_empty()).then(|| r.owner.clone()),
            fence: r.fence.counter,
            seq: r.seq,
            attempts: r.attempts,
            payload_hash: (!r.payload_hash.is_empty()).then(|| r.payload_hash.clone()),
            lease_remaining: r.lease_live(now),
            result: r.result.clone(),
            torn_down_by: r.tombstone.clone(),
            actor: r.actor_live(now).map(|(id, _)| id.to_owned()),
            acts_on: r.acts_on.clone(),
        }))
    }

    async fn remember_handed_on(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut handed_on = self.handed_on.lock().unwrap_or_else(|e| e.into_inner());
        handed_on.retain(|_, until| *until > now);
        handed_on.insert(key.to_owned(), now + ttl);
        Ok(())
    }

    async fn was_handed_on(&self, key: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        let handed_on = self.handed_on.lock().unwrap_or_else(|e| e.into_inner());
        Ok(handed_on.get(key).is_some_and(|until| *until > now))
    }

    async fn take_turn(&self, key: &str, hold: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        turns.retain(|_, until| *until > now);
        if turns.contains_key(key) {
            return Ok(false);
        }
        turns.insert(key.to_owned(), now + hold);
        Ok(true)
    }

    async fn schedule_expiry(
        &self,
        platform: &str,
        request_id: &str,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let mut expiries = self.expiries.lock().unwrap_or_else(|e| e.into_inner());
        expiries.insert((platform.to_owned(), request_id.to_owned()), at);
        Ok(())
    }

    async fn take_due_expiries(
        &self,
        platform: &str,
        limit: usize,
        retry_in: Duration,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let now = self.env.now();
        let mut expiries = self.expiries.lock().unwrap_or_else(|e| e.into_inner());
        let mut due: Vec<(SystemTime, String)> = expiries
            .iter()
            .filter(|((p, _), at)| p == platform && **at <= now)
            .map(|((_, id), at)| (*at, id.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, id) in &due {
            expiries.insert((platform.to_owned(), id.clone()), now + retry_in);
        }
        Ok(due.into_iter().map(|(at, id)| (id, at)).collect())
    }

    async fn cancel_expiry(&self, platform: &str, request_id: &str) -> Result<(), StoreError> {
        let mut expiries = self.expiries.lock().unwrap_or_else(|e| e.into_inner());
        expiries.remove(&(platform.to_owned(), request_id.to_owned()));
        Ok(())
    }

    async fn reserve_quota(
        &self,
        tenant: &str,
        request_id: &str,
        fence: &Fence,
        cost: &QuotaCost,
    ) -> Result<QuotaGrant, StoreError> {
        // The record's lock is held throughout (records before quotas, as everywhere), so
        // no takeover comes between the check of the holder and the reservation.
        let records = self.records();
        held_by(&records, request_id, fence)?;
        let mut quotas = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        if quotas.holders.contains_key(request_id) {
            return Ok(QuotaGrant::Granted);
        }
        let wanted = std::iter::once((MACHINES, 1)).chain(
            cost.iter()
                .filter(|(unit, _)| unit.as_str() != MACHINES)
                .map(|(unit, n)| (unit.as_str(), *n)),
        );
        for (unit, wanted) in wanted {
            let used = quotas.used(tenant, unit);
            if let Some(limit) = quotas.limit(tenant, unit)
                && used + wanted > limit
            {
                return Ok(QuotaGrant::Exceeded {
                    unit: unit.to_owned(),
                    limit,
                    used,
                    wanted,
                });
            }
        }
        let extra: QuotaCost = cost
            .iter()
            .filter(|(unit, _)| unit.as_str() != MACHINES)
            .map(|(unit, n)| (unit.clone(), *n))
            .collect();
        quotas
            .holders
            .insert(request_id.to_owned(), (tenant.to_owned(), extra));
        Ok(QuotaGrant::Granted)
    }

    async fn release_quota(&self, request_id: &str) -> Result<(), StoreError> {
        let mut quotas = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        quotas.holders.remove(request_id);
        Ok(())
    }

    async fn set_quota(
        &self,
        tenant: &str,
        unit: &str,
        limit: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut quotas = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_owned(), unit.to_owned());
        match limit {
            Some(limit) => quotas.limits.insert(key, limit),
            None => quotas.limits.remove(&key),
        };
        Ok(())
    }

    async fn quota(&self, tenant: &str) -> Result<QuotaUsage, StoreError> {
        let quotas = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: std::collections::BTreeSet<&str> = quotas
            .limits
            .keys()
            .filter(|(t, _)| t == tenant || t == DEFAULT_TENANT)
            .map(|(_, unit)| unit.as_str())
            .collect();
        names.extend(
            quotas
                .holders
                .values()
                .filter(|(t, _)| t == tenant)
                .flat_map(|(_, cost)| cost.keys().map(String::as_str)),
        );
        let units = names
            .into_iter()
            .filter(|unit| *unit != MACHINES)
            .map(|unit| {
                (
                    unit.to_owned(),
                    UnitUsage {
                        limit: quotas.limit(tenant, unit),
                        used: quotas.used(tenant, unit),
                    },
                )
            })
            .collect();
        Ok(QuotaUsage {
            limit: quotas.limit(tenant, MACHINES),
            used: quotas.used(tenant, MACHINES),
            units,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_amounts_read_as_thousandths_and_cost_whole_vcpus() {
        for (quantity, millis) in [
            ("250m", Some(250)),
            ("0.5", Some(500)),
            ("2", Some(2000)),
            ("1.5", Some(1500)),
            ("1k", Some(1_000_000)),
            ("1e3m", Some(1000)),
            (" 4 ", Some(4000)),
            ("-1", None),
            ("lots", None),
            ("1Ti", None),
            ("1e12", None),
        ] {
            assert_eq!(cpu_millis(quantity), millis, "{quantity}");
        }
        assert_eq!(vcpus_cost(250)[VCPUS], 1, "a quarter of a vCPU holds one");
        assert_eq!(vcpus_cost(2000)[VCPUS], 2);
        assert_eq!(vcpus_cost(2001)[VCPUS], 3);
    }
}
