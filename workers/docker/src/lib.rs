//! The Docker platform: one container per provision request, through the Docker Engine
//! API (or Podman's Docker-compatible socket) with bollard.
//!
//! Idempotency: the container is named `prov-<request_id>` and labelled with the request
//! id, so a retry or a takeover finds the container it made instead of making another, and
//! a teardown by request id needs no state. Safety: whoever can publish a request can start
//! a container, so [`DockerPolicy`] refuses privileged containers, host mounts, host
//! networking and added capabilities unless the worker's own configuration allows them,
//! puts containers only on networks the operator named (the engine's default bridge
//! otherwise: a named network may be the one Redis and RabbitMQ sit on), and can
//! restrict images to an allow-list.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, HostConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::TryStreamExt;
use provisioner_core::health::{NotReady, Probe};
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::HealthCheck;
use provisioner_events::spec::docker::{DockerSpec, PullPolicy};
use provisioner_events::{
    Endpoint, ErrorClass, PlatformName, Request, RequestId, Resource, State, TeardownTarget,
};
use tracing::{debug, info, warn};

/// The prefix of the labels the worker sets itself; a request may not set any.
pub const RESERVED_LABEL_PREFIX: &str = "io.provisioner.";
/// Label set on every container the provisioner makes.
pub const MANAGED_LABEL: &str = "io.provisioner.managed";
/// Label holding the request id the container was made for.
pub const REQUEST_LABEL: &str = "io.provisioner.request-id";
/// Label holding the tenant, when the request named one.
pub const TENANT_LABEL: &str = "io.provisioner.tenant";

/// The container name for a request id. A producer's request id is already a valid one.
///
/// A fleet member's id (`<fleet>#<i>`) holds a `#`, which container names refuse: its
/// container is `prov_<fleet>_<i>`. The other prefix keeps it apart from every producer's
/// id, and the index after the last `_` keeps members of different fleets apart.
pub fn container_name(request_id: &str) -> String {
    if request_id.contains('#') {
        format!("prov_{}", request_id.replace('#', "_"))
    } else {
        format!("prov-{request_id}")
    }
}

/// What this worker allows requests to do; from the worker's configuration, never from
/// a message.
#[derive(Debug, Clone)]
pub struct DockerPolicy {
    pub allow_privileged: bool,
    pub allow_host_mounts: bool,
    pub allow_host_network: bool,
    pub allow_cap_add: bool,
    /// Networks a spec's `network_mode` may name besides the engine's default bridge
    /// (`bridge`, `default`) and `none`. Empty by default: a named network may be the
    /// one the services sit on, and Podman's modes (`slirp4netns:allow_host_loopback=true`,
    /// `pasta:…`) can open the host's loopback.
    pub allowed_networks: Vec<String>,
    /// Image patterns allowed; empty allows every image. `prefix*` matches by prefix.
    pub allowed_images: Vec<String>,
    /// The host address published ports bind to, and that events report.
    pub publish_address: String,
}

impl Default for DockerPolicy {
    fn default() -> Self {
        DockerPolicy {
            allow_privileged: false,
            allow_host_mounts: false,
            allow_host_network: false,
            allow_cap_add: false,
            allowed_networks: Vec::new(),
            allowed_images: Vec::new(),
            publish_address: "127.0.0.1".into(),
        }
    }
}

/// Network modes every worker allows: the engine's default bridge (Docker's `bridge`,
/// Podman's `bridge`/`default`) and no network at all.
const DEFAULT_NETWORKS: [&str; 3] = ["bridge", "default", "none"];

impl DockerPolicy {
    /// An allow-list, not a deny-list: every mode an engine may add (Podman's `pasta:`,
    /// `slirp4netns:` with options, `private`, a network's name or id) is refused unless
    /// the operator named it. Host-like modes need `DOCKER_ALLOW_HOST_NETWORK` as well.
    fn check_network(&self, mode: &str) -> Result<(), PlatformError> {
        let host_like = mode == "host" || mode.starts_with("container:") || mode.starts_with("ns:");
        if host_like {
            if self.allow_host_network {
                return Ok(());
            }
            return Err(PlatformError::permanent(
                ErrorClass::Permission,
                format!(
                    "network mode {mode:?} shares the host's or another container's network, which this worker's policy does not allow (set DOCKER_ALLOW_HOST_NETWORK=true on the worker to allow it)"
                ),
            ));
        }
        if DEFAULT_NETWORKS.contains(&mode) || self.allowed_networks.iter().any(|n| n == mode) {
            return Ok(());
        }
        let allowed: Vec<&str> = DEFAULT_NETWORKS
            .iter()
            .copied()
            .chain(self.allowed_networks.iter().map(String::as_str))
            .collect();
        Err(PlatformError::permanent(
            ErrorClass::Permission,
            format!(
                "network mode {mode:?} is not on this worker's network allow-list ({}); an operator adds a network with DOCKER_ALLOWED_NETWORKS on the worker",
                allowed.join(", ")
            ),
        ))
    }

    fn image_allowed(&self, image: &str) -> bool {
        self.allowed_images.is_empty()
            || self
                .allowed_images
                .iter()
                .any(|pattern| provisioner_core::allow::matches(pattern, image))
    }

    /// Refuses what the worker's configuration does not allow.
    pub fn check(&self, spec: &DockerSpec) -> Result<(), PlatformError> {
        let refuse = |what: &str, setting: &str| {
            Err(PlatformError::permanent(
                ErrorClass::Permission,
                format!(
                    "{what} is not allowed by this worker's policy (set {setting} on the worker to allow it)"
                ),
            ))
        };
        if spec.privileged && !self.allow_privileged {
            return refuse("a privileged container", "DOCKER_ALLOW_PRIVILEGED=true");
        }
        if !spec.binds.is_empty() && !self.allow_host_mounts {
            return refuse("mounting host paths", "DOCKER_ALLOW_HOST_MOUNTS=true");
        }
        if !spec.cap_add.is_empty() && !self.allow_cap_add {
            return refuse("adding capabilities", "DOCKER_ALLOW_CAP_ADD=true");
        }
        if let Some(mode) = &spec.network_mode {
            self.check_network(mode)?;
        }
        if !self.image_allowed(&spec.image) {
            return Err(PlatformError::permanent(
                ErrorClass::Permission,
                format!(
                    "image {} is not on this worker's allow-list ({})",
                    spec.image,
                    self.allowed_images.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// The Docker [`Platform`].
#[derive(Debug, Clone)]
pub struct DockerPlatform {
    docker: Docker,
    policy: DockerPolicy,
    /// Where the engine is, for error messages.
    endpoint: String,
}

/// Sorts an engine error into the runtime's classes, keeping the engine's words.
pub fn classify(error: &DockerError, doing: &str) -> PlatformError {
    match error {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let message = format!("{doing}: {message}");
            match status_code {
                400 => PlatformError::invalid(message),
                401 | 403 => PlatformError::permanent(ErrorClass::Permission, message),
                404 => PlatformError::permanent(ErrorClass::NotFound, message),
                409 => PlatformError::permanent(ErrorClass::Conflict, message),
                429 => PlatformError::retryable(ErrorClass::Throttled, message),
                _ => PlatformError::transient(message),
            }
        }
        DockerError::JsonDataError { message, .. } => PlatformError::transient(format!(
            "{doing}: the engine answered something this worker cannot read ({message})"
        )),
        DockerError::RequestTimeoutError => {
            PlatformError::transient(format!("{doing}: the Docker engine did not answer in time"))
        }
        other => PlatformError::transient(format!(
            "{doing}: the Docker engine is unreachable: {other}"
        )),
    }
}

/// Sorts a failed pull. The engine answers a registry's refusal inside the pull's
/// progress stream, as text only (no status code), so the registry's own words decide
/// here, in this one table: a missing image or registry host is permanent, a refusal of
/// credentials too, rate limits and an unreachable or failing registry are passing.
fn classify_pull(error: &DockerError, image: &str) -> PlatformError {
    let said = match error {
        DockerError::DockerStreamError { error } => error.clone(),
        other => {
            let mut failure = classify(other, "pull");
            failure.message = format!(
                "image {image} is not on the Docker engine; {}",
                failure.message
            );
            // A 404 from the engine itself is a missing image, as before.
            return failure;
        }
    };
    let text = said.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let message =
        format!("image {image} is not on the Docker engine and pulling it failed: {said}");
    if has(&["toomanyrequests", "too many requests", "rate limit"]) {
        PlatformError::retryable(ErrorClass::Throttled, message)
    } else if has(&[
        "unauthorized",
        "denied",
        "authentication required",
        "forbidden",
    ]) {
        PlatformError::permanent(ErrorClass::Permission, message)
    } else if has(&[
        "manifest unknown",
        "not found",
        "does not exist",
        "name unknown",
        "no such host",
    ]) {
        PlatformError::permanent(ErrorClass::NotFound, message)
    } else if has(&[
        "connection refused",
        "connection reset",
        "timeout",
        "timed out",
        "tls handshake",
        "eof",
        "service unavailable",
        "bad gateway",
        "internal server error",
        "temporary failure",
    ]) {
        PlatformError::transient(format!(
            "{message} (the registry is unreachable or failing; retried)"
        ))
    } else {
        PlatformError::permanent(ErrorClass::NotFound, message)
    }
}

fn is_status(error: &DockerError, code: u16) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE_S: i32 = 10;

impl DockerPlatform {
    /// Connects to `docker_host` (`unix:///path` or `tcp://host:port`; `None` reads
    /// `DOCKER_HOST`, else the local default socket) and checks that the engine answers, so
    /// a worker with no engine fails at start with a clear message.
    pub async fn connect(
        docker_host: Option<&str>,
        policy: DockerPolicy,
    ) -> Result<Self, SetupError> {
        let endpoint = match docker_host {
            Some(host) => host.to_owned(),
            None => std::env::var("DOCKER_HOST")
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".into()),
        };
        let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
            Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION)
        } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
            Docker::connect_with_http(&endpoint, 30, bollard::API_DEFAULT_VERSION)
        } else {
            return Err(SetupError::config(format!(
                "DOCKER_HOST {endpoint:?} must start with unix:// or tcp://"
            )));
        }
        .map_err(|e| {
            SetupError::config(format!("cannot use the Docker engine at {endpoint}: {e}"))
        })?;
        docker.ping().await.map_err(|e| {
            SetupError::unavailable(format!(
                "the Docker engine at {endpoint} does not answer: {e}"
            ))
        })?;
        Ok(DockerPlatform {
            docker,
            policy,
            endpoint,
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    async fn inspect(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ContainerInspectResponse>, PlatformError> {
        // Podman briefly reports a container that just exited as "stopped", a state the
        // Docker API does not have, until its cleanup marks it "exited": such an answer
        // cannot be read, so ask again for a little while.
        let mut unreadable_answers = 0;
        loop {
            match self
                .docker
                .inspect_container(name_or_id, None::<InspectContainerOptions>)
                .await
            {
                Ok(info) => return Ok(Some(info)),
                Err(e) if is_status(&e, 404) => return Ok(None),
                Err(DockerError::JsonDataError { .. }) if unreadable_answers < 30 => {
                    unreadable_answers += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(classify(&e, &format!("inspecting container {name_or_id}")));
                }
            }
        }
    }

    fn create_body(&self, request: &Request, spec: &DockerSpec) -> ContainerCreateBody {
        // The worker's own labels say which request and tenant a container is for; a
        // request never sets them (validation refuses them in the spec, and the request's
        // generic labels are filtered here).
        let mut labels: HashMap<String, String> = request
            .labels
            .iter()
            .chain(&spec.labels)
            .filter(|(key, _)| !key.starts_with(RESERVED_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(MANAGED_LABEL.into(), "true".into());
        labels.insert(REQUEST_LABEL.into(), request.request_id.to_string());
        if let Some(tenant) = &request.tenant {
            labels.insert(TENANT_LABEL.into(), tenant.clone());
        }
        let port_bindings = spec
            .ports
            .iter()
            .map(|mapping| {
                (
                    format!("{}/tcp", mapping.container_port()),
                    Some(vec![PortBinding {
                        host_ip: Some(self.policy.publish_address.clone()),
                        host_port: Some(
                            mapping
                                .host_port()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                        ),
                    }]),
                )
            })
            .collect::<HashMap<_, _>>();
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            entrypoint: spec.entrypoint.clone(),
            env: (!spec.env.is_empty())
                .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(port_bindings.keys().cloned().collect()),
            host_config: Some(HostConfig {
                port_bindings: Some(port_bindings),
                privileged: Some(spec.privileged),
                cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
                binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
                network_mode: spec.network_mode.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn pull(&self, image: &str) -> Result<(), PlatformError> {
        let reference = with_tag(image);
        info!(image = %reference, "pulling image");
        let options = CreateImageOptionsBuilder::default()
            .from_image(&reference)
            .build();
        self.docker
            .create_image(Some(options), None, None)
            .try_collect::<Vec<_>>()
            .await
            .map(drop)
            .map_err(|e| classify_pull(&e, image))
    }

    /// Creates the container, pulling its image when missing and allowed; a concurrent
    /// creation of the same name is found instead of failing.
    async fn create(
        &self,
        request: &Request,
        spec: &DockerSpec,
        name: &str,
    ) -> Result<(), PlatformError> {
        let options = || CreateContainerOptionsBuilder::default().name(name).build();
        let mut pulled = false;
        loop {
            match self
                .docker
                .create_container(Some(options()), self.create_body(request, spec))
                .await
            {
                Ok(created) => {
                    info!(container.id = %created.id, container.name = name, "created container");
                    return Ok(());
                }
                Err(e) if is_status(&e, 409) => {
                    debug!("container {name} appeared meanwhile; using it");
                    return Ok(());
                }
                Err(e) if is_status(&e, 404) && !pulled => {
                    if spec.pull == PullPolicy::Never {
                        return Err(PlatformError::permanent(
                            ErrorClass::NotFound,
                            format!(
                                "image {} is not on the Docker engine and the spec says pull: never",
                                spec.image
                            ),
                        ));
                    }
                    self.pull(&spec.image).await?;
                    pulled = true;
                }
                Err(e) => {
                    return Err(classify(
                        &e,
                        &format!("creating container {name} from {}", spec.image),
                    ));
                }
            }
        }
    }

    fn resource(&self, info: &ContainerInspectResponse) -> Resource {
        let name = info
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned();
        let mut endpoints = Vec::new();
        if let Some(ports) = info
            .network_settings
            .as_ref()
            .and_then(|n| n.ports.as_ref())
        {
            for (key, bindings) in ports {
                let Some(port) = key.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok())
                else {
                    continue;
                };
                let host_port = bindings
                    .iter()
                    .flatten()
                    .find_map(|b| b.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()));
                if let Some(host_port) = host_port {
                    endpoints.push(Endpoint {
                        port,
                        host: self.policy.publish_address.clone(),
                        host_port,
                        protocol: "tcp".into(),
                    });
                }
            }
        }
        endpoints.sort_by_key(|e| e.port);
        Resource {
            id: info.id.clone().unwrap_or_default(),
            name,
            address: Some(self.policy.publish_address.clone()),
            endpoints,
            members: Vec::new(),
        }
    }

    /// Why a container is not running, from its state, for error messages.
    fn not_running(info: &ContainerInspectResponse) -> Option<String> {
        let state = info.state.as_ref()?;
        if state.running == Some(true) {
            return None;
        }
        Some(format!(
            "the container stopped (status {}, exit code {}{})",
            state
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown".into()),
            state.exit_code.unwrap_or_default(),
            state
                .error
                .as_deref()
                .filter(|e| !e.is_empty())
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        ))
    }

    async fn wait_ready(&self, spec: &DockerSpec, name: &str) -> Result<Resource, PlatformError> {
        let info = self.inspect(name).await?.ok_or_else(|| {
            PlatformError::transient(format!("container {name} vanished after it was started"))
        })?;
        if let Some(why) = Self::not_running(&info) {
            let message = format!("{why}; check the image and command");
            return Err(self
                .give_up(name, ErrorClass::InvalidRequest, message)
                .await);
        }
        let resource = self.resource(&info);
        let Some(health) = &spec.health else {
            return Ok(resource);
        };
        let container_port = health
            .port()
            .or_else(|| spec.ports.first().map(|p| p.container_port()))
            .ok_or_else(|| PlatformError::invalid("a health check needs a published port"))?;
        let endpoint = resource
            .endpoints
            .iter()
            .find(|e| e.port == container_port)
            .ok_or_else(|| {
                PlatformError::transient(format!(
                    "port {container_port} of {name} has no host port yet"
                ))
            })?;
        let probe = match health {
            HealthCheck::Http { path, .. } => Probe::Http {
                host: endpoint.host.clone(),
                port: endpoint.host_port,
                path: path.clone(),
            },
            HealthCheck::Tcp { .. } => Probe::Tcp {
                host: endpoint.host.clone(),
                port: endpoint.host_port,
            },
        };
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let alive = || async {
            match self.inspect(name).await {
                Ok(Some(info)) => match Self::not_running(&info) {
                    Some(why) => Err(why),
                    None => Ok(()),
                },
                Ok(None) => Err("the container was removed".into()),
                Err(_) => Ok(()), // the engine blinked; keep probing until the timeout
            }
        };
        let auto_port = spec
            .ports
            .iter()
            .any(|p| p.container_port() == container_port && p.host_port().is_none());
        match probe.wait_ready(timeout, alive).await {
            Ok(()) => Ok(resource),
            Err(why @ NotReady::Unreachable(_)) if auto_port => {
                // Not even a refusal: packets to the host port are dropped, so the
                // engine's forward for that port is broken (Podman can leave a stale
                // rule for a port an earlier container had). The container may be fine;
                // a new one gets another port, so remove this one and retry.
                warn!(container.name = %name, host_port = endpoint.host_port, "the container's host port never answered; recreating it on another port");
                self.remove(name).await?;
                Err(PlatformError::retryable(
                    ErrorClass::Timeout,
                    format!(
                        "container {name} did not pass its health check: {why}; nothing answered on its host port at all (a broken port forward), so it was removed and is made again on another port"
                    ),
                ))
            }
            Err(why) => {
                let message = format!("container {name} did not pass its health check: {why}");
                Err(self.give_up(name, why.class(), message).await)
            }
        }
    }

    /// A container that will not become healthy by retrying: put the end of its log in the
    /// worker's log (never in the event, which every subscriber reads: a program's output
    /// may hold what its environment holds), then remove it rather than leak it.
    async fn give_up(&self, name: &str, class: ErrorClass, message: String) -> PlatformError {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail("5")
            .build();
        let lines = tokio::time::timeout(
            Duration::from_secs(2),
            self.docker
                .logs(name, Some(options))
                .try_collect::<Vec<_>>(),
        )
        .await;
        let tail: String = match lines {
            Ok(Ok(lines)) => lines.iter().map(ToString::to_string).collect(),
            _ => String::new(),
        };
        let tail = tail.trim();
        let log = if tail.is_empty() {
            String::new()
        } else {
            warn!(container.name = %name, log.tail = %format!("{tail:.2000}"), "the container's last log lines before it was removed");
            "; its last log lines are in the worker's log".to_owned()
        };
        let removed = match self.remove(name).await {
            Ok(()) => "it was removed".to_owned(),
            Err(e) => format!("removing it failed too: {}", e.message),
        };
        PlatformError::permanent(class, format!("{message}{log}; {removed}"))
    }

    async fn remove(&self, name_or_id: &str) -> Result<(), PlatformError> {
        let stop = StopContainerOptionsBuilder::default()
            .t(STOP_GRACE_S)
            .build();
        match self.docker.stop_container(name_or_id, Some(stop)).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(classify(&e, &format!("stopping container {name_or_id}"))),
        }
        let remove = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name_or_id, Some(remove)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(classify(&e, &format!("removing container {name_or_id}"))),
        }
    }

    /// The container of a target, refusing to touch containers the provisioner did not make.
    async fn find(
        &self,
        target: &TeardownTarget,
    ) -> Result<Option<ContainerInspectResponse>, PlatformError> {
        let (key, expected_request) = match target {
            TeardownTarget::Request(id) => (container_name(id.as_str()), Some(id.as_str())),
            TeardownTarget::Resource(id) => (id.clone(), None),
        };
        let Some(info) = self.inspect(&key).await? else {
            return Ok(None);
        };
        let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
        let made_for = labels
            .and_then(|l| l.get(REQUEST_LABEL))
            .map(String::as_str);
        let managed = labels
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some_and(|v| v == "true");
        if !managed || (expected_request.is_some() && made_for != expected_request) {
            return Err(PlatformError::permanent(
                ErrorClass::Conflict,
                format!(
                    "container {key} exists but was not made by the provisioner for this request; it was left alone"
                ),
            ));
        }
        Ok(Some(info))
    }
}

#[async_trait]
impl Platform for DockerPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::Docker
    }

    async fn preflight(&self) -> Vec<Finding> {
        let engine = match self.docker.version().await {
            Ok(version) => Finding::pass(
                "engine",
                format!(
                    "{} {} (API {}) at {}",
                    version
                        .components
                        .as_ref()
                        .and_then(|c| c.first())
                        .map_or("Docker Engine", |c| c.name.as_str()),
                    version.version.unwrap_or_default(),
                    version.api_version.unwrap_or_default(),
                    self.endpoint
                ),
            ),
            Err(e) => Finding::fail(
                "engine",
                format!("the engine at {} does not answer: {e}", self.endpoint),
            ),
        };
        let images = if self.policy.allowed_images.is_empty() {
            Finding::warn(
                "images",
                "any image (set DOCKER_ALLOWED_IMAGES to restrict)",
            )
        } else {
            Finding::pass("images", self.policy.allowed_images.join(", "))
        };
        vec![engine, images]
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == provisioner_events::Operation::Provision {
            let spec = spec_of::<DockerSpec>(request)?;
            self.policy.check(&spec)?;
        }
        Ok(())
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        Ok(found
            .as_ref()
            .and_then(|info| info.config.as_ref()?.labels.as_ref()?.get(REQUEST_LABEL))
            .and_then(|id| RequestId::new(id.as_str()).ok()))
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<DockerSpec>(request)?;
        self.policy.check(&spec)?;
        let name = container_name(request.request_id.as_str());
        let target = TeardownTarget::Request(request.request_id.clone());
        if self.find(&target).await?.is_none() {
            self.create(request, &spec, &name).await?;
        }
        // Starting a running container is a no-op (304), so a retry just goes on.
        if let Err(e) = self.docker.start_container(&name, None).await {
            let error = classify(
                &e,
                &format!("starting container {name} on {}", self.endpoint),
            );
            // Podman picks a free host port at create but binds it at start, so two
            // containers created at once can get the same one. The port is fixed in the
            // container: remove it, and the retry creates one with a port of its own.
            let auto_port = spec.ports.iter().any(|p| p.host_port().is_none());
            if auto_port && error.message.contains("address already in use") {
                let _ = self.remove(&name).await;
            }
            return Err(error);
        }
        self.wait_ready(&spec, &name).await
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(info) = self.find(target).await? else {
            return Ok(None);
        };
        let resource = self.resource(&info);
        self.remove(&resource.id).await?;
        info!(container.id = %resource.id, container.name = %resource.name, "removed container");
        Ok(Some(Resource {
            endpoints: Vec::new(),
            ..resource
        }))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|info| {
            let running = info.state.as_ref().and_then(|s| s.running) == Some(true);
            Described {
                state: if running {
                    State::Running
                } else {
                    State::Stopped
                },
                resource: self.resource(&info),
            }
        }))
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        Ok(self
            .managed_containers()
            .await?
            .into_iter()
            .filter_map(|c| {
                let request_id = c
                    .labels
                    .as_ref()?
                    .get(REQUEST_LABEL)
                    .and_then(|id| RequestId::new(id.as_str()).ok())?;
                let created = c
                    .created
                    .and_then(|secs| u64::try_from(secs).ok())
                    .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs));
                c.id.as_ref()?;
                Some(Owned {
                    resource: self.listed(c),
                    request_id,
                    created,
                })
            })
            .collect())
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        Ok(self
            .managed_containers()
            .await?
            .into_iter()
            .map(|c| self.listed(c))
            .collect())
    }
}

impl DockerPlatform {
    /// Every container, running or not, that carries the provisioner's managed label.
    async fn managed_containers(&self) -> Result<Vec<ContainerSummary>, PlatformError> {
        let filters = HashMap::from([("label", vec![format!("{MANAGED_LABEL}=true")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(|e| classify(&e, "listing containers"))
    }

    /// A listed container as a resource (without its endpoints, which need an inspect).
    fn listed(&self, container: ContainerSummary) -> Resource {
        Resource {
            id: container.id.unwrap_or_default(),
            name: container
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            address: Some(self.policy.publish_address.clone()),
            endpoints: Vec::new(),
            members: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_members_get_container_names_no_producer_id_can_take() {
        assert_eq!(container_name("web-1"), "prov-web-1");
        assert_eq!(container_name("batch#12"), "prov_batch_12");
        // A producer's id never holds '#', so never gives a `prov_` name.
        assert_ne!(container_name("batch_12"), container_name("batch#12"));
        assert_ne!(container_name("a_1#2"), container_name("a#12"));
        let valid = |name: &str| {
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        };
        assert!(valid(&container_name(&format!("{}#999", "x".repeat(128)))));
    }

    fn spec(extra: serde_json::Value) -> DockerSpec {
        let mut value = serde_json::json!({"image": "localhost/busybox:latest"});
        value
            .as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        serde_json::from_value(value).expect("spec")
    }

    #[test]
    fn the_default_policy_refuses_every_escalation() {
        let policy = DockerPolicy::default();
        for extra in [
            serde_json::json!({"privileged": true}),
            serde_json::json!({"binds": ["/:/host"]}),
            serde_json::json!({"cap_add": ["SYS_ADMIN"]}),
            serde_json::json!({"network_mode": "host"}),
            serde_json::json!({"network_mode": "container:other"}),
            serde_json::json!({"network_mode": "ns:/proc/1/ns/net"}),
        ] {
            let error = policy
                .check(&spec(extra.clone()))
                .expect_err(&extra.to_string());
            assert_eq!(error.class, ErrorClass::Permission, "{extra}");
            assert!(error.message.contains("DOCKER_ALLOW_"), "{}", error.message);
        }
        for fine in ["bridge", "default", "none"] {
            policy
                .check(&spec(serde_json::json!({"network_mode": fine})))
                .expect(fine);
        }
    }

    /// The bypasses of a deny-list: a named network (the compose file's, where Redis and
    /// RabbitMQ are), Podman's modes that open the host's loopback, and neighbours.
    #[test]
    fn only_networks_the_operator_named_are_allowed() {
        let policy = DockerPolicy::default();
        for mode in [
            "provisioner_default",
            "podman",
            "slirp4netns:allow_host_loopback=true",
            "slirp4netns",
            "pasta:--map-gw",
            "private",
            "Bridge",
            "bridge ",
            "",
        ] {
            let error = policy
                .check(&spec(serde_json::json!({ "network_mode": mode })))
                .expect_err(mode);
            assert_eq!(error.class, ErrorClass::Permission, "{mode}");
            assert!(
                error.message.contains("DOCKER_ALLOWED_NETWORKS"),
                "{}",
                error.message
            );
        }
        let named = DockerPolicy {
            allowed_networks: vec!["sandbox".into()],
            ..DockerPolicy::default()
        };
        named
            .check(&spec(serde_json::json!({"network_mode": "sandbox"})))
            .expect("named by the operator");
        assert!(
            named
                .check(&spec(serde_json::json!({"network_mode": "sandbox2"})))
                .is_err()
        );
        // Naming networks does not open the host's.
        assert!(
            named
                .check(&spec(serde_json::json!({"network_mode": "host"})))
                .is_err()
        );
    }

    #[test]
    fn a_permissive_policy_allows_what_it_names_and_the_allow_list_restricts_images() {
        let policy = DockerPolicy {
            allow_privileged: true,
            allow_host_mounts: true,
            allow_host_network: true,
            allow_cap_add: true,
            allowed_images: vec!["localhost/*".into(), "docker.io/library/redis:7".into()],
            ..DockerPolicy::default()
        };
        policy
            .check(&spec(serde_json::json!({"privileged": true, "binds": ["/a:/b"], "cap_add": ["NET_ADMIN"], "network_mode": "host"})))
            .expect("allowed");
        let mut other = spec(serde_json::json!({}));
        other.image = "docker.io/library/redis:7".into();
        policy.check(&other).expect("exact match");
        other.image = "docker.io/library/redis:8".into();
        assert_eq!(
            policy.check(&other).expect_err("not listed").class,
            ErrorClass::Permission
        );
    }

    #[test]
    fn engine_errors_are_classified() {
        let server = |status_code| DockerError::DockerResponseServerError {
            status_code,
            message: "m".into(),
        };
        assert_eq!(classify(&server(404), "x").class, ErrorClass::NotFound);
        assert_eq!(classify(&server(409), "x").class, ErrorClass::Conflict);
        assert_eq!(
            classify(&server(400), "x").class,
            ErrorClass::InvalidRequest
        );
        assert_eq!(classify(&server(403), "x").class, ErrorClass::Permission);
        assert!(classify(&server(500), "x").retryable);
        assert!(classify(&server(429), "x").retryable);
        assert!(classify(&DockerError::RequestTimeoutError, "x").retryable);
        assert!(!classify(&server(404), "x").retryable);
    }

    #[test]
    fn pull_failures_are_classified_by_what_the_registry_said() {
        let said = |text: &str| {
            classify_pull(
                &DockerError::DockerStreamError {
                    error: text.to_owned(),
                },
                "x/y",
            )
        };
        let cases = [
            (
                "toomanyrequests: You have reached your pull rate limit",
                ErrorClass::Throttled,
                true,
            ),
            (
                "unauthorized: authentication required",
                ErrorClass::Permission,
                false,
            ),
            (
                "manifest unknown: manifest unknown",
                ErrorClass::NotFound,
                false,
            ),
            (
                "dial tcp: lookup registry.invalid: no such host",
                ErrorClass::NotFound,
                false,
            ),
            (
                "dial tcp 127.0.0.1:443: connect: connection refused",
                ErrorClass::Transient,
                true,
            ),
            (
                "net/http: TLS handshake timeout",
                ErrorClass::Transient,
                true,
            ),
            (
                "received unexpected HTTP status: 503 Service Unavailable",
                ErrorClass::Transient,
                true,
            ),
            ("something nobody expected", ErrorClass::NotFound, false),
        ];
        for (text, class, retryable) in cases {
            let error = said(text);
            assert_eq!((error.class, error.retryable), (class, retryable), "{text}");
            assert!(error.message.contains("x/y") && error.message.contains(text));
        }
        let throttled = classify_pull(
            &DockerError::DockerResponseServerError {
                status_code: 429,
                message: "slow down".into(),
            },
            "x/y",
        );
        assert_eq!(throttled.class, ErrorClass::Throttled);
        assert!(throttled.retryable);
    }

    #[test]
    fn images_without_a_tag_are_pulled_as_latest() {
        assert_eq!(with_tag("busybox"), "busybox:latest");
        assert_eq!(
            with_tag("localhost:5000/busybox"),
            "localhost:5000/busybox:latest"
        );
        assert_eq!(with_tag("localhost/busybox:1"), "localhost/busybox:1");
        assert_eq!(with_tag("busybox@sha256:abc"), "busybox@sha256:abc");
    }
}
