//! Tenant quotas end to end, on the real RabbitMQ, Redis and Podman, with two workers
//! racing: a tenant's provisions never hold more machines than its quota, the one over it
//! ends `error` class `quota` with nothing made, and a teardown gives its place back.

mod common;

use common::{TestEnv, id};
use provisioner_events::{ErrorClass, State};

/// Runs `provisioner quota …` and returns its JSON answer.
fn quota(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(common::BIN)
        .arg("quota")
        .args(args)
        .envs(env.env())
        .output()
        .expect("run provisioner quota");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json")
}

fn for_tenant(env: &TestEnv, name: &str, tenant: &str) -> serde_json::Value {
    let mut request = env.web(name);
    request["tenant"] = tenant.into();
    request
}

#[tokio::test]
async fn a_tenant_never_holds_more_than_its_quota_and_a_teardown_gives_a_place_back() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    env.start_worker("b");
    let set = quota(&env, &["set", "team-a", "2"]);
    assert_eq!(
        set,
        serde_json::json!({"tenant": "team-a", "limit": 2, "used": 0})
    );

    let requests: Vec<_> = (0..3)
        .map(|i| for_tenant(&env, &format!("q{i}"), "team-a"))
        .collect();
    // Someone else's work is not counted against team-a.
    let untenanted = env.web("q-free");
    for request in requests.iter().chain([&untenanted]) {
        env.publish(request).await;
    }
    let mut running = Vec::new();
    let mut refused = Vec::new();
    for request in &requests {
        let event = events.terminal(&id(request)).await;
        match event.state {
            State::Running => running.push(id(request)),
            State::Error => refused.push(event),
            other => panic!("{other:?}: {event:#?}"),
        }
    }
    assert_eq!(running.len(), 2, "two machines: {refused:#?}");
    assert_eq!(refused.len(), 1);
    let error = refused[0].error.as_ref().expect("error");
    assert_eq!(error.class, ErrorClass::Quota, "{error:?}");
    assert!(error.message.contains("2 of its 2"), "{}", error.message);
    assert_eq!(
        events.terminal(&id(&untenanted)).await.state,
        State::Running
    );
    let containers = env.containers().await;
    assert!(
        !containers.contains_key(&refused[0].request_id),
        "nothing made for the refused one: {containers:?}"
    );
    assert_eq!(containers.len(), 3, "{containers:?}");
    assert_eq!(quota(&env, &["show", "team-a"])["used"], 2);

    // A teardown gives its place back; the refused work, sent again, now runs.
    let down = env.teardown("q-down", &running[0]);
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    assert_eq!(quota(&env, &["show", "team-a"])["used"], 1);
    let again = for_tenant(&env, "q-again", "team-a");
    env.publish(&again).await;
    assert_eq!(events.terminal(&id(&again)).await.state, State::Running);
    assert_eq!(quota(&env, &["show", "team-a"])["used"], 2);

    // Lifting the limit leaves the count; `none` is no limit.
    let lifted = quota(&env, &["set", "team-a", "none"]);
    assert_eq!(
        lifted,
        serde_json::json!({"tenant": "team-a", "limit": null, "used": 2})
    );
}

/// A quota of vCPUs, a unit EC2 defines (its instance types' vCPUs): two t3.small (2 each)
/// fit a tenant's 5, a third is refused naming the unit, with nothing launched; its
/// teardown gives the vCPUs back.
#[tokio::test]
async fn a_tenants_vcpus_are_counted_by_instance_type_and_refused_past_its_quota() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ec2_worker("ec2");
    let tenant = format!("team-v-{}", env.run_id);
    let set = quota(&env, &["set", &tenant, "5", "--unit", "vcpus"]);
    assert_eq!(
        set["units"],
        serde_json::json!({"vcpus": {"limit": 5, "used": 0}})
    );
    let launch = |name: &str| {
        serde_json::json!({
            "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
            "operation": "provision", "platform": "aws-ec2", "tenant": tenant,
            "spec": {"image_id": common::LOCALSTACK_IMAGE, "instance_type": "t3.small"},
            "labels": {"test-run": env.run_id}
        })
    };
    let first = launch("v1");
    let second = launch("v2");
    for request in [&first, &second] {
        env.publish(request).await;
        assert_eq!(events.terminal(&id(request)).await.state, State::Running);
    }
    let third = launch("v3");
    env.publish(&third).await;
    let refused = events.terminal(&id(&third)).await;
    assert_eq!(refused.state, State::Error);
    let error = refused.error.expect("error");
    assert_eq!(error.class, ErrorClass::Quota, "{error:?}");
    assert!(
        error.message.contains("4 of its 5 vcpus") && error.message.contains("needs 2 more"),
        "{}",
        error.message
    );
    let instances = common::ec2_instances(&env.run_id).await;
    assert!(!instances.contains_key(&id(&third)), "{instances:?}");
    let shown = quota(&env, &["show", &tenant]);
    assert_eq!(
        (
            shown["used"].clone(),
            shown["units"]["vcpus"]["used"].clone()
        ),
        (2.into(), 4.into())
    );

    let down = serde_json::json!({
        "schema_version": 1, "request_id": format!("v-down-{}", env.run_id),
        "operation": "teardown", "platform": "aws-ec2", "target_request_id": id(&first)
    });
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    assert_eq!(quota(&env, &["show", &tenant])["units"]["vcpus"]["used"], 2);
    let retry = launch("v4");
    env.publish(&retry).await;
    assert_eq!(events.terminal(&id(&retry)).await.state, State::Running);
}

/// A worker that dies after recording a teardown's end, before anything follows it: the
/// teardown's copy that the next worker finds already ended still gives the tenant's place
/// back (without the fix, the place stayed held for good).
#[tokio::test]
async fn a_teardown_that_dies_after_recording_its_end_still_gives_the_place_back() {
    a_teardown_that_dies_at("after_record", Target::Request).await;
}

/// The same for a teardown naming the container by its id: once the container is gone
/// its labels cannot say whose it was, so the teardown's record keeps its owner.
#[tokio::test]
async fn a_teardown_by_resource_id_that_dies_after_recording_its_end_gives_the_place_back() {
    a_teardown_that_dies_at("after_record", Target::Resource).await;
}

/// Dying after the removal, before anything is recorded: the next attempt finds the
/// container gone and still frees what its owner held.
#[tokio::test]
async fn a_teardown_by_resource_id_that_dies_after_removing_gives_the_place_back() {
    a_teardown_that_dies_at("after_platform_call", Target::Resource).await;
}

/// How a teardown names what it removes.
#[derive(Clone, Copy)]
enum Target {
    Request,
    Resource,
}

async fn a_teardown_that_dies_at(point: &str, target: Target) {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let first = env.start_worker("first");
    let tenant = format!("team-c-{}", env.run_id);
    quota(&env, &["set", &tenant, "1"]);
    let web = for_tenant(&env, "qc", &tenant);
    env.publish(&web).await;
    let running = events.terminal(&id(&web)).await;
    assert_eq!(running.state, State::Running);
    assert_eq!(quota(&env, &["show", &tenant])["used"], 1);
    // Only the worker that will die takes the teardown.
    let _ = env.worker(first).kill();
    let _ = env.worker(first).wait();

    let marker = std::env::temp_dir().join(format!("fault-{}-quota", env.run_id));
    let marker_text = marker.to_string_lossy().into_owned();
    env.start_worker_with(
        "crashy",
        &[
            ("PROVISIONER_FAULT_POINT", point),
            ("PROVISIONER_FAULT_ONCE", marker_text.as_str()),
        ],
    );
    let mut down = env.teardown("qc-down", &id(&web));
    if let Target::Resource = target {
        let container = running.resource.expect("the container").id;
        let fields = down.as_object_mut().expect("request");
        fields.remove("target_request_id");
        fields.insert("resource_id".into(), container.into());
    }
    env.publish(&down).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never reached {point}: {}",
            env.worker_log("crashy")
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    env.start_worker("steady");
    let stopped = events.terminal(&id(&down)).await;
    assert_eq!(stopped.state, State::Stopped, "{:#?}", stopped.error);
    assert_eq!(
        quota(&env, &["show", &tenant])["used"],
        0,
        "the place is given back"
    );
    assert!(env.containers().await.is_empty(), "the container is gone");
    let _ = std::fs::remove_file(marker);
}
