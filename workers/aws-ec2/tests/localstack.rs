//! The EC2 platform against LocalStack's EC2 API (`PROVISIONER_TEST_AWS_ENDPOINT`, default
//! http://127.0.0.1:4566), which the README's test command starts. Test names end in
//! `_on_localstack`.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::Filter;
use provisioner_aws_ec2::{Ec2Platform, REQUEST_TAG};
use provisioner_core::Platform;
use provisioner_core::conformance::check_platform;
use provisioner_events::{ErrorClass, Request, RequestId, TeardownTarget, decode_request};

async fn client() -> Client {
    let endpoint = std::env::var("PROVISIONER_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    Client::from_conf(config)
}

async fn platform() -> Ec2Platform {
    Ec2Platform::new(client().await, "us-east-1")
}

/// An AMI the emulator knows.
async fn some_image() -> String {
    let images = client()
        .await
        .describe_images()
        .send()
        .await
        .expect("LocalStack must be running (the README's test command starts it)");
    images
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .find(|id| id.len() == 12 || id.len() == 21)
        .expect("LocalStack lists at least one AMI")
        .to_owned()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn request(id: &str, image: &str) -> Request {
    let body = serde_json::json!({
        "schema_version": 1, "request_id": id, "operation": "provision", "platform": "aws-ec2",
        "spec": {"image_id": image, "instance_type": "t3.micro", "tags": {"env": "test"}}
    });
    decode_request(body.to_string().as_bytes()).expect("valid")
}

async fn live_instances(request_id: &str) -> Vec<String> {
    let output = client()
        .await
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{REQUEST_TAG}"))
                .values(request_id)
                .build(),
        )
        .send()
        .await
        .expect("describe");
    output
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

#[tokio::test]
async fn ec2_platform_conforms_on_localstack() {
    let platform = platform().await;
    let image = some_image().await;
    let request = request(&unique("conf"), &image);
    check_platform(&platform, &request, |resource| async move {
        let output = client()
            .await
            .describe_instances()
            .instance_ids(&resource.id)
            .send()
            .await;
        output.is_ok_and(|o| {
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
}

#[tokio::test]
async fn a_crash_between_launch_and_the_store_write_launches_no_second_instance_on_localstack() {
    let platform = platform().await;
    let image = some_image().await;
    let id = unique("crash");
    // The first attempt launched and "crashed" before recording anything; the retry
    // must find the instance by its tag (LocalStack ignores ClientToken).
    let first = platform
        .provision(&request(&id, &image))
        .await
        .expect("first attempt");
    let retry = platform
        .provision(&request(&id, &image))
        .await
        .expect("retry");
    assert_eq!(first.id, retry.id);
    assert_eq!(live_instances(&id).await, vec![first.id.clone()]);
    assert!(first.id.starts_with("i-"));
    assert!(first.address.is_some(), "{first:?}");
    platform
        .teardown(&provisioner_events::TeardownTarget::Request(
            request(&id, &image).request_id,
        ))
        .await
        .expect("teardown");
    assert!(live_instances(&id).await.is_empty());
}

#[tokio::test]
async fn an_image_that_does_not_exist_is_an_invalid_request_on_localstack() {
    let platform = platform().await;
    let error = platform
        .provision(&request(&unique("noami"), "ami-0123456789abcdef0"))
        .await
        .expect_err("no such image");
    assert_eq!(error.class, ErrorClass::InvalidRequest, "{error}");
    assert!(
        error.message.contains("ami-0123456789abcdef0"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn stop_start_and_reboot_act_on_the_requests_instance_on_localstack() {
    let platform = platform().await;
    let image = some_image().await;
    let id = unique("cycle");
    let provisioned = platform
        .provision(&request(&id, &image))
        .await
        .expect("provision");
    let target = provisioner_events::TeardownTarget::Request(request(&id, &image).request_id);
    let state = |instance_id: String| async move {
        client()
            .await
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .expect("describe")
            .reservations()[0]
            .instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default()
    };
    for _ in 0..2 {
        let stopped = platform.stop(&target).await.expect("stop (twice)");
        assert_eq!(stopped.id, provisioned.id);
        assert_eq!(state(provisioned.id.clone()).await, "stopped");
    }
    let error = platform
        .reboot(&target)
        .await
        .expect_err("a stopped instance is not rebooted");
    assert_eq!(error.class, ErrorClass::InvalidRequest);
    for _ in 0..2 {
        let started = platform.start(&target).await.expect("start (twice)");
        assert_eq!(started.id, provisioned.id);
        assert_eq!(state(provisioned.id.clone()).await, "running");
    }
    platform.reboot(&target).await.expect("reboot");
    assert_eq!(state(provisioned.id.clone()).await, "running");
    platform.teardown(&target).await.expect("teardown");
    let error = platform.stop(&target).await.expect_err("nothing to stop");
    assert_eq!(error.class, ErrorClass::NotFound);
}

#[tokio::test]
async fn a_dry_run_asks_ec2_and_launches_nothing_on_localstack() {
    let platform = platform().await;
    let image = some_image().await;
    let id = unique("dry");
    let mut check = request(&id, &image);
    check.dry_run = true;
    platform
        .check(&check)
        .await
        .expect("a valid launch checks out");
    assert!(live_instances(&id).await.is_empty(), "nothing launched");

    let mut no_image = request(&unique("dry-noami"), "ami-0123456789abcdef0");
    no_image.dry_run = true;
    let refused = platform.check(&no_image).await.expect_err("no such image");
    assert_eq!(refused.class, ErrorClass::InvalidRequest, "{refused}");

    let teardown = decode_request(
        serde_json::json!({
            "schema_version": 1, "request_id": unique("dry-down"), "operation": "teardown",
            "platform": "aws-ec2", "target_request_id": id, "dry_run": true
        })
        .to_string()
        .as_bytes(),
    )
    .expect("teardown");
    platform
        .check(&teardown)
        .await
        .expect("tearing down nothing would succeed");
}

#[tokio::test]
async fn the_reconciler_sees_the_instances_the_provisioner_launched_with_their_request_on_localstack()
 {
    let platform = platform().await;
    let image = some_image().await;
    let id = unique("owned");
    let made = platform
        .provision(&request(&id, &image))
        .await
        .expect("provision");
    let owned = platform.owned().await.expect("owned");
    let mine: Vec<_> = owned
        .iter()
        .filter(|o| o.request_id.as_str() == id)
        .collect();
    assert_eq!(mine.len(), 1, "{owned:#?}");
    assert_eq!(mine[0].resource.id, made.id);
    assert!(mine[0].created.is_some(), "its launch time");
    platform
        .teardown(&TeardownTarget::Request(
            RequestId::new(id.as_str()).expect("id"),
        ))
        .await
        .expect("teardown");
    let owned = platform.owned().await.expect("owned");
    assert!(
        owned.iter().all(|o| o.request_id.as_str() != id),
        "a terminated instance is not listed"
    );
}
