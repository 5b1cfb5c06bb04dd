//! `corral acme`: the ACME client, one run per order or renewal check, started by the agent as
//! the fronts are (the front's user, no capabilities, no_new_privs, fds 0-2 only, a cgroup
//! leaf of the front app's; `crate::supervisor::acme`), and undumpable. It is the only code that speaks to the CA
//! and parses its JSON; it reads one [`Request`] (JSON) on stdin and writes one [`Response`]
//! (JSON) on stdout. It writes challenge answers into the front's challenge directory (same
//! user) and removes them when the order is done. The agent never trusts what it sends back:
//! it checks the PEM (`super::check`) before anything is written or served.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::header::{HeaderMap, RETRY_AFTER};
use hyper::StatusCode;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse,
    CertificateIdentifier, ChallengeType, HttpClient, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::config::AcmeChallenge;
use crate::front::acme::{http01_file, tls_alpn01_file};

/// The subcommand the agent runs its own binary with (hidden from `--help`).
pub const SUBCOMMAND: &str = "acme";

/// What the agent asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub directory: String,
    /// The roots the CA's own TLS certificate must chain to (`directory_ca`, read by the
    /// agent); the system's otherwise.
    pub directory_ca_pem: Option<String>,
    pub domains: Vec<String>,
    pub email: Option<String>,
    pub challenge: AcmeChallenge,
    pub challenge_dir: PathBuf,
    /// The stored account (`AccountCredentials` as JSON); a new account is made without one.
    pub account: Option<serde_json::Value>,
    /// The certificate in service (PEM), for ARI: its renewal window, `replaces`.
    pub current: Option<String>,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Ask the CA when to renew `current` (ARI).
    RenewalInfo,
    /// Order a certificate now.
    Order,
}

/// What the process answers; `account` is set when a new account was made (the agent
/// stores it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub account: Option<serde_json::Value>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    Issued {
        chain_pem: String,
        key_pem: String,
    },
    /// ARI's suggested window (unix seconds) and when to ask again.
    Window {
        start: i64,
        end: i64,
        retry_after_secs: u64,
    },
    /// The CA offers no ARI: the agent renews at two thirds of the lifetime.
    NoAri,
    Failed {
        error: String,
        /// When the CA said to come back (its Retry-After, past the order's polling).
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
}

/// Run one request; always answers (a failure is an [`Outcome::Failed`] saying why).
pub fn run() -> Result<(), String> {
    // No core dumps and no ptrace by the front's other processes: this one holds the
    // account's key and the new certificate's.
    crate::sys::front::make_undumpable().map_err(|e| e.to_string())?;
    let mut input = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
        .map_err(|e| format!("reading the request: {e}"))?;
    let req: Request =
        serde_json::from_str(&input).map_err(|e| format!("a malformed request: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let mut new_account = None;
    let retry_after = RetryAfter::default();
    let outcome = match rt.block_on(async {
        let http = https_client(&req, retry_after.clone())?;
        serve(&req, http, &mut new_account).await
    }) {
        Ok(o) => o,
        Err(error) => Outcome::Failed {
            error,
            retry_after_secs: None,
        },
    };
    let outcome = retry_after.apply(outcome, SystemTime::now());
    clean(&req);
    let resp = Response {
        account: new_account,
        outcome,
    };
    let out = serde_json::to_string(&resp).map_err(|e| e.to_string())?;
    println!("{out}");
    Ok(())
}

async fn serve(
    req: &Request,
    http: Box<dyn HttpClient>,
    new_account: &mut Option<serde_json::Value>,
) -> Result<Outcome, String> {
    let builder = Account::builder_with_http(http);
    let account = match &req.account {
        Some(v) => {
            let creds: AccountCredentials = serde_json::from_value(v.clone())
                .map_err(|e| format!("the stored account: {e}"))?;
            builder
                .from_credentials(creds)
                .await
                .map_err(|e| format!("{}: {}", req.directory, chain(&e)))?
        }
        None => {
            let contact = req.email.as_ref().map(|e| format!("mailto:{e}"));
            let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
            let (account, creds) = builder
                .create(
                    &NewAccount {
                        contact: &contacts,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    req.directory.clone(),
                    None,
                )
                .await
                .map_err(|e| {
                    format!(
                        "{}: reading the directory, creating the account: {}",
                        req.directory,
                        chain(&e)
                    )
                })?;
            *new_account = Some(serde_json::to_value(&creds).map_err(|e| e.to_string())?);
            account
        }
    };
    let current_id = match &req.current {
        Some(pem) => {
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| format!("the certificate in service: {e}"))?;
            CertificateIdentifier::try_from(&der)
                .ok()
                .map(|i| i.into_owned())
        }
        None => None,
    };
    match req.action {
        Action::RenewalInfo => {
            let Some(id) = current_id else {
                return Ok(Outcome::NoAri);
            };
            match account.renewal_info(&id).await {
                Ok((info, retry)) => Ok(Outcome::Window {
                    start: info.suggested_window.start.unix_timestamp(),
                    end: info.suggested_window.end.unix_timestamp(),
                    retry_after_secs: retry.as_secs(),
                }),
                Err(instant_acme::Error::Unsupported(_)) => Ok(Outcome::NoAri),
                Err(e) => Err(format!(
                    "{}: renewal information: {}",
                    req.directory,
                    chain(&e)
                )),
            }
        }
        Action::Order => order(req, &account, current_id).await,
    }
}

async fn order(
    req: &Request,
    account: &Account,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Outcome, String> {
    let ids: Vec<Identifier> = req.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut new = NewOrder::new(&ids);
    if let Some(r) = replaces.clone() {
        new = new.replaces(r);
    }
    let mut order = match account.new_order(&new).await {
        // No ARI at this CA: order without `replaces`.
        Err(instant_acme::Error::Unsupported(_)) if replaces.is_some() => {
            account.new_order(&NewOrder::new(&ids)).await
        }
        r => r,
    }
    .map_err(|e| format!("{}: new order: {}", req.directory, chain(&e)))?;
    let kind = match req.challenge {
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        AcmeChallenge::Http01 => ChallengeType::Http01,
    };
    let mut authorizations = order.authorizations();
    while let Some(result) = authorizations.next().await {
        let mut authz = result.map_err(|e| format!("authorization: {}", chain(&e)))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("an authorization is {other:?}")),
        }
        let name = authz.identifier().to_string();
        let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
            format!(
                "the CA offers no {} challenge for {name}",
                req.challenge.as_str()
            )
        })?;
        let key_auth = challenge.key_authorization();
        match req.challenge {
            AcmeChallenge::TlsAlpn01 => {
                let file =
                    tls_alpn01_file(&name).ok_or_else(|| format!("{name:?}: not a DNS name"))?;
                let mut params = rcgen::CertificateParams::new(vec![name.clone()])
                    .map_err(|e| format!("the TLS-ALPN-01 certificate: {e}"))?;
                params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(
                    key_auth.digest().as_ref(),
                )];
                let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
                let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
                let pem = format!("{}{}", cert.pem(), key.serialize_pem());
                write_answer(&req.challenge_dir, &file, pem.as_bytes())?;
            }
            AcmeChallenge::Http01 => {
                let file = http01_file(&challenge.token).ok_or_else(|| {
                    format!("the CA's token {:?} is not base64url", challenge.token)
                })?;
                write_answer(&req.challenge_dir, &file, key_auth.as_str().as_bytes())?;
            }
        }
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("{}: {name}: {}", req.challenge.as_str(), chain(&e)))?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(90));
    let status = match order.poll_ready(&retries).await {
        Ok(s) => s,
        Err(e) => return Ok(failed(format!("{}: the order", req.directory), &e)),
    };
    if status != OrderStatus::Ready {
        return Err(format!("the order is {status:?}, not ready"));
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| format!("{}: finalizing: {}", req.directory, chain(&e)))?;
    let chain_pem = match order.poll_certificate(&retries).await {
        Ok(c) => c,
        Err(e) => return Ok(failed(format!("{}: the certificate", req.directory), &e)),
    };
    Ok(Outcome::Issued { chain_pem, key_pem })
}

/// The HTTPS client for the CA: trusting only the roots of `directory_ca` when set (a private
/// CA), the system's otherwise; it records the Retry-After of the CA's error responses in
/// `retry_after`.
fn https_client(req: &Request, retry_after: RetryAfter) -> Result<Box<dyn HttpClient>, String> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match &req.directory_ca_pem {
        Some(pem) => builder.with_tls_config(tls_with_roots(pem)?),
        None => builder
            .try_with_platform_verifier()
            .map_err(|e| format!("the system's certificate roots: {e}"))?,
    };
    let https = builder.https_only().enable_http1().enable_http2().build();
    let inner: HyperClient<_, BodyWrapper<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(Recording {
        inner: Box::new(inner),
        retry_after,
    }))
}

/// A TLS client configuration that trusts only the roots in `pem` (`directory_ca`).
fn tls_with_roots(pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| format!("directory_ca: {e}"))?;
        roots.add(der).map_err(|e| format!("directory_ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err("directory_ca: no CERTIFICATE in the PEM file".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The latest moment the CA's error responses (4xx, 5xx: a rate limit's 429, a 503) asked to
/// be left alone until, by their Retry-After. instant-acme reads that header only where it
/// polls (ARI, an order's status) and drops it with an error response; this keeps it for the
/// agent's backoff.
#[derive(Clone, Default)]
struct RetryAfter(Arc<Mutex<Option<SystemTime>>>);

impl RetryAfter {
    fn record(&self, status: StatusCode, headers: &HeaderMap, now: SystemTime) {
        if !(status.is_client_error() || status.is_server_error()) {
            return;
        }
        let Some(until) = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now))
        else {
            return;
        };
        if let Ok(mut latest) = self.0.lock() {
            *latest = Some(latest.map_or(until, |l| l.max(until)));
        }
    }

    /// A failed `outcome` waits at least until the latest recorded Retry-After, and says so.
    fn apply(&self, outcome: Outcome, now: SystemTime) -> Outcome {
        let until = self.0.lock().ok().and_then(|l| *l);
        match (outcome, until) {
            (
                Outcome::Failed {
                    error,
                    retry_after_secs,
                },
                Some(until),
            ) => {
                // Rounded up: never sooner than the CA said.
                let wait = until.duration_since(now).unwrap_or_default();
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Outcome::Failed {
                    error: format!("{error} (the CA's Retry-After: {secs} s)"),
                    retry_after_secs: Some(retry_after_secs.unwrap_or(0).max(secs)),
                }
            }
            (outcome, _) => outcome,
        }
    }
}

/// A Retry-After value (RFC 9110 10.2.3): delay-seconds or an HTTP-date, as a moment.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: a count too large for u64 is as good as "not in this life".
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return now.checked_add(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(value).ok()
}

/// instant-acme's HTTPS client, recording the Retry-After of error responses.
struct Recording {
    inner: Box<dyn HttpClient>,
    retry_after: RetryAfter,
}

impl HttpClient for Recording {
    fn request(
        &self,
        req: hyper::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.inner.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            let response = response.await?;
            retry_after.record(
                response.parts.status,
                &response.parts.headers,
                SystemTime::now(),
            );
            Ok(response)
        })
    }
}

/// Write a challenge answer so a front never reads half of it: a temporary file, renamed.
fn write_answer(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), String> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(file)))
        .map_err(|e| {
            format!(
                "writing the challenge answer {}: {e}",
                dir.join(file).display()
            )
        })
}

/// Remove this request's answers (the CA has validated or given up).
fn clean(req: &Request) {
    let Ok(entries) = std::fs::read_dir(&req.challenge_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("tls-alpn-01.")
            || name.starts_with("http-01.")
            || name.ends_with(".tmp")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A failed poll: the CA's Retry-After, when it asked to be polled later than the order
/// waits, goes to the agent's backoff.
fn failed(what: String, e: &instant_acme::Error) -> Outcome {
    let retry_after_secs = match e {
        instant_acme::Error::Timeout(Some(next)) => Some(
            next.saturating_duration_since(tokio::time::Instant::now().into_std())
                .as_secs(),
        ),
        _ => None,
    };
    Outcome::Failed {
        error: format!("{what}: {}", chain(e)),
        retry_after_secs,
    }
}

/// An error and its sources ("client error (Connect): tcp connect error: Connection refused"):
/// hyper's own message alone does not say what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Outcome {
        Outcome::Failed {
            error: "new order: rate limited".into(),
            retry_after_secs: None,
        }
    }

    fn headers(retry_after: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, retry_after.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_is_delay_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(now + Duration::from_secs(120))
        );
        // RFC 9110's example date.
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_799))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn an_error_response_s_retry_after_holds_a_failure_back() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let seen = RetryAfter::default();
        // Not an error: its Retry-After is a polling hint instant-acme handles itself.
        seen.record(StatusCode::OK, &headers("900"), now);
        assert!(matches!(
            seen.apply(failed(), now),
            Outcome::Failed {
                retry_after_secs: None,
                ..
            }
        ));
        seen.record(StatusCode::TOO_MANY_REQUESTS, &headers("300"), now);
        seen.record(StatusCode::SERVICE_UNAVAILABLE, &headers("60"), now);
        match seen.apply(failed(), now) {
            Outcome::Failed {
                error,
                retry_after_secs,
            } => {
                assert_eq!(retry_after_secs, Some(300), "the latest moment wins");
                assert!(error.contains("Retry-After: 300 s"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        // A longer wait the order's own polling asked for is kept.
        let polled = Outcome::Failed {
            error: "the order".into(),
            retry_after_secs: Some(1000),
        };
        assert!(matches!(
            seen.apply(polled, now),
            Outcome::Failed {
                retry_after_secs: Some(1000),
                ..
            }
        ));
        // An HTTP-date, half a second away, rounds up.
        let seen = RetryAfter::default();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_700);
        seen.record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers("Fri, 31 Dec 1999 23:59:59 GMT"),
            base,
        );
        assert!(matches!(
            seen.apply(failed(), base + Duration::from_millis(98_500)),
            Outcome::Failed {
                retry_after_secs: Some(1),
                ..
            }
        ));
        // Success is not touched.
        assert!(matches!(seen.apply(Outcome::NoAri, base), Outcome::NoAri));
    }
}
