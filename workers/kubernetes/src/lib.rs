//! The Kubernetes platform: per provision request, a Deployment of one container and,
//! when the spec exposes a port, a Service in front of it, through kube's client on any
//! cluster its configuration reaches (kubeconfig and context, in-cluster service account,
//! EKS/AKS/GKE through their kubeconfig exec plugins).
//!
//! Both objects are named from the request id, so creating them is idempotent: a 409
//! means a retry (or another worker) made them already, and the worker adopts them after
//! checking the request-id annotation. Teardown deletes both with foreground propagation;
//! 404 is success. A teardown names only the request, so the worker finds its Deployment
//! by label in each namespace it serves ([`NamespaceScope`]): a namespaced Role in each is
//! enough, unless the operator chose every namespace (which needs a ClusterRole).

#[cfg(feature = "fake-api")]
pub mod fake_api;
pub mod permissions;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use provisioner_core::backoff::Backoff;
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::kubernetes::{KubernetesSpec, is_dns_label, is_label};
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use tracing::info;

/// Annotation holding the request id (labels cannot hold 128 characters).
pub const REQUEST_ANNOTATION: &str = "provisioner.io/request-id";
/// Label naming the objects of one request, for selectors and lookups.
pub const NAME_LABEL: &str = "provisioner.io/name";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "provisioner";

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The name of a request's Deployment and Service: a DNS-1035 label (what Service names
/// must be) derived from the request id, with a hash so distinct ids never collide.
pub fn object_name(request_id: &str) -> String {
    provisioner_core::names::derived_name(request_id, 44)
}

/// Sorts an API answer by its HTTP code (and reason) into the runtime's classes.
pub fn classify_status(code: u16, reason: &str, message: &str) -> (ErrorClass, bool) {
    match code {
        429 => (ErrorClass::Throttled, true),
        500..=599 => (ErrorClass::Transient, true),
        401 => (ErrorClass::Permission, false),
        403 if message.contains("exceeded quota") => (ErrorClass::Quota, false),
        403 => (ErrorClass::Permission, false),
        404 => (ErrorClass::NotFound, false),
        409 => (ErrorClass::Conflict, false),
        400 | 422 => (ErrorClass::InvalidRequest, false),
        _ if reason == "Timeout" || reason == "ServerTimeout" => (ErrorClass::Transient, true),
        _ => (ErrorClass::Internal, false),
    }
}

/// Classifies a client error: API answers by code, anything else (connection refused,
/// TLS, a dropped stream) is transient.
pub fn classify(error: &kube::Error, doing: &str) -> PlatformError {
    match error {
        kube::Error::Api(status) => {
            let (class, retryable) = classify_status(status.code, &status.reason, &status.message);
            PlatformError {
                class,
                retryable,
                message: format!(
                    "{doing}: {} {}: {}",
                    status.code, status.reason, status.message
                ),
                retry_after: None,
            }
        }
        other => PlatformError::transient(format!(
            "{doing}: the Kubernetes API is unreachable: {other}"
        )),
    }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The namespaces a worker makes objects in and looks for them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    /// These namespaces (the client's default first): a Role in each is enough, as every
    /// lookup is a namespaced list.
    Listed(Vec<String>),
    /// Every namespace: lookups list across the cluster, which needs a ClusterRole.
    All,
}

impl NamespaceScope {
    /// From `KUBERNETES_NAMESPACES` (comma-separated names, or `*` for every namespace)
    /// and the client's default namespace, which is always served.
    pub fn parse(setting: Option<&str>, default_namespace: &str) -> Result<Self, SetupError> {
        let setting = setting.map(str::trim).unwrap_or_default();
        if setting == "*" {
            return Ok(NamespaceScope::All);
        }
        let mut namespaces = vec![default_namespace.to_owned()];
        for namespace in setting.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !is_dns_label(namespace) {
                return Err(SetupError::config(format!(
                    "KUBERNETES_NAMESPACES: {namespace:?} is not a namespace name (a DNS label)"
                )));
            }
            if !namespaces.iter().any(|n| n == namespace) {
                namespaces.push(namespace.to_owned());
            }
        }
        Ok(NamespaceScope::Listed(namespaces))
    }

    fn serves(&self, namespace: &str) -> bool {
        match self {
            NamespaceScope::All => true,
            NamespaceScope::Listed(namespaces) => namespaces.iter().any(|n| n == namespace),
        }
    }
}

/// The Kubernetes [`Platform`].
#[derive(Clone)]
pub struct KubernetesPlatform {
    client: kube::Client,
    scope: NamespaceScope,
}

impl std::fmt::Debug for KubernetesPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesPlatform")
            .field("default_namespace", &self.client.default_namespace())
            .field("scope", &self.scope)
            .finish()
    }
}

impl KubernetesPlatform {
    /// Connects as kube does: `KUBECONFIG` (or `~/.kube/config`) and its current context,
    /// or the in-cluster service account. Fails at start when neither is usable.
    pub async fn from_environment() -> Result<Self, SetupError> {
        let client = kube::Client::try_default().await.map_err(|e| {
            SetupError::config(format!(
                "no usable Kubernetes configuration: {e} (set KUBECONFIG, or run in a pod with a service account)"
            ))
        })?;
        let setting = std::env::var("KUBERNETES_NAMESPACES").ok();
        let scope = NamespaceScope::parse(setting.as_deref(), client.default_namespace())?;
        Ok(KubernetesPlatform { client, scope })
    }

    /// A platform serving only the client's default namespace.
    pub fn new(client: kube::Client) -> Self {
        let scope = NamespaceScope::Listed(vec![client.default_namespace().to_owned()]);
        KubernetesPlatform { client, scope }
    }

    /// Serves `scope` instead.
    pub fn with_namespaces(mut self, scope: NamespaceScope) -> Self {
        self.scope = scope;
        self
    }

    fn namespace(&self, spec: &KubernetesSpec) -> String {
        spec.namespace
            .clone()
            .unwrap_or_else(|| self.client.default_namespace().to_owned())
    }

    fn labels(request: &Request, spec: &KubernetesSpec, name: &str) -> BTreeMap<String, String> {
        let mut labels = spec.labels.clone();
        // The request's labels where Kubernetes accepts them as labels; the spec's win.
        for (key, value) in &request.labels {
            if is_label(key, value) && !key.starts_with("provisioner.io/") {
                labels.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        labels.insert(NAME_LABEL.into(), name.into());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        labels
    }

    fn meta(request: &Request, spec: &KubernetesSpec, name: &str, namespace: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(Self::labels(request, spec, name)),
            annotations: Some(BTreeMap::from([(
                REQUEST_ANNOTATION.to_owned(),
                request.request_id.to_string(),
            )])),
            ..ObjectMeta::default()
        }
    }

    fn deployment(
        request: &Request,
        spec: &KubernetesSpec,
        name: &str,
        namespace: &str,
    ) -> Deployment {
        let selector = BTreeMap::from([(NAME_LABEL.to_owned(), name.to_owned())]);
        let resources = spec.resources.as_ref().map(|r| {
            let quantities: BTreeMap<String, Quantity> = [("cpu", &r.cpu), ("memory", &r.memory)]
                .into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), Quantity(v))))
                .collect();
            ResourceRequirements {
                requests: Some(quantities.clone()),
                limits: Some(quantities),
                ..ResourceRequirements::default()
            }
        });
        let container = Container {
            name: "main".into(),
            image: Some(spec.image.clone()),
            command: (!spec.command.is_empty()).then(|| spec.command.clone()),
            args: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: (!spec.env.is_empty()).then(|| {
                spec.env
                    .iter()
                    .map(|(k, v)| EnvVar {
                        name: k.clone(),
                        value: Some(v.clone()),
                        ..EnvVar::default()
                    })
                    .collect()
            }),
            ports: spec.port.map(|port| {
                vec![ContainerPort {
                    container_port: i32::from(port),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }]
            }),
            resources,
            ..Container::default()
        };
        let meta = Self::meta(request, spec, name, namespace);
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(spec.replicas() as i32),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: meta.labels.clone(),
                        annotations: meta.annotations.clone(),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            metadata: meta,
            ..Deployment::default()
        }
    }

    fn service(
        request: &Request,
        spec: &KubernetesSpec,
        name: &str,
        namespace: &str,
        port: u16,
    ) -> Service {
        Service {
            metadata: Self::meta(request, spec, name, namespace),
            spec: Some(ServiceSpec {
                type_: Some(spec.service_type().to_owned()),
                selector: Some(BTreeMap::from([(NAME_LABEL.to_owned(), name.to_owned())])),
                ports: Some(vec![ServicePort {
                    name: Some("main".into()),
                    port: i32::from(port),
                    target_port: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                            port,
                        )),
                    ),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// Creates `object`, or adopts the one a retry made before (409 and the same
    /// request-id annotation); an object of another request under the name is a conflict.
    async fn ensure<K>(
        &self,
        api: &Api<K>,
        object: &K,
        request_id: &str,
        kind: &str,
    ) -> Result<K, PlatformError>
    where
        K: kube::Resource
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), object).await {
            Ok(created) => {
                info!(kind, name = %name, "created");
                Ok(created)
            }
            Err(e) if status_code(&e) == Some(409) => {
                let existing = api
                    .get(&name)
                    .await
                    .map_err(|e| classify(&e, &format!("reading the existing {kind} {name}")))?;
                if annotation(existing.meta(), REQUEST_ANNOTATION) == Some(request_id) {
                    info!(kind, name = %name, "found the one made before");
                    Ok(existing)
                } else {
                    Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!(
                            "{kind} {name} exists and was not made for request {request_id}; it was left alone"
                        ),
                    ))
                }
            }
            Err(e) => Err(classify(&e, &format!("creating {kind} {name}"))),
        }
    }

    /// Polls until the Deployment has its replicas available, within `timeout`; ends at
    /// once when the Deployment reports it stopped progressing.
    async fn wait_available(
        &self,
        api: &Api<Deployment>,
        namespace: &str,
        name: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(), PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(200), Duration::from_secs(3));
        loop {
            let deployment = api
                .get(name)
                .await
                .map_err(|e| classify(&e, &format!("reading Deployment {name}")))?;
            let generation = deployment.metadata.generation.unwrap_or(0);
            let status = deployment.status.unwrap_or_default();
            let available = status.available_replicas.unwrap_or(0).max(0) as u32;
            if status.observed_generation.unwrap_or(0) >= generation && available >= replicas {
                return Ok(());
            }
            // The controller gave up: `Progressing` is False with ProgressDeadlineExceeded
            // once `progressDeadlineSeconds` (600 s by default) passed without progress
            // (https://kubernetes.io/docs/concepts/workloads/controllers/deployment/#failed-deployment).
            // Waiting on cannot help; the pods say why.
            let stalled = status.conditions.iter().flatten().find(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            });
            if let Some(stalled) = stalled {
                let (class, why) = self.pods_reason(namespace, name).await;
                return Err(PlatformError::permanent(
                    class,
                    format!(
                        "Deployment {name} stopped progressing ({}){}",
                        stalled
                            .message
                            .as_deref()
                            .unwrap_or("ProgressDeadlineExceeded"),
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    ),
                ));
            }
            if !backoff.wait().await {
                let why = status
                    .conditions
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c.status != "True")
                    .filter_map(|c| c.message)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "Deployment {name} has {available} of {replicas} replicas available after {} s{}",
                        timeout.as_secs(),
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {why}")
                        }
                    ),
                ));
            }
        }
    }

    /// Why the pods of Deployment `name` do not run, read from their statuses: a
    /// container waiting (an image that cannot be pulled, a crash loop, a bad config) or a
    /// pod the scheduler cannot place; and the class that reason belongs to. `None` when
    /// the pods cannot be read (the Role lacks `pods: list`) or say nothing.
    async fn pods_reason(&self, namespace: &str, name: &str) -> (ErrorClass, Option<String>) {
        use k8s_openapi::api::core::v1::Pod;
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let listed = match pods
            .list(&ListParams::default().labels(&format!("{NAME_LABEL}={name}")))
            .await
        {
            Ok(listed) => listed,
            Err(e) => {
                info!(error = %e, "could not read the Deployment's pods for the reason");
                return (ErrorClass::Timeout, None);
            }
        };
        for pod in &listed.items {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let Some(status) = &pod.status else { continue };
            for container in status.container_statuses.iter().flatten() {
                let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref())
                else {
                    continue;
                };
                let reason = waiting.reason.clone().unwrap_or_default();
                let class = match reason.as_str() {
                    "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CrashLoopBackOff" => ErrorClass::InvalidRequest,
                    _ => ErrorClass::Timeout,
                };
                return (
                    class,
                    Some(format!(
                        "pod {pod_name}: container {} is waiting: {reason}{}",
                        container.name,
                        waiting
                            .message
                            .as_deref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    )),
                );
            }
            for condition in status.conditions.iter().flatten() {
                if condition.type_ == "PodScheduled"
                    && condition.status == "False"
                    && condition.reason.as_deref() == Some("Unschedulable")
                {
                    return (
                        ErrorClass::Capacity,
                        Some(format!(
                            "pod {pod_name} cannot be scheduled{}",
                            condition
                                .message
                                .as_deref()
                                .map(|m| format!(" ({m})"))
                                .unwrap_or_default()
                        )),
                    );
                }
            }
        }
        (ErrorClass::Timeout, None)
    }

    /// Polls until the Service has an address: its cluster IP, or for a LoadBalancer the
    /// load balancer's ingress.
    async fn wait_address(
        &self,
        api: &Api<Service>,
        name: &str,
        timeout: Duration,
    ) -> Result<Service, PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(200), Duration::from_secs(3));
        loop {
            let service = api
                .get(name)
                .await
                .map_err(|e| classify(&e, &format!("reading Service {name}")))?;
            if service_address(&service).is_some() {
                return Ok(service);
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "Service {name} has no address after {} s",
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    /// The Deployments API of every namespace the worker serves (one cluster-wide API
    /// when it serves all), so lookups need only the rights of the served namespaces.
    fn deployment_apis(&self) -> Vec<Api<Deployment>> {
        match &self.scope {
            NamespaceScope::All => vec![Api::all(self.client.clone())],
            NamespaceScope::Listed(namespaces) => namespaces
                .iter()
                .map(|n| Api::namespaced(self.client.clone(), n))
                .collect(),
        }
    }

    /// The namespace and name of a target's Deployment, when there is one.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<Deployment>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => {
                let name = object_name(id.as_str());
                let selector = ListParams::default().labels(&format!("{NAME_LABEL}={name}"));
                let apis = self.deployment_apis();
                for api in apis {
                    let found = api
                        .list(&selector)
                        .await
                        .map_err(|e| classify(&e, &format!("looking up the Deployment of {id}")))?;
                    if let Some(deployment) = found
                        .items
                        .into_iter()
                        .find(|d| annotation(&d.metadata, REQUEST_ANNOTATION) == Some(id.as_str()))
                    {
                        return Ok(Some(deployment));
                    }
                }
                Ok(None)
            }
            TeardownTarget::Resource(id) => {
                let (namespace, name) = id.split_once('/').ok_or_else(|| {
                    PlatformError::invalid(format!(
                        "resource_id {id:?} is not <namespace>/<name>; name the request with target_request_id instead"
                    ))
                })?;
                let api = Api::<Deployment>::namespaced(self.client.clone(), namespace);
                match api.get_opt(name).await {
                    Ok(None) => Ok(None),
                    Ok(Some(deployment)) => {
                        let managed = deployment
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(MANAGED_BY_LABEL))
                            .map(String::as_str)
                            == Some(MANAGED_BY);
                        if managed {
                            Ok(Some(deployment))
                        } else {
                            Err(PlatformError::permanent(
                                ErrorClass::Conflict,
                                format!(
                                    "Deployment {id} was not made by the provisioner; it was left alone"
                                ),
                            ))
                        }
                    }
                    Err(e) => Err(classify(&e, &format!("reading Deployment {id}"))),
                }
            }
        }
    }

    fn resource(&self, deployment: &Deployment, service: Option<&Service>) -> Resource {
        let namespace = deployment.metadata.namespace.clone().unwrap_or_default();
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let address = service.and_then(service_address);
        let endpoints = match (service, &address) {
            (Some(service), Some(host)) => service
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|p| Endpoint {
                    port: p.port as u16,
                    host: host.clone(),
                    host_port: p.node_port.unwrap_or(p.port) as u16,
                    protocol: p
                        .protocol
                        .unwrap_or_else(|| "TCP".into())
                        .to_ascii_lowercase(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Resource {
            id: format!("{namespace}/{name}"),
            name,
            address,
            endpoints,
            members: Vec::new(),
        }
    }
}

/// A Service's address: a load balancer's ingress when it is one, else its cluster IP.
fn service_address(service: &Service) -> Option<String> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = service
            .status
            .as_ref()?
            .load_balancer
            .as_ref()?
            .ingress
            .as_ref()?
            .first()?;
        return ingress.ip.clone().or_else(|| ingress.hostname.clone());
    }
    spec.cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None")
}

#[async_trait]
impl Platform for KubernetesPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::Kubernetes
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        permissions::PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let (namespaces, where_) = match &self.scope {
            NamespaceScope::All => (vec![None], "every namespace (a ClusterRole)".to_owned()),
            NamespaceScope::Listed(served) => (
                served.iter().cloned().map(Some).collect(),
                served.join(", "),
            ),
        };
        let mut findings = vec![Finding::pass("namespaces", where_)];
        let reviews = Api::<SelfSubjectAccessReview>::all(self.client.clone());
        for namespace in namespaces {
            let mut kinds: Vec<(&str, &str)> = Vec::new();
            for permission in permissions::PERMISSIONS {
                let (group, resource, _) = permissions::split(permission.action);
                if !kinds.contains(&(group, resource)) {
                    kinds.push((group, resource));
                }
            }
            for (group, resource) in kinds {
                let mut denied = Vec::new();
                let verbs: Vec<&str> = permissions::PERMISSIONS
                    .iter()
                    .filter_map(|p| {
                        let (g, r, verb) = permissions::split(p.action);
                        (g == group && r == resource).then_some(verb)
                    })
                    .collect();
                for verb in verbs.iter().copied() {
                    let review = SelfSubjectAccessReview {
                        spec: SelfSubjectAccessReviewSpec {
                            resource_attributes: Some(ResourceAttributes {
                                group: Some(group.into()),
                                resource: Some(resource.into()),
                                verb: Some(verb.into()),
                                namespace: namespace.clone(),
                                ..ResourceAttributes::default()
                            }),
                            ..SelfSubjectAccessReviewSpec::default()
                        },
                        ..SelfSubjectAccessReview::default()
                    };
                    match reviews.create(&PostParams::default(), &review).await {
                        Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
                        Ok(_) => denied.push(verb.to_owned()),
                        Err(e) => denied.push(format!(
                            "{verb} (unknown: {})",
                            classify(&e, "asking SelfSubjectAccessReview").message
                        )),
                    }
                }
                let scope = namespace
                    .as_deref()
                    .map_or("across the cluster".to_owned(), |n| format!("in {n}"));
                let check = format!("{resource} {scope}");
                findings.push(if denied.is_empty() {
                    Finding::pass(check, format!("{} allowed", verbs.join(", ")))
                } else {
                    Finding::fail(
                        check,
                        format!(
                            "not allowed: {}; bind the Role of docs/kubernetes.md there",
                            denied.join(", ")
                        ),
                    )
                });
            }
        }
        findings
    }

    /// A tenant's `vcpus` count the pods' CPU requests (rounded up to whole vCPUs); a pod
    /// that requests none counts one, as a namespace's CPU quota would refuse it.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<KubernetesSpec>(request)?;
        let per_pod = match spec.resources.as_ref().and_then(|r| r.cpu.as_deref()) {
            Some(cpu) => provisioner_core::cpu_millis(cpu).ok_or_else(|| {
                PlatformError::invalid(format!("resources.cpu {cpu:?} is not a CPU amount"))
            })?,
            None => 1000,
        };
        let pods = u64::from(spec.replicas.unwrap_or(1));
        Ok(provisioner_core::vcpus_cost(per_pod.saturating_mul(pods)))
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<KubernetesSpec>(request)?;
            // A teardown by request id looks only where the worker serves: an object made
            // elsewhere could never be found again.
            let namespace = self.namespace(&spec);
            if let NamespaceScope::Listed(served) = &self.scope
                && !self.scope.serves(&namespace)
            {
                return Err(PlatformError::invalid(format!(
                    "namespace {namespace:?} is not one this worker serves ({}); add it to the worker's KUBERNETES_NAMESPACES (with a Role there), or set * for every namespace (with a ClusterRole)",
                    served.join(", ")
                )));
            }
        }
        Ok(())
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let selector = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let apis = self.deployment_apis();
        let mut owned = Vec::new();
        for api in apis {
            let found = api
                .list(&selector)
                .await
                .map_err(|e| classify(&e, "listing the provisioner's Deployments"))?;
            for deployment in found.items {
                // Without the annotation the Deployment names no request: never touched.
                let Some(request_id) = annotation(&deployment.metadata, REQUEST_ANNOTATION)
                    .and_then(|id| RequestId::new(id).ok())
                else {
                    continue;
                };
                let created = deployment
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| std::time::SystemTime::from(t.0));
                owned.push(Owned {
                    resource: self.resource(&deployment, None),
                    request_id,
                    created,
                });
            }
        }
        Ok(owned)
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found
            .as_ref()
            .and_then(|d| annotation(&d.metadata, REQUEST_ANNOTATION))
            .and_then(|id| RequestId::new(id).ok()))
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<KubernetesSpec>(request)?;
        let id = request.request_id.as_str();
        let name = object_name(id);
        let namespace = self.namespace(&spec);
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), &namespace);
        let deployment = self
            .ensure(
                &deployments,
                &Self::deployment(request, &spec, &name, &namespace),
                id,
                "Deployment",
            )
            .await?;
        let service = match spec.port {
            Some(port) => {
                let services = Api::<Service>::namespaced(self.client.clone(), &namespace);
                self.ensure(
                    &services,
                    &Self::service(request, &spec, &name, &namespace, port),
                    id,
                    "Service",
                )
                .await?;
                Some(self.wait_address(&services, &name, timeout).await?)
            }
            None => None,
        };
        provisioner_core::metrics::health_wait(self.wait_available(
            &deployments,
            &namespace,
            &name,
            spec.replicas(),
            timeout,
        ))
        .await?;
        Ok(self.resource(&deployment, service.as_ref()))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(deployment) = self.find(target).await? else {
            return Ok(None);
        };
        let namespace = deployment.metadata.namespace.clone().unwrap_or_default();
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams::foreground();
        let services = Api::<Service>::namespaced(self.client.clone(), &namespace);
        match services.delete(&name, &params).await {
            Ok(_) => info!(service = %name, "deleted Service"),
            Err(e) if status_code(&e) == Some(404) => {}
            Err(e) => {
                return Err(classify(
                    &e,
                    &format!("deleting Service {namespace}/{name}"),
                ));
            }
        }
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), &namespace);
        match deployments.delete(&name, &params).await {
            Ok(_) => info!(deployment = %name, "deleted Deployment"),
            Err(e) if status_code(&e) == Some(404) => return Ok(None),
            Err(e) => {
                return Err(classify(
                    &e,
                    &format!("deleting Deployment {namespace}/{name}"),
                ));
            }
        }
        Ok(Some(self.resource(&deployment, None)))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        let Some(deployment) = self.find(target).await? else {
            return Ok(None);
        };
        let namespace = deployment.metadata.namespace.clone().unwrap_or_default();
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let service = Api::<Service>::namespaced(self.client.clone(), &namespace)
            .get_opt(&name)
            .await
            .map_err(|e| classify(&e, &format!("reading Service {namespace}/{name}")))?;
        let desired = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let available = deployment
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        Ok(Some(Described {
            state: if available >= desired {
                State::Running
            } else {
                State::Starting
            },
            resource: self.resource(&deployment, service.as_ref()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_dns_labels_and_distinct() {
        for id in ["web-1", "Web_1", "a.b.c", &"x".repeat(128), "9lives"] {
            let name = object_name(id);
            assert!(name.len() <= 63, "{name}");
            assert!(
                provisioner_events::spec::kubernetes::is_dns_label(&name),
                "{id} -> {name}"
            );
            assert!(name.starts_with("prov-"));
        }
        assert_ne!(object_name("Web_1"), object_name("web-1"));
        assert_eq!(object_name("web-1"), object_name("web-1"));
    }

    #[test]
    fn api_answers_are_classified_by_code() {
        let cases = [
            (429, "TooManyRequests", "", ErrorClass::Throttled, true),
            (503, "ServiceUnavailable", "", ErrorClass::Transient, true),
            (
                403,
                "Forbidden",
                "deployments is forbidden",
                ErrorClass::Permission,
                false,
            ),
            (
                403,
                "Forbidden",
                "exceeded quota: compute",
                ErrorClass::Quota,
                false,
            ),
            (404, "NotFound", "", ErrorClass::NotFound, false),
            (409, "AlreadyExists", "", ErrorClass::Conflict, false),
            (422, "Invalid", "", ErrorClass::InvalidRequest, false),
        ];
        for (code, reason, message, class, retryable) in cases {
            assert_eq!(
                classify_status(code, reason, message),
                (class, retryable),
                "{code} {message}"
            );
        }
    }
}
