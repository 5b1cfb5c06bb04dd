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
use std::process::{Command, Stdio};
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

/// The loads to run: `CORRAL_BENCH_LOADS` (handshakes,requests,mib), all by default.
fn selected_loads() -> Vec<Load> {
    let all = [Load::Handshakes, Load::Requests, Load::MiB];
    let Ok(list) = std::env::var("CORRAL_BENCH_LOADS") else {
        return all.to_vec();
    };
    let loads: Vec<Load> = all
        .into_iter()
        .filter(|l| list.split(',').any(|w| w == l.name()))
        .collect();
    assert!(
        !loads.is_empty(),
        "CORRAL_BENCH_LOADS={list:?} names no load"
    );
    loads
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    Handshakes,
    Requests,
    MiB,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Handshakes => "handshakes",
            Load::Requests => "requests",
            Load::MiB => "mib",
        }
    }
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

fn start_nginx(dir: &std::path::Path, port: u16, upstream: SocketAddr) -> ChildGuard {
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
    // SIGTERM, not SIGKILL: nginx's master stops its workers then (killed, it left them
    // running, orphaned, after every benchmark).
    let guard = ChildGuard::with_grace(child, Duration::from_secs(5));
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
    let loads = selected_loads();
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
        "{}{}",
        tls::fronted_demo_app("u", ku, tu).tls("ktls", "off"),
        tls::fronted_demo_app("k", kk, tk).tls("ktls", "auto")
    );
    let agent = Agent::start_with("tls-bench", apps, |dir| {
        tls::write_cert(dir.path(), &cert, &key)
    });
    for app in ["u", "k", "u.tls", "k.tls"] {
        agent.wait_ready(app, 2, Duration::from_secs(60));
    }
    let nginx = start_nginx(agent.dir.path(), kn, loopback(ku));
    let nginx_pid = nginx.pid();
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
        variants.push(("corral kTLS + splice", loopback(tk), front_pids("k.tls")));
    }
    variants.push(("corral userspace rustls", loopback(tu), front_pids("u.tls")));
    let mut nginx_pids = children(nginx_pid);
    nginx_pids.push(nginx_pid);
    variants.push(("nginx 1.22 (OpenSSL 3)", loopback(kn), nginx_pids));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Warm-up: every variant, every load, once briefly.
    for (name, addr, _) in &variants {
        for &load in &loads {
            let r = run_load(*addr, &cfg, load, Duration::from_millis(500));
            eprintln!("bench tls: warm-up {load:?} {name}: {r:?}");
        }
    }
    // results[(load, variant)] = per-round (ops/s, MB/s, errors, TLS-side CPU seconds per op)
    let mut results: BTreeMap<(Load, usize), Vec<Round>> = BTreeMap::new();
    for r in 0..rounds {
        for &load in &loads {
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
    // Medians of rounds per (load, variant): the load's rate (ops/s, or MB/s for 1 MiB) and
    // the TLS side's CPU seconds per operation.
    let mut rate: BTreeMap<(Load, usize), f64> = BTreeMap::new();
    let mut cpu: BTreeMap<(Load, usize), f64> = BTreeMap::new();
    for ((l, i), rs) in &results {
        let mb = *l == Load::MiB;
        rate.insert(
            (*l, *i),
            median(rs.iter().map(|r| if mb { r.1 } else { r.0 }).collect()),
        );
        cpu.insert((*l, *i), median(rs.iter().map(|r| r.3).collect()));
    }
    let cell = |m: &BTreeMap<(Load, usize), f64>, l: Load, i: usize, f: &dyn Fn(f64) -> String| {
        m.get(&(l, i)).map(|v| f(*v)).unwrap_or_else(|| "-".into())
    };
    println!("| variant | handshakes/s | requests/s (100 B) | 1 MiB responses: MB/s | errors |");
    println!("| --- | --- | --- | --- | --- |");
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let errors: u64 = results
            .iter()
            .filter(|((_, v), _)| *v == i)
            .map(|(_, rs)| rs.iter().map(|r| r.2).sum::<u64>())
            .sum();
        println!(
            "| {name} | {} | {} | {} | {errors} |",
            cell(&rate, Load::Handshakes, i, &|v| format!("{v:.0}")),
            cell(&rate, Load::Requests, i, &|v| format!("{v:.0}")),
            cell(&rate, Load::MiB, i, &|v| format!("{v:.1}")),
        );
    }
    let n = variants.len() - 1; // nginx
    let best = |l: Load| {
        (0..n)
            .filter_map(|i| rate.get(&(l, i)))
            .fold(0.0, |a, b| b.max(a))
    };
    if loads.contains(&Load::Handshakes) {
        println!(
            "\nhandshakes/s corral (best path) / nginx: {:.2} (target >= 1.0)",
            best(Load::Handshakes) / rate[&(Load::Handshakes, n)]
        );
    }
    if loads.contains(&Load::Requests) {
        println!(
            "requests/s corral (best path) / nginx: {:.2}",
            best(Load::Requests) / rate[&(Load::Requests, n)]
        );
    }
    if ktls_on && loads.contains(&Load::MiB) {
        println!(
            "1 MiB throughput kTLS + splice / userspace rustls: {:.2} (target >= 1.3)",
            rate[&(Load::MiB, 0)] / rate[&(Load::MiB, 1)]
        );
    }
    println!(
        "\nCPU of the TLS side (corral's front processes / nginx's master and workers), \
         median of rounds:"
    );
    println!("| variant | per handshake | per request (100 B) | per 1 MiB response |");
    println!("| --- | --- | --- | --- |");
    for (i, (name, _, _)) in variants.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} |",
            cell(&cpu, Load::Handshakes, i, &|v| format!("{:.0} µs", v * 1e6)),
            cell(&cpu, Load::Requests, i, &|v| format!("{:.0} µs", v * 1e6)),
            cell(&cpu, Load::MiB, i, &|v| format!("{:.2} ms", v * 1e3)),
        );
    }
    if ktls_on && loads.contains(&Load::MiB) {
        println!(
            "TLS-side CPU per 1 MiB response, userspace rustls / kTLS + splice: {:.2}",
            cpu[&(Load::MiB, 1)] / cpu[&(Load::MiB, 0)]
        );
    }
    for ((l, i), rs) in &results {
        let per: Vec<String> = rs
            .iter()
            .map(|r| format!("{:.0}", if *l == Load::MiB { r.1 } else { r.0 }))
            .collect();
        println!("  rounds {} {l:?}: {}", variants[*i].0, per.join(" "));
    }
    let st = agent.app_json("k.tls");
    println!("  k.tls counters: {}", st["tls"]["counters"]);
}

/// CPU seconds the calling thread has used.
fn thread_cpu() -> f64 {
    // SAFETY: a zeroed rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage into a valid rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

const MIB: usize = 1 << 20;
/// Bytes each cost below is measured over.
const SAMPLE: usize = 32 * MIB;

/// CPU milliseconds per MiB of `f`, which moves SAMPLE bytes on this thread.
fn ms_per_mib(f: impl FnOnce()) -> f64 {
    let t = thread_cpu();
    f();
    (thread_cpu() - t) * 1e3 / (SAMPLE / MIB) as f64
}

/// A connected loopback TCP pair (client, server side).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

/// Read and drop everything `s` receives, on a thread of its own.
fn discard(mut s: TcpStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MIB];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    })
}

/// `TCP_ULP "tls"` and a TLS 1.3 TX key (not a secret: the peer only discards) on `s`.
fn ktls_tx(s: &TcpStream, cipher: corral::sys::ktls::Cipher) {
    use corral::sys::ktls::{self, Cipher, CryptoInfo, Direction, Version};
    use std::os::fd::AsFd;
    let key = vec![7u8; if cipher == Cipher::Aes128Gcm { 16 } else { 32 }];
    let info = CryptoInfo::new(Version::Tls13, cipher, &key, &[1u8; 12], 0).expect("info");
    ktls::set_ulp(s.as_fd()).expect("TCP_ULP tls");
    ktls::set_crypto(s.as_fd(), Direction::Tx, &info).expect("TLS_TX");
}

/// The sender's CPU for SAMPLE bytes written to loopback TCP in 64 KiB writes, through kTLS
/// with `cipher` or plain.
fn write_cost(cipher: Option<corral::sys::ktls::Cipher>) -> f64 {
    let (mut a, b) = tcp_pair();
    if let Some(c) = cipher {
        ktls_tx(&a, c);
    }
    let sink = discard(b);
    let buf = vec![0x41u8; 64 * 1024];
    let cost = ms_per_mib(|| {
        for _ in 0..SAMPLE / buf.len() {
            a.write_all(&buf).expect("write");
        }
    });
    drop(a);
    sink.join().expect("sink");
    cost
}

/// The front's kTLS data path without TLS handshakes: SAMPLE bytes arrive on a plain socket
/// (written by another thread) and are spliced through a pipe into a kTLS socket with
/// `cipher` (or a plain one); the splicing thread's CPU.
fn splice_cost(cipher: Option<corral::sys::ktls::Cipher>) -> f64 {
    use corral::sys::ktls;
    use std::os::fd::AsRawFd;
    let (mut feed, from) = tcp_pair();
    let (to, b) = tcp_pair();
    if let Some(c) = cipher {
        ktls_tx(&to, c);
    }
    let sink = discard(b);
    let feeder = std::thread::spawn(move || {
        let buf = vec![0x41u8; MIB];
        for _ in 0..SAMPLE / MIB {
            feed.write_all(&buf).expect("feed");
        }
    });
    let (pipe_r, pipe_w) = ktls::pipe().expect("pipe");
    // Non-blocking splices (as the front's): wait for readiness with poll.
    let wait = |fd: i32, events: i16| {
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 10_000) };
    };
    let cost = ms_per_mib(|| {
        let mut moved = 0;
        while moved < SAMPLE {
            let n = match ktls::splice(from.as_raw_fd(), pipe_w.as_raw_fd(), 64 * 1024) {
                Ok(0) => panic!("the feeder ended early"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait(from.as_raw_fd(), libc::POLLIN);
                    continue;
                }
                Err(e) => panic!("splice in: {e}"),
            };
            let mut left = n;
            while left > 0 {
                match ktls::splice(pipe_r.as_raw_fd(), to.as_raw_fd(), left) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait(to.as_raw_fd(), libc::POLLOUT)
                    }
                    Err(e) => panic!("splice out: {e}"),
                }
            }
            moved += n;
        }
    });
    feeder.join().expect("feeder");
    drop(to);
    sink.join().expect("sink");
    cost
}

/// rustls's record encryption alone: ring's AEAD sealing SAMPLE bytes as 16 KiB records.
fn seal_cost(alg: &'static ring::aead::Algorithm) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).expect("key"));
    // A TLS 1.3 record's plaintext: 16 KiB of data and its content type.
    let mut record = vec![0x41u8; 16 * 1024 + 1];
    ms_per_mib(|| {
        for seq in 0..(SAMPLE / (16 * 1024)) as u64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&seq.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([23u8, 3, 3, 0x40, 0x11]),
                    &mut record,
                )
                .expect("seal");
            std::hint::black_box(tag.as_ref());
        }
    })
}

/// Where a 1 MiB response's CPU goes on the sending side, per cipher: the AEAD in userspace
/// (what rustls pays) against the kernel's (what kTLS pays), and the copies and syscalls
/// around them. The throughput table above is bounded by these: kTLS + splice can only save
/// the copies and syscalls, and pays the kernel's AEAD instead of ring's.
#[test]
#[ignore = "benchmark: cargo xtask bench tls"]
fn tls_cost_per_mib() {
    use corral::sys::ktls::{self, Cipher};
    let copy = ms_per_mib(|| {
        let src = vec![1u8; MIB];
        let mut dst = vec![0u8; MIB];
        for _ in 0..SAMPLE / MIB {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
        }
    });
    let write = write_cost(None);
    let splice = splice_cost(None);
    println!(
        "\ncost per MiB ({}), CPU of the sending thread: memcpy {copy:.2} ms; write(2) to \
         loopback TCP {write:.2} ms; splice socket -> pipe -> socket {splice:.2} ms",
        if std::env::var("CORRAL_VM").as_deref() == Ok("1") {
            "VM"
        } else {
            "host"
        }
    );
    let kernel = ktls::probe();
    if let Err(why) = &kernel {
        println!("cost per MiB: no kTLS on this kernel ({why}): userspace AEAD only");
    }
    println!("| cost per MiB | AES-128-GCM | AES-256-GCM | CHACHA20-POLY1305 |");
    println!("| --- | --- | --- | --- |");
    let ring_algs = [
        &ring::aead::AES_128_GCM,
        &ring::aead::AES_256_GCM,
        &ring::aead::CHACHA20_POLY1305,
    ];
    let seal: Vec<String> = ring_algs
        .iter()
        .map(|a| format!("{:.2} ms", seal_cost(a)))
        .collect();
    println!(
        "| userspace AEAD (ring, 16 KiB records) | {} |",
        seal.join(" | ")
    );
    if kernel.is_ok() {
        let ciphers = [
            Cipher::Aes128Gcm,
            Cipher::Aes256Gcm,
            Cipher::Chacha20Poly1305,
        ];
        let w: Vec<String> = ciphers
            .iter()
            .map(|c| format!("{:.2} ms", write_cost(Some(*c)) - write))
            .collect();
        println!(
            "| kTLS write(2), minus a plain write(2) | {} |",
            w.join(" | ")
        );
        let s: Vec<String> = ciphers
            .iter()
            .map(|c| format!("{:.2} ms", splice_cost(Some(*c)) - splice))
            .collect();
        println!("| kTLS splice, minus a plain splice | {} |", s.join(" | "));
    }
}
