//! The front's side of ACME: answering the CA's challenges. The unprivileged `corral acme`
//! process (same user as the fronts) writes each answer into the front's challenge directory
//! (`--acme-challenges`) before it tells the CA to validate, and removes it after; every front
//! process reads it when the CA's validation arrives, so whichever front the connection lands
//! on can answer.
//!
//! - TLS-ALPN-01 (RFC 8737): a ClientHello whose ALPN list is exactly `acme-tls/1` gets the
//!   self-signed challenge certificate for its SNI name (`tls-alpn-01.<name>`: its PEM and its
//!   throwaway key), and the connection ends after the handshake.
//! - HTTP-01 (RFC 8555 8.3): `GET /.well-known/acme-challenge/<token>` on the `redirect_http`
//!   listener gets the key authorization in `http-01.<token>`.
//!
//! Names and tokens are checked before they become file names (letters, digits, `-`, `_`,
//! `.` for names), so nothing from a client can reach outside the directory.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::bundle::SniResolver;

/// The ALPN protocol of TLS-ALPN-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Where HTTP-01 answers are asked for.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenge directory's file for a TLS-ALPN-01 answer for `name`, or `None` when `name`
/// is not a plain DNS name.
pub fn tls_alpn01_file(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then(|| format!("tls-alpn-01.{}", name.to_ascii_lowercase()))
}

/// The challenge directory's file for an HTTP-01 token, or `None` when the token is not
/// base64url (RFC 8555 8.3: the token's characters).
pub fn http01_file(token: &str) -> Option<String> {
    let ok = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| format!("http-01.{token}"))
}

/// The directory of challenge answers a front reads.
#[derive(Debug, Clone)]
pub struct Challenges {
    dir: PathBuf,
}

impl Challenges {
    pub fn new(dir: PathBuf) -> Challenges {
        Challenges { dir }
    }

    fn read(&self, file: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(file)).ok()
    }

    /// The TLS-ALPN-01 certificate for `name`, if the ACME process has put one there.
    fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let pem = self.read(&tls_alpn01_file(name)?)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(&pem).ok()?;
        let signer = any_supported_type(&key).ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// The response to a plain-HTTP request line's target, when it asks for an HTTP-01
    /// answer: `Some(Ok(key authorization))`, or `Some(Err(()))` for a token with no answer
    /// (404). `None`: not an ACME path.
    pub fn http01(&self, target: &str) -> Option<Result<String, ()>> {
        let token = target.strip_prefix(HTTP01_PREFIX)?;
        let answer = http01_file(token)
            .and_then(|f| self.read(&f))
            .and_then(|b| String::from_utf8(b).ok());
        Some(answer.ok_or(()))
    }
}

/// The front's certificate resolver with ACME: a ClientHello offering exactly `acme-tls/1`
/// gets the challenge certificate for its name (or none: the handshake fails), any other the
/// front's certificates by SNI.
#[derive(Debug)]
pub struct AcmeResolver {
    pub certs: Arc<SniResolver>,
    pub challenges: Challenges,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if is_acme_tls_alpn(hello.alpn()) {
            return self.challenges.tls_alpn01(hello.server_name()?);
        }
        self.certs.resolve(hello)
    }
}

/// RFC 8737 3: the validation's ClientHello offers `acme-tls/1` and nothing else.
fn is_acme_tls_alpn<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(mut protocols) = alpn else {
        return false;
    };
    protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
}

/// The whole plain-HTTP response to an HTTP-01 request head, or `None` when the head does not
/// ask for `/.well-known/acme-challenge/`.
pub fn http01_response(challenges: &Challenges, head: &[u8]) -> Option<String> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" && method != "HEAD" {
        return None;
    }
    Some(match challenges.http01(target)? {
        Ok(body) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{}",
            body.len(),
            if method == "GET" { body.as_str() } else { "" }
        ),
        Err(()) => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tokens_never_leave_the_directory() {
        assert_eq!(
            tls_alpn01_file("A.Example").as_deref(),
            Some("tls-alpn-01.a.example")
        );
        for bad in ["", "../x", "a/b", ".hidden", "a..b", "a b"] {
            assert_eq!(tls_alpn01_file(bad), None, "{bad:?}");
        }
        assert_eq!(http01_file("aB-_9").as_deref(), Some("http-01.aB-_9"));
        for bad in ["", "..", "a/b", "a.b", "a%2f"] {
            assert_eq!(http01_file(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn http01_answers_from_the_directory() {
        let dir = std::env::temp_dir().join(format!("corral-acme-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("http-01.tok"), "tok.thumb").unwrap();
        let c = Challenges::new(dir.clone());
        let ok = http01_response(
            &c,
            b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\ntok.thumb"), "{ok}");
        let missing = http01_response(
            &c,
            b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n\r\n",
        )
        .unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"));
        let escape = http01_response(
            &c,
            b"GET /.well-known/acme-challenge/../../etc/passwd HTTP/1.1\r\n\r\n",
        )
        .unwrap();
        assert!(escape.starts_with("HTTP/1.1 404"));
        assert!(http01_response(&c, b"GET /index.html HTTP/1.1\r\n\r\n").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_exactly_acme_tls_is_a_validation() {
        let one: [&[u8]; 1] = [ACME_TLS_ALPN];
        assert!(is_acme_tls_alpn(Some(one.iter().copied())));
        let two: [&[u8]; 2] = [b"h2", ACME_TLS_ALPN];
        assert!(!is_acme_tls_alpn(Some(two.iter().copied())));
        assert!(!is_acme_tls_alpn(None::<std::iter::Empty<&[u8]>>));
    }
}
