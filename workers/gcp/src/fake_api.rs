//! A GCP API server for tests, since Google offers no emulator for Compute Engine or
//! Cloud Run: the documented REST resources, driven by the real google-cloud-rust
//! clients.
//!
//! Compute Engine (`/compute/v1/...`): `instances.insert` answers a zone operation that
//! is `DONE` after a few polls, and a replayed `requestId` gets the first insert's
//! operation back; a second insert of a name gets `409 alreadyExists` in the legacy
//! `errors` format; an instance goes PROVISIONING → STAGING → RUNNING as it is read;
//! `delete`, `start`, `stop` and `reset` answer operations too (`400 resourceNotReady`
//! while the instance is still PROVISIONING or STAGING); `instances.bulkInsert` makes
//! the instances its `perInstanceProperties` name in one operation, all or none;
//! `machineTypes.get` answers the guest CPUs of the shared-core and predefined types;
//! `aggregated/instances` and a zone's `instances` list filter on `name = "…"` and
//! `labels.k = "v"`, alone or `OR`ed in parentheses. Cloud Run (`/v2/...`): `services` create
//! answers a long-running operation, a second create `409 ALREADY_EXISTS`; the service's
//! terminal `Ready` condition succeeds after a few reads (with its URL), or fails for an
//! image whose reference contains `does-not-exist`; delete removes it after a read;
//! `locations/-` lists every region. Enums are numbers when the client asks
//! (`enum-encoding=int`), as Google's servers do.
//!
//! Authorization as the APIs do it: each call needs the permissions its method's
//! reference page lists (an insert also those of what its body makes and sets: the boot
//! disk, the subnetwork, an external address, metadata, labels, tags), and a Cloud Run
//! deploy `iam.serviceAccounts.actAs` on the account the service runs as; a call the
//! caller lacks one for is refused with the API's 403 (`forbidden` naming the
//! permission, `PERMISSION_DENIED`), before it has any effect. By default the caller
//! holds what the roles docs/gcp.md names grant, at their scopes ([`Grants::documented`]).
//!
//! The project's limits, where a test sets them: a region's `CPUS` quota (an insert or
//! bulk insert past it is `403 quotaExceeded` at once), a zone's capacity (a bulk insert
//! past it is `503 insufficientCapacity` at once, a single insert's operation fails
//! `ZONE_RESOURCE_POOL_EXHAUSTED`), and at most [`BULK_OPERATIONS_AT_ONCE`] bulk
//! operations running (`403 rateLimitExceeded` past them).
//!
//! Faults can be queued: an HTTP error instead of the next matching answer, optionally
//! after the call took effect (an answer lost on the way back), or a Compute operation
//! that finishes with an error (a stockout, a quota).

use std::collections::HashMap;
use std::net::SocketAddr;

pub use provisioner_fake_http::Method;
use provisioner_fake_http::{Answer, Call, CallLog, FaultQueue, ReadCounts, Shared};
use serde_json::{Value, json};

/// An HTTP error to answer the next request whose method and path match.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    /// Matches when the request path contains this.
    pub path_contains: String,
    pub code: u16,
    /// The error body, as the API would send it (see [`compute_error`], [`run_error`]).
    pub body: Value,
    /// Do the call first and then answer the error: the answer was lost.
    pub after_effect: bool,
}

/// A Compute Engine operation that will finish with this error.
#[derive(Debug, Clone)]
pub struct OperationFailure {
    /// The operation type it applies to (`insert`, `delete`, ...).
    pub operation_type: String,
    /// `errors[].code`, e.g. `ZONE_RESOURCE_POOL_EXHAUSTED`.
    pub code: String,
    pub message: String,
    pub http_status: u16,
}

/// A Compute Engine error body in the legacy format (`errors[]` with `reason`).
pub fn compute_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}]}})
}

/// A Cloud Run (AIP-193) error body.
pub fn run_error(code: u16, status: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "status": status}})
}

#[derive(Debug)]
struct ComputeOperation {
    value: Value,
    /// Polls left before it is `DONE`.
    polls_left: u32,
    /// What happens to the instance when it is done.
    effect: Effect,
    failure: Option<OperationFailure>,
}

#[derive(Debug, Clone)]
enum Effect {
    Created(String),
    /// A bulk insert's instances, all removed if it fails.
    CreatedAll(Vec<String>),
    Deleted(String),
    Status(String, &'static str),
}

#[derive(Debug, Default)]
struct World {
    /// (zone, name) → instance.
    instances: HashMap<(String, String), Value>,
    /// Reads of each instance since it was made or started, which time its status.
    instance_reads: ReadCounts<(String, String)>,
    /// (zone, operation name) → operation.
    operations: HashMap<(String, String), ComputeOperation>,
    /// requestId → (zone, operation name): Compute Engine's replay protection.
    request_ids: HashMap<String, (String, String)>,
    /// Full service name → service.
    services: HashMap<String, Value>,
    service_reads: ReadCounts<String>,
    /// Services deleted but still visible for one more read.
    deleting: HashMap<String, u32>,
    faults: FaultQueue<Fault>,
    operation_failures: FaultQueue<OperationFailure>,
    /// Inserts that made an instance, and creates that made a service.
    created: u32,
    next_id: u64,
    /// Every call, faulted or not.
    log: CallLog,
    /// Subnetworks (`regions/<r>/subnetworks/<s>`) and the network (`global/networks/<n>`)
    /// each belongs to.
    subnetworks: HashMap<String, String>,
    /// The caller's permissions: on the project, and on the service account Cloud Run
    /// services run as. `None` until a test sets them: the documented roles'.
    grants: Option<Grants>,
    /// The project's `CPUS` quota per region, where a test set one.
    cpu_quota: HashMap<String, u32>,
    /// How many more instances each zone can place, where a test set it.
    zone_capacity: HashMap<String, usize>,
}

impl World {
    /// The guest CPUs of the instances in `region`'s zones.
    fn cpus_in(&self, region: &str) -> u32 {
        self.instances
            .iter()
            .filter(|((zone, _), _)| region_of(zone) == region)
            .map(|(_, instance)| {
                instance["machineType"]
                    .as_str()
                    .and_then(|t| t.rsplit('/').next())
                    .and_then(machine_type_cpus)
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Bulk insert operations not yet done.
    fn bulk_in_flight(&self) -> usize {
        self.operations
            .values()
            .filter(|op| op.value["operationType"] == "bulkInsert" && op.value["status"] != "DONE")
            .count()
    }
}

/// `europe-west1` of `europe-west1-b`.
fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(region, _)| region)
}

/// Compute Engine's limit on bulk operations running at once in a project
/// (https://cloud.google.com/compute/docs/troubleshooting/troubleshooting-bulk-vm-creation).
pub const BULK_OPERATIONS_AT_ONCE: usize = 10;

/// The permissions the caller holds, by where they are granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    pub project: Vec<String>,
    pub runtime_account: Vec<String>,
}

impl Grants {
    /// What the roles docs/gcp.md names grant (the permissions of theirs the workers
    /// rely on), each at the scope the docs grant it.
    pub fn documented() -> Self {
        use crate::permissions::{
            CLOUD_RUN_ROLES, COMPUTE_ROLES, PROJECT, RUNTIME_SERVICE_ACCOUNT,
        };
        let at = |scope: &str| -> Vec<String> {
            COMPUTE_ROLES
                .iter()
                .chain(CLOUD_RUN_ROLES)
                .filter(|r| r.scope == scope)
                .flat_map(|r| r.permissions.iter().map(|p| (*p).to_owned()))
                .collect()
        };
        Self {
            project: at(PROJECT),
            runtime_account: at(RUNTIME_SERVICE_ACCOUNT),
        }
    }

    /// These grants without `permission`, wherever it is granted.
    pub fn without(mut self, permission: &str) -> Self {
        self.project.retain(|p| p != permission);
        self.runtime_account.retain(|p| p != permission);
        self
    }
}

/// The service account Cloud Run services run as when they name none: the project's
/// default compute account.
pub const DEFAULT_RUNTIME_ACCOUNT: &str = "123456789012-compute@developer.gserviceaccount.com";

impl World {
    /// The operation a replayed `requestId` answers: the first call's, as it is now.
    fn replayed(&self, request_id: Option<&String>) -> Option<Value> {
        let key = self.request_ids.get(request_id?)?;
        self.operations.get(key).map(|op| op.value.clone())
    }

    /// Keeps a new instance, its reads counted from now (they time its status).
    fn add_instance(&mut self, key: (String, String), instance: Value) {
        self.instance_reads.restart(&key);
        self.instances.insert(key, instance);
        self.created += 1;
    }

    /// Remembers the operation a `requestId` made, for its replays.
    fn remember(&mut self, request_id: Option<String>, zone: &str, op: &Value) {
        if let Some(request_id) = request_id {
            let name = op["name"].as_str().unwrap_or_default().to_owned();
            self.request_ids.insert(request_id, (zone.to_owned(), name));
        }
    }
}

/// The part of a network or subnetwork reference from `marker` on, whatever form (URL,
/// partial path) it was given in.
fn reference_from<'a>(reference: &'a str, marker: &str) -> &'a str {
    reference
        .find(marker)
        .map_or(reference, |at| &reference[at..])
}

/// The running server; it serves until the runtime ends.
#[derive(Debug, Clone)]
pub struct FakeGcp {
    pub addr: SocketAddr,
    pub project: String,
    world: Shared<World>,
    ready_after_reads: u32,
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| percent_decode(value))
    })
}

/// `name = "x"` or `labels.k = "v"`, as Compute Engine's list filters take them, or
/// several in parentheses joined by `OR`.
fn filter_matches(instance: &Value, filter: &str) -> bool {
    if filter.contains(" OR ") {
        return filter.split(" OR ").any(|one| {
            let one = one.trim();
            let one = one.strip_prefix('(').unwrap_or(one);
            filter_matches(instance, one.strip_suffix(')').unwrap_or(one))
        });
    }
    let Some((field, value)) = filter.split_once('=') else {
        return true;
    };
    let field = field.trim();
    let value = value.trim().trim_matches('"');
    match field.strip_prefix("labels.") {
        Some(label) => instance["labels"][label].as_str() == Some(value),
        None => instance[field].as_str() == Some(value),
    }
}

/// The guest CPUs of the machine types this server knows: the shared-core ones and the
/// predefined `<series>-<standard|highmem|highcpu>-<vCPUs>` ones.
fn machine_type_cpus(name: &str) -> Option<u32> {
    match name {
        "e2-micro" | "e2-small" | "e2-medium" => Some(2),
        "f1-micro" | "g1-small" => Some(1),
        _ => {
            let mut parts = name.split('-');
            let (_series, kind, cpus) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || !["standard", "highmem", "highcpu"].contains(&kind) {
                return None;
            }
            cpus.parse().ok().filter(|n| *n > 0)
        }
    }
}

fn now() -> String {
    "2026-11-21T12:00:00.000-08:00".into()
}

impl FakeGcp {
    /// Serves on a free port of 127.0.0.1. Instances reach RUNNING and services become
    /// ready on the `ready_after_reads`-th read; operations are done on their third poll.
    pub async fn start(project: &str, ready_after_reads: u32) -> FakeGcp {
        let listener = provisioner_fake_http::bind().await;
        let api = FakeGcp {
            addr: listener.local_addr().expect("address"),
            project: project.into(),
            world: Shared::default(),
            ready_after_reads,
        };
        let served = api.clone();
        provisioner_fake_http::spawn(listener, move |call| served.serve(call));
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn inject(&self, fault: Fault) {
        self.world.lock().faults.push(fault);
    }

    pub fn fail_next_operation(&self, failure: OperationFailure) {
        self.world.lock().operation_failures.push(failure);
    }

    /// The project's `CPUS` quota in `region` from now on: an insert or bulk insert
    /// that would hold more is refused at once (`403 quotaExceeded`), as Compute Engine
    /// refuses it (https://cloud.google.com/compute/resource-usage).
    pub fn set_cpu_quota(&self, region: &str, cpus: u32) {
        self.world.lock().cpu_quota.insert(region.to_owned(), cpus);
    }

    /// `zone` can place `instances` more from now on: a bulk insert of more is refused at
    /// once (`503 insufficientCapacity`), a single insert past it fails in its operation
    /// (`ZONE_RESOURCE_POOL_EXHAUSTED`), as Compute Engine does when a zone runs out.
    pub fn set_zone_capacity(&self, zone: &str, instances: usize) {
        self.world
            .lock()
            .zone_capacity
            .insert(zone.to_owned(), instances);
    }

    /// What the project's limits say of `count` more instances of `machine_type` in
    /// `zone`: an immediate refusal, or `None` (and the zone's capacity taken).
    fn refuse_past_limits(
        &self,
        world: &mut World,
        zone: &str,
        machine_type: &str,
        count: usize,
        bulk: bool,
    ) -> Option<(u16, Value)> {
        if bulk && world.bulk_in_flight() >= BULK_OPERATIONS_AT_ONCE {
            return Some((
                403,
                compute_error(403, "rateLimitExceeded", "Rate Limit Exceeded"),
            ));
        }
        let region = region_of(zone);
        if let Some(limit) = world.cpu_quota.get(region).copied() {
            let cpus = machine_type
                .rsplit('/')
                .next()
                .and_then(machine_type_cpus)
                .unwrap_or(0);
            let wanted = world.cpus_in(region) + cpus * u32::try_from(count).unwrap_or(u32::MAX);
            if wanted > limit {
                let message =
                    format!("Quota 'CPUS' exceeded.  Limit: {limit}.0 in region {region}.");
                return Some((403, compute_error(403, "quotaExceeded", &message)));
            }
        }
        if let Some(left) = world.zone_capacity.get_mut(zone) {
            if count > *left {
                if bulk {
                    let message = format!(
                        "The zone 'projects/{}/zones/{zone}' does not have enough resources available to fulfill the request.",
                        self.project
                    );
                    return Some((503, compute_error(503, "insufficientCapacity", &message)));
                }
                world.operation_failures.push(OperationFailure {
                    operation_type: "insert".into(),
                    code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
                    message: format!(
                        "The zone 'projects/{}/zones/{zone}' does not have enough resources available to fulfill the request.  Try a different zone, or try again later.",
                        self.project
                    ),
                    http_status: 503,
                });
            } else {
                *left -= count;
            }
        }
        None
    }

    /// The caller's permissions from now on (the documented roles' until set).
    pub fn set_grants(&self, grants: Grants) {
        self.world.lock().grants = Some(grants);
    }

    fn grants(&self) -> Grants {
        self.world
            .lock()
            .grants
            .clone()
            .unwrap_or_else(Grants::documented)
    }

    /// The first of `needed` (a permission on the project) the caller lacks.
    fn lacking(&self, needed: &[&'static str]) -> Option<&'static str> {
        let grants = self.grants();
        needed
            .iter()
            .copied()
            .find(|p| !grants.project.iter().any(|g| g == p))
    }

    /// The permissions an instance body asks for beside `compute.instances.create`: what
    /// it makes and sets at insert (the method page's "Authorization requires" and the
    /// create-instance page's required permissions).
    fn insert_permissions(&self, instance: &Value) -> Vec<&'static str> {
        let mut needed = vec!["compute.instances.create"];
        let disks = instance["disks"].as_array().cloned().unwrap_or_default();
        if disks.iter().any(|d| d["initializeParams"].is_object()) {
            needed.push("compute.disks.create");
        }
        let own_image = |image: &str| {
            image.starts_with("global/images/")
                || image.contains(&format!("projects/{}/global/images/", self.project))
        };
        if disks
            .iter()
            .filter_map(|d| d["initializeParams"]["sourceImage"].as_str())
            .any(own_image)
        {
            needed.push("compute.images.useReadOnly");
        }
        let nics = instance["networkInterfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !nics.is_empty() {
            needed.push("compute.subnetworks.use");
        }
        if nics
            .iter()
            .any(|n| n["accessConfigs"].as_array().is_some_and(|a| !a.is_empty()))
        {
            needed.push("compute.subnetworks.useExternalIp");
        }
        if instance["metadata"]["items"]
            .as_array()
            .is_some_and(|i| !i.is_empty())
        {
            needed.push("compute.instances.setMetadata");
        }
        if instance["labels"]
            .as_object()
            .is_some_and(|l| !l.is_empty())
        {
            needed.push("compute.instances.setLabels");
        }
        if instance["tags"]["items"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
        {
            needed.push("compute.instances.setTags");
        }
        needed
    }

    /// The permissions a Compute Engine call needs (each method's reference page).
    fn compute_permissions(
        &self,
        method: &Method,
        rest: &[&str],
        body: &Value,
    ) -> Vec<&'static str> {
        match (method.as_str(), rest) {
            ("POST", ["zones", _, "instances"]) => self.insert_permissions(body),
            ("POST", ["zones", _, "instances", "bulkInsert"]) => {
                self.insert_permissions(&body["instanceProperties"])
            }
            ("GET", ["zones", _, "instances"]) | ("GET", ["aggregated", "instances"]) => {
                vec!["compute.instances.list"]
            }
            ("GET", ["zones", _, "instances", _]) => vec!["compute.instances.get"],
            ("DELETE", ["zones", _, "instances", _]) => vec!["compute.instances.delete"],
            ("POST", ["zones", _, "instances", _, "start"]) => vec!["compute.instances.start"],
            ("POST", ["zones", _, "instances", _, "stop"]) => vec!["compute.instances.stop"],
            ("POST", ["zones", _, "instances", _, "reset"]) => vec!["compute.instances.reset"],
            ("GET", ["zones", _, "operations", _]) => vec!["compute.zoneOperations.get"],
            ("GET", ["zones", _, "machineTypes", _]) => vec!["compute.machineTypes.get"],
            _ => Vec::new(),
        }
    }

    /// The permission a Cloud Run call needs on the project.
    fn run_permission(method: &Method, rest: &[&str]) -> Option<&'static str> {
        match (method.as_str(), rest) {
            ("POST", ["services"]) => Some("run.services.create"),
            ("GET", ["services"]) => Some("run.services.list"),
            ("GET", ["services", _]) => Some("run.services.get"),
            ("DELETE", ["services", _]) => Some("run.services.delete"),
            ("GET", ["operations", _]) => Some("run.operations.get"),
            _ => None,
        }
    }

    /// Instances and services made so far (replays and adoptions do not count).
    pub fn created(&self) -> u32 {
        self.world.lock().created
    }

    pub fn instance_count(&self) -> usize {
        self.world.lock().instances.len()
    }

    pub fn service_count(&self) -> usize {
        self.world.lock().services.len()
    }

    pub fn instance(&self, zone: &str, name: &str) -> Option<Value> {
        self.world
            .lock()
            .instances
            .get(&(zone.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn service(&self, region: &str, id: &str) -> Option<Value> {
        let name = format!("projects/{}/locations/{region}/services/{id}", self.project);
        self.world.lock().services.get(&name).cloned()
    }

    /// Makes a subnetwork of `network` in `region`: an insert naming it with another
    /// network is refused, as Compute Engine refuses it.
    pub fn add_subnetwork(&self, region: &str, name: &str, network: &str) {
        self.world.lock().subnetworks.insert(
            format!("regions/{region}/subnetworks/{name}"),
            format!("global/networks/{network}"),
        );
    }

    /// Forgets every `requestId` seen, as Compute Engine does after its replay window:
    /// a later insert of the same instance gets `409 alreadyExists`.
    pub fn forget_request_ids(&self) {
        self.world.lock().request_ids.clear();
    }

    /// Puts an instance there as someone else made it (no provisioner label).
    pub fn put_foreign_instance(&self, zone: &str, name: &str) {
        let value = json!({"kind": "compute#instance", "id": "42", "name": name,
            "zone": self.zone_url(zone), "status": "RUNNING", "labels": {}});
        self.world
            .lock()
            .instances
            .insert((zone.to_owned(), name.to_owned()), value);
    }

    /// Puts a ready service there as someone else made it (no provisioner annotation).
    pub fn put_foreign_service(&self, region: &str, id: &str) {
        let name = format!("projects/{}/locations/{region}/services/{id}", self.project);
        let value = json!({"name": name, "uid": uuid_like(&name), "reconciling": false,
            "terminalCondition": {"type": "Ready", "state": "CONDITION_SUCCEEDED"},
            "uri": format!("https://{id}-zzz-ew.a.run.app"),
            "template": {"containers": [{"image": "gcr.io/other/app"}]}});
        self.world.lock().services.insert(name, value);
    }

    /// Every request line (`METHOD path?query`) served, in order.
    pub fn log(&self) -> Vec<String> {
        self.world.lock().log.lines()
    }

    fn zone_url(&self, zone: &str) -> String {
        format!(
            "https://www.googleapis.com/compute/v1/projects/{}/zones/{zone}",
            self.project
        )
    }

    fn serve(&self, call: Call) -> Answer {
        let fault = {
            let mut world = self.world.lock();
            world.log.record(&call);
            world
                .faults
                .take_first(|f| f.method == call.method && call.path.contains(&f.path_contains))
        };
        let Call {
            method,
            path,
            query,
            body,
        } = call;
        let answer = match &fault {
            Some(fault) if !fault.after_effect => (fault.code, fault.body.clone()),
            _ => {
                let int_enums =
                    query.contains("enum-encoding%3Dint") || query.contains("enum-encoding=int");
                let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
                match segments.as_slice() {
                    ["compute", "v1", "projects", project, rest @ ..] => {
                        self.compute(&method, project, rest, &query, body)
                    }
                    ["v2", "projects", project, "locations", region, rest @ ..] => {
                        self.run(&method, project, region, rest, &query, body, int_enums)
                    }
                    _ => (
                        404,
                        run_error(404, "NOT_FOUND", &format!("no route {path}")),
                    ),
                }
            }
        };
        let (code, value) = match fault {
            Some(fault) if fault.after_effect => (fault.code, fault.body),
            _ => answer,
        };
        Answer::json(code, value)
    }

    fn compute(
        &self,
        method: &Method,
        project: &str,
        rest: &[&str],
        query: &str,
        body: Value,
    ) -> (u16, Value) {
        if project != self.project {
            return (
                403,
                compute_error(
                    403,
                    "forbidden",
                    &format!(
                        "Required 'compute.instances.list' permission for 'projects/{project}'"
                    ),
                ),
            );
        }
        let needed = self.compute_permissions(method, rest, &body);
        if let Some(missing) = self.lacking(&needed) {
            let message = format!(
                "Required '{missing}' permission for 'projects/{project}/{}'",
                rest.join("/")
            );
            return (403, compute_error(403, "forbidden", &message));
        }
        match (method.as_str(), rest) {
            ("POST", ["zones", zone, "instances"]) => self.insert(zone, query, body),
            ("POST", ["zones", zone, "instances", "bulkInsert"]) => {
                self.bulk_insert(zone, query, body)
            }
            ("GET", ["zones", zone, "instances"]) => self.list_zone(project, zone, query),
            ("GET", ["zones", zone, "instances", name]) => self.get_instance(zone, name),
            ("DELETE", ["zones", zone, "instances", name]) => {
                self.instance_operation(zone, name, "delete", query)
            }
            (
                "POST",
                [
                    "zones",
                    zone,
                    "instances",
                    name,
                    verb @ ("start" | "stop" | "reset"),
                ],
            ) => self.instance_operation(zone, name, verb, query),
            ("GET", ["zones", zone, "operations", name]) => self.poll_operation(zone, name),
            ("GET", ["zones", zone, "machineTypes", name]) => match machine_type_cpus(name) {
                Some(cpus) => (
                    200,
                    json!({"kind": "compute#machineType", "name": name, "guestCpus": cpus,
                           "zone": zone, "isSharedCpu": name.starts_with("e2-") && cpus == 2}),
                ),
                None => {
                    let message = format!(
                        "The resource 'projects/{project}/zones/{zone}/machineTypes/{name}' was not found"
                    );
                    (404, compute_error(404, "notFound", &message))
                }
            },
            ("GET", ["aggregated", "instances"]) => {
                let filter = query_param(query, "filter").unwrap_or_default();
                let world = self.world.lock();
                let mut items: HashMap<String, Vec<Value>> = HashMap::new();
                for ((zone, _), instance) in &world.instances {
                    if filter_matches(instance, &filter) {
                        items
                            .entry(format!("zones/{zone}"))
                            .or_default()
                            .push(instance.clone());
                    }
                }
                let items: serde_json::Map<String, Value> = items
                    .into_iter()
                    .map(|(k, v)| (k, json!({"instances": v})))
                    .collect();
                (
                    200,
                    json!({"kind": "compute#instanceAggregatedList", "id": format!("projects/{project}/aggregated/instances"), "items": items}),
                )
            }
            _ => (
                404,
                compute_error(
                    404,
                    "notFound",
                    "The requested URL was not found on this server.",
                ),
            ),
        }
    }

    fn new_operation(
        &self,
        world: &mut World,
        zone: &str,
        kind: &str,
        target: &str,
        effect: Effect,
    ) -> Value {
        world.next_id += 1;
        let name = format!("operation-{}-{:06}", kind, world.next_id);
        let failure = world
            .operation_failures
            .take_first(|f| f.operation_type == kind);
        let value = json!({
            "kind": "compute#operation", "id": format!("{}", 7_000_000 + world.next_id),
            "name": name, "zone": self.zone_url(zone), "operationType": kind,
            "targetLink": format!("{}/instances/{target}", self.zone_url(zone)),
            "status": "RUNNING", "progress": 0, "insertTime": now(),
            "selfLink": format!("{}/operations/{name}", self.zone_url(zone)),
        });
        world.operations.insert(
            (zone.to_owned(), name),
            ComputeOperation {
                value: value.clone(),
                polls_left: 2,
                effect,
                failure,
            },
        );
        value
    }

    fn insert(&self, zone: &str, query: &str, body: Value) -> (u16, Value) {
        let mut world = self.world.lock();
        let request_id = query_param(query, "requestId");
        if let Some(op) = world.replayed(request_id.as_ref()) {
            return (200, op);
        }
        let Some(name) = body["name"].as_str().map(str::to_owned) else {
            return (
                400,
                compute_error(
                    400,
                    "required",
                    "Required field 'resource.name' not specified",
                ),
            );
        };
        let key = (zone.to_owned(), name.clone());
        if world.instances.contains_key(&key) {
            let message = format!(
                "The resource 'projects/{}/zones/{zone}/instances/{name}' already exists",
                self.project
            );
            return (409, compute_error(409, "alreadyExists", &message));
        }
        let machine_type = body["machineType"].as_str().unwrap_or_default().to_owned();
        if let Some(refusal) = self.refuse_past_limits(&mut world, zone, &machine_type, 1, false) {
            return refusal;
        }
        let instance = match self.make_instance(&mut world, zone, &name, body) {
            Ok(instance) => instance,
            Err(refusal) => return refusal,
        };
        world.add_instance(key, instance);
        let op = self.new_operation(
            &mut world,
            zone,
            "insert",
            &name,
            Effect::Created(name.clone()),
        );
        world.remember(request_id, zone, &op);
        (200, op)
    }

    /// An instance of `body` named `name`, as an insert makes it (PROVISIONING, with
    /// addresses), or the refusal of a body Compute Engine would refuse.
    fn make_instance(
        &self,
        world: &mut World,
        zone: &str,
        name: &str,
        body: Value,
    ) -> Result<Value, (u16, Value)> {
        if body["machineType"].as_str().is_none_or(str::is_empty) {
            return Err((
                400,
                compute_error(
                    400,
                    "invalid",
                    "Invalid value for field 'resource.machineType': ''.",
                ),
            ));
        }
        for (i, nic) in body["networkInterfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(subnetwork) = nic["subnetwork"].as_str() else {
                continue;
            };
            let subnetwork = reference_from(subnetwork, "regions/");
            let Some(belongs_to) = world.subnetworks.get(subnetwork) else {
                let message = format!(
                    "The resource 'projects/{}/{subnetwork}' was not found",
                    self.project
                );
                return Err((404, compute_error(404, "notFound", &message)));
            };
            if let Some(network) = nic["network"].as_str().filter(|n| !n.is_empty())
                && reference_from(network, "global/networks/") != belongs_to
            {
                let message = format!(
                    "Invalid value for field 'resource.networkInterfaces[{i}].subnetwork': '{subnetwork}'. Subnetwork should belong to network '{network}'."
                );
                return Err((400, compute_error(400, "invalid", &message)));
            }
        }
        world.next_id += 1;
        let mut instance = body;
        instance["kind"] = json!("compute#instance");
        instance["id"] = json!(format!("{}", 9_000_000_000u64 + world.next_id));
        instance["zone"] = json!(self.zone_url(zone));
        instance["status"] = json!("PROVISIONING");
        instance["creationTimestamp"] = json!(now());
        instance["selfLink"] = json!(format!("{}/instances/{name}", self.zone_url(zone)));
        let internal = format!("10.132.0.{}", 2 + world.next_id % 250);
        if let Some(nics) = instance["networkInterfaces"].as_array_mut() {
            for nic in nics {
                nic["networkIP"] = json!(internal);
                nic["name"] = json!("nic0");
                if let Some(configs) = nic["accessConfigs"].as_array_mut() {
                    for config in configs {
                        config["natIP"] = json!(format!("34.76.1.{}", 2 + world.next_id % 250));
                    }
                }
            }
        }
        instance["name"] = json!(name);
        Ok(instance)
    }

    /// `instances.bulkInsert` with `perInstanceProperties` (the names) and
    /// `instanceProperties`: all of them in one operation, or, when the operation fails,
    /// none (`minCount` = `count`, the only form the worker sends; others are refused).
    /// A name that exists already fails the whole call with `409 alreadyExists`, as a
    /// single insert of it would: the worker looks its members up before, so it never
    /// relies on which way Compute Engine treats it.
    fn bulk_insert(&self, zone: &str, query: &str, body: Value) -> (u16, Value) {
        let mut world = self.world.lock();
        let request_id = query_param(query, "requestId");
        if let Some(op) = world.replayed(request_id.as_ref()) {
            return (200, op);
        }
        let invalid = |message: &str| (400, compute_error(400, "invalid", message));
        let names: Vec<String> = body["perInstanceProperties"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        // int64 fields travel as strings in Google's JSON.
        let number = |field: &str| match &body[field] {
            Value::String(text) => text.parse::<usize>().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
            _ => None,
        };
        let count = number("count");
        if names.is_empty() || count != Some(names.len()) {
            return invalid(
                "this server takes perInstanceProperties naming every instance, and count equal to their number",
            );
        }
        if number("minCount").is_some_and(|min| min != names.len()) {
            return invalid("this server takes minCount equal to count only");
        }
        let properties = body["instanceProperties"].clone();
        if properties["machineType"]
            .as_str()
            .is_some_and(|t| t.contains('/'))
        {
            // Compute Engine answers INTERNAL_ERROR for a URL here.
            return invalid(
                "Invalid value for field 'resource.instanceProperties.machineType': a bulk insert takes a machine type name, not a URL",
            );
        }
        let machine_type = properties["machineType"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(refusal) =
            self.refuse_past_limits(&mut world, zone, &machine_type, names.len(), true)
        {
            return refusal;
        }
        let mut made = Vec::new();
        for name in &names {
            if world
                .instances
                .contains_key(&(zone.to_owned(), name.clone()))
            {
                let message = format!(
                    "The resource 'projects/{}/zones/{zone}/instances/{name}' already exists",
                    self.project
                );
                return (409, compute_error(409, "alreadyExists", &message));
            }
            let mut one = properties.clone();
            if let Some(machine_type) = one["machineType"].as_str().map(str::to_owned) {
                one["machineType"] = json!(format!("zones/{zone}/machineTypes/{machine_type}"));
            }
            match self.make_instance(&mut world, zone, name, one) {
                Ok(instance) => made.push((name.clone(), instance)),
                Err(refusal) => return refusal,
            }
        }
        for (name, instance) in made {
            world.add_instance((zone.to_owned(), name), instance);
        }
        let op = self.new_operation(
            &mut world,
            zone,
            "bulkInsert",
            &names[0],
            Effect::CreatedAll(names.clone()),
        );
        world.remember(request_id, zone, &op);
        (200, op)
    }

    /// `instances.list` of a zone with a filter; each instance listed counts as a read of
    /// it, as [`get_instance`](Self::get_instance) does.
    fn list_zone(&self, project: &str, zone: &str, query: &str) -> (u16, Value) {
        let filter = query_param(query, "filter").unwrap_or_default();
        let names: Vec<String> = {
            let world = self.world.lock();
            let mut names: Vec<String> = world
                .instances
                .iter()
                .filter(|((z, _), instance)| z == zone && filter_matches(instance, &filter))
                .map(|((_, name), _)| name.clone())
                .collect();
            names.sort();
            names
        };
        let items: Vec<Value> = names
            .iter()
            .filter_map(|name| match self.get_instance(zone, name) {
                (200, instance) => Some(instance),
                _ => None,
            })
            .collect();
        (
            200,
            json!({"kind": "compute#instanceList",
                   "id": format!("projects/{project}/zones/{zone}/instances"), "items": items}),
        )
    }

    fn not_found(&self, zone: &str, name: &str) -> (u16, Value) {
        let message = format!(
            "The resource 'projects/{}/zones/{zone}/instances/{name}' was not found",
            self.project
        );
        (404, compute_error(404, "notFound", &message))
    }

    fn get_instance(&self, zone: &str, name: &str) -> (u16, Value) {
        let mut world = self.world.lock();
        let key = (zone.to_owned(), name.to_owned());
        let reads = world.instance_reads.read(key.clone());
        let ready_after = self.ready_after_reads;
        let Some(instance) = world.instances.get_mut(&key) else {
            return self.not_found(zone, name);
        };
        let status = instance["status"].as_str().unwrap_or_default().to_owned();
        if status == "PROVISIONING" || status == "STAGING" {
            instance["status"] = json!(if reads >= ready_after {
                "RUNNING"
            } else if reads * 2 >= ready_after {
                "STAGING"
            } else {
                "PROVISIONING"
            });
        }
        (200, instance.clone())
    }

    fn instance_operation(&self, zone: &str, name: &str, verb: &str, query: &str) -> (u16, Value) {
        let mut world = self.world.lock();
        let request_id = query_param(query, "requestId");
        if let Some(op) = world.replayed(request_id.as_ref()) {
            return (200, op);
        }
        let key = (zone.to_owned(), name.to_owned());
        let Some(instance) = world.instances.get_mut(&key) else {
            drop(world);
            return self.not_found(zone, name);
        };
        let status = instance["status"].as_str().unwrap_or_default();
        if status == "PROVISIONING" || status == "STAGING" {
            let message = format!(
                "The resource 'projects/{}/zones/{zone}/instances/{name}' is not ready",
                self.project
            );
            return (400, compute_error(400, "resourceNotReady", &message));
        }
        let effect = match verb {
            "delete" => {
                instance["status"] = json!("STOPPING");
                Effect::Deleted(name.to_owned())
            }
            "stop" => {
                instance["status"] = json!("STOPPING");
                Effect::Status(name.to_owned(), "TERMINATED")
            }
            "start" => {
                instance["status"] = json!("STAGING");
                Effect::Status(name.to_owned(), "RUNNING")
            }
            _ => Effect::Status(name.to_owned(), "RUNNING"),
        };
        let op = self.new_operation(&mut world, zone, verb, name, effect);
        world.remember(request_id, zone, &op);
        (200, op)
    }

    fn poll_operation(&self, zone: &str, name: &str) -> (u16, Value) {
        let mut world = self.world.lock();
        let key = (zone.to_owned(), name.to_owned());
        let Some(op) = world.operations.get_mut(&key) else {
            let message = format!(
                "The resource 'projects/{}/zones/{zone}/operations/{name}' was not found",
                self.project
            );
            return (404, compute_error(404, "notFound", &message));
        };
        if op.value["status"] == "DONE" {
            return (200, op.value.clone());
        }
        if op.polls_left > 0 {
            op.polls_left -= 1;
            op.value["progress"] = json!(50);
            return (200, op.value.clone());
        }
        op.value["status"] = json!("DONE");
        op.value["progress"] = json!(100);
        op.value["endTime"] = json!(now());
        let effect = op.effect.clone();
        let failure = op.failure.clone();
        if let Some(failure) = &failure {
            op.value["error"] =
                json!({"errors": [{"code": failure.code, "message": failure.message}]});
            op.value["httpErrorStatusCode"] = json!(failure.http_status);
            op.value["httpErrorMessage"] = json!(match failure.http_status {
                400 => "BAD REQUEST",
                403 => "FORBIDDEN",
                404 => "NOT FOUND",
                409 => "CONFLICT",
                503 => "SERVICE UNAVAILABLE",
                _ => "ERROR",
            });
        }
        let value = op.value.clone();
        match (effect, failure) {
            // A failed insert leaves no instance.
            (Effect::Created(name), Some(_)) => {
                world.instances.remove(&(zone.to_owned(), name));
            }
            (Effect::CreatedAll(names), Some(_)) => {
                for name in names {
                    world.instances.remove(&(zone.to_owned(), name));
                }
            }
            (Effect::Deleted(name), None) => {
                world.instances.remove(&(zone.to_owned(), name));
            }
            (Effect::Status(name, status), None) => {
                if let Some(instance) = world.instances.get_mut(&(zone.to_owned(), name.clone())) {
                    instance["status"] = json!(status);
                }
                world.instance_reads.restart(&(zone.to_owned(), name));
            }
            _ => {}
        }
        (200, value)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        method: &Method,
        project: &str,
        region: &str,
        rest: &[&str],
        query: &str,
        body: Value,
        int_enums: bool,
    ) -> (u16, Value) {
        if project != self.project {
            return (
                403,
                run_error(
                    403,
                    "PERMISSION_DENIED",
                    &format!(
                        "Permission 'run.services.create' denied on resource 'projects/{project}/locations/{region}' (or resource may not exist)."
                    ),
                ),
            );
        }
        let parent = format!("projects/{project}/locations/{region}");
        if let Some(missing) = Self::run_permission(method, rest).and_then(|p| self.lacking(&[p])) {
            let message = format!(
                "Permission '{missing}' denied on resource '{parent}/{}' (or resource may not exist).",
                rest.join("/")
            );
            return (403, run_error(403, "PERMISSION_DENIED", &message));
        }
        // Deploying a service that runs as an account is acting as it.
        if method.as_str() == "POST" && rest == ["services"] {
            let account = body["template"]["serviceAccount"]
                .as_str()
                .filter(|a| !a.is_empty())
                .unwrap_or(DEFAULT_RUNTIME_ACCOUNT)
                .to_owned();
            if !self
                .grants()
                .runtime_account
                .iter()
                .any(|p| p == "iam.serviceAccounts.actAs")
            {
                let message = format!(
                    "Permission 'iam.serviceaccounts.actAs' denied on service account {account} (or it may not exist)."
                );
                return (403, run_error(403, "PERMISSION_DENIED", &message));
            }
        }
        match (method.as_str(), rest) {
            ("POST", ["services"]) => {
                let id = query_param(query, "serviceId").unwrap_or_default();
                self.create_service(&parent, &id, body)
            }
            ("GET", ["services"]) if region == "-" => (
                400,
                run_error(
                    400,
                    "INVALID_ARGUMENT",
                    "Location must be a valid Google Cloud region, and cannot be the \"-\" wildcard.",
                ),
            ),
            ("GET", ["services"]) => {
                let world = self.world.lock();
                let mut services: Vec<Value> = world
                    .services
                    .iter()
                    .filter(|(name, _)| name.starts_with(&format!("{parent}/")))
                    .map(|(_, s)| Self::encode(s.clone(), int_enums))
                    .collect();
                services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                (200, json!({"services": services}))
            }
            ("GET", ["services", id]) => {
                self.get_service(&format!("{parent}/services/{id}"), region, int_enums)
            }
            ("DELETE", ["services", id]) => {
                let name = format!("{parent}/services/{id}");
                let mut world = self.world.lock();
                if !world.services.contains_key(&name) {
                    drop(world);
                    return self.service_not_found(&name, region);
                }
                world.deleting.insert(name.clone(), 1);
                (
                    200,
                    json!({"name": format!("{parent}/operations/{}", uuid_like(&name)),
                    "metadata": {"@type": "type.googleapis.com/google.cloud.run.v2.Service", "name": name}, "done": false}),
                )
            }
            ("GET", ["operations", id]) => (
                200,
                json!({"name": format!("{parent}/operations/{id}"), "done": true}),
            ),
            _ => (
                404,
                run_error(404, "NOT_FOUND", "Requested entity was not found."),
            ),
        }
    }

    fn service_not_found(&self, name: &str, region: &str) -> (u16, Value) {
        let id = name.rsplit('/').next().unwrap_or(name);
        let message = format!(
            "Resource '{id}' of kind 'SERVICE' in region '{region}' in project '{}' does not exist.",
            self.project
        );
        (404, run_error(404, "NOT_FOUND", &message))
    }

    fn create_service(&self, parent: &str, id: &str, body: Value) -> (u16, Value) {
        let valid_id = !id.is_empty()
            && id.len() <= 49
            && id.starts_with(|c: char| c.is_ascii_lowercase())
            && !id.ends_with('-')
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_id {
            return (
                400,
                run_error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!("service_id '{id}' must match RFC 1035, at most 49 characters"),
                ),
            );
        }
        if body["template"]["containers"][0]["image"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            return (
                400,
                run_error(
                    400,
                    "INVALID_ARGUMENT",
                    "spec.template.spec.containers[0].image: Required",
                ),
            );
        }
        // Cloud Run sets these itself and refuses them in a container's env.
        // <https://cloud.google.com/run/docs/container-contract#env-vars>
        let reserved = body["template"]["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|var| var["name"].as_str())
            .find(|name| {
                ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"].contains(name)
                    || name.starts_with("X_GOOGLE_")
            });
        if let Some(reserved) = reserved {
            return (
                400,
                run_error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!(
                        "template.containers[0].env: The following reserved env names were provided: {reserved}. These values are automatically set by the system."
                    ),
                ),
            );
        }
        let name = format!("{parent}/services/{id}");
        let mut world = self.world.lock();
        if world.services.contains_key(&name) {
            return (
                409,
                run_error(
                    409,
                    "ALREADY_EXISTS",
                    &format!("Resource '{id}' already exists."),
                ),
            );
        }
        world.next_id += 1;
        let mut service = body;
        service["name"] = json!(name);
        service["uid"] = json!(uuid_like(&format!("{name}{}", world.next_id)));
        service["generation"] = json!("1");
        service["createTime"] = json!("2026-11-21T20:00:00.000000Z");
        service["reconciling"] = json!(true);
        service["terminalCondition"] = json!({"type": "Ready", "state": "CONDITION_RECONCILING", "lastTransitionTime": "2026-11-21T20:00:00Z"});
        world.services.insert(name.clone(), service.clone());
        world.service_reads.restart(&name);
        world.created += 1;
        drop(world);
        (
            200,
            json!({"name": format!("{parent}/operations/{}", uuid_like(&name)),
                "metadata": {"@type": "type.googleapis.com/google.cloud.run.v2.Service", "name": name},
                "done": false}),
        )
    }

    fn get_service(&self, name: &str, region: &str, int_enums: bool) -> (u16, Value) {
        let mut world = self.world.lock();
        if let Some(left) = world.deleting.get_mut(name) {
            if *left == 0 {
                world.deleting.remove(name);
                world.services.remove(name);
                world.service_reads.restart(name);
                drop(world);
                return self.service_not_found(name, region);
            }
            *left -= 1;
        }
        let reads = world.service_reads.read(name.to_owned());
        let ready_after = self.ready_after_reads;
        let Some(service) = world.services.get_mut(name) else {
            drop(world);
            return self.service_not_found(name, region);
        };
        if service["reconciling"] == json!(true) && reads >= ready_after {
            let image = service["template"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let id = name.rsplit('/').next().unwrap_or(name).to_owned();
            service["reconciling"] = json!(false);
            if image.contains("does-not-exist") {
                service["terminalCondition"] = json!({"type": "Ready", "state": "CONDITION_FAILED",
                    "message": format!("Revision '{id}-00001-xyz' is not ready and cannot serve traffic. Image '{image}' not found."),
                    "lastTransitionTime": "2026-11-21T20:00:05Z"});
            } else {
                let url = format!("https://{id}-abcdefghij-ew.a.run.app");
                service["terminalCondition"] = json!({"type": "Ready", "state": "CONDITION_SUCCEEDED", "lastTransitionTime": "2026-11-21T20:00:05Z"});
                service["uri"] = json!(url);
                service["urls"] = json!([url]);
                service["latestReadyRevision"] = json!(format!("{name}/revisions/{id}-00001-xyz"));
                service["observedGeneration"] = json!("1");
            }
        }
        (200, Self::encode(service.clone(), int_enums))
    }

    /// Google's servers answer enums as numbers when asked for `enum-encoding=int`.
    fn encode(mut service: Value, int_enums: bool) -> Value {
        if int_enums && let Some(state) = service["terminalCondition"]["state"].as_str() {
            let number = match state {
                "CONDITION_PENDING" => 1,
                "CONDITION_RECONCILING" => 2,
                "CONDITION_FAILED" => 3,
                "CONDITION_SUCCEEDED" => 4,
                _ => 0,
            };
            service["terminalCondition"]["state"] = json!(number);
        }
        service
    }
}

/// A UUID-shaped string that is a function of `seed`, for uids and operation names.
fn uuid_like(seed: &str) -> String {
    let mut hash: u128 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        hash = (hash ^ u128::from(b)).wrapping_mul(0x0000_0100_0000_01b3_0000_0000_0000_013b);
    }
    let hex = format!("{hash:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
