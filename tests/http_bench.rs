//! `cargo xtask bench http`: the HTTP front (`proxy = "http"`) against nginx and Caddy, each
//! terminating TLS 1.3 with the same certificate (ECDSA P-256) in front of the same two demo
//! workers (corral's steered socket), driven by h2load over HTTP/1.1 and HTTP/2. Ignored in
//! normal test runs; xtask runs it with `--ignored --nocapture`.
//!
//! Per variant and load: requests/s, p50 and p99 latency (from h2load's per-request log),
//! failed requests, and the CPU the TLS side spent per request (its processes' utime + stime
//! over the round). corral runs twice: `upstream = "pool"` (app b, whose workers nginx and
//! Caddy proxy to as well) and `upstream = "connect"` (app c). Then one slow worker of four
//! (apps sp and sc): a closed loop of keep-alive clients, the share of requests the slow
//! worker answered (its `X-Worker`) and p99, pool against connect.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use corral_tests::*;

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime and stime of a process, in clock ticks (0 if it is gone).
fn cpu_ticks(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (n(11), n(12))
}

/// The summed utime and stime of `pids`.
fn cpu_of(pids: &[i32]) -> (u64, u64) {
    pids.iter()
        .map(|p| cpu_ticks(*p))
        .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps))
}

/// Every descendant of `root` (nginx's workers, caddy itself has none).
fn with_children(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(root) {
            out.push(pid);
        }
    }
    out
}

fn wait_listening(port: u16, what: &str) {
    wait_for(Duration::from_secs(30), what, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

fn start_nginx(dir: &Path, port: u16, upstream: SocketAddr) -> ChildGuard {
    let nginx = std::env::var("CORRAL_NGINX").expect("CORRAL_NGINX (cargo xtask bench http)");
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx/body;
    proxy_temp_path {d}/nginx/proxy;
    fastcgi_temp_path {d}/nginx/fastcgi;
    uwsgi_temp_path {d}/nginx/uwsgi;
    scgi_temp_path {d}/nginx/scgi;
    upstream workers {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/a.crt;
        ssl_certificate_key {d}/a.key;
        ssl_protocols TLSv1.3;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let child = Command::new(&nginx)
        .args(["-e", "stderr", "-p"])
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{nginx}: {e}"));
    // SIGTERM, not SIGKILL: nginx's master stops its workers then (killed, it left them
    // running, orphaned, after every benchmark).
    let guard = ChildGuard::with_grace(child, Duration::from_secs(5));
    wait_listening(port, "nginx listening");
    guard
}

fn start_caddy(dir: &Path, port: u16, upstream: SocketAddr) -> ChildGuard {
    let caddy = std::env::var("CORRAL_CADDY").expect("CORRAL_CADDY (cargo xtask bench http)");
    let d = dir.display();
    // Caddy adds X-Forwarded-For/-Proto/-Host itself; no access log unless asked.
    let conf = format!(
        r#"{{
    admin off
    auto_https off
    default_sni localhost
}}
https://:{port} {{
    bind 127.0.0.1
    tls {d}/a.crt {d}/a.key {{
        protocols tls1.3
    }}
    reverse_proxy {upstream}
}}
"#
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, conf).expect("Caddyfile");
    let home = dir.join("caddy-home");
    std::fs::create_dir_all(&home).expect("caddy home");
    let child = Command::new(&caddy)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        // Both cores, as nginx's two workers and corral's two fronts.
        .env("GOMAXPROCS", "2")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("caddy.log")).expect("caddy.log"))
        .spawn()
        .unwrap_or_else(|e| panic!("{caddy}: {e}"));
    let guard = ChildGuard::new(child);
    wait_listening(port, "caddy listening");
    guard
}

struct Load {
    name: &'static str,
    h2: bool,
    path: &'static str,
    clients: u32,
    streams: u32,
}

const LOADS: &[Load] = &[
    Load {
        name: "h1 100 B",
        h2: false,
        path: "/?bytes=100",
        clients: 32,
        streams: 1,
    },
    Load {
        name: "h2 100 B",
        h2: true,
        path: "/?bytes=100",
        clients: 8,
        streams: 8,
    },
    Load {
        name: "h1 1 MiB",
        h2: false,
        path: "/?bytes=1048576",
        clients: 8,
        streams: 1,
    },
    Load {
        name: "h2 1 MiB",
        h2: true,
        path: "/?bytes=1048576",
        clients: 4,
        streams: 2,
    },
];

struct Result {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    cpu_us_per_req: f64,
    /// Of which in the kernel (stime).
    sys_us_per_req: f64,
}

/// The loads to run: `CORRAL_BENCH_LOADS`, a comma-separated list of load names' first words
/// joined by `-` (`h1-100`, `h2-100`, `h1-1`, `h2-1`), all by default.
fn selected_loads() -> Vec<&'static Load> {
    let Ok(list) = std::env::var("CORRAL_BENCH_LOADS") else {
        return LOADS.iter().collect();
    };
    let key = |l: &Load| {
        let mut w = l.name.split(' ');
        format!("{}-{}", w.next().unwrap_or(""), w.next().unwrap_or(""))
    };
    let loads: Vec<&Load> = LOADS
        .iter()
        .filter(|l| list.split(',').any(|k| k.trim() == key(l)))
        .collect();
    assert!(
        !loads.is_empty(),
        "CORRAL_BENCH_LOADS={list:?} names no load (h1-100, h2-100, h1-1, h2-1)"
    );
    loads
}

/// One h2load round; the variant's processes' CPU over it.
fn h2load(dir: &Path, port: u16, load: &Load, pids: &[i32], secs: u64) -> Result {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let before = cpu_of(pids);
    let mut cmd = Command::new("h2load");
    cmd.args(["-t", "1", "--warm-up-time", "1", "-D"])
        .arg(secs.to_string())
        .arg("-c")
        .arg(load.clients.to_string())
        .arg("-m")
        .arg(load.streams.to_string())
        .arg("--log-file")
        .arg(&log);
    if !load.h2 {
        cmd.arg("--h1");
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{}", load.path))
        .output()
        .expect("h2load (cargo xtask bench http installs nghttp2-client)");
    let after = cpu_of(pids);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load: {text}");
    // "finished in 5.00s, 1234.56 req/s, ..." and "requests: N total, N started, N done,
    // N succeeded, N failed, N errored, N timeout"
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no req/s in {text}"));
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .and_then(|l| {
                l.split(", ")
                    .find_map(|p| p.strip_suffix(name))
                    .and_then(|v| v.trim().split(' ').next()?.parse().ok())
            })
            .unwrap_or(0)
    };
    let done = field(" succeeded").max(1);
    let failed = field(" failed") + field(" errored") + field(" timeout");
    // The log: start time, status, duration (µs), one request a line.
    let mut lat: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Result {
        rps,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        failed,
        cpu_us_per_req: ((after.0 + after.1) - (before.0 + before.1)) as f64 / hz * 1e6
            / done as f64,
        sys_us_per_req: (after.1 - before.1) as f64 / hz * 1e6 / done as f64,
    }
}

#[test]
#[ignore = "benchmark: cargo xtask bench http"]
fn http_bench() {
    require_root();
    let secs = env_secs("CORRAL_BENCH_ROUND", 5);
    let rounds = env_secs("CORRAL_BENCH_ROUNDS", 2);
    // 0: no slow-worker phase.
    let slow_secs = env_secs("CORRAL_BENCH_SLOW_ROUND", 8);
    let loads = selected_loads();
    let ports: Vec<u16> = (0..10).map(|_| free_port()).collect();
    let (app_port, front_port, nginx_port, caddy_port) = (ports[0], ports[1], ports[2], ports[3]);
    let fronted = |app: App, port: u16, upstream: &str| {
        app.tls("address", loopback(port))
            .tls("cert", "@DIR@/a.crt")
            .tls("key", "@DIR@/a.key")
            .tls("processes", 2)
            .tls("upstream", upstream)
    };
    // b: the pool (nginx and Caddy proxy to b's workers too); c: a connection per request.
    // sp and sc: four workers, one of them slow, behind each way.
    let slow_app = |name: &str, port: u16| {
        App::new(name)
            .command([
                "/bin/sh",
                "-c",
                format!("{SLOW_WORKER} exec @DEMO@").as_str(),
            ])
            .user("nobody")
            .set("group", "nogroup")
            .set("workdir", "/tmp")
            .address(loopback(port))
            .count(4)
            .workers("stop_timeout", "5s")
    };
    // CORRAL_BENCH_DEMO_THREADS: the b and c workers' threads (the demo's default is 16, each
    // serving one connection at a time: fewer than the proxies' pooled connections can hold).
    let threaded = |app: App| match std::env::var("CORRAL_BENCH_DEMO_THREADS") {
        Ok(t) => app.env("DEMO_THREADS", t),
        Err(_) => app,
    };
    let apps = format!(
        "{}{}{}{}",
        fronted(
            threaded(demo_app("b", loopback(app_port), 2)),
            front_port,
            "pool"
        ),
        fronted(
            threaded(demo_app("c", loopback(ports[4]), 2)),
            ports[5],
            "connect"
        ),
        fronted(slow_app("sp", ports[6]), ports[7], "pool"),
        fronted(slow_app("sc", ports[8]), ports[9], "connect"),
    );
    let agent = Agent::start_with("http-bench", apps, |dir| {
        let (cert, key) = tls::self_signed(&["localhost"]);
        tls::write_cert(dir.path(), &cert, &key);
    });
    for (app, n) in [("b", 2), ("c", 2), ("sp", 4), ("sc", 4)] {
        agent.wait_ready(app, n, Duration::from_secs(30));
    }
    let fronts = agent.wait_ready("b.tls", 2, Duration::from_secs(20));
    let fronts_c = agent.wait_ready("c.tls", 2, Duration::from_secs(20));
    agent.wait_ready("sp.tls", 2, Duration::from_secs(20));
    agent.wait_ready("sc.tls", 2, Duration::from_secs(20));
    let dir = agent.dir.path().to_path_buf();
    let nginx = start_nginx(&dir, nginx_port, loopback(app_port));
    let caddy = start_caddy(&dir, caddy_port, loopback(app_port));
    let variants: Vec<(&str, u16, Vec<i32>)> = vec![
        ("corral, upstream = \"pool\"", front_port, fronts),
        ("corral, upstream = \"connect\"", ports[5], fronts_c),
        ("nginx 1.22", nginx_port, with_children(nginx.pid())),
        ("Caddy 2.6", caddy_port, with_children(caddy.pid())),
    ];
    // Interleaved round by round (a b c, c b a, ...): the median of each.
    let mut results: Vec<Vec<Vec<Result>>> = variants
        .iter()
        .map(|_| loads.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        for (li, load) in loads.iter().enumerate() {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..variants.len()).collect()
            } else {
                (0..variants.len()).rev().collect()
            };
            for vi in order {
                let (_, port, pids) = &variants[vi];
                let r = h2load(&dir, *port, load, pids, secs);
                // Each round's numbers (stderr): the spread behind the medians.
                eprintln!(
                    "round {round} {} {}: {:.0} req/s, p99 {:.2} ms, {:.1} µs CPU/request ({:.1} user)",
                    load.name,
                    variants[vi].0,
                    r.rps,
                    r.p99_ms,
                    r.cpu_us_per_req,
                    r.cpu_us_per_req - r.sys_us_per_req
                );
                results[vi][li].push(r);
            }
        }
    }
    println!(
        "\nbench http: h2load -t 1, {rounds} rounds of {secs} s (+1 s warm-up) per variant and \
         load, medians; 2 demo workers behind each; TLS 1.3, ECDSA P-256"
    );
    println!(
        "| load | server | requests/s | p50 ms | p99 ms | failed | CPU µs/request | of which kernel |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    for (li, load) in loads.iter().enumerate() {
        for (vi, (name, _, _)) in variants.iter().enumerate() {
            let rs = &results[vi][li];
            let m = |f: fn(&Result) -> f64| median(&mut rs.iter().map(f).collect());
            println!(
                "| {} | {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.0} |",
                load.name,
                m(|r| r.rps),
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                rs.iter().map(|r| r.failed).sum::<u64>(),
                m(|r| r.cpu_us_per_req),
                m(|r| r.sys_us_per_req),
            );
        }
    }

    if slow_secs == 0 {
        return;
    }
    // One slow worker of four: the share it gets and what it does to p99, pool vs connect,
    // interleaved (sp sc sc sp ...), medians.
    let ca = std::fs::read_to_string(dir.join("a.crt")).expect("the CA");
    let slow_variants = [
        ("upstream = \"pool\"", ports[7]),
        ("upstream = \"connect\"", ports[9]),
    ];
    let mut slow_results: Vec<Vec<SlowResult>> = slow_variants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for vi in order {
            let r = closed_loop(loopback(slow_variants[vi].1), &ca, SLOW_CLIENTS, slow_secs);
            slow_results[vi].push(r);
        }
    }
    println!(
        "\nbench http, one slow worker: 4 demo workers, worker 3 answers after {SLOW_MS} ms, the \
         others at once; {SLOW_CLIENTS} keep-alive HTTP/1.1 clients in a closed loop, GET \
         /?bytes=100, {rounds} rounds of {slow_secs} s per variant, medians"
    );
    println!("| upstream | requests/s | p50 ms | p99 ms | errors | slow worker's share |");
    println!("|---|---|---|---|---|---|");
    for (vi, (name, _)) in slow_variants.iter().enumerate() {
        let rs = &slow_results[vi];
        let m = |f: fn(&SlowResult) -> f64| median(&mut rs.iter().map(f).collect());
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.3} |",
            m(|r| r.rps),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            rs.iter().map(|r| r.errors).sum::<u64>(),
            m(|r| r.slow_share),
        );
    }
    drop(caddy);
    drop(nginx);
}

/// Worker 3 of 4 answers every request after [`SLOW_MS`].
const SLOW_MS: u64 = 20;
/// (The shell prefix of the slow app's workers: keep it in step with [`SLOW_MS`].)
const SLOW_WORKER: &str = "if [ $CORRAL_WORKER = 3 ]; then export DEMO_DELAY_MS=20; fi;";
const SLOW_CLIENTS: usize = 16;

struct SlowResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    slow_share: f64,
}

/// `clients` keep-alive HTTP/1.1 connections over TLS, each sending its next request when the
/// last is answered, for `secs`: latency per request and the worker of each (X-Worker).
fn closed_loop(addr: SocketAddr, ca: &str, clients: usize, secs: u64) -> SlowResult {
    use std::io::{Read, Write};
    let config = tls::client_config(ca, tls::Tls::V13);
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let config = config.clone();
            std::thread::spawn(move || {
                let (mut lat, mut slow, mut errors) = (Vec::new(), 0u64, 0u64);
                let mut conn: Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> =
                    None;
                while std::time::Instant::now() < until {
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => {
                            let c = rustls::ClientConnection::new(
                                config.clone(),
                                "localhost".try_into().expect("name"),
                            )
                            .expect("client");
                            let Ok(sock) = TcpStream::connect(addr) else {
                                errors += 1;
                                continue;
                            };
                            sock.set_nodelay(true).ok();
                            sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
                            conn.insert(rustls::StreamOwned::new(c, sock))
                        }
                    };
                    let began = std::time::Instant::now();
                    let got = (|| -> std::io::Result<bool> {
                        s.write_all(b"GET /?bytes=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
                        s.flush()?;
                        let mut buf = Vec::with_capacity(512);
                        let mut b = [0u8; 512];
                        let head_end = loop {
                            let n = s.read(&mut b)?;
                            if n == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            buf.extend_from_slice(&b[..n]);
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let field = |name: &str| {
                            head.lines()
                                .find_map(|l| l.strip_prefix(name))
                                .map(|v| v.trim().to_string())
                        };
                        let len: usize = field("content-length:")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let n = s.read(&mut b)?;
                            if n == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            buf.extend_from_slice(&b[..n]);
                        }
                        let slow = field("x-worker:").as_deref() == Some("3");
                        if !head.starts_with("http/1.1 200") {
                            return Err(std::io::ErrorKind::InvalidData.into());
                        }
                        Ok(slow)
                    })();
                    match got {
                        Ok(is_slow) => {
                            lat.push(began.elapsed().as_micros() as u64);
                            slow += is_slow as u64;
                        }
                        Err(_) => {
                            errors += 1;
                            conn = None;
                        }
                    }
                }
                (lat, slow, errors)
            })
        })
        .collect();
    let (mut lat, mut slow, mut errors) = (Vec::new(), 0, 0);
    for t in threads {
        let (l, s, e) = t.join().expect("client thread");
        lat.extend(l);
        slow += s;
        errors += e;
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    SlowResult {
        rps: lat.len() as f64 / secs as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        errors,
        slow_share: slow as f64 / lat.len().max(1) as f64,
    }
}
