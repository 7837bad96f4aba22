//! ECS end to end: `provisioner worker --platform aws-ecs` against moto's server, through
//! the real RabbitMQ and Redis.

mod common;

use aws_sdk_ecs::types::DesiredStatus;
use common::scenario::Scenario;
use common::{TestEnv, ecs_demo_cluster, id};
use provisioner_events::{ErrorClass, State};

async fn running_tasks(request_id: &str) -> Vec<String> {
    common::ecs_client()
        .list_tasks()
        .cluster("demo")
        .started_by(provisioner_aws_ecs::request_token(request_id))
        .desired_status(DesiredStatus::Running)
        .send()
        .await
        .expect("list tasks")
        .task_arns()
        .to_vec()
}

fn ecs_request(env: &TestEnv, name: &str, task_definition: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
        "operation": "provision", "platform": "aws-ecs",
        "spec": {"cluster": "demo", "task_definition": task_definition, "launch_type": "FARGATE", "network": {"subnets": ["subnet-0a1b2c3d"], "assign_public_ip": true}}
    })
}

fn ecs_operation(env: &TestEnv, name: &str, operation: &str, target: &str) -> serde_json::Value {
    serde_json::json!({
        "schema_version": 1, "request_id": format!("{name}-{}", env.run_id),
        "operation": operation, "platform": "aws-ecs", "target_request_id": target
    })
}

#[tokio::test]
async fn ecs_requests_run_one_task_and_tear_down_twice_through_the_queue() {
    ecs_demo_cluster().await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ecs_worker("ecs");
    let scenario = Scenario {
        platform: "aws-ecs",
        worker: "ecs",
        name: "ecs-demo",
        spec: ecs_request(&env, "ecs-demo", "web:1")["spec"].clone(),
    };
    let request = scenario.request(&env);
    let live = async |request_id: &str| running_tasks(request_id).await.len();
    let running = scenario.provision_five_times(&env, &mut events, live).await;
    let task = running.resource.as_ref().expect("resource").id.clone();
    assert!(task.contains(":task/demo/"), "{task}");
    assert_eq!(running_tasks(&id(&request)).await, vec![task], "one task");

    // ECS tasks cannot be stopped and started again: said plainly, not faked.
    let stop = ecs_operation(&env, "ecs-stop", "stop", &id(&request));
    env.publish(&stop).await;
    let refused = events.terminal(&id(&stop)).await;
    assert_eq!(refused.state, State::Error);
    assert_eq!(refused.error.expect("error").class, ErrorClass::Unsupported);

    scenario.tear_down_twice(&env, &mut events, live).await;
}

#[tokio::test]
async fn an_ecs_request_for_a_missing_task_definition_ends_in_an_error_it_names() {
    ecs_demo_cluster().await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ecs_worker("ecs");
    let request = ecs_request(&env, "ecs-nodef", "no-such-family:3");
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(event.state, State::Error, "{}", env.worker_log("ecs"));
    let error = event.error.expect("error");
    assert!(
        matches!(
            error.class,
            ErrorClass::InvalidRequest | ErrorClass::NotFound
        ),
        "{error:?}"
    );
    assert!(
        error.message.contains("no-such-family"),
        "{}",
        error.message
    );
}
