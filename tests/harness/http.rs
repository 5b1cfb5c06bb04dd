//! HTTP clients for tests: a plain HTTP/1.1 GET, curl over https, the demo app's answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// curl over https to `name` on `port` (`name` resolved to 127.0.0.1) trusting only the
/// certificate `ca`: the body of `path`, or curl's error.
pub fn curl_https(port: u16, name: &str, ca: &Path, path: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A plain HTTP/1.1 GET on a new connection (5 s to connect, 10 s to answer); returns the
/// whole answer, status line and headers included.
pub fn http_get_raw(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A plain HTTP/1.1 GET on a new connection; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let text = http_get_raw(addr, path)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `"pid"` field of the demo app's JSON answer.
pub fn demo_pid(body: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("pid")?.as_i64().map(|p| p as i32)
}
