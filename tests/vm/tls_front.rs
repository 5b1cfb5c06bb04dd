//! The TLS front through kTLS and splice, and its fallback to userspace without tls.ko.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use super::fixture::{in_vm, ModprobeOff};
use corral_tests::*;

const TLS_SIZES: [u64; 6] = [0, 1, 16383, 16384, 16385, 1 << 20];

fn start_tls_agent(tag: &str) -> (Agent, String, SocketAddr, SocketAddr) {
    let (app_port, tls_port) = (free_port(), free_port());
    let (cert, key) = tls::self_signed(&["a.test"]);
    let agent = Agent::start_with(
        tag,
        tls::fronted_demo_app("web", app_port, tls_port),
        |dir| tls::write_cert(dir.path(), &cert, &key),
    );
    agent.wait_ready("web", 2, Duration::from_secs(60));
    agent.wait_ready("web.tls", 2, Duration::from_secs(60));
    (agent, cert, loopback(app_port), loopback(tls_port))
}

/// The upper-layer protocol of every TCP socket process `pid` holds (through pidfd_getfd).
fn socket_ulps(pid: i32) -> Vec<String> {
    // SAFETY: pidfd_open on a pid we were given; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let link = std::fs::read_link(e.path()).unwrap_or_default();
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(target) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: pidfd_getfd duplicates the target's fd into ours; closed below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as i32;
        if fd < 0 {
            continue;
        }
        // SAFETY: fd is open (from pidfd_getfd) until the close below.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(ulp) = corral::sys::ktls::ulp(borrowed) {
            out.push(ulp);
        }
        // SAFETY: fd is ours (from pidfd_getfd).
        unsafe { libc::close(fd) };
    }
    // SAFETY: pidfd is ours.
    unsafe { libc::close(pidfd) };
    out
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn tls_front_serves_through_ktls_and_splice() {
    in_vm();
    let before = tls::tls_stat();
    let (mut agent, ca, app, front) = start_tls_agent("ktls");
    let log = agent.log();
    assert!(
        log.contains("kernel TLS: TLS1.2 AES-128-GCM: tx+rx"),
        "the front logs the kernel's matrix:\n{log}"
    );
    let mut served = 0u64;
    for version in [tls::Tls::V12, tls::Tls::V13] {
        for n in TLS_SIZES {
            let path = format!("/?bytes={n}");
            let (status, _) = http_get(app, "/").expect("plain GET");
            assert_eq!(status, 200);
            let plain = {
                let mut s = TcpStream::connect(app).expect("connect");
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                )
                .expect("write");
                let mut raw = Vec::new();
                s.read_to_end(&mut raw).expect("read");
                let at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
                raw[at..].to_vec()
            };
            assert_eq!(plain.len() as u64, n);
            let r = tls::get(front, "a.test", &ca, version, &path, false)
                .unwrap_or_else(|e| panic!("{version:?} {n} bytes: {e}"));
            assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
            assert!(
                r.body == plain,
                "{version:?} {n} bytes: body differs from plaintext"
            );
            served += 1;
        }
    }
    // The client's close_notify right after its request: a half-close; the answer (sent after
    // 300 ms, so the front has read the alert by then) still comes, ending with the server's
    // close_notify.
    let r = tls::get(
        front,
        "a.test",
        &ca,
        tls::Tls::V13,
        "/?bytes=100000&delay_ms=300",
        true,
    )
    .expect("close_notify first");
    assert_eq!(r.body.len(), 100_000);
    served += 1;

    // A connection being served holds a kTLS socket in a front.
    let idle = tls::open_idle(front, "a.test", &ca);
    std::thread::sleep(Duration::from_millis(300));
    let fronts: Vec<i32> = agent
        .app("web.tls")
        .workers
        .iter()
        .filter_map(|w| w.pid)
        .collect();
    let ulps: Vec<String> = fronts.iter().flat_map(|p| socket_ulps(*p)).collect();
    assert!(
        ulps.iter().any(|u| u == "tls"),
        "getsockopt(TCP_ULP) on the fronts' sockets: {ulps:?}"
    );
    drop(idle);

    let after = tls::tls_stat();
    let rose = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(
        rose("TlsTxSw") >= served,
        "TlsTxSw +{} for {served} connections",
        rose("TlsTxSw")
    );
    assert!(
        rose("TlsRxSw") >= served,
        "TlsRxSw +{} for {served} connections",
        rose("TlsRxSw")
    );
    let st = agent.app_json("web.tls");
    let c = |k: &str| st["tls"]["counters"][k].as_u64().unwrap_or(0);
    assert!(c("handshakes_ktls") >= served, "{st}");
    assert_eq!(c("handshakes_userspace"), 0, "{st}");
    assert!(c("bytes_spliced") > 2 << 20, "{st}");
    assert_eq!(c("bytes_copied"), 0, "{st}");
    assert!(
        c("close_notify_received") >= 1,
        "the client's close_notify was read: {st}"
    );
    assert!(
        st["tls"]["kernel_tls_stat"]["TlsTxSw"]
            .as_u64()
            .unwrap_or(0)
            >= served,
        "{st}"
    );
    agent.stop(Duration::from_secs(40));
    println!(
        "kTLS front: {served} connections through kTLS + splice, TlsTxSw +{}, TlsRxSw +{}",
        rose("TlsTxSw"),
        rose("TlsRxSw")
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn without_tls_ko_auto_falls_back_and_require_refuses() {
    in_vm();
    {
        let _off = ModprobeOff::new();
        let _ = Command::new("rmmod").arg("tls").status();
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        assert!(
            !modules.lines().any(|l| l.starts_with("tls ")),
            "tls still loaded:\n{modules}"
        );
        let (mut agent, ca, _app, front) = start_tls_agent("ktls-auto");
        let r = tls::get(front, "a.test", &ca, tls::Tls::V13, "/?bytes=20000", false)
            .expect("served in userspace");
        assert_eq!(r.body.len(), 20_000);
        let log = agent.log();
        assert!(log.contains("kernel TLS unavailable"), "{log}");
        agent.stop(Duration::from_secs(40));

        let dir = TempDir::new("ktls-require");
        let (cert, key) = tls::self_signed(&["a.test"]);
        tls::write_cert(dir.path(), &cert, &key);
        let path = write_config(
            dir.path(),
            &AgentTable::private(dir.path()),
            tls::fronted_demo_app("web", free_port(), free_port()).tls("ktls", "require"),
        );
        let out = refused_agent(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("require"), "{err}");
    }
    // Leave the kernel as the next tests expect it.
    let _ = Command::new("modprobe").arg("tls").status();
}
