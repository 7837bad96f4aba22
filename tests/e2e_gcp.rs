//! GCP end to end: `provisioner worker --platform gcp-compute` and `gcp-cloud-run`
//! against the fake GCP server (`GCP_ENDPOINT`, no credentials), through the real
//! RabbitMQ and Redis.

mod common;

use common::scenario::Scenario;
use common::{TestEnv, id};
use provisioner_events::{ErrorClass, State};
use provisioner_gcp::cloud_run::service_id;
use provisioner_gcp::compute::instance_name;
use provisioner_gcp::fake_api::FakeGcp;

const PROJECT: &str = "e2e-project";

fn gcp_env(api: &FakeGcp) -> Vec<(&'static str, String)> {
    vec![
        ("GCP_PROJECT", PROJECT.into()),
        ("GCP_ZONE", "europe-west1-b".into()),
        ("GCP_REGION", "europe-west1".into()),
        ("GCP_ENDPOINT", api.url()),
        ("GCP_CREDENTIALS", "anonymous".into()),
    ]
}

fn start_worker(env: &mut TestEnv, api: &FakeGcp, platform: &str, name: &str) {
    let vars = gcp_env(api);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.start_platform_worker(platform, name, &vars);
}

#[tokio::test]
async fn compute_requests_run_once_and_tear_down_twice_through_the_queue() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "gcp-compute", "gce");
    let scenario = Scenario {
        platform: "gcp-compute",
        worker: "gce",
        name: "gce-vm",
        spec: serde_json::json!({"machine_type": "e2-small", "image": "projects/debian-cloud/global/images/family/debian-12",
                 "public_ip": true, "labels": {"team": "batch"}}),
    };
    let request = scenario.request(&env);
    let live = async |_: &str| api.instance_count();
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let name = instance_name(&id(&request));
    let resource = running.resource.clone().expect("resource");
    assert_eq!(resource.id, format!("europe-west1-b/{name}"));
    assert!(resource.address.is_some(), "{resource:?}");
    assert_eq!(api.created(), 1, "five deliveries, one instance");

    let describe = serde_json::json!({
        "schema_version": 1, "request_id": format!("gce-look-{}", env.run_id),
        "operation": "describe", "platform": "gcp-compute", "target_request_id": id(&request)
    });
    env.publish(&describe).await;
    assert_eq!(events.terminal(&id(&describe)).await.state, State::Running);

    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn cloud_run_requests_run_once_with_their_url_through_the_queue() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "gcp-cloud-run", "run");
    let scenario = Scenario {
        platform: "gcp-cloud-run",
        worker: "run",
        name: "run-hello",
        spec: serde_json::json!({"image": "us-docker.pkg.dev/cloudrun/container/hello", "memory": "512Mi"}),
    };
    let request = scenario.request(&env);
    let live = async |_: &str| api.service_count();
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let sid = service_id(&id(&request));
    let resource = running.resource.clone().expect("resource");
    assert_eq!(
        resource.address.as_deref(),
        Some(format!("https://{sid}-abcdefghij-ew.a.run.app").as_str())
    );
    assert_eq!(api.created(), 1, "five deliveries, one service");

    // A spec Cloud Run would refuse is rejected before anything is made.
    let bad = serde_json::json!({
        "schema_version": 1, "request_id": format!("run-bad-{}", env.run_id),
        "operation": "provision", "platform": "gcp-cloud-run",
        "spec": {"image": "gcr.io/demo/app:1", "memory": "lots"}
    });
    env.publish(&bad).await;
    let event = events.terminal(&id(&bad)).await;
    assert_eq!(event.state, State::Error);
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::InvalidRequest);
    assert!(error.message.contains("lots"), "{}", error.message);
    assert_eq!(api.created(), 1);

    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn a_gcp_worker_without_a_project_refuses_to_start() {
    let env = TestEnv::new().await;
    let output = std::process::Command::new(common::BIN)
        .args(["worker", "--platform", "gcp-compute"])
        .envs(env.env())
        .env_remove("GCP_PROJECT")
        .env_remove("GOOGLE_CLOUD_PROJECT")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("GCP_PROJECT"), "{stderr}");
}

/// The bulk inserts the fake GCP server answered.
fn bulk_inserts(api: &FakeGcp) -> usize {
    api.log()
        .iter()
        .filter(|l| l.starts_with("POST ") && l.contains("/instances/bulkInsert"))
        .count()
}

/// A fleet of 20 instances through two workers is made in bulk inserts (one call for
/// many members, as Compute Engine counts it), one instance per member, and its teardown
/// removes them all.
#[tokio::test]
async fn a_compute_fleet_is_made_in_bulk_inserts_one_instance_per_member_through_the_queue() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "gcp-compute", "gce-a");
    start_worker(&mut env, &api, "gcp-compute", "gce-b");
    const COUNT: u32 = 20;
    let fleet = serde_json::json!({
        "schema_version": 1, "request_id": format!("gce-fleet-{}", env.run_id),
        "operation": "provision", "platform": "gcp-compute", "count": COUNT,
        "spec": {"machine_type": "e2-small", "image": "projects/debian-cloud/global/images/family/debian-12"}
    });
    env.publish(&fleet).await;
    let fleet_id = id(&fleet);
    let end = events.terminal(&fleet_id).await;
    assert_eq!(
        end.state,
        State::Running,
        "{:#?}\n{}",
        end.error,
        env.worker_log("gce-a")
    );
    let members = end.resource.as_ref().map(|r| r.members.len());
    assert_eq!(members, Some(COUNT as usize));
    assert_eq!(
        api.instance_count(),
        COUNT as usize,
        "one instance per member"
    );
    for index in 0..COUNT {
        let name = instance_name(&format!("{fleet_id}#{index}"));
        assert!(
            api.instance("europe-west1-b", &name).is_some(),
            "member {index} has no instance {name}"
        );
    }
    let bulk = bulk_inserts(&api);
    assert!(
        bulk > 0 && bulk < COUNT as usize,
        "{bulk} bulk inserts for {COUNT} members"
    );
    assert!(
        !api.log()
            .iter()
            .any(|l| l.starts_with("POST ") && l.contains("/zones/europe-west1-b/instances?")),
        "a member was inserted alone"
    );

    let down = serde_json::json!({
        "schema_version": 1, "request_id": format!("gce-fleet-down-{}", env.run_id),
        "operation": "teardown", "platform": "gcp-compute", "target_request_id": fleet_id
    });
    env.publish(&down).await;
    let stopped = events.terminal(&id(&down)).await;
    assert_eq!(stopped.state, State::Stopped, "{:#?}", stopped.error);
    assert_eq!(api.instance_count(), 0, "instances left after the teardown");
}
