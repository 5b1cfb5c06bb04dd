//! The keeper's channel: a unix SOCK_SEQPACKET socket (one message per send, never merged or
//! split) carrying small messages and descriptors (SCM_RIGHTS) between the agent and
//! `corral keeper`. Only processes of the keeper's own user are answered (SO_PEERCRED).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// Descriptors in one message: below the kernel's SCM_MAX_FD (253).
pub const FDS_PER_MESSAGE: usize = 200;
/// The largest message payload.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{call} {path}: {source}")]
    Path {
        call: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{call}: {source}")]
    Io {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a message arrived cut short (more than {FDS_PER_MESSAGE} descriptors or {MAX_MESSAGE} bytes)")]
    Truncated,
    #[error("the peer runs as uid {uid}, not as this process's")]
    Stranger { uid: u32 },
}

fn io(call: &'static str) -> impl FnOnce(rustix::io::Errno) -> KeeperError {
    move |e| KeeperError::Io {
        call,
        source: e.into(),
    }
}

fn seqpacket() -> Result<OwnedFd, KeeperError> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socket(AF_UNIX, SOCK_SEQPACKET)"))
}

/// The keeper's listening socket at `path`, owner-only (0600) from the start; a file left
/// there by a keeper that is gone is replaced.
pub fn listen(path: &Path) -> Result<OwnedFd, KeeperError> {
    let at = |call| {
        move |e: rustix::io::Errno| KeeperError::Path {
            call,
            path: path.to_path_buf(),
            source: e.into(),
        }
    };
    let fd = seqpacket()?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600)).map_err(at("fchmod"))?;
    let addr = SocketAddrUnix::new(path).map_err(at("address"))?;
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(|source| KeeperError::Path {
            call: "removing the stale socket",
            path: path.to_path_buf(),
            source,
        })?;
    }
    rustix::net::bind(&fd, &addr).map_err(at("bind"))?;
    rustix::net::listen(&fd, 8).map_err(at("listen"))?;
    Ok(fd)
}

/// Whether a socket listens at `path` (in this network namespace), from /proc/net/unix: a
/// look that connects to nothing, so a keeper waiting for its next agent is not disturbed.
pub fn listening(path: &Path) -> bool {
    /// `__SO_ACCEPTCON` in the Flags column: a listening socket.
    const ACCEPTCON: u32 = 0x1_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = path.as_os_str().to_string_lossy();
    // "Num: RefCount Protocol Flags Type St Inode Path"
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & ACCEPTCON != 0)
            && cols[7..].join(" ") == wanted
    })
}

/// Connect to a keeper at `path`; its user must be ours.
pub fn connect(path: &Path) -> Result<OwnedFd, KeeperError> {
    let fd = seqpacket()?;
    let addr = SocketAddrUnix::new(path).map_err(|e| KeeperError::Path {
        call: "address",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    rustix::net::connect(&fd, &addr).map_err(|e| KeeperError::Path {
        call: "connect",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    same_user(fd.as_fd())?;
    Ok(fd)
}

/// Accept one connection on the keeper's socket; the peer's user must be ours.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, KeeperError> {
    let fd = rustix::net::accept_with(listener, SocketFlags::CLOEXEC).map_err(io("accept"))?;
    same_user(fd.as_fd())?;
    Ok(fd)
}

fn same_user(fd: BorrowedFd<'_>) -> Result<(), KeeperError> {
    let cred = rustix::net::sockopt::socket_peercred(fd).map_err(io("SO_PEERCRED"))?;
    let me = rustix::process::geteuid();
    if cred.uid != me {
        return Err(KeeperError::Stranger {
            uid: cred.uid.as_raw(),
        });
    }
    Ok(())
}

/// Bound every send and receive on `fd` by `timeout` (a keeper that stops reading cannot hang
/// the agent).
pub fn set_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), KeeperError> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    set_socket_timeout(fd, Timeout::Send, Some(timeout)).map_err(io("SO_SNDTIMEO"))?;
    set_socket_timeout(fd, Timeout::Recv, Some(timeout)).map_err(io("SO_RCVTIMEO"))
}

/// Send one message: `bytes` and at most [`FDS_PER_MESSAGE`] descriptors (the receiver gets
/// its own copies).
pub fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), KeeperError> {
    debug_assert!(fds.len() <= FDS_PER_MESSAGE && bytes.len() <= MAX_MESSAGE);
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(KeeperError::Truncated);
    }
    // An empty payload would read as end-of-stream on the other side.
    let payload: &[u8] = if bytes.is_empty() { b"\0" } else { bytes };
    rustix::net::sendmsg(
        fd,
        &[IoSlice::new(payload)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io("sendmsg"))?;
    Ok(())
}

/// [`send`] with descriptors given by number: the caller owns each of them and keeps it open
/// for the duration of the call.
pub fn send_raw(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
) -> Result<(), KeeperError> {
    // SAFETY: the caller guarantees every number is an open descriptor it owns until this
    // call returns; the borrows do not outlive the call.
    let borrowed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|n| unsafe { BorrowedFd::borrow_raw(*n) })
        .collect();
    send(fd, bytes, &borrowed)
}

/// A received message: its bytes and descriptors.
pub type Message = (Vec<u8>, Vec<OwnedFd>);

/// Receive one message: its bytes and descriptors (close-on-exec). `None` at end of stream
/// (the peer closed or died).
pub fn recv(fd: BorrowedFd<'_>) -> Result<Option<Message>, KeeperError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        fd,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io("recvmsg"))?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
        || got.flags.contains(rustix::net::ReturnFlags::TRUNC)
    {
        return Err(KeeperError::Truncated);
    }
    if got.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(got.bytes);
    Ok(Some((buf, fds)))
}

/// What a non-blocking read of an output pipe found.
pub enum Read {
    Bytes(usize),
    /// Every write end is closed.
    End,
    /// Nothing more for now.
    Empty,
    Failed,
}

/// Read what a non-blocking pipe has into `buf`.
pub fn read_pipe(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Read {
    loop {
        return match rustix::io::read(fd, &mut *buf) {
            Ok(0) => Read::End,
            Ok(n) => Read::Bytes(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => Read::Empty,
            Err(_) => Read::Failed,
        };
    }
}

/// Read and drop whatever messages are queued on `fd`, without waiting.
pub fn discard_pending(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    while rustix::net::recv(fd, &mut buf, RecvFlags::DONTWAIT).is_ok_and(|(n, _)| n > 0) {}
}

/// Whether the peer of `fd` hung up (it never sends unprompted, so anything to read means
/// it is gone). Does not wait.
pub fn peer_gone(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut polled = [PollFd::new(&fd, PollFlags::IN | PollFlags::RDHUP)];
    let now = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut polled, Some(&now)), Ok(n) if n > 0)
}

/// A pair of connected seqpacket sockets (tests).
pub fn pair() -> Result<(OwnedFd, OwnedFd), KeeperError> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io("socketpair"))
}

/// Put `fd` in non-blocking mode (the keeper's output pipes: it reads what is there).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), KeeperError> {
    let flags = rustix::fs::fcntl_getfl(fd).map_err(io("fcntl(F_GETFL)"))?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(io("fcntl(F_SETFL)"))
}

/// Wait until one of `fds` is readable (or hung up); which ones are.
pub fn poll_readable(fds: &[BorrowedFd<'_>]) -> Result<Vec<bool>, KeeperError> {
    use rustix::event::{PollFd, PollFlags};
    let mut polled: Vec<PollFd<'_>> = fds.iter().map(|f| PollFd::new(f, PollFlags::IN)).collect();
    loop {
        match rustix::event::poll(&mut polled, None) {
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io("poll")(e)),
        }
    }
    Ok(polled.iter().map(|p| !p.revents().is_empty()).collect())
}

/// The whole content of a memfd received from the peer, read from its start (pread: the
/// sender's offset does not matter).
pub fn read_memfd(fd: BorrowedFd<'_>) -> Result<Vec<u8>, KeeperError> {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rustix::io::pread(fd, &mut buf, bytes.len() as u64).map_err(io("pread"))?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn messages_carry_bytes_and_descriptors_and_end_of_stream_reads_as_none() {
        let (a, b) = pair().expect("pair");
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        send(a.as_fd(), b"hello", &[r.as_fd(), w.as_fd()]).expect("send");
        let (bytes, fds) = recv(b.as_fd()).expect("recv").expect("a message");
        assert_eq!(bytes, b"hello");
        assert_eq!(fds.len(), 2);
        assert_ne!(fds[0].as_raw_fd(), r.as_raw_fd());
        // The copies are the same pipe: what goes into the received write end comes out of
        // the original read end.
        rustix::io::write(&fds[1], b"x").expect("write");
        let mut one = [0u8; 1];
        rustix::io::read(&r, &mut one).expect("read");
        assert_eq!(&one, b"x");
        drop(a);
        assert!(recv(b.as_fd()).expect("recv").is_none());
    }

    #[test]
    fn listening_sees_a_listening_socket_by_path_and_not_a_removed_one() {
        let dir =
            std::env::temp_dir().join(format!("corral-keeper-listening-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keeper.sock");
        assert!(!listening(&path));
        let fd = listen(&path).expect("listen");
        assert!(listening(&path));
        drop(fd);
        assert!(!listening(&path));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
