//! Waiting for a file to change (cgroup `memory.events`) without polling.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

/// An inotify watch for modifications of one file.
#[derive(Debug)]
pub struct Watch {
    fd: AsyncFd<OwnedFd>,
}

impl Watch {
    /// Must be called inside a tokio runtime.
    pub fn new(path: &Path) -> Result<Watch, WatchError> {
        let err = |source: io::Error| WatchError {
            path: path.display().to_string(),
            source,
        };
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| err(e.into()))?;
        inotify::add_watch(&fd, path, WatchFlags::MODIFY).map_err(|e| err(e.into()))?;
        // SAFETY: `fd` is an OwnedFd: its raw fd stays open and the same while AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| err(e.into_parts().1))?;
        Ok(Watch { fd })
    }

    /// A watch of directories for any file in them being written, created, replaced (renamed
    /// over: how certbot and most tools update certificates) or removed.
    pub fn dirs(dirs: &[std::path::PathBuf]) -> Result<Watch, WatchError> {
        let err = |path: &Path, source: io::Error| WatchError {
            path: path.display().to_string(),
            source,
        };
        let first = dirs.first().map(|p| p.as_path()).unwrap_or(Path::new("/"));
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| err(first, e.into()))?;
        for d in dirs {
            inotify::add_watch(
                &fd,
                d,
                WatchFlags::CLOSE_WRITE
                    | WatchFlags::MOVED_TO
                    | WatchFlags::CREATE
                    | WatchFlags::DELETE
                    | WatchFlags::ATTRIB,
            )
            .map_err(|e| err(d, e.into()))?;
        }
        // SAFETY: `fd` is an OwnedFd: its raw fd stays open and the same while AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| err(first, e.into_parts().1))?;
        Ok(Watch { fd })
    }

    /// Wait until the file was modified (at least once since the last call).
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = [0u8; 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            match rustix::io::read(self.fd.get_ref(), &mut buf) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => guard.clear_ready(),
                Err(e) if e == rustix::io::Errno::AGAIN => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
