//! The ECS platform against the moto that enforces IAM
//! (`PROVISIONER_TEST_IAM_ENDPOINT`, default http://127.0.0.1:5001), which the README's
//! test command starts. The worker under test runs as an IAM user holding exactly the
//! documented policy (the manifest's, `provisioner_aws_ecs::permissions`), so a call it
//! makes without the right fails here as on AWS; the tests' own setup and inspection run
//! as moto's administrator. Test names end in `_on_moto`.

use std::sync::Arc;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ecs::types::{ContainerDefinition, DesiredStatus};
use provisioner_aws_ecs::{EcsPlatform, request_token};
use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, TeardownTarget, decode_request};
use tokio::sync::OnceCell;

fn endpoint() -> String {
    provisioner_aws_test_support::endpoint()
}

fn client_as(credentials: Credentials) -> Client {
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials)
        .build();
    Client::from_conf(config)
}

/// The tests' own client: moto's administrator.
fn client() -> Client {
    client_as(provisioner_aws_test_support::admin())
}

/// The worker's client: a user holding exactly the documented policy, made once.
async fn worker_client() -> Client {
    static WORKER: OnceCell<Credentials> = OnceCell::const_new();
    let credentials = WORKER
        .get_or_init(|| async {
            provisioner_aws_test_support::user_with_policy(
                "provisioner-ecs-worker",
                &provisioner_aws_ecs::permissions::iam_policy(),
            )
            .await
        })
        .await;
    client_as(credentials.clone())
}

/// The cluster `demo` and task definition `web:1` the example names, made once.
async fn fixtures() {
    static MADE: OnceCell<()> = OnceCell::const_new();
    MADE.get_or_init(|| async {
        let ecs = client();
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
                    ContainerDefinition::builder()
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
    })
    .await;
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn request(id: &str, spec: serde_json::Value) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "aws-ecs",
        "spec": spec
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

fn example(id: &str) -> Request {
    request(
        id,
        serde_json::json!({"cluster": "demo", "task_definition": "web:1", "launch_type": "FARGATE", "network": {"subnets": ["subnet-0a1b2c3d"], "assign_public_ip": true}}),
    )
}

async fn running_tasks(request_id: &str) -> Vec<String> {
    client()
        .list_tasks()
        .cluster("demo")
        .started_by(request_token(request_id))
        .desired_status(DesiredStatus::Running)
        .send()
        .await
        .expect("list tasks")
        .task_arns()
        .to_vec()
}

/// A subnet and the default security group of moto's default VPC, for the awsvpc network
/// an inline Fargate task needs (moto insists on a security group where AWS would default).
async fn default_network() -> (String, String) {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .credentials_provider(provisioner_aws_test_support::admin())
        .build();
    let ec2 = aws_sdk_ec2::Client::from_conf(config);
    let subnet = ec2
        .describe_subnets()
        .send()
        .await
        .expect("moto serves EC2 too")
        .subnets()
        .iter()
        .find_map(|s| s.subnet_id())
        .expect("moto has a default VPC with subnets")
        .to_owned();
    let group = ec2
        .describe_security_groups()
        .send()
        .await
        .expect("security groups")
        .security_groups()
        .iter()
        .find_map(|g| g.group_id())
        .expect("moto has a default security group")
        .to_owned();
    (subnet, group)
}

#[tokio::test]
async fn ecs_platform_conforms_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let request = example(&unique("conf"));
    check_platform(&platform, &request, |resource| async move {
        client()
            .describe_tasks()
            .cluster("demo")
            .tasks(&resource.id)
            .send()
            .await
            .is_ok_and(|o| o.tasks().iter().any(|t| t.last_status() == Some("RUNNING")))
    })
    .await;
}

#[tokio::test]
async fn a_crash_between_run_task_and_the_store_write_starts_no_second_task_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let id = unique("crash");
    // The first attempt started the task and "crashed" before recording anything; the
    // retry must find it by startedBy and tag (moto ignores clientToken).
    let first = platform
        .provision(&example(&id))
        .await
        .expect("first attempt");
    let retry = platform.provision(&example(&id)).await.expect("retry");
    assert_eq!(first.id, retry.id);
    assert!(first.id.contains(":task/demo/"), "{}", first.id);
    assert_eq!(running_tasks(&id).await, vec![first.id.clone()]);

    let target = TeardownTarget::Request(example(&id).request_id);
    let stopped = platform.teardown(&target).await.expect("teardown");
    assert_eq!(stopped.map(|r| r.id), Some(first.id.clone()));
    assert!(running_tasks(&id).await.is_empty());
    assert_eq!(
        platform.teardown(&target).await.expect("teardown again"),
        None
    );
    assert_eq!(
        platform
            .teardown(&TeardownTarget::Resource(first.id))
            .await
            .expect("by ARN, stopped"),
        None
    );
}

#[tokio::test]
async fn an_inline_container_is_registered_once_and_runs_with_its_address_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let (subnet, group) = default_network().await;
    let spec = serde_json::json!({
        "cluster": "demo",
        "container": {"image": "public.ecr.aws/nginx/nginx:1.27", "ports": [80], "env": {"GREETING": "hi"}},
        "network": {"subnets": [subnet], "security_groups": [group]},
        "overrides": [{"name": "main", "env": {"EXTRA": "1"}}]
    });
    let first = platform
        .provision(&request(&unique("inline"), spec.clone()))
        .await
        .expect("inline task");
    let second = platform
        .provision(&request(&unique("inline"), spec))
        .await
        .expect("second inline task");
    assert_ne!(first.id, second.id);
    let address = first
        .address
        .clone()
        .expect("an awsvpc task has a private address");
    assert_eq!(first.endpoints.len(), 1);
    assert_eq!(
        (first.endpoints[0].host.as_str(), first.endpoints[0].port),
        (address.as_str(), 80)
    );

    let described = client()
        .describe_tasks()
        .cluster("demo")
        .tasks(&first.id)
        .tasks(&second.id)
        .send()
        .await
        .expect("describe");
    let definitions: Vec<_> = described
        .tasks()
        .iter()
        .filter_map(|t| t.task_definition_arn())
        .collect();
    assert_eq!(definitions.len(), 2);
    assert_eq!(
        definitions[0], definitions[1],
        "the same container reuses one task definition"
    );
    for resource in [first, second] {
        platform
            .teardown(&TeardownTarget::Resource(resource.id))
            .await
            .expect("teardown by ARN");
    }
}

#[tokio::test]
async fn missing_clusters_and_definitions_are_request_errors_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let no_cluster = platform
        .provision(&request(
            &unique("nocluster"),
            serde_json::json!({"cluster": "no-such-cluster", "task_definition": "web:1"}),
        ))
        .await
        .expect_err("no such cluster");
    assert!(
        matches!(
            no_cluster.class,
            ErrorClass::NotFound | ErrorClass::InvalidRequest
        ),
        "{no_cluster}"
    );
    assert!(!no_cluster.retryable, "{no_cluster}");
    let no_definition = platform
        .provision(&request(
            &unique("nodef"),
            serde_json::json!({"cluster": "demo", "task_definition": "no-such-family:7"}),
        ))
        .await
        .expect_err("no such task definition");
    assert!(
        matches!(
            no_definition.class,
            ErrorClass::NotFound | ErrorClass::InvalidRequest
        ),
        "{no_definition}"
    );
    assert!(!no_definition.retryable, "{no_definition}");
}

#[tokio::test]
async fn tasks_the_provisioner_did_not_start_are_left_alone_on_moto() {
    fixtures().await;
    let foreign = client()
        .run_task()
        .cluster("demo")
        .task_definition("web:1")
        .launch_type(aws_sdk_ecs::types::LaunchType::Fargate)
        .send()
        .await
        .expect("run a task by hand");
    let arn = foreign.tasks()[0].task_arn().expect("arn").to_owned();
    let platform = EcsPlatform::new(worker_client().await);
    let refused = platform
        .teardown(&TeardownTarget::Resource(arn.clone()))
        .await
        .expect_err("not ours");
    assert_eq!(refused.class, ErrorClass::Conflict, "{refused}");
    client()
        .stop_task()
        .cluster("demo")
        .task(&arn)
        .send()
        .await
        .expect("clean up");
}

#[tokio::test]
async fn the_reconciler_sees_the_tasks_the_provisioner_started_with_their_request_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let id = unique("owned");
    let made = platform.provision(&example(&id)).await.expect("provision");
    let owned = platform.owned().await.expect("owned");
    let mine: Vec<_> = owned
        .iter()
        .filter(|o| o.request_id.as_str() == id)
        .collect();
    assert_eq!(mine.len(), 1, "{owned:#?}");
    assert_eq!(mine[0].resource.id, made.id);
    // moto's tasks have no createdAt (ECS always sets it), so `created` is not checked
    // here; without it the reconciler leaves a task alone as too young to judge.
    platform
        .teardown(&TeardownTarget::Request(
            provisioner_events::RequestId::new(id.as_str()).expect("id"),
        ))
        .await
        .expect("teardown");
    let owned = platform.owned().await.expect("owned");
    assert!(
        owned.iter().all(|o| o.request_id.as_str() != id),
        "a stopped task is not listed"
    );
}

#[tokio::test]
async fn vcpus_quotas_count_a_tasks_cpu_units_on_moto() {
    fixtures().await;
    let platform = EcsPlatform::new(worker_client().await);
    let vcpus = |cost: provisioner_core::QuotaCost| cost.get(provisioner_core::VCPUS).copied();
    // A registered definition's task CPU, read from ECS.
    let family = unique("quota");
    client()
        .register_task_definition()
        .family(&family)
        .cpu("2048")
        .memory("4096")
        .container_definitions(
            ContainerDefinition::builder()
                .name("work")
                .image("public.ecr.aws/nginx/nginx:1.27")
                .essential(true)
                .build(),
        )
        .send()
        .await
        .expect("register");
    let named = request(
        &unique("q"),
        serde_json::json!({"cluster": "demo", "task_definition": format!("{family}:1"), "launch_type": "FARGATE", "network": {"subnets": ["subnet-0a1b2c3d"]}}),
    );
    let cost = platform.quota_cost(&named).await.expect("cost");
    assert_eq!(vcpus(cost), Some(2));
    // An inline container's CPU units; a quarter of a vCPU holds one.
    let inline = request(
        &unique("q"),
        serde_json::json!({"cluster": "demo", "container": {"image": "public.ecr.aws/nginx/nginx:1.27", "cpu": 256, "memory_mib": 512}, "launch_type": "FARGATE", "network": {"subnets": ["subnet-0a1b2c3d"]}}),
    );
    let cost = platform.quota_cost(&inline).await.expect("cost");
    assert_eq!(vcpus(cost), Some(1));
    // A definition without task or container CPU (web:1) counts one.
    let cost = platform
        .quota_cost(&example(&unique("q")))
        .await
        .expect("cost");
    assert_eq!(vcpus(cost), Some(1));
}

/// Counts the requests whose body holds a given text (e.g. a ListTasks `startedBy`).
#[derive(Debug)]
struct CountRequests {
    holding: String,
    seen: Arc<std::sync::atomic::AtomicUsize>,
}

impl aws_sdk_ecs::config::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_ecs::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_ecs::config::RuntimeComponents,
        _: &mut aws_sdk_ecs::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let body = context.request().body().bytes().unwrap_or_default();
        if String::from_utf8_lossy(body).contains(&self.holding) {
            self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Tasks a batch started whose worker died before tagging them with their members still
/// name their members, by the batch's marks: the reconciler sees whose they are (and so
/// removes them when no record explains them) instead of skipping them for good. It
/// looks each batch's group up once, not once per task.
#[tokio::test]
async fn batch_tasks_not_yet_tagged_are_owned_by_their_members_on_moto() {
    fixtures().await;
    let fleet = unique("untagged");
    let group_lookups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = aws_sdk_ecs::Client::from_conf(
        worker_client()
            .await
            .config()
            .to_builder()
            .interceptor(CountRequests {
                holding: provisioner_aws_ecs::group_token(&fleet, 0),
                seen: group_lookups.clone(),
            })
            .build(),
    );
    let platform = EcsPlatform::new(counted);
    let (subnet, group) = default_network().await;
    let tag = |key: &str, value: &str| {
        aws_sdk_ecs::types::Tag::builder()
            .key(key)
            .value(value)
            .build()
    };
    // A batch of members 3, 7 and 9, started as a worker starts it, never tagged after.
    let started = client()
        .run_task()
        .cluster("demo")
        .task_definition("web:1")
        .count(3)
        .launch_type(aws_sdk_ecs::types::LaunchType::Fargate)
        .started_by(provisioner_aws_ecs::group_token(&fleet, 0))
        .network_configuration(
            aws_sdk_ecs::types::NetworkConfiguration::builder()
                .awsvpc_configuration(
                    aws_sdk_ecs::types::AwsVpcConfiguration::builder()
                        .subnets(subnet)
                        .security_groups(group)
                        .build()
                        .expect("awsvpc"),
                )
                .build(),
        )
        .tags(tag(provisioner_aws_ecs::MANAGED_TAG, "true"))
        .tags(tag(provisioner_aws_ecs::FLEET_TAG, &fleet))
        .tags(tag(
            provisioner_aws_ecs::MEMBERS_TAG,
            &provisioner_aws_ecs::members_tag("b1", &[3, 7, 9]),
        ))
        .send()
        .await
        .expect("run task");
    let mut arns: Vec<String> = started
        .tasks()
        .iter()
        .filter_map(|t| t.task_arn().map(str::to_owned))
        .collect();
    arns.sort();
    assert_eq!(arns.len(), 3);

    let owned = platform.owned().await.expect("owned");
    // One look at the group: its running and its stopped tasks.
    assert_eq!(
        group_lookups.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the group is looked up once for its three tasks"
    );
    let of = |arn: &str| {
        owned
            .iter()
            .find(|o| o.resource.id == arn)
            .map(|o| o.request_id.to_string())
    };
    // The batch's members, zipped with its tasks in ARN order.
    assert_eq!(of(&arns[0]), Some(format!("{fleet}#3")));
    assert_eq!(of(&arns[1]), Some(format!("{fleet}#7")));
    assert_eq!(of(&arns[2]), Some(format!("{fleet}#9")));
    assert_eq!(
        platform
            .owner_of(&arns[1])
            .await
            .expect("owner")
            .map(|id| id.to_string()),
        Some(format!("{fleet}#7"))
    );
    for arn in arns {
        let _ = client().stop_task().cluster("demo").task(arn).send().await;
    }
}

/// The double refuses what the policy does not grant, as ECS does
/// (`AccessDeniedException`, classed `permission`, not retried), at the call that needs
/// it, and nothing is started: without `ecs:RunTask` a provision ends there; without
/// `ecs:ListClusters` the setup check fails, naming the right.
#[tokio::test]
async fn a_right_missing_from_the_policy_is_refused_as_on_aws_on_moto() {
    use provisioner_aws_ecs::permissions::iam_policy;
    use provisioner_aws_test_support::{user_with_policy, without};
    fixtures().await;
    let no_run = user_with_policy(
        "provisioner-ecs-norun",
        &without(&iam_policy(), "ecs:RunTask"),
    )
    .await;
    let platform = EcsPlatform::new(client_as(no_run));
    let id = unique("norun");
    let refused = platform
        .provision(&example(&id))
        .await
        .expect_err("RunTask is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(!refused.retryable, "{refused:?}");
    assert!(running_tasks(&id).await.is_empty(), "nothing started");

    for finding in EcsPlatform::new(worker_client().await).preflight().await {
        assert_ne!(
            finding.outcome,
            provisioner_core::Outcome::Fail,
            "{finding:?}"
        );
    }
    let no_list = user_with_policy(
        "provisioner-ecs-nolist",
        &without(&iam_policy(), "ecs:ListClusters"),
    )
    .await;
    let findings = EcsPlatform::new(client_as(no_list)).preflight().await;
    assert!(
        findings
            .iter()
            .any(|f| f.check == "ecs:ListClusters" && f.outcome == provisioner_core::Outcome::Fail),
        "{findings:?}"
    );
}
