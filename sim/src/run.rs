//! One run: the world a seed draws, the real workers in it, the producers and the
//! operator, the faults, then quiet until everything settled, then the oracle.
//!
//! A run is single-threaded on a paused tokio clock: time moves only when every task
//! waits, straight to the next timer, so minutes of leases, backoffs and boot times cost
//! microseconds, and the order of everything is fixed by the seed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provisioner_core::{MemoryStore, StateStore, Worker, WorkerConfig};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::broker::{BrokerView, SharedBroker};
use crate::clock::{Clock, SimEnvironment};
use crate::cloud::Cloud;
use crate::config::RunConfig;
use crate::history::History;
use crate::oracle::{self, Verdict};
use crate::platform::{PLATFORM, SimPlatform};
use crate::process::{Life, Process};
use crate::rng::Rng;
use crate::store::{Loss, SharedStore, StoreView};
use crate::witness::Witness;
use crate::workload::{Step, Workload};

/// How long after its faults a run may take to settle before the oracle calls it stuck.
const SETTLE_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub verdict: Verdict,
    /// The history, when it was kept.
    pub history: Vec<String>,
    /// Virtual time the run took.
    pub simulated: Duration,
}

/// A worker slot: the process in it now, and how to ask it to drain.
#[derive(Debug)]
struct Slot {
    process: Arc<Process>,
    drain: Option<oneshot::Sender<()>>,
}

/// Everything a run's tasks share.
#[derive(Debug)]
pub struct World {
    pub config: RunConfig,
    pub clock: Arc<Clock>,
    pub history: Arc<History>,
    pub faults_on: Arc<AtomicBool>,
    pub store: Arc<SharedStore>,
    pub broker: Arc<SharedBroker>,
    pub cloud: Arc<Cloud>,
    pub witness: Arc<Witness>,
    pub workload: Workload,
    slots: Mutex<Vec<Option<Slot>>>,
    /// Producer tasks not finished (publishing with retries, waiting for a target).
    producing: AtomicUsize,
    /// Timed faults that struck, by kind.
    pub faults: Mutex<std::collections::BTreeMap<&'static str, u32>>,
    /// Worker crashes, wherever they struck.
    pub crashes: AtomicUsize,
    /// Fleets the forger planted in the store: nothing of them may happen.
    pub forged: Mutex<Vec<String>>,
}

impl World {
    fn new(seed: u64, keep_history: bool) -> Arc<World> {
        let config = RunConfig::draw(seed);
        let clock = Clock::new();
        let history = History::new(clock.clone(), keep_history);
        let faults_on = Arc::new(AtomicBool::new(true));
        let witness = Witness::new(clock.clone());
        let store_env = SimEnvironment::new(clock.clone(), 0, Rng::stream(seed, "store-env"));
        let memory =
            MemoryStore::with_retention(config.worker.retention).with_environment(store_env);
        let store = SharedStore::new(
            memory,
            config.store,
            Rng::stream(seed, "store"),
            faults_on.clone(),
            history.clone(),
            witness.clone(),
        );
        let broker = SharedBroker::new(
            config.broker,
            Rng::stream(seed, "broker"),
            faults_on.clone(),
            history.clone(),
            clock.clone(),
            witness.clone(),
        );
        let cloud = Cloud::new(
            config.cloud.clone(),
            Rng::stream(seed, "cloud"),
            faults_on.clone(),
            history.clone(),
            clock.clone(),
        );
        let epoch_s = clock
            .epoch()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let workload = Workload::draw(&mut Rng::stream(seed, "workload"), config.chaos, epoch_s);
        let slots = Mutex::new((0..config.workers).map(|_| None).collect());
        Arc::new(World {
            config,
            clock,
            history,
            faults_on,
            store,
            broker,
            cloud,
            witness,
            workload,
            slots,
            producing: AtomicUsize::new(0),
            faults: Mutex::new(Default::default()),
            crashes: AtomicUsize::new(0),
            forged: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn count_fault(&self, kind: &'static str) {
        *self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// The process in `slot` now, if one runs.
    fn process(&self, slot: usize) -> Option<Arc<Process>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[slot]
            .as_ref()
            .map(|s| s.process.clone())
    }

    /// A worker of the simulated platform in `process`.
    fn worker(&self, process: &Arc<Process>, skew_ms: i64) -> Worker {
        let env = SimEnvironment::new(
            self.clock.clone(),
            skew_ms,
            Rng::stream(self.config.seed, &format!("env-{}", process.name)),
        );
        let store = Arc::new(StoreView::new(process.clone(), self.store.clone()));
        let broker = Arc::new(BrokerView::new(
            process.clone(),
            self.broker.clone(),
            env.clone(),
        ));
        let platform = Arc::new(SimPlatform::new(
            process.clone(),
            self.cloud.clone(),
            self.config.run_bucket,
            self.config.mutate_bucket,
        ));
        let config = WorkerConfig {
            worker_id: process.name.clone(),
            ..self.config.worker.clone()
        };
        Worker::new(platform, store, broker, config).with_environment(env)
    }
}

/// Runs seed `seed` to its verdict.
pub fn run_seed(seed: u64, keep_history: bool) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(simulate(seed, keep_history))
}

async fn simulate(seed: u64, keep_history: bool) -> Outcome {
    let world = World::new(seed, keep_history);
    let config = &world.config;
    world.history.note("sim", || {
        format!(
            "seed {seed}: {:?}, {} workers, faults for {} s, lease {} s, max attempts {}, reap after {:?}, reconcile {:?}; cloud {:?}",
            config.weather,
            config.workers,
            config.chaos.as_secs(),
            config.worker.lease.as_secs(),
            config.worker.retry.max_attempts,
            config.worker.reap_after,
            config.worker.reconcile.as_ref().map(|(every, _)| every),
            config.cloud,
        )
    });
    for slot in 0..config.workers {
        tokio::spawn(supervise(world.clone(), slot));
    }
    tokio::spawn(produce(world.clone()));
    tokio::spawn(crate::faults::inject(world.clone()));
    tokio::spawn(crate::faults::forge(world.clone()));
    tokio::time::sleep(config.chaos).await;
    heal(&world);
    let settled_by = Instant::now() + SETTLE_LIMIT;
    let mut quiet_for = 0;
    let mut stuck = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match busy(&world).await {
            None => {
                quiet_for += 1;
                if quiet_for >= 3 {
                    break;
                }
            }
            Some(why) => {
                quiet_for = 0;
                if Instant::now() >= settled_by {
                    stuck = Some(why);
                    break;
                }
            }
        }
    }
    let verdict = oracle::judge(&world, stuck).await;
    Outcome {
        seed,
        verdict,
        history: world.history.lines(),
        simulated: world.clock.elapsed(),
    }
}

/// The end of the faults: fair weather, paused processes resumed, the alarm cleared.
/// Crashed workers come back on their own.
fn heal(world: &World) {
    world.faults_on.store(false, Ordering::Relaxed);
    world.store.clear_weather();
    world.broker.unblock();
    for slot in 0..world.config.workers {
        if let Some(process) = world.process(slot) {
            process.resume();
        }
    }
    world.history.note("sim", || {
        "faults end; waiting for everything to settle".into()
    });
}

/// What is still going on, if anything.
async fn busy(world: &World) -> Option<String> {
    if world.producing.load(Ordering::Relaxed) > 0 {
        return Some("producers still publishing".into());
    }
    if !world.broker.is_idle() {
        return Some(format!(
            "the broker holds messages: {}",
            world.broker.busy()
        ));
    }
    for slot in 0..world.config.workers {
        if world.process(slot).is_none_or(|p| p.life() != Life::Alive) {
            return Some(format!("worker slot {slot} is not running"));
        }
    }
    let memory = &world.store.memory;
    for id in memory.record_ids() {
        if let Ok(Some(record)) = memory.get(&id).await
            && record.payload_hash.is_some()
            && record.result.is_none()
            && !oracle::may_stay_in_progress(world, &id)
        {
            return Some(format!("request {id} is in progress"));
        }
    }
    let platform = PLATFORM.as_str();
    let expiries = memory.scheduled(platform);
    if !expiries.is_empty() {
        return Some(format!("{} expiries scheduled", expiries.len()));
    }
    let outbox = memory.scheduled(&provisioner_core::runtime::ends_outbox(PLATFORM));
    if !outbox.is_empty() {
        return Some(format!("{} recorded ends to publish", outbox.len()));
    }
    let fleets = memory.scheduled(&provisioner_core::runtime::fleet_schedule(PLATFORM));
    if !fleets.is_empty() {
        return Some(format!("{} fleets scheduled", fleets.len()));
    }
    None
}

/// Keeps a worker in `slot` running: a crashed one is dropped where it stands and a new
/// process takes its place after a while, as an orchestrator restarts a container; a
/// drained one is started again.
async fn supervise(world: Arc<World>, slot: usize) {
    let mut rng = Rng::stream(world.config.seed, &format!("slot-{slot}"));
    for incarnation in 0.. {
        let name = format!("w{slot}.{incarnation}");
        let process = Arc::new(Process::new(
            name.clone(),
            world.config.crash_at_boundary,
            Rng::stream(world.config.seed, &format!("crash-{name}")),
            world.faults_on.clone(),
        ));
        let worker = Arc::new(world.worker(&process, world.config.skews_ms[slot]));
        let (drain, drained) = oneshot::channel::<()>();
        world.slots.lock().unwrap_or_else(|e| e.into_inner())[slot] = Some(Slot {
            process: process.clone(),
            drain: Some(drain),
        });
        world.history.note(&name, || "starts".into());
        let mut task = tokio::spawn(worker.run(async move {
            let _ = drained.await;
        }));
        tokio::select! {
            biased;
            _ = process.crashed() => {
                task.abort();
                world.witness.disrupted(&name);
                world.crashes.fetch_add(1, Ordering::Relaxed);
                let at = process.crashed_at().unwrap_or_else(|| "a timed crash".into());
                world.history.note(&name, || format!("crashed ({at})"));
                // RabbitMQ hears of it at once (the socket closes) or after missed
                // heartbeats (the host went away).
                let noticed = if rng.chance(0.5) {
                    Duration::ZERO
                } else {
                    rng.millis(0, world.config.heartbeat.as_millis() as u64)
                };
                let broker = world.broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(noticed).await;
                    broker.connection_died(&name);
                });
            }
            _ = &mut task => {
                world.history.note(&name, || "drained and stopped".into());
                world.broker.connection_died(&name);
            }
        }
        tokio::time::sleep(rng.millis(0, 5000)).await;
    }
}

/// The producers and the operator, as the workload says.
async fn produce(world: Arc<World>) {
    world.producing.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let operator = Arc::new(Process::new(
        "operator".into(),
        0.0,
        Rng::new(0),
        world.faults_on.clone(),
    ));
    for planned in world.workload.steps.clone() {
        tokio::time::sleep_until(start + planned.at).await;
        match planned.step {
            Step::Publish { routing_key, body } => {
                world.producing.fetch_add(1, Ordering::Relaxed);
                let world = world.clone();
                tokio::spawn(async move {
                    publish(&world, &routing_key, &body).await;
                    world.producing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Step::OnResource {
                target,
                id,
                operation,
            } => {
                world.producing.fetch_add(1, Ordering::Relaxed);
                let world = world.clone();
                tokio::spawn(async move {
                    if let Some(resource) = running_resource(&world, &target).await {
                        let (routing_key, body) = Workload::on_resource(&id, operation, &resource);
                        publish(&world, &routing_key, &body).await;
                    }
                    world.producing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Step::SetQuota {
                tenant,
                unit,
                limit,
            } => {
                let _ = world.store.memory.set_quota(&tenant, unit, limit).await;
                world
                    .history
                    .note("operator", || format!("quota {tenant} {unit} = {limit:?}"));
            }
            Step::Reconcile => {
                let worker = world.worker(&operator, 0);
                world.history.note("operator", || "reconciles".into());
                match worker.reconcile(&world.config.reconcile).await {
                    Ok(decisions) => world
                        .history
                        .note("operator", || format!("reconciled: {decisions:?}")),
                    Err(e) => world
                        .history
                        .note("operator", || format!("reconcile failed: {e}")),
                }
            }
            Step::Redrive => {
                let moved = world.broker.redrive();
                world
                    .history
                    .note("operator", || format!("redrove {moved} dead letters"));
            }
        }
    }
    world.producing.fetch_sub(1, Ordering::Relaxed);
}

/// Publishes as a producer does: again after a refusal or a confirm that did not come,
/// until the broker confirms (a confirm lost is a second copy).
async fn publish(world: &World, routing_key: &str, body: &[u8]) {
    let published_at = world.clock.wall(0);
    // Signed as a producer signs, by its own clock, when the run's deployment signs.
    let (body, key) = signer(world, body);
    let body = body.as_slice();
    let signature = key.map(|(id, secret)| {
        provisioner_core::signing::sign_with(id, secret, routing_key, body, published_at)
    });
    for _ in 0..10 {
        let result =
            world
                .broker
                .producer_publish(routing_key, body, published_at, signature.clone());
        let id = provisioner_events::decode_request(body)
            .map(|r| format!("{} ({})", r.request_id, &r.payload_hash()[..8]))
            .unwrap_or_else(|_| "(undecodable)".into());
        world.history.note("producer", || {
            format!("publish {routing_key} {id} -> {result:?}")
        });
        if result.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The body a producer publishes and the key it signs it with, when the run signs. With
/// tenants bound, each tenant's producer signs its tenant's provisions with its own key
/// and the operator the rest; now and then (drawn from the body, so a duplicate is
/// signed alike) a tenant's producer signs what is not its own — a provision naming
/// another tenant or none (refused), or an operation on a target, naming its tenant
/// (run only when the target is known to be its tenant's).
fn signer<'a>(world: &'a World, body: &[u8]) -> (Vec<u8>, Option<(&'a str, &'a [u8])>) {
    let Some((id, secret)) = &world.config.signing else {
        return (body.to_vec(), None);
    };
    let operator = Some((id.as_str(), secret.as_slice()));
    let keys = &world.config.tenant_keys;
    if keys.is_empty() {
        return (body.to_vec(), operator);
    }
    let Ok(mut request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (body.to_vec(), operator);
    };
    let draw = body
        .iter()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
    let tenants: Vec<&String> = keys.keys().collect();
    let other = tenants[(draw / 8) as usize % tenants.len()];
    let key_of = |tenant: &str| {
        keys.get(tenant)
            .map(|(id, secret)| (id.as_str(), secret.as_slice()))
    };
    let astray = draw % 8 == 0;
    let provision = request.get("operation").and_then(|o| o.as_str()) == Some("provision");
    match request.get("tenant").and_then(|t| t.as_str()) {
        Some(tenant) if provision => {
            let key = if astray {
                key_of(other)
            } else {
                key_of(tenant)
            };
            (body.to_vec(), key.or(operator))
        }
        None if provision && astray => (body.to_vec(), key_of(other)),
        None if !provision && astray && request.is_object() => {
            request["tenant"] = other.clone().into();
            let body = serde_json::to_vec(&request).unwrap_or_else(|_| body.to_vec());
            (body, key_of(other))
        }
        _ => (body.to_vec(), operator),
    }
}

/// The resource id `target` says it runs on, once it ends `running`; `None` if it ends
/// otherwise or not within ten minutes.
async fn running_resource(world: &World, target: &str) -> Option<String> {
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut seen = 0;
    while Instant::now() < give_up {
        let events = world.broker.events_since(seen);
        seen += events.len();
        for logged in events {
            let event = logged.event;
            if event.request_id == target
                && event.rejected_message.is_none()
                && event.state.is_terminal()
            {
                return match (event.state, event.resource) {
                    (provisioner_events::State::Running, Some(resource)) => Some(resource.id),
                    _ => None,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// Applies a loss to the store and notes it for the oracle.
pub(crate) fn lose(world: &World, loss: Loss) {
    let memory = &world.store.memory;
    let done = match &loss {
        Loss::Record { request_id, .. } => memory.lose_record(request_id),
        Loss::Fleet { request_id, .. } => memory.lose_fleet(request_id),
        Loss::Everything { .. } => {
            memory.lose_everything();
            true
        }
    };
    if done {
        world.history.note("store", || format!("lost {loss:?}"));
        world.store.note_loss(loss);
    }
}

/// The process in `slot`, for the fault injector.
pub(crate) fn process_of(world: &World, slot: usize) -> Option<Arc<Process>> {
    world.process(slot)
}

/// Asks the worker in `slot` to drain (SIGTERM).
pub(crate) fn drain(world: &World, slot: usize) -> bool {
    let sender = world.slots.lock().unwrap_or_else(|e| e.into_inner())[slot]
        .as_mut()
        .and_then(|s| s.drain.take());
    sender.is_some_and(|s| s.send(()).is_ok())
}
