//! The reconciler end to end, on the real RabbitMQ, Redis and Podman: a container with
//! the provisioner's marks that no record explains (a worker died between the create and
//! anything the store learned) is found by `provisioner reconcile` and torn down through
//! the queue, with a status event saying why; a fresh one and one its record explains
//! are left alone, and `--dry-run` only reports.

mod common;

use common::{TestEnv, id};
use provisioner_events::State;

/// Starts a container with the provisioner's ownership labels for `request_id`, as a
/// worker that died right after its create call would leave it. Returns its id.
async fn leak(env: &TestEnv, request_id: &str) -> String {
    let output = tokio::process::Command::new("podman")
        .args(["run", "-d", "--label"])
        .arg(format!("{}=true", provisioner_docker::MANAGED_LABEL))
        .arg("--label")
        .arg(format!(
            "{}={request_id}",
            provisioner_docker::REQUEST_LABEL
        ))
        .arg("--label")
        .arg(format!("test-run={}", env.run_id))
        .args(["localhost/busybox:latest", "sleep", "300"])
        .output()
        .await
        .expect("podman run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `provisioner reconcile --platform docker …` and returns its decisions by request id.
async fn reconcile(env: &TestEnv, args: &[&str]) -> Vec<serde_json::Value> {
    let output = tokio::process::Command::new(common::BIN)
        .args([
            "reconcile",
            "--platform",
            "docker",
            "--second-look-seconds",
            "1",
        ])
        .args(args)
        .envs(env.env())
        .output()
        .await
        .expect("run provisioner reconcile");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn verdict_of<'a>(decisions: &'a [serde_json::Value], request_id: &str) -> &'a str {
    decisions
        .iter()
        .find(|d| d["request_id"] == request_id)
        .and_then(|d| d["verdict"].as_str())
        .unwrap_or_else(|| panic!("no decision about {request_id}: {decisions:#?}"))
}

#[tokio::test]
async fn a_leaked_container_is_found_and_removed_while_fresh_and_explained_ones_stay() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_worker("a");
    let web = env.web("kept");
    env.publish(&web).await;
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    // Two containers leaked under one request id (a launch that ran twice): each is
    // removed by its own teardown.
    let old_leak = format!("leaked-old-{}", env.run_id);
    leak(&env, &old_leak).await;
    leak(&env, &old_leak).await;

    // Everything is younger than an hour: nothing is judged, nothing sent.
    let decisions = reconcile(&env, &["--min-age-seconds", "3600"]).await;
    assert_eq!(verdict_of(&decisions, &old_leak), "too_young");

    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let fresh_leak = format!("leaked-fresh-{}", env.run_id);
    leak(&env, &fresh_leak).await;

    // A dry run reports and sends nothing.
    let decisions = reconcile(&env, &["--min-age-seconds", "3", "--dry-run"]).await;
    assert_eq!(verdict_of(&decisions, &old_leak), "would_remove");
    assert_eq!(verdict_of(&decisions, &id(&web)), "kept");

    let decisions = reconcile(&env, &["--min-age-seconds", "3"]).await;
    assert_eq!(
        verdict_of(&decisions, &old_leak),
        "removed",
        "{decisions:#?}"
    );
    assert_eq!(verdict_of(&decisions, &fresh_leak), "too_young");
    assert_eq!(verdict_of(&decisions, &id(&web)), "kept");

    let teardowns: Vec<String> = decisions
        .iter()
        .filter(|d| d["request_id"] == old_leak.as_str())
        .map(|d| {
            assert_eq!(d["verdict"], "removed", "{d:#?}");
            d["teardown"]
                .as_str()
                .expect("the teardown it sent")
                .to_owned()
        })
        .collect();
    assert_eq!(teardowns.len(), 2, "{decisions:#?}");
    assert_ne!(teardowns[0], teardowns[1], "one teardown per resource");
    for teardown in &teardowns {
        assert!(
            teardown.starts_with(&format!("{old_leak}#reconciled-")),
            "{teardown}"
        );
        let stopped = events.terminal(teardown).await;
        assert_eq!(stopped.state, State::Stopped, "{stopped:#?}");
        let cause = stopped.cause.as_deref().unwrap_or_default();
        assert!(
            cause.starts_with("reconciled:") && cause.contains("no record"),
            "says why: {stopped:#?}"
        );
    }
    let containers = env.containers().await;
    assert!(
        !containers.contains_key(&old_leak),
        "removed: {containers:?}"
    );
    assert!(
        containers.contains_key(&fresh_leak),
        "fresh one left: {containers:?}"
    );
    assert!(
        containers.contains_key(&id(&web)),
        "explained one left: {containers:?}"
    );
}
