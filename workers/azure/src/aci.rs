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
use provisioner_core::{Described, Finding, Platform, PlatformError, SetupError};
use provisioner_events::spec::azure::AzureContainerSpec;
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use serde_json::{Value, json};
use tracing::info;

use crate::arm::ArmClient;
use crate::{
    AzureSettings, MANAGED_TAG, REQUEST_ID_TAG, arm_error, check_owner, tagged_owner, target_name,
};

pub const ACI_API_VERSION: &str = "2023-05-01";
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(600);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The container group name of a request (at most 58 characters; ACI allows 63).
pub fn group_name(request_id: &str) -> String {
    derived_name(request_id, 44)
}

fn tag<'a>(resource: &'a Value, key: &str) -> Option<&'a str> {
    resource["tags"][key].as_str()
}

/// The group's own state (`Running`, `Stopped`, `Pending`, ...), from its instance view.
fn group_state(group: &Value) -> Option<&str> {
    group["properties"]["instanceView"]["state"].as_str()
}

fn state_of(group: &Value) -> State {
    match group["properties"]["provisioningState"].as_str() {
        Some("Failed") => return State::Error,
        Some("Deleting") => return State::Stopping,
        _ => {}
    }
    match group_state(group) {
        Some("Running") => State::Running,
        Some("Stopped" | "Succeeded" | "Failed") => State::Stopped,
        _ => State::Starting,
    }
}

/// Why a group failed, from its containers' events when ARM gives no error.
fn failure_of(group: &Value, doing: &str) -> PlatformError {
    let events: Vec<String> = group["properties"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c["properties"]["instanceView"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    let message = if events.is_empty() {
        "the container group failed without a message".to_owned()
    } else {
        events.join("; ")
    };
    let code = if message.contains("pull") || message.contains("image") {
        "InaccessibleImage"
    } else {
        "ContainerGroupFailed"
    };
    arm_error(None, code, &message, doing)
}

/// The Azure Container Instances [`Platform`].
#[derive(Debug, Clone)]
pub struct ContainerInstancesPlatform {
    arm: ArmClient,
}

impl ContainerInstancesPlatform {
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

    fn resource(&self, group: &Value) -> Resource {
        let name = group["name"].as_str().unwrap_or_default().to_owned();
        let ip = &group["properties"]["ipAddress"];
        let address = ip["fqdn"]
            .as_str()
            .filter(|f| !f.is_empty())
            .or_else(|| ip["ip"].as_str())
            .map(str::to_owned);
        let endpoints = match &address {
            Some(host) => ip["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_u64())
                .map(|port| Endpoint {
                    port: port as u16,
                    host: host.clone(),
                    host_port: port as u16,
                    protocol: "tcp".into(),
                })
                .collect(),
            None => Vec::new(),
        };
        Resource {
            id: format!("{}/{name}", self.arm.settings().resource_group),
            name,
            address,
            endpoints,
        }
    }

    /// Polls the group until provisioning succeeded and it is in one of `wanted`.
    async fn wait_state(
        &self,
        name: &str,
        wanted: &[&str],
        timeout: Duration,
    ) -> Result<Value, PlatformError> {
        let doing = format!("waiting for container group {name}");
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let group = self
                .arm
                .get(&self.group_id(name), ACI_API_VERSION, &doing)
                .await?
                .ok_or_else(|| {
                    PlatformError::permanent(
                        ErrorClass::NotFound,
                        format!(
                            "container group {name} disappeared while the worker waited for it"
                        ),
                    )
                })?;
            let provisioning = group["properties"]["provisioningState"]
                .as_str()
                .unwrap_or("");
            if provisioning == "Failed" || group_state(&group) == Some("Failed") {
                return Err(failure_of(&group, &doing));
            }
            if provisioning == "Succeeded"
                && group_state(&group).is_some_and(|s| wanted.contains(&s))
            {
                return Ok(group);
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "{doing}: it is {provisioning}/{} after {} s, not {wanted:?}",
                        group_state(&group).unwrap_or("unknown"),
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    async fn find(&self, target: &TeardownTarget) -> Result<Option<Value>, PlatformError> {
        let resource_group = &self.arm.settings().resource_group;
        let (name, request_id) =
            target_name(resource_group, target, group_name, "container group")?;
        let doing = format!("reading container group {name}");
        match self
            .arm
            .get(&self.group_id(&name), ACI_API_VERSION, &doing)
            .await?
        {
            Some(group) => check_owner(
                group,
                request_id,
                &format!("container group {name}"),
                target,
            )
            .map(Some),
            None => Ok(None),
        }
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
        let name = group["name"].as_str().unwrap_or_default().to_owned();
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

    async fn preflight(&self) -> Vec<Finding> {
        self.arm
            .preflight(&[
                "Microsoft.ContainerInstance/containerGroups/read",
                "Microsoft.ContainerInstance/containerGroups/write",
                "Microsoft.ContainerInstance/containerGroups/delete",
                "Microsoft.ContainerInstance/containerGroups/start/action",
                "Microsoft.ContainerInstance/containerGroups/stop/action",
                "Microsoft.ContainerInstance/containerGroups/restart/action",
            ])
            .await
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
            && group["properties"]["provisioningState"] == "Succeeded"
            && group_state(group) == Some("Stopped")
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
                existing.as_ref(),
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
        let group = self.wait_state(&name, done, left()).await?;
        Ok(self.resource(&group))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(group) = self.find(target).await? else {
            return Ok(None);
        };
        let name = group["name"].as_str().unwrap_or_default().to_owned();
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

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found.as_ref().and_then(tagged_owner))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|group| Described {
            state: state_of(&group),
            resource: self.resource(&group),
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        let all = self
            .arm
            .list(
                "Microsoft.ContainerInstance/containerGroups",
                ACI_API_VERSION,
                "listing the provisioner's container groups",
            )
            .await?;
        Ok(all
            .iter()
            .filter(|g| tag(g, MANAGED_TAG) == Some("true"))
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

    #[test]
    fn group_states_map_to_states() {
        let running = json!({"properties": {"provisioningState": "Succeeded", "instanceView": {"state": "Running"}}});
        assert_eq!(state_of(&running), State::Running);
        let stopped = json!({"properties": {"provisioningState": "Succeeded", "instanceView": {"state": "Stopped"}}});
        assert_eq!(state_of(&stopped), State::Stopped);
        let failed = json!({"properties": {"provisioningState": "Failed"}});
        assert_eq!(state_of(&failed), State::Error);
        let pending = json!({"properties": {"provisioningState": "Creating"}});
        assert_eq!(state_of(&pending), State::Starting);
    }
}
