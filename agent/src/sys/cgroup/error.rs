//! The one error type of `sys::cgroup`: every variant names the operation and the file.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::names::SUPERVISOR;

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
    #[error("{path} still has processes after {waited:?}")]
    StillPopulated { path: PathBuf, waited: Duration },
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
