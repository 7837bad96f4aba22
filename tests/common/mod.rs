//! The end-to-end harness: a private RabbitMQ vhost and Redis key prefix per test, worker
//! processes of the real `provisioner` binary, and the status topic collected in the test.
//! Needs RabbitMQ, Redis and Podman as `scripts/test.sh` starts them.
#![allow(dead_code)]

pub mod http;
pub mod oracle;
pub mod proxy;
pub mod scenario;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::Broker;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig};
use provisioner_events::StatusEvent;

pub const BIN: &str = env!("CARGO_BIN_EXE_provisioner");

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn aws_endpoint() -> String {
    std::env::var("PROVISIONER_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

pub fn ecs_endpoint() -> String {
    std::env::var("PROVISIONER_TEST_ECS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// An EC2 client on LocalStack with its dummy credentials.
pub fn ec2_client() -> aws_sdk_ec2::Client {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(aws_endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    )
}

/// An AMI in LocalStack's catalogue.
pub const LOCALSTACK_IMAGE: &str = "ami-03cf127a";

/// EC2 instances of this run on LocalStack, by request id (a batch-launched fleet
/// member's read from its launch index).
pub async fn ec2_instances(run_id: &str) -> HashMap<String, Vec<String>> {
    use aws_sdk_ec2::types::Filter;
    let ec2 = ec2_client();
    let mut by_request: HashMap<String, Vec<String>> = HashMap::new();
    let mut pages = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:test-run")
                .values(run_id)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.expect("describe instances");
        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
            let request = provisioner_aws_ec2::request_of(instance).unwrap_or_default();
            by_request
                .entry(request)
                .or_default()
                .push(instance.instance_id().unwrap_or_default().to_owned());
        }
    }
    by_request
}

/// An ECS client on moto with its dummy credentials.
pub fn ecs_client() -> aws_sdk_ecs::Client {
    use aws_sdk_ecs::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_ecs::Client::from_conf(
        aws_sdk_ecs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(ecs_endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    )
}

/// The cluster `demo` and the task definition `web:1` of the ECS example, on moto.
pub async fn ecs_demo_cluster() {
    let ecs = ecs_client();
    ecs.create_cluster()
        .cluster_name("demo")
        .send()
        .await
        .expect("moto must be running (the README's test command starts it)");
    if ecs
        .describe_task_definition()
        .task_definition("web:1")
        .send()
        .await
        .is_err()
    {
        ecs.register_task_definition()
            .family("web")
            .container_definitions(
                aws_sdk_ecs::types::ContainerDefinition::builder()
                    .name("web")
                    .image("public.ecr.aws/nginx/nginx:1.27")
                    .memory(512)
                    .essential(true)
                    .build(),
            )
            .send()
            .await
            .expect("register web");
    }
}

pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///run/podman/podman.sock".into())
}

/// Runs `rabbitmqctl`, failing the test if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    // Bounded: a broker that stalls fails the test instead of hanging the whole run.
    let output = Command::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/test.sh installs RabbitMQ)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Containers (all, stopped ones included) with a label (`key` or `key=value`), by the
/// request id they were made for.
async fn containers_labelled(label: &str) -> HashMap<String, Vec<String>> {
    let docker = bollard::Docker::connect_with_unix(
        docker_host().trim_start_matches("unix://"),
        30,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("docker");
    let filters = HashMap::from([("label", vec![label.to_owned()])]);
    let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let mut by_request: HashMap<String, Vec<String>> = HashMap::new();
    for container in docker.list_containers(Some(options)).await.expect("list") {
        let request = container
            .labels
            .as_ref()
            .and_then(|l| l.get(provisioner_docker::REQUEST_LABEL))
            .cloned()
            .unwrap_or_default();
        by_request
            .entry(request)
            .or_default()
            .push(container.id.unwrap_or_default());
    }
    by_request
}

/// One test's world: its own vhost, key prefix and container label.
pub struct TestEnv {
    pub run_id: String,
    pub vhost: String,
    pub amqp_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub broker: AmqpBroker,
    workers: Vec<Child>,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with_redis(redis_url()).await
    }

    pub async fn with_redis(redis_url: String) -> TestEnv {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let vhost = format!("test-{run_id}");
        rabbitmqctl(&["-q", "add_vhost", &vhost]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        let amqp_url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
        let mut config = AmqpConfig::new(&amqp_url);
        config.connection_name = format!("test-{run_id}");
        // The test observes every worker, whatever broker user a test gives it; an event
        // still needs a user_id the broker vouched for (tests/security.rs shows what a
        // subscriber with the default trust refuses).
        config.status_publishers = vec!["*".into()];
        let broker = AmqpBroker::connect(config)
            .await
            .expect("RabbitMQ must be running");
        TestEnv {
            redis_prefix: format!("test-{run_id}:"),
            run_id,
            vhost,
            amqp_url,
            redis_url,
            broker,
            workers: Vec::new(),
        }
    }

    /// Environment for a worker or CLI process of this test.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AMQP_URL", self.amqp_url.as_str()),
            ("REDIS_URL", self.redis_url.as_str()),
            ("REDIS_KEY_PREFIX", self.redis_prefix.as_str()),
            ("DOCKER_HOST", &docker_host()),
            ("LEASE_SECONDS", "3"),
            ("RETRY_BASE_MS", "300"),
            ("RETRY_MAX_SECONDS", "4"),
            ("SHUTDOWN_GRACE_SECONDS", "20"),
            ("PROVISIONER_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Starts a docker worker process; it is killed when the env drops.
    pub fn start_worker(&mut self, name: &str) -> usize {
        self.start_worker_with(name, &[])
    }

    pub fn start_worker_with(&mut self, name: &str, extra: &[(&str, &str)]) -> usize {
        self.start_platform_worker("docker", name, extra)
    }

    /// An aws-ec2 worker pointed at LocalStack with its dummy credentials.
    pub fn start_ec2_worker(&mut self, name: &str) -> usize {
        self.start_ec2_worker_with(name, &[])
    }

    pub fn start_ec2_worker_with(&mut self, name: &str, extra: &[(&str, &str)]) -> usize {
        let endpoint = aws_endpoint();
        let mut env = vec![
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ];
        env.extend_from_slice(extra);
        self.start_platform_worker("aws-ec2", name, &env)
    }

    /// An aws-ecs worker pointed at moto with its dummy credentials.
    pub fn start_ecs_worker(&mut self, name: &str) -> usize {
        let endpoint = ecs_endpoint();
        self.start_platform_worker(
            "aws-ecs",
            name,
            &[
                ("AWS_ENDPOINT_URL", endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_REGION", "us-east-1"),
            ],
        )
    }

    pub fn start_platform_worker(
        &mut self,
        platform: &str,
        name: &str,
        extra: &[(&str, &str)],
    ) -> usize {
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("provisioner-{}-{name}.log", self.run_id)),
        )
        .expect("log file");
        let child = Command::new(BIN)
            .args(["worker", "--platform", platform])
            .envs(self.env())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("WORKER_ID", format!("{name}-{}", self.run_id))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start worker");
        self.workers.push(child);
        self.workers.len() - 1
    }

    pub fn worker(&mut self, index: usize) -> &mut Child {
        &mut self.workers[index]
    }

    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(
            std::env::temp_dir().join(format!("provisioner-{}-{name}.log", self.run_id)),
        )
        .unwrap_or_default()
    }

    /// Waits until a worker's log says `text` (e.g. "consuming").
    pub async fn wait_for_log(&self, name: &str, text: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.worker_log(name).contains(text) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never logged {text:?}: {}",
                self.worker_log(name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn events(&self) -> Events {
        // The first call after a dropped connection may fail once while it reconnects.
        let mut attempts = 0;
        let stream = loop {
            match self.broker.subscribe_status().await {
                Ok(stream) => break stream,
                Err(e) if attempts < 3 => {
                    attempts += 1;
                    eprintln!("subscribe failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("subscribe: {e}"),
            }
        };
        Events {
            stream,
            seen: Vec::new(),
        }
    }

    /// Publishes raw bytes as a request, as any producer could.
    pub async fn publish_raw(&self, routing_key: &str, message_id: &str, body: &[u8]) {
        // Like `provisioner submit`: declare the platform's queue so a request published
        // before its worker is up waits for it (instead of going to provisioning.unrouted).
        let platform = routing_key.split('.').next().unwrap_or_default();
        if let Some(platform) = provisioner_events::PlatformName::parse(platform) {
            self.broker.declare(platform).await.expect("declare");
        }
        self.broker
            .publish_request(routing_key, message_id, body)
            .await
            .expect("publish");
    }

    pub async fn publish(&self, request: &serde_json::Value) {
        let id = request["request_id"].as_str().unwrap_or("none").to_owned();
        let key = format!(
            "{}.{}",
            request["platform"].as_str().unwrap_or("docker"),
            request["operation"].as_str().unwrap_or("provision")
        );
        self.publish_raw(&key, &id, request.to_string().as_bytes())
            .await;
    }

    /// A web container request labelled with this test's run id.
    pub fn web(&self, id: &str) -> serde_json::Value {
        self.web_with(id, serde_json::json!(["httpd", "-f", "-p", "8080"]))
    }

    pub fn web_with(&self, id: &str, command: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "schema_version": 1, "request_id": format!("{id}-{}", self.run_id),
            "operation": "provision", "platform": "docker",
            "spec": {"image": "localhost/busybox:latest", "command": command, "ports": [8080],
                     "env": {"GREETING": "hi"}, "health": {"http": {"port": 8080, "path": "/"}}},
            "labels": {"test-run": self.run_id}
        })
    }

    pub fn teardown(&self, id: &str, target: &str) -> serde_json::Value {
        serde_json::json!({
            "schema_version": 1, "request_id": format!("{id}-{}", self.run_id),
            "operation": "teardown", "platform": "docker", "target_request_id": target
        })
    }

    /// Containers this test made, by request id.
    pub async fn containers(&self) -> HashMap<String, Vec<String>> {
        containers_labelled(&format!("test-run={}", self.run_id)).await
    }

    /// Every container on the engine that a provisioner made, by request id.
    pub async fn all_containers(&self) -> HashMap<String, Vec<String>> {
        containers_labelled(provisioner_docker::REQUEST_LABEL).await
    }

    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.broker.queue_depth(queue).await.expect("queue depth")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "podman ps -aq --filter label=test-run={} | xargs -r podman rm -f -t 0",
                    self.run_id
                ),
            ])
            .output();
        let _ = Command::new("timeout")
            .args(["120", "rabbitmqctl", "-q", "delete_vhost", &self.vhost])
            .output();
    }
}

/// The status topic as the test saw it.
pub struct Events {
    stream: BoxStream<'static, StatusEvent>,
    pub seen: Vec<StatusEvent>,
}

impl Events {
    /// Waits for an event matching `want`, keeping every event seen.
    pub async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&StatusEvent) -> bool,
    ) -> StatusEvent {
        if let Some(found) = self.seen.iter().find(|e| want(e)) {
            return found.clone();
        }
        let result = tokio::time::timeout(timeout, async {
            loop {
                let event = self.stream.next().await.expect("status stream ended");
                self.seen.push(event.clone());
                if want(&event) {
                    return event;
                }
            }
        })
        .await;
        match result {
            Ok(event) => event,
            Err(_) => panic!("timed out waiting for {what}; seen: {:#?}", self.seen),
        }
    }

    pub async fn terminal(&mut self, request_id: &str) -> StatusEvent {
        let id = request_id.to_owned();
        self.until(
            Duration::from_secs(60),
            &format!("a terminal event of {request_id}"),
            move |e| e.request_id == id && e.state.is_terminal(),
        )
        .await
    }

    /// Waits until `count` terminal events of `request_id` have been seen.
    pub async fn terminal_count(&mut self, request_id: &str, count: usize) -> Vec<StatusEvent> {
        let id = request_id.to_owned();
        let result = tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                let terminal: Vec<StatusEvent> = self
                    .seen
                    .iter()
                    .filter(|e| e.request_id == id && e.state.is_terminal())
                    .cloned()
                    .collect();
                if terminal.len() >= count {
                    return terminal;
                }
                let event = self.stream.next().await.expect("status stream ended");
                self.seen.push(event);
            }
        })
        .await;
        result.unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {count} terminal events of {request_id}; seen: {:#?}",
                self.seen
            )
        })
    }

    /// Waits until `done` holds for every event seen so far.
    pub async fn until_all(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[StatusEvent]) -> bool,
    ) {
        // `done` may look at every event: ask it at most a few times a second.
        let result = tokio::time::timeout(timeout, async {
            let mut asked = tokio::time::Instant::now();
            if done(&self.seen) {
                return;
            }
            loop {
                let tick = Duration::from_millis(250);
                if let Ok(event) = tokio::time::timeout(tick, self.stream.next()).await {
                    self.seen.push(event.expect("status stream ended"));
                }
                if asked.elapsed() >= tick {
                    asked = tokio::time::Instant::now();
                    if done(&self.seen) {
                        return;
                    }
                }
            }
        })
        .await;
        if result.is_err() {
            panic!(
                "timed out waiting for {what}; seen {} events",
                self.seen.len()
            );
        }
    }

    /// Collects events for `extra` more time.
    pub async fn drain(&mut self, extra: Duration) {
        let _ = tokio::time::timeout(extra, async {
            while let Some(event) = self.stream.next().await {
                self.seen.push(event);
            }
        })
        .await;
    }

    pub fn of(&self, request_id: &str) -> Vec<&StatusEvent> {
        self.seen
            .iter()
            .filter(|e| e.request_id == request_id)
            .collect()
    }
}

/// Publishes `count` containers that serve only after `delay_s` seconds and waits until a
/// worker has started on the first: the moment to break something mid-provision.
/// Returns their request ids.
pub async fn start_slow_webs(
    env: &TestEnv,
    events: &mut Events,
    prefix: &str,
    count: usize,
    delay_s: u32,
) -> Vec<String> {
    let command = serde_json::json!([
        "sh",
        "-c",
        format!("sleep {delay_s}; exec httpd -f -p 8080")
    ]);
    let mut request_ids = Vec::new();
    for n in 0..count {
        let request = env.web_with(&format!("{prefix}{n}"), command.clone());
        env.publish(&request).await;
        request_ids.push(id(&request));
    }
    let first = request_ids[0].clone();
    events
        .until(Duration::from_secs(20), "a starting event", move |e| {
            e.request_id == first && e.state == provisioner_events::State::Starting
        })
        .await;
    request_ids
}

pub fn id(request: &serde_json::Value) -> String {
    request["request_id"]
        .as_str()
        .expect("request_id")
        .to_owned()
}

/// A Redis server of the test's own, so it can be killed and restarted.
pub struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
    /// Append-only (what a deployment should run) or nothing kept across a restart.
    persistent: bool,
}

impl PrivateRedis {
    fn start(port: u16, dir: &std::path::Path, persistent: bool) -> std::process::Child {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(if persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// A Redis that keeps its keys across a restart.
    pub fn new() -> Self {
        Self::started(true)
    }

    /// A Redis that loses every key when it restarts.
    pub fn ephemeral() -> Self {
        Self::started(false)
    }

    fn started(persistent: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let child = Self::start(port, &dir, persistent);
        PrivateRedis {
            port,
            dir,
            child,
            persistent,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("kill redis");
        self.child.wait().expect("reap redis");
    }

    pub fn restart(&mut self) {
        self.child = Self::start(self.port, &self.dir, self.persistent);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dead-letter queue of a platform.
pub fn dead_letter_queue(platform: &str) -> String {
    format!("provisioning.{platform}.dead-letter")
}

impl TestEnv {
    /// A connection of the test's own to its vhost, as a third-party client opens one
    /// (keep the connection: dropping it closes the channel).
    pub async fn raw_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let connection =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await
                .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        (connection, channel)
    }

    /// Calls RabbitMQ's management API on this test's vhost as the administrator:
    /// `path` follows `/api/<collection>/<vhost>/` (e.g. `policies/provisioner-work-docker`).
    /// Returns the status and the JSON body (null when there is none).
    pub async fn management(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (collection, rest) = path.split_once('/').unwrap_or((path, ""));
        let url = format!(
            "http://127.0.0.1:15672/api/{collection}/{}/{rest}",
            self.vhost
        );
        let mut request = reqwest::Client::new()
            .request(method, url)
            .basic_auth("guest", Some("guest"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .expect("the management API (scripts/dev-services.sh enables it)");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// Gets messages from `queue` one at a time and returns each to it (basic.nack with
    /// requeue), as a worker that crashes on them would, until the queue has none left
    /// to give: how many deliveries the broker made.
    pub async fn return_until_gone(&self, queue: &str) -> usize {
        let (_connection, channel) = self.raw_channel().await;
        let mut deliveries = 0;
        let mut empty_looks = 0;
        while empty_looks < 20 && deliveries < 1000 {
            let got = channel
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: false },
                )
                .await
                .expect("basic.get");
            match got {
                Some(message) => {
                    deliveries += 1;
                    empty_looks = 0;
                    message
                        .delivery
                        .acker
                        .nack(lapin::options::BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                        .expect("basic.nack");
                }
                None => {
                    empty_looks += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        deliveries
    }

    /// Takes every message from `queue`: its headers and its body.
    pub async fn take_all(&self, queue: &str) -> Vec<(lapin::types::FieldTable, Vec<u8>)> {
        let (_connection, channel) = self.raw_channel().await;
        let mut taken = Vec::new();
        while let Some(message) = channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            let delivery = message.delivery;
            taken.push((
                delivery.properties.headers().clone().unwrap_or_default(),
                delivery.data,
            ));
        }
        taken
    }

    /// Runs a `provisioner` command against this test's broker and store.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .envs(self.env())
            .output()
            .expect("run provisioner")
    }
}

/// Loads the shipped definitions (`infra/rabbitmq/definitions.json`, with
/// `rabbitmqctl import_definitions`) onto this test's vhost: the shared topology and the
/// docker platform's (every quorum queue costs the shared test broker memory), and the
/// users of the producer, the docker worker and the operator, named `<user>-<run id>`
/// (users are the broker's, not the vhost's) with the password `secret`. Returns the
/// users' names.
pub fn load_shipped_definitions(env: &TestEnv) -> Vec<String> {
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../infra/rabbitmq/definitions.json"
    );
    let mut definitions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped).expect("the shipped definitions"))
            .expect("JSON");
    definitions["vhosts"] = serde_json::json!([{ "name": env.vhost }]);
    let other_platform = |name: &str| {
        provisioner_events::PlatformName::ALL.iter().any(|p| {
            *p != provisioner_events::PlatformName::Docker
                && (name.starts_with(&format!("provisioning.{p}"))
                    || name == format!("provisioner-worker-{p}")
                    || name == format!("provisioner-work-{p}")
                    || name == format!("provisioner-side-{p}"))
        })
    };
    for kind in [
        "exchanges",
        "queues",
        "bindings",
        "policies",
        "users",
        "permissions",
        "topic_permissions",
    ] {
        let entities = definitions[kind].as_array_mut().expect("a list");
        entities.retain(|e| {
            let name = ["name", "destination", "user"]
                .iter()
                .find_map(|field| e[field].as_str())
                .unwrap_or_default();
            !other_platform(name)
        });
        for entity in entities.iter_mut() {
            if kind != "users" {
                entity["vhost"] = env.vhost.clone().into();
            }
            for field in ["name", "user"] {
                if (kind.contains("permissions") || kind == "users")
                    && let Some(user) = entity[field].as_str()
                {
                    entity[field] = format!("{user}-{}", env.run_id).into();
                }
            }
        }
    }
    let users: Vec<String> = definitions["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["name"].as_str().expect("a name").to_owned())
        .collect();
    let file = std::env::temp_dir().join(format!("definitions-{}.json", env.run_id));
    std::fs::write(&file, definitions.to_string()).expect("write");
    rabbitmqctl(&["-q", "import_definitions", file.to_str().expect("a path")]);
    let _ = std::fs::remove_file(&file);
    for user in &users {
        rabbitmqctl(&["-q", "change_password", user, "secret"]);
    }
    users
}

/// Publishes one message as `url`'s user and waits for the broker's confirm: the
/// broker's refusal (it closes the channel) as an error.
pub async fn publish_as(url: &str, exchange: &str, routing_key: &str) -> Result<(), String> {
    publish_as_with(url, exchange, routing_key, b"{}", None).await
}

/// [`publish_as`] with a body and, when given, the `user_id` property (which the broker
/// checks against the connection's user).
pub async fn publish_as_with(
    url: &str,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    user_id: Option<&str>,
) -> Result<(), String> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let confirmed = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                match user_id {
                    Some(user) => lapin::BasicProperties::default().with_user_id(user.into()),
                    None => lapin::BasicProperties::default(),
                },
            )
            .await?
            .await
    }
    .await;
    let _ = connection.close(200, "OK".into()).await;
    match confirmed {
        Ok(lapin::Confirmation::Nack(_)) => Err("nacked".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
