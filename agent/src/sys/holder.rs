//! Which process holds a socket: a worker's process tree read from /proc. Used where workers
//! share one listening socket, so a readiness probe must learn *which* worker accepted it.

use std::io;
use std::path::{Path, PathBuf};

/// A process's fd directory could not be read (other than because it exited).
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub struct HolderError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// More processes than this in one worker's tree are not looked through.
const MAX_TREE: usize = 4096;

/// Whether `pid` or one of its descendants (threads' children included) has the socket with
/// inode `inode` open. A process that exits while it is looked at counts as not holding it.
pub fn tree_holds_socket(pid: i32, inode: u32) -> Result<bool, HolderError> {
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

/// Whether the process at `proc_dir` has an fd whose link reads `wanted`.
fn holds(proc_dir: &Path, wanted: &str) -> Result<bool, HolderError> {
    let path = proc_dir.join("fd");
    let fds = match std::fs::read_dir(&path) {
        Ok(d) => d,
        // Gone, or a zombie: it holds nothing.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => return Ok(false),
        Err(source) => return Err(HolderError { path, source }),
    };
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted) {
            return Ok(true);
        }
    }
    Ok(false)
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
}
