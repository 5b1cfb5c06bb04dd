//! The VM tier's smoke tests: they run inside Debian's kernels under qemu, started by
//! `cargo xtask vm-test` (its /init mounts cgroup2, bpffs and tmpfs, loads tls.ko and runs this
//! executable with `--ignored` and CORRAL_VM=1). On the host they are ignored: its kernel has
//! no cgroup v2 memory controller and no kTLS.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
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
    let addr = loopback(port);
    let agent = Agent::start("vm-agent", demo_app("web", loopback(port), 2));
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
    let app = App::new("web")
        .command(["/bin/sh", "-c", late])
        .user("nobody")
        .address(loopback(port))
        .count(2);
    let agent = Agent::start("nodiag", app);
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
    let addr = loopback(port);
    let (status, body) = http_get(addr, "/").expect("GET");
    assert_eq!(status, 200, "{body}");
}

// ---- Per-worker cgroup v2 leaves ----------------------------------------------------------
//
// The contract these tests check: `[agent] cgroup_root` names an existing cgroup v2 directory
// (made here by `vm_cgroup_root`, never by corral); under it the agent keeps
// `app-<app>/worker-<slot>-<n>`, one leaf per worker process, with the app's limits written
// into each leaf, and removes what it made when workers exit and when it stops.

const MIB: u64 = 1 << 20;

/// Start an agent on `apps` whose `[agent]` table has `cgroup_root` = the test's root and the
/// settings in `extra`; returns it and the root's path.
fn cgroup_agent(
    tag: &str,
    root: &CgroupRootGuard,
    extra: Table,
    apps: impl std::fmt::Display,
) -> (Agent, PathBuf) {
    let agent = Agent::start_with_agent_extra(tag, root.agent_settings().merge(extra), apps);
    (agent, root.path().to_path_buf())
}

/// A worker's leaf directory from its status's `cgroup` field: an absolute path under
/// /sys/fs/cgroup, or a cgroup name as /proc/PID/cgroup shows it (`/corral-.../app-web/...`).
fn leaf_dir(root: &Path, worker: &serde_json::Value) -> PathBuf {
    let field = worker["cgroup"]
        .as_str()
        .unwrap_or_else(|| panic!("worker status has no \"cgroup\" string: {worker}"));
    let path = if Path::new(field).starts_with(CGROUP_FS) {
        PathBuf::from(field)
    } else if field.starts_with('/') {
        Path::new(CGROUP_FS).join(field.trim_start_matches('/'))
    } else {
        root.join(field)
    };
    assert!(
        path.starts_with(root) && path != root,
        "worker cgroup {field} is not below the cgroup root {}",
        root.display()
    );
    path
}

/// The workers of an app's JSON status.
fn workers_json(app: &serde_json::Value) -> Vec<serde_json::Value> {
    app["workers"].as_array().cloned().unwrap_or_default()
}

fn json_pid(w: &serde_json::Value) -> Option<i32> {
    w["pid"].as_i64().map(|p| p as i32)
}

/// Directories directly in `dir` whose names start with `prefix`.
fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The directories directly in `dir`.
fn subdir_names(dir: &Path) -> BTreeSet<String> {
    entries_starting_with(dir, "").into_iter().collect()
}

fn controllers(dir: &Path) -> BTreeSet<String> {
    cgroup_read(dir, "cgroup.subtree_control")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn assert_controllers(dir: &Path) {
    let have = controllers(dir);
    for c in ["memory", "pids", "cpu"] {
        assert!(
            have.contains(c),
            "{c} is not enabled in {}/cgroup.subtree_control: {have:?}",
            dir.display()
        );
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn tree_is_as_designed_and_removed_on_shutdown() {
    in_vm();
    let root = vm_cgroup_root("tree");
    let parent = root.path().parent().expect("parent").to_path_buf();
    // What the agent must leave alone: everything outside its root.
    let parent_controllers = cgroup_read(&parent, "cgroup.subtree_control");
    let parent_dirs = subdir_names(&parent);
    let own_cgroup = proc_cgroup(std::process::id() as i32).expect("own cgroup");

    let (pa, pb) = (free_port(), free_port());
    let limits = |app: App| {
        app.workers("memory_max", "64MiB")
            .workers("pids_max", 32)
            .workers("cpu_max", 0.5)
    };
    let apps = format!(
        "{}{}",
        limits(demo_app("alpha", loopback(pa), 2)),
        limits(demo_app("beta", loopback(pb), 1))
    );
    let (mut agent, root_dir) = cgroup_agent("cg-tree", &root, Table::new(), &apps);
    let mut pids = agent.wait_ready("alpha", 2, Duration::from_secs(60));
    pids.extend(agent.wait_ready("beta", 1, Duration::from_secs(60)));

    assert_eq!(
        cgroup_read(&parent, "cgroup.subtree_control"),
        parent_controllers,
        "the agent wrote {}/cgroup.subtree_control",
        parent.display()
    );
    // The agent stays where it was started: it is not in the root, so it is not moved.
    assert_eq!(
        proc_cgroup(agent.pid()).as_deref(),
        Some(own_cgroup.as_str()),
        "the agent moved itself out of its own cgroup"
    );

    let mut expected = BTreeSet::new();
    let mut leaves = Vec::new();
    for app in ["alpha", "beta"] {
        expected.insert(format!("app-{app}"));
        let status = agent.app_json(app);
        for w in workers_json(&status) {
            let slot = w["slot"].as_u64().expect("slot");
            let pid = json_pid(&w).expect("a ready worker has a pid");
            let leaf = leaf_dir(&root_dir, &w);
            let rel = leaf
                .strip_prefix(&root_dir)
                .expect("below the root")
                .to_string_lossy()
                .into_owned();
            let prefix = format!("app-{app}/worker-{slot}-");
            let n = rel.strip_prefix(&prefix).unwrap_or_else(|| {
                panic!("worker {app}/{slot}'s leaf is {rel}, expected {prefix}<n>")
            });
            assert!(
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
                "worker {app}/{slot}'s leaf is {rel}: <n> is not a number"
            );
            expected.insert(rel.clone());
            leaves.push((app, slot, pid, leaf, w));
        }
    }
    assert_eq!(leaves.len(), 3, "{leaves:?}");

    // The exact tree: app-<app> and one worker leaf per worker; `supervisor` (the agent's own
    // leaf, only if it sat in the root) and an empty `prestart` are the only extras allowed.
    let actual = cgroup_subdirs(&root_dir);
    let extras: Vec<&String> = actual
        .iter()
        .filter(|d| !expected.contains(*d))
        .filter(|d| {
            let allowed = d.as_str() == "supervisor"
                || (d.ends_with("/prestart")
                    && d.matches('/').count() == 1
                    && cgroup_procs(&root_dir.join(d)).is_empty());
            !allowed
        })
        .collect();
    assert!(
        extras.is_empty() && expected.is_subset(&actual),
        "cgroup tree under {}:\n  actual   {actual:?}\n  expected {expected:?}\n  unexpected {extras:?}",
        root_dir.display()
    );

    println!("cgroup tree under {}: {actual:?}", root_dir.display());
    assert_controllers(&root_dir);
    for app in ["alpha", "beta"] {
        let dir = root_dir.join(format!("app-{app}"));
        assert_controllers(&dir);
        assert_eq!(
            cgroup_procs(&dir),
            Vec::<i32>::new(),
            "processes in the inner node {}",
            dir.display()
        );
    }
    assert_eq!(
        cgroup_procs(&root_dir),
        Vec::<i32>::new(),
        "processes in the root"
    );

    for (app, slot, pid, leaf, w) in &leaves {
        let at = format!("{app}/{slot} ({})", leaf.display());
        for (file, want) in [
            ("memory.max", "67108864"),
            ("memory.high", "max"),
            ("memory.swap.max", "0"),
            ("memory.oom.group", "1"),
            ("pids.max", "32"),
            ("cpu.max", "50000 100000"),
        ] {
            assert_eq!(cgroup_read(leaf, file), want, "{file} of {at}");
        }
        assert_eq!(
            cgroup_procs(leaf),
            vec![*pid],
            "cgroup.procs of {at}: exactly its worker"
        );
        assert_eq!(
            proc_cgroup(*pid),
            Some(cgroup_name(leaf)),
            "/proc/{pid}/cgroup of {at}"
        );
        // Status numbers come from the leaf.
        let current: u64 = cgroup_read(leaf, "memory.current")
            .parse()
            .expect("memory.current");
        let rss = w["rss_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("rss_bytes of {at}: {w}"));
        let peak = w["peak_rss_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("peak_rss_bytes of {at}: {w}"));
        assert!(
            rss > 0 && rss <= 64 * MIB && rss.abs_diff(current) < 8 * MIB,
            "rss_bytes {rss} of {at} is not its memory.current ({current})"
        );
        assert!(
            peak > 0 && peak <= 64 * MIB,
            "peak_rss_bytes {peak} of {at} is not a memory.peak under memory.max"
        );
        let tasks = w["pids"]
            .as_u64()
            .unwrap_or_else(|| panic!("\"pids\" of {at}: {w}"));
        let pids_current: u64 = cgroup_read(leaf, "pids.current")
            .parse()
            .expect("pids.current");
        // Read a moment apart: a worker still starting its threads may have one more by now.
        assert!(
            (1..=32).contains(&tasks) && tasks.abs_diff(pids_current) <= 1,
            "\"pids\" {tasks} of {at}: pids.current is {pids_current}"
        );
    }

    assert_eq!(agent.stop(Duration::from_secs(30)), Some(0), "agent exit");
    let left = entries_starting_with(&root_dir, "app-");
    assert!(
        left.is_empty(),
        "app directories left after SIGTERM: {left:?} (tree {:?})",
        cgroup_subdirs(&root_dir)
    );
    assert!(root_dir.is_dir(), "the agent removed the root it was given");
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} outlived the agent");
    }
    // Nothing outside the root changed.
    assert_eq!(
        cgroup_read(&parent, "cgroup.subtree_control"),
        parent_controllers,
        "{}/cgroup.subtree_control changed",
        parent.display()
    );
    assert_eq!(
        subdir_names(&parent),
        parent_dirs,
        "cgroups appeared or went next to the root in {}",
        parent.display()
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn oom_kill_is_attributed_and_restarted() {
    in_vm();
    let root = vm_cgroup_root("oom");
    let port = free_port();
    let addr = loopback(port);
    let apps = demo_app("web", loopback(port), 3).workers("memory_max", "64MiB");
    let (agent, _) = cgroup_agent("cg-oom", &root, Table::new(), &apps);
    let before = agent.wait_ready("web", 3, Duration::from_secs(60));

    // Whichever worker takes this request touches 200 MiB under a 64 MiB cap: the kernel
    // kills it mid-request, so the request cannot succeed.
    let answer = http_get(addr, "/?alloc_mb=200");
    assert!(
        !matches!(answer, Ok((200, _))),
        "a worker allocated 200 MiB under memory_max = 64MiB and answered: {answer:?}"
    );

    let want = "oom-killed at memory.max = 64MiB";
    let (slot, killed) = wait_for(
        Duration::from_secs(60),
        "an OOM-killed worker restarted",
        || {
            let app = agent.app("web");
            let w = app.workers.iter().find(|w| {
                w.last_exit.as_deref() == Some(want)
                    && w.restarts >= 1
                    && w.state == "ready"
                    && w.pid.is_some_and(|p| p != before[w.slot as usize])
            })?;
            Some((w.slot, before[w.slot as usize]))
        },
    );
    assert!(
        !pid_alive(killed),
        "the OOM-killed worker {killed} is alive"
    );
    let app = agent.app("web");
    println!(
        "slot {slot}: pid {killed} {want}, restarted as {:?}",
        app.workers
            .iter()
            .find(|w| w.slot == slot)
            .and_then(|w| w.pid)
    );
    assert_eq!(app.workers.len(), 3, "{app:#?}");
    for w in &app.workers {
        // Counted per slot (corral status --json, and corral_worker_oom_kills_total).
        assert_eq!(
            w.oom_kills,
            u64::from(w.slot == slot),
            "oom_kills of slot {}",
            w.slot
        );
        if w.slot == slot {
            continue;
        }
        assert_eq!(
            (w.restarts, w.pid, w.state.as_str()),
            (0, Some(before[w.slot as usize]), "ready"),
            "slot {} was touched by slot {slot}'s OOM kill: {w:#?}",
            w.slot
        );
    }
    let log = agent.log();
    assert!(log.contains(want), "no `{want}` in the log:\n{log}");
    let (status, body) = http_get(addr, "/").expect("GET / after the OOM kill");
    assert_eq!(status, 200, "{body}");
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn memory_high_recycles_without_failed_requests() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    in_vm();
    let root = vm_cgroup_root("high");
    let port = free_port();
    let addr = loopback(port);
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "256MiB")
        .workers("memory_high", "64MiB");
    let (agent, _) = cgroup_agent("cg-high", &root, Table::new(), &apps);
    let before = agent.wait_ready("web", 2, Duration::from_secs(60));

    // A client that keeps asking, one connection per request, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (stop, ok, failures) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failures));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match http_get(addr, "/") {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().expect("lock").push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_for(
        Duration::from_secs(10),
        "the client's first answers",
        || (ok.load(Ordering::SeqCst) >= 5).then_some(()),
    );

    // 100 MiB crosses memory.high (64 MiB) and stays under memory.max (256 MiB): the kernel
    // throttles the worker and the agent replaces it. The request itself may never be
    // answered; its outcome is not counted.
    let hog = std::thread::spawn(move || {
        let _ = http_get(addr, "/?alloc_mb=100");
    });
    let hog_pid = wait_for(
        Duration::from_secs(30),
        "a worker holding the allocation",
        || {
            before.iter().copied().find(|&pid| {
                proc_status(pid)
                    .iter()
                    .find(|(k, _)| k == "VmRSS")
                    .and_then(|(_, v)| v.split_whitespace().next()?.parse::<u64>().ok())
                    .is_some_and(|kb| kb * 1024 > 48 * MIB)
            })
        },
    );
    let hog_slot = before.iter().position(|&p| p == hog_pid).expect("slot");

    let crossed = "crossed memory.high = 64MiB; replacing it";
    wait_for(Duration::from_secs(15), "the memory.high log line", || {
        agent.log().contains(crossed).then_some(())
    });
    wait_for(
        Duration::from_secs(30),
        "the worker over memory.high replaced and gone",
        || {
            let app = agent.app("web");
            let mut ws = app.workers;
            ws.sort_by_key(|w| w.slot);
            let done = ws.len() == 2
                && ws.iter().all(|w| w.state == "ready")
                && ws[hog_slot].pid.is_some_and(|p| p != hog_pid)
                && ws[1 - hog_slot].pid == Some(before[1 - hog_slot])
                && !pid_alive(hog_pid);
            done.then_some(())
        },
    );
    // A little more traffic on the new worker, then stop the client.
    let served = ok.load(Ordering::SeqCst);
    wait_for(
        Duration::from_secs(10),
        "answers after the replacement",
        || (ok.load(Ordering::SeqCst) >= served + 5).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    let _ = hog.join();

    let failures = failures.lock().expect("lock");
    println!(
        "memory.high: slot {hog_slot} pid {hog_pid} replaced; the client made {} requests, {} failed",
        ok.load(Ordering::SeqCst) + failures.len() as u64,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed while the worker was replaced: {failures:#?}\nlog:\n{}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst),
        agent.log()
    );
    let app = agent.app("web");
    let other = app
        .workers
        .iter()
        .find(|w| w.slot as usize != hog_slot)
        .expect("the other slot");
    assert_eq!(
        other.pid,
        Some(before[1 - hog_slot]),
        "the worker under memory.high was not the only one replaced: {app:#?}"
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn pids_max_contains_a_fork_bomb_and_stop_leaves_nothing() {
    in_vm();
    let root = vm_cgroup_root("pids");
    let port = free_port();
    let addr = loopback(port);
    // Two serving threads: the worker is 3 tasks, well under pids.max = 16.
    let apps = demo_app("web", loopback(port), 1)
        .env("DEMO_THREADS", 2)
        .workers("pids_max", 16);
    let (mut agent, root_dir) = cgroup_agent("cg-pids", &root, Table::new(), &apps);
    let worker = agent.wait_ready("web", 1, Duration::from_secs(60))[0];
    let status = agent.app_json("web");
    let leaf = leaf_dir(&root_dir, &workers_json(&status)[0]);
    assert_eq!(cgroup_read(&leaf, "pids.max"), "16", "{}", leaf.display());

    // Children that escape a missing pids cap are not the agent's to clean up: kill them here.
    let escaped = KillOnDrop::new();
    let (status, body) =
        http_get(addr, "/?fork_children=64&child_ignores_term=1").expect("GET fork_children");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    let children: Vec<i32> = v["children"]
        .as_array()
        .unwrap_or_else(|| panic!("no children in {body}"))
        .iter()
        .filter_map(|p| p.as_i64().map(|p| p as i32))
        .collect();
    escaped.add(children.iter().copied());
    assert!(
        v["fork_error"].is_string(),
        "64 forks under pids.max = 16 all succeeded: {body}"
    );
    assert!(
        !children.is_empty() && children.len() < 16,
        "{} children under pids.max = 16: {body}",
        children.len()
    );
    println!(
        "pids.max = 16: {} children, then {}",
        children.len(),
        v["fork_error"]
    );
    for &c in &children {
        assert!(pid_alive(c), "child {c} is not running");
        assert_eq!(
            proc_cgroup(c),
            Some(cgroup_name(&leaf)),
            "child {c} is not in its worker's leaf"
        );
    }
    let tasks = agent.app_json("web")["workers"][0]["pids"]
        .as_u64()
        .unwrap_or_else(|| panic!("no \"pids\" in the worker's status"));
    assert!(
        tasks > children.len() as u64 && tasks <= 16,
        "\"pids\" is {tasks} with {} children under pids.max = 16",
        children.len()
    );

    assert_eq!(agent.stop(Duration::from_secs(60)), Some(0), "agent exit");
    assert!(!pid_alive(worker), "worker {worker} outlived the agent");
    let alive: Vec<i32> = children.iter().copied().filter(|&c| pid_alive(c)).collect();
    assert!(
        alive.is_empty(),
        "children ignoring SIGTERM outlived the agent: {alive:?} (of {children:?})"
    );
    assert!(!leaf.exists(), "{} is left after stop", leaf.display());
    let left = entries_starting_with(&root_dir, "app-");
    assert!(left.is_empty(), "app directories left after stop: {left:?}");
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .expect("read /proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("MemTotal in /proc/meminfo")
        * 1024
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
#[allow(non_snake_case)] // named after the sizes it checks: 4 x 1GiB in 3GiB
fn budget_refuses_4_x_1GiB_in_3GiB_and_overcommit_allows_it() {
    in_vm();
    let total = mem_total();
    assert!(
        total < (4 << 30) + 64 * MIB,
        "this VM has MemTotal {total}: 4 x 1GiB would fit (xtask boots it with -m 3G)"
    );
    let root = vm_cgroup_root("budget");
    let port = free_port();
    let apps = demo_app("big", loopback(port), 4).workers("memory_max", "1GiB");

    // Over budget: the agent refuses to start, with the numbers.
    let dir = TempDir::new("cg-budget-refused");
    let config = write_config(
        dir.path(),
        &AgentTable::private(dir.path()).merge(root.agent_settings()),
        &apps,
    );
    let out_path = dir.path().join("agent.out");
    let err_path = dir.path().join("agent.err");
    let mut child = Command::new(bin("corral"))
        .args(["agent", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn corral agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            // It started (a failure): its workers and keeper outlive a SIGKILL; the guard
            // empties the cgroups, the keeper is killed here.
            let _ = child.kill();
            let _ = child.wait();
            let spool = dir.path().join("run/keeper.spool");
            for pid in processes_with_arg(&spool.to_string_lossy()) {
                // SAFETY: this test's keeper (its argv names this test's directory).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "corral agent over budget (MemTotal {total}) did not exit 1 ({status:?}); stderr:\n{stderr}"
    );
    println!(
        "MemTotal {total}: {}",
        stderr
            .lines()
            .find(|l| l.contains("memory budget"))
            .unwrap_or("")
    );
    for want in ["memory budget exceeded", "big", "4 x 1GiB"] {
        assert!(stderr.contains(want), "no `{want}` in stderr:\n{stderr}");
    }
    let made = entries_starting_with(root.path(), "app-");
    assert!(made.is_empty(), "a refused agent made cgroups: {made:?}");

    // allow_overcommit = true: it starts (and says so), each worker capped at 1GiB.
    let (agent, root_dir) = cgroup_agent(
        "cg-budget-overcommit",
        &root,
        Table::new().set("allow_overcommit", true),
        &apps,
    );
    agent.wait_ready("big", 4, Duration::from_secs(90));
    let log = agent.log();
    assert!(
        log.contains("memory budget exceeded"),
        "no overcommit warning in the log:\n{log}"
    );
    for w in workers_json(&agent.app_json("big")) {
        let leaf = leaf_dir(&root_dir, &w);
        assert_eq!(
            cgroup_read(&leaf, "memory.max"),
            "1073741824",
            "memory.max of {}",
            leaf.display()
        );
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn a_restarted_agent_adopts_a_crashed_ones_leaves_and_removes_those_nobody_holds() {
    in_vm();
    let root = vm_cgroup_root("stale");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2).workers("memory_max", "64MiB");
    let (mut agent, root_dir) = cgroup_agent("cg-stale", &root, Table::new(), &apps);
    let old = agent.wait_ready("web", 2, Duration::from_secs(60));
    let old_leaves = cgroup_subdirs(&root_dir.join("app-web"));
    assert_eq!(old_leaves.len(), 2, "{old_leaves:?}");
    // A crash: the keeper holds the workers; the next agent adopts them in their leaves.
    agent.kill9();
    agent.spawn();
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(60)), old);
    assert_eq!(cgroup_subdirs(&root_dir.join("app-web")), old_leaves);
    for w in agent.app("web").workers {
        let leaf = w.cgroup.clone().unwrap_or_default();
        assert!(
            old_leaves.iter().any(|l| leaf.ends_with(l.as_str())),
            "{leaf} adopted"
        );
    }
    // The agent, its keeper and the workers all killed (nothing holds them): the leaves
    // stay behind, empty, and the next agent removes them.
    agent.kill9();
    let spool = agent.socket.with_file_name("keeper.spool");
    for pid in processes_with_arg(&spool.to_string_lossy()) {
        // SAFETY: this test's keeper.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for pid in &old {
        // SAFETY: this test's workers.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.iter().any(|p| pid_alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "workers outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cgroup_subdirs(&root_dir.join("app-web")),
        old_leaves,
        "stale leaves remain"
    );
    agent.spawn();
    let new = agent.wait_ready("web", 2, Duration::from_secs(60));
    let new_leaves = cgroup_subdirs(&root_dir.join("app-web"));
    assert_eq!(
        new_leaves.len(),
        2,
        "only the new workers' leaves: {new_leaves:?}"
    );
    // (The restarted agent numbers its workers from scratch, so leaf names may repeat: what
    // counts is that every leaf holds a new worker and nothing else.)
    let mut held = Vec::new();
    for leaf in &new_leaves {
        let procs = cgroup_procs(&root_dir.join("app-web").join(leaf));
        assert_eq!(procs.len(), 1, "{leaf}: {procs:?}");
        held.extend(procs);
    }
    held.sort();
    let mut want = new.clone();
    want.sort();
    assert_eq!(held, want, "the leaves hold exactly the new workers");
    assert!(
        agent.log().contains("removed stale cgroup"),
        "{}",
        agent.log()
    );
}

/// With clone3 refused (no CLONE_INTO_CGROUP), a worker joins its leaf itself before it drops
/// its privileges: the tree, the limits and the accounting are the same.
#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn without_clone3_workers_still_run_in_their_own_leaves() {
    in_vm();
    let root = vm_cgroup_root("noclone3");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "64MiB")
        .workers("pids_max", 32);
    let agent = Agent::start_without_clone3("cg-noclone3", root.agent_settings(), &apps);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(60));
    let root_dir = root.path().to_path_buf();
    for w in workers_json(&agent.app_json("web")) {
        let pid = json_pid(&w).expect("a ready worker has a pid");
        let leaf = leaf_dir(&root_dir, &w);
        assert_eq!(cgroup_procs(&leaf), vec![pid], "{}", leaf.display());
        assert_eq!(proc_cgroup(pid), Some(cgroup_name(&leaf)));
        assert_eq!(cgroup_read(&leaf, "memory.max"), "67108864");
        assert_eq!(cgroup_read(&leaf, "pids.max"), "32");
    }
    assert_eq!(cgroup_procs(&root_dir.join("app-web")), Vec::<i32>::new());
    assert!(
        pids.iter().all(|p| proc_status(*p)
            .iter()
            .any(|(k, v)| k == "Seccomp" && v == "2")),
        "the workers run under the test's filter"
    );
    assert!(
        agent.log().contains("clone3 is refused with ENOSYS"),
        "{}",
        agent.log()
    );
}

/// `corral reexec` keeps each worker in its leaf: the new image adopts the app's cgroup (it is
/// not stale), a worker killed afterwards gets a leaf of its own, a stop removes the tree.
#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn reexec_keeps_workers_in_their_leaves() {
    in_vm();
    let root = vm_cgroup_root("reexec");
    let port = free_port();
    let apps = demo_app("web", loopback(port), 2)
        .workers("memory_max", "64MiB")
        .workers("memory_high", "48MiB");
    let (mut agent, root_dir) = cgroup_agent("cg-reexec", &root, Table::new(), &apps);
    let pids = agent.wait_ready("web", 2, Duration::from_secs(60));
    let leaves = |agent: &Agent| -> Vec<(i32, PathBuf)> {
        workers_json(&agent.app_json("web"))
            .iter()
            .map(|w| (json_pid(w).expect("pid"), leaf_dir(&root_dir, w)))
            .collect()
    };
    let before = leaves(&agent);
    let (code, said) = agent.reexec();
    assert_eq!(code, 0, "{said}");
    assert_eq!(agent.wait_ready("web", 2, Duration::from_secs(20)), pids);
    let after = leaves(&agent);
    assert_eq!(after, before, "the same workers in the same leaves");
    for (pid, leaf) in &after {
        assert_eq!(cgroup_procs(leaf), vec![*pid], "{}", leaf.display());
        assert_eq!(cgroup_read(leaf, "memory.max"), "67108864");
    }
    assert!(
        !agent.log().contains("removed stale cgroup"),
        "{}",
        agent.log()
    );
    // SAFETY: pids[0] is one of this test's workers.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let now = wait_for(Duration::from_secs(20), "worker 0 replaced", || {
        let now = agent.wait_ready("web", 2, Duration::from_secs(20));
        (now[0] != pids[0]).then_some(now)
    });
    let replaced = leaves(&agent);
    let (_, new_leaf) = replaced
        .iter()
        .find(|(p, _)| *p == now[0])
        .expect("new worker");
    assert_ne!(new_leaf, &before[0].1, "a new leaf for the new worker");
    wait_for(Duration::from_secs(10), "the old leaf removed", || {
        (!before[0].1.exists()).then_some(())
    });
    assert_eq!(agent.stop(Duration::from_secs(30)), Some(0));
    assert!(
        !root_dir.join("app-web").exists(),
        "the app's cgroup removed at stop"
    );
}

// ---- The TLS front through kTLS + splice -------------------------------------------------

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
