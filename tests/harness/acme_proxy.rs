//! A tampering HTTPS proxy between `corral acme` and pebble, for the CA misbehaving in ways
//! pebble will not: it terminates TLS with a certificate of its own (the config's
//! `directory_ca`), forwards every request to pebble with the client's Host (so pebble's
//! directory, orders and Location headers name the proxy, and the JWS `url`s it checks are the
//! proxy's), rewrites any of pebble's own URLs left in an answer to itself, and on demand:
//! - issues for another name: at the order's finalization it makes a certificate for the CSR's
//!   key but another DNS name (signed by its own key), and serves it in place of pebble's
//!   chain when the client downloads the certificate;
//! - rate-limits: answers the next request whose path holds a given part with 429, a
//!   `rateLimited` problem document and a `Retry-After`;
//! - holds the next request whose path holds a given part until released (the ACME client
//!   is then running, to be looked at).
//!
//! It runs on a thread of its own with a current-thread tokio runtime; dropping it stops it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::run_ok;

/// What the proxy is asked to do, and what it did.
#[derive(Default)]
struct Tamper {
    /// Issue certificates for this name instead of the ordered ones.
    wrong_name: Option<String>,
    /// The certificate made for `wrong_name` at the last finalization, served in place of
    /// pebble's.
    replacement: Option<String>,
    /// Answer the next request whose path holds this part with 429 and this Retry-After.
    rate_limit: Option<(String, String)>,
    /// Hold the next request whose path holds this part until [`AcmeProxy::release`].
    hold: Option<String>,
    held: usize,
    replaced: usize,
    limited: Vec<String>,
}

/// A running proxy in front of one pebble.
pub struct AcmeProxy {
    /// The directory URL to configure (`directory`).
    pub directory: String,
    /// The proxy's own TLS certificate (`directory_ca`).
    pub ca: PathBuf,
    tamper: Arc<Mutex<Tamper>>,
    release: Arc<tokio::sync::Notify>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Ctx {
    dir: PathBuf,
    /// `https://127.0.0.1:<pebble's port>`, and the proxy's own.
    upstream: String,
    own: String,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    tamper: Arc<Mutex<Tamper>>,
    release: Arc<tokio::sync::Notify>,
}

impl AcmeProxy {
    /// A proxy for the pebble whose directory is `directory` (HTTPS with the certificate
    /// `upstream_ca`); its files go in `dir`.
    pub fn start(dir: &Path, directory: &str, upstream_ca: &Path) -> AcmeProxy {
        let san = ["IP:127.0.0.1".to_string()];
        crate::tls::openssl_cert(dir, "acme-proxy", "acme-proxy", &san);
        let ca = dir.join("acme-proxy.crt");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
            .expect("proxy certificate")
            .collect::<Result<_, _>>()
            .expect("proxy certificate");
        let key = PrivateKeyDer::from_pem_file(dir.join("acme-proxy.key")).expect("proxy key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("proxy TLS config");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(upstream_ca).expect("pebble certificate") {
            roots.add(c.expect("pebble certificate")).expect("root");
        }
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let upstream = directory
            .strip_suffix("/dir")
            .expect("pebble's directory ends in /dir")
            .to_string();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr: SocketAddr = std_listener.local_addr().expect("addr");
        let own = format!("https://{addr}");
        let tamper = Arc::new(Mutex::new(Tamper::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let dir_owned = dir.to_path_buf();
        let tamper2 = tamper.clone();
        let release = Arc::new(tokio::sync::Notify::new());
        let release2 = release.clone();
        let own2 = own.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(client_tls)
                    .https_only()
                    .enable_http1()
                    .build();
                let ctx = Arc::new(Ctx {
                    dir: dir_owned,
                    upstream,
                    own: own2,
                    client: Client::builder(TokioExecutor::new()).build(https),
                    tamper: tamper2,
                    release: release2,
                });
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(sock).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(move |req| {
                                let ctx = ctx.clone();
                                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        AcmeProxy {
            directory: format!("{own}/dir"),
            ca,
            tamper,
            release,
            _stop: stop_tx,
        }
    }

    /// From now on, certificates are for `name` instead of what was ordered.
    pub fn issue_for(&self, name: &str) {
        self.tamper.lock().unwrap().wrong_name = Some(name.to_string());
    }

    /// Answer the next request whose path contains `path_part` (pebble's: `/order-plz`,
    /// `/nonce-plz`, `/sign-me-up`, `/finalize-order/`, ...) with 429 and `retry_after`.
    pub fn rate_limit_next(&self, path_part: &str, retry_after: &str) {
        self.tamper.lock().unwrap().rate_limit =
            Some((path_part.to_string(), retry_after.to_string()));
    }

    /// Hold the next request whose path contains `path_part` (the client waits for its answer)
    /// until [`AcmeProxy::release`].
    pub fn hold_next(&self, path_part: &str) {
        self.tamper.lock().unwrap().hold = Some(path_part.to_string());
    }

    /// Whether a request is held (or was).
    pub fn held(&self) -> bool {
        self.tamper.lock().unwrap().held > 0
    }

    /// Let the held request go on to pebble.
    pub fn release(&self) {
        self.release.notify_one();
    }

    /// How many certificate downloads were replaced.
    pub fn replaced(&self) -> usize {
        self.tamper.lock().unwrap().replaced
    }

    /// The paths answered with 429.
    pub fn limited(&self) -> Vec<String> {
        self.tamper.lock().unwrap().limited.clone()
    }
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r
}

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("proxy: the body: {e}")),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let hold = {
        let mut t = ctx.tamper.lock().unwrap();
        let hold = t.hold.as_ref().is_some_and(|h| path.contains(h.as_str()));
        if hold {
            t.hold = None;
            t.held += 1;
        }
        hold
    };
    if hold {
        ctx.release.notified().await;
    }
    let wrong_name = {
        let mut t = ctx.tamper.lock().unwrap();
        if let Some((part, retry_after)) = t.rate_limit.clone() {
            if path.contains(&part) {
                t.rate_limit = None;
                t.limited.push(path.clone());
                let mut r = plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    serde_json::json!({
                        "type": "urn:ietf:params:acme:error:rateLimited",
                        "detail": "too many new orders (the test's proxy)",
                        "status": 429,
                    })
                    .to_string(),
                );
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/problem+json"),
                );
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_str(&retry_after).unwrap());
                return r;
            }
        }
        t.wrong_name.clone()
    };
    if let (Some(name), true) = (&wrong_name, path.contains("/finalize-order/")) {
        match certificate_for_csr(&ctx.dir, &body, name) {
            Ok(pem) => ctx.tamper.lock().unwrap().replacement = Some(pem),
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("proxy: {e}")),
        }
    }
    let mut forward = Request::builder()
        .method(parts.method.clone())
        .uri(format!("{}{path}", ctx.upstream));
    for (k, v) in &parts.headers {
        if k != CONTENT_LENGTH && k != hyper::header::CONNECTION {
            forward = forward.header(k, v);
        }
    }
    let forward = forward.body(Full::new(body)).expect("request");
    let response = match ctx.client.request(forward).await {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("proxy: pebble: {e}")),
    };
    let (mut rparts, rbody) = response.into_parts();
    let rbody = match rbody.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("proxy: pebble's body: {e}"),
            )
        }
    };
    let is_chain = rparts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/pem-certificate-chain"));
    let mut rbody = rbody;
    if is_chain {
        let mut t = ctx.tamper.lock().unwrap();
        if let Some(pem) = t.replacement.take() {
            t.replaced += 1;
            rbody = Bytes::from(pem);
        }
    } else {
        let text = String::from_utf8_lossy(&rbody);
        if text.contains(&ctx.upstream) {
            rbody = Bytes::from(text.replace(&ctx.upstream, &ctx.own));
        }
    }
    for v in rparts.headers.values_mut() {
        if let Ok(s) = v.to_str() {
            if s.contains(&ctx.upstream) {
                *v = HeaderValue::from_str(&s.replace(&ctx.upstream, &ctx.own)).unwrap();
            }
        }
    }
    rparts.headers.remove(CONTENT_LENGTH);
    rparts.headers.remove(hyper::header::TRANSFER_ENCODING);
    rparts.headers.remove(hyper::header::CONNECTION);
    Response::from_parts(rparts, Full::new(rbody))
}

/// A certificate for the CSR's key in the finalization request `jws` (flattened JWS JSON
/// whose payload is `{"csr": base64url(DER)}`), naming only `name`, signed with the proxy's
/// key; PEM.
fn certificate_for_csr(dir: &Path, jws: &[u8], name: &str) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jws: serde_json::Value =
        serde_json::from_slice(jws).map_err(|e| format!("finalize JWS: {e}"))?;
    let payload = b64
        .decode(jws["payload"].as_str().ok_or("finalize: no payload")?)
        .map_err(|e| format!("finalize payload: {e}"))?;
    let payload: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| format!("finalize payload: {e}"))?;
    let csr = b64
        .decode(payload["csr"].as_str().ok_or("finalize: no csr")?)
        .map_err(|e| format!("csr: {e}"))?;
    std::fs::write(dir.join("acme-proxy-csr.der"), csr).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("acme-proxy-ext.cnf"),
        format!("subjectAltName=DNS:{name}\n"),
    )
    .map_err(|e| e.to_string())?;
    run_ok(
        std::process::Command::new("openssl")
            .args(["x509", "-req", "-inform", "DER", "-in"])
            .arg(dir.join("acme-proxy-csr.der"))
            .arg("-CA")
            .arg(dir.join("acme-proxy.crt"))
            .arg("-CAkey")
            .arg(dir.join("acme-proxy.key"))
            .args(["-set_serial", "4242", "-days", "1", "-extfile"])
            .arg(dir.join("acme-proxy-ext.cnf"))
            .arg("-out")
            .arg(dir.join("acme-proxy-wrong.crt")),
        "openssl x509 -req",
    );
    std::fs::read_to_string(dir.join("acme-proxy-wrong.crt")).map_err(|e| e.to_string())
}
