//! The Lambda Runtime API, served in process for the tests and the cold-start benchmark
//! that run the real `provisioner-lambda` binary (`AWS_LAMBDA_RUNTIME_API`), and the
//! event shapes they invoke it with. Included by path from both.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

pub type Answer = Result<serde_json::Value, serde_json::Value>;

/// The Runtime API: `/next` hands out queued invocations (long-polling as Lambda does),
/// `/response` and `/error` complete them.
#[derive(Clone)]
pub struct RuntimeApi {
    pub addr: SocketAddr,
    queue: mpsc::UnboundedSender<Invocation>,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
}

/// A queued invocation: its id, its payload, and the time the function gets for it.
type Invocation = (String, serde_json::Value, Duration);

type Pending = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Invocation>>>;

async fn route(
    request: Request<hyper::body::Incoming>,
    pending: Pending,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let reply = |status: StatusCode, body: &str| {
        Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("response"))
    };
    if path == "/2018-06-01/runtime/invocation/next" {
        let Some((id, payload, time)) = pending.lock().await.recv().await else {
            return reply(StatusCode::GONE, "");
        };
        let deadline = SystemTime::now() + time;
        let deadline_ms = deadline
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis();
        return Ok(Response::builder()
            .header("lambda-runtime-aws-request-id", id)
            .header("lambda-runtime-deadline-ms", deadline_ms.to_string())
            .header(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:000000000000:function:provisioner-test",
            )
            .header(
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000",
            )
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload.to_string())))
            .expect("response"));
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if let Some(rest) = path.strip_prefix("/2018-06-01/runtime/invocation/") {
        let (id, kind) = rest.split_once('/').unwrap_or((rest, ""));
        let answer = match kind {
            "response" => Ok(value),
            "error" => Err(value),
            _ => return reply(StatusCode::NOT_FOUND, ""),
        };
        if let Some(sender) = waiting.lock().expect("lock").remove(id) {
            let _ = sender.send(answer);
        }
        return reply(StatusCode::ACCEPTED, r#"{"status":"OK"}"#);
    }
    if path == "/2018-06-01/runtime/init/error" {
        eprintln!("init error reported: {value}");
        return reply(StatusCode::ACCEPTED, r#"{"status":"OK"}"#);
    }
    reply(StatusCode::NOT_FOUND, "")
}

impl RuntimeApi {
    pub async fn start() -> RuntimeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (queue, receiver) = mpsc::unbounded_channel();
        let pending: Pending = Arc::new(tokio::sync::Mutex::new(receiver));
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>> = Arc::default();
        let api = RuntimeApi {
            addr,
            queue,
            waiting: waiting.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (pending, waiting) = (pending.clone(), waiting.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        route(request, pending.clone(), waiting.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        api
    }

    /// Invokes the function with two minutes to run, and waits for its answer.
    pub async fn invoke(&self, payload: serde_json::Value) -> Answer {
        self.invoke_within(payload, Duration::from_secs(120)).await
    }

    /// Invokes the function with `time` to run (its deadline), and waits for its answer.
    pub async fn invoke_within(&self, payload: serde_json::Value, time: Duration) -> Answer {
        let id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .expect("lock")
            .insert(id.clone(), sender);
        self.queue.send((id, payload, time)).expect("queue");
        tokio::time::timeout(Duration::from_secs(150), receiver)
            .await
            .expect("the function answered in time")
            .expect("answer")
    }
}

/// Runs rabbitmqctl, bounded: a broker that stalls fails the test instead of hanging it.
pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("timeout")
        .arg("120")
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (scripts/test.sh installs RabbitMQ)");
    assert!(output.status.success(), "rabbitmqctl {args:?}");
}

/// A scheduled event, as an EventBridge rule with a schedule delivers one.
#[allow(dead_code)] // the cold-start benchmark invokes with queue events only
pub fn scheduled_event() -> serde_json::Value {
    serde_json::json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2026-12-01T10:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/provisioner-housekeeping"],
        "detail": {}
    })
}

/// An Amazon MQ for RabbitMQ event, as its event source mapping delivers one: bodies in
/// base64, string headers as byte arrays.
pub fn rabbitmq_event(queue: &str, bodies: &[serde_json::Value]) -> serde_json::Value {
    let published: Vec<(serde_json::Value, String)> = bodies
        .iter()
        .map(|body| (body.clone(), "AIDACKCEVSQ6C2EXAMPLE".to_owned()))
        .collect();
    rabbitmq_event_published_by(queue, &published)
}

/// [`rabbitmq_event`] of messages each published by the broker user named with it (the
/// event's `userId`, the AMQP `user_id` the broker vouched for): the function tells its
/// own messages from producers' by it.
pub fn rabbitmq_event_published_by(
    queue: &str,
    published: &[(serde_json::Value, String)],
) -> serde_json::Value {
    let messages: Vec<serde_json::Value> = published
        .iter()
        .map(|(body, user_id)| {
            let data = body.to_string();
            serde_json::json!({
                "basicProperties": {
                    "contentType": "application/json", "contentEncoding": null,
                    "headers": {}, "deliveryMode": 2, "priority": 0, "correlationId": null,
                    "replyTo": null, "expiration": null, "messageId": null,
                    "timestamp": "Nov 21, 2026, 10:00:00 AM", "type": null,
                    "userId": user_id, "appId": null, "clusterId": null,
                    "bodySize": data.len()
                },
                "redelivered": false,
                "data": base64::engine::general_purpose::STANDARD.encode(data)
            })
        })
        .collect();
    serde_json::json!({
        "eventSource": "aws:rmq",
        "eventSourceArn": "arn:aws:mq:us-east-1:000000000000:broker:provisioning:b-0000",
        "rmqMessagesByQueue": {format!("{queue}::/"): messages}
    })
}
