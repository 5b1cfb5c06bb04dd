//! `[app.NAME.tls]`: the TLS front's address, certificates, identity and tuning. The front
//! itself becomes an app of its own (`front.rs`).

use std::time::Duration;

use serde_spanned::Spanned;

use super::endpoints::Endpoints;
use super::identity::identity;
use super::source::Source;
use super::table::Table;
use crate::config::raw::RawTls;
use crate::config::{AppName, CertPair, ConfigError, KtlsMode, Lookup, Tls};
use crate::front::app::FRONT_DEFAULT_USER;

const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HANDSHAKES: u32 = 1024;

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
    let address_v = tt.required("address", raw.address)?;
    // The front processes' SO_REUSEPORT group: the app's alone, like a worker socket.
    let (address, address_at) = endpoints.claim(&tt, "address", &address_v, true)?;
    let cert = tt.path("cert", &tt.required("cert", raw.cert)?)?;
    let key = tt.path("key", &tt.required("key", raw.key)?)?;
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
    let redirect_http = match &raw.redirect_http {
        Some(v) => Some(endpoints.claim(&tt, "redirect_http", v, false)?.0),
        None => None,
    };
    Ok(Tls {
        address,
        address_at,
        cert,
        key,
        sni,
        ktls,
        redirect_http,
        identity,
        processes,
        processes_at,
        handshake_timeout,
        max_handshakes,
        proxy_protocol,
    })
}
