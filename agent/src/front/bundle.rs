//! Certificates and keys for a TLS front: read by the agent (which may open the key files),
//! checked, and handed to the unprivileged front processes as one sealed memfd, never as paths.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::config::CertPair;

/// A certificate with its key, and the DNS names it is valid for.
type KeyAndNames = (Arc<CertifiedKey>, Vec<String>);

const MAGIC: &[u8] = b"corral-tls-bundle-1\n";

/// PEM chains and keys, in config order (the first is the default certificate).
pub struct Bundle {
    entries: Vec<Entry>,
}

struct Entry {
    /// For messages: where it came from.
    label: String,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field(
                "certs",
                &self.entries.iter().map(|e| &e.label).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl Bundle {
    /// Read every pair and check it (see [`Bundle::keys`]): a bundle that loads is one the
    /// front can serve.
    pub fn load(pairs: &[CertPair]) -> Result<Bundle, String> {
        let mut entries = Vec::new();
        for p in pairs {
            entries.push(Entry {
                label: format!("{} + {}", p.cert.display(), p.key.display()),
                cert_pem: read(&p.cert, "certificate")?,
                key_pem: Zeroizing::new(read(&p.key, "key")?),
            });
        }
        let b = Bundle { entries };
        b.keys()?;
        Ok(b)
    }

    /// The bytes a front process reads from its memfd.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(MAGIC.to_vec());
        for e in &self.entries {
            for part in [e.label.as_bytes(), &e.cert_pem, &e.key_pem] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Bundle, String> {
        let mut rest = bytes
            .strip_prefix(MAGIC)
            .ok_or("not a corral certificate bundle")?;
        fn take(rest: &mut &[u8]) -> Result<Vec<u8>, String> {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or("truncated certificate bundle")?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err("truncated certificate bundle".into());
            }
            let (part, tail) = tail.split_at(len);
            *rest = tail;
            Ok(part.to_vec())
        }
        let mut entries = Vec::new();
        // Empty only for an ACME front before its first certificate (handshakes other than
        // the CA's TLS-ALPN-01 validation fail until it arrives).
        while !rest.is_empty() {
            let label = String::from_utf8_lossy(&take(&mut rest)?).into_owned();
            let cert_pem = take(&mut rest)?;
            let key_pem = Zeroizing::new(take(&mut rest)?);
            entries.push(Entry {
                label,
                cert_pem,
                key_pem,
            });
        }
        Ok(Bundle { entries })
    }

    /// A fingerprint of the contents, to tell whether a reload changed anything (not a MAC).
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.encode().iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Parse every chain and key, check that each key matches its certificate, and collect
    /// the DNS names each certificate is valid for.
    fn keys(&self) -> Result<Vec<KeyAndNames>, String> {
        self.entries
            .iter()
            .map(|e| {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&e.cert_pem)
                        .collect::<Result<_, _>>()
                        .map_err(|err| format!("{}: certificate PEM: {err}", e.label))?;
                let Some(leaf) = chain.first() else {
                    return Err(format!("{}: no CERTIFICATE in the PEM file", e.label));
                };
                let key = PrivateKeyDer::from_pem_slice(&e.key_pem)
                    .map_err(|err| format!("{}: private key PEM: {err}", e.label))?;
                let signer = any_supported_type(&key)
                    .map_err(|err| format!("{}: private key: {err}", e.label))?;
                let ck = CertifiedKey::new(chain.clone(), signer);
                ck.keys_match().map_err(|err| {
                    format!(
                        "{}: the key does not belong to the certificate ({err})",
                        e.label
                    )
                })?;
                let names = webpki::EndEntityCert::try_from(leaf)
                    .map_err(|err| format!("{}: certificate: {err}", e.label))?
                    .valid_dns_names()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                Ok((Arc::new(ck), names))
            })
            .collect()
    }

    /// The certificate resolver: SNI name (exact, then `*.` wildcard) to certificate, the first
    /// certificate for everything else (none in an empty bundle).
    pub fn resolver(&self) -> Result<Arc<SniResolver>, String> {
        let keys = self.keys()?;
        let default = keys.first().map(|(k, _)| k.clone());
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (key, names) in &keys {
            for n in names {
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(n.clone()),
                }
                .or_insert_with(|| key.clone());
            }
        }
        Ok(Arc::new(SniResolver {
            default,
            exact,
            wildcard,
        }))
    }
}

#[derive(Debug)]
pub struct SniResolver {
    default: Option<Arc<CertifiedKey>>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name.map(|n| n.to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}
