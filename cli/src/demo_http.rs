//! The program of the shipped process examples: answers every HTTP request with a short
//! greeting, so the embedded mode has a real health endpoint on any machine.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub async fn serve(port: u16) -> anyhow::Result<std::process::ExitCode> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
    let mut stop = std::pin::pin!(crate::shutdown_signal());
    loop {
        let (mut socket, _) = tokio::select! {
            _ = &mut stop => return Ok(std::process::ExitCode::SUCCESS),
            accepted = listener.accept() => accepted?,
        };
        let body = format!("{greeting} from the provisioner demo\n");
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
