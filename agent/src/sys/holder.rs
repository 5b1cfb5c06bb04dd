//! Which process holds a socket: a worker's process tree read from /proc. A readiness probe
//! asks it which worker accepted the probe, since other processes may accept from the same
//! socket (workers sharing one socket, or the worker being replaced in a rolling replacement).
//!
//! Reading `/proc/PID/fd` of a process is a ptrace access check (PTRACE_MODE_READ_FSCREDS): the
//! reader's fsuid and fsgid must match the process's uids and gids, or the reader needs
//! CAP_SYS_PTRACE, which corral's systemd unit does not give the agent. A worker runs as its
//! own user, so where the plain read is refused the walk switches its thread's fsuid and fsgid
//! to the process's (CAP_SETUID and CAP_SETGID, which the agent has to start workers anyway)
//! and reads as that user. The walk runs on a thread of its own that ends with it, so a
//! switched credential never reaches the agent's other threads, even if switching back failed.

use std::io;
use std::path::{Path, PathBuf};

/// A process's fd directory could not be read (other than because it exited).
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the thread that reads /proc: {0}")]
    Thread(#[source] io::Error),
    #[error("the thread that reads /proc panicked")]
    Panicked,
}

/// More processes than this in one worker's tree are not looked through.
const MAX_TREE: usize = 4096;

/// Whether `pid` or one of its descendants (threads' children included) has the socket with
/// inode `inode` open. A process that exits while it is looked at counts as not holding it.
pub fn tree_holds_socket(pid: i32, inode: u32) -> Result<bool, HolderError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("holder".into())
            .spawn_scoped(scope, || walk(pid, inode))
            .map_err(HolderError::Thread)?
            .join()
            .unwrap_or(Err(HolderError::Panicked))
    })
}

/// The walk of [`tree_holds_socket`], on its own thread (it may switch that thread's fsuid).
fn walk(pid: i32, inode: u32) -> Result<bool, HolderError> {
    let wanted = format!("socket:[{inode}]");
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > MAX_TREE {
            break;
        }
        let proc_dir = format!("/proc/{p}");
        if holds(Path::new(&proc_dir), &wanted)? {
            return Ok(true);
        }
        todo.extend(children(Path::new(&proc_dir)));
    }
    Ok(false)
}

/// Whether the process at `proc_dir` has an fd whose link reads `wanted`; read as the process's
/// own user where this thread's credentials are refused.
fn holds(proc_dir: &Path, wanted: &str) -> Result<bool, HolderError> {
    let path = proc_dir.join("fd");
    match holds_as_we_are(&path, wanted) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
            let Some((uid, gid)) = owner(proc_dir) else {
                // Gone while we looked.
                return Ok(false);
            };
            let as_owner =
                FsCreds::switch(uid, gid).and_then(|_creds| holds_as_we_are(&path, wanted));
            as_owner.or_else(|source| gone_or(path, source))
        }
        r => r.or_else(|source| gone_or(path, source)),
    }
}

/// A process that is gone (or a zombie) holds nothing; any other error is one.
fn gone_or(path: PathBuf, source: io::Error) -> Result<bool, HolderError> {
    if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
        Ok(false)
    } else {
        Err(HolderError::Read { path, source })
    }
}

/// The effective uid and gid of the process at `proc_dir` (its `status`), `None` if it is gone.
fn owner(proc_dir: &Path) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let effective = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse::<u32>().ok())
    };
    Some((effective("Uid:")?, effective("Gid:")?))
}

/// Whether the fd directory `path` has an fd whose link reads `wanted`, read with this thread's
/// credentials as they are.
fn holds_as_we_are(path: &Path, wanted: &str) -> io::Result<bool> {
    let fds = std::fs::read_dir(path)?;
    for fd in fds.flatten() {
        match std::fs::read_link(fd.path()) {
            Ok(link) if link.as_os_str() == wanted => return Ok(true),
            Ok(_) => {}
            // The directory lists for CAP_DAC_READ_SEARCH, but each link is a ptrace check.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                return Err(e)
            }
            // Closed meanwhile.
            Err(_) => {}
        }
    }
    Ok(false)
}

/// This thread's filesystem uid and gid switched to a process's; switched back on drop. Only
/// for the walk's own thread: fsuid and fsgid are per thread (the raw syscalls, not a libc
/// wrapper that might apply them to every thread).
struct FsCreds {
    uid: u32,
    gid: u32,
}

impl FsCreds {
    fn switch(uid: u32, gid: u32) -> io::Result<FsCreds> {
        let (old_uid, old_gid) = (
            fs_id(libc::SYS_setfsuid, u32::MAX),
            fs_id(libc::SYS_setfsgid, u32::MAX),
        );
        // Group first: switching the fsuid away from 0 drops the file capabilities, not
        // CAP_SETGID, but this order needs no reasoning about it.
        fs_id(libc::SYS_setfsgid, gid);
        let creds = FsCreds {
            uid: old_uid,
            gid: old_gid,
        };
        fs_id(libc::SYS_setfsuid, uid);
        // setfsuid/setfsgid report no error; asking with an invalid id (-1) returns the current.
        let now = (
            fs_id(libc::SYS_setfsuid, u32::MAX),
            fs_id(libc::SYS_setfsgid, u32::MAX),
        );
        if now != (uid, gid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "cannot read as uid {uid} gid {gid} (setfsuid/setfsgid need CAP_SETUID and \
                     CAP_SETGID, or CAP_SYS_PTRACE to read as we are)"
                ),
            ));
        }
        Ok(creds)
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        fs_id(libc::SYS_setfsuid, self.uid);
        fs_id(libc::SYS_setfsgid, self.gid);
    }
}

/// setfsuid or setfsgid (`call`) for this thread only; returns the previous id.
fn fs_id(call: libc::c_long, id: u32) -> u32 {
    // SAFETY: setfsuid and setfsgid take one integer and touch no memory of ours; they change
    // the calling thread's credentials only (the raw syscall, no libc broadcast to other
    // threads). Callers run them on the walk's own short-lived thread.
    let previous = unsafe { libc::syscall(call, libc::c_long::from(id)) };
    // The kernel returns the previous id, a u32 in a long.
    previous as u32
}

/// The children of the process at `proc_dir`, from each of its threads' `children` lists.
fn children(proc_dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u32 {
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("fd");
        meta.ino() as u32
    }

    #[test]
    fn finds_a_socket_of_this_process_and_not_a_closed_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let inode = inode_of(&l);
        let me = std::process::id() as i32;
        assert!(tree_holds_socket(me, inode).expect("read /proc"));
        drop(l);
        assert!(!tree_holds_socket(me, inode).expect("read /proc"));
    }

    #[test]
    fn finds_a_socket_a_child_holds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let inode = inode_of(&l);
        // The child inherits it (std clears close-on-exec only for stdio, so dup it to 0).
        let fd: std::os::fd::OwnedFd = l.into();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(fd))
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        assert!(tree_holds_socket(me, inode).expect("read /proc"));
        assert!(tree_holds_socket(child.id() as i32, inode).expect("read /proc"));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!tree_holds_socket(child.id() as i32, inode).expect("read /proc"));
    }

    /// A worker of another user, read by an agent without CAP_SYS_PTRACE (the systemd unit's
    /// capability set): the links are refused as the agent is, and found as the worker's user.
    #[test]
    fn reads_another_users_process_without_cap_sys_ptrace() {
        use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
        assert!(
            crate::sys::machine::is_root(),
            "this test switches users: run it as root"
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let inode = inode_of(&l);
        let fd: std::os::fd::OwnedFd = l.into();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(fd))
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("spawn sleep as nobody");
        let pid = child.id() as i32;
        // Wait for the exec (the fd table is the parent's copy before it).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_or(true, |e| !e.to_string_lossy().contains("sleep"))
        {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Capabilities are per thread, and a thread inherits its creator's: drop
        // CAP_SYS_PTRACE on a thread of our own, as the unit's bounding set does for the agent.
        let outcome = std::thread::spawn(move || {
            let mut sets = capabilities(None).expect("capget");
            sets.effective.remove(CapabilitySet::SYS_PTRACE);
            sets.permitted.remove(CapabilitySet::SYS_PTRACE);
            set_capabilities(None, sets).expect("capset");
            let plain = std::fs::read_link(format!("/proc/{pid}/fd/0"));
            (
                plain.map_err(|e| e.raw_os_error()),
                tree_holds_socket(pid, inode),
            )
        })
        .join()
        .expect("test thread");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            outcome.0,
            Err(Some(libc::EACCES)),
            "without CAP_SYS_PTRACE, reading another user's fd link must be refused"
        );
        assert!(outcome.1.expect("read /proc as the worker's user"));
    }
}
