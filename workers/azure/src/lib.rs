//! The Azure platforms: `azure-vm` (one Linux Virtual Machine per request) and
//! `azure-container-instances` (one container group per request), both by ARM
//! `PUT`/`GET`/`DELETE` through [`arm::ArmClient`], a thin typed client on azure_core's
//! HTTP pipeline (its retry policy, `Retry-After` handling and bearer-token
//! authentication) with azure_identity's credentials. The management crates
//! (azure_mgmt_compute) are frozen on an old azure_core, and the worker needs only a
//! handful of calls.
//!
//! This module owns what the two share: the worker's [`AzureSettings`], the credential
//! chain, and sorting ARM errors into the runtime's classes.

pub mod aci;
pub mod arm;
#[cfg(feature = "fake-api")]
pub mod fake_api;
pub mod permissions;
pub mod vm;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use provisioner_core::{PlatformError, SetupError};
use provisioner_events::{ErrorClass, RequestId, TeardownTarget};
use serde::Deserialize;

pub use aci::ContainerInstancesPlatform;
pub use vm::VmPlatform;

/// Tag every resource the workers make carries, which `list` and the ownership checks
/// select on.
pub const MANAGED_TAG: &str = "provisioner-managed";
/// Tag holding the full request id of the resource.
pub const REQUEST_ID_TAG: &str = "provisioner-request-id";

/// What an Azure worker needs besides its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    /// `AZURE_SUBSCRIPTION_ID`.
    pub subscription_id: String,
    /// The resource group resources are made in (`AZURE_RESOURCE_GROUP`); it must exist.
    pub resource_group: String,
    /// The region of specs that name none (`AZURE_LOCATION`).
    pub location: Option<String>,
    /// The ARM endpoint (`AZURE_ENDPOINT`): Azure public cloud by default; sovereign
    /// clouds or a test server otherwise.
    pub endpoint: String,
    /// Send no credentials at all (`AZURE_CREDENTIALS=anonymous`): only for test servers.
    pub anonymous: bool,
}

pub const PUBLIC_CLOUD_ENDPOINT: &str = "https://management.azure.com";

impl AzureSettings {
    /// Reads the settings of the environment (see the README's "Azure" section).
    pub fn from_environment() -> Result<Self, SetupError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let subscription_id = var("AZURE_SUBSCRIPTION_ID")
            .ok_or("no Azure subscription: set AZURE_SUBSCRIPTION_ID")?;
        let resource_group = var("AZURE_RESOURCE_GROUP")
            .ok_or("no resource group: set AZURE_RESOURCE_GROUP (it must exist)")?;
        let anonymous = match var("AZURE_CREDENTIALS").as_deref() {
            None | Some("default") => false,
            Some("anonymous") => true,
            Some(other) => {
                return Err(format!(
                    "AZURE_CREDENTIALS={other:?} is not `default` (azure_identity's chain) or `anonymous`"
                )
                .into());
            }
        };
        let endpoint = var("AZURE_ENDPOINT").unwrap_or_else(|| PUBLIC_CLOUD_ENDPOINT.into());
        if !anonymous && !endpoint.starts_with("https://") {
            return Err(format!(
                "AZURE_ENDPOINT {endpoint:?} is not https: credentials are only sent over TLS"
            )
            .into());
        }
        Ok(AzureSettings {
            subscription_id,
            resource_group,
            location: var("AZURE_LOCATION"),
            endpoint,
            anonymous,
        })
    }

    /// The region of a spec: its own, else the worker's `AZURE_LOCATION`.
    pub fn location_for(&self, spec_location: Option<&String>) -> Result<String, PlatformError> {
        spec_location
            .or(self.location.as_ref())
            .cloned()
            .ok_or_else(|| {
                PlatformError::invalid(
                    "no location: give spec.location, or start the worker with AZURE_LOCATION",
                )
            })
    }

    /// Settings for a test server at `endpoint`, without credentials.
    pub fn for_test_server(endpoint: &str) -> Self {
        AzureSettings {
            subscription_id: "00000000-0000-0000-0000-0000000000aa".into(),
            resource_group: "apps".into(),
            location: Some("westeurope".into()),
            endpoint: endpoint.into(),
            anonymous: true,
        }
    }
}

/// azure_identity's credentials in the order DefaultAzureCredential used to try them:
/// a service principal from the environment (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
/// `AZURE_CLIENT_SECRET`), else workload identity (`AZURE_FEDERATED_TOKEN_FILE`), else
/// managed identity and then the developer tools (Azure CLI, Azure Developer CLI), the
/// first of those two that gives a token being kept for the worker's life.
#[derive(Debug)]
pub struct CredentialChain {
    sources: Vec<(&'static str, Arc<dyn TokenCredential>)>,
    chosen: Mutex<Option<usize>>,
}

impl CredentialChain {
    pub fn from_environment() -> Result<Arc<Self>, SetupError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut sources: Vec<(&'static str, Arc<dyn TokenCredential>)> = Vec::new();
        // An identity configured on purpose is the only one tried: falling through to
        // another after a passing failure would run the worker as someone else.
        if let (Some(tenant), Some(client), Some(secret)) = (
            var("AZURE_TENANT_ID"),
            var("AZURE_CLIENT_ID"),
            var("AZURE_CLIENT_SECRET"),
        ) {
            let credential =
                azure_identity::ClientSecretCredential::new(&tenant, client, secret.into(), None)
                    .map_err(|e| format!("AZURE_CLIENT_SECRET credentials: {e}"))?;
            sources.push(("environment (client secret)", credential));
        } else if var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            let credential = azure_identity::WorkloadIdentityCredential::new(None)
                .map_err(|e| format!("workload identity: {e}"))?;
            sources.push(("workload identity", credential));
        } else {
            // AZURE_CLIENT_ID alone names a user-assigned identity (as the other Azure
            // SDKs read it); without it, the system-assigned one.
            let options = azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: var("AZURE_CLIENT_ID")
                    .map(azure_identity::UserAssignedId::ClientId),
                ..Default::default()
            };
            let user_assigned = options.user_assigned_id.is_some();
            if let Ok(credential) = azure_identity::ManagedIdentityCredential::new(Some(options)) {
                // App Service and Functions name their identity endpoint; elsewhere it is
                // IMDS, which is probed first so a laptop does not wait out its retries.
                let probed: Arc<dyn TokenCredential> = if var("IDENTITY_ENDPOINT").is_some() {
                    credential
                } else {
                    Arc::new(ProbedManagedIdentity::new(credential, IMDS_ADDRESS))
                };
                sources.push((
                    if user_assigned {
                        "managed identity (user-assigned, AZURE_CLIENT_ID)"
                    } else {
                        "managed identity"
                    },
                    probed,
                ));
            }
            if let Ok(credential) = azure_identity::DeveloperToolsCredential::new(None) {
                sources.push(("Azure CLI / Azure Developer CLI", credential));
            }
        }
        Ok(Arc::new(CredentialChain {
            sources,
            chosen: Mutex::new(None),
        }))
    }
}

/// The instance metadata service, where managed identities get their tokens on VMs, VM
/// scale sets and AKS nodes.
const IMDS_ADDRESS: &str = "169.254.169.254:80";

/// How long the IMDS probe waits for a connection. Other Azure SDKs' default chains probe
/// with about a second; azure_identity's managed identity credential alone retries for a
/// minute or more where there is no IMDS, which is every developer's machine.
const IMDS_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A managed identity credential that first checks, once, that the metadata endpoint
/// accepts connections, and fails at once where it does not, so the chain moves on.
#[derive(Debug)]
pub struct ProbedManagedIdentity {
    inner: Arc<dyn TokenCredential>,
    endpoint: String,
    reachable: tokio::sync::OnceCell<bool>,
}

impl ProbedManagedIdentity {
    pub fn new(inner: Arc<dyn TokenCredential>, endpoint: &str) -> Self {
        ProbedManagedIdentity {
            inner,
            endpoint: endpoint.to_owned(),
            reachable: tokio::sync::OnceCell::new(),
        }
    }
}

#[async_trait::async_trait]
impl TokenCredential for ProbedManagedIdentity {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let reachable = *self
            .reachable
            .get_or_init(|| async {
                matches!(
                    tokio::time::timeout(
                        IMDS_PROBE_TIMEOUT,
                        tokio::net::TcpStream::connect(&self.endpoint)
                    )
                    .await,
                    Ok(Ok(_))
                )
            })
            .await;
        if !reachable {
            return Err(azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "no managed identity endpoint answers at {} (not an Azure VM, scale set or AKS node)",
                    self.endpoint
                ),
            ));
        }
        self.inner.get_token(scopes, options).await
    }
}

#[async_trait::async_trait]
impl TokenCredential for CredentialChain {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let chosen = *self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(index) = chosen {
            return self.sources[index].1.get_token(scopes, options).await;
        }
        let mut failures = Vec::new();
        for (index, (name, source)) in self.sources.iter().enumerate() {
            match source.get_token(scopes, options.clone()).await {
                Ok(token) => {
                    tracing::info!(credential = name, "Azure credentials found");
                    *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some(index);
                    return Ok(token);
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        Err(azure_core::Error::with_message(
            ErrorKind::Credential,
            format!(
                "no Azure credentials worked ({}); set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET, use a managed or workload identity, or `az login`",
                failures.join("; ")
            ),
        ))
    }
}

/// The name a target gives in the worker's resource group: derived from the request id
/// (with the id to check the resource's tag against), or the `<resource group>/<name>`
/// of a resource id.
pub(crate) fn target_name<'a>(
    resource_group: &str,
    target: &'a TeardownTarget,
    name_of: fn(&str) -> String,
    kind: &str,
) -> Result<(String, Option<&'a str>), PlatformError> {
    match target {
        TeardownTarget::Request(id) => Ok((name_of(id.as_str()), Some(id.as_str()))),
        TeardownTarget::Resource(id) => id
            .strip_prefix(&format!("{resource_group}/"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(|name| (name.to_owned(), None))
            .ok_or_else(|| {
                PlatformError::invalid(format!(
                    "resource_id {id:?} is not <resource group>/<{kind}> in this worker's resource group {resource_group:?}"
                ))
            }),
    }
}

/// A resource's `tags`, as every ARM resource carries them: ARM leaves them out (or
/// answers `null`) when there are none.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct Tags(Option<BTreeMap<String, String>>);

impl Tags {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }
}

/// Whether the target may touch a resource with these `tags`: tagged with the request's
/// id, or (named by resource id) made by the provisioner at all. Anything else is a
/// conflict.
pub(crate) fn check_owner(
    tags: &Tags,
    request_id: Option<&str>,
    what: &str,
    target: &TeardownTarget,
) -> Result<(), PlatformError> {
    let ours = match request_id {
        Some(id) => tags.get(REQUEST_ID_TAG) == Some(id),
        None => tags.get(MANAGED_TAG) == Some("true"),
    };
    if ours {
        Ok(())
    } else {
        Err(PlatformError::permanent(
            ErrorClass::Conflict,
            format!("{what} was not made by the provisioner for {target}; it was left alone"),
        ))
    }
}

/// A resource's `systemData`, read for when the resource was made. ARM's contract asks
/// every provider for it, but not every API version documents it:
/// <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/common-api-contracts.md#system-metadata-for-all-azure-resources>
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SystemData {
    created_at: Option<String>,
}

impl SystemData {
    pub(crate) fn created(&self) -> Option<std::time::SystemTime> {
        self.created_at.as_deref().and_then(parse_rfc3339)
    }
}

/// A time as ARM writes it (RFC 3339, as `systemData.createdAt`); `None` when it is not
/// one.
pub(crate) fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(std::time::SystemTime::from)
}

/// The request a resource was made for, read from its `provisioner-request-id` tag.
pub(crate) fn tagged_owner(tags: &Tags) -> Option<RequestId> {
    RequestId::new(tags.get(REQUEST_ID_TAG)?).ok()
}

/// How an ARM failure is sorted, by its HTTP status and ARM error `code`. The message is
/// read only for the two codes ARM gives to failures of different kinds, where nothing
/// else tells them apart: Compute's `OperationNotAllowed` (a core quota, or a state that
/// forbids the change) and ACI's `ServiceUnavailable` (no capacity in the region, among
/// others).
pub fn class_of(status: Option<u16>, code: &str, message: &str) -> (ErrorClass, bool) {
    let lower = message.to_ascii_lowercase();
    match code {
        "TooManyRequests" | "SubscriptionRequestsThrottled" => {
            return (ErrorClass::Throttled, true);
        }
        // Another operation on the resource is running, or ARM asks for a retry.
        "AnotherOperationInProgress"
        | "OperationPreempted"
        | "RetryableError"
        | "ConflictingConcurrentWriteNotAllowed" => return (ErrorClass::Transient, true),
        "OperationNotAllowed" if lower.contains("quota") => return (ErrorClass::Quota, false),
        "ContainerGroupQuotaReached" | "StandardCoresQuotaExceeded" | "QuotaExceeded" => {
            return (ErrorClass::Quota, false);
        }
        // The size is not offered to this subscription in this location: asking again
        // changes nothing (another size or location does).
        "SkuNotAvailable" => return (ErrorClass::Capacity, false),
        "AllocationFailed"
        | "ZonalAllocationFailed"
        | "OverconstrainedAllocationRequest"
        | "OverconstrainedZonalAllocationRequest"
        | "ResourceRequestsThrottled" => return (ErrorClass::Capacity, true),
        "ServiceUnavailable" if lower.contains("not available in the location") => {
            return (ErrorClass::Capacity, true);
        }
        // ACI says a quota is reached (its container groups, its cores) with this code
        // too, naming the quota: waiting does not raise it.
        // <https://learn.microsoft.com/troubleshoot/azure/azure-container-instances/configuration-setup/service-unavailable-container-group-quota-exceeded>
        "ServiceUnavailable" if lower.contains("quota") && lower.contains("exceeded") => {
            return (ErrorClass::Quota, false);
        }
        "AuthorizationFailed"
        | "AuthenticationFailed"
        | "InvalidAuthenticationToken"
        | "LinkedAuthorizationFailed" => return (ErrorClass::Permission, false),
        "ResourceNotFound" | "ResourceGroupNotFound" | "NotFound" | "SubscriptionNotFound" => {
            return (ErrorClass::NotFound, false);
        }
        // ARM answers a change that collides with one in progress as `409 Conflict`:
        // worth a bounded retry.
        "Conflict" => return (ErrorClass::Conflict, true),
        "OperationNotAllowed" | "PropertyChangeNotAllowed" => {
            return (ErrorClass::Conflict, false);
        }
        "InvalidParameter"
        | "BadRequest"
        | "InvalidRequestContent"
        | "InvalidResourceName"
        | "InvalidTemplate"
        | "InvalidImage"
        | "InaccessibleImage"
        | "ImageNotFound"
        | "InvalidContainerGroupSpec"
        | "LocationNotAvailableForResourceType"
        | "NoRegisteredProviderFound"
        | "MissingSubscriptionRegistration" => {
            return (ErrorClass::InvalidRequest, false);
        }
        _ => {}
    }
    match status {
        Some(429) => (ErrorClass::Throttled, true),
        Some(401 | 403) => (ErrorClass::Permission, false),
        Some(404) => (ErrorClass::NotFound, false),
        Some(409) => (ErrorClass::Conflict, false),
        Some(400 | 422) => (ErrorClass::InvalidRequest, false),
        Some(500..=599) => (ErrorClass::Transient, true),
        _ => (ErrorClass::Internal, false),
    }
}

/// An ARM error as a [`PlatformError`].
pub fn arm_error(status: Option<u16>, code: &str, message: &str, doing: &str) -> PlatformError {
    let (class, retryable) = class_of(status, code, message);
    PlatformError {
        class,
        retryable,
        message: format!(
            "{doing}: {}{code}: {message}",
            status.map(|s| format!("{s} ")).unwrap_or_default()
        ),
        retry_after: None,
    }
}

/// A failure to reach ARM at all (no answer, no token).
pub fn transport_error(error: &azure_core::Error, doing: &str) -> PlatformError {
    match error.kind() {
        // Retryable: an identity endpoint or Entra ID can fail for a while, and a
        // configuration that never works still ends after the runtime's attempts.
        ErrorKind::Credential => PlatformError::retryable(
            ErrorClass::Permission,
            format!("{doing}: no usable Azure credentials: {error}"),
        ),
        ErrorKind::Io | ErrorKind::Connection => PlatformError::transient(format!(
            "{doing}: Azure Resource Manager is unreachable: {error}"
        )),
        _ => PlatformError::transient(format!("{doing}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credential that must never be asked.
    #[derive(Debug)]
    struct NeverAsked;

    #[async_trait::async_trait]
    impl TokenCredential for NeverAsked {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            panic!("asked for a token although no metadata endpoint answers");
        }
    }

    #[tokio::test]
    async fn a_managed_identity_without_a_metadata_endpoint_fails_at_once() {
        // A port nothing listens on: the probe is refused, the credential is not asked.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let probed = ProbedManagedIdentity::new(Arc::new(NeverAsked), &endpoint);
        let error = probed
            .get_token(&["https://management.azure.com/.default"], None)
            .await
            .expect_err("no endpoint");
        assert!(
            error.to_string().contains("no managed identity endpoint"),
            "{error}"
        );
    }

    #[test]
    fn arm_errors_are_sorted_like_the_aws_ones() {
        let cases = [
            (
                Some(429),
                "TooManyRequests",
                "",
                ErrorClass::Throttled,
                true,
            ),
            (
                Some(409),
                "OperationNotAllowed",
                "Operation could not be completed as it results in exceeding approved standardBSFamily Cores quota.",
                ErrorClass::Quota,
                false,
            ),
            (
                Some(409),
                "SkuNotAvailable",
                "The requested size for resource is currently not available in location 'westeurope'",
                ErrorClass::Capacity,
                false,
            ),
            (
                None,
                "AllocationFailed",
                "Allocation failed.",
                ErrorClass::Capacity,
                true,
            ),
            (
                Some(403),
                "AuthorizationFailed",
                "The client does not have authorization to perform action",
                ErrorClass::Permission,
                false,
            ),
            (
                Some(404),
                "ResourceGroupNotFound",
                "Resource group 'x' could not be found.",
                ErrorClass::NotFound,
                false,
            ),
            (
                Some(400),
                "InvalidParameter",
                "",
                ErrorClass::InvalidRequest,
                false,
            ),
            (Some(409), "Conflict", "", ErrorClass::Conflict, true),
            (
                Some(409),
                "AnotherOperationInProgress",
                "Operation 'start' is not allowed since the VM is being created",
                ErrorClass::Transient,
                true,
            ),
            (
                Some(500),
                "InternalServerError",
                "",
                ErrorClass::Transient,
                true,
            ),
            (Some(502), "", "", ErrorClass::Transient, true),
        ];
        for (status, code, message, class, retryable) in cases {
            assert_eq!(
                class_of(status, code, message),
                (class, retryable),
                "{status:?} {code}"
            );
        }
    }
}
