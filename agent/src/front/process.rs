//! `corral front`: one TLS front process. It runs unprivileged (the front app's user, no
//! capabilities, no_new_privs, not dumpable), serves the listening socket on fd 3 (one of the
//! front's SO_REUSEPORT group, steered like workers), reads its certificates from the memfd on
//! fd 4, and proxies each connection's plaintext to the app's workers' address, where the
//! eBPF steering picks the worker.
//!
//! Handshakes read one TLS record at a time, so nothing past the client's Finished is ever
//! buffered in userspace (what kTLS needs: the kernel must see every record after it).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::server::ServerConfig;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::args::{FrontArgs, KtlsMode};
use super::bundle::Bundle;
use super::fds;
use super::stats::{Stat, COUNT, NAMES};
use crate::sys;
use crate::sys::ktls::{Cipher, Direction, Version};

/// A TLS record's payload may be 2^14 bytes plus expansion (RFC 8446 5.2: 2^14 + 256).
const MAX_RECORD: usize = 16384 + 2048;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COPY_CHUNK: usize = 64 * 1024;

/// This process's counters: the shared memfd the agent reads (fd 5).
struct Counters(sys::front::SharedCounters);

impl Counters {
    fn add(&self, s: Stat, v: u64) {
        self.0.add(s as usize, v);
    }

    fn one(&self, s: Stat) {
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

/// The (version, cipher) pairs the kernel takes in both directions.
type KernelSuites = HashSet<(Version, Cipher)>;

/// What kTLS can do for this process's connections.
enum Ktls {
    Off,
    Unavailable(String),
    Available(KernelSuites),
}

fn suite_of(suite: CipherSuite) -> Option<Cipher> {
    Some(match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Cipher::Aes128Gcm,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Cipher::Aes256Gcm,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Cipher::Chacha20Poly1305,
        _ => return None,
    })
}

fn version_of(v: ProtocolVersion) -> Option<Version> {
    match v {
        ProtocolVersion::TLSv1_2 => Some(Version::Tls12),
        ProtocolVersion::TLSv1_3 => Some(Version::Tls13),
        _ => None,
    }
}

/// `only`: offer just these (ktls = "require": every connection must be one the kernel takes).
pub fn server_config(
    bundle: &Bundle,
    only: Option<&HashSet<(Version, Cipher)>>,
) -> Result<Arc<ServerConfig>, String> {
    let resolver = bundle.resolver()?;
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(only) = only {
        provider.cipher_suites.retain(|s| {
            let v = version_of(s.version().version);
            let c = suite_of(s.suite());
            matches!((v, c), (Some(v), Some(c)) if only.contains(&(v, c)))
        });
        if provider.cipher_suites.is_empty() {
            return Err("the kernel takes none of the cipher suites rustls offers".into());
        }
    }
    let provider = Arc::new(provider);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // For kTLS: the traffic secrets leave rustls once the handshake is done.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
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
    let ktls = match args.ktls {
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
    let config = match (&ktls, args.ktls) {
        (Ktls::Unavailable(why), KtlsMode::Require) => {
            return Err(StartError::KtlsRequired(why.clone()))
        }
        (Ktls::Unavailable(why), _) => {
            eprintln!(
                "corral front: kernel TLS unavailable ({why}); every connection uses userspace \
                 rustls"
            );
            server_config(&bundle, None)
        }
        (Ktls::Available(both), KtlsMode::Require) => server_config(&bundle, Some(both)),
        _ => server_config(&bundle, None),
    }
    .map_err(StartError::Config)?;
    drop(bundle);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the runtime"))?;
    rt.block_on(serve(listener, redirect, config, args, Arc::new(ktls)))
}

async fn serve(
    listener: std::net::TcpListener,
    redirect: Option<std::net::TcpListener>,
    config: Arc<ServerConfig>,
    args: FrontArgs,
    ktls: Arc<Ktls>,
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("the SIGTERM handler"))?;
    let redirects = match (redirect, args.redirect_to_port) {
        (Some(l), Some(port)) => {
            l.set_nonblocking(true)
                .map_err(io_err("the redirect_http listener"))?;
            let l = TcpListener::from_std(l).map_err(io_err("the redirect_http listener"))?;
            let counters = counters.clone();
            Some(tokio::spawn(serve_redirects(l, port, counters)))
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
    let mut open = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = async {
                // At most max_handshakes in progress: the rest wait in the kernel's queue.
                let permit = handshakes.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => {
                let (permit, accepted) = accepted;
                let Ok(permit) = permit else { break };
                match accepted {
                    Ok((sock, peer)) => {
                        let (config, args, counters, ktls) =
                            (config.clone(), args.clone(), counters.clone(), ktls.clone());
                        open.spawn(async move {
                            connection(sock, peer, config, &args, &ktls, &counters, permit).await
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

/// The agent's readiness and health probes come from these loopback source ports.
fn is_probe(peer: &SocketAddr) -> bool {
    peer.ip().is_loopback()
        && (sys::socket::PROBE_PORT_BASE..sys::socket::PROBE_PORT_BASE + sys::socket::PROBE_PORTS)
            .contains(&peer.port())
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    args: &FrontArgs,
    ktls: &Ktls,
    counters: &Counters,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut sock = sock;
    if is_probe(&peer) {
        // The agent's probe checks that this connection was accepted (sock_diag sees it open):
        // hold it until the prober closes it, as a server waiting for a request would.
        let mut b = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while matches!(sock.read(&mut b).await, Ok(n) if n > 0) {}
        })
        .await;
        return;
    }
    counters.one(Stat::Open);
    let _open = OpenGuard(counters);
    let _ = sock.set_nodelay(true);
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

/// Move a finished handshake's record crypto into the kernel. `Err(conn)`: not possible for
/// this connection, nothing changed, serve it in userspace (the reason is counted by the
/// caller through [`fallback_reason`]). `Ok(Err)`: failed after the secrets were extracted.
fn start_ktls(
    sock: &TcpStream,
    conn: ServerConnection,
    ktls: &Ktls,
) -> Result<Result<(), String>, Box<ServerConnection>> {
    if fallback_reason(&conn, ktls).is_some() {
        return Err(Box::new(conn));
    }
    let Some(version) = conn.protocol_version().and_then(version_of) else {
        return Err(Box::new(conn));
    };
    if sys::ktls::set_ulp(sock.as_fd()).is_err() {
        return Err(Box::new(conn));
    }
    let secrets = match conn.dangerous_extract_secrets() {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("extracting secrets: {e}"))),
    };
    let info = |(seq, secrets): (u64, ConnectionTrafficSecrets)| {
        let (cipher, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => return Err("a cipher kTLS does not know".to_string()),
        };
        sys::ktls::CryptoInfo::new(version, cipher, key.as_ref(), iv.as_ref(), seq)
            .map_err(|e| e.to_string())
    };
    let r = (|| {
        let tx = info(secrets.tx)?;
        let rx = info(secrets.rx)?;
        sys::ktls::set_crypto(sock.as_fd(), Direction::Tx, &tx).map_err(|e| e.to_string())?;
        sys::ktls::set_crypto(sock.as_fd(), Direction::Rx, &rx).map_err(|e| e.to_string())
    })();
    Ok(r)
}

/// Why this connection will not use kTLS, or `None` when it will.
fn fallback_reason(conn: &ServerConnection, ktls: &Ktls) -> Option<Stat> {
    match ktls {
        Ktls::Off => Some(Stat::FallbackOff),
        Ktls::Unavailable(_) => Some(Stat::FallbackKernel),
        Ktls::Available(both) => {
            let v = conn.protocol_version().and_then(version_of);
            let c = conn
                .negotiated_cipher_suite()
                .and_then(|s| suite_of(s.suite()));
            match (v, c) {
                (Some(v), Some(c)) if both.contains(&(v, c)) => None,
                _ => Some(Stat::FallbackSuite),
            }
        }
    }
}

/// Read exactly one TLS record (header and payload) into `buf`. `Ok(false)`: clean EOF before
/// a record began.
async fn read_record(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        let n = sock.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated record header",
                ))
            };
        }
        got += n;
    }
    // Content types 20..=24 (RFC 8446 B.1, 24 = heartbeat) and protocol major version 3: plain
    // HTTP ("GET /...") or noise is refused at once instead of waiting for a "record" of
    // whatever length its bytes spell.
    if !(20..=24).contains(&header[0]) || header[1] != 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a TLS record",
        ));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record of {len} bytes"),
        ));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(5 + len, 0);
    sock.read_exact(&mut buf[5..]).await?;
    Ok(true)
}

async fn flush_tls(sock: &mut TcpStream, conn: &mut ServerConnection) -> io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    if !out.is_empty() {
        sock.write_all(&out).await?;
    }
    Ok(())
}

async fn handshake(
    sock: &mut TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<ServerConnection> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut record = Vec::with_capacity(MAX_RECORD + 5);
    while conn.is_handshaking() {
        flush_tls(sock, &mut conn).await?;
        if !conn.is_handshaking() {
            break;
        }
        if !read_record(sock, &mut record).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut rd = &record[..];
        while !rd.is_empty() {
            conn.read_tls(&mut rd)?;
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued tells the client why.
            let _ = flush_tls(sock, &mut conn).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    // Session tickets and anything else rustls queued after the handshake go out now, before
    // the connection's records are handed to anyone else.
    flush_tls(sock, &mut conn).await?;
    Ok(conn)
}

async fn bad_gateway(sock: &mut TcpStream, mut conn: ServerConnection) -> io::Result<()> {
    let body = "502 Bad Gateway: no worker of this app accepted the connection\n";
    let _ = write!(
        conn.writer(),
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.send_close_notify();
    flush_tls(sock, &mut conn).await
}

/// Move bytes both ways through rustls until both directions are done. Returns the plaintext
/// bytes moved.
async fn proxy_userspace(
    mut sock: TcpStream,
    mut conn: ServerConnection,
    mut upstream: TcpStream,
) -> io::Result<u64> {
    let mut moved = 0u64;
    let mut net = vec![0u8; COPY_CHUNK];
    let mut plain = vec![0u8; COPY_CHUNK];
    let mut up = vec![0u8; COPY_CHUNK];
    let (mut client_done, mut upstream_done) = (false, false);
    loop {
        flush_tls(&mut sock, &mut conn).await?;
        if client_done && upstream_done {
            break;
        }
        tokio::select! {
            r = sock.read(&mut net), if !client_done => {
                let n = r?;
                if n == 0 {
                    // TCP EOF without close_notify (truncation) or after it: either way no more
                    // requests; the upstream gets a half-close and may still answer.
                    client_done = true;
                    let _ = upstream.shutdown().await;
                    continue;
                }
                let mut rd = &net[..n];
                while !rd.is_empty() {
                    conn.read_tls(&mut rd)?;
                    let state = conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    loop {
                        match conn.reader().read(&mut plain) {
                            Ok(0) => break,
                            Ok(m) => {
                                upstream.write_all(&plain[..m]).await?;
                                moved += m as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                    if state.peer_has_closed() && !client_done {
                        // close_notify: half-close towards the worker.
                        client_done = true;
                        let _ = upstream.shutdown().await;
                    }
                }
            }
            r = upstream.read(&mut up), if !upstream_done => {
                let n = r?;
                if n == 0 {
                    upstream_done = true;
                    conn.send_close_notify();
                    flush_tls(&mut sock, &mut conn).await?;
                    let _ = sock.shutdown().await;
                    // The worker is done: the client has nothing left to say that anyone reads.
                    client_done = true;
                    continue;
                }
                conn.writer().write_all(&up[..n])?;
                moved += n as u64;
            }
        }
    }
    Ok(moved)
}

/// How a spliced direction ended.
enum PumpEnd {
    /// The source's end of stream (a worker's FIN, or a client's FIN without close_notify).
    Eof,
    /// The kTLS source has a record that is not application data next.
    Control,
}

/// splice `src` -> pipe -> `dst` until the source ends. Returns how it ended and the bytes.
async fn pump(src: &TcpStream, dst: &TcpStream, moved: &mut u64) -> io::Result<PumpEnd> {
    let (pipe_r, pipe_w) = sys::ktls::pipe()?;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    loop {
        let n = match src
            .async_io(Interest::READABLE, || {
                sys::ktls::splice(src_fd, pipe_w.as_raw_fd(), COPY_CHUNK)
            })
            .await
        {
            Ok(0) => return Ok(PumpEnd::Eof),
            Ok(n) => n,
            // splice refuses a record that is not data (linux/net/tls: EINVAL).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(PumpEnd::Control),
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || {
                    sys::ktls::splice(pipe_r.as_raw_fd(), dst_fd, left)
                })
                .await?;
            left -= m;
            *moved += m as u64;
        }
    }
}

/// kTLS both ways: the kernel decrypts what the client sends and encrypts what the worker
/// answers; splice moves the bytes without copying them through this process.
async fn proxy_ktls(sock: TcpStream, upstream: TcpStream, counters: &Counters) -> io::Result<u64> {
    let client_to_worker = async {
        let mut moved = 0u64;
        loop {
            match pump(&sock, &upstream, &mut moved).await? {
                PumpEnd::Eof => {
                    counters.one(Stat::EofWithoutCloseNotify);
                    break;
                }
                PumpEnd::Control => {
                    let mut buf = [0u8; 16 * 1024 + 256];
                    let (kind, n) = sock
                        .async_io(Interest::READABLE, || {
                            sys::ktls::recv_record(sock.as_raw_fd(), &mut buf)
                        })
                        .await?;
                    match kind {
                        sys::ktls::RECORD_APPLICATION_DATA => {
                            write_all_shared(&upstream, &buf[..n]).await?;
                            moved += n as u64;
                        }
                        sys::ktls::RECORD_ALERT if n >= 2 && buf[1] == 0 => {
                            counters.one(Stat::CloseNotifyReceived);
                            break;
                        }
                        sys::ktls::RECORD_ALERT => {
                            counters.one(Stat::AlertsReceived);
                            return Err(io::Error::other("the client sent an alert"));
                        }
                        sys::ktls::RECORD_HANDSHAKE => {
                            // A KeyUpdate (or anything else post-handshake): the kernel cannot
                            // take new keys from a rustls that no longer exists. Close cleanly.
                            counters.one(Stat::PostHandshakeCloses);
                            return Err(io::Error::other("post-handshake message"));
                        }
                        _ => {
                            counters.one(Stat::AlertsReceived);
                            return Err(io::Error::other("unexpected record type"));
                        }
                    }
                }
            }
        }
        // The client is done sending: a half-close towards the worker, which may still answer.
        sys::ktls::shutdown_write(upstream.as_fd());
        Ok::<u64, io::Error>(moved)
    };
    let worker_to_client = async {
        let mut moved = 0u64;
        let end = pump(&upstream, &sock, &mut moved).await;
        // The worker is done (or failed): close_notify, then FIN.
        let _ = sock
            .async_io(Interest::WRITABLE, || {
                sys::ktls::send_record(
                    sock.as_raw_fd(),
                    sys::ktls::RECORD_ALERT,
                    &sys::ktls::CLOSE_NOTIFY,
                )
            })
            .await;
        sys::ktls::shutdown_write(sock.as_fd());
        end.map(|_| moved)
    };
    tokio::pin!(client_to_worker);
    tokio::pin!(worker_to_client);
    let mut total = 0;
    let mut client_done = false;
    loop {
        tokio::select! {
            r = &mut client_to_worker, if !client_done => {
                client_done = true;
                match r {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            r = &mut worker_to_client => {
                if let Ok(n) = r { total += n; }
                break;
            }
        }
    }
    Ok(total)
}

/// write_all through a shared reference (both directions of a connection use the stream).
async fn write_all_shared(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `redirect_http`: answer each plain HTTP request with a 308 to https (or a 400 saying why
/// not). One request per connection; a client that sends nothing for 5 s is dropped.
async fn serve_redirects(listener: TcpListener, https_port: u16, counters: Arc<Counters>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(redirect_one(sock, https_port, counters.clone()));
    }
}

async fn redirect_one(mut sock: TcpStream, https_port: u16, counters: Arc<Counters>) {
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
        Ok(Ok(end)) => super::redirect::response(&head[..end], https_port),
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
