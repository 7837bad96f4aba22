//! The core's promises under injected faults, judged by the oracle (`common/oracle.rs`):
//! every accepted message answered, one outcome and exactly the resources it says per
//! request, nothing leaked after a teardown or behind an error, nothing left in progress.
//!
//! Docker workers on Podman, through real RabbitMQ and Redis. Faults: a crash at every
//! step boundary (fault points compiled into test builds only), a zombie worker frozen
//! past its lease, teardowns racing provisions, conflicting duplicates, a drain with a
//! second worker standing by, Redis losing every key, and poison messages redriven.

mod common;

use std::time::Duration;

use common::oracle::{Ledger, Verdict, judge};
use common::{Events, TestEnv, id};
use provisioner_core::redis_store::RedisStore;
use provisioner_events::State;

/// One test's run: its environment, the status topic as seen, and the ledger.
struct Run {
    env: TestEnv,
    events: Events,
    ledger: Ledger,
    store: RedisStore,
    /// Where the resources are: EC2 on LocalStack, or containers on Podman.
    ec2: bool,
}

impl Run {
    async fn new() -> Run {
        Self::with(TestEnv::new().await).await
    }

    async fn with(env: TestEnv) -> Run {
        let events = env.events().await;
        let store =
            RedisStore::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(3600))
                .await
                .expect("redis");
        Run {
            env,
            events,
            ledger: Ledger::default(),
            store,
            ec2: false,
        }
    }

    /// Publishes a request (confirmed by the broker) and records it as accepted.
    async fn send(&mut self, request: &serde_json::Value) {
        let body = request.to_string().into_bytes();
        let key = format!(
            "{}.{}",
            request["platform"].as_str().unwrap_or("docker"),
            request["operation"].as_str().unwrap_or("provision")
        );
        let request_id = id(request);
        self.env.publish_raw(&key, &request_id, &body).await;
        self.ledger.accepted(&request_id, &body);
    }

    /// Waits until every accepted message is answered, listens a little longer for late
    /// duplicates, and judges.
    async fn verdict(&mut self) -> Verdict {
        let ledger = &self.ledger;
        self.events
            .until_all(
                Duration::from_secs(180),
                "an answer to every message",
                |seen| ledger.all_answered(seen),
            )
            .await;
        self.events.drain(Duration::from_secs(3)).await;
        let resources = if self.ec2 {
            common::ec2_instances(&self.env.run_id).await
        } else {
            self.env.containers().await
        };
        judge(&self.ledger, &self.events.seen, &resources, &self.store).await
    }

    /// Waits until a worker is at work on `request_id`: the moment to break something.
    async fn until_starting(&mut self, request_id: &str) {
        self.events
            .until(Duration::from_secs(30), "starting", |e| {
                e.request_id == request_id && e.state == State::Starting
            })
            .await;
    }

    fn marker(&self, name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("fault-{}-{name}", self.env.run_id))
    }
}

/// The platforms the crash scenarios run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Podman,
    LocalStack,
}

/// A worker that dies at `point` the first time it gets there, and a steady worker that
/// starts once it has: every request still ends once, with one resource each.
async fn crash_at(point: &str, on: On) {
    let mut run = Run::new().await;
    run.ec2 = on == On::LocalStack;
    let marker = run.marker(point);
    let marker_text = marker.to_string_lossy().into_owned();
    let fault = [
        ("PROVISIONER_FAULT_POINT", point),
        ("PROVISIONER_FAULT_ONCE", marker_text.as_str()),
    ];
    let start = |env: &mut TestEnv, name: &str, extra: &[(&str, &str)]| match on {
        On::Podman => env.start_worker_with(name, extra),
        On::LocalStack => env.start_ec2_worker_with(name, extra),
    };
    start(&mut run.env, "crashy", &fault);
    let request = |env: &TestEnv, name: &str| match on {
        On::Podman => env.web(name),
        On::LocalStack => serde_json::json!({
            "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
            "operation": "provision", "platform": "aws-ec2",
            "spec": {"image_id": common::LOCALSTACK_IMAGE, "instance_type": "t3.micro"},
            "labels": {"test-run": env.run_id}
        }),
    };
    let webs: Vec<serde_json::Value> = (0..3)
        .map(|n| request(&run.env, &format!("c{n}")))
        .collect();
    for web in &webs {
        run.send(web).await;
        run.send(web).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never reached {point}: {}",
            run.env.worker_log("crashy")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start(&mut run.env, "steady", &[]);
    let doomed = id(&webs[0]);
    let mut down = run.env.teardown("c0-down", &doomed);
    if on == On::LocalStack {
        down["platform"] = "aws-ec2".into();
    }
    run.send(&down).await;
    let verdict = run.verdict().await;
    verdict.assert_clean();
    // c0 ran (or was torn down before it could: a conflict), c1 and c2 run, and the
    // teardown stopped c0.
    assert_eq!(verdict.outcomes.get("stopped"), Some(&1), "{verdict}");
    assert_eq!(verdict.outcomes.values().sum::<usize>(), 4, "{verdict}");
    assert!(verdict.outcomes.get("running") >= Some(&2), "{verdict}");
    let _ = std::fs::remove_file(marker);
}

#[tokio::test]
async fn a_crash_after_receiving_loses_nothing() {
    crash_at("after_receive", On::Podman).await;
}

#[tokio::test]
async fn a_crash_after_receiving_loses_nothing_on_localstack() {
    crash_at("after_receive", On::LocalStack).await;
}

#[tokio::test]
async fn a_crash_after_claiming_loses_nothing() {
    crash_at("after_claim", On::Podman).await;
}

#[tokio::test]
async fn a_crash_after_claiming_loses_nothing_on_localstack() {
    crash_at("after_claim", On::LocalStack).await;
}

#[tokio::test]
async fn a_crash_after_the_platform_call_before_recording_loses_nothing() {
    crash_at("after_platform_call", On::Podman).await;
}

#[tokio::test]
async fn a_crash_after_the_platform_call_before_recording_loses_nothing_on_localstack() {
    crash_at("after_platform_call", On::LocalStack).await;
}

#[tokio::test]
async fn a_crash_after_recording_before_publishing_loses_nothing() {
    crash_at("after_record", On::Podman).await;
}

#[tokio::test]
async fn a_crash_after_recording_before_publishing_loses_nothing_on_localstack() {
    crash_at("after_record", On::LocalStack).await;
}

#[tokio::test]
async fn a_crash_after_publishing_before_the_ack_loses_nothing() {
    crash_at("after_publish", On::Podman).await;
}

#[tokio::test]
async fn a_crash_after_publishing_before_the_ack_loses_nothing_on_localstack() {
    crash_at("after_publish", On::LocalStack).await;
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn a_zombie_frozen_past_its_lease_is_refused_and_stops() {
    let mut run = Run::new().await;
    let zombie = run.env.start_worker("zombie");
    let slow = run.env.web_with(
        "frozen",
        serde_json::json!(["sh", "-c", "sleep 4; exec httpd -f -p 8080"]),
    );
    let request_id = id(&slow);
    run.send(&slow).await;
    run.until_starting(&request_id).await;
    let pid = run.env.worker(zombie).id();
    signal(pid, "STOP");
    // Past its 3 s lease a second worker takes the request over through a duplicate (the
    // frozen worker's own delivery stays with its connection).
    tokio::time::sleep(Duration::from_secs(4)).await;
    run.env.start_worker("rescuer");
    run.env.wait_for_log("rescuer", "consuming").await;
    // RabbitMQ still counts the frozen worker as a consumer and hands it every other
    // message: enough duplicates that the rescuer gets one.
    for _ in 0..3 {
        run.send(&slow).await;
    }
    let ended = run.events.terminal(&request_id).await;
    assert_eq!(ended.state, State::Running, "{ended:#?}");
    signal(pid, "CONT");
    let verdict = run.verdict().await;
    verdict.assert_clean();
    // Thawed, it sees its lease ended (by its own deadline, or the store refusing its
    // token) and stops without writing anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = run.env.worker_log("zombie");
    assert!(
        log.contains("could not be renewed before it ended")
            || log.contains("took the request over")
            || log.contains("fenced off"),
        "{log}"
    );
    assert!(
        run.env.worker(zombie).try_wait().expect("status").is_none(),
        "the zombie lives on as a worker"
    );
    let terminal: Vec<_> = run
        .events
        .of(&request_id)
        .into_iter()
        .filter(|e| e.state.is_terminal())
        .cloned()
        .collect();
    assert!(
        terminal.iter().all(|e| *e == terminal[0]),
        "one outcome: {terminal:#?}"
    );
}

#[tokio::test]
async fn teardowns_racing_provisions_leave_nothing_after_stopped() {
    let mut run = Run::new().await;
    run.env.start_worker("a");
    run.env.start_worker("b");
    // Provisions that take a moment, each torn down at another point of its life:
    // before it arrives, with it, while it starts, once it runs.
    let slow = serde_json::json!(["sh", "-c", "sleep 1; exec httpd -f -p 8080"]);
    for (n, head_start_ms) in [
        (0, -300i64),
        (1, 0),
        (2, 300),
        (3, 900),
        (4, 1500),
        (5, 4000),
    ] {
        let web = run.env.web_with(&format!("race{n}"), slow.clone());
        let down = run.env.teardown(&format!("race{n}-down"), &id(&web));
        if head_start_ms < 0 {
            run.send(&down).await;
            tokio::time::sleep(Duration::from_millis(head_start_ms.unsigned_abs())).await;
            run.send(&web).await;
        } else {
            run.send(&web).await;
            tokio::time::sleep(Duration::from_millis(head_start_ms as u64)).await;
            run.send(&down).await;
        }
    }
    let verdict = run.verdict().await;
    verdict.assert_clean();
    assert_eq!(verdict.outcomes.get("stopped"), Some(&6), "{verdict}");
}

#[tokio::test]
async fn a_conflicting_duplicate_while_the_original_runs_is_refused_alone() {
    let mut run = Run::new().await;
    run.env.start_worker("a");
    run.env.start_worker("b");
    let original = run.env.web_with(
        "dup",
        serde_json::json!(["sh", "-c", "sleep 2; exec httpd -f -p 8080"]),
    );
    let request_id = id(&original);
    run.send(&original).await;
    run.until_starting(&request_id).await;
    let mut other = original.clone();
    other["labels"]["variant"] = "other".into();
    run.send(&other).await;
    run.send(&original).await;
    let verdict = run.verdict().await;
    verdict.assert_clean();
    assert_eq!(verdict.outcomes.get("running"), Some(&1), "{verdict}");
    assert_eq!(
        verdict.outcomes.get("refused/conflict"),
        Some(&1),
        "{verdict}"
    );
}

#[tokio::test]
async fn draining_with_a_second_worker_standing_by_hands_nothing_over_twice() {
    let mut run = Run::new().await;
    let leaving = run.env.start_worker("leaving");
    let ids = common::start_slow_webs(&run.env, &mut run.events, "drain", 3, 3).await;
    // The ledger needs the bodies start_slow_webs sent: publish nothing new, but record.
    for (n, request_id) in ids.iter().enumerate() {
        let web = run.env.web_with(
            &format!("drain{n}"),
            serde_json::json!(["sh", "-c", "sleep 3; exec httpd -f -p 8080"]),
        );
        assert_eq!(id(&web), *request_id);
        run.ledger.accepted(request_id, web.to_string().as_bytes());
    }
    run.env.start_worker("standing-by");
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(run.env.worker(leaving).id(), "TERM");
    let verdict = run.verdict().await;
    verdict.assert_clean();
    // Nothing was handed to the other worker while the leaving one still worked on it:
    // one attempt and one terminal event per request.
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.events.drain(Duration::from_secs(1)).await;
    for request_id in &ids {
        let seen = run.events.of(request_id);
        let terminal = seen.iter().filter(|e| e.state.is_terminal()).count();
        assert_eq!(terminal, 1, "{request_id}: {seen:#?}");
        assert!(seen.iter().all(|e| e.attempt == 1), "{seen:#?}");
    }
}

#[tokio::test]
async fn redis_losing_every_key_mid_run_lets_no_zombie_write() {
    let mut redis = common::PrivateRedis::ephemeral();
    let env = TestEnv::with_redis(redis.url()).await;
    let mut run = Run::with(env).await;
    run.env.start_worker("a");
    run.env.start_worker("b");
    let slow = serde_json::json!(["sh", "-c", "sleep 3; exec httpd -f -p 8080"]);
    let webs: Vec<serde_json::Value> = (0..4)
        .map(|n| run.env.web_with(&format!("amnesia{n}"), slow.clone()))
        .collect();
    for web in &webs {
        run.send(web).await;
    }
    let first = id(&webs[0]);
    run.until_starting(&first).await;
    redis.kill();
    redis.restart();
    let verdict = run.verdict().await;
    verdict.assert_clean();
}

#[tokio::test]
async fn refused_messages_are_dead_lettered_with_why_and_redriven_once_fixed() {
    let mut run = Run::new().await;
    // A worker whose policy allows no image refuses every request.
    let strict = run
        .env
        .start_worker_with("strict", &[("DOCKER_ALLOWED_IMAGES", "registry.invalid/*")]);
    let webs: Vec<serde_json::Value> = (0..2).map(|n| run.env.web(&format!("r{n}"))).collect();
    for web in &webs {
        run.send(web).await;
    }
    let dead = common::dead_letter_queue("docker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while run.env.queue_depth(&dead).await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = run
        .env
        .cli(&["redrive", "--platform", "docker", "--dry-run"]);
    assert!(listed.status.success(), "{listed:?}");
    let text = String::from_utf8_lossy(&listed.stdout);
    for web in &webs {
        assert!(text.contains(&id(web)), "{text}");
    }
    assert!(text.contains("permission"), "{text}");
    assert_eq!(
        run.env.queue_depth(&dead).await,
        2,
        "a dry run moves nothing"
    );
    // The policy is fixed: a worker that allows the image, and the dead letters go back.
    run.env.worker(strict).kill().expect("kill");
    run.env.start_worker("fixed");
    let moved = run.env.cli(&["redrive", "--platform", "docker"]);
    assert!(moved.status.success(), "{moved:?}");
    for web in &webs {
        let request_id = id(web);
        let ended = run
            .events
            .until(Duration::from_secs(60), "running after redrive", |e| {
                e.request_id == request_id && e.ends_request()
            })
            .await;
        assert_eq!(ended.state, State::Running, "{ended:#?}");
    }
    assert_eq!(run.env.queue_depth(&dead).await, 0);
    run.verdict().await.assert_clean();
}

#[tokio::test]
async fn a_message_that_kills_every_worker_is_given_up_within_the_bound() {
    let mut run = Run::new().await;
    let web = run.env.web("poison");
    let request_id = id(&web);
    run.send(&web).await;
    // Every worker dies at its claim (no marker: every time), until the attempt bound.
    let crash = [
        ("PROVISIONER_FAULT_POINT", "after_claim"),
        ("MAX_ATTEMPTS", "2"),
    ];
    let mut crashes = 0;
    let ended = loop {
        let worker = run
            .env
            .start_worker_with(&format!("victim{crashes}"), &crash);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut ended = None;
        while tokio::time::Instant::now() < deadline {
            if let Some(event) = run
                .events
                .seen
                .iter()
                .find(|e| e.request_id == request_id && e.ends_request())
            {
                ended = Some(event.clone());
                break;
            }
            if run.env.worker(worker).try_wait().expect("status").is_some() {
                break;
            }
            run.events.drain(Duration::from_millis(200)).await;
        }
        if let Some(ended) = ended {
            break ended;
        }
        crashes += 1;
        assert!(crashes <= 3, "more crashes than the attempt bound allows");
    };
    assert_eq!(crashes, 2, "two attempts, each killed its worker");
    let error = ended.error.clone().expect("error");
    assert_eq!(error.class, provisioner_events::ErrorClass::Internal);
    assert!(
        error.message.contains("gave up after 2 attempts"),
        "{}",
        error.message
    );
    let dead = common::dead_letter_queue("docker");
    assert_eq!(
        run.env.queue_depth(&dead).await,
        1,
        "set aside with the reason"
    );
    run.verdict().await.assert_clean();
}

#[tokio::test]
async fn network_faults_to_the_broker_and_to_redis_lose_nothing() {
    use common::proxy::{Fault, FaultProxy};
    let mut run = Run::new().await;
    let broker = FaultProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let redis_addr = run.env.redis_url.trim_start_matches("redis://").to_owned();
    let redis = FaultProxy::start(redis_addr.parse().expect("redis address")).await;
    let amqp_url = run
        .env
        .amqp_url
        .replace(":5672/", &format!(":{}/", broker.port));
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let worker = run.env.start_worker_with(
        "behind-proxies",
        &[("AMQP_URL", &amqp_url), ("REDIS_URL", &redis_url)],
    );
    let slow = serde_json::json!(["sh", "-c", "sleep 2; exec httpd -f -p 8080"]);
    let webs: Vec<serde_json::Value> = (0..6)
        .map(|n| run.env.web_with(&format!("net{n}"), slow.clone()))
        .collect();
    for web in &webs[..3] {
        run.send(web).await;
    }
    let first = id(&webs[0]);
    run.until_starting(&first).await;
    // Redis partitioned away for longer than a lease: the work stops, and resumes after.
    redis.set(Fault::BlackHole);
    tokio::time::sleep(Duration::from_secs(5)).await;
    redis.set(Fault::Pass);
    // The broker's connections reset; the worker reconnects.
    broker.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.set(Fault::Pass);
    for web in &webs[3..] {
        run.send(web).await;
    }
    // Slow links both ways.
    broker.set(Fault::Latency(Duration::from_millis(150)));
    redis.set(Fault::Latency(Duration::from_millis(150)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.set(Fault::Pass);
    redis.set(Fault::Pass);
    let verdict = run.verdict().await;
    verdict.assert_clean();
    assert_eq!(verdict.outcomes.get("running"), Some(&6), "{verdict}");
    assert!(
        run.env.worker(worker).try_wait().expect("status").is_none(),
        "the worker survived: {}",
        run.env.worker_log("behind-proxies")
    );
}
