//! What the AWS platforms share, kept apart from the heavy per-service SDK crates: loading
//! the standard AWS configuration with a clear error when it is unusable, and turning an
//! SDK error into a [`PlatformError`] while the typed error is at hand.

pub use aws_config::SdkConfig;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use provisioner_core::{PlatformError, SetupError};
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
