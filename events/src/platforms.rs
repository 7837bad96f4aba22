//! The one list of platforms. Each line names a platform once: its [`PlatformName`]
//! variant and wire name, its spec type, the cargo feature that builds its worker in, and
//! the function of `provisioner-platforms` that sets it up. This crate generates
//! [`PlatformName`], the [`PlatformSpec`](crate::spec::PlatformSpec) of every spec type,
//! [`validate_spec`](crate::spec::validate_spec) and the spec schemas from it;
//! `provisioner-platforms` generates its feature table and its constructor dispatch from
//! the same list. A new platform is its crate (and its spec type) plus one line here.
//!
//! The list is a callback macro: [`for_each_platform!`] hands the whole list to the macro
//! it is given, which picks the columns it needs. The feature and setup columns are only
//! tokens here; this crate depends on no platform.

/// Calls `$callback! { ... }` with every platform, one per line:
/// `doc comments  Variant = "wire-name", spec SpecType, feature "cargo-feature", setup function;`
#[macro_export]
macro_rules! for_each_platform {
    ($callback:ident) => {
        $callback! {
            /// Containers on a Docker engine, or Podman's Docker-compatible API.
            Docker = "docker", spec $crate::spec::docker::DockerSpec, feature "docker", setup docker;
            /// A local command from the worker's allow-list, health-checked on its port.
            Process = "process", spec $crate::spec::process::ProcessSpec, feature "process", setup process;
            AwsEc2 = "aws-ec2", spec $crate::spec::aws_ec2::AwsEc2Spec, feature "aws-ec2", setup aws_ec2;
            AwsEcs = "aws-ecs", spec $crate::spec::aws_ecs::AwsEcsSpec, feature "aws-ecs", setup aws_ecs;
            Kubernetes = "kubernetes", spec $crate::spec::kubernetes::KubernetesSpec, feature "kubernetes", setup kubernetes;
            GcpCompute = "gcp-compute", spec $crate::spec::gcp::GcpComputeSpec, feature "gcp", setup gcp_compute;
            GcpCloudRun = "gcp-cloud-run", spec $crate::spec::gcp::GcpCloudRunSpec, feature "gcp", setup gcp_cloud_run;
            AzureVm = "azure-vm", spec $crate::spec::azure::AzureVmSpec, feature "azure", setup azure_vm;
            AzureContainerInstances = "azure-container-instances", spec $crate::spec::azure::AzureContainerSpec, feature "azure", setup azure_container_instances;
        }
    };
}

/// Generates [`PlatformName`] from the list.
macro_rules! platform_names {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $wire:literal, spec $spec:ty, feature $feature:literal, setup $setup:ident;
    )*) => {
        /// A platform a worker can provision on. The wire name is the kebab-case string.
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, schemars::JsonSchema,
        )]
        pub enum PlatformName {
            $(
                $(#[doc = $doc])*
                #[serde(rename = $wire)]
                $variant,
            )*
        }

        impl PlatformName {
            pub const ALL: [PlatformName; [$($wire),*].len()] = [$(PlatformName::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(PlatformName::$variant => $wire,)*
                }
            }
        }
    };
}

for_each_platform!(platform_names);
