//! Throughput of the worker runtime, as a ratio against the raw broker in the same run.
//!
//! Baseline: lapin alone, doing the least a worker must per message: consume from a quorum
//! queue, publish one event with a confirm, ack; 16 in flight. Measured: the runtime with
//! a platform that does nothing, on the same RabbitMQ and a real Redis: decode, claim,
//! two confirmed events, a fenced completion, ack. Both drain a queue filled beforehand.
//! Needs RabbitMQ and Redis (`scripts/bench.sh` starts them). `BENCH_REQUESTS` sets the
//! count (default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use provisioner_core::amqp::{AmqpBroker, AmqpConfig};
use provisioner_core::redis_store::RedisStore;
use provisioner_core::{Broker, Platform, PlatformError, Worker, WorkerConfig};
use provisioner_events::{PlatformName, Request, Resource, TeardownTarget};

const IN_FLIGHT: u16 = 16;

struct Noop;

#[async_trait]
impl Platform for Noop {
    fn name(&self) -> PlatformName {
        PlatformName::Process
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

fn request(n: usize, run: &str) -> Vec<u8> {
    format!(r#"{{"schema_version":1,"request_id":"bench-{run}-{n}","operation":"provision","platform":"process","spec":{{"program":"noop"}}}}"#)
        .into_bytes()
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

async fn raw_broker(url: &str, count: usize, run: &str) -> Duration {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publisher
        .queue_declare("bench.raw".into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("queue");
    publisher
        .exchange_declare(
            "bench.events".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    publisher
        .queue_declare(
            "bench.events".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    publisher
        .queue_bind(
            "bench.events".into(),
            "bench.events".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let mut confirms = Vec::new();
    for n in 0..count {
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    "bench.raw".into(),
                    BasicPublishOptions::default(),
                    &request(n, run),
                    persistent.clone(),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(IN_FLIGHT, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            "bench.raw".into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let delivery = consumer.next().await.expect("delivery").expect("ok");
        let publisher = publisher.clone();
        let persistent = persistent.clone();
        tasks.spawn(async move {
            publisher
                .basic_publish(
                    "bench.events".into(),
                    "process.running".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    persistent,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

async fn runtime(url: &str, redis_url: &str, count: usize, run: &str) -> Duration {
    let broker = AmqpBroker::connect(AmqpConfig::new(url))
        .await
        .expect("broker");
    broker
        .declare(PlatformName::Process)
        .await
        .expect("declare");
    for n in 0..count {
        broker
            .publish_request("process.provision", "bench", &request(n, run))
            .await
            .expect("publish");
    }
    let store = RedisStore::connect(
        redis_url,
        &format!("bench-{run}:"),
        Duration::from_secs(600),
    )
    .await
    .expect("redis");
    let mut events = broker.subscribe_status().await.expect("subscribe");
    let config = WorkerConfig {
        prefetch: IN_FLIGHT,
        ..WorkerConfig::default()
    };
    let worker = Arc::new(Worker::new(
        Arc::new(Noop),
        Arc::new(store),
        Arc::new(broker.clone()),
        config,
    ));
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    let mut done = 0;
    while done < count {
        let event = events.next().await.expect("event");
        if event.state.is_terminal() {
            done += 1;
        }
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    let _ = running.await;
    elapsed
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let vhost = format!("bench-{run}");
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

    let raw = raw_broker(&url, count, &run).await;
    let measured = runtime(&url, &redis_url, count, &run).await;
    rabbitmqctl(&["-q", "delete_vhost", &vhost]);

    let raw_rate = count as f64 / raw.as_secs_f64();
    let rate = count as f64 / measured.as_secs_f64();
    println!(
        "requests: {count}, in flight: {IN_FLIGHT}, peak RSS of the bench process: {:.1} MiB",
        peak_rss_mib()
    );
    println!("| path | per second | ratio to raw broker |");
    println!("|---|---|---|");
    println!("| raw RabbitMQ: consume, 1 confirmed publish, ack | {raw_rate:.0} | 1.00 |");
    println!(
        "| worker runtime, no-op platform: claim + 2 confirmed events + fenced completion in Redis, ack | {rate:.0} | {:.2} |",
        rate / raw_rate
    );
}
