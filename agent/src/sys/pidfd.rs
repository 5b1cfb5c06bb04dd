//! Owning a child through its pidfd: wait for its exit without SIGCHLD (the pidfd becomes
//! readable when the process exits) and signal it without pid-reuse races.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::process::{pidfd_send_signal, waitid, Signal, WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    #[error("watching pidfd of pid {pid}: {source}")]
    Register {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("waitid(P_PIDFD) for pid {pid}: {source}")]
    Wait {
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// A process that is not this agent's child (adopted after a crash of the previous agent)
    /// exited and the kernel keeps no status for it (its reaper has not reaped it, or the
    /// kernel is older than 6.15).
    #[error("status unknown")]
    StatusUnknown,
}

/// How a process ended, as waitid reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

/// A child process owned through its pidfd. Dropping it closes the pidfd; the process (if
/// still running) is not affected.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
    /// Our child (waitid reaps it); otherwise adopted from a crashed agent: init or a
    /// subreaper reaps it and only its pidfd tells that it exited.
    child: bool,
}

impl Process {
    /// Must be called inside a tokio runtime.
    pub fn new(pid: i32, pidfd: OwnedFd) -> Result<Process, PidfdError> {
        // SAFETY: `pidfd` is an OwnedFd, so its raw fd stays open and the same for as long as
        // the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| PidfdError::Register {
            pid,
            source: e.into_parts().1,
        })?;
        Ok(Process {
            pid,
            fd,
            child: true,
        })
    }

    /// A process handed over whose parent may not be this process: a worker of a crashed
    /// agent (the keeper held its pidfd, so it is the very process that was started, whatever
    /// its pid names now). Whether it is our child is asked of the kernel (waitid answers
    /// ECHILD for any other process).
    pub fn adopt(pid: i32, pidfd: OwnedFd) -> Result<Process, PidfdError> {
        let child = !matches!(
            waitid(
                WaitId::PidFd(pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
            ),
            Err(rustix::io::Errno::CHILD)
        );
        let mut p = Process::new(pid, pidfd)?;
        p.child = child;
        Ok(p)
    }

    /// Whether this process is the agent's child (otherwise it was adopted after a crash).
    pub fn is_child(&self) -> bool {
        self.child
    }

    /// Whether the process has exited already (its pidfd is readable), without waiting.
    pub fn has_exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            self.fd.get_ref(),
            rustix::event::PollFlags::IN,
        )];
        let now = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd itself (to hand it to the agent's next image).
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Wait until the process exits and reap it.
    pub async fn wait(&self) -> Result<WaitStatus, PidfdError> {
        self.wait_then(false).await
    }

    /// Like [`Process::wait`] for a process that leads its own process group (a worker: it
    /// starts its own session): once it has exited, and before it is reaped, SIGKILL what is
    /// left in its group (children a shell wrapper or an arbiter started), as cgroup.kill does
    /// where there is a cgroup. Unreaped, its pid cannot name any other group.
    pub async fn wait_and_kill_group(&self) -> Result<WaitStatus, PidfdError> {
        self.wait_then(true).await
    }

    async fn wait_then(&self, kill_group: bool) -> Result<WaitStatus, PidfdError> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|source| PidfdError::Wait {
                    pid: self.pid,
                    source,
                })?;
            // Readable: the process has exited (a zombie until try_wait reaps it).
            if !self.child {
                // Not ours to reap; its pid may already name another process, so no group
                // kill by pid either (its cgroup leaf's teardown kills what it left).
                return exit_info(self.fd.get_ref().as_fd()).ok_or(PidfdError::StatusUnknown);
            }
            if kill_group && self.pid > 1 {
                // SAFETY: kill with a negative pid signals a process group; no memory involved.
                unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            }
            match self.try_wait()? {
                Some(status) => return Ok(status),
                None => guard.clear_ready(),
            }
        }
    }

    /// Reap the process if it has exited.
    pub fn try_wait(&self) -> Result<Option<WaitStatus>, PidfdError> {
        let status = waitid(
            WaitId::PidFd(self.fd.get_ref().as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        )
        .map_err(|e| PidfdError::Wait {
            pid: self.pid,
            source: e.into(),
        })?;
        Ok(status.and_then(|st| {
            if let Some(code) = st.exit_status() {
                if st.exited() {
                    return Some(WaitStatus::Exited(code));
                }
            }
            st.terminating_signal().map(|signal| WaitStatus::Signaled {
                signal,
                core_dumped: st.dumped(),
            })
        }))
    }

    /// Send `signal` (a signal number) to the process. A process that has already exited but is
    /// not reaped yet accepts and ignores it.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let sig = Signal::from_named_raw(signal).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("signal {signal}"))
        })?;
        pidfd_send_signal(self.fd.get_ref(), sig).map_err(io::Error::from)
    }
}

/// The exit status the kernel keeps for a reaped process behind `pidfd` (PIDFD_GET_INFO with
/// PIDFD_INFO_EXIT, Linux 6.15+); None where it keeps none.
fn exit_info(pidfd: std::os::fd::BorrowedFd<'_>) -> Option<WaitStatus> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_info is plain data; all-zero is a valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = libc::PIDFD_INFO_EXIT as u64;
    // SAFETY: PIDFD_GET_INFO writes at most size_of::<pidfd_info>() bytes into `info`, which
    // lives across the call; the descriptor is open (borrowed).
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
    if r != 0 || info.mask & libc::PIDFD_INFO_EXIT as u64 == 0 {
        return None;
    }
    // exit_code is a wait status, as waitpid's.
    let st = info.exit_code;
    Some(if libc::WIFSIGNALED(st) {
        WaitStatus::Signaled {
            signal: libc::WTERMSIG(st),
            core_dumped: libc::WCOREDUMP(st),
        }
    } else {
        WaitStatus::Exited(libc::WEXITSTATUS(st))
    })
}
