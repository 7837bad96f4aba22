//! A Kubernetes API server for tests, since none can be installed on the build machines:
//! the real paths, verbs, status codes, `resourceVersion`s and JSON of Deployments and
//! Services, driven by kube's real client.
//!
//! What it does as the API server does: `201` on create with uid, `resourceVersion` and
//! `generation`; `409 AlreadyExists` on a second create; `404 NotFound` on get and delete
//! of what is not there, as `Status` bodies; label-selector lists across namespaces; a
//! cluster IP (and node port) for every Service. What it does as the controllers would:
//! a Deployment's replicas become available after a few reads (one whose image names
//! `does-not-exist` never does: after those reads it reports `Progressing` False,
//! `ProgressDeadlineExceeded`, and its pods, listed by label, wait in
//! `ImagePullBackOff`), and a LoadBalancer gets its ingress after a few reads. Faults can be queued (e.g. `429` on the next create).
//!
//! As strict as a real API server where our mistakes would hide: labels are validated as
//! apimachinery does (`422 Invalid`), and RBAC decides every call as the API server
//! does: the caller holds exactly the Role docs/kubernetes.md shows (the worker's
//! manifest, `crate::permissions`), bound cluster-wide or, with
//! [`FakeApi::grant_only`], in some namespaces; any other verb, resource or namespace is
//! `403 Forbidden` ([`FakeApi::grant_rules`] changes the Role), and SelfSubjectAccessReview
//! answers by the same rules.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

pub use provisioner_fake_http::Method;
use provisioner_fake_http::{Answer, Call, CallLog, FaultQueue, ReadCounts, Shared};
use serde_json::{Value, json};

/// An answer to give instead of the normal one, to the next matching request.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    /// Matches when the request path contains this.
    pub path_contains: String,
    pub code: u16,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Default)]
struct World {
    /// (kind, namespace, name) → object.
    objects: HashMap<(String, String, String), Value>,
    /// Reads of each Deployment and LoadBalancer Service, which time readiness.
    reads: ReadCounts<(String, String, String)>,
    resource_version: u64,
    faults: FaultQueue<Fault>,
    /// The `propagationPolicy` of every delete, in order.
    deletes: Vec<(String, String)>,
    /// Every call, faulted or not, for [`FakeApi::requests`].
    log: CallLog,
    /// The namespaces the caller's Role is bound in; `None`: bound cluster-wide (a
    /// ClusterRole with the same rules).
    granted: Option<Vec<String>>,
    /// The Role's rights (`<group>/<resource>:<verb>`); `None`: the worker's manifest,
    /// the Role docs/kubernetes.md shows.
    rules: Option<Vec<String>>,
}

impl World {
    /// What RBAC decides for the caller: the Role's rules, where it is bound.
    fn allows(&self, group: &str, resource: &str, verb: &str, namespace: Option<&str>) -> bool {
        let bound = match &self.granted {
            None => true,
            Some(granted) => namespace.is_some_and(|n| granted.iter().any(|g| g == n)),
        };
        let group = if group.is_empty() { "core" } else { group };
        let action = format!("{group}/{resource}:{verb}");
        let granted = match &self.rules {
            Some(rules) => rules.contains(&action),
            None => crate::permissions::PERMISSIONS
                .iter()
                .any(|p| p.action == action),
        };
        bound && granted
    }
}

/// Whether a Deployment's pods cannot pull their image: its first container's image
/// names `does-not-exist`.
fn broken_image(deployment: &Value) -> bool {
    deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .is_some_and(|image| image.contains("does-not-exist"))
}

/// The running server; dropped, it keeps serving until the runtime ends.
#[derive(Debug, Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    world: Shared<World>,
    ready_after_reads: u32,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code
        }),
    )
}

/// A label key and value as apimachinery validates them (`IsQualifiedName`,
/// `IsValidLabelValue`), written from its regular expressions rather than shared with the
/// worker's own check, so a mistake in one is caught by the other.
/// <https://github.com/kubernetes/apimachinery/blob/master/pkg/util/validation/validation.go>
fn label_problem(key: &str, value: &str) -> Option<String> {
    static QUALIFIED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new("^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("regex")
    });
    static SUBDOMAIN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new("^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
            .expect("regex")
    });
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() || prefix.len() > 253 || !SUBDOMAIN.is_match(prefix) {
                return Some(format!(
                    "Invalid value: {key:?}: prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ));
            }
            *name
        }
        _ => {
            return Some(format!(
                "Invalid value: {key:?}: a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, with an optional DNS subdomain prefix and '/'"
            ));
        }
    };
    if name.is_empty() || name.len() > 63 || !QUALIFIED.is_match(name) {
        return Some(format!(
            "Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)"
        ));
    }
    if !value.is_empty() && (value.len() > 63 || !QUALIFIED.is_match(value)) {
        return Some(format!(
            "Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)"
        ));
    }
    None
}

/// The first invalid label of an object (and of a Deployment's pod template).
fn invalid_labels(object: &Value) -> Option<String> {
    let sets = [
        ("metadata.labels", &object["metadata"]["labels"]),
        (
            "spec.template.metadata.labels",
            &object["spec"]["template"]["metadata"]["labels"],
        ),
    ];
    for (field, labels) in sets {
        for (key, value) in labels.as_object().into_iter().flatten() {
            if let Some(problem) = label_problem(key, value.as_str().unwrap_or_default()) {
                return Some(format!("{field}: {problem}"));
            }
        }
    }
    None
}

fn selector_matches(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (key, value) = term.split_once('=').unwrap_or((term, ""));
        object["metadata"]["labels"][key].as_str() == Some(value)
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| {
            value
                .replace("%3D", "=")
                .replace("%2F", "/")
                .replace("%2C", ",")
        })
    })
}

impl FakeApi {
    /// Serves on a free port of 127.0.0.1. A Deployment becomes available on the
    /// `ready_after_reads`-th read.
    pub async fn start(ready_after_reads: u32) -> FakeApi {
        let listener = provisioner_fake_http::bind().await;
        let api = FakeApi {
            addr: listener.local_addr().expect("address"),
            world: Shared::default(),
            ready_after_reads,
        };
        let served = api.clone();
        provisioner_fake_http::spawn(listener, move |call| {
            let (code, answer) = served.answer(call);
            Answer::json(code, answer)
        });
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig naming this server, for processes that load their configuration.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        )
    }

    /// From now on the caller has Roles in `namespaces` only: anything cluster-wide or in
    /// another namespace is `403 Forbidden`, as RBAC answers.
    pub fn grant_only(&self, namespaces: &[&str]) {
        self.world.lock().granted = Some(namespaces.iter().map(|n| (*n).to_owned()).collect());
    }

    /// The pods of the namespace's Deployments that match `labelSelector`, as the
    /// ReplicaSet controller would have made them: one per replica, running, or for a
    /// Deployment whose image cannot be pulled, waiting in `ImagePullBackOff`.
    fn pods(&self, world: &World, namespace: &str, query: &str) -> (u16, Value) {
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let mut items = Vec::new();
        for ((kind, ns, name), deployment) in &world.objects {
            if kind != "deployments" || ns != namespace {
                continue;
            }
            let template = &deployment["spec"]["template"];
            let pod_like = json!({"metadata": {"labels": template["metadata"]["labels"].clone()}});
            if !selector_matches(&pod_like, &selector) {
                continue;
            }
            let container = template["spec"]["containers"][0]["name"]
                .as_str()
                .unwrap_or("main")
                .to_owned();
            let image = template["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            for i in 0..deployment["spec"]["replicas"].as_i64().unwrap_or(1) {
                let state = if broken_image(deployment) {
                    json!({"waiting": {"reason": "ImagePullBackOff",
                        "message": format!("Back-off pulling image \"{image}\"")}})
                } else {
                    json!({"running": {"startedAt": "2026-11-21T12:00:00Z"}})
                };
                items.push(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{name}-5d4f8b-{i:05}"), "namespace": ns,
                                 "labels": template["metadata"]["labels"].clone()},
                    "status": {"phase": if broken_image(deployment) { "Pending" } else { "Running" },
                               "containerStatuses": [{"name": container, "image": image,
                                   "ready": !broken_image(deployment), "restartCount": 0,
                                   "imageID": "", "state": state}]}
                }));
            }
        }
        (
            200,
            json!({"apiVersion": "v1", "kind": "PodList",
                   "metadata": {"resourceVersion": world.resource_version.to_string()},
                   "items": items}),
        )
    }

    /// From now on the caller's Role has these rights (`<group>/<resource>:<verb>`, `core`
    /// for the core group) instead of the documented ones.
    pub fn grant_rules(&self, actions: &[&str]) {
        self.world.lock().rules = Some(actions.iter().map(|a| (*a).to_owned()).collect());
    }

    pub fn inject(&self, fault: Fault) {
        self.world.lock().faults.push(fault);
    }

    /// The stored object, as the server holds it.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.world
            .lock()
            .objects
            .get(&(kind.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Puts an object in place as if someone else had made it.
    pub fn put(&self, kind: &str, object: Value) {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.world
            .lock()
            .objects
            .insert((kind.into(), namespace, name), object);
    }

    pub fn count(&self, kind: &str) -> usize {
        self.world
            .lock()
            .objects
            .keys()
            .filter(|(k, _, _)| k == kind)
            .count()
    }

    /// Every stored object of a kind.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        self.world
            .lock()
            .objects
            .iter()
            .filter(|((k, _, _), _)| k == kind)
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.world.lock().log.count() as u64
    }

    /// `(path, propagationPolicy)` of every delete so far.
    pub fn deletes(&self) -> Vec<(String, String)> {
        self.world.lock().deletes.clone()
    }

    fn answer(&self, call: Call) -> (u16, Value) {
        let mut world = self.world.lock();
        world.log.record(&call);
        if let Some(fault) = world
            .faults
            .take_first(|f| f.method == call.method && call.path.contains(&f.path_contains))
        {
            return status(fault.code, &fault.reason, &fault.message);
        }
        let (method, path, query) = (&call.method, call.path.as_str(), call.query.as_str());
        let body = call.body;
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        if method.as_str() == "POST"
            && parts
                == [
                    "apis",
                    "authorization.k8s.io",
                    "v1",
                    "selfsubjectaccessreviews",
                ]
        {
            // What RBAC would decide for the caller: everything without grants, else only
            // inside the granted namespaces.
            let attributes = &body["spec"]["resourceAttributes"];
            let namespace = attributes["namespace"].as_str().filter(|n| !n.is_empty());
            let allowed = world.allows(
                attributes["group"].as_str().unwrap_or_default(),
                attributes["resource"].as_str().unwrap_or_default(),
                attributes["verb"].as_str().unwrap_or_default(),
                namespace,
            );
            let mut review = body;
            review["kind"] = json!("SelfSubjectAccessReview");
            review["apiVersion"] = json!("authorization.k8s.io/v1");
            review["status"] = if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by RoleBinding \"provisioner-worker\""})
            } else {
                json!({"allowed": false})
            };
            return (201, review);
        }
        // (kind, api version, namespace, name)
        let route = match parts.as_slice() {
            ["apis", "apps", "v1", "namespaces", ns, "deployments"] => {
                Some(("deployments", "apps/v1", Some(*ns), None))
            }
            ["apis", "apps", "v1", "namespaces", ns, "deployments", name] => {
                Some(("deployments", "apps/v1", Some(*ns), Some(*name)))
            }
            ["apis", "apps", "v1", "deployments"] => Some(("deployments", "apps/v1", None, None)),
            ["api", "v1", "namespaces", ns, "services"] => {
                Some(("services", "v1", Some(*ns), None))
            }
            ["api", "v1", "namespaces", ns, "services", name] => {
                Some(("services", "v1", Some(*ns), Some(*name)))
            }
            ["api", "v1", "services"] => Some(("services", "v1", None, None)),
            ["api", "v1", "namespaces", ns, "pods"] => Some(("pods", "v1", Some(*ns), None)),
            _ => None,
        };
        let Some((kind, api_version, namespace, name)) = route else {
            return status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            );
        };
        let object_kind = match kind {
            "deployments" => "Deployment",
            "pods" => "Pod",
            _ => "Service",
        };
        let group = match kind {
            "deployments" => "deployments.apps",
            other => other,
        };
        let verb = match (method.as_str(), name) {
            ("GET", None) if query.contains("watch=true") => "watch",
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            (other, _) => other,
        };
        let rbac_group = if kind == "deployments" { "apps" } else { "" };
        if !world.allows(rbac_group, kind, verb, namespace) {
            let scope = namespace.map_or("at the cluster scope".to_owned(), |n| {
                format!("in the namespace \"{n}\"")
            });
            let api_group = if kind == "deployments" { "apps" } else { "" };
            return status(
                403,
                "Forbidden",
                &format!(
                    "{group} is forbidden: User \"system:serviceaccount:provisioner:worker\" cannot {verb} resource \"{kind}\" in API group \"{api_group}\" {scope}"
                ),
            );
        }
        if kind == "pods" {
            return self.pods(&world, namespace.unwrap_or_default(), query);
        }
        match (method.as_str(), namespace, name) {
            ("POST", Some(ns), None) => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(
                        422,
                        "Invalid",
                        &format!("{object_kind} is invalid: metadata.name: Required value"),
                    );
                };
                if let Some(problem) = invalid_labels(&body) {
                    return status(
                        422,
                        "Invalid",
                        &format!(
                            "{object_kind}{} \"{name}\" is invalid: {problem}",
                            if kind == "deployments" { ".apps" } else { "" }
                        ),
                    );
                }
                let key = (kind.to_owned(), ns.to_owned(), name.clone());
                if world.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{group} \"{name}\" already exists"),
                    );
                }
                world.resource_version += 1;
                let version = world.resource_version;
                let mut object = body;
                object["kind"] = json!(object_kind);
                object["apiVersion"] = json!(api_version);
                object["metadata"]["namespace"] = json!(ns);
                object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{version:012}"));
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                object["metadata"]["generation"] = json!(1);
                object["metadata"]["creationTimestamp"] = json!("2026-11-21T10:00:00Z");
                if kind == "services" {
                    object["spec"]["clusterIP"] =
                        json!(format!("10.96.{}.{}", version / 250, version % 250 + 1));
                    let exposed_on_nodes = object["spec"]["type"] == "NodePort"
                        || object["spec"]["type"] == "LoadBalancer";
                    if exposed_on_nodes && let Some(ports) = object["spec"]["ports"].as_array_mut()
                    {
                        for (i, port) in ports.iter_mut().enumerate() {
                            port["nodePort"] = json!(30000 + (version as usize * 7 + i) % 2767);
                        }
                    }
                    object["status"] = json!({"loadBalancer": {}});
                } else {
                    object["status"] = json!({});
                }
                world.objects.insert(key, object.clone());
                (201, object)
            }
            ("GET", Some(ns), Some(name)) => {
                let key = (kind.to_owned(), ns.to_owned(), name.to_owned());
                let reads = world.reads.read(key.clone());
                let ready = reads >= self.ready_after_reads;
                world.resource_version += 1;
                let version = world.resource_version;
                let Some(object) = world.objects.get_mut(&key) else {
                    return status(404, "NotFound", &format!("{group} \"{name}\" not found"));
                };
                if kind == "deployments" {
                    let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
                    object["status"] = if broken_image(object) {
                        // Its pods never run; once the progress deadline has passed (the
                        // `ready_after_reads`-th read here) the controller says so.
                        let mut conditions = vec![json!({"type": "Available", "status": "False",
                            "reason": "MinimumReplicasUnavailable",
                            "message": "Deployment does not have minimum availability."})];
                        if ready {
                            conditions.push(json!({"type": "Progressing", "status": "False",
                                "reason": "ProgressDeadlineExceeded",
                                "message": format!("ReplicaSet \"{name}-5d4f8b\" has timed out progressing.")}));
                        }
                        json!({"observedGeneration": 1, "replicas": replicas,
                               "unavailableReplicas": replicas, "conditions": conditions})
                    } else if ready {
                        json!({"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                               "readyReplicas": replicas, "availableReplicas": replicas,
                               "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                                               "message": "Deployment has minimum availability."}]})
                    } else {
                        json!({"observedGeneration": 1, "replicas": replicas, "unavailableReplicas": replicas,
                               "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                                               "message": "Deployment does not have minimum availability."}]})
                    };
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                } else if object["spec"]["type"] == "LoadBalancer" && ready {
                    object["status"] =
                        json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                }
                (200, object.clone())
            }
            ("GET", namespace, None) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = world
                    .objects
                    .iter()
                    .filter(|((k, ns, _), object)| {
                        k == kind
                            && namespace.is_none_or(|n| n == ns)
                            && selector_matches(object, &selector)
                    })
                    .map(|(_, object)| object.clone())
                    .collect();
                let list_kind = format!("{object_kind}List");
                (
                    200,
                    json!({"kind": list_kind, "apiVersion": api_version,
                             "metadata": {"resourceVersion": world.resource_version.to_string()}, "items": items}),
                )
            }
            ("DELETE", Some(ns), Some(name)) => {
                let key = (kind.to_owned(), ns.to_owned(), name.to_owned());
                let policy = body["propagationPolicy"]
                    .as_str()
                    .unwrap_or("Background")
                    .to_owned();
                world.deletes.push((path.to_owned(), policy));
                match world.objects.remove(&key) {
                    Some(mut object) => {
                        // The garbage collector's work is done at once: the object is gone
                        // for every later read.
                        object["metadata"]["deletionTimestamp"] = json!("2026-11-21T10:05:00Z");
                        (200, object)
                    }
                    None => status(404, "NotFound", &format!("{group} \"{name}\" not found")),
                }
            }
            _ => status(
                405,
                "MethodNotAllowed",
                &format!("{method} is not supported on {path}"),
            ),
        }
    }
}

/// The labels of a stored object.
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}
