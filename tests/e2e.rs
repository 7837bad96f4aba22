//! End to end over the real RabbitMQ, Redis and Podman, with `provisioner worker`
//! processes: every behaviour the core issue promises, as a user would see it on the
//! status topic and in the container engine.

mod common;

use std::time::Duration;

use common::scenario::Scenario;
use common::{TestEnv, id, load_shipped_definitions, publish_as, rabbitmqctl};
use provisioner_core::Broker;
use provisioner_core::amqp::{
    AmqpBroker, AmqpConfig, ManagementApi, dead_letter_queue, work_queue,
};
use provisioner_events::{ErrorClass, PlatformName, State};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn provision_runs_a_reachable_container_and_teardown_removes_it_twice_over() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let web = env.web("web");
    env.publish(&web).await;
    let running = events.terminal(&id(&web)).await;
    assert_eq!(running.state, State::Running, "{running:?}");
    let endpoint = &running.resource.as_ref().expect("resource").endpoints[0];
    assert_eq!(endpoint.port, 8080);
    let probe = provisioner_core::health::Probe::Http {
        host: endpoint.host.clone(),
        port: endpoint.host_port,
        path: "/".into(),
    };
    probe
        .check_once()
        .await
        .expect("the container answers on the reported port");
    let states: Vec<(State, u64)> = events
        .of(&id(&web))
        .iter()
        .map(|e| (e.state, e.seq))
        .collect();
    assert_eq!(states, vec![(State::Starting, 1), (State::Running, 2)]);
    assert_eq!(env.containers().await[&id(&web)].len(), 1);

    let down = env.teardown("down", &id(&web));
    env.publish(&down).await;
    let stopped = events.terminal(&id(&down)).await;
    assert_eq!(stopped.state, State::Stopped, "{stopped:?}");
    assert!(env.containers().await.is_empty(), "container removed");
    let down_again = env.teardown("down-again", &id(&web));
    env.publish(&down_again).await;
    let again = events.terminal(&id(&down_again)).await;
    assert_eq!(
        again.state,
        State::Stopped,
        "tearing down what is gone succeeds: {again:?}"
    );

    // `provisioner status` reads the record: the provision's resource is now stopped.
    let output = std::process::Command::new(common::BIN)
        .args(["status", &id(&web)])
        .envs(env.env())
        .output()
        .expect("status");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(record["state"], "stopped");
    assert_eq!(record["result"]["state"], "running");
}

#[tokio::test]
async fn the_same_request_five_times_makes_one_container_and_identical_terminal_events() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let web = env.web("dup");
    let scenario = Scenario {
        platform: "docker",
        worker: "a",
        name: "dup",
        spec: web["spec"].clone(),
    };
    let containers = async |request_id: &str| {
        env.containers()
            .await
            .get(request_id)
            .map_or(0, |c| c.len())
    };
    scenario
        .provision_five_times(&env, &mut events, containers)
        .await;
    scenario
        .tear_down_twice(&env, &mut events, containers)
        .await;
}

#[tokio::test]
async fn two_workers_with_duplicate_requests_make_one_container_each() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    env.start_worker("b");
    let requests: Vec<serde_json::Value> = (0..4).map(|n| env.web(&format!("pair{n}"))).collect();
    for _ in 0..3 {
        for request in &requests {
            env.publish(request).await;
        }
    }
    for request in &requests {
        let terminal = events.terminal_count(&id(request), 3).await;
        assert!(
            terminal.iter().all(|e| e.state == State::Running),
            "{terminal:#?}"
        );
        assert!(
            terminal.iter().all(|e| *e == terminal[0]),
            "identical: {terminal:#?}"
        );
    }
    let containers = env.containers().await;
    assert_eq!(containers.len(), 4, "{containers:?}");
    assert!(
        containers.values().all(|ids| ids.len() == 1),
        "{containers:?}"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_provision_is_finished_by_another_with_one_container() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let first = env.start_worker("doomed");
    // The container takes a few seconds to serve, so the kill lands mid-provision.
    let request_id = common::start_slow_webs(&env, &mut events, "slow", 1, 4)
        .await
        .remove(0);
    tokio::time::sleep(SECOND).await;
    env.worker(first).kill().expect("SIGKILL");
    env.worker(first).wait().expect("reaped");
    env.start_worker("rescuer");
    let terminal = events.terminal(&request_id).await;
    assert_eq!(terminal.state, State::Running, "{terminal:#?}");
    let seqs: Vec<u64> = events.of(&request_id).iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq increases across workers: {seqs:?}"
    );
    assert_eq!(
        env.containers().await[&request_id].len(),
        1,
        "one container"
    );
}

#[tokio::test]
async fn bad_input_is_rejected_and_dead_lettered_and_the_worker_keeps_consuming() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let run = env.run_id.clone();
    let bad: Vec<(&str, String, Option<ErrorClass>)> = vec![
        ("malformed JSON", "{\"schema_version\":1,\"request_id\":".into(), None),
        ("unknown platform", format!(r#"{{"schema_version":1,"request_id":"plat-{run}","operation":"provision","platform":"openstack","spec":{{}}}}"#), Some(ErrorClass::InvalidRequest)),
        ("missing operation", format!(r#"{{"schema_version":1,"request_id":"miss-{run}","platform":"docker","spec":{{"image":"x"}}}}"#), Some(ErrorClass::InvalidRequest)),
        ("invalid request id", r#"{"schema_version":1,"request_id":"bad id!","operation":"teardown","platform":"docker","target_request_id":"x"}"#.into(), Some(ErrorClass::InvalidRequest)),
        ("invalid container name", format!(r#"{{"schema_version":1,"request_id":"img-{run}","operation":"provision","platform":"docker","spec":{{"image":"has space"}}}}"#), Some(ErrorClass::InvalidRequest)),
        ("privileged refused", format!(r#"{{"schema_version":1,"request_id":"priv-{run}","operation":"provision","platform":"docker","spec":{{"image":"localhost/busybox:latest","privileged":true}}}}"#), Some(ErrorClass::Permission)),
    ];
    for (_, body, _) in &bad {
        env.publish_raw("docker.provision", "bad", body.as_bytes())
            .await;
    }
    for (what, body, class) in &bad {
        let Some(class) = class else { continue };
        let request_id =
            serde_json::from_str::<serde_json::Value>(body).expect("json")["request_id"]
                .as_str()
                .expect("id")
                .to_owned();
        let event = events.terminal(&request_id).await;
        assert_eq!(event.state, State::Error, "{what}");
        let error = event.error.expect("error");
        assert_eq!(error.class, *class, "{what}: {}", error.message);
        assert!(!error.message.is_empty());
    }
    // The worker is still consuming: a good request still runs.
    let good = env.web("after-bad");
    env.publish(&good).await;
    assert_eq!(events.terminal(&id(&good)).await.state, State::Running);
    // Every bad message is in the dead-letter queue, none left in the work queue.
    let deadline = tokio::time::Instant::now() + 10 * SECOND;
    loop {
        let dead = env
            .queue_depth(&dead_letter_queue(PlatformName::Docker))
            .await;
        if dead as usize == bad.len() || tokio::time::Instant::now() > deadline {
            assert_eq!(dead as usize, bad.len(), "dead letters");
            break;
        }
        tokio::time::sleep(SECOND / 5).await;
    }
    assert_eq!(env.queue_depth(&work_queue(PlatformName::Docker)).await, 0);
}

#[tokio::test]
async fn a_missing_image_ends_in_a_clear_error() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("noimage-{}", env.run_id),
        "operation": "provision", "platform": "docker",
        "spec": {"image": "localhost/no-such-image:1.0", "pull": "never"}
    });
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(event.state, State::Error);
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::NotFound);
    assert!(
        error.message.contains("localhost/no-such-image:1.0"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_broker_connection_drop_is_survived_without_losing_requests() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let worker = env.start_worker("a");
    let first = env.web("before-drop");
    env.publish(&first).await;
    assert_eq!(events.terminal(&id(&first)).await.state, State::Running);
    // Close the worker's connections from the broker side, as a broker restart would.
    common::rabbitmqctl(&[
        "-q",
        "close_all_connections",
        "--vhost",
        &env.vhost,
        "test: simulated broker restart",
    ]);
    // Our own test connection was closed too: a fresh environment handle re-subscribes.
    let mut events = env.events().await;
    let second = env.web("after-drop");
    env.publish(&second).await;
    assert_eq!(events.terminal(&id(&second)).await.state, State::Running);
    assert!(
        env.worker(worker).try_wait().expect("status").is_none(),
        "the worker is still running"
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_then_exits() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let worker = env.start_worker("a");
    let request_id = common::start_slow_webs(&env, &mut events, "graceful", 1, 3)
        .await
        .remove(0);
    let pid = env.worker(worker).id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert_eq!(
        events.terminal(&request_id).await.state,
        State::Running,
        "in-flight work finished"
    );
    let status = tokio::task::spawn_blocking({
        let mut child = std::mem::replace(
            env.worker(worker),
            std::process::Command::new("true").spawn().expect("true"),
        );
        move || child.wait()
    })
    .await
    .expect("join")
    .expect("wait");
    assert!(status.success(), "clean exit: {status:?}");
}

#[tokio::test]
async fn submit_wait_follows_requests_and_fails_on_error() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("submit-{}", env.run_id));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.jsonl");
    let web = env.web("submitted");
    let down = env.teardown("submitted-down", &id(&web));
    std::fs::write(&good, format!("{web}\n{down}\n")).expect("write");
    // The request waits in its queue until a worker comes.
    let mut env = env;
    env.start_worker("a");
    let output = std::process::Command::new(common::BIN)
        .args(["submit", "--wait", good.to_str().expect("path")])
        .envs(env.env())
        .output()
        .expect("submit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("running") && stdout.contains("stopped"),
        "{stdout}"
    );

    let bad = dir.join("bad.json");
    let missing = serde_json::json!({
        "schema_version": 1, "request_id": format!("submit-noimage-{}", env.run_id),
        "operation": "provision", "platform": "docker",
        "spec": {"image": "localhost/absent:1", "pull": "never"}
    });
    std::fs::write(&bad, missing.to_string()).expect("write");
    let output = std::process::Command::new(common::BIN)
        .args(["submit", "--wait", "--json", bad.to_str().expect("path")])
        .envs(env.env())
        .output()
        .expect("submit");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .expect("an event line"),
    )
    .expect("json line");
    assert_eq!(last["error"]["class"], "not_found");
}

#[tokio::test]
async fn redis_restarting_mid_run_loses_no_request() {
    let mut redis = common::PrivateRedis::new();
    let mut env = TestEnv::with_redis(redis.url()).await;
    let mut events = env.events().await;
    env.start_worker("a");
    env.start_worker("b");
    let request_ids = common::start_slow_webs(&env, &mut events, "redis", 6, 2).await;
    redis.kill();
    tokio::time::sleep(2 * SECOND).await;
    redis.restart();
    for request_id in &request_ids {
        let event = events.terminal(request_id).await;
        assert_eq!(event.state, State::Running, "{event:#?}");
    }
    let containers = env.containers().await;
    assert_eq!(containers.len(), request_ids.len(), "{containers:?}");
    assert!(
        containers.values().all(|ids| ids.len() == 1),
        "one container each: {containers:?}"
    );
}

#[tokio::test]
async fn watch_prints_the_events_of_the_request_it_follows() {
    use std::io::BufRead;
    let mut env = TestEnv::new().await;
    let web = env.web("watched");
    let other = env.web("unwatched");
    let mut watch = std::process::Command::new(common::BIN)
        .args(["watch", "--json", "--request-id", &id(&web)])
        .envs(env.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("watch");
    let stdout = watch.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        let mut states = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let event: serde_json::Value =
                serde_json::from_str(&line.expect("line")).expect("JSON line");
            states.push((
                event["request_id"].as_str().unwrap_or_default().to_owned(),
                event["state"].as_str().unwrap_or_default().to_owned(),
            ));
            // Any terminal state ends the wait, so a failed request fails the test
            // instead of leaving it reading forever.
            if states
                .last()
                .is_some_and(|(_, state)| matches!(state.as_str(), "running" | "error"))
            {
                break;
            }
        }
        states
    });
    // Give watch its subscription before anything is published.
    tokio::time::sleep(2 * SECOND).await;
    env.start_worker("a");
    env.publish(&other).await;
    env.publish(&web).await;
    let states = tokio::task::spawn_blocking(move || lines.join().expect("reader"))
        .await
        .expect("join");
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        states,
        vec![
            (id(&web), "starting".to_owned()),
            (id(&web), "running".to_owned())
        ]
    );
}

/// A broker set up by an operator from the shipped definitions runs the worker as it
/// is: every declaration the worker makes finds what it declares, and requests flow
/// before any worker ever declared a thing.
#[tokio::test]
async fn a_broker_set_up_from_the_shipped_definitions_runs_the_worker_as_it_is() {
    let mut env = TestEnv::new().await;
    let users = load_shipped_definitions(&env);
    // The queues are there before any worker or producer declared them.
    assert_eq!(env.queue_depth("provisioning.docker").await, 0);
    assert_eq!(env.queue_depth("provisioning.docker.delay.4s").await, 0);

    let mut events = env.events().await;
    env.start_worker("defined");
    let web = env.web("defined-web");
    env.publish(&web).await;
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    let down = env.teardown("defined-down", &id(&web));
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    let log = env.worker_log("defined");
    for user in users {
        rabbitmqctl(&["-q", "delete_user", &user]);
    }
    assert!(
        !log.contains("other arguments") && !log.contains("ERROR"),
        "the worker found the broker other than it declares it:\n{log}"
    );
}

/// A poison message (one every worker crashes on) published to the docker work queue,
/// then returned by "crashing" consumers until the broker dead-letters it: how many
/// deliveries that took, and whether it reached the dead letters.
async fn poison_until_dead_lettered(env: &TestEnv, name: &str) -> (usize, u32) {
    env.publish_raw(
        "docker.provision",
        &format!("{name}-{}", env.run_id),
        b"{\"poison\": true}",
    )
    .await;
    let deliveries = env.return_until_gone("provisioning.docker").await;
    (
        deliveries,
        env.queue_depth("provisioning.docker.dead-letter").await,
    )
}

/// The work queue's tunables (delivery limit, dead-lettering) are a policy, created by
/// the first client when missing: the queue carries only its type as an argument. An
/// operator's change to the policy takes effect on the queue as it is (no deleting,
/// messages kept), and a worker starting later does not undo it.
#[tokio::test]
async fn queue_settings_are_policies_an_operator_changes_in_place() {
    use reqwest::Method;
    let env = TestEnv::new().await;
    env.broker
        .declare(PlatformName::Docker)
        .await
        .expect("declare");
    let (status, policy) = env
        .management(Method::GET, "policies/provisioner-work-docker", None)
        .await;
    assert_eq!(status, 200, "the worker created the missing policy");
    assert_eq!(policy["definition"]["delivery-limit"], 10);
    assert_eq!(
        policy["definition"]["dead-letter-exchange"],
        "provisioning.dead-letter"
    );
    let (_, queue) = env
        .management(Method::GET, "queues/provisioning.docker", None)
        .await;
    assert_eq!(
        queue["arguments"],
        serde_json::json!({"x-queue-type": "quorum"}),
        "no tunable is fixed as an argument"
    );
    let (_, journal) = env
        .management(Method::GET, "policies/provisioner-status-journal", None)
        .await;
    assert_eq!(journal["definition"]["overflow"], "drop-head");

    // A message waits in the queue while the operator lowers the delivery limit.
    let waiting = env.web("waiting");
    env.publish(&waiting).await;
    let mut lowered = policy.clone();
    lowered["definition"]["delivery-limit"] = 1.into();
    let (status, _) = env
        .management(
            Method::PUT,
            "policies/provisioner-work-docker",
            Some(serde_json::json!({
                "pattern": lowered["pattern"], "apply-to": "queues",
                "priority": lowered["priority"], "definition": lowered["definition"],
            })),
        )
        .await;
    assert!(status == 201 || status == 204, "PUT policy: {status}");
    let deadline = tokio::time::Instant::now() + 10 * SECOND;
    loop {
        let (_, queue) = env
            .management(Method::GET, "queues/provisioning.docker", None)
            .await;
        if queue["effective_policy_definition"]["delivery-limit"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the changed policy never applied: {queue}"
        );
        tokio::time::sleep(SECOND / 5).await;
    }
    assert_eq!(
        env.queue_depth("provisioning.docker").await,
        1,
        "the queue kept its message"
    );
    env.take_all("provisioning.docker").await;

    // A client connecting later leaves the operator's policy as it is…
    let later = AmqpBroker::connect(AmqpConfig::new(&env.amqp_url))
        .await
        .expect("connect");
    later.declare(PlatformName::Docker).await.expect("declare");
    let (_, kept) = env
        .management(Method::GET, "policies/provisioner-work-docker", None)
        .await;
    assert_eq!(kept["definition"]["delivery-limit"], 1);
    // …and the broker enforces it: a poison message is dead-lettered after its second
    // delivery, not its eleventh.
    let (deliveries, dead) = poison_until_dead_lettered(&env, "poison").await;
    assert_eq!((deliveries, dead), (2, 1));
}

/// Where the management API is out of reach (a broker without the plugin, or
/// `RABBITMQ_MANAGEMENT_URL=off`), a client still makes safe queues: they carry the
/// policies' settings as arguments, and a poison message is dead-lettered, not lost or
/// looping. A later client that can reach the API creates the policies and uses the
/// queues as they are.
#[tokio::test]
async fn without_the_management_api_queues_carry_their_settings_as_arguments() {
    use reqwest::Method;
    let env = TestEnv::new().await;
    // TestEnv's own client created the shared policies; this test is about the
    // platform's, which nothing has declared yet.
    for api in [
        ManagementApi::Off,
        ManagementApi::from_setting(Some("http://127.0.0.1:9")),
    ] {
        let mut config = AmqpConfig::new(&env.amqp_url);
        config.management_api = api;
        let without = AmqpBroker::connect(config).await.expect("connect");
        without
            .declare(PlatformName::Docker)
            .await
            .expect("declare without the management API");
    }
    let (status, _) = env
        .management(Method::GET, "policies/provisioner-work-docker", None)
        .await;
    assert_eq!(status, 404);
    let (_, queue) = env
        .management(Method::GET, "queues/provisioning.docker", None)
        .await;
    assert_eq!(queue["arguments"]["x-delivery-limit"], 10);
    assert_eq!(
        queue["arguments"]["x-dead-letter-exchange"],
        "provisioning.dead-letter"
    );
    assert_eq!(
        queue["arguments"]["x-dead-letter-strategy"],
        "at-least-once"
    );

    let (deliveries, dead) = poison_until_dead_lettered(&env, "poison").await;
    assert_eq!((deliveries, dead), (11, 1));

    // With the API in reach again, the policy is created and the queue used as it is.
    env.broker
        .declare(PlatformName::Docker)
        .await
        .expect("declare with the management API");
    let (status, _) = env
        .management(Method::GET, "policies/provisioner-work-docker", None)
        .await;
    assert_eq!(status, 200);
}

/// The users of the shipped definitions do their jobs and nothing more: the docker
/// worker consumes, reports and fans a fleet out as its own user; the producer submits
/// and follows it; a worker cannot publish requests (not on `provisioning.requests`,
/// not through the default exchange, not another platform's on `provisioning.internal`)
/// and a producer cannot publish status events or workers' messages.
#[tokio::test]
async fn each_user_of_the_definitions_may_do_its_job_and_nothing_more() {
    let mut env = TestEnv::new().await;
    let users = load_shipped_definitions(&env);
    let url = |role: &str| {
        format!(
            "amqp://provisioner-{role}-{}:secret@127.0.0.1:5672/{}",
            env.run_id, env.vhost
        )
    };
    let (worker, producer) = (url("worker-docker"), url("producer"));
    env.start_worker_with("least", &[("AMQP_URL", worker.as_str())]);

    // A fleet of two: the worker publishes its members on provisioning.internal.
    let fleet = serde_json::json!({
        "schema_version": 1, "request_id": format!("least-fleet-{}", env.run_id),
        "operation": "provision", "platform": "docker", "count": 2,
        "spec": {"image": "localhost/busybox:latest", "command": ["sleep", "600"]},
        "labels": {"test-run": env.run_id}
    });
    let file = std::env::temp_dir().join(format!("least-{}.json", env.run_id));
    std::fs::write(&file, fleet.to_string()).expect("write the request");
    let submitted = std::process::Command::new(common::BIN)
        .args(["submit", "--wait", "--timeout-seconds", "120"])
        .arg(&file)
        .envs(env.env())
        .env("AMQP_URL", &producer)
        // The test's users carry its run id: the worker user it believes.
        .env(
            "STATUS_PUBLISHERS",
            format!("provisioner-worker-{{platform}}-{}", env.run_id),
        )
        .output()
        .expect("run submit");
    let _ = std::fs::remove_file(&file);
    let said = String::from_utf8_lossy(&submitted.stderr).into_owned();
    assert!(
        submitted.status.success(),
        "{said}\n{}",
        env.worker_log("least")
    );
    assert_eq!(env.containers().await.len(), 2, "{said}");

    for (who, url, exchange, key) in [
        (
            "a worker",
            &worker,
            "provisioning.requests",
            "docker.provision",
        ),
        ("a worker", &worker, "", "provisioning.docker"),
        (
            "a worker",
            &worker,
            "provisioning.internal",
            "aws-ec2.provision",
        ),
        (
            "a worker",
            &worker,
            "provisioning.delay",
            "provisioning.aws-ec2.delay.4s",
        ),
        (
            "a producer",
            &producer,
            "provisioning.status",
            "docker.running",
        ),
        (
            "a producer",
            &producer,
            "provisioning.internal",
            "docker.provision",
        ),
        (
            "a producer",
            &producer,
            "provisioning.dead-letter",
            "docker.provision",
        ),
        ("a producer", &producer, "", "provisioning.docker"),
    ] {
        let published = publish_as(url, exchange, key).await;
        assert!(
            published
                .as_ref()
                .is_err_and(|e| e.to_uppercase().contains("ACCESS")),
            "{who} published on {exchange:?} with {key:?}: {published:?}"
        );
    }
    // The producer's right is the request door.
    assert_eq!(
        publish_as(&producer, "provisioning.requests", "docker.provision").await,
        Ok(())
    );
    for user in users {
        rabbitmqctl(&["-q", "delete_user", &user]);
    }
}

#[tokio::test]
async fn a_park_the_broker_refuses_gives_the_message_back_after_its_delay_not_at_once() {
    // Every delay queue gone (deleted by an operator, lost with a node): each park is
    // returned unroutable, a refusal. Given back at once, the message would come straight
    // back to be parked again, a hot loop for as long as the broker refuses.
    use futures_util::StreamExt;
    use provisioner_core::Settlement;
    use provisioner_core::amqp::{RETRY_TIERS_S, retry_queue};
    let env = TestEnv::new().await;
    let platform = PlatformName::parse("docker").expect("a platform");
    env.broker.declare(platform).await.expect("declare");
    for tier in RETRY_TIERS_S {
        rabbitmqctl(&[
            "-q",
            "delete_queue",
            "-p",
            &env.vhost,
            &retry_queue(platform, tier),
        ]);
    }
    env.broker
        .publish_request("docker.provision", "park-1", b"{}")
        .await
        .expect("publish");
    let mut deliveries = env.broker.consume(platform, 1).await.expect("consume");
    async fn next(
        deliveries: &mut provisioner_core::broker::DeliveryStream,
    ) -> provisioner_core::Delivery {
        tokio::time::timeout(10 * SECOND, deliveries.next())
            .await
            .expect("a delivery within 10 s")
            .expect("the stream goes on")
            .expect("a delivery")
    }
    let first = next(&mut deliveries).await;
    assert_eq!(first.waits, 0);
    let delay = 3 * SECOND;
    let parked_at = std::time::Instant::now();
    let parked = first
        .settle(Settlement::Retry {
            delay,
            attempt: 1,
            waits: 1,
        })
        .await;
    assert!(
        parked.is_err(),
        "the delay queue refused the park: {parked:?}"
    );
    let again = next(&mut deliveries).await;
    assert!(
        parked_at.elapsed() >= delay,
        "given back after {:?}, before its {delay:?} delay",
        parked_at.elapsed()
    );
    assert!(again.redelivered, "the same delivery, given back");
    assert_eq!(again.waits, 0, "a refused park is not a wait");
    again.settle(Settlement::Ack).await.expect("ack");
}
