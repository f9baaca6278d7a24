//! The small HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.

use super::health::{Health, Role};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// Connections served at once; more are closed unanswered, so that a flood of idle
/// clients costs bounded memory.
const MAX_CONNECTIONS: usize = 64;

/// How long one connection may take to send its request and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the endpoints on `listener` until `stop` resolves. Each connection is
/// served by a task of its own (at most [`MAX_CONNECTIONS`], each at most
/// [`REQUEST_TIMEOUT`]), so a slow or idle client never holds up a probe or a scrape.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Health,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    // Dropped on return: the connections still open are aborted with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::debug!("too many metrics connections; closing a new one");
                    continue;
                }
                let (handle, health) = (handle.clone(), health.clone());
                let served = async move {
                    match tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &handle, &health)).await {
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                        Err(_) => tracing::debug!("metrics request timed out"),
                        Ok(Ok(())) => {}
                    }
                };
                connections.spawn(served.instrument(tracing::debug_span!("metrics_connection")));
            }
        }
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn respond(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => ("200 OK", handle.render()),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" => match health.readiness() {
            Ok(Role::Active) => ("200 OK", "ready: active\n".to_string()),
            Ok(Role::Standby) => (
                "200 OK",
                "ready: standby (another instance does the work)\n".to_string(),
            ),
            Ok(Role::Shared) => (
                "200 OK",
                "ready: active for part of the work, standby for the rest\n".to_string(),
            ),
            Err(down) => (
                "503 Service Unavailable",
                format!("not ready: {}\n", down.join(", ")),
            ),
        },
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
