//! A fleet's spin-up time against the physical limit of the cloud's API bucket, measured
//! in one run on the real RabbitMQ and Redis.
//!
//! The platform does nothing but declare EC2's RunInstances buckets (5 requests refilling
//! 2 a second; 1,000 instances refilling 2 a second), so what shows is the system's own
//! cost of pacing a fleet through them: members published, spread over three workers,
//! each reserving its tokens in Redis, and the coordinator's end event. Three figures:
//!
//! - **limit**: the least time the bucket allows for N launches of one instance each,
//!   computed from its parameters: `(N - 5) / 2` seconds.
//! - **direct**: the same N calls made straight from one loop paced by a local token
//!   bucket with the same parameters, measured in the same run.
//! - **fleet**: one request of `count` N through three in-process workers, publish to the
//!   fleet's terminal event.
//!
//! `scripts/bench.sh` runs it (release build); `BENCH_SHORT=1` is the quick mode CI runs
//! to keep it working. Needs RabbitMQ (with `rabbitmqctl`) and Redis (`REDIS_URL`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig};
use provisioner_core::redis_store::RedisStore;
use provisioner_core::{Broker, Platform, PlatformError, RateLimit, Worker, WorkerConfig};
use provisioner_events::{PlatformName, Request, Resource, State, TeardownTarget};

const PLATFORM: PlatformName = PlatformName::AwsEc2;
const CAPACITY: f64 = 5.0;
const REFILL: f64 = 2.0;

/// Launches nothing, through EC2's buckets.
struct PacedNoop {
    launches: AtomicUsize,
}

#[async_trait]
impl Platform for PacedNoop {
    fn name(&self) -> PlatformName {
        PLATFORM
    }
    fn validate(&self, _: &Request) -> Result<(), PlatformError> {
        Ok(())
    }
    fn rate_limits(&self, _: &Request) -> Vec<RateLimit> {
        vec![
            RateLimit::new("RunInstances", "bench", CAPACITY, REFILL),
            RateLimit::new("RunInstances.instances", "bench", 1000.0, 2.0),
        ]
    }
    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        Ok(Resource {
            id: format!("i-{}", request.request_id),
            name: request.request_id.to_string(),
            ..Default::default()
        })
    }
    async fn teardown(&self, _: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        Ok(None)
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// The direct baseline: `count` calls from one loop, each taking a token of a local bucket
/// with EC2's parameters, waiting for it when there is none.
async fn direct(count: usize) -> Duration {
    let started = Instant::now();
    let (mut tokens, mut at) = (CAPACITY, Instant::now());
    for _ in 0..count {
        loop {
            let now = Instant::now();
            tokens = (tokens + now.duration_since(at).as_secs_f64() * REFILL).min(CAPACITY);
            at = now;
            if tokens >= 1.0 {
                tokens -= 1.0;
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64((1.0 - tokens) / REFILL)).await;
        }
        std::hint::black_box(());
    }
    started.elapsed()
}

fn main() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(harness());
}

async fn harness() {
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| v == "1");
    let count: u32 = std::env::var("BENCH_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if short { 20 } else { 200 });
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let vhost = format!("bench-{tag}");
    rabbitmqctl(&["-q", "add_vhost", &vhost]);
    rabbitmqctl(&[
        "-q",
        "set_permissions",
        "-p",
        &vhost,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = Arc::new(
        RedisStore::connect(
            &redis_url,
            &format!("bench-{tag}:"),
            Duration::from_secs(3600),
        )
        .await
        .expect("Redis")
        .for_platform(PLATFORM),
    );
    let broker = Arc::new(
        AmqpBroker::connect(AmqpConfig::new(url.clone()))
            .await
            .expect("RabbitMQ"),
    );
    broker.declare(PLATFORM).await.expect("topology");
    let platform = Arc::new(PacedNoop {
        launches: AtomicUsize::new(0),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    for n in 0..3 {
        let worker = Arc::new(Worker::new(
            platform.clone(),
            store.clone(),
            Arc::new(
                AmqpBroker::connect(AmqpConfig::new(url.clone()))
                    .await
                    .expect("RabbitMQ"),
            ),
            WorkerConfig {
                worker_id: format!("bench-{n}"),
                ..WorkerConfig::default()
            },
        ));
        let mut stopped = stopped.clone();
        tokio::spawn(worker.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    let mut events = broker.subscribe_status().await.expect("subscribe");

    let limit = Duration::from_secs_f64((f64::from(count) - CAPACITY).max(0.0) / REFILL);
    let direct = direct(count as usize).await;

    let id = format!("bench-fleet-{tag}");
    let body = format!(
        r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"aws-ec2","count":{count},"spec":{{"image_id":"ami-12345678","instance_type":"t3.micro"}}}}"#
    );
    // Let the workers start consuming, so the timing is the fleet's, not the start-up's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    broker
        .publish_request("aws-ec2.provision", &id, body.as_bytes())
        .await
        .expect("publish");
    let end = loop {
        let event = tokio::time::timeout(Duration::from_secs(3600), events.next())
            .await
            .expect("the fleet never ended")
            .expect("status stream");
        if event.request_id == id && event.state.is_terminal() {
            break event;
        }
    };
    let fleet = started.elapsed();
    assert_eq!(end.state, State::Running, "{end:#?}");
    assert_eq!(platform.launches.load(Ordering::SeqCst), count as usize);

    let ratio = |d: Duration| d.as_secs_f64() / limit.as_secs_f64().max(f64::EPSILON);
    println!(
        "## Fleet of {count} through EC2's RunInstances bucket ({CAPACITY} refilling {REFILL}/s), 3 workers\n"
    );
    println!("| path | seconds | ratio to the bucket's limit |\n|---|---|---|");
    println!(
        "| limit: (N - {CAPACITY}) / {REFILL} | {:.1} | 1.00 |",
        limit.as_secs_f64()
    );
    println!(
        "| direct: one loop, local bucket | {:.1} | {:.2} |",
        direct.as_secs_f64(),
        ratio(direct)
    );
    println!(
        "| fleet: one request, members over 3 workers | {:.1} | {:.2} |",
        fleet.as_secs_f64(),
        ratio(fleet)
    );

    let _ = stop.send(true);
    drop(events);
    tokio::time::sleep(Duration::from_millis(500)).await;
    rabbitmqctl(&["-q", "delete_vhost", &vhost]);
}
