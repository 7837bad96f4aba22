//! The GCP platforms' specs: `gcp-compute` (a Compute Engine instance) and
//! `gcp-cloud-run` (a Cloud Run service).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::invalid::invalid;

/// Cloud Run's own ceiling on a service's instances.
const MAX_CLOUD_RUN_INSTANCES: u32 = 1000;

/// One Compute Engine instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "gcp-compute spec")]
pub struct GcpComputeSpec {
    /// A machine type name, e.g. `e2-small`, or `custom-2-4096`.
    pub machine_type: String,
    /// The boot disk's source image: a full or partial URL, e.g.
    /// `projects/debian-cloud/global/images/family/debian-12`.
    pub image: String,
    /// The zone, e.g. `europe-west1-b`. Default: the worker's `GCP_ZONE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Boot disk size in GB. Default: the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_gb: Option<u32>,
    /// The VPC network. Default: the subnetwork's network when a `subnetwork` is given,
    /// else `global/networks/default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// A subnetwork, e.g. `regions/europe-west1/subnetworks/apps`; needed on custom-mode
    /// networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnetwork: Option<String>,
    /// Give the instance an ephemeral external IP address. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_ip: bool,
    /// Network tags, which firewall rules select on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_tags: Vec<String>,
    /// Labels on the instance besides the worker's own (GCP label rules: lowercase
    /// letters, digits, `_` and `-`, keys starting with a letter, at most 63 characters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Metadata items (`key: value`), read by the guest's agents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// A script the guest runs at boot (the `startup-script` metadata item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<String>,
    /// How long the instance may take to reach RUNNING. Default 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// One Cloud Run service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "gcp-cloud-run spec")]
pub struct GcpCloudRunSpec {
    /// The container image, e.g. `us-docker.pkg.dev/cloudrun/container/hello`.
    pub image: String,
    /// The region, e.g. `europe-west1`. Default: the worker's `GCP_REGION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The port the container listens on. Default 8080, as Cloud Run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// CPU limit, e.g. `1` or `1000m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory limit, e.g. `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// Labels on the service besides the worker's own (GCP label rules).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How long the service may take to become Ready. Default 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// Label keys the workers set themselves.
pub const RESERVED_LABEL_PREFIX: &str = "provisioner";

/// A GCP label key or value: lowercase ASCII letters, digits, `_` and `-`, at most 63;
/// keys also start with a letter and are not empty.
pub fn is_gcp_label(key: &str, value: &str) -> bool {
    let allowed = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    allowed(key) && allowed(value) && key.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A resource name as Compute Engine and Cloud Run take them (RFC 1035): a lowercase
/// letter, then lowercase letters, digits and `-`, not ending in `-`, at most `max`.
pub fn is_rfc1035_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if labels.len() > 60 {
        return Err("at most 60 labels (GCP allows 64, the worker sets its own)".into());
    }
    for (key, value) in labels {
        if !is_gcp_label(key, value) {
            return Err(invalid!(
                "label {key:?}={value:?} is not a GCP label (lowercase letters, digits, '_' and '-', key starting with a letter, at most 63 each)"
            ));
        }
        if key.starts_with(RESERVED_LABEL_PREFIX) {
            return Err(invalid!(
                "label {key:?} uses the reserved prefix {RESERVED_LABEL_PREFIX:?}"
            ));
        }
    }
    Ok(())
}

/// A path-like GCP name (zone, region, machine type, image, network): no spaces, no
/// control characters, no `?` or `#` that would change the request URL.
fn validate_path_like(what: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty()
        || value.len() > 1024
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(invalid!("{what} {value:?} is not a GCP name or path"));
    }
    Ok(())
}

fn validate_location(what: &str, value: &str) -> Result<(), Invalid> {
    if !is_rfc1035_name(value, 63) {
        return Err(invalid!(
            "{what} {value:?} is not a GCP {what} name (e.g. europe-west1{})",
            if what == "zone" { "-b" } else { "" }
        ));
    }
    Ok(())
}

impl GcpComputeSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_path_like("machine_type", &self.machine_type)?;
        validate_path_like("image", &self.image)?;
        if let Some(zone) = &self.zone {
            validate_location("zone", zone)?;
        }
        if let Some(size) = self.disk_size_gb
            && !(1..=65_536).contains(&size)
        {
            return Err(invalid!("disk_size_gb {size} must be 1 to 65536"));
        }
        for (what, value) in [("network", &self.network), ("subnetwork", &self.subnetwork)] {
            if let Some(value) = value {
                validate_path_like(what, value)?;
            }
        }
        for tag in &self.network_tags {
            if !is_rfc1035_name(tag, 63) {
                return Err(invalid!(
                    "network tag {tag:?} must be lowercase letters, digits and '-', starting with a letter"
                ));
            }
        }
        validate_labels(&self.labels)?;
        for key in self.metadata.keys() {
            if key.is_empty()
                || key.len() > 128
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid!(
                    "metadata key {key:?} must be letters, digits, '_' and '-', at most 128"
                ));
            }
            if key.starts_with(RESERVED_LABEL_PREFIX) {
                return Err(invalid!(
                    "metadata key {key:?} uses the reserved prefix {RESERVED_LABEL_PREFIX:?}"
                ));
            }
        }
        if self.startup_script.is_some() && self.metadata.contains_key("startup-script") {
            return Err(
                "give the startup script as startup_script or as metadata, not both".into(),
            );
        }
        super::validate_env_and_timeout(&BTreeMap::new(), self.ready_timeout_seconds)
    }
}

/// A CPU or memory limit as Cloud Run takes them (`1`, `1000m`, `512Mi`, `2Gi`).
fn is_run_quantity(value: &str) -> bool {
    let digits_end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(digits_end);
    number.parse::<f64>().is_ok_and(|n| n > 0.0)
        && ["", "m", "k", "M", "G", "Ki", "Mi", "Gi"].contains(&suffix)
}

impl GcpCloudRunSpec {
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
        if let Some(region) = &self.region {
            validate_location("region", region)?;
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port".into());
        }
        for (what, value) in [("cpu", &self.cpu), ("memory", &self.memory)] {
            if let Some(value) = value
                && !is_run_quantity(value)
            {
                return Err(invalid!(
                    "{what} {value:?} is not a quantity Cloud Run takes (e.g. 1, 1000m, 512Mi)"
                ));
            }
        }
        if let (Some(min), Some(max)) = (self.min_instances, self.max_instances)
            && min > max
        {
            return Err(invalid!(
                "min_instances ({min}) is more than max_instances ({max})"
            ));
        }
        if self.max_instances == Some(0) {
            return Err("max_instances must be at least 1".into());
        }
        for (what, value) in [
            ("min_instances", self.min_instances),
            ("max_instances", self.max_instances),
        ] {
            if value.is_some_and(|n| n > MAX_CLOUD_RUN_INSTANCES) {
                return Err(invalid!("{what} must be at most {MAX_CLOUD_RUN_INSTANCES}"));
            }
        }
        validate_labels(&self.labels)?;
        if let Some(name) = self.env.keys().find(|name| is_reserved_by_cloud_run(name)) {
            return Err(invalid!(
                "env {name:?} is set by Cloud Run itself (PORT, K_SERVICE, K_REVISION, K_CONFIGURATION and X_GOOGLE_* are reserved); the port the container listens on is spec.port"
            ));
        }
        super::validate_env_and_timeout(&self.env, self.ready_timeout_seconds)
    }
}

/// Environment variables Cloud Run sets itself and refuses in a service's container.
/// <https://cloud.google.com/run/docs/container-contract#env-vars>
fn is_reserved_by_cloud_run(name: &str) -> bool {
    matches!(
        name,
        "PORT" | "K_SERVICE" | "K_REVISION" | "K_CONFIGURATION"
    ) || name.starts_with("X_GOOGLE_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compute() -> GcpComputeSpec {
        serde_json::from_value(serde_json::json!({
            "machine_type": "e2-small",
            "image": "projects/debian-cloud/global/images/family/debian-12"
        }))
        .expect("minimal spec")
    }

    #[test]
    fn compute_specs_are_checked_before_any_call() {
        assert_eq!(compute().validate(), Ok(()));
        let mut bad = compute();
        bad.zone = Some("Europe West".into());
        assert!(bad.validate().is_err());
        let mut bad = compute();
        bad.labels.insert("Team".into(), "web".into());
        assert!(
            bad.validate()
                .expect_err("refused")
                .0
                .contains("not a GCP label")
        );
        let mut bad = compute();
        bad.labels.insert("provisioner-request".into(), "x".into());
        assert!(bad.validate().expect_err("refused").0.contains("reserved"));
        let mut bad = compute();
        bad.image = "debian 12".into();
        assert!(bad.validate().is_err());
        let mut bad = compute();
        bad.startup_script = Some("echo hi".into());
        bad.metadata
            .insert("startup-script".into(), "echo ho".into());
        assert!(bad.validate().expect_err("refused").0.contains("not both"));
    }

    #[test]
    fn cloud_run_specs_are_checked_before_any_call() {
        let spec: GcpCloudRunSpec =
            serde_json::from_value(serde_json::json!({"image": "gcr.io/x/y:1", "memory": "512Mi"}))
                .expect("spec");
        assert_eq!(spec.validate(), Ok(()));
        let mut bad = spec.clone();
        bad.memory = Some("lots".into());
        assert!(bad.validate().is_err());
        for reserved in [
            "PORT",
            "K_SERVICE",
            "K_REVISION",
            "K_CONFIGURATION",
            "X_GOOGLE_A",
        ] {
            let mut bad = spec.clone();
            bad.env.insert(reserved.into(), "1".into());
            let error = bad.validate().expect_err(reserved);
            assert!(error.0.contains("spec.port"), "{error}");
        }
        let mut fine = spec.clone();
        fine.env.insert("PORTS".into(), "1".into());
        assert_eq!(fine.validate(), Ok(()));
        let mut bad = spec.clone();
        bad.min_instances = Some(3);
        bad.max_instances = Some(1);
        assert!(bad.validate().is_err());
        assert!(is_rfc1035_name("prov-web-1-abcd", 49));
        assert!(!is_rfc1035_name("1prov", 49));
        assert!(!is_rfc1035_name("prov-", 49));
    }
}
