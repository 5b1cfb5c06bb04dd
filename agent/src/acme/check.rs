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

/// Check `chain_pem` + `key_pem` for `domains` at `now` (unix seconds): a certificate to
/// keep (it names every configured domain).
pub fn check(
    chain_pem: &str,
    key_pem: &str,
    domains: &[String],
    now: i64,
) -> Result<Validity, String> {
    let (names, v) = check_servable(chain_pem, key_pem, domains, now)?;
    let missing: Vec<&str> = domains
        .iter()
        .filter(|d| !names.contains(d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the certificate is for {}, not for {}",
            names.join(", "),
            missing.join(", ")
        ));
    }
    Ok(v)
}

/// Check a certificate a front may serve: it parses, the key matches, it is valid now and
/// every name in it is one of `domains` (it may lack some: a config that just added a name
/// keeps serving the others until the new certificate comes). Its names and validity.
pub fn check_servable(
    chain_pem: &str,
    key_pem: &str,
    domains: &[String],
    now: i64,
) -> Result<(Vec<String>, Validity), String> {
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
    let foreign: Vec<&str> = names
        .iter()
        .filter(|n| !domains.contains(n))
        .map(String::as_str)
        .collect();
    if names.is_empty() || !foreign.is_empty() {
        return Err(format!(
            "the certificate names {}, which `domains` ({}) does not list",
            if names.is_empty() {
                "no DNS name".to_string()
            } else {
                foreign.join(", ")
            },
            domains.join(", ")
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
    Ok((names, v))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    fn domains(d: &[&str]) -> Vec<String> {
        d.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_certificate_is_kept_only_for_every_configured_name_its_key_and_now() {
        let (c, k) = cert(&["a.example", "b.example"]);
        let now = 1_800_000_000; // rcgen's default validity: 1975 to 4096
        assert!(check(&c, &k, &domains(&["a.example", "b.example"]), now).is_ok());
        let e = check(
            &c,
            &k,
            &domains(&["a.example", "b.example", "c.example"]),
            now,
        )
        .unwrap_err();
        assert!(e.contains("not for c.example"), "{e}");
        let (wrong, wrong_key) = cert(&["evil.example"]);
        let e = check(&wrong, &wrong_key, &domains(&["a.example"]), now).unwrap_err();
        assert!(
            e.contains("names evil.example, which `domains` (a.example) does not list"),
            "{e}"
        );
        let (_, other_key) = cert(&["a.example"]);
        let e = check(&c, &other_key, &domains(&["a.example", "b.example"]), now).unwrap_err();
        assert!(
            e.contains("the key does not belong to the certificate"),
            "{e}"
        );
        let e = check(
            &c,
            &k,
            &domains(&["a.example", "b.example"]),
            5_000_000_000_000,
        )
        .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let e = check("garbage", &k, &domains(&["a.example"]), now).unwrap_err();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        // Servable with fewer names than configured, never with a foreign one.
        assert!(check_servable(
            &c,
            &k,
            &domains(&["a.example", "b.example", "c.example"]),
            now
        )
        .is_ok());
    }
}
