//! The Lambda function's cold start and size: the real `provisioner-lambda` binary started
//! against the Lambda Runtime API served here, as Lambda starts it, with RabbitMQ, Redis
//! and LocalStack (EC2) as the tests use them.
//!
//! Cold start: from starting the process to the answer of its first invocation, an
//! Amazon MQ event with one `describe` (configuration read, broker connected and topology
//! declared, Redis connected, a claim, DescribeInstances on LocalStack, two confirmed
//! events, the fenced record). Lambda's own sandbox start comes on top on AWS. Then the
//! same invocation warm, the process's peak memory, and the binary's size as built,
//! stripped, and zipped the way it is deployed.
//!
//! `scripts/bench.sh` runs it after the runtime benchmark; `BENCH_SHORT=1` is CI's quick
//! mode (one start).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use provisioner_core::amqp::{AmqpBroker, AmqpConfig, work_queue};
use provisioner_core::broker::Broker;
use provisioner_events::PlatformName;

#[path = "../tests/support/lambda_api.rs"]
mod lambda_api;

use lambda_api::{RuntimeApi, rabbitmq_event, rabbitmqctl};

const BIN: &str = env!("CARGO_BIN_EXE_provisioner-lambda");

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn describe(id: &str, target: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "describe",
        "platform": "aws-ec2", "target_request_id": target
    })
}

/// `VmHWM` of a process, in MiB.
fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Sizes of the binary as built, stripped, and as the zip Lambda takes (`bootstrap`).
fn sizes() -> (u64, Option<u64>, Option<u64>) {
    let built = std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("provisioner-lambda-size-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let bootstrap = dir.join("bootstrap");
    let zip = dir.join("function.zip");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&bootstrap)
        .arg(BIN)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&bootstrap).ok())
        .map(|m| m.len());
    let zipped = stripped
        .and_then(|_| {
            Command::new("zip")
                .arg("-j")
                .arg("-q")
                .arg(&zip)
                .arg(&bootstrap)
                .status()
                .ok()
        })
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&zip).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_dir_all(&dir);
    (built, stripped, zipped)
}

struct Start {
    cold: Duration,
    warm: Duration,
    peak_mib: f64,
}

async fn start_once(amqp_url: &str, tag: &str, n: usize) -> Start {
    let api = RuntimeApi::start().await;
    let queue = work_queue(PlatformName::AwsEc2);
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let localstack = env_or("PROVISIONER_TEST_AWS_ENDPOINT", "http://127.0.0.1:4566");
    let moto = env_or("PROVISIONER_TEST_ECS_ENDPOINT", "http://127.0.0.1:5000");
    let started = Instant::now();
    let mut function = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "provisioner-bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("bench/{tag}/{n}"))
        .env("PLATFORM", "aws-ec2")
        .env("AMQP_URL", amqp_url)
        .env("REDIS_URL", &redis_url)
        .env("REDIS_KEY_PREFIX", format!("bench-{tag}-{n}:"))
        .env("AWS_ENDPOINT_URL", &localstack)
        .env("AWS_ENDPOINT_URL_SQS", &moto)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("PROVISIONER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the function");
    let answer = api
        .invoke(rabbitmq_event(
            &queue,
            &[describe(&format!("cold-{tag}-{n}"), &format!("none-{tag}"))],
        ))
        .await;
    let cold = started.elapsed();
    assert!(answer.is_ok(), "the first invocation failed: {answer:?}");
    let again = Instant::now();
    let answer = api
        .invoke(rabbitmq_event(
            &queue,
            &[describe(&format!("warm-{tag}-{n}"), &format!("none-{tag}"))],
        ))
        .await;
    let warm = again.elapsed();
    assert!(answer.is_ok(), "the second invocation failed: {answer:?}");
    let peak_mib = peak_mib(function.id());
    let _ = function.kill();
    let _ = function.wait();
    Start {
        cold,
        warm,
        peak_mib,
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.0}", duration.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| v == "1");
    let starts: usize = std::env::var("BENCH_COLD_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if short { 1 } else { 5 })
        .max(1);
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
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    // The queue the event source reads exists before the function starts, as on AWS.
    AmqpBroker::connect(AmqpConfig::new(amqp_url.clone()))
        .await
        .expect("RabbitMQ must be running")
        .declare(PlatformName::AwsEc2)
        .await
        .expect("topology");

    let mut runs = Vec::with_capacity(starts);
    for n in 0..starts {
        runs.push(start_once(&amqp_url, &tag, n).await);
    }
    rabbitmqctl(&["-q", "delete_vhost", &vhost]);

    let mut cold: Vec<Duration> = runs.iter().map(|r| r.cold).collect();
    let mut warm: Vec<Duration> = runs.iter().map(|r| r.warm).collect();
    cold.sort();
    warm.sort();
    let peak = runs.iter().map(|r| r.peak_mib).fold(0.0, f64::max);
    let (built, stripped, zipped) = sizes();
    let or_na = |size: Option<u64>| size.map_or_else(|| "n/a".into(), mib);
    println!("\n## Lambda: {starts} cold starts of the binary this build made\n");
    println!(
        "| cold start ms (median, max) | warm invocation ms (median) | peak RSS MiB | binary MiB | stripped MiB | zipped MiB |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {}, {} | {} | {peak:.1} | {} | {} | {} |",
        ms(cold[cold.len() / 2]),
        ms(cold[cold.len() - 1]),
        ms(warm[warm.len() / 2]),
        mib(built),
        or_na(stripped),
        or_na(zipped),
    );
}
