//! The README's first command: the embedded default, with no AMQP_URL or REDIS_URL, runs
//! the shipped example end to end in one process.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_provisioner");

fn without_services() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("AMQP_URL")
        .env_remove("REDIS_URL")
        .env_remove("PROVISIONER_LOG");
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    command
}

#[test]
fn the_shipped_embedded_demo_provisions_and_tears_down() {
    let output = without_services()
        .args(["submit", "--json", "examples/embedded-demo.jsonl"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("running embedded"), "{stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    let terminal = |id: &str| {
        events
            .iter()
            .filter(|e| e["request_id"] == id)
            .map(|e| e["state"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(terminal("demo-local-1"), ["starting", "running"]);
    assert_eq!(terminal("demo-local-1-down"), ["stopping", "stopped"]);
    let running = events
        .iter()
        .find(|e| e["request_id"] == "demo-local-1" && e["state"] == "running")
        .expect("running event");
    assert!(
        running["resource"]["endpoints"][0]["host_port"]
            .as_u64()
            .is_some(),
        "{running}"
    );
}

#[test]
fn a_program_off_the_allow_list_is_refused_in_the_embedded_mode_too() {
    let dir = std::env::temp_dir().join(format!("embedded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("shell.json");
    std::fs::write(
        &file,
        r#"{"schema_version":1,"request_id":"evil-1","operation":"provision","platform":"process","spec":{"program":"sh","args":["-c","echo owned"]}}"#,
    )
    .expect("write");
    let output = without_services()
        .args(["submit", "--json", file.to_str().expect("path")])
        .output()
        .expect("run");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("\"class\":\"permission\""), "{stdout}");
    assert!(stdout.contains("allow-list"), "{stdout}");
}

#[test]
fn setting_only_one_service_is_a_configuration_error() {
    let output = without_services()
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .args(["submit", "examples/embedded-demo.jsonl"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("REDIS_URL"));
}

/// Signing keys make the embedded run a signing deployment in small: requests are signed,
/// the workers verify them, and keys that cannot be read stop it before anything runs.
#[test]
fn the_embedded_mode_signs_and_verifies_with_the_deployments_keys() {
    let signed = without_services()
        .env(
            "REQUEST_SIGNING_KEYS",
            "k1=a-secret-of-at-least-thirty-two-bytes!!",
        )
        .args(["submit", "examples/embedded-demo.jsonl"])
        .output()
        .expect("run");
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let unreadable = without_services()
        .env("REQUEST_SIGNING_KEYS", "k1=short")
        .args(["submit", "examples/embedded-demo.jsonl"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert_eq!(unreadable.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("signing keys"), "{stderr}");
    assert!(!stderr.contains("running embedded"), "{stderr}");
}

#[test]
fn invalid_requests_are_refused_before_anything_is_published() {
    let output = without_services()
        .args([
            "submit",
            "events/tests/fixtures/requests/invalid/missing-operation.json",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nothing was published") && stderr.contains("operation"),
        "{stderr}"
    );
}

/// A fleet in the embedded mode: its progress as plain lines (stderr is no terminal
/// here), then a summary, and one teardown of the whole fleet.
#[test]
fn a_fleet_shows_its_progress_and_a_summary_and_goes_with_one_teardown() {
    let dir = std::env::temp_dir().join(format!("embedded-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("fleet.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"schema_version":1,"request_id":"local-fleet","operation":"provision","platform":"process","count":3,"spec":{"program":"demo-http","args":["--port","{port}"],"health":{"tcp":{}}}}"#,
            "\n",
            r#"{"schema_version":1,"request_id":"local-fleet-down","operation":"teardown","platform":"process","target_request_id":"local-fleet"}"#,
            "\n"
        ),
    )
    .expect("write");
    let output = without_services()
        .args(["submit", file.to_str().expect("path")])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("local-fleet") && stdout.contains("members: 3 running of 3"),
        "{stdout}"
    );
    assert!(
        stderr.contains("fleet local-fleet: 3 running of 3 in"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fleet local-fleet-down: 3 stopped of 3 in"),
        "{stderr}"
    );
    // Members' own events stay off the screen: only the fleets' lines are printed.
    assert!(!stdout.contains("local-fleet#"), "{stdout}");
}
