//! What the AWS platforms share, kept apart from the heavy per-service SDK crates: loading
//! the standard AWS configuration with a clear error when it is unusable, and turning an
//! SDK error into a [`PlatformError`] while the typed error is at hand.

pub use aws_config::SdkConfig;
pub use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use provisioner_core::{Finding, PlatformError, SetupError};
use provisioner_events::ErrorClass;

/// Loads the standard AWS configuration (environment, profile, web identity, ECS task or
/// EC2 instance role; `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_<SERVICE>` for an emulator)
/// and checks that a region and usable credentials exist, so a worker without them fails
/// at start with a message saying which, not at its first request.
pub async fn load_config() -> Result<SdkConfig, SetupError> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    config.region().ok_or_else(|| {
        SetupError::config("no AWS region: set AWS_REGION (or a profile's region)")
    })?;
    let credentials = config
        .credentials_provider()
        .ok_or_else(|| SetupError::config("no AWS credentials provider is configured"))?;
    aws_credential_types::provider::ProvideCredentials::provide_credentials(&credentials)
        .await
        .map_err(|e| {
            SetupError::config(format!(
                "no usable AWS credentials: {e} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a role)"
            ))
        })?;
    Ok(config)
}

/// Where an AWS worker acts and with which key, for its preflight: the region, and the
/// access key's kind (its id's prefix tells a long-term IAM user key, `AKIA`, from
/// temporary credentials of a role or session, `ASIA`), never the secret.
pub async fn identity_findings(
    region: Option<String>,
    provider: Option<aws_credential_types::provider::SharedCredentialsProvider>,
) -> Vec<Finding> {
    use aws_credential_types::provider::ProvideCredentials;
    let mut findings = vec![match region {
        Some(region) => Finding::pass("region", region),
        None => Finding::fail(
            "region",
            "no AWS region: set AWS_REGION (or a profile's region)",
        ),
    }];
    findings.push(match provider {
        // Only a platform built around a ready client has none here; one built from the
        // environment failed at start without a provider.
        None => Finding::warn("credentials", "not known: the platform was given a ready client"),
        Some(provider) => match provider.provide_credentials().await {
            Ok(credentials) => {
                let key = credentials.access_key_id();
                let kind = if key.starts_with("ASIA") {
                    "temporary credentials (a role or session)"
                } else if key.starts_with("AKIA") {
                    "a long-term IAM user key"
                } else {
                    "a key of another form (an emulator's?)"
                };
                let shown: String = if key.len() > 8 {
                    format!("{}…{}", &key[..4], &key[key.len() - 4..])
                } else {
                    "…".into()
                };
                let account = credentials
                    .account_id()
                    .map(|a| format!(", account {}", a.as_str()))
                    .unwrap_or_default();
                Finding::pass("credentials", format!("access key {shown}: {kind}{account}"))
            }
            Err(e) => Finding::fail(
                "credentials",
                format!(
                    "no usable AWS credentials: {e} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a role)"
                ),
            ),
        },
    });
    findings
}

/// How long EC2 and ECS may go on showing nothing of what a call just made: a launch
/// whose answer was lost can still land, and `Describe*` by tag is eventually consistent
/// ("may take several seconds", the EC2 API reference's "Eventual consistency" page).
/// Removing what a failed provision made looks again after this long.
pub const EVENTUAL_CONSISTENCY: std::time::Duration = std::time::Duration::from_secs(5);

/// Classifies an SDK error: transport trouble is transient (retried); an answer from the
/// service goes by its error code through the service's own `by_code` table.
pub fn classify<E, R>(
    error: &SdkError<E, R>,
    service: &str,
    doing: &str,
    by_code: fn(&str) -> (ErrorClass, bool),
) -> PlatformError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            PlatformError::transient(format!(
                "{doing}: {service} is unreachable: {}",
                DisplayErrorContext(error)
            ))
        }
        _ => {
            let code = error.code().unwrap_or("Unknown");
            let message = error.message().unwrap_or("no message");
            let (class, retryable) = by_code(code);
            PlatformError {
                class,
                retryable,
                message: format!("{doing}: {code}: {message}"),
                retry_after: None,
            }
        }
    }
}

/// The IAM policy document that grants exactly `manifest`: one `Allow` statement per
/// (resource, condition), in the manifest's order. The policies in docs/ and the test
/// doubles' users are this document, so what is documented is what the tests run with.
pub fn iam_policy(manifest: &[provisioner_core::permissions::Permission]) -> serde_json::Value {
    let mut statements: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for permission in manifest {
        match statements.iter_mut().find(|(scope, condition, _)| {
            *scope == permission.scope && *condition == permission.condition
        }) {
            Some((_, _, actions)) if !actions.contains(&permission.action) => {
                actions.push(permission.action);
            }
            Some(_) => {}
            None => statements.push((
                permission.scope,
                permission.condition,
                vec![permission.action],
            )),
        }
    }
    let statements: Vec<serde_json::Value> = statements
        .into_iter()
        .map(|(scope, condition, actions)| {
            let mut statement = serde_json::json!({
                "Effect": "Allow",
                "Action": if actions.len() == 1 { serde_json::json!(actions[0]) } else { serde_json::json!(actions) },
                "Resource": scope,
            });
            if !condition.is_empty() {
                statement["Condition"] = serde_json::from_str(condition)
                    .unwrap_or_else(|e| panic!("the manifest's condition for {actions:?} is not JSON: {e}"));
            }
            statement
        })
        .collect();
    serde_json::json!({"Version": "2012-10-17", "Statement": statements})
}
