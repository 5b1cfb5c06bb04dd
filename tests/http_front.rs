//! The TLS front's HTTP proxy (`proxy = "http"`, the default) on the host (root): a real agent,
//! real front processes, a real FastAPI app under `uvicorn --proxy-headers
//! --forwarded-allow-ips=127.0.0.1` (tests/apps/http_front_app.py, from the venv `cargo xtask
//! test` makes under target/bench/venv) and real clients: curl over HTTP/1.1 and HTTP/2, the
//! `websockets` client, and raw TLS for the bad input no client sends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_tests::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const APP: &str = include_str!("apps/http_front_app.py");
/// The front's HTTP limits in these tests: short, so that timeouts show within seconds.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(3);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

fn venv() -> PathBuf {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/venv");
    assert!(
        v.join("bin/uvicorn").exists() && v.join("bin/python").exists(),
        "{} has no uvicorn: `cargo xtask test` makes the venv (fastapi, uvicorn, websockets) \
         before the tests run",
        v.display()
    );
    v
}

struct Setup {
    agent: Agent,
    tls: SocketAddr,
    ca: PathBuf,
}

/// The FastAPI app (two uvicorn workers) behind a front of two processes, trusting 127.0.0.3
/// as a proxy, with the short limits above and an access log.
fn start(tag: &str) -> Setup {
    start_at(tag, loopback(free_port()))
}

/// [`start`] with the front on `tls_address`.
fn start_at(tag: &str, tls_address: SocketAddr) -> Setup {
    start_full(tag, tls_address, HEADER_TIMEOUT, "pool")
}

/// [`start_at`] with another header timeout (also an idle connection's life) and `upstream`
/// ("pool" or "connect").
fn start_full(
    tag: &str,
    tls_address: SocketAddr,
    header_timeout: Duration,
    upstream: &str,
) -> Setup {
    let venv = venv();
    let (app_port, tls_port) = (free_port(), tls_address.port());
    let uvicorn = venv.join("bin/uvicorn").display().to_string();
    let app = App::new("api")
        .command([
            uvicorn.as_str(),
            "http_front_app:app",
            "--fd",
            "3",
            "--proxy-headers",
            "--forwarded-allow-ips=127.0.0.1",
            "--no-access-log",
            "--log-level",
            "warning",
        ])
        .user("nobody")
        .set("group", "nogroup")
        .set("workdir", "@DIR@")
        .env("PYTHONPATH", "@DIR@")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .address(loopback(app_port))
        .count(2)
        .workers("stop_timeout", "5s")
        .workers("ready_timeout", "60s")
        .restart("max_restarts", 100)
        .tls("address", tls_address)
        .tls("cert", "@DIR@/a.crt")
        .tls("key", "@DIR@/a.key")
        .tls("processes", 2)
        .tls("trusted_proxies", vec!["127.0.0.3".to_string()])
        .tls(
            "header_timeout",
            format!("{}ms", header_timeout.as_millis()),
        )
        .tls("body_timeout", "3s")
        .tls("upstream_timeout", "3s")
        .tls("max_header_size", "16KiB")
        .tls("max_headers", 50)
        .tls("access_log", true)
        .tls("upstream", upstream);
    let agent = Agent::start_with(tag, app, |dir| {
        let (cert, key) = tls::self_signed(&["localhost"]);
        tls::write_cert(dir.path(), &cert, &key);
        std::fs::write(dir.path().join("http_front_app.py"), APP).expect("write the app");
    });
    agent.wait_ready("api", 2, Duration::from_secs(60));
    agent.wait_ready("api.tls", 2, Duration::from_secs(20));
    let ca = agent.dir.path().join("a.crt");
    Setup {
        agent,
        tls: loopback(tls_port),
        ca,
    }
}

/// What curl got: status, body, the HTTP version it spoke, the body's size.
struct Got {
    status: u16,
    body: String,
    version: String,
    size: u64,
}

/// curl `https://localhost:PORT{path}` with `args` (e.g. `--http2`, `--interface 127.0.0.2`).
fn curl(s: &Setup, path: &str, args: &[&str]) -> Got {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(&s.ca)
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", s.tls.port()))
        .args(["-w", "\n%{http_code} %{http_version} %{size_download}"])
        .args(args)
        .arg(format!("https://localhost:{}{path}", s.tls.port()))
        .output()
        .expect("curl (cargo xtask test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} {path}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, tail) = text.rsplit_once('\n').expect("curl's -w line");
    let mut w = tail.split(' ');
    let (Some(code), Some(version), Some(size)) = (w.next(), w.next(), w.next()) else {
        panic!("curl's -w line: {tail:?}");
    };
    Got {
        status: code.parse().expect("status"),
        body: body.to_string(),
        version: version.to_string(),
        size: size.parse().expect("size"),
    }
}

fn json(g: &Got) -> serde_json::Value {
    serde_json::from_str(&g.body).unwrap_or_else(|e| panic!("{e}: {}", g.body))
}

fn counters(s: &Setup) -> serde_json::Value {
    s.agent.app_json("api.tls")["tls"]["counters"].clone()
}

fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca).expect("CA");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to the front, handshake done, offering `alpn`.
fn connect(s: &Setup, alpn: &[&[u8]]) -> Tls {
    let conn = ClientConnection::new(
        client_config(&s.ca, alpn),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    let sock = TcpStream::connect(s.tls).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut t = StreamOwned::new(conn, sock);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).expect("handshake");
    }
    t
}

/// Everything until the server closes (close_notify or a bare close); how long that took.
fn read_until_closed(t: &mut Tls) -> (Vec<u8>, Duration) {
    let began = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match t.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!(
                    "not closed within 60 s; got {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            Err(_) => break,
        }
    }
    (got, began.elapsed())
}

/// On a dual-stack address an IPv4 client is an IPv4 address: trusted by "127.0.0.3" and
/// forwarded as 127.0.0.2, not as ::ffff:127.0.0.2.
#[test]
fn on_a_dual_stack_address_ipv4_clients_are_ipv4() {
    require_root();
    let s = start_at(
        "http-dual",
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), free_port()),
    );
    let g = curl(&s, "/whoami", &["--interface", "127.0.0.2"]);
    assert_eq!(g.status, 200, "{}", g.body);
    let j = json(&g);
    assert_eq!(j["x_forwarded_for"], "127.0.0.2", "{j}");
    let g = curl(
        &s,
        "/whoami",
        &[
            "--interface",
            "127.0.0.3",
            "-H",
            "X-Forwarded-For: 198.51.100.7",
        ],
    );
    let j = json(&g);
    assert_eq!(j["x_forwarded_for"], "198.51.100.7, 127.0.0.3", "{j}");
}

#[test]
fn the_app_sees_https_and_the_real_client_over_http11_and_http2() {
    require_root();
    let s = start("http-whoami");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        // From 127.0.0.2, an untrusted client that claims another address and scheme.
        let g = curl(
            &s,
            "/whoami",
            &[
                flag,
                "--interface",
                "127.0.0.2",
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                "-H",
                "X-Forwarded-Proto: http",
                "-H",
                "Forwarded: for=6.6.6.6;proto=http",
            ],
        );
        assert_eq!((g.status, g.version.as_str()), (200, version), "{}", g.body);
        let j = json(&g);
        assert_eq!(j["scheme"], "https", "{j}");
        assert_eq!(j["client"], "127.0.0.2", "{j}");
        assert_eq!(j["x_forwarded_for"], "127.0.0.2", "{j}");
        let port = s.tls.port();
        assert_eq!(j["x_forwarded_host"], format!("localhost:{port}"), "{j}");
        assert_eq!(
            j["forwarded"],
            format!("for=127.0.0.2;proto=https;host=\"localhost:{port}\""),
            "{j}"
        );
        assert_eq!(j["url"], format!("https://localhost:{port}/whoami"), "{j}");
        // The workers speak HTTP/1.1 whatever the client spoke.
        assert_eq!(j["http_version"], "1.1", "{j}");

        // From 127.0.0.3, a trusted proxy: its chain is kept and extended.
        let g = curl(
            &s,
            "/whoami",
            &[
                flag,
                "--interface",
                "127.0.0.3",
                "-H",
                "X-Forwarded-For: 198.51.100.7",
            ],
        );
        let j = json(&g);
        assert_eq!(j["x_forwarded_for"], "198.51.100.7, 127.0.0.3", "{j}");
    }
    let c = counters(&s);
    assert!(c["http_requests"].as_u64().unwrap_or(0) >= 4, "{c}");
    // The access log names each request.
    let log = wait_for(Duration::from_secs(10), "the access log", || {
        let l = s.agent.log();
        l.contains("\"GET /whoami HTTP/2.0\" 200").then_some(l)
    });
    assert!(log.contains("\"GET /whoami HTTP/1.1\" 200"), "{log}");
}

#[test]
fn websocket_echo_survives_1000_messages() {
    require_root();
    let s = start("http-ws");
    let script = r#"
import ssl, sys
from websockets.sync.client import connect
ctx = ssl.create_default_context(cafile=sys.argv[2])
with connect(f"wss://127.0.0.1:{sys.argv[1]}/ws", ssl=ctx, server_hostname="localhost") as ws:
    for i in range(1000):
        msg = f"message {i} " + "x" * (i % 300)
        ws.send(msg)
        got = ws.recv(timeout=30)
        assert got == msg, (i, got)
print("echoed 1000")
"#;
    let out = Command::new(venv().join("bin/python"))
        .args(["-c", script])
        .arg(s.tls.port().to_string())
        .arg(&s.ca)
        .output()
        .expect("python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("echoed 1000"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(counters(&s)["http_upgrades"].as_u64().unwrap_or(0) >= 1);
}

#[test]
fn server_sent_events_arrive_as_they_are_sent() {
    require_root();
    let s = start("http-sse");
    for (i, flag) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let release = s.agent.dir.path().join(format!("release-{i}"));
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "60", flag, "--cacert"])
            .arg(&s.ca)
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", s.tls.port()))
            .arg(format!(
                "https://localhost:{}/sse?release={}",
                s.tls.port(),
                release.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // The second event waits for the release file: the first can only be here if nothing
        // between the app and curl held it back.
        let first = lines.next().expect("a line").expect("read");
        assert_eq!(first, "data: first", "{flag}");
        std::fs::write(&release, "").expect("release");
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        assert!(rest.iter().any(|l| l == "data: second"), "{flag}: {rest:?}");
        assert!(child.wait().expect("curl").success());
    }
}

/// The peak resident memory of `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    proc_status(pid)
        .into_iter()
        .find(|(k, _)| k == "VmHWM")
        .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_100_mib_upload_and_download_stream_through_without_the_front_holding_them() {
    require_root();
    let s = start("http-big");
    let fronts = s.agent.wait_ready("api.tls", 2, Duration::from_secs(20));
    const MIB: usize = 100;
    let file = s.agent.dir.path().join("upload.bin");
    let data: Vec<u8> = (0..MIB * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).expect("write the upload");
    let want = ring::digest::digest(&ring::digest::SHA256, &data);
    let want: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    drop(data);
    let upload = format!("@{}", file.display());
    for flag in ["--http1.1", "--http2"] {
        let g = curl(
            &s,
            "/upload",
            &[
                flag,
                "--data-binary",
                &upload,
                "-H",
                "Content-Type: application/octet-stream",
            ],
        );
        assert_eq!(g.status, 200, "{flag}: {}", g.body);
        let j = json(&g);
        assert_eq!(j["bytes"], MIB * 1024 * 1024, "{flag}: {j}");
        assert_eq!(j["sha256"], want.as_str(), "{flag}: {j}");

        let g = curl(
            &s,
            &format!("/download?mib={MIB}"),
            &[flag, "-o", "/dev/null"],
        );
        assert_eq!(g.status, 200, "{flag}");
        assert_eq!(g.size, (MIB * 1024 * 1024) as u64, "{flag}");
    }
    // 400 MiB went through these two processes; what they ever held at once stays small.
    for pid in fronts {
        let peak = peak_rss_kib(pid);
        assert!(
            peak < 48 * 1024,
            "front {pid} peaked at {peak} KiB after 4 x {MIB} MiB"
        );
    }
}

#[test]
fn bad_input_gets_precise_answers_and_the_front_keeps_serving() {
    require_root();
    let s = start("http-bad");

    // Oversized head (16 KiB allowed) and too many fields (50): 431.
    let big = format!("X-Big: {}", "a".repeat(20 * 1024));
    for flag in ["--http1.1", "--http2"] {
        let g = curl(&s, "/whoami", &[flag, "-H", &big]);
        assert_eq!(g.status, 431, "{flag}: {}", g.body);
    }
    let many: Vec<String> = (0..60).map(|i| format!("X-Field-{i}: {i}")).collect();
    let mut args = vec!["--http1.1"];
    for h in &many {
        args.push("-H");
        args.push(h);
    }
    assert_eq!(curl(&s, "/whoami", &args).status, 431);

    // A malformed request: 400.
    let mut t = connect(&s, &[b"http/1.1"]);
    t.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n")
        .expect("write");
    t.flush().expect("flush");
    let (got, _) = read_until_closed(&mut t);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    // hyper's 400 has no body (hyperium/hyper#3225): the reason is in the front's log.
    wait_for(
        Duration::from_secs(10),
        "the malformed request's reason",
        || {
            let l = s.agent.log();
            l.contains("malformed request: invalid HTTP header parsed")
                .then_some(())
        },
    );

    // Slowloris on the head: 20 connections that never finish theirs, while others are
    // served; each is closed by the 2 s header timeout.
    let mut slow: Vec<Tls> = (0..20)
        .map(|_| {
            let mut t = connect(&s, &[b"http/1.1"]);
            t.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n")
                .expect("write");
            t.flush().expect("flush");
            t
        })
        .collect();
    let opened = Instant::now();
    // An idle keep-alive connection, its request answered, goes the same way.
    let mut idle = connect(&s, &[b"http/1.1"]);
    idle.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    idle.flush().expect("flush");
    for flag in ["--http1.1", "--http2"] {
        assert_eq!(curl(&s, "/whoami", &[flag]).status, 200);
    }
    for t in &mut slow {
        let (got, _) = read_until_closed(t);
        assert!(
            got.is_empty() || String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(
        opened.elapsed() >= HEADER_TIMEOUT,
        "closed before the header timeout"
    );
    let (got, _) = read_until_closed(&mut idle);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // Slowloris on the body: 10 of 1000 bytes, then silence; cut by the 3 s body timeout.
    let mut t = connect(&s, &[b"http/1.1"]);
    t.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .expect("write");
    t.flush().expect("flush");
    let (got, took) = read_until_closed(&mut t);
    let got = String::from_utf8_lossy(&got);
    assert!(took >= BODY_TIMEOUT, "cut after {took:?}: {got}");
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 502"), "{got}");

    // An HTTP/2 protocol error (HEADERS on stream 0): GOAWAY with PROTOCOL_ERROR.
    let mut t = connect(&s, &[b"h2"]);
    assert_eq!(t.conn.alpn_protocol(), Some(&b"h2"[..]));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    out.extend_from_slice(&[0, 0, 1, 1, 4, 0, 0, 0, 0, 0x82]); // HEADERS on stream 0
    t.write_all(&out).expect("write");
    t.flush().expect("flush");
    let (got, _) = read_until_closed(&mut t);
    let mut at = 0;
    let mut goaway = None;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let kind = got[at + 3];
        let payload = &got[at + 9..(at + 9 + len).min(got.len())];
        if kind == 7 && payload.len() >= 8 {
            goaway = Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        at += 9 + len;
    }
    assert_eq!(goaway, Some(1), "GOAWAY(PROTOCOL_ERROR) in {got:?}");

    // A worker that does not answer in time: 504; one that dies without answering: 502.
    let g = curl(&s, "/slow?seconds=30", &["--http2"]);
    assert_eq!(g.status, 504, "{}", g.body);
    assert!(g.body.contains("did not answer within"), "{}", g.body);
    assert!(UPSTREAM_TIMEOUT < Duration::from_secs(30));
    let g = curl(&s, "/die", &["--http1.1"]);
    assert_eq!(g.status, 502, "{}", g.body);

    // Through all of it, the front kept serving.
    for flag in ["--http1.1", "--http2"] {
        assert_eq!(curl(&s, "/whoami", &[flag]).status, 200);
    }
    let c = counters(&s);
    assert!(c["http_gateway_timeout"].as_u64().unwrap_or(0) >= 1, "{c}");
    assert!(c["http_bad_gateway"].as_u64().unwrap_or(0) >= 1, "{c}");
}

/// A raw HTTP/1.1 request over TLS (the front closes after it); the response as text.
fn raw_h1(s: &Setup, request: &str) -> String {
    let mut t = connect(s, &[b"http/1.1"]);
    t.write_all(request.as_bytes()).expect("write");
    t.flush().expect("flush");
    String::from_utf8_lossy(&read_until_closed(&mut t).0).into_owned()
}

/// The request's host: HTTP/2's Host must name the `:authority`'s host (RFC 9113 8.3.1), an
/// HTTP/1.1 absolute-form target's authority replaces the Host (RFC 9112 3.2.2), one Host at
/// most; and an HTTP/2 connection left without a stream is closed with a GOAWAY after the idle
/// timeout even while its client answers every ping.
#[test]
fn the_host_is_checked_and_an_idle_http2_connection_is_closed() {
    require_root();
    let s = start("http-host");
    let authority = format!("localhost:{}", s.tls.port());

    let r = raw_h1(
        &s,
        &format!("GET https://{authority}/whoami HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let j: serde_json::Value = serde_json::from_str(&r[r.find("\r\n\r\n").expect("a head") + 4..])
        .unwrap_or_else(|e| panic!("{e}: {r}"));
    assert_eq!(j["host"], authority.as_str(), "{j}");
    assert_eq!(j["x_forwarded_host"], authority.as_str(), "{j}");
    let r = raw_h1(
        &s,
        "GET /whoami HTTP/1.1\r\nHost: localhost\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("more than one Host header"), "{r}");

    let mut t = connect(&s, &[b"h2"]);
    assert_eq!(t.conn.alpn_protocol(), Some(&b"h2"[..]));
    t.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok();
    let get = |stream, host: &str| {
        h2::get(
            stream,
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/whoami"),
                (":authority", &authority),
                ("host", host),
            ],
        )
    };
    let mut out = h2::preface();
    out.extend(get(1, "evil.test"));
    out.extend(get(3, &authority.to_uppercase()));
    t.write_all(&out).expect("write");
    t.flush().expect("flush");
    let sent = Instant::now();
    let (frames, _) = h2::until_closed(&mut t, Duration::from_secs(30));
    let on = |stream: u32, kind: u8| -> Vec<&h2::Frame> {
        frames
            .iter()
            .filter(|f| f.stream == stream && f.kind == kind)
            .collect()
    };
    let status = |stream| on(stream, h2::HEADERS).first().and_then(|f| h2::status(f));
    assert_eq!(status(1), Some(400), "{frames:?}");
    let body: Vec<u8> = on(1, h2::DATA)
        .iter()
        .flat_map(|f| f.payload.clone())
        .collect();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("another host than :authority"), "{body}");
    assert_eq!(status(3), Some(200), "{frames:?}");
    let goaway = frames.iter().find_map(h2::Frame::goaway_code);
    assert_eq!(goaway, Some(0), "GOAWAY(NO_ERROR) in {frames:?}");
    assert!(
        sent.elapsed() >= HEADER_TIMEOUT,
        "closed before the idle timeout"
    );
}

/// SIGTERM: an HTTP/2 connection without a request in flight gets its GOAWAY and is closed at
/// once, not held until the front's stop timeout (30 s) while the front process waits for it.
#[test]
fn sigterm_closes_an_idle_http2_connection_at_once() {
    require_root();
    // A long header (and idle) timeout, so that only the drain can close the connection.
    let s = start_full(
        "http-drain",
        loopback(free_port()),
        Duration::from_secs(60),
        "pool",
    );
    let fronts = s.agent.wait_ready("api.tls", 2, Duration::from_secs(20));
    let mut t = connect(&s, &[b"h2"]);
    t.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok();
    t.write_all(&h2::preface()).expect("write");
    t.flush().expect("flush");
    // The connection is served (its SETTINGS came) before the signal.
    let mut head = [0u8; 9];
    t.sock.set_read_timeout(Some(Duration::from_secs(20))).ok();
    t.read_exact(&mut head).expect("the server's SETTINGS");
    assert_eq!(head[3], h2::SETTINGS);
    let mut rest = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
    t.read_exact(&mut rest).expect("the server's SETTINGS");
    t.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok();
    for pid in &fronts {
        // SAFETY: kill(2) on a front process this test's agent started.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let (frames, took) = h2::until_closed(&mut t, Duration::from_secs(20));
    let goaway = frames.iter().find_map(h2::Frame::goaway_code);
    assert_eq!(goaway, Some(0), "GOAWAY(NO_ERROR) in {frames:?}");
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
}
