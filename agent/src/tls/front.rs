//! `corral front`: one TLS front process. It runs unprivileged (the front app's user, no
//! capabilities, no_new_privs, not dumpable), serves the listening socket on fd 3 (one of the
//! front's SO_REUSEPORT group, steered like workers), reads its certificates from the memfd on
//! fd 4, and proxies each connection's plaintext to the app's workers' address, where the
//! eBPF steering picks the worker.
//!
//! Handshakes read one TLS record at a time, so nothing past the client's Finished is ever
//! buffered in userspace (what kTLS needs: the kernel must see every record after it).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::server::ServerConfig;
use rustls::ServerConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::bundle::Bundle;
use crate::config::KtlsMode;
use crate::sys;

/// What the agent passes on the command line (see `config::front_app`).
#[derive(Debug, Clone)]
pub struct FrontArgs {
    pub app: String,
    pub upstream: SocketAddr,
    pub ktls: KtlsMode,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
}

/// A TLS record's payload may be 2^14 bytes plus expansion (RFC 8446 5.2: 2^14 + 256).
const MAX_RECORD: usize = 16384 + 2048;
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COPY_CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Counters {
    handshakes_userspace: AtomicU64,
    handshake_failures: AtomicU64,
    upstream_failures: AtomicU64,
    bytes_copied: AtomicU64,
}

pub fn server_config(bundle: &Bundle) -> Result<Arc<ServerConfig>, String> {
    let resolver = bundle.resolver()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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

pub fn run(args: FrontArgs) -> Result<()> {
    sys::front::make_undumpable().context("making the front process undumpable")?;
    let listener = sys::front::inherited_listener().context("the listening socket on fd 3")?;
    let bundle_bytes = sys::front::read_bundle().context("the certificate bundle on fd 4")?;
    let bundle = Bundle::decode(&bundle_bytes).map_err(anyhow::Error::msg)?;
    drop(bundle_bytes);
    let config = server_config(&bundle).map_err(anyhow::Error::msg)?;
    drop(bundle);

    let ktls = sys::ktls::probe();
    match (&ktls, args.ktls) {
        (Err(why), KtlsMode::Require) => {
            bail!("ktls = \"require\", but this kernel cannot: {why}")
        }
        (Err(why), KtlsMode::Auto) => eprintln!(
            "corral front: kernel TLS unavailable ({why}); every connection uses userspace rustls"
        ),
        (Ok(()), KtlsMode::Auto | KtlsMode::Require) => eprintln!(
            "corral front: kernel TLS available (TCP_ULP \"tls\"); the kTLS data path comes with \
             a later version, connections use userspace rustls"
        ),
        (_, KtlsMode::Off) => {}
    }
    if ktls.is_ok() && args.ktls == KtlsMode::Require {
        // Refuse rather than silently serve in userspace what the operator required in kernel.
        bail!("ktls = \"require\": this corral build has no kTLS data path yet");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(listener, config, args))
}

async fn serve(
    listener: std::net::TcpListener,
    config: Arc<ServerConfig>,
    args: FrontArgs,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let handshakes = Arc::new(Semaphore::new(args.max_handshakes));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    eprintln!(
        "corral front: serving TLS for app {} on {}, upstream {}",
        args.app,
        listener.local_addr()?,
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
                        let (config, args, counters) =
                            (config.clone(), args.clone(), counters.clone());
                        open.spawn(async move {
                            connection(sock, peer, config, &args, &counters, permit).await
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
    while open.join_next().await.is_some() {}
    let c = &counters;
    eprintln!(
        "corral front: drained; handshakes {} (userspace), failed {}, upstream failures {}, \
         bytes copied {}",
        c.handshakes_userspace.load(Ordering::Relaxed),
        c.handshake_failures.load(Ordering::Relaxed),
        c.upstream_failures.load(Ordering::Relaxed),
        c.bytes_copied.load(Ordering::Relaxed),
    );
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
    let _ = sock.set_nodelay(true);
    let conn =
        match tokio::time::timeout(args.handshake_timeout, handshake(&mut sock, config)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(_)) | Err(_) => {
                counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
    drop(permit);
    counters
        .handshakes_userspace
        .fetch_add(1, Ordering::Relaxed);
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(args.upstream))
            .await
        {
            Ok(Ok(u)) => u,
            _ => {
                counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
                let _ = bad_gateway(&mut sock, conn).await;
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    if let Ok(n) = proxy_userspace(sock, conn, upstream).await {
        counters.bytes_copied.fetch_add(n, Ordering::Relaxed);
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
