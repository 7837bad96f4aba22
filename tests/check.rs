//! `provisioner check --platform P`: what a user runs before sending work. Each platform
//! against its emulator or fake, once as it should pass and, where the fake can play a
//! caller without rights, once as it should fail with what to fix (exit 64).

mod common;

use tokio::process::Command;

use provisioner_azure::fake_api::{FakeArm, RESOURCE_GROUP, SUBSCRIPTION};
use provisioner_gcp::fake_api::FakeGcp;
use provisioner_kubernetes::fake_api::FakeApi;

/// Runs `provisioner check` with only `vars` (and PATH) set: no broker or store needed.
/// Awaited, not blocking: the fake servers answer on this test's runtime.
async fn check(platform: &str, vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(common::BIN)
        .args(["check", "--platform", platform])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .envs(vars.iter().copied())
        .output()
        .await
        .expect("run provisioner check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[tokio::test]
async fn ec2_is_checked_with_dry_runs_on_localstack() {
    let endpoint = common::aws_endpoint();
    let vars = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let (code, text) = check("aws-ec2", &vars).await;
    assert_eq!(code, Some(0), "{text}");
    for expected in [
        "region: us-east-1",
        "credentials: access key",
        "ec2:DescribeInstances",
        "aws-ec2: ready",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
}

#[tokio::test]
async fn ecs_is_checked_on_moto() {
    let endpoint = common::ecs_endpoint();
    let vars = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let (code, text) = check("aws-ecs", &vars).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ecs:ListClusters: allowed"), "{text}");
}

#[tokio::test]
async fn a_setup_that_cannot_work_fails_the_check_with_what_to_set() {
    let (code, text) = check("gcp-compute", &[]).await;
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("FAIL  setup") && text.contains("GCP_PROJECT"),
        "{text}"
    );
}

#[tokio::test]
async fn kubernetes_rights_are_asked_with_self_subject_access_reviews() {
    let api = FakeApi::start(1).await;
    let config = std::env::temp_dir().join(format!(
        "provisioner-check-kubeconfig-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&config, api.kubeconfig("apps")).expect("kubeconfig");
    let vars = [
        ("KUBECONFIG", config.to_str().expect("path")),
        ("KUBERNETES_NAMESPACES", "team-a"),
    ];
    api.grant_only(&["apps", "team-a"]);
    let (code, text) = check("kubernetes", &vars).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("deployments in team-a: create, get, list, delete allowed"),
        "{text}"
    );
    // A Role in apps only: team-a is refused, and the check says where to bind it.
    api.grant_only(&["apps"]);
    let (code, text) = check("kubernetes", &vars).await;
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("FAIL  deployments in team-a"), "{text}");
    assert!(text.contains("FAIL  services in team-a"), "{text}");
    assert!(text.contains("ok    deployments in apps"), "{text}");
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn azure_permissions_are_read_from_arm() {
    let api = FakeArm::start(1).await;
    let url = api.url();
    let vars = [
        ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
        ("AZURE_RESOURCE_GROUP", RESOURCE_GROUP),
        ("AZURE_ENDPOINT", url.as_str()),
        ("AZURE_CREDENTIALS", "anonymous"),
    ];
    let (code, text) = check("azure-container-instances", &vars).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("resource group: apps in westeurope"),
        "{text}"
    );
    // A reader: every write is missing, and named.
    api.set_permissions(&["*/read"], &[]);
    let (code, text) = check("azure-vm", &vars).await;
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("Microsoft.Compute/virtualMachines/write")
            && !text.contains("Microsoft.Compute/virtualMachines/read,"),
        "{text}"
    );
    let (code, text) = check(
        "azure-vm",
        &[
            ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
            ("AZURE_RESOURCE_GROUP", "missing-group"),
            ("AZURE_ENDPOINT", url.as_str()),
            ("AZURE_CREDENTIALS", "anonymous"),
        ],
    )
    .await;
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("holds no role on missing-group")
            && text.contains("or the group does not exist"),
        "with the documented roles, ARM refuses a group it has none in before looking: {text}"
    );
    api.set_assignments(vec![provisioner_azure::fake_api::RoleAssignment::new(
        format!("/subscriptions/{SUBSCRIPTION}"),
        &["*"],
        &[],
    )]);
    let (code, text) = check(
        "azure-vm",
        &[
            ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
            ("AZURE_RESOURCE_GROUP", "missing-group"),
            ("AZURE_ENDPOINT", url.as_str()),
            ("AZURE_CREDENTIALS", "anonymous"),
        ],
    )
    .await;
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("missing-group does not exist"), "{text}");
}

#[tokio::test]
async fn gcp_is_checked_by_listing_on_the_fake() {
    let api = FakeGcp::start("check-project", 1).await;
    let url = api.url();
    let vars = [
        ("GCP_PROJECT", "check-project"),
        ("GCP_ZONE", "europe-west1-b"),
        ("GCP_REGION", "europe-west1"),
        ("GCP_ENDPOINT", url.as_str()),
        ("GCP_CREDENTIALS", "anonymous"),
    ];
    for platform in ["gcp-compute", "gcp-cloud-run"] {
        let (code, text) = check(platform, &vars).await;
        assert_eq!(code, Some(0), "{platform}: {text}");
        assert!(text.contains("project: check-project"), "{text}");
    }
}

#[tokio::test]
async fn docker_is_checked_against_the_engine() {
    let host = common::docker_host();
    let (code, text) = check("docker", &[("DOCKER_HOST", host.as_str())]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok    engine:"), "{text}");
}
