//! The GCP platforms through the real google-cloud-compute-v1 and google-cloud-run-v2
//! clients against the fake GCP server (`provisioner_gcp::fake_api`): documented paths,
//! verbs, codes, error bodies and operations that finish after a few polls. Test names
//! end in `_on_fake_gcp`.

use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, State, TeardownTarget, decode_request};
use provisioner_gcp::cloud_run::service_id;
use provisioner_gcp::compute::instance_name;
use provisioner_gcp::fake_api::Method;
use provisioner_gcp::fake_api::{FakeGcp, Fault, OperationFailure, compute_error, run_error};
use provisioner_gcp::{CloudRunPlatform, ComputePlatform, GcpSettings};

const PROJECT: &str = "demo-project";
const ZONE: &str = "europe-west1-b";

async fn compute(api: &FakeGcp) -> ComputePlatform {
    ComputePlatform::new(GcpSettings::for_test_server(&api.url(), PROJECT))
        .await
        .expect("client")
}

async fn cloud_run(api: &FakeGcp) -> CloudRunPlatform {
    CloudRunPlatform::new(GcpSettings::for_test_server(&api.url(), PROJECT))
        .await
        .expect("client")
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn request(platform: &str, id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": platform,
        "spec": spec, "labels": {"team": "batch", "owner": "Ops Team"}
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

fn vm(id: &str) -> Request {
    request(
        "gcp-compute",
        id,
        serde_json::json!({
            "machine_type": "e2-small",
            "image": "projects/debian-cloud/global/images/family/debian-12",
            "public_ip": true, "disk_size_gb": 20, "network_tags": ["http-server"],
            "labels": {"app": "web"}, "metadata": {"role": "web"},
            "startup_script": "#!/bin/sh\necho ready"
        }),
    )
}

fn hello(id: &str, image: &str) -> Request {
    request(
        "gcp-cloud-run",
        id,
        serde_json::json!({"image": image, "port": 8080, "env": {"GREETING": "hi"},
                           "memory": "512Mi", "cpu": "1", "max_instances": 3}),
    )
}

#[tokio::test]
async fn compute_platform_conforms_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let platform = compute(&api).await;
    let probe = api.clone();
    check_platform(&platform, &vm(&unique("conf")), move |resource| {
        let probe = probe.clone();
        async move {
            let (zone, name) = resource.id.split_once('/').expect("zone/name");
            probe.instance(zone, name).is_some()
        }
    })
    .await;
    assert_eq!(api.created(), 1, "one instance for two provisions");
}

#[tokio::test]
async fn provision_sends_the_spec_and_waits_for_running_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 4).await;
    let platform = compute(&api).await;
    let id = unique("web");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    let name = instance_name(&id);
    assert_eq!(resource.id, format!("{ZONE}/{name}"));
    assert!(
        resource
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("34.76.1.")),
        "the external address: {resource:?}"
    );
    let instance = api.instance(ZONE, &name).expect("made");
    assert_eq!(instance["status"], "RUNNING");
    assert_eq!(
        instance["machineType"],
        format!("zones/{ZONE}/machineTypes/e2-small")
    );
    assert_eq!(instance["disks"][0]["initializeParams"]["diskSizeGb"], "20");
    assert_eq!(instance["disks"][0]["boot"], true);
    assert_eq!(
        instance["networkInterfaces"][0]["network"],
        "global/networks/default"
    );
    assert_eq!(
        instance["networkInterfaces"][0]["accessConfigs"][0]["type"],
        "ONE_TO_ONE_NAT"
    );
    assert_eq!(instance["tags"]["items"][0], "http-server");
    assert_eq!(instance["labels"]["app"], "web");
    assert_eq!(
        instance["labels"]["team"], "batch",
        "request labels GCP accepts"
    );
    assert_eq!(instance["labels"]["provisioner-managed"], "true");
    assert_eq!(instance["labels"].as_object().map(|l| l.len()), Some(3));
    let items = instance["metadata"]["items"].as_array().expect("items");
    let item = |key: &str| {
        items
            .iter()
            .find(|i| i["key"] == key)
            .map(|i| i["value"].clone())
    };
    assert_eq!(item("startup-script"), Some("#!/bin/sh\necho ready".into()));
    assert_eq!(item("provisioner-request-id"), Some(id.clone().into()));
    assert_eq!(item("role"), Some("web".into()));
    // The insert carried a requestId, and the worker polled the zone operation.
    let log = api.log();
    assert!(
        log.iter().any(|l| l
            .starts_with("POST /compute/v1/projects/demo-project/zones/europe-west1-b/instances?")
            && l.contains("requestId=")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .filter(|l| l.contains("/operations/operation-insert"))
            .count()
            >= 2,
        "{log:?}"
    );
}

#[tokio::test]
async fn a_lost_insert_answer_is_replayed_with_the_same_request_id_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 2).await;
    let platform = compute(&api).await;
    let id = unique("lost");
    // The insert takes effect, then its answer is lost as a 503; the client resends it
    // with the same requestId and gets the first operation back.
    api.inject(Fault {
        method: Method::POST,
        path_contains: "/instances".into(),
        code: 503,
        body: compute_error(503, "backendError", "Backend Error"),
        after_effect: true,
    });
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    assert_eq!(api.created(), 1, "one instance despite the resend");
    let inserts: Vec<String> = api
        .log()
        .into_iter()
        .filter(|l| l.starts_with("POST") && l.contains("/instances?"))
        .collect();
    assert_eq!(inserts.len(), 2, "{inserts:?}");
    assert_eq!(inserts[0], inserts[1], "the same requestId both times");
    // A second provision (another worker's takeover) replays it again.
    let again = platform.provision(&vm(&id)).await.expect("again");
    assert_eq!(again.id, resource.id);
    assert_eq!(api.created(), 1);
}

#[tokio::test]
async fn an_existing_instance_is_adopted_or_refused_by_its_request_id_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    let id = unique("adopt");
    platform.provision(&vm(&id)).await.expect("first");
    // Past Compute Engine's replay window the same requestId is new again, and the
    // insert meets the instance: 409, which the worker resolves by the request id the
    // instance carries.
    api.forget_request_ids();
    let resource = platform.provision(&vm(&id)).await.expect("adopted");
    assert_eq!(api.created(), 1);
    assert!(
        api.log().iter().any(|l| l.contains(&format!(
            "GET /compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/{}",
            instance_name(&id)
        ))),
        "the worker read the existing instance"
    );
    assert_eq!(resource.id, format!("{ZONE}/{}", instance_name(&id)));

    api.put_foreign_instance(ZONE, &instance_name("taken"));
    let err = platform
        .provision(&vm("taken"))
        .await
        .expect_err("a name taken by someone else");
    assert_eq!(err.class, ErrorClass::Conflict, "{err}");
    assert!(err.message.contains("left alone"), "{err}");
    let err = platform
        .teardown(&TeardownTarget::Resource(format!(
            "{ZONE}/{}",
            instance_name("taken")
        )))
        .await
        .expect_err("not ours");
    assert_eq!(err.class, ErrorClass::Conflict);
    assert!(api.instance(ZONE, &instance_name("taken")).is_some());
}

#[tokio::test]
async fn operation_errors_are_classified_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    api.fail_next_operation(OperationFailure {
        operation_type: "insert".into(),
        code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
        message: format!("The zone 'projects/{PROJECT}/zones/{ZONE}' does not have enough resources available to fulfill the request.  Try a different zone, or try again later."),
        http_status: 503,
    });
    let id = unique("stockout");
    let err = platform.provision(&vm(&id)).await.expect_err("stockout");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Capacity, true),
        "{err}"
    );
    assert!(
        err.message.contains("does not have enough resources"),
        "{err}"
    );
    assert_eq!(api.instance_count(), 0, "a failed insert leaves nothing");
    // The runtime retries the capacity error: the derived requestId now names a failed
    // operation, so the worker sends the insert anew under a key of its own.
    let resource = platform
        .provision(&vm(&id))
        .await
        .expect("the retry makes it");
    assert_eq!(api.instance_count(), 1);
    assert!(resource.address.is_some());
    let keys: std::collections::HashSet<String> = api
        .log()
        .into_iter()
        .filter(|l| l.starts_with("POST") && l.contains("/instances?"))
        .collect();
    assert_eq!(keys.len(), 2, "two distinct requestIds: {keys:?}");

    api.fail_next_operation(OperationFailure {
        operation_type: "insert".into(),
        code: "QUOTA_EXCEEDED".into(),
        message: "Quota 'CPUS' exceeded.  Limit: 8.0 in region europe-west1.".into(),
        http_status: 403,
    });
    let err = platform
        .provision(&vm(&unique("quota")))
        .await
        .expect_err("quota");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Quota, false),
        "{err}"
    );
}

#[tokio::test]
async fn api_errors_are_classified_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    let cases = [
        (
            429,
            compute_error(429, "rateLimitExceeded", "Rate Limit Exceeded"),
            ErrorClass::Throttled,
            true,
        ),
        (
            403,
            compute_error(
                403,
                "forbidden",
                "Required 'compute.instances.create' permission for 'projects/demo-project/zones/europe-west1-b/instances/x'",
            ),
            ErrorClass::Permission,
            false,
        ),
        (
            403,
            compute_error(
                403,
                "quotaExceeded",
                "Quota 'INSTANCES' exceeded.  Limit: 24.0 in region europe-west1.",
            ),
            ErrorClass::Quota,
            false,
        ),
        (
            400,
            compute_error(
                400,
                "invalid",
                "Invalid value for field 'resource.machineType': 'zones/europe-west1-b/machineTypes/e2-huge'. Machine type with name 'e2-huge' does not exist in zone 'europe-west1-b'.",
            ),
            ErrorClass::InvalidRequest,
            false,
        ),
        (
            500,
            compute_error(500, "backendError", "Internal Error"),
            ErrorClass::Transient,
            true,
        ),
    ];
    for (code, body, class, retryable) in cases {
        api.inject(Fault {
            method: Method::POST,
            path_contains: "/instances".into(),
            code,
            body,
            after_effect: false,
        });
        let err = platform
            .provision(&vm(&unique("err")))
            .await
            .expect_err("a fault");
        assert_eq!(
            (err.class, err.retryable),
            (class, retryable),
            "{code}: {err}"
        );
    }
    // 503 on a read is retried by the client itself (reads are idempotent).
    let id = unique("flaky");
    api.inject(Fault {
        method: Method::GET,
        path_contains: "/instances/".into(),
        code: 503,
        body: compute_error(503, "backendError", "Backend Error"),
        after_effect: false,
    });
    platform
        .provision(&vm(&id))
        .await
        .expect("a 503 on a read is retried");
    assert_eq!(api.instance_count(), 1);
    // A spec without a zone on a worker without GCP_ZONE is refused before any call.
    let mut settings = GcpSettings::for_test_server(&api.url(), PROJECT);
    settings.zone = None;
    let zoneless = ComputePlatform::new(settings).await.expect("client");
    let err = zoneless.validate(&vm("no-zone")).expect_err("no zone");
    assert!(err.message.contains("GCP_ZONE"), "{err}");
    // A project the credentials cannot reach.
    let elsewhere = ComputePlatform::new(GcpSettings::for_test_server(&api.url(), "not-mine"))
        .await
        .expect("client");
    let err = elsewhere
        .provision(&vm(&unique("p")))
        .await
        .expect_err("403");
    assert_eq!(err.class, ErrorClass::Permission, "{err}");
}

#[tokio::test]
async fn a_teardown_while_the_instance_is_still_being_made_is_retried_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1000).await;
    let platform = compute(&api).await;
    let id = unique("slow");
    let mut slow = vm(&id);
    slow.spec
        .as_mut()
        .expect("spec")
        .insert("ready_timeout_seconds".into(), serde_json::json!(1));
    let err = platform
        .provision(&slow)
        .await
        .expect_err("not running in time");
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    // Compute Engine refuses to delete an instance it is still making; that passes.
    let err = platform
        .teardown(&TeardownTarget::Request(
            provisioner_events::RequestId::new(id.clone()).expect("id"),
        ))
        .await
        .expect_err("not ready");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Transient, true),
        "{err}"
    );
    assert!(err.message.contains("not ready"), "{err}");
}

#[tokio::test]
async fn stop_start_reboot_and_describe_follow_the_instance_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 2).await;
    let platform = compute(&api).await;
    let id = unique("power");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    let target =
        TeardownTarget::Request(provisioner_events::RequestId::new(id.clone()).expect("id"));
    let stopped = platform.stop(&target).await.expect("stopped");
    assert_eq!(stopped.id, resource.id);
    let described = platform
        .describe(&target)
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Stopped);
    // Stop twice is fine; a provision replay of a stopped instance says what to do.
    platform.stop(&target).await.expect("stopped again");
    platform.start(&target).await.expect("started");
    platform.start(&target).await.expect("started twice");
    platform.reboot(&target).await.expect("reset");
    let described = platform
        .describe(&target)
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Running);
    assert_eq!(platform.list().await.expect("list").len(), 1);
    platform.teardown(&target).await.expect("gone");
    let err = platform.start(&target).await.expect_err("nothing to start");
    assert_eq!(err.class, ErrorClass::NotFound);
    assert!(platform.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn owned_finds_the_provisioners_instances_with_their_request_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    let id = unique("owned");
    let resource = platform.provision(&vm(&id)).await.expect("provisioned");
    api.put_foreign_instance(ZONE, &instance_name("someone-else"));
    let owned = platform.owned().await.expect("owned");
    assert_eq!(owned.len(), 1, "only the provisioner's instance: {owned:?}");
    assert_eq!(owned[0].request_id.as_str(), id);
    assert_eq!(owned[0].resource.id, resource.id);
    assert!(owned[0].created.is_some(), "{owned:?}");
}

#[tokio::test]
async fn cloud_run_platform_conforms_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let platform = cloud_run(&api).await;
    let probe = api.clone();
    check_platform(
        &platform,
        &hello(
            &unique("conf"),
            "us-docker.pkg.dev/cloudrun/container/hello",
        ),
        move |resource| {
            let probe = probe.clone();
            async move {
                let (region, id) = resource.id.split_once('/').expect("region/id");
                probe.service(region, id).is_some()
            }
        },
    )
    .await;
    assert_eq!(api.created(), 1, "one service for two provisions");
}

#[tokio::test]
async fn a_service_is_running_when_ready_with_its_url_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 4).await;
    let platform = cloud_run(&api).await;
    let id = unique("hello");
    let resource = platform
        .provision(&hello(&id, "us-docker.pkg.dev/cloudrun/container/hello"))
        .await
        .expect("ready");
    let sid = service_id(&id);
    assert_eq!(resource.id, format!("europe-west1/{sid}"));
    let url = format!("https://{sid}-abcdefghij-ew.a.run.app");
    assert_eq!(resource.address.as_deref(), Some(url.as_str()));
    assert_eq!(resource.endpoints[0].host_port, 443);
    assert_eq!(resource.endpoints[0].port, 8080);
    let service = api.service("europe-west1", &sid).expect("made");
    let container = &service["template"]["containers"][0];
    assert_eq!(
        container["image"],
        "us-docker.pkg.dev/cloudrun/container/hello"
    );
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(container["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(container["env"][0]["name"], "GREETING");
    assert_eq!(service["template"]["scaling"]["maxInstanceCount"], 3);
    assert_eq!(
        service["annotations"]["provisioner-request-id"],
        id.as_str()
    );
    assert_eq!(service["labels"]["provisioner-managed"], "true");
    // The worker polled the service until its Ready condition succeeded.
    let reads = api
        .log()
        .iter()
        .filter(|l| {
            l.starts_with(&format!(
                "GET /v2/projects/{PROJECT}/locations/europe-west1/services/{sid}"
            ))
        })
        .count();
    assert!(reads >= 4, "{reads} reads");
    // A replay gets 409 and adopts the service.
    let again = platform
        .provision(&hello(&id, "us-docker.pkg.dev/cloudrun/container/hello"))
        .await
        .expect("adopted");
    assert_eq!(again, resource);
    assert_eq!(api.created(), 1);
}

#[tokio::test]
async fn cloud_run_failures_are_classified_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 2).await;
    let platform = cloud_run(&api).await;
    let err = platform
        .provision(&hello(&unique("bad"), "gcr.io/demo/does-not-exist:1"))
        .await
        .expect_err("no such image");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::InvalidRequest, false),
        "{err}"
    );
    assert!(err.message.contains("not found"), "{err}");
    let described = platform.list().await.expect("list");
    assert_eq!(
        described.len(),
        1,
        "the failed service is still listed for teardown"
    );

    api.inject(Fault {
        method: Method::POST,
        path_contains: "/services".into(),
        code: 429,
        body: run_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Write requests' and limit 'Write requests per minute per region'"),
        after_effect: false,
    });
    let err = platform
        .provision(&hello(&unique("busy"), "gcr.io/demo/app:1"))
        .await
        .expect_err("throttled");
    assert_eq!(
        (err.class, err.retryable),
        (ErrorClass::Throttled, true),
        "{err}"
    );

    api.put_foreign_service("europe-west1", &service_id("taken"));
    let err = platform
        .provision(&hello("taken", "gcr.io/demo/app:1"))
        .await
        .expect_err("a service id taken by someone else");
    assert_eq!(err.class, ErrorClass::Conflict, "{err}");
    let foreign = TeardownTarget::Resource(format!("europe-west1/{}", service_id("taken")));
    let err = platform.teardown(&foreign).await.expect_err("not ours");
    assert_eq!(err.class, ErrorClass::Conflict, "{err}");
    assert!(api.service("europe-west1", &service_id("taken")).is_some());
    let gone = TeardownTarget::Resource(format!("europe-west1/{}", service_id("never")));
    assert!(
        platform
            .teardown(&gone)
            .await
            .expect("gone is success")
            .is_none()
    );
}

#[tokio::test]
async fn a_service_in_another_region_is_found_for_teardown_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let mut settings = GcpSettings::for_test_server(&api.url(), PROJECT);
    settings.other_regions = vec!["asia-east1".into()];
    let platform = CloudRunPlatform::new(settings).await.expect("client");
    // A region the worker does not serve is refused before anything is made: Cloud Run
    // cannot list across regions, so the worker could not find it again.
    let mut elsewhere = hello(&unique("us"), "gcr.io/demo/app:1");
    elsewhere
        .spec
        .as_mut()
        .expect("spec")
        .insert("region".into(), serde_json::json!("us-central1"));
    let err = platform.validate(&elsewhere).expect_err("not served");
    assert!(err.message.contains("GCP_REGIONS"), "{err}");
    let id = unique("asia");
    let mut req = hello(&id, "gcr.io/demo/app:1");
    req.spec
        .as_mut()
        .expect("spec")
        .insert("region".into(), serde_json::json!("asia-east1"));
    let resource = platform.provision(&req).await.expect("ready");
    assert!(resource.id.starts_with("asia-east1/"));
    let target =
        TeardownTarget::Request(provisioner_events::RequestId::new(id.clone()).expect("id"));
    let described = platform
        .describe(&target)
        .await
        .expect("describe")
        .expect("found");
    assert_eq!(described.state, State::Running);
    let removed = platform.teardown(&target).await.expect("teardown");
    assert_eq!(removed.map(|r| r.id), Some(resource.id));
    assert_eq!(api.service_count(), 0);
    assert!(platform.teardown(&target).await.expect("again").is_none());
    let err = platform
        .stop(&target)
        .await
        .expect_err("Cloud Run scales by itself");
    assert_eq!(err.class, ErrorClass::Unsupported);
}

#[tokio::test]
async fn owned_finds_the_provisioners_services_with_their_request_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = cloud_run(&api).await;
    let id = unique("owned");
    let resource = platform
        .provision(&hello(&id, "us-docker.pkg.dev/cloudrun/container/hello"))
        .await
        .expect("ready");
    api.put_foreign_service("europe-west1", &service_id("someone-else"));
    let owned = platform.owned().await.expect("owned");
    assert_eq!(owned.len(), 1, "only the provisioner's service: {owned:?}");
    assert_eq!(owned[0].request_id.as_str(), id);
    assert_eq!(owned[0].resource.id, resource.id);
    assert!(owned[0].created.is_some(), "{owned:?}");
}

#[tokio::test]
async fn a_subnetwork_of_another_vpc_is_used_without_forcing_the_default_network_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 2).await;
    api.add_subnetwork("europe-west1", "apps", "apps-vpc");
    let platform = compute(&api).await;
    let id = unique("subnet");
    let request = request(
        "gcp-compute",
        &id,
        serde_json::json!({
            "machine_type": "e2-small",
            "image": "projects/debian-cloud/global/images/family/debian-12",
            "subnetwork": "regions/europe-west1/subnetworks/apps"
        }),
    );
    platform
        .provision(&request)
        .await
        .expect("provisioned in the subnetwork");
    let instance = api.instance(ZONE, &instance_name(&id)).expect("made");
    assert_eq!(
        instance["networkInterfaces"][0]["subnetwork"],
        "regions/europe-west1/subnetworks/apps"
    );
}

#[tokio::test]
async fn reserved_cloud_run_variables_are_refused_before_anything_is_sent_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 2).await;
    let platform = cloud_run(&api).await;
    for reserved in ["PORT", "K_SERVICE"] {
        let refused = platform
            .provision(&request(
                "gcp-cloud-run",
                &unique("reserved"),
                serde_json::json!({"image": "us-docker.pkg.dev/cloudrun/container/hello",
                                   "env": {reserved: "8080"}}),
            ))
            .await
            .expect_err("reserved");
        assert_eq!(refused.class, ErrorClass::InvalidRequest, "{refused}");
        assert!(refused.message.contains(reserved), "{refused}");
    }
    assert!(
        api.log().is_empty(),
        "nothing reached the API: {:?}",
        api.log()
    );
}

#[tokio::test]
async fn every_attempt_after_failed_inserts_really_tries_again_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    let id = unique("stockouts");
    // Five attempts meet a stockout each; the sixth finds capacity. Each attempt must
    // send a fresh insert, not replay the last failed one under a key it already used.
    for attempt in 1..=5 {
        api.fail_next_operation(OperationFailure {
            operation_type: "insert".into(),
            code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
            message: "The zone does not have enough resources available.".into(),
            http_status: 503,
        });
        let err = platform
            .provision(&vm(&id))
            .await
            .expect_err(&format!("stockout at attempt {attempt}"));
        assert_eq!(err.class, ErrorClass::Capacity, "{err}");
    }
    let resource = platform
        .provision(&vm(&id))
        .await
        .expect("the sixth attempt finds capacity");
    assert!(resource.id.ends_with(&instance_name(&id)), "{resource:?}");
}

/// The request of member `index` of a fleet of `count`, as the runtime makes it.
fn member(fleet: &str, index: u32, count: u32) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": format!("{fleet}#{index}"),
        "operation": "provision", "platform": "gcp-compute",
        "spec": {"machine_type": "e2-small",
                 "image": "projects/debian-cloud/global/images/family/debian-12",
                 "labels": {"app": "batch"}},
        "labels": {"team": "batch"},
        "fleet_member": {"fleet_request_id": fleet, "index": index, "count": count}
    });
    decode_request(body.to_string().as_bytes()).expect("a valid member")
}

/// Provisions the members together, as a worker's concurrent deliveries do.
async fn provision_together(
    platform: &ComputePlatform,
    members: Vec<Request>,
) -> Vec<Result<provisioner_events::Resource, provisioner_core::PlatformError>> {
    let handles: Vec<_> = members
        .into_iter()
        .map(|request| {
            let platform = platform.clone();
            tokio::spawn(async move { platform.provision(&request).await })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("no panic"));
    }
    results
}

fn posts(api: &FakeGcp, path: &str) -> usize {
    api.log()
        .iter()
        .filter(|l| l.starts_with("POST ") && l.contains(path))
        .count()
}

#[tokio::test]
async fn fleet_members_are_made_in_one_bulk_insert_and_found_by_their_names_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let platform = compute(&api).await;
    let fleet = unique("fleet");
    // An earlier attempt made member 2's instance: it is found, never inserted again.
    platform
        .provision(&member(&fleet, 2, 12))
        .await
        .expect("member 2 alone");
    let made =
        provision_together(&platform, (0..12).map(|i| member(&fleet, i, 12)).collect()).await;
    let mut ids = std::collections::BTreeSet::new();
    for (index, result) in made.into_iter().enumerate() {
        let resource = result.unwrap_or_else(|e| panic!("member {index}: {e}"));
        assert_eq!(
            resource.id,
            format!("{ZONE}/{}", instance_name(&format!("{fleet}#{index}")))
        );
        ids.insert(resource.id);
    }
    assert_eq!(ids.len(), 12);
    assert_eq!(api.instance_count(), 12, "one instance per member");
    assert_eq!(
        posts(&api, "/instances/bulkInsert"),
        2,
        "one bulk insert for member 2, one for the other eleven: {:#?}",
        api.log()
    );
    assert_eq!(
        posts(&api, &format!("/zones/{ZONE}/instances?")),
        0,
        "no member inserted alone"
    );

    // What a bulk insert wrote: the fleet's marks instead of a request id, the spec's and
    // the request's labels, the machine type.
    let seven = api
        .instance(ZONE, &instance_name(&format!("{fleet}#7")))
        .expect("member 7");
    let item = |key: &str| {
        seven["metadata"]["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["key"] == key)
            .map(|i| i["value"].clone())
    };
    assert_eq!(item("provisioner-fleet-id"), Some(fleet.clone().into()));
    assert!(
        item("provisioner-fleet-members")
            .and_then(|v| v.as_str().map(|s| s.contains(",7,")))
            .unwrap_or(false),
        "{seven:#}"
    );
    assert_eq!(item("provisioner-request-id"), None);
    assert_eq!(seven["labels"]["app"], "batch");
    assert_eq!(seven["labels"]["team"], "batch");
    assert_eq!(seven["labels"]["provisioner-managed"], "true");
    assert_eq!(
        seven["machineType"],
        format!("zones/{ZONE}/machineTypes/e2-small")
    );

    // Describe, ownership and teardown read the members from the marks.
    let member_id = format!("{fleet}#7");
    let target =
        TeardownTarget::Request(provisioner_events::RequestId::new(&member_id).expect("an id"));
    let described = platform.describe(&target).await.expect("describe");
    assert_eq!(described.map(|d| d.state), Some(State::Running));
    let resource_id = format!("{ZONE}/{}", instance_name(&member_id));
    assert_eq!(
        platform
            .owner_of(&resource_id)
            .await
            .expect("owner")
            .map(|id| id.to_string()),
        Some(member_id.clone())
    );
    let owned = platform.owned().await.expect("owned");
    assert_eq!(
        owned
            .iter()
            .filter(|o| o.request_id.as_str().starts_with(&format!("{fleet}#")))
            .count(),
        12
    );
    for index in 0..12 {
        let id = provisioner_events::RequestId::new(format!("{fleet}#{index}")).expect("an id");
        let gone = platform
            .teardown(&TeardownTarget::Request(id))
            .await
            .expect("teardown");
        assert!(gone.is_some(), "member {index} had no instance to remove");
    }
    assert_eq!(api.instance_count(), 0);
}

#[tokio::test]
async fn a_bulk_insert_the_zone_cannot_place_whole_is_made_in_halves_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let platform = compute(&api).await;
    api.fail_next_operation(OperationFailure {
        operation_type: "bulkInsert".into(),
        code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
        message: format!("The zone 'projects/{PROJECT}/zones/{ZONE}' does not have enough resources available to fulfill the request.  Try a different zone, or try again later."),
        http_status: 503,
    });
    let fleet = unique("halves");
    let made = provision_together(&platform, (0..8).map(|i| member(&fleet, i, 8)).collect()).await;
    for (index, result) in made.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("member {index}: {e}"));
    }
    assert_eq!(
        api.instance_count(),
        8,
        "the failed bulk insert left nothing"
    );
    assert_eq!(
        posts(&api, "/instances/bulkInsert"),
        3,
        "eight refused, then two halves of four: {:#?}",
        api.log()
    );
}

#[tokio::test]
async fn vcpus_quotas_count_a_machine_types_guest_cpus_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 3).await;
    let platform = compute(&api).await;
    let vcpus = |cost: provisioner_core::QuotaCost| cost.get(provisioner_core::VCPUS).copied();
    let of = |machine_type: &str| {
        let mut request = vm(&unique("q"));
        if let Some(spec) = request.spec.as_mut() {
            spec.insert("machine_type".into(), machine_type.into());
        }
        request
    };
    for (machine_type, cpus) in [
        ("e2-small", 2),
        ("n2-standard-8", 8),
        ("e2-small", 2),
        ("zones/europe-west1-b/machineTypes/c3-highcpu-4", 4),
        ("n2-custom-6-20480", 6),
    ] {
        let cost = platform.quota_cost(&of(machine_type)).await.expect("cost");
        assert_eq!(vcpus(cost), Some(cpus), "{machine_type}");
    }
    let refused = platform
        .quota_cost(&of("z9-imaginary"))
        .await
        .expect_err("an unknown machine type");
    assert_eq!(refused.class, ErrorClass::InvalidRequest);
    assert!(
        refused.message.contains("z9-imaginary"),
        "{}",
        refused.message
    );
    let asked: Vec<String> = api
        .log()
        .into_iter()
        .filter(|l| l.contains("/machineTypes/"))
        .collect();
    assert_eq!(
        asked.len(),
        4,
        "each type asked once, a custom one never: {asked:#?}"
    );
}

/// The workers' setup checks pass under the documented roles (the fake's default, which
/// every other test here runs under too); a permission the roles would not grant is
/// refused at the call that needs it, as Google's APIs refuse it, before anything is
/// made: labels set at insert need `compute.instances.setLabels`, a network tag
/// `setTags`, and a Cloud Run deploy `iam.serviceAccounts.actAs` on the account the
/// service runs as (`roles/run.admin` alone is refused).
#[tokio::test]
async fn a_permission_the_documented_roles_lack_is_refused_before_anything_is_made_on_fake_gcp() {
    use provisioner_core::Outcome;
    use provisioner_gcp::fake_api::Grants;
    let api = FakeGcp::start(PROJECT, 1).await;
    for findings in [
        compute(&api).await.preflight().await,
        cloud_run(&api).await.preflight().await,
    ] {
        for finding in &findings {
            assert_ne!(finding.outcome, Outcome::Fail, "{finding:?}");
        }
    }
    for permission in [
        "compute.instances.setLabels",
        "compute.instances.setTags",
        "compute.disks.create",
    ] {
        api.set_grants(Grants::documented().without(permission));
        let refused = compute(&api)
            .await
            .provision(&vm(&unique("nolabels")))
            .await
            .expect_err("refused");
        assert_eq!(
            refused.class,
            ErrorClass::Permission,
            "{permission}: {refused}"
        );
        assert!(refused.message.contains(permission), "{refused}");
        assert_eq!(api.instance_count(), 0, "{permission}: nothing made");
    }
    api.set_grants(Grants::documented().without("compute.instances.list"));
    let findings = compute(&api).await.preflight().await;
    assert!(
        findings
            .iter()
            .any(|f| f.check == "compute.instances.list" && f.outcome == Outcome::Fail),
        "{findings:?}"
    );

    api.set_grants(Grants::documented().without("iam.serviceAccounts.actAs"));
    let refused = cloud_run(&api)
        .await
        .provision(&hello(
            &unique("noactas"),
            "us-docker.pkg.dev/cloudrun/container/hello",
        ))
        .await
        .expect_err("deploying as the runtime account is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(refused.message.contains("actAs"), "{refused}");
    assert_eq!(api.service_count(), 0);
}

/// A fleet that only partly fits the region's `CPUS` quota gets what fits: the bulk
/// insert of all eight is refused at once (`403 quotaExceeded`), and instead of failing
/// every member the batch is made in halves, down to the members the quota refuses,
/// each of which ends with the quota's error (the fleet's `min_count` then decides).
#[tokio::test]
async fn a_fleet_past_the_cpu_quota_gets_what_fits_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    // e2-small holds 2 CPUs: room for five of the eight.
    api.set_cpu_quota(ZONE.rsplit_once('-').expect("a zone").0, 10);
    let fleet = unique("quota");
    let made = provision_together(&platform, (0..8).map(|i| member(&fleet, i, 8)).collect()).await;
    let (ok, refused): (Vec<_>, Vec<_>) = made.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 5, "what fits is made: {refused:?}");
    for error in refused.into_iter().map(|r| r.expect_err("refused")) {
        assert_eq!(error.class, ErrorClass::Quota, "{error}");
        assert!(error.message.contains("CPUS"), "{error}");
    }
    assert_eq!(api.instance_count(), 5);
}

/// A zone that cannot place the whole bulk insert answers at once `503
/// insufficientCapacity`: classed `capacity` (not a passing fault retried as is), and the
/// batch is made in halves, down to what the zone can place.
#[tokio::test]
async fn a_bulk_insert_refused_for_capacity_at_once_is_made_in_halves_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    api.set_zone_capacity(ZONE, 6);
    let fleet = unique("stockout");
    let made = provision_together(&platform, (0..8).map(|i| member(&fleet, i, 8)).collect()).await;
    let (ok, refused): (Vec<_>, Vec<_>) = made.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 6, "what the zone can place is made: {refused:?}");
    for error in refused.into_iter().map(|r| r.expect_err("refused")) {
        assert_eq!(error.class, ErrorClass::Capacity, "{error}");
        assert!(error.retryable, "capacity may come back: {error:?}");
    }
    assert_eq!(api.instance_count(), 6);
}

/// Compute Engine runs at most ten bulk operations of a project at once and refuses
/// more (`403 rateLimitExceeded`): a worker's fleets keep within it by waiting for their
/// own operations, so twelve fleets made at once meet no refusal.
#[tokio::test]
async fn bulk_operations_in_flight_stay_within_the_projects_limit_on_fake_gcp() {
    let api = FakeGcp::start(PROJECT, 1).await;
    let platform = compute(&api).await;
    let members: Vec<Request> = (0..12)
        .flat_map(|f| {
            let fleet = unique(&format!("many{f}"));
            (0..2).map(move |i| member(&fleet, i, 2))
        })
        .collect();
    for (index, result) in provision_together(&platform, members)
        .await
        .into_iter()
        .enumerate()
    {
        result.unwrap_or_else(|e| panic!("member {index}: {e}"));
    }
    assert_eq!(api.instance_count(), 24);
    assert_eq!(
        posts(&api, "/instances/bulkInsert"),
        12,
        "one bulk insert per fleet, none refused for the operations in flight"
    );
}
