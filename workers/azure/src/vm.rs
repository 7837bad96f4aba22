//! The `azure-vm` platform: one Linux Virtual Machine per provision request, by ARM
//! `PUT` of `Microsoft.Compute/virtualMachines` (and, when the spec names a subnet, of
//! the `Microsoft.Network/networkInterfaces` it uses).
//!
//! Names derive from the request id, so every attempt addresses the same resources. ARM's
//! `PUT` creates or updates, so before the first `PUT` the worker reads the name: a VM
//! tagged with another request id is a conflict and is never updated; its own VM is
//! adopted. The OS disk and the worker's network interface are created with
//! `deleteOption: Delete`, so deleting the VM deletes them; the worker also deletes its
//! interface itself, in case the VM was never made. `running` means provisioning
//! succeeded and the instance view's power state is `PowerState/running`.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use provisioner_core::backoff::Backoff;
use provisioner_core::names::derived_name;
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::azure::AzureVmSpec;
use provisioner_events::{
    ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State, TeardownTarget,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use crate::arm::{ArmClient, provisioning_state};
use crate::{
    AzureSettings, MANAGED_TAG, REQUEST_ID_TAG, SystemData, Tags, check_owner, parse_rfc3339,
    tagged_owner, target_name,
};

pub const COMPUTE_API_VERSION: &str = "2024-07-01";
pub const NETWORK_API_VERSION: &str = "2024-05-01";
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(900);

/// The VM name of a request (at most 58 characters; Linux VM names may have 64).
pub fn vm_name(request_id: &str) -> String {
    derived_name(request_id, 44)
}

/// A virtual machine as ARM answers it:
/// <https://learn.microsoft.com/rest/api/compute/virtual-machines/get>
#[derive(Debug, Deserialize)]
struct VirtualMachine {
    name: String,
    #[serde(default)]
    tags: Tags,
    // Only where Compute returns ARM's system metadata.
    #[serde(rename = "systemData")]
    system_data: Option<SystemData>,
    properties: VmProperties,
}

/// The `properties` of a [`VirtualMachine`] the worker reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmProperties {
    provisioning_state: Option<String>,
    network_profile: Option<NetworkProfile>,
    // Since api-version 2021-11-01.
    time_created: Option<String>,
}

/// A VM's `networkProfile`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkProfile {
    // A VM whose interfaces ARM makes from `networkInterfaceConfigurations` references
    // none here.
    #[serde(default)]
    network_interfaces: Vec<NetworkInterfaceReference>,
}

/// One of `networkProfile.networkInterfaces`: the interface's resource id.
#[derive(Debug, Deserialize)]
struct NetworkInterfaceReference {
    id: String,
}

impl VirtualMachine {
    fn provisioning_state(&self) -> &str {
        provisioning_state(self.properties.provisioning_state.as_deref())
    }

    /// When the VM was made: ARM's `systemData.createdAt` where it is there, else
    /// Compute's own `timeCreated`.
    fn created(&self) -> Option<std::time::SystemTime> {
        self.system_data
            .as_ref()
            .and_then(SystemData::created)
            .or_else(|| {
                self.properties
                    .time_created
                    .as_deref()
                    .and_then(parse_rfc3339)
            })
    }

    /// The interface the address is read from: the worker makes VMs with one.
    fn first_interface(&self) -> Option<&str> {
        let profile = self.properties.network_profile.as_ref()?;
        Some(profile.network_interfaces.first()?.id.as_str())
    }
}

/// A VM's instance view:
/// <https://learn.microsoft.com/rest/api/compute/virtual-machines/instance-view>
#[derive(Debug, Deserialize)]
struct InstanceView {
    // Absent while the VM reports no statuses yet: then it has no power state either.
    #[serde(default)]
    statuses: Vec<InstanceViewStatus>,
}

/// One of an instance view's `statuses` (`ProvisioningState/succeeded`, `PowerState/running`).
#[derive(Debug, Deserialize)]
struct InstanceViewStatus {
    code: Option<String>,
}

impl InstanceView {
    /// The power state (`PowerState/running` → `running`).
    fn power_state(&self) -> Option<&str> {
        self.statuses
            .iter()
            .filter_map(|s| s.code.as_deref())
            .find_map(|code| code.strip_prefix("PowerState/"))
    }
}

/// A network interface as ARM answers it:
/// <https://learn.microsoft.com/rest/api/virtualnetwork/network-interfaces/get>
#[derive(Debug, Deserialize)]
struct NetworkInterface {
    #[serde(default)]
    tags: Tags,
    properties: NicProperties,
}

/// The `properties` of a [`NetworkInterface`] the worker reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NicProperties {
    provisioning_state: Option<String>,
    ip_configurations: Vec<IpConfiguration>,
}

/// One of an interface's `ipConfigurations`.
#[derive(Debug, Deserialize)]
struct IpConfiguration {
    properties: IpConfigurationProperties,
}

/// The `properties` of an [`IpConfiguration`]: its private address.
#[derive(Debug, Deserialize)]
struct IpConfigurationProperties {
    // Not there until the address is allocated.
    #[serde(rename = "privateIPAddress")]
    private_ip_address: Option<String>,
}

impl NetworkInterface {
    fn provisioning_state(&self) -> &str {
        provisioning_state(self.properties.provisioning_state.as_deref())
    }

    fn private_address(&self) -> Option<&str> {
        self.properties
            .ip_configurations
            .first()?
            .properties
            .private_ip_address
            .as_deref()
    }
}

fn state_of(vm: &VirtualMachine, power: Option<&str>) -> State {
    match vm.provisioning_state() {
        "Failed" => return State::Error,
        "Deleting" => return State::Stopping,
        _ => {}
    }
    match power {
        Some("running") => State::Running,
        Some("stopping" | "deallocating") => State::Stopping,
        Some("stopped" | "deallocated") => State::Stopped,
        _ => State::Starting,
    }
}

/// The Azure Virtual Machines [`Platform`].
#[derive(Debug, Clone)]
pub struct VmPlatform {
    arm: ArmClient,
    /// vCPUs of the VM sizes of each location, looked up once (tenants' `vcpus` quotas).
    sizes: provisioner_core::cache::LookupCache<String, std::collections::HashMap<String, u64>>,
}

/// A VM size of a location, as `vmSizes` lists it:
/// <https://learn.microsoft.com/rest/api/compute/virtual-machine-sizes/list>
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmSize {
    name: String,
    number_of_cores: u64,
}

impl VmPlatform {
    pub fn new(settings: AzureSettings) -> Result<Self, SetupError> {
        Ok(VmPlatform {
            arm: ArmClient::new(settings)?,
            sizes: provisioner_core::cache::LookupCache::default(),
        })
    }

    /// The vCPUs of `size` in `location`, from the location's list of sizes (read once).
    async fn size_cores(&self, location: &str, size: &str) -> Result<u64, PlatformError> {
        let sizes = self
            .sizes
            .get_or_lookup(&location.to_ascii_lowercase(), || async {
                let path = format!(
                    "/subscriptions/{}/providers/Microsoft.Compute/locations/{location}/vmSizes",
                    self.arm.settings().subscription_id
                );
                let listed: Vec<VmSize> = self
                    .arm
                    .list_at(
                        &path,
                        COMPUTE_API_VERSION,
                        &format!("listing the VM sizes of {location}"),
                    )
                    .await?;
                Ok::<_, PlatformError>(
                    listed
                        .into_iter()
                        .map(|s| (s.name.to_ascii_lowercase(), s.number_of_cores))
                        .collect(),
                )
            })
            .await?;
        sizes
            .get(&size.to_ascii_lowercase())
            .copied()
            .ok_or_else(|| {
                PlatformError::invalid(format!("VM size {size} is not offered in {location}"))
            })
    }

    fn vm_id(&self, name: &str) -> String {
        self.arm
            .resource_id(&format!("Microsoft.Compute/virtualMachines/{name}"))
    }

    fn nic_id(&self, name: &str) -> String {
        self.arm
            .resource_id(&format!("Microsoft.Network/networkInterfaces/{name}-nic"))
    }

    fn tags(request: &Request, extra: &std::collections::BTreeMap<String, String>) -> Value {
        let mut tags = serde_json::Map::new();
        for (key, value) in extra {
            tags.insert(key.clone(), json!(value));
        }
        tags.insert(MANAGED_TAG.into(), json!("true"));
        tags.insert(REQUEST_ID_TAG.into(), json!(request.request_id.as_str()));
        Value::Object(tags)
    }

    fn vm_body(
        request: &Request,
        spec: &AzureVmSpec,
        name: &str,
        location: &str,
        nic_id: &str,
        nic_is_ours: bool,
    ) -> Value {
        let user = spec.admin_username.as_deref().unwrap_or("azureuser");
        let image = match &spec.image.id {
            Some(id) => json!({"id": id}),
            None => json!({
                "publisher": spec.image.publisher, "offer": spec.image.offer,
                "sku": spec.image.sku,
                "version": spec.image.version.as_deref().unwrap_or("latest"),
            }),
        };
        let mut os_disk = json!({"createOption": "FromImage", "deleteOption": "Delete",
                                 "managedDisk": {"storageAccountType": "StandardSSD_LRS"}});
        if let Some(size) = spec.os_disk_size_gb {
            os_disk["diskSizeGB"] = json!(size);
        }
        let mut os_profile = json!({
            "computerName": name, "adminUsername": user,
            "linuxConfiguration": {"disablePasswordAuthentication": true, "ssh": {"publicKeys": [
                {"path": format!("/home/{user}/.ssh/authorized_keys"), "keyData": spec.ssh_public_key.trim()}
            ]}}
        });
        if let Some(data) = &spec.custom_data {
            os_profile["customData"] =
                json!(base64::engine::general_purpose::STANDARD.encode(data.as_bytes()));
        }
        json!({
            "location": location,
            "tags": Self::tags(request, &spec.tags),
            "properties": {
                "hardwareProfile": {"vmSize": spec.size},
                "storageProfile": {"imageReference": image, "osDisk": os_disk},
                "osProfile": os_profile,
                "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {
                    "primary": true,
                    // The worker's own interface goes with the VM; one it was given stays.
                    "deleteOption": if nic_is_ours { "Delete" } else { "Detach" }
                }}]}
            }
        })
    }

    /// Makes the request's network interface in `subnet_id`, or adopts the one made before.
    async fn ensure_nic(
        &self,
        request: &Request,
        name: &str,
        location: &str,
        subnet_id: &str,
        timeout: Duration,
    ) -> Result<String, PlatformError> {
        let nic_id = self.nic_id(name);
        let doing = format!("creating network interface {name}-nic");
        if let Some(existing) = self
            .arm
            .get::<NetworkInterface>(&nic_id, NETWORK_API_VERSION, &doing)
            .await?
        {
            if existing.tags.get(REQUEST_ID_TAG) != Some(request.request_id.as_str()) {
                return Err(PlatformError::permanent(
                    ErrorClass::Conflict,
                    format!(
                        "network interface {name}-nic exists and was not made for request {}; it was left alone",
                        request.request_id
                    ),
                ));
            }
            if existing.provisioning_state() == "Succeeded" {
                return Ok(nic_id);
            }
        }
        let body = json!({
            "location": location,
            "tags": Self::tags(request, &Default::default()),
            "properties": {"ipConfigurations": [{"name": "ipconfig1", "properties": {
                "subnet": {"id": subnet_id}, "privateIPAllocationMethod": "Dynamic", "primary": true
            }}]}
        });
        let accepted = self
            .arm
            .put(&nic_id, NETWORK_API_VERSION, &body, &doing)
            .await?;
        self.arm.wait(&accepted.poll, timeout, &doing).await?;
        Ok(nic_id)
    }

    /// The VM's power state; `None` while it has none, or while ARM does not show the VM
    /// yet (its reads may lag its writes for a moment).
    async fn power_state(&self, vm_id: &str, doing: &str) -> Result<Option<String>, PlatformError> {
        let view = self
            .arm
            .get::<InstanceView>(&format!("{vm_id}/instanceView"), COMPUTE_API_VERSION, doing)
            .await?;
        Ok(view
            .as_ref()
            .and_then(InstanceView::power_state)
            .map(str::to_owned))
    }

    /// Polls the instance view until the power state is one of `wanted`.
    async fn wait_power(
        &self,
        vm_id: &str,
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<(), PlatformError> {
        let doing = format!(
            "waiting for VM {}",
            vm_id.rsplit('/').next().unwrap_or(vm_id)
        );
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let power = self.power_state(vm_id, &doing).await?;
            if power.as_deref().is_some_and(|p| wanted.contains(&p)) {
                return Ok(());
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "{doing}: power state is {} after {} s, not {wanted:?}",
                        power.as_deref().unwrap_or("unknown"),
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    /// The event's resource: `<resource group>/<name>` and the primary private address.
    async fn resource(&self, vm: &VirtualMachine) -> Result<Resource, PlatformError> {
        let name = vm.name.clone();
        let address = match vm.first_interface() {
            None => None,
            Some(nic_id) => self
                .arm
                .get::<NetworkInterface>(
                    nic_id,
                    NETWORK_API_VERSION,
                    &format!("reading network interface of {name}"),
                )
                .await?
                .and_then(|nic| nic.private_address().map(str::to_owned)),
        };
        Ok(Resource {
            id: format!("{}/{name}", self.arm.settings().resource_group),
            name,
            address,
            endpoints: Vec::new(),
            members: Vec::new(),
        })
    }

    /// Every VM of the resource group that carries the provisioner's managed tag.
    async fn managed_vms(&self) -> Result<Vec<VirtualMachine>, PlatformError> {
        let all = self
            .arm
            .list::<VirtualMachine>(
                "Microsoft.Compute/virtualMachines",
                COMPUTE_API_VERSION,
                "listing the provisioner's VMs",
            )
            .await?;
        Ok(all
            .into_iter()
            .filter(|vm| vm.tags.get(MANAGED_TAG) == Some("true"))
            .collect())
    }

    /// The resource of a listed VM. Its address is a courtesy there: one unreadable
    /// interface does not fail the whole list.
    async fn listed(&self, vm: &VirtualMachine) -> Resource {
        match self.resource(vm).await {
            Ok(resource) => resource,
            Err(_) => Resource {
                id: format!("{}/{}", self.arm.settings().resource_group, vm.name),
                name: vm.name.clone(),
                address: None,
                endpoints: Vec::new(),
                members: Vec::new(),
            },
        }
    }

    /// The VM a target names, if it exists; one the provisioner did not make is a
    /// conflict, never touched.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<VirtualMachine>, PlatformError> {
        let group = &self.arm.settings().resource_group;
        let (name, request_id) = target_name(group, target, vm_name, "vm")?;
        let doing = format!("reading VM {name}");
        let found = self
            .arm
            .get::<VirtualMachine>(&self.vm_id(&name), COMPUTE_API_VERSION, &doing)
            .await?;
        if let Some(vm) = &found {
            check_owner(&vm.tags, request_id, &format!("VM {name}"), target)?;
        }
        Ok(found)
    }

    async fn power(
        &self,
        target: &TeardownTarget,
        action: &str,
        wanted: &[&str],
    ) -> Result<Resource, PlatformError> {
        let vm = self.find(target).await?.ok_or_else(|| {
            PlatformError::permanent(ErrorClass::NotFound, format!("{target} has no VM"))
        })?;
        let name = vm.name.clone();
        let vm_id = self.vm_id(&name);
        let doing = format!("{action} of VM {name}");
        let accepted = self
            .arm
            .post(&vm_id, action, COMPUTE_API_VERSION, &doing)
            .await?;
        self.arm
            .wait(&accepted.poll, OPERATION_TIMEOUT, &doing)
            .await?;
        self.wait_power(&vm_id, wanted, OPERATION_TIMEOUT).await?;
        info!(vm = %name, action, "done");
        self.resource(&vm).await
    }
}

#[async_trait]
impl Platform for VmPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::AzureVm
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        crate::permissions::VM_PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        use crate::permissions::{
            RESOURCE_GROUP, SUBNET, SUBSCRIPTION, VM_PERMISSIONS, actions_at,
        };
        let mut findings = self
            .arm
            .preflight(&actions_at(VM_PERMISSIONS, RESOURCE_GROUP))
            .await;
        // The subscription's: the VM sizes of the default location, read as a provision
        // with a tenant reads them.
        let sizes = actions_at(VM_PERMISSIONS, SUBSCRIPTION).join(", ");
        findings.push(match &self.arm.settings().location {
            Some(location) => Finding::of_call(
                &format!("{sizes} (subscription)"),
                self.size_cores(location, "").await.or_else(|e| {
                    if e.class == ErrorClass::InvalidRequest {
                        Ok(0) // listed; the made-up size is simply not among them
                    } else {
                        Err(e)
                    }
                }),
                &format!("allowed: the VM sizes of {location} were read"),
            ),
            None => Finding::warn(
                format!("{sizes} (subscription)"),
                "no AZURE_LOCATION to read the VM sizes of: assign the subscription's role of docs/azure.md",
            ),
        });
        findings.push(Finding::warn(
            format!(
                "{} ({SUBNET})",
                actions_at(VM_PERMISSIONS, SUBNET).join(", ")
            ),
            "checked on the first provision: it needs the spec's subnet",
        ));
        findings
    }

    /// ARM's subscription buckets: a VM's provision writes its NIC and the VM, its
    /// teardown deletes both.
    fn rate_limits(&self, request: &Request) -> Vec<provisioner_core::RateLimit> {
        crate::arm::arm_rate_limits(
            &self.arm.settings().subscription_id,
            request.operation,
            2.0,
            2.0,
        )
    }

    /// A tenant's `vcpus` count the VM size's cores.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<AzureVmSpec>(request)?;
        let location = self.arm.settings().location_for(spec.location.as_ref())?;
        let cores = self.size_cores(&location, &spec.size).await?;
        Ok(provisioner_core::vcpus_cost(cores.saturating_mul(1000)))
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<AzureVmSpec>(request)?;
            self.arm.settings().location_for(spec.location.as_ref())?;
        }
        Ok(())
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<AzureVmSpec>(request)?;
        let location = self.arm.settings().location_for(spec.location.as_ref())?;
        let name = vm_name(request.request_id.as_str());
        let vm_id = self.vm_id(&name);
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        // One deadline for the whole provision, not one per wait.
        let deadline = tokio::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let doing = format!("creating VM {name}");
        let existing = self
            .find(&TeardownTarget::Request(request.request_id.clone()))
            .await?;
        if let Some(vm) = &existing
            && vm.provisioning_state() == "Succeeded"
        {
            let power = self.power_state(&vm_id, &doing).await?;
            if let Some(power @ ("deallocated" | "deallocating" | "stopped" | "stopping")) =
                power.as_deref()
            {
                // A stopped VM does not start by itself: say so instead of waiting.
                return Err(PlatformError::permanent(
                    ErrorClass::Conflict,
                    format!(
                        "VM {name} of request {} exists but is {power}; send a start request",
                        request.request_id
                    ),
                ));
            }
        }
        if self
            .arm
            .needs_put(
                existing.as_ref().map(VirtualMachine::provisioning_state),
                &vm_id,
                COMPUTE_API_VERSION,
                left(),
                &doing,
            )
            .await?
        {
            let (nic_id, nic_is_ours) = match (&spec.subnet_id, &spec.network_interface_id) {
                (_, Some(nic)) => (nic.clone(), false),
                (Some(subnet), None) => (
                    self.ensure_nic(request, &name, &location, subnet, left())
                        .await?,
                    true,
                ),
                (None, None) => {
                    return Err(PlatformError::invalid(
                        "give exactly one of subnet_id and network_interface_id",
                    ));
                }
            };
            let body = Self::vm_body(request, &spec, &name, &location, &nic_id, nic_is_ours);
            let accepted = self
                .arm
                .put(&vm_id, COMPUTE_API_VERSION, &body, &doing)
                .await?;
            info!(vm = %name, status = accepted.status, "create accepted");
            self.arm.wait(&accepted.poll, left(), &doing).await?;
        }
        provisioner_core::metrics::health_wait(self.wait_power(&vm_id, &["running"], left()))
            .await?;
        let vm = self
            .arm
            .get::<VirtualMachine>(&vm_id, COMPUTE_API_VERSION, &doing)
            .await?
            .ok_or_else(|| {
                PlatformError::transient(format!("VM {name} is gone after its create"))
            })?;
        self.resource(&vm).await
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let found = self.find(target).await?;
        let removed = match &found {
            Some(vm) => {
                let name = vm.name.clone();
                let resource = self.resource(vm).await?;
                let doing = format!("deleting VM {name}");
                if let Some(accepted) = self
                    .arm
                    .delete(&self.vm_id(&name), COMPUTE_API_VERSION, &doing)
                    .await?
                {
                    self.arm
                        .wait(&accepted.poll, OPERATION_TIMEOUT, &doing)
                        .await?;
                    info!(vm = %name, "deleted");
                    Some(resource)
                } else {
                    None
                }
            }
            None => None,
        };
        // The worker's network interface: deleted with the VM (deleteOption), or left
        // by a provision that failed before the VM existed.
        if let TeardownTarget::Request(id) = target {
            let name = vm_name(id.as_str());
            let nic_id = self.nic_id(&name);
            let doing = format!("deleting network interface {name}-nic");
            if let Some(nic) = self
                .arm
                .get::<NetworkInterface>(&nic_id, NETWORK_API_VERSION, &doing)
                .await?
                && nic.tags.get(REQUEST_ID_TAG) == Some(id.as_str())
                && let Some(accepted) = self
                    .arm
                    .delete(&nic_id, NETWORK_API_VERSION, &doing)
                    .await?
            {
                self.arm
                    .wait(&accepted.poll, OPERATION_TIMEOUT, &doing)
                    .await?;
            }
        }
        Ok(removed)
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let mut owned = Vec::new();
        for vm in &self.managed_vms().await? {
            // Without the request tag the VM names no request: never touched.
            let Some(request_id) = tagged_owner(&vm.tags) else {
                continue;
            };
            owned.push(Owned {
                resource: self.listed(vm).await,
                request_id,
                created: vm.created(),
            });
        }
        Ok(owned)
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found.and_then(|vm| tagged_owner(&vm.tags)))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        let Some(vm) = self.find(target).await? else {
            return Ok(None);
        };
        let power = self
            .power_state(&self.vm_id(&vm.name), &format!("reading VM {}", vm.name))
            .await?;
        Ok(Some(Described {
            state: state_of(&vm, power.as_deref()),
            resource: self.resource(&vm).await?,
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        let mut resources = Vec::new();
        for vm in &self.managed_vms().await? {
            resources.push(self.listed(vm).await);
        }
        Ok(resources)
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.power(target, "start", &["running"]).await
    }

    /// Deallocates: the VM stops and its compute is no longer billed.
    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.power(target, "deallocate", &["deallocated", "stopped"])
            .await
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.power(target, "restart", &["running"]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(answer: Value) -> VirtualMachine {
        serde_json::from_value(answer).expect("a VM answer")
    }

    #[test]
    fn power_states_map_to_states() {
        let view: InstanceView = serde_json::from_value(json!({"statuses": [{"code": "ProvisioningState/succeeded"}, {"code": "PowerState/deallocated"}]})).expect("view");
        assert_eq!(view.power_state(), Some("deallocated"));
        let running = vm(json!({"name": "a", "properties": {"provisioningState": "Succeeded"}}));
        assert_eq!(state_of(&running, Some("running")), State::Running);
        assert_eq!(state_of(&running, Some("deallocated")), State::Stopped);
        assert_eq!(state_of(&running, None), State::Starting);
        let failed = vm(json!({"name": "a", "properties": {"provisioningState": "Failed"}}));
        assert_eq!(state_of(&failed, Some("running")), State::Error);
    }

    #[test]
    fn a_vm_answer_without_what_arm_always_gives_is_an_error_naming_the_field() {
        let answer = json!({"properties": {"provisioningState": "Succeeded"}}).to_string();
        let err = crate::arm::read::<VirtualMachine>(answer.as_bytes(), "VM a", "reading VM a")
            .expect_err("no name");
        assert_eq!((err.class, err.retryable), (ErrorClass::Transient, true));
        assert!(err.message.contains("VM a"), "{err}");
        assert!(err.message.contains("`name`"), "{err}");
        // Tags and the network profile ARM leaves out when there are none.
        let bare = vm(json!({"name": "a", "tags": null, "properties": {}}));
        assert_eq!(bare.tags.get(MANAGED_TAG), None);
        assert_eq!(bare.first_interface(), None);
        // ARM: a resource without a provisioningState is Succeeded.
        assert_eq!(bare.provisioning_state(), "Succeeded");
    }

    #[test]
    fn a_network_interface_gives_its_private_address_once_allocated() {
        let nic: NetworkInterface = serde_json::from_value(json!({"properties": {
            "provisioningState": "Succeeded",
            "ipConfigurations": [{"name": "ipconfig1", "properties": {"privateIPAddress": "10.1.0.4"}}]}}))
        .expect("nic");
        assert_eq!(nic.private_address(), Some("10.1.0.4"));
        let pending: NetworkInterface = serde_json::from_value(json!({"properties": {
            "ipConfigurations": [{"name": "ipconfig1", "properties": {}}]}}))
        .expect("nic");
        assert_eq!(pending.private_address(), None);
        assert!(
            serde_json::from_value::<NetworkInterface>(json!({"properties": {}})).is_err(),
            "an interface without ipConfigurations is not an ARM answer"
        );
    }
}
