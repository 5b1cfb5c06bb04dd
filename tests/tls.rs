//! The TLS front on the host (root): real `corral agent`, real front processes, real clients
//! (curl and `openssl s_client` from Debian's packages) against certificates made here. This
//! kernel has no kTLS (no CONFIG_TLS), so these prove the userspace rustls path, the fallback
//! and `ktls = "require"` refusing; the kTLS path is in the VM tier.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_tests::*;

/// A self-signed ECDSA P-256 certificate for `names` (the first is the CN) as `<stem>.crt`
/// and `<stem>.key` in `dir`.
fn make_cert(dir: &Path, stem: &str, names: &[&str]) {
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    tls::openssl_cert(dir, stem, names[0], &san);
}

/// Two demo workers behind a front of two processes serving a.test (the default certificate)
/// and b.test (by SNI), both made by [`make_cert`] in the test directory.
fn config(app_port: u16, tls_port: u16) -> App {
    tls::fronted_demo_app("web", app_port, tls_port).tls(
        "sni",
        [Table::new()
            .set("cert", "@DIR@/b.crt")
            .set("key", "@DIR@/b.key")],
    )
}

struct Setup {
    agent: Agent,
    app: SocketAddr,
    tls: SocketAddr,
}

/// The agent on [`config`] as `tweak` changes it, all workers and fronts ready.
fn start(tag: &str, tweak: impl FnOnce(App) -> App) -> Setup {
    let (app_port, tls_port) = (free_port(), free_port());
    let agent = Agent::start_with(tag, tweak(config(app_port, tls_port)), |dir| {
        make_cert(dir.path(), "a", &["a.test", "localhost"]);
        make_cert(dir.path(), "b", &["b.test"]);
    });
    agent.wait_ready("web", 2, Duration::from_secs(20));
    agent.wait_ready("web.tls", 2, Duration::from_secs(20));
    Setup {
        agent,
        app: loopback(app_port),
        tls: loopback(tls_port),
    }
}

/// curl over https with `name` resolved to the front; the body, or curl's error.
fn curl_https(s: &Setup, name: &str, ca: &str, path: &str) -> Result<Vec<u8>, String> {
    corral_tests::curl_https(s.tls.port(), name, &s.agent.dir.path().join(ca), path)
}

fn curl_plain(addr: SocketAddr, path: &str) -> Vec<u8> {
    run_ok(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20"])
            .arg(format!("http://{addr}{path}")),
        "curl",
    )
    .stdout
}

/// `openssl s_client` with `args`, stdin `input`; its stdout and stderr together.
fn s_client(tls: SocketAddr, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &tls.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tls12_and_tls13_sni_picks_the_certificate_and_alpn_is_http11() {
    let s = start("tls-versions", |app| app);
    for version in ["-tls1_2", "-tls1_3"] {
        for (name, subject) in [("a.test", "CN = a.test"), ("b.test", "CN = b.test")] {
            let out = s_client(
                s.tls,
                &[version, "-servername", name, "-alpn", "http/1.1"],
                b"",
            );
            assert!(out.contains(subject), "{version} {name}: {out}");
            assert!(
                out.contains("ALPN protocol: http/1.1"),
                "{version} {name}: {out}"
            );
            let proto = if version == "-tls1_2" {
                "TLSv1.2"
            } else {
                "TLSv1.3"
            };
            assert!(out.contains(proto), "{version}: {out}");
        }
    }
    // No SNI, or a name no certificate has: the default (first) certificate.
    let out = s_client(s.tls, &["-noservername"], b"");
    assert!(out.contains("CN = a.test"), "{out}");
    // Verified end to end with each certificate as the only trust anchor.
    let body = curl_https(&s, "b.test", "b.crt", "/").expect("https b.test");
    assert!(String::from_utf8_lossy(&body).contains("\"app\":\"web\""));
    curl_https(&s, "a.test", "a.crt", "/").expect("https a.test");
    assert!(
        curl_https(&s, "b.test", "a.crt", "/").is_err(),
        "b.test is not served with a's certificate"
    );
}

#[test]
fn responses_are_byte_identical_to_the_plaintext_path() {
    let s = start("tls-bytes", |app| app);
    for n in [0u64, 1, 16383, 16384, 16385, 1 << 20] {
        let path = format!("/?bytes={n}");
        let plain = curl_plain(s.app, &path);
        let tls = curl_https(&s, "a.test", "a.crt", &path).expect("https");
        assert_eq!(plain.len() as u64, n, "plaintext body of {n}");
        assert!(tls == plain, "{n} bytes: TLS body differs from plaintext");
    }
    // Pipelined: three requests in one write, three responses in order.
    let reqs =
        b"GET /?bytes=5 HTTP/1.1\r\nHost: a\r\n\r\nGET /?bytes=7 HTTP/1.1\r\nHost: a\r\n\r\n\
GET /?bytes=3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let out = s_client(s.tls, &["-quiet", "-servername", "a.test"], reqs);
    let lens: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Content-Length: "))
        .map(str::trim)
        .collect();
    assert_eq!(lens, vec!["5", "7", "3"], "{out}");
}

#[test]
fn garbage_truncated_hellos_and_slowloris_do_not_disturb_other_clients() {
    let s = start("tls-garbage", |app| app.tls("handshake_timeout", "1s"));
    // Plain HTTP on the TLS port: an alert and a close, not a hang.
    let mut c = TcpStream::connect(s.tls).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    assert!(
        buf.is_empty() || buf[0] == 0x15,
        "an alert record or nothing: {buf:?}"
    );
    // A ClientHello header that promises more than it sends, then close.
    let mut t = TcpStream::connect(s.tls).expect("connect");
    t.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .expect("write");
    drop(t);
    // Random bytes.
    let mut g = TcpStream::connect(s.tls).expect("connect");
    g.write_all(&[0xde; 300]).expect("write");
    // Slowloris: one byte, then nothing; the front gives up after handshake_timeout.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = TcpStream::connect(s.tls).expect("connect");
            c.write_all(&[0x16]).expect("write");
            c
        })
        .collect();
    let started = Instant::now();
    for _ in 0..20 {
        curl_https(&s, "a.test", "a.crt", "/").expect("others are served meanwhile");
    }
    let mut c = slow.pop().expect("one");
    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut b = [0u8; 16];
    let n = c.read(&mut b).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        n == 0 || b[0] == 0x15,
        "the slow client is closed (or alerted)"
    );
    assert!(
        waited < Duration::from_secs(8),
        "closed by the 1 s handshake timeout, not left open: {waited:?}"
    );
    drop(g);
    drop(slow);
    // Counted by kind in `corral status`.
    let counted = wait_for(Duration::from_secs(10), "failure counters", || {
        let st = s.agent.app_json("web.tls");
        let c = |k: &str| st["tls"]["counters"][k].as_u64().unwrap_or(0);
        (c("handshake_failed_protocol") >= 2
            && c("handshake_failed_timeout") >= 1
            && c("handshake_failed_eof") >= 1
            && c("handshakes_userspace") >= 20)
            .then_some(st)
    });
    let c = &counted["tls"]["counters"];
    assert_eq!(c["handshakes_ktls"], 0, "{counted}");
    assert!(
        c["fallback_kernel_without_ktls"].as_u64().unwrap_or(0) >= 20,
        "{counted}"
    );
    assert!(c["bytes_copied"].as_u64().unwrap_or(0) > 0, "{counted}");
}

/// The scheduling policy of a thread, field 41 of /proc/PID/task/TID/stat.
fn sched_policy(stat: &str) -> u32 {
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).expect("a stat line");
    // Fields from the third (state) on: policy is the 41st field, the 39th after the name.
    rest.split_whitespace()
        .nth(38)
        .and_then(|v| v.parse().ok())
        .expect("a policy field")
}

#[test]
fn the_fronts_run_under_sched_batch_and_the_workers_do_not() {
    // SCHED_BATCH is 3 (sched.h), SCHED_OTHER 0: a front woken by a worker's answer does not
    // preempt that worker (BENCHMARKS.md, "http"); the app's workers keep what they inherit
    // (the agent's policy, which is this test's).
    let s = start("tls-batch", |app| app);
    let policies = |pid: i32| -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the process's threads")
            .flatten()
            .map(|t| sched_policy(&std::fs::read_to_string(t.path().join("stat")).expect("stat")))
            .collect()
    };
    let fronts: Vec<i32> = s
        .agent
        .app("web.tls")
        .workers
        .iter()
        .filter(|w| w.state == "ready")
        .map(|w| w.pid.expect("pid"))
        .collect();
    assert!(!fronts.is_empty(), "no ready front");
    for pid in fronts {
        let p = policies(pid);
        assert!(p.iter().all(|&p| p == 3), "front {pid}: policies {p:?}");
    }
    let own = sched_policy(&std::fs::read_to_string("/proc/thread-self/stat").expect("stat"));
    assert_ne!(
        own, 3,
        "run the tests under a policy other than SCHED_BATCH"
    );
    for w in s.agent.app("web").workers {
        let pid = w.pid.expect("pid");
        let p = policies(pid);
        assert!(
            p.iter().all(|&p| p == own),
            "worker {pid}: policies {p:?}, the agent's {own}"
        );
    }
}

#[test]
fn the_front_runs_unprivileged_and_the_key_stays_out_of_the_workers() {
    let s = start("tls-privs", |app| app);
    let st = s.agent.app("web.tls");
    for w in st.workers.iter().filter(|w| w.state == "ready") {
        let pid = w.pid.expect("pid");
        let status = proc_status(pid);
        let get = |k: &str| {
            status
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("CapEff"), "0000000000000000", "pid {pid}");
        assert_eq!(get("CapPrm"), "0000000000000000", "pid {pid}");
        assert_eq!(get("CapBnd"), "0000000000000000", "pid {pid}");
        assert_eq!(get("NoNewPrivs"), "1", "pid {pid}");
        assert!(
            get("Uid").starts_with("65534"),
            "runs as nobody: {}",
            get("Uid")
        );
        // The key files are not open in it (it got a sealed memfd, read and closed).
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds");
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().ends_with(".key"),
                "{}",
                target.display()
            );
        }
    }
    // The app's workers have nothing but their socket and stdio beyond fd 2.
    for w in s.agent.app("web").workers {
        let pid = w.pid.expect("pid");
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
            .map(|e| std::fs::read_link(e.path()).unwrap_or_default())
            .collect();
        assert!(
            !fds.iter()
                .any(|t| t.to_string_lossy().contains("memfd:corral")),
            "{fds:?}"
        );
    }
}

#[test]
fn certificates_reload_and_an_invalid_one_is_refused() {
    let mut s = start("tls-reload", |app| app);
    let dir = s.agent.dir.path().to_path_buf();
    // A connection opened before the reload, kept alive across it.
    let before = curl_https(&s, "a.test", "a.crt", "/").expect("https before");
    assert!(!before.is_empty());

    // An invalid certificate: the reload is refused with the file named; nothing changes.
    std::fs::write(dir.join("a.crt"), "not a certificate\n").expect("write");
    let (code, _, err) = s.agent.cli(&["reload"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("a.crt"), "names the file: {err}");
    let served = s_client(s.tls, &["-servername", "a.test"], b"");
    assert!(
        served.contains("CN = a.test"),
        "old certificate kept: {served}"
    );

    // A valid new certificate for the same names: new handshakes get it, with no failed
    // request while the fronts are replaced.
    make_cert(&dir, "a", &["a.test", "localhost"]);
    let (code, out, err) = s.agent.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = Vec::new();
    loop {
        // curl trusts only the new certificate: it succeeds once the new fronts serve.
        match curl_https(&s, "a.test", "a.crt", "/") {
            Ok(_) => break,
            Err(e) => failures.push(e),
        }
        assert!(
            Instant::now() < deadline,
            "new certificate never served: {failures:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.agent.stop(Duration::from_secs(40));
}

#[test]
fn ktls_require_refuses_to_start_where_the_kernel_cannot() {
    require_root();
    if corral::sys::ktls::probe().is_ok() {
        eprintln!("this kernel has kTLS: the refusal is tested in the VM tier without tls.ko");
        return;
    }
    let dir = TempDir::new("tls-require");
    make_cert(dir.path(), "a", &["a.test"]);
    make_cert(dir.path(), "b", &["b.test"]);
    let path = write_config(
        dir.path(),
        &AgentTable::private(dir.path()),
        config(free_port(), free_port()).tls("ktls", "require"),
    );
    let out = refused_agent(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("require") && err.contains("TCP_ULP"), "{err}");
}

/// Replace `<stem>.crt`/`<stem>.key` in `dir` with those of `from` the way renewal tools do:
/// written beside, then renamed over (key first, so the pair is briefly mismatched).
fn swap_cert(dir: &Path, from: &str, stem: &str) {
    for ext in ["key", "crt"] {
        let tmp = dir.join(format!("{stem}.{ext}.new"));
        std::fs::copy(dir.join(format!("{from}.{ext}")), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).expect("rename");
    }
}

#[test]
fn a_certificate_file_change_rolls_the_fronts_under_load_without_a_failed_request() {
    roll_under_load("tls-watch", "tcp");
}

/// The same with the HTTP proxy: a front draining on SIGTERM finishes its requests in flight.
#[test]
fn a_certificate_change_rolls_http_fronts_under_load_without_a_failed_request() {
    roll_under_load("tls-watch-http", "http");
}

fn roll_under_load(tag: &str, proxy: &str) {
    let s = start(tag, |app| app.tls("proxy", proxy));
    let dir = s.agent.dir.path().to_path_buf();
    make_cert(&dir, "new", &["a.test", "localhost"]);
    let old_ca = std::fs::read_to_string(dir.join("a.crt")).expect("old cert");
    let new_ca = std::fs::read_to_string(dir.join("new.crt")).expect("new cert");
    let both = format!("{old_ca}{new_ca}");

    let load = tls::HandshakeLoad::start(s.tls, "a.test", &both, 4);
    std::thread::sleep(Duration::from_millis(500));

    // An unusable change (garbage certificate): refused, the old one keeps serving.
    std::fs::write(dir.join("a.crt.new"), "garbage\n").expect("write");
    std::fs::rename(dir.join("a.crt.new"), dir.join("a.crt")).expect("rename");
    wait_for(Duration::from_secs(10), "the refusal in the log", || {
        s.agent.log().contains("cannot be used").then_some(())
    });
    tls::get(s.tls, "a.test", &old_ca, tls::Tls::V13, "/", false).expect("old cert still served");

    // The renewal proper: the new pair replaces the files; new handshakes get it.
    swap_cert(&dir, "new", "a");
    wait_for(
        Duration::from_secs(30),
        "the new certificate served",
        || tls::get(s.tls, "a.test", &new_ca, tls::Tls::V13, "/", false).ok(),
    );
    std::thread::sleep(Duration::from_millis(500));
    load.finish(51);
    assert!(
        s.agent
            .log()
            .contains("certificates changed: replacing the front processes"),
        "{}",
        s.agent.log()
    );
}

/// How much later than usual a front starts serving in the tests of a slow front.
const SLOW_START: Duration = Duration::from_secs(3);

/// The agent on [`config`] with one front process, every front starting `delay` late (the
/// real front, with the test-only `TEST_START_DELAY_VAR`).
fn start_slow_fronts(tag: &str, delay: Duration) -> (Agent, SocketAddr) {
    let (app_port, tls_port) = (free_port(), free_port());
    let ms = delay.as_millis().to_string();
    let agent = Agent::start_with_env(
        tag,
        config(app_port, tls_port).tls("processes", 1),
        &[(corral::front::process::TEST_START_DELAY_VAR, &ms)],
        |dir| {
            make_cert(dir.path(), "a", &["a.test", "localhost"]);
            make_cert(dir.path(), "b", &["b.test"]);
        },
    );
    agent.wait_ready("web", 2, Duration::from_secs(20));
    (agent, loopback(tls_port))
}

/// A front slow to start serving: a roll stops the old front only on the new one's own
/// READY=1, so the old one answers every request at once until then. (With the agent's probe
/// on the slot's socket instead, the old front accepted its successor's probe, was stopped at
/// once, and requests then waited in the queue until the new front started accepting.)
#[test]
fn a_roll_stops_the_old_front_only_on_the_new_fronts_own_ready_report() {
    let (agent, tls) = start_slow_fronts("tls-slow-roll", SLOW_START);
    let old = agent.wait_ready("web.tls", 1, Duration::from_secs(20))[0];
    let dir = agent.dir.path().to_path_buf();
    make_cert(&dir, "new", &["a.test", "localhost"]);
    let old_ca = std::fs::read_to_string(dir.join("a.crt")).expect("old cert");
    let new_ca = std::fs::read_to_string(dir.join("new.crt")).expect("new cert");
    let both = format!("{old_ca}{new_ca}");

    swap_cert(&dir, "new", "a");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Requests served while the new front was starting (its predecessor serving them).
    let mut while_starting = 0;
    let new = loop {
        let fronts = agent.app("web.tls").workers;
        let successor = fronts
            .iter()
            .find(|w| w.pid.is_some() && w.pid != Some(old));
        if let Some(w) = successor.filter(|w| w.state == "ready") {
            break w.pid.expect("pid");
        }
        let starting = successor.is_some_and(|w| w.state == "starting");
        if starting {
            // Retired beside its successor and not yet asked to stop: "draining" in status.
            let predecessor = fronts.iter().find(|w| w.pid == Some(old));
            assert!(
                predecessor.is_some_and(|w| w.state == "draining") && pid_alive(old),
                "the old front serves while the new one starts: {fronts:#?}\nlog:\n{}",
                agent.log()
            );
        }
        let sent = Instant::now();
        let got = tls::get(tls, "a.test", &both, tls::Tls::V13, "/", false);
        let took = sent.elapsed();
        assert!(
            got.is_ok() && took < SLOW_START / 2,
            "a request during the roll: {:?} after {took:?}\nlog:\n{}",
            got.err(),
            agent.log()
        );
        if starting {
            while_starting += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the new front never became ready: {fronts:#?}\nlog:\n{}",
            agent.log()
        );
    };
    // Ready means serving: the new front answers at once.
    let sent = Instant::now();
    let got = tls::get(tls, "a.test", &new_ca, tls::Tls::V13, "/", false);
    let took = sent.elapsed();
    assert!(
        got.is_ok() && took < SLOW_START / 2,
        "the new front, ready: {:?} after {took:?}\nlog:\n{}",
        got.err(),
        agent.log()
    );
    assert!(
        while_starting > 0,
        "no request was sent while the new front was starting"
    );
    let log = agent.log();
    assert!(
        log.contains("starting 3000 ms late (test only)"),
        "the fronts started late: {log}"
    );
    // In the agent's log, the new front's report comes before the old front's stop.
    let line_of = |what: &str, pid: i32| {
        log.lines()
            .position(|l| l.contains(what) && l.contains(&format!("pid={pid}")))
            .unwrap_or_else(|| panic!("no {what:?} for pid {pid} in the log:\n{log}"))
    };
    assert!(
        line_of("worker ready", new) < line_of("stopping worker", old),
        "{log}"
    );
}

/// A front that does not report ready within its time is stopped, with an error naming the
/// front and its app.
#[test]
fn a_front_that_never_reports_ready_is_named_in_the_error() {
    let timeout = corral::front::app::FRONT_READY_TIMEOUT;
    let (agent, _) = start_slow_fronts("tls-never-ready", timeout + SLOW_START);
    let line = wait_for(
        timeout + Duration::from_secs(20),
        "the timeout's error",
        || {
            agent
                .log()
                .lines()
                .find(|l| l.contains("worker not ready"))
                .map(str::to_string)
        },
    );
    assert!(
        line.contains("TLS front process 0 (pid ")
            && line.contains("of app web: did not send READY=1 within 10s")
            && line.contains("app=web.tls"),
        "{line}"
    );
}

/// A front that exits before it reports ready (here: the real front refusing a test delay
/// that is not a number, before it serves) is a failed start: restarted like a crash, never
/// ready.
#[test]
fn a_front_that_exits_before_reporting_ready_is_a_failed_start() {
    let (app_port, tls_port) = (free_port(), free_port());
    let agent = Agent::start_with_env(
        "tls-exits-early",
        config(app_port, tls_port).tls("processes", 1),
        &[(corral::front::process::TEST_START_DELAY_VAR, "soon")],
        |dir| {
            make_cert(dir.path(), "a", &["a.test", "localhost"]);
            make_cert(dir.path(), "b", &["b.test"]);
        },
    );
    let front_lines = |what: &str| {
        agent
            .log()
            .lines()
            .filter(|l| l.contains(what) && l.contains("app=web.tls"))
            .count()
    };
    // Restarted after its first exit, so it exits twice.
    wait_for(Duration::from_secs(20), "the front exiting twice", || {
        (front_lines("worker exited after") >= 2).then_some(())
    });
    let log = agent.log();
    assert!(
        log.contains("CORRAL_TEST_FRONT_START_DELAY_MS=\"soon\" is not a number"),
        "the front's own reason: {log}"
    );
    assert_eq!(front_lines("worker ready"), 0, "{log}");
    assert!(
        agent
            .app("web.tls")
            .workers
            .iter()
            .all(|w| w.state != "ready"),
        "{log}"
    );
}

#[test]
fn redirect_http_answers_plain_http_with_a_308_to_https() {
    let redirect_port = free_port();
    let s = start("tls-redirect", |app| {
        app.tls("redirect_http", loopback(redirect_port))
    });
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "--max-time",
            "10",
        ])
        .arg(format!("http://127.0.0.1:{redirect_port}/path?q=1"))
        .args(["-H", "Host: a.test"])
        .output()
        .expect("curl");
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(got, format!("308 https://a.test:{}/path?q=1", s.tls.port()));
    // Followed, it lands on the TLS front.
    let out = Command::new("curl")
        .args(["-sS", "-L", "--max-time", "10", "--cacert"])
        .arg(s.agent.dir.path().join("a.crt"))
        .arg("--resolve")
        .arg(format!("a.test:{redirect_port}:127.0.0.1"))
        .arg("--resolve")
        .arg(format!("a.test:{}:127.0.0.1", s.tls.port()))
        .arg(format!("http://a.test:{redirect_port}/?bytes=5"))
        .output()
        .expect("curl");
    assert_eq!(
        out.stdout.len(),
        5,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A request it cannot redirect safely gets a 400 that says why.
    let mut c = TcpStream::connect(("127.0.0.1", redirect_port)).expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    c.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("malformed Host"), "{resp}");
    let st = s.agent.app_json("web.tls");
    assert!(
        st["tls"]["counters"]["redirects"].as_u64().unwrap_or(0) >= 2,
        "{st}"
    );
}

#[test]
fn proxy_protocol_v2_tells_the_worker_the_client_address() {
    let s = start("tls-proxy", |app| {
        app.tls("proxy_protocol", "v2")
            .env("DEMO_PROXY_PROTOCOL", 1)
    });
    let tls_port = s.tls.port();
    // curl from a known source port: the worker must see it, not the front's.
    let port = free_port();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--local-port"])
        .arg(port.to_string())
        .arg("--cacert")
        .arg(s.agent.dir.path().join("a.crt"))
        .arg("--resolve")
        .arg(format!("a.test:{tls_port}:127.0.0.1"))
        .arg(format!("https://a.test:{tls_port}/"))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        body.contains(&format!("\"proxy_client\":\"127.0.0.1:{port}\"")),
        "{body}"
    );
    // Byte-identical bodies still (the header is consumed by the worker, not echoed).
    let big = curl_https(&s, "a.test", "a.crt", "/?bytes=100000").expect("https");
    assert_eq!(big.len(), 100_000);
}
