//! `corral front`: one TLS front process. It runs unprivileged (the front app's user, no
//! capabilities, no_new_privs, not dumpable), serves the listening socket on fd 3 (one of the
//! front's SO_REUSEPORT group, steered like workers), reads its certificates from the memfd on
//! fd 4, and proxies each connection's plaintext to the app's workers' address, where the
//! eBPF steering picks the worker.
//!
//! It tells the agent it is ready itself: `READY=1` on the `NOTIFY_SOCKET` the agent made for
//! this one process, sent once its certificates are loaded, its runtime runs and its listeners
//! are registered, just before its accept loop. The agent probes no front (a probe on the slot's
//! socket may be accepted by the front being replaced, and an undumpable front's fds cannot be
//! read to tell which one took it), so a rolling replacement stops the old front only on the
//! new one's own report.
//!
//! This file: its start (what the agent passed), the accept loop and one connection's course;
//! `tls` does the handshake and kTLS, `relay` moves the bytes.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::args::{FrontArgs, KtlsMode, ProxyMode};
use super::bundle::Bundle;
use super::fds;
use super::relay::{bad_gateway, proxy_ktls, proxy_userspace, write_all_shared};
use super::stats::{Stat, COUNT, NAMES};
use super::tls::{fallback_reason, handshake, server_config, start_ktls, Ktls};
use crate::sys;
use crate::sys::ktls::Direction;

const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Test-only: milliseconds a front waits, after its certificates and TLS configuration are
/// ready and before it starts serving and reports ready, to make a real front slow to start
/// (tests/tls.rs). The agent passes it on from its own environment to the fronts it starts
/// (`supervisor::launch`); nothing sets it outside the tests.
pub const TEST_START_DELAY_VAR: &str = "CORRAL_TEST_FRONT_START_DELAY_MS";
/// This process's counters: the shared memfd the agent reads (fd 5).
pub(super) struct Counters(sys::front::SharedCounters);

impl Counters {
    pub(super) fn add(&self, s: Stat, v: u64) {
        self.0.add(s as usize, v);
    }

    pub(super) fn one(&self, s: Stat) {
        self.add(s, 1);
    }

    /// "name value, ..." of the non-zero counters, for the log line at exit.
    fn summary(&self) -> String {
        NAMES
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let v = self.0.get(i);
                (v > 0).then(|| format!("{n} {v}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Counts a connection in `open_connections` while it lives.
struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.sub(Stat::Open as usize, 1);
    }
}

/// Why a front process could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what}: {source}")]
    Passed {
        what: &'static str,
        #[source]
        source: sys::front::FrontError,
    },
    #[error("the certificate bundle: {0}")]
    Bundle(String),
    #[error("ktls = \"require\", but this kernel cannot: {0}")]
    KtlsRequired(String),
    #[error("the TLS configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "no NOTIFY_SOCKET to report readiness on: `corral front` is started by the agent, which \
         sets it"
    )]
    NoNotifySocket,
    #[error("reporting readiness to the agent: {0}")]
    Notify(#[source] sys::notify::NotifyError),
    #[error("{TEST_START_DELAY_VAR}={0:?} is not a number of milliseconds")]
    TestDelay(String),
}

fn passed(what: &'static str) -> impl FnOnce(sys::front::FrontError) -> StartError {
    move |source| StartError::Passed { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// The `corral front` process: take what the agent passed, then serve until SIGTERM.
pub fn run(args: FrontArgs) -> Result<(), StartError> {
    sys::front::set_name();
    sys::front::make_undumpable().map_err(passed("making the front process undumpable"))?;
    // Before the runtime, so every thread it starts inherits it. A front that cannot (a
    // seccomp filter) serves all the same, only with more context switches per request.
    if let Err(e) = sys::front::set_batch_scheduling() {
        eprintln!("corral front: {e}: serving under the default scheduling policy");
    }
    let listener = sys::front::inherited_listener(fds::LISTENER)
        .map_err(passed("the listening socket (fd 3)"))?;
    let bundle_bytes =
        sys::front::read_bundle(fds::BUNDLE).map_err(passed("the certificate bundle (fd 4)"))?;
    let redirect = match args.redirect_to_port {
        Some(_) => Some(
            sys::front::inherited_fd_listener(fds::REDIRECT)
                .map_err(passed("the redirect_http listener (fd 6)"))?,
        ),
        None => None,
    };
    let bundle = Bundle::decode(&bundle_bytes).map_err(StartError::Bundle)?;
    drop(bundle_bytes);
    let http = args.proxy == ProxyMode::Http;
    let ktls = match args.ktls {
        // The HTTP proxy parses every byte in userspace: no kTLS (config refuses "require").
        _ if http => Ktls::Off,
        KtlsMode::Off => Ktls::Off,
        KtlsMode::Auto | KtlsMode::Require => match sys::ktls::probe() {
            Err(why) => Ktls::Unavailable(why.to_string()),
            Ok(()) => {
                let m = sys::ktls::matrix();
                let mut both = HashSet::new();
                let mut lines = Vec::new();
                for v in sys::ktls::VERSIONS {
                    for c in sys::ktls::CIPHERS {
                        let ok = |d| {
                            m.iter()
                                .any(|e| e.0 == v && e.1 == c && e.2 == d && e.3.is_ok())
                        };
                        let (tx, rx) = (ok(Direction::Tx), ok(Direction::Rx));
                        if tx && rx {
                            both.insert((v, c));
                        }
                        lines.push(format!(
                            "{v} {c}: {}",
                            match (tx, rx) {
                                (true, true) => "tx+rx",
                                (true, false) => "tx only",
                                (false, true) => "rx only",
                                (false, false) => "no",
                            }
                        ));
                    }
                }
                eprintln!("corral front: kernel TLS: {}", lines.join(", "));
                if both.is_empty() {
                    Ktls::Unavailable("the kernel takes no cipher suite in both directions".into())
                } else {
                    Ktls::Available(both)
                }
            }
        },
    };
    let acme = args
        .acme_challenges
        .clone()
        .map(super::acme::Challenges::new);
    let config = match (&ktls, args.ktls) {
        (Ktls::Unavailable(why), KtlsMode::Require) => {
            return Err(StartError::KtlsRequired(why.clone()))
        }
        (Ktls::Unavailable(why), _) => {
            eprintln!(
                "corral front: kernel TLS unavailable ({why}); every connection uses userspace \
                 rustls"
            );
            server_config(&bundle, None, http, acme.as_ref())
        }
        (Ktls::Available(both), KtlsMode::Require) => {
            server_config(&bundle, Some(both), http, acme.as_ref())
        }
        _ => server_config(&bundle, None, http, acme.as_ref()),
    }
    .map_err(StartError::Config)?;
    drop(bundle);
    let notifier = sys::notify::Notifier::from_env();
    if !notifier.enabled() {
        return Err(StartError::NoNotifySocket);
    }
    if let Ok(ms) = std::env::var(TEST_START_DELAY_VAR) {
        let ms: u64 = ms.parse().map_err(|_| StartError::TestDelay(ms))?;
        eprintln!("corral front: {TEST_START_DELAY_VAR}: starting {ms} ms late (test only)");
        std::thread::sleep(Duration::from_millis(ms));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the runtime"))?;
    rt.block_on(serve(
        listener,
        redirect,
        config,
        args,
        Arc::new(ktls),
        notifier,
    ))
}

async fn serve(
    listener: std::net::TcpListener,
    redirect: Option<std::net::TcpListener>,
    config: Arc<ServerConfig>,
    args: FrontArgs,
    ktls: Arc<Ktls>,
    notifier: sys::notify::Notifier,
) -> Result<(), StartError> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("the listening socket"))?;
    let listener = TcpListener::from_std(listener).map_err(io_err("the listening socket"))?;
    let args = Arc::new(args);
    let counters = Arc::new(Counters(
        sys::front::SharedCounters::inherited(fds::COUNTERS, COUNT)
            .map_err(passed("the counters memfd (fd 5)"))?,
    ));
    let handshakes = Arc::new(Semaphore::new(args.max_handshakes as usize));
    let pool = Arc::new(super::http::Pool::new(args.upstream, args.http.upstream));
    // SIGTERM: HTTP connections finish their requests in flight and close.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("the SIGTERM handler"))?;
    let redirects = match (redirect, args.redirect_to_port) {
        (Some(l), Some(port)) => {
            l.set_nonblocking(true)
                .map_err(io_err("the redirect_http listener"))?;
            let l = TcpListener::from_std(l).map_err(io_err("the redirect_http listener"))?;
            let counters = counters.clone();
            Some(tokio::spawn(serve_redirects(
                l,
                port,
                counters,
                args.acme_challenges
                    .clone()
                    .map(|d| Arc::new(super::acme::Challenges::new(d))),
            )))
        }
        _ => None,
    };
    eprintln!(
        "corral front: serving TLS for app {} on {}, upstream {}",
        args.app,
        listener
            .local_addr()
            .map_err(io_err("the listening socket"))?,
        args.upstream
    );
    // Everything that can fail has: connections queued on the listener since the agent made
    // it are accepted by the loop below, so this process now serves.
    notifier.notify("READY=1").map_err(StartError::Notify)?;
    let mut open = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => {
                let _ = stop_tx.send(true);
                break;
            }
            accepted = async {
                // At most max_handshakes in progress: the rest wait in the kernel's queue.
                let permit = handshakes.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => {
                let (permit, accepted) = accepted;
                let Ok(permit) = permit else { break };
                match accepted {
                    Ok((sock, peer)) => {
                        let (config, args, counters, ktls, stop, pool) = (
                            config.clone(),
                            args.clone(),
                            counters.clone(),
                            ktls.clone(),
                            stop.clone(),
                            pool.clone(),
                        );
                        open.spawn(async move {
                            let c = Passed { config, args, ktls, counters, stop, pool };
                            connection(sock, peer, c, permit).await
                        });
                    }
                    Err(e) => {
                        eprintln!("corral front: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            Some(_) = open.join_next(), if !open.is_empty() => {}
        }
    }
    // Draining: no new connections; the open ones finish (the agent's stop timeout bounds it).
    drop(listener);
    if let Some(r) = redirects {
        r.abort();
    }
    while open.join_next().await.is_some() {}
    eprintln!("corral front: drained; {}", counters.summary());
    Ok(())
}

/// What each connection gets from the process.
struct Passed {
    config: Arc<ServerConfig>,
    args: Arc<FrontArgs>,
    ktls: Arc<Ktls>,
    counters: Arc<Counters>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// The HTTP proxy's connections to the workers.
    pool: Arc<super::http::Pool>,
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    passed: Passed,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (config, args, ktls, counters) = (
        passed.config,
        &*passed.args,
        &*passed.ktls,
        &*passed.counters,
    );
    let mut sock = sock;
    counters.one(Stat::Open);
    let _open = OpenGuard(counters);
    let _ = sock.set_nodelay(true);
    if args.proxy == ProxyMode::Http {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let accepted = tokio::time::timeout(args.handshake_timeout, acceptor.accept(sock)).await;
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Err(_) => return counters.one(Stat::FailTimeout),
            Ok(Err(e)) => {
                return counters.one(match e.kind() {
                    io::ErrorKind::UnexpectedEof => Stat::FailEof,
                    io::ErrorKind::InvalidData => Stat::FailProtocol,
                    _ => Stat::FailIo,
                })
            }
        };
        drop(permit);
        counters.one(Stat::HandshakesUserspace);
        if tls.get_ref().1.alpn_protocol() == Some(super::acme::ACME_TLS_ALPN) {
            // A CA's TLS-ALPN-01 validation: the handshake was the answer.
            return;
        }
        let (args, counters) = (passed.args.clone(), passed.counters.clone());
        let alpn = match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => super::http::Alpn::H2,
            Some(_) => super::http::Alpn::Http11,
            None => super::http::Alpn::None,
        };
        super::http::serve(tls, peer, alpn, args, passed.pool, counters, passed.stop).await;
        return;
    }
    let conn =
        match tokio::time::timeout(args.handshake_timeout, handshake(&mut sock, config)).await {
            Ok(Ok(conn)) => conn,
            Err(_) => {
                counters.one(Stat::FailTimeout);
                return;
            }
            Ok(Err(e)) => {
                counters.one(match e.kind() {
                    io::ErrorKind::UnexpectedEof => Stat::FailEof,
                    io::ErrorKind::InvalidData => Stat::FailProtocol,
                    _ => Stat::FailIo,
                });
                return;
            }
        };
    drop(permit);
    if conn.alpn_protocol() == Some(super::acme::ACME_TLS_ALPN) {
        // A CA's TLS-ALPN-01 validation: the handshake was the answer.
        return;
    }
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(args.upstream))
            .await
        {
            Ok(Ok(u)) => u,
            _ => {
                counters.one(Stat::UpstreamFailures);
                let _ = bad_gateway(&mut sock, conn).await;
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    if args.proxy_protocol_v2 {
        let (Ok(client), Ok(local)) = (sock.peer_addr(), sock.local_addr()) else {
            return;
        };
        if write_all_shared(&upstream, &super::proxy::v2_header(client, local))
            .await
            .is_err()
        {
            counters.one(Stat::UpstreamFailures);
            return;
        }
    }
    let reason = fallback_reason(&conn, ktls);
    let conn = match start_ktls(&sock, conn, ktls) {
        Err(conn) => {
            counters.one(reason.unwrap_or(Stat::FallbackUlp));
            *conn
        }
        Ok(Ok(())) => {
            counters.one(Stat::HandshakesKtls);
            if let Ok(n) = proxy_ktls(sock, upstream, counters).await {
                counters.add(Stat::BytesSpliced, n);
            }
            return;
        }
        Ok(Err(why)) => {
            // The secrets have left rustls: there is no userspace path to fall back to.
            eprintln!("corral front: kTLS set-up failed after the handshake ({why}); closing");
            counters.one(Stat::KtlsSetupFailures);
            return;
        }
    };
    counters.one(Stat::HandshakesUserspace);
    if let Ok(n) = proxy_userspace(sock, conn, upstream).await {
        counters.add(Stat::BytesCopied, n);
    }
}

/// `redirect_http`: answer each plain HTTP request with a 308 to https (or a 400 saying why
/// not). One request per connection; a client that sends nothing for 5 s is dropped.
/// With `acme`, `/.well-known/acme-challenge/` requests get their HTTP-01 answer instead.
async fn serve_redirects(
    listener: TcpListener,
    https_port: u16,
    counters: Arc<Counters>,
    acme: Option<Arc<super::acme::Challenges>>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(redirect_one(
            sock,
            https_port,
            counters.clone(),
            acme.clone(),
        ));
    }
}

async fn redirect_one(
    mut sock: TcpStream,
    https_port: u16,
    counters: Arc<Counters>,
    acme: Option<Arc<super::acme::Challenges>>,
) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(at + 4);
            }
            if head.len() > super::redirect::MAX_HEAD {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
        }
    })
    .await;
    let response = match read {
        Ok(Ok(end)) => acme
            .and_then(|c| super::acme::http01_response(&c, &head[..end]))
            .unwrap_or_else(|| super::redirect::response(&head[..end], https_port)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
                .to_string()
        }
        _ => return,
    };
    if response.starts_with("HTTP/1.1 308") {
        counters.one(Stat::Redirects);
    }
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}
