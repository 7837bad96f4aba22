//! The `kubernetes` platform's spec: a Deployment and, when it exposes a port, a Service.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::invalid::invalid;

/// A Deployment of one container and the Service in front of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "kubernetes spec")]
pub struct KubernetesSpec {
    /// The container image, e.g. `nginx:1.27`.
    pub image: String,
    /// Namespace of both objects. Default: the worker's (its kubeconfig context's, or
    /// `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Pods to run. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The container port; a Service is made for it when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    /// Requests and limits of the container, in Kubernetes quantities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ContainerResources>,
    /// Labels on the Deployment, its pods and the Service, besides the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How long the replicas (and a load balancer's address) may take. Default 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerResources {
    /// e.g. `250m` or `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// e.g. `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

const SERVICE_TYPES: [&str; 3] = ["ClusterIP", "NodePort", "LoadBalancer"];
const MAX_REPLICAS: u32 = 1000;

/// A DNS-1123 label: lowercase letters, digits and '-', starting and ending with an
/// alphanumeric, at most 63 characters (namespaces are these).
pub fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// A Kubernetes quantity such as `250m`, `1`, `0.5`, `256Mi` or `1G`.
fn is_quantity(value: &str) -> bool {
    let digits_end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(digits_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

/// A DNS-1123 subdomain: dot-separated parts of lowercase letters, digits and '-', each
/// starting and ending with an alphanumeric, at most 253 characters in all (label key
/// prefixes are these).
pub fn is_dns_subdomain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A label key and value as the API server's validation accepts them
/// (apimachinery's `IsQualifiedName` and `IsValidLabelValue`): the key is a name of at
/// most 63 characters (alphanumerics, '-', '_', '.', starting and ending alphanumeric),
/// optionally after a DNS-1123 subdomain prefix and one '/'; the value is empty or such a
/// name.
/// <https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set>
pub fn is_label(key: &str, value: &str) -> bool {
    let name_ok = |name: &str, max: usize| {
        name.len() <= max
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && name
                .chars()
                .next()
                .is_none_or(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .last()
                .is_none_or(|c| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    !name.is_empty()
        && name_ok(name, 63)
        && prefix.is_none_or(is_dns_subdomain)
        && name_ok(value, 63)
}

impl KubernetesSpec {
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(1)
    }

    pub fn service_type(&self) -> &str {
        self.service_type.as_deref().unwrap_or("ClusterIP")
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.image.is_empty()
            || self.image.len() > 512
            || self
                .image
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid!("image {:?} is not an image reference", self.image));
        }
        if let Some(namespace) = &self.namespace
            && !is_dns_label(namespace)
        {
            return Err(invalid!(
                "namespace {namespace:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
            ));
        }
        if self.replicas() > MAX_REPLICAS {
            return Err(invalid!("replicas must be at most {MAX_REPLICAS}"));
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        if !SERVICE_TYPES.contains(&self.service_type()) {
            return Err(invalid!(
                "service_type {:?} is not one of ClusterIP, NodePort, LoadBalancer",
                self.service_type()
            ));
        }
        if self.service_type.is_some() && self.port.is_none() {
            return Err("service_type needs a port to expose".into());
        }
        if let Some(resources) = &self.resources {
            for (what, quantity) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
                if let Some(quantity) = quantity
                    && !is_quantity(quantity)
                {
                    return Err(invalid!(
                        "resources.{what} {quantity:?} is not a Kubernetes quantity (e.g. 250m, 256Mi)"
                    ));
                }
            }
        }
        for (key, value) in &self.labels {
            if !is_label(key, value) || key.starts_with("provisioner.io/") {
                return Err(invalid!(
                    "label {key:?}={value:?} is not a Kubernetes label, or uses the reserved provisioner.io/ prefix"
                ));
            }
        }
        super::validate_env_and_timeout(&self.env, self.ready_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_labels_follow_kubernetes() {
        for ok in ["250m", "1", "0.5", "256Mi", "1G"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "lots", "1Xi", "-1"] {
            assert!(!is_quantity(bad), "{bad}");
        }
        assert!(is_label("app.kubernetes.io/name", "web"));
        assert!(is_label("Team_Name.x", "A_b-1"));
        // The API server answers 422 to each of these.
        for (key, value) in [
            ("Example.com/team", "x"),
            ("ex_ample.com/team", "x"),
            ("/team", "x"),
            ("a/b/c", "x"),
            ("-team", "x"),
            ("example..com/team", "x"),
            ("team", "a b"),
            ("team", "x_"),
        ] {
            assert!(!is_label(key, value), "{key}={value}");
        }
        assert!(is_label("team", ""));
        assert!(!is_label("team", "-web"));
        assert!(!is_label("", "x"));
        assert!(is_dns_label("prod-1"));
        assert!(!is_dns_label("Prod"));
    }
}
