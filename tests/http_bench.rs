//! `cargo xtask bench http`: the HTTP front (`proxy = "http"`) against nginx and Caddy, each
//! terminating TLS 1.3 with the same certificate (ECDSA P-256) in front of the same two demo
//! workers (corral's steered socket), driven by h2load over HTTP/1.1 and HTTP/2. Ignored in
//! normal test runs; xtask runs it with `--ignored --nocapture`.
//!
//! Per variant and load: requests/s, p50 and p99 latency (from h2load's per-request log),
//! failed requests, and the CPU the TLS side spent per request (its processes' utime + stime
//! over the round).

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

/// utime + stime of a process, in clock ticks (0 if it is gone).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
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
    let guard = ChildGuard::new(child);
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
}

/// One h2load round; the variant's processes' CPU over it.
fn h2load(dir: &Path, port: u16, load: &Load, pids: &[i32], secs: u64) -> Result {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
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
    let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
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
        cpu_us_per_req: (after - before) as f64 / hz * 1e6 / done as f64,
    }
}

#[test]
#[ignore = "benchmark: cargo xtask bench http"]
fn http_bench() {
    require_root();
    let secs = env_secs("CORRAL_BENCH_ROUND", 5);
    let rounds = env_secs("CORRAL_BENCH_ROUNDS", 2);
    let (app_port, front_port, nginx_port, caddy_port) =
        (free_port(), free_port(), free_port(), free_port());
    let app = demo_app("b", loopback(app_port), 2)
        .tls("address", loopback(front_port))
        .tls("cert", "@DIR@/a.crt")
        .tls("key", "@DIR@/a.key")
        .tls("processes", 2);
    let agent = Agent::start_with("http-bench", app, |dir| {
        let (cert, key) = tls::self_signed(&["localhost"]);
        tls::write_cert(dir.path(), &cert, &key);
    });
    agent.wait_ready("b", 2, Duration::from_secs(20));
    let fronts = agent.wait_ready("b.tls", 2, Duration::from_secs(20));
    let dir = agent.dir.path().to_path_buf();
    let nginx = start_nginx(&dir, nginx_port, loopback(app_port));
    let caddy = start_caddy(&dir, caddy_port, loopback(app_port));
    let variants: Vec<(&str, u16, Vec<i32>)> = vec![
        ("corral (proxy = \"http\")", front_port, fronts),
        ("nginx 1.22", nginx_port, with_children(nginx.pid())),
        ("Caddy 2.6", caddy_port, with_children(caddy.pid())),
    ];
    // Interleaved round by round (a b c, c b a, ...): the median of each.
    let mut results: Vec<Vec<Vec<Result>>> = variants
        .iter()
        .map(|_| LOADS.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        for (li, load) in LOADS.iter().enumerate() {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..variants.len()).collect()
            } else {
                (0..variants.len()).rev().collect()
            };
            for vi in order {
                let (_, port, pids) = &variants[vi];
                let r = h2load(&dir, *port, load, pids, secs);
                results[vi][li].push(r);
            }
        }
    }
    println!(
        "\nbench http: h2load -t 1, {rounds} rounds of {secs} s (+1 s warm-up) per variant and \
         load, medians; 2 demo workers behind each; TLS 1.3, ECDSA P-256"
    );
    println!("| load | server | requests/s | p50 ms | p99 ms | failed | CPU µs/request |");
    println!("|---|---|---|---|---|---|---|");
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    };
    for (li, load) in LOADS.iter().enumerate() {
        for (vi, (name, _, _)) in variants.iter().enumerate() {
            let rs = &results[vi][li];
            let m = |f: fn(&Result) -> f64| median(&mut rs.iter().map(f).collect());
            println!(
                "| {} | {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} |",
                load.name,
                m(|r| r.rps),
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                rs.iter().map(|r| r.failed).sum::<u64>(),
                m(|r| r.cpu_us_per_req),
            );
        }
    }
    drop(caddy);
    drop(nginx);
}
