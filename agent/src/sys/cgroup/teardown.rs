//! The end of a leaf: kill what is in it, wait for the kernel to say it is empty, rmdir it.

use std::collections::BTreeSet;
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{kill_process, Pid, Signal};

use super::error::CgroupError;
use super::files::{CgroupEvents, EventsFile};
use super::leaf::Leaf;
use crate::sys::inotify::Watch;

/// Rounds of "read cgroup.procs, SIGKILL what is new" before the fallback kill gives up.
const KILL_ROUNDS: u32 = 100;

impl Leaf {
    /// Kill every process in the leaf: `1` to `cgroup.kill` (5.14+). Before 5.14: freeze the
    /// leaf (so nothing forks), then SIGKILL each pid in `cgroup.procs`, again while new pids
    /// appear. Either way the processes are dying, not gone: wait for `populated 0` in
    /// `cgroup.events` ([`Leaf::wait_unpopulated`]) before [`Leaf::remove`].
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
            let fresh = self.node.pids_except(&signalled)?;
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

    /// Wait until no process is left (`populated 0`), at most `timeout`
    /// ([`CgroupError::StillPopulated`] then). Driven by the kernel's event, not by polling:
    /// cgroupfs reports a change of `cgroup.events` to inotify as IN_MODIFY, so the watch is
    /// set first, then the file read, then read again after each event. Needs a tokio runtime.
    pub async fn wait_unpopulated(&self, timeout: Duration) -> Result<(), CgroupError> {
        let path = self.events_path(EventsFile::Cgroup);
        let watch = Watch::new(&path).map_err(|e| CgroupError::Io {
            op: "watch",
            path: path.clone(),
            source: e.source,
        })?;
        let wait = async {
            while self.populated()? {
                watch.changed().await.map_err(|source| CgroupError::Io {
                    op: "wait for a change of",
                    path: path.clone(),
                    source,
                })?;
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(CgroupError::StillPopulated {
                path: self.node.path.clone(),
                waited: timeout,
            }),
        }
    }

    /// Remove the leaf (after [`Leaf::kill`] and `populated 0`). [`CgroupError::Busy`] if a
    /// process is still in it.
    pub fn remove(self) -> Result<(), CgroupError> {
        self.parent.remove_child(&self.name)
    }
}
