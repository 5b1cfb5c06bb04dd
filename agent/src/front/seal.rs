//! The agent's side of a front's certificates: read and check them as root (key files are the
//! agent's to read), hand them over as a sealed memfd, tell when the files on disk changed, and
//! where to watch for that.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::bundle::Bundle;
use crate::config::{KtlsMode, Tls};

/// The front app `app`'s certificates and keys in a sealed memfd for its processes, and the
/// bundle's digest. An invalid certificate fails here, before anything is applied.
pub fn seal(app: &str, tls: &Tls) -> Result<(Arc<OwnedFd>, u64), String> {
    let bundle = load(tls).map_err(|e| format!("{}: app {app}: {e}", tls.address_at))?;
    let memfd = crate::sys::front::sealed_memfd(&format!("corral-{app}"), &bundle.encode())
        .map_err(|e| format!("app {app}: certificate bundle: {e}"))?;
    if tls.ktls != KtlsMode::Off {
        // As root this also loads tls.ko when the kernel has it as a module; the unprivileged
        // front processes could not.
        match crate::sys::ktls::probe() {
            Ok(()) => tracing::info!(app, "kernel TLS: TCP_ULP \"tls\" available"),
            Err(why) if tls.ktls == KtlsMode::Require => {
                return Err(format!(
                    "{}: app {app}: ktls = \"require\", but {why}",
                    tls.address_at
                ))
            }
            Err(why) => tracing::info!(app, "kernel TLS unavailable ({why}): userspace rustls"),
        }
    }
    Ok((Arc::new(memfd), bundle.digest()))
}

/// The front's certificates: its files', then the one ACME obtained, once there is one (the
/// agent wrote it only after checking it: `crate::acme::check`). An ACME-only front has none
/// until then.
fn load(tls: &Tls) -> Result<Bundle, String> {
    let mut pairs = tls.cert_pairs();
    if let Some(acme) = &tls.acme {
        if let Some((chain, key)) = crate::acme::state::read_cert(acme) {
            // Served only if every name in it is a configured one and it is valid now: a
            // certificate that is not, whoever put it there, never reaches a front.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            match crate::acme::check::check_servable(&chain, &key, &acme.domains, now) {
                Ok(_) => pairs.push(acme.cert_pair()),
                Err(e) => tracing::error!(
                    "{}: the stored ACME certificate {} is not served: {e}",
                    acme.at,
                    acme.cert_pair().cert.display()
                ),
            }
        }
    }
    Bundle::load(&pairs)
}

/// Whether the certificates on disk differ from the bundle of digest `sealed` (an unreadable or
/// invalid one is an error: a reload is refused, a file change logged).
pub fn changed(app: &str, tls: &Tls, sealed: u64) -> Result<bool, String> {
    let now = load(tls).map_err(|e| format!("{}: app {app}: {e}", tls.address_at))?;
    Ok(now.digest() != sealed)
}

/// The directories a front's certificate and key files are in (and, for symlinks, where they
/// point: certbot's live/ links into archive/).
pub fn cert_dirs(tls: &Tls) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    // The ACME directory: the agent renames a renewed certificate into it.
    dirs.extend(tls.acme.as_ref().map(|a| a.dir.clone()));
    for pair in tls.cert_pairs() {
        for f in [&pair.cert, &pair.key] {
            let mut candidates = vec![f.clone()];
            if let Ok(real) = std::fs::canonicalize(f) {
                candidates.push(real);
            }
            for c in candidates {
                if let Some(d) = c.parent() {
                    if !dirs.iter().any(|x| x == d) {
                        dirs.push(d.to_path_buf());
                    }
                }
            }
        }
    }
    dirs
}
