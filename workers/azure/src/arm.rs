//! A thin typed client for the few Azure Resource Manager calls the workers make: `GET`,
//! `PUT`, `POST` and `DELETE` of resources in the worker's resource group, and the
//! polling of their long-running operations.
//!
//! Requests go through azure_core's pipeline, which retries `408`/`429`/`5xx` and
//! connection failures with exponential backoff, honouring `Retry-After`, and adds the
//! bearer token of the credential. ARM `PUT` and `DELETE` are idempotent by design, so
//! the pipeline may resend them.
//!
//! Long-running operations follow ARM's rules: when the answer has an
//! `Azure-AsyncOperation` header, that URL is polled until its `status` is `Succeeded`,
//! `Failed` or `Canceled`; else when it has a `Location` header, that URL is polled until
//! it stops answering `202`; else a `PUT` is finished when the resource's
//! `provisioningState` is terminal.

use std::sync::Arc;
use std::time::Duration;

use azure_core::http::headers::HeaderName;
use azure_core::http::policies::Policy;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Method, Pipeline, PipelineSendOptions,
    RawResponse, Request, RetryOptions, Url,
};
use provisioner_core::backoff::Backoff;
use provisioner_core::{Finding, PlatformError, SetupError};
use provisioner_events::ErrorClass;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{AzureSettings, CredentialChain, arm_error, transport_error};

const AZURE_ASYNC_OPERATION: HeaderName = HeaderName::from_static("azure-asyncoperation");
const LOCATION: HeaderName = HeaderName::from_static("location");
const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");

/// Where to learn how a long-running operation ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// An `Azure-AsyncOperation` status URL.
    AsyncOperation(String),
    /// A `Location` URL that answers `202` until the operation is done.
    Location(String),
    /// The resource itself, until its `provisioningState` is terminal.
    ProvisioningState(String),
    /// Nothing to wait for: the call finished synchronously.
    Done,
}

/// The answer to a mutation: its status and how to wait for it.
#[derive(Debug)]
pub struct Accepted {
    pub status: u16,
    pub poll: Poll,
}

/// The ARM client of one subscription and resource group.
#[derive(Debug, Clone)]
pub struct ArmClient {
    pipeline: Pipeline,
    endpoint: Url,
    settings: AzureSettings,
}

/// Reads an ARM answer into the shape the worker relies on. An answer without a field ARM
/// documents as always there is a fault of that answer, not something to guess around:
/// the error names the answer and serde names the field. Transient, because a later read
/// may well answer in full.
pub(crate) fn read<T: DeserializeOwned>(
    body: &[u8],
    what: &str,
    doing: &str,
) -> Result<T, PlatformError> {
    serde_json::from_slice(body).map_err(|e| {
        PlatformError::transient(format!(
            "{doing}: ARM's answer for {what} is not as documented: {e}"
        ))
    })
}

/// A resource's `provisioningState` as ARM defines it: "If the resource returns no
/// provisioningState, it is assumed to be Succeeded."
/// (<https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/Addendum.md#provisioningstate-property>)
pub(crate) fn provisioning_state(state: Option<&str>) -> &str {
    state.unwrap_or("Succeeded")
}

/// An ARM error (`ErrorDetail`), in error answers and failed operations:
/// <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/common-api-details.md#error-response-content>
#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: Option<String>,
}

/// ARM's error answer: `{"error": {...}}`, or the detail itself at the top level, as ACI
/// and some operations answer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ErrorResponse {
    Wrapped { error: ErrorDetail },
    Bare(ErrorDetail),
}

/// The operation resource an `Azure-AsyncOperation` URL answers:
/// <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/Addendum.md#operation-resource-format>
#[derive(Debug, Deserialize)]
struct OperationStatus {
    status: String,
    error: Option<ErrorDetail>,
}

/// Any ARM resource, read only for how its provisioning went: the answer to a `PUT`, and
/// the resource polled after one when ARM gave no operation URL:
/// <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/Addendum.md#creating-or-updating-resources-asynchronously>
#[derive(Debug, Deserialize)]
struct ProvisionedResource {
    properties: Option<ProvisionedProperties>,
}

/// The `properties` of [`ProvisionedResource`]; some providers put the error of a failed
/// provisioning beside its state.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProvisionedProperties {
    provisioning_state: Option<String>,
    error: Option<ErrorDetail>,
}

impl ProvisionedResource {
    fn state(&self) -> &str {
        provisioning_state(
            self.properties
                .as_ref()
                .and_then(|p| p.provisioning_state.as_deref()),
        )
    }

    fn error(&self) -> Option<&ErrorDetail> {
        self.properties.as_ref()?.error.as_ref()
    }
}

/// One page of an ARM list (`value` is required, `nextLink` only when more follow):
/// <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/resource-api-reference.md>
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    value: Vec<T>,
    next_link: Option<String>,
}

/// The resource group, for its location:
/// <https://learn.microsoft.com/rest/api/resources/resource-groups/get>
#[derive(Debug, Deserialize)]
struct ResourceGroup {
    location: String,
}

/// The error of an answer that is not a success; a `Retry-After` on a `429` that
/// outlasted the pipeline's own retries is passed on to the runtime.
fn error_of_response(response: &RawResponse, doing: &str) -> PlatformError {
    let retry_after = response
        .headers()
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let status = u16::from(response.status());
    let body = response.body().as_ref();
    let mut failure = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(ErrorResponse::Wrapped { error } | ErrorResponse::Bare(error)) => arm_error(
            Some(status),
            &error.code,
            error.message.as_deref().unwrap_or_default(),
            doing,
        ),
        // A gateway's page or an empty answer has no ARM code: the status alone sorts it.
        Err(_) => arm_error(Some(status), "", &not_an_arm_error(body), doing),
    };
    failure.retry_after = retry_after;
    failure
}

/// What to say of an error answer that carries no ARM error.
fn not_an_arm_error(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(no error body)".to_owned()
    } else {
        format!(
            "(not an ARM error: {})",
            text.chars().take(200).collect::<String>()
        )
    }
}

impl ArmClient {
    pub fn new(settings: AzureSettings) -> Result<Self, SetupError> {
        let endpoint: Url = settings
            .endpoint
            .parse()
            .map_err(|e| format!("AZURE_ENDPOINT {:?}: {e}", settings.endpoint))?;
        let mut per_try: Vec<Arc<dyn Policy>> = Vec::new();
        if !settings.anonymous {
            let credential = CredentialChain::from_environment()?;
            // The token's audience is the ARM endpoint itself (public or sovereign cloud).
            let scope = format!("{}/.default", settings.endpoint.trim_end_matches('/'));
            per_try.push(Arc::new(BearerTokenAuthorizationPolicy::new(
                credential,
                [scope],
            )));
        }
        let options = ClientOptions {
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(250),
                max_retries: 4,
                max_total_elapsed: azure_core::time::Duration::seconds(60),
                max_delay: azure_core::time::Duration::seconds(10),
            }),
            ..ClientOptions::default()
        };
        let pipeline = Pipeline::new(
            Some(env!("CARGO_PKG_NAME")),
            Some(env!("CARGO_PKG_VERSION")),
            options,
            Vec::new(),
            per_try,
            None,
        );
        Ok(ArmClient {
            pipeline,
            endpoint,
            settings,
        })
    }

    pub fn settings(&self) -> &AzureSettings {
        &self.settings
    }

    /// Where the worker acts and whether it may, for a platform's preflight: the
    /// subscription, the resource group (it must exist), and each of the `needed` actions
    /// against the caller's effective permissions on the group.
    pub async fn preflight(&self, needed: &[&str]) -> Vec<Finding> {
        let settings = &self.settings;
        let mut findings = vec![
            Finding::pass("subscription", settings.subscription_id.clone()),
            if settings.anonymous {
                Finding::warn(
                    "credentials",
                    "none (AZURE_CREDENTIALS=anonymous): test servers only",
                )
            } else {
                Finding::pass(
                    "credentials",
                    "azure_identity's chain (service principal, workload identity, managed identity, az login), read at the first call",
                )
            },
        ];
        let group = format!(
            "/subscriptions/{}/resourceGroups/{}",
            settings.subscription_id, settings.resource_group
        );
        findings.push(
            match self
                .get::<ResourceGroup>(&group, "2021-04-01", "reading the resource group")
                .await
            {
                Ok(Some(found)) => Finding::pass(
                    "resource group",
                    format!("{} in {}", settings.resource_group, found.location),
                ),
                Ok(None) => Finding::fail(
                    "resource group",
                    format!(
                        "{} does not exist in subscription {}: create it, or set AZURE_RESOURCE_GROUP",
                        settings.resource_group, settings.subscription_id
                    ),
                ),
                // ARM refuses a group the identity holds no role in before it looks,
                // so a group that does not exist reads the same as a missing role.
                Err(e) if e.class == ErrorClass::Permission => Finding::fail(
                    "resource group",
                    format!(
                        "{}: the identity holds no role on {} in subscription {}, or the group does not exist; check AZURE_RESOURCE_GROUP, and assign the worker's role of docs/azure.md on it",
                        e.message, settings.resource_group, settings.subscription_id
                    ),
                ),
                Err(e) => Finding::of_call("resource group", Err::<(), _>(e), ""),
            },
        );
        let permissions = self
            .get::<PermissionList>(
                &format!("{group}/providers/Microsoft.Authorization/permissions"),
                "2022-04-01",
                "reading the worker's permissions",
            )
            .await
            .and_then(|answer| {
                answer.ok_or_else(|| {
                    PlatformError::permanent(
                        ErrorClass::NotFound,
                        "reading the worker's permissions: ARM answered 404",
                    )
                })
            });
        findings.push(match permissions {
            Ok(list) => {
                let missing: Vec<&str> = needed
                    .iter()
                    .copied()
                    .filter(|action| !list.allows(action))
                    .collect();
                if missing.is_empty() {
                    Finding::pass("permissions", format!("allowed: {}", needed.join(", ")))
                } else {
                    Finding::fail(
                        "permissions",
                        format!(
                            "not allowed: {}; assign the role of docs/azure.md on the resource group",
                            missing.join(", ")
                        ),
                    )
                }
            }
            Err(e) => Finding::of_call("permissions", Err::<(), _>(e), ""),
        });
        findings
    }

    /// The resource id of `provider_path` (`Microsoft.Compute/virtualMachines/x`) in the
    /// worker's resource group.
    pub fn resource_id(&self, provider_path: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{provider_path}",
            self.settings.subscription_id, self.settings.resource_group
        )
    }

    /// The URL of a resource at an API version, for [`Poll::ProvisioningState`].
    fn resource_url(&self, resource_id: &str, api_version: &str) -> Result<String, PlatformError> {
        Ok(self.url(resource_id, api_version)?.to_string())
    }

    fn url(&self, path: &str, api_version: &str) -> Result<Url, PlatformError> {
        let mut url = self
            .endpoint
            .join(path)
            .map_err(|e| PlatformError::invalid(format!("{path} is not a URL path: {e}")))?;
        url.query_pairs_mut()
            .append_pair("api-version", api_version);
        Ok(url)
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        doing: &str,
    ) -> Result<RawResponse, PlatformError> {
        let mut request = Request::new(url, method);
        request.insert_header("accept", "application/json");
        if let Some(body) = body {
            request.insert_header("content-type", "application/json");
            request.set_body(serde_json::to_vec(body).unwrap_or_default());
        }
        self.pipeline
            .send(
                &Context::new(),
                &mut request,
                Some(PipelineSendOptions {
                    skip_checks: true,
                    ..PipelineSendOptions::default()
                }),
            )
            .await
            .map_err(|e| transport_error(&e, doing))
    }

    /// Reads a resource by its id into its typed shape; `None` when it does not exist.
    pub async fn get<T: DeserializeOwned>(
        &self,
        resource_id: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Option<T>, PlatformError> {
        let url = self.url(resource_id, api_version)?;
        let response = self.send(Method::Get, url, None, doing).await?;
        let status = u16::from(response.status());
        match status {
            200 => read(response.body().as_ref(), resource_id, doing).map(Some),
            404 => Ok(None),
            _ => Err(error_of_response(&response, doing)),
        }
    }

    /// Every resource of a type in the worker's resource group (`provider_path` is e.g.
    /// `Microsoft.Compute/virtualMachines`), following `nextLink`.
    pub async fn list<T: DeserializeOwned>(
        &self,
        provider_path: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Vec<T>, PlatformError> {
        self.list_at(&self.resource_id(provider_path), api_version, doing)
            .await
    }

    /// Every item of the collection at `path` (any ARM path, e.g. one of the
    /// subscription's), following `nextLink`.
    pub async fn list_at<T: DeserializeOwned>(
        &self,
        path: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Vec<T>, PlatformError> {
        let mut url = self.url(path, api_version)?;
        let mut all = Vec::new();
        loop {
            let response = self.send(Method::Get, url, None, doing).await?;
            if u16::from(response.status()) != 200 {
                return Err(error_of_response(&response, doing));
            }
            let page: Page<T> = read(
                response.body().as_ref(),
                &format!("the list of {path}"),
                doing,
            )?;
            all.extend(page.value);
            match page.next_link {
                Some(next) if !next.is_empty() => {
                    url = next
                        .parse()
                        .map_err(|e| PlatformError::transient(format!("{doing}: nextLink: {e}")))?;
                }
                _ => return Ok(all),
            }
        }
    }

    fn accepted(
        &self,
        method: Method,
        response: &RawResponse,
        resource_url: &Url,
        doing: &str,
    ) -> Result<Poll, PlatformError> {
        let headers = response.headers();
        if let Some(url) = headers.get_optional_str(&AZURE_ASYNC_OPERATION) {
            return Ok(Poll::AsyncOperation(url.to_owned()));
        }
        if let Some(url) = headers.get_optional_str(&LOCATION) {
            return Ok(Poll::Location(url.to_owned()));
        }
        let status = u16::from(response.status());
        if method == Method::Put && (status == 201 || status == 200) {
            // Without an operation URL, the resource in the answer says whether it is done.
            let resource: ProvisionedResource =
                read(response.body().as_ref(), resource_url.path(), doing)?;
            if !is_terminal(resource.state()) {
                return Ok(Poll::ProvisioningState(resource_url.to_string()));
            }
        }
        Ok(Poll::Done)
    }

    /// Creates or updates a resource (ARM `PUT`).
    pub async fn put(
        &self,
        resource_id: &str,
        api_version: &str,
        body: &Value,
        doing: &str,
    ) -> Result<Accepted, PlatformError> {
        let url = self.url(resource_id, api_version)?;
        let response = self
            .send(Method::Put, url.clone(), Some(body), doing)
            .await?;
        let status = u16::from(response.status());
        if !(200..300).contains(&status) {
            return Err(error_of_response(&response, doing));
        }
        Ok(Accepted {
            status,
            poll: self.accepted(Method::Put, &response, &url, doing)?,
        })
    }

    /// Whether a request's resource still needs its `PUT`, given the provisioning state
    /// of what is there under its name (`existing_state`, `None` when nothing is; its
    /// owner the caller has checked): not when a finished one is there (adopted); not
    /// when an earlier attempt's create is still running (waited for, rather than PUT
    /// over); yes when there is none or it failed (ARM retries a failed resource on a
    /// new `PUT`).
    pub async fn needs_put(
        &self,
        existing_state: Option<&str>,
        resource_id: &str,
        api_version: &str,
        timeout: Duration,
        doing: &str,
    ) -> Result<bool, PlatformError> {
        let Some(existing_state) = existing_state else {
            return Ok(true);
        };
        match existing_state {
            "Succeeded" => {
                tracing::info!(resource = resource_id, "found the one made before");
                Ok(false)
            }
            state if !is_terminal(state) => {
                tracing::info!(
                    resource = resource_id,
                    state,
                    "an earlier create is in progress"
                );
                let poll = Poll::ProvisioningState(self.resource_url(resource_id, api_version)?);
                self.wait(&poll, timeout, doing).await?;
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// Runs an action on a resource (`POST <id>/<action>`, e.g. a VM's `start`).
    pub async fn post(
        &self,
        resource_id: &str,
        action: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Accepted, PlatformError> {
        let url = self.url(&format!("{resource_id}/{action}"), api_version)?;
        let response = self.send(Method::Post, url.clone(), None, doing).await?;
        let status = u16::from(response.status());
        if !(200..300).contains(&status) {
            return Err(error_of_response(&response, doing));
        }
        Ok(Accepted {
            status,
            poll: self.accepted(Method::Post, &response, &url, doing)?,
        })
    }

    /// Deletes a resource; `None` when it was not there (`204`, `404`).
    pub async fn delete(
        &self,
        resource_id: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Option<Accepted>, PlatformError> {
        let url = self.url(resource_id, api_version)?;
        let response = self.send(Method::Delete, url.clone(), None, doing).await?;
        let status = u16::from(response.status());
        match status {
            204 | 404 => Ok(None),
            200..=299 => Ok(Some(Accepted {
                status,
                poll: self.accepted(Method::Delete, &response, &url, doing)?,
            })),
            _ => Err(error_of_response(&response, doing)),
        }
    }

    /// Waits for a long-running operation to end, within `timeout`; a failed or
    /// cancelled operation is returned as its classified error.
    pub async fn wait(
        &self,
        poll: &Poll,
        timeout: Duration,
        doing: &str,
    ) -> Result<(), PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let url = match poll {
                Poll::Done => return Ok(()),
                Poll::AsyncOperation(url) | Poll::Location(url) | Poll::ProvisioningState(url) => {
                    url
                }
            };
            let url: Url = url.parse().map_err(|e| {
                PlatformError::transient(format!("{doing}: polling URL {url:?}: {e}"))
            })?;
            let response = self.send(Method::Get, url.clone(), None, doing).await?;
            let status = u16::from(response.status());
            let body = response.body().as_ref();
            let finished = match poll {
                Poll::Location(_) => match status {
                    202 => None,
                    200..=299 => Some(Ok(())),
                    _ => Some(Err(error_of_response(&response, doing))),
                },
                _ if !(200..300).contains(&status) => {
                    Some(Err(error_of_response(&response, doing)))
                }
                Poll::AsyncOperation(_) => {
                    let operation: OperationStatus =
                        read(body, &format!("the operation {}", url.path()), doing)?;
                    operation_end(&operation.status, operation.error.as_ref(), doing)
                }
                _ => {
                    let resource: ProvisionedResource = read(body, url.path(), doing)?;
                    operation_end(resource.state(), resource.error(), doing)
                }
            };
            if let Some(end) = finished {
                return end;
            }
            // ARM says how long to wait between polls; the backoff bounds the whole wait.
            let hinted = response
                .headers()
                .get_optional_str(&RETRY_AFTER)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(30)));
            if let Some(hinted) = hinted
                && hinted > Duration::from_millis(250)
            {
                tokio::time::sleep(hinted.saturating_sub(Duration::from_millis(250))).await;
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!("{doing}: not finished after {} s", timeout.as_secs()),
                ));
            }
        }
    }
}

/// Whether a `provisioningState` or operation `status` is final.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "Succeeded" | "Failed" | "Canceled")
}

/// How an operation ended, from its `status` (or the resource's `provisioningState`) and
/// the error ARM gives with `Failed` and `Canceled`; `None` while it runs.
fn operation_end(
    state: &str,
    error: Option<&ErrorDetail>,
    doing: &str,
) -> Option<Result<(), PlatformError>> {
    match state {
        "Succeeded" => Some(Ok(())),
        "Failed" | "Canceled" => {
            // ARM requires the error here; an operation that ended without one is still
            // a failure, told as ARM's status and not guessed at.
            let (code, message) = match error {
                Some(error) => (
                    error.code.as_str(),
                    error
                        .message
                        .as_deref()
                        .unwrap_or("the operation failed without a message"),
                ),
                None => (state, "the operation ended without an error"),
            };
            Some(Err(arm_error(None, code, message, doing)))
        }
        _ => None,
    }
}

/// ARM's answer to `Microsoft.Authorization/permissions`: the caller's effective rights,
/// one entry per role assignment.
#[derive(Debug, Default, serde::Deserialize)]
struct PermissionList {
    #[serde(default)]
    value: Vec<Permission>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Permission {
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    not_actions: Vec<String>,
}

impl PermissionList {
    /// Whether some role grants `action` without also excluding it.
    fn allows(&self, action: &str) -> bool {
        self.value.iter().any(|permission| {
            permission.actions.iter().any(|a| action_matches(a, action))
                && !permission
                    .not_actions
                    .iter()
                    .any(|a| action_matches(a, action))
        })
    }
}

/// An ARM action pattern (`*` matches any run of characters) against an action, case
/// insensitively, as role definitions are read.
pub(crate) fn action_matches(pattern: &str, action: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let action = action.to_ascii_lowercase();
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = action.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod permission_tests {
    use super::*;

    #[test]
    fn action_patterns_match_as_role_definitions_do() {
        assert!(action_matches(
            "*",
            "Microsoft.Compute/virtualMachines/write"
        ));
        assert!(action_matches(
            "Microsoft.Compute/*",
            "microsoft.compute/virtualmachines/write"
        ));
        assert!(action_matches(
            "*/read",
            "Microsoft.Compute/virtualMachines/read"
        ));
        assert!(!action_matches(
            "*/read",
            "Microsoft.Compute/virtualMachines/write"
        ));
        assert!(action_matches(
            "Microsoft.*/virtualMachines/*",
            "Microsoft.Compute/virtualMachines/delete"
        ));
        assert!(!action_matches(
            "Microsoft.Network/*",
            "Microsoft.Compute/virtualMachines/write"
        ));
        let reader_plus = PermissionList {
            value: vec![Permission {
                actions: vec!["*".into()],
                not_actions: vec!["Microsoft.Compute/*/delete".into()],
            }],
        };
        assert!(reader_plus.allows("Microsoft.Compute/virtualMachines/write"));
        assert!(!reader_plus.allows("Microsoft.Compute/virtualMachines/delete"));
    }
}

#[cfg(test)]
mod answer_tests {
    use super::*;

    #[test]
    fn error_answers_are_read_by_their_arm_code() {
        let read = |body: &str| match serde_json::from_slice::<ErrorResponse>(body.as_bytes()) {
            Ok(ErrorResponse::Wrapped { error } | ErrorResponse::Bare(error)) => Some(error.code),
            Err(_) => None,
        };
        assert_eq!(
            read(r#"{"error": {"code": "SkuNotAvailable", "message": "m"}}"#).as_deref(),
            Some("SkuNotAvailable")
        );
        assert_eq!(
            read(r#"{"code": "InaccessibleImage", "message": "m"}"#).as_deref(),
            Some("InaccessibleImage")
        );
        assert_eq!(read(r#"{"error": {"message": "no code"}}"#), None);
        assert_eq!(read("<html>Bad Gateway</html>"), None);
        assert_eq!(not_an_arm_error(b" "), "(no error body)");
        assert_eq!(
            not_an_arm_error(b"<html>Bad Gateway</html>"),
            "(not an ARM error: <html>Bad Gateway</html>)"
        );
    }

    #[test]
    fn an_operation_ends_as_its_status_says() {
        let end = |body: &str| {
            let operation: OperationStatus =
                read(body.as_bytes(), "the operation x", "waiting").expect("readable");
            operation_end(&operation.status, operation.error.as_ref(), "waiting")
        };
        assert!(end(r#"{"status": "InProgress"}"#).is_none());
        assert_eq!(end(r#"{"status": "Succeeded"}"#), Some(Ok(())));
        let failed = end(
            r#"{"status": "Failed", "error": {"code": "AllocationFailed", "message": "no room"}}"#,
        )
        .expect("ended")
        .expect_err("failed");
        assert_eq!(
            (failed.class, failed.retryable),
            (ErrorClass::Capacity, true)
        );
        let canceled = end(r#"{"status": "Canceled"}"#)
            .expect("ended")
            .expect_err("canceled");
        assert!(canceled.message.contains("Canceled"), "{canceled}");
        // An operation answer without its status is not taken for one still running.
        let err = read::<OperationStatus>(br#"{"name": "op-1"}"#, "the operation x", "waiting")
            .expect_err("no status");
        assert_eq!((err.class, err.retryable), (ErrorClass::Transient, true));
        assert!(err.message.contains("the operation x"), "{err}");
        assert!(err.message.contains("`status`"), "{err}");
    }

    #[test]
    fn a_resource_without_a_provisioning_state_is_succeeded_as_arm_says() {
        let resource: ProvisionedResource =
            read(br#"{"name": "x"}"#, "x", "reading x").expect("readable");
        assert_eq!(resource.state(), "Succeeded");
        let resource: ProvisionedResource = read(
            br#"{"properties": {"provisioningState": "Creating"}}"#,
            "x",
            "reading x",
        )
        .expect("readable");
        assert_eq!(resource.state(), "Creating");
    }
}

/// Azure Resource Manager's buckets per subscription (its token-bucket throttling of
/// 2024): writes 200 refilling 10 a second, deletes 200 refilling 10, reads 250
/// refilling 25. An operation takes as many tokens as the ARM calls it makes.
/// <https://learn.microsoft.com/azure/azure-resource-manager/management/request-limits-and-throttling>
pub fn arm_rate_limits(
    subscription: &str,
    operation: provisioner_events::Operation,
    writes: f64,
    deletes: f64,
) -> Vec<provisioner_core::RateLimit> {
    use provisioner_core::RateLimit;
    use provisioner_events::Operation;
    match operation {
        Operation::Provision | Operation::Start | Operation::Stop | Operation::Reboot => {
            vec![RateLimit::new("ARM.writes", subscription, 200.0, 10.0).costing(writes)]
        }
        Operation::Teardown => {
            vec![RateLimit::new("ARM.deletes", subscription, 200.0, 10.0).costing(deletes)]
        }
        Operation::Describe => vec![RateLimit::new("ARM.reads", subscription, 250.0, 25.0)],
    }
}
