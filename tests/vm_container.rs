//! corral inside a container, in the VM tier (cgroup v2 with the memory and cpu controllers,
//! which the host lacks): the budget and `count = "auto"` follow the container's memory.max
//! and cpu.max, and a container whose cgroup is read-only is told so. The "container" is what
//! an engine makes: a cgroup with limits, and for the last case a cgroup namespace rooted at
//! it with cgroup2 mounted read-only (or read-write) at /sys/fs/cgroup in a mount namespace.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use corral_tests::*;

fn in_vm() {
    assert_eq!(
        std::env::var("CORRAL_VM").as_deref(),
        Ok("1"),
        "this test runs inside the VM tier's kernel: run it with `cargo xtask vm-test --tests vm_container`"
    );
}

const MIB: u64 = 1 << 20;

/// A "pod" cgroup with memory.max = 300MiB and one CPU of cpu.max.
fn pod_cgroup(tag: &str) -> CgroupRootGuard {
    let pod = vm_cgroup_root(tag);
    std::fs::write(pod.path().join("memory.max"), (300 * MIB).to_string()).expect("memory.max");
    std::fs::write(pod.path().join("cpu.max"), "100000 100000").expect("cpu.max");
    pod
}

/// How `corral check` is run in the pod.
enum Inside {
    /// Only moved into the pod's cgroup.
    Cgroup,
    /// Moved in, then in a cgroup namespace rooted there with cgroup2 mounted at
    /// /sys/fs/cgroup in a new mount namespace, read-only or not.
    Container { read_only: bool },
}

/// `corral check --config CONFIG` run in the pod's cgroup, as `inside` says.
fn check_in(pod: &Path, config: &Path, inside: Inside) -> Output {
    let mut cmd = command_in(pod, inside, &["check"]);
    cmd.arg("--config").arg(config);
    cmd.output().expect("run corral check")
}

/// `corral ARGS...` to be run in the pod's cgroup, as `inside` says.
fn command_in(pod: &Path, inside: Inside, args: &[&str]) -> Command {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(pod.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let (fs, target, root) = (
        CString::new("cgroup2").unwrap(),
        CString::new(CGROUP_FS).unwrap(),
        CString::new("/").unwrap(),
    );
    let container = match inside {
        Inside::Cgroup => None,
        Inside::Container { read_only } => Some(read_only),
    };
    let mut cmd = Command::new(bin("corral"));
    cmd.args(args);
    // Kept open in the parent until the command is spawned (the closure owns it).
    let procs = std::sync::Arc::new(procs);
    let fd = procs.as_raw_fd();
    let keep = procs.clone();
    // SAFETY: between fork and exec only async-signal-safe calls on memory prepared above.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            // "0": the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            let Some(read_only) = container else {
                return Ok(());
            };
            if libc::unshare(libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (null, no_data) = (std::ptr::null(), std::ptr::null());
            if libc::mount(
                null,
                root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                no_data,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The outside's mount first: the same filesystem cannot be mounted on its own root.
            if libc::umount2(target.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(fs.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, no_data) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Read-only per mount, as engines do (the superblock is shared with the
            // read-write mount outside: a read-only mount of it is EBUSY).
            let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
            if read_only && libc::mount(null, target.as_ptr(), null, ro, no_data) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn config(dir: &TempDir, count: Value) -> std::path::PathBuf {
    let app = App::new("api")
        .command([bin("corral-demo").display().to_string()])
        .user("nobody")
        .set("group", "nogroup")
        .address(loopback(free_port()))
        .workers("count", count)
        .workers("memory_max", "100MiB");
    // Not delegated outside a container: the limits cannot be enforced per worker, and the
    // budget is what these tests look at.
    let agent = AgentTable::private(dir.path()).set("enforce_limits", false);
    write_config(dir.path(), &agent, app)
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test --tests vm_container"]
fn the_budget_and_auto_count_follow_the_pods_limits() {
    in_vm();
    let pod = pod_cgroup("pod");
    let dir = TempDir::new("vm-pod");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    // "auto" is one worker: the pod's cpu.max allows one CPU, whatever the VM has.
    let out = check_in(pod.path(), &config(&dir, "auto".into()), Inside::Cgroup);
    let said = text(&out);
    println!("{cpus} CPUs online; corral check in the pod:\n{said}");
    assert!(out.status.success(), "{said}");
    let cpu_max = pod.path().join("cpu.max");
    assert!(
        said.contains(&format!(
            "workers     1 (auto: the agent's cgroup's cpu.max = 100000 100000 at {} allows 1 CPU)",
            cpu_max.display()
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "available is the agent's cgroup's memory.max = 300MiB at {}/memory.max",
            pod.path().display()
        )),
        "{said}"
    );

    // Three workers of 100MiB and the agent's 64MiB do not fit in the pod's 300MiB, however
    // much the VM has: refused, naming the pod's limit.
    let out = check_in(pod.path(), &config(&dir, 3.into()), Inside::Cgroup);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "memory budget exceeded: api 3 x 100MiB = 300MiB, plus 64MiB for the agent = 364MiB, \
             but 300MiB is available (the agent's cgroup's memory.max = 300MiB at {}/memory.max)",
            pod.path().display()
        )),
        "{said}"
    );
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test --tests vm_container"]
fn a_container_names_its_limit_and_says_when_its_cgroup_is_read_only() {
    in_vm();
    let pod = pod_cgroup("ctr");
    let dir = TempDir::new("vm-ctr");

    let out = check_in(
        pod.path(),
        &config(&dir, 3.into()),
        Inside::Container { read_only: true },
    );
    let said = text(&out);
    println!("corral check in a read-only container:\n{said}");
    assert!(
        said.contains("but 300MiB is available (the container's memory.max = 300MiB at /sys/fs/cgroup/memory.max)"),
        "{said}"
    );
    assert!(
        said.contains("the container's cgroup /sys/fs/cgroup is read-only"),
        "{said}"
    );

    // Writable (a privileged container): the container's cgroup is corral's root.
    let out = check_in(
        pod.path(),
        &config(&dir, 1.into()),
        Inside::Container { read_only: false },
    );
    let said = text(&out);
    println!("corral check in a writable container:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("corral's root /sys/fs/cgroup with"), "{said}");
    assert!(!said.contains("read-only"), "{said}");
}

/// A child killed (and reaped) when the test ends, failed or not; its workers die with it.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test --tests vm_container"]
fn in_a_writable_container_each_worker_gets_its_own_memory_max() {
    in_vm();
    let pod = pod_cgroup("priv");
    let dir = TempDir::new("vm-priv");
    let port = free_port();
    let app = App::new("api")
        .command([bin("corral-demo").display().to_string()])
        .user("nobody")
        .set("group", "nogroup")
        .address(loopback(port))
        .count(2)
        .workers("memory_max", "64MiB");
    let agent_table = AgentTable::private(dir.path());
    let config = write_config(dir.path(), &agent_table, app);
    let socket = dir.path().join("run/control.sock");
    let log = dir.path().join("agent.log");
    let mut cmd = command_in(
        pod.path(),
        Inside::Container { read_only: false },
        &["agent"],
    );
    cmd.arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut agent = Killed(cmd.spawn().expect("spawn corral agent"));
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        Duration::from_secs(90),
        "two ready workers in the container",
        || match corral::control::call(
            &socket,
            &Request::Status { app: None },
            Duration::from_secs(5),
        ) {
            Ok(Response::Status { apps, .. }) => apps
                .iter()
                .any(|a| a.workers.len() == 2 && a.workers.iter().all(|w| w.state == "ready"))
                .then_some(()),
            _ => None,
        },
    );
    // Outside the container, its workers' leaves are below the pod's cgroup, each capped.
    let app_dir = pod.path().join("app-api");
    let leaves: Vec<_> = std::fs::read_dir(&app_dir)
        .unwrap_or_else(|e| panic!("{}: {e}; log:\n{}", app_dir.display(), said()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("worker-"))
        .map(|e| e.path())
        .collect();
    assert_eq!(leaves.len(), 2, "{leaves:?}; log:\n{}", said());
    for leaf in &leaves {
        assert_eq!(
            std::fs::read_to_string(leaf.join("memory.max"))
                .unwrap()
                .trim(),
            (64 * MIB).to_string(),
            "{}",
            leaf.display()
        );
    }
    let (status, body) = http_get(loopback(port), "/").expect("GET the app");
    assert_eq!(status, 200, "{body}");
    // SIGTERM: everything stops and corral's cgroups in the container are gone.
    let code = terminate(&mut agent.0, Duration::from_secs(30)).and_then(|s| s.code());
    assert_eq!(code, Some(0), "log:\n{}", said());
    assert!(
        !app_dir.exists(),
        "{} left behind; log:\n{}",
        app_dir.display(),
        said()
    );
}
