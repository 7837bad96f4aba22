//! Readiness checks shared by platforms: a TCP connect, or an HTTP GET where any HTTP
//! answer (404 included) means something is serving.

use std::time::Duration;

use crate::backoff::Backoff;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One probe of a resource's readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp {
        host: String,
        port: u16,
    },
    Http {
        host: String,
        port: u16,
        path: String,
    },
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp { host, port } => write!(f, "TCP {host}:{port}"),
            Probe::Http { host, port, path } => write!(f, "HTTP GET http://{host}:{port}{path}"),
        }
    }
}

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why one probe attempt found nothing ready.
#[derive(Debug, thiserror::Error)]
pub enum ProbeFailure {
    #[error("connect timed out")]
    ConnectTimedOut,
    /// Refused, unreachable, reset: the socket error as the system gave it.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no HTTP answer in time")]
    NoHttpAnswer,
    /// Something answered, but not HTTP (another protocol on the port).
    #[error("answered without an HTTP status line ({0:?})")]
    NotHttp(String),
}

/// Why a resource never became ready: the two call for different error classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Nothing answered within the timeout; the message names the last failure.
    TimedOut(String),
    /// Not even a refusal came back within the timeout: every connection attempt timed
    /// out, as when packets to the address are dropped (a firewall, a broken port
    /// forward), not when the resource is up but does not listen yet.
    Unreachable(String),
    /// The resource stopped (exited, was removed) while being probed.
    Died(String),
    /// A teardown cancelled the request while it was probed.
    Cancelled,
}

impl From<crate::metrics::WaitCancelled> for NotReady {
    fn from(_: crate::metrics::WaitCancelled) -> Self {
        NotReady::Cancelled
    }
}

impl NotReady {
    /// The class an error for this failure carries: a resource that died is a bad image
    /// or command; one that never answered ran out of time.
    pub fn class(&self) -> provisioner_events::ErrorClass {
        match self {
            NotReady::TimedOut(_) | NotReady::Unreachable(_) => {
                provisioner_events::ErrorClass::Timeout
            }
            NotReady::Died(_) => provisioner_events::ErrorClass::InvalidRequest,
            NotReady::Cancelled => provisioner_events::ErrorClass::Conflict,
        }
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::TimedOut(why) | NotReady::Unreachable(why) | NotReady::Died(why) => {
                f.write_str(why)
            }
            NotReady::Cancelled => crate::metrics::WaitCancelled.fmt(f),
        }
    }
}

/// A connection to a local port in the ephemeral range where nothing listens can succeed
/// by connecting to itself: the kernel picked that very port as the probe's own source
/// port (TCP's simultaneous open). Polled often enough, a probe of a dead port sees it
/// now and then, and would call a resource that never listened ready.
fn refuse_self_connection(stream: &TcpStream) -> std::io::Result<()> {
    if stream.local_addr()? == stream.peer_addr()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "the probe connected to itself: nothing listens there",
        ));
    }
    Ok(())
}

impl Probe {
    /// One attempt: Ok when ready, what was seen otherwise.
    pub async fn check_once(&self) -> Result<(), ProbeFailure> {
        match self {
            Probe::Tcp { host, port } => {
                let stream = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| ProbeFailure::ConnectTimedOut)??;
                refuse_self_connection(&stream)?;
                Ok(())
            }
            Probe::Http { host, port, path } => {
                let mut stream = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| ProbeFailure::ConnectTimedOut)??;
                refuse_self_connection(&stream)?;
                let exchange = async {
                    let request = format!(
                        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: provisioner-health\r\nConnection: close\r\n\r\n"
                    );
                    stream.write_all(request.as_bytes()).await?;
                    let mut head = [0u8; 12];
                    let mut read = 0;
                    while read < head.len() {
                        let n = stream.read(&mut head[read..]).await?;
                        if n == 0 {
                            break;
                        }
                        read += n;
                    }
                    if head[..read].starts_with(b"HTTP/") {
                        Ok(())
                    } else {
                        Err(ProbeFailure::NotHttp(
                            String::from_utf8_lossy(&head[..read]).into_owned(),
                        ))
                    }
                };
                tokio::time::timeout(ATTEMPT_TIMEOUT, exchange)
                    .await
                    .map_err(|_| ProbeFailure::NoHttpAnswer)?
            }
        }
    }

    /// Probes until ready or until `timeout` passes. `still_alive` is asked between
    /// attempts so a resource that died fails fast, as [`NotReady::Died`].
    pub async fn wait_ready<F, Fut>(
        &self,
        timeout: Duration,
        still_alive: F,
    ) -> Result<(), NotReady>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        crate::metrics::health_wait(self.probe_until_ready(timeout, still_alive)).await
    }

    async fn probe_until_ready<F, Fut>(
        &self,
        timeout: Duration,
        mut still_alive: F,
    ) -> Result<(), NotReady>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut backoff = Backoff::new(
            timeout,
            Duration::from_millis(50),
            Duration::from_millis(500),
        );
        let mut ever_reached = false;
        loop {
            let last = match self.check_once().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            ever_reached |= !matches!(last, ProbeFailure::ConnectTimedOut);
            still_alive().await.map_err(NotReady::Died)?;
            if !backoff.wait().await {
                let why = format!(
                    "{self} did not answer within {} s (last: {last})",
                    timeout.as_secs()
                );
                return Err(if ever_reached {
                    NotReady::TimedOut(why)
                } else {
                    NotReady::Unreachable(why)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_connection_to_itself_is_not_a_listener() {
        // Bind a port, then connect from that very port to it: the simultaneous open a
        // probe of a dead ephemeral port can fall into.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = free.local_addr().expect("addr");
        drop(free);
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuse");
        socket.bind(address).expect("bind to itself");
        let stream = socket.connect(address).await.expect("self-connect");
        assert_eq!(stream.local_addr().ok(), stream.peer_addr().ok());
        let refused = refuse_self_connection(&stream).expect_err("refused");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        // A real listener's connection passes.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        assert!(refuse_self_connection(&stream).is_ok());
    }

    #[tokio::test]
    async fn http_probe_counts_any_http_answer_and_refuses_other_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for answer in [&b"HTTP/1.0 404 Not Found\r\n\r\n"[..], b"SSH-2.0-nope\r\n"] {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await;
                socket.write_all(answer).await.expect("write");
            }
        });
        let probe = Probe::Http {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        };
        assert!(probe.check_once().await.is_ok());
        assert!(matches!(
            probe.check_once().await,
            Err(ProbeFailure::NotHttp(seen)) if seen.starts_with("SSH-2.0")
        ));
    }

    #[tokio::test]
    async fn a_port_that_drops_every_connection_is_unreachable_not_slow() {
        // A listener that never accepts, its queue full: the kernel drops further SYNs,
        // so connects time out as they do behind a broken port forward.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let address = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(address)).await
            {
                queued.push(stream);
            }
        }
        let probe = Probe::Tcp {
            host: "127.0.0.1".into(),
            port: address.port(),
        };
        let error = probe
            .wait_ready(Duration::from_secs(3), || async { Ok(()) })
            .await
            .expect_err("nothing accepts");
        assert!(
            matches!(&error, NotReady::Unreachable(why) if why.contains("connect timed out")),
            "{error:?}"
        );
        assert_eq!(error.class(), provisioner_events::ErrorClass::Timeout);
        drop((queued, listener));
    }

    #[tokio::test]
    async fn wait_ready_gives_up_with_the_last_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let probe = Probe::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let error = probe
            .wait_ready(Duration::from_millis(300), || async { Ok(()) })
            .await
            .expect_err("nothing listens");
        assert!(
            matches!(&error, NotReady::TimedOut(why) if why.contains("did not answer")),
            "{error}"
        );
        let died = probe
            .wait_ready(Duration::from_secs(5), || async {
                Err("exited (code 1)".to_string())
            })
            .await
            .expect_err("dead");
        assert_eq!(died, NotReady::Died("exited (code 1)".into()));
    }
}
