//! A fleet of EC2 instances on LocalStack: its spin-up time through the system against
//! the least time EC2's buckets allow and against the same launches made directly, all
//! in one run, on the real RabbitMQ, Redis and LocalStack.
//!
//! - **limit**: the least time EC2's buckets allow for N instances launched in calls of
//!   at most [`MAX_BATCH`] (the most one call of ours carries): the RunInstances bucket
//!   gives 5 calls at once then 2 a second, the instance bucket 1,000 at once then 2 a
//!   second. Computed from the parameters; the emulator's own speed is not in it.
//! - **direct**: the same N instances launched straight from one loop in calls of
//!   [`MAX_BATCH`], paced by a local copy of the buckets, until all run. Measured first,
//!   on the emptier account (LocalStack slows as instances pile up), so the comparison
//!   never favours the system.
//! - **fleet**: one request of `count` N through three in-process EC2 workers (the
//!   batches, the lookups, the records, the events), publish to the fleet's terminal
//!   event; then its teardown.
//!
//! `scripts/bench.sh` runs it (release build); `BENCH_SHORT=1` is the quick mode CI runs.
//! `BENCH_EC2_FLEET` sets N (default 1,000; 40 in quick mode). Needs RabbitMQ (with
//! `rabbitmqctl`), Redis (`REDIS_URL`) and LocalStack (`PROVISIONER_TEST_AWS_ENDPOINT`,
//! default `http://127.0.0.1:4566`).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Filter, InstanceType, ResourceType, Tag, TagSpecification};
use provisioner_aws_ec2::{Ec2Platform, MAX_BATCH};
use provisioner_events::State;

const IMAGE: &str = "ami-03cf127a";
const RUN_CAPACITY: f64 = 5.0;
const RUN_REFILL: f64 = 2.0;
const INSTANCE_CAPACITY: f64 = 1000.0;
const INSTANCE_REFILL: f64 = 2.0;

fn ec2_client() -> Client {
    let endpoint = std::env::var("PROVISIONER_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
            .build(),
    )
}

/// The least time EC2's buckets allow for `count` instances in calls of `per_call`.
fn bucket_limit(count: usize, per_call: usize) -> Duration {
    let calls = count.div_ceil(per_call) as f64;
    let by_calls = (calls - RUN_CAPACITY).max(0.0) / RUN_REFILL;
    let by_instances = (count as f64 - INSTANCE_CAPACITY).max(0.0) / INSTANCE_REFILL;
    Duration::from_secs_f64(by_calls.max(by_instances))
}

/// A local copy of one of EC2's buckets, waited on as a careful direct caller would.
struct LocalBucket {
    capacity: f64,
    refill: f64,
    tokens: f64,
    at: Instant,
}

impl LocalBucket {
    fn new(capacity: f64, refill: f64) -> Self {
        LocalBucket {
            capacity,
            refill,
            tokens: capacity,
            at: Instant::now(),
        }
    }

    async fn take(&mut self, cost: f64) {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.refill)
                .min(self.capacity);
            self.at = now;
            if self.tokens >= cost {
                self.tokens -= cost;
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64((cost - self.tokens) / self.refill)).await;
        }
    }
}

/// Instances tagged `bench-run` = `run` in `states`.
async fn tagged(ec2: &Client, run: &str, states: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:bench-run").values(run).build())
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()))
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.expect("describe instances");
        ids.extend(
            page.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter_map(|i| i.instance_id().map(str::to_owned)),
        );
    }
    ids
}

async fn terminate_all(ec2: &Client, run: &str) {
    let ids = tagged(ec2, run, &["pending", "running", "stopping", "stopped"]).await;
    for chunk in ids.chunks(500) {
        ec2.terminate_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .send()
            .await
            .expect("terminate");
    }
}

/// The direct baseline: `count` instances in calls of `per_call`, paced by local buckets,
/// until all run.
async fn direct(ec2: &Client, count: usize, per_call: usize, run: &str) -> Duration {
    let started = Instant::now();
    let mut calls = LocalBucket::new(RUN_CAPACITY, RUN_REFILL);
    let mut instances = LocalBucket::new(INSTANCE_CAPACITY, INSTANCE_REFILL);
    let mut left = count;
    while left > 0 {
        let n = left.min(per_call);
        calls.take(1.0).await;
        instances.take(n as f64).await;
        ec2.run_instances()
            .image_id(IMAGE)
            .instance_type(InstanceType::T3Micro)
            .min_count(n as i32)
            .max_count(n as i32)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("bench-run").value(run).build())
                    .build(),
            )
            .send()
            .await
            .expect("run instances");
        left -= n;
    }
    while tagged(ec2, run, &["running"]).await.len() < count {
        tokio::time::sleep(Duration::from_millis(250)).await;
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
    let count: usize = std::env::var("BENCH_EC2_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if short { 40 } else { 1000 });
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ec2 = ec2_client();

    let direct_run = format!("direct-{tag}");
    let direct = direct(&ec2, count, MAX_BATCH, &direct_run).await;
    terminate_all(&ec2, &direct_run).await;

    // The bench's own bucket scope, so an earlier run's reservations do not count here.
    let platform = Arc::new(Ec2Platform::new(ec2.clone(), format!("bench-{tag}")));
    let mut fleet_workers = support::Fleet::start(platform, &tag).await;

    let fleet_run = format!("fleet-{tag}");
    let id = format!("bench-ec2-fleet-{tag}");
    let body = format!(
        r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"aws-ec2","count":{count},"labels":{{"bench-run":"{fleet_run}"}},"spec":{{"image_id":"{IMAGE}","instance_type":"t3.micro"}}}}"#
    );
    let (end, fleet) = fleet_workers.run("aws-ec2.provision", &id, &body).await;
    assert_eq!(end.state, State::Running, "{end:#?}");
    let running = tagged(&ec2, &fleet_run, &["pending", "running"])
        .await
        .len();
    assert_eq!(running, count, "exactly one instance per member");

    let down = format!("bench-ec2-fleet-down-{tag}");
    let body = format!(
        r#"{{"schema_version":1,"request_id":"{down}","operation":"teardown","platform":"aws-ec2","target_request_id":"{id}"}}"#
    );
    let (end, teardown) = fleet_workers.run("aws-ec2.teardown", &down, &body).await;
    assert_eq!(end.state, State::Stopped, "{end:#?}");
    let left = tagged(
        &ec2,
        &fleet_run,
        &["pending", "running", "stopping", "stopped"],
    )
    .await
    .len();
    assert_eq!(left, 0, "instances left after the fleet's teardown");

    let limit = bucket_limit(count, MAX_BATCH);
    let ratio = |d: Duration| d.as_secs_f64() / direct.as_secs_f64().max(f64::EPSILON);
    println!(
        "## Fleet of {count} EC2 instances on LocalStack, 3 workers (EC2's buckets: RunInstances {RUN_CAPACITY} refilling {RUN_REFILL}/s, instances {INSTANCE_CAPACITY} refilling {INSTANCE_REFILL}/s)\n"
    );
    println!("| path | seconds | ratio to direct |\n|---|---|---|");
    println!(
        "| limit: the buckets alone, calls of {MAX_BATCH} | {:.1} | {:.2} |",
        limit.as_secs_f64(),
        ratio(limit)
    );
    println!(
        "| direct: one loop, calls of {MAX_BATCH}, until all run | {:.1} | 1.00 |",
        direct.as_secs_f64()
    );
    println!(
        "| fleet: one request, members over 3 workers | {:.1} | {:.2} |",
        fleet.as_secs_f64(),
        ratio(fleet)
    );
    println!(
        "| fleet teardown: one request | {:.1} | — |",
        teardown.as_secs_f64()
    );

    fleet_workers.stop().await;
}
