//! The Azure platforms' specs: `azure-vm` (a Virtual Machine) and
//! `azure-container-instances` (a container group).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::invalid::invalid;

/// One Linux Virtual Machine, reached by SSH key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "azure-vm spec")]
pub struct AzureVmSpec {
    /// The VM size, e.g. `Standard_B1s`.
    pub size: String,
    /// A marketplace image (`publisher`, `offer`, `sku`, `version`) or an image's resource
    /// id (`id`, e.g. a Compute Gallery image version).
    pub image: ImageReference,
    /// The region, e.g. `westeurope`. Default: the worker's `AZURE_LOCATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The subnet (resource id) of a network interface the worker makes for the VM and
    /// deletes with it. Give this or `network_interface_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// An existing network interface (resource id) to attach; it is left in place at
    /// teardown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_interface_id: Option<String>,
    /// Default `azureuser`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_username: Option<String>,
    /// The OpenSSH public key of the admin user; password login is disabled.
    pub ssh_public_key: String,
    /// OS disk size in GB. Default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_disk_size_gb: Option<u32>,
    /// cloud-init user data (plain text; the worker base64-encodes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_data: Option<String>,
    /// Tags on the VM besides the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// How long the VM may take to be provisioned and running. Default 600 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// Which image a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImageReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// Default `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// An image resource id instead of a marketplace image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One container group of one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "azure-container-instances spec")]
pub struct AzureContainerSpec {
    /// The container image, e.g. `mcr.microsoft.com/azuredocs/aci-helloworld`.
    pub image: String,
    /// The region, e.g. `westeurope`. Default: the worker's `AZURE_LOCATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// CPU cores requested. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory requested in GB. Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_gb: Option<f64>,
    /// TCP ports the container listens on, exposed on the group's public IP address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// A DNS label: the group is then also reachable at
    /// `<label>.<location>.azurecontainer.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name_label: Option<String>,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `Always` (default), `OnFailure` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    /// Tags on the group besides the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// How long the group may take to run. Default 600 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// Tag keys the workers set themselves start with this.
pub const RESERVED_TAG_PREFIX: &str = "provisioner";

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if tags.len() > 45 {
        return Err("at most 45 tags (Azure allows 50, the worker sets its own)".into());
    }
    for (key, value) in tags {
        if key.is_empty()
            || key.len() > 512
            || value.len() > 256
            || key
                .chars()
                .any(|c| "<>%&\\?/".contains(c) || c.is_control())
        {
            return Err(invalid!(
                "tag {key:?} is not an Azure tag (keys 1-512 characters without <>%&\\?/, values at most 256)"
            ));
        }
        if key.to_ascii_lowercase().starts_with(RESERVED_TAG_PREFIX) {
            return Err(invalid!(
                "tag {key:?} uses the reserved prefix {RESERVED_TAG_PREFIX:?}"
            ));
        }
    }
    Ok(())
}

/// An Azure region name: lowercase letters and digits, e.g. `westeurope`.
fn validate_location(location: &str) -> Result<(), Invalid> {
    if location.is_empty()
        || location.len() > 40
        || !location
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(invalid!(
            "location {location:?} is not an Azure region name (e.g. westeurope)"
        ));
    }
    Ok(())
}

/// A resource id as ARM writes them: `/subscriptions/.../providers/...`.
pub fn is_resource_id(value: &str) -> bool {
    value.starts_with("/subscriptions/")
        && value.contains("/providers/")
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
}

impl AzureVmSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.size.is_empty()
            || !self
                .size
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid!(
                "size {:?} is not a VM size (e.g. Standard_B1s)",
                self.size
            ));
        }
        let image = &self.image;
        match (&image.id, &image.publisher, &image.offer, &image.sku) {
            (Some(id), None, None, None) if is_resource_id(id) => {}
            (Some(id), None, None, None) => {
                return Err(invalid!("image.id {id:?} is not a resource id"));
            }
            (None, Some(p), Some(o), Some(s))
                if !p.is_empty() && !o.is_empty() && !s.is_empty() => {}
            _ => {
                return Err(
                    "image needs publisher, offer and sku (a marketplace image) or id, not both"
                        .into(),
                );
            }
        }
        if let Some(location) = &self.location {
            validate_location(location)?;
        }
        match (&self.subnet_id, &self.network_interface_id) {
            (Some(id), None) | (None, Some(id)) if is_resource_id(id) => {}
            (Some(id), None) | (None, Some(id)) => {
                return Err(invalid!("{id:?} is not a resource id"));
            }
            _ => {
                return Err(
                    "give exactly one of subnet_id (the worker makes a network interface) and network_interface_id"
                        .into(),
                );
            }
        }
        if let Some(user) = &self.admin_username
            && (user.is_empty()
                || user.len() > 32
                || !user
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
                || ["root", "admin", "administrator"].contains(&user.as_str()))
        {
            return Err(invalid!(
                "admin_username {user:?} is not allowed (lowercase letters, digits, '_' and '-'; not root or admin)"
            ));
        }
        check_ssh_public_key(self.ssh_public_key.trim())?;
        if let Some(size) = self.os_disk_size_gb
            && !(1..=32_767).contains(&size)
        {
            return Err(invalid!("os_disk_size_gb {size} must be 1 to 32767"));
        }
        if self.custom_data.as_ref().is_some_and(|d| d.len() > 65_535) {
            return Err("custom_data is more than Azure's 64 KiB".into());
        }
        validate_tags(&self.tags)?;
        super::validate_env_and_timeout(&BTreeMap::new(), self.ready_timeout_seconds)
    }
}

const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];

impl AzureContainerSpec {
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
        if let Some(location) = &self.location {
            validate_location(location)?;
        }
        if let Some(cpu) = self.cpu
            && !(cpu > 0.0 && cpu <= 4.0)
        {
            return Err(invalid!("cpu {cpu} must be more than 0 and at most 4"));
        }
        if let Some(memory) = self.memory_gb
            && !(memory > 0.0 && memory <= 16.0)
        {
            return Err(invalid!(
                "memory_gb {memory} must be more than 0 and at most 16"
            ));
        }
        if self.ports.contains(&0) {
            return Err("port 0 is not a port".into());
        }
        if let Some(label) = &self.dns_name_label {
            let ok = label.len() >= 3
                && label.len() <= 63
                && label.starts_with(|c: char| c.is_ascii_lowercase())
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(invalid!(
                    "dns_name_label {label:?} must be 3-63 lowercase letters, digits and '-', starting with a letter"
                ));
            }
            if self.ports.is_empty() {
                return Err("dns_name_label needs ports to expose".into());
            }
        }
        if let Some(policy) = &self.restart_policy
            && !RESTART_POLICIES.contains(&policy.as_str())
        {
            return Err(invalid!(
                "restart_policy {policy:?} is not one of Always, OnFailure, Never"
            ));
        }
        validate_tags(&self.tags)?;
        super::validate_env_and_timeout(&self.env, self.ready_timeout_seconds)
    }
}

/// Reads the next length-prefixed field of an OpenSSH key blob (RFC 4251 `string`).
fn ssh_field<'a>(blob: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (length, rest) = blob.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    let field = rest.get(..length)?;
    *blob = &rest[length..];
    Some(field)
}

/// Azure's Linux VMs take only RSA keys of at least 2048 bits and Ed25519 keys; the blob
/// is read, not just its label, so a truncated or mislabelled key is refused here rather
/// than by ARM.
/// <https://learn.microsoft.com/azure/virtual-machines/linux/mac-create-ssh-keys#supported-ssh-key-formats>
fn check_ssh_public_key(key: &str) -> Result<(), Invalid> {
    use base64::Engine;
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(encoded)) = (parts.next(), parts.next()) else {
        return Err("ssh_public_key is not an OpenSSH public key (\"ssh-ed25519 AAAA… comment\" or \"ssh-rsa AAAA… comment\")".into());
    };
    if kind != "ssh-rsa" && kind != "ssh-ed25519" {
        return Err(invalid!(
            "ssh_public_key is a {kind} key; Azure Linux VMs take only ssh-rsa (2048 bits or more) and ssh-ed25519 keys"
        ));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("ssh_public_key: the {kind} key's data is not base64"))?;
    let mut rest = blob.as_slice();
    let damaged = || invalid!("ssh_public_key: the {kind} key's data is truncated or damaged");
    if ssh_field(&mut rest) != Some(kind.as_bytes()) {
        return Err(damaged());
    }
    if kind == "ssh-ed25519" {
        return match ssh_field(&mut rest) {
            Some(point) if point.len() == 32 && rest.is_empty() => Ok(()),
            _ => Err(damaged()),
        };
    }
    let (Some(_exponent), Some(modulus)) = (ssh_field(&mut rest), ssh_field(&mut rest)) else {
        return Err(damaged());
    };
    // An mpint: big-endian, with a leading zero byte when the top bit is set.
    let modulus = match modulus.iter().position(|b| *b != 0) {
        Some(first) => &modulus[first..],
        None => return Err(damaged()),
    };
    let bits = modulus.len() * 8 - modulus[0].leading_zeros() as usize;
    if bits < 2048 {
        return Err(invalid!(
            "ssh_public_key is a {bits}-bit RSA key; Azure takes RSA keys of 2048 bits or more"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> AzureVmSpec {
        serde_json::from_value(serde_json::json!({
            "size": "Standard_B1s",
            "image": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
            "subnet_id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/virtualNetworks/v/subnets/default",
            "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBrqcMXeHK9TbFVAntUvqrIZ+DBXzIRQgxK3oLT2lVm9 ops@example"
        }))
        .expect("minimal spec")
    }

    #[test]
    fn vm_specs_are_checked_before_any_call() {
        assert_eq!(vm().validate(), Ok(()));
        let mut bad = vm();
        bad.network_interface_id = bad.subnet_id.clone();
        assert!(bad.validate().expect_err("both").0.contains("exactly one"));
        let mut bad = vm();
        bad.image.id = Some("/subscriptions/s/providers/x".into());
        assert!(bad.validate().is_err());
        let mut bad = vm();
        bad.ssh_public_key = "hunter2".into();
        assert!(bad.validate().expect_err("key").0.contains("OpenSSH"));
        let mut rsa = vm();
        rsa.ssh_public_key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCxqgZGGKJBGNrf9o6AnJNmsBnuhhjnPdjwPsd23dCA2tH04FGLHQ2Uuv2DJ59HTvbCxV4GKnADWEK7UDcq+Rcd0f+PLx5V+XiLpaIznek6D/n4kBYgpr61V11kB2RgxLt1nxa/UFW5NjhFDkamVHARY5VrStQd+LDFiBIDuiqJlt/neopjzDTG8nCNGAAZ6+/DdU06GMCj3kIp++G9ukAVZ1W6WBopVBfZPDguNqw5YIPx0yf/MRujZdc6QPac9cT8m5/nz9j+/KIJ7c0riPoTB/jrfxD3oiflChwfoKZ+RokaLAvCfzkT6FMAu1sXbiwxJ+w+rUBWfiZgY0Fx7shH ops@example".into();
        assert_eq!(rsa.validate(), Ok(()));
        for (key, why) in [
            (
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCz04409fzNlnemM1rLYPPZfUdT45OXwp3qEnyr7eoLUOXAaY4Grq4G0AdYa9tKaXOgQfDYRD2MXGUgdnFCFrOTpc/q1zal0wGGFEhGvgQ59L9WFGbHk2aQkVtPlRIpJaFazumiUDZjEzlEpg8BmcQtrhcVH0xtdOOtntKx4kFU/Q== small",
                "1024-bit",
            ),
            (
                "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCukD8CJtCXd4SJQzyMjgqWSdiAc8UElc1h6AzWYX1duUMboNtA+rrsNcYXBSX92u6g6vu5kI7kss7+BQlOrvac= e",
                "ecdsa",
            ),
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBrqcMXeHK9TbFVAntUvqrIZ+DBXzA== me@host",
                "truncated",
            ),
            ("ssh-ed25519 not-base64!", "base64"),
        ] {
            let mut bad = vm();
            bad.ssh_public_key = key.into();
            let error = bad.validate().expect_err(why);
            assert!(error.0.contains(why), "{why}: {error}");
        }
        let mut bad = vm();
        bad.admin_username = Some("root".into());
        assert!(bad.validate().is_err());
        let mut bad = vm();
        bad.tags.insert("provisioner-x".into(), "y".into());
        assert!(bad.validate().expect_err("reserved").0.contains("reserved"));
        let mut bad = vm();
        bad.location = Some("West Europe".into());
        assert!(bad.validate().is_err());
    }

    #[test]
    fn container_specs_are_checked_before_any_call() {
        let spec: AzureContainerSpec = serde_json::from_value(
            serde_json::json!({"image": "mcr.microsoft.com/azuredocs/aci-helloworld", "ports": [80]}),
        )
        .expect("spec");
        assert_eq!(spec.validate(), Ok(()));
        let mut bad = spec.clone();
        bad.cpu = Some(0.0);
        assert!(bad.validate().is_err());
        let mut bad = spec.clone();
        bad.restart_policy = Some("Sometimes".into());
        assert!(bad.validate().is_err());
        let mut bad = spec.clone();
        bad.dns_name_label = Some("-x".into());
        assert!(bad.validate().is_err());
    }
}
