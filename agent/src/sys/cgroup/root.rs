//! The delegated root: opened by path once, prepared for apps (the agent moved into
//! `supervisor/`, controllers enabled for the root's children), and the apps below it.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::Mode;
use rustix::io::Errno;

use super::app::App;
use super::controllers::{Controller, Controllers};
use super::detect::CGROUP2_SUPER_MAGIC;
use super::error::CgroupError;
use super::names::{validate_name, APP_PREFIX, SUPERVISOR};
use super::node::{io_err, write_all, Node, DIR_FLAGS, WRITE_FLAGS};

/// Rounds of "move what is left in the root" in `prepare` (the agent might be forking).
const MOVE_ROUNDS: u32 = 100;

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
    /// Open the delegated root `path` (see [`Detected::root`](super::Detected::root)). Refuses a directory that is not
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
        })
    }

    /// A root without the filesystem check (the unit tests' temp-dir fixture is no cgroup2).
    pub(super) fn from_node(node: Node) -> Result<Root, CgroupError> {
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
            pending = self.node.pids_except(&seen)?;
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
        Ok(App::new(
            node,
            self.node.try_clone()?,
            name.to_string(),
            enabled,
        ))
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
            apps.push(App::new(node, self.node.try_clone()?, name, enabled));
        }
        Ok(apps)
    }
}
