//! What the HTTP proxy tells the worker about the client: `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host` and RFC 7239 `Forwarded`, and the hop-by-hop headers
//! (RFC 9110 7.6.1) that stay on each hop. Pure: headers in, headers out.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), and the ones a
/// `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        strip_named(headers);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
}

/// The headers a `Connection` header names.
fn strip_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// Set the forwarded headers of a request from `client` for `host` over https. From a trusted
/// proxy the ones it sent are kept and the client is appended; from anyone else they are
/// replaced, so a client cannot claim another address or scheme.
pub fn apply(headers: &mut HeaderMap, client: IpAddr, host: Option<&str>, trusted: bool) {
    let joined = |headers: &HeaderMap, name: &HeaderName| -> Option<String> {
        let parts: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    };
    let (xff, fwd) = if trusted {
        (
            joined(headers, &X_FORWARDED_FOR),
            joined(headers, &header::FORWARDED),
        )
    } else {
        for n in [
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &header::FORWARDED,
        ] {
            headers.remove(n);
        }
        (None, None)
    };
    let client_s = client.to_string();
    let xff = match xff {
        Some(prev) => format!("{prev}, {client_s}"),
        None => client_s,
    };
    // RFC 7239 6: an IPv6 address is bracketed and the whole value quoted.
    let mut element = match client {
        IpAddr::V4(a) => format!("for={a};proto=https"),
        IpAddr::V6(a) => format!("for=\"[{a}]\";proto=https"),
    };
    let host = host.filter(|h| HeaderValue::from_str(h).is_ok());
    if let Some(h) = host {
        element.push_str(";host=");
        push_quoted(&mut element, h);
    }
    let fwd = match fwd {
        Some(prev) => format!("{prev}, {element}"),
        None => element,
    };
    let set = |headers: &mut HeaderMap, name: HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(name, v);
        }
    };
    set(headers, X_FORWARDED_FOR, &xff);
    set(headers, header::FORWARDED, &fwd);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if let (false, Some(h)) = (headers.contains_key(&X_FORWARDED_HOST), host) {
        set(headers, X_FORWARDED_HOST, h);
    }
}

/// `s` as an RFC 7239 (RFC 9110 5.6.4) quoted-string: in quotes, with `\\` and `"` escaped.
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn get<'a>(m: &'a HeaderMap, k: &str) -> Vec<&'a str> {
        m.get_all(k).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_clients_forwarded_headers_are_replaced() {
        let mut m = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=1.2.3.4"),
            ("accept", "*/*"),
        ]);
        apply(
            &mut m,
            "203.0.113.9".parse().unwrap(),
            Some("a.test:8443"),
            false,
        );
        assert_eq!(get(&m, "x-forwarded-for"), ["203.0.113.9"]);
        assert_eq!(get(&m, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&m, "x-forwarded-host"), ["a.test:8443"]);
        assert_eq!(
            get(&m, "forwarded"),
            ["for=203.0.113.9;proto=https;host=\"a.test:8443\""]
        );
        assert_eq!(get(&m, "accept"), ["*/*"]);
    }

    #[test]
    fn a_trusted_proxys_chain_is_kept_and_extended() {
        let mut m = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        apply(&mut m, "::1".parse().unwrap(), Some("a.test"), true);
        assert_eq!(get(&m, "x-forwarded-for"), ["1.2.3.4, 5.6.7.8, ::1"]);
        assert_eq!(get(&m, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&m, "x-forwarded-host"), ["a.test"]);
        assert_eq!(
            get(&m, "forwarded"),
            ["for=1.2.3.4, for=\"[::1]\";proto=https;host=\"a.test\""]
        );
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut m = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(get(&m, "content-type"), ["text/plain"]);
    }

    #[test]
    fn forwardeds_host_is_a_quoted_string_with_its_quotes_and_backslashes_escaped() {
        let mut m = HeaderMap::new();
        apply(
            &mut m,
            "192.0.2.1".parse().unwrap(),
            Some(r#"a"b\c"#),
            false,
        );
        assert_eq!(
            get(&m, "forwarded"),
            [r#"for=192.0.2.1;proto=https;host="a\"b\\c""#]
        );
        assert_eq!(get(&m, "x-forwarded-host"), [r#"a"b\c"#]);
    }
}
