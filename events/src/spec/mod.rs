//! The `spec` of each platform: its parameters, part of the public contract.
//!
//! A request carries its spec as a JSON object; the platform's worker reads it into the
//! type here, so a producer can validate against the generated schema before publishing.

pub mod aws_ec2;
pub mod aws_ecs;
pub mod azure;
pub mod docker;
pub mod gcp;
pub mod kubernetes;
pub mod process;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Invalid;
use crate::invalid::invalid;

/// How to tell that a resource is ready. Any HTTP answer counts as healthy, 404 included:
/// the check asks "is something serving", not "is the app happy".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheck {
    /// An HTTP GET of `path` on `port`.
    Http {
        /// Defaults to the first published port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default = "root_path")]
        path: String,
    },
    /// A TCP connection to `port`.
    Tcp {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
}

fn root_path() -> String {
    "/".into()
}

impl HealthCheck {
    pub fn port(&self) -> Option<u16> {
        match self {
            HealthCheck::Http { port, .. } | HealthCheck::Tcp { port } => *port,
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.port() == Some(0) {
            return Err("health check port 0 is not a port".into());
        }
        if let HealthCheck::Http { path, .. } = self
            && (!path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err(invalid!(
                "health check path {path:?} must start with '/' and contain no spaces or control characters"
            ));
        }
        Ok(())
    }
}

/// Checks environment variable names and the readiness timeout, common to every spec.
pub(crate) fn validate_env_and_timeout(
    env: &std::collections::BTreeMap<String, String>,
    ready_timeout_seconds: Option<u64>,
) -> Result<(), Invalid> {
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(invalid!("environment variable name {key:?} is not valid"));
        }
    }
    validate_ready_timeout(ready_timeout_seconds)
}

/// The longest readiness wait a spec may ask for: a day. The worker's own operation
/// timeout usually ends a platform call sooner; this bound keeps every deadline computed
/// from request data far from overflowing.
pub const MAX_READY_TIMEOUT_SECONDS: u64 = 24 * 3600;

pub(crate) fn validate_ready_timeout(ready_timeout_seconds: Option<u64>) -> Result<(), Invalid> {
    match ready_timeout_seconds {
        Some(0) => Err("ready_timeout_seconds must be at least 1".into()),
        Some(seconds) if seconds > MAX_READY_TIMEOUT_SECONDS => Err(invalid!(
            "ready_timeout_seconds {seconds} is over a day ({MAX_READY_TIMEOUT_SECONDS})"
        )),
        _ => Ok(()),
    }
}

/// Tags an AWS resource takes besides the worker's own; `aws:` and `provisioner:` keys
/// are reserved.
pub(crate) fn validate_aws_tags(
    tags: &std::collections::BTreeMap<String, String>,
) -> Result<(), Invalid> {
    for (key, value) in tags {
        if key.is_empty()
            || key.chars().count() > 128
            || value.chars().count() > 256
            || key.to_ascii_lowercase().starts_with("aws:")
            || key.starts_with("provisioner:")
        {
            return Err(invalid!(
                "tag {key:?}: keys are 1 to 128 characters, values at most 256, and aws: (any case) and provisioner: are reserved"
            ));
        }
    }
    Ok(())
}

/// Tags on one AWS resource, at most (EC2 and ECS alike).
pub const MAX_AWS_TAGS: usize = 50;

/// Whether `text` keeps to the characters ECS (and EC2 tags exposed in instance metadata)
/// allow in tags: letters, digits, spaces and `+ - = . _ : / @`.
fn is_ecs_tag_text(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_alphanumeric() || c == ' ' || "+-=._:/@".contains(c))
}

/// Checks the tags an AWS resource gets from a request: its labels, the spec's `tags` over
/// them, and `own` tags the worker adds. At most [`MAX_AWS_TAGS`] in all; with
/// `ecs_charset`, keys and values keep to ECS's characters (RunTask refuses others).
pub fn check_aws_resource_tags(
    labels: &std::collections::BTreeMap<String, String>,
    spec_tags: &std::collections::BTreeMap<String, String>,
    own: usize,
    ecs_charset: bool,
) -> Result<(), Invalid> {
    let mut tags = labels.clone();
    tags.extend(spec_tags.clone());
    validate_aws_tags(&tags)?;
    if tags.len() + own > MAX_AWS_TAGS {
        return Err(invalid!(
            "{} labels and tags, plus the worker's own {own}, exceed AWS's {MAX_AWS_TAGS} tags per resource",
            tags.len()
        ));
    }
    if ecs_charset
        && let Some((key, _)) = tags
            .iter()
            .find(|(key, value)| !is_ecs_tag_text(key) || !is_ecs_tag_text(value))
    {
        return Err(invalid!(
            "label or tag {key:?}: ECS tags take only letters, digits, spaces and + - = . _ : / @ in keys and values"
        ));
    }
    Ok(())
}

/// The spec's own `count`, kept so older producers' requests still read: it may only be
/// 1. Several resources are a fleet, asked for by the request's `count`.
pub(crate) fn validate_single_count(count: Option<u32>, what: &str) -> Result<(), Invalid> {
    match count {
        None | Some(1) => Ok(()),
        Some(n) => Err(invalid!(
            "spec count {n}: a spec describes one {what}; for {n} of them set the request's \"count\" (a fleet) and leave the spec's out"
        )),
    }
}

/// Reads a spec object into a platform's spec type with a message naming the platform.
pub fn parse_spec<T: serde::de::DeserializeOwned>(
    platform: &str,
    spec: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, Invalid> {
    serde_json::from_value(serde_json::Value::Object(spec.clone())).map_err(|e| {
        invalid!(
            "invalid {platform} spec: {}",
            crate::invalid::without_values(&e.to_string())
        )
    })
}

/// A platform's spec type: the platform it belongs to, and its checks that need no worker
/// policy and no platform API. [`read_spec`] (and [`Request::spec_as`](crate::Request::spec_as))
/// read any of them the same way, so a platform needs no reader of its own.
pub trait PlatformSpec: serde::de::DeserializeOwned {
    const PLATFORM: crate::PlatformName;

    fn check(&self) -> Result<(), Invalid>;
}

/// Implements [`PlatformSpec`] for every spec type of the platform list
/// ([`for_each_platform!`](crate::for_each_platform)), and gives [`validate_spec`] and
/// [`spec_schemas`] from it.
macro_rules! platform_specs {
    ($(
        $(#[doc = $doc:literal])*
        $platform:ident = $wire:literal, spec $spec:ty, feature $feature:literal, setup $setup:ident;
    )*) => {
        $(impl PlatformSpec for $spec {
            const PLATFORM: crate::PlatformName = crate::PlatformName::$platform;

            fn check(&self) -> Result<(), Invalid> {
                <$spec>::validate(self)
            }
        })*

        /// Reads and checks `spec` as `platform`'s spec, everything that needs no worker
        /// policy and no platform API (the worker adds its own policy on top).
        pub fn validate_spec(
            platform: crate::PlatformName,
            spec: &serde_json::Map<String, serde_json::Value>,
        ) -> Result<(), Invalid> {
            match platform {
                $(crate::PlatformName::$platform => read_spec::<$spec>(spec).map(drop),)*
            }
        }

        /// Every platform's spec schema, generated from its type.
        pub fn spec_schemas() -> Vec<(crate::PlatformName, schemars::Schema)> {
            vec![$((crate::PlatformName::$platform, schemars::schema_for!($spec)),)*]
        }
    };
}

crate::for_each_platform!(platform_specs);

/// Reads `spec` as platform `S`'s spec and checks it.
pub fn read_spec<S: PlatformSpec>(
    spec: &serde_json::Map<String, serde_json::Value>,
) -> Result<S, Invalid> {
    let read: S = parse_spec(S::PLATFORM.as_str(), spec)?;
    read.check()?;
    Ok(read)
}
