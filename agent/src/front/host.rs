//! Which host a request is for, from its `Host` header fields and its target's authority (an
//! HTTP/2 `:authority`, or an HTTP/1.1 absolute-form target), or why the request is refused.
//! Pure: the HTTP proxy asks it before forwarding anything.

use hyper::http::uri::{Authority, Uri};
use hyper::Version;

/// Why a request's host is refused (a 400 whose body says this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Neither a `Host` field nor an authority in the target.
    NoHost,
    /// More than one `Host` field line (RFC 9112 3.2: a 400).
    ManyHosts,
    /// A `Host` value that is not `host[:port]` (RFC 9112 3.2: a 400).
    BadHost,
    /// A target authority with `user@` in it (RFC 9110 4.2.4: treated as an error).
    Userinfo,
    /// An HTTP/2 `Host` naming another host than `:authority` (RFC 9113 8.3.1: malformed).
    Disagrees,
}

impl Refused {
    pub fn why(self) -> &'static str {
        match self {
            Refused::NoHost => "the request names no host (no Host header, no :authority)",
            Refused::ManyHosts => "more than one Host header",
            Refused::BadHost => "the Host header is not host[:port]",
            Refused::Userinfo => "the request target has user information (user@host)",
            Refused::Disagrees => "the Host header names another host than :authority",
        }
    }
}

/// The host (`host[:port]`, as the client wrote it) to tell the worker for a request of
/// `version` to `uri` with these `Host` field values.
///
/// - HTTP/2: `:authority` is the host; a `Host` beside it must name the same one once both are
///   normalized (case-insensitive host, the scheme's default port), else the request is
///   malformed (RFC 9113 8.3.1).
/// - HTTP/1.1 with an absolute-form target: the target's authority is the host and the `Host`
///   field is ignored and replaced (RFC 9112 3.2.2, which a proxy MUST do).
/// - Otherwise exactly one valid `Host` field (RFC 9112 3.2).
pub fn of_request<'a>(
    version: Version,
    uri: &'a Uri,
    hosts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<&'a str, Refused> {
    let mut hosts = hosts.into_iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Refused::ManyHosts),
        (Some(v), None) => Some(valid_host(v)?),
        (None, _) => None,
    };
    let Some(authority) = uri.authority() else {
        return host.map(|(s, _)| s).ok_or(Refused::NoHost);
    };
    if authority.as_str().contains('@') {
        return Err(Refused::Userinfo);
    }
    if version == Version::HTTP_2 {
        if let Some((_, h)) = host {
            if !same_host(&h, authority, default_port(uri)) {
                return Err(Refused::Disagrees);
            }
        }
    }
    Ok(authority.as_str())
}

fn valid_host(v: &[u8]) -> Result<(&str, Authority), Refused> {
    let s = std::str::from_utf8(v).map_err(|_| Refused::BadHost)?;
    if s.is_empty() || s.contains('@') {
        return Err(Refused::BadHost);
    }
    let a = s.parse::<Authority>().map_err(|_| Refused::BadHost)?;
    // The http crate takes any port text; RFC 3986's is digits (and an empty one is allowed).
    let port = a.as_str().get(a.host().len()..).unwrap_or("");
    match port.strip_prefix(':') {
        None if port.is_empty() => {}
        Some(p) if p.is_empty() || p.parse::<u16>().is_ok() => {}
        _ => return Err(Refused::BadHost),
    }
    Ok((s, a))
}

fn default_port(uri: &Uri) -> u16 {
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => 80,
        _ => 443,
    }
}

/// RFC 3986 6.2: hosts compare case-insensitively, and an absent port is the scheme's.
fn same_host(a: &Authority, b: &Authority, default: u16) -> bool {
    a.host().eq_ignore_ascii_case(b.host())
        && a.port_u16().unwrap_or(default) == b.port_u16().unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(version: Version, uri: &str, hosts: &[&str]) -> Result<String, Refused> {
        let uri: Uri = uri.parse().unwrap();
        of_request(version, &uri, hosts.iter().map(|h| h.as_bytes())).map(str::to_string)
    }

    #[test]
    fn an_origin_form_request_is_for_its_one_host() {
        assert_eq!(
            of(Version::HTTP_11, "/a?b", &["a.test:8443"]),
            Ok("a.test:8443".into())
        );
        assert_eq!(
            of(Version::HTTP_11, "/", &["[::1]:80"]),
            Ok("[::1]:80".into())
        );
        assert_eq!(of(Version::HTTP_11, "/", &[]), Err(Refused::NoHost));
        assert_eq!(
            of(Version::HTTP_11, "/", &["a.test", "b.test"]),
            Err(Refused::ManyHosts)
        );
        for bad in [
            "",
            "a b",
            "a.test:port",
            "u@a.test",
            "a.test/x",
            "a.test:99999",
        ] {
            assert_eq!(
                of(Version::HTTP_11, "/", &[bad]),
                Err(Refused::BadHost),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn http2s_authority_and_host_must_agree() {
        let h2 = Version::HTTP_2;
        assert_eq!(
            of(h2, "https://a.test:8443/", &[]),
            Ok("a.test:8443".into())
        );
        // The same host, normalized: case, and the default port written or not.
        for same in ["A.Test", "a.test:443"] {
            assert_eq!(
                of(h2, "https://a.test/x", &[same]),
                Ok("a.test".into()),
                "{same}"
            );
        }
        for other in ["b.test", "a.test:8443", "a.test:80"] {
            assert_eq!(
                of(h2, "https://a.test/x", &[other]),
                Err(Refused::Disagrees),
                "{other}"
            );
        }
        assert_eq!(of(h2, "https://u@a.test/", &[]), Err(Refused::Userinfo));
    }

    #[test]
    fn an_absolute_form_http11_target_replaces_the_host_header() {
        assert_eq!(
            of(Version::HTTP_11, "https://a.test/x", &["b.test"]),
            Ok("a.test".into())
        );
        assert_eq!(
            of(Version::HTTP_11, "https://a.test/x", &[]),
            Ok("a.test".into())
        );
        // Still one Host line at most, and a valid one.
        assert_eq!(
            of(Version::HTTP_11, "https://a.test/x", &["b", "c"]),
            Err(Refused::ManyHosts)
        );
    }
}
