//! Azure end to end: `provisioner worker --platform azure-vm` and
//! `azure-container-instances` against the fake ARM server (`AZURE_ENDPOINT`, no
//! credentials), through the real RabbitMQ and Redis.

mod common;

use common::scenario::Scenario;
use common::{TestEnv, id};
use provisioner_azure::aci::group_name;
use provisioner_azure::fake_api::{FakeArm, RESOURCE_GROUP, SUBSCRIPTION};
use provisioner_azure::vm::vm_name;
use provisioner_events::{ErrorClass, State};

fn start_worker(env: &mut TestEnv, api: &FakeArm, platform: &str, name: &str) {
    let url = api.url();
    env.start_platform_worker(
        platform,
        name,
        &[
            ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
            ("AZURE_RESOURCE_GROUP", RESOURCE_GROUP),
            ("AZURE_LOCATION", "westeurope"),
            ("AZURE_ENDPOINT", url.as_str()),
            ("AZURE_CREDENTIALS", "anonymous"),
        ],
    );
}

#[tokio::test]
async fn vm_requests_run_once_and_tear_down_twice_through_the_queue() {
    let api = FakeArm::start(2).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "azure-vm", "vm");
    let scenario = Scenario {
        platform: "azure-vm",
        worker: "vm",
        name: "az-vm",
        spec: serde_json::json!({"size": "Standard_B1s",
                 "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
                 "subnet_id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/virtualNetworks/apps/subnets/default"),
                 "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBrqcMXeHK9TbFVAntUvqrIZ+DBXzIRQgxK3oLT2lVm9 ops@example"}),
    };
    let request = scenario.request(&env);
    // A VM without its network interface (or the reverse) would be a leak: both counted.
    let live = async |_: &str| {
        api.count("Microsoft.Compute/virtualMachines")
            .max(api.count("Microsoft.Network/networkInterfaces"))
    };
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let name = vm_name(&id(&request));
    let resource = running.resource.clone().expect("resource");
    assert_eq!(resource.id, format!("{RESOURCE_GROUP}/{name}"));
    assert!(resource.address.is_some(), "{resource:?}");
    assert_eq!(api.count("Microsoft.Compute/virtualMachines"), 1);
    assert_eq!(
        api.created(),
        2,
        "five deliveries: one VM and its network interface"
    );

    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn container_group_requests_run_once_with_their_address_through_the_queue() {
    let api = FakeArm::start(2).await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "azure-container-instances", "aci");
    let scenario = Scenario {
        platform: "azure-container-instances",
        worker: "aci",
        name: "aci-hello",
        spec: serde_json::json!({"image": "mcr.microsoft.com/azuredocs/aci-helloworld", "ports": [80]}),
    };
    let request = scenario.request(&env);
    let live = async |_: &str| api.count("Microsoft.ContainerInstance/containerGroups");
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let resource = running.resource.clone().expect("resource");
    assert_eq!(resource.name, group_name(&id(&request)));
    assert!(
        resource
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("20.50.1.")),
        "{resource:?}"
    );
    assert_eq!(api.created(), 1, "five deliveries, one container group");

    let bad = serde_json::json!({
        "schema_version": 1, "request_id": format!("aci-bad-{}", env.run_id),
        "operation": "provision", "platform": "azure-container-instances",
        "spec": {"image": "mcr.microsoft.com/azuredocs/aci-helloworld", "restart_policy": "Sometimes"}
    });
    env.publish(&bad).await;
    let event = events.terminal(&id(&bad)).await;
    assert_eq!(event.state, State::Error);
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::InvalidRequest);
    assert!(error.message.contains("Sometimes"), "{}", error.message);

    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn an_azure_worker_without_a_subscription_refuses_to_start() {
    let env = TestEnv::new().await;
    let output = std::process::Command::new(common::BIN)
        .args(["worker", "--platform", "azure-vm"])
        .envs(env.env())
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("AZURE_SUBSCRIPTION_ID"), "{stderr}");
}

/// A right the documented role lacks (here `instanceView/read`, which the first version
/// of the role did not grant): ARM makes the VM, then refuses the wait for its power
/// state. The request ends in `error` (`permission`, naming the action), and the worker
/// removes the VM it made instead of leaving a billed machine behind the error.
#[tokio::test]
async fn a_vm_whose_wait_is_refused_is_removed_not_left_behind() {
    let api = FakeArm::start(2).await;
    let role = provisioner_azure::fake_api::documented_assignments()[0].clone();
    let actions: Vec<&str> = role
        .actions
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "Microsoft.Compute/virtualMachines/instanceView/read")
        .collect();
    api.set_permissions(&actions, &[]);
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    start_worker(&mut env, &api, "azure-vm", "vm");
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("az-noview-{}", env.run_id),
        "operation": "provision", "platform": "azure-vm",
        "spec": {"size": "Standard_B1s",
                 "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
                 "subnet_id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/virtualNetworks/apps/subnets/default"),
                 "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBrqcMXeHK9TbFVAntUvqrIZ+DBXzIRQgxK3oLT2lVm9 ops@example"}
    });
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(event.state, State::Error);
    let error = event.error.expect("error");
    assert_eq!(error.class, ErrorClass::Permission, "{}", error.message);
    assert!(
        error.message.contains("instanceView/read")
            && error.message.contains("what it had made was removed"),
        "{}",
        error.message
    );
    assert_eq!(api.count("Microsoft.Compute/virtualMachines"), 0);
    assert_eq!(api.count("Microsoft.Network/networkInterfaces"), 0);
}
