//! A run's configuration, drawn from its seed: the workers' settings within the ranges
//! the README allows, how many workers, how long the faults last and how hard they
//! strike, and how the broker, the store and the cloud behave.

use std::collections::BTreeMap;
use std::time::Duration;

use provisioner_core::policy::RetryPolicy;
use provisioner_core::{RateLimitSettings, ReconcileOptions, WorkerConfig};

use crate::broker::BrokerChances;
use crate::cloud::CloudBehaviour;
use crate::rng::Rng;
use crate::store::StoreChances;

/// How hard a run's faults strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weather {
    /// No faults: the workload alone, concurrency its only source of races.
    Calm,
    /// Now and then.
    Showers,
    /// Often, of every kind.
    Storm,
}

/// The timed faults' rates (per minute of the faulty part of a run).
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultRates {
    pub crash: f64,
    pub pause: f64,
    pub drain: f64,
    pub connection_drop: f64,
    pub store_down: f64,
    pub store_partition: f64,
    pub store_slow: f64,
    pub lose_record: f64,
    pub lose_fleet: f64,
    pub lose_everything: f64,
    pub broker_block: f64,
    pub message_lost: f64,
    pub clock_jump: f64,
    pub instance_death: f64,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub weather: Weather,
    pub workers: usize,
    /// Every worker's settings (its id aside).
    pub worker: WorkerConfig,
    /// Each worker slot's wall-clock skew, in milliseconds.
    pub skews_ms: Vec<i64>,
    /// How long the producers publish and the faults strike.
    pub chaos: Duration,
    /// Chance of a crash at each step boundary of a worker, while faults strike.
    pub crash_at_boundary: f64,
    pub rates: FaultRates,
    /// How long RabbitMQ takes to notice a connection whose process died or froze.
    pub heartbeat: Duration,
    pub store: StoreChances,
    pub broker: BrokerChances,
    pub cloud: CloudBehaviour,
    /// The buckets the platform declares and the cloud enforces.
    pub run_bucket: (f64, f64),
    pub mutate_bucket: (f64, f64),
    /// How the operator's reconciler runs go.
    pub reconcile: ReconcileOptions,
    /// When the deployment signs: the producers' key (id, secret), which the workers
    /// hold too (`worker.signing`); fleets are then kept sealed, and the forger plants
    /// fleets in the store that no worker may act on.
    pub signing: Option<(String, Vec<u8>)>,
    /// When the deployment also binds producers to tenants (`TENANTS`): the key each
    /// tenant's producer signs with, by tenant (the operator's key, `signing`, may name
    /// any tenant or none).
    pub tenant_keys: BTreeMap<String, (String, Vec<u8>)>,
}

/// The key of a run that signs (the operator's, when tenants are bound).
const SIGNING_KEY: (&str, &str) = ("sim", "a-simulated-secret-of-at-least-32-bytes");
/// The tenants a workload names (`sim/src/workload.rs`), each with a key of its own when
/// tenants are bound.
const TENANTS: [&str; 2] = ["tenant-0", "tenant-1"];

impl RunConfig {
    pub fn draw(seed: u64) -> RunConfig {
        let mut rng = Rng::stream(seed, "config");
        let weather = match rng.weighted(&[2, 5, 3]) {
            0 => Weather::Calm,
            1 => Weather::Showers,
            _ => Weather::Storm,
        };
        let lease = Duration::from_secs(rng.range(2, 30));
        let retry = RetryPolicy {
            max_attempts: rng.range(1, 10) as u32,
            base_delay: rng.millis(50, 2000),
            max_delay: Duration::from_secs(rng.range(3, 60)),
        };
        let reap_after = rng
            .chance(0.8)
            .then(|| lease * 2 + Duration::from_secs(rng.range(0, 600)));
        let reconcile_options = ReconcileOptions {
            min_age: Duration::from_secs(rng.range(5, 120)),
            second_look_after: Duration::from_secs(rng.range(1, 10)),
            max_removals: rng.range(1, 20) as usize,
            dry_run: false,
        };
        let reconcile = rng.chance(0.3).then(|| {
            (
                Duration::from_secs(rng.range(10, 120)),
                reconcile_options.clone(),
            )
        });
        let run_bucket = (rng.range(2, 10) as f64, rng.range(1, 5) as f64);
        let mutate_bucket = (rng.range(2, 10) as f64, rng.range(1, 5) as f64);
        let rate_limits = if rng.chance(0.1) {
            RateLimitSettings {
                off: true,
                overrides: Default::default(),
            }
        } else {
            RateLimitSettings::default()
        };
        let mut worker = WorkerConfig {
            worker_id: String::new(),
            prefetch: rng.range(1, 16) as u16,
            lease,
            retry,
            max_waits: rng.range(20, 500) as u32,
            store_retry_budget: Duration::from_secs(rng.range(1, 30)),
            shutdown_grace: Duration::from_secs(rng.range(1, 30)),
            operation_timeout: Duration::from_secs(rng.range(30, 900)),
            retention: Duration::from_secs(7 * 24 * 3600),
            reap_after,
            describe_settle: Duration::from_secs(rng.range(1, 60)),
            expire_every: Some(rng.millis(500, 5000)),
            reconcile,
            rate_limits,
            fleet_stall: Duration::from_secs(rng.range(10, 180)),
            // Few enough, at times, that fleets wait on the schedule for a coordinator.
            // A stream of its own, so the kept seeds' other draws stay what they were.
            fleet_coordinators: Rng::stream(seed, "fleet-coordinators").range(1, 8) as usize,
            signing: None,
            tenants: None,
        };
        // A stream of its own, so the kept seeds' other draws stay what they were.
        let signing = Rng::stream(seed, "signing")
            .chance(0.5)
            .then(|| (SIGNING_KEY.0.to_owned(), SIGNING_KEY.1.as_bytes().to_vec()));
        // Half the runs that sign also bind producers to tenants.
        let bound = signing.is_some() && Rng::stream(seed, "tenants").chance(0.5);
        let tenant_keys: BTreeMap<String, (String, Vec<u8>)> = TENANTS
            .iter()
            .filter(|_| bound)
            .map(|tenant| {
                let id = format!("key-{tenant}");
                let secret = format!("{tenant}-a-simulated-secret-of-32-bytes").into_bytes();
                (tenant.to_string(), (id, secret))
            })
            .collect();
        if signing.is_some() {
            let mut spec = format!("{}={}", SIGNING_KEY.0, SIGNING_KEY.1);
            for (id, secret) in tenant_keys.values() {
                spec.push_str(&format!(",{id}={}", String::from_utf8_lossy(secret)));
            }
            let keys = provisioner_core::signing::SigningKeys::parse(&spec, worker.retention)
                .expect("the simulator's keys");
            worker.signing = Some(std::sync::Arc::new(keys));
        }
        if bound {
            let mut binding = format!("key:{}=*", SIGNING_KEY.0);
            for (tenant, (id, _)) in &tenant_keys {
                binding.push_str(&format!(",key:{id}={tenant}"));
            }
            let binding = provisioner_core::tenants::TenantBinding::parse(&binding)
                .expect("the simulator's binding");
            worker.tenants = Some(std::sync::Arc::new(binding));
        }
        let workers = rng.range(1, 4) as usize;
        let skews_ms = (0..workers)
            .map(|_| rng.range(0, 4000) as i64 - 2000)
            .collect();
        let storm = weather == Weather::Storm;
        let faulty = weather != Weather::Calm;
        let scale = if storm { 3.0 } else { 1.0 };
        let p = |rng: &mut Rng, max: f64| {
            if faulty {
                rng.unit() * max * scale
            } else {
                0.0
            }
        };
        let rates = FaultRates {
            crash: p(&mut rng, 1.0),
            pause: p(&mut rng, 0.5),
            drain: p(&mut rng, 0.3),
            connection_drop: p(&mut rng, 0.5),
            store_down: p(&mut rng, 0.3),
            store_partition: p(&mut rng, 0.3),
            store_slow: p(&mut rng, 0.3),
            lose_record: p(&mut rng, 0.2),
            lose_fleet: p(&mut rng, 0.05),
            lose_everything: p(&mut rng, 0.02),
            broker_block: p(&mut rng, 0.2),
            message_lost: p(&mut rng, 0.1),
            clock_jump: p(&mut rng, 0.2),
            instance_death: p(&mut rng, 0.3),
        };
        let store = StoreChances {
            fail: p(&mut rng, 0.01),
            lose_reply: p(&mut rng, 0.01),
            latency_ms: *rng.pick(&[0, 0, 1, 5, 50]),
        };
        let broker = BrokerChances {
            refuse: p(&mut rng, 0.01),
            confirm_lost: p(&mut rng, 0.01),
            ack_lost: p(&mut rng, 0.01),
            requeue_at_head: rng.chance(0.5),
            delivery_limit: 10,
            confirm_ms: *rng.pick(&[0, 1, 5, 50]),
        };
        let mut buckets = BTreeMap::new();
        buckets.insert("RunInstances", run_bucket);
        buckets.insert("Mutate", mutate_bucket);
        // An instance is listed before it can run (EC2 lists a launch within seconds,
        // and boots for longer): a teardown after a `running` event always finds it.
        let list_lag_ms = *rng.pick(&[0, 0, 200, 1000]);
        let boot_max = *rng.pick(&[0, 1000, 5000, 20000]);
        let cloud = CloudBehaviour {
            latency_ms: *rng.pick(&[0, 10, 100, 1000]),
            fail: p(&mut rng, 0.05),
            answer_lost: p(&mut rng, 0.05),
            late_landing_ms: *rng.pick(&[0, 0, 500, 3000]),
            capacity: p(&mut rng, 0.05),
            instance_quota: rng.chance(0.1).then(|| rng.range(3, 20) as usize),
            list_lag_ms,
            boot_ms: (list_lag_ms, boot_max.max(list_lag_ms)),
            buckets,
        };
        let crash_at_boundary = p(&mut rng, 0.002);
        RunConfig {
            seed,
            weather,
            workers,
            worker,
            skews_ms,
            chaos: Duration::from_secs(rng.range(20, 180)),
            crash_at_boundary,
            rates,
            heartbeat: Duration::from_secs(rng.range(5, 60)),
            store,
            broker,
            cloud,
            run_bucket,
            mutate_bucket,
            reconcile: reconcile_options,
            signing,
            tenant_keys,
        }
    }

    /// Whether the workers pace their calls by buckets the store keeps whole, and the
    /// calls reach the cloud within the jitter the pacing's headroom covers (a tenth of
    /// a token: README, "Rate limits"): then the cloud must never throttle them.
    pub fn pacing_is_intact(&self) -> bool {
        let fastest = self.run_bucket.1.max(self.mutate_bucket.1);
        let jitter_tokens = self.cloud.latency_ms as f64 / 1000.0 * fastest;
        !self.worker.rate_limits.off
            && jitter_tokens <= 0.1
            && self.store.fail == 0.0
            && self.store.lose_reply == 0.0
            && self.rates.store_down == 0.0
            && self.rates.store_partition == 0.0
            && self.rates.lose_everything == 0.0
    }
}
