//! What a TLS front process needs from the kernel at start, and the agent's side of the
//! certificate handoff (a sealed memfd).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// A call on a descriptor the agent passed (`crate::front::fds`).
    #[error("{call} on fd {fd}: {source}")]
    Fd {
        call: &'static str,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "expected LISTEN_FDS=1 and LISTEN_PID={pid} (got `{fds}`, `{listen_pid}`): `corral front` \
         is started by the agent"
    )]
    NotStartedByAgent {
        pid: u32,
        fds: String,
        listen_pid: String,
    },
    #[error("counters memfd of {size} bytes, want {want}")]
    CountersTooSmall { size: usize, want: usize },
}

fn syscall(call: &'static str) -> impl FnOnce(io::Error) -> FrontError {
    move |source| FrontError::Syscall { call, source }
}

fn on_fd(call: &'static str, fd: RawFd) -> impl FnOnce(io::Error) -> FrontError {
    move |source| FrontError::Fd { call, fd, source }
}

/// Check that `fd`, passed by the agent, is open (F_GETFD only inspects the number).
fn passed_fd_open(fd: RawFd) -> Result<(), FrontError> {
    // SAFETY: F_GETFD only inspects the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(on_fd("fcntl(F_GETFD)", fd)(io::Error::last_os_error()));
    }
    Ok(())
}

/// No core dumps and no ptrace by processes of the same uid: the front holds private keys.
pub fn make_undumpable() -> Result<(), FrontError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(syscall("prctl(PR_SET_DUMPABLE, 0)")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// SCHED_BATCH for this process and the threads it starts after (its nice value unchanged; an
/// unprivileged process may choose it). A batch task does not preempt the running one when it
/// wakes: a front woken by a worker's answer lets that worker reach its next blocking read
/// first instead of switching twice per request (ARCHITECTURE.md, "The TLS front").
pub fn set_batch_scheduling() -> Result<(), FrontError> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling process with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(syscall("sched_setscheduler(SCHED_BATCH)")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Name the process `corral-front` (it is exec'd as /proc/self/exe, which `ps` would show as
/// `exe`).
pub fn set_name() {
    let name = b"corral-front\0";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The listening socket on `fd` (3), as the worker contract passes it (LISTEN_FDS=1 and our
/// pid).
pub fn inherited_listener(fd: RawFd) -> Result<TcpListener, FrontError> {
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    let listen_pid = std::env::var("LISTEN_PID").unwrap_or_default();
    let pid = std::process::id();
    if fds != "1" || listen_pid != pid.to_string() {
        return Err(FrontError::NotStartedByAgent {
            pid,
            fds,
            listen_pid,
        });
    }
    inherited_fd_listener(fd)
}

/// A listening socket the agent passed on `fd`.
pub fn inherited_fd_listener(fd: RawFd) -> Result<TcpListener, FrontError> {
    passed_fd_open(fd)?;
    // SAFETY: `fd` is open (checked above) and handed to us by the agent; nothing else owns it.
    let l = TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // A socket, not something else on that number.
    l.local_addr().map_err(on_fd("getsockname", fd))?;
    Ok(l)
}

/// The certificate bundle the agent passed on `fd`, read whole; the descriptor is closed after.
pub fn read_bundle(fd: RawFd) -> Result<Zeroizing<Vec<u8>>, FrontError> {
    passed_fd_open(fd)?;
    // SAFETY: `fd` is open (checked above), passed by the agent and ours alone.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let mut buf = Zeroizing::new(Vec::new());
    f.read_to_end(&mut buf).map_err(on_fd("read", fd))?;
    Ok(buf)
}

/// A memfd holding `bytes`, sealed against any change, positioned at 0: each front process
/// gets its own dup and reads it from the start (the agent re-opens it per process, see
/// [`reopen`]).
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> Result<OwnedFd, FrontError> {
    let fd = rustix::fs::memfd_create(
        name,
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| syscall("memfd_create")(e.into()))?;
    let mut f = File::from(fd);
    f.write_all(bytes).map_err(syscall("write to the memfd"))?;
    rustix::fs::fcntl_add_seals(
        &f,
        rustix::fs::SealFlags::SHRINK
            | rustix::fs::SealFlags::GROW
            | rustix::fs::SealFlags::WRITE
            | rustix::fs::SealFlags::SEAL,
    )
    .map_err(|e| syscall("fcntl(F_ADD_SEALS)")(e.into()))?;
    Ok(OwnedFd::from(f))
}

/// A fresh open file description of a memfd (its own offset, read-only), through /proc.
pub fn reopen(memfd: &OwnedFd) -> Result<OwnedFd, FrontError> {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from(format!("/proc/self/fd/{}", memfd.as_raw_fd()));
    match File::open(&path) {
        Ok(f) => Ok(OwnedFd::from(f)),
        Err(source) => Err(FrontError::Open { path, source }),
    }
}

/// Counters a front process updates and the agent reads: an array of u64 in a memfd mapped
/// shared by both. Plain numbers, no parsing: a misbehaving front can only
/// make its own counters wrong.
pub struct SharedCounters {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics and lives until Drop.
unsafe impl Send for SharedCounters {}
// SAFETY: as above.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    fn map(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> Result<SharedCounters, FrontError> {
        let bytes = len * 8;
        // SAFETY: a fresh shared mapping of `bytes` of the memfd; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(syscall("mmap of the counters memfd")(
                io::Error::last_os_error(),
            ));
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| {
            syscall("mmap of the counters memfd")(io::Error::other("a null mapping"))
        })?;
        Ok(SharedCounters { ptr, len })
    }

    /// The agent's side: `len` zeroed counters, and the memfd to pass to the front.
    pub fn create(name: &str, len: usize) -> Result<(SharedCounters, OwnedFd), FrontError> {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| syscall("memfd_create")(e.into()))?;
        rustix::fs::ftruncate(&fd, (len * 8) as u64)
            .map_err(|e| syscall("ftruncate of the counters memfd")(e.into()))?;
        let m = SharedCounters::map(std::os::fd::AsFd::as_fd(&fd), len)?;
        Ok((m, fd))
    }

    /// The front's side: the counters the agent passed on `fd` (the descriptor is closed after
    /// mapping).
    pub fn inherited(fd: RawFd, len: usize) -> Result<SharedCounters, FrontError> {
        passed_fd_open(fd)?;
        // SAFETY: `fd` is open (checked above), passed by the agent and ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        SharedCounters::from_fd(std::os::fd::AsFd::as_fd(&fd), len)
    }

    /// Map `len` counters of an existing counters memfd (a front's, handed over by the
    /// agent's previous image).
    pub fn from_fd(
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> Result<SharedCounters, FrontError> {
        let size = memfd_size(fd)?;
        if size < len * 8 {
            return Err(FrontError::CountersTooSmall {
                size,
                want: len * 8,
            });
        }
        SharedCounters::map(fd, len)
    }

    /// The counters of a front handed over by the agent's previous image, which may be of an
    /// older version with fewer counters: those it has, up to `len` (the rest read 0).
    pub fn handed_over(
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> Result<SharedCounters, FrontError> {
        let size = memfd_size(fd)?;
        match (size / 8).min(len) {
            0 => Err(FrontError::CountersTooSmall {
                size,
                want: len * 8,
            }),
            have => SharedCounters::map(fd, have),
        }
    }

    fn at(&self, i: usize) -> Option<&std::sync::atomic::AtomicU64> {
        // SAFETY: i < len, inside the mapping, which is 8-byte aligned (page-aligned).
        (i < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(i) })
    }

    pub fn add(&self, i: usize, v: u64) {
        if let Some(a) = self.at(i) {
            a.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn sub(&self, i: usize, v: u64) {
        if let Some(a) = self.at(i) {
            a.fetch_sub(v, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.at(i)
            .map_or(0, |a| a.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 8) };
    }
}

/// The size of the counters memfd `fd`, in bytes.
fn memfd_size(fd: std::os::fd::BorrowedFd<'_>) -> Result<usize, FrontError> {
    Ok(rustix::fs::fstat(fd)
        .map_err(|e| syscall("fstat of the counters memfd")(e.into()))?
        .st_size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// An agent upgraded in place adopts fronts an older version started, with fewer counters.
    #[test]
    fn a_handed_over_front_with_fewer_counters_is_mapped_as_far_as_it_goes() {
        let (old, fd) = SharedCounters::create("corral-test-counters", 20).expect("create");
        old.add(19, 7);
        assert!(SharedCounters::from_fd(fd.as_fd(), 24).is_err());
        let new = SharedCounters::handed_over(fd.as_fd(), 24).expect("mapped");
        assert_eq!(new.get(19), 7);
        assert_eq!(new.get(22), 0);
        new.add(23, 1);
        assert_eq!(new.get(23), 0);
    }
}
