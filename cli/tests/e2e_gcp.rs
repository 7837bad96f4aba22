//! GCP end to end: `provisioner worker --platform gcp-compute` and `gcp-cloud-run`
//! against the fake GCP server (`GCP_ENDPOINT`, no credentials), through the real
//! RabbitMQ and Redis.

mod common;

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
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("gce-vm-{}", env.run_id),
        "operation": "provision", "platform": "gcp-compute",
        "spec": {"machine_type": "e2-small", "image": "projects/debian-cloud/global/images/family/debian-12",
                 "public_ip": true, "labels": {"team": "batch"}}
    });
    for _ in 0..5 {
        env.publish(&request).await;
    }
    let terminal = events.terminal_count(&id(&request), 5).await;
    assert_eq!(
        terminal[0].state,
        State::Running,
        "{terminal:#?}\n{}",
        env.worker_log("gce")
    );
    assert!(
        terminal.iter().all(|e| *e == terminal[0]),
        "identical: {terminal:#?}"
    );
    let name = instance_name(&id(&request));
    let resource = terminal[0].resource.clone().expect("resource");
    assert_eq!(resource.id, format!("europe-west1-b/{name}"));
    assert!(resource.address.is_some(), "{resource:?}");
    assert_eq!(api.created(), 1, "five deliveries, one instance");

    let describe = serde_json::json!({
        "schema_version": 1, "request_id": format!("gce-look-{}", env.run_id),
        "operation": "describe", "platform": "gcp-compute", "target_request_id": id(&request)
    });
    env.publish(&describe).await;
    assert_eq!(events.terminal(&id(&describe)).await.state, State::Running);

    for step in ["gce-down", "gce-down-again"] {
        let down = serde_json::json!({
            "schema_version": 1, "request_id": format!("{step}-{}", env.run_id),
            "operation": "teardown", "platform": "gcp-compute", "target_request_id": id(&request)
        });
        env.publish(&down).await;
        assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    }
    assert_eq!(api.instance_count(), 0);
}

#[tokio::test]
async fn cloud_run_requests_run_once_with_their_url_through_the_queue() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "gcp-cloud-run", "run");
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("run-hello-{}", env.run_id),
        "operation": "provision", "platform": "gcp-cloud-run",
        "spec": {"image": "us-docker.pkg.dev/cloudrun/container/hello", "memory": "512Mi"}
    });
    for _ in 0..5 {
        env.publish(&request).await;
    }
    let terminal = events.terminal_count(&id(&request), 5).await;
    assert_eq!(
        terminal[0].state,
        State::Running,
        "{terminal:#?}\n{}",
        env.worker_log("run")
    );
    let sid = service_id(&id(&request));
    let resource = terminal[0].resource.clone().expect("resource");
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

    for step in ["run-down", "run-down-again"] {
        let down = serde_json::json!({
            "schema_version": 1, "request_id": format!("{step}-{}", env.run_id),
            "operation": "teardown", "platform": "gcp-cloud-run", "target_request_id": id(&request)
        });
        env.publish(&down).await;
        assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    }
    assert_eq!(api.service_count(), 0);
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
