//! EC2 end to end: `provisioner worker --platform aws-ec2` against LocalStack, through the
//! real RabbitMQ and Redis.

mod common;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::Filter;
use common::scenario::Scenario;
use common::{TestEnv, id};
use provisioner_events::{ErrorClass, State};

async fn ec2() -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(common::aws_endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

async fn live_instances(request_id: &str) -> Vec<String> {
    let output = ec2()
        .await
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", provisioner_aws_ec2::REQUEST_TAG))
                .values(request_id)
                .build(),
        )
        .send()
        .await
        .expect("LocalStack must be running (the README's test command starts it)");
    output
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

fn ec2_request(env: &TestEnv, name: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
        "operation": "provision", "platform": "aws-ec2",
        "spec": {"image_id": image, "instance_type": "t3.micro", "tags": {"env": "demo"}}
    })
}

fn ec2_teardown(env: &TestEnv, name: &str, target: &str) -> serde_json::Value {
    ec2_operation(env, name, "teardown", target)
}

fn ec2_operation(env: &TestEnv, name: &str, operation: &str, target: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
        "operation": operation, "platform": "aws-ec2", "target_request_id": target
    })
}

#[tokio::test]
async fn ec2_requests_run_once_and_tear_down_twice_through_the_queue() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ec2_worker("ec2");
    // LocalStack's catalogue holds this AMI.
    let scenario = Scenario {
        platform: "aws-ec2",
        worker: "ec2",
        name: "ec2-web",
        spec: ec2_request(&env, "ec2-web", "ami-03cf127a")["spec"].clone(),
    };
    let live = async |request_id: &str| live_instances(request_id).await.len();
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let instance = running.resource.as_ref().expect("resource").id.clone();
    assert!(instance.starts_with("i-"), "{instance}");
    assert_eq!(
        live_instances(&id(&scenario.request(&env))).await,
        vec![instance]
    );
    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn an_ec2_request_for_a_missing_image_ends_as_invalid_request() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ec2_worker("ec2");
    let request = ec2_request(&env, "ec2-noami", "ami-0123456789abcdef0");
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(event.state, State::Error);
    assert_eq!(
        event.error.expect("error").class,
        ErrorClass::InvalidRequest
    );
}

#[tokio::test]
async fn a_dry_run_request_ends_checked_and_launches_nothing() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ec2_worker("ec2");
    let mut request = ec2_request(&env, "ec2-dry", "ami-03cf127a");
    request["dry_run"] = serde_json::json!(true);
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(
        event.state,
        State::Checked,
        "{event:#?}\n{}",
        env.worker_log("ec2")
    );
    assert!(event.resource.is_none());
    assert!(
        live_instances(&id(&request)).await.is_empty(),
        "nothing launched"
    );

    let mut bad = ec2_request(&env, "ec2-dry-noami", "ami-0123456789abcdef0");
    bad["dry_run"] = serde_json::json!(true);
    env.publish(&bad).await;
    let refused = events.terminal(&id(&bad)).await;
    assert_eq!(refused.state, State::Error);
    assert_eq!(
        refused.error.expect("error").class,
        ErrorClass::InvalidRequest
    );
}

#[tokio::test]
async fn a_worker_without_aws_credentials_refuses_to_start() {
    let env = TestEnv::new().await;
    let output = std::process::Command::new(common::BIN)
        .args(["worker", "--platform", "aws-ec2"])
        .envs(env.env())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run");
    assert_eq!(
        output.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("credentials"));
}

#[tokio::test]
async fn stop_start_and_reboot_requests_go_through_the_same_flow() {
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ec2_worker("ec2");
    let request = ec2_request(&env, "ec2-cycle", "ami-03cf127a");
    env.publish(&request).await;
    assert_eq!(events.terminal(&id(&request)).await.state, State::Running);
    let steps = [
        ("stop", State::Stopped, "stopped"),
        ("describe", State::Stopped, "stopped"),
        ("start", State::Running, "running"),
        ("reboot", State::Running, "running"),
        ("describe", State::Running, "running"),
    ];
    for (n, (operation, expected, recorded)) in steps.into_iter().enumerate() {
        let step = ec2_operation(
            &env,
            &format!("ec2-cycle-{n}-{operation}"),
            operation,
            &id(&request),
        );
        env.publish(&step).await;
        let event = events.terminal(&id(&step)).await;
        assert_eq!(event.state, expected, "{operation}: {event:#?}");
        if operation == "describe" {
            // What describe found, with the instance it found.
            assert!(event.resource.is_some_and(|r| r.id.starts_with("i-")));
        }
        // The provision's record follows what happened to its instance.
        let output = std::process::Command::new(common::BIN)
            .args(["status", &id(&request)])
            .envs(env.env())
            .output()
            .expect("status");
        let record: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        assert_eq!(record["state"], recorded, "after {operation}");
    }
    assert_eq!(live_instances(&id(&request)).await.len(), 1);
    let down = ec2_teardown(&env, "ec2-cycle-down", &id(&request));
    env.publish(&down).await;
    assert_eq!(events.terminal(&id(&down)).await.state, State::Stopped);
    // Describing what is gone is an answer too: nothing runs.
    let gone = ec2_operation(&env, "ec2-cycle-gone", "describe", &id(&request));
    env.publish(&gone).await;
    let event = events.terminal(&id(&gone)).await;
    assert_eq!((event.state, event.resource), (State::Stopped, None));
}
