//! The VM tier's smoke tests: they run inside Debian's kernels under qemu, started by
//! `cargo xtask vm-test` (its /init mounts cgroup2, bpffs and tmpfs, loads tls.ko and runs this
//! executable with `--ignored` and CORRAL_VM=1). On the host they are ignored: its kernel has
//! no cgroup v2 memory controller and no kTLS.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use corral_tests::*;

/// These tests assume the VM `cargo xtask vm-test` boots: say so instead of failing obscurely.
fn in_vm() {
    assert_eq!(
        std::env::var("CORRAL_VM").as_deref(),
        Ok("1"),
        "this test runs inside the VM tier's kernel: run it with `cargo xtask vm-test`"
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn cgroup2_is_mounted_with_memory_pids_and_cpu() {
    in_vm();
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let cgroup2 = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/cgroup") && f.get(2) == Some(&"cgroup2")
    });
    assert!(cgroup2, "no cgroup2 at /sys/fs/cgroup:\n{mounts}");
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .expect("read cgroup.controllers");
    println!("cgroup.controllers: {}", controllers.trim());
    let have: BTreeSet<&str> = controllers.split_whitespace().collect();
    for c in ["memory", "pids", "cpu"] {
        assert!(
            have.contains(c),
            "controller {c} missing from cgroup.controllers: {controllers}"
        );
    }
}

/// `struct tls12_crypto_info_aes_gcm_128` of <linux/tls.h>.
#[repr(C)]
struct Tls12AesGcm128 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_CIPHER_AES_GCM_128: u16 = 51;

fn setsockopt<T>(fd: i32, level: libc::c_int, name: libc::c_int, value: &T, len: usize) -> i32 {
    // SAFETY: `value` points to at least `len` readable bytes for the duration of the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            len as libc::socklen_t,
        )
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn kernel_tls_encrypts_a_loopback_connection() {
    in_vm();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let fd = client.as_raw_fd();

    let ulp = setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls", 3);
    assert_eq!(
        ulp,
        0,
        "setsockopt(TCP_ULP, \"tls\"): {} (is tls.ko loaded?)",
        std::io::Error::last_os_error()
    );

    let info = Tls12AesGcm128 {
        version: TLS_1_2_VERSION,
        cipher_type: TLS_CIPHER_AES_GCM_128,
        iv: [1; 8],
        key: [2; 16],
        salt: [3; 4],
        rec_seq: [0; 8],
    };
    let tx = setsockopt(
        fd,
        libc::SOL_TLS,
        TLS_TX,
        &info,
        std::mem::size_of::<Tls12AesGcm128>(),
    );
    assert_eq!(
        tx,
        0,
        "setsockopt(SOL_TLS, TLS_TX, AES-GCM-128): {}",
        std::io::Error::last_os_error()
    );

    // The kernel now writes TLS records: header (application data, TLS 1.2, length), the
    // 8-byte explicit nonce, the ciphertext and the 16-byte tag.
    let plain = b"hello, kernel TLS";
    (&client).write_all(plain).expect("write");
    let want = 5 + 8 + plain.len() + 16;
    let mut record = vec![0u8; want];
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    server.read_exact(&mut record).expect("read the TLS record");
    assert_eq!(record[0], 23, "not an application-data record: {record:?}");
    assert_eq!(&record[1..3], &[3, 3], "not TLS 1.2: {record:?}");
    assert_eq!(
        usize::from(u16::from_be_bytes([record[3], record[4]])),
        want - 5
    );
    assert!(
        !record.windows(plain.len()).any(|w| w == plain),
        "the record carries the plaintext"
    );
    println!(
        "kTLS: {} plaintext bytes went out as a {want}-byte AES-GCM record",
        plain.len()
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn the_agent_serves_two_demo_workers_with_ebpf_steering() {
    in_vm();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let agent = Agent::start(
        "vm-agent",
        &demo_app("web", &format!("127.0.0.1:{port}"), 2, ""),
    );
    let pids: BTreeSet<i32> = agent
        .wait_ready("web", 2, Duration::from_secs(60))
        .into_iter()
        .collect();

    let mut answered = BTreeSet::new();
    for _ in 0..400 {
        let (status, body) = http_get(addr, "/").expect("GET /");
        assert_eq!(status, 200, "GET / answered {status}: {body}");
        answered.insert(demo_pid(&body).expect("pid in the demo's answer"));
        if answered == pids {
            break;
        }
    }
    assert_eq!(answered, pids, "not every worker answered GET /");

    let out = Command::new(bin("corral"))
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()
        .expect("run corral status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "corral status failed: {out:?}");
    let steering = text
        .lines()
        .find(|l| l.trim_start().starts_with("steering:"))
        .unwrap_or_else(|| panic!("no steering line in corral status:\n{text}"));
    println!("corral status: {}", steering.trim());
    assert!(
        steering.contains("(eBPF"),
        "the VM kernel should run the eBPF steering program: {steering}\nagent log:\n{}",
        agent.log()
    );
    let stats = agent
        .app("web")
        .steering_stats
        .expect("eBPF steering stats");
    assert!(
        stats.selected > 0,
        "the steering program picked no worker: {stats:?}"
    );
}

/// Restores the kernel's module loader when dropped.
struct ModprobeOff(String);

impl ModprobeOff {
    fn new() -> ModprobeOff {
        let old = std::fs::read_to_string("/proc/sys/kernel/modprobe").expect("read modprobe");
        std::fs::write("/proc/sys/kernel/modprobe", "/bin/false").expect("disable modprobe");
        ModprobeOff(old.trim().to_string())
    }
}

impl Drop for ModprobeOff {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/modprobe", &self.0);
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn without_sock_diag_readiness_falls_back_to_the_accept_queue() {
    in_vm();
    // A kernel without inet_diag/tcp_diag: unload them (they are modules in Debian's kernels)
    // and keep the kernel from loading them again while this test runs.
    let _off = ModprobeOff::new();
    for m in ["tcp_diag", "udp_diag", "inet_diag"] {
        let _ = Command::new("rmmod").arg(m).status();
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    assert!(
        !modules.lines().any(|l| l.starts_with("inet_diag ")),
        "inet_diag still loaded:\n{modules}"
    );
    let port = free_port();
    let late = "if [ $CORRAL_WORKER = 1 ]; then export DEMO_START_DELAY_MS=1500; fi; exec @DEMO@";
    let apps = format!(
        "\n[app.web]\ncommand = [\"/bin/sh\", \"-c\", \"{late}\"]\nuser = \"nobody\"\n\
         [app.web.listen]\naddress = \"127.0.0.1:{port}\"\n[app.web.workers]\ncount = 2\n"
    );
    let agent = Agent::start("nodiag", &apps);
    let t0 = std::time::Instant::now();
    agent.wait_ready("web", 2, Duration::from_secs(60));
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "worker 1 was not ready before its delay: {:?}",
        t0.elapsed()
    );
    let log = agent.log();
    assert!(
        log.contains("readiness probes cannot use sock_diag"),
        "the agent says which signal it fell back to:\n{log}"
    );
    assert!(
        !log.contains("not ready:"),
        "no worker was wrongly failed:\n{log}"
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = http_get(addr, "/").expect("GET");
    assert_eq!(status, 200, "{body}");
}
