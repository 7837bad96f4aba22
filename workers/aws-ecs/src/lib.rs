//! The AWS ECS platform: one task (Fargate by default) per provision request, through
//! aws-sdk-ecs.
//!
//! Idempotent three ways: a `clientToken` derived from the request id (real ECS honours
//! it), the same token as the task's `startedBy`, which `ListTasks` filters on, and an
//! ownership tag (`provisioner:request-id`) checked on what that finds. A worker that
//! crashed between RunTask and its Redis write finds the task it started instead of
//! starting a second one; moto, the emulator the tests use, ignores `clientToken`, so the
//! lookup is what the tests prove.
//!
//! A task runs in one cluster, and a teardown names only the request: the worker looks for
//! the request's task in every cluster it can list (one ListTasks call per cluster).
//! Fleet members start in batches ([`fleet`]).

mod fleet;
pub mod permissions;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ecs::Client;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, Compatibility, ContainerDefinition, ContainerOverride,
    DesiredStatus, HealthStatus, KeyValuePair, LaunchType, NetworkConfiguration, NetworkMode,
    PortMapping, Tag, Task, TaskField, TaskOverride, TransportProtocol,
};
use provisioner_core::backoff::Backoff;
use provisioner_core::platform::spec_of;
use provisioner_core::{
    CallPacer, Described, Finding, Owned, Platform, PlatformError, RateLimit, SetupError,
};
use provisioner_events::spec::aws_ecs::{AwsEcsSpec, INLINE_CONTAINER_NAME, InlineContainer};
use provisioner_events::spec::check_aws_resource_tags;
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use sha2::{Digest, Sha256};
use tracing::{debug, info};

pub use fleet::{FLEET_TAG, MAX_BATCH, MEMBERS_TAG, assign, group_of, group_token, members_tag};

/// Tag holding the request id a task was started for.
pub const REQUEST_TAG: &str = "provisioner:request-id";
/// Tag marking every task the provisioner started.
pub const MANAGED_TAG: &str = "provisioner:managed";

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn hex_digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The request's `clientToken` and `startedBy`: 64 characters ECS accepts in both (the
/// request id may hold dots, which `startedBy` refuses), the same for every retry.
pub fn request_token(request_id: &str) -> String {
    format!("prov-{}", &hex_digest(request_id)[..59])
}

pub fn task_name(request_id: &str) -> String {
    format!("prov-{request_id}")
}

/// The family an inline container is registered under: derived from its content, so the
/// same container always finds the one definition registered for it.
pub fn inline_family(container: &InlineContainer, launch_type: &str) -> String {
    let canonical = serde_json::to_string(&(container, launch_type)).unwrap_or_default();
    format!("prov-{}", &hex_digest(&canonical)[..24])
}

/// Sorts an ECS error code into the runtime's classes: the pure half of [`classify`].
pub fn classify_code(code: &str) -> (ErrorClass, bool) {
    match code {
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => (ErrorClass::Throttled, true),
        "ServerException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => (ErrorClass::Transient, true),
        "AccessDeniedException"
        | "UnauthorizedOperation"
        | "BlockedException"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "ExpiredTokenException"
        | "MissingAuthenticationToken" => (ErrorClass::Permission, false),
        "ClusterNotFoundException" | "TaskDefinitionNotFoundException" => {
            (ErrorClass::NotFound, false)
        }
        "LimitExceededException" => (ErrorClass::Quota, false),
        "ConflictException" | "ResourceInUseException" => (ErrorClass::Conflict, false),
        "ClientException"
        | "InvalidParameterException"
        | "ValidationException"
        | "PlatformUnknownException"
        | "PlatformTaskDefinitionIncompatibilityException"
        | "UnsupportedFeatureException"
        | "ClusterContainsTasksException" => (ErrorClass::InvalidRequest, false),
        _ => (ErrorClass::Internal, false),
    }
}

/// Classifies an SDK error of ECS (see [`provisioner_aws_common::classify`]).
pub fn classify<E, R>(error: &SdkError<E, R>, doing: &str) -> PlatformError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    provisioner_aws_common::classify(error, "ECS", doing, classify_code)
}

/// Classifies one of RunTask's `failures` (the call succeeded, the placement did not).
pub(crate) fn classify_failure(reason: &str, detail: &str) -> PlatformError {
    let message = format!("ECS could not place the task: {reason} {detail}")
        .trim_end()
        .to_owned();
    if reason.starts_with("RESOURCE")
        || reason.contains("Capacity is unavailable")
        || reason == "AGENT"
    {
        // Not retried: RunTask answers a reused clientToken with its first response,
        // failures included, for hours, so another attempt of this request would only
        // read this answer again. A new request id gets a new token.
        PlatformError::permanent(
            ErrorClass::Capacity,
            format!(
                "{message}; ECS answers a retry under the same clientToken with this same failure, so send the request again under a new request id once capacity is back"
            ),
        )
    } else if reason.starts_with("MISSING") || reason.starts_with("ATTRIBUTE") {
        PlatformError::invalid(message)
    } else {
        PlatformError::permanent(ErrorClass::Internal, message)
    }
}

pub(crate) fn last_status(task: &Task) -> &str {
    task.last_status().unwrap_or("UNKNOWN")
}

pub(crate) fn tag<'a>(task: &'a Task, key: &str) -> Option<&'a str> {
    task.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The `provisioner:request-id` tag's value for a request id. ECS refuses `#` in tags,
/// and a fleet member's id has one (`<fleet>#<i>`): it is written as `:`, which no request
/// id holds, so the value reads back exactly.
pub(crate) fn request_tag_value(request_id: &str) -> String {
    request_id.replace('#', ":")
}

/// The request id a task's `provisioner:request-id` tag names.
pub(crate) fn tagged_request_id(task: &Task) -> Option<String> {
    tag(task, REQUEST_TAG).map(|value| value.replace(':', "#"))
}

/// The task's private address, from its ENI attachment (awsvpc) or its first container.
fn address_of(task: &Task) -> Option<String> {
    task.attachments()
        .iter()
        .flat_map(|a| a.details())
        .find(|d| d.name() == Some("privateIPv4Address"))
        .and_then(|d| d.value())
        .or_else(|| {
            task.containers()
                .iter()
                .flat_map(|c| c.network_interfaces())
                .find_map(|n| n.private_ipv4_address())
        })
        .map(str::to_owned)
}

/// The cluster of a task ARN in the long format `arn:…:task/<cluster>/<id>`.
fn cluster_of_task_arn(arn: &str) -> Option<&str> {
    let (_, path) = arn.split_once(":task/")?;
    let (cluster, id) = path.split_once('/')?;
    (!cluster.is_empty() && !id.is_empty()).then_some(cluster)
}

fn resource(request_id: &str, task: &Task, ports: &[u16]) -> Resource {
    let address = address_of(task);
    Resource {
        id: task.task_arn().unwrap_or_default().to_owned(),
        name: task_name(request_id),
        endpoints: match &address {
            Some(host) => ports
                .iter()
                .map(|&port| Endpoint {
                    port,
                    host: host.clone(),
                    host_port: port,
                    protocol: "tcp".into(),
                })
                .collect(),
            None => Vec::new(),
        },
        address,
        members: Vec::new(),
    }
}

/// The RunTask call starting `count` tasks of `spec` from `definition`, tagged `tags`.
pub(crate) fn run_task_call(
    client: &Client,
    spec: &AwsEcsSpec,
    definition: &str,
    count: i32,
    client_token: &str,
    started_by: &str,
    tags: Vec<Tag>,
) -> Result<aws_sdk_ecs::operation::run_task::builders::RunTaskFluentBuilder, PlatformError> {
    let mut run = client
        .run_task()
        .cluster(&spec.cluster)
        .task_definition(definition)
        .launch_type(LaunchType::from(spec.launch_type()))
        .set_platform_version(spec.platform_version.clone())
        .count(count)
        .client_token(client_token)
        .started_by(started_by)
        .set_tags(Some(tags));
    if let Some(network) = &spec.network {
        let vpc = AwsVpcConfiguration::builder()
            .set_subnets(Some(network.subnets.clone()))
            .set_security_groups(
                (!network.security_groups.is_empty()).then(|| network.security_groups.clone()),
            )
            .assign_public_ip(if network.assign_public_ip {
                AssignPublicIp::Enabled
            } else {
                AssignPublicIp::Disabled
            })
            .build()
            .map_err(|e| PlatformError::invalid(format!("network: {e}")))?;
        run = run.network_configuration(
            NetworkConfiguration::builder()
                .awsvpc_configuration(vpc)
                .build(),
        );
    }
    if !spec.overrides.is_empty() {
        let overrides = spec
            .overrides
            .iter()
            .map(|o| {
                ContainerOverride::builder()
                    .name(&o.name)
                    .set_command((!o.command.is_empty()).then(|| o.command.clone()))
                    .set_environment(Some(
                        o.env
                            .iter()
                            .map(|(k, v)| KeyValuePair::builder().name(k).value(v).build())
                            .collect(),
                    ))
                    .build()
            })
            .collect();
        run = run.overrides(
            TaskOverride::builder()
                .set_container_overrides(Some(overrides))
                .build(),
        );
    }
    Ok(run)
}

/// The region a client calls, naming its rate-limit buckets.
fn region_of(client: &Client) -> String {
    client
        .config()
        .region()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// The ECS [`Platform`].
#[derive(Clone)]
pub struct EcsPlatform {
    client: Client,
    /// The configuration's credentials, for the preflight (the client does not expose
    /// them).
    credentials: Option<provisioner_aws_common::SharedCredentialsProvider>,
    /// The runtime's pacer, for the batches' own RunTask calls.
    pacer: provisioner_core::PacerSlot,
    /// Fleet members' launches, merged into batches.
    runs: Arc<fleet::RunBatcher>,
    /// CPU units of the task definition revisions asked for, for tenants' `vcpus` quotas.
    task_cpu: provisioner_core::cache::LookupCache<String, u64>,
}

impl std::fmt::Debug for EcsPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcsPlatform").finish_non_exhaustive()
    }
}

impl EcsPlatform {
    /// From the standard AWS configuration; fails with a clear message without a region
    /// or credentials (see [`provisioner_aws_common::load_config`]).
    pub async fn from_environment() -> Result<Self, SetupError> {
        Ok(Self::from_config(
            &provisioner_aws_common::load_config().await?,
        ))
    }

    /// From an AWS configuration already loaded (the Lambda shares one with its SQS client).
    pub fn from_config(config: &provisioner_aws_common::SdkConfig) -> Self {
        let mut platform = Self::new(Client::new(config));
        platform.credentials = config.credentials_provider();
        platform
    }

    pub fn new(client: Client) -> Self {
        let pacer = provisioner_core::PacerSlot::default();
        let runner = fleet::Runner {
            client: client.clone(),
            region: region_of(&client),
            pacer: pacer.clone(),
        };
        EcsPlatform {
            client,
            credentials: None,
            pacer,
            runs: Arc::new(fleet::run_batcher(runner)),
            task_cpu: provisioner_core::cache::LookupCache::default(),
        }
    }

    /// The CPU units a task of `definition` reserves: the task's own, or its containers'
    /// together. A definition named without a revision is read each time (its latest may
    /// change); a revision or an ARN is read once.
    async fn task_cpu_units(&self, definition: &str) -> Result<u64, PlatformError> {
        let lookup = || async {
            let found = self
                .client
                .describe_task_definition()
                .task_definition(definition)
                .send()
                .await
                .map_err(|e| classify(&e, &format!("looking up task definition {definition}")))?;
            let described = found.task_definition().ok_or_else(|| {
                PlatformError::invalid(format!("task definition {definition} was not found"))
            })?;
            let task: u64 = described
                .cpu()
                .and_then(|cpu| cpu.trim().parse().ok())
                .unwrap_or(0);
            let containers: u64 = described
                .container_definitions()
                .iter()
                .map(|c| u64::try_from(c.cpu()).unwrap_or(0))
                .sum();
            Ok(task.max(containers))
        };
        if definition.contains(':') {
            self.task_cpu
                .get_or_lookup(&definition.to_owned(), lookup)
                .await
        } else {
            lookup().await
        }
    }

    fn runner(&self) -> fleet::Runner {
        fleet::Runner {
            client: self.client.clone(),
            region: region_of(&self.client),
            pacer: self.pacer.clone(),
        }
    }

    /// A fleet member's task, started in a batch with the member's neighbours on this
    /// worker, or found where an earlier attempt started it.
    async fn run_member(
        &self,
        request: &Request,
        spec: &AwsEcsSpec,
        member: &provisioner_events::FleetMember,
    ) -> Result<Task, PlatformError> {
        let run = fleet::MemberRun {
            request: request.clone(),
            index: member.index,
            definition: self.task_definition(spec).await?,
        };
        let key = fleet::batch_key(&run, member.fleet_request_id.as_str());
        let runner = self.runner();
        self.runs
            .submit(key, run, async move { runner.pace_run().await })
            .await
            .unwrap_or_else(|e| Err(PlatformError::transient(e.to_string())))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The request's tasks in `cluster` that are not stopped, found by `startedBy` and
    /// checked against the ownership tag.
    async fn owned_tasks(
        &self,
        cluster: &str,
        request_id: &str,
    ) -> Result<Vec<Task>, PlatformError> {
        if let Some((fleet, index)) = provisioner_core::names::fleet_member_parts(request_id) {
            let tasks = self.runner().member_tasks(cluster, fleet, index).await?;
            if !tasks.is_empty() {
                return Ok(tasks);
            }
        }
        let listed = self
            .client
            .list_tasks()
            .cluster(cluster)
            .started_by(request_token(request_id))
            .desired_status(DesiredStatus::Running)
            .send()
            .await
            .map_err(|e| classify(&e, &format!("looking up the request's tasks in {cluster}")))?;
        if listed.task_arns().is_empty() {
            return Ok(Vec::new());
        }
        let described = self.describe_tasks(cluster, listed.task_arns()).await?;
        Ok(described
            .into_iter()
            .filter(|t| {
                tagged_request_id(t).as_deref() == Some(request_id) && last_status(t) != "STOPPED"
            })
            .collect())
    }

    /// The request a task was started for: its request tag, or for a batch's task not
    /// yet tagged, its member by the batch's marks.
    async fn request_of(
        &self,
        cluster: &str,
        task: &Task,
        groups: &mut fleet::GroupAssignments,
    ) -> Result<Option<String>, PlatformError> {
        match tagged_request_id(task) {
            Some(id) => Ok(Some(id)),
            None => self.runner().untagged_member(cluster, task, groups).await,
        }
    }

    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<Vec<Task>, PlatformError> {
        let output = self
            .client
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(arns.to_vec()))
            .include(TaskField::Tags)
            .send()
            .await
            .map_err(|e| classify(&e, &format!("describing tasks in {cluster}")))?;
        Ok(output.tasks().to_vec())
    }

    async fn task(&self, cluster: &str, arn: &str) -> Result<Option<Task>, PlatformError> {
        Ok(self
            .describe_tasks(cluster, &[arn.to_owned()])
            .await?
            .into_iter()
            .next())
    }

    async fn clusters(&self) -> Result<Vec<String>, PlatformError> {
        let mut clusters = Vec::new();
        let mut next = None;
        loop {
            let page = self
                .client
                .list_clusters()
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| classify(&e, "listing clusters"))?;
            clusters.extend(page.cluster_arns().iter().cloned());
            next = page.next_token().map(str::to_owned);
            if next.is_none() {
                return Ok(clusters);
            }
        }
    }

    /// The task definition to run: the named one, or the inline container's, registered
    /// once under a family derived from its content.
    async fn task_definition(&self, spec: &AwsEcsSpec) -> Result<String, PlatformError> {
        if let Some(named) = &spec.task_definition {
            return Ok(named.clone());
        }
        let Some(container) = &spec.container else {
            return Err(PlatformError::invalid(
                "give a task_definition or a container",
            ));
        };
        let family = inline_family(container, spec.launch_type());
        match self
            .client
            .describe_task_definition()
            .task_definition(&family)
            .send()
            .await
        {
            Ok(found) => {
                if let Some(arn) = found
                    .task_definition()
                    .filter(|d| d.status().is_none_or(|s| s.as_str() == "ACTIVE"))
                    .and_then(|d| d.task_definition_arn())
                {
                    debug!(
                        task_definition = arn,
                        "reusing the inline container's definition"
                    );
                    return Ok(arn.to_owned());
                }
            }
            Err(e)
                if matches!(
                    classify_code(e.code().unwrap_or_default()).0,
                    ErrorClass::InvalidRequest | ErrorClass::NotFound
                ) => {}
            Err(e) => {
                return Err(classify(
                    &e,
                    &format!("looking up task definition {family}"),
                ));
            }
        }
        let fargate = spec.launch_type() == "FARGATE";
        let definition = ContainerDefinition::builder()
            .name(INLINE_CONTAINER_NAME)
            .image(&container.image)
            .essential(true)
            // The task's whole memory as the container's limit: it is the only container.
            .memory(container.memory_mib.unwrap_or(512) as i32)
            .set_command((!container.command.is_empty()).then(|| container.command.clone()))
            .set_environment(Some(
                container
                    .env
                    .iter()
                    .map(|(k, v)| KeyValuePair::builder().name(k).value(v).build())
                    .collect(),
            ))
            .set_port_mappings(Some(
                container
                    .ports
                    .iter()
                    .map(|&port| {
                        PortMapping::builder()
                            .container_port(i32::from(port))
                            .protocol(TransportProtocol::Tcp)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let mut register = self
            .client
            .register_task_definition()
            .family(&family)
            .container_definitions(definition)
            .cpu(container.cpu.unwrap_or(256).to_string())
            .memory(container.memory_mib.unwrap_or(512).to_string())
            .set_execution_role_arn(container.execution_role_arn.clone())
            .tags(Tag::builder().key(MANAGED_TAG).value("true").build());
        if fargate {
            register = register
                .requires_compatibilities(Compatibility::Fargate)
                .network_mode(NetworkMode::Awsvpc);
        }
        let registered = register
            .send()
            .await
            .map_err(|e| classify(&e, &format!("registering task definition {family}")))?;
        let arn = registered
            .task_definition()
            .and_then(|d| d.task_definition_arn())
            .ok_or_else(|| {
                PlatformError::transient("RegisterTaskDefinition answered without an ARN")
            })?;
        info!(task_definition = arn, "registered the inline container");
        Ok(arn.to_owned())
    }

    fn tags(request: &Request, spec: &AwsEcsSpec) -> Vec<Tag> {
        let mut tags: BTreeMap<String, String> = request.labels.clone();
        tags.extend(spec.tags.clone());
        tags.insert(MANAGED_TAG.into(), "true".into());
        tags.insert(
            REQUEST_TAG.into(),
            request_tag_value(request.request_id.as_str()),
        );
        tags.into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }

    async fn run(&self, request: &Request, spec: &AwsEcsSpec) -> Result<Task, PlatformError> {
        let definition = self.task_definition(spec).await?;
        let token = request_token(request.request_id.as_str());
        let output = run_task_call(
            &self.client,
            spec,
            &definition,
            1,
            &token,
            &token,
            Self::tags(request, spec),
        )?
        .send()
        .await
        .map_err(|e| {
            classify(
                &e,
                &format!("running {definition} in cluster {}", spec.cluster),
            )
        })?;
        if let Some(task) = output.tasks().first() {
            info!(
                task.arn = task.task_arn().unwrap_or_default(),
                "started task"
            );
            return Ok(task.clone());
        }
        Err(match output.failures().first() {
            Some(failure) => classify_failure(
                failure.reason().unwrap_or("unknown"),
                failure.detail().unwrap_or_default(),
            ),
            None => PlatformError::transient("RunTask answered with neither a task nor a failure"),
        })
    }

    /// Polls until the task runs (and is healthy when asked), within `timeout`.
    async fn wait_running(
        &self,
        cluster: &str,
        arn: &str,
        healthy: bool,
        timeout: Duration,
    ) -> Result<Task, PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            // Right after RunTask, DescribeTasks may answer the task as a `MISSING`
            // failure for a while (ECS is eventually consistent): poll through it.
            let Some(task) = self.task(cluster, arn).await? else {
                if !backoff.wait().await {
                    return Err(PlatformError::transient(format!(
                        "task {arn} was still not visible to DescribeTasks after {} s",
                        timeout.as_secs()
                    )));
                }
                continue;
            };
            let health = task
                .health_status()
                .map(HealthStatus::as_str)
                .unwrap_or("UNKNOWN");
            match last_status(&task) {
                "RUNNING" if !healthy || health == "HEALTHY" => return Ok(task),
                "STOPPED" | "DEPROVISIONING" | "STOPPING" | "DEACTIVATING" => {
                    let reason = task.stopped_reason().unwrap_or("no reason given");
                    let message = format!("task {arn} stopped before it was running: {reason}");
                    // Not retried: the same clientToken would answer with this same task.
                    return Err(if reason.contains("CannotPullContainer") {
                        PlatformError::invalid(message)
                    } else if reason.contains("capacity") || reason.contains("Capacity") {
                        PlatformError::permanent(ErrorClass::Capacity, message)
                    } else {
                        PlatformError::permanent(ErrorClass::Internal, message)
                    });
                }
                _ => {}
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "task {arn} is {} (health {health}) after {} s",
                        last_status(&task),
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    /// The live task of a target and its cluster, refusing tasks the provisioner did not
    /// start.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<(String, Task)>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => {
                for cluster in self.clusters().await? {
                    if let Some(task) = self
                        .owned_tasks(&cluster, id.as_str())
                        .await?
                        .into_iter()
                        .next()
                    {
                        return Ok(Some((cluster, task)));
                    }
                }
                Ok(None)
            }
            TeardownTarget::Resource(arn) => {
                let cluster = cluster_of_task_arn(arn).ok_or_else(|| {
                    PlatformError::invalid(format!(
                        "resource_id {arn:?} is not a task ARN of the form arn:aws:ecs:<region>:<account>:task/<cluster>/<id>; name the request with target_request_id instead"
                    ))
                })?;
                let task = match self.task(cluster, arn).await {
                    Ok(task) => task,
                    Err(e) if e.class == ErrorClass::NotFound => None,
                    Err(e) => return Err(e),
                };
                let Some(task) = task.filter(|t| last_status(t) != "STOPPED") else {
                    return Ok(None);
                };
                if tag(&task, MANAGED_TAG) != Some("true") {
                    return Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!("task {arn} was not started by the provisioner; it was left alone"),
                    ));
                }
                Ok(Some((cluster.to_owned(), task)))
            }
        }
    }

    async fn wait_stopped(&self, cluster: &str, arn: &str) -> Result<Task, PlatformError> {
        let mut backoff = Backoff::new(
            STOP_TIMEOUT,
            Duration::from_millis(250),
            Duration::from_secs(5),
        );
        loop {
            match self.task(cluster, arn).await? {
                Some(task) if last_status(&task) != "STOPPED" => {
                    if !backoff.wait().await {
                        return Err(PlatformError::retryable(
                            ErrorClass::Timeout,
                            format!("task {arn} is still {} after StopTask", last_status(&task)),
                        ));
                    }
                }
                Some(task) => return Ok(task),
                // Gone from DescribeTasks: stopped long enough ago to be forgotten.
                None => return Ok(Task::builder().task_arn(arn).last_status("STOPPED").build()),
            }
        }
    }
}

#[async_trait]
impl Platform for EcsPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::AwsEcs
    }

    /// ECS's published buckets for the calls that start and stop tasks, per account and
    /// region: RunTask and StopTask, 100 refilling 40 a second.
    /// <https://docs.aws.amazon.com/AmazonECS/latest/APIReference/request-throttling.html>
    fn rate_limits(&self, request: &Request) -> Vec<RateLimit> {
        let region = region_of(&self.client);
        match request.operation {
            // A member's start shares its batch's one RunTask call, which the batch paces.
            Operation::Provision if request.fleet_member.is_some() => Vec::new(),
            Operation::Provision => vec![fleet::run_task_bucket(&region)],
            Operation::Teardown => vec![RateLimit::new("StopTask", &region, 100.0, 40.0)],
            _ => Vec::new(),
        }
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        permissions::PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        let mut findings = provisioner_aws_common::identity_findings(
            self.client.config().region().map(ToString::to_string),
            self.credentials.clone(),
        )
        .await;
        let clusters = self.clusters().await;
        let seen = clusters.as_ref().map_or(0, Vec::len);
        findings.push(Finding::of_call(
            "ecs:ListClusters",
            clusters,
            &format!("allowed; {seen} cluster(s) visible"),
        ));
        let rest: Vec<&str> = permissions::PERMISSIONS
            .iter()
            .map(|p| p.action)
            .filter(|a| *a != "ecs:ListClusters")
            .collect();
        findings.push(Finding::warn(
            rest.join(", "),
            "ECS has no dry run: the first request tells (the IAM policy in docs/aws-ecs.md grants them)",
        ));
        findings
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<AwsEcsSpec>(request)?;
            // The task's tags: the labels, the spec's tags, and the worker's two (four
            // for a fleet's: the fleet and the batch's members too).
            let fleet = request.count.unwrap_or(1) > 1 || request.fleet_member.is_some();
            check_aws_resource_tags(&request.labels, &spec.tags, if fleet { 4 } else { 2 }, true)?;
        }
        Ok(())
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let mut owned = Vec::new();
        let mut groups = fleet::GroupAssignments::new();
        for cluster in self.clusters().await? {
            let mut arns = Vec::new();
            let mut next = None;
            loop {
                let page = self
                    .client
                    .list_tasks()
                    .cluster(&cluster)
                    .desired_status(DesiredStatus::Running)
                    .set_next_token(next)
                    .send()
                    .await
                    .map_err(|e| classify(&e, &format!("listing the tasks of {cluster}")))?;
                arns.extend(page.task_arns().iter().cloned());
                next = page.next_token().map(str::to_owned);
                if next.is_none() {
                    break;
                }
            }
            // DescribeTasks takes at most 100 tasks a call.
            for chunk in arns.chunks(100) {
                for task in self.describe_tasks(&cluster, chunk).await? {
                    if tag(&task, MANAGED_TAG) != Some("true") || last_status(&task) == "STOPPED" {
                        continue;
                    }
                    // A task that names no request, by its tag or its batch's marks, is
                    // never touched.
                    let Some(request_id) = self
                        .request_of(&cluster, &task, &mut groups)
                        .await?
                        .and_then(|id| RequestId::new(id).ok())
                    else {
                        continue;
                    };
                    owned.push(Owned {
                        resource: resource(request_id.as_str(), &task, &[]),
                        created: task
                            .created_at()
                            .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                        request_id,
                    });
                }
            }
        }
        Ok(owned)
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let found = self
            .find(&TeardownTarget::Resource(resource_id.to_owned()))
            .await?;
        let Some((cluster, task)) = found else {
            return Ok(None);
        };
        Ok(self
            .request_of(&cluster, &task, &mut fleet::GroupAssignments::new())
            .await?
            .and_then(|id| RequestId::new(id).ok()))
    }

    /// A tenant's `vcpus` count the CPU units a task reserves (1,024 a vCPU), rounded up;
    /// a task reserving none counts one.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<AwsEcsSpec>(request)?;
        let units = match (&spec.container, &spec.task_definition) {
            (Some(container), _) => u64::from(container.cpu_and_memory().0),
            (None, Some(definition)) => self.task_cpu_units(definition).await?,
            (None, None) => 0,
        };
        Ok(provisioner_core::vcpus_cost(
            units.max(1).saturating_mul(1000).div_ceil(1024),
        ))
    }

    fn use_pacer(&self, pacer: Arc<dyn CallPacer>) {
        self.pacer.set(pacer);
    }

    fn settle_time(&self) -> std::time::Duration {
        provisioner_aws_common::EVENTUAL_CONSISTENCY
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<AwsEcsSpec>(request)?;
        let id = request.request_id.as_str();
        let task = match &request.fleet_member {
            Some(member) => self.run_member(request, &spec, member).await?,
            None => match self
                .owned_tasks(&spec.cluster, id)
                .await?
                .into_iter()
                .next()
            {
                Some(existing) => {
                    info!(
                        task.arn = existing.task_arn().unwrap_or_default(),
                        "found the task started before"
                    );
                    existing
                }
                None => self.run(request, &spec).await?,
            },
        };
        let arn = task.task_arn().unwrap_or_default().to_owned();
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let running = provisioner_core::metrics::health_wait(self.wait_running(
            &spec.cluster,
            &arn,
            spec.wait_healthy,
            timeout,
        ))
        .await?;
        let ports = spec
            .container
            .as_ref()
            .map(|c| c.ports.clone())
            .unwrap_or_default();
        Ok(resource(id, &running, &ports))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some((cluster, task)) = self.find(target).await? else {
            return Ok(None);
        };
        let arn = task.task_arn().unwrap_or_default().to_owned();
        let request_id = tagged_request_id(&task).unwrap_or_default();
        match self
            .client
            .stop_task()
            .cluster(&cluster)
            .task(&arn)
            .reason(format!("teardown of provisioner request {request_id}"))
            .send()
            .await
        {
            Ok(_) => {}
            Err(e)
                if e.code() == Some("InvalidParameterException")
                    && e.message().is_some_and(|m| m.contains("not found")) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(classify(&e, &format!("stopping task {arn}"))),
        }
        info!(task.arn = %arn, "stopped task");
        let stopped = self.wait_stopped(&cluster, &arn).await?;
        Ok(Some(Resource {
            endpoints: Vec::new(),
            ..resource(&request_id, &stopped, &[])
        }))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|(_, task)| {
            let request_id = tagged_request_id(&task).unwrap_or_default();
            Described {
                state: match last_status(&task) {
                    "RUNNING" => State::Running,
                    "PROVISIONING" | "PENDING" | "ACTIVATING" => State::Starting,
                    _ => State::Stopping,
                },
                resource: resource(&request_id, &task, &[]),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_members_request_tag_keeps_to_ecs_characters_and_reads_back() {
        let value = request_tag_value("batch-7#12");
        assert_eq!(value, "batch-7:12");
        let task = Task::builder()
            .tags(
                aws_sdk_ecs::types::Tag::builder()
                    .key(REQUEST_TAG)
                    .value(value)
                    .build(),
            )
            .build();
        assert_eq!(tagged_request_id(&task).as_deref(), Some("batch-7#12"));
        assert_eq!(request_tag_value("plain.id_1"), "plain.id_1");
    }

    #[test]
    fn tokens_fit_both_client_token_and_started_by() {
        let token = request_token("ecs-demo.1");
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(token, request_token("ecs-demo.1"));
        assert_ne!(token, request_token("ecs-demo.2"));
    }

    #[test]
    fn inline_families_follow_the_container_content() {
        let container: InlineContainer =
            serde_json::from_value(serde_json::json!({"image": "nginx", "ports": [80]}))
                .expect("container");
        let mut other = container.clone();
        other.ports = vec![8080];
        let family = inline_family(&container, "FARGATE");
        assert_eq!(family, inline_family(&container.clone(), "FARGATE"));
        assert_ne!(family, inline_family(&other, "FARGATE"));
        assert_ne!(family, inline_family(&container, "EC2"));
        assert!(family.len() <= 255);
    }

    #[test]
    fn clusters_are_read_from_long_task_arns_only() {
        assert_eq!(
            cluster_of_task_arn("arn:aws:ecs:us-east-1:123456789012:task/demo/0123abcd"),
            Some("demo")
        );
        assert_eq!(
            cluster_of_task_arn("arn:aws:ecs:us-east-1:123456789012:task/0123abcd"),
            None
        );
        assert_eq!(cluster_of_task_arn("i-0123"), None);
    }

    #[test]
    fn ecs_error_codes_and_placement_failures_are_classified() {
        let cases = [
            ("ThrottlingException", ErrorClass::Throttled, true),
            ("ServerException", ErrorClass::Transient, true),
            ("AccessDeniedException", ErrorClass::Permission, false),
            ("ClusterNotFoundException", ErrorClass::NotFound, false),
            ("ClientException", ErrorClass::InvalidRequest, false),
            (
                "InvalidParameterException",
                ErrorClass::InvalidRequest,
                false,
            ),
            ("LimitExceededException", ErrorClass::Quota, false),
            ("SomethingNew", ErrorClass::Internal, false),
        ];
        for (code, class, retryable) in cases {
            assert_eq!(classify_code(code), (class, retryable), "{code}");
        }
        let capacity = classify_failure("RESOURCE:MEMORY", "");
        assert_eq!(
            (capacity.class, capacity.retryable),
            (ErrorClass::Capacity, false),
            "a retry under the same clientToken only reads the failure again"
        );
        let missing = classify_failure("MISSING", "arn:…");
        assert_eq!(missing.class, ErrorClass::InvalidRequest);
    }
}
