//! The Kubernetes platform through kube's real client against the fake API server
//! (`provisioner_kubernetes::fake_api`): real paths, verbs, codes and JSON, readiness
//! that changes over time. Test names end in `_on_fake_api`.

use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, RequestId, State, TeardownTarget, decode_request};
use provisioner_kubernetes::fake_api::Method;
use provisioner_kubernetes::fake_api::{FakeApi, Fault};
use provisioner_kubernetes::{KubernetesPlatform, NamespaceScope, REQUEST_ANNOTATION, object_name};

async fn platform(api: &FakeApi) -> KubernetesPlatform {
    let url: http::Uri = api.url().parse().expect("url");
    let mut config = kube::Config::new(url);
    config.default_namespace = "apps".into();
    KubernetesPlatform::new(kube::Client::try_from(config).expect("client"))
        .with_namespaces(NamespaceScope::Listed(vec!["apps".into(), "team-a".into()]))
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn request(id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "kubernetes",
        "spec": spec
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

fn web(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({"image": "nginx:1.27", "replicas": 2, "port": 80});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    spec
}

#[tokio::test]
async fn kubernetes_platform_conforms_on_fake_api() {
    let api = FakeApi::start(3).await;
    let platform = platform(&api).await;
    let request = request(&unique("conf"), web(serde_json::json!({})));
    let probe = api.clone();
    check_platform(&platform, &request, move |resource| {
        let probe = probe.clone();
        async move {
            let (namespace, name) = resource.id.split_once('/').expect("ns/name");
            probe.object("deployments", namespace, name).is_some()
                && probe.object("services", namespace, name).is_some()
        }
    })
    .await;
    // Every delete asked the garbage collector to remove the pods first.
    assert!(!api.deletes().is_empty());
    assert!(
        api.deletes()
            .iter()
            .all(|(_, policy)| policy == "Foreground"),
        "{:?}",
        api.deletes()
    );
}

#[tokio::test]
async fn provision_waits_for_available_replicas_and_reports_the_service_on_fake_api() {
    let api = FakeApi::start(4).await;
    let platform = platform(&api).await;
    let id = unique("web");
    let resource = platform
        .provision(&request(
            &id,
            web(serde_json::json!({"service_type": "NodePort", "namespace": "team-a",
                                   "env": {"GREETING": "hi"}, "resources": {"cpu": "250m", "memory": "256Mi"},
                                   "labels": {"team": "web"}})),
        ))
        .await
        .expect("provision");
    let name = object_name(&id);
    assert_eq!(resource.id, format!("team-a/{name}"));
    let address = resource.address.clone().expect("the cluster IP");
    assert!(address.starts_with("10.96."), "{address}");
    assert_eq!(resource.endpoints.len(), 1);
    assert_eq!(resource.endpoints[0].port, 80);
    assert!(
        resource.endpoints[0].host_port >= 30000,
        "the node port: {resource:?}"
    );

    let deployment = api
        .object("deployments", "team-a", &name)
        .expect("deployment");
    assert_eq!(
        deployment["status"]["availableReplicas"], 2,
        "it waited for them"
    );
    assert_eq!(
        deployment["metadata"]["annotations"][REQUEST_ANNOTATION],
        id.as_str()
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "nginx:1.27");
    assert_eq!(container["env"][0]["name"], "GREETING");
    assert_eq!(container["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(deployment["metadata"]["labels"]["team"], "web");
    let service = api.object("services", "team-a", &name).expect("service");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // A retry after a crash adopts what is there (409 → same annotation): nothing new.
    let again = platform
        .provision(&request(
            &id,
            web(serde_json::json!({"service_type": "NodePort", "namespace": "team-a",
                                   "env": {"GREETING": "hi"}, "resources": {"cpu": "250m", "memory": "256Mi"},
                                   "labels": {"team": "web"}})),
        ))
        .await
        .expect("provision again");
    assert_eq!(again.id, resource.id);
    assert_eq!(api.count("deployments"), 1);
    let described = platform
        .describe(&TeardownTarget::Request(
            request(&id, web(serde_json::json!({}))).request_id,
        ))
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Running);
    assert_eq!(described.resource.id, resource.id);
}

#[tokio::test]
async fn a_load_balancer_is_running_only_with_its_ingress_on_fake_api() {
    let api = FakeApi::start(3).await;
    let platform = platform(&api).await;
    let resource = platform
        .provision(&request(
            &unique("lb"),
            web(serde_json::json!({"service_type": "LoadBalancer"})),
        ))
        .await
        .expect("provision");
    assert_eq!(resource.address.as_deref(), Some("203.0.113.10"));
}

#[tokio::test]
async fn objects_of_another_request_under_the_name_are_a_conflict_on_fake_api() {
    let api = FakeApi::start(1).await;
    let platform = platform(&api).await;
    let id = unique("taken");
    api.put(
        "deployments",
        serde_json::json!({
            "kind": "Deployment", "apiVersion": "apps/v1",
            "metadata": {"name": object_name(&id), "namespace": "apps",
                         "annotations": {REQUEST_ANNOTATION: "someone-else"}},
            "spec": {"replicas": 1}
        }),
    );
    let error = platform
        .provision(&request(&id, web(serde_json::json!({}))))
        .await
        .expect_err("taken");
    assert_eq!(error.class, ErrorClass::Conflict, "{error}");
    assert!(!error.retryable);
}

#[tokio::test]
async fn throttling_is_retried_and_refusals_are_classified_on_fake_api() {
    let api = FakeApi::start(1).await;
    let platform = platform(&api).await;
    // kube's client retries 429 and 503 itself with backoff, as client-go does.
    for (code, reason) in [(429, "TooManyRequests"), (503, "ServiceUnavailable")] {
        api.inject(Fault {
            method: Method::POST,
            path_contains: "/deployments".into(),
            code,
            reason: reason.into(),
            message: "Too many requests, please try again later.".into(),
        });
    }
    platform
        .provision(&request(&unique("throttled"), web(serde_json::json!({}))))
        .await
        .expect("throttling was waited out");
    assert_eq!(api.count("deployments"), 1);

    let cases = [
        (
            500,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out",
            ErrorClass::Transient,
            true,
        ),
        (
            403,
            "Forbidden",
            "deployments.apps \"x\" is forbidden: exceeded quota: compute, requested: pods=1",
            ErrorClass::Quota,
            false,
        ),
        (
            403,
            "Forbidden",
            "deployments.apps is forbidden: User \"ci\" cannot create resource",
            ErrorClass::Permission,
            false,
        ),
        (
            422,
            "Invalid",
            "Deployment.apps \"x\" is invalid: spec.template.spec.containers[0].image: Required value",
            ErrorClass::InvalidRequest,
            false,
        ),
    ];
    for (code, reason, message, class, retryable) in cases {
        api.inject(Fault {
            method: Method::POST,
            path_contains: "/deployments".into(),
            code,
            reason: reason.into(),
            message: message.into(),
        });
        let error = platform
            .provision(&request(&unique("fault"), web(serde_json::json!({}))))
            .await
            .expect_err("fault answered");
        assert_eq!(
            (error.class, error.retryable),
            (class, retryable),
            "{code}: {error}"
        );
        assert!(error.message.contains(message), "{error}");
    }
}

#[tokio::test]
async fn teardown_by_resource_id_refuses_what_the_provisioner_did_not_make_on_fake_api() {
    let api = FakeApi::start(1).await;
    let platform = platform(&api).await;
    api.put(
        "deployments",
        serde_json::json!({
            "kind": "Deployment", "apiVersion": "apps/v1",
            "metadata": {"name": "hand-made", "namespace": "apps", "labels": {"app": "x"}},
            "spec": {"replicas": 1}
        }),
    );
    let refused = platform
        .teardown(&TeardownTarget::Resource("apps/hand-made".into()))
        .await
        .expect_err("not ours");
    assert_eq!(refused.class, ErrorClass::Conflict, "{refused}");
    assert!(api.object("deployments", "apps", "hand-made").is_some());
    let malformed = platform
        .teardown(&TeardownTarget::Resource("hand-made".into()))
        .await
        .expect_err("no namespace");
    assert_eq!(malformed.class, ErrorClass::InvalidRequest);
}

#[tokio::test]
async fn request_labels_become_kubernetes_labels_where_kubernetes_accepts_them_on_fake_api() {
    let api = FakeApi::start(1).await;
    let platform = platform(&api).await;
    let id = unique("labels");
    let request = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": id, "operation": "provision",
            "platform": "kubernetes", "spec": {"image": "nginx:1.27"},
            "labels": {"team": "web", "note": "has spaces", "example.com/tier": "front"}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("request");
    platform.provision(&request).await.expect("provision");
    let deployment = api
        .object("deployments", "apps", &object_name(&id))
        .expect("deployment");
    let labels = provisioner_kubernetes::fake_api::labels_of(&deployment);
    assert_eq!(labels.get("team").map(String::as_str), Some("web"));
    assert_eq!(
        labels.get("example.com/tier").map(String::as_str),
        Some("front")
    );
    assert!(
        !labels.contains_key("note"),
        "a value Kubernetes refuses is left out"
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("provisioner")
    );
}

#[tokio::test]
async fn lookups_by_request_id_need_only_roles_in_the_served_namespaces_on_fake_api() {
    let api = FakeApi::start(2).await;
    // The README's Role, in the two namespaces the worker serves, and nothing cluster-wide.
    api.grant_only(&["apps", "team-a"]);
    let platform = platform(&api).await;
    let id = unique("scoped");
    let resource = platform
        .provision(&request(
            &id,
            web(serde_json::json!({"namespace": "team-a"})),
        ))
        .await
        .expect("provision in team-a");
    assert!(resource.id.starts_with("team-a/"), "{resource:?}");
    let target = TeardownTarget::Request(RequestId::new(id.clone()).expect("id"));
    let described = platform
        .describe(&target)
        .await
        .expect("describe by request id")
        .expect("found");
    assert_eq!(described.state, State::Running);
    platform
        .teardown(&target)
        .await
        .expect("teardown by request id");
    assert_eq!(api.count("deployments"), 0);
    // Every namespace is a choice that needs a ClusterRole: without one, the lookup is
    // refused as permission, which is what the namespaced scope avoids.
    let everywhere = platform.clone().with_namespaces(NamespaceScope::All);
    let refused = everywhere.describe(&target).await.expect_err("403");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
}

#[tokio::test]
async fn a_namespace_the_worker_does_not_serve_is_refused_before_anything_is_sent_on_fake_api() {
    let api = FakeApi::start(2).await;
    let platform = platform(&api).await;
    let refused = platform
        .validate(&request(
            &unique("elsewhere"),
            web(serde_json::json!({"namespace": "team-b"})),
        ))
        .expect_err("team-b is not served");
    assert_eq!(refused.class, ErrorClass::InvalidRequest);
    assert!(
        refused.message.contains("KUBERNETES_NAMESPACES"),
        "{refused}"
    );
    assert_eq!(api.requests(), 0);
}

#[tokio::test]
async fn labels_the_api_server_would_refuse_are_refused_before_anything_is_sent_on_fake_api() {
    let api = FakeApi::start(2).await;
    let platform = platform(&api).await;
    for labels in [
        serde_json::json!({"Example.com/team": "data"}),
        serde_json::json!({"ex_ample.com/team": "data"}),
        serde_json::json!({"/team": "data"}),
        serde_json::json!({"team": "data_"}),
    ] {
        let refused = platform
            .provision(&request(
                &unique("labels"),
                web(serde_json::json!({"labels": labels})),
            ))
            .await
            .expect_err("refused");
        assert_eq!(
            refused.class,
            ErrorClass::InvalidRequest,
            "{labels}: {refused}"
        );
    }
    assert_eq!(
        api.requests(),
        0,
        "each was refused before reaching the API"
    );
}

#[tokio::test]
async fn the_reconciler_sees_every_deployment_the_provisioner_made_with_its_request_on_fake_api() {
    let api = FakeApi::start(1).await;
    let platform = platform(&api).await;
    let id = unique("owned");
    let made = platform
        .provision(&request(&id, web(serde_json::json!({}))))
        .await
        .expect("provision");
    // A Deployment without our marks is someone else's: not listed, so never touched.
    api.put(
        "deployments",
        serde_json::json!({
            "kind": "Deployment", "apiVersion": "apps/v1",
            "metadata": {"name": "theirs", "namespace": "apps"},
            "spec": {"replicas": 1}
        }),
    );
    let owned = platform.owned().await.expect("owned");
    assert_eq!(owned.len(), 1, "{owned:#?}");
    assert_eq!(owned[0].request_id.as_str(), id);
    assert_eq!(owned[0].resource.id, made.id);
    assert!(owned[0].created.is_some(), "its creationTimestamp");
}

#[tokio::test]
async fn vcpus_quotas_count_the_pods_cpu_requests_on_fake_api() {
    let api = FakeApi::start(3).await;
    let platform = platform(&api).await;
    let vcpus = |cost: provisioner_core::QuotaCost| cost.get(provisioner_core::VCPUS).copied();
    for (extra, cpus) in [
        (
            serde_json::json!({"replicas": 3, "resources": {"cpu": "250m"}}),
            1,
        ),
        (
            serde_json::json!({"replicas": 3, "resources": {"cpu": "1"}}),
            3,
        ),
        (
            serde_json::json!({"replicas": 4, "resources": {"cpu": "1.5"}}),
            6,
        ),
        (serde_json::json!({"replicas": 2}), 2),
    ] {
        let cost = platform
            .quota_cost(&request(&unique("q"), web(extra.clone())))
            .await
            .expect("cost");
        assert_eq!(vcpus(cost), Some(cpus), "{extra}");
    }
}

/// Under exactly the documented Role (the fake's default, which every other test here
/// runs under too) the setup checks pass; a right the Role lacks is refused by RBAC at
/// the call that needs it (`403 Forbidden`, classed `permission`), named by the setup
/// check, and a provision whose second object is refused leaves nothing behind once the
/// runtime's removal (a teardown) has run.
#[tokio::test]
async fn a_right_the_role_lacks_is_refused_and_named_on_fake_api() {
    use provisioner_core::Outcome;
    use provisioner_kubernetes::permissions::PERMISSIONS;
    let api = FakeApi::start(1).await;
    api.grant_only(&["apps", "team-a"]);
    let platform = platform(&api).await;
    for finding in platform.preflight().await {
        assert_ne!(finding.outcome, Outcome::Fail, "{finding:?}");
    }
    let without = |action: &str| -> Vec<&str> {
        PERMISSIONS
            .iter()
            .map(|p| p.action)
            .filter(|a| *a != action)
            .collect()
    };
    api.grant_rules(&without("core/services:create"));
    let findings = platform.preflight().await;
    assert!(
        findings.iter().any(|f| f.outcome == Outcome::Fail
            && f.check == "services in apps"
            && f.detail.contains("create")),
        "{findings:?}"
    );
    let id = unique("nosvc");
    let refused = platform
        .provision(&request(&id, web(serde_json::json!({}))))
        .await
        .expect_err("the Service is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    let target = TeardownTarget::Request(RequestId::new(id).expect("id"));
    platform.teardown(&target).await.expect("removed");
    assert_eq!(api.count("deployments") + api.count("services"), 0);
}

/// A Deployment that stops progressing (its pods cannot pull their image) ends the
/// provision at once, with the pods' reason, instead of after the ready timeout; and the
/// objects it made are removed by the teardown the runtime then sends.
#[tokio::test]
async fn a_deployment_past_its_progress_deadline_ends_at_once_with_the_pods_reason_on_fake_api() {
    let api = FakeApi::start(2).await;
    let platform = platform(&api).await;
    let id = unique("stuck");
    let mut spec = web(serde_json::json!({}));
    spec["image"] = serde_json::json!("registry.example/does-not-exist:1");
    spec["ready_timeout_seconds"] = serde_json::json!(300);
    let started = std::time::Instant::now();
    let refused = platform
        .provision(&request(&id, spec))
        .await
        .expect_err("the Deployment cannot progress");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "ended at the controller's word, not the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(refused.class, ErrorClass::InvalidRequest, "{refused}");
    assert!(
        refused.message.contains("ProgressDeadlineExceeded")
            || refused.message.contains("timed out progressing"),
        "{refused}"
    );
    assert!(
        refused.message.contains("ImagePullBackOff"),
        "the pod's reason: {refused}"
    );
    let target = TeardownTarget::Request(RequestId::new(id).expect("id"));
    platform.teardown(&target).await.expect("removed");
    assert_eq!(api.count("deployments") + api.count("services"), 0);
}
