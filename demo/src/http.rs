//! HTTP/1.1 request parsing: pure functions over byte buffers, no I/O.
//!
//! Minimal but correct for what the demo needs: request line and header fields (at most
//! [`MAX_HEAD`] bytes), the message framing (`Content-Length` or chunked `Transfer-Encoding`, so a
//! body can be skipped and the next pipelined request found), `Connection`, `Expect` and the query
//! parameters the demo understands.

use std::fmt::Write as _;

/// Largest request head (request line + header fields + blank line) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body the demo reads (and discards).
pub const MAX_BODY: u64 = 1 << 30;
/// Largest `bytes=N` response body.
pub const MAX_BYTES: u64 = 64 << 20;
/// Largest `delay_ms` / `burn_ms`: one hour.
pub const MAX_MS: u64 = 3_600_000;
/// Largest `alloc_mb` (and `DEMO_ALLOC_MB`): 64 GiB.
pub const MAX_ALLOC_MB: u64 = 65_536;
/// Largest `fork_children`.
pub const MAX_FORK_CHILDREN: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: Version,
    pub body: Body,
    /// `Connection: close` was sent.
    pub conn_close: bool,
    /// `Connection: keep-alive` was sent (matters for HTTP/1.0 only).
    pub conn_keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

impl Request {
    /// Whether the connection may stay open after this request's response.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.conn_close,
            Version::Http10 => self.conn_keep_alive && !self.conn_close,
        }
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// A request the server must answer with an error status and then close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reason: String,
}

fn err(status: u16, reason: impl Into<String>) -> HttpError {
    HttpError {
        status,
        reason: reason.into(),
    }
}

fn bad(reason: impl Into<String>) -> HttpError {
    err(400, reason)
}

/// Parses the request head at the start of `buf`.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((request, n)))`: the head is the first `n` bytes
/// (the body and any pipelined requests follow). Empty lines before the request line are skipped
/// (RFC 9112 §2.2); lines may end in CRLF or a bare LF.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(start) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        return if buf.len() >= MAX_HEAD {
            Err(bad("too many empty lines before the request line"))
        } else {
            Ok(None)
        };
    };
    let Some(len) = head_end(&buf[start..]) else {
        return if buf.len() >= MAX_HEAD {
            Err(err(
                431,
                format!("request head is larger than {MAX_HEAD} bytes"),
            ))
        } else {
            Ok(None)
        };
    };
    if start + len > MAX_HEAD {
        return Err(err(
            431,
            format!("request head is larger than {MAX_HEAD} bytes"),
        ));
    }
    let req = parse_lines(&buf[start..start + len])?;
    Ok(Some((req, start + len)))
}

/// Length of the head (through the blank line) at the start of `buf`, if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            (None, _) | (Some(b'\r'), None) => return None,
            _ => i = nl + 1,
        }
    }
    None
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

fn parse_lines(head: &[u8]) -> Result<Request, HttpError> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // `head` is non-empty and starts with a non-CR/LF byte, so the first line exists.
    let request_line = lines.next().unwrap_or_default();
    if request_line.contains(&b'\r') {
        return Err(bad("bare CR in the request line"));
    }
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "request line must be `METHOD SP TARGET SP HTTP/1.x` with single spaces",
        ));
    };
    if !is_token(method) {
        return Err(bad("invalid method"));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(bad("invalid request target"));
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(err(505, "only HTTP/1.0 and HTTP/1.1 are supported"));
        }
        _ => return Err(bad("invalid HTTP version")),
    };

    let mut req = Request {
        // Both checked above to be ASCII.
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        version,
        body: Body::None,
        conn_close: false,
        conn_keep_alive: false,
        expect_continue: false,
    };
    let mut content_length: Option<u64> = None;
    let mut transfer_codings: Vec<String> = Vec::new();
    let mut hosts = 0;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("obsolete line folding in header fields"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(bad("header field without `:`"));
        };
        let name = &line[..colon];
        if !is_token(name) {
            return Err(bad("invalid header field name"));
        }
        let value = trim_ows(&line[colon + 1..]);
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(bad("control character in a header field value"));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let value_str = String::from_utf8_lossy(value);
        match name.as_str() {
            "content-length" => {
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    return Err(bad("invalid Content-Length"));
                }
                let n: u64 = value_str
                    .parse()
                    .map_err(|_| bad("Content-Length is too large"))?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(bad("conflicting Content-Length header fields"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                for coding in value_str.split(',').map(str::trim) {
                    if !coding.is_empty() {
                        transfer_codings.push(coding.to_ascii_lowercase());
                    }
                }
            }
            "connection" => {
                for option in value_str.split(',').map(str::trim) {
                    if option.eq_ignore_ascii_case("close") {
                        req.conn_close = true;
                    } else if option.eq_ignore_ascii_case("keep-alive") {
                        req.conn_keep_alive = true;
                    }
                }
            }
            "host" => hosts += 1,
            "expect" if value_str.eq_ignore_ascii_case("100-continue") => {
                req.expect_continue = true;
            }
            _ => {}
        }
    }
    if version == Version::Http11 && hosts == 0 {
        return Err(bad("HTTP/1.1 request without a Host header field"));
    }
    if hosts > 1 {
        return Err(bad("more than one Host header field"));
    }
    req.body = if !transfer_codings.is_empty() {
        if content_length.is_some() {
            return Err(bad("both Transfer-Encoding and Content-Length"));
        }
        if version == Version::Http10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if transfer_codings.last().map(String::as_str) != Some("chunked") {
            return Err(bad("Transfer-Encoding does not end in chunked"));
        }
        Body::Chunked
    } else {
        match content_length {
            None | Some(0) => Body::None,
            Some(n) if n > MAX_BODY => {
                return Err(err(
                    413,
                    format!("request body is larger than {MAX_BODY} bytes"),
                ));
            }
            Some(n) => Body::Length(n),
        }
    };
    Ok(req)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Skips a chunked request body (RFC 9112 §7.1) as its bytes arrive.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDecoder {
    state: Chunk,
    /// Bytes in the current size or trailer line, or in all trailers: bounded.
    line: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size: value so far and number of digits.
    #[default]
    SizeStart,
    Size(u64, u32),
    /// After the size: extensions up to the end of the line.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line.
    TrailerStart,
    Trailer,
    EndLf,
    Done,
}

const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Consumes the body bytes at the start of `input`; returns how many. Once
    /// [`is_done`](Self::is_done), the rest of `input` belongs to the next request.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            let state = self.state;
            self.state = match state {
                Chunk::Done => return Ok(i),
                Chunk::Data(n) => {
                    let take = n.min((input.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == n {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(n - take)
                    };
                    continue;
                }
                Chunk::SizeStart => match hex(b) {
                    Some(d) => Chunk::Size(d, 1),
                    None => return Err(bad("invalid chunk size")),
                },
                Chunk::Size(v, digits) => match (hex(b), b) {
                    (Some(_), _) if digits >= 15 => return Err(bad("chunk size is too large")),
                    (Some(d), _) => Chunk::Size(v * 16 + d, digits + 1),
                    (None, b';' | b' ' | b'\t') => Chunk::Ext(v),
                    (None, b'\r') => Chunk::SizeLf(v),
                    (None, b'\n') => self.after_size(v),
                    _ => return Err(bad("invalid chunk size")),
                },
                Chunk::Ext(v) => match b {
                    b'\n' => self.after_size(v),
                    _ => Chunk::Ext(v),
                },
                Chunk::SizeLf(v) => match b {
                    b'\n' => self.after_size(v),
                    _ => return Err(bad("bare CR after a chunk size")),
                },
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    b'\n' => Chunk::SizeStart,
                    _ => return Err(bad("chunk data is not followed by CRLF")),
                },
                Chunk::DataLf => match b {
                    b'\n' => Chunk::SizeStart,
                    _ => return Err(bad("chunk data is not followed by CRLF")),
                },
                Chunk::TrailerStart => match b {
                    b'\r' => Chunk::EndLf,
                    b'\n' => Chunk::Done,
                    _ => Chunk::Trailer,
                },
                Chunk::Trailer => match b {
                    b'\n' => Chunk::TrailerStart,
                    _ => Chunk::Trailer,
                },
                Chunk::EndLf => match b {
                    b'\n' => Chunk::Done,
                    _ => return Err(bad("bare CR in the chunked trailer section")),
                },
            };
            i += 1;
            match self.state {
                Chunk::Size(..) | Chunk::Ext(_) | Chunk::SizeLf(_) => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(bad("chunk size line is too long"));
                    }
                }
                Chunk::TrailerStart | Chunk::Trailer | Chunk::EndLf => {
                    self.line += 1;
                    if self.line > MAX_HEAD {
                        return Err(err(431, "chunked trailer section is too large"));
                    }
                }
                _ => {}
            }
            if self.state == Chunk::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }

    fn after_size(&mut self, size: u64) -> Chunk {
        self.line = 0;
        if size == 0 {
            Chunk::TrailerStart
        } else {
            Chunk::Data(size)
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Splits a request target into path and query (without `?`). Accepts origin-form (`/p?q`),
/// absolute-form (`http://host/p?q`) and `*`.
pub fn split_target(target: &str) -> Result<(&str, &str), HttpError> {
    let rest = if target.starts_with('/') || target == "*" {
        target
    } else {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let after_scheme = if lower.starts_with("http://") {
            &target[7..]
        } else if lower.starts_with("https://") {
            &target[8..]
        } else {
            return Err(bad("request target must start with `/`"));
        };
        match after_scheme.find(['/', '?']) {
            Some(i) if after_scheme[i..].starts_with('/') => &after_scheme[i..],
            // `http://host?q` and `http://host`: the path is `/`.
            Some(i) => return Ok(("/", &after_scheme[i + 1..])),
            None => "/",
        }
    };
    let rest = rest.split('#').next().unwrap_or(rest);
    Ok(match rest.split_once('?') {
        Some((path, query)) => (path, query),
        None => (rest, ""),
    })
}

/// The query parameters the demo understands; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub delay_ms: Option<u64>,
    pub burn_ms: Option<u64>,
    pub bytes: Option<u64>,
    pub pad: Option<u64>,
    /// Allocate this many MiB, touch every page and keep it for the process's life.
    pub alloc_mb: Option<u64>,
    /// Fork this many child processes that sleep forever.
    pub fork_children: Option<u64>,
    /// The forked children ignore SIGTERM (`child_ignores_term=1`; `0` is the default).
    pub child_ignores_term: bool,
}

/// Parses `a=1&b=2`. Keys and values are percent-decoded; the last of repeated keys wins;
/// unknown keys are ignored; a known key with a bad value is an error.
pub fn parse_query(query: &str) -> Result<Params, String> {
    let mut p = Params::default();
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k)?;
        let (slot, max) = match key.as_str() {
            "delay_ms" => (&mut p.delay_ms, MAX_MS),
            "burn_ms" => (&mut p.burn_ms, MAX_MS),
            "bytes" => (&mut p.bytes, MAX_BYTES),
            "pad" => (&mut p.pad, MAX_BYTES),
            "alloc_mb" => (&mut p.alloc_mb, MAX_ALLOC_MB),
            "fork_children" => (&mut p.fork_children, MAX_FORK_CHILDREN),
            "child_ignores_term" => {
                p.child_ignores_term = parse_bounded(&key, &percent_decode(v)?, 1)? == 1;
                continue;
            }
            _ => continue,
        };
        let value = percent_decode(v)?;
        *slot = Some(parse_bounded(&key, &value, max)?);
    }
    Ok(p)
}

/// Parses a decimal integer in `0..=max`; the error names `what`.
pub fn parse_bounded(what: &str, value: &str, max: u64) -> Result<u64, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{what} must be a non-negative integer, got `{value}`"
        ));
    }
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{what} must be at most {max}, got {value}")),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = b.get(i + 1).and_then(|&c| hex(c));
                let lo = b.get(i + 2).and_then(|&c| hex(c));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(format!("invalid percent-encoding in `{s}`"));
                };
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}

/// The reason phrase of the statuses the demo sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// `secs` since the Unix epoch as an IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut s = String::with_capacity(29);
    let _ = write!(
        s,
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    s
}

/// Appends `s` as a JSON string literal.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The `bytes=N` body pattern: byte `i` is `LETTERS[(i % 251) % 52]`.
pub const LETTERS: &[u8; 52] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn pattern_byte(i: u64) -> u8 {
    LETTERS[((i % 251) % 52) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<(Request, usize)>, HttpError> {
        parse_head(s.as_bytes())
    }

    fn ok(s: &str) -> (Request, usize) {
        parse(s).unwrap().unwrap()
    }

    fn status(s: &str) -> u16 {
        parse(s).unwrap_err().status
    }

    #[test]
    fn simple_get() {
        let s = "GET /x?y=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\n\r\n";
        let (r, n) = ok(s);
        assert_eq!(n, s.len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/x?y=1");
        assert_eq!(r.version, Version::Http11);
        assert_eq!(r.body, Body::None);
        assert!(r.keep_alive());
        assert!(!r.is_head());
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        let full = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for i in 0..full.len() {
            assert_eq!(parse(&full[..i]), Ok(None), "prefix {i}");
        }
        assert!(parse(full).unwrap().is_some());
    }

    #[test]
    fn pipelined_requests_leave_the_rest() {
        let one = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let two = "GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        let buf = format!("{one}{two}");
        let (r, n) = ok(&buf);
        assert_eq!((r.target.as_str(), n), ("/a", one.len()));
        let (r, n) = ok(&buf[n..]);
        assert_eq!((r.target.as_str(), n), ("/b", two.len()));
    }

    #[test]
    fn bare_lf_and_leading_empty_lines() {
        let s = "\r\n\nGET / HTTP/1.0\nHost: a\n\n";
        let (r, n) = ok(s);
        assert_eq!(n, s.len());
        assert_eq!(r.version, Version::Http10);
        assert!(!r.keep_alive());
        assert_eq!(parse("\r\n\r\n"), Ok(None));
    }

    #[test]
    fn connection_semantics() {
        assert!(
            !ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive()
        );
        assert!(
            !ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, CLOSE\r\n\r\n")
                .0
                .keep_alive()
        );
        assert!(ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .0
            .keep_alive());
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").0.keep_alive());
    }

    #[test]
    fn body_framing() {
        let (r, _) = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(r.body, Body::Length(12));
        let (r, _) = ok("POST / HTTP/1.1\r\nHost: a\r\ncontent-length:  0 \r\n\r\n");
        assert_eq!(r.body, Body::None);
        let (r, _) =
            ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.body, Body::Length(5));
        let (r, _) = ok("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(r.body, Body::Chunked);
        let (r, _) =
            ok("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(r.expect_continue);
    }

    #[test]
    fn malformed_requests() {
        for s in [
            "GET / HTTP/1.1\r\n\r\n", // no Host in 1.1
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", // double space
            "GET /\r\nHost: a\r\n\r\n",           // HTTP/0.9 style
            "GET / HTTP/1.1 x\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTX/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n", // space before colon
            "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(status(s), 400, "{s:?}");
        }
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1073741825\r\n\r\n"),
            413
        );
    }

    #[test]
    fn head_size_limit() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(status(&big), 431);
        let complete_but_big = format!("{big}\r\n");
        assert_eq!(status(&complete_but_big), 431);
        let fits = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD - 40)
        );
        assert!(fits.len() <= MAX_HEAD);
        assert!(parse(&fits).unwrap().is_some());
        assert_eq!(parse_head(&[b'\n'; MAX_HEAD]).unwrap_err().status, 400);
    }

    fn decode_all(body: &[u8], step: usize) -> Result<usize, HttpError> {
        let mut d = ChunkedDecoder::default();
        let mut used = 0;
        while !d.is_done() && used < body.len() {
            let end = (used + step).min(body.len());
            used += d.feed(&body[used..end])?;
        }
        assert!(d.is_done(), "not done after {body:?}");
        Ok(used)
    }

    #[test]
    fn chunked_bodies() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(decode_all(body, step).unwrap(), end, "step {step}");
        }
        assert_eq!(decode_all(b"0\r\n\r\n", 1).unwrap(), 5);
        assert_eq!(decode_all(b"3\nabc\n0\n\nrest", 4).unwrap(), 9);
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"ffffffffffffffff0\r\n",
            b"\r\n",
            b"0\r\n\rX",
        ] {
            let mut d = ChunkedDecoder::default();
            assert!(d.feed(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("/a/b?x=1&y").unwrap(), ("/a/b", "x=1&y"));
        assert_eq!(split_target("/").unwrap(), ("/", ""));
        assert_eq!(split_target("/p#frag").unwrap(), ("/p", ""));
        assert_eq!(split_target("http://h:1/p?q=2").unwrap(), ("/p", "q=2"));
        assert_eq!(split_target("HTTP://h").unwrap(), ("/", ""));
        assert_eq!(split_target("http://h?bytes=3").unwrap(), ("/", "bytes=3"));
        assert_eq!(split_target("*").unwrap(), ("*", ""));
        assert_eq!(split_target("example.com:443").unwrap_err().status, 400);
    }

    #[test]
    fn queries() {
        assert_eq!(parse_query("").unwrap(), Params::default());
        let p = parse_query("delay_ms=5&burn_ms=7&bytes=16385&pad=3&other=x&&flag").unwrap();
        assert_eq!(
            p,
            Params {
                delay_ms: Some(5),
                burn_ms: Some(7),
                bytes: Some(16385),
                pad: Some(3),
                ..Params::default()
            }
        );
        assert_eq!(parse_query("bytes=1&bytes=2").unwrap().bytes, Some(2));
        assert_eq!(parse_query("%62ytes=%31%30").unwrap().bytes, Some(10));
        assert_eq!(
            parse_query("bytes=67108864").unwrap().bytes,
            Some(MAX_BYTES)
        );
        assert!(parse_query("bytes=67108865").is_err());
        assert!(parse_query("bytes=").is_err());
        assert!(parse_query("bytes").is_err());
        assert!(parse_query("delay_ms=-1").is_err());
        assert!(parse_query("delay_ms=1.5").is_err());
        assert!(parse_query("delay_ms=3600001").is_err());
        assert!(parse_query("delay_ms=99999999999999999999999").is_err());
        assert!(parse_query("delay_ms=%zz").is_err());
        // Unknown keys are ignored, values and all.
        assert!(parse_query("x=%zz").is_ok());
        assert!(parse_query("%zz=1").is_err());
    }

    #[test]
    fn memory_and_fork_queries() {
        let p = parse_query("alloc_mb=200&fork_children=64&child_ignores_term=1").unwrap();
        assert_eq!(
            p,
            Params {
                alloc_mb: Some(200),
                fork_children: Some(64),
                child_ignores_term: true,
                ..Params::default()
            }
        );
        let p = parse_query("fork_children=3").unwrap();
        assert_eq!((p.fork_children, p.child_ignores_term), (Some(3), false));
        assert!(
            !parse_query("child_ignores_term=1&child_ignores_term=0")
                .unwrap()
                .child_ignores_term
        );
        assert_eq!(
            parse_query("alloc_mb=65536").unwrap().alloc_mb,
            Some(MAX_ALLOC_MB)
        );
        assert_eq!(parse_query("alloc_mb=0").unwrap().alloc_mb, Some(0));
        assert!(parse_query("alloc_mb=65537").is_err());
        assert!(parse_query("alloc_mb=-1").is_err());
        assert!(parse_query("alloc_mb=").is_err());
        assert_eq!(
            parse_query("fork_children=4096").unwrap().fork_children,
            Some(MAX_FORK_CHILDREN)
        );
        assert!(parse_query("fork_children=4097").is_err());
        assert!(parse_query("fork_children=x").is_err());
        assert!(parse_query("child_ignores_term=2").is_err());
        assert!(parse_query("child_ignores_term=yes").is_err());
        assert!(parse_query("child_ignores_term").is_err());
        assert!(
            parse_query("%63hild_ignores_term=%31")
                .unwrap()
                .child_ignores_term
        );
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(1_798_761_599), "Thu, 31 Dec 2026 23:59:59 GMT");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
    }

    #[test]
    fn pattern() {
        assert_eq!(pattern_byte(0), b'A');
        assert_eq!(pattern_byte(51), b'z');
        assert_eq!(pattern_byte(52), b'A');
        assert_eq!(pattern_byte(250), LETTERS[250 % 52]);
        assert_eq!(pattern_byte(251), b'A');
    }
}
