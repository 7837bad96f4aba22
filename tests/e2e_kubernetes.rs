//! Kubernetes end to end: `provisioner worker --platform kubernetes` with a kubeconfig
//! naming the fake API server, through the real RabbitMQ and Redis.

mod common;

use common::scenario::Scenario;
use common::{TestEnv, id};
use provisioner_events::{ErrorClass, State};
use provisioner_kubernetes::fake_api::FakeApi;
use provisioner_kubernetes::object_name;

fn kubeconfig(env: &TestEnv, api: &FakeApi) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("provisioner-kubeconfig-{}", env.run_id));
    std::fs::write(&path, api.kubeconfig("apps")).expect("kubeconfig");
    path
}

#[tokio::test]
async fn kubernetes_requests_run_once_and_tear_down_twice_through_the_queue() {
    let api = FakeApi::start(3).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let config = kubeconfig(&env, &api);
    env.start_platform_worker(
        "kubernetes",
        "k8s",
        &[("KUBECONFIG", config.to_str().expect("path"))],
    );
    let scenario = Scenario {
        platform: "kubernetes",
        worker: "k8s",
        name: "k8s-web",
        spec: serde_json::json!({"image": "nginx:1.27", "replicas": 2, "port": 80, "service_type": "NodePort"}),
    };
    // The fake holds this test's objects only; a Deployment without its Service (or the
    // reverse) would be a leak, so both are counted.
    let live = async |_: &str| api.count("deployments").max(api.count("services"));
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let name = object_name(&id(&scenario.request(&env)));
    assert_eq!(
        running.resource.as_ref().map(|r| r.id.clone()),
        Some(format!("apps/{name}")),
        "in the kubeconfig context's namespace"
    );
    assert_eq!(api.count("services"), 1);
    scenario.tear_down_twice(&env, &mut events, live).await;
    assert_eq!(api.count("services"), 0);
}

#[tokio::test]
async fn a_kubernetes_spec_the_cluster_would_refuse_is_rejected_before_anything_is_made() {
    let api = FakeApi::start(1).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let config = kubeconfig(&env, &api);
    env.start_platform_worker(
        "kubernetes",
        "k8s",
        &[("KUBECONFIG", config.to_str().expect("path"))],
    );
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("k8s-bad-{}", env.run_id),
        "operation": "provision", "platform": "kubernetes",
        "spec": {"image": "nginx:1.27", "namespace": "Not_A_Namespace"}
    });
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(event.state, State::Error);
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::InvalidRequest);
    assert!(
        error.message.contains("Not_A_Namespace"),
        "{}",
        error.message
    );
    assert_eq!(api.count("deployments"), 0);
}

#[tokio::test]
async fn a_worker_without_cluster_access_refuses_to_start() {
    let env = TestEnv::new().await;
    let output = std::process::Command::new(common::BIN)
        .args(["worker", "--platform", "kubernetes"])
        .envs(env.env())
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("Kubernetes configuration"), "{stderr}");
}
