//! The process platform with a real program: busybox's httpd (the README's test command
//! installs busybox-static).

use std::collections::BTreeMap;
use std::path::PathBuf;

use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, decode_request};
use provisioner_process::{AllowedProgram, ProcessPlatform, ProcessPolicy};

fn platform() -> ProcessPlatform {
    platform_with(None, &[])
}

fn platform_with(argument_patterns: Option<&[&str]>, allowed_env: &[&str]) -> ProcessPlatform {
    let mut programs = BTreeMap::new();
    programs.insert(
        "httpd".to_owned(),
        AllowedProgram {
            path: PathBuf::from("/bin/busybox"),
            leading_args: vec!["httpd".into(), "-f".into()],
            argument_patterns: argument_patterns
                .map(|patterns| patterns.iter().map(|p| (*p).to_owned()).collect()),
        },
    );
    ProcessPlatform::new(ProcessPolicy {
        programs,
        allowed_env: allowed_env.iter().map(|p| (*p).to_owned()).collect(),
    })
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
    let policy =
        ProcessPolicy::parse("web=/usr/bin/web[-p 127.0.0.1:{port} --mode=*],tool=/opt/tool[]")
            .expect("parse");
    assert_eq!(
        policy.programs["web"].argument_patterns,
        Some(vec![
            "-p".into(),
            "127.0.0.1:{port}".into(),
            "--mode=*".into()
        ])
    );
    assert_eq!(policy.programs["tool"].argument_patterns, Some(vec![]));
    assert_eq!(policy.programs["tool"].path, PathBuf::from("/opt/tool"));
    assert!(ProcessPolicy::parse("web=/usr/bin/web[-p").is_err());
}

/// The program runs with what the spec set (on the allow-list) and the platform's own
/// variables, never the worker's environment: its broker and Redis URLs, signing keys and
/// cloud credentials would reach whatever the request runs.
#[tokio::test]
async fn a_child_starts_with_a_clean_environment_not_the_workers() {
    // The test's own environment (cargo's variables, HOME, …) stands for the worker's.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let platform = platform_with(None, &["APP_*"]);
    let resource = platform
        .provision(&request(
            "clean-env",
            serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:{port}"], "env": {"APP_MODE": "demo"}}),
        ))
        .await
        .expect("runs");
    let environ = std::fs::read(format!("/proc/{}/environ", resource.id)).expect("environ");
    let mut names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    names.sort();
    platform
        .teardown(&provisioner_events::TeardownTarget::Request(
            provisioner_events::RequestId::new("clean-env").expect("id"),
        ))
        .await
        .expect("teardown");
    let port = resource.endpoints[0].host_port;
    assert_eq!(
        names,
        vec![
            "APP_MODE=demo".to_owned(),
            "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            format!("PORT={port}"),
            "PROVISIONER_REQUEST_ID=clean-env".to_owned(),
        ]
    );
}

/// The loader's and interpreters' hooks are refused even where an operator allowed every
/// name; a name off the allow-list and an argument off the program's list are refused.
#[tokio::test]
async fn environment_names_and_arguments_off_the_allow_lists_are_refused() {
    let open = platform_with(None, &["*"]);
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PATH",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "NODE_OPTIONS",
        "PERL5OPT",
        "BASH_ENV",
        "DYLD_INSERT_LIBRARIES",
        "PORT",
        "PROVISIONER_REQUEST_ID",
    ] {
        let error = open
            .validate(&request(
                "bad-env",
                serde_json::json!({"program": "httpd", "env": {name: "/tmp/x.so"}}),
            ))
            .expect_err(name);
        assert_eq!(error.class, ErrorClass::Permission, "{name}");
        assert!(
            !error.message.contains("/tmp/x.so"),
            "the value is not echoed: {}",
            error.message
        );
    }
    let closed = platform_with(Some(&["-p", "127.0.0.1:{port}"]), &[]);
    let error = closed
        .validate(&request(
            "unlisted-env",
            serde_json::json!({"program": "httpd", "env": {"GREETING": "hi"}}),
        ))
        .expect_err("no names allowed");
    assert!(
        error.message.contains("PROCESS_ALLOWED_ENV"),
        "{}",
        error.message
    );
    closed
        .validate(&request(
            "listed-args",
            serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:{port}"]}),
        ))
        .expect("the listed arguments");
    let error = closed
        .validate(&request(
            "unlisted-args",
            serde_json::json!({"program": "httpd", "args": ["-p", "127.0.0.1:{port}", "-h", "/"]}),
        ))
        .expect_err("-h is not listed");
    assert_eq!(error.class, ErrorClass::Permission);
    assert!(error.message.contains("argument 2"), "{}", error.message);
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
