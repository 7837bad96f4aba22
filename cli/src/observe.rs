//! The worker's own HTTP endpoint (`METRICS_ADDR`): `/metrics` (the worker's counters
//! and timings in the OpenMetrics text format Prometheus scrapes), `/live` (the process
//! answers) and `/ready` (it consumes from a broker that takes its publishes; `503`
//! otherwise, so a load balancer or Kubernetes sends it no traffic and a rollout waits).
//!
//! A small HTTP/1.1 server of its own: three `GET` paths, one answer per connection. It
//! reads at most a request head, for at most five seconds, so a slow or hostile client
//! cannot hold the worker.

use std::sync::Arc;
use std::time::Duration;

use provisioner_core::metrics::{Health, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers on `listener` for as long as the worker runs.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Health) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _ = answer(socket, &metrics, &health).await;
        });
    }
}

/// Reads the request line of a head: method and path (without its query).
async fn request_line(socket: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(READ_TIMEOUT, read).await.ok()??;
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next()?.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target).to_owned();
    Some((method, path))
}

async fn answer(mut socket: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let Some((method, path)) = request_line(&mut socket).await else {
        return respond(&mut socket, 400, "text/plain", "bad request\n", true).await;
    };
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return respond(&mut socket, 405, "text/plain", "only GET\n", with_body).await;
    }
    match path.as_str() {
        "/metrics" => respond(&mut socket, 200, OPENMETRICS, &metrics.encode(), with_body).await,
        "/live" => respond(&mut socket, 200, "text/plain", "live\n", with_body).await,
        "/ready" if health.ready() => {
            respond(&mut socket, 200, "text/plain", "ready\n", with_body).await
        }
        "/ready" => {
            let body = "not ready: not consuming (connecting to the broker, the broker blocks publishing, or shutting down)\n";
            respond(&mut socket, 503, "text/plain", body, with_body).await
        }
        _ => {
            respond(
                &mut socket,
                404,
                "text/plain",
                "not found: /metrics, /live, /ready\n",
                with_body,
            )
            .await
        }
    }
}

async fn respond(
    socket: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    if with_body {
        socket.write_all(body.as_bytes()).await?;
    }
    socket.shutdown().await
}
