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

/// The live tasks of `fleet`'s members, by member index, read as the workers read them.
async fn fleet_tasks(
    fleet: &str,
    count: u32,
) -> std::collections::BTreeMap<u32, Vec<(String, bool)>> {
    let ecs = common::ecs_client();
    let mut by_member = std::collections::BTreeMap::new();
    for group in 0..count.div_ceil(provisioner_aws_ecs::MAX_BATCH) {
        let listed = ecs
            .list_tasks()
            .cluster("demo")
            .started_by(provisioner_aws_ecs::group_token(fleet, group))
            .desired_status(DesiredStatus::Running)
            .send()
            .await
            .expect("list tasks");
        if listed.task_arns().is_empty() {
            continue;
        }
        let described = ecs
            .describe_tasks()
            .cluster("demo")
            .set_tasks(Some(listed.task_arns().to_vec()))
            .include(aws_sdk_ecs::types::TaskField::Tags)
            .send()
            .await
            .expect("describe tasks");
        for (index, task, tagged) in provisioner_aws_ecs::assign(fleet, described.tasks()) {
            if task.last_status() != Some("STOPPED") {
                by_member
                    .entry(index)
                    .or_insert_with(Vec::new)
                    .push((task.task_arn().unwrap_or_default().to_owned(), tagged));
            }
        }
    }
    by_member
}

/// A fleet of 25 tasks through two workers starts in batches (RunTask with a count), one
/// task per member, each tagged with its member; the fleet's teardown stops them all.
#[tokio::test]
async fn an_ecs_fleet_starts_in_batches_one_task_per_member_and_tears_down() {
    ecs_demo_cluster().await;
    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_ecs_worker("ecs-a");
    env.start_ecs_worker("ecs-b");
    const COUNT: u32 = 25;
    let mut fleet = ecs_request(&env, "ecs-fleet", "web:1");
    fleet["count"] = COUNT.into();
    env.publish(&fleet).await;
    let fleet_id = id(&fleet);
    let end = events.terminal(&fleet_id).await;
    assert_eq!(end.state, State::Running, "{:#?}", end.error);
    assert_eq!(
        end.resource.as_ref().map(|r| r.members.len()),
        Some(COUNT as usize)
    );
    let tasks = fleet_tasks(&fleet_id, COUNT).await;
    assert_eq!(
        tasks.keys().copied().collect::<Vec<_>>(),
        (0..COUNT).collect::<Vec<_>>(),
        "a task for every member"
    );
    assert!(
        tasks.values().all(|t| t.len() == 1 && t[0].1),
        "one task per member, tagged with it: {tasks:#?}"
    );
    let batched = format!("{}{}", env.worker_log("ecs-a"), env.worker_log("ecs-b"))
        .lines()
        .filter(|l| l.contains("started a batch of fleet members") && !l.contains("members=1"))
        .count();
    assert!(batched > 0, "no RunTask started more than one member");

    let down = ecs_operation(&env, "ecs-fleet-down", "teardown", &fleet_id);
    env.publish(&down).await;
    let stopped = events.terminal(&id(&down)).await;
    assert_eq!(stopped.state, State::Stopped, "{:#?}", stopped.error);
    assert!(
        fleet_tasks(&fleet_id, COUNT).await.is_empty(),
        "tasks left after the fleet's teardown"
    );
}
