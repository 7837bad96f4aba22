//! A plain HTTP client for the worker's own endpoint (`METRICS_ADDR`): one `GET`, one
//! answer, connection closed.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr`: the status code and the body; `None` when nothing answers.
pub async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// A loopback address with a port free right now, for a worker to listen on.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    format!("127.0.0.1:{port}")
}

/// The status code of `GET path` once it is `code`, within `seconds`.
pub async fn until_status(addr: &str, path: &str, code: u16, seconds: u64) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline {
        if get(addr, path).await.map(|(c, _)| c) == Some(code) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// An OpenTelemetry collector as far as the tests need one: it takes OTLP/HTTP exports
/// in JSON (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) on `/v1/traces` and keeps every
/// span it was sent.
#[derive(Clone)]
pub struct Collector {
    pub addr: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the collector");
        let addr = listener.local_addr().expect("its address").to_string();
        let collector = Collector {
            addr,
            spans: Default::default(),
        };
        let keeper = collector.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(keeper.clone().serve(stream));
            }
        });
        collector
    }

    /// Answers the exports of one connection (kept alive between them).
    async fn serve(self, stream: tokio::net::TcpStream) {
        let mut stream = tokio::io::BufReader::new(stream);
        loop {
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                match tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            if let Ok(export) = serde_json::from_slice::<serde_json::Value>(&body) {
                let mut spans = self.spans.lock().expect("spans");
                for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                    }
                }
            }
            let answer =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
            if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// The spans of trace `trace_id` once `wanted` holds for them, within 30 s.
    pub async fn trace_until(
        &self,
        trace_id: &str,
        wanted: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let spans: Vec<serde_json::Value> = self
                .spans
                .lock()
                .expect("spans")
                .iter()
                .filter(|s| s["traceId"] == trace_id)
                .cloned()
                .collect();
            if wanted(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}
