//! The `gcp-cloud-run` platform: one Cloud Run service per provision request, through
//! the Cloud Run Admin API v2.
//!
//! The service id is derived from the request id, so a second create (a retry, a
//! takeover) gets `409 ALREADY_EXISTS` instead of a second service; the worker then
//! adopts the service when its `provisioner-request-id` annotation names the request.
//! `running` means the service's terminal `Ready` condition succeeded and it is no longer
//! reconciling; the event carries its URL. Teardown deletes the service and waits until
//! it is gone; `404` is success. Cloud Run scales by itself: start, stop and reboot are
//! unsupported.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_run_v2::client::Services;
use google_cloud_run_v2::model::{
    Container, ContainerPort, EnvVar, ResourceRequirements, RevisionScaling, RevisionTemplate,
    Service, condition,
};
use provisioner_core::backoff::Backoff;
use provisioner_core::names::derived_name;
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::gcp::{GcpCloudRunSpec, is_gcp_label};
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use tracing::info;

use crate::{GcpSettings, MANAGED_LABEL, REQUEST_ID_KEY, class_of, classify, configure_builder};

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
const DELETE_TIMEOUT: Duration = Duration::from_secs(300);
/// Cloud Run's own default container port.
const DEFAULT_PORT: u16 = 8080;

/// The service id of a request: an RFC 1035 name of at most 44 characters (Cloud Run
/// allows 49).
pub fn service_id(request_id: &str) -> String {
    derived_name(request_id, 30)
}

fn is_managed(service: &Service) -> bool {
    service.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
}

/// `projects/p/locations/r/services/s` → (`r`, `s`).
fn region_and_id(full_name: &str) -> (&str, &str) {
    let mut parts = full_name.rsplit('/');
    let id = parts.next().unwrap_or("");
    let _ = parts.next();
    let region = parts.next().unwrap_or("");
    (region, id)
}

/// Where a service is in its life: ready, failed (with why), or still on its way.
enum Readiness {
    Ready,
    Failed(String),
    Pending,
}

fn readiness(service: &Service) -> Readiness {
    let Some(condition) = &service.terminal_condition else {
        return Readiness::Pending;
    };
    match condition.state {
        condition::State::ConditionSucceeded if !service.reconciling => Readiness::Ready,
        condition::State::ConditionFailed => Readiness::Failed(condition.message.clone()),
        _ => Readiness::Pending,
    }
}

/// The Cloud Run [`Platform`].
#[derive(Clone)]
pub struct CloudRunPlatform {
    client: Services,
    settings: GcpSettings,
}

impl std::fmt::Debug for CloudRunPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudRunPlatform")
            .field("settings", &self.settings)
            .finish()
    }
}

impl CloudRunPlatform {
    /// Builds the Services client with Application Default Credentials (or none, for a
    /// test server). Credentials are read at the first call, not here.
    pub async fn new(settings: GcpSettings) -> Result<Self, SetupError> {
        if settings.regions().is_empty() {
            return Err(SetupError::config(
                "no Cloud Run region: set GCP_REGION (and GCP_REGIONS for more than one)",
            ));
        }
        let client = configure_builder!(Services::builder(), settings)
            .build()
            .await
            .map_err(|e| format!("cannot build the Cloud Run client: {e}"))?;
        Ok(CloudRunPlatform { client, settings })
    }

    /// The spec's region, which must be one the worker serves, or the worker's own.
    fn region(&self, spec: &GcpCloudRunSpec) -> Result<String, PlatformError> {
        let regions = self.settings.regions();
        match &spec.region {
            Some(region) if regions.contains(region) => Ok(region.clone()),
            Some(region) => Err(PlatformError::invalid(format!(
                "region {region:?} is not one this worker serves ({}); add it to GCP_REGIONS",
                regions.join(", ")
            ))),
            None => self.settings.region.clone().ok_or_else(|| {
                PlatformError::invalid(
                    "no region: give spec.region, or start the worker with GCP_REGION",
                )
            }),
        }
    }

    fn parent(&self, region: &str) -> String {
        format!("projects/{}/locations/{region}", self.settings.project)
    }

    fn service(request: &Request, spec: &GcpCloudRunSpec) -> Service {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        for (key, value) in &request.labels {
            if is_gcp_label(key, value) && !key.starts_with("provisioner") {
                labels.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        labels.insert(MANAGED_LABEL.into(), "true".into());
        let limits: HashMap<String, String> = [("cpu", &spec.cpu), ("memory", &spec.memory)]
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), v)))
            .collect();
        let mut container = Container::new()
            .set_image(&spec.image)
            .set_command(spec.command.clone())
            .set_args(spec.args.clone())
            .set_env(
                spec.env
                    .iter()
                    .map(|(k, v)| EnvVar::new().set_name(k).set_value(v)),
            )
            .set_ports([ContainerPort::new()
                .set_container_port(i32::from(spec.port.unwrap_or(DEFAULT_PORT)))]);
        if !limits.is_empty() {
            container = container.set_resources(ResourceRequirements::new().set_limits(limits));
        }
        let mut template = RevisionTemplate::new().set_containers([container]);
        if spec.min_instances.is_some() || spec.max_instances.is_some() {
            let mut scaling = RevisionScaling::new();
            if let Some(min) = spec.min_instances {
                scaling = scaling.set_min_instance_count(min as i32);
            }
            if let Some(max) = spec.max_instances {
                scaling = scaling.set_max_instance_count(max as i32);
            }
            template = template.set_scaling(scaling);
        }
        Service::new()
            .set_labels(labels)
            .set_annotations([(REQUEST_ID_KEY, request.request_id.as_str())])
            .set_template(template)
    }

    fn resource(service: &Service) -> Resource {
        let (region, id) = region_and_id(&service.name);
        let url = Some(service.uri.clone()).filter(|u| !u.is_empty());
        let port = service
            .template
            .as_ref()
            .and_then(|t| t.containers.first())
            .and_then(|c| c.ports.first())
            .map_or(DEFAULT_PORT, |p| p.container_port as u16);
        let endpoints = url
            .as_deref()
            .and_then(|u| u.strip_prefix("https://"))
            .map(|host| Endpoint {
                port,
                host: host.trim_end_matches('/').to_owned(),
                host_port: 443,
                protocol: "https".into(),
            })
            .into_iter()
            .collect();
        Resource {
            id: format!("{region}/{id}"),
            name: id.to_owned(),
            address: url,
            endpoints,
            members: Vec::new(),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Service>, PlatformError> {
        match self.client.get_service().set_name(name).send().await {
            Ok(service) => Ok(Some(service)),
            Err(e) if e.http_status_code() == Some(404) => Ok(None),
            Err(e) => Err(classify(&e, &format!("reading service {name}"))),
        }
    }

    /// Polls the service until it is ready, within `timeout`.
    async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<Service, PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let service = self.get(name).await?.ok_or_else(|| {
                PlatformError::permanent(
                    ErrorClass::NotFound,
                    format!("service {name} disappeared while the worker waited for it"),
                )
            })?;
            match readiness(&service) {
                Readiness::Ready => return Ok(service),
                Readiness::Failed(why) => {
                    // A failed Ready condition is about what was asked for (an image that
                    // is not there, a container that does not listen on its port), or a
                    // quota; retrying the same request will not change it.
                    let (class, _) = class_of(None, None, &[], &why);
                    let class = match class {
                        ErrorClass::Quota | ErrorClass::Permission => class,
                        _ => ErrorClass::InvalidRequest,
                    };
                    return Err(PlatformError::permanent(
                        class,
                        format!("service {name} is not ready: {why}"),
                    ));
                }
                Readiness::Pending => {}
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "service {name} is not ready after {} s: {}",
                        timeout.as_secs(),
                        service
                            .terminal_condition
                            .map(|c| c.message)
                            .filter(|m| !m.is_empty())
                            .unwrap_or_else(|| "still reconciling".into())
                    ),
                ));
            }
        }
    }

    /// Every service of the project in the regions the worker serves. (Cloud Run lists
    /// one region at a time: `locations/-` is refused.)
    async fn all_services(&self, doing: &str) -> Result<Vec<Service>, PlatformError> {
        let mut services = Vec::new();
        for region in self.settings.regions() {
            let mut page_token = String::new();
            loop {
                let page = self
                    .client
                    .list_services()
                    .set_parent(self.parent(&region))
                    .set_page_token(&page_token)
                    .send()
                    .await
                    .map_err(|e| classify(&e, doing))?;
                services.extend(page.services);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        Ok(services)
    }

    /// The service a target names, if it exists; one the provisioner did not make is a
    /// conflict, never touched.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<Service>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => {
                let service_id = service_id(id.as_str());
                let ours = |s: &Service| {
                    s.annotations.get(REQUEST_ID_KEY).map(String::as_str) == Some(id.as_str())
                };
                // A spec may only name a region the worker serves, so the service is in
                // one of them.
                for region in self.settings.regions() {
                    let name = format!("{}/services/{service_id}", self.parent(&region));
                    if let Some(service) = self.get(&name).await?
                        && ours(&service)
                    {
                        return Ok(Some(service));
                    }
                }
                Ok(None)
            }
            TeardownTarget::Resource(id) => {
                let (region, service_id) = id.split_once('/').ok_or_else(|| {
                    PlatformError::invalid(format!(
                        "resource_id {id:?} is not <region>/<service>; name the request with target_request_id instead"
                    ))
                })?;
                let name = format!("{}/services/{service_id}", self.parent(region));
                match self.get(&name).await? {
                    Some(service) if is_managed(&service) => Ok(Some(service)),
                    Some(_) => Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!("service {id} was not made by the provisioner; it was left alone"),
                    )),
                    None => Ok(None),
                }
            }
        }
    }
}

#[async_trait]
impl Platform for CloudRunPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::GcpCloudRun
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        crate::permissions::CLOUD_RUN_PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        let mut findings = crate::identity_findings(&self.settings);
        findings.push(Finding::pass("regions", self.settings.regions().join(", ")));
        let listed = self.all_services("listing services").await;
        let seen = listed.as_ref().map_or(0, Vec::len);
        findings.push(Finding::of_call(
            "run.services.list",
            listed,
            &format!("allowed; {seen} service(s) in the served regions"),
        ));
        let rest: Vec<&str> = crate::permissions::CLOUD_RUN_PERMISSIONS
            .iter()
            .map(|p| p.action)
            .filter(|a| *a != "run.services.list")
            .collect();
        findings.push(Finding::warn(
            rest.join(", "),
            "checked by the first request: roles/run.admin and roles/iam.serviceAccountUser (docs/gcp.md) grant them",
        ));
        findings
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<GcpCloudRunSpec>(request)?;
            self.region(&spec)?;
        }
        Ok(())
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<GcpCloudRunSpec>(request)?;
        let region = self.region(&spec)?;
        let id = request.request_id.as_str();
        let service_id = service_id(id);
        let parent = self.parent(&region);
        let name = format!("{parent}/services/{service_id}");
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let created = self
            .client
            .create_service()
            .set_parent(&parent)
            .set_service_id(&service_id)
            .set_service(Self::service(request, &spec))
            .send()
            .await;
        match created {
            Ok(_operation) => info!(service = %name, "created"),
            Err(e) if e.http_status_code() == Some(409) => {
                let existing = self.get(&name).await?.ok_or_else(|| {
                    PlatformError::transient(format!(
                        "service {name} was reported to exist but is gone"
                    ))
                })?;
                if existing.annotations.get(REQUEST_ID_KEY).map(String::as_str) != Some(id) {
                    return Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!(
                            "service {name} exists and was not made for request {id}; it was left alone"
                        ),
                    ));
                }
                info!(service = %name, "found the one made before");
            }
            Err(e) => return Err(classify(&e, &format!("creating service {name}"))),
        }
        // The service, not the operation, is polled: its Ready condition is what
        // `running` means, and it says why when it fails.
        let service =
            provisioner_core::metrics::health_wait(self.wait_ready(&name, timeout)).await?;
        Ok(Self::resource(&service))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(service) = self.find(target).await? else {
            return Ok(None);
        };
        let name = service.name.clone();
        match self.client.delete_service().set_name(&name).send().await {
            Ok(_operation) => {}
            Err(e) if e.http_status_code() == Some(404) => return Ok(None),
            Err(e) => return Err(classify(&e, &format!("deleting service {name}"))),
        }
        let mut backoff = Backoff::new(
            DELETE_TIMEOUT,
            Duration::from_millis(250),
            Duration::from_secs(5),
        );
        while self.get(&name).await?.is_some() {
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "service {name} still exists {} s after its delete",
                        DELETE_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        info!(service = %name, "deleted");
        Ok(Some(Self::resource(&service)))
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let all = self
            .all_services("listing the provisioner's services")
            .await?;
        let mut owned = Vec::new();
        for service in all.iter().filter(|s| is_managed(s)) {
            // Without the annotation the service names no request: never touched.
            let Some(request_id) = service
                .annotations
                .get(REQUEST_ID_KEY)
                .and_then(|id| RequestId::new(id.as_str()).ok())
            else {
                continue;
            };
            owned.push(Owned {
                resource: Self::resource(service),
                request_id,
                created: service
                    .create_time
                    .and_then(|t| std::time::SystemTime::try_from(t).ok()),
            });
        }
        Ok(owned)
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found
            .as_ref()
            .and_then(|service| service.annotations.get(REQUEST_ID_KEY))
            .and_then(|id| RequestId::new(id.as_str()).ok()))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|service| Described {
            state: match readiness(&service) {
                Readiness::Ready => State::Running,
                Readiness::Failed(_) => State::Error,
                Readiness::Pending => State::Starting,
            },
            resource: Self::resource(&service),
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        let all = self
            .all_services("listing the provisioner's services")
            .await?;
        Ok(all
            .iter()
            .filter(|s| is_managed(s))
            .map(Self::resource)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_are_cloud_run_names() {
        for id in ["web-1", "Batch_7.a", &"z".repeat(128)] {
            let name = service_id(id);
            assert!(
                provisioner_events::spec::gcp::is_rfc1035_name(&name, 49),
                "{id} -> {name}"
            );
        }
        assert_eq!(
            region_and_id("projects/p/locations/europe-west1/services/prov-x"),
            ("europe-west1", "prov-x")
        );
    }
}
