//! The `aws-ecs` platform's spec: one ECS task (Fargate by default).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::invalid::invalid;

/// One ECS task, from a registered task definition or from an inline container that the
/// worker registers as a task definition of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "aws-ecs spec")]
pub struct AwsEcsSpec {
    /// The cluster's name or ARN.
    pub cluster: String,
    /// `family`, `family:revision` or a task definition ARN. Exactly one of this and
    /// `container` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_definition: Option<String>,
    /// A single container to run; the worker registers it as a task definition whose
    /// family is derived from its content, so the same container reuses one definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<InlineContainer>,
    /// `FARGATE` (default), `EC2` or `EXTERNAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_type: Option<String>,
    /// Fargate platform version, e.g. `LATEST` or `1.4.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_version: Option<String>,
    /// The awsvpc network configuration: required for `FARGATE` (its tasks always use the
    /// awsvpc network mode), optional for `EC2` task definitions in awsvpc mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<AwsVpcNetwork>,
    /// Per-container overrides of command and environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<ContainerOverride>,
    /// Identical tasks to run; only 1 is supported for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Tags set on the task besides the request's labels and the worker's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Also wait for the task's health status to be `HEALTHY` (its task definition must
    /// define a container health check).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_healthy: bool,
    /// How long the task may take to run (and be healthy). Default 300 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// A container the worker registers as a one-container task definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InlineContainer {
    /// The image, e.g. `public.ecr.aws/nginx/nginx:1.27`.
    pub image: String,
    /// Task CPU units (256 = ¼ vCPU). Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Task memory in MiB. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Container ports to expose (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The role ECS uses to pull the image and write logs (needed for private registries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AwsVpcNetwork {
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub assign_public_ip: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerOverride {
    /// The container's name in the task definition (`main` for an inline container).
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// The container name of an inline container's task definition.
pub const INLINE_CONTAINER_NAME: &str = "main";

const LAUNCH_TYPES: [&str; 3] = ["FARGATE", "EC2", "EXTERNAL"];

fn is_name(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl AwsEcsSpec {
    /// The launch type to use.
    pub fn launch_type(&self) -> &str {
        self.launch_type.as_deref().unwrap_or("FARGATE")
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if !(is_name(&self.cluster, 255) || self.cluster.starts_with("arn:")) {
            return Err(invalid!(
                "cluster {:?} is not a cluster name (letters, digits, '-', '_') or ARN",
                self.cluster
            ));
        }
        match (&self.task_definition, &self.container) {
            (Some(_), Some(_)) => {
                return Err("give either task_definition or container, not both".into());
            }
            (None, None) => {
                return Err(
                    "give a task_definition (family[:revision] or ARN) or a container to run"
                        .into(),
                );
            }
            (Some(definition), None) => {
                let (family, revision) = definition
                    .split_once(':')
                    .filter(|_| !definition.starts_with("arn:"))
                    .map_or((definition.as_str(), None), |(f, r)| (f, Some(r)));
                let ok = definition.starts_with("arn:")
                    || (is_name(family, 255)
                        && revision.is_none_or(|r| {
                            !r.is_empty() && r.chars().all(|c| c.is_ascii_digit())
                        }));
                if !ok {
                    return Err(invalid!(
                        "task_definition {definition:?} is not family, family:revision or an ARN"
                    ));
                }
            }
            (None, Some(container)) => container.validate()?,
        }
        if !LAUNCH_TYPES.contains(&self.launch_type()) {
            return Err(invalid!(
                "launch_type {:?} is not one of FARGATE, EC2, EXTERNAL",
                self.launch_type()
            ));
        }
        if self.launch_type() == "FARGATE" && self.network.is_none() {
            return Err("a FARGATE task needs \"network\": {\"subnets\": [\"subnet-…\"], \"security_groups\": [\"sg-…\"], \"assign_public_ip\": true|false} (Fargate tasks use the awsvpc network mode; in a public subnet without a NAT gateway, assign_public_ip must be true for the image to be pulled)".into());
        }
        if let (Some(container), "FARGATE") = (&self.container, self.launch_type()) {
            container.check_fargate_size()?;
        }
        if let Some(network) = &self.network {
            if network.subnets.is_empty() || network.subnets.len() > 16 {
                return Err("network.subnets needs 1 to 16 subnet ids".into());
            }
            if network.security_groups.len() > 5 {
                return Err("network.security_groups takes at most 5 groups".into());
            }
            for id in network.subnets.iter().chain(&network.security_groups) {
                if !(id.starts_with("subnet-") || id.starts_with("sg-"))
                    || id.chars().any(|c| !c.is_ascii_alphanumeric() && c != '-')
                {
                    return Err(invalid!(
                        "{id:?} is not a subnet (subnet-…) or group (sg-…) id"
                    ));
                }
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            if !is_name(&o.name, 255) {
                return Err(invalid!(
                    "overrides[{i}].name {:?} is not a container name",
                    o.name
                ));
            }
            super::validate_env_and_timeout(&o.env, None)?;
        }
        super::validate_single_count(self.count, "task")?;
        super::validate_aws_tags(&self.tags)?;
        super::validate_ready_timeout(self.ready_timeout_seconds)?;
        Ok(())
    }
}

/// Fargate's task sizes: for each CPU value, the memory (MiB) it takes, as (from, to, step).
/// <https://docs.aws.amazon.com/AmazonECS/latest/developerguide/fargate-tasks-services.html#fargate-tasks-size>
const FARGATE_SIZES: [(u32, u32, u32, u32); 7] = [
    (256, 512, 2048, 512),
    (512, 1024, 4096, 1024),
    (1024, 2048, 8192, 1024),
    (2048, 4096, 16_384, 1024),
    (4096, 8192, 30_720, 1024),
    (8192, 16_384, 61_440, 4096),
    (16_384, 32_768, 122_880, 8192),
];

impl InlineContainer {
    /// CPU units and memory as the task definition gets them.
    pub fn cpu_and_memory(&self) -> (u32, u32) {
        (self.cpu.unwrap_or(256), self.memory_mib.unwrap_or(512))
    }

    /// Fargate offers only some CPU and memory pairs; RunTask refuses the others.
    fn check_fargate_size(&self) -> Result<(), Invalid> {
        let (cpu, memory) = self.cpu_and_memory();
        let Some(&(_, from, to, step)) = FARGATE_SIZES.iter().find(|size| size.0 == cpu) else {
            return Err(invalid!(
                "container.cpu {cpu} is not a Fargate size: 256, 512, 1024, 2048, 4096, 8192 or 16384"
            ));
        };
        // 256 CPU units take 512, 1024 or 2048 MiB; the others a range in steps.
        let offered = if cpu == 256 {
            [512, 1024, 2048].contains(&memory)
        } else {
            (from..=to).contains(&memory) && (memory - from) % step == 0
        };
        if !offered {
            return Err(invalid!(
                "container.memory_mib {memory} is not offered with cpu {cpu} on Fargate: {}",
                if cpu == 256 {
                    "512, 1024 or 2048".to_owned()
                } else {
                    format!("{from} to {to} in steps of {step}")
                }
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.image.is_empty()
            || self.image.len() > 255
            || self
                .image
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid!(
                "container.image {:?} is not an image reference",
                self.image
            ));
        }
        if let Some(cpu) = self.cpu
            && !(128..=16_384).contains(&cpu)
        {
            return Err(invalid!(
                "container.cpu {cpu} must be 128 to 16384 CPU units"
            ));
        }
        if let Some(memory) = self.memory_mib
            && !(512..=122_880).contains(&memory)
        {
            return Err(invalid!(
                "container.memory_mib {memory} must be 512 to 122880"
            ));
        }
        if self.ports.contains(&0) {
            return Err("container.ports: 0 is not a port".into());
        }
        super::validate_env_and_timeout(&self.env, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::check_aws_resource_tags;

    fn spec(value: serde_json::Value) -> AwsEcsSpec {
        serde_json::from_value(value).expect("an ECS spec")
    }

    fn network() -> serde_json::Value {
        serde_json::json!({"subnets": ["subnet-0abc"], "assign_public_ip": true})
    }

    #[test]
    fn a_fargate_task_without_a_network_is_refused_with_what_to_add() {
        let without = spec(serde_json::json!({"cluster": "c", "task_definition": "web:1"}));
        let error = without.validate().expect_err("Fargate needs awsvpc");
        assert!(
            error.0.contains("\"network\"") && error.0.contains("assign_public_ip"),
            "{error}"
        );
        let with = spec(
            serde_json::json!({"cluster": "c", "task_definition": "web:1", "network": network()}),
        );
        assert_eq!(with.validate(), Ok(()));
        let on_ec2 = spec(
            serde_json::json!({"cluster": "c", "task_definition": "web:1", "launch_type": "EC2"}),
        );
        assert_eq!(on_ec2.validate(), Ok(()), "bridge mode needs no network");
    }

    #[test]
    fn only_the_cpu_and_memory_pairs_fargate_offers_are_taken() {
        let sized = |cpu: u32, memory: u32| {
            spec(serde_json::json!({
                "cluster": "c", "network": network(),
                "container": {"image": "nginx", "cpu": cpu, "memory_mib": memory}
            }))
            .validate()
        };
        for (cpu, memory) in [
            (256, 512),
            (256, 2048),
            (512, 4096),
            (1024, 3072),
            (4096, 30_720),
            (8192, 20_480),
            (16_384, 40_960),
        ] {
            assert_eq!(sized(cpu, memory), Ok(()), "{cpu}/{memory}");
        }
        for (cpu, memory) in [
            (256, 4096),
            (512, 512),
            (1024, 2500),
            (8192, 18_432),
            (300, 1024),
            (16_384, 30_720),
        ] {
            assert!(sized(cpu, memory).is_err(), "{cpu}/{memory}");
        }
        let on_ec2 = spec(serde_json::json!({
            "cluster": "c", "launch_type": "EC2",
            "container": {"image": "nginx", "cpu": 300, "memory_mib": 700}
        }));
        assert_eq!(on_ec2.validate(), Ok(()), "EC2 capacity takes any size");
    }

    #[test]
    fn tags_keep_to_ecs_characters_and_the_fifty_tag_limit() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let none = BTreeMap::new();
        assert_eq!(
            check_aws_resource_tags(&labels(&[("team", "data eng@x.io")]), &none, 2, true),
            Ok(())
        );
        assert!(check_aws_resource_tags(&labels(&[("team", "a,b")]), &none, 2, true).is_err());
        assert!(
            check_aws_resource_tags(&labels(&[("team", "a,b")]), &none, 3, false).is_ok(),
            "EC2 takes any character"
        );
        assert!(check_aws_resource_tags(&none, &labels(&[("AWS:x", "1")]), 2, false).is_err());
        let many: BTreeMap<String, String> =
            (0..48).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert_eq!(check_aws_resource_tags(&many, &none, 2, true), Ok(()));
        let error = check_aws_resource_tags(&many, &none, 3, false).expect_err("51 tags");
        assert!(error.0.contains("50"), "{error}");
        // A spec tag over a label of the same key is one tag, not two.
        assert_eq!(
            check_aws_resource_tags(&many, &labels(&[("k0", "other")]), 2, true),
            Ok(())
        );
    }
}
