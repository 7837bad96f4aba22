//! A TCP proxy that injects network faults between a worker and RabbitMQ or Redis:
//! latency, a black hole (nothing passes either way — a partition), and resets
//! (every connection closed at once, new ones refused until it passes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Every chunk waits this long before it is passed on.
    Latency(Duration),
    /// Nothing passes either way; connections stay open.
    BlackHole,
    /// Every connection is closed, and new ones are closed at once.
    Reset,
}

pub struct FaultProxy {
    pub port: u16,
    fault: Arc<watch::Sender<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (sender, _) = watch::channel(Fault::Pass);
        let fault = Arc::new(sender);
        let accepting = fault.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let fault = accepting.subscribe();
                tokio::spawn(serve(client, upstream, fault));
            }
        });
        FaultProxy { port, fault, task }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut fault: watch::Receiver<Fault>) {
    // A new connection waits out a black hole and is dropped during a reset.
    loop {
        match *fault.borrow_and_update() {
            Fault::Reset => return,
            Fault::BlackHole => {}
            _ => break,
        }
        if fault.changed().await.is_err() {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, fault.clone());
    let down = pump(server_read, client_write, fault);
    // When either side ends (or a reset), both halves drop and both sockets close.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // A black hole reads nothing: bytes wait in the kernel's buffers, as in a
        // partition, and flow again when it heals (if the peers have not given up).
        while *fault.borrow() == Fault::BlackHole {
            if fault.changed().await.is_err() {
                return;
            }
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Reset {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let current = *fault.borrow();
        match current {
            Fault::Reset => return,
            Fault::Latency(delay) => tokio::time::sleep(delay).await,
            Fault::BlackHole | Fault::Pass => {}
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
