//! The `gcp-compute` platform: one Compute Engine instance per provision request.
//!
//! The instance is named from the request id and inserted with a `requestId` derived from
//! it, which Compute Engine honours: a replayed insert (a retry after a lost answer, a
//! takeover by another worker) returns the first insert's operation instead of making a
//! second instance. After that window a replay gets `409 alreadyExists`, and the worker
//! adopts the instance when its `provisioner-request-id` metadata item names the request.
//! Every mutation returns a zone operation, which the worker polls until it is `DONE`
//! and whose errors it classifies; `running` then means the instance's status is RUNNING.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_compute_v1::client::{Instances, MachineTypes};
use google_cloud_compute_v1::model::{
    AccessConfig, AttachedDisk, AttachedDiskInitializeParams, Instance, Metadata, NetworkInterface,
    Operation as ZoneOperation, Tags, access_config, instance, metadata, operation,
};
use google_cloud_gax::options::RequestOptionsBuilder;
use provisioner_core::backoff::Backoff;
use provisioner_core::names::{derived_name, request_uuid};
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Owned, Platform, PlatformError, SetupError};
use provisioner_events::spec::gcp::{GcpComputeSpec, is_gcp_label};
use provisioner_events::{
    ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State, TeardownTarget,
};
use tracing::info;

use crate::{
    GcpSettings, MANAGED_LABEL, REQUEST_ID_KEY, classify, classify_operation_error,
    configure_builder, parse_rfc3339,
};

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a start, stop, reset or delete may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The instance name of a request: an RFC 1035 name of at most 58 characters.
pub fn instance_name(request_id: &str) -> String {
    derived_name(request_id, 44)
}

fn metadata_item<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .metadata
        .as_ref()?
        .items
        .iter()
        .find(|item| item.key.as_deref() == Some(key))?
        .value
        .as_deref()
}

fn is_managed(instance: &Instance) -> bool {
    instance.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
}

/// The last segment of a Compute Engine URL (`.../zones/europe-west1-b` → the zone).
fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// The vCPUs of a custom machine type, which its name carries
/// (`[<series>-]custom-<vCPUs>-<memory MB>[-ext]`); `None` for any other name.
fn custom_machine_cpus(machine_type: &str) -> Option<u64> {
    let (_, rest) = machine_type.split_once("custom-")?;
    rest.split('-').next()?.parse().ok()
}

/// The life-cycle state of an instance status.
fn state_of(status: Option<&instance::Status>) -> State {
    use instance::Status as S;
    match status {
        Some(S::Running) => State::Running,
        Some(S::Stopping | S::Suspending | S::PendingStop) => State::Stopping,
        Some(S::Terminated | S::Stopped | S::Suspended) => State::Stopped,
        Some(S::Deprovisioning) => State::Stopping,
        _ => State::Starting,
    }
}

mod bulk;

pub use bulk::{FLEET_KEY, MAX_BULK, MEMBERS_KEY, request_of};

/// The Compute Engine [`Platform`].
#[derive(Clone)]
pub struct ComputePlatform {
    client: Instances,
    machine_types: MachineTypes,
    /// vCPUs of the machine types asked for, by zone and name (tenants' `vcpus` quotas).
    guest_cpus: provisioner_core::cache::LookupCache<(String, String), u64>,
    settings: GcpSettings,
    /// The runtime's pacer, for the bulk inserts' own calls.
    pacer: provisioner_core::PacerSlot,
    /// Fleet members' inserts, merged into bulk inserts. `None` in the copy the batcher's
    /// flush works with (it needs no batcher of its own).
    bulk: Option<std::sync::Arc<bulk::BulkBatcher>>,
    /// This worker's bulk inserts in flight (sent, operation not yet done): Compute
    /// Engine refuses more than [`bulk::MAX_BULK_IN_FLIGHT`] at once per project.
    bulk_in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ComputePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePlatform")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Failed operations a keyed send walks past at most: far beyond any attempt bound (the
/// runtime's default is 8), so only operations that fail the moment they are made reach
/// it.
const MAX_KEY_CHAIN: u32 = 64;

impl ComputePlatform {
    /// Builds the Instances client with Application Default Credentials (or none, for a
    /// test server). Credentials are read at the first call, not here.
    pub async fn new(settings: GcpSettings) -> Result<Self, SetupError> {
        let client = configure_builder!(Instances::builder(), settings)
            .build()
            .await
            .map_err(|e| format!("cannot build the Compute Engine client: {e}"))?;
        let machine_types = configure_builder!(MachineTypes::builder(), settings)
            .build()
            .await
            .map_err(|e| format!("cannot build the Compute Engine machine types client: {e}"))?;
        let mut platform = ComputePlatform {
            client,
            machine_types,
            guest_cpus: provisioner_core::cache::LookupCache::default(),
            settings,
            pacer: provisioner_core::PacerSlot::default(),
            bulk: None,
            bulk_in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(
                bulk::MAX_BULK_IN_FLIGHT,
            )),
        };
        platform.bulk = Some(std::sync::Arc::new(bulk::batcher(platform.clone())));
        Ok(platform)
    }

    fn zone(&self, spec: &GcpComputeSpec) -> Result<String, PlatformError> {
        spec.zone
            .clone()
            .or_else(|| self.settings.zone.clone())
            .ok_or_else(|| {
                PlatformError::invalid("no zone: give spec.zone, or start the worker with GCP_ZONE")
            })
    }

    fn instance(request: &Request, spec: &GcpComputeSpec, zone: &str, name: &str) -> Instance {
        let machine_type = if spec.machine_type.contains('/') {
            spec.machine_type.clone()
        } else {
            format!("zones/{zone}/machineTypes/{}", spec.machine_type)
        };
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        // The request's labels where GCP accepts them as labels; the spec's win.
        for (key, value) in &request.labels {
            if is_gcp_label(key, value) && !key.starts_with("provisioner") {
                labels.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        labels.insert(MANAGED_LABEL.into(), "true".into());
        let mut items: Vec<metadata::Items> = spec
            .metadata
            .iter()
            .map(|(k, v)| metadata::Items::new().set_key(k).set_value(v))
            .collect();
        if let Some(script) = &spec.startup_script {
            items.push(
                metadata::Items::new()
                    .set_key("startup-script")
                    .set_value(script),
            );
        }
        items.push(
            metadata::Items::new()
                .set_key(REQUEST_ID_KEY)
                .set_value(request.request_id.as_str()),
        );
        let mut init = AttachedDiskInitializeParams::new().set_source_image(&spec.image);
        if let Some(size) = spec.disk_size_gb {
            init = init.set_disk_size_gb(i64::from(size));
        }
        // A subnetwork names its network already: Compute Engine takes it alone, and
        // refuses it beside a network it is not part of (the default one, say).
        let mut nic = NetworkInterface::new();
        match (&spec.network, &spec.subnetwork) {
            (network, Some(subnetwork)) => {
                nic = nic.set_subnetwork(subnetwork);
                if let Some(network) = network {
                    nic = nic.set_network(network);
                }
            }
            (Some(network), None) => nic = nic.set_network(network),
            (None, None) => nic = nic.set_network("global/networks/default"),
        }
        if spec.public_ip {
            nic = nic.set_access_configs([AccessConfig::new()
                .set_name("External NAT")
                .set_type(access_config::Type::OneToOneNat)]);
        }
        let mut instance = Instance::new()
            .set_name(name)
            .set_machine_type(machine_type)
            .set_disks([AttachedDisk::new()
                .set_boot(true)
                .set_auto_delete(true)
                .set_initialize_params(init)])
            .set_network_interfaces([nic])
            .set_labels(labels)
            .set_metadata(Metadata::new().set_items(items));
        if !spec.network_tags.is_empty() {
            instance = instance.set_tags(Tags::new().set_items(spec.network_tags.clone()));
        }
        instance
    }

    fn resource(instance: &Instance) -> Resource {
        let zone = instance.zone.as_deref().map(last_segment).unwrap_or("");
        let name = instance.name.clone().unwrap_or_default();
        let nic = instance.network_interfaces.first();
        let external = nic
            .and_then(|n| n.access_configs.iter().find_map(|a| a.nat_ip.clone()))
            .filter(|ip| !ip.is_empty());
        let internal = nic
            .and_then(|n| n.network_ip.clone())
            .filter(|ip| !ip.is_empty());
        Resource {
            id: format!("{zone}/{name}"),
            name,
            address: external.or(internal),
            endpoints: Vec::new(),
            members: Vec::new(),
        }
    }

    async fn get(&self, zone: &str, name: &str) -> Result<Option<Instance>, PlatformError> {
        match self
            .client
            .get()
            .set_project(&self.settings.project)
            .set_zone(zone)
            .set_instance(name)
            .send()
            .await
        {
            Ok(instance) => Ok(Some(instance)),
            Err(e) if e.http_status_code() == Some(404) => Ok(None),
            Err(e) => Err(classify(&e, &format!("reading instance {zone}/{name}"))),
        }
    }

    /// Sends a mutation keyed by a `requestId` derived from `seed`, so that every attempt
    /// at it (the client's resends, the runtime's retries, another worker's takeover) is
    /// one operation. Compute Engine answers a replayed key with the first operation even
    /// when that one failed; such an answer (already `DONE`, with an error) means an
    /// earlier attempt failed, and the call is sent again under a key derived from the
    /// failed operation, which workers retrying together still share. The walk follows
    /// the whole chain of earlier failures (one link per failed attempt), so every
    /// attempt ends in a fresh operation, however many failed before it.
    async fn send_keyed<F, Fut>(
        &self,
        seed: &str,
        send: F,
    ) -> Result<ZoneOperation, google_cloud_gax::error::Error>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<ZoneOperation, google_cloud_gax::error::Error>>,
    {
        let mut key = request_uuid(seed);
        let mut links = 0;
        loop {
            let op = send(key.clone()).await?;
            let failed = op.status == Some(operation::Status::Done)
                && (op.error.as_ref().is_some_and(|e| !e.errors.is_empty())
                    || op.http_error_status_code.is_some_and(|c| c >= 400));
            // A chain longer than any attempt bound means operations fail as soon as
            // they are made: hand the failure on rather than send forever.
            if !failed || links == MAX_KEY_CHAIN {
                return Ok(op);
            }
            links += 1;
            let failed_name = op.name.clone().unwrap_or_default();
            info!(operation = %failed_name, "an earlier attempt failed; sending anew");
            key = request_uuid(&format!("{seed} after {failed_name}"));
        }
    }

    /// Polls a zone operation until it is `DONE`, within `timeout`; its error, if it
    /// finished with one, is returned classified.
    async fn wait_operation(
        &self,
        zone: &str,
        mut op: ZoneOperation,
        doing: &str,
        timeout: Duration,
    ) -> Result<(), PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            if op.status == Some(operation::Status::Done) {
                let codes: Vec<String> = op
                    .error
                    .as_ref()
                    .map(|e| e.errors.iter().filter_map(|e| e.code.clone()).collect())
                    .unwrap_or_default();
                if codes.is_empty() && op.http_error_status_code.is_none_or(|c| c < 400) {
                    return Ok(());
                }
                let message = op
                    .error
                    .as_ref()
                    .and_then(|e| e.errors.first())
                    .and_then(|e| e.message.clone())
                    .or(op.http_error_message.clone())
                    .unwrap_or_default();
                let http = op
                    .http_error_status_code
                    .and_then(|c| u16::try_from(c).ok());
                return Err(classify_operation_error(http, &codes, &message, doing));
            }
            let name = op.name.clone().unwrap_or_default();
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "{doing}: operation {name} is not done after {} s",
                        timeout.as_secs()
                    ),
                ));
            }
            op = self
                .client
                .get_operation()
                .set_project(&self.settings.project)
                .set_zone(zone)
                .set_operation(&name)
                .send()
                .await
                .map_err(|e| classify(&e, &format!("{doing}: reading operation {name}")))?;
        }
    }

    /// Polls the instance until its status is one of `wanted`, within `timeout`.
    async fn wait_status(
        &self,
        zone: &str,
        name: &str,
        wanted: &[instance::Status],
        timeout: Duration,
    ) -> Result<Instance, PlatformError> {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            let instance = self.get(zone, name).await?.ok_or_else(|| {
                PlatformError::permanent(
                    ErrorClass::NotFound,
                    format!("instance {zone}/{name} disappeared while the worker waited for it"),
                )
            })?;
            if instance.status.as_ref().is_some_and(|s| wanted.contains(s)) {
                return Ok(instance);
            }
            if !backoff.wait().await {
                return Err(PlatformError::permanent(
                    ErrorClass::Timeout,
                    format!(
                        "instance {zone}/{name} is {:?}, not {wanted:?}, after {} s{}",
                        instance.status,
                        timeout.as_secs(),
                        instance
                            .status_message
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
    }

    /// The instance a target names, if it exists; one the provisioner did not make is a
    /// conflict, never touched.
    async fn find(&self, target: &TeardownTarget) -> Result<Option<Instance>, PlatformError> {
        match target {
            TeardownTarget::Request(id) => {
                let name = instance_name(id.as_str());
                let found = self
                    .aggregated(
                        &format!("name = \"{name}\""),
                        &format!("looking up the instance of {id}"),
                    )
                    .await?;
                Ok(found
                    .into_iter()
                    .find(|i| request_of(i).as_deref() == Some(id.as_str())))
            }
            TeardownTarget::Resource(id) => {
                let (zone, name) = id.split_once('/').ok_or_else(|| {
                    PlatformError::invalid(format!(
                        "resource_id {id:?} is not <zone>/<instance>; name the request with target_request_id instead"
                    ))
                })?;
                match self.get(zone, name).await? {
                    Some(instance) if is_managed(&instance) => Ok(Some(instance)),
                    Some(_) => Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!("instance {id} was not made by the provisioner; it was left alone"),
                    )),
                    None => Ok(None),
                }
            }
        }
    }

    /// The guest CPUs of `machine_type` in `zone`, from `machineTypes.get`.
    async fn machine_type_cpus(
        &self,
        zone: &str,
        machine_type: &str,
    ) -> Result<u64, PlatformError> {
        let doing = format!("looking up machine type {machine_type} in {zone}");
        let found = self
            .machine_types
            .get()
            .set_project(&self.settings.project)
            .set_zone(zone)
            .set_machine_type(machine_type)
            .send()
            .await
            .map_err(|e| {
                if e.http_status_code() == Some(404) {
                    PlatformError::invalid(format!(
                        "machine type {machine_type} is not offered in {zone}"
                    ))
                } else {
                    classify(&e, &doing)
                }
            })?;
        found
            .guest_cpus
            .and_then(|cpus| u64::try_from(cpus).ok())
            .ok_or_else(|| {
                PlatformError::permanent(
                    ErrorClass::Internal,
                    format!("{doing}: Compute Engine gave no guestCpus"),
                )
            })
    }

    /// Every instance of the project matching `filter`, across zones.
    async fn aggregated(&self, filter: &str, doing: &str) -> Result<Vec<Instance>, PlatformError> {
        let mut instances = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client
                .aggregated_list()
                .set_project(&self.settings.project)
                .set_filter(filter)
                .set_page_token(&page_token)
                .send()
                .await
                .map_err(|e| classify(&e, doing))?;
            instances.extend(page.items.into_values().flat_map(|scoped| scoped.instances));
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(token) => page_token = token,
                None => return Ok(instances),
            }
        }
    }

    /// Runs a start, stop or reset of the target's instance and waits for `wanted`.
    async fn change_power(
        &self,
        target: &TeardownTarget,
        verb: &str,
        wanted: &[instance::Status],
    ) -> Result<Resource, PlatformError> {
        let instance = self.find(target).await?.ok_or_else(|| {
            PlatformError::permanent(ErrorClass::NotFound, format!("{target} has no instance"))
        })?;
        let zone = instance
            .zone
            .as_deref()
            .map(last_segment)
            .unwrap_or("")
            .to_owned();
        let name = instance.name.clone().unwrap_or_default();
        // A fresh key per call: a stop between two starts must not make the second start
        // a replay. The client's own retries of this call reuse it.
        let key = uuid::Uuid::new_v4().to_string();
        let project = &self.settings.project;
        let sent = match verb {
            "start" => {
                self.client
                    .start()
                    .set_project(project)
                    .set_zone(&zone)
                    .set_instance(&name)
                    .set_request_id(&key)
                    .with_idempotency(true)
                    .send()
                    .await
            }
            "stop" => {
                self.client
                    .stop()
                    .set_project(project)
                    .set_zone(&zone)
                    .set_instance(&name)
                    .set_request_id(&key)
                    .with_idempotency(true)
                    .send()
                    .await
            }
            _ => {
                self.client
                    .reset()
                    .set_project(project)
                    .set_zone(&zone)
                    .set_instance(&name)
                    .set_request_id(&key)
                    .with_idempotency(true)
                    .send()
                    .await
            }
        };
        let doing = format!("{verb} of instance {zone}/{name}");
        let op = sent.map_err(|e| classify(&e, &doing))?;
        self.wait_operation(&zone, op, &doing, OPERATION_TIMEOUT)
            .await?;
        let instance = self
            .wait_status(&zone, &name, wanted, OPERATION_TIMEOUT)
            .await?;
        info!(instance = %name, zone = %zone, verb, "done");
        Ok(Self::resource(&instance))
    }
}

#[async_trait]
impl Platform for ComputePlatform {
    fn name(&self) -> PlatformName {
        PlatformName::GcpCompute
    }

    /// Compute Engine's per-project rate quotas, enforced per minute: mutations
    /// (`Queries`, 1,500 a minute) and reads (1,500 a minute), as buckets of 750
    /// refilling 12.5 a second: a full bucket and a minute of refill make 1,500, so no
    /// 60 seconds ever hold more calls than the quota allows.
    /// <https://cloud.google.com/compute/docs/api-rate-limits>
    ///
    /// A fleet member's provision draws nothing itself: its bulk insert draws one
    /// mutation for all the members it makes, as Compute Engine counts it.
    fn rate_limits(&self, request: &Request) -> Vec<provisioner_core::RateLimit> {
        match request.operation {
            Operation::Describe => vec![bulk::reads_bucket(&self.settings.project)],
            Operation::Provision if request.fleet_member.is_some() => Vec::new(),
            _ => vec![bulk::mutations_bucket(&self.settings.project)],
        }
    }

    fn use_pacer(&self, pacer: std::sync::Arc<dyn provisioner_core::CallPacer>) {
        self.pacer.set(pacer);
    }

    /// A tenant's `vcpus` count the machine type's guest CPUs: a custom type's from its
    /// name, the others' from `machineTypes.get`, once per zone and type.
    async fn quota_cost(
        &self,
        request: &Request,
    ) -> Result<provisioner_core::QuotaCost, PlatformError> {
        let spec = spec_of::<GcpComputeSpec>(request)?;
        let zone = self.zone(&spec)?;
        let machine_type = last_segment(&spec.machine_type).to_owned();
        let cpus = match custom_machine_cpus(&machine_type) {
            Some(cpus) => cpus,
            None => {
                self.guest_cpus
                    .get_or_lookup(&(zone.clone(), machine_type.clone()), || {
                        self.machine_type_cpus(&zone, &machine_type)
                    })
                    .await?
            }
        };
        Ok(provisioner_core::vcpus_cost(cpus.saturating_mul(1000)))
    }

    fn permissions(&self) -> &'static [provisioner_core::permissions::Permission] {
        crate::permissions::COMPUTE_PERMISSIONS
    }

    async fn preflight(&self) -> Vec<Finding> {
        let mut findings = crate::identity_findings(&self.settings);
        findings.push(match &self.settings.zone {
            Some(zone) => Finding::pass("zone", zone.clone()),
            None => Finding::warn("zone", "no GCP_ZONE: every spec must name its zone"),
        });
        let listed = self
            .aggregated(&format!("labels.{MANAGED_LABEL}=true"), "listing instances")
            .await;
        let seen = listed.as_ref().map_or(0, Vec::len);
        findings.push(Finding::of_call(
            "compute.instances.list",
            listed,
            &format!("allowed; {seen} instance(s) of the provisioner"),
        ));
        let rest: Vec<&str> = crate::permissions::COMPUTE_PERMISSIONS
            .iter()
            .map(|p| p.action)
            .filter(|a| *a != "compute.instances.list")
            .collect();
        findings.push(Finding::warn(
            rest.join(", "),
            "checked by the first request: roles/compute.instanceAdmin.v1 (docs/gcp.md) grant them",
        ));
        findings
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<GcpComputeSpec>(request)?;
            self.zone(&spec)?;
        }
        Ok(())
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<GcpComputeSpec>(request)?;
        let zone = self.zone(&spec)?;
        if let (Some(member), Some(bulk)) = (&request.fleet_member, &self.bulk) {
            let instance = bulk::insert_member(
                bulk,
                request,
                member,
                &zone,
                self.pacer.clone(),
                &self.settings.project,
            )
            .await?;
            return Ok(Self::resource(&instance));
        }
        let id = request.request_id.as_str();
        let name = instance_name(id);
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        // One deadline for the whole provision, not one per wait.
        let deadline = tokio::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let doing = format!("creating instance {zone}/{name}");
        let instance = Self::instance(request, &spec, &zone, &name);
        let inserted = self
            .send_keyed(id, |key| {
                self.client
                    .insert()
                    .set_project(&self.settings.project)
                    .set_zone(&zone)
                    .set_request_id(key)
                    .set_body(instance.clone())
                    // Safe to resend: Compute Engine answers a replayed requestId with the
                    // first insert's operation.
                    .with_idempotency(true)
                    .send()
            })
            .await;
        let adopt = match inserted {
            Ok(op) => match self.wait_operation(&zone, op, &doing, left()).await {
                Ok(()) => false,
                Err(e) if e.class == ErrorClass::Conflict => true,
                Err(e) => return Err(e),
            },
            Err(e) if e.http_status_code() == Some(409) => true,
            Err(e) => return Err(classify(&e, &doing)),
        };
        if adopt {
            let existing = self.get(&zone, &name).await?.ok_or_else(|| {
                PlatformError::transient(format!(
                    "instance {zone}/{name} was reported to exist but is gone"
                ))
            })?;
            if request_of(&existing).as_deref() != Some(id) {
                return Err(PlatformError::permanent(
                    ErrorClass::Conflict,
                    format!(
                        "instance {zone}/{name} exists and was not made for request {id}; it was left alone"
                    ),
                ));
            }
            if state_of(existing.status.as_ref()) == State::Stopped {
                // A stopped instance does not start by itself: say so instead of waiting.
                return Err(PlatformError::permanent(
                    ErrorClass::Conflict,
                    format!(
                        "instance {zone}/{name} of request {id} exists but is stopped; send a start request"
                    ),
                ));
            }
            info!(instance = %name, zone = %zone, "found the one made before");
        } else {
            info!(instance = %name, zone = %zone, "created");
        }
        let instance = provisioner_core::metrics::health_wait(self.wait_status(
            &zone,
            &name,
            &[instance::Status::Running],
            left(),
        ))
        .await?;
        Ok(Self::resource(&instance))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(instance) = self.find(target).await? else {
            return Ok(None);
        };
        let zone = instance
            .zone
            .as_deref()
            .map(last_segment)
            .unwrap_or("")
            .to_owned();
        let name = instance.name.clone().unwrap_or_default();
        let doing = format!("deleting instance {zone}/{name}");
        // Keyed by the instance's unique id: replays of this delete are one delete, and a
        // later instance of the same name gets another key.
        let deleted = self
            .send_keyed(
                &format!("delete:{}", instance.id.unwrap_or_default()),
                |key| {
                    self.client
                        .delete()
                        .set_project(&self.settings.project)
                        .set_zone(&zone)
                        .set_instance(&name)
                        .set_request_id(key)
                        .with_idempotency(true)
                        .send()
                },
            )
            .await;
        match deleted {
            Ok(op) => match self
                .wait_operation(&zone, op, &doing, OPERATION_TIMEOUT)
                .await
            {
                Ok(()) => {}
                Err(e) if e.class == ErrorClass::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
            Err(e) if e.http_status_code() == Some(404) => return Ok(None),
            Err(e) => return Err(classify(&e, &doing)),
        }
        info!(instance = %name, zone = %zone, "deleted");
        Ok(Some(Self::resource(&instance)))
    }

    async fn owned(&self) -> Result<Vec<Owned>, PlatformError> {
        let found = self
            .aggregated(
                &format!("labels.{MANAGED_LABEL} = \"true\""),
                "listing the provisioner's instances",
            )
            .await?;
        let mut owned = Vec::new();
        for instance in &found {
            // Without the metadata item the instance names no request: never touched.
            let Some(request_id) = request_of(instance).and_then(|id| RequestId::new(id).ok())
            else {
                continue;
            };
            owned.push(Owned {
                resource: Self::resource(instance),
                request_id,
                created: instance
                    .creation_timestamp
                    .as_deref()
                    .and_then(parse_rfc3339),
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
            .and_then(request_of)
            .and_then(|id| RequestId::new(id).ok()))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        Ok(self.find(target).await?.map(|instance| Described {
            state: state_of(instance.status.as_ref()),
            resource: Self::resource(&instance),
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        let found = self
            .aggregated(
                &format!("labels.{MANAGED_LABEL} = \"true\""),
                "listing the provisioner's instances",
            )
            .await?;
        Ok(found.iter().map(Self::resource).collect())
    }

    async fn start(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.change_power(target, "start", &[instance::Status::Running])
            .await
    }

    async fn stop(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.change_power(
            target,
            "stop",
            &[instance::Status::Terminated, instance::Status::Stopped],
        )
        .await
    }

    async fn reboot(&self, target: &TeardownTarget) -> Result<Resource, PlatformError> {
        self.change_power(target, "reset", &[instance::Status::Running])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_compute_names() {
        for id in ["web-1", "Batch_7.a", &"z".repeat(128)] {
            let name = instance_name(id);
            assert!(
                provisioner_events::spec::gcp::is_rfc1035_name(&name, 63),
                "{id} -> {name}"
            );
        }
    }

    #[test]
    fn custom_machine_types_carry_their_vcpus() {
        assert_eq!(custom_machine_cpus("custom-4-8192"), Some(4));
        assert_eq!(custom_machine_cpus("n2-custom-6-20480-ext"), Some(6));
        assert_eq!(custom_machine_cpus("e2-standard-8"), None);
    }

    #[test]
    fn statuses_map_to_states() {
        use instance::Status as S;
        assert_eq!(state_of(Some(&S::Running)), State::Running);
        assert_eq!(state_of(Some(&S::Staging)), State::Starting);
        assert_eq!(state_of(Some(&S::Terminated)), State::Stopped);
        assert_eq!(state_of(Some(&S::Stopping)), State::Stopping);
    }
}
