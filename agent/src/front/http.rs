//! The HTTP proxy (`proxy = "http"`): hyper serves HTTP/1.1 and HTTP/2 to the client over the
//! TLS stream, and each request goes to the app's workers over HTTP/1.1 on a connection of its
//! own to the app's address, where the eBPF steering picks the least-loaded worker for it
//! (ARCHITECTURE.md: "a connection per upstream request"). Bodies stream both ways, frame by
//! frame; HTTP/1.1 upgrades (WebSockets) become a byte copy once both sides have switched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tower_http::timeout::TimeoutBody;

use super::args::FrontArgs;
use super::forwarded;
use super::host::{self, Refused};
use super::process::Counters;
use super::stats::Stat;
use super::upstream::{Lease, Upstream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The proxy's way to the workers, shared by a front process's connections.
pub(super) type Pool = Upstream<ProxyBody>;

/// What every request of one client connection shares.
struct Conn {
    args: Arc<FrontArgs>,
    counters: Arc<Counters>,
    peer: SocketAddr,
    /// The client is one of `trusted_proxies`: its forwarded headers are kept.
    trusted: bool,
    upstream: Arc<Pool>,
    /// Signalled as each request starts (a permit stays once one has).
    requested: tokio::sync::Notify,
    /// HTTP/2 only: its requests whose responses are not done (streams open), and when the
    /// last one was, for the idle timeout hyper has no setting for.
    streams: Option<Streams>,
}

struct Streams {
    open: AtomicUsize,
    last_done: Mutex<Instant>,
}

/// The protocol the client chose in the TLS handshake (ALPN), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alpn {
    H2,
    Http11,
    None,
}

/// Serve HTTP on one TLS connection until the client is done, or, once `stop` turns true,
/// until its requests in flight are answered (HTTP/1.1: `Connection: close`; HTTP/2: GOAWAY).
/// An HTTP/2 connection without an open stream for `header_timeout` gets a GOAWAY too.
pub(super) async fn serve<I>(
    io: I,
    peer: SocketAddr,
    alpn: Alpn,
    args: Arc<FrontArgs>,
    upstream: Arc<Pool>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // On a dual-stack listener ("[::]:443") an IPv4 client is ::ffff:a.b.c.d: as a.b.c.d it
    // matches "10.0.0.0/8" in trusted_proxies and is forwarded as the app expects.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let h = &args.http;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(h.header_timeout)
        // Over this, hyper answers 431 (a head that does not fit, or too many fields).
        .max_buf_size(h.max_header_bytes as usize)
        .max_headers(h.max_headers as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(h.max_header_bytes)
        // A silent HTTP/2 client is pinged; one that does not answer is dropped.
        .keep_alive_interval(h.header_timeout)
        .keep_alive_timeout(h.header_timeout);
    // ALPN settled the protocol: no sniffing for the HTTP/2 preface (a client that offered no
    // ALPN may still speak either).
    let builder = match alpn {
        Alpn::H2 => builder.http2_only(),
        Alpn::Http11 => builder.http1_only(),
        Alpn::None => builder,
    };
    let trusted = h.trusted_proxies.iter().any(|n| n.contains(&peer.ip()));
    let conn = Arc::new(Conn {
        args: args.clone(),
        counters,
        peer,
        trusted,
        upstream,
        requested: tokio::sync::Notify::new(),
        streams: (alpn == Alpn::H2).then(|| Streams {
            open: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
        }),
    });
    let first = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    let idle = h.header_timeout;
    tokio::select! {
        r = served.as_mut() => return malformed(r, &first),
        // An HTTP/1.1 connection accepted before SIGTERM whose client has not sent its first
        // request yet is not closed under it (the client would see its request refused): it
        // gets that request answered, or header_timeout ends it. HTTP/2 says which streams
        // were not processed (GOAWAY's last stream id), so the client may retry them
        // elsewhere: the GOAWAY goes at once.
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            if first.streams.is_none() {
                first.requested.notified().await;
            }
        } => {}
        _ = idle_h2(&first, idle), if first.streams.is_some() => {}
    }
    served.as_mut().graceful_shutdown();
    let r = served.await;
    malformed(r, &first);
}

/// Returns when an HTTP/2 connection has had no open stream for `idle`.
async fn idle_h2(conn: &Conn, idle: Duration) {
    let Some(streams) = &conn.streams else { return };
    loop {
        let since = match streams.open.load(Ordering::Acquire) {
            0 => *streams.last_done.lock().unwrap_or_else(|p| p.into_inner()),
            _ => Instant::now(),
        };
        let until = since + idle;
        if Instant::now() >= until && streams.open.load(Ordering::Acquire) == 0 {
            return;
        }
        tokio::time::sleep_until(until.into()).await;
    }
}

/// hyper answers a malformed HTTP/1.1 head itself (400, 431, 505...) without a body and
/// offers no way to add one (hyperium/hyper#3225): the reason goes to the access log.
fn malformed(r: Result<(), BoxError>, conn: &Conn) {
    if let (Err(e), true) = (r, conn.args.http.access_log) {
        let parse = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
        if parse {
            eprintln!("corral front: {} malformed request: {e}", conn.peer);
        }
    }
}

/// Counts an HTTP/2 stream open while its response body lives.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(s) = &self.0.streams {
            *s.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            s.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A response body that holds its stream's [`StreamGuard`].
struct Tracked {
    inner: ProxyBody,
    _guard: StreamGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(req: Request<Incoming>, conn: Arc<Conn>) -> Response<ProxyBody> {
    let guard = conn.streams.as_ref().map(|s| {
        s.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(conn.clone())
    });
    let resp = handle_inner(req, &conn).await;
    match guard {
        Some(g) => resp.map(|inner| Tracked { inner, _guard: g }.boxed_unsync()),
        None => resp,
    }
}

async fn handle_inner(req: Request<Incoming>, conn: &Conn) -> Response<ProxyBody> {
    let started = Instant::now();
    conn.requested.notify_one();
    conn.counters.one(Stat::HttpRequests);
    let (method, version) = (req.method().clone(), req.version());
    // Only the access log needs the target past the request's hand-over.
    let target = conn.args.http.access_log.then(|| {
        req.uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
    });
    let (resp, worker) = forward(req, conn).await;
    match resp.status() {
        StatusCode::BAD_GATEWAY if worker.is_none() => conn.counters.one(Stat::HttpBadGateway),
        StatusCode::GATEWAY_TIMEOUT if worker.is_none() => {
            conn.counters.one(Stat::HttpGatewayTimeout)
        }
        _ => {}
    }
    if let Some(target) = target {
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        // The upstream connection's local port: which worker took it is the kernel's choice,
        // seen in `ss` on the app's address, not by the front.
        let worker = worker.map_or("-".to_string(), |p| format!("upstream-port {p}"));
        eprintln!(
            "corral front: {} \"{method} {target} {version:?}\" {} {bytes} {}ms {worker}",
            conn.peer,
            resp.status().as_u16(),
            started.elapsed().as_millis(),
        );
    }
    resp
}

/// A short plain-text answer of the proxy's own.
fn answer(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let body = format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The request to the worker, sent; its response to the client. The worker's local port (which
/// worker connection took it), or `None` when the proxy answered itself.
async fn forward(mut req: Request<Incoming>, conn: &Conn) -> (Response<ProxyBody>, Option<u16>) {
    let h = &conn.args.http;
    // An HTTP/1.1 upgrade (WebSocket): the one hop-by-hop exchange passed on.
    let upgrade = (req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    .then(|| req.headers().get(header::UPGRADE).cloned())
    .flatten();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let host = {
        let hosts = req.headers().get_all(header::HOST);
        match host::of_request(
            req.version(),
            req.uri(),
            hosts.iter().map(HeaderValue::as_bytes),
        ) {
            // A valid Host or authority is visible ASCII: a header value as it is.
            Ok(h) => match HeaderValue::from_str(h) {
                Ok(v) => v,
                Err(_) => {
                    return (
                        answer(StatusCode::BAD_REQUEST, Refused::BadHost.why()),
                        None,
                    )
                }
            },
            Err(why) => return (answer(StatusCode::BAD_REQUEST, why.why()), None),
        }
    };
    let (mut parts, body) = req.into_parts();
    forwarded::strip_hop_by_hop(&mut parts.headers);
    // The front answers `Expect: 100-continue` itself when it reads the body.
    parts.headers.remove(header::EXPECT);
    // HTTP/2 may split cookies over several fields; HTTP/1.1 wants one (RFC 9113 8.2.3).
    if parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .nth(1)
        .is_some()
    {
        let cookies: Vec<&str> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    // The one host the request is for (an absolute-form target's replaces the client's Host).
    parts.headers.insert(header::HOST, host.clone());
    forwarded::apply(
        &mut parts.headers,
        conn.peer.ip(),
        host.to_str().ok(),
        conn.trusted,
    );
    if let Some(u) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u.clone());
    }
    parts.uri = match parts.uri.path_and_query() {
        // Origin-form: the path and query as hyper parsed them (a cheap clone of its bytes).
        Some(p) if parts.method != Method::CONNECT => hyper::Uri::from(p.clone()),
        _ => {
            return (
                answer(StatusCode::BAD_REQUEST, "CONNECT is not proxied"),
                None,
            )
        }
    };
    parts.version = Version::HTTP_11;

    // The worker's time to answer counts from the end of the request body (an upload may take
    // longer than upstream_timeout); a body silent for body_timeout ends the exchange.
    let (sent_tx, sent_rx) = oneshot::channel();
    let body = if body.is_end_stream() {
        let _ = sent_tx.send(());
        Empty::new().map_err(|e| match e {}).boxed_unsync()
    } else {
        TimeoutBody::new(
            h.body_timeout,
            SignalEnd {
                inner: body,
                end: Some(sent_tx),
            },
        )
        .boxed_unsync()
    };

    let timeout = h.upstream_timeout;
    let asked = Instant::now();
    // An idempotent request without a body (RFC 9110 9.2.2) may be sent again: a copy of its
    // head, with an empty body, for a pooled connection closed under it.
    let replay = |req: &Request<ProxyBody>| {
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent && req.body().is_end_stream() && upgrade.is_none()).then(|| {
            let mut copy = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
            *copy.method_mut() = req.method().clone();
            *copy.uri_mut() = req.uri().clone();
            *copy.version_mut() = req.version();
            *copy.headers_mut() = req.headers().clone();
            copy
        })
    };
    let sent = tokio::select! {
        r = conn.upstream.send(Request::from_parts(parts, body), replay) => r,
        _ = async {
            let _ = sent_rx.await;
            tokio::time::sleep(timeout).await;
        } => {
            let why = format!("the worker did not answer within {} ms", timeout.as_millis());
            return (answer(StatusCode::GATEWAY_TIMEOUT, &why), None);
        }
    };
    let (mut resp, lease) = match sent {
        Ok(x) => x,
        Err(Ok(failed)) => return (answer(StatusCode::BAD_GATEWAY, failed.why()), None),
        Err(Err(e)) => {
            let why = format!("the worker closed the connection before answering ({e})");
            return (answer(StatusCode::BAD_GATEWAY, &why), None);
        }
    };
    let head = asked.elapsed();
    let worker = Some(lease.port);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_side) = client_upgrade else {
            return (
                answer(
                    StatusCode::BAD_GATEWAY,
                    "the worker switched protocols unasked",
                ),
                None,
            );
        };
        let worker_side = hyper::upgrade::on(&mut resp);
        conn.counters.one(Stat::HttpUpgrades);
        tokio::spawn(async move {
            if let (Ok(c), Ok(w)) = (client_side.await, worker_side.await) {
                let (mut c, mut w) = (TokioIo::new(c), TokioIo::new(w));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut w).await;
            }
        });
        let resp = resp.map(|_| Empty::new().map_err(|e| match e {}).boxed_unsync());
        return (resp, worker);
    }
    forwarded::strip_hop_by_hop(resp.headers_mut());
    let body_timeout = h.body_timeout;
    let upstream = conn.upstream.clone();
    let resp = resp.map(|inner| {
        if inner.is_end_stream() {
            upstream.done(lease, head);
            return TimeoutBody::new(body_timeout, inner).boxed_unsync();
        }
        let returning = Returning {
            inner,
            lease: Some((lease, head)),
            upstream,
        };
        TimeoutBody::new(body_timeout, returning).boxed_unsync()
    });
    (resp, worker)
}

/// A worker's response body that gives its connection back to the pool once read to the end
/// (dropped before that, the connection closes with it).
struct Returning {
    inner: Incoming,
    lease: Option<(Lease<ProxyBody>, Duration)>,
    upstream: Arc<Pool>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let end = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if end {
            if let Some((lease, head)) = self.lease.take() {
                self.upstream.done(lease, head);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that says when it has been read to its end (the worker has all of it).
struct SignalEnd {
    inner: Incoming,
    end: Option<oneshot::Sender<()>>,
}

impl Body for SignalEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(end) = self.end.take() {
                let _ = end.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
