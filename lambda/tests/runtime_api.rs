//! The real `provisioner-lambda` binary against the Lambda Runtime API served by this
//! test (`AWS_LAMBDA_RUNTIME_API`), with the real RabbitMQ, Redis and LocalStack (EC2) or
//! moto (ECS). Invocations carry the recorded shapes of Amazon MQ for RabbitMQ and SQS
//! events; the checks are the daemon's: one instance per request id, duplicates answered
//! from the stored result, rejects dead-lettered with a reason, a crash between launch and
//! the store write leaving one instance.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::Filter;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::Platform;
use provisioner_core::amqp::{
    ATTEMPT_HEADER, AmqpBroker, AmqpConfig, ROUTING_KEY_HEADER, dead_letter_queue, work_queue,
};
use provisioner_core::broker::Broker;
use provisioner_core::redis_store::{DEFAULT_RETENTION, RedisStore};
use provisioner_core::signing::SIGNATURE_HEADER;
use provisioner_core::store::{ClaimRequest, StateStore};
use provisioner_events::{ErrorClass, Operation, PlatformName, State, StatusEvent, decode_request};

#[path = "support/lambda_api.rs"]
mod lambda_api;

/// The collector the daemon's trace test uses.
#[path = "../../tests/common/http.rs"]
#[allow(dead_code)]
mod http;

use lambda_api::{RuntimeApi, rabbitmq_event, rabbitmqctl};

const BIN: &str = env!("CARGO_BIN_EXE_provisioner-lambda");
/// An AMI in LocalStack's catalogue.
const IMAGE: &str = "ami-03cf127a";

/// One test's world: its own vhost and Redis prefix, the Runtime API, the function.
struct Env {
    run_id: String,
    vhost: String,
    amqp_url: String,
    redis_url: String,
    prefix: String,
    broker: AmqpBroker,
    api: RuntimeApi,
    function: Option<Child>,
    log: std::path::PathBuf,
    /// Settings of the function beyond the ones every test gives.
    settings: Vec<(String, String)>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut child) = self.function.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Every quorum queue left behind costs the broker file handles for good.
        let _ = Command::new("timeout")
            .args(["120", "rabbitmqctl", "-q", "delete_vhost", &self.vhost])
            .output();
    }
}

impl Env {
    async fn new() -> Env {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let vhost = format!("lambda-{run_id}");
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
        let broker = AmqpBroker::connect(AmqpConfig::new(&amqp_url))
            .await
            .expect("RabbitMQ must be running");
        Env {
            log: std::env::temp_dir().join(format!("provisioner-lambda-{run_id}.log")),
            prefix: format!("lambda-{run_id}:"),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            amqp_url,
            broker,
            api: RuntimeApi::start().await,
            function: None,
            run_id,
            vhost,
            settings: Vec::new(),
        }
    }

    fn id(&self, name: &str) -> String {
        format!("{name}-{}", self.run_id)
    }

    /// This test's SQS queue on moto: its ARN (what events name) and URL.
    async fn sqs_queue(&self) -> (String, String) {
        let sqs = sqs_client();
        let url = sqs
            .create_queue()
            .queue_name(format!("provisioning-{}", self.run_id))
            .send()
            .await
            .expect("moto must be running (the README's test command starts it)")
            .queue_url
            .expect("queue url");
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .cloned()
            })
            .expect("queue arn");
        (arn, url)
    }

    /// Stops the function and starts a cold one, with a Runtime API of its own (the old
    /// one's pending `/next` belongs to the dead process).
    async fn restart_function(&mut self, platform: &str, endpoint: &str) {
        if let Some(mut old) = self.function.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.api = RuntimeApi::start().await;
        self.start_function(platform, endpoint);
    }

    /// Starts the function as Lambda would: the binary with the Runtime API's address.
    fn start_function(&mut self, platform: &str, endpoint: &str) {
        let log = std::fs::File::create(&self.log).expect("log");
        let child = Command::new(BIN)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", self.api.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "provisioner-test")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("2026/11/21/[$LATEST]{}", self.run_id),
            )
            .env("PLATFORM", platform)
            .env("AMQP_URL", &self.amqp_url)
            .env("REDIS_URL", &self.redis_url)
            .env("REDIS_KEY_PREFIX", &self.prefix)
            .env("LEASE_SECONDS", "5")
            .env("RETRY_BASE_MS", "300")
            .env("RETRY_MAX_SECONDS", "2")
            .env("AWS_ENDPOINT_URL", endpoint)
            // SQS (where retries of SQS messages are parked) is moto's.
            .env("AWS_ENDPOINT_URL_SQS", moto())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("PROVISIONER_LOG", "info")
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the function");
        self.function = Some(child);
    }

    fn function_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn events(&self) -> Events {
        Events {
            stream: self.broker.subscribe_status().await.expect("subscribe"),
            seen: Vec::new(),
        }
    }

    /// Claims `request` for another worker for `lease`, as if that worker were on it.
    async fn hold_for_another_worker(&self, request: &serde_json::Value, lease: Duration) {
        let decoded = decode_request(request.to_string().as_bytes()).expect("request");
        let routing_key = decoded.routing_key();
        self.store()
            .await
            .claim(ClaimRequest {
                request_id: decoded.request_id.as_str(),
                payload_hash: &decoded.payload_hash(),
                owner: "another-worker",
                nonce: "another-worker",
                lease,
                working_state: match decoded.operation {
                    Operation::Provision | Operation::Start => State::Starting,
                    _ => State::Stopping,
                },
                routing_key: &routing_key,
            })
            .await
            .expect("claim");
    }

    /// The store as the EC2 function sees it (every request of these tests is EC2's).
    async fn store(&self) -> RedisStore {
        RedisStore::connect(&self.redis_url, &self.prefix, DEFAULT_RETENTION)
            .await
            .expect("Redis must be running")
            .for_platform(PlatformName::AwsEc2)
    }
}

struct Events {
    stream: BoxStream<'static, StatusEvent>,
    seen: Vec<StatusEvent>,
}

impl Events {
    async fn terminal_count(&mut self, request_id: &str, count: usize) -> Vec<StatusEvent> {
        let terminal = |seen: &[StatusEvent]| -> Vec<StatusEvent> {
            seen.iter()
                .filter(|e| e.request_id == request_id && e.state.is_terminal())
                .cloned()
                .collect()
        };
        let waited = tokio::time::timeout(Duration::from_secs(90), async {
            while terminal(&self.seen).len() < count {
                let event = self.stream.next().await.expect("status stream");
                self.seen.push(event);
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "timed out waiting for {count} terminal events of {request_id}; seen {:#?}",
            self.seen
        );
        terminal(&self.seen)
    }
}

/// An SQS event; each body is a string as SQS holds it.
/// An SQS event of fresh messages from the queue `queue_arn`.
fn sqs_event(queue_arn: &str, messages: &[(&str, String)]) -> serde_json::Value {
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|(id, body)| sqs_record(queue_arn, id, body, 1, serde_json::json!({})))
        .collect();
    serde_json::json!({"Records": records})
}

/// One record of an SQS event, as Lambda's event source mapping writes it.
fn sqs_record(
    queue_arn: &str,
    id: &str,
    body: &str,
    receives: u32,
    message_attributes: serde_json::Value,
) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        .to_string();
    serde_json::json!({
        "messageId": id, "receiptHandle": format!("handle-{id}"), "body": body,
        "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
        "attributes": {"ApproximateReceiveCount": receives.to_string(), "SentTimestamp": now,
                       "SenderId": "AIDACKCEVSQ6C2EXAMPLE",
                       "ApproximateFirstReceiveTimestamp": now},
        "messageAttributes": message_attributes
    })
}

fn sqs_client() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .endpoint_url(moto())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .build(),
    )
}

fn ec2_provision(id: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "aws-ec2",
        "spec": {"image_id": image, "instance_type": "t3.micro", "tags": {"env": "demo"}}
    })
}

fn operation(id: &str, platform: &str, operation: &str, target: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": operation, "platform": platform,
        "target_request_id": target
    })
}

fn localstack() -> String {
    std::env::var("PROVISIONER_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

fn moto() -> String {
    std::env::var("PROVISIONER_TEST_ECS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

fn ec2_client() -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(localstack())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build(),
    )
}

async fn live_instances(request_id: &str) -> Vec<String> {
    ec2_client()
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", provisioner_aws_ec2::REQUEST_TAG))
                .values(request_id)
                .build(),
        )
        .send()
        .await
        .expect("LocalStack must be running (the README's test command starts it)")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            i.state()
                .and_then(|s| s.name())
                .is_some_and(|n| !matches!(n.as_str(), "terminated" | "shutting-down"))
        })
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn rabbitmq_events_make_one_instance_and_answer_duplicates_from_the_store() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.start_function("aws-ec2", &localstack());
    let id = env.id("lambda-ec2");
    let request = ec2_provision(&id, IMAGE);
    let queue = work_queue(PlatformName::AwsEc2);

    let first = env
        .api
        .invoke(rabbitmq_event(&queue, std::slice::from_ref(&request)))
        .await;
    assert_eq!(first, Ok(serde_json::json!({})), "{}", env.function_log());
    // The same request four more times, in one batch: each answered from Redis.
    let again = env
        .api
        .invoke(rabbitmq_event(&queue, &vec![request.clone(); 4]))
        .await;
    assert_eq!(again, Ok(serde_json::json!({})), "{}", env.function_log());

    let terminal = events.terminal_count(&id, 5).await;
    assert_eq!(
        terminal[0].state,
        State::Running,
        "{terminal:#?}\n{}",
        env.function_log()
    );
    assert!(
        terminal.iter().all(|e| *e == terminal[0]),
        "identical: {terminal:#?}"
    );
    let instance = terminal[0].resource.as_ref().expect("resource").id.clone();
    assert_eq!(live_instances(&id).await, vec![instance], "one instance");

    for name in ["lambda-down", "lambda-down-again"] {
        let down = operation(&env.id(name), "aws-ec2", "teardown", &id);
        let answer = env.api.invoke(rabbitmq_event(&queue, &[down])).await;
        assert_eq!(answer, Ok(serde_json::json!({})));
        let ended = events.terminal_count(&env.id(name), 1).await;
        assert_eq!(ended[0].state, State::Stopped, "{ended:#?}");
    }
    assert!(live_instances(&id).await.is_empty(), "terminated");

    // A producer's message under an id the workers keep for themselves is refused: the
    // event names a publisher other than the function's own broker user.
    let forged = operation(&format!("{id}#expired"), "aws-ec2", "teardown", &id);
    let answer = env.api.invoke(rabbitmq_event(&queue, &[forged])).await;
    assert_eq!(answer, Ok(serde_json::json!({})));
    let refused = events.terminal_count(&format!("{id}#expired"), 1).await;
    let error = refused[0].error.clone().expect("refused");
    assert_eq!(error.class, ErrorClass::InvalidRequest, "{refused:#?}");
    assert!(refused[0].rejected_message.is_some(), "{refused:#?}");
}

#[tokio::test]
async fn a_crash_between_launch_and_the_store_write_leaves_one_instance_with_the_lambda() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    let id = env.id("lambda-crash");
    let request = ec2_provision(&id, IMAGE);
    // A first invocation launched the instance and died before writing to Redis.
    let platform = provisioner_aws_ec2::Ec2Platform::new(ec2_client(), "us-east-1");
    let decoded = decode_request(request.to_string().as_bytes()).expect("request");
    let launched = platform.provision(&decoded).await.expect("launch");
    assert!(env.store().await.get(&id).await.expect("store").is_none());

    env.start_function("aws-ec2", &localstack());
    let answer = env
        .api
        .invoke(rabbitmq_event(
            &work_queue(PlatformName::AwsEc2),
            &[request],
        ))
        .await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    let terminal = events.terminal_count(&id, 1).await;
    assert_eq!(terminal[0].state, State::Running, "{terminal:#?}");
    assert_eq!(
        terminal[0].resource.as_ref().map(|r| r.id.clone()),
        Some(launched.id.clone())
    );
    assert_eq!(live_instances(&id).await, vec![launched.id.clone()]);
    platform
        .teardown(&provisioner_events::TeardownTarget::Request(
            decoded.request_id,
        ))
        .await
        .expect("clean up");
}

#[tokio::test]
async fn sqs_batches_report_only_what_must_come_again() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    let (queue, queue_url) = env.sqs_queue().await;
    env.start_function("aws-ec2", &localstack());
    let bad_image = env.id("lambda-noami");
    let held = env.id("lambda-held");
    // Another worker holds `held`: this invocation must park it on its queue as a new
    // message, so the wait costs none of the queue's receives.
    let store = env.store().await;
    let held_request =
        decode_request(ec2_provision(&held, IMAGE).to_string().as_bytes()).expect("req");
    let claim = store
        .claim(ClaimRequest {
            request_id: &held,
            payload_hash: &held_request.payload_hash(),
            owner: "another-worker",
            nonce: "another-worker",
            // A held request is parked until the holder's lease ends: keep it short.
            lease: Duration::from_secs(8),
            working_state: State::Starting,
            routing_key: "aws-ec2.provision",
        })
        .await
        .expect("claim");

    let answer = env
        .api
        .invoke(sqs_event(
            &queue,
            &[
                (
                    "m-noami",
                    ec2_provision(&bad_image, "ami-0123456789abcdef0").to_string(),
                ),
                ("m-garbage", "{not json".to_owned()),
                ("m-held", ec2_provision(&held, IMAGE).to_string()),
            ],
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": []}),
        "{}",
        env.function_log()
    );
    let failed = events.terminal_count(&bad_image, 1).await;
    assert_eq!(failed[0].state, State::Error);
    assert_eq!(
        failed[0].error.as_ref().map(|e| e.class),
        Some(ErrorClass::InvalidRequest)
    );
    // The message that was not a request is kept, with its reason, for a person to read.
    let dead = dead_letter_queue(PlatformName::AwsEc2);
    let depth = async {
        for _ in 0..50 {
            if env.broker.queue_depth(&dead).await.unwrap_or(0) == 1 {
                return 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.broker.queue_depth(&dead).await.unwrap_or(0)
    }
    .await;
    assert_eq!(depth, 1, "the garbage message is dead-lettered");

    // The held request waits on its queue, delayed, counted as a wait and not an attempt.
    let parked = sqs_client()
        .receive_message()
        .queue_url(&queue_url)
        .wait_time_seconds(20)
        .message_attribute_names("All")
        .send()
        .await
        .expect("receive")
        .messages
        .unwrap_or_default();
    assert_eq!(parked.len(), 1, "{parked:?}\n{}", env.function_log());
    let parked = &parked[0];
    let attributes = parked.message_attributes.clone().unwrap_or_default();
    let attribute = |name: &str| {
        attributes
            .get(name)
            .and_then(|a| a.string_value.clone())
            .unwrap_or_default()
    };
    assert_eq!(attribute("provisioner-waits"), "1", "{attributes:?}");
    assert_eq!(attribute("provisioner-attempt"), "1", "{attributes:?}");
    assert!(!attribute("provisioner-published-at").is_empty());
    let body = parked.body.clone().expect("body");
    assert_eq!(
        decode_request(body.as_bytes())
            .expect("request")
            .request_id
            .as_str(),
        held
    );

    // The other worker gives the request up; the parked copy, delivered, runs it.
    let provisioner_core::store::Claim::Claimed { fence, .. } = claim else {
        panic!("claimed: {claim:?}");
    };
    store
        .release(&held, &fence, provisioner_core::store::Release::HandedOver)
        .await
        .expect("release");
    let message_attributes: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                serde_json::json!({
                    "stringValue": value.string_value, "dataType": value.data_type
                }),
            )
        })
        .collect();
    let answer = env
        .api
        .invoke(serde_json::json!({"Records": [sqs_record(
            &queue,
            "m-parked",
            &body,
            1,
            serde_json::Value::Object(message_attributes),
        )]}))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
    assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
    let ended = events.terminal_count(&held, 1).await;
    assert_eq!(ended[0].state, State::Running, "{ended:#?}");
    assert_eq!(live_instances(&held).await.len(), 1);
}

#[tokio::test]
async fn unknown_events_fail_the_invocation_with_a_reason() {
    let mut env = Env::new().await;
    env.start_function("aws-ec2", &localstack());
    let answer = env
        .api
        .invoke(serde_json::json!({"source": "aws.events", "detail": {}}))
        .await;
    let error = answer.expect_err("not a queue event");
    assert!(
        error.to_string().contains("rmqMessagesByQueue"),
        "{error}\n{}",
        env.function_log()
    );
    // The function is still there for the next invocation.
    let again = env
        .api
        .invoke(rabbitmq_event(&work_queue(PlatformName::AwsEc2), &[]))
        .await;
    assert_eq!(again, Ok(serde_json::json!({})));
}

#[tokio::test]
async fn ecs_tasks_run_once_through_the_lambda_on_moto() {
    let ecs = aws_sdk_ecs_client();
    ecs.create_cluster()
        .cluster_name("demo")
        .send()
        .await
        .expect("moto must be running (the README's test command starts it)");
    let definition = ecs
        .register_task_definition()
        .family("lambda-web")
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name("web")
                .image("public.ecr.aws/nginx/nginx:1.27")
                .memory(512)
                .build(),
        )
        .send()
        .await
        .expect("register")
        .task_definition()
        .and_then(|d| d.task_definition_arn())
        .expect("arn")
        .to_owned();
    let mut env = Env::new().await;
    let mut events = env.events().await;
    let (queue, _) = env.sqs_queue().await;
    env.start_function("aws-ecs", &moto());
    let id = env.id("lambda-ecs");
    let request = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "aws-ecs",
        "spec": {"cluster": "demo", "task_definition": definition, "launch_type": "FARGATE", "network": {"subnets": ["subnet-0a1b2c3d"], "assign_public_ip": true}}
    });
    let answer = env
        .api
        .invoke(sqs_event(
            &queue,
            &[("m-1", request.to_string()), ("m-2", request.to_string())],
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
    // Two copies at once: one runs, the other is held by it and parked on the queue, or
    // answered from the store if the first finished already.
    let failures = answer["batchItemFailures"].as_array().expect("array").len();
    assert!(failures <= 1, "{answer}");
    let redelivery = env
        .api
        .invoke(sqs_event(&queue, &[("m-2", request.to_string())]))
        .await;
    let terminal = events.terminal_count(&id, 2).await;
    assert!(redelivery.is_ok(), "{redelivery:?}");
    assert_eq!(
        terminal[0].state,
        State::Running,
        "{terminal:#?}\n{}",
        env.function_log()
    );
    let task = terminal[0].resource.as_ref().expect("resource").id.clone();
    let running = ecs
        .list_tasks()
        .cluster("demo")
        .started_by(provisioner_aws_ecs::request_token(&id))
        .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
        .send()
        .await
        .expect("list")
        .task_arns()
        .to_vec();
    assert_eq!(running, vec![task]);
    let down = operation(&env.id("lambda-ecs-down"), "aws-ecs", "teardown", &id);
    let answer = env
        .api
        .invoke(sqs_event(&queue, &[("m-3", down.to_string())]))
        .await;
    assert_eq!(answer, Ok(serde_json::json!({"batchItemFailures": []})));
    let ended = events.terminal_count(&env.id("lambda-ecs-down"), 1).await;
    assert_eq!(ended[0].state, State::Stopped);
}

fn aws_sdk_ecs_client() -> aws_sdk_ecs::Client {
    aws_sdk_ecs::Client::from_conf(
        aws_sdk_ecs::Config::builder()
            .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
            .endpoint_url(moto())
            .region(aws_sdk_ecs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ecs::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .build(),
    )
}

#[tokio::test]
async fn a_held_request_in_a_rabbitmq_event_comes_back_through_the_retry_tier() {
    let mut env = Env::new().await;
    env.start_function("aws-ec2", &localstack());
    let held = env.id("lambda-held-mq");
    let request = ec2_provision(&held, IMAGE);
    env.hold_for_another_worker(&request, Duration::from_secs(1))
        .await;
    let queue = work_queue(PlatformName::AwsEc2);
    let answer = env.api.invoke(rabbitmq_event(&queue, &[request])).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    // Parked in a retry tier, it returns to the work queue for the event source to
    // deliver again, as the daemon's retries do.
    let mut depth = 0;
    for _ in 0..100 {
        depth = env.broker.queue_depth(&queue).await.unwrap_or(0);
        if depth == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth, 1, "{}", env.function_log());
}

#[tokio::test]
async fn a_rabbitmq_batch_delivered_again_to_a_cold_instance_does_not_dead_letter_twice() {
    let mut env = Env::new().await;
    env.start_function("aws-ec2", &localstack());
    let queue = work_queue(PlatformName::AwsEc2);
    // Not a request: the function refuses it and dead-letters it with its reason.
    let garbage = serde_json::json!({"request_id": env.id("junk"), "operation": "explode"});
    let first = env
        .api
        .invoke(rabbitmq_event(&queue, std::slice::from_ref(&garbage)))
        .await;
    assert_eq!(first, Ok(serde_json::json!({})), "{}", env.function_log());
    let dead = dead_letter_queue(PlatformName::AwsEc2);
    let depth = |env: &Env| {
        let dead = dead.clone();
        let broker = env.broker.clone();
        async move { broker.queue_depth(&dead).await.unwrap_or(0) }
    };
    for _ in 0..50 {
        if depth(&env).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth(&env).await, 1, "{}", env.function_log());
    // Amazon MQ delivers the batch again (as after a failed invocation), to a cold
    // instance this time: the store tells it the message was handed on already.
    env.restart_function("aws-ec2", &localstack()).await;
    let mut again = rabbitmq_event(&queue, std::slice::from_ref(&garbage));
    for messages in again["rmqMessagesByQueue"]
        .as_object_mut()
        .expect("queues")
        .values_mut()
    {
        for message in messages.as_array_mut().expect("messages") {
            message["redelivered"] = true.into();
        }
    }
    let second = env.api.invoke(again).await;
    assert_eq!(second, Ok(serde_json::json!({})), "{}", env.function_log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        depth(&env).await,
        1,
        "dead-lettered once: {}",
        env.function_log()
    );
    assert!(env.function_log().contains("already handed on"));
}

/// A function binding producers to tenants (`TENANTS`, by the broker user an Amazon MQ
/// event names): a producer's request naming another tenant is refused, its own runs.
#[tokio::test]
async fn a_function_binding_producers_to_tenants_refuses_another_tenants_request() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.settings
        .push(("TENANTS".into(), "user:AIDACKCEVSQ6C2EXAMPLE=team-a".into()));
    env.start_function("aws-ec2", &localstack());
    let (other_id, own_id) = (env.id("tenant-other"), env.id("tenant-own"));
    let mut other = ec2_provision(&other_id, IMAGE);
    other["tenant"] = "team-b".into();
    other["dry_run"] = true.into();
    let mut own = ec2_provision(&own_id, IMAGE);
    own["tenant"] = "team-a".into();
    own["dry_run"] = true.into();
    let answer = env
        .api
        .invoke(rabbitmq_event(
            &work_queue(PlatformName::AwsEc2),
            &[other, own],
        ))
        .await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    let refused = events.terminal_count(&other_id, 1).await;
    let error = refused[0].error.clone().expect("refused");
    assert_eq!(error.class, ErrorClass::Permission, "{refused:#?}");
    assert!(error.message.contains("team-a"), "{refused:#?}");
    let checked = events.terminal_count(&own_id, 1).await;
    assert_eq!(checked[0].state, State::Checked, "{checked:#?}");
}

/// The secret of key `k1` in the signing tests.
const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes!!";

impl Env {
    /// Starts the EC2 function of a deployment that signs with key `k1`.
    fn start_signing_function(&mut self) {
        self.settings
            .push(("REQUEST_SIGNING_KEYS".into(), format!("k1={SECRET}")));
        self.start_function("aws-ec2", &localstack());
    }
}

/// A deployment that signs: the function verifies every message of an Amazon MQ event,
/// which does not say which exchange a message came through nor its routing key (the
/// request's `<platform>.<operation>` stands for it). A signed request runs; an unsigned
/// one, one whose body changed after signing and one signed with a key the function
/// does not hold end in `error` class `permission`, about that message only.
#[tokio::test]
async fn a_signing_deployments_function_runs_only_signed_requests() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.start_signing_function();
    let sign = |key: &str, body: &serde_json::Value| {
        provisioner_core::signing::sign_with(
            key,
            SECRET.as_bytes(),
            "aws-ec2.teardown",
            body.to_string().as_bytes(),
            SystemTime::now(),
        )
    };
    let signed = operation(&env.id("signed"), "aws-ec2", "teardown", &env.id("gone"));
    let unsigned = operation(&env.id("unsigned"), "aws-ec2", "teardown", &env.id("gone"));
    let tampered = operation(&env.id("tampered"), "aws-ec2", "teardown", &env.id("gone"));
    let tampered_signature = sign(
        "k1",
        &operation(&env.id("tampered"), "aws-ec2", "teardown", &env.id("other")),
    );
    let unknown_key = operation(
        &env.id("unknown-key"),
        "aws-ec2",
        "teardown",
        &env.id("gone"),
    );
    let mut event = rabbitmq_event(
        &work_queue(PlatformName::AwsEc2),
        &[
            signed.clone(),
            unsigned.clone(),
            tampered.clone(),
            unknown_key.clone(),
        ],
    );
    let header = |signature: String| serde_json::json!({"bytes": signature.into_bytes()});
    let messages = event["rmqMessagesByQueue"]
        .as_object_mut()
        .and_then(|queues| queues.values_mut().next())
        .and_then(|messages| messages.as_array_mut())
        .expect("the event's messages");
    for (message, signature) in messages.iter_mut().zip([
        Some(sign("k1", &signed)),
        None,
        Some(tampered_signature),
        Some(sign("k9", &unknown_key)),
    ]) {
        if let Some(signature) = signature {
            message["basicProperties"]["headers"]["x-provisioner-signature"] = header(signature);
        }
    }
    let answer = env.api.invoke(event).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());

    let ran = events.terminal_count(&env.id("signed"), 1).await;
    assert_eq!(ran[0].state, State::Stopped, "{:#?}", ran[0]);
    for (name, why) in [
        ("unsigned", "is not signed"),
        ("tampered", "does not match"),
        ("unknown-key", "k9"),
    ] {
        let refused = events.terminal_count(&env.id(name), 1).await;
        let error = refused[0].error.clone().expect("an error");
        assert_eq!(error.class, ErrorClass::Permission, "{:#?}", refused[0]);
        assert!(
            error.message.contains(why),
            "{name}: {why:?} not in {:?}",
            error.message
        );
        assert!(
            refused[0].rejected_message.is_some(),
            "answers the message, not the request: {:#?}",
            refused[0]
        );
    }
}

/// A signed request that another worker holds is parked in a retry tier: the copy keeps
/// its signature and the routing key it covers, so when it comes back the function
/// verifies it and runs it.
#[tokio::test]
async fn a_signed_request_parked_for_a_retry_keeps_its_signature_and_runs_when_it_comes_back() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.start_signing_function();
    let held = env.id("signed-held");
    let request = operation(&held, "aws-ec2", "teardown", &env.id("gone"));
    let signature = provisioner_core::signing::sign_with(
        "k1",
        SECRET.as_bytes(),
        "aws-ec2.teardown",
        request.to_string().as_bytes(),
        SystemTime::now(),
    );
    env.hold_for_another_worker(&request, Duration::from_secs(1))
        .await;
    let queue = work_queue(PlatformName::AwsEc2);
    let mut event = rabbitmq_event(&queue, &[request]);
    event["rmqMessagesByQueue"][format!("{queue}::/")][0]["basicProperties"]["headers"]
        [SIGNATURE_HEADER] = serde_json::json!({"bytes": signature.clone().into_bytes()});
    let answer = env.api.invoke(event).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());

    // The parked copy comes back to the work queue: take it as the event source would.
    let connection = lapin::Connection::connect(&env.amqp_url, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut parked = None;
    for _ in 0..200 {
        parked = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get");
        if parked.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parked = parked.expect("the parked copy came back").delivery;
    let headers = parked.properties.headers().clone().unwrap_or_default();
    let text = |name: &str| match headers.inner().get(name) {
        Some(lapin::types::AMQPValue::LongString(text)) => Some(text.to_string()),
        _ => None,
    };
    assert_eq!(text(SIGNATURE_HEADER), Some(signature.clone()));
    let routing_key = text(ROUTING_KEY_HEADER).expect("the routing key header");
    assert_eq!(routing_key, "aws-ec2.teardown");

    // The event source delivers it again, with its headers as Amazon MQ writes them.
    let mut event = rabbitmq_event(
        &queue,
        &[serde_json::from_slice(&parked.data).expect("the request")],
    );
    event["rmqMessagesByQueue"][format!("{queue}::/")][0]["basicProperties"]["headers"] = serde_json::json!({
        SIGNATURE_HEADER: {"bytes": signature.into_bytes()},
        ROUTING_KEY_HEADER: {"bytes": routing_key.into_bytes()},
        ATTEMPT_HEADER: 1,
    });
    let answer = env.api.invoke(event).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    let ended = events.terminal_count(&held, 1).await;
    assert_eq!(ended[0].state, State::Stopped, "{:#?}", ended[0]);
}

/// The function exports its spans by OTLP when told where (flushed before it answers,
/// since Lambda may freeze it right after) and continues the producer's trace; and it
/// writes the invocation's metrics as CloudWatch EMF lines, in the daemon's families.
#[tokio::test]
async fn an_invocation_exports_its_spans_and_writes_its_metrics_as_emf() {
    let collector = http::Collector::start().await;
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.settings.extend([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://{}", collector.addr),
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
            "http/json".to_owned(),
        ),
        // The batch timer would wait ten minutes: only the flush at the end of the
        // invocation can bring the spans within the test's 30 s.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()),
        (
            "METRICS_NAMESPACE".to_owned(),
            "provisioner-test".to_owned(),
        ),
    ]);
    env.start_function("aws-ec2", &localstack());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = operation(&env.id("traced"), "aws-ec2", "teardown", &env.id("gone"));
    let queue = work_queue(PlatformName::AwsEc2);
    let mut event = rabbitmq_event(&queue, &[request]);
    event["rmqMessagesByQueue"][format!("{queue}::/")][0]["basicProperties"]["headers"]["traceparent"] = serde_json::json!({
        "bytes": format!("00-{trace_id}-00f067aa0ba902b7-01").into_bytes()
    });
    let answer = env.api.invoke(event).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    let ended = events.terminal_count(&env.id("traced"), 1).await;
    assert_eq!(ended[0].state, State::Stopped);

    // Exported when the invocation answered, not by the batch timer.
    let spans = collector
        .trace_until(trace_id, |spans| {
            spans.iter().any(|s| s["name"] == "delivery")
        })
        .await;
    let delivery = spans
        .iter()
        .find(|s| s["name"] == "delivery")
        .unwrap_or_else(|| panic!("no delivery span in {spans:#?}\n{}", env.function_log()));
    assert_eq!(
        delivery["parentSpanId"], "00f067aa0ba902b7",
        "the producer's span"
    );

    let emf: Vec<serde_json::Value> = env
        .function_log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line.get("_aws").is_some())
        .collect();
    let stopped = emf
        .iter()
        .find(|line| line["outcome"] == "stopped")
        .unwrap_or_else(|| panic!("no EMF line of the teardown: {emf:#?}"));
    assert_eq!(stopped["provisioner_requests_total"], 1.0);
    assert_eq!(stopped["operation"], "teardown");
    assert_eq!(
        stopped["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "provisioner-test"
    );
    assert!(
        emf.iter()
            .any(|line| line["settlement"] == "ack" && line["provisioner_deliveries_total"] == 1.0),
        "{emf:#?}"
    );
}

/// Takes `count` messages off the function's work queue, as the event source would.
/// Takes `count` messages off the work queue, each with the broker user that published
/// it (its `user_id`), as an Amazon MQ event would carry them.
async fn take_from_work_queue(env: &Env, count: usize) -> Vec<(serde_json::Value, String)> {
    let connection = lapin::Connection::connect(&env.amqp_url, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let queue = work_queue(PlatformName::AwsEc2);
    let mut taken = Vec::new();
    for _ in 0..300 {
        if taken.len() == count {
            break;
        }
        match channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            Some(message) => taken.push((
                serde_json::from_slice(&message.delivery.data).expect("a request"),
                message
                    .delivery
                    .properties
                    .user_id()
                    .as_ref()
                    .map(|u| u.as_str().to_owned())
                    .unwrap_or_default(),
            )),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(taken.len(), count, "{taken:#?}\n{}", env.function_log());
    taken
}

/// The states of EC2 instances, by id.
async fn instance_states(ids: &[String]) -> Vec<String> {
    ec2_client()
        .describe_instances()
        .set_instance_ids(Some(ids.to_vec()))
        .send()
        .await
        .expect("describe")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            i.state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
        })
        .collect()
}

/// A deployment of functions alone: a scheduled event's round does a daemon's background
/// work. It coordinates a fleet (handing it on when its time is up before the fleet
/// ends) and sends the teardowns of what expired.
#[tokio::test]
async fn scheduled_rounds_coordinate_fleets_and_expire_them_without_a_daemon() {
    let mut env = Env::new().await;
    let mut events = env.events().await;
    env.start_function("aws-ec2", &localstack());
    let queue = work_queue(PlatformName::AwsEc2);
    let id = env.id("lambda-fleet");
    let mut request = ec2_provision(&id, IMAGE);
    request["count"] = 3.into();
    request["ttl_seconds"] = 15.into();
    let answer = env.api.invoke(rabbitmq_event(&queue, &[request])).await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());

    // A round before any member ran: it takes the fleet, and hands it on at its end.
    let short = std::time::Instant::now();
    let round = env
        .api
        .invoke_within(lambda_api::scheduled_event(), Duration::from_secs(8))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
    assert_eq!(round["fleets"], 1, "{round}");
    // Its working time is the 8 s less the 5 s kept to answer; a second's slack.
    assert!(
        short.elapsed() < Duration::from_secs(4),
        "on time: {:?}",
        short.elapsed()
    );

    let members = take_from_work_queue(&env, 3).await;
    let answer = env
        .api
        .invoke(lambda_api::rabbitmq_event_published_by(&queue, &members))
        .await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    let round = env
        .api
        .invoke(lambda_api::scheduled_event())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
    assert_eq!(round["fleets"], 1, "{round}");
    let fleet = events.terminal_count(&id, 1).await;
    assert_eq!(fleet[0].state, State::Running, "{fleet:#?}");
    let instances: Vec<String> = fleet[0]
        .resource
        .as_ref()
        .expect("members")
        .members
        .iter()
        .map(|m| m.id.clone().expect("an instance"))
        .collect();
    assert_eq!(instances.len(), 3);
    assert!(
        instance_states(&instances)
            .await
            .iter()
            .all(|s| s == "running"),
        "{instances:?}"
    );

    // Each member expires on its own; the rounds send one teardown each.
    let mut expired = 0;
    for _ in 0..60 {
        let round = env
            .api
            .invoke(lambda_api::scheduled_event())
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", env.function_log()));
        expired += round["expired"].as_u64().expect("expired");
        if expired >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(expired, 3, "{}", env.function_log());
    let teardowns = take_from_work_queue(&env, 3).await;
    let answer = env
        .api
        .invoke(lambda_api::rabbitmq_event_published_by(&queue, &teardowns))
        .await;
    assert_eq!(answer, Ok(serde_json::json!({})), "{}", env.function_log());
    for i in 0..3 {
        let teardown = provisioner_core::expiry_teardown_id(&format!("{id}#{i}"));
        let ended = events.terminal_count(&teardown, 1).await;
        assert_eq!(ended[0].state, State::Stopped, "{ended:#?}");
    }
    assert!(
        instance_states(&instances)
            .await
            .iter()
            .all(|s| s == "terminated" || s == "shutting-down"),
        "{instances:?}"
    );
}
