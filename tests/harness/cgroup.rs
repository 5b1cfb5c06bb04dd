//! cgroup v2 for tests: a private `cgroup_root` that is emptied and removed on drop, and
//! readers of a cgroup tree's directories and interface files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{require_root, Table};

/// Where the VM tier's /init mounts cgroup2.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// A cgroup v2 directory made for one test to hand the agent as `[agent] cgroup_root`; on drop
/// everything still in it is killed and the whole tree is removed bottom-up. Create it before
/// the [`Agent`] that uses it, so the agent (dropped first) stops before the tree goes.
pub struct CgroupRootGuard {
    path: PathBuf,
}

/// In the VM: enable memory, pids and cpu for the children of the cgroup2 root (writing
/// `+memory +pids +cpu` to /sys/fs/cgroup/cgroup.subtree_control) and make
/// /sys/fs/cgroup/corral-<tag>-<pid> (empty, no controllers enabled in it: that is the agent's
/// job).
pub fn vm_cgroup_root(tag: &str) -> CgroupRootGuard {
    require_root();
    let fs = Path::new(CGROUP_FS);
    std::fs::write(fs.join("cgroup.subtree_control"), "+memory +pids +cpu").unwrap_or_else(|e| {
        panic!(
            "enabling memory, pids and cpu in {CGROUP_FS}/cgroup.subtree_control: {e} \
             (cgroup.controllers: {:?})",
            std::fs::read_to_string(fs.join("cgroup.controllers")).unwrap_or_default()
        )
    });
    let path = fs.join(format!("corral-{tag}-{}", std::process::id()));
    if path.exists() {
        remove_cgroup_tree(&path);
    }
    std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    CgroupRootGuard { path }
}

impl CgroupRootGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `cgroup_root` for the `[agent]` table.
    pub fn agent_settings(&self) -> Table {
        Table::new().set("cgroup_root", self.path.as_path())
    }
}

impl Drop for CgroupRootGuard {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
        if self.path.exists() && !std::thread::panicking() {
            eprintln!(
                "warning: cgroup {} could not be removed: {:?}",
                self.path.display(),
                cgroup_tree(&self.path)
            );
        }
    }
}

/// Kill every process in the cgroup `dir` and its descendants, wait until it is empty, then
/// rmdir the tree bottom-up. Best effort: never panics.
pub fn remove_cgroup_tree(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if !dir.exists() {
            return;
        }
        // cgroup.kill (5.14+) kills the whole subtree; otherwise SIGKILL each process.
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for d in cgroup_tree(dir) {
                for pid in cgroup_procs(&d) {
                    if pid > 1 {
                        // SAFETY: kill(2) with a positive pid listed in a test's cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        let empty = Instant::now() + Duration::from_secs(5);
        while cgroup_populated(dir) == Some(true) && Instant::now() < empty {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Deepest first: a directory's children come before it in cgroup_tree's order.
        for d in cgroup_tree(dir) {
            let _ = std::fs::remove_dir(&d);
        }
        if !dir.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every cgroup directory under `dir`, `dir` included, children before their parent.
pub fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for sub in subdirs {
            out.extend(cgroup_tree(&sub));
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

/// The cgroup directories under `dir` (not `dir` itself) as paths relative to it, e.g.
/// `app-web` and `app-web/worker-0-3`.
pub fn cgroup_subdirs(dir: &Path) -> BTreeSet<String> {
    cgroup_tree(dir)
        .into_iter()
        .filter(|d| d != dir)
        .filter_map(|d| {
            d.strip_prefix(dir)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .collect()
}

/// A cgroup interface file, trimmed (empty if it cannot be read).
pub fn cgroup_read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pids in `dir/cgroup.procs`, sorted.
pub fn cgroup_procs(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_read(dir, "cgroup.procs")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// `populated` of `dir/cgroup.events` (`None` if unreadable).
pub fn cgroup_populated(dir: &Path) -> Option<bool> {
    cgroup_read(dir, "cgroup.events")
        .lines()
        .find_map(|l| l.strip_prefix("populated ").map(|v| v.trim() == "1"))
}

/// A cgroup directory as the kernel names it in /proc/PID/cgroup: its path below
/// [`CGROUP_FS`], with a leading `/`.
pub fn cgroup_name(dir: &Path) -> String {
    match dir.strip_prefix(CGROUP_FS) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// The cgroup v2 path of `pid` (the `0::` line of /proc/PID/cgroup).
pub fn proc_cgroup(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}
