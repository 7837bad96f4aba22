//! Throttling injected: a small proxy between the worker and the emulator answers the
//! first launch calls as AWS does when it throttles (EC2's `RequestLimitExceeded` in XML
//! to RunInstances on LocalStack, ECS's `ThrottlingException` in JSON to RunTask on moto);
//! the request must still end `running`, with one instance or task. The AWS SDK retries
//! throttling itself (3 attempts), so more refusals than that reach the runtime's own
//! retry.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestEnv, id};
use provisioner_events::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which calls the proxy refuses (a marker found in the request's head or body) and the
/// refusal AWS sends.
#[derive(Clone, Copy)]
struct Throttle {
    marker: &'static str,
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
}

impl Throttle {
    fn response(&self) -> String {
        format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.body
        )
    }
}

const EC2_LAUNCH: Throttle = Throttle {
    marker: "Action=RunInstances",
    status: "503 Service Unavailable",
    content_type: "text/xml",
    body: "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>throttle-test</RequestID></Response>",
};
const ECS_RUN_TASK: Throttle = Throttle {
    marker: "AmazonEC2ContainerServiceV20141113.RunTask",
    status: "400 Bad Request",
    content_type: "application/x-amz-json-1.1",
    body: r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
};

/// Reads one HTTP/1.1 request: head and Content-Length body.
async fn read_request(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// Serves one request per connection: refuse it, or forward it with `Connection: close`.
async fn proxy(
    listener: TcpListener,
    upstream: String,
    throttle: Throttle,
    throttle_left: Arc<AtomicUsize>,
    throttled: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let upstream = upstream.clone();
        let throttle_left = throttle_left.clone();
        let throttled = throttled.clone();
        tokio::spawn(async move {
            let Some((head, body)) = read_request(&mut client).await else {
                return;
            };
            let is_launch = head.contains(throttle.marker)
                || String::from_utf8_lossy(&body).contains(throttle.marker);
            if is_launch
                && throttle_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                throttled.fetch_add(1, Ordering::SeqCst);
                let _ = client.write_all(throttle.response().as_bytes()).await;
                return;
            }
            let mut forwarded: String = head
                .split("\r\n")
                .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.is_empty())
                .map(|l| format!("{l}\r\n"))
                .collect();
            forwarded.push_str("Connection: close\r\n\r\n");
            let Ok(mut server) = TcpStream::connect(upstream.trim_start_matches("http://")).await
            else {
                return;
            };
            if server.write_all(forwarded.as_bytes()).await.is_err()
                || server.write_all(&body).await.is_err()
            {
                return;
            }
            let mut response = Vec::new();
            let _ = server.read_to_end(&mut response).await;
            let _ = client.write_all(&response).await;
        });
    }
}

#[tokio::test]
async fn throttled_launches_are_retried_until_the_instance_runs() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_url = format!("http://{}", listener.local_addr().expect("addr"));
    let throttle_left = Arc::new(AtomicUsize::new(4));
    let throttled = Arc::new(AtomicUsize::new(0));
    tokio::spawn(proxy(
        listener,
        common::aws_endpoint(),
        EC2_LAUNCH,
        throttle_left.clone(),
        throttled.clone(),
    ));

    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_platform_worker(
        "aws-ec2",
        "ec2",
        &[
            ("AWS_ENDPOINT_URL", proxy_url.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("ec2-throttled-{}", env.run_id),
        "operation": "provision", "platform": "aws-ec2",
        "spec": {"image_id": "ami-03cf127a", "instance_type": "t3.micro"}
    });
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(
        event.state,
        State::Running,
        "{event:#?}\n{}",
        env.worker_log("ec2")
    );
    assert_eq!(
        throttled.load(Ordering::SeqCst),
        4,
        "every injected refusal was met"
    );
    assert!(
        event.attempt >= 2,
        "the runtime retried after the SDK's own retries: {event:#?}"
    );
    let teardown = serde_json::json!({
        "schema_version": 1, "request_id": format!("ec2-throttled-down-{}", env.run_id),
        "operation": "teardown", "platform": "aws-ec2", "target_request_id": id(&request)
    });
    env.publish(&teardown).await;
    assert_eq!(events.terminal(&id(&teardown)).await.state, State::Stopped);
}

#[tokio::test]
async fn throttled_task_launches_are_retried_until_the_task_runs() {
    common::ecs_demo_cluster().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_url = format!("http://{}", listener.local_addr().expect("addr"));
    let throttle_left = Arc::new(AtomicUsize::new(4));
    let throttled = Arc::new(AtomicUsize::new(0));
    tokio::spawn(proxy(
        listener,
        common::ecs_endpoint(),
        ECS_RUN_TASK,
        throttle_left.clone(),
        throttled.clone(),
    ));

    let mut env = TestEnv::new().await;
    let mut events = env.events().await;
    env.start_platform_worker(
        "aws-ecs",
        "ecs",
        &[
            ("AWS_ENDPOINT_URL", proxy_url.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let request = serde_json::json!({
        "schema_version": 1, "request_id": format!("ecs-throttled-{}", env.run_id),
        "operation": "provision", "platform": "aws-ecs",
        "spec": {"cluster": "demo", "task_definition": "web:1", "launch_type": "FARGATE"}
    });
    env.publish(&request).await;
    let event = events.terminal(&id(&request)).await;
    assert_eq!(
        event.state,
        State::Running,
        "{event:#?}\n{}",
        env.worker_log("ecs")
    );
    assert_eq!(
        throttled.load(Ordering::SeqCst),
        4,
        "every injected refusal was met"
    );
    assert!(event.attempt >= 2, "the runtime retried: {event:#?}");
    let tasks = common::ecs_client()
        .list_tasks()
        .cluster("demo")
        .started_by(provisioner_aws_ecs::request_token(&id(&request)))
        .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
        .send()
        .await
        .expect("list");
    assert_eq!(tasks.task_arns().len(), 1, "one task");
    let teardown = serde_json::json!({
        "schema_version": 1, "request_id": format!("ecs-throttled-down-{}", env.run_id),
        "operation": "teardown", "platform": "aws-ecs", "target_request_id": id(&request)
    });
    env.publish(&teardown).await;
    assert_eq!(events.terminal(&id(&teardown)).await.state, State::Stopped);
}
