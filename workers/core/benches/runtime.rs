//! The worker runtime against the raw broker, measured in one run on the same RabbitMQ:
//! throughput, latency, CPU per request and memory.
//!
//! Both sides run as a child process of this benchmark (the binary started again with
//! `BENCH_ROLE`), so their CPU time and memory are theirs alone, and both are watched the
//! same way: a subscriber on `provisioning.status` sees their events.
//!
//! - **raw**: lapin alone doing the least a worker must per message: consume from the
//!   platform's quorum work queue, publish one persistent event to `provisioning.status`
//!   with `mandatory` and a confirm, ack. Its event takes the routes a status event takes
//!   (the durable journal and the subscriber's queue).
//! - **runtime**: [`Worker`] with a platform that does nothing, a real Redis (idempotency
//!   on) and the same broker: decode, claim, `starting` and `running` confirmed, fenced
//!   completion, ack.
//!
//! Measured: drain rate of a queue filled beforehand at the default prefetch and a higher
//! one (first to last terminal event), with the CPU each process spent per request
//! meanwhile (the side, RabbitMQ, Redis: the profile of where a request's cost goes);
//! publish → terminal event latency at paced rates, from an HDR histogram; the worker's
//! resident memory idle and while it drains a large backlog.
//!
//! `scripts/bench.sh` runs it (release build). `BENCH_SHORT=1` is the quick mode CI runs
//! to keep it working (its figures mean nothing in a debug build). Needs RabbitMQ (with
//! `rabbitmqctl`) and Redis; `REDIS_URL` as in the tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use provisioner_core::amqp::{AmqpBroker, AmqpConfig, STATUS_JOURNAL_QUEUE, work_queue};
use provisioner_core::redis_store::RedisStore;
use provisioner_core::{Broker, Platform, PlatformError, Worker, WorkerConfig};
use provisioner_events::{
    PlatformName, REQUESTS_EXCHANGE, Request, Resource, STATUS_EXCHANGE, TeardownTarget,
};
use tokio::sync::mpsc;

/// The worker's default prefetch, and a higher one.
const PREFETCHES: [u16; 2] = [16, 64];
const PLATFORM: PlatformName = PlatformName::Process;

struct Noop;

#[async_trait]
impl Platform for Noop {
    fn name(&self) -> PlatformName {
        PLATFORM
    }
    fn validate(&self, _: &Request) -> Result<(), PlatformError> {
        Ok(())
    }
    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        Ok(Resource {
            id: request.request_id.to_string(),
            name: request.request_id.to_string(),
            ..Default::default()
        })
    }
    async fn teardown(&self, _: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        Ok(None)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request_body(id: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"process","spec":{{"program":"noop"}}}}"#)
        .into_bytes()
}

// ---------------------------------------------------------------------------------------
// The two sides, each in a child process.

/// The worker runtime until killed.
async fn runtime_child(url: &str) {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = std::env::var("BENCH_REDIS_PREFIX").expect("BENCH_REDIS_PREFIX");
    let broker = AmqpBroker::connect(AmqpConfig::new(url))
        .await
        .expect("broker");
    let store = RedisStore::connect(&redis_url, &prefix, Duration::from_secs(600))
        .await
        .expect("redis")
        .for_platform(PLATFORM);
    let config = WorkerConfig {
        prefetch: env_or("BENCH_PREFETCH", 16),
        ..WorkerConfig::default()
    };
    let worker = Arc::new(Worker::new(
        Arc::new(Noop),
        Arc::new(store),
        Arc::new(broker),
        config,
    ));
    worker.run(std::future::pending()).await;
}

/// The raw broker path until killed: consume, one confirmed publish, ack.
async fn raw_child(url: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(env_or("BENCH_PREFETCH", 16), BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            work_queue(PLATFORM).as_str().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.expect("delivery");
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let confirm = publisher
                .basic_publish(
                    STATUS_EXCHANGE.into(),
                    "process.running".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack(), "event not confirmed");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    Raw,
    Runtime,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Runtime => "runtime",
        }
    }
}

/// A side running in a child process; killed when dropped.
struct Child {
    process: std::process::Child,
}

impl Child {
    fn start(side: Side, url: &str, prefetch: u16, redis_prefix: &str) -> Child {
        let process = std::process::Command::new(std::env::current_exe().expect("own path"))
            .env("BENCH_ROLE", side.name())
            .env("BENCH_URL", url)
            .env("BENCH_PREFETCH", prefetch.to_string())
            .env("BENCH_REDIS_PREFIX", redis_prefix)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the child");
        Child { process }
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

// ---------------------------------------------------------------------------------------
// What the harness reads of processes: CPU time and resident memory, from /proc.

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start past the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // /proc counts in USER_HZ, which is 100 on every Linux architecture this runs on.
    Some(ticks / 100.0)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The port of the Redis the benchmark uses (`REDIS_URL`), to tell its process from
/// another Redis on the machine (the test services also run a TLS one).
fn redis_port() -> u16 {
    let url = std::env::var("REDIS_URL").unwrap_or_default();
    let authority = url
        .split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    host.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(6379)
}

/// The local broker's and Redis's processes, when they run on this machine.
fn service_pids() -> Vec<(&'static str, u32)> {
    // Redis names its process `redis-server <address>:<port>`.
    let redis = format!(":{}", redis_port());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match comm.trim() {
            "beam.smp" => found.push(("RabbitMQ", pid)),
            "redis-server" => {
                let title =
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if title.trim_end_matches(['\0', ' ']).ends_with(&redis) {
                    found.push(("Redis", pid));
                }
            }
            _ => {}
        }
    }
    found.sort();
    found
}

/// CPU seconds of the side and of the services, read together.
#[derive(Clone)]
struct CpuSnapshot(Vec<(&'static str, f64)>);

fn snapshot(side: u32, services: &[(&'static str, u32)]) -> CpuSnapshot {
    let mut taken = vec![("side", cpu_seconds(side).unwrap_or(0.0))];
    for (name, pid) in services {
        taken.push((name, cpu_seconds(*pid).unwrap_or(0.0)));
    }
    CpuSnapshot(taken)
}

// ---------------------------------------------------------------------------------------
// The harness: publishing requests, and watching the status exchange.

/// A terminal event seen by the subscriber: its request id and when it came.
struct Seen {
    request_id: String,
    at: Instant,
}

#[derive(serde::Deserialize)]
struct IdOnly {
    request_id: String,
}

/// Subscribes to every status event and forwards the terminal ones (the raw side
/// publishes only terminal ones). Not `Broker::subscribe_status`: that decodes whole
/// events, and the watcher's own cost should stay small beside what it measures; the
/// routing key and the request id are all it reads.
async fn watch_status(connection: &Connection) -> mpsc::UnboundedReceiver<Seen> {
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.name().clone(),
            STATUS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "bench-watch".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            if !delivery.routing_key.as_str().ends_with(".running") {
                continue;
            }
            if let Ok(event) = serde_json::from_slice::<IdOnly>(&delivery.data) {
                let _ = sender.send(Seen {
                    request_id: event.request_id,
                    at,
                });
            }
        }
    });
    receiver
}

/// Publishes a request as producers do (persistent, confirmed); returns the confirm.
async fn send_request(channel: &Channel, id: &str) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            REQUESTS_EXCHANGE.into(),
            "process.provision".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &request_body(id),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into())
                .with_timestamp(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                ),
        )
        .await
        .expect("publish")
}

/// Fills the work queue with `ids`, confirms awaited in batches.
async fn fill(channel: &Channel, ids: &[String]) {
    for batch in ids.chunks(1000) {
        let mut confirms = Vec::with_capacity(batch.len());
        for id in batch {
            confirms.push(send_request(channel, id).await);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack(), "request refused");
        }
    }
}

/// Waits until every one of `ids` ended; returns when each did.
async fn await_all(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    ids: &[String],
    limit: Duration,
    mut on_first: impl FnMut(),
) -> HashMap<String, Instant> {
    let mut waiting: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut ended = HashMap::with_capacity(ids.len());
    let deadline = tokio::time::Instant::now() + limit;
    while !waiting.is_empty() {
        let next = tokio::time::timeout_at(deadline, seen.recv()).await;
        let Ok(Some(event)) = next else {
            panic!(
                "{} of {} requests did not end within {limit:?}",
                waiting.len(),
                ids.len()
            );
        };
        if waiting.remove(event.request_id.as_str()) {
            if ended.is_empty() {
                on_first();
            }
            ended.insert(event.request_id, event.at);
        }
    }
    ended
}

struct Run {
    url: String,
    tag: String,
    publisher: Channel,
    seen: mpsc::UnboundedReceiver<Seen>,
    services: Vec<(&'static str, u32)>,
}

impl Run {
    fn ids(&self, what: &str, count: usize) -> Vec<String> {
        (0..count)
            .map(|n| format!("{what}-{}-{n}", self.tag))
            .collect()
    }

    /// Empties the status journal, so every measurement starts from the same broker state
    /// (a full journal drops its oldest event for each new one, which costs the broker).
    async fn fresh_journal(&self) {
        self.publisher
            .queue_purge(STATUS_JOURNAL_QUEUE.into(), QueuePurgeOptions::default())
            .await
            .expect("purge the journal");
    }

    async fn start(&self, side: Side, prefetch: u16, what: &str) -> Child {
        self.fresh_journal().await;
        Child::start(
            side,
            &self.url,
            prefetch,
            &format!("bench-{}-{what}:", self.tag),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The measurements.

struct Throughput {
    rate: f64,
    /// CPU milliseconds per request: the side, then each service.
    cpu_ms: Vec<(&'static str, f64)>,
}

/// Drains `count` requests queued beforehand; rate and CPU from the first terminal event
/// to the last.
async fn throughput(run: &mut Run, side: Side, prefetch: u16, count: usize) -> Throughput {
    let what = format!("tp-{}-{prefetch}", side.name());
    let ids = run.ids(&what, count);
    fill(&run.publisher, &ids).await;
    let child = run.start(side, prefetch, &what).await;
    let pid = child.pid();
    let services = run.services.clone();
    let mut first = None;
    let ended = await_all(&mut run.seen, &ids, Duration::from_secs(600), || {
        first = Some((Instant::now(), snapshot(pid, &services)));
    })
    .await;
    let last = snapshot(pid, &services);
    drop(child);
    let (first_at, first_cpu) = first.expect("a first event");
    let last_at = ended.values().max().copied().expect("events");
    let span = last_at.duration_since(first_at).as_secs_f64().max(1e-9);
    let counted = (count - 1) as f64;
    let cpu_ms = first_cpu
        .0
        .iter()
        .zip(last.0.iter())
        .map(|((name, before), (_, after))| (*name, (after - before) * 1000.0 / counted))
        .collect();
    Throughput {
        rate: counted / span,
        cpu_ms,
    }
}

/// Publishes at `rate` per second for `duration` and records publish → terminal event.
async fn latency(
    run: &mut Run,
    side: Side,
    rate: u32,
    prefetch: u16,
    duration: Duration,
) -> Histogram<u64> {
    let what = format!("lat-{}-{rate}-{prefetch}", side.name());
    let child = run.start(side, prefetch, &what).await;
    // One request first, so the child is connected and consuming before the clock runs.
    let warm = run.ids(&format!("{what}-warm"), 1);
    fill(&run.publisher, &warm).await;
    await_all(&mut run.seen, &warm, Duration::from_secs(60), || {}).await;

    let count = (f64::from(rate) * duration.as_secs_f64()).round().max(1.0) as usize;
    let ids = run.ids(&what, count);
    let mut sent = HashMap::with_capacity(count);
    let (confirms_tx, mut confirms_rx) = mpsc::unbounded_channel::<lapin::PublisherConfirm>();
    let confirming = tokio::spawn(async move {
        while let Some(confirm) = confirms_rx.recv().await {
            assert!(confirm.await.expect("confirm").is_ack(), "request refused");
        }
    });
    let started = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    for (n, id) in ids.iter().enumerate() {
        tokio::time::sleep_until(started + interval.mul_f64(n as f64)).await;
        sent.insert(id.clone(), Instant::now());
        let _ = confirms_tx.send(send_request(&run.publisher, id).await);
    }
    drop(confirms_tx);
    let ended = await_all(&mut run.seen, &ids, Duration::from_secs(120), || {}).await;
    confirming.await.expect("confirms");
    drop(child);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    for (id, at) in &ended {
        let micros = at.duration_since(sent[id]).as_micros() as u64;
        histogram.record(micros.max(1)).expect("record");
    }
    histogram
}

struct Memory {
    idle: f64,
    peak: f64,
    rate: f64,
}

/// The worker's resident memory idle, then its peak while it drains `backlog` requests
/// queued before it started, at the default prefetch.
async fn memory(run: &mut Run, backlog: usize) -> Memory {
    let warm = run.ids("mem-warm", 1);
    fill(&run.publisher, &warm).await;
    let idle_worker = run.start(Side::Runtime, PREFETCHES[0], "mem-idle").await;
    await_all(&mut run.seen, &warm, Duration::from_secs(60), || {}).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, _) = memory_mib(idle_worker.pid()).expect("memory");
    drop(idle_worker);

    let ids = run.ids("mem", backlog);
    fill(&run.publisher, &ids).await;
    let worker = run.start(Side::Runtime, PREFETCHES[0], "mem").await;
    let started = Instant::now();
    await_all(&mut run.seen, &ids, Duration::from_secs(1800), || {}).await;
    let elapsed = started.elapsed();
    let (_, peak) = memory_mib(worker.pid()).expect("memory");
    Memory {
        idle,
        peak,
        rate: backlog as f64 / elapsed.as_secs_f64(),
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

fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

fn main() {
    if let Ok(role) = std::env::var("BENCH_ROLE") {
        let url = std::env::var("BENCH_URL").expect("BENCH_URL");
        // The multi-threaded runtime, as the `provisioner` binary runs.
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            match role.as_str() {
                "raw" => raw_child(&url).await,
                "runtime" => runtime_child(&url).await,
                other => panic!("unknown BENCH_ROLE {other}"),
            }
        });
        return;
    }
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(harness());
}

async fn harness() {
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| v == "1");
    let count: usize = env_or("BENCH_REQUESTS", if short { 300 } else { 5000 });
    let rounds: usize = env_or("BENCH_ROUNDS", if short { 1 } else { 5 }).max(1);
    let backlog: usize = env_or("BENCH_BACKLOG", if short { 1000 } else { 100_000 });
    let seconds: f64 = env_or("BENCH_LATENCY_SECONDS", if short { 1.0 } else { 10.0 });

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
    AmqpBroker::connect(AmqpConfig::new(url.clone()))
        .await
        .expect("broker")
        .declare(PLATFORM)
        .await
        .expect("topology");
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let seen = watch_status(&connection).await;
    let mut run = Run {
        url,
        tag,
        publisher,
        seen,
        services: service_pids(),
    };

    println!(
        "## Throughput: {count} requests queued beforehand, drained (first to last terminal event); the median round of {rounds}\n"
    );
    let mut header = String::from("| prefetch | path | per second | ratio to raw |");
    let mut rule = String::from("|---|---|---|---|");
    header.push_str(" CPU ms/request: the path |");
    rule.push_str("---|");
    for (name, _) in &run.services {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for prefetch in PREFETCHES {
        // Alternating rounds: the broker's rate wanders from one drain to the next (its
        // log and journal segments roll over, the disk's fsyncs vary), so each runtime
        // drain is compared with the raw drain just before it, and the median round of
        // those ratios is reported, with the lowest and highest.
        let mut rounds_run = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let raw = throughput(&mut run, Side::Raw, prefetch, count).await;
            let measured = throughput(&mut run, Side::Runtime, prefetch, count).await;
            rounds_run.push((raw, measured));
        }
        rounds_run.sort_by(|a, b| (a.1.rate / a.0.rate).total_cmp(&(b.1.rate / b.0.rate)));
        let ratios: Vec<f64> = rounds_run.iter().map(|(r, m)| m.rate / r.rate).collect();
        let spread = if rounds > 1 {
            format!(" ({:.2}–{:.2})", ratios[0], ratios[ratios.len() - 1])
        } else {
            String::new()
        };
        let (raw, measured) = &rounds_run[rounds_run.len() / 2];
        for (label, result, ratio) in [
            (
                "raw RabbitMQ: consume, 1 confirmed publish, ack",
                raw,
                "1.00".to_owned(),
            ),
            (
                "worker runtime: claim, `starting` + `running` confirmed, fenced completion, ack",
                measured,
                format!("{:.2}{spread}", measured.rate / raw.rate),
            ),
        ] {
            let mut line = format!("| {prefetch} | {label} | {:.0} | {ratio} |", result.rate);
            for (_, cpu) in &result.cpu_ms {
                line.push_str(&format!(" {cpu:.3} |"));
            }
            println!("{line}");
        }
    }

    println!("\n## Latency: publish → terminal event, paced ({seconds} s a rate)\n");
    println!(
        "| rate/s | prefetch | path | p50 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|"
    );
    let duration = Duration::from_secs_f64(seconds);
    for (rate, prefetch) in [
        (100, PREFETCHES[0]),
        (1000, PREFETCHES[0]),
        (1000, PREFETCHES[1]),
    ] {
        for side in [Side::Raw, Side::Runtime] {
            let h = latency(&mut run, side, rate, prefetch, duration).await;
            println!(
                "| {rate} | {prefetch} | {} | {} | {} | {} | {} |",
                side.name(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max())
            );
        }
    }

    let memory = memory(&mut run, backlog).await;
    println!(
        "\n## Memory of the worker process (prefetch {})\n\n| idle RSS MiB | peak RSS MiB while draining {backlog} queued | drained per second |\n|---|---|---|\n| {:.1} | {:.1} | {:.0} |",
        PREFETCHES[0], memory.idle, memory.peak, memory.rate
    );

    drop(run);
    drop(connection);
    rabbitmqctl(&["-q", "delete_vhost", &vhost]);
}
