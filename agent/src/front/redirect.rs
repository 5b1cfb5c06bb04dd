//! `redirect_http`: plain HTTP answered with a 308 to the same host and path over https.

/// The most of a request head read before answering 431.
pub const MAX_HEAD: usize = 8 * 1024;

/// The whole response for a request head (`head` up to and including the blank line).
pub fn response(head: &[u8], https_port: u16) -> String {
    match location(head, https_port) {
        Ok(loc) => format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: {loc}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        ),
        Err(why) => {
            let body = format!("400 Bad Request: {why}\n");
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
        }
    }
}

/// `https://<host>[:port]<target>` for a request head, or why not.
pub fn location(head: &[u8], https_port: u16) -> Result<String, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let request = lines.next().ok_or("no request line")?;
    let mut parts = request.split(' ');
    let (_method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next())
    {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() => (m, t, v),
        _ => return Err("malformed request line"),
    };
    if !version.starts_with("HTTP/1.") {
        return Err("not HTTP/1.x");
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("the target must be a path");
    }
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())
        .ok_or("no Host header")?;
    let name = host_name(host).ok_or("a malformed Host header")?;
    Ok(if https_port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{https_port}{target}")
    })
}

/// The host part of a Host header value (without its port): a DNS name, an IPv4 address or a
/// bracketed IPv6 literal; `None` for anything else (nothing from it reaches Location unchecked).
fn host_name(host: &str) -> Option<&str> {
    let name = if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        let (inner, after) = (&rest[..end], &rest[end + 1..]);
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        if !(after.is_empty()
            || after[1..].bytes().all(|b| b.is_ascii_digit()) && after.starts_with(':'))
        {
            return None;
        }
        &host[..end + 2]
    } else {
        let name = match host.rsplit_once(':') {
            Some((n, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => n,
            Some(_) => return None,
            None => host,
        };
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return None;
        }
        name
    };
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_to_the_same_host_and_path() {
        let h = b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\n\r\n";
        assert_eq!(location(h, 443).unwrap(), "https://example.com/a/b?c=d");
        let h = b"GET / HTTP/1.1\r\nhost: example.com:8080\r\n\r\n";
        assert_eq!(location(h, 8443).unwrap(), "https://example.com:8443/");
        let h = b"HEAD /x HTTP/1.0\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(location(h, 443).unwrap(), "https://[::1]/x");
        let r = response(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 443);
        assert!(r.starts_with("HTTP/1.1 308 Permanent Redirect\r\nLocation: https://a.test/\r\n"));
    }

    #[test]
    fn refuses_what_it_cannot_redirect_safely() {
        for (head, why) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "no Host header"),
            (
                b"GET / HTTP/1.1\r\nHost: evil.com\r\nx\r\n\r\n" as &[u8],
                "",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                "a malformed Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n",
                "a malformed Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n",
                "a malformed Host header",
            ),
            (
                b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n",
                "the target must be a path",
            ),
            (b"GET / SPDY/3\r\nHost: a\r\n\r\n", "not HTTP/1.x"),
            (b"garbage\r\n\r\n", "malformed request line"),
            (
                b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
                "the target must be a path",
            ),
        ] {
            let r = location(head, 443);
            if why.is_empty() {
                assert!(r.is_ok(), "{r:?}");
            } else {
                assert_eq!(r, Err(why), "{}", String::from_utf8_lossy(head));
            }
        }
        assert!(response(b"garbage\r\n\r\n", 443).starts_with("HTTP/1.1 400 Bad Request\r\n"));
    }
}
