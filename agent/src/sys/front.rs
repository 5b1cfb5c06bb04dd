//! What a TLS front process needs from the kernel at start, and the agent's side of the
//! certificate handoff (a sealed memfd).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};

use zeroize::Zeroizing;

/// No core dumps and no ptrace by processes of the same uid: the front holds private keys.
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The listening socket on fd 3, as the worker contract passes it (LISTEN_FDS=1 and our pid).
pub fn inherited_listener() -> io::Result<TcpListener> {
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    let pid = std::env::var("LISTEN_PID").unwrap_or_default();
    if fds != "1" || pid != std::process::id().to_string() {
        return Err(io::Error::other(format!(
            "expected LISTEN_FDS=1 and LISTEN_PID={} (got `{fds}`, `{pid}`): `corral front` is \
             started by the agent",
            std::process::id()
        )));
    }
    // SAFETY: F_GETFD only inspects the descriptor.
    if unsafe { libc::fcntl(3, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd 3 is open (checked above) and handed to us by the agent; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let l = TcpListener::from(fd);
    l.local_addr()?; // a socket, not something else on fd 3
    Ok(l)
}

/// The certificate bundle on fd 4, read whole; the descriptor is closed after.
pub fn read_bundle() -> io::Result<Zeroizing<Vec<u8>>> {
    // SAFETY: F_GETFD only inspects the descriptor.
    if unsafe { libc::fcntl(4, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd 4 is open (checked above) and ours alone.
    let mut f = unsafe { File::from_raw_fd(4) };
    let mut buf = Zeroizing::new(Vec::new());
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// A memfd holding `bytes`, sealed against any change, positioned at 0: each front process
/// gets its own dup and reads it from the start (the agent re-opens it per process, see
/// [`reopen`]).
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        name,
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )?;
    let mut f = File::from(fd);
    f.write_all(bytes)?;
    rustix::fs::fcntl_add_seals(
        &f,
        rustix::fs::SealFlags::SHRINK
            | rustix::fs::SealFlags::GROW
            | rustix::fs::SealFlags::WRITE
            | rustix::fs::SealFlags::SEAL,
    )?;
    Ok(OwnedFd::from(f))
}

/// A fresh open file description of a memfd (its own offset, read-only), through /proc.
pub fn reopen(memfd: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", memfd.as_raw_fd());
    Ok(OwnedFd::from(File::open(path)?))
}
