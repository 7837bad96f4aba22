//! The state store of a run: the in-memory store (whose semantics the store conformance
//! tests and the memory-versus-Redis property test hold to Redis's scripts) behind one
//! view per worker process, through which the faults strike: Redis down or partitioned
//! away from one worker, slow, a call that fails before it is applied, a reply lost after
//! the call took effect, a key lost, everything lost.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use provisioner_core::store::{
    Actor, Claim, ClaimRequest, Fence, QuotaCost, QuotaGrant, QuotaUsage, Reaped, Release, Renewal,
    RequestRecord, StateStore, StoreError, TargetGrant,
};
use provisioner_core::{MemoryStore, RateLimit, TokenGrant};
use provisioner_events::StatusEvent;
use tokio::time::Instant;

use crate::history::History;
use crate::process::Process;
use crate::rng::Rng;
use crate::witness::Witness;

/// How the store misbehaves in a run; the injector changes it over time.
#[derive(Debug, Default, Clone)]
pub struct StoreWeather {
    /// Redis is down (every call fails, after a connect delay) until then.
    pub down_until: Option<Instant>,
    /// Calls take up to this much longer until `slow_until`.
    pub slow_until: Option<Instant>,
    pub slow_by: Duration,
    /// Workers cut off from Redis, until when.
    pub partitioned: BTreeMap<String, Instant>,
}

/// Per-call chances, drawn once per run.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreChances {
    /// A call fails before it is applied.
    pub fail: f64,
    /// A call is applied and its reply lost.
    pub lose_reply: f64,
    /// Every call takes up to this long.
    pub latency_ms: u64,
}

/// A key the store lost, for the oracle: what the contract then no longer promises.
#[derive(Debug, Clone)]
pub enum Loss {
    /// One request's record, at this instant of the run.
    Record {
        request_id: String,
        at: Duration,
    },
    Fleet {
        request_id: String,
        at: Duration,
    },
    Everything {
        at: Duration,
    },
}

/// The store every view shares.
#[derive(Debug)]
pub struct SharedStore {
    pub memory: MemoryStore,
    weather: Mutex<StoreWeather>,
    chances: StoreChances,
    rng: Mutex<Rng>,
    faults_on: Arc<AtomicBool>,
    history: Arc<History>,
    witness: Arc<Witness>,
    losses: Mutex<Vec<Loss>>,
}

impl SharedStore {
    pub fn new(
        memory: MemoryStore,
        chances: StoreChances,
        rng: Rng,
        faults_on: Arc<AtomicBool>,
        history: Arc<History>,
        witness: Arc<Witness>,
    ) -> Arc<Self> {
        Arc::new(SharedStore {
            memory,
            weather: Mutex::new(StoreWeather::default()),
            chances,
            rng: Mutex::new(rng),
            faults_on,
            history,
            witness,
            losses: Mutex::new(Vec::new()),
        })
    }

    pub fn weather(&self) -> std::sync::MutexGuard<'_, StoreWeather> {
        self.weather.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fair weather again: what the end of a run's faults does.
    pub fn clear_weather(&self) {
        *self.weather() = StoreWeather::default();
    }

    pub fn note_loss(&self, loss: Loss) {
        self.losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(loss);
    }

    pub fn losses(&self) -> Vec<Loss> {
        self.losses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What one call of `worker` meets: its delay, and whether it fails before being
    /// applied (with why) or loses its reply. A call the weather slowed, failed or lost
    /// disrupts the worker's work.
    fn draw(&self, worker: &str) -> (Duration, Option<&'static str>, bool) {
        let drawn = self.draw_weather(worker);
        if drawn.1.is_some() || drawn.3 {
            self.witness.disrupted(worker);
        }
        (drawn.0, drawn.1, drawn.2)
    }

    fn draw_weather(&self, worker: &str) -> (Duration, Option<&'static str>, bool, bool) {
        let now = Instant::now();
        let weather = self.weather().clone();
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut delay = match self.chances.latency_ms {
            0 => Duration::ZERO,
            max => rng.millis(0, max),
        };
        let slowed = weather.slow_until.is_some_and(|until| until > now);
        if slowed {
            delay += rng.millis(0, weather.slow_by.as_millis() as u64);
        }
        if weather.down_until.is_some_and(|until| until > now) {
            return (
                delay + rng.millis(0, 2000),
                Some("connection refused"),
                false,
                slowed,
            );
        }
        if weather
            .partitioned
            .get(worker)
            .is_some_and(|until| *until > now)
        {
            // A partition answers nothing: the client's own timeout ends the call.
            return (
                delay + rng.millis(1000, 5000),
                Some("timed out"),
                false,
                slowed,
            );
        }
        if !self.faults_on.load(Ordering::Relaxed) {
            return (delay, None, false, slowed);
        }
        let fail = rng.chance(self.chances.fail).then_some("connection reset");
        let lose = fail.is_none() && rng.chance(self.chances.lose_reply);
        (delay, fail, lose, slowed)
    }
}

/// One worker's connection to the store.
#[derive(Debug, Clone)]
pub struct StoreView {
    process: Arc<Process>,
    shared: Arc<SharedStore>,
}

impl StoreView {
    pub fn new(process: Arc<Process>, shared: Arc<SharedStore>) -> Self {
        StoreView { process, shared }
    }

    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, call: F) -> Result<T, StoreError>
    where
        T: Debug,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.observed(op, key, call, |_, _| None).await
    }

    /// A call whose effect, once applied, may take a status number (`reserved` says
    /// which, for the witness).
    async fn observed<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        call: F,
        reserved: impl FnOnce(&T, bool) -> Option<(String, u64)>,
    ) -> Result<T, StoreError>
    where
        T: Debug,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let who = &self.process.name;
        self.process.boundary(op).await;
        let (delay, fail, lose_reply) = self.shared.draw(who);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(why) = fail {
            self.shared
                .history
                .note(who, || format!("store {op} {key}: {why} (not applied)"));
            self.process.boundary(op).await;
            return Err(StoreError::Unavailable(why.into()));
        }
        let result = call().await;
        if let Some((request_id, seq)) = result.as_ref().ok().and_then(|r| reserved(r, !lose_reply))
        {
            self.shared.witness.reserved(&request_id, seq, who);
        }
        // A claim whose reply was lost is sent again and answered the same (the claim is
        // idempotent by its nonce): the worker goes on undisturbed unless it never hears
        // (which the witness keeps per claim).
        if lose_reply && op != "claim" {
            self.shared.witness.disrupted(who);
        }
        self.shared.history.note(who, || {
            format!(
                "store {op} {key} -> {result:?}{}",
                if lose_reply { " (reply lost)" } else { "" }
            )
        });
        self.process.boundary(op).await;
        if lose_reply {
            return Err(StoreError::Unavailable("the reply was lost".into()));
        }
        result
    }
}

#[async_trait]
impl StateStore for StoreView {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let key = format!("{} by {}", claim.request_id, claim.owner);
        let (id, nonce) = (claim.request_id.to_owned(), claim.nonce.to_owned());
        let who = self.process.name.clone();
        self.observed(
            "claim",
            &key,
            || self.shared.memory.claim(claim),
            |claim, heard| {
                if let Claim::Claimed { seq, .. } = claim {
                    self.shared.witness.claimed(&id, *seq, &who, &nonce, heard);
                }
                None
            },
        )
        .await
    }

    async fn renew(
        &self,
        request_id: &str,
        fence: &Fence,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.call("renew", request_id, || {
            self.shared.memory.renew(request_id, fence, lease)
        })
        .await
    }

    async fn complete(
        &self,
        request_id: &str,
        fence: &Fence,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        let key = format!("{request_id} {} seq {}", event.state, event.seq);
        // Noted as soon as it is applied: the worker may die before it hears.
        self.observed(
            "complete",
            &key,
            || self.shared.memory.complete(request_id, fence, event),
            |_, _| {
                self.shared.witness.ended(event);
                None
            },
        )
        .await
    }

    async fn release(
        &self,
        request_id: &str,
        fence: &Fence,
        release: Release,
    ) -> Result<(), StoreError> {
        let key = format!("{request_id} {release:?}");
        self.call("release", &key, || {
            self.shared.memory.release(request_id, fence, release)
        })
        .await
    }

    async fn act_on(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
        tombstone: bool,
    ) -> Result<TargetGrant, StoreError> {
        let key = format!("{target} by {} tombstone {tombstone}", actor.request_id);
        self.call("act_on", &key, || {
            self.shared.memory.act_on(target, actor, lease, tombstone)
        })
        .await
    }

    async fn renew_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.call("renew_act", target, || {
            self.shared.memory.renew_act(target, actor, lease)
        })
        .await
    }

    async fn lift_tombstone(&self, target: &str, teardown: &str) -> Result<(), StoreError> {
        let key = format!("{target} by {teardown}");
        self.call("lift_tombstone", &key, || {
            self.shared.memory.lift_tombstone(target, teardown)
        })
        .await
    }

    async fn end_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        resource_state: Option<provisioner_events::State>,
    ) -> Result<(), StoreError> {
        let key = format!("{target} by {} -> {resource_state:?}", actor.request_id);
        self.call("end_act", &key, || {
            self.shared.memory.end_act(target, actor, resource_state)
        })
        .await
    }

    async fn stale(
        &self,
        platform: &str,
        idle: Duration,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.call("stale", platform, || {
            self.shared.memory.stale(platform, idle, limit)
        })
        .await
    }

    async fn reap(
        &self,
        request_id: &str,
        idle: Duration,
        owner: &str,
        nonce: &str,
        lease: Duration,
    ) -> Result<Option<Reaped>, StoreError> {
        self.observed(
            "reap",
            request_id,
            || {
                self.shared
                    .memory
                    .reap(request_id, idle, owner, nonce, lease)
            },
            |reaped, _| reaped.as_ref().map(|r| (request_id.to_owned(), r.seq)),
        )
        .await
    }

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.call("get", request_id, || self.shared.memory.get(request_id))
            .await
    }

    async fn get_many(
        &self,
        request_ids: &[String],
    ) -> Result<Vec<Option<RequestRecord>>, StoreError> {
        let key = format!("{} records", request_ids.len());
        self.call("get_many", &key, || {
            self.shared.memory.get_many(request_ids)
        })
        .await
    }

    async fn next_seq(&self, request_id: &str, fence: &Fence) -> Result<u64, StoreError> {
        self.observed(
            "next_seq",
            request_id,
            || self.shared.memory.next_seq(request_id, fence),
            |seq, _| Some((request_id.to_owned(), *seq)),
        )
        .await
    }

    async fn put_fleet(&self, request_id: &str, request_json: &str) -> Result<(), StoreError> {
        self.call("put_fleet", request_id, || {
            self.shared.memory.put_fleet(request_id, request_json)
        })
        .await
    }

    async fn fleet(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        self.call("fleet", request_id, || self.shared.memory.fleet(request_id))
            .await
    }

    async fn take_tokens(
        &self,
        key: &str,
        limit: &RateLimit,
        max_wait: Duration,
    ) -> Result<TokenGrant, StoreError> {
        self.call("take_tokens", key, || {
            self.shared.memory.take_tokens(key, limit, max_wait)
        })
        .await
    }

    async fn adapt_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        throttled: bool,
    ) -> Result<(), StoreError> {
        self.call("adapt_rate", key, || {
            self.shared.memory.adapt_rate(key, limit, throttled)
        })
        .await
    }

    async fn remember_handed_on(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        self.call("remember_handed_on", key, || {
            self.shared.memory.remember_handed_on(key, ttl)
        })
        .await
    }

    async fn was_handed_on(&self, key: &str) -> Result<bool, StoreError> {
        self.call("was_handed_on", key, || {
            self.shared.memory.was_handed_on(key)
        })
        .await
    }

    async fn take_turn(&self, key: &str, hold: Duration) -> Result<bool, StoreError> {
        self.call("take_turn", key, || self.shared.memory.take_turn(key, hold))
            .await
    }

    async fn schedule_expiry(
        &self,
        platform: &str,
        request_id: &str,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let key = format!("{platform} {request_id}");
        self.call("schedule", &key, || {
            self.shared.memory.schedule_expiry(platform, request_id, at)
        })
        .await
    }

    async fn take_due_expiries(
        &self,
        platform: &str,
        limit: usize,
        retry_in: Duration,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        // Asked several times a second by every worker: noted only when it finds some.
        self.process.boundary("take_due").await;
        let (delay, fail, _) = self.shared.draw(&self.process.name);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(why) = fail {
            self.process.boundary("take_due").await;
            return Err(StoreError::Unavailable(why.into()));
        }
        let due = self
            .shared
            .memory
            .take_due_expiries(platform, limit, retry_in)
            .await;
        if let Ok(due) = &due
            && !due.is_empty()
        {
            let ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
            self.shared.history.note(&self.process.name, || {
                format!("store take_due {platform} -> {ids:?}")
            });
        }
        self.process.boundary("take_due").await;
        due
    }

    async fn cancel_expiry(&self, platform: &str, request_id: &str) -> Result<(), StoreError> {
        let key = format!("{platform} {request_id}");
        self.call("unschedule", &key, || {
            self.shared.memory.cancel_expiry(platform, request_id)
        })
        .await
    }

    async fn reserve_quota(
        &self,
        tenant: &str,
        request_id: &str,
        fence: &Fence,
        cost: &QuotaCost,
    ) -> Result<QuotaGrant, StoreError> {
        let key = format!("{tenant} {request_id} {cost:?}");
        self.call("reserve_quota", &key, || {
            self.shared
                .memory
                .reserve_quota(tenant, request_id, fence, cost)
        })
        .await
    }

    async fn release_quota(&self, request_id: &str) -> Result<(), StoreError> {
        self.call("release_quota", request_id, || {
            self.shared.memory.release_quota(request_id)
        })
        .await
    }

    async fn set_quota(
        &self,
        tenant: &str,
        unit: &str,
        limit: Option<u64>,
    ) -> Result<(), StoreError> {
        let key = format!("{tenant} {unit} {limit:?}");
        self.call("set_quota", &key, || {
            self.shared.memory.set_quota(tenant, unit, limit)
        })
        .await
    }

    async fn quota(&self, tenant: &str) -> Result<QuotaUsage, StoreError> {
        self.call("quota", tenant, || self.shared.memory.quota(tenant))
            .await
    }
}
