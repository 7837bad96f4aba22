//! An Azure Resource Manager server for tests, since there is no emulator for Compute or
//! Container Instances: the documented ARM resources, status codes, error bodies and
//! long-running operations, driven by the worker's real ARM client.
//!
//! What it does as ARM does: `PUT` answers `201` with an `Azure-AsyncOperation` URL for
//! a new resource and `200` for an existing one (create or update); `GET` answers `404
//! ResourceNotFound` for what is not there, `404 ResourceGroupNotFound` outside the
//! resource group; `DELETE` answers `202` with an operation (VMs), `202` with a
//! `Location` URL (network interfaces), `200` with the body (container groups), `204`
//! when there is nothing; a missing `api-version` is `400 MissingApiVersionParameter`.
//! Operations answer `InProgress` for a few polls, then `Succeeded` (or `Failed` with an
//! ARM error, when one is queued). What it does as the resource providers would: a VM
//! is `Creating` until its operation ends, then running; deleting it deletes the OS disk
//! and the network interfaces whose `deleteOption` is `Delete`; start, deallocate and
//! restart change its power state; a container group pulls its image (failing for
//! images whose reference contains `does-not-exist`) and runs after a few reads, with an
//! IP address and a DNS name. A VM carries the `properties.timeCreated` of its first
//! `PUT`, a container group the `systemData.createdAt`. A location's `vmSizes` lists a
//! few sizes with their cores. A location's Container Instances `StandardCores` quota
//! can be set: a group past it fails its create with `ServiceUnavailable` naming the
//! quota, as ACI does. Faults can be queued: an HTTP
//! error instead of the next matching answer, optionally after the call took effect.
//!
//! Authorization as ARM does it: every call is checked against the caller's role
//! assignments ([`RoleAssignment`]: actions and not-actions at a scope, inherited by
//! what the scope holds), by the action its method and path stand for (`GET` read, `PUT`
//! write, `DELETE` delete, `POST …/x` the `x/action`; a list is its type's read; a VM's
//! `instanceView` its own read; the VM sizes of a location a subscription's read), plus
//! the linked checks ARM makes on what a body references (a network interface's subnet
//! `…/subnets/join/action`, a VM's interface `…/networkInterfaces/join/action`). A call
//! not granted is `403 AuthorizationFailed` naming the action and scope, before it has
//! any effect. By default the caller holds exactly the assignments docs/azure.md
//! documents ([`documented_assignments`]). Polling an operation the caller started is
//! not checked (not modelled).

use std::collections::HashMap;
use std::net::SocketAddr;

pub use provisioner_fake_http::Method;
use provisioner_fake_http::{Answer as HttpAnswer, Call, CallLog, FaultQueue, ReadCounts, Shared};
use serde_json::{Value, json};

pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-0000000000aa";
pub const RESOURCE_GROUP: &str = "apps";
/// When everything the fake makes was made, with the seven fractional digits ARM writes.
/// ARM's answer for a subscription it does not know.
fn subscription_not_found(sub: &str) -> Answer {
    answer(
        404,
        arm_error(
            "SubscriptionNotFound",
            &format!("The subscription '{sub}' could not be found."),
        ),
    )
}

/// The VM sizes every location offers here: name, cores, memory in MB.
const VM_SIZES: [(&str, u32, u32); 6] = [
    ("Standard_B1s", 1, 1024),
    ("Standard_B2s", 2, 4096),
    ("Standard_D2s_v5", 2, 8192),
    ("Standard_D4s_v5", 4, 16_384),
    ("Standard_D8s_v5", 8, 32_768),
    ("Standard_F16s_v2", 16, 32_768),
];
const CREATED_AT: &str = "2026-11-21T12:00:00.1234567+00:00";

/// An HTTP error to answer the next request whose method and path match.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    /// Matches when the request path contains this (case-sensitive).
    pub path_contains: String,
    pub code: u16,
    pub body: Value,
    /// Do the call first and then answer the error: the answer was lost.
    pub after_effect: bool,
    /// A `Retry-After` header, in seconds.
    pub retry_after: Option<u32>,
}

/// An ARM error body.
pub fn arm_error(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// A long-running operation of the given kind that will end `Failed` with this error.
#[derive(Debug, Clone)]
pub struct OperationFailure {
    /// `vm-create`, `vm-delete`, `nic-create`, `aci-create`, ...
    pub kind: String,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone)]
enum Effect {
    VmCreated(String),
    VmPower(String, &'static str),
    VmDeleted(String),
    NicCreated(String),
    AciCreated(String),
    AciState(String, &'static str),
}

#[derive(Debug)]
struct AsyncOperation {
    polls_left: u32,
    status: &'static str,
    effect: Effect,
    failure: Option<OperationFailure>,
}

#[derive(Debug, Default)]
struct World {
    /// Lowercased resource id → resource.
    resources: HashMap<String, Value>,
    /// VM power states, by lowercased id.
    power: HashMap<String, &'static str>,
    /// Reads of container groups since they were made or started.
    reads: ReadCounts<String>,
    operations: HashMap<String, AsyncOperation>,
    /// `Location` polls left, by id, for network interface deletes.
    locations: HashMap<String, (u32, String)>,
    /// The base64 `customData` each VM was sent with.
    custom_data: HashMap<String, String>,
    faults: FaultQueue<Fault>,
    failures: FaultQueue<OperationFailure>,
    created: u32,
    next_id: u64,
    /// Every call, faulted or not.
    log: CallLog,
    /// The caller's role assignments: every call is checked against them.
    assignments: Vec<RoleAssignment>,
    /// Container Instances' `StandardCores` quota per location, where a test set one.
    aci_cores: HashMap<String, f64>,
}

/// The CPU cores a container group's containers request.
fn aci_cores(group: &Value) -> f64 {
    group["properties"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["properties"]["resources"]["requests"]["cpu"].as_f64())
        .sum()
}

/// A role assignment of the caller: what its role grants (`*` wildcards, as role
/// definitions write them) and excludes, at a scope (a resource id prefix:
/// `/subscriptions/<id>`, `/subscriptions/<id>/resourceGroups/<name>`, or a resource's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignment {
    pub scope: String,
    pub actions: Vec<String>,
    pub not_actions: Vec<String>,
}

impl RoleAssignment {
    pub fn new(scope: impl Into<String>, actions: &[&str], not_actions: &[&str]) -> Self {
        let owned = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect();
        Self {
            scope: scope.into(),
            actions: owned(actions),
            not_actions: owned(not_actions),
        }
    }

    /// Whether this assignment grants `action` on the resource `id`: its scope holds the
    /// resource (ARM's inheritance: a subscription's assignment reaches its groups, a
    /// group's its resources), an action matches, no not-action does.
    fn grants(&self, action: &str, id: &str) -> bool {
        let scope = self.scope.trim_end_matches('/').to_ascii_lowercase();
        let id = id.to_ascii_lowercase();
        let within = id == scope || id.starts_with(&format!("{scope}/"));
        within
            && self
                .actions
                .iter()
                .any(|a| crate::arm::action_matches(a, action))
            && !self
                .not_actions
                .iter()
                .any(|a| crate::arm::action_matches(a, action))
    }
}

/// The role assignments docs/azure.md tells an operator to make, for both workers: the
/// worker's role on the resource group (which holds the tests' virtual network too), and
/// the subscription's role on the subscription. What the fake grants unless a test says
/// otherwise, so every test runs the workers under exactly the documented rights.
pub fn documented_assignments() -> Vec<RoleAssignment> {
    use crate::permissions::{group_role_actions, subscription_role_actions};
    vec![
        RoleAssignment::new(group_scope(), &group_role_actions(), &[]),
        RoleAssignment::new(
            format!("/subscriptions/{SUBSCRIPTION}"),
            &subscription_role_actions(),
            &[],
        ),
    ]
}

fn group_scope() -> String {
    format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}")
}

/// ARM's refusal of a call the caller's assignments do not grant
/// (<https://learn.microsoft.com/azure/role-based-access-control/troubleshooting#symptom---authorization-failed>).
fn authorization_failed(action: &str, scope: &str) -> Answer {
    answer(
        403,
        arm_error(
            "AuthorizationFailed",
            &format!(
                "The client '00000000-0000-0000-0000-0000000000cc' with object id '00000000-0000-0000-0000-0000000000cc' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials."
            ),
        ),
    )
}

/// The running server; it serves until the runtime ends.
#[derive(Debug, Clone)]
pub struct FakeArm {
    pub addr: SocketAddr,
    world: Shared<World>,
    ready_after_reads: u32,
}

type Answer = (u16, Value, Vec<(&'static str, String)>);

fn answer(code: u16, body: Value) -> Answer {
    (code, body, Vec::new())
}

fn not_found(kind: &str, name: &str) -> Answer {
    answer(
        404,
        arm_error(
            "ResourceNotFound",
            &format!(
                "The Resource '{kind}/{name}' under resource group '{RESOURCE_GROUP}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
            ),
        ),
    )
}

impl FakeArm {
    /// Serves on a free port of 127.0.0.1. Operations end on their third poll; container
    /// groups run on the `ready_after_reads`-th read.
    pub async fn start(ready_after_reads: u32) -> FakeArm {
        let listener = provisioner_fake_http::bind().await;
        let api = FakeArm {
            addr: listener.local_addr().expect("address"),
            world: Shared::default(),
            ready_after_reads,
        };
        api.world.lock().assignments = documented_assignments();
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

    /// The caller's role on the resource group from now on (its other assignments
    /// stay): what the calls there may do, and what ARM's permissions API reports.
    pub fn set_permissions(&self, actions: &[&str], not_actions: &[&str]) {
        let mut world = self.world.lock();
        let group = group_scope().to_ascii_lowercase();
        world
            .assignments
            .retain(|a| a.scope.to_ascii_lowercase() != group);
        world
            .assignments
            .push(RoleAssignment::new(group_scope(), actions, not_actions));
    }

    /// Container Instances' `StandardCores` quota in `location` from now on: a container
    /// group whose cores would pass it fails its create as ACI fails it, with
    /// `ServiceUnavailable` and the quota named in the message
    /// (<https://learn.microsoft.com/troubleshoot/azure/azure-container-instances/configuration-setup/service-unavailable-container-group-quota-exceeded>).
    pub fn set_aci_cores_quota(&self, location: &str, cores: f64) {
        self.world
            .lock()
            .aci_cores
            .insert(location.to_ascii_lowercase(), cores);
    }

    /// All of the caller's role assignments from now on.
    pub fn set_assignments(&self, assignments: Vec<RoleAssignment>) {
        self.world.lock().assignments = assignments;
    }

    /// Whether the caller's assignments grant `action` on the resource `id`.
    fn allowed(&self, action: &str, id: &str) -> bool {
        self.world
            .lock()
            .assignments
            .iter()
            .any(|a| a.grants(action, id))
    }

    /// The action ARM checks for a call, and the resource it is checked on; `None` for
    /// what needs no right of its own here (polling an operation the caller started).
    /// Linked checks (a NIC's subnet, a VM's NIC) are made where the body is read.
    fn action_of(method: &Method, path: &str) -> Option<(String, String)> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
        let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
        let verb = match method.as_str() {
            "GET" => "read",
            "PUT" => "write",
            "DELETE" => "delete",
            _ => "action",
        };
        match lower.as_slice() {
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.compute",
                "locations",
                _,
                "vmsizes",
            ] => Some((
                "Microsoft.Compute/locations/vmSizes/read".into(),
                format!("/{}", segments.join("/")),
            )),
            ["subscriptions", _, "resourcegroups", _] => Some((
                format!("Microsoft.Resources/subscriptions/resourceGroups/{verb}"),
                format!("/{}", segments.join("/")),
            )),
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.authorization",
                "permissions",
            ] => Some((
                "Microsoft.Authorization/permissions/read".into(),
                format!("/{}", segments[..4].join("/")),
            )),
            // A list of the group's resources of a type.
            ["subscriptions", _, "resourcegroups", _, "providers", _, _] => Some((
                format!("{}/{}/read", segments[5], segments[6]),
                format!("/{}", segments.join("/")),
            )),
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                _,
                _,
                _,
            ] => Some((
                format!("{}/{}/{verb}", segments[5], segments[6]),
                format!("/{}", segments.join("/")),
            )),
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                _,
                _,
                _,
                "instanceview",
            ] => Some((
                format!("{}/{}/instanceView/read", segments[5], segments[6]),
                format!("/{}", segments[..8].join("/")),
            )),
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                _,
                _,
                _,
                action,
            ] if verb == "action" => Some((
                format!("{}/{}/{action}/action", segments[5], segments[6]),
                format!("/{}", segments[..8].join("/")),
            )),
            _ => None,
        }
    }

    pub fn fail_next_operation(&self, failure: OperationFailure) {
        self.world.lock().failures.push(failure);
    }

    /// VMs, network interfaces and container groups made (updates do not count).
    pub fn created(&self) -> u32 {
        self.world.lock().created
    }

    /// The resource at `provider_path` (`Microsoft.Compute/virtualMachines/x`).
    pub fn resource(&self, provider_path: &str) -> Option<Value> {
        self.world
            .lock()
            .resources
            .get(&Self::id(provider_path).to_ascii_lowercase())
            .cloned()
    }

    /// How many resources of a type (`Microsoft.Compute/virtualMachines`) there are.
    pub fn count(&self, provider_type: &str) -> usize {
        let prefix = Self::id(provider_type).to_ascii_lowercase() + "/";
        self.world
            .lock()
            .resources
            .keys()
            .filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .count()
    }

    /// Puts a resource there as someone else made it (no provisioner tags).
    pub fn put_foreign(&self, provider_path: &str, body: Value) {
        let id = Self::id(provider_path);
        let mut body = body;
        body["id"] = json!(id);
        body["name"] = json!(provider_path.rsplit('/').next().unwrap_or_default());
        let key = id.to_ascii_lowercase();
        let mut world = self.world.lock();
        world.power.insert(key.clone(), "running");
        world.resources.insert(key, body);
    }

    /// The base64 `customData` the VM was created with.
    pub fn custom_data(&self, vm_name: &str) -> Option<String> {
        let key =
            Self::id(&format!("Microsoft.Compute/virtualMachines/{vm_name}")).to_ascii_lowercase();
        self.world.lock().custom_data.get(&key).cloned()
    }

    pub fn log(&self) -> Vec<String> {
        self.world.lock().log.lines()
    }

    fn id(provider_path: &str) -> String {
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{provider_path}"
        )
    }

    fn serve(&self, call: Call) -> HttpAnswer {
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
        let (code, value, headers) = match &fault {
            Some(fault) if !fault.after_effect => answer(fault.code, fault.body.clone()),
            _ if !query.contains("api-version=") => answer(
                400,
                arm_error(
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                ),
            ),
            _ => match Self::action_of(&method, &path) {
                Some((action, id)) if !self.allowed(&action, &id) => {
                    authorization_failed(&action, &id)
                }
                _ => self.route(&method, &path, body),
            },
        };
        let (code, value, mut headers) = match &fault {
            Some(fault) if fault.after_effect => (fault.code, fault.body.clone(), Vec::new()),
            _ => (code, value, headers),
        };
        if let Some(seconds) = fault.as_ref().and_then(|f| f.retry_after) {
            headers.push(("retry-after", seconds.to_string()));
        }
        headers.push((
            "x-ms-request-id",
            "00000000-0000-0000-0000-000000000001".to_owned(),
        ));
        HttpAnswer {
            status: code,
            body: value,
            headers,
        }
    }

    fn route(&self, method: &Method, path: &str, body: Value) -> Answer {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            [
                "subscriptions",
                sub,
                "providers",
                _provider,
                "locations",
                _,
                "operations",
                id,
            ] => {
                if *sub != SUBSCRIPTION {
                    return subscription_not_found(sub);
                }
                self.poll_operation(id)
            }
            [
                "subscriptions",
                sub,
                "resourceGroups",
                group,
                "providers",
                rest @ ..,
            ] => {
                if *sub != SUBSCRIPTION {
                    return subscription_not_found(sub);
                }
                if !group.eq_ignore_ascii_case(RESOURCE_GROUP) {
                    return answer(
                        404,
                        arm_error(
                            "ResourceGroupNotFound",
                            &format!("Resource group '{group}' could not be found."),
                        ),
                    );
                }
                let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                self.provider(method, &rest, body)
            }
            ["nic-delete", id] => self.poll_location(id),
            [
                "subscriptions",
                sub,
                "providers",
                provider,
                "locations",
                location,
                sizes,
            ] if provider.eq_ignore_ascii_case("Microsoft.Compute")
                && sizes.eq_ignore_ascii_case("vmSizes") =>
            {
                if *sub != SUBSCRIPTION {
                    return subscription_not_found(sub);
                }
                let value: Vec<Value> = VM_SIZES
                    .iter()
                    .map(|(name, cores, memory)| {
                        json!({"name": name, "numberOfCores": cores, "memoryInMB": memory,
                               "maxDataDiskCount": 4, "osDiskSizeInMB": 1_047_552,
                               "resourceDiskSizeInMB": 4096, "location": location})
                    })
                    .collect();
                answer(200, json!({"value": value}))
            }
            ["subscriptions", sub, group_segment, group]
                if group_segment.eq_ignore_ascii_case("resourceGroups") =>
            {
                if *sub != SUBSCRIPTION || !group.eq_ignore_ascii_case(RESOURCE_GROUP) {
                    return answer(
                        404,
                        arm_error(
                            "ResourceGroupNotFound",
                            &format!("Resource group '{group}' could not be found."),
                        ),
                    );
                }
                answer(
                    200,
                    json!({"id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"),
                           "name": RESOURCE_GROUP, "location": "westeurope",
                           "properties": {"provisioningState": "Succeeded"}}),
                )
            }
            _ => answer(404, arm_error("NotFound", &format!("no route {path}"))),
        }
    }

    fn provider(&self, method: &Method, rest: &[&str], body: Value) -> Answer {
        let lower: Vec<String> = rest.iter().map(|s| s.to_ascii_lowercase()).collect();
        let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
        match (method.as_str(), lower.as_slice()) {
            ("GET", ["microsoft.authorization", "permissions"]) => {
                // One entry per assignment that reaches the group (at it or above it).
                let group = group_scope().to_ascii_lowercase();
                let value: Vec<Value> = self
                    .world
                    .lock()
                    .assignments
                    .iter()
                    .filter(|a| {
                        let scope = a.scope.trim_end_matches('/').to_ascii_lowercase();
                        group == scope || group.starts_with(&format!("{scope}/"))
                    })
                    .map(|a| {
                        json!({"actions": a.actions, "notActions": a.not_actions,
                               "dataActions": [], "notDataActions": []})
                    })
                    .collect();
                answer(200, json!({"value": value}))
            }
            ("GET", ["microsoft.compute", "virtualmachines"]) => {
                self.list("Microsoft.Compute/virtualMachines")
            }
            ("GET", ["microsoft.containerinstance", "containergroups"]) => {
                self.list("Microsoft.ContainerInstance/containerGroups")
            }
            ("PUT", ["microsoft.compute", "virtualmachines", _]) => self.put_vm(rest[2], body),
            ("GET", ["microsoft.compute", "virtualmachines", _]) => {
                self.get(&format!("Microsoft.Compute/virtualMachines/{}", rest[2]))
            }
            ("GET", ["microsoft.compute", "virtualmachines", _, "instanceview"]) => {
                self.instance_view(rest[2])
            }
            ("DELETE", ["microsoft.compute", "virtualmachines", _]) => self.delete_vm(rest[2]),
            ("POST", ["microsoft.compute", "virtualmachines", _, action]) => {
                self.vm_action(rest[2], action)
            }
            ("PUT", ["microsoft.network", "networkinterfaces", _]) => self.put_nic(rest[2], body),
            ("GET", ["microsoft.network", "networkinterfaces", _]) => {
                self.get(&format!("Microsoft.Network/networkInterfaces/{}", rest[2]))
            }
            ("DELETE", ["microsoft.network", "networkinterfaces", _]) => self.delete_nic(rest[2]),
            ("PUT", ["microsoft.containerinstance", "containergroups", _]) => {
                self.put_aci(rest[2], body)
            }
            ("GET", ["microsoft.containerinstance", "containergroups", _]) => self.get_aci(rest[2]),
            ("DELETE", ["microsoft.containerinstance", "containergroups", _]) => {
                self.delete_aci(rest[2])
            }
            ("POST", ["microsoft.containerinstance", "containergroups", _, action]) => {
                self.aci_action(rest[2], action)
            }
            _ => answer(
                400,
                arm_error(
                    "InvalidResourceType",
                    &format!("The resource type '{}' could not be found.", rest.join("/")),
                ),
            ),
        }
    }

    fn list(&self, provider_type: &str) -> Answer {
        let prefix = Self::id(provider_type).to_ascii_lowercase() + "/";
        let world = self.world.lock();
        let mut value: Vec<Value> = world
            .resources
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .map(|(_, v)| v.clone())
            .collect();
        value.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        answer(200, json!({"value": value}))
    }

    fn get(&self, provider_path: &str) -> Answer {
        let key = Self::id(provider_path).to_ascii_lowercase();
        match self.world.lock().resources.get(&key) {
            Some(resource) => answer(200, resource.clone()),
            None => {
                let (kind, name) = provider_path
                    .rsplit_once('/')
                    .unwrap_or((provider_path, ""));
                not_found(kind, name)
            }
        }
    }

    /// Starts an operation; its URL goes in `Azure-AsyncOperation`.
    fn operation(
        &self,
        world: &mut World,
        kind: &str,
        provider: &str,
        effect: Effect,
    ) -> (&'static str, String) {
        world.next_id += 1;
        let id = format!("op-{:08x}", world.next_id);
        let failure = world.failures.take_first(|f| f.kind == kind);
        world.operations.insert(
            id.clone(),
            AsyncOperation {
                polls_left: 2,
                status: "InProgress",
                effect,
                failure,
            },
        );
        (
            "azure-asyncoperation",
            format!(
                "{}/subscriptions/{SUBSCRIPTION}/providers/{provider}/locations/westeurope/operations/{id}?api-version=2024-07-01",
                self.url()
            ),
        )
    }

    fn poll_operation(&self, id: &str) -> Answer {
        let mut world = self.world.lock();
        let Some(op) = world.operations.get_mut(id) else {
            return answer(404, arm_error("NotFound", &format!("operation {id}")));
        };
        let headers = vec![("retry-after", "0".to_owned())];
        if op.status != "InProgress" {
            let body = match &op.failure {
                Some(f) => {
                    json!({"name": id, "status": op.status, "error": {"code": f.code, "message": f.message}})
                }
                None => json!({"name": id, "status": op.status}),
            };
            return (200, body, headers);
        }
        if op.polls_left > 0 {
            op.polls_left -= 1;
            return (
                200,
                json!({"name": id, "status": "InProgress", "startTime": "2026-11-21T12:00:00Z"}),
                headers,
            );
        }
        let effect = op.effect.clone();
        let failure = op.failure.clone();
        op.status = if failure.is_some() {
            "Failed"
        } else {
            "Succeeded"
        };
        let status = op.status;
        match (effect, &failure) {
            (Effect::VmCreated(key), None) => {
                if let Some(vm) = world.resources.get_mut(&key) {
                    vm["properties"]["provisioningState"] = json!("Succeeded");
                }
                world.power.insert(key, "running");
            }
            (Effect::VmCreated(key), Some(_)) => {
                if let Some(vm) = world.resources.get_mut(&key) {
                    vm["properties"]["provisioningState"] = json!("Failed");
                }
            }
            (Effect::VmPower(key, state), None) => {
                world.power.insert(key, state);
            }
            (Effect::VmDeleted(key), None) => {
                if let Some(vm) = world.resources.remove(&key) {
                    for nic in vm["properties"]["networkProfile"]["networkInterfaces"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        if nic["properties"]["deleteOption"] == "Delete"
                            && let Some(id) = nic["id"].as_str()
                        {
                            world.resources.remove(&id.to_ascii_lowercase());
                        }
                    }
                }
                world.power.remove(&key);
            }
            (Effect::NicCreated(key), _) => {
                if let Some(nic) = world.resources.get_mut(&key) {
                    nic["properties"]["provisioningState"] = json!(if failure.is_some() {
                        "Failed"
                    } else {
                        "Succeeded"
                    });
                }
            }
            (Effect::AciCreated(key), None) => {
                if let Some(group) = world.resources.get_mut(&key) {
                    group["properties"]["provisioningState"] = json!("Succeeded");
                }
                world.reads.restart(&key);
            }
            (Effect::AciCreated(key), Some(_)) => {
                if let Some(group) = world.resources.get_mut(&key) {
                    group["properties"]["provisioningState"] = json!("Failed");
                }
            }
            (Effect::AciState(key, state), None) => {
                if let Some(group) = world.resources.get_mut(&key) {
                    group["properties"]["instanceView"]["state"] = json!(state);
                }
                world.reads.restart(&key);
            }
            _ => {}
        }
        let body = match &failure {
            Some(f) => {
                json!({"name": id, "status": status, "error": {"code": f.code, "message": f.message}})
            }
            None => json!({"name": id, "status": status, "endTime": "2026-11-21T12:00:05Z"}),
        };
        (200, body, headers)
    }

    fn put_nic(&self, name: &str, body: Value) -> Answer {
        let subnet =
            body["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"].as_str();
        if subnet.is_none_or(|s| !s.contains("/subnets/")) {
            return answer(
                400,
                arm_error(
                    "InvalidRequestFormat",
                    "Cannot parse the request: ipConfigurations[0].properties.subnet.id is missing.",
                ),
            );
        }
        // A linked check: placing an interface in a subnet is the subnet's right.
        let subnet = subnet.unwrap_or_default();
        let join = "Microsoft.Network/virtualNetworks/subnets/join/action";
        if !self.allowed(join, subnet) {
            return authorization_failed(join, subnet);
        }
        let id = Self::id(&format!("Microsoft.Network/networkInterfaces/{name}"));
        let key = id.to_ascii_lowercase();
        let mut world = self.world.lock();
        let existed = world.resources.contains_key(&key);
        world.next_id += 1;
        let mut nic = body;
        nic["id"] = json!(id);
        nic["name"] = json!(name);
        nic["type"] = json!("Microsoft.Network/networkInterfaces");
        nic["properties"]["provisioningState"] = json!("Updating");
        nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"] =
            json!(format!("10.1.0.{}", 4 + world.next_id % 250));
        world.resources.insert(key.clone(), nic.clone());
        if !existed {
            world.created += 1;
        }
        let header = self.operation(
            &mut world,
            "nic-create",
            "Microsoft.Network",
            Effect::NicCreated(key),
        );
        (if existed { 200 } else { 201 }, nic, vec![header])
    }

    fn delete_nic(&self, name: &str) -> Answer {
        let key =
            Self::id(&format!("Microsoft.Network/networkInterfaces/{name}")).to_ascii_lowercase();
        let mut world = self.world.lock();
        if !world.resources.contains_key(&key) {
            return answer(204, Value::Null);
        }
        world.next_id += 1;
        let id = format!("loc-{:08x}", world.next_id);
        world.locations.insert(id.clone(), (1, key));
        (
            202,
            Value::Null,
            vec![(
                "location",
                format!("{}/nic-delete/{id}?api-version=2024-05-01", self.url()),
            )],
        )
    }

    fn poll_location(&self, id: &str) -> Answer {
        let mut world = self.world.lock();
        let Some((left, key)) = world.locations.get_mut(id) else {
            return answer(404, arm_error("NotFound", "no such operation"));
        };
        if *left > 0 {
            *left -= 1;
            return (202, Value::Null, vec![("retry-after", "0".to_owned())]);
        }
        let key = key.clone();
        world.resources.remove(&key);
        answer(200, Value::Null)
    }

    fn put_vm(&self, name: &str, body: Value) -> Answer {
        let props = &body["properties"];
        if props["hardwareProfile"]["vmSize"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            return answer(
                400,
                arm_error(
                    "InvalidParameter",
                    "Required parameter 'hardwareProfile.vmSize' is missing (null).",
                ),
            );
        }
        let key =
            props["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"].as_str();
        // Linux VMs take RSA (2048 bits or more) and Ed25519 keys only.
        // <https://learn.microsoft.com/azure/virtual-machines/linux/mac-create-ssh-keys#supported-ssh-key-formats>
        if key.is_some_and(|k| !(k.starts_with("ssh-rsa ") || k.starts_with("ssh-ed25519 "))) {
            return answer(
                400,
                arm_error(
                    "InvalidParameter",
                    "The value of parameter linuxConfiguration.ssh.publicKeys.keyData is invalid.",
                ),
            );
        }
        if key.is_none() {
            return answer(
                400,
                arm_error(
                    "InvalidParameter",
                    "Required parameter 'osProfile' is missing (null).",
                ),
            );
        }
        let nic_id = props["networkProfile"]["networkInterfaces"][0]["id"]
            .as_str()
            .unwrap_or("");
        // A linked check: attaching an interface is the interface's right.
        let join = "Microsoft.Network/networkInterfaces/join/action";
        if !nic_id.is_empty() && !self.allowed(join, nic_id) {
            return authorization_failed(join, nic_id);
        }
        let mut world = self.world.lock();
        if !world.resources.contains_key(&nic_id.to_ascii_lowercase()) {
            return answer(
                400,
                arm_error(
                    "InvalidResourceReference",
                    &format!(
                        "Resource {nic_id} referenced by resource {name} was not found. Please make sure that the referenced resource exists, and that both resources are in the same region."
                    ),
                ),
            );
        }
        let id = Self::id(&format!("Microsoft.Compute/virtualMachines/{name}"));
        let key = id.to_ascii_lowercase();
        let existed = world.resources.contains_key(&key);
        // Compute says when a VM was made, and an update does not change it.
        // <https://learn.microsoft.com/rest/api/compute/virtual-machines/get> (`timeCreated`)
        let time_created = world
            .resources
            .get(&key)
            .and_then(|old| old["properties"]["timeCreated"].as_str())
            .unwrap_or(CREATED_AT)
            .to_owned();
        world.next_id += 1;
        let mut vm = body;
        vm["properties"]["timeCreated"] = json!(time_created);
        vm["id"] = json!(id);
        vm["name"] = json!(name);
        vm["type"] = json!("Microsoft.Compute/virtualMachines");
        vm["properties"]["vmId"] = json!(format!("4f0c6f1e-0000-4000-8000-{:012x}", world.next_id));
        vm["properties"]["provisioningState"] =
            json!(if existed { "Updating" } else { "Creating" });
        // ARM never answers with custom data; the test can read what was sent.
        if let Some(data) = vm["properties"]["osProfile"]
            .as_object_mut()
            .and_then(|os| os.remove("customData"))
            .and_then(|d| d.as_str().map(str::to_owned))
        {
            world.custom_data.insert(key.clone(), data);
        }
        world.resources.insert(key.clone(), vm.clone());
        if !existed {
            world.created += 1;
            world.power.insert(key.clone(), "starting");
        }
        let header = self.operation(
            &mut world,
            "vm-create",
            "Microsoft.Compute",
            Effect::VmCreated(key),
        );
        (if existed { 200 } else { 201 }, vm, vec![header])
    }

    fn instance_view(&self, name: &str) -> Answer {
        let key =
            Self::id(&format!("Microsoft.Compute/virtualMachines/{name}")).to_ascii_lowercase();
        let world = self.world.lock();
        let Some(vm) = world.resources.get(&key) else {
            return not_found("Microsoft.Compute/virtualMachines", name);
        };
        let provisioning = vm["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("Creating")
            .to_ascii_lowercase();
        let power = world.power.get(&key).copied().unwrap_or("starting");
        answer(
            200,
            json!({"computerName": name, "osName": "ubuntu", "statuses": [
                {"code": format!("ProvisioningState/{provisioning}"), "level": "Info"},
                {"code": format!("PowerState/{power}"), "level": "Info"}
            ]}),
        )
    }

    fn delete_vm(&self, name: &str) -> Answer {
        let key =
            Self::id(&format!("Microsoft.Compute/virtualMachines/{name}")).to_ascii_lowercase();
        let mut world = self.world.lock();
        let Some(vm) = world.resources.get_mut(&key) else {
            return answer(204, Value::Null);
        };
        vm["properties"]["provisioningState"] = json!("Deleting");
        let header = self.operation(
            &mut world,
            "vm-delete",
            "Microsoft.Compute",
            Effect::VmDeleted(key),
        );
        (202, Value::Null, vec![header])
    }

    fn vm_action(&self, name: &str, action: &str) -> Answer {
        let key =
            Self::id(&format!("Microsoft.Compute/virtualMachines/{name}")).to_ascii_lowercase();
        let mut world = self.world.lock();
        if !world.resources.contains_key(&key) {
            return not_found("Microsoft.Compute/virtualMachines", name);
        }
        let (now, then) = match action {
            "start" => ("starting", "running"),
            "deallocate" => ("deallocating", "deallocated"),
            "poweroff" => ("stopping", "stopped"),
            "restart" => ("starting", "running"),
            _ => {
                return answer(
                    400,
                    arm_error("InvalidResourceType", &format!("unknown action {action}")),
                );
            }
        };
        world.power.insert(key.clone(), now);
        let header = self.operation(
            &mut world,
            &format!("vm-{action}"),
            "Microsoft.Compute",
            Effect::VmPower(key, then),
        );
        (202, Value::Null, vec![header])
    }

    fn put_aci(&self, name: &str, body: Value) -> Answer {
        // Container group names: 1–63 lowercase letters, digits and hyphens, not starting
        // or ending with a hyphen, and no two hyphens in a row.
        // <https://learn.microsoft.com/azure/azure-resource-manager/management/resource-name-rules#microsoftcontainerinstance>
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--");
        if !valid_name {
            return answer(
                400,
                arm_error(
                    "InvalidResourceName",
                    &format!(
                        "The container group name '{name}' is invalid. It can contain only lowercase letters, numbers and hyphens; it cannot start or end with a hyphen, and consecutive hyphens are not allowed."
                    ),
                ),
            );
        }
        let container = &body["properties"]["containers"][0]["properties"];
        if container["image"].as_str().is_none_or(str::is_empty) {
            return answer(
                400,
                arm_error(
                    "InvalidContainerGroupSpec",
                    "The container group must have at least one container with an image.",
                ),
            );
        }
        let id = Self::id(&format!(
            "Microsoft.ContainerInstance/containerGroups/{name}"
        ));
        let key = id.to_ascii_lowercase();
        let mut world = self.world.lock();
        let existed = world.resources.contains_key(&key);
        // ARM keeps when every resource was made, through its updates.
        // <https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/common-api-contracts.md#system-metadata-for-all-azure-resources>
        let created_at = world
            .resources
            .get(&key)
            .and_then(|old| old["systemData"]["createdAt"].as_str())
            .unwrap_or(CREATED_AT)
            .to_owned();
        world.next_id += 1;
        let mut group = body;
        group["systemData"] = json!({"createdByType": "Application", "createdAt": created_at,
            "lastModifiedByType": "Application", "lastModifiedAt": CREATED_AT});
        group["id"] = json!(id);
        group["name"] = json!(name);
        group["type"] = json!("Microsoft.ContainerInstance/containerGroups");
        group["properties"]["provisioningState"] =
            json!(if existed { "Updating" } else { "Pending" });
        if group["properties"]["ipAddress"].is_object() {
            group["properties"]["ipAddress"]["ip"] =
                json!(format!("20.50.1.{}", 4 + world.next_id % 250));
            if let Some(label) = group["properties"]["ipAddress"]["dnsNameLabel"]
                .as_str()
                .map(str::to_owned)
            {
                let location = group["location"]
                    .as_str()
                    .unwrap_or("westeurope")
                    .to_owned();
                group["properties"]["ipAddress"]["fqdn"] =
                    json!(format!("{label}.{location}.azurecontainer.io"));
            }
        }
        let location = group["location"]
            .as_str()
            .unwrap_or("westeurope")
            .to_ascii_lowercase();
        if !existed && let Some(limit) = world.aci_cores.get(&location).copied() {
            let used: f64 = world
                .resources
                .values()
                .filter(|r| {
                    r["type"] == "Microsoft.ContainerInstance/containerGroups"
                        && r["location"]
                            .as_str()
                            .map(str::to_ascii_lowercase)
                            .as_deref()
                            == Some(location.as_str())
                })
                .map(aci_cores)
                .sum();
            let requested = aci_cores(&group);
            if used + requested > limit {
                world.failures.push(OperationFailure {
                    kind: "aci-create".into(),
                    code: "ServiceUnavailable".into(),
                    message: format!(
                        "Resource type 'Microsoft.ContainerInstance/containerGroups' container group quota 'StandardCores' exceeded in region '{location}'. Limit: '{limit}', Usage: '{used}' Requested: '{requested}'."
                    ),
                });
            }
        }
        world.resources.insert(key.clone(), group.clone());
        if !existed {
            world.created += 1;
            world.reads.restart(&key);
        }
        let header = self.operation(
            &mut world,
            "aci-create",
            "Microsoft.ContainerInstance",
            Effect::AciCreated(key),
        );
        (if existed { 200 } else { 201 }, group, vec![header])
    }

    fn get_aci(&self, name: &str) -> Answer {
        let key = Self::id(&format!(
            "Microsoft.ContainerInstance/containerGroups/{name}"
        ))
        .to_ascii_lowercase();
        let ready_after = self.ready_after_reads;
        let mut world = self.world.lock();
        let reads = world.reads.read(key.clone());
        let Some(group) = world.resources.get_mut(&key) else {
            return not_found("Microsoft.ContainerInstance/containerGroups", name);
        };
        let provisioning = group["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let state = group["properties"]["instanceView"]["state"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if provisioning == "Succeeded"
            && !["Stopped", "Running", "Succeeded"].contains(&state.as_str())
        {
            let image = group["properties"]["containers"][0]["properties"]["image"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if image.contains("does-not-exist") {
                group["properties"]["provisioningState"] = json!("Failed");
                group["properties"]["containers"][0]["properties"]["instanceView"] = json!({"events": [
                    {"count": 3, "type": "Warning", "name": "Failed", "message": format!("Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to resolve reference")}
                ]});
            } else if reads >= ready_after {
                // A group that does not restart has run its container to the end by now.
                let end = match group["properties"]["restartPolicy"].as_str() {
                    Some("Never" | "OnFailure") => "Succeeded",
                    _ => "Running",
                };
                group["properties"]["instanceView"] = json!({"state": end, "events": []});
            } else {
                group["properties"]["instanceView"] = json!({"state": "Pending", "events": []});
            }
        }
        answer(200, group.clone())
    }

    fn delete_aci(&self, name: &str) -> Answer {
        let key = Self::id(&format!(
            "Microsoft.ContainerInstance/containerGroups/{name}"
        ))
        .to_ascii_lowercase();
        match self.world.lock().resources.remove(&key) {
            Some(group) => answer(200, group),
            None => answer(204, Value::Null),
        }
    }

    fn aci_action(&self, name: &str, action: &str) -> Answer {
        let key = Self::id(&format!(
            "Microsoft.ContainerInstance/containerGroups/{name}"
        ))
        .to_ascii_lowercase();
        let mut world = self.world.lock();
        let Some(group) = world.resources.get_mut(&key) else {
            return not_found("Microsoft.ContainerInstance/containerGroups", name);
        };
        match action {
            // Stop is synchronous.
            "stop" => {
                group["properties"]["instanceView"]["state"] = json!("Stopped");
                answer(204, Value::Null)
            }
            "start" | "restart" => {
                group["properties"]["instanceView"]["state"] = json!("Pending");
                let header = self.operation(
                    &mut world,
                    &format!("aci-{action}"),
                    "Microsoft.ContainerInstance",
                    Effect::AciState(key, "Running"),
                );
                (202, Value::Null, vec![header])
            }
            _ => answer(
                400,
                arm_error("InvalidResourceType", &format!("unknown action {action}")),
            ),
        }
    }
}
