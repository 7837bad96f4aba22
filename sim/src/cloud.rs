//! The simulated cloud: an instance API shaped like EC2's, whose behaviour the seed draws.
//!
//! - every call takes its time, and mutating ones draw on token buckets of the sizes the
//!   platform declares (a call past its bucket is refused as `throttled`, with when to come
//!   back), as EC2's request-rate limits do;
//! - a launch may be refused for capacity (retryable) or for the account's instance quota
//!   (permanent), fail before anything happened, or be carried out and its answer lost —
//!   and then the instance may land only later;
//! - a launch's client token is honoured: the same token gives the same instance (a
//!   terminated one included, as on EC2), however often it is sent;
//! - listings are eventually consistent: an instance that just landed is not listed for a
//!   while, one terminated is listed as terminated for a while;
//! - an instance boots for a while, and may die on its own (a host failure, a spot
//!   interruption).
//!
//! It records every instance that ever existed, with when it came and went and why, and
//! checks at every change that no request ever holds two live instances at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::history::History;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Stopped,
    Terminated,
}

/// One instance, as the cloud keeps it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    /// The request its ownership tag names.
    pub owner: String,
    pub tenant: Option<String>,
    pub cpus: u32,
    pub token: String,
    /// When it landed (a launch whose answer was lost may land later than it was sent).
    pub landed: Instant,
    pub landed_wall: SystemTime,
    ready_at: Instant,
    phase: Phase,
    /// When it was terminated, and whether the cloud did it on its own.
    pub ended: Option<Instant>,
    pub died_on_its_own: bool,
}

impl Instance {
    pub fn phase(&self, now: Instant) -> Phase {
        match self.phase {
            Phase::Pending if now >= self.ready_at => Phase::Running,
            phase => phase,
        }
    }

    pub fn is_live(&self) -> bool {
        self.phase != Phase::Terminated
    }
}

/// A refusal of the cloud's, typed as its API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudError {
    /// `RequestLimitExceeded`: come back after this long.
    Throttled(Duration),
    /// A 5xx or a reset: nothing happened (or the answer was lost: something did).
    Unavailable(&'static str),
    /// `InsufficientInstanceCapacity`.
    Capacity,
    /// `InstanceLimitExceeded`: the account's instance quota.
    Quota,
    /// `InvalidInstanceID.NotFound`.
    NotFound,
    /// `IncorrectInstanceState`.
    IncorrectState(Phase),
}

/// What a run's cloud does, drawn once per run.
#[derive(Debug, Clone, Default)]
pub struct CloudBehaviour {
    /// Every call takes up to this long.
    pub latency_ms: u64,
    /// A call fails before anything happens.
    pub fail: f64,
    /// A launch is carried out and its answer lost.
    pub answer_lost: f64,
    /// ...and the instance lands up to this long after.
    pub late_landing_ms: u64,
    /// A launch is refused for capacity.
    pub capacity: f64,
    /// The account's instance quota (live instances).
    pub instance_quota: Option<usize>,
    /// How long an instance that landed stays out of listings.
    pub list_lag_ms: u64,
    /// Boot time range.
    pub boot_ms: (u64, u64),
    /// The buckets: `RunInstances` and `Mutate` (capacity, refill per second).
    pub buckets: BTreeMap<&'static str, (f64, f64)>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    capacity: f64,
    refill: f64,
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<String, Instance>,
    tokens: BTreeMap<String, String>,
    buckets: BTreeMap<&'static str, Bucket>,
    next: u64,
    /// Calls refused for their bucket, by bucket.
    throttled: BTreeMap<&'static str, u32>,
    calls: u64,
    /// What went wrong while it happened (a request holding two live instances).
    violations: Vec<String>,
}

#[derive(Debug)]
pub struct Cloud {
    state: Mutex<State>,
    behaviour: CloudBehaviour,
    rng: Mutex<Rng>,
    faults_on: Arc<AtomicBool>,
    history: Arc<History>,
    clock: Arc<crate::clock::Clock>,
}

/// An instance as a listing or a lookup shows it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub owner: String,
    pub phase: Phase,
    pub landed_wall: SystemTime,
}

impl Cloud {
    pub fn new(
        behaviour: CloudBehaviour,
        rng: Rng,
        faults_on: Arc<AtomicBool>,
        history: Arc<History>,
        clock: Arc<crate::clock::Clock>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let buckets = behaviour
            .buckets
            .iter()
            .map(|(name, (capacity, refill))| {
                (
                    *name,
                    Bucket {
                        tokens: *capacity,
                        at: now,
                        capacity: *capacity,
                        refill: *refill,
                    },
                )
            })
            .collect();
        Arc::new(Cloud {
            state: Mutex::new(State {
                buckets,
                ..State::default()
            }),
            behaviour,
            rng: Mutex::new(rng),
            faults_on,
            history,
            clock,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, Rng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.faults_on.load(Ordering::Relaxed) && self.rng().chance(p)
    }

    async fn latency(&self) {
        if self.behaviour.latency_ms > 0 {
            let delay = self.rng().millis(0, self.behaviour.latency_ms);
            tokio::time::sleep(delay).await;
        }
    }

    /// Takes a token of `bucket`, or says when one comes.
    fn draw(&self, state: &mut State, bucket: &'static str) -> Result<(), CloudError> {
        let now = Instant::now();
        let Some(b) = state.buckets.get_mut(bucket) else {
            return Ok(());
        };
        b.tokens = (b.tokens + (now - b.at).as_secs_f64() * b.refill).min(b.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / b.refill);
        *state.throttled.entry(bucket).or_default() += 1;
        self.history.note("cloud", || {
            format!("throttled a {bucket} call ({:.2} tokens)", b.tokens)
        });
        Err(CloudError::Throttled(wait))
    }

    /// The checks at every change: one live instance per request at most.
    fn check(&self, state: &mut State, owner: &str) {
        let live: Vec<&str> = state
            .instances
            .values()
            .filter(|i| i.owner == owner && i.is_live())
            .map(|i| i.id.as_str())
            .collect();
        if live.len() > 1 {
            let message = format!(
                "request {owner} holds {} live instances at once: {live:?}",
                live.len()
            );
            state.violations.push(message);
        }
    }

    /// `RunInstances` of one instance for `owner`, idempotent by `token`.
    pub async fn run_instance(
        self: &Arc<Self>,
        token: &str,
        owner: &str,
        tenant: Option<String>,
        cpus: u32,
    ) -> Result<(String, Phase), CloudError> {
        self.latency().await;
        let mut state = self.state();
        state.calls += 1;
        self.draw(&mut state, "RunInstances")?;
        if let Some(id) = state.tokens.get(token).cloned() {
            let now = Instant::now();
            let phase = state
                .instances
                .get(&id)
                .map_or(Phase::Pending, |i| i.phase(now));
            return Ok((id, phase));
        }
        if self.chance(self.behaviour.fail) {
            return Err(CloudError::Unavailable(
                "an internal error; nothing was launched",
            ));
        }
        if self.chance(self.behaviour.capacity) {
            return Err(CloudError::Capacity);
        }
        if let Some(quota) = self.behaviour.instance_quota
            && state.instances.values().filter(|i| i.is_live()).count() >= quota
        {
            return Err(CloudError::Quota);
        }
        state.next += 1;
        let id = format!("i-{:05}", state.next);
        state.tokens.insert(token.to_owned(), id.clone());
        let lost = self.chance(self.behaviour.answer_lost);
        let boot = {
            let (low, high) = self.behaviour.boot_ms;
            self.rng().millis(low, high)
        };
        let instance = Instance {
            id: id.clone(),
            owner: owner.to_owned(),
            tenant,
            cpus,
            token: token.to_owned(),
            landed: Instant::now(),
            landed_wall: self.clock.wall(0),
            ready_at: Instant::now() + boot,
            phase: Phase::Pending,
            ended: None,
            died_on_its_own: false,
        };
        let late = if lost && self.behaviour.late_landing_ms > 0 {
            self.rng().millis(0, self.behaviour.late_landing_ms)
        } else {
            Duration::ZERO
        };
        if late.is_zero() {
            state.instances.insert(id.clone(), instance);
            self.check(&mut state, owner);
        } else {
            let cloud = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(late).await;
                let mut state = cloud.state();
                let owner = instance.owner.clone();
                let landed = Instance {
                    landed: Instant::now(),
                    landed_wall: cloud.clock.wall(0),
                    ready_at: Instant::now() + boot,
                    ..instance
                };
                cloud
                    .history
                    .note("cloud", || format!("{} of {owner} lands late", landed.id));
                state.instances.insert(landed.id.clone(), landed);
                cloud.check(&mut state, &owner);
            });
        }
        drop(state);
        self.history.note("cloud", || {
            format!(
                "launched {id} for {owner} (token {token}){}",
                if lost { ", answer lost" } else { "" }
            )
        });
        if lost {
            return Err(CloudError::Unavailable("the launch timed out"));
        }
        Ok((id, Phase::Pending))
    }

    fn seen(i: &Instance, now: Instant) -> Seen {
        Seen {
            id: i.id.clone(),
            owner: i.owner.clone(),
            phase: i.phase(now),
            landed_wall: i.landed_wall,
        }
    }

    /// `DescribeInstances` by id: consistent.
    pub async fn describe(&self, id: &str) -> Result<Option<Seen>, CloudError> {
        self.latency().await;
        let now = Instant::now();
        let mut state = self.state();
        state.calls += 1;
        if self.chance(self.behaviour.fail) {
            return Err(CloudError::Unavailable("an internal error"));
        }
        Ok(state.instances.get(id).map(|i| Self::seen(i, now)))
    }

    /// `DescribeInstances` by ownership tag (all, without `owner`): eventually consistent.
    pub async fn list(&self, owner: Option<&str>) -> Result<Vec<Seen>, CloudError> {
        self.latency().await;
        let now = Instant::now();
        let mut state = self.state();
        state.calls += 1;
        if self.chance(self.behaviour.fail) {
            return Err(CloudError::Unavailable("an internal error"));
        }
        let lag = Duration::from_millis(self.behaviour.list_lag_ms);
        Ok(state
            .instances
            .values()
            .filter(|i| owner.is_none_or(|o| o == i.owner))
            .filter(|i| i.landed + lag <= now)
            // Terminated instances stay listed for an hour, as on EC2.
            .filter(|i| {
                i.ended
                    .is_none_or(|at| at + Duration::from_secs(3600) > now)
            })
            .map(|i| Self::seen(i, now))
            .collect())
    }

    /// A mutating call on one instance: drawn on the `Mutate` bucket.
    async fn mutate<T>(
        &self,
        what: &str,
        id: &str,
        change: impl FnOnce(&mut Instance, Instant) -> Result<T, CloudError>,
    ) -> Result<T, CloudError> {
        self.latency().await;
        let now = Instant::now();
        let mut state = self.state();
        state.calls += 1;
        self.draw(&mut state, "Mutate")?;
        if self.chance(self.behaviour.fail) {
            return Err(CloudError::Unavailable(
                "an internal error; nothing changed",
            ));
        }
        let Some(instance) = state.instances.get_mut(id) else {
            return Err(CloudError::NotFound);
        };
        let result = change(instance, now);
        let owner = instance.owner.clone();
        self.check(&mut state, &owner);
        drop(state);
        self.history.note("cloud", || {
            format!(
                "{what} {id} of {owner} -> {:?}",
                result.as_ref().map(|_| ())
            )
        });
        result
    }

    /// `TerminateInstances`: true when it was live.
    pub async fn terminate(&self, id: &str) -> Result<bool, CloudError> {
        self.mutate("terminate", id, |i, now| {
            if !i.is_live() {
                return Ok(false);
            }
            i.phase = Phase::Terminated;
            i.ended = Some(now);
            Ok(true)
        })
        .await
    }

    pub async fn stop(&self, id: &str) -> Result<(), CloudError> {
        self.mutate("stop", id, |i, now| match i.phase(now) {
            Phase::Running | Phase::Stopped => {
                i.phase = Phase::Stopped;
                Ok(())
            }
            phase => Err(CloudError::IncorrectState(phase)),
        })
        .await
    }

    pub async fn start(&self, id: &str) -> Result<(), CloudError> {
        let boot = {
            let (low, high) = self.behaviour.boot_ms;
            self.rng().millis(low, high)
        };
        self.mutate("start", id, |i, now| match i.phase(now) {
            Phase::Stopped => {
                i.phase = Phase::Pending;
                i.ready_at = now + boot;
                Ok(())
            }
            Phase::Running | Phase::Pending => Ok(()),
            phase => Err(CloudError::IncorrectState(phase)),
        })
        .await
    }

    pub async fn reboot(&self, id: &str) -> Result<(), CloudError> {
        self.mutate("reboot", id, |i, now| match i.phase(now) {
            Phase::Running => Ok(()),
            phase => Err(CloudError::IncorrectState(phase)),
        })
        .await
    }

    /// A live instance dies on its own (a host failure): the one `pick` chooses.
    pub fn kill_one(&self, pick: u64) -> Option<String> {
        let now = Instant::now();
        let mut state = self.state();
        let live: Vec<String> = state
            .instances
            .values()
            .filter(|i| i.is_live())
            .map(|i| i.id.clone())
            .collect();
        if live.is_empty() {
            return None;
        }
        let id = live[(pick % live.len() as u64) as usize].clone();
        let instance = state.instances.get_mut(&id)?;
        instance.phase = Phase::Terminated;
        instance.ended = Some(now);
        instance.died_on_its_own = true;
        let owner = instance.owner.clone();
        drop(state);
        self.history
            .note("cloud", || format!("{id} of {owner} died on its own"));
        Some(id)
    }

    /// Every instance that ever existed.
    pub fn instances(&self) -> Vec<Instance> {
        self.state().instances.values().cloned().collect()
    }

    pub fn throttled(&self) -> BTreeMap<&'static str, u32> {
        self.state().throttled.clone()
    }

    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn behaviour(&self) -> &CloudBehaviour {
        &self.behaviour
    }
}
