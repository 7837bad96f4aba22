//! The in-memory store held to Redis's scripts. The simulator runs the runtime over the
//! in-memory store and trusts it to answer as the Redis store does; here random sequences
//! of store operations — claims (again with the same nonce, too), renewals and ends with
//! the holder's fence or a stale one, releases of every kind, actor leases, tombstones
//! and their lifting, quotas, schedules, fleets, records lost, leases run out — run on
//! both, and every answer must be the same. Needs Redis (the README's test command
//! starts it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use provisioner_core::redis_store::RedisStore;
use provisioner_core::store::{
    Actor, Claim, ClaimRequest, Fence, MemoryStore, QuotaCost, Release, StateStore,
};
use provisioner_events::{ErrorClass, ErrorInfo, PlatformName, SCHEMA_VERSION, State, StatusEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sequences run, and operations in each.
const SEQUENCES: u64 = 30;
const STEPS: usize = 60;

const IDS: [&str; 5] = ["a", "b", "c", "d", "e"];
const ROUTES: [&str; 4] = [
    "docker.provision",
    "docker.teardown",
    "aws-ec2.provision",
    "docker.stop",
];

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn event(id: &str, state: State, seq: u64) -> StatusEvent {
    StatusEvent {
        schema_version: SCHEMA_VERSION,
        request_id: id.into(),
        operation: None,
        platform: "docker".into(),
        state,
        seq,
        attempt: 1,
        timestamp: time::OffsetDateTime::UNIX_EPOCH,
        resource: None,
        error: (state == State::Error).then(|| ErrorInfo {
            class: ErrorClass::Internal,
            message: "failed".into(),
        }),
        tenant: None,
        rejected_message: None,
        cause: None,
        fleet: None,
    }
}

/// An answer in a form both stores must give alike: times left on leases are only
/// there or not (the two clocks are not one).
fn answer<T: std::fmt::Debug>(result: &T) -> String {
    let text = format!("{result:?}");
    // `remaining: 59.998s` and `lease_remaining: Some(59.99s)` differ by microseconds.
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("remaining: ") {
        out.push_str(&rest[..at + "remaining: ".len()]);
        rest = &rest[at + "remaining: ".len()..];
        let end = rest.find([',', '}', ')']).unwrap_or(rest.len());
        out.push_str(if rest.starts_with("None") {
            "None"
        } else {
            "some"
        });
        rest = &rest[end..];
        if rest.starts_with(')') && out.ends_with("some") {
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// One store and what the test knows of it: the fences it handed out.
struct Subject {
    store: Arc<dyn StateStore>,
    fences: BTreeMap<String, Fence>,
}

async fn run(
    seed: u64,
    memory: &MemoryStore,
    redis: &Subject,
    memory_subject: &mut Subject,
    prefix: &str,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut connection = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut redis = Subject {
        store: redis.store.clone(),
        fences: BTreeMap::new(),
    };
    let mut log = Vec::new();
    for step in 0..STEPS {
        let id = IDS[rng.random_range(0..IDS.len())];
        let other = IDS[rng.random_range(0..IDS.len())];
        // Now and then short leases run out (a sleep longer than they are).
        let choice = if rng.random_bool(0.025) {
            18
        } else {
            rng.random_range(0..18)
        };
        let (what, on_memory, on_redis) = match choice {
            0..=3 => {
                let nonce = match memory_subject.fences.get(id) {
                    Some(fence) if rng.random_bool(0.2) => fence.nonce.clone(),
                    _ => format!("n{step}"),
                };
                let hash = if rng.random_bool(0.9) { "h" } else { "other" };
                // Short leases run out only at a `sleep` step: the two stores' clocks
                // differ by the time between their calls, a fraction of a millisecond.
                let lease = if rng.random_bool(0.7) { 60_000 } else { 100 };
                let route = ROUTES[rng.random_range(0..ROUTES.len())];
                let request = |owner| ClaimRequest {
                    request_id: id,
                    payload_hash: hash,
                    owner,
                    nonce: &nonce,
                    lease: Duration::from_millis(lease),
                    working_state: State::Starting,
                    routing_key: route,
                };
                let owner = if rng.random_bool(0.5) { "w1" } else { "w2" };
                let m = memory_subject.store.claim(request(owner)).await;
                let r = redis.store.claim(request(owner)).await;
                for (subject, claim) in [(&mut *memory_subject, &m), (&mut redis, &r)] {
                    if let Ok(Claim::Claimed { fence, .. }) = claim {
                        subject.fences.insert(id.to_owned(), fence.clone());
                    }
                }
                (
                    format!("claim {id} {hash} {route} lease {lease} nonce {nonce}"),
                    answer(&m),
                    answer(&r),
                )
            }
            4..=7 => {
                let stale = rng.random_bool(0.15);
                let fence_of = |subject: &Subject| {
                    let mut fence = subject.fences.get(id).cloned().unwrap_or_default();
                    if stale {
                        fence.nonce.push('x');
                    }
                    fence
                };
                let (mf, rf) = (fence_of(memory_subject), fence_of(&redis));
                match rng.random_range(0..4) {
                    0 => {
                        let lease = Duration::from_secs(60);
                        let m = memory_subject.store.renew(id, &mf, lease).await;
                        let r = redis.store.renew(id, &rf, lease).await;
                        (format!("renew {id} stale {stale}"), answer(&m), answer(&r))
                    }
                    1 => {
                        let state =
                            [State::Running, State::Stopped, State::Error][rng.random_range(0..3)];
                        let end = event(id, state, rng.random_range(1..6));
                        let m = memory_subject.store.complete(id, &mf, &end).await;
                        let r = redis.store.complete(id, &rf, &end).await;
                        (
                            format!("complete {id} {state} stale {stale}"),
                            answer(&m),
                            answer(&r),
                        )
                    }
                    2 => {
                        let how = [
                            Release::Failed,
                            Release::FailedUnsent,
                            Release::Untried,
                            Release::HandedOver,
                        ][rng.random_range(0..4)];
                        let m = memory_subject.store.release(id, &mf, how).await;
                        let r = redis.store.release(id, &rf, how).await;
                        (
                            format!("release {id} {how:?} stale {stale}"),
                            answer(&m),
                            answer(&r),
                        )
                    }
                    _ => {
                        let m = memory_subject.store.next_seq(id, &mf).await;
                        let r = redis.store.next_seq(id, &rf).await;
                        (
                            format!("next_seq {id} stale {stale}"),
                            answer(&m),
                            answer(&r),
                        )
                    }
                }
            }
            8..=9 => {
                let actor = Actor {
                    request_id: other,
                    nonce: "actor",
                };
                let tombstone = rng.random_bool(0.6);
                let lease = Duration::from_secs(60);
                let m = memory_subject
                    .store
                    .act_on(id, actor, lease, tombstone)
                    .await;
                let r = redis.store.act_on(id, actor, lease, tombstone).await;
                (
                    format!("act_on {id} by {other} tombstone {tombstone}"),
                    answer(&m),
                    answer(&r),
                )
            }
            10 => {
                let actor = Actor {
                    request_id: other,
                    nonce: "actor",
                };
                let state = rng.random_bool(0.5).then_some(State::Stopped);
                let m = memory_subject.store.end_act(id, actor, state).await;
                let r = redis.store.end_act(id, actor, state).await;
                (format!("end_act {id} by {other}"), answer(&m), answer(&r))
            }
            11 => {
                let m = memory_subject.store.lift_tombstone(id, other).await;
                let r = redis.store.lift_tombstone(id, other).await;
                (
                    format!("lift_tombstone {id} by {other}"),
                    answer(&m),
                    answer(&r),
                )
            }
            12 => {
                let m = memory_subject.store.get(id).await;
                let r = redis.store.get(id).await;
                (format!("get {id}"), answer(&m), answer(&r))
            }
            13 => {
                let platform = if rng.random_bool(0.7) {
                    "docker"
                } else {
                    "aws-ec2"
                };
                // Well past a release a few steps ago, well short of one before a sleep.
                let idle = Duration::from_millis(60);
                let mut m = memory_subject.store.stale(platform, idle, 16).await;
                let mut r = redis.store.stale(platform, idle, 16).await;
                for list in [&mut m, &mut r].into_iter().flatten() {
                    list.sort();
                }
                (format!("stale {platform}"), answer(&m), answer(&r))
            }
            14 => {
                let tenant = if rng.random_bool(0.5) { "t1" } else { "t2" };
                match rng.random_range(0..4) {
                    0 => {
                        // As the holder mostly, else with a stale fence.
                        let stale = rng.random_bool(0.15);
                        let fence_of = |subject: &Subject| {
                            let mut fence = subject.fences.get(id).cloned().unwrap_or_default();
                            if stale {
                                fence.nonce.push('x');
                            }
                            fence
                        };
                        let (mf, rf) = (fence_of(memory_subject), fence_of(&redis));
                        let cost = QuotaCost::from([("vcpus".to_owned(), rng.random_range(1..4))]);
                        let m = memory_subject
                            .store
                            .reserve_quota(tenant, id, &mf, &cost)
                            .await;
                        let r = redis.store.reserve_quota(tenant, id, &rf, &cost).await;
                        (
                            format!("reserve {tenant} {id} {cost:?} stale {stale}"),
                            answer(&m),
                            answer(&r),
                        )
                    }
                    1 => {
                        let m = memory_subject.store.release_quota(id).await;
                        let r = redis.store.release_quota(id).await;
                        (format!("release_quota {id}"), answer(&m), answer(&r))
                    }
                    2 => {
                        let unit = if rng.random_bool(0.5) {
                            "machines"
                        } else {
                            "vcpus"
                        };
                        let limit = rng.random_bool(0.8).then(|| rng.random_range(1..5));
                        let m = memory_subject.store.set_quota(tenant, unit, limit).await;
                        let r = redis.store.set_quota(tenant, unit, limit).await;
                        (
                            format!("set_quota {tenant} {unit} {limit:?}"),
                            answer(&m),
                            answer(&r),
                        )
                    }
                    _ => {
                        let m = memory_subject.store.quota(tenant).await;
                        let r = redis.store.quota(tenant).await;
                        (format!("quota {tenant}"), answer(&m), answer(&r))
                    }
                }
            }
            15 => {
                let schedule = "docker/fleets";
                match rng.random_range(0..3) {
                    0 => {
                        let at = if rng.random_bool(0.6) {
                            SystemTime::now() - Duration::from_secs(1)
                        } else {
                            SystemTime::now() + Duration::from_secs(3600)
                        };
                        let m = memory_subject.store.schedule_expiry(schedule, id, at).await;
                        let r = redis.store.schedule_expiry(schedule, id, at).await;
                        (format!("schedule {id}"), answer(&m), answer(&r))
                    }
                    1 => {
                        let retry = Duration::from_secs(60);
                        let ids = |due: Result<Vec<(String, SystemTime)>, _>| {
                            due.map(|d| {
                                let mut ids: Vec<String> =
                                    d.into_iter().map(|(id, _)| id).collect();
                                ids.sort();
                                ids
                            })
                        };
                        let m = ids(memory_subject
                            .store
                            .take_due_expiries(schedule, 8, retry)
                            .await);
                        let r = ids(redis.store.take_due_expiries(schedule, 8, retry).await);
                        ("take_due".to_owned(), answer(&m), answer(&r))
                    }
                    _ => {
                        let m = memory_subject.store.cancel_expiry(schedule, id).await;
                        let r = redis.store.cancel_expiry(schedule, id).await;
                        (format!("cancel {id}"), answer(&m), answer(&r))
                    }
                }
            }
            16 => {
                if rng.random_bool(0.5) {
                    let json = format!("{{\"fleet\":\"{id}\"}}");
                    let m = memory_subject.store.put_fleet(id, &json).await;
                    let r = redis.store.put_fleet(id, &json).await;
                    (format!("put_fleet {id}"), answer(&m), answer(&r))
                } else {
                    let m = memory_subject.store.fleet(id).await;
                    let r = redis.store.fleet(id).await;
                    (format!("fleet {id}"), answer(&m), answer(&r))
                }
            }
            17 => {
                // The key is lost, as a Redis without persistence loses it.
                memory.lose_record(id);
                let _: i64 = redis::cmd("DEL")
                    .arg(format!("{prefix}docker:req:{id}"))
                    .query_async(&mut connection)
                    .await
                    .expect("del");
                (format!("lose {id}"), String::new(), String::new())
            }
            _ => {
                // Short leases run out.
                tokio::time::sleep(Duration::from_millis(250)).await;
                ("sleep".to_owned(), String::new(), String::new())
            }
        };
        log.push(format!("{step}: {what} -> {on_memory}"));
        assert_eq!(
            on_memory,
            on_redis,
            "sequence {seed}, step {step}: {what}: the memory store and Redis answered differently\n{}",
            log.join("\n")
        );
    }
}

#[tokio::test]
async fn the_memory_store_answers_as_redis_does_on_redis() {
    let first = std::env::var("STORE_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0u64);
    for seed in first..first + SEQUENCES {
        let prefix = format!(
            "model-{}-{seed}:",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..8)
                .unwrap_or("x")
        );
        let memory = Arc::new(MemoryStore::with_retention(Duration::from_secs(600)));
        let mut memory_subject = Subject {
            store: memory.clone(),
            fences: BTreeMap::new(),
        };
        let redis = Subject {
            store: Arc::new(
                RedisStore::connect(&redis_url(), &prefix, Duration::from_secs(600))
                    .await
                    .expect("Redis must be running (the README's test command starts it)")
                    .for_platform(PlatformName::Docker),
            ),
            fences: BTreeMap::new(),
        };
        run(seed, &memory, &redis, &mut memory_subject, &prefix).await;
    }
}
