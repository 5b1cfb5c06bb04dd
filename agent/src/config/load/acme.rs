//! `[app.NAME.tls] acme = { domains, email, directory, directory_ca, challenge }`: what the
//! agent needs to obtain and renew a certificate from an ACME CA for the front.

use serde_spanned::Spanned;

use super::table::Table;
use crate::config::raw::RawAcme;
use crate::config::{Acme, AcmeChallenge, ConfigError};

/// Let's Encrypt's production directory. Its staging one, for trying a setup without its rate
/// limits (certificates no browser trusts): https://acme-staging-v02.api.letsencrypt.org/directory
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `redirect_http`: whether the front has a plain-HTTP listener (HTTP-01 needs it).
pub(super) fn acme(
    tt: &Table<'_>,
    raw: Spanned<RawAcme>,
    redirect_http: bool,
) -> Result<Acme, ConfigError> {
    let span = raw.span();
    let at = tt.src.loc(span.start);
    let raw = raw.into_inner();
    let Some(list) = raw.domains else {
        return Err(tt
            .err(span, "acme", "missing key `domains`")
            .with_hint("acme = { domains = [\"example.com\", \"www.example.com\"] }"));
    };
    if list.get_ref().is_empty() {
        return Err(tt.err(
            list.span(),
            "acme.domains",
            "expected at least one DNS name",
        ));
    }
    let mut domains: Vec<String> = Vec::new();
    for d in list.get_ref() {
        let name = d
            .get_ref()
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Err(why) = dns_name(&name) {
            let e = tt.err(
                d.span(),
                "acme.domains",
                format!("{:?} is not a DNS name: {why}", d.get_ref()),
            );
            return Err(if name.starts_with("*.") {
                e.with_hint(
                    "a wildcard needs the DNS-01 challenge, which corral does not do: list the \
                     names",
                )
            } else {
                e
            });
        }
        if domains.contains(&name) {
            return Err(tt.err(
                d.span(),
                "acme.domains",
                format!("{:?} is listed twice", d.get_ref()),
            ));
        }
        domains.push(name);
    }
    let email = match &raw.email {
        Some(v) => {
            let s = tt.string("acme.email", v)?;
            match s.split_once('@') {
                Some((user, host))
                    if !user.is_empty() && host.contains('.') && !s.contains(' ') =>
                {
                    Some(s)
                }
                _ => {
                    return Err(tt.err(
                        v.span(),
                        "acme.email",
                        format!("expected an e-mail address, found {s:?}"),
                    ))
                }
            }
        }
        None => None,
    };
    let directory = match &raw.directory {
        Some(v) => {
            let s = tt.string("acme.directory", v)?;
            let host = s.strip_prefix("https://").unwrap_or_default();
            if host.is_empty() || host.starts_with('/') || s.contains(char::is_whitespace) {
                return Err(tt
                    .err(
                        v.span(),
                        "acme.directory",
                        format!("expected an https:// URL of an ACME directory, found {s:?}"),
                    )
                    .with_hint(format!("Let's Encrypt's (the default) is {LETS_ENCRYPT}")));
            }
            s
        }
        None => LETS_ENCRYPT.to_string(),
    };
    let directory_ca = match &raw.directory_ca {
        Some(v) => Some(tt.path("acme.directory_ca", v)?),
        None => None,
    };
    let challenge = tt.choice(
        "acme.challenge",
        raw.challenge.as_ref(),
        AcmeChallenge::TlsAlpn01,
        &[
            ("tls-alpn-01", AcmeChallenge::TlsAlpn01),
            ("http-01", AcmeChallenge::Http01),
        ],
    )?;
    if let (AcmeChallenge::Http01, false, Some(v)) = (challenge, redirect_http, &raw.challenge) {
        return Err(tt
            .err(
                v.span(),
                "acme.challenge",
                "http-01 is answered on the `redirect_http` listener, and this front has none",
            )
            .with_hint(
                "add `redirect_http = \"0.0.0.0:80\"`, or use \"tls-alpn-01\" (the default), \
                 answered on the TLS address",
            ));
    }
    Ok(Acme {
        domains,
        email,
        directory,
        directory_ca,
        challenge,
        at,
        // Set from `[agent] acme_dir` once the whole config is read (`load_str`).
        dir: Default::default(),
    })
}

/// A host name a CA can validate with HTTP-01 or TLS-ALPN-01: labels of letters, digits and
/// inner hyphens, at least two of them, no wildcard, no IP address.
fn dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    if name.starts_with("*.") {
        return Err("a wildcard");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("an IP address");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("a single label (a CA issues for fully qualified names)");
    }
    for l in labels {
        if l.is_empty() || l.len() > 63 {
            return Err("a label is empty or longer than 63 characters");
        }
        if !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || l.starts_with('-')
            || l.ends_with('-')
        {
            return Err("labels are letters, digits and inner hyphens");
        }
    }
    Ok(())
}
