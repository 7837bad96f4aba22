//! What the in-test API servers (the Kubernetes, GCP and ARM fakes) share. The HTTP
//! side: a listener on a free loopback port, a task per connection, each request handed
//! to the fake as a [`Call`] (method, path, query, JSON body) and its [`Answer`] sent
//! back as JSON. The state every fake keeps the same way: its world behind one lock
//! ([`Shared`]), the faults a test queued ([`FaultQueue`]), the calls seen ([`CallLog`])
//! and the reads that time readiness ([`ReadCounts`]). The fakes own the protocol; this
//! owns the plumbing they would otherwise each repeat.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;

mod world;
pub use world::{CallLog, FaultQueue, ReadCounts, Shared};

/// One request to a fake.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    /// The raw query string, without `?` (still percent-encoded).
    pub query: String,
    /// The body as JSON; `Null` when it is empty or not JSON.
    pub body: Value,
}

/// A fake's answer: a status, a JSON body (`Null` sends none) and extra headers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub fn json(status: u16, body: Value) -> Self {
        Answer {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// A listener on a free port of 127.0.0.1, bound before the fake is built so that the
/// fake knows its own address (for the URLs it hands out).
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port for a fake API server")
}

/// Serves `listener` until the runtime ends, answering every call with `handler`.
/// Handlers are synchronous: the fakes keep their world behind a mutex.
pub fn spawn<H>(listener: TcpListener, handler: H)
where
    H: Fn(Call) -> Answer + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(respond(&*handler, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn respond<H>(
    handler: &H,
    request: hyper::Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>>
where
    H: Fn(Call) -> Answer,
{
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = handler(Call {
        method,
        path,
        query,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    let mut response = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8");
    for (name, value) in &answer.headers {
        response = response.header(*name, value);
    }
    let body = if answer.status == 204 || answer.body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(answer.body.to_string())
    };
    response.body(Full::new(body)).expect("a response")
}
