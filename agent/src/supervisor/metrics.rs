//! `[agent] metrics`: serve `GET /metrics` (the Prometheus text of `corral status`) and the
//! kubelet's probes over plain HTTP: `GET /livez` (200 when the agent's event loop answers
//! within [`LIVENESS_TIMEOUT`]) and `GET /readyz` (200 while every app has its `min_ready`
//! workers ready and the agent is not stopping; 503 with the reason otherwise). The one place the privileged agent reads bytes from the network, so it reads as little
//! as it can: at most [`MAX_REQUEST`] bytes within [`REQUEST_TIMEOUT`], up to the end of the
//! headers, and only compares the request line with `GET /metrics` byte for byte; nothing is
//! parsed beyond that. At most [`MAX_CONNECTIONS`] are served at once; more are closed at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::events::Event;
use crate::control::{Request, Response};
use crate::policy::health::Readiness;

pub const MAX_REQUEST: usize = 8 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 16;
/// How long `/livez` and `/readyz` wait for the event loop: under the kubelet's default probe
/// timeout of 1 s, so a stuck loop is a 503 the kubelet reads rather than its own timeout.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_millis(800);

/// Accept and answer until the agent exits.
pub async fn serve(listener: TcpListener, tx: mpsc::UnboundedSender<Event>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (tx, active) = (tx.clone(), active.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &tx).await;
            active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    Livez,
    Readyz,
    /// Another path: 404.
    Elsewhere,
    /// Not a GET or not HTTP: 400.
    Bad,
}

/// The request line, compared byte for byte: `GET /metrics HTTP/1.x` (or with a query).
fn asked(head: &[u8]) -> Asked {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(rest) = line.strip_prefix(b"GET ") else {
        return Asked::Bad;
    };
    if !(rest.ends_with(b" HTTP/1.1") || rest.ends_with(b" HTTP/1.0")) {
        return Asked::Bad;
    }
    let target = &rest[..rest.len() - b" HTTP/1.1".len()];
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => Asked::Metrics,
        b"/livez" => Asked::Livez,
        b"/readyz" => Asked::Readyz,
        _ => Asked::Elsewhere,
    }
}

async fn answer(mut stream: TcpStream, tx: &mpsc::UnboundedSender<Event>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await;
    let (status, content_type, body) = match complete {
        Err(_) | Ok(Err(_)) | Ok(Ok(false)) if head.is_empty() => return Ok(()),
        Err(_) => (
            "408 Request Timeout",
            "text/plain",
            "no complete request\n".to_string(),
        ),
        Ok(Ok(false)) => (
            "400 Bad Request",
            "text/plain",
            format!("a request's head must end within {MAX_REQUEST} bytes\n"),
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(true)) => match asked(&head) {
            Asked::Metrics => match snapshot(tx).await {
                Some(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                None => (
                    "503 Service Unavailable",
                    "text/plain",
                    "the agent is stopping\n".to_string(),
                ),
            },
            Asked::Livez => match health(tx).await {
                Ok(_) => ("200 OK", "text/plain", "ok: the agent's loop answers\n".to_string()),
                Err(why) => ("503 Service Unavailable", "text/plain", why),
            },
            Asked::Readyz => match health(tx).await {
                Ok(r) if r.ready => ("200 OK", "text/plain", r.text),
                Ok(r) => ("503 Service Unavailable", "text/plain", r.text),
                Err(why) => ("503 Service Unavailable", "text/plain", why),
            },
            Asked::Elsewhere => (
                "404 Not Found",
                "text/plain",
                "corral serves /metrics, /livez and /readyz\n".to_string(),
            ),
            Asked::Bad => (
                "400 Bad Request",
                "text/plain",
                "corral's metrics endpoint answers GET /metrics, /livez and /readyz over HTTP/1.x\n"
                    .to_string(),
            ),
        },
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The event loop's readiness verdict, or why there is none: the loop did not answer within
/// [`LIVENESS_TIMEOUT`] (stuck), or it is gone.
async fn health(tx: &mpsc::UnboundedSender<Event>) -> Result<Readiness, String> {
    let (reply, rx) = oneshot::channel();
    tx.send(Event::Health { reply })
        .map_err(|_| "the agent's loop has ended\n".to_string())?;
    match tokio::time::timeout(LIVENESS_TIMEOUT, rx).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err("the agent's loop has ended\n".to_string()),
        Err(_) => Err(format!(
            "the agent's loop did not answer within {LIVENESS_TIMEOUT:?}\n"
        )),
    }
}

/// The status, rendered; `None` when the agent no longer answers.
async fn snapshot(tx: &mpsc::UnboundedSender<Event>) -> Option<String> {
    let (reply, rx) = oneshot::channel();
    tx.send(Event::Control {
        request: Request::Status { app: None },
        reply,
    })
    .ok()?;
    match rx.await.ok()? {
        Response::Status {
            apps,
            agent: Some(agent),
        } => Some(crate::metrics::render(&apps, &agent)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_over_http_1_is_metrics() {
        let cases: [(&[u8], Asked); 12] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Asked::Metrics),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Asked::Metrics),
            (b"GET / HTTP/1.1\r\n\r\n", Asked::Elsewhere),
            (b"GET /metricsX HTTP/1.1\r\n\r\n", Asked::Elsewhere),
            (b"GET /livez HTTP/1.1\r\n\r\n", Asked::Livez),
            (b"GET /readyz?verbose HTTP/1.1\r\n\r\n", Asked::Readyz),
            (b"GET /readyzz HTTP/1.1\r\n\r\n", Asked::Elsewhere),
            (b"HEAD /readyz HTTP/1.1\r\n\r\n", Asked::Bad),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Asked::Bad),
            (b"GET /metrics\r\n\r\n", Asked::Bad),
            (b"\x16\x03\x01\x00\xa5\x01\x00", Asked::Bad),
            (b"", Asked::Bad),
        ];
        for (request, expected) in cases {
            assert_eq!(
                asked(request),
                expected,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }
}
