//! The `azure-container-instances` platform: one container group of one container per
//! provision request, by ARM `PUT` of `Microsoft.ContainerInstance/containerGroups`.
//!
//! The group is named from the request id; before its first `PUT` the worker reads the
//! name and refuses a group tagged with another request id (ARM's `PUT` would update
//! it), adopting its own. `running` means provisioning succeeded and the group's
//! instance view says `Running`; the event carries its public IP (or DNS name) and
//! ports. Stop, start and restart are the group's own actions.

use std::time::Duration;

use async_trait::async_trait;
use provisioner_core::backoff::Backoff;
use provisioner_core::names::derived_name;
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::azure::AzureContainerSpec;
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use crate::arm::{ArmClient, provisioning_state};
use crate::{
    AzureSettings, MANAGED_TAG, REQUEST_ID_TAG, SystemData, Tags, arm_error, check_owner,
    tagged_owner, target_name,
};

pub const ACI_API_VERSION: &str = "2023-05-01";
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The container group name of a request (at most 58 characters; ACI allows 63).
pub fn group_name(request_id: &str) -> String {
    derived_name(request_id, 44)
}

/// A container group as ARM answers it:
/// <https://learn.microsoft.com/rest/api/container-instances/container-groups/get>
#[derive(Debug, Deserialize)]
struct ContainerGroup {
    name: String,
    #[serde(default)]
    tags: Tags,
    // Only where ACI returns ARM's system metadata: its container group API gives no
    // other creation time.
    #[serde(rename = "systemData")]
    system_data: Option<SystemData>,
    properties: GroupProperties,
}

/// The `properties` of a [`ContainerGroup`] the worker reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupProperties {
    provisioning_state: Option<String>,
    // Not there until ACI has placed the group.
    instance_view: Option<GroupInstanceView>,
    // Only a group with ports on a public or private address has one.
    ip_address: Option<IpAddress>,
    containers: Vec<Container>,
}

/// A group's `instanceView`: its own state.
#[derive(Debug, Deserialize)]
struct GroupInstanceView {
    state: Option<String>,
}

/// A group's `ipAddress`: the address and ports it is reached at.
#[derive(Debug, Deserialize)]
struct IpAddress {
    ip: Option<String>,
    fqdn: Option<String>,
    ports: Vec<Port>,
}

/// One of `ipAddress.ports`.
#[derive(Debug, Deserialize)]
struct Port {
    port: u16,
}

/// One of a group's `containers`.
#[derive(Debug, Deserialize)]
struct Container {
    properties: ContainerProperties,
}

/// The `properties` of a [`Container`] the worker reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerProperties {
    instance_view: Option<ContainerInstanceView>,
}

/// A container's `instanceView`: what happened to it.
#[derive(Debug, Deserialize)]
struct ContainerInstanceView {
    // Absent before anything happened to the container.
    #[serde(default)]
    events: Vec<ContainerEvent>,
}

/// One of a container's events, as the kubelet reports them (`Pulling`, `Failed`,
/// `BackOff`, ...).
#[derive(Debug, Deserialize)]
struct ContainerEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

impl ContainerGroup {
    fn provisioning_state(&self) -> &str {
        provisioning_state(self.properties.provisioning_state.as_deref())
    }

    /// The group's own state (`Running`, `Stopped`, `Pending`, ...), from its instance view.
    fn state(&self) -> Option<&str> {
        self.properties.instance_view.as_ref()?.state.as_deref()
    }

    fn events(&self) -> impl Iterator<Item = &ContainerEvent> {
        self.properties
            .containers
            .iter()
            .filter_map(|c| c.properties.instance_view.as_ref())
            .flat_map(|view| &view.events)
    }
}

fn state_of(group: &ContainerGroup) -> State {
    match group.provisioning_state() {
        "Failed" => return State::Error,
        "Deleting" => return State::Stopping,
        _ => {}
    }
    match group.state() {
        Some("Running") => State::Running,
        Some("Stopped" | "Succeeded" | "Failed") => State::Stopped,
        _ => State::Starting,
    }
}

/// Why a group failed, from its containers' events when ARM gives no error.
fn failure_of(group: &ContainerGroup, doing: &str) -> PlatformError {
    // The warnings say why; every group also has its `Pulling`/`Started` events.
    let warnings: Vec<&str> = group
        .events()
        .filter(|e| e.kind.as_deref() == Some("Warning"))
        .filter_map(|e| e.message.as_deref())
        .collect();
    // The events carry no code: a failed pull is known by the kubelet's warning alone
    // ("Failed to pull image", "ErrImagePull", "ImagePullBackOff").
    let pull_failed = warnings.iter().any(|m| {
        let m = m.to_ascii_lowercase();
        m.contains("pull") || m.contains("image")
    });
    let code = if pull_failed {
        "InaccessibleImage"
    } else {
        "ContainerGroupFailed"
    };
    let told = if warnings.is_empty() {
        group
            .events()
            .filter_map(|e| e.message.as_deref())
            .collect()
    } else {
        warnings
    };
    let message = if told.is_empty() {
        "the container group failed without a message".to_owned()
    } else {
        told.join("; ")
    };
    arm_error(None, code, &message, doing)
}

/// The Azure Container Instances [`Platform`].
#[derive(Debug, Clone)]
pub struct ContainerInstancesPlatform {
    arm: ArmClient,
}

impl ContainerInstancesPlatform {
    /// Every container group of the resource group that carries the managed tag.
    async fn managed_groups(&self) -> Result<Vec<ContainerGroup>, PlatformError> {
        let all = self
            .arm
            .list::<ContainerGroup>(
                "Microsoft.ContainerInstance/containerGroups",
                ACI_API_VERSION,
                "listing the provisioner's container groups",
            )
            .await?;
        Ok(all
            .into_iter()
            .filter(|g| g.tags.get(MANAGED_TAG) == Some("true"))
            .collect())
    }

    pub fn new(settings: AzureSettings) -> Result<Self, SetupError> {
        Ok(ContainerInstancesPlatform {
            arm: ArmClient::new(settings)?,
        })
    }

    fn group_id(&self, name: &str) -> String {
        self.arm.resource_id(&format!(
            "Microsoft.ContainerInstance/containerGroups/{name}"
        ))
    }

    fn body(request: &Request, spec: &AzureContainerSpec, location: &str) -> Value {
        let mut tags = serde_json::Map::new();
        for (key, value) in &spec.tags {
            tags.insert(key.clone(), json!(value));
        }
        tags.insert(MANAGED_TAG.into(), json!("true"));
        tags.insert(REQUEST_ID_TAG.into(), json!(request.request_id.as_str()));
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| json!({"port": p, "protocol": "TCP"}))
            .collect();
        let mut container = json!({
            "image": spec.image,
            "resources": {"requests": {"cpu": spec.cpu.unwrap_or(1.0), "memoryInGB": spec.memory_gb.unwrap_or(1.5)}},
            "ports": ports,
            "environmentVariables": spec.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        });
        if !spec.command.is_empty() {
            container["command"] = json!(spec.command);
        }
        let mut properties = json!({
            "osType": "Linux",
            "restartPolicy": spec.restart_policy.as_deref().unwrap_or("Always"),
            "containers": [{"name": "main", "properties": container}],
        });
        if !ports.is_empty() {
            let mut ip = json!({"type": "Public", "ports": ports});
            if let Some(label) = &spec.dns_name_label {
                ip["dnsNameLabel"] = json!(label);
            }
            properties["ipAddress"] = ip;
        }
        json!({"location": location, "tags": tags, "properties": properties})
    }

    fn resource(&self, group: &ContainerGroup) -> Resource {
        let name = group.name.clone();
        let ip = group.properties.ip_address.as_ref();
        let address = ip
            .and_then(|ip| {
                ip.fqdn
                    .as_deref()
                    .filter(|f| !f.is_empty())
                    .or(ip.ip.as_deref())
            })
            .map(str::to_owned);
        let endpoints = match (&address, ip) {
            (Some(host), Some(ip)) => ip
                .ports
                .iter()
                .map(|p| Endpoint {
                    port: p.port,
                    host: host.clone(),
                    host_port: p.port,
                    protocol: "tcp".into(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Resource {
            id: format!("{}/{name}", self.arm.settings().resource_group),
            name,
            address,
            endpoints,
            members: Vec::new(),
        }
    }

    /// Polls the group until provisioning succeeded and it is in one of `wanted`.
    async fn wait_state(
        &self,
        name: &str,
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<ContainerGroup, PlatformError> {
        let doing = format!("waiting for container group {name}");
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let group = self
                .arm
                .get::<ContainerGroup>(&self.group_id(name), ACI_API_VERSION, &doing)
                .await?
                .ok_or_else(|| {
                    PlatformError::permanent(
                        ErrorClass::NotFound,
                        format!(
                            "container group {name} disappeared while the worker waited for it"
                        ),
                    )
                })?;
            let provisioning = group.provisioning_state();
            if provisioning == "Failed" || group.state() == Some("Failed") {
                return Err(failure_of(&group, &doing));
            }
            if provisioning == "Succeeded" && group.state().is_some_and(|s| wanted.contains(&s)) {
                return Ok(group);
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "{doing}: it is {provisioning}/{} after {} s, not {wanted:?}",
                        group.state().unwrap_or("unknown"),
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    async fn find(&self, target: &TeardownTarget) -> Result<Option<ContainerGroup>, PlatformError> {
        let resource_group = &self.arm.settings().resource_group;
        let (name, request_id) =
            target_name(resource_group, target, group_name, "container group")?;
        let doing = format!("reading container group {name}");
        let found = self
            .arm
            .get::<ContainerGroup>(&self.group_id(&name), ACI_API_VERSION, &doing)
            .await?;
        if let Some(group) = &found {
            check_owner(
                &group.tags,
                request_id,
                &format!("container group {name}"),
                target,
            )?;
        }
        Ok(found)
    }

    async fn act(
        &self,
        target: &TeardownTarget,
        action: &str,
        wanted: &[&str],
    ) -> Result<Resource, PlatformError> {
        let group = self.find(target).await?.ok_or_else(|| {
            PlatformError::permanent(
                ErrorClass::NotFound,
                format!("{target} has no container group"),
            )
        })?;
        let name = group.name.clone();
        let doing = format!("{action} of container group {name}");
        let accepted = self
            .arm
            .post(&self.group_id(&name), action, ACI_API_VERSION, &doing)
            .await?;
        self.arm
            .wait(&accepted.poll, OPERATION_TIMEOUT, &doing)
            .await?;
        let group = self.wait_state(&name, wanted, OPERATION_TIMEOUT).await?;
        info!(group = %name, action, "done");
        Ok(self.resource(&group))
    }
}

#[async_trait]
impl Platform for ContainerInstancesPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::AzureContainerInstances
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        crate::permissions::ACI_PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        use crate::permissions::{ACI_PERMISSIONS, RESOURCE_GROUP, actions_at};
        self.arm
            .preflight(&actions_at(ACI_PERMISSIONS, RESOURCE_GROUP))
            .await
    }

    /// ARM's subscription buckets: one write or delete of the container group.
    fn rate_limits(&self, request: &Request) -> Vec<provisioner_core::RateLimit> {
        crate::arm::arm_rate_limits(
            &self.arm.settings().subscription_id,
            request.operation,
            1.0,
            1.0,
        )
    }

    /// A tenant's `vcpus` count the group's CPU cores (default 1), rounded up.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<AzureContainerSpec>(request)?;
        let cores = spec.cpu.unwrap_or(1.0);
        let millis = provisioner_core::cpu_millis(&cores.to_string()).ok_or_else(|| {
            PlatformError::invalid(format!("cpu {cores} is not a number of cores"))
        })?;
        Ok(provisioner_core::vcpus_cost(millis))
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<AzureContainerSpec>(request)?;
            self.arm.settings().location_for(spec.location.as_ref())?;
        }
        Ok(())
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<AzureContainerSpec>(request)?;
        let location = self.arm.settings().location_for(spec.location.as_ref())?;
        let name = group_name(request.request_id.as_str());
        let group_id = self.group_id(&name);
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let doing = format!("creating container group {name}");
        let existing = self
            .find(&TeardownTarget::Request(request.request_id.clone()))
            .await?;
        if let Some(group) = &existing
            && group.provisioning_state() == "Succeeded"
            && group.state() == Some("Stopped")
        {
            // A stopped group does not start by itself: say so instead of waiting.
            return Err(PlatformError::permanent(
                ErrorClass::Conflict,
                format!(
                    "container group {name} of request {} exists but is stopped; send a start request",
                    request.request_id
                ),
            ));
        }
        // One deadline for the whole provision, not one per wait.
        let deadline = tokio::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if self
            .arm
            .needs_put(
                existing.as_ref().map(ContainerGroup::provisioning_state),
                &group_id,
                ACI_API_VERSION,
                left(),
                &doing,
            )
            .await?
        {
            let body = Self::body(request, &spec, &location);
            let accepted = self
                .arm
                .put(&group_id, ACI_API_VERSION, &body, &doing)
                .await?;
            info!(group = %name, status = accepted.status, "create accepted");
            self.arm.wait(&accepted.poll, left(), &doing).await?;
        }
        // A group that restarts always is done when it runs; one that does not may have
        // run to its end already.
        let done: &[&str] = match spec.restart_policy.as_deref().unwrap_or("Always") {
            "Always" => &["Running"],
            _ => &["Running", "Succeeded"],
        };
        let group =
            provisioner_core::metrics::health_wait(self.wait_state(&name, done, left())).await?;
        Ok(self.resource(&group))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(group) = self.find(target).await? else {
            return Ok(None);
        };
        let name = group.name.clone();
        let doing = format!("deleting container group {name}");
        let Some(accepted) = self
            .arm
            .delete(&self.group_id(&name), ACI_API_VERSION, &doing)
            .await?
        else {
            return Ok(None);
        };
        self.arm
            .wait(&accepted.poll, OPERATION_TIMEOUT, &doing)
            .await?;
        info!(group = %name, "deleted");
        Ok(Some(self.resource(&group)))
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let mut owned = Vec::new();
        for group in &self.managed_groups().await? {
            // Without the request tag the group names no request: never touched.
            let Some(request_id) = tagged_owner(&group.tags) else {
                continue;
            };
            owned.push(Owned {
                resource: self.resource(group),
                request_id,
                created: group.system_data.as_ref().and_then(SystemData::created),
            });
        }
        Ok(owned)
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found.and_then(|group| tagged_owner(&group.tags)))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|group| Described {
            state: state_of(&group),
            resource: self.resource(&group),
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        Ok(self
            .managed_groups()
            .await?
            .iter()
            .map(|g| self.resource(g))
            .collect())
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.act(target, "start", &["Running"]).await
    }

    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.act(target, "stop", &["Stopped"]).await
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.act(target, "restart", &["Running"]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group answer with `properties` merged over the fields ARM always gives.
    fn group(properties: Value) -> ContainerGroup {
        let mut answer = json!({"name": "g", "properties": {"osType": "Linux",
            "containers": [{"name": "main", "properties": {"image": "hello"}}]}});
        for (key, value) in properties.as_object().expect("object") {
            answer["properties"][key] = value.clone();
        }
        serde_json::from_value(answer).expect("a container group answer")
    }

    #[test]
    fn group_states_map_to_states() {
        let running =
            group(json!({"provisioningState": "Succeeded", "instanceView": {"state": "Running"}}));
        assert_eq!(state_of(&running), State::Running);
        let stopped =
            group(json!({"provisioningState": "Succeeded", "instanceView": {"state": "Stopped"}}));
        assert_eq!(state_of(&stopped), State::Stopped);
        let failed = group(json!({"provisioningState": "Failed"}));
        assert_eq!(state_of(&failed), State::Error);
        let pending = group(json!({"provisioningState": "Creating"}));
        assert_eq!(state_of(&pending), State::Starting);
    }

    #[test]
    fn a_group_answer_without_what_arm_always_gives_is_an_error_naming_the_field() {
        let answer = json!({"name": "g", "properties": {"provisioningState": "Succeeded"}});
        let err = crate::arm::read::<ContainerGroup>(
            answer.to_string().as_bytes(),
            "container group g",
            "reading container group g",
        )
        .expect_err("no containers");
        assert_eq!((err.class, err.retryable), (ErrorClass::Transient, true));
        assert!(err.message.contains("container group g"), "{err}");
        assert!(err.message.contains("`containers`"), "{err}");
        // A port ARM could not have opened is refused, not cut down to 16 bits.
        let answer = json!({"name": "g", "properties": {"containers": [],
            "ipAddress": {"type": "Public", "ip": "20.50.1.4", "ports": [{"port": 70000}]}}});
        assert!(serde_json::from_value::<ContainerGroup>(answer).is_err());
    }

    #[test]
    fn only_a_warning_about_pulling_makes_a_failed_group_an_inaccessible_image() {
        let events = |events: Value| {
            group(json!({"provisioningState": "Failed",
                "containers": [{"name": "main", "properties": {"image": "x", "instanceView": {"events": events}}}]}))
        };
        let pull = events(json!([
            {"type": "Normal", "name": "Pulling", "message": "pulling image \"x\""},
            {"type": "Warning", "name": "Failed", "message": "Failed to pull image \"x\": not found"},
        ]));
        let err = failure_of(&pull, "creating g");
        assert_eq!(err.class, ErrorClass::InvalidRequest, "{err}");
        assert!(
            err.message
                .contains("InaccessibleImage: Failed to pull image"),
            "{err}"
        );
        // Every group pulls its image first; a crash after that is not an image problem.
        let crash = events(json!([
            {"type": "Normal", "name": "Pulling", "message": "pulling image \"x\""},
            {"type": "Normal", "name": "Pulled", "message": "Successfully pulled image \"x\""},
            {"type": "Warning", "name": "BackOff", "message": "Back-off restarting failed container"},
        ]));
        let err = failure_of(&crash, "creating g");
        assert!(
            err.message
                .contains("ContainerGroupFailed: Back-off restarting"),
            "{err}"
        );
    }
}
