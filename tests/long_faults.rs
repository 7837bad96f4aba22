//! The long fault scenarios, run by `scripts/test-long.sh` (which `.ci/run` calls after
//! the main suite): duplicate storms through three workers (Kubernetes API server of the
//! tests, Docker on Podman, EC2 on LocalStack), RabbitMQ restarted with 1,000 requests in
//! flight, and a flood of hostile messages. Each is `#[ignore]`d in the ordinary test run
//! for its length alone; sizes come from the environment (`STORM_REQUESTS`,
//! `STORM_DOCKER_REQUESTS`, `STORM_EC2_REQUESTS`, `HOSTILE_MESSAGES`) so a developer can
//! run them small.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::oracle::{Ledger, judge};
use common::{TestEnv, id};
use futures_util::StreamExt;
use provisioner_core::Broker;
use provisioner_core::redis_store::RedisStore;
use provisioner_events::ErrorClass;

fn size(variable: &str, default: usize) -> usize {
    std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny deterministic generator (xorshift), so a failing run can be repeated.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

use common::LOCALSTACK_IMAGE as IMAGE;

/// Where a storm runs, and how to see what it made.
enum Target {
    Docker,
    Ec2,
    Kubernetes(provisioner_kubernetes::fake_api::FakeApi),
}

impl Target {
    fn platform(&self) -> &'static str {
        match self {
            Target::Docker => "docker",
            Target::Ec2 => "aws-ec2",
            Target::Kubernetes(_) => "kubernetes",
        }
    }

    fn spec(&self) -> serde_json::Value {
        match self {
            // Real containers on Podman: the smallest thing that keeps running.
            Target::Docker => serde_json::json!({
                "image": "localhost/busybox:latest", "command": ["sleep", "3600"]
            }),
            Target::Ec2 => serde_json::json!({"image_id": IMAGE, "instance_type": "t3.micro"}),
            Target::Kubernetes(_) => serde_json::json!({"image": "nginx:1.27", "port": 80}),
        }
    }

    fn start_worker(&self, env: &mut TestEnv, name: &str) {
        match self {
            Target::Docker => {
                env.start_worker(name);
            }
            Target::Ec2 => {
                env.start_ec2_worker(name);
            }
            Target::Kubernetes(api) => {
                let path = std::env::temp_dir().join(format!("storm-kubeconfig-{}", env.run_id));
                std::fs::write(&path, api.kubeconfig("storm")).expect("kubeconfig");
                env.start_platform_worker(
                    "kubernetes",
                    name,
                    &[("KUBECONFIG", path.to_str().expect("path"))],
                );
            }
        }
    }

    /// Removes what the storm made, so the emulator stays quick for the next run.
    async fn clean_up(&self, resources: &HashMap<String, Vec<String>>) {
        if let Target::Ec2 = self {
            let ids: Vec<String> = resources.values().flatten().cloned().collect();
            let ec2 = common::ec2_client();
            for chunk in ids.chunks(500) {
                let _ = ec2
                    .terminate_instances()
                    .set_instance_ids(Some(chunk.to_vec()))
                    .send()
                    .await;
            }
        }
    }

    async fn resources(&self, env: &TestEnv) -> HashMap<String, Vec<String>> {
        match self {
            // The test environment removes its containers when it ends.
            Target::Docker => env.containers().await,
            Target::Ec2 => common::ec2_instances(&env.run_id).await,
            Target::Kubernetes(api) => {
                let mut by_request: HashMap<String, Vec<String>> = HashMap::new();
                for deployment in api.objects("deployments") {
                    let request = deployment["metadata"]["annotations"]
                        [provisioner_kubernetes::REQUEST_ANNOTATION]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
                    by_request
                        .entry(request)
                        .or_default()
                        .push(format!("storm/{name}"));
                }
                by_request
            }
        }
    }
}

/// `requests` provisions, each published 1 to 5 times and shuffled, through three workers.
async fn storm(target: Target, requests: usize) {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    for name in ["a", "b", "c"] {
        target.start_worker(&mut env, name);
    }
    let platform = target.platform();
    let mut ledger = Ledger::default();
    let mut draw = Draw(0x5eed_5eed_5eed_5eed);
    let started = Instant::now();
    let mut bodies = Vec::new();
    for n in 0..requests {
        let request = serde_json::json!({
            "schema_version": 1, "request_id": format!("storm{n}-{}", env.run_id),
            "operation": "provision", "platform": platform, "spec": target.spec(),
            "labels": {"test-run": env.run_id}
        });
        let copies = 1 + draw.below(5) as usize;
        for _ in 0..copies {
            bodies.push((id(&request), request.to_string().into_bytes()));
        }
    }
    // Copies go out shuffled, so duplicates of one request reach different workers at
    // different times.
    for i in (1..bodies.len()).rev() {
        let j = draw.below(i as u64 + 1) as usize;
        bodies.swap(i, j);
    }
    env.broker
        .declare(provisioner_events::PlatformName::parse(platform).expect("platform"))
        .await
        .expect("declare");
    let key = format!("{platform}.provision");
    futures_util::stream::iter(bodies.iter())
        .for_each_concurrent(64, |(request_id, body)| {
            let broker = env.broker.clone();
            let key = key.clone();
            async move {
                broker
                    .publish_request(&key, request_id, body)
                    .await
                    .expect("publish");
            }
        })
        .await;
    for (request_id, body) in &bodies {
        ledger.accepted(request_id, body);
    }
    eprintln!(
        "storm on {platform}: {} messages for {requests} requests published in {:.1} s",
        bodies.len(),
        started.elapsed().as_secs_f64()
    );
    events
        .until_all(
            Duration::from_secs(3000),
            "every request answered",
            |seen| ledger.all_answered(seen),
        )
        .await;
    events.drain(Duration::from_secs(5)).await;
    let store = RedisStore::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(3600))
        .await
        .expect("redis");
    let resources = target.resources(&env).await;
    let verdict = judge(&ledger, &events.seen, &resources, &store).await;
    eprintln!(
        "storm on {platform}: {requests} requests, {} messages, 3 workers, {:.0} s",
        bodies.len(),
        started.elapsed().as_secs_f64()
    );
    verdict.assert_clean();
    assert_eq!(
        verdict.outcomes.get("running"),
        Some(&requests),
        "{verdict}"
    );
    target.clean_up(&resources).await;
}

#[tokio::test]
#[ignore = "long: run by scripts/test-long.sh"]
async fn a_duplicate_storm_through_three_workers_makes_each_deployment_once() {
    let api = provisioner_kubernetes::fake_api::FakeApi::start(2).await;
    storm(Target::Kubernetes(api), size("STORM_REQUESTS", 10_000)).await;
}

#[tokio::test]
#[ignore = "long: run by scripts/test-long.sh"]
async fn a_duplicate_storm_through_three_docker_workers_makes_each_container_once() {
    storm(Target::Docker, size("STORM_DOCKER_REQUESTS", 500)).await;
}

#[tokio::test]
#[ignore = "long: run by scripts/test-long.sh"]
async fn a_duplicate_storm_through_three_ec2_workers_makes_each_instance_once() {
    storm(Target::Ec2, size("STORM_EC2_REQUESTS", 200)).await;
}

/// One hostile message, each kind invalid in its own way. Returns the body and the request
/// id it carries, when a reader could find one.
fn hostile(n: usize, draw: &mut Draw, run: &str) -> (Vec<u8>, Option<String>) {
    let id = format!("h{n}-{run}");
    let request = |spec: serde_json::Value| {
        serde_json::json!({"schema_version":1,"request_id":id,"operation":"provision",
                           "platform":"docker","spec":spec})
    };
    let with_id = |value: serde_json::Value| (value.to_string().into_bytes(), Some(id.clone()));
    match draw.below(24) {
        0 => (
            (0..draw.below(200)).map(|_| draw.next() as u8).collect(),
            None,
        ),
        1 => (b"{\"schema_version\":1,\"request_id\":".to_vec(), None),
        2 => (vec![0xff, 0xfe, b'{', b'}'], None),
        3 => with_id(
            serde_json::json!({"schema_version":1,"request_id":id,"operation":"provision","platform":"docker","spec":[1,2]}),
        ),
        4 => with_id(
            serde_json::json!({"schema_version":"1","request_id":id,"operation":"provision","platform":"docker","spec":{}}),
        ),
        5 => with_id(
            serde_json::json!({"schema_version":1,"request_id":id,"operation":"explode","platform":"docker"}),
        ),
        6 => with_id(
            serde_json::json!({"schema_version":1,"request_id":id,"operation":"provision","platform":"mainframe","spec":{}}),
        ),
        7 => with_id(
            serde_json::json!({"schema_version":99,"request_id":id,"operation":"provision","platform":"docker","spec":{"image":"i"}}),
        ),
        8 => {
            let evil = [
                "../../etc/passwd",
                "$(rm -rf /)",
                "a;reboot",
                "`id`",
                "a b",
                "x|y",
                "%00",
                "a\u{0}b",
            ];
            let bad = evil[draw.below(evil.len() as u64) as usize];
            // Echoed or not (a NUL makes it invalid JSON), never counted on.
            (
                request(serde_json::json!({"image":"i"}))
                    .to_string()
                    .replace(&id, bad)
                    .into_bytes(),
                None,
            )
        }
        9 => with_id(request(serde_json::json!({"image":"has space"}))),
        10 => with_id(request(serde_json::json!({"image":"i","ports":[0]}))),
        11 => with_id(request(serde_json::json!({"image":"i","ports":[70000]}))),
        12 => with_id(request(
            serde_json::json!({"image":"i","health":{"http":{"port":81,"path":"/"}}}),
        )),
        13 => with_id(request(
            serde_json::json!({"image":"i","ready_timeout_seconds":u64::MAX}),
        )),
        14 => with_id(request(
            serde_json::json!({"image":"i","ready_timeout_seconds":1e300}),
        )),
        15 => with_id(request(serde_json::json!({"image":"i","privileged":true}))),
        16 => with_id(request(
            serde_json::json!({"image":"i","binds":["/:/host"]}),
        )),
        17 => with_id(request(serde_json::json!({"image":"i","env":{"A=B":"c"}}))),
        18 => with_id(request(
            serde_json::json!({"image":"i","command":vec!["x"; 2000]}),
        )),
        19 => {
            let mut deep = serde_json::json!(1);
            for _ in 0..40 {
                deep = serde_json::json!({"d": deep});
            }
            with_id(request(serde_json::json!({"image":"i","x":deep})))
        }
        20 => with_id(
            serde_json::json!({"schema_version":1,"request_id":id,"operation":"teardown","platform":"docker"}),
        ),
        21 => with_id(
            serde_json::json!({"schema_version":1,"request_id":id,"operation":"teardown","platform":"docker","target_request_id":"a","resource_id":"b"}),
        ),
        22 if draw.below(50) == 0 => (
            format!("{{\"pad\":\"{}\"}}", "x".repeat(300_000)).into_bytes(),
            None,
        ),
        22 => with_id(request(
            serde_json::json!({"image":"i","network_mode":"host"}),
        )),
        _ if draw.below(50) == 0 => {
            with_id(request(serde_json::json!({"image": "a".repeat(70_000)})))
        }
        _ => with_id(request(
            serde_json::json!({"image":"i","cap_add":["SYS_ADMIN"]}),
        )),
    }
}

#[tokio::test]
#[ignore = "long: run by scripts/test-long.sh"]
async fn a_flood_of_hostile_messages_is_refused_one_by_one_and_nothing_reaches_the_engine() {
    let count = size("HOSTILE_MESSAGES", 100_000);
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let worker = env.start_worker("target");
    env.broker
        .declare(provisioner_events::PlatformName::Docker)
        .await
        .expect("declare");
    let mut draw = Draw(0xbad_c0ffee);
    let mut with_ids = 0usize;
    let started = Instant::now();
    let messages: Vec<(Vec<u8>, Option<String>)> = (0..count)
        .map(|n| hostile(n, &mut draw, &env.run_id))
        .collect();
    futures_util::stream::iter(messages.iter())
        .for_each_concurrent(64, |(body, _)| {
            let broker = env.broker.clone();
            async move {
                broker
                    .publish_request("docker.provision", "hostile", body)
                    .await
                    .expect("publish");
            }
        })
        .await;
    for (_, request_id) in &messages {
        // Ids a reader cannot use (shell metacharacters and the like) are still echoed.
        if request_id.is_some() {
            with_ids += 1;
        }
    }
    eprintln!(
        "hostile: {count} messages ({with_ids} with a readable id) published in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dead = common::dead_letter_queue("docker");
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let depth = env.queue_depth(&dead).await as usize;
        if depth >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {depth} of {count} dead-lettered: {}",
            env.worker_log("target")
        );
        assert!(
            env.worker(worker).try_wait().expect("status").is_none(),
            "the worker died: {}",
            env.worker_log("target")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    events.drain(Duration::from_secs(3)).await;
    assert!(
        env.worker(worker).try_wait().expect("status").is_none(),
        "the worker lives"
    );
    let refusals: Vec<_> = events
        .seen
        .iter()
        .filter(|e| e.rejected_message.is_some())
        .collect();
    assert!(
        refusals
            .iter()
            .all(|e| e.error.as_ref().is_some_and(|x| matches!(
                x.class,
                ErrorClass::InvalidRequest | ErrorClass::Permission
            ) && x.message.len() > 10)),
        "every refusal is classified and says why"
    );
    let ours = format!("-{}", env.run_id);
    let answered: std::collections::HashSet<&str> = refusals
        .iter()
        .filter(|e| e.request_id.ends_with(&ours))
        .map(|e| e.request_id.as_str())
        .collect();
    assert_eq!(
        answered.len(),
        with_ids,
        "a refusal event for every message whose id could be read"
    );
    assert!(
        events.seen.iter().all(|e| e.rejected_message.is_some()),
        "no hostile message became a request"
    );
    let made: Vec<String> = env
        .all_containers()
        .await
        .into_keys()
        .filter(|request| request.ends_with(&ours))
        .collect();
    assert!(made.is_empty(), "nothing reached the engine: {made:?}");
    eprintln!(
        "hostile: {count} messages refused and dead-lettered in {:.0} s, {} refusal events",
        started.elapsed().as_secs_f64(),
        refusals.len()
    );
}

#[tokio::test]
#[ignore = "long: run by scripts/test-long.sh"]
async fn rabbitmq_restarting_with_a_thousand_requests_in_flight_loses_nothing() {
    let count = size("RESTART_REQUESTS", 1_000);
    // Deployments become available slowly, so the restart finds most of them at work.
    let api = provisioner_kubernetes::fake_api::FakeApi::start(5).await;
    let target = Target::Kubernetes(api);
    let mut env = TestEnv::new().await;
    for name in ["a", "b", "c"] {
        target.start_worker(&mut env, name);
    }
    env.broker
        .declare(provisioner_events::PlatformName::Kubernetes)
        .await
        .expect("declare");
    let mut ledger = Ledger::default();
    let requests: Vec<serde_json::Value> = (0..count)
        .map(|n| {
            serde_json::json!({
                "schema_version": 1, "request_id": format!("inflight{n}-{}", env.run_id),
                "operation": "provision", "platform": "kubernetes", "spec": target.spec(),
                "labels": {"test-run": env.run_id}
            })
        })
        .collect();
    for request in &requests {
        let body = request.to_string().into_bytes();
        env.broker
            .publish_request("kubernetes.provision", &id(request), &body)
            .await
            .expect("publish");
        ledger.accepted(&id(request), &body);
    }
    let store = RedisStore::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(3600))
        .await
        .expect("redis");
    // Restart once a tenth has finished: the rest are claimed, parked or queued.
    let deadline = Instant::now() + Duration::from_secs(300);
    while finished(&store, &requests).await < count / 10 {
        assert!(Instant::now() < deadline, "the run never got going");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_flight = count - finished(&store, &requests).await;
    common::rabbitmqctl(&["-q", "stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    common::rabbitmqctl(&["-q", "start_app"]);
    common::rabbitmqctl(&["-q", "await_startup"]);
    eprintln!("restart: RabbitMQ restarted with {in_flight} of {count} requests unfinished");
    let deadline = Instant::now() + Duration::from_secs(900);
    while finished(&store, &requests).await < count {
        assert!(
            Instant::now() < deadline,
            "not every request finished after the restart: {}",
            env.worker_log("a")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Our own subscription was cut by the restart; the journal kept every event.
    // The test's own connection died with the broker: the first calls may fail while it
    // connects again.
    let mut tries = 0;
    let events = loop {
        match env.broker.take_journal(100_000).await {
            Ok(events) => break events,
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("reading the journal: {e}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("reading the journal: {e}"),
        }
    };
    let resources = target.resources(&env).await;
    let verdict = judge(&ledger, &events, &resources, &store).await;
    verdict.assert_clean();
    assert_eq!(verdict.outcomes.get("running"), Some(&count), "{verdict}");
}

/// How many of `requests` (all the Kubernetes worker's) have a result in the store.
async fn finished(store: &RedisStore, requests: &[serde_json::Value]) -> usize {
    // Records are one platform's (key layout 2): the run's are the Kubernetes worker's.
    let store = store.for_platform(provisioner_events::PlatformName::Kubernetes);
    let mut done = 0;
    for request in requests {
        if let Ok(Some(record)) = provisioner_core::StateStore::get(&store, &id(request)).await
            && record.result.is_some()
        {
            done += 1;
        }
    }
    done
}
