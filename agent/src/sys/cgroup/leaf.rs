//! `<root>/app-<name>/worker-<id>`: one worker's cgroup, what it is and the descriptors the
//! spawn path and the event loop use. Its limits, numbers and teardown are in `limits`,
//! `stats` and `teardown`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use tokio::sync::watch;

use super::controllers::Controllers;
use super::error::CgroupError;
use super::files::EventsFile;
use super::node::{io_err, Node, READ_FLAGS};

/// `<root>/app-<name>/worker-<id>`: one worker's process tree.
#[derive(Debug)]
pub struct Leaf {
    pub(super) node: Node,
    pub(super) parent: Node,
    pub(super) name: String,
    pub(super) controllers: Controllers,
    /// Keeps [`App::leaves_gone`](super::App::leaves_gone) of its app pending while it exists.
    _app: watch::Receiver<()>,
}

impl Leaf {
    pub(super) fn new(
        node: Node,
        parent: Node,
        name: String,
        controllers: Controllers,
        app: watch::Receiver<()>,
    ) -> Leaf {
        Leaf {
            node,
            parent,
            name,
            controllers,
            _app: app,
        }
    }

    /// `worker-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.node.path
    }

    /// Whether process `pid` is in this leaf (its `cgroup.procs` lists it).
    pub fn holds_pid(&self, pid: i32) -> bool {
        let Ok(fd) = self.node.open_file("cgroup.procs", READ_FLAGS) else {
            return false;
        };
        super::files::read_fd(fd.as_fd()).is_ok_and(|text| {
            text.lines()
                .any(|l| l.trim().parse::<i32>().ok() == Some(pid))
        })
    }

    /// Controllers enabled for this leaf (its `cgroup.controllers`).
    pub fn controllers(&self) -> Controllers {
        self.controllers
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

    /// Path of an events file, for `inotify_add_watch` (IN_MODIFY). Built from the root's path
    /// and validated names.
    pub fn events_path(&self, file: EventsFile) -> PathBuf {
        self.node.file(file.file_name())
    }

    /// An events file opened for reading. cgroupfs signals changes with EPOLLPRI|EPOLLERR on
    /// such an fd as well as with inotify; re-read it with [`read_fd`](super::read_fd).
    pub fn events_fd(&self, file: EventsFile) -> Result<OwnedFd, CgroupError> {
        self.node
            .open_file(file.file_name(), READ_FLAGS)
            .map_err(io_err("open", self.events_path(file)))
    }
}
