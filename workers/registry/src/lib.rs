//! The registry of platforms: for each platform a binary can serve, the cargo feature that
//! builds it in and how it is set up from configuration. The daemon, the embedded mode and
//! the Lambda all build their platform through [`build`].
//!
//! Every platform is listed once, in `provisioner_events`' platform list
//! ([`provisioner_events::for_each_platform!`], which needs no SDK): its name, spec type,
//! feature and setup function. This crate reads the feature and setup columns of that
//! list ([`registry!`]). Adding a platform is its crate, its line there, its feature in this
//! crate's manifest (and the binaries'), and its setup function below; a platform whose
//! setup function is missing here does not compile.

use std::sync::Arc;

use provisioner_core::{Platform, SetupError};
use provisioner_events::PlatformName;

/// The settings a platform takes from its binary rather than from the environment: the
/// policies an operator sets by flag, and an AWS configuration already loaded.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Settings {
    /// The Docker engine (`unix:///path` or `tcp://host:port`); `None` reads `DOCKER_HOST`.
    #[cfg(feature = "docker")]
    pub docker_host: Option<String>,
    #[cfg(feature = "docker")]
    pub docker_policy: provisioner_docker::DockerPolicy,
    #[cfg(feature = "process")]
    pub process_policy: provisioner_process::ProcessPolicy,
    /// The AWS configuration, when the binary loaded it already (the Lambda shares one with
    /// its SQS client); `None` loads the standard one.
    #[cfg(any(feature = "aws-ec2", feature = "aws-ecs"))]
    pub aws_config: Option<provisioner_aws_common::SdkConfig>,
}

/// Why a platform could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// This binary was compiled without the platform.
    #[error(
        "this binary was built without the {platform} platform; build it with `--features {feature}`"
    )]
    NotBuiltIn {
        platform: PlatformName,
        feature: &'static str,
    },
    /// The platform is built in but its configuration or endpoint is not usable.
    #[error("{platform}: {source}")]
    Setup {
        platform: PlatformName,
        source: SetupError,
    },
}

/// Builds the feature table and the constructor dispatch from the platform list.
macro_rules! registry {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $wire:literal, spec $spec:ty, feature $feature:literal, setup $setup:ident;
    )*) => {
        /// The cargo feature (of this crate, and of the binaries that forward it) that
        /// builds `platform` in.
        pub fn feature_of(platform: PlatformName) -> &'static str {
            match platform {
                $( PlatformName::$variant => $feature, )*
            }
        }

        /// The platforms this binary was built with.
        pub fn built_in() -> Vec<PlatformName> {
            [$( (PlatformName::$variant, cfg!(feature = $feature)), )*]
                .into_iter()
                .filter_map(|(platform, built)| built.then_some(platform))
                .collect()
        }

        /// Sets `platform` up from `settings` and the environment, checking what can be
        /// checked at start (a region, credentials, an engine that answers), so a
        /// misconfigured worker fails before it takes any request.
        pub async fn build(
            platform: PlatformName,
            settings: &Settings,
        ) -> Result<Arc<dyn Platform>, BuildError> {
            let _ = settings;
            match platform {
                $(
                    #[cfg(feature = $feature)]
                    PlatformName::$variant => $setup(settings)
                        .await
                        .map_err(|source| BuildError::Setup { platform, source }),
                )*
                // Reached only in a binary built without some platform's feature.
                #[allow(unreachable_patterns)]
                other => Err(BuildError::NotBuiltIn {
                    platform: other,
                    feature: feature_of(other),
                }),
            }
        }
    };
}

provisioner_events::for_each_platform!(registry);

/// What a platform's worker may do on its cloud: its permission manifest, and the policy
/// document that grants exactly that, where the cloud has one to hand out.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Permissions {
    pub manifest: &'static [provisioner_core::permissions::Permission],
    /// The document to hand the cloud, as text. AWS: the IAM policy (JSON). Azure: the
    /// custom roles of both workers, each to assign at the scope its description names
    /// (JSON). GCP: the predefined roles to bind, where, and the permissions of each the
    /// worker uses (JSON). Kubernetes: the Role's rules (YAML).
    pub policy: Option<String>,
}

/// `platform`'s [`Permissions`], without setting it up (no credentials needed).
pub fn permissions(platform: PlatformName) -> Result<Permissions, BuildError> {
    let none = Permissions {
        manifest: &[],
        policy: None,
    };
    match platform {
        #[cfg(feature = "aws-ec2")]
        PlatformName::AwsEc2 => Ok(Permissions {
            manifest: provisioner_aws_ec2::permissions::PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                provisioner_aws_ec2::permissions::iam_policy()
            )),
        }),
        #[cfg(feature = "aws-ecs")]
        PlatformName::AwsEcs => Ok(Permissions {
            manifest: provisioner_aws_ecs::permissions::PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                provisioner_aws_ecs::permissions::iam_policy()
            )),
        }),
        #[cfg(feature = "azure")]
        PlatformName::AzureVm => Ok(Permissions {
            manifest: provisioner_azure::permissions::VM_PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                serde_json::json!(provisioner_azure::permissions::roles())
            )),
        }),
        #[cfg(feature = "azure")]
        PlatformName::AzureContainerInstances => Ok(Permissions {
            manifest: provisioner_azure::permissions::ACI_PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                serde_json::json!(provisioner_azure::permissions::roles())
            )),
        }),
        #[cfg(feature = "gcp")]
        PlatformName::GcpCompute => Ok(Permissions {
            manifest: provisioner_gcp::permissions::COMPUTE_PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                gcp_roles(provisioner_gcp::permissions::COMPUTE_ROLES)
            )),
        }),
        #[cfg(feature = "gcp")]
        PlatformName::GcpCloudRun => Ok(Permissions {
            manifest: provisioner_gcp::permissions::CLOUD_RUN_PERMISSIONS,
            policy: Some(format!(
                "{:#}",
                gcp_roles(provisioner_gcp::permissions::CLOUD_RUN_ROLES)
            )),
        }),
        #[cfg(feature = "kubernetes")]
        PlatformName::Kubernetes => Ok(Permissions {
            manifest: provisioner_kubernetes::permissions::PERMISSIONS,
            policy: Some(provisioner_kubernetes::permissions::role_rules()),
        }),
        // Built in, but acting on this host: no cloud rights.
        other if built_in().contains(&other) => Ok(none),
        other => Err(BuildError::NotBuiltIn {
            platform: other,
            feature: feature_of(other),
        }),
    }
}

/// GCP's documented grants: each predefined role, where to bind it, and the permissions
/// of it the worker uses.
#[cfg(feature = "gcp")]
fn gcp_roles(roles: &[provisioner_gcp::permissions::DocumentedRole]) -> serde_json::Value {
    serde_json::json!(
        roles
            .iter()
            .map(|r| serde_json::json!({"role": r.role, "bind_on": r.scope, "used": r.permissions}))
            .collect::<Vec<_>>()
    )
}

#[cfg(feature = "docker")]
async fn docker(settings: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    let docker = provisioner_docker::DockerPlatform::connect(
        settings.docker_host.as_deref(),
        settings.docker_policy.clone(),
    )
    .await?;
    Ok(Arc::new(docker))
}

#[cfg(feature = "process")]
async fn process(settings: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    Ok(Arc::new(provisioner_process::ProcessPlatform::new(
        settings.process_policy.clone(),
    )))
}

#[cfg(feature = "aws-ec2")]
async fn aws_ec2(settings: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    use provisioner_aws_ec2::Ec2Platform;
    Ok(Arc::new(match &settings.aws_config {
        Some(config) => Ec2Platform::from_config(config),
        None => Ec2Platform::from_environment().await?,
    }))
}

#[cfg(feature = "aws-ecs")]
async fn aws_ecs(settings: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    use provisioner_aws_ecs::EcsPlatform;
    Ok(Arc::new(match &settings.aws_config {
        Some(config) => EcsPlatform::from_config(config),
        None => EcsPlatform::from_environment().await?,
    }))
}

#[cfg(feature = "kubernetes")]
async fn kubernetes(_: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    Ok(Arc::new(
        provisioner_kubernetes::KubernetesPlatform::from_environment().await?,
    ))
}

#[cfg(feature = "gcp")]
async fn gcp_compute(_: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    let settings = provisioner_gcp::GcpSettings::from_environment()?;
    Ok(Arc::new(
        provisioner_gcp::ComputePlatform::new(settings).await?,
    ))
}

#[cfg(feature = "gcp")]
async fn gcp_cloud_run(_: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    let settings = provisioner_gcp::GcpSettings::from_environment()?;
    Ok(Arc::new(
        provisioner_gcp::CloudRunPlatform::new(settings).await?,
    ))
}

#[cfg(feature = "azure")]
async fn azure_vm(_: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    let settings = provisioner_azure::AzureSettings::from_environment()?;
    Ok(Arc::new(provisioner_azure::VmPlatform::new(settings)?))
}

#[cfg(feature = "azure")]
async fn azure_container_instances(_: &Settings) -> Result<Arc<dyn Platform>, SetupError> {
    let settings = provisioner_azure::AzureSettings::from_environment()?;
    Ok(Arc::new(
        provisioner_azure::ContainerInstancesPlatform::new(settings)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_platform_has_a_feature_and_the_built_in_ones_are_known() {
        for platform in PlatformName::ALL {
            assert!(!feature_of(platform).is_empty());
        }
        for platform in built_in() {
            assert!(PlatformName::ALL.contains(&platform));
        }
    }

    #[tokio::test]
    async fn a_platform_left_out_of_the_build_names_its_feature() {
        for platform in PlatformName::ALL {
            if built_in().contains(&platform) {
                continue;
            }
            match build(platform, &Settings::default()).await {
                Err(BuildError::NotBuiltIn { feature, .. }) => {
                    assert_eq!(feature, feature_of(platform));
                }
                Err(other) => panic!("{platform}: {other}"),
                Ok(_) => panic!("{platform} was built without its feature"),
            }
        }
    }
}
