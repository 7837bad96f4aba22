//! Doors that open only for who belongs, on the real RabbitMQ, Redis and Podman: signed
//! requests (forged, tampered, stale and unsigned ones never run; keys rotate with two
//! valid at once), and secrets that never reach a log line, an event or a dead letter.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::{BIN, TestEnv, id, rabbitmqctl};
use provisioner_core::Broker;
use provisioner_core::signing::{SIGNATURE_HEADER, sign_with};
use provisioner_events::{ErrorClass, State, StatusEvent};

/// A fresh secret of 40 characters, with a marker that cannot occur by chance.
fn secret(name: &str) -> String {
    format!("{name}{}", uuid::Uuid::new_v4().simple())
}

/// Runs `provisioner submit --wait` on one request with `extra` settings.
fn submit(
    env: &TestEnv,
    request: &serde_json::Value,
    extra: &[(&str, &str)],
) -> std::process::Output {
    let file = std::env::temp_dir().join(format!(
        "submit-{}-{}.json",
        env.run_id,
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&file, request.to_string()).expect("write the request");
    let output = std::process::Command::new(BIN)
        .args(["submit", "--wait", "--timeout-seconds", "120"])
        .arg(&file)
        .envs(env.env())
        .envs(extra.iter().copied())
        .output()
        .expect("run submit");
    let _ = std::fs::remove_file(&file);
    output
}

/// Publishes a body as any producer could, with a signature header of its choosing.
async fn publish_signed(
    env: &TestEnv,
    routing_key: &str,
    request_id: &str,
    body: &[u8],
    signature: String,
) {
    env.broker
        .declare(provisioner_events::PlatformName::Docker)
        .await
        .expect("declare");
    env.broker
        .publish_request_with_headers(
            routing_key,
            request_id,
            body,
            &BTreeMap::from([(SIGNATURE_HEADER.to_owned(), signature)]),
        )
        .await
        .expect("publish");
}

/// The refusal of one message: `error`, class `permission`, about that message only.
async fn refused(events: &mut common::Events, request_id: &str, why: &str) -> StatusEvent {
    let id = request_id.to_owned();
    let event = events
        .until(
            Duration::from_secs(60),
            &format!("the refusal of {request_id}"),
            move |e| e.request_id == id && e.state == State::Error,
        )
        .await;
    let error = event.error.clone().expect("an error");
    assert_eq!(error.class, ErrorClass::Permission, "{event:#?}");
    assert!(error.message.contains(why), "{event:#?}");
    assert!(
        event.rejected_message.is_some(),
        "answers the message, not the request: {event:#?}"
    );
    event
}

/// Every dead letter of the docker platform, headers and body, as text.
async fn dead_letters(env: &TestEnv) -> String {
    // A refusal's event goes out before its message is dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text: String = env
            .take_all(&common::dead_letter_queue("docker"))
            .await
            .into_iter()
            .map(|(headers, body)| format!("{headers:?} {}\n", String::from_utf8_lossy(&body)))
            .collect();
        if !text.is_empty() {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused message is a dead letter"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn only_requests_signed_with_a_held_key_run_and_keys_rotate_with_two_valid_at_once() {
    let (old, new) = (secret("old-"), secret("new-"));
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    let held = format!("new={new},old={old}");
    env.start_worker_with(
        "signed",
        &[
            ("REQUEST_SIGNING_KEYS", held.as_str()),
            ("REQUEST_SIGNATURE_MAX_AGE_SECONDS", "3600"),
        ],
    );

    // A producer still on the old key, and one on the new: both run, a fleet's members
    // (which the worker publishes itself) included.
    let by_old = env.web("signed-old");
    let output = submit(
        &env,
        &by_old,
        &[("REQUEST_SIGNING_KEYS", &format!("old={old}"))],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fleet = serde_json::json!({
        "schema_version": 1, "request_id": format!("signed-fleet-{}", env.run_id),
        "operation": "provision", "platform": "docker", "count": 2,
        "spec": {"image": "localhost/busybox:latest", "command": ["sleep", "600"]},
        "labels": {"test-run": env.run_id}
    });
    let output = submit(&env, &fleet, &[("REQUEST_SIGNING_KEYS", held.as_str())]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Unsigned.
    let unsigned = env.web("signed-none");
    env.publish(&unsigned).await;
    refused(&mut events, &id(&unsigned), "not signed").await;
    // Signed, then altered.
    let tampered = env.web("signed-tampered");
    let signature = sign_with(
        "new",
        new.as_bytes(),
        "docker.provision",
        tampered.to_string().as_bytes(),
        SystemTime::now(),
    );
    let mut altered = tampered.clone();
    altered["spec"]["command"] = serde_json::json!(["sh", "-c", "echo owned; sleep 600"]);
    publish_signed(
        &env,
        "docker.provision",
        &id(&tampered),
        altered.to_string().as_bytes(),
        signature,
    )
    .await;
    refused(&mut events, &id(&tampered), "altered").await;
    // Signed too long ago.
    let stale = env.web("signed-stale");
    let body = stale.to_string();
    let signature = sign_with(
        "new",
        new.as_bytes(),
        "docker.provision",
        body.as_bytes(),
        SystemTime::now() - Duration::from_secs(7200),
    );
    publish_signed(
        &env,
        "docker.provision",
        &id(&stale),
        body.as_bytes(),
        signature,
    )
    .await;
    refused(&mut events, &id(&stale), "stale").await;
    // Forged with a key the workers do not hold: a teardown of the running request, which
    // must neither run nor end that request.
    let forged = env.teardown("signed-forged", &id(&by_old));
    let body = forged.to_string();
    let signature = sign_with(
        "evil",
        b"a-key-nobody-issued-0123456789abcdef",
        "docker.teardown",
        body.as_bytes(),
        SystemTime::now(),
    );
    publish_signed(
        &env,
        "docker.teardown",
        &id(&forged),
        body.as_bytes(),
        signature,
    )
    .await;
    refused(&mut events, &id(&forged), "does not hold").await;

    // Nothing refused ran; the refused messages are dead letters; the real requests stand.
    let containers = env.containers().await;
    assert!(containers.contains_key(&id(&by_old)), "{containers:?}");
    assert_eq!(
        containers.len(),
        3,
        "the web and the fleet's two: {containers:?}"
    );
    // A refusal's event goes out before its message is dead-lettered: wait for the four.
    let dead_letters = common::dead_letter_queue("docker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.queue_depth(&dead_letters).await < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused messages are set aside"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = env.cli(&["status", &id(&by_old)]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("running"),
        "{status:?}"
    );
}

/// Marker secrets in every place a secret lives (the broker password, the signing keys,
/// cloud credentials in the environment): a scenario at debug level with a success, an
/// error, a refusal and a teardown, and a worker that cannot connect, leaves none of them
/// in any log line, status event or dead letter.
#[tokio::test]
async fn no_secret_reaches_a_log_line_an_event_or_a_dead_letter() {
    let mut env = TestEnv::new().await;
    let password = secret("brokerpass");
    let user = format!("provisioner-leak-{}", env.run_id);
    rabbitmqctl(&["-q", "add_user", &user, &password]);
    rabbitmqctl(&[
        "-q",
        "set_permissions",
        "-p",
        &env.vhost,
        &user,
        ".*",
        ".*",
        ".*",
    ]);
    let amqp_url = format!("amqp://{user}:{password}@127.0.0.1:5672/{}", env.vhost);
    let signing = secret("signingkey");
    let aws_secret = secret("awssecret");
    let keys = format!("k1={signing}");
    let secrets = [password.as_str(), signing.as_str(), aws_secret.as_str()];
    let settings = [
        ("AMQP_URL", amqp_url.as_str()),
        ("REQUEST_SIGNING_KEYS", keys.as_str()),
        ("AWS_ACCESS_KEY_ID", "AKIAMARKERMARKER"),
        ("AWS_SECRET_ACCESS_KEY", aws_secret.as_str()),
        ("PROVISIONER_LOG", "debug"),
    ];
    let mut events = env.events().await;
    env.start_worker_with("leak", &settings);

    let mut said = String::new();
    let web = env.web("leak-web");
    let missing = serde_json::json!({
        "schema_version": 1, "request_id": format!("leak-missing-{}", env.run_id),
        "operation": "provision", "platform": "docker",
        "spec": {"image": "localhost/no-such-image:never"}, "labels": {"test-run": env.run_id}
    });
    let down = env.teardown("leak-down", &id(&web));
    for request in [&web, &missing, &down] {
        let output = submit(&env, request, &settings);
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        said.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    assert_eq!(events.terminal(&id(&web)).await.state, State::Running);
    assert_eq!(events.terminal(&id(&missing)).await.state, State::Error);
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    let unsigned = env.web("leak-unsigned");
    env.publish(&unsigned).await;
    refused(&mut events, &id(&unsigned), "not signed").await;
    events.drain(Duration::from_secs(1)).await;

    // A worker that cannot reach its broker says so without the password.
    let unreachable = std::process::Command::new(BIN)
        .args(["worker", "--platform", "docker"])
        .envs(env.env())
        .envs(settings)
        .env(
            "AMQP_URL",
            format!("amqp://{user}:{password}@127.0.0.1:1/x"),
        )
        .output()
        .expect("run a worker");
    said.push_str(&String::from_utf8_lossy(&unreachable.stderr));
    assert!(
        said.contains("127.0.0.1:1"),
        "it names the broker it could not reach: {said}"
    );

    let log = env.worker_log("leak");
    assert!(
        log.contains("DEBUG"),
        "the worker logged at debug level:\n{log}"
    );
    let everything = [
        ("the worker's log", log),
        ("the commands' output", said),
        ("the status events", format!("{:?}", events.seen)),
        ("the dead letters", dead_letters(&env).await),
    ];
    for (place, text) in &everything {
        for secret in secrets {
            assert!(!text.contains(secret), "a secret is in {place}:\n{text}");
        }
    }
    rabbitmqctl(&["-q", "delete_user", &user]);
}

/// The TLS-only Redis of `scripts/dev-services.sh`, as an administrator.
fn redis_tls(args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &tls_ca(),
            "-h",
            "127.0.0.1",
            "-p",
            "6390",
        ])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// The test CA `scripts/dev-services.sh` made.
fn tls_ca() -> String {
    let dir = std::env::var("PROVISIONER_TLS_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/provisioner-tls",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    format!("{dir}/ca.pem")
}

/// Encrypted connections to both services, as the Docker worker's Redis user of
/// `provisioner redis-users` (its platform's keys, no dangerous command): a worker on `amqps://` and
/// `rediss://` provisions, runs a fleet and tears down; the Redis user is refused other
/// keys and dangerous commands; and a worker that does not trust the broker's
/// certificate does not connect.
#[tokio::test]
async fn workers_speak_tls_to_rabbitmq_and_redis_as_a_least_privilege_redis_user() {
    let mut env = TestEnv::new().await;
    let password = secret("redispass");
    // The Docker worker's user of `provisioner redis-users`, on the TLS-only Redis.
    let rename = make_redis_users_with(&env, &password, redis_tls);
    let user = rename("provisioner-worker-docker");
    let prefix = env.redis_prefix.clone();
    // The worker's and the commands' Redis: the TLS one, as that user.
    env.redis_url = format!("rediss://{user}:{password}@127.0.0.1:6390");
    let amqps = format!("amqps://guest:guest@localhost:5671/{}", env.vhost);
    let ca = tls_ca();
    let tls = [("AMQP_URL", amqps.as_str()), ("SSL_CERT_FILE", ca.as_str())];
    let mut events = env.events().await;
    env.start_worker_with("tls", &tls);

    let web = env.web("tls-web");
    let output = submit(&env, &web, &tls);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        env.worker_log("tls")
    );
    let fleet = serde_json::json!({
        "schema_version": 1, "request_id": format!("tls-fleet-{}", env.run_id),
        "operation": "provision", "platform": "docker", "count": 2,
        "spec": {"image": "localhost/busybox:latest", "command": ["sleep", "600"]},
        "labels": {"test-run": env.run_id}, "ttl_seconds": 3600, "tenant": "tls"
    });
    let output = submit(&env, &fleet, &tls);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        env.worker_log("tls")
    );
    let down = env.teardown("tls-down", &id(&web));
    let output = submit(&env, &down, &tls);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    assert_eq!(env.containers().await.len(), 2, "the fleet's two");
    let log = env.worker_log("tls");
    assert!(
        !log.contains("NOPERM"),
        "the worker needed a command or key its user lacks:\n{log}"
    );

    // The user's limits.
    let as_user = |args: &[&str]| {
        let mut all = vec![
            "--user",
            user.as_str(),
            "--pass",
            password.as_str(),
            "--no-auth-warning",
        ];
        all.extend_from_slice(args);
        redis_tls(&all)
    };
    assert!(as_user(&["GET", "someone-else:key"]).contains("NOPERM"));
    assert!(as_user(&["FLUSHALL"]).contains("NOPERM"));
    assert!(as_user(&["GET", &format!("{prefix}process:anything")]).contains("NOPERM"));
    assert!(!as_user(&["GET", &format!("{prefix}docker:anything")]).contains("NOPERM"));

    // Without the CA, the broker's certificate is not trusted: no connection.
    let untrusting = std::process::Command::new(BIN)
        .args(["worker", "--platform", "docker"])
        .envs(env.env())
        .env("AMQP_URL", &amqps)
        .env("SSL_CERT_FILE", "/dev/null")
        .output()
        .expect("run a worker");
    assert_eq!(untrusting.status.code(), Some(69), "{untrusting:?}");
    for line in String::from_utf8_lossy(&env.cli(&["redis-users"]).stdout).lines() {
        if let Some(name) = line.split_whitespace().nth(2) {
            redis_tls(&["ACL", "DELUSER", &rename(name)]);
        }
    }
}

/// The attacker is anyone who may publish a request, with a spec made to leave the
/// sandbox a worker gives it: a container on a named network (where Redis and RabbitMQ
/// sit) or on Podman's modes that reach the host's loopback; a program that loads the
/// attacker's library, or reads the worker's secrets from its environment. Each is
/// refused before anything runs, and what does run gets none of the worker's secrets.
#[tokio::test]
async fn a_malicious_spec_cannot_leave_its_sandbox_on_docker_or_process() {
    let mut env = TestEnv::new().await;
    env.start_worker("docker-sandbox");
    let process_allow = "httpd=/bin/busybox[httpd -f -p 127.0.0.1:{port}]";
    env.start_platform_worker(
        "process",
        "process-sandbox",
        &[
            ("PROCESS_ALLOW", process_allow),
            ("PROCESS_ALLOWED_ENV", "APP_*"),
        ],
    );
    let mut events = env.events().await;

    let mut escapes = Vec::new();
    for (n, network) in [
        "slirp4netns:allow_host_loopback=true",
        "pasta:--map-gw",
        "podman",
        "host",
        "container:prov-anything",
        "ns:/proc/1/ns/net",
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = env.web(&format!("net-{n}"));
        request["spec"]["network_mode"] = network.into();
        env.publish(&request).await;
        escapes.push((id(&request), network.to_owned()));
    }
    for (n, spec) in [
        serde_json::json!({"program": "httpd", "args": ["httpd", "-f", "-p", "127.0.0.1:{port}"], "env": {"LD_PRELOAD": "/tmp/evil.so"}}),
        serde_json::json!({"program": "httpd", "args": ["httpd", "-f", "-p", "127.0.0.1:{port}"], "env": {"PATH": "/tmp/evil"}}),
        serde_json::json!({"program": "httpd", "args": ["httpd", "-f", "-p", "127.0.0.1:{port}"], "env": {"SECRET_NAME": "x"}}),
        serde_json::json!({"program": "httpd", "args": ["sh", "-c", "env"]}),
        serde_json::json!({"program": "httpd", "args": ["httpd", "-f", "-p", "127.0.0.1:{port}", "-h", "/"]}),
    ]
    .into_iter()
    .enumerate()
    {
        let request = serde_json::json!({
            "schema_version": 1, "request_id": format!("proc-{n}-{}", env.run_id),
            "operation": "provision", "platform": "process", "spec": spec
        });
        env.publish(&request).await;
        escapes.push((id(&request), spec.to_string()));
    }
    for (request_id, what) in &escapes {
        let event = events.terminal(request_id).await;
        assert_eq!(event.state, State::Error, "{what}: {event:#?}");
        let error = event.error.expect("why");
        assert_eq!(error.class, ErrorClass::Permission, "{what}: {error:?}");
        assert!(
            !error.message.contains("/tmp/evil"),
            "the value is not echoed: {}",
            error.message
        );
    }
    assert!(env.containers().await.is_empty(), "no container was made");

    // What the worker does run gets the spec's allowed variables and its own, nothing of
    // the worker's environment (AMQP_URL, REDIS_URL, …).
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("proc-ok-{}", env.run_id),
        "operation": "provision", "platform": "process",
        "spec": {"program": "httpd", "args": ["httpd", "-f", "-p", "127.0.0.1:{port}"], "env": {"APP_MODE": "x"}}
    });
    env.publish(&request).await;
    let running = events.terminal(&id(&request)).await;
    assert_eq!(running.state, State::Running, "{running:#?}");
    let pid = running.resource.expect("resource").id;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the child's environment");
    let environ = String::from_utf8_lossy(&environ);
    for secret in [
        "AMQP_URL",
        "REDIS_URL",
        "amqp://",
        "redis://",
        "PROCESS_ALLOW",
    ] {
        assert!(
            !environ.contains(secret),
            "{secret} reached the child: {environ}"
        );
    }
    assert!(environ.contains("APP_MODE=x"), "{environ}");
    let teardown = serde_json::json!({
        "schema_version": 1, "request_id": format!("proc-ok-down-{}", env.run_id),
        "operation": "teardown", "platform": "process", "target_request_id": id(&request)
    });
    env.publish(&teardown).await;
    assert_eq!(events.terminal(&id(&teardown)).await.state, State::Stopped);
}

/// The attacker holds a producer's credentials (and, on a signing deployment, a key):
/// it tries to take the ids and fields kept for the workers, or to tear down the
/// workers' own request before they send it (so an expiry would never happen), and to have its signature checked against a routing key it wrote in a
/// header. Each is refused; what the workers send themselves still happens. A message
/// whose body cannot be read is answered under its AMQP message_id, so a producer
/// waiting on it hears why.
#[tokio::test]
async fn a_producer_cannot_take_the_workers_ids_fields_or_routing_key() {
    let key = secret("k-");
    let keys = format!("k1={key}");
    let mut env = TestEnv::new().await;
    env.start_worker_with(
        "producer-attacks",
        &[
            ("REQUEST_SIGNING_KEYS", keys.as_str()),
            ("EXPIRE_EVERY_MS", "200"),
        ],
    );
    let mut events = env.events().await;
    let sign = |routing_key: &str, body: &[u8]| {
        sign_with("k1", key.as_bytes(), routing_key, body, SystemTime::now())
    };

    // A resource with a short life, and the attacker's teardown under its expiry's id
    // sent first: refused, so the real expiry still tears it down.
    let mut web = env.web("expiring");
    web["ttl_seconds"] = 4.into();
    let web_id = id(&web);
    let body = web.to_string();
    publish_signed(
        &env,
        "docker.provision",
        &web_id,
        body.as_bytes(),
        sign("docker.provision", body.as_bytes()),
    )
    .await;
    assert_eq!(events.terminal(&web_id).await.state, State::Running);
    let expiry_id = format!("{web_id}#expired");
    let forged = [
        (
            expiry_id.clone(),
            serde_json::json!({"schema_version": 1, "request_id": expiry_id, "operation": "teardown",
                "platform": "docker", "target_request_id": "nothing-here"}),
        ),
        // A teardown of the expiry itself would tombstone its id before the worker
        // sends it.
        (
            format!("tomb-{}", env.run_id),
            serde_json::json!({"schema_version": 1, "request_id": format!("tomb-{}", env.run_id),
                "operation": "teardown", "platform": "docker", "target_request_id": expiry_id}),
        ),
        (
            format!("caused-{}", env.run_id),
            serde_json::json!({"schema_version": 1, "request_id": format!("caused-{}", env.run_id),
                "operation": "teardown", "platform": "docker", "target_request_id": web_id,
                "cause": "expired: trust me"}),
        ),
        (format!("member-{}", env.run_id), {
            let mut member = env.web("member");
            member["fleet_member"] =
                serde_json::json!({"fleet_request_id": "f", "index": 0, "count": 2});
            member
        }),
    ];
    for (request_id, request) in &forged {
        let body = request.to_string();
        let key = format!(
            "docker.{}",
            request["operation"].as_str().expect("operation")
        );
        publish_signed(
            &env,
            &key,
            request_id,
            body.as_bytes(),
            sign(&key, body.as_bytes()),
        )
        .await;
        let event = events
            .until(Duration::from_secs(60), request_id, |e| {
                &e.request_id == request_id && e.rejected_message.is_some()
            })
            .await;
        let error = event.error.expect("why");
        assert_eq!(
            error.class,
            ErrorClass::InvalidRequest,
            "{request_id}: {error:?}"
        );
    }
    // The real expiry runs: its teardown ends `stopped` and the container is gone.
    let expired = events
        .until(Duration::from_secs(60), "the real expiry's end", |e| {
            e.request_id == expiry_id && e.state.is_terminal() && e.rejected_message.is_none()
        })
        .await;
    assert_eq!(expired.state, State::Stopped, "{expired:#?}");
    assert!(
        env.containers().await.is_empty(),
        "the expired container is gone"
    );

    // A signature made for one routing key, published under another with a header
    // naming the first: checked against the key the broker routed it by, so refused.
    let request = env.web("moved-key");
    let body = request.to_string();
    env.broker
        .publish_request_with_headers(
            "docker.provision",
            &id(&request),
            body.as_bytes(),
            &BTreeMap::from([
                (
                    SIGNATURE_HEADER.to_owned(),
                    sign("docker.teardown", body.as_bytes()),
                ),
                (
                    "x-provisioner-routing-key".to_owned(),
                    "docker.teardown".to_owned(),
                ),
            ]),
        )
        .await
        .expect("publish");
    refused(&mut events, &id(&request), "altered").await;

    // Bodies that cannot be read are answered under their message_id.
    for (n, body) in [b"{not json".to_vec(), vec![b' '; 300 * 1024]]
        .into_iter()
        .enumerate()
    {
        let message_id = format!("unreadable-{n}-{}", env.run_id);
        env.publish_raw("docker.provision", &message_id, &body)
            .await;
        let event = events.terminal(&message_id).await;
        assert_eq!(event.state, State::Error, "{event:#?}");
        assert_eq!(event.platform, "docker", "{event:#?}");
        assert_eq!(event.error.expect("why").class, ErrorClass::InvalidRequest);
        assert!(event.rejected_message.is_some());
    }
    assert!(
        env.containers().await.is_empty(),
        "nothing of the attacks was made"
    );

    // The operator redrives the dead letters: the refused forgeries go back the
    // producers' way and are refused again. A redrive never makes a producer's message
    // a worker's (the member would otherwise run).
    let member_id = format!("member-{}", env.run_id);
    let redrive_at = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let redriven = env.cli(&["redrive", "--platform", "docker"]);
    assert!(
        redriven.status.success(),
        "{}",
        String::from_utf8_lossy(&redriven.stderr)
    );
    let again = events
        .until(
            Duration::from_secs(60),
            "the redriven member's refusal",
            |e| {
                e.request_id == member_id
                    && e.rejected_message.is_some()
                    && e.timestamp.unix_timestamp() >= redrive_at
            },
        )
        .await;
    assert_eq!(again.error.expect("why").class, ErrorClass::InvalidRequest);
    assert!(
        env.containers().await.is_empty(),
        "no forgery ran once redriven"
    );

    // Past the broker's message size (1 MiB, scripts/dev-services.sh and the compose
    // file), a message is refused at publish: it never reaches a worker's memory.
    let huge = vec![b' '; 2 << 20];
    assert!(
        env.broker
            .publish_request("docker.provision", "huge", &huge)
            .await
            .is_err(),
        "the broker takes no message over 1 MiB"
    );
}

/// The attackers are a producer (who may publish the subscription probe on
/// `provisioning.status`) and one platform's worker (who may publish status events of
/// its own platform), both with the shipped definitions' users. Their forged `running`
/// events (under the probe's key, under a key its body does not match, with another
/// user's `user_id`, for another platform) are refused by the broker or not believed by
/// subscribers: a producer's `submit --wait` ends only with the real worker's event.
#[tokio::test]
async fn forged_status_events_are_refused_or_not_believed() {
    let mut env = TestEnv::new().await;
    let users = common::load_shipped_definitions(&env);
    let url = |role: &str| {
        format!(
            "amqp://provisioner-{role}-{}:secret@127.0.0.1:5672/{}",
            env.run_id, env.vhost
        )
    };
    let (worker, producer) = (url("worker-docker"), url("producer"));
    let publishers = format!("provisioner-worker-{{platform}}-{}", env.run_id);

    // A producer waits on its request; no worker runs yet.
    let request = env.web("awaited");
    let request_id = id(&request);
    let file = std::env::temp_dir().join(format!("awaited-{}.json", env.run_id));
    std::fs::write(&file, request.to_string()).expect("write the request");
    let mut waiting = std::process::Command::new(BIN)
        .args(["submit", "--wait", "--json", "--timeout-seconds", "120"])
        .arg(&file)
        .envs(env.env())
        .env("AMQP_URL", &producer)
        .env("STATUS_PUBLISHERS", &publishers)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run submit");
    // Until the request is in its queue, submit has not subscribed yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.queue_depth("provisioning.docker").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "submit never published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let forged = |platform: &str| {
        serde_json::json!({
            "schema_version": 1, "request_id": request_id, "operation": "provision",
            "platform": platform, "state": "running", "seq": 9, "attempt": 1,
            "timestamp": "2026-12-07T00:00:00Z",
            "resource": {"id": "evil", "name": "evil", "address": "203.0.113.66", "endpoints": []}
        })
        .to_string()
    };
    let docker = forged("docker");
    let worker_user = format!("provisioner-worker-docker-{}", env.run_id);
    for (who, url, key, body, user_id, broker_refuses) in [
        // Allowed to publish the probe: its body is never read as an event.
        (
            "the producer",
            &producer,
            "provisioner.subscription-probe",
            docker.clone(),
            None,
            false,
        ),
        // Another user's name in user_id: the broker refuses the message.
        (
            "the producer",
            &producer,
            "provisioner.subscription-probe",
            docker.clone(),
            Some(worker_user.as_str()),
            true,
        ),
        // The producer may publish no event key.
        (
            "the producer",
            &producer,
            "docker.running",
            docker.clone(),
            None,
            true,
        ),
        // The docker worker may not publish another platform's keys…
        (
            "the docker worker",
            &worker,
            "process.running",
            forged("process"),
            Some(worker_user.as_str()),
            true,
        ),
        // …and under its own key, a body of another platform is not believed.
        (
            "the docker worker",
            &worker,
            "docker.running",
            forged("process"),
            Some(worker_user.as_str()),
            false,
        ),
        // An event without user_id: nobody vouches for it.
        (
            "the docker worker",
            &worker,
            "docker.running",
            docker.clone(),
            None,
            false,
        ),
    ] {
        let published =
            common::publish_as_with(url, "provisioning.status", key, body.as_bytes(), user_id)
                .await;
        assert_eq!(
            published.is_err(),
            broker_refuses,
            "{who} publishing {key} with user_id {user_id:?}: {published:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        waiting.try_wait().expect("submit").is_none(),
        "a forged event ended the wait"
    );

    // The real worker's event ends it, with the real address.
    env.start_worker_with("real", &[("AMQP_URL", worker.as_str())]);
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .expect("join")
        .expect("submit");
    let _ = std::fs::remove_file(&file);
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !said.contains("203.0.113.66") && !said.contains("evil"),
        "{said}"
    );
    assert!(said.contains("\"running\""), "{said}");
    for user in users {
        rabbitmqctl(&["-q", "delete_user", &user]);
    }
}

/// The attacker is one team's producer on a deployment binding broker users to tenants
/// (`TENANTS=user:…`): it names another team's tenant (to spend its quota), names none
/// (to skip quotas), or leaves out `user_id` so nobody vouches for it. Each is refused;
/// its own tenant's request runs. The broker refuses a `user_id` other than the
/// publisher's own, so the binding cannot be borrowed.
#[tokio::test]
async fn a_producer_bound_to_a_tenant_cannot_spend_another_tenants_quota() {
    let mut env = TestEnv::new().await;
    let users = common::load_shipped_definitions(&env);
    let producer_user = format!("provisioner-producer-{}", env.run_id);
    let url = |role: &str| {
        format!(
            "amqp://provisioner-{role}-{}:secret@127.0.0.1:5672/{}",
            env.run_id, env.vhost
        )
    };
    let (worker, producer) = (url("worker-docker"), url("producer"));
    // The test's own client (guest) stands for an operator.
    let tenants = format!("user:{producer_user}=team-a,user:guest=*");
    env.start_worker_with(
        "tenants",
        &[("AMQP_URL", worker.as_str()), ("TENANTS", tenants.as_str())],
    );
    let mut events = env.events().await;
    let request = |name: &str, tenant: Option<&str>| {
        let mut request = env.web(name);
        if let Some(tenant) = tenant {
            request["tenant"] = tenant.into();
        }
        request
    };
    for (request, user_id) in [
        (
            request("other-team", Some("team-b")),
            Some(producer_user.as_str()),
        ),
        (request("no-team", None), Some(producer_user.as_str())),
        (request("unvouched", Some("team-a")), None),
    ] {
        common::publish_as_with(
            &producer,
            "provisioning.requests",
            "docker.provision",
            request.to_string().as_bytes(),
            user_id,
        )
        .await
        .expect("the producer may publish requests");
        let event = events.terminal(&id(&request)).await;
        let error = event.error.clone().expect("refused");
        assert_eq!(error.class, ErrorClass::Permission, "{event:#?}");
        assert!(
            error.message.contains("team-a") || error.message.contains("user_id"),
            "{event:#?}"
        );
    }
    // Another user's name in user_id: the broker refuses the message itself.
    let borrowed = common::publish_as_with(
        &producer,
        "provisioning.requests",
        "docker.provision",
        request("borrowed", Some("team-a")).to_string().as_bytes(),
        Some("provisioner-operator"),
    )
    .await;
    assert!(borrowed.is_err(), "{borrowed:?}");
    assert!(
        env.containers().await.is_empty(),
        "nothing refused was made"
    );

    let own = request("own-team", Some("team-a"));
    common::publish_as_with(
        &producer,
        "provisioning.requests",
        "docker.provision",
        own.to_string().as_bytes(),
        Some(producer_user.as_str()),
    )
    .await
    .expect("publish");
    assert_eq!(events.terminal(&id(&own)).await.state, State::Running);

    // Team B's resource, made by the operator: the team-a producer may not tear it
    // down; its own, it may.
    let theirs = request("their-team", Some("team-b"));
    env.publish(&theirs).await;
    assert_eq!(events.terminal(&id(&theirs)).await.state, State::Running);
    for (name, target, state) in [
        ("down-theirs", id(&theirs), State::Error),
        ("down-own", id(&own), State::Stopped),
    ] {
        let mut teardown = env.teardown(name, &target);
        teardown["tenant"] = "team-a".into();
        common::publish_as_with(
            &producer,
            "provisioning.requests",
            "docker.teardown",
            teardown.to_string().as_bytes(),
            Some(producer_user.as_str()),
        )
        .await
        .expect("publish");
        let event = events.terminal(&id(&teardown)).await;
        assert_eq!(event.state, state, "{event:#?}");
    }
    let left = env.containers().await;
    assert!(
        left.contains_key(&id(&theirs)),
        "team b's container stays: {left:?}"
    );
    assert!(!left.contains_key(&id(&own)), "{left:?}");
    for user in users {
        rabbitmqctl(&["-q", "delete_user", &user]);
    }
}

/// The plain Redis of `scripts/dev-services.sh` (the tests' own), as `user` or as the
/// administrator (`None`).
fn redis_as(user: Option<(&str, &str)>, args: &[&str]) -> String {
    let mut command = std::process::Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", "6379"]);
    if let Some((user, password)) = user {
        command.args(["--user", user, "--pass", password, "--no-auth-warning"]);
    }
    let output = command.args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Makes the users `provisioner redis-users` prints for the run's prefix on the plain
/// Redis, each named with the run's id (tests run at once), on with `password`. Returns
/// the renaming.
fn make_redis_users(env: &TestEnv, password: &str) -> impl Fn(&str) -> String + use<> {
    make_redis_users_with(env, password, |args| redis_as(None, args))
}

/// [`make_redis_users`] through `admin` (a `redis-cli` of one Redis, as its administrator).
fn make_redis_users_with<A: Fn(&[&str]) -> String>(
    env: &TestEnv,
    password: &str,
    admin: A,
) -> impl Fn(&str) -> String + use<A> {
    let output = env.cli(&["redis-users"]);
    assert!(output.status.success(), "{output:?}");
    let run = env.run_id.clone();
    let rename = move |user: &str| user.replacen("provisioner-", &format!("provisioner-{run}-"), 1);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        assert_eq!(&args[..2], ["ACL", "SETUSER"], "{line}");
        args[2] = rename(&args[2]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(admin(&args).contains("OK"), "{line}");
        let on = admin(&["ACL", "SETUSER", args[2], "on", &format!(">{password}")]);
        assert!(on.contains("OK"), "{on}");
    }
    rename
}

/// The attacker holds one platform's Redis credentials (the Docker worker's user of
/// `provisioner redis-users`), not the signing keys. A signing worker runs as that user
/// through a fleet with an expiry and a teardown, needing nothing more. The attacker
/// cannot read or write another platform's records, fleets or schedules, raise a
/// tenant's limit, or list keys; and what it can write — a fleet put on Docker's own
/// schedule, unsealed or a real one's sealed request moved to another id — is dropped by
/// the coordinator, and nothing of it is published or made.
#[tokio::test]
async fn one_platforms_redis_user_reaches_no_other_platform_and_plants_no_fleet() {
    let mut env = TestEnv::new().await;
    let password = secret("redis-");
    let rename = make_redis_users(&env, &password);
    let user = rename("provisioner-worker-docker");
    let prefix = env.redis_prefix.clone();
    env.redis_url = format!("redis://{user}:{password}@127.0.0.1:6379");
    let keys = format!("k1={}", secret("signing-key-"));
    let signing = [("REQUEST_SIGNING_KEYS", keys.as_str())];
    let mut events = env.events().await;
    env.start_worker_with("docker-user", &signing);

    let fleet = serde_json::json!({
        "schema_version": 1, "request_id": format!("redis-fleet-{}", env.run_id),
        "operation": "provision", "platform": "docker", "count": 2,
        "spec": {"image": "localhost/busybox:latest", "command": ["sleep", "600"]},
        "labels": {"test-run": env.run_id}, "ttl_seconds": 3600, "tenant": "redis"
    });
    let output = submit(&env, &fleet, &signing);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        env.worker_log("docker-user")
    );
    let web = env.web("redis-web");
    assert!(submit(&env, &web, &signing).status.success());
    let down = env.teardown("redis-down", &id(&web));
    assert!(submit(&env, &down, &signing).status.success());
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    let log = env.worker_log("docker-user");
    assert!(
        !log.contains("NOPERM"),
        "the worker needed more than its user:\n{log}"
    );

    // Another platform's keys, the tenants' limits, the key space: refused.
    let as_docker = |args: &[&str]| redis_as(Some((&user, &password)), args);
    for attempt in [
        vec![
            "HSET",
            &format!("{prefix}process:req:x") as &str,
            "state",
            "running",
        ],
        vec!["SET", &format!("{prefix}process:fleet:x"), "{}"],
        vec![
            "ZADD",
            &format!("{prefix}process:expiries:process/fleets"),
            "0",
            "x",
        ],
        vec!["HGETALL", &format!("{prefix}aws-ec2:req:anything")],
        vec!["HSET", &format!("{prefix}quota:redis"), "limit", "1000000"],
        vec!["SCAN", "0"],
        vec!["KEYS", "*"],
        vec!["FLUSHALL"],
    ] {
        let answer = as_docker(&attempt);
        assert!(
            answer.contains("NOPERM"),
            "{attempt:?} was allowed: {answer}"
        );
    }
    assert!(!as_docker(&["HGET", &format!("{prefix}quota:redis"), "limit"]).contains("NOPERM"));

    // Docker's own keys: a fleet planted unsealed, and the real fleet's sealed request
    // moved to another id, each put on the coordinators' schedule.
    let real = as_docker(&["GET", &format!("{prefix}docker:fleet:{}", id(&fleet))]);
    assert!(real.starts_with("sealed-v1 key=k1,"), "{real}");
    let planted = format!("planted-{}", env.run_id);
    let moved = format!("moved-{}", env.run_id);
    let mut plain = fleet.clone();
    plain["request_id"] = planted.clone().into();
    plain["count"] = 3.into();
    for (name, stored) in [
        (&planted, plain.to_string()),
        (&moved, real.trim_end().to_owned()),
    ] {
        let set = as_docker(&["SET", &format!("{prefix}docker:fleet:{name}"), &stored]);
        assert!(set.contains("OK"), "{set}");
        let due = as_docker(&[
            "ZADD",
            &format!("{prefix}docker:expiries:docker/fleets"),
            "0",
            name,
        ]);
        assert!(!due.contains("NOPERM"), "{due}");
    }
    let schedule = format!("{prefix}docker:expiries:docker/fleets");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = as_docker(&["ZRANGE", &schedule, "0", "-1"]);
        if !left.contains(&planted) && !left.contains(&moved) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the planted fleets were never dropped: {left}\n{}",
            env.worker_log("docker-user")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let containers = env.containers().await;
    assert!(
        containers
            .keys()
            .all(|k| !k.contains(&planted) && !k.contains(&moved)),
        "{containers:?}"
    );
    assert_eq!(containers.len(), 2, "the real fleet's two: {containers:?}");
    for name in [&planted, &moved] {
        let member = format!("{prefix}docker:req:{name}#0");
        assert_eq!(
            as_docker(&["EXISTS", &member]).trim(),
            "0",
            "{member} was published"
        );
    }
    let log = env.worker_log("docker-user");
    assert!(log.contains("not one a worker kept"), "{log}");
    for line in String::from_utf8_lossy(&env.cli(&["redis-users"]).stdout).lines() {
        if let Some(name) = line.split_whitespace().nth(2) {
            redis_as(None, &["ACL", "DELUSER", &rename(name)]);
        }
    }
}

/// Exhausting the broker (item 7 of the threat model's read): every queue of the shipped
/// definitions is bounded in messages and bytes on the real broker; the journal is bound
/// to the events' keys only, so a producer's probes never push events out of it; and a
/// dead-letter queue over its bound refuses, while what it refused waits in the work
/// queue and arrives once there is room: nothing is lost.
#[tokio::test]
async fn every_queue_is_bounded_and_a_full_one_loses_nothing() {
    use reqwest::Method;
    let env = TestEnv::new().await;
    common::load_shipped_definitions(&env);
    let (_, queues) = env.management(Method::GET, "queues/", None).await;
    let queues = queues.as_array().cloned().unwrap_or_default();
    // Docker's (the shipped definitions, other platforms left out) and the shared ones.
    assert_eq!(
        queues.len(),
        4 + provisioner_core::amqp::RETRY_TIERS_S.len(),
        "{queues:#?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for queue in &queues {
        let name = queue["name"].as_str().unwrap_or_default().to_owned();
        loop {
            let (_, queue) = env
                .management(Method::GET, &format!("queues/{name}"), None)
                .await;
            let effective = &queue["effective_policy_definition"];
            if ["max-length", "max-length-bytes", "overflow"]
                .iter()
                .all(|bound| !effective[*bound].is_null())
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is not bounded: {effective}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The journal keeps events only: a producer may publish the probe, and a flood of
    // probes reaches no reader's journal.
    let (_, bindings) = env
        .management(
            Method::GET,
            "queues/provisioning.status.journal/bindings",
            None,
        )
        .await;
    let keys: Vec<&str> = bindings
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["routing_key"].as_str()).collect())
        .unwrap_or_default();
    assert!(!keys.contains(&"#"), "{keys:?}");
    assert!(keys.contains(&"docker.*"), "{keys:?}");
    let producer = format!(
        "amqp://provisioner-producer-{}:secret@127.0.0.1:5672/{}",
        env.run_id, env.vhost
    );
    for _ in 0..20 {
        common::publish_as(
            &producer,
            "provisioning.status",
            provisioner_core::amqp::PROBE_ROUTING_KEY,
        )
        .await
        .expect("a producer may publish the probe");
    }
    assert_eq!(env.queue_depth("provisioning.status.journal").await, 0);

    // The operator lowers Docker's dead-letter queue to one message: the second poison
    // message is refused there and waits, then arrives once the bound is lifted.
    let override_policy = serde_json::json!({
        "pattern": "^provisioning\\.docker\\.dead-letter$", "apply-to": "queues", "priority": 99,
        "definition": {"max-length": 1, "max-length-bytes": 1048576, "overflow": "reject-publish"},
    });
    let (status, _) = env
        .management(Method::PUT, "policies/tight", Some(override_policy))
        .await;
    assert!(status == 201 || status == 204, "PUT policy: {status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, dead) = env
            .management(Method::GET, "queues/provisioning.docker.dead-letter", None)
            .await;
        if dead["effective_policy_definition"]["max-length"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never applied: {dead}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // (A quorum queue refuses once it is over its bound, so it may take one past it.)
    for name in ["poison-a", "poison-b", "poison-c"] {
        env.publish_raw(
            "docker.provision",
            &format!("{name}-{}", env.run_id),
            b"{\"poison\": true}",
        )
        .await;
        env.return_until_gone("provisioning.docker").await;
    }
    let held = env.queue_depth("provisioning.docker.dead-letter").await;
    assert!(held < 3, "the bound refused nothing: {held}");
    let (status, _) = env.management(Method::DELETE, "policies/tight", None).await;
    assert!(status == 204 || status == 200, "DELETE policy: {status}");
    // The broker's dead-letter worker sends a refused one again when its confirm timeout
    // (`dead_letter_worker_publisher_confirm_timeout`, 3 minutes) comes round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while env.queue_depth("provisioning.docker.dead-letter").await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused dead letter was lost"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
