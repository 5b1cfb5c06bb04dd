//! A TLS client and certificates in Rust, for where there is no curl or openssl (the VM tier).

use crate::run_ok;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A self-signed ECDSA P-256 certificate for `names`: (certificate PEM, key PEM).
pub fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// A self-signed ECDSA P-256 server certificate made by openssl, as `<stem>.crt` and
/// `<stem>.key` in `dir`: common name `cn`, subject alternative names `san` (`DNS:a.test`,
/// `IP:127.0.0.1`).
pub fn openssl_cert(dir: &Path, stem: &str, cn: &str, san: &[String]) {
    run_ok(
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={cn}"))
            .arg("-addext")
            .arg(format!("subjectAltName={}", san.join(",")))
            // A server certificate, not a CA (rustls refuses a CA certificate as the server's).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(dir.join(format!("{stem}.key")))
            .arg("-out")
            .arg(dir.join(format!("{stem}.crt"))),
        "openssl (apt-get install openssl; cargo xtask test installs it)",
    );
}

/// Clients fetching `/?bytes=3000` from a TLS front over and over (TLS 1.3, SNI `name`, a new
/// connection each, trusting the PEM `roots`) until [`HandshakeLoad::finish`].
pub struct HandshakeLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl HandshakeLoad {
    pub fn start(front: SocketAddr, name: &'static str, roots: &str, clients: usize) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok, failures, roots) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    roots.to_string(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(front, name, &roots, Tls::V13, "/?bytes=3000", false) {
                            Ok(r) if r.body.len() == 3000 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .expect("lock")
                                .push(format!("short: {}", r.head)),
                            Err(e) => failures.lock().expect("lock").push(e),
                        }
                    }
                })
            })
            .collect();
        HandshakeLoad {
            stop,
            ok,
            failures,
            clients,
        }
    }

    /// Stop the clients; asserts none failed and at least `min` requests were served.
    pub fn finish(self, min: u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in self.clients {
            c.join().expect("client");
        }
        let failures = self.failures.lock().expect("lock");
        let served = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} failed of {served}: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(served >= min, "the load ran: {served}");
    }
}

/// `cert` and `key` as `a.crt` and `a.key` in `dir`, where [`fronted_demo_app`] looks.
pub fn write_cert(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("a.crt"), cert).expect("write a.crt");
    std::fs::write(dir.join("a.key"), key).expect("write a.key");
}

/// [`crate::demo_app`] with two workers on 127.0.0.1:`port` behind a TLS front of two
/// processes on 127.0.0.1:`tls_port`, serving `a.crt` and `a.key` of the test directory (see
/// [`write_cert`]). The byte path (`proxy = "tcp"`: kTLS, splice, PROXY v2), which these
/// tests are about; tests/http_front.rs has the HTTP proxy.
pub fn fronted_demo_app(name: &str, port: u16, tls_port: u16) -> crate::App {
    crate::demo_app(name, crate::loopback(port), 2)
        .tls("address", crate::loopback(tls_port))
        .tls("proxy", "tcp")
        .tls("cert", "@DIR@/a.crt")
        .tls("key", "@DIR@/a.key")
        .tls("processes", 2)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    V12,
    V13,
}

/// What a TLS GET got back.
pub struct TlsResponse {
    pub head: String,
    pub body: Vec<u8>,
    pub version: Option<rustls::ProtocolVersion>,
    pub cipher: Option<rustls::CipherSuite>,
}

pub fn client_config(ca_pem: &str, version: Tls) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match version {
        Tls::V12 => &[&rustls::version::TLS12],
        Tls::V13 => &[&rustls::version::TLS13],
    };
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// GET `path` over TLS with `Connection: close`, trusting only `ca_pem`. With
/// `close_notify_first`, the client sends its close_notify right after the request (a
/// half-close) and still expects the whole answer. The read must end with the server's
/// close_notify: a bare TCP close is an error (rustls reports it as UnexpectedEof).
pub fn get(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
    version: Tls,
    path: &str,
    close_notify_first: bool,
) -> Result<TlsResponse, String> {
    let conn = ClientConnection::new(
        client_config(ca_pem, version),
        ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let sock =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut s = StreamOwned::new(conn, sock);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    s.flush().map_err(|e| format!("flush: {e}"))?;
    if close_notify_first {
        s.conn.send_close_notify();
        s.flush().map_err(|e| format!("close_notify: {e}"))?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {} bytes", raw.len()))?;
    Ok(TlsResponse {
        head: String::from_utf8_lossy(&raw[..split]).into_owned(),
        body: raw[split + 4..].to_vec(),
        version: s.conn.protocol_version(),
        cipher: s.conn.negotiated_cipher_suite().map(|c| c.suite()),
    })
}

/// An open TLS connection that has sent half a request and waits (to look at the server's
/// socket while it is served).
pub fn open_idle(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
) -> StreamOwned<ClientConnection, TcpStream> {
    let conn = ClientConnection::new(
        client_config(ca_pem, Tls::V13),
        ServerName::try_from(name.to_string()).expect("name"),
    )
    .expect("client");
    let sock = TcpStream::connect(addr).expect("connect");
    let mut s = StreamOwned::new(conn, sock);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    s.flush().expect("flush");
    // Complete the handshake (the write above only queued it).
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    s
}

/// /proc/net/tls_stat as name -> value (empty without the tls module): the agent's reader.
pub use corral::sys::machine::tls_stat;
