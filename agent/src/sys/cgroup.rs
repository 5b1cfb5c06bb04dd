//! cgroup v2 through cgroupfs: which hierarchy the machine has, and corral's own subtree below
//! the cgroup delegated to the agent.
//!
//! ```text
//! <root>/                  the delegated root: the agent's own cgroup (systemd: Delegate=yes)
//!   supervisor/            the agent itself (DelegateSubgroup=supervisor, or moved by `prepare`)
//!   app-<name>/            one per app, enables the needed controllers for its workers
//!     worker-<id>/         one leaf per worker: its limits, its OOM events, its process tree
//! ```
//!
//! Rules this module keeps:
//! - Nothing above the root is ever opened for writing: the root is the only directory opened
//!   by path; everything below it is reached with `openat`/`mkdirat`/`unlinkat` relative to a
//!   directory fd, with `O_NOFOLLOW`, one validated name at a time (no `/`, no `..`). Paths kept
//!   next to the fds are for messages (and inotify) only.
//! - Controllers are enabled (`+name` in `cgroup.subtree_control`) only in the root and in app
//!   cgroups, only if the root's `cgroup.controllers` offers them (offered = delegated), and only
//!   the ones asked for. Nothing is ever disabled.
//! - The no-internal-processes rule: a cgroup with processes cannot enable controllers for its
//!   children, so `prepare` first moves the root's processes into the `supervisor` leaf.
//!
//! Every error names the operation, the file and (for writes) the value.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{kill_process, Pid, Signal};

/// `statfs` magic of a cgroup v2 filesystem.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `statfs` magic of a cgroup v1 filesystem (one controller hierarchy).
pub const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;
/// `statfs` magic of tmpfs: what `/sys/fs/cgroup` is in the hybrid and legacy layouts.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;

/// `cpu.max` period; quotas are expressed against it.
pub const CPU_PERIOD_USEC: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const CPU_MIN_QUOTA_USEC: u64 = 1_000;
/// The leaf the agent's own processes live in.
pub const SUPERVISOR: &str = "supervisor";
const APP_PREFIX: &str = "app-";
const WORKER_PREFIX: &str = "worker-";
/// Rounds of "read cgroup.procs, SIGKILL what is new" before the fallback kill gives up.
const KILL_ROUNDS: u32 = 100;
/// Rounds of "move what is left in the root" in `prepare` (the agent might be forking).
const MOVE_ROUNDS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing `{value}` to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot parse {text:?}: {reason}")]
    Parse {
        path: PathBuf,
        text: String,
        reason: &'static str,
    },
    #[error("{path} is not a cgroup filesystem nor a tmpfs holding cgroup mounts (statfs magic {magic:#x})")]
    UnknownFs { path: PathBuf, magic: u64 },
    #[error("{path} is not on a cgroup2 filesystem (statfs magic {magic:#x})")]
    NotCgroup2 { path: PathBuf, magic: u64 },
    #[error("{path} is the root of the cgroup hierarchy, not a cgroup delegated to corral (run it under systemd with Delegate=yes, or in a cgroup of its own)")]
    HierarchyRoot { path: PathBuf },
    #[error("{path} already exists and has processes in it")]
    InUse { path: PathBuf },
    #[error("removing {path}: it still has processes or child cgroups (EBUSY)")]
    Busy { path: PathBuf },
    #[error("sending SIGKILL to pid {pid} of {path}: {source}")]
    Signal {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: new processes keep appearing after {rounds} rounds of SIGKILL")]
    KillIncomplete { path: PathBuf, rounds: u32 },
    #[error(
        "processes keep appearing in {path} after {rounds} rounds of moving them to {SUPERVISOR}/"
    )]
    MoveIncomplete { path: PathBuf, rounds: u32 },
    #[error("invalid {what} {value}: {reason}")]
    InvalidLimit {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

// ---------------------------------------------------------------------------------------------
// Controllers

/// A cgroup v2 controller corral knows by name. Others in `cgroup.controllers` are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    Io,
    Cpuset,
    Hugetlb,
    Rdma,
    Misc,
}

impl Controller {
    pub const ALL: [Controller; 8] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Io,
        Controller::Cpuset,
        Controller::Hugetlb,
        Controller::Rdma,
        Controller::Misc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Io => "io",
            Controller::Cpuset => "cpuset",
            Controller::Hugetlb => "hugetlb",
            Controller::Rdma => "rdma",
            Controller::Misc => "misc",
        }
    }

    pub fn from_name(name: &str) -> Option<Controller> {
        Controller::ALL.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of controllers, iterated in [`Controller::ALL`] order.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Controllers(u16);

impl Controllers {
    pub const NONE: Controllers = Controllers(0);

    /// The names in a `cgroup.controllers` or `cgroup.subtree_control` file; unknown names are
    /// ignored.
    pub fn parse(text: &str) -> Controllers {
        text.split_whitespace()
            .filter_map(Controller::from_name)
            .collect()
    }

    pub fn contains(self, c: Controller) -> bool {
        self.0 & c.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Those in both sets.
    pub fn and(self, other: Controllers) -> Controllers {
        Controllers(self.0 & other.0)
    }

    /// Those in `self` but not in `other`.
    pub fn without(self, other: Controllers) -> Controllers {
        Controllers(self.0 & !other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Controller> {
        Controller::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }

    /// What to write to `cgroup.subtree_control` to enable these: `+memory +pids +cpu`.
    fn enable_line(self) -> String {
        self.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl FromIterator<Controller> for Controllers {
    fn from_iter<I: IntoIterator<Item = Controller>>(iter: I) -> Controllers {
        Controllers(iter.into_iter().fold(0, |acc, c| acc | c.bit()))
    }
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<_> = self.iter().map(Controller::name).collect();
        f.write_str(&names.join(" "))
    }
}

impl fmt::Debug for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Detection

/// How cgroups are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// cgroup2 at the mount point: every controller is on v2.
    Unified,
    /// tmpfs with v1 controller hierarchies, and cgroup2 (usually without controllers) at
    /// `unified_at`: systemd's hybrid layout.
    Hybrid { unified_at: PathBuf },
    /// Only v1 hierarchies: corral cannot place or limit workers.
    Legacy,
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kind: Kind,
    /// Where the cgroup2 filesystem is mounted (the mount point, or `unified_at`).
    pub v2_mount: Option<PathBuf>,
    /// The agent's own cgroup, from the `0::` line of /proc/self/cgroup (`/` is the root).
    pub own_cgroup: Option<PathBuf>,
    /// The delegated root as a directory: the agent's own cgroup, or its parent when the agent
    /// sits in a leaf named `supervisor` (systemd's `DelegateSubgroup=supervisor`, or a
    /// previous `Root::prepare`). Pass it to [`Root::open`].
    pub root: Option<PathBuf>,
    /// The root's `cgroup.controllers`: what its parent enabled for it. For a delegated cgroup
    /// these are the delegated controllers; a needed one missing here cannot be enabled below.
    pub available: Controllers,
    /// The root's `cgroup.subtree_control`: already enabled for its children.
    pub enabled_for_children: Controllers,
}

/// Detect the cgroup layout under `mount` (normally `/sys/fs/cgroup`) and the agent's place in
/// it. Reads only.
pub fn detect(mount: &Path) -> Result<Detected, CgroupError> {
    let proc_path = Path::new("/proc/self/cgroup");
    let proc = std::fs::read_to_string(proc_path).map_err(|source| CgroupError::Io {
        op: "read",
        path: proc_path.to_path_buf(),
        source,
    })?;
    let mount_magic = statfs_magic(mount)?;
    let unified_at = mount.join("unified");
    let kind = classify(mount, mount_magic, || statfs_magic(&unified_at).ok())?;
    let v2_mount = match &kind {
        Kind::Unified => Some(mount.to_path_buf()),
        Kind::Hybrid { unified_at } => Some(unified_at.clone()),
        Kind::Legacy => None,
    };
    let own_cgroup = v2_mount.as_ref().and_then(|_| parse_proc_cgroup(&proc));
    let root = match (&v2_mount, &own_cgroup) {
        (Some(m), Some(own)) => {
            let rel = delegated_root(own);
            let rel = rel.strip_prefix("/").unwrap_or(rel);
            Some(if rel.as_os_str().is_empty() {
                m.clone()
            } else {
                m.join(rel)
            })
        }
        _ => None,
    };
    let (mut available, mut enabled_for_children) = (Controllers::NONE, Controllers::NONE);
    if let Some(r) = &root {
        available = Controllers::parse(&read_path(&r.join("cgroup.controllers"))?);
        enabled_for_children = Controllers::parse(&read_path(&r.join("cgroup.subtree_control"))?);
    }
    Ok(Detected {
        kind,
        v2_mount,
        own_cgroup,
        root,
        available,
        enabled_for_children,
    })
}

fn read_path(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn statfs_magic(path: &Path) -> Result<u64, CgroupError> {
    let st = rustix::fs::statfs(path).map_err(|e| CgroupError::Io {
        op: "statfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.f_type as u64)
}

/// The layout from the mount point's magic and, only asked for tmpfs, the magic of
/// `<mount>/unified` (`None` if it does not exist).
fn classify(
    mount: &Path,
    magic: u64,
    unified_magic: impl FnOnce() -> Option<u64>,
) -> Result<Kind, CgroupError> {
    match magic {
        CGROUP2_SUPER_MAGIC => Ok(Kind::Unified),
        TMPFS_MAGIC => Ok(match unified_magic() {
            Some(CGROUP2_SUPER_MAGIC) => Kind::Hybrid {
                unified_at: mount.join("unified"),
            },
            _ => Kind::Legacy,
        }),
        CGROUP_SUPER_MAGIC => Ok(Kind::Legacy),
        _ => Err(CgroupError::UnknownFs {
            path: mount.to_path_buf(),
            magic,
        }),
    }
}

/// The v2 path in /proc/self/cgroup (the `0::/path` line), if there is one and it lies inside
/// this cgroup namespace (no `..` components).
pub fn parse_proc_cgroup(text: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = Path::new(path);
    let ok = path.has_root()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

/// The delegated root for an agent in cgroup `own`: its parent when the agent sits in its
/// `supervisor` leaf, `own` otherwise.
fn delegated_root(own: &Path) -> &Path {
    match own.parent() {
        Some(parent) if own.file_name().is_some_and(|n| n == SUPERVISOR) => parent,
        _ => own,
    }
}

// ---------------------------------------------------------------------------------------------
// Flat-keyed files

/// `key value` lines (memory.events, cpu.stat, cgroup.events, ...).
pub fn flat_keyed(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let mut it = l.split_whitespace();
        Some((it.next()?, it.next()?))
    })
}

/// The numeric value of `key` in a flat-keyed file.
pub fn flat_value(text: &str, key: &str) -> Option<u64> {
    flat_keyed(text)
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Counters of `memory.events`. Keys the kernel does not have (oom_group_kill before 5.13) read
/// as 0. The counters only grow: compare with the previous read to see what happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    pub low: u64,
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
    pub oom_group_kill: u64,
}

impl MemoryEvents {
    pub fn parse(text: &str) -> MemoryEvents {
        let v = |k| flat_value(text, k).unwrap_or(0);
        MemoryEvents {
            low: v("low"),
            high: v("high"),
            max: v("max"),
            oom: v("oom"),
            oom_kill: v("oom_kill"),
            oom_group_kill: v("oom_group_kill"),
        }
    }
}

/// `cgroup.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupEvents {
    /// Some process lives in this cgroup or below.
    pub populated: bool,
    pub frozen: bool,
}

impl CgroupEvents {
    /// `None` without a `populated` line.
    pub fn parse(text: &str) -> Option<CgroupEvents> {
        Some(CgroupEvents {
            populated: flat_value(text, "populated")? != 0,
            frozen: flat_value(text, "frozen").unwrap_or(0) != 0,
        })
    }
}

/// The pids in a `cgroup.procs` text, one per line.
fn parse_pids(text: &str) -> Option<Vec<i32>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Names

/// Check one path component of corral's subtree: not empty, no `/`, not `.` or `..`, no NUL or
/// control characters, at most 200 bytes (room for a prefix within NAME_MAX).
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.contains('/') {
        Some("contains `/`")
    } else if name == "." || name == ".." {
        Some("is `.` or `..`")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.len() > 200 {
        Some("longer than 200 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// A directory of cgroupfs, held by fd

const DIR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
// O_TRUNC: what `echo value > file` does; cgroupfs ignores it.
const WRITE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::TRUNC)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// One cgroup directory: an `O_PATH` fd and, for messages, its path.
#[derive(Debug)]
struct Node {
    fd: OwnedFd,
    path: PathBuf,
    /// Test seam: the directory is a plain temp-dir fixture, where `mkdir` does not create the
    /// interface files and `rmdir` does not remove them (see `tests::fixture_*`).
    #[cfg(test)]
    fixture: bool,
}

fn io_err(op: &'static str, path: PathBuf) -> impl FnOnce(Errno) -> CgroupError {
    move |e| CgroupError::Io {
        op,
        path,
        source: e.into(),
    }
}

impl Node {
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn open_file(&self, name: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        loop {
            match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    fn read_errno(&self, name: &str) -> Result<String, Errno> {
        let fd = self.open_file(name, READ_FLAGS)?;
        let mut text = String::new();
        File::from(fd)
            .read_to_string(&mut text)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        Ok(text)
    }

    fn read(&self, name: &str) -> Result<String, CgroupError> {
        self.read_errno(name)
            .map_err(io_err("read", self.file(name)))
    }

    /// `None` if the file does not exist (an interface file this kernel lacks).
    fn read_opt(&self, name: &str) -> Result<Option<String>, CgroupError> {
        match self.read_errno(name) {
            Ok(t) => Ok(Some(t)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err("read", self.file(name))(e)),
        }
    }

    fn write_errno(&self, name: &str, value: &str) -> Result<(), Errno> {
        let fd = self.open_file(name, WRITE_FLAGS)?;
        write_all(&fd, value)
    }

    fn write(&self, name: &str, value: &str) -> Result<(), CgroupError> {
        self.write_errno(name, value)
            .map_err(|e| self.write_error(name, value, e))
    }

    fn write_error(&self, name: &str, value: &str, e: Errno) -> CgroupError {
        CgroupError::Write {
            path: self.file(name),
            value: value.to_string(),
            source: e.into(),
        }
    }

    fn controllers(&self) -> Result<Controllers, CgroupError> {
        Ok(Controllers::parse(&self.read("cgroup.controllers")?))
    }

    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let text = self.read("cgroup.procs")?;
        parse_pids(&text).ok_or_else(|| CgroupError::Parse {
            path: self.file("cgroup.procs"),
            text,
            reason: "expected one pid per line",
        })
    }

    fn exists(&self, name: &str) -> Result<bool, CgroupError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err("stat", self.file(name))(e)),
        }
    }

    fn child_node(&self, fd: OwnedFd, name: &str) -> Node {
        Node {
            fd,
            path: self.file(name),
            #[cfg(test)]
            fixture: self.fixture,
        }
    }

    /// Open the child cgroup `name` (validated by the caller).
    fn open_child(&self, name: &str) -> Result<Node, CgroupError> {
        let fd = self
            .open_file(name, DIR_FLAGS)
            .map_err(io_err("open", self.file(name)))?;
        Ok(self.child_node(fd, name))
    }

    /// Create the child cgroup `name` (validated by the caller), or open it if it exists.
    /// Returns whether it was created.
    fn make_child(&self, name: &str) -> Result<(Node, bool), CgroupError> {
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io_err("mkdir", self.file(name))(e)),
        };
        #[cfg(test)]
        if created && self.fixture {
            tests::fixture_after_mkdir(self, name);
        }
        Ok((self.open_child(name)?, created))
    }

    /// Remove the child cgroup `name`; already gone is fine.
    fn remove_child(&self, name: &str) -> Result<(), CgroupError> {
        #[cfg(test)]
        if self.fixture {
            tests::fixture_before_rmdir(self, name);
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::BUSY) => Err(CgroupError::Busy {
                path: self.file(name),
            }),
            Err(e) => Err(io_err("rmdir", self.file(name))(e)),
        }
    }

    /// Names of child directories starting with `prefix` (the prefix stripped).
    fn children(&self, prefix: &str) -> Result<Vec<String>, CgroupError> {
        let list_err = || io_err("list", self.path.clone());
        let fd = self
            .open_file(".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC)
            .map_err(list_err())?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::new(fd).map_err(list_err())? {
            let entry = entry.map_err(list_err())?;
            if entry.file_type() != FileType::Directory {
                continue;
            }
            if let Some(rest) = entry
                .file_name()
                .to_str()
                .ok()
                .and_then(|n| n.strip_prefix(prefix))
            {
                names.push(rest.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn try_clone(&self) -> Result<Node, CgroupError> {
        let fd = self.fd.try_clone().map_err(|source| CgroupError::Io {
            op: "dup fd of",
            path: self.path.clone(),
            source,
        })?;
        Ok(Node {
            fd,
            path: self.path.clone(),
            #[cfg(test)]
            fixture: self.fixture,
        })
    }

    /// Enable `want` for this cgroup's children, writing only what is not enabled yet.
    fn enable(&self, want: Controllers) -> Result<(), CgroupError> {
        let current = Controllers::parse(&self.read("cgroup.subtree_control")?);
        let add = want.without(current);
        if add.is_empty() {
            return Ok(());
        }
        self.write("cgroup.subtree_control", &add.enable_line())
    }
}

fn write_all(fd: &OwnedFd, value: &str) -> Result<(), Errno> {
    loop {
        match rustix::io::write(fd, value.as_bytes()) {
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
            // cgroupfs takes a value in one write; a short write would have applied a prefix.
            Ok(n) if n != value.len() => return Err(Errno::IO),
            Ok(_) => return Ok(()),
        }
    }
}

/// Read a whole small file from offset 0 through `fd` (for an [`Leaf::events_fd`] after a
/// notification: no reopen).
pub fn read_fd(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match rustix::io::pread(fd, &mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

// ---------------------------------------------------------------------------------------------
// Root

/// The delegated root: the one cgroup directory corral opens by path. Everything corral
/// creates is below it.
#[derive(Debug)]
pub struct Root {
    node: Node,
    /// Needed controllers that `prepare` enabled for the root's children.
    enabled: Controllers,
}

/// What [`Root::prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Needed controllers now enabled for apps (and, through them, for workers).
    pub enabled: Controllers,
    /// Needed controllers that the root does not have (not delegated): their limits cannot be
    /// applied. The agent decides whether that is fatal.
    pub missing: Controllers,
    /// Pids moved from the root into `supervisor/`.
    pub moved: Vec<i32>,
}

impl Root {
    /// Open the delegated root `path` (see [`Detected::root`]). Refuses a directory that is not
    /// on cgroup2 and the root of the hierarchy itself (it has no `cgroup.events`), which is
    /// never corral's to manage.
    pub fn open(path: &Path) -> Result<Root, CgroupError> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())
            .map_err(io_err("open", path.to_path_buf()))?;
        let st = rustix::fs::fstatfs(&fd).map_err(io_err("statfs", path.to_path_buf()))?;
        let magic = st.f_type as u64;
        if magic != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 {
                path: path.to_path_buf(),
                magic,
            });
        }
        Root::from_node(Node {
            fd,
            path: path.to_path_buf(),
            #[cfg(test)]
            fixture: false,
        })
    }

    fn from_node(node: Node) -> Result<Root, CgroupError> {
        if !node.exists("cgroup.events")? {
            return Err(CgroupError::HierarchyRoot { path: node.path });
        }
        Ok(Root {
            node,
            enabled: Controllers::NONE,
        })
    }

    pub fn path(&self) -> &Path {
        &self.node.path
    }

    /// The directory fd (`O_PATH`).
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.node.fd.as_fd()
    }

    /// Make the root ready for apps: move any process in the root itself (the agent) into the
    /// `supervisor` leaf, then enable those of `needed` that the root has in
    /// `cgroup.controllers` in its `cgroup.subtree_control`. Touches nothing above the root.
    /// Idempotent.
    pub fn prepare(&mut self, needed: &[Controller]) -> Result<Prepared, CgroupError> {
        let moved = self.move_to_supervisor()?;
        let needed: Controllers = needed.iter().copied().collect();
        let available = self.node.controllers()?;
        let enabled = needed.and(available);
        self.node.enable(enabled)?;
        self.enabled = enabled;
        Ok(Prepared {
            enabled,
            missing: needed.without(available),
            moved,
        })
    }

    /// The no-internal-processes rule: move everything in the root into `supervisor/`, again
    /// until no new pid shows up (a process may fork while we move it).
    fn move_to_supervisor(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pending = self.node.pids()?;
        if pending.is_empty() {
            return Ok(pending);
        }
        let (leaf, _) = self.node.make_child(SUPERVISOR)?;
        let procs = leaf
            .open_file("cgroup.procs", WRITE_FLAGS)
            .map_err(io_err("open", leaf.file("cgroup.procs")))?;
        let mut moved = Vec::new();
        let mut seen = BTreeSet::new();
        for _ in 0..MOVE_ROUNDS {
            for pid in pending {
                seen.insert(pid);
                // One pid per write; the kernel strips the newline.
                let value = format!("{pid}\n");
                match write_all(&procs, &value) {
                    Ok(()) => moved.push(pid),
                    Err(Errno::SRCH) => {} // exited meanwhile
                    Err(e) => return Err(leaf.write_error("cgroup.procs", value.trim_end(), e)),
                }
            }
            pending = self
                .node
                .pids()?
                .into_iter()
                .filter(|p| !seen.contains(p))
                .collect();
            if pending.is_empty() {
                return Ok(moved);
            }
        }
        Err(CgroupError::MoveIncomplete {
            path: self.node.path.clone(),
            rounds: MOVE_ROUNDS,
        })
    }

    /// Create (or reuse) `app-<name>` and enable for its children what `prepare` enabled.
    pub fn app(&self, name: &str) -> Result<App, CgroupError> {
        validate_name(name)?;
        let (node, _) = self.node.make_child(&format!("{APP_PREFIX}{name}"))?;
        let enabled = self.enabled.and(node.controllers()?);
        node.enable(enabled)?;
        Ok(App {
            node,
            parent: self.node.try_clone()?,
            name: name.to_string(),
            enabled,
        })
    }

    /// The app cgroups that exist (left by a previous agent, for cleanup), opened as they are:
    /// nothing is enabled. Directories whose name is not a valid app name are skipped.
    pub fn existing_apps(&self) -> Result<Vec<App>, CgroupError> {
        let mut apps = Vec::new();
        for name in self.node.children(APP_PREFIX)? {
            if validate_name(&name).is_err() {
                continue;
            }
            let node = self.node.open_child(&format!("{APP_PREFIX}{name}"))?;
            let enabled = Controllers::parse(&node.read("cgroup.subtree_control")?);
            apps.push(App {
                node,
                parent: self.node.try_clone()?,
                name,
                enabled,
            });
        }
        Ok(apps)
    }
}

// ---------------------------------------------------------------------------------------------
// App

/// `<root>/app-<name>`: holds the app's worker leaves.
#[derive(Debug)]
pub struct App {
    node: Node,
    parent: Node,
    name: String,
    enabled: Controllers,
}

impl App {
    /// The app's name (without the `app-` prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.node.path
    }

    /// Controllers enabled for the app's leaves.
    pub fn enabled(&self) -> Controllers {
        self.enabled
    }

    /// Create `worker-<id>` (`app.leaf(3)`, or `app.leaf("3b")` for a second worker of slot 3
    /// during a rolling replacement), or reuse an existing one that has no processes.
    pub fn leaf(&self, id: impl fmt::Display) -> Result<Leaf, CgroupError> {
        let id = id.to_string();
        validate_name(&id)?;
        let name = format!("{WORKER_PREFIX}{id}");
        let (node, created) = self.node.make_child(&name)?;
        if !created && !node.pids()?.is_empty() {
            return Err(CgroupError::InUse { path: node.path });
        }
        self.leaf_from(node, name)
    }

    /// A leaf with a name of its own (`prestart`), created, or reused when it has no processes.
    pub fn named_leaf(&self, name: &str) -> Result<Leaf, CgroupError> {
        validate_name(name)?;
        let (node, created) = self.node.make_child(name)?;
        if !created && !node.pids()?.is_empty() {
            return Err(CgroupError::InUse { path: node.path });
        }
        self.leaf_from(node, name.to_string())
    }

    fn leaf_from(&self, node: Node, name: String) -> Result<Leaf, CgroupError> {
        let controllers = node.controllers()?;
        Ok(Leaf {
            node,
            parent: self.node.try_clone()?,
            name,
            controllers,
        })
    }

    /// An existing worker leaf by its directory name (`worker-...`), populated or not: the
    /// leaf of a worker the agent's previous image handed over.
    pub fn open_leaf(&self, name: &str) -> Result<Leaf, CgroupError> {
        let id = name.strip_prefix(WORKER_PREFIX).unwrap_or("");
        validate_name(id)?;
        let node = self.node.open_child(name)?;
        self.leaf_from(node, name.to_string())
    }

    /// The worker leaves that exist, populated or not (for cleanup after a previous agent).
    pub fn existing_leaves(&self) -> Result<Vec<Leaf>, CgroupError> {
        let mut leaves = Vec::new();
        for id in self.node.children(WORKER_PREFIX)? {
            if validate_name(&id).is_err() {
                continue;
            }
            let name = format!("{WORKER_PREFIX}{id}");
            let node = self.node.open_child(&name)?;
            leaves.push(self.leaf_from(node, name)?);
        }
        Ok(leaves)
    }

    /// Remove the app's cgroup; its leaves must be removed first ([`CgroupError::Busy`]
    /// otherwise).
    pub fn remove(self) -> Result<(), CgroupError> {
        self.parent
            .remove_child(&format!("{APP_PREFIX}{}", self.name))
    }
}

// ---------------------------------------------------------------------------------------------
// Leaf

/// Resource limits of one worker. `None` means unlimited (`max`) and is written too, so a
/// reused leaf never keeps an old limit. Byte values of `u64::MAX` are written as `max`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// memory.max, bytes: above it the kernel reclaims, then OOM-kills the whole leaf.
    pub memory_max: Option<u64>,
    /// memory.high, bytes: above it the kernel throttles and reclaims (counted in
    /// `MemoryEvents::high`).
    pub memory_high: Option<u64>,
    /// memory.swap.max, bytes. `None`: 0 when `memory_max` is set (a capped worker does not
    /// swap past its cap), unlimited otherwise.
    pub swap_max: Option<u64>,
    /// pids.max: processes and threads.
    pub pids_max: Option<u32>,
    /// cpu.max in CPUs: 1.5 is `150000 100000`. At least 0.01.
    pub cpu_max: Option<f64>,
}

/// One interface-file write planned from [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Planned {
    controller: Controller,
    file: &'static str,
    value: String,
    /// Asked for by the config (not just the unlimited default): worth reporting when skipped.
    configured: bool,
}

/// A limit that was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: &'static str,
    pub value: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The controller is not enabled for the leaf (not delegated, or not needed).
    NotEnabled(Controller),
    /// The controller is enabled but this kernel has no such file (e.g. memory.swap.max without
    /// swap accounting).
    FileMissing,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            SkipReason::NotEnabled(c) => write!(
                f,
                "{} = {} not applied: the {c} controller is not enabled",
                self.file, self.value
            ),
            SkipReason::FileMissing => write!(
                f,
                "{} = {} not applied: this kernel has no {}",
                self.file, self.value, self.file
            ),
        }
    }
}

fn bytes_value(v: Option<u64>) -> String {
    match v {
        None | Some(u64::MAX) => "max".to_string(),
        Some(n) => n.to_string(),
    }
}

/// `cpu.max` for `cpus` CPUs: `<quota> <period>`.
fn cpu_max_value(cpus: Option<f64>) -> Result<String, CgroupError> {
    let Some(cpus) = cpus else {
        return Ok(format!("max {CPU_PERIOD_USEC}"));
    };
    let invalid = |reason| CgroupError::InvalidLimit {
        what: "cpu_max",
        value: cpus.to_string(),
        reason,
    };
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(invalid("must be a positive number of CPUs"));
    }
    if cpus > 1_000_000.0 {
        return Err(invalid("more than 1000000 CPUs"));
    }
    // Bounded above, so the cast is exact for every value that passes.
    let quota = (cpus * CPU_PERIOD_USEC as f64).round() as u64;
    if quota < CPU_MIN_QUOTA_USEC {
        return Err(invalid("below the kernel's minimum of 0.01 CPU"));
    }
    Ok(format!("{quota} {CPU_PERIOD_USEC}"))
}

/// The writes for `limits`, in order.
fn plan_limits(limits: &Limits) -> Result<Vec<Planned>, CgroupError> {
    let memory_capped = limits.memory_max.is_some();
    let swap = limits.swap_max.or(memory_capped.then_some(0));
    let p = |controller, file, value, configured| Planned {
        controller,
        file,
        value,
        configured,
    };
    use Controller::{Cpu, Memory, Pids};
    Ok(vec![
        p(
            Memory,
            "memory.max",
            bytes_value(limits.memory_max),
            memory_capped,
        ),
        p(
            Memory,
            "memory.high",
            bytes_value(limits.memory_high),
            limits.memory_high.is_some(),
        ),
        p(Memory, "memory.swap.max", bytes_value(swap), swap.is_some()),
        // An OOM kill takes the whole worker (all its processes), never half of it.
        p(
            Memory,
            "memory.oom.group",
            "1".to_string(),
            memory_capped || limits.memory_high.is_some(),
        ),
        p(
            Pids,
            "pids.max",
            limits
                .pids_max
                .map_or_else(|| "max".to_string(), |n| n.to_string()),
            limits.pids_max.is_some(),
        ),
        p(
            Cpu,
            "cpu.max",
            cpu_max_value(limits.cpu_max)?,
            limits.cpu_max.is_some(),
        ),
    ])
}

/// Which events file to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsFile {
    /// `cgroup.events`: `populated` drops to 0 when the last process exits.
    Cgroup,
    /// `memory.events`: `oom_kill`, `high`, ... counters.
    Memory,
}

impl EventsFile {
    pub fn file_name(self) -> &'static str {
        match self {
            EventsFile::Cgroup => "cgroup.events",
            EventsFile::Memory => "memory.events",
        }
    }
}

/// Numbers of one worker's leaf. `None` where the controller is not enabled, and for
/// memory_peak on kernels before 5.19.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafStats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub cpu_usage_usec: u64,
    pub pids_current: Option<u64>,
}

/// `<root>/app-<name>/worker-<id>`: one worker's process tree.
#[derive(Debug)]
pub struct Leaf {
    node: Node,
    parent: Node,
    name: String,
    controllers: Controllers,
}

impl Leaf {
    /// `worker-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.node.path
    }

    /// Controllers enabled for this leaf (its `cgroup.controllers`).
    pub fn controllers(&self) -> Controllers {
        self.controllers
    }

    /// Write every limit file whose controller is enabled (unset limits as `max`), plus
    /// `memory.oom.group = 1`. Returns the configured limits that could not be applied.
    pub fn set_limits(&self, limits: &Limits) -> Result<Vec<Skipped>, CgroupError> {
        let mut skipped = Vec::new();
        for w in plan_limits(limits)? {
            let reason = if !self.controllers.contains(w.controller) {
                Some(SkipReason::NotEnabled(w.controller))
            } else {
                match self.node.write_errno(w.file, &w.value) {
                    Ok(()) => None,
                    Err(Errno::NOENT) => Some(SkipReason::FileMissing),
                    Err(e) => return Err(self.node.write_error(w.file, &w.value, e)),
                }
            };
            if let Some(reason) = reason.filter(|_| w.configured) {
                skipped.push(Skipped {
                    file: w.file,
                    value: w.value,
                    reason,
                });
            }
        }
        Ok(skipped)
    }

    /// `cgroup.procs` opened for writing, to place a process before it execs: the new child
    /// writes `0` (itself) to it before dropping privileges. Prefer [`Leaf::dir_fd`] with
    /// `clone3(CLONE_INTO_CGROUP)` (5.7+), which has no window at all.
    pub fn procs_fd(&self) -> Result<OwnedFd, CgroupError> {
        // No O_TRUNC here: the fd is written in another process, possibly more than once.
        self.node
            .open_file(
                "cgroup.procs",
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            )
            .map_err(io_err("open", self.node.file("cgroup.procs")))
    }

    /// The leaf's directory fd (`O_PATH|O_DIRECTORY`), as `clone_args.cgroup` for
    /// `CLONE_INTO_CGROUP`.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.node.fd.as_fd()
    }

    /// Kill every process in the leaf: `1` to `cgroup.kill` (5.14+). Before 5.14: freeze the
    /// leaf (so nothing forks), then SIGKILL each pid in `cgroup.procs`, again while new pids
    /// appear. Either way the processes are dying, not gone: wait for `populated 0` in
    /// `cgroup.events` before [`Leaf::remove`].
    pub fn kill(&self) -> Result<(), CgroupError> {
        match self.node.write_errno("cgroup.kill", "1") {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => self.kill_each(),
            Err(e) => Err(self.node.write_error("cgroup.kill", "1", e)),
        }
    }

    fn kill_each(&self) -> Result<(), CgroupError> {
        match self.node.write_errno("cgroup.freeze", "1") {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(self.node.write_error("cgroup.freeze", "1", e)),
        }
        let mut signalled = BTreeSet::new();
        for round in 0..KILL_ROUNDS {
            let fresh: Vec<i32> = self
                .node
                .pids()?
                .into_iter()
                .filter(|p| !signalled.contains(p))
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            for pid in fresh {
                signalled.insert(pid);
                let Some(p) = Pid::from_raw(pid) else {
                    continue;
                };
                match kill_process(p, Signal::KILL) {
                    Ok(()) | Err(Errno::SRCH) => {}
                    Err(e) => {
                        return Err(CgroupError::Signal {
                            pid,
                            path: self.node.path.clone(),
                            source: e.into(),
                        })
                    }
                }
            }
            if round + 1 < KILL_ROUNDS {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Err(CgroupError::KillIncomplete {
            path: self.node.path.clone(),
            rounds: KILL_ROUNDS,
        })
    }

    /// Whether any process is left (`populated` in `cgroup.events`).
    pub fn populated(&self) -> Result<bool, CgroupError> {
        let file = EventsFile::Cgroup.file_name();
        let text = self.node.read(file)?;
        match CgroupEvents::parse(&text) {
            Some(ev) => Ok(ev.populated),
            None => Err(CgroupError::Parse {
                path: self.node.file(file),
                text,
                reason: "no `populated` line",
            }),
        }
    }

    /// Path of an events file, for `inotify_add_watch` (IN_MODIFY). Built from the root's path
    /// and validated names.
    pub fn events_path(&self, file: EventsFile) -> PathBuf {
        self.node.file(file.file_name())
    }

    /// An events file opened for reading. cgroupfs signals changes with EPOLLPRI|EPOLLERR on
    /// such an fd as well as with inotify; re-read it with [`read_fd`].
    pub fn events_fd(&self, file: EventsFile) -> Result<OwnedFd, CgroupError> {
        self.node
            .open_file(file.file_name(), READ_FLAGS)
            .map_err(io_err("open", self.events_path(file)))
    }

    /// The counters of `memory.events` (all 0 if the memory controller is not enabled).
    pub fn read_memory_events(&self) -> Result<MemoryEvents, CgroupError> {
        if !self.controllers.contains(Controller::Memory) {
            return Ok(MemoryEvents::default());
        }
        Ok(MemoryEvents::parse(
            &self.node.read(EventsFile::Memory.file_name())?,
        ))
    }

    /// memory.current, memory.peak, cpu.stat usage_usec and pids.current.
    pub fn stats(&self) -> Result<LeafStats, CgroupError> {
        let number = |file: &str, text: Option<String>| -> Result<Option<u64>, CgroupError> {
            let Some(text) = text else { return Ok(None) };
            match text.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(CgroupError::Parse {
                    path: self.node.file(file),
                    text,
                    reason: "expected a number",
                }),
            }
        };
        let memory = self.controllers.contains(Controller::Memory);
        let pids = self.controllers.contains(Controller::Pids);
        let (mut memory_current, mut memory_peak, mut pids_current) = (None, None, None);
        if memory {
            memory_current = number("memory.current", Some(self.node.read("memory.current")?))?;
            memory_peak = number("memory.peak", self.node.read_opt("memory.peak")?)?;
        }
        if pids {
            pids_current = number("pids.current", Some(self.node.read("pids.current")?))?;
        }
        let cpu_stat = self.node.read("cpu.stat")?;
        let cpu_usage_usec =
            flat_value(&cpu_stat, "usage_usec").ok_or_else(|| CgroupError::Parse {
                path: self.node.file("cpu.stat"),
                text: cpu_stat.clone(),
                reason: "no `usage_usec` line",
            })?;
        Ok(LeafStats {
            memory_current,
            memory_peak,
            cpu_usage_usec,
            pids_current,
        })
    }

    /// Remove the leaf (after [`Leaf::kill`] and `populated 0`). [`CgroupError::Busy`] if a
    /// process is still in it.
    pub fn remove(self) -> Result<(), CgroupError> {
        self.parent.remove_child(&self.name)
    }
}

// ---------------------------------------------------------------------------------------------

/// Whether systemd delegated `dir`: for Delegate=yes it sets the `trusted.delegate` xattr
/// and, since systemd 252, `user.delegate` too. Reading `trusted.*` needs CAP_SYS_ADMIN, which
/// corral's unit does not give the agent, so `user.delegate` is what the packaged agent sees.
pub fn delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut buf[..]).is_ok_and(|n| buf[..n].starts_with(b"1"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // -- the fixture ---------------------------------------------------------------------------
    //
    // A plain directory stands in for cgroupfs. Two things cgroupfs does by itself are emulated
    // through the `Node::fixture` seam: `mkdir` creating the interface files (the child's
    // `cgroup.controllers` is what the parent enabled in `cgroup.subtree_control`), and `rmdir`
    // removing them. Everything else is the production code path; tests read the files back to
    // see exactly what was written where.

    const CORE_FILES: &[(&str, &str)] = &[
        ("cgroup.subtree_control", ""),
        ("cgroup.procs", ""),
        ("cgroup.events", "populated 0\nfrozen 0\n"),
        ("cgroup.type", "domain\n"),
        ("cgroup.kill", ""),
        ("cgroup.freeze", "0\n"),
        ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
    ];

    fn controller_files(c: Controller) -> &'static [(&'static str, &'static str)] {
        match c {
            Controller::Memory => &[
                ("memory.max", "max\n"),
                ("memory.high", "max\n"),
                ("memory.swap.max", "max\n"),
                ("memory.oom.group", "0\n"),
                ("memory.current", "0\n"),
                ("memory.peak", "0\n"),
                (
                    "memory.events",
                    "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
                ),
            ],
            Controller::Pids => &[("pids.max", "max\n"), ("pids.current", "0\n")],
            Controller::Cpu => &[("cpu.max", "max 100000\n"), ("cpu.weight", "100\n")],
            _ => &[],
        }
    }

    /// What the kernel does on mkdir in cgroupfs.
    pub(super) fn fixture_after_mkdir(parent: &Node, name: &str) {
        let subtree = fs::read_to_string(parent.file("cgroup.subtree_control")).unwrap();
        // The fixture file holds what was written ("+memory +pids"), the kernel shows names.
        let enabled = Controllers::parse(&subtree.replace('+', ""));
        let dir = parent.file(name);
        fs::write(dir.join("cgroup.controllers"), format!("{enabled}\n")).unwrap();
        for (file, content) in CORE_FILES
            .iter()
            .chain(enabled.iter().flat_map(controller_files))
        {
            fs::write(dir.join(file), content).unwrap();
        }
    }

    /// What the kernel does on rmdir in cgroupfs: the interface files go with the directory.
    pub(super) fn fixture_before_rmdir(parent: &Node, name: &str) {
        let Ok(entries) = fs::read_dir(parent.file(name)) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                fs::remove_file(e.path()).unwrap();
            }
        }
    }

    /// `<tmp>/system.slice/corral.service`, the latter the delegated root.
    struct Fixture {
        tmp: PathBuf,
        above: PathBuf,
        root: PathBuf,
    }

    impl Fixture {
        fn new(controllers: &str, procs: &str) -> Fixture {
            static N: AtomicUsize = AtomicUsize::new(0);
            let tmp = std::env::temp_dir().join(format!(
                "corral-cgroup-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let above = tmp.join("system.slice");
            let root = above.join("corral.service");
            fs::create_dir_all(&root).unwrap();
            fs::write(above.join("cgroup.subtree_control"), "").unwrap();
            fs::write(above.join("cgroup.procs"), "").unwrap();
            for (file, content) in CORE_FILES {
                fs::write(root.join(file), content).unwrap();
            }
            fs::write(root.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
            fs::write(root.join("cgroup.procs"), procs).unwrap();
            fs::write(root.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
            Fixture { tmp, above, root }
        }

        fn open(&self) -> Result<Root, CgroupError> {
            open_fixture(&self.root)
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.root.join(rel)).unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }

    /// `Root::open` without the cgroup2 magic check.
    fn open_fixture(path: &Path) -> Result<Root, CgroupError> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).unwrap();
        Root::from_node(Node {
            fd,
            path: path.to_path_buf(),
            fixture: true,
        })
    }

    const NEEDED: &[Controller] = &[Controller::Memory, Controller::Pids, Controller::Cpu];

    // -- pure parsers --------------------------------------------------------------------------

    #[test]
    fn proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x/y\n1:cpu:/\n0::/\n";
        assert_eq!(parse_proc_cgroup(hybrid), Some(PathBuf::from("/")));
        let unified = "0::/system.slice/corral.service\n";
        assert_eq!(
            parse_proc_cgroup(unified),
            Some(PathBuf::from("/system.slice/corral.service"))
        );
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
        // Outside the cgroup namespace: refuse rather than climb.
        assert_eq!(parse_proc_cgroup("0::/../../x\n"), None);
        assert_eq!(parse_proc_cgroup("0::relative\n"), None);
    }

    #[test]
    fn delegated_root_is_the_parent_of_supervisor() {
        let p = |s| PathBuf::from(s);
        assert_eq!(
            delegated_root(&p("/system.slice/corral.service/supervisor")),
            p("/system.slice/corral.service")
        );
        assert_eq!(
            delegated_root(&p("/system.slice/corral.service")),
            p("/system.slice/corral.service")
        );
        assert_eq!(delegated_root(&p("/")), p("/"));
    }

    #[test]
    fn classify_by_magic() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            classify(m, CGROUP2_SUPER_MAGIC, || panic!("not asked")).unwrap(),
            Kind::Unified
        );
        assert_eq!(
            classify(m, TMPFS_MAGIC, || Some(CGROUP2_SUPER_MAGIC)).unwrap(),
            Kind::Hybrid {
                unified_at: PathBuf::from("/sys/fs/cgroup/unified")
            }
        );
        assert_eq!(classify(m, TMPFS_MAGIC, || None).unwrap(), Kind::Legacy);
        assert_eq!(
            classify(m, TMPFS_MAGIC, || Some(TMPFS_MAGIC)).unwrap(),
            Kind::Legacy
        );
        assert_eq!(
            classify(m, CGROUP_SUPER_MAGIC, || None).unwrap(),
            Kind::Legacy
        );
        assert!(matches!(
            classify(m, 0xef53, || None),
            Err(CgroupError::UnknownFs { magic: 0xef53, .. })
        ));
    }

    #[test]
    fn flat_keyed_files() {
        let ev =
            MemoryEvents::parse("low 1\nhigh 20\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\n");
        assert_eq!(
            ev,
            MemoryEvents {
                low: 1,
                high: 20,
                max: 3,
                oom: 4,
                oom_kill: 5,
                oom_group_kill: 6
            }
        );
        // Before 5.13 there is no oom_group_kill.
        let old = MemoryEvents::parse("low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n");
        assert_eq!(old.oom_kill, 1);
        assert_eq!(old.oom_group_kill, 0);

        let stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(flat_value(stat, "usage_usec"), Some(123456));
        assert_eq!(flat_value(stat, "nr_throttled"), None);
        assert_eq!(flat_value("usage_usec x\n", "usage_usec"), None);

        assert_eq!(
            CgroupEvents::parse("populated 1\nfrozen 0\n"),
            Some(CgroupEvents {
                populated: true,
                frozen: false
            })
        );
        assert_eq!(
            CgroupEvents::parse("populated 0\n").map(|e| e.populated),
            Some(false)
        );
        assert_eq!(CgroupEvents::parse("frozen 1\n"), None);

        assert_eq!(parse_pids("12\n345\n"), Some(vec![12, 345]));
        assert_eq!(parse_pids(""), Some(vec![]));
        assert_eq!(parse_pids("12\nx\n"), None);
    }

    #[test]
    fn controllers() {
        let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc dmem\n");
        assert!(c.contains(Controller::Memory) && c.contains(Controller::Misc));
        assert_eq!(Controllers::parse("").to_string(), "none");
        let mp = Controllers::parse("pids memory");
        assert_eq!(mp.to_string(), "memory pids");
        assert_eq!(mp.enable_line(), "+memory +pids");
        let cpu: Controllers = [Controller::Cpu].into_iter().collect();
        assert_eq!(c.and(mp), mp);
        assert_eq!(mp.without(Controllers::parse("memory")).to_string(), "pids");
        assert!(mp.and(cpu).is_empty());
    }

    #[test]
    fn names() {
        for bad in ["", "a/b", "../x", "..", ".", "/", "a\nb", "a\0b"] {
            assert!(
                matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(validate_name(&"x".repeat(201)).is_err());
        for good in ["api", "my-app_2", "3", "a..b", "with.dot"] {
            validate_name(good).unwrap();
        }
        let e = validate_name("a/b").unwrap_err().to_string();
        assert_eq!(e, "invalid cgroup name `a/b`: contains `/`");
    }

    #[test]
    fn cpu_max() {
        assert_eq!(cpu_max_value(Some(1.5)).unwrap(), "150000 100000");
        assert_eq!(cpu_max_value(Some(0.25)).unwrap(), "25000 100000");
        assert_eq!(cpu_max_value(Some(4.0)).unwrap(), "400000 100000");
        assert_eq!(cpu_max_value(Some(0.01)).unwrap(), "1000 100000");
        assert_eq!(cpu_max_value(None).unwrap(), "max 100000");
        for bad in [0.0, -1.0, 0.001, f64::NAN, f64::INFINITY, 2e6] {
            assert!(
                matches!(
                    cpu_max_value(Some(bad)),
                    Err(CgroupError::InvalidLimit { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn limit_plan() {
        let plan = |l: Limits| -> Vec<(&'static str, String, bool)> {
            plan_limits(&l)
                .unwrap()
                .into_iter()
                .map(|w| (w.file, w.value, w.configured))
                .collect()
        };
        let capped = plan(Limits {
            memory_max: Some(256 << 20),
            ..Limits::default()
        });
        assert_eq!(
            capped,
            vec![
                ("memory.max", "268435456".to_string(), true),
                ("memory.high", "max".to_string(), false),
                ("memory.swap.max", "0".to_string(), true),
                ("memory.oom.group", "1".to_string(), true),
                ("pids.max", "max".to_string(), false),
                ("cpu.max", "max 100000".to_string(), false),
            ]
        );
        let uncapped = plan(Limits::default());
        assert_eq!(uncapped[2], ("memory.swap.max", "max".to_string(), false));
        let swap = plan(Limits {
            memory_max: Some(1 << 30),
            swap_max: Some(u64::MAX),
            ..Limits::default()
        });
        assert_eq!(swap[2], ("memory.swap.max", "max".to_string(), true));
    }

    // -- Root / App / Leaf against the fixture -------------------------------------------------

    #[test]
    fn prepare_moves_the_agent_and_enables_only_at_the_root() {
        let fx = Fixture::new("cpu io memory pids", "4242\n4243\n");
        let mut root = fx.open().unwrap();
        let prepared = root.prepare(NEEDED).unwrap();
        assert_eq!(prepared.moved, vec![4242, 4243]);
        assert_eq!(prepared.missing, Controllers::NONE);
        assert_eq!(prepared.enabled.to_string(), "memory pids cpu");
        // The pids went to supervisor/, one write each.
        assert_eq!(fx.read("supervisor/cgroup.procs"), "4242\n4243\n");
        // Only what is needed (not io), only at the root, nothing above it.
        assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(
            fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
            ""
        );
        // supervisor/ is a leaf: nothing enabled in it.
        assert_eq!(fx.read("supervisor/cgroup.subtree_control"), "");
    }

    #[test]
    fn prepare_without_processes_creates_no_supervisor() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        let prepared = root.prepare(NEEDED).unwrap();
        assert!(prepared.moved.is_empty());
        assert!(!fx.root.join("supervisor").exists());
        assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids +cpu");
    }

    #[test]
    fn prepare_reports_missing_controllers() {
        // Delegated without cpu (e.g. systemd without CPUAccounting).
        let fx = Fixture::new("memory pids", "");
        let mut root = fx.open().unwrap();
        let prepared = root.prepare(NEEDED).unwrap();
        assert_eq!(prepared.missing.to_string(), "cpu");
        assert_eq!(prepared.enabled.to_string(), "memory pids");
        assert_eq!(fx.read("cgroup.subtree_control"), "+memory +pids");
    }

    #[test]
    fn prepare_writes_only_what_is_not_enabled_yet() {
        let fx = Fixture::new("cpu memory pids", "");
        fs::write(fx.root.join("cgroup.subtree_control"), "memory\n").unwrap();
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        assert_eq!(fx.read("cgroup.subtree_control"), "+pids +cpu");
    }

    #[test]
    fn app_and_leaf_with_limits() {
        let fx = Fixture::new("cpu memory pids", "1\n");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let app = root.app("api").unwrap();
        assert_eq!(app.path(), fx.root.join("app-api"));
        assert_eq!(
            fx.read("app-api/cgroup.subtree_control"),
            "+memory +pids +cpu"
        );

        let leaf = app.leaf(0).unwrap();
        assert_eq!(leaf.name(), "worker-0");
        assert_eq!(leaf.path(), fx.root.join("app-api/worker-0"));
        let skipped = leaf
            .set_limits(&Limits {
                memory_max: Some(512 << 20),
                memory_high: Some(400 << 20),
                swap_max: None,
                pids_max: Some(64),
                cpu_max: Some(1.5),
            })
            .unwrap();
        assert_eq!(skipped, vec![]);
        let w = |f: &str| fx.read(&format!("app-api/worker-0/{f}"));
        assert_eq!(w("memory.max"), "536870912");
        assert_eq!(w("memory.high"), "419430400");
        assert_eq!(w("memory.swap.max"), "0");
        assert_eq!(w("memory.oom.group"), "1");
        assert_eq!(w("pids.max"), "64");
        assert_eq!(w("cpu.max"), "150000 100000");
        // Leaves enable nothing.
        assert_eq!(w("cgroup.subtree_control"), "");
        assert_eq!(
            fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
            ""
        );

        // Limits removed later are written back as max.
        leaf.set_limits(&Limits::default()).unwrap();
        assert_eq!(w("memory.max"), "max");
        assert_eq!(w("memory.swap.max"), "max");
        assert_eq!(w("cpu.max"), "max 100000");
    }

    #[test]
    fn limits_of_controllers_not_delegated_are_skipped_and_reported() {
        let fx = Fixture::new("memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let app = root.app("api").unwrap();
        assert_eq!(fx.read("app-api/cgroup.subtree_control"), "+memory +pids");
        let leaf = app.leaf(1).unwrap();
        // A kernel without swap accounting.
        fs::remove_file(fx.root.join("app-api/worker-1/memory.swap.max")).unwrap();
        let skipped = leaf
            .set_limits(&Limits {
                memory_max: Some(1 << 30),
                cpu_max: Some(2.0),
                ..Limits::default()
            })
            .unwrap();
        assert_eq!(
            skipped,
            vec![
                Skipped {
                    file: "memory.swap.max",
                    value: "0".into(),
                    reason: SkipReason::FileMissing
                },
                Skipped {
                    file: "cpu.max",
                    value: "200000 100000".into(),
                    reason: SkipReason::NotEnabled(Controller::Cpu)
                },
            ]
        );
        assert_eq!(
            skipped[1].to_string(),
            "cpu.max = 200000 100000 not applied: the cpu controller is not enabled"
        );
        assert!(!fx.root.join("app-api/worker-1/cpu.max").exists());
        assert!(!fx.root.join("app-api/worker-1/memory.swap.max").exists());
        assert_eq!(fx.read("app-api/worker-1/memory.max"), "1073741824");
    }

    #[test]
    fn bad_names_are_refused_and_create_nothing() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        for bad in ["../x", "a/b", "", ".."] {
            assert!(
                matches!(root.app(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        let app = root.app("api").unwrap();
        assert!(matches!(
            app.leaf("../../escape"),
            Err(CgroupError::InvalidName { .. })
        ));
        let mut entries: Vec<_> = fs::read_dir(&fx.root)
            .unwrap()
            .filter_map(|e| {
                let e = e.unwrap();
                e.file_type().unwrap().is_dir().then(|| e.file_name())
            })
            .collect();
        entries.sort();
        assert_eq!(entries, vec!["app-api"]);
        assert!(!fx.tmp.join("escape").exists());
    }

    #[test]
    fn errors_name_the_file_and_the_value() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let leaf = root.app("api").unwrap().leaf(0).unwrap();
        let file = fx.root.join("app-api/worker-0/memory.max");
        fs::remove_file(&file).unwrap();
        fs::create_dir(&file).unwrap(); // any error will do: EISDIR
        let err = leaf
            .set_limits(&Limits {
                memory_max: Some(256 << 20),
                ..Limits::default()
            })
            .unwrap_err();
        assert!(matches!(err, CgroupError::Write { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "writing `268435456` to {}: Is a directory (os error 21)",
                file.display()
            )
        );
        assert_eq!(
            CgroupError::MoveIncomplete {
                path: fx.root.clone(),
                rounds: 3
            }
            .to_string(),
            format!(
                "processes keep appearing in {} after 3 rounds of moving them to supervisor/",
                fx.root.display()
            )
        );
    }

    #[test]
    fn symlinks_are_not_followed() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        // A symlink where an app cgroup should be (cgroupfs never has one; a plain fs might).
        std::os::unix::fs::symlink(&fx.above, fx.root.join("app-evil")).unwrap();
        assert!(matches!(
            root.app("evil"),
            Err(CgroupError::Io { op: "open", .. })
        ));
        assert_eq!(
            fs::read_to_string(fx.above.join("cgroup.subtree_control")).unwrap(),
            ""
        );
    }

    #[test]
    fn leaves_are_reused_only_when_empty() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let app = root.app("api").unwrap();
        drop(app.leaf(2).unwrap());
        // Reuse of the app and of an empty leaf.
        let app = root.app("api").unwrap();
        let again = app.leaf(2).unwrap();
        assert_eq!(again.controllers().to_string(), "memory pids cpu");
        fs::write(fx.root.join("app-api/worker-2/cgroup.procs"), "777\n").unwrap();
        let err = app.leaf(2).unwrap_err();
        assert!(matches!(err, CgroupError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("app-api/worker-2"));
    }

    #[test]
    fn kill_populated_events_stats_remove() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let app = root.app("web").unwrap();
        let leaf = app.leaf(0).unwrap();
        let dir = fx.root.join("app-web/worker-0");

        leaf.kill().unwrap();
        assert_eq!(fx.read("app-web/worker-0/cgroup.kill"), "1");

        assert!(!leaf.populated().unwrap());
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(leaf.populated().unwrap());

        assert_eq!(
            leaf.events_path(EventsFile::Memory),
            dir.join("memory.events")
        );
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 7\nmax 2\noom 1\noom_kill 1\noom_group_kill 1\n",
        )
        .unwrap();
        let ev = leaf.read_memory_events().unwrap();
        assert_eq!((ev.high, ev.oom_kill, ev.oom_group_kill), (7, 1, 1));
        let fd = leaf.events_fd(EventsFile::Memory).unwrap();
        assert_eq!(MemoryEvents::parse(&read_fd(fd.as_fd()).unwrap()), ev);

        fs::write(dir.join("memory.current"), "1048576\n").unwrap();
        fs::write(dir.join("pids.current"), "3\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 5000\nuser_usec 1\n").unwrap();
        let stats = leaf.stats().unwrap();
        assert_eq!(
            stats,
            LeafStats {
                memory_current: Some(1 << 20),
                memory_peak: Some(0),
                cpu_usage_usec: 5000,
                pids_current: Some(3),
            }
        );
        // Before 5.19 there is no memory.peak.
        fs::remove_file(dir.join("memory.peak")).unwrap();
        assert_eq!(leaf.stats().unwrap().memory_peak, None);

        let procs = leaf.procs_fd().unwrap();
        write_all(&procs, "0").unwrap();
        drop(procs);
        fs::write(dir.join("cgroup.procs"), "").unwrap();

        let st = rustix::fs::fstat(leaf.dir_fd()).unwrap();
        assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Directory);
        leaf.remove().unwrap();
        assert!(!dir.exists());
        app.remove().unwrap();
        assert!(!fx.root.join("app-web").exists());
    }

    #[test]
    fn kill_without_cgroup_kill_signals_each_process() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let leaf = root.app("old").unwrap().leaf(0).unwrap();
        let dir = fx.root.join("app-old/worker-0");
        fs::remove_file(dir.join("cgroup.kill")).unwrap(); // kernel < 5.14
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        fs::write(dir.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        leaf.kill().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn existing_apps_and_leaves() {
        let fx = Fixture::new("cpu memory pids", "");
        let mut root = fx.open().unwrap();
        root.prepare(NEEDED).unwrap();
        let a = root.app("a").unwrap();
        a.leaf(0).unwrap();
        a.leaf(1).unwrap();
        root.app("b").unwrap();
        fs::create_dir(fx.root.join("not-ours")).unwrap();
        let apps = root.existing_apps().unwrap();
        let names: Vec<_> = apps.iter().map(App::name).collect();
        assert_eq!(names, vec!["a", "b"]);
        let leaves = apps[0].existing_leaves().unwrap();
        let names: Vec<_> = leaves.iter().map(Leaf::name).collect();
        assert_eq!(names, vec!["worker-0", "worker-1"]);
        for l in leaves {
            l.remove().unwrap();
        }
        for app in apps {
            app.remove().unwrap();
        }
        assert!(!fx.root.join("app-a").exists());
        assert!(fx.root.join("not-ours").exists());
    }

    #[test]
    fn the_hierarchy_root_and_non_cgroup2_are_refused() {
        let fx = Fixture::new("cpu memory pids", "");
        // The hierarchy's root has no cgroup.events.
        fs::remove_file(fx.root.join("cgroup.events")).unwrap();
        assert!(matches!(fx.open(), Err(CgroupError::HierarchyRoot { .. })));
        // The real open checks the filesystem.
        let err = Root::open(&fx.root).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
    }

    /// Reads only. On this kind of host (systemd's hybrid layout) detection must say hybrid.
    #[test]
    fn detect_on_this_host() {
        let mount = Path::new("/sys/fs/cgroup");
        let Ok(magic) = statfs_magic(mount) else {
            eprintln!("skipped: no {}", mount.display());
            return;
        };
        let d = detect(mount).unwrap();
        eprintln!("{d:?}");
        if magic != TMPFS_MAGIC {
            eprintln!("not asserting hybrid: {} is not tmpfs", mount.display());
            return;
        }
        let unified = mount.join("unified");
        if statfs_magic(&unified).ok() == Some(CGROUP2_SUPER_MAGIC) {
            assert_eq!(
                d.kind,
                Kind::Hybrid {
                    unified_at: unified.clone()
                }
            );
            assert_eq!(d.v2_mount, Some(unified.clone()));
            if d.own_cgroup.as_deref() == Some(Path::new("/")) {
                assert_eq!(d.root, Some(unified));
            }
        } else {
            assert_eq!(d.kind, Kind::Legacy);
        }
    }
}
