//! JSON Schemas generated from the types of this crate, for producers in other languages.
//! `events/schema/*.json` holds them committed; `tests/schema.rs` fails when they drift.

use crate::spec::{
    aws_ec2::AwsEc2Spec,
    aws_ecs::AwsEcsSpec,
    azure::{AzureContainerSpec, AzureVmSpec},
    docker::DockerSpec,
    gcp::{GcpCloudRunSpec, GcpComputeSpec},
    kubernetes::KubernetesSpec,
    process::ProcessSpec,
};
use crate::{Request, StatusEvent};

/// Every published schema: its file name under `events/schema/` and its JSON text.
pub fn all() -> Vec<(&'static str, String)> {
    let render = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
        text.push('\n');
        text
    };
    vec![
        (
            "request.schema.json",
            render(schemars::schema_for!(Request)),
        ),
        (
            "status-event.schema.json",
            render(schemars::schema_for!(StatusEvent)),
        ),
        (
            "spec-docker.schema.json",
            render(schemars::schema_for!(DockerSpec)),
        ),
        (
            "spec-aws-ec2.schema.json",
            render(schemars::schema_for!(AwsEc2Spec)),
        ),
        (
            "spec-aws-ecs.schema.json",
            render(schemars::schema_for!(AwsEcsSpec)),
        ),
        (
            "spec-kubernetes.schema.json",
            render(schemars::schema_for!(KubernetesSpec)),
        ),
        (
            "spec-gcp-compute.schema.json",
            render(schemars::schema_for!(GcpComputeSpec)),
        ),
        (
            "spec-gcp-cloud-run.schema.json",
            render(schemars::schema_for!(GcpCloudRunSpec)),
        ),
        (
            "spec-azure-vm.schema.json",
            render(schemars::schema_for!(AzureVmSpec)),
        ),
        (
            "spec-azure-container-instances.schema.json",
            render(schemars::schema_for!(AzureContainerSpec)),
        ),
        (
            "spec-process.schema.json",
            render(schemars::schema_for!(ProcessSpec)),
        ),
    ]
}
