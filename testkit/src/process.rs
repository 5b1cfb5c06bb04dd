//! Processes a test or benchmark started: stopped when their guard drops, so a failure leaves
//! nothing running.

use std::process::{Child, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether `pid` is a live process: a zombie still answers kill(0), so /proc's state is read.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGTERM `child`, wait up to `grace` for it to exit, then SIGKILL it; it is reaped either
/// way. `Some(status)` if it exited within `grace`, `None` if it had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: kill(2) of our own child, not reaped yet (try_wait just said so), so the pid is
    // still ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A child process stopped and reaped when the guard drops: SIGKILL at once, or, made with
/// [`ChildGuard::with_grace`], SIGTERM first and SIGKILL after the grace period (an agent,
/// which stops its workers on SIGTERM).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    grace: Option<Duration>,
}

impl ChildGuard {
    /// SIGKILL `child` on drop.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child, grace: None }
    }

    /// SIGTERM `child` on drop, SIGKILL it if it is still running after `grace`.
    pub fn with_grace(child: Child, grace: Duration) -> ChildGuard {
        ChildGuard {
            child,
            grace: Some(grace),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The child's exit status if it has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        match self.grace {
            Some(grace) => {
                terminate(&mut self.child, grace);
            }
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// SIGKILLs the pids it holds when dropped: processes no guard or agent owns, such as a
/// worker's forked children when no cgroup contains them, or workers a benchmark's agent may
/// have left. A pid that is no longer a live process is skipped.
#[derive(Debug, Default)]
pub struct KillOnDrop(Mutex<Vec<i32>>);

impl KillOnDrop {
    pub fn new() -> KillOnDrop {
        KillOnDrop::default()
    }

    pub fn add(&self, pids: impl IntoIterator<Item = i32>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pids);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if pid > 1 && pid_alive(pid) {
                // SAFETY: kill(2) with a positive pid the caller recorded; harmless if it is
                // gone.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// For `Command::pre_exec`: the child gets SIGKILL when the process that started it dies, even
/// without running its guards (an agent started so takes its workers down with it). Put it
/// after anything that changes the child's credentials: a uid change clears it. Only
/// async-signal-safe calls, no allocation.
pub fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid have no memory effects.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before the prctl.
        if libc::getppid() == 1 {
            return Err(std::io::Error::from(std::io::ErrorKind::Other));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn a_guard_kills_and_reaps_its_child() {
        let guard = ChildGuard::new(sleeper());
        let pid = guard.pid();
        assert!(pid_alive(pid));
        drop(guard);
        assert!(!pid_alive(pid), "{pid} survived its guard");
    }

    #[test]
    fn terminate_sends_sigterm_first() {
        let mut child = sleeper();
        let status = terminate(&mut child, Duration::from_secs(10)).expect("exits on SIGTERM");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn terminate_kills_what_ignores_sigterm() {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 60"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        // Wait until the trap is set.
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut out, &mut buf).expect("ready");
        assert_eq!(terminate(&mut child, Duration::from_millis(200)), None);
        assert!(!pid_alive(child.id() as i32));
    }

    #[test]
    fn kill_on_drop_kills_the_pids_it_holds() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let guard = KillOnDrop::new();
        guard.add([pid]);
        drop(guard);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
    }
}
