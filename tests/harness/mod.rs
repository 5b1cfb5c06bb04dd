//! Test harness: start the real `corral` binary on a config in a private directory, talk to it
//! over its control socket, and clean up everything it started even when a test fails.
//!
//! Binaries come from the cargo target directory next to the test executable; build them first
//! with `cargo build --workspace --bins` (`cargo xtask test` does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use corral::control::{AppStatus, Request, Response, WorkerStatus};
pub use corral_testkit::{
    free_port, loopback, monotonic_ns, pid_alive, started_lines, terminate, AgentTable, App,
    ChildGuard, KillOnDrop, Table, Value,
};

pub mod acme_proxy;
mod agent;
mod cgroup;
pub mod h2;
mod http;
pub mod load;
pub mod pebble;
mod procfs;
pub mod tls;

pub use agent::{demo_app, refused_agent, write_config, Agent};
pub use cgroup::{
    cgroup_name, cgroup_populated, cgroup_procs, cgroup_read, cgroup_subdirs, cgroup_tree,
    proc_cgroup, remove_cgroup_tree, vm_cgroup_root, CgroupRootGuard, CGROUP_FS,
};
pub use http::{curl_https, demo_pid, http_get, http_get_raw};
pub use load::{answered_connections, OpenLoad};
pub use procfs::{hard_nofile, nofile_of, proc_environ, proc_status, processes_with_arg};

/// Run `cmd` to its end; it must succeed (its stderr is the failure message). `what` names it
/// if it cannot be started.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Path of a workspace binary built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// These tests start an agent, which must be root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "host integration tests run the agent, which needs root (run them as root, as CI does)"
    );
}

/// A private directory under /tmp, world-readable so unprivileged workers can reach files in it
/// that a test makes writable; removed on drop.
pub struct TempDir(PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("corral-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A file any worker user may append to.
    pub fn shared_file(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, "").expect("create shared file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
