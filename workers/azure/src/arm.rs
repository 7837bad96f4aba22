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

fn body_json(response: &RawResponse) -> Value {
    serde_json::from_slice(response.body().as_ref()).unwrap_or(Value::Null)
}

/// The ARM error of an answer: `{"error": {"code", "message"}}` (ACI and some
/// operations put it at the top level).
fn error_of(status: u16, body: &Value, doing: &str) -> PlatformError {
    error_with_hint(status, body, None, doing)
}

/// [`error_of`] for an answer whose headers are at hand: a `Retry-After` on a `429`
/// that outlasted the pipeline's own retries is passed on to the runtime.
fn error_of_response(response: &RawResponse, doing: &str) -> PlatformError {
    let retry_after = response
        .headers()
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    error_with_hint(
        u16::from(response.status()),
        &body_json(response),
        retry_after,
        doing,
    )
}

fn error_with_hint(
    status: u16,
    body: &Value,
    retry_after: Option<Duration>,
    doing: &str,
) -> PlatformError {
    let error = if body["error"].is_object() {
        &body["error"]
    } else {
        body
    };
    let code = error["code"].as_str().unwrap_or("");
    let message = error["message"].as_str().unwrap_or("");
    let mut failure = arm_error(Some(status), code, message, doing);
    if failure.message.ends_with(": ") {
        failure.message.push_str("(no error body)");
    }
    failure.retry_after = retry_after;
    failure
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
                .get(&group, "2021-04-01", "reading the resource group")
                .await
            {
                Ok(Some(found)) => Finding::pass(
                    "resource group",
                    format!(
                        "{} in {}",
                        settings.resource_group,
                        found["location"].as_str().unwrap_or("an unknown location")
                    ),
                ),
                Ok(None) => Finding::fail(
                    "resource group",
                    format!(
                        "{} does not exist in subscription {}: create it, or set AZURE_RESOURCE_GROUP",
                        settings.resource_group, settings.subscription_id
                    ),
                ),
                Err(e) => Finding::of_call("resource group", Err::<(), _>(e), ""),
            },
        );
        let permissions = self
            .get(
                &format!("{group}/providers/Microsoft.Authorization/permissions"),
                "2022-04-01",
                "reading the worker's permissions",
            )
            .await
            .and_then(|answer| {
                serde_json::from_value::<PermissionList>(answer.unwrap_or_default()).map_err(|e| {
                    PlatformError::transient(format!("ARM's permissions answer is unreadable: {e}"))
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

    /// Reads a resource by its id; `None` when it does not exist.
    pub async fn get(
        &self,
        resource_id: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Option<Value>, PlatformError> {
        let url = self.url(resource_id, api_version)?;
        let response = self.send(Method::Get, url, None, doing).await?;
        let status = u16::from(response.status());
        match status {
            200 => Ok(Some(body_json(&response))),
            404 => Ok(None),
            _ => Err(error_of_response(&response, doing)),
        }
    }

    /// Every resource of a type in the worker's resource group (`provider_path` is e.g.
    /// `Microsoft.Compute/virtualMachines`), following `nextLink`.
    pub async fn list(
        &self,
        provider_path: &str,
        api_version: &str,
        doing: &str,
    ) -> Result<Vec<Value>, PlatformError> {
        let mut url = self.url(&self.resource_id(provider_path), api_version)?;
        let mut all = Vec::new();
        loop {
            let response = self.send(Method::Get, url, None, doing).await?;
            let status = u16::from(response.status());
            let body = body_json(&response);
            if status != 200 {
                return Err(error_of(status, &body, doing));
            }
            if let Some(items) = body["value"].as_array() {
                all.extend(items.iter().cloned());
            }
            match body["nextLink"].as_str() {
                Some(next) if !next.is_empty() => {
                    url = next
                        .parse()
                        .map_err(|e| PlatformError::transient(format!("{doing}: nextLink: {e}")))?;
                }
                _ => return Ok(all),
            }
        }
    }

    fn accepted(&self, method: Method, response: &RawResponse, resource_url: &Url) -> Poll {
        let headers = response.headers();
        if let Some(url) = headers.get_optional_str(&AZURE_ASYNC_OPERATION) {
            return Poll::AsyncOperation(url.to_owned());
        }
        if let Some(url) = headers.get_optional_str(&LOCATION) {
            return Poll::Location(url.to_owned());
        }
        let status = u16::from(response.status());
        if method == Method::Put && (status == 201 || status == 200) {
            let state = body_json(response)["properties"]["provisioningState"]
                .as_str()
                .unwrap_or("Succeeded")
                .to_owned();
            if !is_terminal(&state) {
                return Poll::ProvisioningState(resource_url.to_string());
            }
        }
        Poll::Done
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
            poll: self.accepted(Method::Put, &response, &url),
        })
    }

    /// Whether a request's resource still needs its `PUT`, given what is there under its
    /// name (`existing`, whose owner the caller has checked): not when a finished one is
    /// there (adopted); not when an earlier attempt's create is still running (waited
    /// for, rather than PUT over); yes when there is none or it failed (ARM retries a
    /// failed resource on a new `PUT`).
    pub async fn needs_put(
        &self,
        existing: Option<&Value>,
        resource_id: &str,
        api_version: &str,
        timeout: Duration,
        doing: &str,
    ) -> Result<bool, PlatformError> {
        let Some(existing) = existing else {
            return Ok(true);
        };
        match existing["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("")
        {
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
            poll: self.accepted(Method::Post, &response, &url),
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
                poll: self.accepted(Method::Delete, &response, &url),
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
            let response = self.send(Method::Get, url, None, doing).await?;
            let status = u16::from(response.status());
            let body = body_json(&response);
            let finished = match poll {
                Poll::Location(_) => match status {
                    202 => None,
                    200..=299 => Some(Ok(())),
                    _ => Some(Err(error_of(status, &body, doing))),
                },
                _ if !(200..300).contains(&status) => Some(Err(error_of(status, &body, doing))),
                Poll::AsyncOperation(_) => operation_end(body["status"].as_str(), &body, doing),
                _ => operation_end(
                    body["properties"]["provisioningState"].as_str(),
                    &body,
                    doing,
                ),
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

fn operation_end(
    state: Option<&str>,
    body: &Value,
    doing: &str,
) -> Option<Result<(), PlatformError>> {
    match state {
        Some("Succeeded") => Some(Ok(())),
        Some("Failed" | "Canceled") => {
            let error = if body["error"].is_object() {
                &body["error"]
            } else {
                &body["properties"]["error"]
            };
            let code = error["code"].as_str().unwrap_or("Failed");
            let message = error["message"]
                .as_str()
                .unwrap_or("the operation failed without a message");
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
fn action_matches(pattern: &str, action: &str) -> bool {
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
