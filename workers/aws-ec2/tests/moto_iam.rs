//! The EC2 platform as an IAM user holding exactly the documented policy (the manifest's,
//! `provisioner_aws_ec2::permissions`), against the moto that enforces IAM
//! (`PROVISIONER_TEST_IAM_ENDPOINT`, default http://127.0.0.1:5001; the README's test
//! command starts it). Every operation the worker has runs here, so a call it makes
//! without the right fails as on AWS (`UnauthorizedOperation`); and a policy missing one
//! right is refused at the call that needs it, leaving nothing behind. The other EC2
//! tests run against LocalStack, which grants everything. Test names end in `_on_moto`.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::Filter;
use provisioner_aws_ec2::permissions::iam_policy;
use provisioner_aws_ec2::{Ec2Platform, REQUEST_TAG};
use provisioner_aws_test_support::{admin, endpoint, user_with_policy, without};
use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, TeardownTarget, decode_request};
use tokio::sync::OnceCell;

fn client_as(credentials: Credentials) -> Client {
    Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(credentials)
            .build(),
    )
}

/// The worker, as a user holding exactly the documented policy (made once).
async fn worker() -> Ec2Platform {
    static WORKER: OnceCell<Credentials> = OnceCell::const_new();
    let credentials = WORKER
        .get_or_init(|| async { user_with_policy("provisioner-ec2-worker", &iam_policy()).await })
        .await;
    Ec2Platform::new(client_as(credentials.clone()), "us-east-1")
}

/// An AMI moto knows, read by the tests' administrator.
async fn some_image() -> String {
    client_as(admin())
        .describe_images()
        .send()
        .await
        .expect("the moto that enforces IAM must be running (the README's test command starts it)")
        .images()
        .iter()
        .find_map(|i| i.image_id())
        .expect("moto lists at least one AMI")
        .to_owned()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn request(body: serde_json::Value) -> Request {
    decode_request(body.to_string().as_bytes()).expect("valid")
}

fn provision(id: &str, image: &str) -> Request {
    request(serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "aws-ec2",
        "tenant": "team-a",
        "spec": {"image_id": image, "instance_type": "t3.micro", "tags": {"env": "test"}}
    }))
}

async fn live_instances(request_id: &str) -> Vec<String> {
    client_as(admin())
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{REQUEST_TAG}"))
                .values(request_id)
                .build(),
        )
        .send()
        .await
        .expect("describe")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            i.state()
                .and_then(|s| s.name())
                .is_some_and(|n| n.as_str() != "terminated" && n.as_str() != "shutting-down")
        })
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

/// Every operation of the worker, and its setup checks, under exactly the documented
/// policy: a right the code uses and the policy lacks fails here.
#[tokio::test]
async fn every_operation_runs_under_the_documented_policy_on_moto() {
    let platform = worker().await;
    let image = some_image().await;
    let id = unique("iam");
    let request = provision(&id, &image);

    for finding in platform.preflight().await {
        assert_ne!(
            finding.outcome,
            provisioner_core::Outcome::Fail,
            "{}: {}",
            finding.check,
            finding.detail
        );
    }
    let mut dry = request.clone();
    dry.dry_run = true;
    platform.check(&dry).await.expect("a dry run of the launch");
    assert!(
        live_instances(&id).await.is_empty(),
        "a dry run launches nothing"
    );
    platform
        .quota_cost(&request)
        .await
        .expect("a tenant's cost reads the instance type");

    check_platform(&platform, &request, |resource| async move {
        client_as(admin())
            .describe_instances()
            .instance_ids(&resource.id)
            .send()
            .await
            .is_ok_and(|o| {
                o.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .any(|i| {
                        i.state()
                            .and_then(|s| s.name())
                            .is_some_and(|n| n.as_str() == "running" || n.as_str() == "pending")
                    })
            })
    })
    .await;

    let cycle = unique("iam-cycle");
    let made = platform
        .provision(&provision(&cycle, &image))
        .await
        .expect("provision");
    let target = TeardownTarget::Request(provision(&cycle, &image).request_id);
    platform.stop(&target).await.expect("stop");
    platform.start(&target).await.expect("start");
    platform.reboot(&target).await.expect("reboot");
    let described = platform.describe(&target).await.expect("describe");
    assert_eq!(described.map(|d| d.resource.id), Some(made.id.clone()));
    let owned = platform.owned().await.expect("the reconciler's listing");
    assert!(owned.iter().any(|o| o.resource.id == made.id));
    assert_eq!(
        platform
            .owner_of(&made.id)
            .await
            .expect("owner")
            .map(|r| r.to_string()),
        Some(cycle.clone())
    );
    platform.teardown(&target).await.expect("teardown");
    assert!(live_instances(&cycle).await.is_empty());
}

/// The double refuses what the policy does not grant, at the call that needs it, with
/// EC2's answer classed `permission` (not retried), and nothing is left behind: a worker
/// whose policy lacks a right learns it on the first request here, not in production.
#[tokio::test]
async fn a_right_missing_from_the_policy_is_refused_as_on_aws_on_moto() {
    let image = some_image().await;

    let no_types = without(&iam_policy(), "ec2:DescribeInstanceTypes");
    let platform = Ec2Platform::new(
        client_as(user_with_policy("provisioner-ec2-notypes", &no_types).await),
        "us-east-1",
    );
    let refused = platform
        .quota_cost(&provision(&unique("notypes"), &image))
        .await
        .expect_err("DescribeInstanceTypes is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    let findings = platform.preflight().await;
    assert!(
        findings
            .iter()
            .any(|f| f.check == "ec2:DescribeInstanceTypes"
                && f.outcome == provisioner_core::Outcome::Fail),
        "provisioner check names the missing right: {findings:?}"
    );

    let no_launch = without(&iam_policy(), "ec2:RunInstances");
    let platform = Ec2Platform::new(
        client_as(user_with_policy("provisioner-ec2-nolaunch", &no_launch).await),
        "us-east-1",
    );
    let id = unique("nolaunch");
    let refused = platform
        .provision(&provision(&id, &image))
        .await
        .expect_err("RunInstances is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert!(
        !refused.retryable,
        "a missing right is not retried: {refused:?}"
    );
    assert!(live_instances(&id).await.is_empty(), "nothing launched");

    // A launch the worker could make but not end: the teardown says so, the instance
    // stays findable by its request.
    let full = worker().await;
    let id = unique("noterminate");
    full.provision(&provision(&id, &image))
        .await
        .expect("provision");
    let no_terminate = without(&iam_policy(), "ec2:TerminateInstances");
    let platform = Ec2Platform::new(
        client_as(user_with_policy("provisioner-ec2-noterminate", &no_terminate).await),
        "us-east-1",
    );
    let target = TeardownTarget::Request(provision(&id, &image).request_id);
    let refused = platform
        .teardown(&target)
        .await
        .expect_err("TerminateInstances is refused");
    assert_eq!(refused.class, ErrorClass::Permission, "{refused}");
    assert_eq!(
        live_instances(&id).await.len(),
        1,
        "still there, still ours"
    );
    full.teardown(&target)
        .await
        .expect("the documented policy ends it");
}

/// A direct CreateTags, outside a launch, is refused: the policy grants it only with
/// `ec2:CreateAction = RunInstances`, so the worker's rights cannot mark a foreign
/// instance `provisioner:managed`.
#[tokio::test]
async fn tags_are_written_only_at_launch_on_moto() {
    let image = some_image().await;
    let foreign = client_as(admin())
        .run_instances()
        .image_id(&image)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("a foreign instance")
        .instances()[0]
        .instance_id()
        .expect("id")
        .to_owned();
    let credentials = user_with_policy("provisioner-ec2-tags", &iam_policy()).await;
    let refused = client_as(credentials)
        .create_tags()
        .resources(&foreign)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("provisioner:managed")
                .value("true")
                .build(),
        )
        .send()
        .await
        .expect_err("CreateTags outside a launch is refused");
    assert_eq!(
        aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused),
        Some("UnauthorizedOperation"),
        "{refused:?}"
    );
    let _ = client_as(admin())
        .terminate_instances()
        .instance_ids(foreign)
        .send()
        .await;
}
