//! The Azure platforms through the worker's ARM client (azure_core's pipeline) against
//! the fake ARM server (`provisioner_azure::fake_api`): documented paths, verbs, codes,
//! error bodies and long-running operations that end after a few polls. Test names end
//! in `_on_fake_arm`.

use base64::Engine;
use provisioner_azure::aci::group_name;
use provisioner_azure::fake_api::Method;
use provisioner_azure::fake_api::{
    FakeArm, Fault, OperationFailure, RESOURCE_GROUP, RoleAssignment, SUBSCRIPTION, arm_error,
    documented_assignments,
};
use provisioner_azure::vm::vm_name;
use provisioner_azure::{AzureSettings, ContainerInstancesPlatform, VmPlatform};
use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, RequestId, State, TeardownTarget, decode_request};

const VMS: &str = "Microsoft.Compute/virtualMachines";
const NICS: &str = "Microsoft.Network/networkInterfaces";
const GROUPS: &str = "Microsoft.ContainerInstance/containerGroups";

fn vms(api: &FakeArm) -> VmPlatform {
    VmPlatform::new(AzureSettings::for_test_server(&api.url())).expect("client")
}

fn groups(api: &FakeArm) -> ContainerInstancesPlatform {
    ContainerInstancesPlatform::new(AzureSettings::for_test_server(&api.url())).expect("client")
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn target(id: &str) -> TeardownTarget {
    TeardownTarget::Request(RequestId::new(id.to_owned()).expect("id"))
}

fn request(platform: &str, id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": platform,
        "spec": spec
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

fn subnet() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/virtualNetworks/apps/subnets/default"
    )
}

fn vm(id: &str) -> Request {
    request(
        "azure-vm",
        id,
        serde_json::json!({
            "size": "Standard_B1s",
            "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
            "subnet_id": subnet(),
            "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBrqcMXeHK9TbFVAntUvqrIZ+DBXzIRQgxK3oLT2lVm9 ops@example",
            "os_disk_size_gb": 64, "custom_data": "#cloud-config\npackages: [nginx]\n",
            "tags": {"team": "batch"}
        }),
    )
}

/// The DNS label of a request's group.
fn label(id: &str) -> String {
    format!("h-{}", id.to_ascii_lowercase())
}

fn hello(id: &str, image: &str) -> Request {
    request(
        "azure-container-instances",
        id,
        serde_json::json!({"image": image, "cpu": 0.5, "memory_gb": 1.0, "ports": [80],
                           "dns_name_label": label(id),
                           "env": {"GREETING": "hi"}, "tags": {"team": "web"}}),
    )
}

#[tokio::test]
async fn vm_platform_conforms_on_fake_arm() {
    let api = FakeArm::start(2).await;
    let platform = vms(&api);
    let probe = api.clone();
    check_platform(&platform, &vm(&unique("conf")), move |resource| {
        let probe = probe.clone();
        async move {
            let (_, name) = resource.id.split_once('/').expect("group/name");
            probe.resource(&format!("{VMS}/{name}")).is_some()
        }
    })
    .await;
    assert_eq!(api.count(VMS), 0);
    assert_eq!(
        api.count(NICS),
        0,
        "the worker's network interface went with the VM"
    );
}

#[tokio::test]
async fn a_vm_is_made_as_asked_and_waited_for_on_fake_arm() {
    let api = FakeArm::start(2).await;
    let platform = vms(&api);
    let id = unique("web");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    let name = vm_name(&id);
    assert_eq!(resource.id, format!("{RESOURCE_GROUP}/{name}"));
    assert!(
        resource
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("10.1.0.")),
        "the private address of the worker's interface: {resource:?}"
    );
    let made = api.resource(&format!("{VMS}/{name}")).expect("made");
    let props = &made["properties"];
    assert_eq!(props["hardwareProfile"]["vmSize"], "Standard_B1s");
    assert_eq!(
        props["storageProfile"]["imageReference"]["offer"],
        "ubuntu-24_04-lts"
    );
    assert_eq!(
        props["storageProfile"]["imageReference"]["version"],
        "latest"
    );
    assert_eq!(props["storageProfile"]["osDisk"]["diskSizeGB"], 64);
    assert_eq!(props["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    assert_eq!(props["osProfile"]["adminUsername"], "azureuser");
    assert_eq!(
        props["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"],
        true
    );
    assert_eq!(
        props["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"],
        "/home/azureuser/.ssh/authorized_keys"
    );
    assert_eq!(
        props["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"],
        "Delete"
    );
    let sent = api.custom_data(&name).expect("custom data sent");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(sent)
        .expect("base64");
    assert_eq!(decoded, b"#cloud-config\npackages: [nginx]\n");
    assert_eq!(made["tags"]["team"], "batch");
    assert_eq!(made["tags"]["provisioner-request-id"], id.as_str());
    assert_eq!(made["tags"]["provisioner-managed"], "true");
    assert_eq!(made["location"], "westeurope");
    let nic = api
        .resource(&format!("{NICS}/{name}-nic"))
        .expect("interface");
    assert_eq!(
        nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"],
        subnet()
    );
    // Both PUTs were followed by polls of their Azure-AsyncOperation.
    let log = api.log();
    assert!(
        log.iter().filter(|l| l.contains("/operations/op-")).count() >= 6,
        "{log:#?}"
    );
    // A second provision adopts the VM without another PUT.
    let puts = |api: &FakeArm| api.log().iter().filter(|l| l.starts_with("PUT")).count();
    let before = puts(&api);
    let again = platform.provision(&vm(&id)).await.expect("again");
    assert_eq!(again, resource);
    assert_eq!(puts(&api), before, "no PUT over a finished VM");
    // Teardown polls the delete's operation; the interface goes with the VM.
    assert!(
        platform
            .teardown(&target(&id))
            .await
            .expect("teardown")
            .is_some()
    );
    assert_eq!(api.count(NICS), 0);
    assert_eq!(api.count(VMS), 0);
}

#[tokio::test]
async fn an_interface_left_by_a_failed_provision_is_deleted_by_teardown_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    let id = unique("half");
    api.inject(Fault {
        method: Method::PUT,
        path_contains: "/virtualMachines/".into(),
        code: 400,
        body: arm_error(
            "InvalidParameter",
            "The value of parameter imageReference.sku is invalid.",
        ),
        after_effect: false,
        retry_after: None,
    });
    let err = platform.provision(&vm(&id)).await.expect_err("refused");
    assert_eq!(err.class, ErrorClass::InvalidRequest);
    assert_eq!(
        api.count(NICS),
        1,
        "the interface was made before the VM was refused"
    );
    assert!(
        platform
            .teardown(&target(&id))
            .await
            .expect("teardown")
            .is_none(),
        "no VM"
    );
    assert_eq!(api.count(NICS), 0);
    // The interface delete answered 202 with a Location, polled until it said done.
    let polls = api
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /nic-delete/"))
        .count();
    assert!(polls >= 2, "{polls} polls of the Location URL");
}

#[tokio::test]
async fn a_given_network_interface_is_attached_and_left_on_fake_arm() {
    let api = FakeArm::start(1).await;
    api.put_foreign(
        &format!("{NICS}/shared-nic"),
        serde_json::json!({"location": "westeurope", "properties": {"provisioningState": "Succeeded",
            "ipConfigurations": [{"name": "ipconfig1", "properties": {"privateIPAddress": "10.9.9.9", "subnet": {"id": subnet()}}}]}}),
    );
    let platform = vms(&api);
    let id = unique("nic");
    let mut req = vm(&id);
    let spec = req.spec.as_mut().expect("spec");
    spec.remove("subnet_id");
    spec.insert(
        "network_interface_id".into(),
        serde_json::json!(format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{NICS}/shared-nic")),
    );
    let resource = platform.provision(&req).await.expect("provisioned");
    assert_eq!(resource.address.as_deref(), Some("10.9.9.9"));
    let made = api
        .resource(&format!("{VMS}/{}", vm_name(&id)))
        .expect("made");
    assert_eq!(
        made["properties"]["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"],
        "Detach"
    );
    platform.teardown(&target(&id)).await.expect("teardown");
    assert!(
        api.resource(&format!("{NICS}/shared-nic")).is_some(),
        "a given interface stays"
    );
}

#[tokio::test]
async fn a_vm_of_someone_else_is_never_updated_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    let name = vm_name("taken");
    api.put_foreign(
        &format!("{VMS}/{name}"),
        serde_json::json!({"location": "westeurope", "tags": {"owner": "someone"},
                           "properties": {"provisioningState": "Succeeded"}}),
    );
    let err = platform.provision(&vm("taken")).await.expect_err("foreign");
    assert_eq!(err.class, ErrorClass::Conflict, "{err}");
    assert!(
        !api.log().iter().any(|l| l.starts_with("PUT")),
        "nothing was PUT"
    );
    let err = platform
        .teardown(&TeardownTarget::Resource(format!(
            "{RESOURCE_GROUP}/{name}"
        )))
        .await
        .expect_err("not ours");
    assert_eq!(err.class, ErrorClass::Conflict);
    let err = platform
        .teardown(&TeardownTarget::Resource(format!("elsewhere/{name}")))
        .await
        .expect_err("another group");
    assert_eq!(err.class, ErrorClass::InvalidRequest);
    assert!(api.resource(&format!("{VMS}/{name}")).is_some());
}

#[tokio::test]
async fn failed_operations_are_classified_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    api.fail_next_operation(OperationFailure {
        kind: "vm-create".into(),
        code: "AllocationFailed".into(),
        message: "Allocation failed. We do not have sufficient capacity for the requested VM size in this region.".into(),
    });
    let id = unique("stockout");
    let err = platform.provision(&vm(&id)).await.expect_err("stockout");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Capacity, true),
        "{err}"
    );
    // The runtime's retry PUTs again: ARM retries a failed VM, and this time it works.
    let resource = platform.provision(&vm(&id)).await.expect("retried");
    assert_eq!(api.count(VMS), 1);
    assert!(resource.address.is_some());

    api.fail_next_operation(OperationFailure {
        kind: "vm-create".into(),
        code: "OperationNotAllowed".into(),
        message: "Operation could not be completed as it results in exceeding approved standardBSFamily Cores quota.".into(),
    });
    let err = platform
        .provision(&vm(&unique("quota")))
        .await
        .expect_err("quota");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Quota, false),
        "{err}"
    );
}

#[tokio::test]
async fn arm_errors_are_classified_and_retried_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    // One 429 with Retry-After: azure_core's pipeline waits and resends the PUT.
    api.inject(Fault {
        method: Method::PUT,
        path_contains: "/virtualMachines/".into(),
        code: 429,
        body: arm_error("TooManyRequests", "The request is being throttled."),
        after_effect: false,
        retry_after: Some(1),
    });
    platform
        .provision(&vm(&unique("busy")))
        .await
        .expect("retried after the 429");
    // A lost answer: the PUT took effect, the 500 made the pipeline resend it, and the
    // second PUT updated the same VM.
    api.inject(Fault {
        method: Method::PUT,
        path_contains: "/virtualMachines/".into(),
        code: 500,
        body: arm_error("InternalServerError", "An internal server error occurred."),
        after_effect: true,
        retry_after: Some(0),
    });
    platform
        .provision(&vm(&unique("lost")))
        .await
        .expect("resent");
    assert_eq!(api.count(VMS), 2);

    // Throttled past the pipeline's retries, and errors no retry fixes.
    for _ in 0..5 {
        api.inject(Fault {
            method: Method::PUT,
            path_contains: "/virtualMachines/".into(),
            code: 429,
            body: arm_error("TooManyRequests", "The request is being throttled."),
            after_effect: false,
            retry_after: Some(0),
        });
    }
    let err = platform
        .provision(&vm(&unique("throttled")))
        .await
        .expect_err("429");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Throttled, true),
        "{err}"
    );
    let cases = [
        (
            403,
            "AuthorizationFailed",
            "The client 'x' does not have authorization to perform action 'Microsoft.Compute/virtualMachines/write'",
            ErrorClass::Permission,
        ),
        (
            400,
            "InvalidParameter",
            "The value of parameter imageReference.sku is invalid.",
            ErrorClass::InvalidRequest,
        ),
        (
            409,
            "SkuNotAvailable",
            "The requested size for resource is currently not available in location 'westeurope'",
            ErrorClass::Capacity,
        ),
    ];
    for (code, arm_code, message, class) in cases {
        api.inject(Fault {
            method: Method::PUT,
            path_contains: "/virtualMachines/".into(),
            code,
            body: arm_error(arm_code, message),
            after_effect: false,
            retry_after: None,
        });
        let err = platform
            .provision(&vm(&unique("err")))
            .await
            .expect_err("a fault");
        assert_eq!(err.class, class, "{code} {arm_code}: {err}");
        assert!(err.message.contains(arm_code), "{err}");
    }
    // A resource group that does not exist: with the documented rights (on the worker's
    // own group), ARM refuses before it looks, as for any group the identity holds no
    // role in; with a role on the whole subscription, it says the group is not there.
    // Either way a configuration error, said as such.
    let mut settings = AzureSettings::for_test_server(&api.url());
    settings.resource_group = "missing".into();
    let elsewhere = VmPlatform::new(settings).expect("client");
    let err = elsewhere
        .provision(&vm(&unique("rg")))
        .await
        .expect_err("no rights there");
    assert_eq!(err.class, ErrorClass::Permission, "{err}");
    assert!(err.message.contains("AuthorizationFailed"), "{err}");
    api.set_assignments(vec![RoleAssignment::new(
        format!("/subscriptions/{SUBSCRIPTION}"),
        &["*"],
        &[],
    )]);
    let err = elsewhere
        .provision(&vm(&unique("rg")))
        .await
        .expect_err("no group");
    assert_eq!(err.class, ErrorClass::NotFound, "{err}");
    assert!(err.message.contains("ResourceGroupNotFound"), "{err}");
}

#[tokio::test]
async fn stop_start_restart_and_describe_follow_the_vm_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    let id = unique("power");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    let stopped = platform.stop(&target(&id)).await.expect("deallocated");
    assert_eq!(stopped.id, resource.id);
    let described = platform
        .describe(&target(&id))
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Stopped);
    platform.stop(&target(&id)).await.expect("twice");
    platform.start(&target(&id)).await.expect("started");
    platform.reboot(&target(&id)).await.expect("restarted");
    let described = platform
        .describe(&target(&id))
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Running);
    assert!(api.log().iter().any(|l| l.contains("/deallocate?")));
    assert_eq!(platform.list().await.expect("list").len(), 1);
    platform.teardown(&target(&id)).await.expect("gone");
    let err = platform
        .start(&target(&id))
        .await
        .expect_err("nothing to start");
    assert_eq!(err.class, ErrorClass::NotFound);
    assert!(platform.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn owned_finds_the_provisioners_vms_with_their_request_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = vms(&api);
    let id = unique("owned");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    api.put_foreign(
        &format!("{VMS}/{}", vm_name("someone-else")),
        serde_json::json!({"location": "westeurope", "tags": {"owner": "someone"},
                           "properties": {"provisioningState": "Succeeded"}}),
    );
    let owned = platform.owned().await.expect("owned");
    assert_eq!(owned.len(), 1, "only the provisioner's VM: {owned:?}");
    assert_eq!(owned[0].request_id.as_str(), id);
    assert_eq!(owned[0].resource.id, resource.id);
    assert!(owned[0].created.is_some(), "{owned:?}");
}

#[tokio::test]
async fn container_instances_platform_conforms_on_fake_arm() {
    let api = FakeArm::start(3).await;
    let platform = groups(&api);
    let probe = api.clone();
    check_platform(
        &platform,
        &hello(
            &unique("conf"),
            "mcr.microsoft.com/azuredocs/aci-helloworld",
        ),
        move |resource| {
            let probe = probe.clone();
            async move {
                let (_, name) = resource.id.split_once('/').expect("group/name");
                probe.resource(&format!("{GROUPS}/{name}")).is_some()
            }
        },
    )
    .await;
    assert_eq!(api.created(), 1, "one group for two provisions");
}

#[tokio::test]
async fn a_container_group_runs_with_its_address_on_fake_arm() {
    let api = FakeArm::start(3).await;
    let platform = groups(&api);
    let id = unique("hello");
    let resource = platform
        .provision(&hello(&id, "mcr.microsoft.com/azuredocs/aci-helloworld"))
        .await
        .expect("running");
    let name = group_name(&id);
    let label = label(&id);
    assert_eq!(resource.id, format!("{RESOURCE_GROUP}/{name}"));
    assert_eq!(
        resource.address.as_deref(),
        Some(format!("{label}.westeurope.azurecontainer.io").as_str())
    );
    assert_eq!(resource.endpoints.len(), 1);
    assert_eq!(resource.endpoints[0].port, 80);
    let group = api.resource(&format!("{GROUPS}/{name}")).expect("made");
    let container = &group["properties"]["containers"][0]["properties"];
    assert_eq!(
        container["image"],
        "mcr.microsoft.com/azuredocs/aci-helloworld"
    );
    assert_eq!(container["resources"]["requests"]["cpu"], 0.5);
    assert_eq!(container["resources"]["requests"]["memoryInGB"], 1.0);
    assert_eq!(container["environmentVariables"][0]["name"], "GREETING");
    assert_eq!(group["properties"]["ipAddress"]["type"], "Public");
    assert_eq!(group["properties"]["restartPolicy"], "Always");
    assert_eq!(group["tags"]["provisioner-request-id"], id.as_str());

    platform.stop(&target(&id)).await.expect("stopped");
    let described = platform
        .describe(&target(&id))
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Stopped);
    platform.start(&target(&id)).await.expect("started");
    platform.reboot(&target(&id)).await.expect("restarted");
    let described = platform
        .describe(&target(&id))
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Running);
}

#[tokio::test]
async fn container_group_failures_are_classified_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = groups(&api);
    let id = unique("bad");
    let err = platform
        .provision(&hello(&id, "example.azurecr.io/does-not-exist:1"))
        .await
        .expect_err("no such image");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::InvalidRequest, false),
        "{err}"
    );
    assert!(err.message.contains("Failed to pull image"), "{err}");
    assert_eq!(
        platform.list().await.expect("list").len(),
        1,
        "left for teardown"
    );
    assert!(
        platform
            .teardown(&target(&id))
            .await
            .expect("teardown")
            .is_some()
    );
    assert_eq!(api.count(GROUPS), 0);

    api.fail_next_operation(OperationFailure {
        kind: "aci-create".into(),
        code: "ServiceUnavailable".into(),
        message: "The requested resource is not available in the location 'westeurope' at this moment. Please retry with a different resource request or in another location.".into(),
    });
    let err = platform
        .provision(&hello(
            &unique("full"),
            "mcr.microsoft.com/azuredocs/aci-helloworld",
        ))
        .await
        .expect_err("no capacity");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Capacity, true),
        "{err}"
    );

    let name = group_name("taken");
    api.put_foreign(
        &format!("{GROUPS}/{name}"),
        // As ARM answers any group: ACI requires its osType and at least one container.
        serde_json::json!({"location": "westeurope", "tags": {}, "properties": {
            "provisioningState": "Succeeded", "osType": "Linux",
            "containers": [{"name": "web", "properties": {"image": "nginx",
                "resources": {"requests": {"cpu": 1.0, "memoryInGB": 1.5}}}}]}}),
    );
    let err = platform
        .provision(&hello(
            "taken",
            "mcr.microsoft.com/azuredocs/aci-helloworld",
        ))
        .await
        .expect_err("foreign");
    assert_eq!(err.class, ErrorClass::Conflict, "{err}");
}

#[tokio::test]
async fn request_ids_with_runs_of_symbols_still_name_a_valid_container_group_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = groups(&api);
    // ARM refuses container group names with consecutive hyphens, which a plain
    // symbol-to-hyphen mapping made of these ids.
    for id in [unique("job--1"), unique("a._b"), unique("x__--..y")] {
        let request = request(
            "azure-container-instances",
            &id,
            serde_json::json!({"image": "mcr.microsoft.com/azuredocs/aci-helloworld"}),
        );
        let resource = platform.provision(&request).await.expect("provisioned");
        assert!(!resource.id.contains("--"), "{resource:?}");
    }
}

#[tokio::test]
async fn owned_finds_the_provisioners_container_groups_with_their_request_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let platform = groups(&api);
    let id = unique("owned");
    let resource = platform
        .provision(&hello(&id, "mcr.microsoft.com/azuredocs/aci-helloworld"))
        .await
        .expect("running");
    api.put_foreign(
        &format!("{GROUPS}/{}", group_name("someone-else")),
        serde_json::json!({"location": "westeurope", "tags": {}, "properties": {
            "provisioningState": "Succeeded", "osType": "Linux",
            "containers": [{"name": "web", "properties": {"image": "nginx",
                "resources": {"requests": {"cpu": 1.0, "memoryInGB": 1.5}}}}]}}),
    );
    let owned = platform.owned().await.expect("owned");
    assert_eq!(owned.len(), 1, "only the provisioner's group: {owned:?}");
    assert_eq!(owned[0].request_id.as_str(), id);
    assert_eq!(owned[0].resource.id, resource.id);
    assert!(owned[0].created.is_some(), "{owned:?}");
}

#[tokio::test]
async fn vcpus_quotas_count_a_vm_sizes_cores_and_a_groups_cpu_on_fake_arm() {
    let api = FakeArm::start(2).await;
    let platform = vms(&api);
    let vcpus = |cost: provisioner_core::QuotaCost| cost.get(provisioner_core::VCPUS).copied();
    let cost = platform.quota_cost(&vm(&unique("q"))).await.expect("cost");
    assert_eq!(vcpus(cost), Some(1), "Standard_B1s has one core");
    let sized = |size: &str| {
        let mut request = vm(&unique("q"));
        if let Some(spec) = request.spec.as_mut() {
            spec.insert("size".into(), size.into());
        }
        request
    };
    let bigger = sized("standard_d8s_v5");
    let cost = platform.quota_cost(&bigger).await.expect("cost");
    assert_eq!(vcpus(cost), Some(8), "sizes match whatever their case");
    let unknown = sized("Standard_Imaginary_v9");
    let refused = platform
        .quota_cost(&unknown)
        .await
        .expect_err("an unknown size");
    assert_eq!(refused.class, ErrorClass::InvalidRequest);
    assert!(
        refused.message.contains("Standard_Imaginary_v9"),
        "{}",
        refused.message
    );
    let listed = api.log().iter().filter(|l| l.contains("/vmSizes")).count();
    assert_eq!(listed, 1, "a location's sizes are listed once");

    let groups = groups(&api);
    let half = hello(&unique("q"), "mcr.microsoft.com/azuredocs/aci-helloworld");
    let cost = groups.quota_cost(&half).await.expect("cost");
    assert_eq!(vcpus(cost), Some(1), "half a core holds one vCPU");
}

/// The workers' setup checks pass under exactly the documented role assignments (the
/// fake's default, which every other test here runs under too), and name what is
/// missing when a right is taken away: the group's by the permissions API, the
/// subscription's by reading the VM sizes.
#[tokio::test]
async fn the_setup_checks_pass_under_the_documented_roles_and_name_what_is_missing_on_fake_arm() {
    use provisioner_core::Outcome;
    let api = FakeArm::start(1).await;
    for findings in [vms(&api).preflight().await, groups(&api).preflight().await] {
        for finding in &findings {
            assert_ne!(finding.outcome, Outcome::Fail, "{finding:?}");
        }
    }
    // No subscription role: the VM sizes are refused, and said so.
    api.set_assignments(documented_assignments().into_iter().take(1).collect());
    let findings = vms(&api).preflight().await;
    assert!(
        findings.iter().any(|f| f.outcome == Outcome::Fail
            && f.check.contains("Microsoft.Compute/locations/vmSizes/read")),
        "{findings:?}"
    );
    let mut with_tenant = vm(&unique("sizes"));
    with_tenant.tenant = Some("team-a".into());
    let refused = vms(&api)
        .quota_cost(&with_tenant)
        .await
        .expect_err("the sizes are the subscription's");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(refused.message.contains("AuthorizationFailed"), "{refused}");
}

/// A right the role lacks is refused at the call that needs it, before it has any
/// effect, and what was made before is not left: without `instanceView/read` the VM is
/// made and its wait refused (`permission`), and the teardown the runtime then sends
/// removes it; without the subnet's join nothing is made at all.
#[tokio::test]
async fn a_missing_right_is_refused_and_leaves_nothing_behind_on_fake_arm() {
    let api = FakeArm::start(1).await;
    let role = &documented_assignments()[0];
    let without = |action: &str| -> Vec<&str> {
        role.actions
            .iter()
            .map(String::as_str)
            .filter(|a| *a != action)
            .collect()
    };
    api.set_permissions(
        &without("Microsoft.Compute/virtualMachines/instanceView/read"),
        &[],
    );
    let platform = vms(&api);
    let id = unique("noview");
    let refused = platform
        .provision(&vm(&id))
        .await
        .expect_err("the wait is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(!refused.retryable, "{refused:?}");
    assert!(
        refused.message.contains("instanceView/read"),
        "names the action: {refused}"
    );
    assert_eq!(api.count(VMS), 1, "made before the wait was refused");
    assert!(
        platform
            .teardown(&target(&id))
            .await
            .expect("removed")
            .is_some(),
        "the removal the runtime sends after a failed provision needs no instance view"
    );
    assert_eq!(api.count(VMS), 0);
    assert_eq!(api.count(NICS), 0);

    // A subnet in a virtual network the role is not assigned on.
    api.set_assignments(documented_assignments());
    let mut elsewhere = vm(&unique("nojoin"));
    elsewhere.spec.as_mut().expect("spec").insert("subnet_id".into(), serde_json::json!(format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/network/providers/Microsoft.Network/virtualNetworks/hub/subnets/default"
    )));
    let refused = platform
        .provision(&elsewhere)
        .await
        .expect_err("joining the subnet is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(refused.message.contains("subnets/join/action"), "{refused}");
    assert_eq!(api.count(VMS) + api.count(NICS), 0, "nothing made");
    // Assigned on that network, as docs/azure.md says: it goes.
    let mut assignments = documented_assignments();
    assignments.push(RoleAssignment::new(
        format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/network/providers/Microsoft.Network/virtualNetworks/hub"),
        &["Microsoft.Network/virtualNetworks/subnets/join/action"],
        &[],
    ));
    api.set_assignments(assignments);
    platform.provision(&elsewhere).await.expect("provisioned");
    platform
        .teardown(&target(elsewhere.request_id.as_str()))
        .await
        .expect("torn down");
}

/// Container Instances' cores quota: a group that would pass it fails its create with
/// ACI's `ServiceUnavailable` naming the quota; classed `quota` and not retried (waiting
/// does not raise a quota), where the code alone read as a passing outage.
#[tokio::test]
async fn a_container_group_past_the_cores_quota_is_refused_as_quota_on_fake_arm() {
    let api = FakeArm::start(1).await;
    api.set_aci_cores_quota("westeurope", 1.0);
    let platform = groups(&api);
    for _ in 0..2 {
        platform
            .provision(&hello(
                &unique("fits"),
                "mcr.microsoft.com/azuredocs/aci-helloworld",
            ))
            .await
            .expect("half a core each: two fit");
    }
    let id = unique("over");
    let refused = platform
        .provision(&hello(&id, "mcr.microsoft.com/azuredocs/aci-helloworld"))
        .await
        .expect_err("past the quota");
    assert_eq!(refused.class, ErrorClass::Quota, "{refused}");
    assert!(!refused.retryable, "{refused:?}");
    assert!(refused.message.contains("StandardCores"), "{refused}");
    platform
        .teardown(&target(&id))
        .await
        .expect("what the failed create left is removed");
}
