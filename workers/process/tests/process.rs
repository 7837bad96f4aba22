//! The process platform with a real program: busybox's httpd (the README's test command
//! installs busybox-static).

use std::collections::BTreeMap;
use std::path::PathBuf;

use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, decode_request};
use provisioner_process::{AllowedProgram, ProcessPlatform, ProcessPolicy};

fn platform() -> ProcessPlatform {
    let mut programs = BTreeMap::new();
    programs.insert(
        "httpd".to_owned(),
        AllowedProgram {
            path: PathBuf::from("/bin/busybox"),
            leading_args: vec!["httpd".into(), "-f".into()],
        },
    );
    ProcessPlatform::new(ProcessPolicy { programs })
}

fn request(id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "process", "spec": spec
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

#[tokio::test]
async fn process_platform_conforms() {
    let platform = platform();
    let request = request(
        "web-proc",
        serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:{port}"], "health": {"http": {"path": "/"}}}),
    );
    check_platform(&platform, &request, |resource| async move {
        let port = resource.endpoints.first().map(|e| e.host_port);
        match port {
            Some(port) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok(),
            // A torn-down resource reports no endpoints: check its pid instead.
            None => std::path::Path::new(&format!("/proc/{}", resource.id)).exists(),
        }
    })
    .await;
}

#[tokio::test]
async fn programs_off_the_allow_list_and_paths_are_refused() {
    let platform = platform();
    for program in ["sh", "bash", "python3"] {
        let error = platform
            .validate(&request("bad", serde_json::json!({"program": program})))
            .expect_err(program);
        assert_eq!(error.class, ErrorClass::Permission, "{program}");
        assert!(error.message.contains("allow-list"), "{}", error.message);
    }
    let error = platform
        .validate(&request("bad", serde_json::json!({"program": "/bin/sh"})))
        .expect_err("a path");
    assert_eq!(error.class, ErrorClass::InvalidRequest);
}

#[tokio::test]
async fn a_program_that_never_listens_fails_and_is_stopped() {
    let platform = platform();
    // httpd bound to a different port than the one the check probes never becomes ready.
    // The probed port is held bound but not listening for the test, so it refuses every
    // connection: no other program on the machine can start listening there meanwhile.
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let probed = held.local_addr().expect("addr").port();
    let error = platform
        .provision(&request(
            "never-ready",
            serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:1"], "port": probed, "ready_timeout_seconds": 1}),
        ))
        .await
        .expect_err("never ready");
    drop(held);
    assert_eq!(error.class, ErrorClass::Timeout, "{error}");
    assert!(platform.list().await.expect("list").is_empty());
}

#[test]
fn the_allow_list_setting_parses_and_refuses_relative_paths() {
    let policy = ProcessPolicy::parse("web=/usr/bin/web, tool=/opt/tool").expect("parse");
    assert_eq!(policy.programs.len(), 2);
    assert!(ProcessPolicy::parse("web=bin/web").is_err());
    assert!(ProcessPolicy::parse("web").is_err());
}

#[tokio::test]
async fn a_program_that_exits_is_an_invalid_request_not_a_timeout() {
    let platform = platform();
    // busybox httpd refuses a port it cannot parse and exits at once.
    let error = platform
        .provision(&request(
            "exits-at-once",
            serde_json::json!({"program": "httpd", "args": ["-p", "not-a-port"], "ready_timeout_seconds": 20}),
        ))
        .await
        .expect_err("exits");
    assert_eq!(error.class, ErrorClass::InvalidRequest, "{error}");
    assert!(error.message.contains("exited"), "{}", error.message);
}

#[tokio::test]
async fn a_worker_that_takes_over_adopts_the_process_a_killed_one_left() {
    let request = request(
        &format!("adopt-{}", std::process::id()),
        serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:{port}"], "health": {"tcp": {}}}),
    );
    let first = platform();
    let made = first.provision(&request).await.expect("provision");
    // Killed outright, the first worker never stops its child: it lives on.
    std::mem::forget(first);
    let taking_over = platform();
    let again = taking_over
        .provision(&request)
        .await
        .expect("provision again");
    assert_eq!(again.id, made.id, "the same process, not a second one");
    assert_eq!(again.endpoints, made.endpoints);
    let pid: u32 = made.id.parse().expect("pid");
    let removed = taking_over
        .teardown(&provisioner_events::TeardownTarget::Request(
            request.request_id.clone(),
        ))
        .await
        .expect("teardown")
        .expect("it was there");
    assert_eq!(removed.id, made.id);
    assert!(!provisioner_process::orphans::alive(pid), "stopped");
}
