//! `[app.NAME.tls]`: the TLS front's address, certificates, identity and tuning. The front
//! itself becomes an app of its own (`front.rs`).

use std::time::Duration;

use serde_spanned::Spanned;

use super::endpoints::Endpoints;
use super::identity::identity;
use super::source::Source;
use super::table::Table;
use crate::config::raw::RawTls;
use crate::config::raw::StrList;
use crate::config::{
    AppName, CertPair, ConfigError, HttpArgs, KtlsMode, Lookup, ProxyMode, Tls, UpstreamMode,
};
use crate::front::app::FRONT_DEFAULT_USER;

const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HANDSHAKES: u32 = 1024;
/// As long as the handshake's: a client that has connected has this long to say what it wants.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// nginx's proxy_read_timeout: a worker that has not started its answer by then gets a 504.
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's large_client_header_buffers (4 x 8k); hyper will not go below 8 KiB.
const DEFAULT_MAX_HEADER_BYTES: u32 = 32 * 1024;
const MAX_HEADER_BYTES: std::ops::RangeInclusive<u64> = 8192..=1024 * 1024;
/// hyper's own default.
const DEFAULT_MAX_HEADERS: u32 = 100;

/// `[app.NAME.tls]`, its sockets recorded in `endpoints`.
pub(super) fn tls(
    src: &Source<'_>,
    lookup: &dyn Lookup,
    name: &AppName,
    raw: Spanned<RawTls>,
    endpoints: &mut Endpoints,
) -> Result<Tls, ConfigError> {
    let n = name.as_str();
    let tt = Table::new(src, &["app", n, "tls"], raw.span());
    let raw = raw.into_inner();
    let http = http(&tt, &raw)?;
    let address_v = tt.required("address", raw.address)?;
    // The front processes' SO_REUSEPORT group: the app's alone, like a worker socket.
    let (address, address_at) = endpoints.claim(&tt, "address", &address_v, true)?;
    let redirect_http = match &raw.redirect_http {
        Some(v) => Some(endpoints.claim(&tt, "redirect_http", v, false)?.0),
        None => None,
    };
    let acme = match raw.acme {
        Some(a) => Some(super::acme::acme(&tt, a, redirect_http.is_some())?),
        None => None,
    };
    // With `acme`, `cert`/`key` are optional: names from files and names by ACME may share a
    // front (the file's certificate is then the default, the ACME one chosen by SNI).
    let cert = match (raw.cert, raw.key, &acme) {
        (Some(c), Some(k), _) => Some(CertPair {
            cert: tt.path("cert", &c)?,
            key: tt.path("key", &k)?,
        }),
        (None, None, Some(_)) => None,
        (Some(_), None, _) => return Err(tt.missing("key")),
        (None, Some(_), _) => return Err(tt.missing("cert")),
        (None, None, None) => {
            return Err(tt
                .missing("cert")
                .with_hint("give `cert` and `key` files, or `acme = { domains = [...] }`"))
        }
    };
    let sni = raw
        .sni
        .unwrap_or_default()
        .into_iter()
        .map(|pair| {
            let pt = Table::array_item(src, &["app", n, "tls", "sni"], pair.span());
            let pair = pair.into_inner();
            Ok(CertPair {
                cert: pt.path("cert", &pt.required("cert", pair.cert)?)?,
                key: pt.path("key", &pt.required("key", pair.key)?)?,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let identity = match &raw.user {
        Some(_) => identity(&tt, lookup, name, raw.user.as_ref(), raw.group.as_ref())?,
        None => {
            let nobody = Spanned::new(tt.span.clone(), FRONT_DEFAULT_USER.to_string());
            identity(&tt, lookup, name, Some(&nobody), raw.group.as_ref()).map_err(|e| {
                e.with_hint(format!(
                    "the TLS front runs as `{FRONT_DEFAULT_USER}` unless `user` is set in {}",
                    tt.section
                ))
            })?
        }
    };
    let (processes, processes_at) = tt.count("processes", raw.processes.as_ref(), &address_at)?;
    let handshake_timeout = tt.positive_duration(
        "handshake_timeout",
        raw.handshake_timeout.as_ref(),
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    let proxy_protocol = tt.choice(
        "proxy_protocol",
        raw.proxy_protocol.as_ref(),
        false,
        &[("off", false), ("v2", true)],
    )?;
    let max_handshakes = tt
        .u32_in("max_handshakes", raw.max_handshakes.as_ref(), 1..=65536)?
        .unwrap_or(DEFAULT_MAX_HANDSHAKES);
    let ktls = tt.choice(
        "ktls",
        raw.ktls.as_ref(),
        KtlsMode::Auto,
        &[
            ("auto", KtlsMode::Auto),
            ("off", KtlsMode::Off),
            ("require", KtlsMode::Require),
        ],
    )?;
    let proxy = tt.choice(
        "proxy",
        raw.proxy.as_ref(),
        ProxyMode::Http,
        &[("http", ProxyMode::Http), ("tcp", ProxyMode::Tcp)],
    )?;
    match proxy {
        ProxyMode::Http => {
            if let (true, Some(v)) = (proxy_protocol, &raw.proxy_protocol) {
                return Err(tt
                    .err(
                        v.span(),
                        "proxy_protocol",
                        "a PROXY header is for the byte path; the HTTP proxy sends the \
                         client's address in X-Forwarded-For and Forwarded",
                    )
                    .with_hint("set `proxy = \"tcp\"` to keep the PROXY header"));
            }
            if let (KtlsMode::Require, Some(v)) = (ktls, &raw.ktls) {
                return Err(tt
                    .err(
                        v.span(),
                        "ktls",
                        "kTLS carries the byte path only; the HTTP proxy parses every request \
                         in userspace",
                    )
                    .with_hint("set `proxy = \"tcp\"` for kernel TLS and splice"));
            }
        }
        ProxyMode::Tcp => {
            let http_keys = [
                (
                    "trusted_proxies",
                    raw.trusted_proxies.as_ref().map(|v| v.span()),
                ),
                (
                    "header_timeout",
                    raw.header_timeout.as_ref().map(|v| v.span()),
                ),
                (
                    "upstream_timeout",
                    raw.upstream_timeout.as_ref().map(|v| v.span()),
                ),
                ("body_timeout", raw.body_timeout.as_ref().map(|v| v.span())),
                (
                    "max_header_size",
                    raw.max_header_size.as_ref().map(|v| v.span()),
                ),
                ("max_headers", raw.max_headers.as_ref().map(|v| v.span())),
                ("access_log", raw.access_log.as_ref().map(|v| v.span())),
                ("upstream", raw.upstream.as_ref().map(|v| v.span())),
            ];
            if let Some((key, Some(span))) = http_keys.into_iter().find(|(_, s)| s.is_some()) {
                return Err(tt
                    .err(
                        span,
                        key,
                        "is a setting of the HTTP proxy, and this front is `proxy = \"tcp\"`",
                    )
                    .with_hint("remove it, or drop `proxy = \"tcp\"` (the default is \"http\")"));
            }
        }
    }
    Ok(Tls {
        address,
        address_at,
        cert,
        sni,
        acme,
        ktls,
        redirect_http,
        identity,
        processes,
        processes_at,
        handshake_timeout,
        max_handshakes,
        proxy_protocol,
        proxy,
        http,
    })
}

/// The HTTP proxy's keys, with their defaults.
fn http(tt: &Table<'_>, raw: &RawTls) -> Result<HttpArgs, ConfigError> {
    let max_header_bytes = match tt.size("max_header_size", raw.max_header_size.as_ref())? {
        None => DEFAULT_MAX_HEADER_BYTES,
        Some(b) if MAX_HEADER_BYTES.contains(&b.0) => b.0 as u32,
        Some(b) => {
            let v = raw
                .max_header_size
                .as_ref()
                .map(|v| v.span())
                .unwrap_or_default();
            return Err(tt.err(
                v,
                "max_header_size",
                format!("expected from 8KiB to 1MiB, found {} bytes", b.0),
            ));
        }
    };
    Ok(HttpArgs {
        trusted_proxies: trusted(tt, raw.trusted_proxies.as_ref())?,
        header_timeout: tt.positive_duration(
            "header_timeout",
            raw.header_timeout.as_ref(),
            DEFAULT_HEADER_TIMEOUT,
        )?,
        upstream_timeout: tt.positive_duration(
            "upstream_timeout",
            raw.upstream_timeout.as_ref(),
            DEFAULT_UPSTREAM_TIMEOUT,
        )?,
        body_timeout: tt.positive_duration(
            "body_timeout",
            raw.body_timeout.as_ref(),
            DEFAULT_BODY_TIMEOUT,
        )?,
        max_header_bytes,
        max_headers: tt
            .u32_in("max_headers", raw.max_headers.as_ref(), 1..=1000)?
            .unwrap_or(DEFAULT_MAX_HEADERS),
        access_log: raw.access_log.as_ref().is_some_and(|v| *v.get_ref()),
        upstream: tt.choice(
            "upstream",
            raw.upstream.as_ref(),
            UpstreamMode::DEFAULT,
            &[
                ("pool", UpstreamMode::Pool),
                ("connect", UpstreamMode::Connect),
            ],
        )?,
    })
}

/// `trusted_proxies = ["10.0.0.0/8", "192.0.2.7"]`: networks, or single addresses.
fn trusted(tt: &Table<'_>, v: Option<&StrList>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let Some(list) = v else {
        return Ok(Vec::new());
    };
    list.get_ref()
        .iter()
        .map(|item| {
            let s = item.get_ref().trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    tt.err(
                        item.span(),
                        "trusted_proxies",
                        format!(
                            "expected an address or a network such as \"10.0.0.0/8\", found {:?}",
                            item.get_ref()
                        ),
                    )
                })
        })
        .collect()
}
