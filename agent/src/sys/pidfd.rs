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
        Ok(Process { pid, fd })
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
