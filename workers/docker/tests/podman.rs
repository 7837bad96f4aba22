//! The Docker platform against a real engine: Podman's Docker API at `DOCKER_HOST`
//! (default `unix:///run/podman/podman.sock`), with the `localhost/busybox:latest` image
//! that the README's test command imports. Test names end in `_on_engine`.

use provisioner_core::conformance::check_platform;
use provisioner_core::{Platform, health::Probe};
use provisioner_docker::{DockerPlatform, DockerPolicy, container_name};
use provisioner_events::{ErrorClass, Request, TeardownTarget, decode_request};

fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///run/podman/podman.sock".into())
}

async fn platform() -> DockerPlatform {
    DockerPlatform::connect(Some(&docker_host()), DockerPolicy::default())
        .await
        .expect(
            "a Docker-compatible engine must be running (the README's test command starts Podman)",
        )
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn request(id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision",
        "platform": "docker", "spec": spec, "labels": {"suite": "podman"}
    });
    decode_request(body.to_string().as_bytes()).expect("valid request")
}

fn web_spec() -> serde_json::Value {
    serde_json::json!({
        "image": "localhost/busybox:latest",
        "command": ["httpd", "-f", "-p", "8080"],
        "ports": [8080],
        "env": {"GREETING": "hi"},
        "health": {"http": {"port": 8080, "path": "/"}}
    })
}

#[tokio::test]
async fn docker_platform_conforms_on_engine() {
    let platform = platform().await;
    let request = request(&unique("conf"), web_spec());
    let docker = platform.docker().clone();
    check_platform(&platform, &request, |resource| {
        let docker = docker.clone();
        async move {
            docker
                .inspect_container(
                    &resource.id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test]
async fn a_provisioned_container_serves_on_its_reported_port_on_engine() {
    let platform = platform().await;
    let id = unique("web");
    let resource = platform
        .provision(&request(&id, web_spec()))
        .await
        .expect("provision");
    assert_eq!(resource.name, container_name(&id));
    let endpoint = &resource.endpoints[0];
    assert_eq!(endpoint.port, 8080);
    let probe = Probe::Http {
        host: endpoint.host.clone(),
        port: endpoint.host_port,
        path: "/".into(),
    };
    probe
        .check_once()
        .await
        .expect("the reported endpoint answers HTTP");
    let listed = platform.list().await.expect("list");
    assert!(listed.iter().any(|r| r.id == resource.id));
    platform
        .teardown(&TeardownTarget::Request(
            request(&id, web_spec()).request_id,
        ))
        .await
        .expect("teardown");
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error_on_engine() {
    let platform = platform().await;
    // Not on the engine and not to be pulled: not found, for good. To be pulled from a
    // registry nothing answers for (no registry runs here): the registry is unreachable,
    // which passes, so it is retried.
    for (pull, class, retryable) in [
        ("never", ErrorClass::NotFound, false),
        ("if_missing", ErrorClass::Transient, true),
    ] {
        let spec = serde_json::json!({"image": "localhost/does-not-exist:latest", "pull": pull});
        let error = platform
            .provision(&request(&unique("noimg"), spec))
            .await
            .expect_err("no such image");
        assert_eq!(error.class, class, "{pull}: {error}");
        assert_eq!(error.retryable, retryable, "{pull}");
        assert!(
            error.message.contains("localhost/does-not-exist"),
            "{pull}: {}",
            error.message
        );
    }
}

#[tokio::test]
async fn a_container_that_exits_or_never_gets_healthy_fails_and_is_removed_on_engine() {
    let platform = platform().await;
    let id = unique("exits");
    let spec = serde_json::json!({
        "image": "localhost/busybox:latest", "command": ["sh", "-c", "env >&2; echo cannot start >&2; exit 3"],
        "env": {"DB_PASSWORD": "marker-secret-5150"},
        "ports": [8080], "health": {"tcp": {"port": 8080}}, "ready_timeout_seconds": 5
    });
    let error = platform
        .provision(&request(&id, spec))
        .await
        .expect_err("exits");
    assert!(error.message.contains("exit code 3"), "{}", error.message);
    // The output goes to the worker's log, not into the event every subscriber reads:
    // a program may print what its environment holds.
    assert!(
        !error.message.contains("cannot start") && !error.message.contains("marker-secret"),
        "the log tail stays out of the error: {}",
        error.message
    );
    assert!(error.message.contains("worker's log"), "{}", error.message);
    assert!(!error.retryable);
    let gone = platform
        .describe(&TeardownTarget::Request(
            request(&id, web_spec()).request_id,
        ))
        .await
        .expect("describe");
    assert_eq!(gone, None, "a failed container is not leaked");
}

#[tokio::test]
async fn containers_not_made_by_the_provisioner_are_left_alone_on_engine() {
    let platform = platform().await;
    let name = unique("foreign");
    let body = bollard::models::ContainerCreateBody {
        image: Some("localhost/busybox:latest".into()),
        cmd: Some(vec!["sleep".into(), "60".into()]),
        ..Default::default()
    };
    let created = platform
        .docker()
        .create_container(
            Some(
                bollard::query_parameters::CreateContainerOptionsBuilder::default()
                    .name(&name)
                    .build(),
            ),
            body,
        )
        .await
        .expect("create foreign container");
    let error = platform
        .teardown(&TeardownTarget::Resource(created.id.clone()))
        .await
        .expect_err("not ours");
    assert_eq!(error.class, ErrorClass::Conflict);
    platform
        .docker()
        .remove_container(
            &created.id,
            Some(
                bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .build(),
            ),
        )
        .await
        .expect("cleanup");
}

/// An iptables rule dropping TCP packets to a port, removed when dropped.
struct DroppedPort(u16);

impl DroppedPort {
    fn rule(port: u16) -> Vec<String> {
        [
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "DROP",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `None` where this user cannot change the firewall (rootless engines).
    fn new(port: u16) -> Option<Self> {
        let added = std::process::Command::new("iptables")
            .arg("-I")
            .args(Self::rule(port))
            .status();
        added.ok()?.success().then_some(DroppedPort(port))
    }
}

impl Drop for DroppedPort {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .arg("-D")
            .args(Self::rule(self.0))
            .status();
    }
}

#[tokio::test]
async fn a_container_whose_port_forward_drops_everything_is_made_again_on_engine() {
    let platform = platform().await;
    let id = unique("blackhole");
    // A port no other test uses: packets to it are dropped after the engine's forward,
    // as when a stale rule sends a host port nowhere.
    let spec = serde_json::json!({
        "image": "localhost/busybox:latest", "command": ["httpd", "-f", "-p", "8347"],
        "ports": [8347], "health": {"tcp": {"port": 8347}}, "ready_timeout_seconds": 4
    });
    let target = TeardownTarget::Request(request(&id, spec.clone()).request_id);
    let Some(dropped) = DroppedPort::new(8347) else {
        eprintln!("skipped: iptables is not available to this user");
        return;
    };
    let error = platform
        .provision(&request(&id, spec.clone()))
        .await
        .expect_err("nothing answers through the forward");
    drop(dropped);
    assert_eq!(error.class, ErrorClass::Timeout, "{error}");
    assert!(error.retryable, "an engine fault, not the image's: {error}");
    assert!(error.message.contains("another port"), "{}", error.message);
    assert_eq!(
        platform.describe(&target).await.expect("describe"),
        None,
        "the unreachable container was removed"
    );
    // The retry makes a new container, which answers.
    let resource = platform
        .provision(&request(&id, spec))
        .await
        .expect("the retry provisions");
    assert_eq!(resource.endpoints[0].port, 8347);
    platform.teardown(&target).await.expect("teardown");
}
