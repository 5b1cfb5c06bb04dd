//! `cargo xtask bench tls`: the TLS front against nginx terminating TLS in front of the same
//! demo workers, with the same certificate (ECDSA P-256) and TLS 1.3. Runs on the host
//! (userspace rustls vs nginx) and in the VM (kTLS + splice vs userspace vs nginx). Ignored in
//! normal test runs; xtask runs it with `--ignored --nocapture`.
//!
//! Three loads, each a closed loop of CLIENTS threads for ROUND, the variants interleaved
//! round by round (a b c, c b a, ...):
//!   handshakes: a new connection per request (full handshake, no resumption), GET /healthz;
//!   requests:   one keep-alive connection per thread, GET /?bytes=100 back to back;
//!   1 MiB:      one keep-alive connection per thread, GET /?bytes=1048576 back to back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_tests::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const CLIENTS: usize = 4;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn client_config(ca_pem: &str) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    // Every connection a full handshake.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let conn = ClientConnection::new(cfg.clone(), ServerName::try_from("a.test").expect("name"))
        .map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(StreamOwned::new(conn, sock))
}

/// One keep-alive request; returns the body length.
fn request(r: &mut BufReader<Tls>, path: &str, close: bool) -> std::io::Result<u64> {
    let conn = if close { "close" } else { "keep-alive" };
    write!(
        r.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: {conn}\r\n\r\n"
    )?;
    r.get_mut().flush()?;
    let mut len = 0u64;
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status: {line:?}")));
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut left = len;
    let mut buf = [0u8; 64 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(len)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    Handshakes,
    Requests,
    MiB,
}

/// (operations, bytes, errors) of CLIENTS threads for `round`.
fn run_load(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    load: Load,
    round: Duration,
) -> (u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, ops, bytes, errors, cfg) = (
                stop.clone(),
                ops.clone(),
                bytes.clone(),
                errors.clone(),
                cfg.clone(),
            );
            std::thread::spawn(move || {
                let mut keep: Option<BufReader<Tls>> = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = match load {
                        Load::Handshakes => connect(addr, &cfg)
                            .and_then(|t| request(&mut BufReader::new(t), "/healthz", true)),
                        Load::Requests | Load::MiB => {
                            if keep.is_none() {
                                keep = connect(addr, &cfg).ok().map(BufReader::new);
                            }
                            let path = if load == Load::MiB {
                                "/?bytes=1048576"
                            } else {
                                "/?bytes=100"
                            };
                            match keep.as_mut() {
                                Some(k) => request(k, path, false),
                                None => Err(std::io::Error::other("connect")),
                            }
                        }
                    };
                    match r {
                        Ok(n) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            keep = None;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(round);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    (
        ops.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    )
}

/// utime + stime of a process, in clock ticks (0 if it is gone).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// The children of `parent` (nginx's workers).
fn children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// One round of one load on one variant: ops/s, MB/s, errors, TLS-side CPU seconds per op.
type Round = (f64, f64, u64, f64);

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(dir: &std::path::Path, port: u16, upstream: SocketAddr) -> Nginx {
    let nginx = std::env::var("CORRAL_NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes auto;
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
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/a.crt;
        ssl_certificate_key {d}/a.key;
        ssl_protocols TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
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
        .unwrap_or_else(|e| panic!("{nginx}: {e} (cargo xtask bench tls fetches it)"));
    let guard = Nginx(child);
    wait_for(Duration::from_secs(20), "nginx listening", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    guard
}

#[test]
#[ignore = "benchmark: cargo xtask bench tls"]
fn tls_bench() {
    require_root();
    let in_vm = std::env::var("CORRAL_VM").as_deref() == Ok("1");
    let round = env_secs("CORRAL_BENCH_ROUND", 3);
    let rounds = env_secs("CORRAL_BENCH_ROUNDS", 4).as_secs() as usize;
    let (cert, key) = tls::self_signed(&["a.test"]);
    let (ku, kk, kn, tu, tk) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    // Two apps of two demo workers each: `u` fronted by userspace rustls (ktls = "off"), `k`
    // by kTLS where the kernel has it; nginx proxies to u's workers.
    let apps = format!(
        r#"
[app.u]
command = ["@DEMO@"]
user = "nobody"
[app.u.listen]
address = "127.0.0.1:{ku}"
[app.u.workers]
count = 2
[app.u.tls]
address = "127.0.0.1:{tu}"
cert = "@DIR@/a.crt"
key = "@DIR@/a.key"
ktls = "off"
processes = 2

[app.k]
command = ["@DEMO@"]
user = "nobody"
[app.k.listen]
address = "127.0.0.1:{kk}"
[app.k.workers]
count = 2
[app.k.tls]
address = "127.0.0.1:{tk}"
cert = "@DIR@/a.crt"
key = "@DIR@/a.key"
ktls = "auto"
processes = 2
"#
    );
    let (c2, k2) = (cert.clone(), key.clone());
    let agent = Agent::start_with("tls-bench", &apps, move |dir| {
        std::fs::write(dir.path().join("a.crt"), &c2).expect("cert");
        std::fs::write(dir.path().join("a.key"), &k2).expect("key");
    });
    for app in ["u", "k", "u.tls", "k.tls"] {
        agent.wait_ready(app, 2, Duration::from_secs(60));
    }
    let nginx = start_nginx(agent.dir.path(), kn, SocketAddr::from(([127, 0, 0, 1], ku)));
    let nginx_pid = nginx.0.id() as i32;
    let front_pids = |app: &str| -> Vec<i32> {
        agent
            .app(app)
            .workers
            .iter()
            .filter_map(|w| w.pid)
            .collect()
    };
    let cfg = client_config(&cert);
    let ktls_on = agent.log().contains("TLS1.3 AES-256-GCM: tx+rx")
        || agent.log().contains("TLS1.3 AES-128-GCM: tx+rx");
    let mut variants: Vec<(&str, SocketAddr, Vec<i32>)> = Vec::new();
    if ktls_on {
        variants.push((
            "corral kTLS + splice",
            SocketAddr::from(([127, 0, 0, 1], tk)),
            front_pids("k.tls"),
        ));
    }
    variants.push((
        "corral userspace rustls",
        SocketAddr::from(([127, 0, 0, 1], tu)),
        front_pids("u.tls"),
    ));
    let mut nginx_pids = children(nginx_pid);
    nginx_pids.push(nginx_pid);
    variants.push((
        "nginx 1.22 (OpenSSL 3)",
        SocketAddr::from(([127, 0, 0, 1], kn)),
        nginx_pids,
    ));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Warm-up: every variant, every load, once briefly.
    for (name, addr, _) in &variants {
        for load in [Load::Handshakes, Load::Requests, Load::MiB] {
            let r = run_load(*addr, &cfg, load, Duration::from_millis(500));
            eprintln!("bench tls: warm-up {load:?} {name}: {r:?}");
        }
    }
    // results[(load, variant)] = per-round (ops/s, MB/s, errors, TLS-side CPU seconds per op)
    let mut results: BTreeMap<(Load, usize), Vec<Round>> = BTreeMap::new();
    for r in 0..rounds {
        for load in [Load::Handshakes, Load::Requests, Load::MiB] {
            let order: Vec<usize> = if r % 2 == 0 {
                (0..variants.len()).collect()
            } else {
                (0..variants.len()).rev().collect()
            };
            for v in order {
                let cpu = |pids: &[i32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
                let cpu0 = cpu(&variants[v].2);
                let t = Instant::now();
                let (ops, bytes, errors) = run_load(variants[v].1, &cfg, load, round);
                let secs = t.elapsed().as_secs_f64();
                let cpu_s = (cpu(&variants[v].2) - cpu0) as f64 / hz;
                eprintln!(
                    "bench tls: round {} {load:?} {}: {ops} in {secs:.1} s, {errors} errors",
                    r + 1,
                    variants[v].0
                );
                results.entry((load, v)).or_default().push((
                    ops as f64 / secs,
                    bytes as f64 / secs / 1e6,
                    errors,
                    cpu_s / ops.max(1) as f64,
                ));
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[v.len() / 2]
    };
    println!(
        "\nbench tls ({}): {CLIENTS} closed-loop client threads, {rounds} rounds of {} s per \
         load and variant, interleaved; TLS 1.3, ECDSA P-256, no resumption; 2 demo workers",
        if in_vm { "VM" } else { "host" },
        round.as_secs()
    );
    println!("| variant | handshakes/s | requests/s (100 B) | 1 MiB responses: MB/s | errors |");
    println!("| --- | --- | --- | --- | --- |");
    let mut med: BTreeMap<(Load, usize), f64> = BTreeMap::new();
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let get = |l: Load, mb: bool| {
            median(
                results[&(l, i)]
                    .iter()
                    .map(|r| if mb { r.1 } else { r.0 })
                    .collect(),
            )
        };
        let (h, q, m) = (
            get(Load::Handshakes, false),
            get(Load::Requests, false),
            get(Load::MiB, true),
        );
        med.insert((Load::Handshakes, i), h);
        med.insert((Load::Requests, i), q);
        med.insert((Load::MiB, i), m);
        let errors: u64 = [Load::Handshakes, Load::Requests, Load::MiB]
            .iter()
            .map(|l| results[&(*l, i)].iter().map(|r| r.2).sum::<u64>())
            .sum();
        println!("| {name} | {h:.0} | {q:.0} | {m:.1} | {errors} |");
    }
    let n = variants.len() - 1; // nginx
    let best = |l: Load| (0..n).map(|i| med[&(l, i)]).fold(0.0, f64::max);
    println!(
        "\nhandshakes/s corral (best path) / nginx: {:.2} (target >= 1.0)",
        best(Load::Handshakes) / med[&(Load::Handshakes, n)]
    );
    println!(
        "requests/s corral (best path) / nginx: {:.2}",
        best(Load::Requests) / med[&(Load::Requests, n)]
    );
    if ktls_on {
        println!(
            "1 MiB throughput kTLS + splice / userspace rustls: {:.2} (target >= 1.3)",
            med[&(Load::MiB, 0)] / med[&(Load::MiB, 1)]
        );
    }
    println!(
        "\nCPU of the TLS side (corral's front processes / nginx's master and workers), \
         median of rounds:"
    );
    println!("| variant | per handshake | per request (100 B) | per 1 MiB response |");
    println!("| --- | --- | --- | --- |");
    let mut cpu_med: BTreeMap<(Load, usize), f64> = BTreeMap::new();
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let c = |l: Load| median(results[&(l, i)].iter().map(|r| r.3).collect());
        let (h, q, m) = (c(Load::Handshakes), c(Load::Requests), c(Load::MiB));
        cpu_med.insert((Load::Handshakes, i), h);
        cpu_med.insert((Load::Requests, i), q);
        cpu_med.insert((Load::MiB, i), m);
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.2} ms |",
            h * 1e6,
            q * 1e6,
            m * 1e3
        );
    }
    if ktls_on {
        println!(
            "TLS-side CPU per 1 MiB response, userspace rustls / kTLS + splice: {:.2}",
            cpu_med[&(Load::MiB, 1)] / cpu_med[&(Load::MiB, 0)]
        );
    }
    for (i, (name, _, _)) in variants.iter().enumerate() {
        for l in [Load::Handshakes, Load::Requests, Load::MiB] {
            let per: Vec<String> = results[&(l, i)]
                .iter()
                .map(|r| format!("{:.0}", if l == Load::MiB { r.1 } else { r.0 }))
                .collect();
            println!("  rounds {name} {l:?}: {}", per.join(" "));
        }
    }
    let st = agent.app_json("k.tls");
    println!("  k.tls counters: {}", st["tls"]["counters"]);
}
