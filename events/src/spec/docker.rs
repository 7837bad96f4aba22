//! The `docker` platform's spec: one container.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HealthCheck;

use crate::Invalid;
use crate::invalid::invalid;

/// One container on a Docker engine (or Podman's Docker API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "docker spec")]
pub struct DockerSpec {
    /// Image reference, e.g. `localhost/busybox:latest`.
    pub image: String,
    /// Replaces the image's command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Container ports to publish, each on a free host port (or the `host` port given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Labels set on the container besides the request's labels and the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// How long the container may take to pass its health check. Default 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
    /// Whether to pull the image when it is not on the engine. Default `if_missing`.
    #[serde(default)]
    pub pull: PullPolicy,
    /// Refused unless the worker's configuration allows privileged containers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Linux capabilities to add; refused unless the worker's configuration allows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Bind mounts `host:container[:opts]`; refused unless the worker allows host mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<String>,
    /// `bridge` (the engine's default) or `none`; any other network only when the worker's
    /// operator named it (`DOCKER_ALLOWED_NETWORKS`), and `host`, `container:…`, `ns:…` only
    /// when the worker allows host networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
}

/// A container port, written as a bare number or as `{"container": 8080, "host": 18080}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PortMapping {
    Port(u16),
    Mapping {
        container: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<u16>,
    },
}

impl PortMapping {
    pub fn container_port(self) -> u16 {
        match self {
            PortMapping::Port(port)
            | PortMapping::Mapping {
                container: port, ..
            } => port,
        }
    }

    pub fn host_port(self) -> Option<u16> {
        match self {
            PortMapping::Port(_) => None,
            PortMapping::Mapping { host, .. } => host,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    #[default]
    IfMissing,
    Never,
}

impl DockerSpec {
    /// Shape checks that need no engine and no worker policy.
    pub fn validate(&self) -> Result<(), Invalid> {
        let image = self.image.trim();
        if image.is_empty() || image != self.image || image.chars().any(char::is_whitespace) {
            return Err(invalid!("image {:?} is not an image reference", self.image));
        }
        for mapping in &self.ports {
            if mapping.container_port() == 0 || mapping.host_port() == Some(0) {
                return Err("port 0 is not a port; give the container port to publish".into());
            }
        }
        if let Some(key) = self
            .labels
            .keys()
            .find(|k| k.starts_with("io.provisioner."))
        {
            return Err(invalid!(
                "label {key:?}: labels starting io.provisioner. are the worker's own (which request and tenant a container is for)"
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for mapping in &self.ports {
            if !seen.insert(mapping.container_port()) {
                return Err(invalid!(
                    "port {} is listed twice",
                    mapping.container_port()
                ));
            }
        }
        if let Some(health) = &self.health {
            health.validate()?;
            match health.port() {
                Some(port) if !seen.contains(&port) => {
                    return Err(invalid!(
                        "the health check uses port {port}, which is not in \"ports\"; publish it so the worker can reach it"
                    ));
                }
                None if self.ports.is_empty() => {
                    return Err("a health check needs a published port: add \"ports\"".into());
                }
                _ => {}
            }
        }
        super::validate_env_and_timeout(&self.env, self.ready_timeout_seconds)
    }
}
