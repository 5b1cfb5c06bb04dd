//! The HTTP proxy's connections to the app's workers (`[app.NAME.tls] upstream`).
//!
//! The front cannot tell which worker took a connection (the eBPF steering picks it in the
//! kernel, and all workers share one address), so the pool stays steering-aware by behaviour
//! rather than by name: a connection goes back to the pool only if its worker answered about as
//! fast as the others lately (time to the response head at most [`SLOW_FACTOR`] times this
//! process's running typical, or [`SLOW_FLOOR`]). A worker stuck in slow requests thus loses
//! every pooled connection after one more request on each, and the requests that would have
//! used them open new connections, which least-loaded steering places. `connect` opens a new
//! connection per request (the steering picks the worker of every request).
//!
//! A pooled connection is used only if hyper says it is ready, and kept at most [`IDLE_MAX`]
//! (under the keep-alive timeout of gunicorn, 2 s, and uvicorn, 5 s, so the worker does not
//! close it as a request goes out); a request hyper could not start on it (closed under it)
//! goes on a new connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::args::UpstreamMode;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection waits in the pool.
const IDLE_MAX: Duration = Duration::from_secs(1);
/// The most idle connections a front process keeps.
const MAX_IDLE: usize = 32;
/// An answer slower than this many times the typical one is a slow worker's.
const SLOW_FACTOR: u64 = 4;
/// ... but an answer within this is never slow (a loaded machine's jitter).
const SLOW_FLOOR: Duration = Duration::from_millis(5);

/// Why no worker connection could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failed {
    /// No worker accepted the connection (within the connect timeout).
    Connect,
    /// The HTTP/1.1 handshake on it failed.
    Handshake,
}

impl Failed {
    pub(super) fn why(self) -> &'static str {
        match self {
            Failed::Connect => "no worker of this app accepted the connection",
            Failed::Handshake => "the worker's connection failed",
        }
    }
}

/// A connection to a worker, lent for one exchange.
pub(super) struct Lease<B> {
    sender: SendRequest<B>,
    /// Its local port (`ss` on the app's address shows the worker).
    pub(super) port: u16,
}

struct Idle<B> {
    lease: Lease<B>,
    since: Instant,
}

/// One front process's way to its app's workers.
pub(super) struct Upstream<B> {
    addr: SocketAddr,
    mode: UpstreamMode,
    /// Oldest first.
    idle: Mutex<VecDeque<Idle<B>>>,
    /// A running average of the time to a response head, in µs (1/16 weight per exchange).
    typical_us: AtomicU64,
}

impl<B> Upstream<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(super) fn new(addr: SocketAddr, mode: UpstreamMode) -> Self {
        Upstream {
            addr,
            mode,
            idle: Mutex::new(VecDeque::new()),
            typical_us: AtomicU64::new(0),
        }
    }

    fn take_idle(&self) -> Option<Lease<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Newest first: the ones used last are the likeliest still open and fast.
        while let Some(i) = idle.pop_back() {
            if i.since.elapsed() < IDLE_MAX && i.lease.sender.is_ready() {
                return Some(i.lease);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Lease<B>, Failed> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Failed::Connect)?;
        let _ = stream.set_nodelay(true);
        let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
        let (sender, connection) = http1::Builder::new()
            .handshake::<_, B>(TokioIo::new(stream))
            .await
            .map_err(|_| Failed::Handshake)?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(Lease { sender, port })
    }

    /// Send `req` on a pooled connection, or a new one; the response and the connection, to
    /// [`Upstream::done`] once the response is read. `Err(Ok(failed))`: no connection;
    /// `Err(Err(e))`: the worker failed the exchange. `replay` makes a copy of a request that
    /// may be sent twice (idempotent, no body), asked only when a pooled connection is used:
    /// its worker may close it as the request goes out (a keep-alive timeout, a drain), and
    /// then the copy goes on a new connection.
    pub(super) async fn send(
        &self,
        mut req: Request<B>,
        replay: impl FnOnce(&Request<B>) -> Option<Request<B>>,
    ) -> Result<(Response<Incoming>, Lease<B>), Result<Failed, hyper::Error>> {
        if self.mode == UpstreamMode::Pool {
            if let Some(mut lease) = self.take_idle() {
                let copy = replay(&req);
                match lease.sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, lease)),
                    Err(mut e) => match (e.take_message(), copy) {
                        // Not started: the worker closed the connection as it went out.
                        (Some(r), _) => req = r,
                        // Sent, no answer (an answer's head would have been a response).
                        (None, Some(c)) => req = c,
                        (None, None) => return Err(Err(e.into_error())),
                    },
                }
            }
        }
        let mut lease = self.connect().await.map_err(Ok)?;
        match lease.sender.send_request(req).await {
            Ok(resp) => Ok((resp, lease)),
            Err(e) => Err(Err(e)),
        }
    }

    /// The exchange on `lease` is over, its response head came after `head`: pool the
    /// connection if its worker was about as fast as the rest, else close it.
    pub(super) fn done(self: &Arc<Self>, lease: Lease<B>, head: Duration) {
        let (keep, next) = judge(self.typical_us.load(Ordering::Relaxed), head);
        self.typical_us.store(next, Ordering::Relaxed);
        if self.mode != UpstreamMode::Pool || !keep {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut lease = lease;
            // Ready once hyper has read the response's end.
            if let Ok(Ok(())) = tokio::time::timeout(IDLE_MAX, lease.sender.ready()).await {
                let mut idle = this.idle.lock().unwrap_or_else(|p| p.into_inner());
                // The expired ones go (closed): a pooled connection holds a worker's
                // keep-alive slot, a thread in a thread-per-connection server.
                while idle.front().is_some_and(|i| i.since.elapsed() >= IDLE_MAX) {
                    idle.pop_front();
                }
                if idle.len() < MAX_IDLE {
                    idle.push_back(Idle {
                        lease,
                        since: Instant::now(),
                    });
                }
            }
        });
    }
}

/// The pool's rule, pure: whether a connection whose response head came after `head` goes back
/// to the pool given the running typical `typical_us` (0: none yet), and the typical after it.
fn judge(typical_us: u64, head: Duration) -> (bool, u64) {
    let us = head.as_micros().min(u64::MAX as u128) as u64;
    // One slow answer moves the average by a bounded step.
    let next = match typical_us {
        0 => us,
        t => t - t / 16 + us.min(t.saturating_mul(2 * SLOW_FACTOR)) / 16,
    };
    // Before any average, only the floor says fast.
    let keep =
        head <= SLOW_FLOOR || (typical_us > 0 && us <= typical_us.saturating_mul(SLOW_FACTOR));
    (keep, next.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_connection_is_pooled_when_its_worker_answered_about_as_fast_as_the_rest() {
        // Within the floor, whatever the typical.
        assert!(judge(0, 5 * MS).0);
        assert!(judge(100, 5 * MS).0);
        // Within 4x the typical.
        assert!(judge(10_000, 40 * MS).0);
        // Slower: the connection closes, the steering places the next request.
        assert!(!judge(2_000, 20 * MS).0);
        assert!(!judge(10_000, 41 * MS).0);
        // Before any average, only the floor.
        assert!(!judge(0, 300 * MS).0);
    }

    #[test]
    fn the_typical_follows_answers_and_one_slow_one_moves_it_a_bounded_step() {
        assert_eq!(judge(0, 3 * MS).1, 3_000);
        assert_eq!(judge(1_600, 3_200 * Duration::from_micros(1)).1, 1_700);
        // A 10 s answer counts as 8x the typical: 1000 - 62 + 8000 / 16.
        assert_eq!(judge(1_000, 10_000 * MS).1, 1_438);
        assert_eq!(judge(1, Duration::ZERO).1, 1, "never back to 'none yet'");
    }
}
