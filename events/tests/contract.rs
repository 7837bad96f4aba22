//! The wire contract pinned: golden fixtures, generated schemas, and the schemas checked
//! against the fixtures, so a change to the format is always a visible diff.
//!
//! Set `UPDATE_GOLDEN=1` to rewrite the golden files after an intended change.

use std::path::{Path, PathBuf};

use provisioner_events::spec::docker::DockerSpec;
use provisioner_events::spec::parse_spec;
use provisioner_events::*;
use time::macros::datetime;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some()
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

/// Compares `actual` with the committed file, or rewrites it under UPDATE_GOLDEN.
fn golden(path: &Path, actual: &str) {
    if updating() {
        std::fs::write(path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        expected,
        actual,
        "{} drifted from the code; if the change is intended run UPDATE_GOLDEN=1 cargo test -p provisioner-events",
        path.display()
    );
}

#[test]
fn the_issue_examples_are_accepted_exactly_as_written() {
    let provision = decode_request(
        br#"{"schema_version":1,"request_id":"demo-web-1","operation":"provision","platform":"docker","spec":{"image":"localhost/busybox:latest","command":["httpd","-f","-p","8080"],"ports":[8080],"env":{"GREETING":"hi"},"health":{"http":{"port":8080,"path":"/"}}},"labels":{"team":"demo"}}"#,
    )
    .expect("provision example");
    assert_eq!(provision.request_id.as_str(), "demo-web-1");
    assert_eq!(provision.routing_key(), "docker.provision");
    let spec: DockerSpec =
        parse_spec("docker", provision.spec.as_ref().expect("spec")).expect("docker spec");
    spec.validate().expect("valid docker spec");
    assert_eq!(spec.ports[0].container_port(), 8080);

    let teardown = decode_request(
        br#"{"schema_version":1,"request_id":"demo-web-1-down","operation":"teardown","platform":"docker","target_request_id":"demo-web-1"}"#,
    )
    .expect("teardown example");
    assert_eq!(
        teardown.target(),
        Ok(TeardownTarget::Request(
            RequestId::new("demo-web-1").expect("id")
        ))
    );
}

#[test]
fn the_ec2_example_of_the_aws_issue_is_accepted_exactly_as_written() {
    let request = decode_request(
        br#"{"schema_version":1,"request_id":"ec2-demo-1","operation":"provision","platform":"aws-ec2","spec":{"image_id":"ami-12345678","instance_type":"t3.micro","tags":{"env":"demo"}}}"#,
    )
    .expect("ec2 example");
    let spec: provisioner_events::spec::aws_ec2::AwsEc2Spec =
        parse_spec("aws-ec2", request.spec.as_ref().expect("spec")).expect("ec2 spec");
    spec.validate().expect("valid ec2 spec");
    for bad in ["not-an-ami", "ami-1234", "ami-ZZZZZZZZ"] {
        let mut wrong = spec.clone();
        wrong.image_id = bad.into();
        assert!(wrong.validate().is_err(), "{bad} accepted");
    }
}

#[test]
fn the_ecs_example_with_its_awsvpc_network_is_accepted() {
    use provisioner_events::spec::aws_ecs::AwsEcsSpec;
    let request = decode_request(
        br#"{"schema_version":1,"request_id":"ecs-demo-1","operation":"provision","platform":"aws-ecs","spec":{"cluster":"demo","task_definition":"web:1","launch_type":"FARGATE","network":{"subnets":["subnet-0a1b2c3d"],"assign_public_ip":true}}}"#,
    )
    .expect("ecs example");
    let spec: AwsEcsSpec =
        parse_spec("aws-ecs", request.spec.as_ref().expect("spec")).expect("ecs spec");
    spec.validate().expect("valid ecs spec");
    assert_eq!(spec.launch_type(), "FARGATE");
    let refused = [
        ("task_definition", serde_json::json!("web:latest")),
        ("launch_type", serde_json::json!("LAMBDA")),
        ("cluster", serde_json::json!("no spaces please")),
        ("count", serde_json::json!(0)),
        (
            "container",
            serde_json::json!({"image": "nginx", "memory_mib": 64}),
        ),
    ];
    for (field, value) in refused {
        let mut wrong = request.spec.clone().expect("spec");
        wrong.insert(field.into(), value.clone());
        let parsed: Result<AwsEcsSpec, _> = parse_spec("aws-ecs", &wrong);
        assert!(
            parsed.map_or(true, |s| s.validate().is_err()),
            "{field} = {value} accepted"
        );
    }
}

#[test]
fn every_valid_fixture_decodes_and_round_trips() {
    for path in json_files(&fixtures().join("requests/valid")) {
        let body = std::fs::read(&path).expect("read");
        let request = decode_request(&body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let again = decode_request(&serde_json::to_vec(&request).expect("serialize"))
            .unwrap_or_else(|e| panic!("{} after a round trip: {e}", path.display()));
        assert_eq!(request, again, "{}", path.display());
        assert_eq!(request.payload_hash(), again.payload_hash());
    }
}

#[test]
fn every_invalid_fixture_is_rejected_with_a_pinned_message() {
    let mut report = String::new();
    for path in json_files(&fixtures().join("requests/invalid")) {
        let body = std::fs::read(&path).expect("read");
        let error = decode_request(&body).expect_err(&path.display().to_string());
        report.push_str(&format!(
            "{}\n  request_id: {:?}\n  platform: {:?}\n  message: {}\n",
            path.file_name().expect("name").to_string_lossy(),
            error.request_id,
            error.platform,
            error.message
        ));
    }
    golden(
        &fixtures().join("requests/invalid/REJECTIONS.golden"),
        &report,
    );
}

#[test]
fn unknown_fields_are_ignored_and_do_not_change_the_payload_hash() {
    let plain = decode_request(
        br#"{"schema_version":1,"request_id":"a-1","operation":"teardown","platform":"docker","target_request_id":"b"}"#,
    )
    .expect("plain");
    let extended = decode_request(
        br#"{"new_field":[1],"schema_version":1,"request_id":"a-1","operation":"teardown","platform":"docker","target_request_id":"b","x":{}}"#,
    )
    .expect("extended");
    assert_eq!(plain.payload_hash(), extended.payload_hash());
}

#[test]
fn a_dry_run_is_a_different_request_and_false_is_the_same_as_absent() {
    let base = r#"{"schema_version":1,"request_id":"r1","operation":"provision","platform":"aws-ec2","spec":{"image_id":"ami-12345678","instance_type":"t3.micro"}"#;
    let plain = decode_request(format!("{base}}}").as_bytes()).expect("plain");
    let off = decode_request(format!(r#"{base},"dry_run":false}}"#).as_bytes()).expect("off");
    let on = decode_request(format!(r#"{base},"dry_run":true}}"#).as_bytes()).expect("on");
    assert!(on.dry_run && !off.dry_run);
    assert_eq!(plain.payload_hash(), off.payload_hash());
    assert_ne!(plain.payload_hash(), on.payload_hash());
    assert_eq!(State::Checked.as_str(), "checked");
    assert!(State::Checked.is_terminal());
}

#[test]
fn payload_hash_ignores_key_order_but_not_values() {
    let a = decode_request(
        br#"{"schema_version":1,"request_id":"h","operation":"provision","platform":"docker","spec":{"image":"i","env":{"A":"1","B":"2"}}}"#,
    )
    .expect("a");
    let b = decode_request(
        br#"{"spec":{"env":{"B":"2","A":"1"},"image":"i"},"platform":"docker","operation":"provision","request_id":"h","schema_version":1}"#,
    )
    .expect("b");
    let c = decode_request(
        br#"{"schema_version":1,"request_id":"h","operation":"provision","platform":"docker","spec":{"image":"i","env":{"A":"1","B":"3"}}}"#,
    )
    .expect("c");
    assert_eq!(a.payload_hash(), b.payload_hash());
    assert_ne!(a.payload_hash(), c.payload_hash());
}

#[test]
fn request_ids_are_bounded_in_charset_and_length() {
    assert!(RequestId::new("a").is_ok());
    assert!(RequestId::new("A.b_c-9").is_ok());
    assert!(RequestId::new("x".repeat(128)).is_ok());
    assert!(RequestId::new("x".repeat(129)).is_err());
    // Fleet members, and requests about one.
    assert!(RequestId::new(format!("{}#999", "x".repeat(128))).is_ok());
    assert!(RequestId::new("batch-7#12.expired").is_ok());
    // ...and what the workers send about a request that is no member.
    assert!(RequestId::new("batch-42#expired").is_ok());
    assert!(RequestId::new("a#x").is_ok());
    assert!(RequestId::new(format!("{}#1.{}", "x".repeat(128), "y".repeat(30))).is_err());
    for bad in [
        "", "-leading", ".x", "a/b", "a b", "a:b", "ü", "a\n", "#1", "a#", "a#X", "a#.x",
        "a#12345", "a#1#2", "a#x#1",
    ] {
        assert!(RequestId::new(bad).is_err(), "{bad:?} accepted");
    }
}

fn sample_events() -> Vec<(&'static str, StatusEvent)> {
    let base = StatusEvent {
        schema_version: SCHEMA_VERSION,
        request_id: "demo-web-1".into(),
        operation: Some(Operation::Provision),
        platform: "docker".into(),
        state: State::Starting,
        seq: 1,
        attempt: 1,
        timestamp: datetime!(2026-11-21 09:00:00 UTC),
        resource: None,
        error: None,
        tenant: None,
        rejected_message: None,
        cause: None,
        fleet: None,
    };
    let running = StatusEvent {
        state: State::Running,
        seq: 2,
        timestamp: datetime!(2026-11-21 09:00:01.250 UTC),
        resource: Some(Resource {
            id: "4c1e0b7f9a2d".into(),
            name: "prov-demo-web-1".into(),
            address: Some("127.0.0.1".into()),
            endpoints: vec![Endpoint {
                port: 8080,
                host: "127.0.0.1".into(),
                host_port: 40123,
                protocol: "tcp".into(),
            }],
            members: Vec::new(),
        }),
        ..base.clone()
    };
    let error = StatusEvent {
        state: State::Error,
        seq: 2,
        error: Some(ErrorInfo {
            class: ErrorClass::NotFound,
            message: "image localhost/nope:latest is not on the engine and could not be pulled"
                .into(),
        }),
        ..base.clone()
    };
    let rejected = StatusEvent {
        request_id: "x-1".into(),
        operation: Some(Operation::Provision),
        platform: "openstack".into(),
        state: State::Error,
        seq: 0,
        error: Some(ErrorInfo {
            class: ErrorClass::InvalidRequest,
            message: "unknown platform \"openstack\"".into(),
        }),
        rejected_message: Some(provisioner_events::RejectedMessage::of(
            br#"{"schema_version":1,"request_id":"x-1","operation":"provision","platform":"openstack"}"#,
        )),
        ..base.clone()
    };
    let expired = StatusEvent {
        request_id: "batch-42#expired".into(),
        operation: Some(Operation::Teardown),
        state: State::Stopped,
        seq: 2,
        cause: Some(
            "expired: batch-42 reached its ttl_seconds or expires_at, and is torn down".into(),
        ),
        ..base.clone()
    };
    let fleet_status = |members: FleetCounts| FleetStatus {
        request_id: "batch-7".into(),
        count: 3,
        index: None,
        min_count: Some(2),
        members: Some(members),
    };
    let fleet_progress = StatusEvent {
        request_id: "batch-7".into(),
        state: State::Starting,
        seq: 3,
        fleet: Some(fleet_status(FleetCounts {
            not_started: 1,
            starting: 1,
            running: 1,
            ..FleetCounts::default()
        })),
        ..base.clone()
    };
    let member = |index: u32, state: State, error: Option<ErrorInfo>| MemberResource {
        request_id: format!("batch-7#{index}"),
        index,
        state,
        id: (state == State::Running).then(|| format!("c0ffee{index}")),
        name: (state == State::Running).then(|| format!("prov-batch-7-{index}-5e1f0a2b")),
        address: (state == State::Running).then(|| "127.0.0.1".into()),
        error,
    };
    let fleet_running = StatusEvent {
        request_id: "batch-7".into(),
        state: State::Running,
        seq: 6,
        resource: Some(Resource {
            id: "batch-7".into(),
            name: "batch-7".into(),
            members: vec![
                member(0, State::Running, None),
                member(
                    1,
                    State::Error,
                    Some(ErrorInfo {
                        class: ErrorClass::Capacity,
                        message: "no capacity for the container".into(),
                    }),
                ),
                member(2, State::Running, None),
            ],
            ..Resource::default()
        }),
        fleet: Some(fleet_status(FleetCounts {
            running: 2,
            error: 1,
            ..FleetCounts::default()
        })),
        ..base.clone()
    };
    let fleet_member = StatusEvent {
        request_id: "batch-7#2".into(),
        state: State::Starting,
        fleet: Some(FleetStatus {
            request_id: "batch-7".into(),
            count: 3,
            index: Some(2),
            min_count: None,
            members: None,
        }),
        ..base.clone()
    };
    vec![
        ("starting", base),
        ("running", running),
        ("error", error),
        ("rejected", rejected),
        ("stopped-on-expiry", expired),
        ("fleet-progress", fleet_progress),
        ("fleet-running", fleet_running),
        ("fleet-member-starting", fleet_member),
    ]
}

#[test]
fn status_events_serialize_as_the_golden_files() {
    for (name, event) in sample_events() {
        let mut text = serde_json::to_string_pretty(&event).expect("serialize");
        text.push('\n');
        golden(&fixtures().join(format!("status/{name}.json")), &text);
        let back: StatusEvent = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, event);
    }
}

#[test]
fn status_event_routing_keys() {
    let events = sample_events();
    assert_eq!(events[1].1.routing_key(), "docker.running");
    assert_eq!(events[3].1.routing_key(), "openstack.error");
}

#[test]
fn committed_schemas_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    for (file, text) in schema::all() {
        golden(&dir.join(file), &text);
    }
}

fn validator(file: &str) -> jsonschema::Validator {
    let text = schema::all()
        .into_iter()
        .find(|(name, _)| *name == file)
        .expect("schema exists")
        .1;
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

#[test]
fn fixtures_validate_against_the_published_schemas() {
    let request_schema = validator("request.schema.json");
    let docker_schema = validator("spec-docker.schema.json");
    let process_schema = validator("spec-process.schema.json");
    let ec2_schema = validator("spec-aws-ec2.schema.json");
    let ecs_schema = validator("spec-aws-ecs.schema.json");
    let kubernetes_schema = validator("spec-kubernetes.schema.json");
    let gcp_compute_schema = validator("spec-gcp-compute.schema.json");
    let gcp_cloud_run_schema = validator("spec-gcp-cloud-run.schema.json");
    let azure_vm_schema = validator("spec-azure-vm.schema.json");
    let azure_aci_schema = validator("spec-azure-container-instances.schema.json");
    for path in json_files(&fixtures().join("requests/valid")) {
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        let errors: Vec<String> = request_schema
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        if let Some(spec) = value.get("spec") {
            let validator = match value["platform"].as_str() {
                Some("docker") => &docker_schema,
                Some("process") => &process_schema,
                Some("aws-ec2") => &ec2_schema,
                Some("aws-ecs") => &ecs_schema,
                Some("kubernetes") => &kubernetes_schema,
                Some("gcp-compute") => &gcp_compute_schema,
                Some("gcp-cloud-run") => &gcp_cloud_run_schema,
                Some("azure-vm") => &azure_vm_schema,
                Some("azure-container-instances") => &azure_aci_schema,
                other => panic!("no spec schema for {other:?}"),
            };
            let errors: Vec<String> = validator.iter_errors(spec).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{} spec: {errors:?}", path.display());
        }
    }
    let status_schema = validator("status-event.schema.json");
    for path in json_files(&fixtures().join("status")) {
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert!(status_schema.is_valid(&value), "{}", path.display());
    }
    // The schema is strict where the code is: a bad request id is refused by both.
    let bad: serde_json::Value = serde_json::json!({
        "schema_version": 1, "request_id": "has space", "operation": "teardown",
        "platform": "docker", "target_request_id": "a"
    });
    assert!(!request_schema.is_valid(&bad));
}

#[test]
fn hostile_shapes_are_refused_with_a_clear_error_whatever_the_platform() {
    let base = |spec: serde_json::Value| {
        serde_json::json!({"schema_version":1,"request_id":"h-1","operation":"provision",
                           "platform":"docker","spec":spec})
        .to_string()
    };
    let mut deep = serde_json::json!("x");
    for _ in 0..40 {
        deep = serde_json::json!([deep]);
    }
    let cases = [
        (
            base(serde_json::json!({"image": "a".repeat(70_000)})),
            "request.spec.image is a string of 70000 bytes",
        ),
        (
            base(serde_json::json!({"image": "i", "command": vec!["x"; 2000]})),
            "request.spec.command has 2000 items",
        ),
        (
            base(serde_json::json!({"image": "i", "x": deep})),
            "nested deeper than 16",
        ),
        (
            format!("{{\"pad\":\"{}\"}}", "x".repeat(300_000)),
            "a request is at most 262144",
        ),
    ];
    for (body, expected) in cases {
        let error = decode_request(body.as_bytes()).expect_err("hostile input accepted");
        assert!(
            error.message.contains(expected),
            "{expected:?} not in {:?}",
            error.message
        );
    }
    // Numbers that do not fit are refused by the typed read, never wrapped.
    let huge = base(serde_json::json!({"image": "i", "ready_timeout_seconds": 1e300}));
    assert!(
        decode_request(huge.as_bytes()).is_ok(),
        "the envelope does not read the spec"
    );
    let spec: Result<provisioner_events::spec::docker::DockerSpec, _> =
        provisioner_events::spec::parse_spec(
            "docker",
            serde_json::json!({"image": "i", "ready_timeout_seconds": 1e300})
                .as_object()
                .expect("object"),
        );
    assert!(spec.is_err());
}

#[test]
fn every_readiness_wait_is_bounded_so_no_deadline_can_overflow() {
    use provisioner_events::spec::{aws_ec2::AwsEc2Spec, docker::DockerSpec, parse_spec};
    let docker = |seconds: u64| -> DockerSpec {
        parse_spec(
            "docker",
            serde_json::json!({"image": "i", "ready_timeout_seconds": seconds})
                .as_object()
                .expect("object"),
        )
        .expect("parse")
    };
    assert!(docker(86_400).validate().is_ok());
    assert!(docker(86_401).validate().is_err());
    assert!(docker(u64::MAX).validate().is_err());
    let ec2: AwsEc2Spec = parse_spec(
        "aws-ec2",
        serde_json::json!({"image_id": "ami-12345678", "instance_type": "t3.micro",
                           "ready_timeout_seconds": u64::MAX})
        .as_object()
        .expect("object"),
    )
    .expect("parse");
    assert!(
        ec2.validate()
            .expect_err("a day at most")
            .0
            .contains("over a day")
    );
}

#[test]
fn a_payload_hash_survives_a_round_trip_through_json_whatever_its_numbers() {
    // Found by the fuzzer: a huge integer in a spec read back as another float, so the
    // same request hashed differently after being written out and read again.
    let body = br#"{"schema_version":1,"request_id":"run-hello-1","operation":"provision","platform":"gcp-cloud-run","spec":{"image":"x","max_instances":5555555155555555555555555555555555555555555555555555555555555555555553,"cpu":0.30000000000000004}}"#;
    let request = decode_request(body).expect("decodes");
    let again = decode_request(&serde_json::to_vec(&request).expect("encodes")).expect("again");
    assert_eq!(again.payload_hash(), request.payload_hash());
}
