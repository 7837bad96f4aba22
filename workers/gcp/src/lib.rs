//! The GCP platforms: `gcp-compute` (one Compute Engine instance per request, through
//! google-cloud-compute-v1) and `gcp-cloud-run` (one Cloud Run service per request,
//! through google-cloud-run-v2). Both clients speak REST to Google's APIs with
//! Application Default Credentials; the project comes from the worker's configuration.
//!
//! This module owns what the two share: the worker's [`GcpSettings`], building clients
//! from them, and sorting Google API errors (HTTP code, canonical status, the reasons of
//! the legacy `errors` array, Compute operation error codes) into the runtime's classes.

pub mod cloud_run;
pub mod compute;
#[cfg(feature = "fake-api")]
pub mod fake_api;
pub mod permissions;

use std::time::Duration;

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::{Code, StatusDetails};
use provisioner_core::{Finding, PlatformError, SetupError};
use provisioner_events::ErrorClass;

pub use cloud_run::CloudRunPlatform;
pub use compute::ComputePlatform;

/// Label every resource the workers make carries, which `list` and the ownership checks
/// select on.
pub const MANAGED_LABEL: &str = "provisioner-managed";
/// Where the full request id is kept: an instance metadata item, a service annotation
/// (labels cannot hold every request id).
pub const REQUEST_ID_KEY: &str = "provisioner-request-id";

/// A time as Google's APIs write it (RFC 3339, as `creationTimestamp`); `None` when it is
/// not one.
pub(crate) fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(std::time::SystemTime::from)
}

/// What a GCP worker needs besides its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpSettings {
    /// The project resources are made in (`GCP_PROJECT`).
    pub project: String,
    /// The zone of instances whose spec names none (`GCP_ZONE`).
    pub zone: Option<String>,
    /// The region of services whose spec names none (`GCP_REGION`).
    pub region: Option<String>,
    /// Other regions Cloud Run services may be made in (`GCP_REGIONS`, comma-separated).
    /// Cloud Run cannot list across regions, so a teardown by request id looks in
    /// `region` and these, and a spec naming any other region is refused.
    pub other_regions: Vec<String>,
    /// Another API root than Google's, e.g. a test server (`GCP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Send no credentials at all (`GCP_CREDENTIALS=anonymous`): only for test servers
    /// and emulators. Otherwise Application Default Credentials.
    pub anonymous: bool,
}

impl GcpSettings {
    /// Reads the settings of the environment (see the README's "GCP" section).
    pub fn from_environment() -> Result<Self, SetupError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let project = var("GCP_PROJECT")
            .or_else(|| var("GOOGLE_CLOUD_PROJECT"))
            .ok_or_else(|| {
                SetupError::config("no GCP project: set GCP_PROJECT (or GOOGLE_CLOUD_PROJECT)")
            })?;
        let anonymous = match var("GCP_CREDENTIALS").as_deref() {
            None | Some("default") => false,
            Some("anonymous") => true,
            Some(other) => {
                return Err(SetupError::config(format!(
                    "GCP_CREDENTIALS={other:?} is not `default` (Application Default Credentials) or `anonymous`"
                )));
            }
        };
        Ok(GcpSettings {
            project,
            zone: var("GCP_ZONE"),
            region: var("GCP_REGION"),
            other_regions: var("GCP_REGIONS")
                .map(|v| {
                    v.split(',')
                        .map(|r| r.trim().to_owned())
                        .filter(|r| !r.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            endpoint: var("GCP_ENDPOINT"),
            anonymous,
        })
    }

    /// Every region the Cloud Run worker serves: `region` first, then `other_regions`.
    pub fn regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = self.region.iter().cloned().collect();
        for region in &self.other_regions {
            if !regions.contains(region) {
                regions.push(region.clone());
            }
        }
        regions
    }

    /// Settings for a test server at `endpoint`, without credentials.
    pub fn for_test_server(endpoint: &str, project: &str) -> Self {
        GcpSettings {
            project: project.into(),
            zone: Some("europe-west1-b".into()),
            region: Some("europe-west1".into()),
            other_regions: Vec::new(),
            endpoint: Some(endpoint.into()),
            anonymous: true,
        }
    }
}

/// Applies the settings to a client builder of any Google Cloud client.
macro_rules! configure_builder {
    ($builder:expr, $settings:expr) => {{
        let mut builder = $builder;
        if let Some(endpoint) = &$settings.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if $settings.anonymous {
            builder = builder.with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        builder
    }};
}
pub(crate) use configure_builder;

/// How a Google API failure is sorted: its HTTP code, canonical code, the `reason`s of its
/// details and its message, whichever the error carried.
fn class_of(
    http: Option<u16>,
    code: Option<Code>,
    reasons: &[String],
    message: &str,
) -> (ErrorClass, bool) {
    let reason_is = |names: &[&str]| reasons.iter().any(|r| names.contains(&r.as_str()));
    let lower = message.to_ascii_lowercase();
    if http == Some(429)
        || reason_is(&[
            "rateLimitExceeded",
            "userRateLimitExceeded",
            "RATE_LIMIT_EXCEEDED",
        ])
    {
        return (ErrorClass::Throttled, true);
    }
    // A bulk insert the zone cannot place answers at once `503 insufficientCapacity`
    // (https://cloud.google.com/compute/docs/troubleshooting/troubleshooting-bulk-vm-creation):
    // capacity, which a smaller batch or a later try may find, not a passing fault.
    if reason_is(&[
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "resourcePoolExhausted",
        "insufficientCapacity",
        "STOCKOUT",
    ]) || lower.contains("does not have enough resources")
    {
        return (ErrorClass::Capacity, true);
    }
    if reason_is(&["QUOTA_EXCEEDED", "quotaExceeded", "limitExceeded"])
        || code == Some(Code::ResourceExhausted)
        || (lower.contains("quota") && (lower.contains("exceeded") || lower.contains("exhausted")))
    {
        return (ErrorClass::Quota, false);
    }
    // Another operation on the resource is running (an instance still being made, a
    // concurrent change): it passes.
    if reason_is(&[
        "resourceNotReady",
        "RESOURCE_NOT_READY",
        "RESOURCE_OPERATION_RATE_EXCEEDED",
    ]) || code == Some(Code::Aborted)
    {
        return (ErrorClass::Transient, true);
    }
    match (code, http) {
        (Some(Code::PermissionDenied | Code::Unauthenticated), _) | (_, Some(401 | 403)) => {
            (ErrorClass::Permission, false)
        }
        (Some(Code::NotFound), _) | (_, Some(404)) => (ErrorClass::NotFound, false),
        (Some(Code::AlreadyExists), _) | (_, Some(409)) => (ErrorClass::Conflict, false),
        (Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange), _)
        | (_, Some(400 | 412 | 422)) => (ErrorClass::InvalidRequest, false),
        (Some(Code::Unavailable | Code::Internal | Code::DeadlineExceeded), _)
        | (_, Some(500..=599)) => (ErrorClass::Transient, true),
        _ => (ErrorClass::Internal, false),
    }
}

/// The `reason`s of an error's `ErrorInfo` details (the legacy `errors[].reason` of
/// Compute Engine land there too).
fn reasons(details: &[StatusDetails]) -> Vec<String> {
    details
        .iter()
        .filter_map(|d| match d {
            StatusDetails::ErrorInfo(info) => Some(info.reason.clone()),
            _ => None,
        })
        .collect()
}

/// Classifies a client error: API answers by what they say, connection and transport
/// failures as transient, credentials by whether they may come good.
pub fn classify(error: &GaxError, doing: &str) -> PlatformError {
    // The client's own retries ran out (a `503` resent until its policy ended): the
    // service's last answer is what says what happened, e.g. `insufficientCapacity`.
    if error.is_exhausted()
        && let Some(last) =
            std::error::Error::source(error).and_then(|s| s.downcast_ref::<GaxError>())
    {
        return classify(last, doing);
    }
    if error.is_authentication() {
        let transient = std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|e| e.is_transient());
        return PlatformError {
            class: ErrorClass::Permission,
            retryable: transient,
            message: format!(
                "{doing}: no usable GCP credentials: {error} (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default login, or the metadata server)"
            ),
            retry_after: None,
        };
    }
    let http = error.http_status_code();
    let retry_after = error
        .http_headers()
        .and_then(|h| h.get("retry-after"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if let Some(status) = error.status() {
        let reasons = reasons(&status.details);
        let (class, retryable) = class_of(http, Some(status.code), &reasons, &status.message);
        return PlatformError {
            class,
            retryable,
            message: format!(
                "{doing}: {}{}: {}",
                http.map(|h| format!("{h} ")).unwrap_or_default(),
                status.code.name(),
                status.message
            ),
            retry_after,
        };
    }
    if let Some(http) = http {
        let body = error
            .http_payload()
            .map(|b| {
                String::from_utf8_lossy(b)
                    .chars()
                    .take(300)
                    .collect::<String>()
            })
            .unwrap_or_default();
        let (class, retryable) = class_of(Some(http), None, &[], &body);
        return PlatformError {
            class,
            retryable,
            message: format!("{doing}: HTTP {http}: {body}"),
            retry_after,
        };
    }
    if error.is_deserialization() || error.is_serialization() || error.is_binding() {
        return PlatformError::permanent(ErrorClass::Internal, format!("{doing}: {error}"));
    }
    PlatformError::transient(format!("{doing}: the GCP API is unreachable: {error}"))
}

/// Classifies the error a finished Compute Engine operation reports (its `errors[].code`,
/// such as `QUOTA_EXCEEDED` or `ZONE_RESOURCE_POOL_EXHAUSTED`, and the HTTP code it
/// would have had).
pub fn classify_operation_error(
    http: Option<u16>,
    codes: &[String],
    message: &str,
    doing: &str,
) -> PlatformError {
    let code = match codes.first().map(String::as_str) {
        Some("RESOURCE_NOT_FOUND") => Some(Code::NotFound),
        Some("RESOURCE_ALREADY_EXISTS") => Some(Code::AlreadyExists),
        Some(
            "INVALID_FIELD_VALUE" | "INVALID_USAGE" | "BAD_REQUEST" | "REQUIRED_FIELD_MISSING",
        ) => Some(Code::InvalidArgument),
        Some("PERMISSIONS_ERROR" | "FORBIDDEN") => Some(Code::PermissionDenied),
        _ => None,
    };
    let (class, retryable) = class_of(http, code, codes, message);
    PlatformError {
        class,
        retryable,
        message: format!("{doing}: {}: {message}", codes.join(", ")),
        retry_after: None,
    }
}

/// Where a GCP worker acts and as whom, for its preflight.
pub(crate) fn identity_findings(settings: &GcpSettings) -> Vec<Finding> {
    vec![
        Finding::pass("project", settings.project.clone()),
        if settings.anonymous {
            Finding::warn(
                "credentials",
                "none (GCP_CREDENTIALS=anonymous): test servers only",
            )
        } else {
            Finding::pass(
                "credentials",
                "Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, or the metadata server), read at the first call",
            )
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_errors_are_sorted_like_the_aws_ones() {
        let none: &[String] = &[];
        let reason = |r: &str| vec![r.to_owned()];
        let cases = [
            (
                Some(429),
                Some(Code::ResourceExhausted),
                none.to_vec(),
                "",
                ErrorClass::Throttled,
                true,
            ),
            (
                Some(403),
                Some(Code::PermissionDenied),
                reason("rateLimitExceeded"),
                "",
                ErrorClass::Throttled,
                true,
            ),
            (
                Some(403),
                Some(Code::Unknown),
                reason("quotaExceeded"),
                "Quota 'CPUS' exceeded.  Limit: 24.0 in region europe-west1.",
                ErrorClass::Quota,
                false,
            ),
            (
                None,
                None,
                reason("ZONE_RESOURCE_POOL_EXHAUSTED"),
                "",
                ErrorClass::Capacity,
                true,
            ),
            // A bulk insert the zone cannot place, refused at once.
            (
                Some(503),
                Some(Code::Unavailable),
                reason("insufficientCapacity"),
                "",
                ErrorClass::Capacity,
                true,
            ),
            (
                Some(403),
                Some(Code::PermissionDenied),
                reason("forbidden"),
                "Required 'compute.instances.create' permission",
                ErrorClass::Permission,
                false,
            ),
            (
                Some(404),
                Some(Code::NotFound),
                reason("notFound"),
                "",
                ErrorClass::NotFound,
                false,
            ),
            (
                Some(409),
                Some(Code::AlreadyExists),
                reason("alreadyExists"),
                "",
                ErrorClass::Conflict,
                false,
            ),
            (
                Some(400),
                Some(Code::InvalidArgument),
                reason("invalid"),
                "",
                ErrorClass::InvalidRequest,
                false,
            ),
            (
                Some(503),
                Some(Code::Unavailable),
                none.to_vec(),
                "",
                ErrorClass::Transient,
                true,
            ),
            (
                Some(500),
                Some(Code::Unknown),
                none.to_vec(),
                "",
                ErrorClass::Transient,
                true,
            ),
        ];
        for (http, code, reasons, message, class, retryable) in cases {
            assert_eq!(
                class_of(http, code, &reasons, message),
                (class, retryable),
                "{http:?} {code:?} {reasons:?}"
            );
        }
        let stockout = classify_operation_error(
            None,
            &["ZONE_RESOURCE_POOL_EXHAUSTED".into()],
            "The zone 'projects/p/zones/z' does not have enough resources available to fulfill the request.",
            "creating instance x",
        );
        assert_eq!(
            (stockout.class, stockout.retryable),
            (ErrorClass::Capacity, true)
        );
        let quota =
            classify_operation_error(Some(403), &["QUOTA_EXCEEDED".into()], "Quota exceeded", "x");
        assert_eq!(quota.class, ErrorClass::Quota);
        let bad = classify_operation_error(Some(400), &["INVALID_FIELD_VALUE".into()], "bad", "x");
        assert_eq!(bad.class, ErrorClass::InvalidRequest);
    }
}
