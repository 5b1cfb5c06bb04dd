//! The agent's check of a certificate the ACME process returned (or one read back from the
//! state directory): it must parse, its key must match, it must be valid for every configured
//! name and for now. Nothing that fails here is written or reaches a front.

use rustls::crypto::ring::sign::any_supported_type;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What the agent keeps of a certificate it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Check `chain_pem` + `key_pem` for `domains` at `now` (unix seconds).
pub fn check(
    chain_pem: &str,
    key_pem: &str,
    domains: &[String],
    now: i64,
) -> Result<Validity, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let leaf = chain.first().ok_or("no CERTIFICATE in the PEM")?.clone();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("private key PEM: {e}"))?;
    let signer = any_supported_type(&key).map_err(|e| format!("private key: {e}"))?;
    CertifiedKey::new(chain, signer)
        .keys_match()
        .map_err(|e| format!("the key does not belong to the certificate ({e})"))?;
    let names: Vec<String> = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("certificate: {e}"))?
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let missing: Vec<&str> = domains
        .iter()
        .filter(|d| !names.contains(d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the certificate is for {names:?}, not for {}",
            missing.join(", ")
        ));
    }
    let v = validity(&leaf)?;
    if v.not_after <= now {
        return Err(format!(
            "the certificate expired at {} (unix time)",
            v.not_after
        ));
    }
    // A few minutes of clock skew between the CA and this machine.
    if v.not_before > now + 300 {
        return Err(format!(
            "the certificate is not valid before {} (unix time)",
            v.not_before
        ));
    }
    Ok(v)
}

/// The leaf's notBefore and notAfter.
pub fn validity(leaf: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("certificate: {e}"))?;
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The validity of the first certificate of a PEM chain.
pub fn chain_validity(chain_pem: &str) -> Result<Validity, String> {
    let leaf = CertificateDer::from_pem_slice(chain_pem.as_bytes())
        .map_err(|e| format!("certificate PEM: {e}"))?;
    validity(&leaf)
}
