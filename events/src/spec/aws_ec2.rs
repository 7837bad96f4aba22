//! The `aws-ec2` platform's spec: one EC2 instance.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HealthCheck;

use crate::Invalid;
use crate::invalid::invalid;

/// One EC2 instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "aws-ec2 spec")]
pub struct AwsEc2Spec {
    /// The AMI, e.g. `ami-12345678`.
    pub image_id: String,
    /// e.g. `t3.micro`.
    pub instance_type: String,
    /// Identical instances to run; only 1 is supported for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// Plain text; the worker encodes it. At most 16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Tags set on the instance besides the request's labels and the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// A TCP or HTTP check on the instance's address (the port is required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// How long the instance may take to run (and pass its check). Default 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RootVolume {
    pub size_gib: u32,
    /// `gp3` (default), `gp2`, `io1`, `io2`, `st1`, `sc1`, `standard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<String>,
}

const MAX_USER_DATA: usize = 16 * 1024;

fn is_id(value: &str, prefix: &str) -> bool {
    value.strip_prefix(prefix).is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

impl AwsEc2Spec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !is_id(&self.image_id, "ami-") {
            return Err(invalid!(
                "image_id {:?} is not an AMI id (ami- and 8 or 17 lowercase hex digits)",
                self.image_id
            ));
        }
        let type_ok = self
            .instance_type
            .split_once('.')
            .is_some_and(|(family, size)| {
                !family.is_empty()
                    && !size.is_empty()
                    && self.instance_type.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
                    })
            });
        if !type_ok {
            return Err(invalid!(
                "instance_type {:?} is not an instance type like t3.micro",
                self.instance_type
            ));
        }
        super::validate_single_count(self.count, "instance")?;
        if let Some(subnet) = &self.subnet_id
            && !is_id(subnet, "subnet-")
        {
            return Err(invalid!("subnet_id {subnet:?} is not a subnet id"));
        }
        for group in &self.security_group_ids {
            if !is_id(group, "sg-") {
                return Err(invalid!(
                    "security group {group:?} is not a security group id (sg-…)"
                ));
            }
        }
        if self
            .user_data
            .as_ref()
            .is_some_and(|d| d.len() > MAX_USER_DATA)
        {
            return Err(invalid!("user_data is over {MAX_USER_DATA} bytes"));
        }
        super::validate_aws_tags(&self.tags)?;
        if let Some(volume) = &self.root_volume {
            if volume.size_gib == 0 || volume.size_gib > 16_384 {
                return Err("root_volume.size_gib must be 1 to 16384".into());
            }
            if let Some(kind) = &volume.volume_type
                && !["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"].contains(&kind.as_str())
            {
                return Err(invalid!(
                    "root_volume.volume_type {kind:?} is not an EBS volume type"
                ));
            }
        }
        if let Some(health) = &self.health {
            health.validate()?;
            if health.port().is_none() {
                return Err("an EC2 health check needs a port".into());
            }
        }
        super::validate_ready_timeout(self.ready_timeout_seconds)
    }
}
