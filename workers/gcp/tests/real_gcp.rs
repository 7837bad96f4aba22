//! Opt-in: both GCP platforms against a real project. They run only with
//! `PROVISIONER_TEST_REAL_GCP=1`, `GCP_PROJECT`, `GCP_ZONE` and `GCP_REGION` set and
//! Application Default Credentials that may create and delete instances and Cloud Run
//! services there. They are ignored (with the reason) unless asked for with `--ignored`,
//! and then fail saying what is missing rather than passing without a project. Each runs the conformance suite
//! (every operation twice, one resource) on the smallest thing it can make: an
//! `e2-micro` instance, and Google's hello container. Both are deleted at the end; a
//! failed run can leave them, labelled `provisioner-managed=true`.

use provisioner_core::conformance::check_platform;
use provisioner_events::decode_request;
use provisioner_gcp::{CloudRunPlatform, ComputePlatform, GcpSettings};

fn opted_in() -> Option<GcpSettings> {
    assert_eq!(
        std::env::var("PROVISIONER_TEST_REAL_GCP").as_deref(),
        Ok("1"),
        "set PROVISIONER_TEST_REAL_GCP=1, GCP_PROJECT, GCP_ZONE, GCP_REGION and Application Default Credentials to run against a real GCP project"
    );
    let settings = GcpSettings::from_environment().expect("GCP settings");
    assert!(
        settings.zone.is_some() && settings.region.is_some(),
        "set GCP_ZONE and GCP_REGION"
    );
    Some(settings)
}

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

#[tokio::test]
#[ignore = "needs a real GCP project: PROVISIONER_TEST_REAL_GCP=1 GCP_PROJECT=… GCP_ZONE=… GCP_REGION=… cargo test --test real_gcp -- --ignored"]
async fn compute_conforms_on_a_real_project_when_opted_in() {
    let Some(settings) = opted_in() else { return };
    let platform = ComputePlatform::new(settings).await.expect("client");
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": request_id("real-gce"), "operation": "provision",
            "platform": "gcp-compute",
            "spec": {"machine_type": "e2-micro",
                     "image": "projects/debian-cloud/global/images/family/debian-12",
                     "ready_timeout_seconds": 300}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    check_platform(&platform, &request, |_| async { true }).await;
}

#[tokio::test]
#[ignore = "needs a real GCP project: PROVISIONER_TEST_REAL_GCP=1 GCP_PROJECT=… GCP_ZONE=… GCP_REGION=… cargo test --test real_gcp -- --ignored"]
async fn cloud_run_conforms_on_a_real_project_when_opted_in() {
    let Some(settings) = opted_in() else { return };
    let platform = CloudRunPlatform::new(settings).await.expect("client");
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": request_id("real-run"), "operation": "provision",
            "platform": "gcp-cloud-run",
            "spec": {"image": "us-docker.pkg.dev/cloudrun/container/hello", "max_instances": 1,
                     "ready_timeout_seconds": 300}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    check_platform(&platform, &request, |_| async { true }).await;
}
