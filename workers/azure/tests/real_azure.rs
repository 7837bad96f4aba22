//! Opt-in: both Azure platforms against a real subscription. They run only with
//! `PROVISIONER_TEST_REAL_AZURE=1`, `AZURE_SUBSCRIPTION_ID`, `AZURE_RESOURCE_GROUP` (an
//! existing group), `AZURE_LOCATION` and credentials azure_identity can find
//! (`AZURE_CLIENT_SECRET` and friends, a managed identity, or `az login`); the VM test
//! also needs `PROVISIONER_TEST_AZURE_SUBNET_ID` and `PROVISIONER_TEST_SSH_PUBLIC_KEY`.
//! They are ignored (with the reason) unless asked for with `--ignored`, and then fail
//! saying what is missing rather than passing without a subscription. Each runs the conformance suite (every operation
//! twice, one resource) on the smallest thing it can make, and deletes it; a failed run
//! can leave it, tagged `provisioner-managed=true`.

use provisioner_azure::{AzureSettings, ContainerInstancesPlatform, VmPlatform};
use provisioner_core::conformance::check_platform;
use provisioner_events::decode_request;

fn opted_in() -> Option<AzureSettings> {
    assert_eq!(
        std::env::var("PROVISIONER_TEST_REAL_AZURE").as_deref(),
        Ok("1"),
        "set PROVISIONER_TEST_REAL_AZURE=1, AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZURE_LOCATION and Azure credentials to run against a real subscription"
    );
    Some(AzureSettings::from_environment().expect("Azure settings"))
}

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

#[tokio::test]
#[ignore = "needs a real Azure subscription: PROVISIONER_TEST_REAL_AZURE=1 AZURE_SUBSCRIPTION_ID=… AZURE_RESOURCE_GROUP=… AZURE_LOCATION=… cargo test --test real_azure -- --ignored"]
async fn vm_conforms_on_a_real_subscription_when_opted_in() {
    let Some(settings) = opted_in() else { return };
    let (Ok(subnet), Ok(key)) = (
        std::env::var("PROVISIONER_TEST_AZURE_SUBNET_ID"),
        std::env::var("PROVISIONER_TEST_SSH_PUBLIC_KEY"),
    ) else {
        panic!(
            "set PROVISIONER_TEST_AZURE_SUBNET_ID and PROVISIONER_TEST_SSH_PUBLIC_KEY for the VM test"
        );
    };
    let platform = VmPlatform::new(settings).expect("client");
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": request_id("real-vm"), "operation": "provision",
            "platform": "azure-vm",
            "spec": {"size": "Standard_B1s",
                     "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
                     "subnet_id": subnet, "ssh_public_key": key, "ready_timeout_seconds": 900}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    check_platform(&platform, &request, |_| async { true }).await;
}

#[tokio::test]
#[ignore = "needs a real Azure subscription: PROVISIONER_TEST_REAL_AZURE=1 AZURE_SUBSCRIPTION_ID=… AZURE_RESOURCE_GROUP=… AZURE_LOCATION=… cargo test --test real_azure -- --ignored"]
async fn container_instances_conform_on_a_real_subscription_when_opted_in() {
    let Some(settings) = opted_in() else { return };
    let platform = ContainerInstancesPlatform::new(settings).expect("client");
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": request_id("real-aci"), "operation": "provision",
            "platform": "azure-container-instances",
            "spec": {"image": "mcr.microsoft.com/azuredocs/aci-helloworld", "cpu": 0.5,
                     "memory_gb": 0.5, "ports": [80], "ready_timeout_seconds": 600}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    check_platform(&platform, &request, |_| async { true }).await;
}
