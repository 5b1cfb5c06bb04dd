//! sd_notify both ways: tell systemd (Type=notify) about the agent's state over
//! `NOTIFY_SOCKET`, and receive a worker's `READY=1` on a socket of the agent's, with the
//! sender's pid as the kernel reports it.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixDatagram;

#[derive(Debug, thiserror::Error)]
#[error("sd_notify to {socket}: {source}")]
pub struct NotifyError {
    pub socket: String,
    #[source]
    pub source: io::Error,
}

/// The systemd notification socket the agent was started with, if any.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`. The variable is never passed on to workers (they get their own).
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Send `state` (e.g. "READY=1"); a no-op without `NOTIFY_SOCKET`.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let err = |source| NotifyError {
            socket: path.clone(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        if let Some(abstract_name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .map_err(err)?;
            sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
        } else {
            sock.send_to(state.as_bytes(), path).map_err(err)?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds, for `MONOTONIC_USEC=` with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Bind the abstract unix datagram socket `name` (no leading `@`), non-blocking, with
/// `SO_PASSCRED`: every datagram then arrives with its sender's pid, uid and gid, checked by the
/// kernel, so a `READY=1` can be told from a stranger's.
pub fn bind_receiver(name: &str) -> io::Result<UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = UnixDatagram::bind_addr(&addr)?;
    sock.set_nonblocking(true)?;
    rustix::net::sockopt::set_socket_passcred(&sock, true)?;
    Ok(sock)
}

/// [`bind_receiver`] on `prefix` followed by 16 random hex digits (getrandom): the name and
/// the socket. A name another process could work out (the agent's pid, a worker id) it could
/// bind first, and the worker behind it could then never report ready; this one it can only
/// learn once the agent holds it.
pub fn bind_unguessable_receiver(prefix: &str) -> io::Result<(UnixDatagram, String)> {
    let mut random = [0u8; 8];
    let n = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
    if n != random.len() {
        return Err(io::Error::other(format!(
            "getrandom gave {n} of {} bytes",
            random.len()
        )));
    }
    let name = format!("{prefix}{:016x}", u64::from_ne_bytes(random));
    Ok((bind_receiver(&name)?, name))
}

/// Receive one datagram into `buf` without blocking (`WouldBlock` when there is none): its
/// length and the sender's pid (`None` if the kernel attached no credentials, which does not
/// happen on a socket from [`bind_receiver`]).
pub fn recv_with_sender(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<i32>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        fd,
        &mut iov,
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut sender = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmCredentials(cred) = m {
            sender = Some(cred.pid.as_raw_nonzero().get());
        }
    }
    Ok((msg.bytes, sender))
}

/// Whether `pid` is `ancestor` or one of its descendants (its parent chain in /proc reaches
/// `ancestor`). False when the chain cannot be read (a process that already exited).
pub fn is_same_or_descendant(pid: i32, ancestor: i32) -> bool {
    let mut p = pid;
    // A chain deeper than this is not a worker's process tree.
    for _ in 0..64 {
        if p == ancestor {
            return true;
        }
        if p <= 1 {
            return false;
        }
        match parent_of(p) {
            Some(pp) => p = pp,
            None => return false,
        }
    }
    false
}

/// The parent pid of `pid` from /proc/PID/stat (field 4, after the parenthesised name).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_descends_from_its_parents_and_not_from_strangers() {
        let me = std::process::id() as i32;
        let parent = parent_of(me).expect("own parent");
        assert!(is_same_or_descendant(me, me));
        assert!(is_same_or_descendant(me, parent));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let c = child.id() as i32;
        assert!(is_same_or_descendant(c, me));
        assert!(!is_same_or_descendant(me, c));
        assert!(!is_same_or_descendant(i32::MAX, me), "no such process");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn an_unguessable_receiver_has_its_prefix_and_a_fresh_name_each_time() {
        let prefix = format!("corral-test/notify/{}/", std::process::id());
        let (_a, first) = bind_unguessable_receiver(&prefix).expect("bind");
        let (_b, second) = bind_unguessable_receiver(&prefix).expect("bind");
        assert!(first.starts_with(&prefix) && second.starts_with(&prefix));
        assert_eq!(first.len(), prefix.len() + 16);
        assert_ne!(first, second);
    }

    #[test]
    fn datagrams_arrive_with_their_senders_pid() {
        let name = format!("corral-test/notify/{}", std::process::id());
        let rx = bind_receiver(&name).expect("bind");
        let mut buf = [0u8; 64];
        let err = recv_with_sender(std::os::fd::AsFd::as_fd(&rx), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        Notifier {
            socket: Some(format!("@{name}")),
        }
        .notify("READY=1")
        .expect("send");
        let (n, pid) = recv_with_sender(std::os::fd::AsFd::as_fd(&rx), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(pid, Some(std::process::id() as i32));
    }
}
