//! The AWS EC2 platform: one instance per provision request, through aws-sdk-ec2.
//!
//! Idempotent two ways: a `ClientToken` derived from the request id (real EC2 honours it),
//! and ownership tags set atomically at launch (`provisioner:request-id`) that are looked
//! up before anything is launched — the emulators ignore `ClientToken`, and a worker that
//! crashed between RunInstances and its Redis write must find the instance it made.
//! Errors are classified from the SDK's error codes while the typed error is at hand.
//! Fleet members launch in batches ([`fleet`]).

mod fleet;
pub mod permissions;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, Instance, InstanceStateName, InstanceType, Tag,
    VolumeType,
};
use base64::Engine;
use provisioner_core::backoff::Backoff;
use provisioner_core::cache::LookupCache;
use provisioner_core::health::Probe;
use provisioner_core::platform::spec_of;
use provisioner_core::{
    CallPacer, Described, Finding, Owned, Platform, PlatformError, RateLimit, SetupError,
};
use provisioner_events::spec::aws_ec2::AwsEc2Spec;
use provisioner_events::spec::{HealthCheck, check_aws_resource_tags};
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use sha2::{Digest, Sha256};
use tracing::info;

pub use fleet::{FLEET_TAG, MAX_BATCH, MEMBERS_TAG, batch_member, member_parts, members_tag};

/// Tag holding the request id an instance was launched for.
pub const REQUEST_TAG: &str = "provisioner:request-id";
/// Tag marking every instance the provisioner launched.
pub const MANAGED_TAG: &str = "provisioner:managed";

pub(crate) const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// States of an instance that still exists (not terminated, not on its way there).
pub(crate) const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// The `ClientToken` of a request's first launch: at most 64 ASCII characters, the same
/// for every retry and takeover until a launch fails.
pub fn client_token(request_id: &str) -> String {
    launch_token(request_id, None)
}

/// The `ClientToken` of a launch after `failed` (the instance the last launch made, which
/// EC2 terminated before it ran). EC2 answers a reused token with the instance it made
/// the first time, dead or alive, for hours: a launch after a failed one needs a token of
/// its own, and one every worker derives alike, so a lost answer or a takeover still
/// finds the same launch.
pub fn launch_token(request_id: &str, failed: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(request_id.as_bytes());
    if let Some(failed) = failed {
        hasher.update(b"#after#");
        hasher.update(failed.as_bytes());
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("prov-{}", &hex[..59])
}

pub fn instance_name(request_id: &str) -> String {
    format!("prov-{request_id}")
}

/// Sorts an EC2 error code into the runtime's classes: the pure half of [`classify`].
pub fn classify_code(code: &str) -> (ErrorClass, bool) {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            (ErrorClass::Throttled, true)
        }
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacity" => (ErrorClass::Capacity, true),
        "UnauthorizedOperation"
        | "AuthFailure"
        | "Blocked"
        | "OptInRequired"
        | "PendingVerification" => (ErrorClass::Permission, false),
        "IdempotentParameterMismatch" => (ErrorClass::Conflict, false),
        // The instance is between states (stopping a pending one): later it may not be.
        "IncorrectInstanceState" => (ErrorClass::Conflict, true),
        // The subnet has no free address now; terminations may free some.
        "InsufficientFreeAddressesInSubnet" => (ErrorClass::Capacity, true),
        // The instance type is not offered in the subnet's zone: EC2's message names the
        // zones that offer it; pick one of them or another type.
        "Unsupported" | "UnsupportedOperation" => (ErrorClass::Unsupported, false),
        // Too many tags is the request's fault, not an account limit.
        "TagLimitExceeded" => (ErrorClass::InvalidRequest, false),
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            (ErrorClass::Transient, true)
        }
        "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "InvalidParameter"
        | "MissingParameter"
        | "UnknownParameter"
        | "InvalidUserData.Malformed"
        | "InvalidBlockDeviceMapping"
        | "InvalidInstanceType" => (ErrorClass::InvalidRequest, false),
        code if code.starts_with("InvalidAMIID") => (ErrorClass::InvalidRequest, false),
        code if code.ends_with("LimitExceeded") => (ErrorClass::Quota, false),
        code if code.ends_with(".NotFound") => (ErrorClass::NotFound, false),
        code if code.ends_with(".Malformed") => (ErrorClass::InvalidRequest, false),
        _ => (ErrorClass::Internal, false),
    }
}

/// Classifies an SDK error of EC2 (see [`provisioner_aws_common::classify`]).
pub fn classify<E, R>(error: &SdkError<E, R>, doing: &str) -> PlatformError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    provisioner_aws_common::classify(error, "EC2", doing, classify_code)
}

pub(crate) fn state_of(instance: &Instance) -> &str {
    instance
        .state()
        .and_then(|s| s.name())
        .map(InstanceStateName::as_str)
        .unwrap_or("unknown")
}

pub(crate) fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The request an instance was launched for: its request tag, or, for a fleet member
/// launched in a batch, the member its launch index names.
pub fn request_of(instance: &Instance) -> Option<String> {
    match tag(instance, REQUEST_TAG) {
        Some(id) => Some(id.to_owned()),
        None => batch_member(instance).map(|(fleet, index)| format!("{fleet}#{index}")),
    }
}

/// The AMI must exist: the emulators launch made-up images, real EC2 refuses them.
pub(crate) async fn root_device(
    client: &Client,
    region: &str,
    image_id: &str,
) -> Result<Option<String>, PlatformError> {
    let output = client
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .map_err(|e| classify(&e, &format!("looking up image {image_id}")))?;
    let image = output.images().first().ok_or_else(|| {
        PlatformError::invalid(format!(
            "image {image_id} does not exist in {region} or is not visible to this account"
        ))
    })?;
    Ok(image.root_device_name().map(str::to_owned))
}

/// The RunInstances call launching `count` instances of `spec` tagged `tags`, all or
/// nothing (`MinCount` = `MaxCount`).
pub(crate) fn run_instances_call(
    client: &Client,
    request: &Request,
    spec: &AwsEc2Spec,
    root_device: Option<String>,
    token: String,
    count: i32,
    tags: Vec<Tag>,
) -> RunInstancesFluentBuilder {
    let _ = request;
    let mut launch = client
        .run_instances()
        .image_id(&spec.image_id)
        .instance_type(InstanceType::from(spec.instance_type.as_str()))
        .min_count(count)
        .max_count(count)
        .client_token(token)
        .tag_specifications(fleet::tag_specification(tags))
        .set_subnet_id(spec.subnet_id.clone())
        .set_key_name(spec.key_name.clone());
    if !spec.security_group_ids.is_empty() {
        launch = launch.set_security_group_ids(Some(spec.security_group_ids.clone()));
    }
    if let Some(user_data) = &spec.user_data {
        launch = launch.user_data(base64::engine::general_purpose::STANDARD.encode(user_data));
    }
    if let (Some(volume), Some(device)) = (&spec.root_volume, root_device) {
        launch = launch.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(
                    EbsBlockDevice::builder()
                        .volume_size(volume.size_gib as i32)
                        .volume_type(VolumeType::from(
                            volume.volume_type.as_deref().unwrap_or("gp3"),
                        ))
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    launch
}

/// The EC2 [`Platform`].
#[derive(Clone)]
pub struct Ec2Platform {
    client: Client,
    region: String,
    /// The configuration's credentials, for the preflight (the client does not expose
    /// them).
    credentials: Option<provisioner_aws_common::SharedCredentialsProvider>,
    /// The runtime's pacer, for the batches' own RunInstances calls.
    pacer: provisioner_core::PacerSlot,
    /// Fleet members' launches, merged into batches.
    launches: Arc<fleet::LaunchBatcher>,
    /// Fleet members' teardowns, merged into batches.
    terminations: Arc<fleet::TerminateBatcher>,
    /// What the batches share: the client, the pacer, the images' root devices.
    launcher: fleet::Launcher,
}

impl std::fmt::Debug for Ec2Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Platform")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Ec2Platform {
    /// From the standard AWS configuration; fails with a clear message without a region
    /// or credentials (see [`provisioner_aws_common::load_config`]).
    pub async fn from_environment() -> Result<Self, SetupError> {
        Ok(Self::from_config(
            &provisioner_aws_common::load_config().await?,
        ))
    }

    /// From an AWS configuration already loaded (the Lambda shares one with its SQS client).
    pub fn from_config(config: &provisioner_aws_common::SdkConfig) -> Self {
        let mut platform = Self::new(
            Client::new(config),
            config.region().map(ToString::to_string).unwrap_or_default(),
        );
        platform.credentials = config.credentials_provider();
        platform
    }

    pub fn new(client: Client, region: impl Into<String>) -> Self {
        let region = region.into();
        let pacer = provisioner_core::PacerSlot::default();
        let launcher = fleet::Launcher {
            client: client.clone(),
            region: region.clone(),
            pacer: pacer.clone(),
            root_devices: LookupCache::default(),
            vcpus: LookupCache::default(),
        };
        Ec2Platform {
            client,
            region,
            credentials: None,
            pacer,
            launches: Arc::new(fleet::launch_batcher(launcher.clone())),
            terminations: Arc::new(fleet::terminate_batcher(launcher.clone())),
            launcher,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Live instances launched for `request_id`, found by their ownership tag.
    async fn owned_instances(&self, request_id: &str) -> Result<Vec<Instance>, PlatformError> {
        self.owned_instances_in(request_id, &LIVE_STATES).await
    }

    /// The instances the provisioner launched for `request_id` in one of `states`.
    async fn owned_instances_in(
        &self,
        request_id: &str,
        states: &[&str],
    ) -> Result<Vec<Instance>, PlatformError> {
        // A fleet member's instance is always launched in a batch, marked as its batch's.
        if let Some((fleet, index)) = member_parts(request_id) {
            return fleet::batch_instances(&self.client, fleet, &[index], Some(states)).await;
        }
        let output = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{REQUEST_TAG}"))
                    .values(request_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(&e, "looking up the request's instances"))?;
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .filter(|i| states.contains(&state_of(i)))
            .collect())
    }

    /// The token for the next launch of `request_id`: derived from the latest instance an
    /// earlier launch made that EC2 terminated, if there is one.
    async fn next_launch_token(&self, request_id: &str) -> Result<String, PlatformError> {
        let failed = self
            .owned_instances_in(request_id, &["shutting-down", "terminated"])
            .await?;
        let latest = failed
            .iter()
            .max_by_key(|i| {
                (
                    i.launch_time().map(|t| t.as_nanos()),
                    i.instance_id().map(str::to_owned),
                )
            })
            .and_then(|i| i.instance_id());
        Ok(launch_token(request_id, latest))
    }

    async fn instance(&self, instance_id: &str) -> Result<Option<Instance>, PlatformError> {
        match self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(output) => Ok(output
                .reservations()
                .iter()
                .flat_map(|r| r.instances().iter().cloned())
                .next()),
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidInstanceID")) => Ok(None),
            Err(e) => Err(classify(&e, &format!("describing instance {instance_id}"))),
        }
    }

    async fn root_device(&self, image_id: &str) -> Result<Option<String>, PlatformError> {
        root_device(&self.client, &self.region, image_id).await
    }

    fn tags(request: &Request, spec: &AwsEc2Spec) -> Vec<Tag> {
        let mut tags: BTreeMap<String, String> = request.labels.clone();
        tags.extend(spec.tags.clone());
        tags.insert("Name".into(), instance_name(request.request_id.as_str()));
        tags.insert(MANAGED_TAG.into(), "true".into());
        tags.insert(REQUEST_TAG.into(), request.request_id.to_string());
        tags.into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }

    /// The RunInstances call of a request, for a launch or its dry run.
    fn run_instances(
        &self,
        request: &Request,
        spec: &AwsEc2Spec,
        root_device: Option<String>,
        token: String,
    ) -> RunInstancesFluentBuilder {
        run_instances_call(
            &self.client,
            request,
            spec,
            root_device,
            token,
            1,
            Self::tags(request, spec),
        )
    }

    async fn launch(
        &self,
        request: &Request,
        spec: &AwsEc2Spec,
    ) -> Result<Instance, PlatformError> {
        let root_device = self.root_device(&spec.image_id).await?;
        let token = self.next_launch_token(request.request_id.as_str()).await?;
        let output = self
            .run_instances(request, spec, root_device, token)
            .send()
            .await
            .map_err(|e| {
                classify(
                    &e,
                    &format!("launching {} from {}", spec.instance_type, spec.image_id),
                )
            })?;
        let instance =
            output.instances().first().cloned().ok_or_else(|| {
                PlatformError::transient("RunInstances answered without an instance")
            })?;
        info!(
            instance.id = instance.instance_id().unwrap_or_default(),
            "launched instance"
        );
        Ok(instance)
    }

    fn resource(request_id: &str, instance: &Instance, health_port: Option<u16>) -> Resource {
        let address = instance
            .public_ip_address()
            .or(instance.private_ip_address())
            .map(str::to_owned);
        // A batch's instances share their fleet's Name tag; each member is named alone.
        let name = match batch_member(instance) {
            Some(_) => None,
            None => tag(instance, "Name").map(str::to_owned),
        };
        Resource {
            id: instance.instance_id().unwrap_or_default().to_owned(),
            name: name.unwrap_or_else(|| instance_name(request_id)),
            endpoints: match (&address, health_port) {
                (Some(host), Some(port)) => vec![Endpoint {
                    port,
                    host: host.clone(),
                    host_port: port,
                    protocol: "tcp".into(),
                }],
                _ => Vec::new(),
            },
            address,
            members: Vec::new(),
        }
    }

    /// Polls until the instance is in state `wanted` ("running" or "stopped"), within
    /// `timeout`. Waiting for "running" starts a stopped instance and waits out a stopping
    /// one; an instance terminated on the way is reported with EC2's reason.
    async fn wait_for_state(
        &self,
        instance_id: &str,
        wanted: &str,
        timeout: Duration,
    ) -> Result<Instance, PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            // Right after RunInstances, DescribeInstances may answer
            // InvalidInstanceID.NotFound for a while (EC2 is eventually consistent): poll
            // through it rather than spend one of the request's attempts.
            let Some(instance) = self.instance(instance_id).await? else {
                if !backoff.wait().await {
                    return Err(PlatformError::transient(format!(
                        "instance {instance_id} was still not visible to DescribeInstances after {} s",
                        timeout.as_secs()
                    )));
                }
                continue;
            };
            match state_of(&instance) {
                state if state == wanted => return Ok(instance),
                "stopped" if wanted == "running" => {
                    self.client
                        .start_instances()
                        .instance_ids(instance_id)
                        .send()
                        .await
                        .map_err(|e| classify(&e, &format!("starting instance {instance_id}")))?;
                }
                "terminated" | "shutting-down" => {
                    let reason = instance
                        .state_reason()
                        .and_then(|r| r.message())
                        .unwrap_or("no reason given");
                    let message = format!(
                        "instance {instance_id} was terminated before it was {wanted} ({reason})"
                    );
                    return Err(if wanted == "running" {
                        // EC2 terminates launches it cannot place: worth another attempt.
                        PlatformError::retryable(ErrorClass::Capacity, message)
                    } else {
                        PlatformError::permanent(ErrorClass::NotFound, message)
                    });
                }
                _ => {}
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "instance {instance_id} is {} after {} s",
                        state_of(&instance),
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    /// A fleet member's instance, running: launched in a batch with the member's
    /// neighbours on this worker, or found where an earlier attempt launched it.
    async fn launch_member(
        &self,
        request: &Request,
        member: &provisioner_events::FleetMember,
    ) -> Result<Instance, PlatformError> {
        let key = fleet::batch_key(request, member.fleet_request_id.as_str());
        let launch = fleet::MemberLaunch {
            request: request.clone(),
            index: member.index,
        };
        let launcher = self.launcher();
        self.launches
            .submit(key, launch, async move { launcher.pace_launch().await })
            .await
            .unwrap_or_else(|e| Err(PlatformError::transient(e.to_string())))
    }

    /// Whether `request` names a fleet member by its request id (a member's teardown is
    /// batched).
    fn targets_member(request: &Request) -> bool {
        matches!(request.target(), Ok(TeardownTarget::Request(id)) if member_parts(id.as_str()).is_some())
    }

    fn launcher(&self) -> fleet::Launcher {
        self.launcher.clone()
    }

    /// The live instance of a target, or a `not_found` error naming it.
    async fn existing(&self, target: &TeardownTarget) -> Result<Instance, PlatformError> {
        self.find(target).await?.ok_or_else(|| {
            PlatformError::permanent(
                ErrorClass::NotFound,
                format!("{target} has no live instance"),
            )
        })
    }

    /// The instance of a target, refusing instances the provisioner did not launch.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<Instance>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => {
                Ok(self.owned_instances(id.as_str()).await?.into_iter().next())
            }
            TeardownTarget::Resource(instance_id) => {
                let Some(instance) = self.instance(instance_id).await? else {
                    return Ok(None);
                };
                if !LIVE_STATES.contains(&state_of(&instance)) {
                    return Ok(None);
                }
                if tag(&instance, MANAGED_TAG) != Some("true") {
                    return Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!(
                            "instance {instance_id} was not launched by the provisioner; it was left alone"
                        ),
                    ));
                }
                Ok(Some(instance))
            }
        }
    }
}

/// A preflight's `DryRun` call as a finding: `DryRunOperation` means allowed. An answer
/// with data means the endpoint ignores `DryRun` (the emulators): the call went through.
fn preflight_dry_run<T, E>(check: &str, result: Result<T, SdkError<E>>) -> Finding
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match result {
        Err(e) if e.code() == Some("DryRunOperation") => Finding::pass(check, "allowed (DryRun)"),
        Ok(_) => Finding::pass(check, "answered (this endpoint does not honour DryRun)"),
        Err(e) => Finding::of_call(check, Err::<(), _>(classify(&e, check)), ""),
    }
}

/// Reads the answer to a call made with `DryRun=true`: EC2 answers `DryRunOperation`
/// when the call would have succeeded, and the call's own error when it would not.
fn dry_run_outcome<T, E>(result: Result<T, SdkError<E>>, doing: &str) -> Result<(), PlatformError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match result {
        Err(e) if e.code() == Some("DryRunOperation") => Ok(()),
        Err(e) => Err(classify(&e, doing)),
        Ok(_) => Err(PlatformError::permanent(
            ErrorClass::Internal,
            format!("{doing}: EC2 carried out a call made with DryRun=true"),
        )),
    }
}

#[async_trait]
impl Platform for Ec2Platform {
    fn name(&self) -> PlatformName {
        PlatformName::AwsEc2
    }

    /// EC2's published buckets, per account and region: each action's request bucket
    /// (RunInstances 5 refilling 2 a second; other mutating actions 50 refilling 5;
    /// DescribeInstances 100 refilling 20) and the resource buckets counting instances
    /// (RunInstances, StartInstances and StopInstances 1,000 refilling 2 a second;
    /// TerminateInstances 1,000 refilling 20).
    /// <https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html>
    fn rate_limits(&self, request: &Request) -> Vec<RateLimit> {
        let region = self.region.as_str();
        let bucket = |action: &str, capacity: f64, refill: f64| {
            RateLimit::new(action, region, capacity, refill)
        };
        match request.operation {
            // A member's launch shares its batch's one RunInstances call, which the batch
            // paces itself; each member still counts an instance.
            Operation::Provision if request.fleet_member.is_some() => {
                vec![bucket("RunInstances.instances", 1000.0, 2.0)]
            }
            Operation::Provision => vec![
                fleet::run_instances_bucket(region),
                bucket("RunInstances.instances", 1000.0, 2.0),
            ],
            // A member's termination shares its batch's one call, paced by the batch.
            Operation::Teardown if Self::targets_member(request) => {
                vec![bucket("TerminateInstances.instances", 1000.0, 20.0)]
            }
            Operation::Teardown => vec![
                fleet::terminate_instances_bucket(region),
                bucket("TerminateInstances.instances", 1000.0, 20.0),
            ],
            Operation::Stop => vec![
                bucket("StopInstances", 50.0, 5.0),
                bucket("StopInstances.instances", 1000.0, 2.0),
            ],
            Operation::Start => vec![
                bucket("StartInstances", 50.0, 5.0),
                bucket("StartInstances.instances", 1000.0, 2.0),
            ],
            Operation::Reboot => vec![bucket("RebootInstances", 50.0, 5.0)],
            Operation::Describe => vec![bucket("DescribeInstances", 100.0, 20.0)],
        }
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        permissions::PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        let mut findings = provisioner_aws_common::identity_findings(
            Some(self.region.clone()).filter(|r| !r.is_empty()),
            self.credentials.clone(),
        )
        .await;
        let instances = self.client.describe_instances().dry_run(true).send().await;
        findings.push(preflight_dry_run("ec2:DescribeInstances", instances));
        let images = self
            .client
            .describe_images()
            .owners("self")
            .dry_run(true)
            .send()
            .await;
        findings.push(preflight_dry_run("ec2:DescribeImages", images));
        let types = self
            .client
            .describe_instance_types()
            .instance_types(aws_sdk_ec2::types::InstanceType::T3Micro)
            .dry_run(true)
            .send()
            .await;
        findings.push(preflight_dry_run("ec2:DescribeInstanceTypes", types));
        // The rest of the manifest needs an image or an instance to ask about.
        let checked = [
            "ec2:DescribeInstances",
            "ec2:DescribeImages",
            "ec2:DescribeInstanceTypes",
        ];
        let rest: Vec<&str> = permissions::PERMISSIONS
            .iter()
            .map(|p| p.action)
            .filter(|a| !checked.contains(a))
            .collect();
        findings.push(Finding::warn(
            rest.join(", "),
            "they need an image and an instance to ask about: send a provision with \"dry_run\": true to check them",
        ));
        findings
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<AwsEc2Spec>(request)?;
            // The instance's tags: the labels, the spec's tags, and the worker's own:
            // Name and the two ownership tags, or for a fleet's batches Name, the managed
            // tag and the two saying whose each instance is.
            let fleet = request.count.unwrap_or(1) > 1 || request.fleet_member.is_some();
            let own = if fleet { 4 } else { 3 };
            check_aws_resource_tags(&request.labels, &spec.tags, own, false)?;
        }
        Ok(())
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{MANAGED_TAG}"))
                    .values("true")
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(LIVE_STATES.iter().map(|s| (*s).to_owned()).collect()))
                    .build(),
            )
            .into_paginator()
            .send();
        let mut owned = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&e, "listing the provisioner's instances"))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                if !LIVE_STATES.contains(&state_of(instance)) {
                    continue;
                }
                // Without the request tag the instance names no request: never touched.
                let Some(request_id) = request_of(instance).and_then(|id| RequestId::new(id).ok())
                else {
                    continue;
                };
                owned.push(Owned {
                    resource: Self::resource(request_id.as_str(), instance, None),
                    created: instance
                        .launch_time()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                    request_id,
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
            .and_then(request_of)
            .and_then(|id| RequestId::new(id).ok()))
    }

    /// A tenant's `vcpus` count the instance type's default vCPUs.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<AwsEc2Spec>(request)?;
        let vcpus = self.launcher.vcpus(&spec.instance_type).await?;
        Ok(provisioner_core::vcpus_cost(vcpus.saturating_mul(1000)))
    }

    fn use_pacer(&self, pacer: Arc<dyn CallPacer>) {
        self.pacer.set(pacer);
    }

    fn settle_time(&self) -> std::time::Duration {
        provisioner_aws_common::EVENTUAL_CONSISTENCY
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<AwsEc2Spec>(request)?;
        let id = request.request_id.as_str();
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let running = match &request.fleet_member {
            Some(member) => self.launch_member(request, member).await?,
            None => {
                let instance = match self.owned_instances(id).await?.into_iter().next() {
                    Some(existing) => {
                        info!(
                            instance.id = existing.instance_id().unwrap_or_default(),
                            "found the instance launched before"
                        );
                        existing
                    }
                    None => self.launch(request, &spec).await?,
                };
                let instance_id = instance.instance_id().unwrap_or_default().to_owned();
                self.wait_for_state(&instance_id, "running", timeout)
                    .await?
            }
        };
        let instance_id = running.instance_id().unwrap_or_default().to_owned();
        let health_port = spec.health.as_ref().and_then(HealthCheck::port);
        let resource = Self::resource(id, &running, health_port);
        if let (Some(health), Some(host)) = (&spec.health, &resource.address) {
            let port = health_port.unwrap_or_default();
            let probe = match health {
                HealthCheck::Http { path, .. } => Probe::Http {
                    host: host.clone(),
                    port,
                    path: path.clone(),
                },
                HealthCheck::Tcp { .. } => Probe::Tcp {
                    host: host.clone(),
                    port,
                },
            };
            probe
                .wait_ready(timeout, || async { Ok(()) })
                .await
                .map_err(|why| {
                    PlatformError::permanent(
                        why.class(),
                        format!("instance {instance_id} runs but {why}"),
                    )
                })?;
        }
        Ok(resource)
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        if let TeardownTarget::Request(id) = target
            && let Some((fleet, index)) = member_parts(id.as_str())
        {
            let launcher = self.launcher();
            let gone = self
                .terminations
                .submit(fleet.to_owned(), index, async move {
                    launcher.pace_terminate().await
                })
                .await
                .unwrap_or_else(|e| Err(PlatformError::transient(e.to_string())))?;
            return Ok(gone.map(|instance| Resource {
                endpoints: Vec::new(),
                ..Self::resource(id.as_str(), &instance, None)
            }));
        }
        let Some(instance) = self.find(target).await? else {
            return Ok(None);
        };
        let instance_id = instance.instance_id().unwrap_or_default().to_owned();
        match self
            .client
            .terminate_instances()
            .instance_ids(&instance_id)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e)
                if e.code()
                    .is_some_and(|c| c.starts_with("InvalidInstanceID.NotFound")) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(classify(&e, &format!("terminating instance {instance_id}"))),
        }
        info!(instance.id = %instance_id, "terminated instance");
        let request_id = request_of(&instance).unwrap_or_default();
        Ok(Some(Resource {
            endpoints: Vec::new(),
            ..Self::resource(&request_id, &instance, None)
        }))
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let instance = self.existing(target).await?;
        let instance_id = instance.instance_id().unwrap_or_default().to_owned();
        let running = self
            .wait_for_state(&instance_id, "running", DEFAULT_READY_TIMEOUT)
            .await?;
        let request_id = request_of(&running).unwrap_or_default();
        Ok(Self::resource(&request_id, &running, None))
    }

    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let instance = self.existing(target).await?;
        let instance_id = instance.instance_id().unwrap_or_default().to_owned();
        if state_of(&instance) != "stopped" {
            self.client
                .stop_instances()
                .instance_ids(&instance_id)
                .send()
                .await
                .map_err(|e| classify(&e, &format!("stopping instance {instance_id}")))?;
        }
        let stopped = self
            .wait_for_state(&instance_id, "stopped", DEFAULT_READY_TIMEOUT)
            .await?;
        let request_id = request_of(&stopped).unwrap_or_default();
        Ok(Self::resource(&request_id, &stopped, None))
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        let instance = self.existing(target).await?;
        let instance_id = instance.instance_id().unwrap_or_default().to_owned();
        if state_of(&instance) != "running" {
            return Err(PlatformError::invalid(format!(
                "instance {instance_id} is {}; only a running instance can be rebooted (send start)",
                state_of(&instance)
            )));
        }
        self.client
            .reboot_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .map_err(|e| classify(&e, &format!("rebooting instance {instance_id}")))?;
        let running = self
            .wait_for_state(&instance_id, "running", DEFAULT_READY_TIMEOUT)
            .await?;
        let request_id = request_of(&running).unwrap_or_default();
        Ok(Self::resource(&request_id, &running, None))
    }

    /// Every operation asks EC2 with `DryRun=true` (permissions, parameters, the image,
    /// the instance's state); a teardown of nothing and a describe need no call.
    async fn check(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<AwsEc2Spec>(request)?;
            let root_device = self.root_device(&spec.image_id).await?;
            let result = self
                .run_instances(
                    request,
                    &spec,
                    root_device,
                    client_token(request.request_id.as_str()),
                )
                .dry_run(true)
                .send()
                .await;
            if let Ok(output) = &result {
                // An emulator that ignores DryRun launched: undo it, then say so.
                let launched: Vec<String> = output
                    .instances()
                    .iter()
                    .filter_map(|i| i.instance_id().map(str::to_owned))
                    .collect();
                if !launched.is_empty() {
                    let _ = self
                        .client
                        .terminate_instances()
                        .set_instance_ids(Some(launched))
                        .send()
                        .await;
                }
            }
            return dry_run_outcome(
                result,
                &format!(
                    "checking a launch of {} from {}",
                    spec.instance_type, spec.image_id
                ),
            );
        }
        let target = request.target()?;
        let instance = match (request.operation, self.find(&target).await?) {
            (Operation::Teardown | Operation::Describe, None) => return Ok(()),
            (_, None) => {
                return Err(PlatformError::permanent(
                    ErrorClass::NotFound,
                    format!("{target} has no live instance"),
                ));
            }
            (_, Some(instance)) => instance,
        };
        let id = instance.instance_id().unwrap_or_default().to_owned();
        match request.operation {
            Operation::Teardown => dry_run_outcome(
                self.client
                    .terminate_instances()
                    .instance_ids(&id)
                    .dry_run(true)
                    .send()
                    .await,
                &format!("checking the termination of {id}"),
            ),
            Operation::Start => dry_run_outcome(
                self.client
                    .start_instances()
                    .instance_ids(&id)
                    .dry_run(true)
                    .send()
                    .await,
                &format!("checking a start of {id}"),
            ),
            Operation::Stop => dry_run_outcome(
                self.client
                    .stop_instances()
                    .instance_ids(&id)
                    .dry_run(true)
                    .send()
                    .await,
                &format!("checking a stop of {id}"),
            ),
            Operation::Reboot => dry_run_outcome(
                self.client
                    .reboot_instances()
                    .instance_ids(&id)
                    .dry_run(true)
                    .send()
                    .await,
                &format!("checking a reboot of {id}"),
            ),
            Operation::Describe | Operation::Provision => Ok(()),
        }
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|instance| {
            let request_id = request_of(&instance).unwrap_or_default();
            Described {
                state: match state_of(&instance) {
                    "pending" => State::Starting,
                    "running" => State::Running,
                    "stopped" => State::Stopped,
                    _ => State::Stopping,
                },
                resource: Self::resource(&request_id, &instance, None),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_short_and_distinct() {
        let after = |failed| launch_token("ec2-demo-1", Some(failed));
        assert_eq!(
            after("i-1"),
            after("i-1"),
            "every worker derives the same token"
        );
        assert_ne!(
            after("i-1"),
            after("i-2"),
            "a new token after each failed launch"
        );
        assert_ne!(after("i-1"), client_token("ec2-demo-1"));
        assert_eq!(after("i-1").len(), 64);
        let token = client_token("ec2-demo-1");
        assert_eq!(token.len(), 64);
        assert!(token.is_ascii());
        assert_eq!(token, client_token("ec2-demo-1"));
        assert_ne!(token, client_token("ec2-demo-2"));
        assert_eq!(client_token(&"x".repeat(128)).len(), 64);
    }

    #[test]
    fn ec2_error_codes_are_classified_as_the_issue_lists() {
        let cases = [
            ("RequestLimitExceeded", ErrorClass::Throttled, true),
            ("Throttling", ErrorClass::Throttled, true),
            ("InsufficientInstanceCapacity", ErrorClass::Capacity, true),
            ("InvalidAMIID.NotFound", ErrorClass::InvalidRequest, false),
            ("InvalidAMIID.Malformed", ErrorClass::InvalidRequest, false),
            ("InvalidParameterValue", ErrorClass::InvalidRequest, false),
            ("UnauthorizedOperation", ErrorClass::Permission, false),
            ("InstanceLimitExceeded", ErrorClass::Quota, false),
            ("VcpuLimitExceeded", ErrorClass::Quota, false),
            ("IdempotentParameterMismatch", ErrorClass::Conflict, false),
            ("InvalidSubnetID.NotFound", ErrorClass::NotFound, false),
            ("InternalError", ErrorClass::Transient, true),
            ("Unsupported", ErrorClass::Unsupported, false),
            (
                "InsufficientFreeAddressesInSubnet",
                ErrorClass::Capacity,
                true,
            ),
            ("IncorrectInstanceState", ErrorClass::Conflict, true),
            ("TagLimitExceeded", ErrorClass::InvalidRequest, false),
            ("InsufficientInstanceCapacity", ErrorClass::Capacity, true),
            ("SomethingNew", ErrorClass::Internal, false),
        ];
        for (code, class, retryable) in cases {
            assert_eq!(classify_code(code), (class, retryable), "{code}");
        }
    }
}
