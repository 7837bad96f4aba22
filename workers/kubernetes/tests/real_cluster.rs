//! Opt-in: the platform against a real cluster. Ignored (with the reason) unless asked
//! for with `--ignored`; then it needs `PROVISIONER_TEST_REAL_KUBERNETES=1` and a
//! `KUBECONFIG` (or in-cluster account) that can create Deployments and Services in the
//! namespace `PROVISIONER_TEST_NAMESPACE` (default `default`), and fails saying what is
//! missing rather than passing without a cluster. It provisions a small nginx, waits for it,
//! describes it and tears it down, twice each, with the conformance suite.

use provisioner_core::conformance::check_platform;
use provisioner_events::decode_request;
use provisioner_kubernetes::KubernetesPlatform;

#[tokio::test]
#[ignore = "needs a real cluster: PROVISIONER_TEST_REAL_KUBERNETES=1 KUBECONFIG=… cargo test --test real_cluster -- --ignored"]
async fn the_platform_conforms_on_a_real_cluster_when_opted_in() {
    assert_eq!(
        std::env::var("PROVISIONER_TEST_REAL_KUBERNETES").as_deref(),
        Ok("1"),
        "set PROVISIONER_TEST_REAL_KUBERNETES=1 and KUBECONFIG to run against a real cluster"
    );
    let namespace =
        std::env::var("PROVISIONER_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let platform = KubernetesPlatform::from_environment()
        .await
        .expect("a usable kubeconfig");
    let id = format!("real-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": id, "operation": "provision",
            "platform": "kubernetes",
            "spec": {"image": "nginx:1.27", "namespace": namespace, "port": 80,
                     "resources": {"cpu": "50m", "memory": "64Mi"}, "ready_timeout_seconds": 300}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    check_platform(&platform, &request, |_| async { true }).await;
}
