//! The TLS side of a front connection: the rustls server configuration, the handshake read
//! one record at a time (so nothing past the client's Finished is buffered in userspace, which
//! kTLS needs: the kernel must see every record after it), and handing the connection to the
//! kernel (kTLS) with the secrets rustls extracted, or the reason it stays in userspace.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use rustls::server::ServerConfig;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::bundle::Bundle;
use super::stats::Stat;
use crate::sys;
use crate::sys::ktls::{Cipher, Direction, Version};

/// A TLS record's payload may be 2^14 bytes plus expansion (RFC 8446 5.2: 2^14 + 256).
pub(super) const MAX_RECORD: usize = 16384 + 2048;
/// The (version, cipher) pairs the kernel takes in both directions.
pub(super) type KernelSuites = HashSet<(Version, Cipher)>;

/// What kTLS can do for this process's connections.
pub(super) enum Ktls {
    Off,
    Unavailable(String),
    Available(KernelSuites),
}

pub(super) fn suite_of(suite: CipherSuite) -> Option<Cipher> {
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

pub(super) fn version_of(v: ProtocolVersion) -> Option<Version> {
    match v {
        ProtocolVersion::TLSv1_2 => Some(Version::Tls12),
        ProtocolVersion::TLSv1_3 => Some(Version::Tls13),
        _ => None,
    }
}

/// `only`: offer just these (ktls = "require": every connection must be one the kernel takes).
/// `http`: the HTTP proxy, which offers HTTP/2 too; the byte path offers HTTP/1.1 alone (the
/// workers speak it).
/// `acme`: answer TLS-ALPN-01 validations from this challenge directory.
pub(super) fn server_config(
    bundle: &Bundle,
    only: Option<&HashSet<(Version, Cipher)>>,
    http: bool,
    acme: Option<&super::acme::Challenges>,
) -> Result<Arc<ServerConfig>, String> {
    let certs = bundle.resolver()?;
    let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match acme {
        Some(c) => Arc::new(super::acme::AcmeResolver {
            certs,
            challenges: c.clone(),
        }),
        None => certs,
    };
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
    cfg.alpn_protocols = if http {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if acme.is_some() {
        // Last: a client offering it with anything else never gets it (RFC 8737 3).
        cfg.alpn_protocols.push(super::acme::ACME_TLS_ALPN.to_vec());
    }
    // For kTLS: the traffic secrets leave rustls once the handshake is done.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Move a finished handshake's record crypto into the kernel. `Err(conn)`: not possible for
/// this connection, nothing changed, serve it in userspace (the reason is counted by the
/// caller through [`fallback_reason`]). `Ok(Err)`: failed after the secrets were extracted.
pub(super) fn start_ktls(
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
pub(super) fn fallback_reason(conn: &ServerConnection, ktls: &Ktls) -> Option<Stat> {
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
pub(super) async fn read_record(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
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

pub(super) async fn flush_tls(sock: &mut TcpStream, conn: &mut ServerConnection) -> io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    if !out.is_empty() {
        sock.write_all(&out).await?;
    }
    Ok(())
}

pub(super) async fn handshake(
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
