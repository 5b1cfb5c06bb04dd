//! One cgroupfs directory held by an `O_PATH` fd: reading and writing its interface files,
//! creating, opening, listing and removing child cgroups, all relative to the fd.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::controllers::Controllers;
use super::error::CgroupError;
use super::files::parse_pids;

pub(super) const DIR_FLAGS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
pub(super) const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
// O_TRUNC: what `echo value > file` does; cgroupfs ignores it.
pub(super) const WRITE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::TRUNC)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// One cgroup directory: an `O_PATH` fd and, for messages, its path.
#[derive(Debug)]
pub(super) struct Node {
    pub(super) fd: OwnedFd,
    pub(super) path: PathBuf,
}

pub(super) fn io_err(op: &'static str, path: PathBuf) -> impl FnOnce(Errno) -> CgroupError {
    move |e| CgroupError::Io {
        op,
        path,
        source: e.into(),
    }
}

impl Node {
    pub(super) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(super) fn open_file(&self, name: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        loop {
            match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    pub(super) fn read_errno(&self, name: &str) -> Result<String, Errno> {
        let fd = self.open_file(name, READ_FLAGS)?;
        let mut text = String::new();
        File::from(fd)
            .read_to_string(&mut text)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        Ok(text)
    }

    pub(super) fn read(&self, name: &str) -> Result<String, CgroupError> {
        self.read_errno(name)
            .map_err(io_err("read", self.file(name)))
    }

    /// `None` if the file does not exist (an interface file this kernel lacks).
    pub(super) fn read_opt(&self, name: &str) -> Result<Option<String>, CgroupError> {
        match self.read_errno(name) {
            Ok(t) => Ok(Some(t)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err("read", self.file(name))(e)),
        }
    }

    pub(super) fn write_errno(&self, name: &str, value: &str) -> Result<(), Errno> {
        let fd = self.open_file(name, WRITE_FLAGS)?;
        write_all(&fd, value)
    }

    pub(super) fn write(&self, name: &str, value: &str) -> Result<(), CgroupError> {
        self.write_errno(name, value)
            .map_err(|e| self.write_error(name, value, e))
    }

    pub(super) fn write_error(&self, name: &str, value: &str, e: Errno) -> CgroupError {
        CgroupError::Write {
            path: self.file(name),
            value: value.to_string(),
            source: e.into(),
        }
    }

    pub(super) fn controllers(&self) -> Result<Controllers, CgroupError> {
        Ok(Controllers::parse(&self.read("cgroup.controllers")?))
    }

    pub(super) fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let text = self.read("cgroup.procs")?;
        parse_pids(&text).ok_or_else(|| CgroupError::Parse {
            path: self.file("cgroup.procs"),
            text,
            reason: "expected one pid per line",
        })
    }

    /// The pids in `cgroup.procs` that are not in `seen` (the rounds of moving or killing
    /// them: a process may fork meanwhile).
    pub(super) fn pids_except(&self, seen: &BTreeSet<i32>) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .pids()?
            .into_iter()
            .filter(|p| !seen.contains(p))
            .collect())
    }

    pub(super) fn exists(&self, name: &str) -> Result<bool, CgroupError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io_err("stat", self.file(name))(e)),
        }
    }

    /// Open the child cgroup `name` (validated by the caller).
    pub(super) fn open_child(&self, name: &str) -> Result<Node, CgroupError> {
        let fd = self
            .open_file(name, DIR_FLAGS)
            .map_err(io_err("open", self.file(name)))?;
        Ok(Node {
            fd,
            path: self.file(name),
        })
    }

    /// Create the child cgroup `name` (validated by the caller), or open it if it exists.
    /// Returns whether it was created.
    pub(super) fn make_child(&self, name: &str) -> Result<(Node, bool), CgroupError> {
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io_err("mkdir", self.file(name))(e)),
        };
        Ok((self.open_child(name)?, created))
    }

    /// Remove the child cgroup `name`; already gone is fine.
    pub(super) fn remove_child(&self, name: &str) -> Result<(), CgroupError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::BUSY) => Err(CgroupError::Busy {
                path: self.file(name),
            }),
            Err(e) => Err(io_err("rmdir", self.file(name))(e)),
        }
    }

    /// Names of child directories starting with `prefix` (the prefix stripped).
    pub(super) fn children(&self, prefix: &str) -> Result<Vec<String>, CgroupError> {
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

    pub(super) fn try_clone(&self) -> Result<Node, CgroupError> {
        let fd = self.fd.try_clone().map_err(|source| CgroupError::Io {
            op: "dup fd of",
            path: self.path.clone(),
            source,
        })?;
        Ok(Node {
            fd,
            path: self.path.clone(),
        })
    }

    /// Enable `want` for this cgroup's children, writing only what is not enabled yet.
    pub(super) fn enable(&self, want: Controllers) -> Result<(), CgroupError> {
        let current = Controllers::parse(&self.read("cgroup.subtree_control")?);
        let add = want.without(current);
        if add.is_empty() {
            return Ok(());
        }
        self.write("cgroup.subtree_control", &add.enable_line())
    }
}

pub(super) fn write_all(fd: &OwnedFd, value: &str) -> Result<(), Errno> {
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
