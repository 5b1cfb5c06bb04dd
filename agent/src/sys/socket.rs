//! The workers' listening sockets: one per worker slot, all bound to the app's address in one
//! SO_REUSEPORT group, and a classic-BPF reuseport program that lets the agent's probes reach
//! exactly one slot.
//!
//! Probe steering: a connection whose TCP source port is `PROBE_PORT_BASE + n` is handed to the
//! n-th socket of the group (sockets join the group in slot order at `listen()` and corral only
//! adds or removes slots at the end, so the n-th socket is slot n). Every other connection gets
//! an out-of-range index, which makes the kernel fall back to its hash. The eBPF steering program
//! (issue 3) replaces this program and keeps the same probe port convention.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::last_os_error;

/// Probes use TCP source ports `PROBE_PORT_BASE .. PROBE_PORT_BASE + PROBE_PORTS`: below the
/// kernel's default ephemeral range (32768-60999), so ordinary clients never get them.
pub const PROBE_PORT_BASE: u16 = 31000;
/// One probe port per slot; also the most workers one app can have.
pub const PROBE_PORTS: u16 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{address} is already in use by another process (another server, or an old agent that is still running)")]
    InUse { address: SocketAddr },
    #[error("{address} is not an address of this machine")]
    NotLocal { address: SocketAddr },
    #[error("binding {address} needs privilege (ports below 1024 need CAP_NET_BIND_SERVICE)")]
    Permission { address: SocketAddr },
    #[error("{call} on {address}: {source}")]
    Sys {
        call: &'static str,
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn setsockopt<T>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == -1 {
        Err(last_os_error())
    } else {
        Ok(())
    }
}

/// Create a blocking TCP listener on `address` with SO_REUSEPORT. Blocking on purpose: the fd's
/// file status flags are shared with the worker that inherits it, and workers that accept in
/// blocking mode must get a blocking socket.
pub fn reuseport_listener(address: SocketAddr, backlog: u32) -> Result<OwnedFd, SocketError> {
    let sys = |call| {
        move |source| SocketError::Sys {
            call,
            address,
            source,
        }
    };
    let family = match address {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the fd is wrapped at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd == -1 {
        return Err(sys("socket")(last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    setsockopt(fd.as_fd_(), libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)
        .map_err(sys("SO_REUSEADDR"))?;
    setsockopt(fd.as_fd_(), libc::SOL_SOCKET, libc::SO_REUSEPORT, &one)
        .map_err(sys("SO_REUSEPORT"))?;
    let (sa, len) = sockaddr(&address);
    // SAFETY: `sa` holds a valid sockaddr of `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    } == -1
    {
        let e = last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EADDRINUSE) => SocketError::InUse { address },
            Some(libc::EADDRNOTAVAIL) => SocketError::NotLocal { address },
            Some(libc::EACCES) | Some(libc::EPERM) => SocketError::Permission { address },
            _ => sys("bind")(e),
        });
    }
    listen(fd.as_fd_(), backlog).map_err(sys("listen"))?;
    Ok(fd)
}

/// (Re)set the accept backlog of a listening socket; Linux applies a new backlog to a socket
/// that is already listening.
pub fn listen(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    let backlog = backlog.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: plain listen(2) on a socket fd we borrow.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } == -1 {
        return Err(last_os_error());
    }
    Ok(())
}

trait AsFdExt {
    fn as_fd_(&self) -> BorrowedFd<'_>;
}
impl AsFdExt for OwnedFd {
    fn as_fd_(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

// Classic BPF opcodes (linux/filter.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MSH: u16 = 0xa0;
const BPF_SUB: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;
/// Offsets relative to the network header (the packet data starts past the TCP header here).
const SKF_NET_OFF: u32 = (-0x100000i32) as u32;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The probe-steering program for a group of this address family.
fn probe_program(v6: bool) -> Vec<libc::sock_filter> {
    let mut p = Vec::new();
    if v6 {
        // A = source port, after the fixed 40-byte IPv6 header (probes carry no extension
        // headers; anything else lands out of range or on some slot, never dropped).
        p.push(insn(
            BPF_LD | BPF_H | BPF_ABS,
            0,
            0,
            SKF_NET_OFF.wrapping_add(40),
        ));
    } else {
        // X = IPv4 header length, A = source port.
        p.push(insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, SKF_NET_OFF));
        p.push(insn(BPF_LD | BPF_H | BPF_IND, 0, 0, SKF_NET_OFF));
    }
    p.push(insn(
        BPF_ALU | BPF_SUB | BPF_K,
        0,
        0,
        PROBE_PORT_BASE as u32,
    ));
    // index >= PROBE_PORTS (including wrap-around below the base): out of range -> hash.
    p.push(insn(BPF_JMP | BPF_JGE | BPF_K, 1, 0, PROBE_PORTS as u32));
    p.push(insn(BPF_RET | BPF_A, 0, 0, 0));
    p.push(insn(BPF_RET | BPF_K, 0, 0, u32::MAX));
    p
}

/// Attach the probe-steering program to the reuseport group `fd` belongs to.
pub fn attach_probe_steering(fd: BorrowedFd<'_>, address: SocketAddr) -> Result<(), SocketError> {
    let prog = probe_program(address.is_ipv6());
    attach_classic(
        fd,
        address,
        &prog,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        "SO_ATTACH_REUSEPORT_CBPF",
    )
}

/// Attach the classic BPF program `prog` to `fd` with the socket option `option` (`name`, for
/// the error).
fn attach_classic(
    fd: BorrowedFd<'_>,
    address: SocketAddr,
    prog: &[libc::sock_filter],
    option: i32,
    name: &'static str,
) -> Result<(), SocketError> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SOL_SOCKET, option, &fprog).map_err(|source| SocketError::Sys {
        call: name,
        address,
        source,
    })
}

/// A socket filter that drops bare SYNs (SYN without ACK) and keeps everything else.
fn refuse_program(v6: bool) -> Vec<libc::sock_filter> {
    const BPF_AND: u16 = 0x50;
    const BPF_JEQ: u16 = 0x10;
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let mut p = Vec::new();
    if v6 {
        // A = TCP flags, after the fixed 40-byte IPv6 header.
        p.push(insn(
            BPF_LD | BPF_B | BPF_ABS,
            0,
            0,
            SKF_NET_OFF.wrapping_add(40 + TCP_FLAGS),
        ));
    } else {
        // X = IPv4 header length, A = TCP flags.
        p.push(insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, SKF_NET_OFF));
        p.push(insn(
            BPF_LD | BPF_B | BPF_IND,
            0,
            0,
            SKF_NET_OFF.wrapping_add(TCP_FLAGS),
        ));
    }
    p.push(insn(BPF_ALU | BPF_AND | BPF_K, 0, 0, SYN | ACK));
    // A bare SYN: drop (return 0 bytes); anything else: keep all of it.
    p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, SYN));
    p.push(insn(BPF_RET | BPF_K, 0, 0, 0));
    p.push(insn(BPF_RET | BPF_K, 0, 0, u32::MAX));
    p
}

/// Stop a listening socket from taking new connections while what is already in its accept
/// queue stays there to be accepted: a socket filter drops bare SYNs (the client retransmits
/// and, once the socket is closed, is refused: never accepted and then reset). Handshakes
/// already past their SYN complete. For the agent's drain at SIGTERM; undone by
/// [`accept_new_connections`].
pub fn refuse_new_connections(fd: BorrowedFd<'_>, address: SocketAddr) -> Result<(), SocketError> {
    let prog = refuse_program(address.is_ipv6());
    attach_classic(
        fd,
        address,
        &prog,
        libc::SO_ATTACH_FILTER,
        "SO_ATTACH_FILTER",
    )
}

/// Undo [`refuse_new_connections`]: an agent that crashed while draining for a stop leaves its
/// listeners refusing, and the agent that adopts them serves on. A socket without a filter is
/// left as it is.
pub fn accept_new_connections(fd: BorrowedFd<'_>, address: SocketAddr) -> Result<(), SocketError> {
    match setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_DETACH_FILTER,
        &0 as &libc::c_int,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map_err(|source| SocketError::Sys {
            call: "SO_DETACH_FILTER",
            address,
            source,
        }),
    }
}

/// The address a probe connects to for a listener on `address`: loopback for the wildcard.
pub fn probe_target(address: SocketAddr) -> SocketAddr {
    let mut target = address;
    if address.ip().is_unspecified() {
        target.set_ip(match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    target
}

/// The source address a probe for `slot` binds to.
pub fn probe_source(address: SocketAddr, slot: u32) -> Option<SocketAddr> {
    let port =
        PROBE_PORT_BASE.checked_add(u16::try_from(slot).ok().filter(|s| *s < PROBE_PORTS)?)?;
    Some(match address {
        SocketAddr::V4(_) => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        SocketAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
    })
}

/// The current accept-queue length of a listening socket (TCP_INFO's `tcpi_unacked`, which for
/// a listener is its backlog in use).
pub fn accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // struct tcp_info starts with eight u8 fields, then u32 rto, ato, snd_mss, rcv_mss,
    // unacked: unacked is at byte 24.
    const UNACKED: usize = 24;
    let mut buf = [0u8; 104];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most that much.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == -1 {
        return Err(last_os_error());
    }
    if (len as usize) < UNACKED + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TCP_INFO returned {len} bytes"),
        ));
    }
    Ok(u32::from_ne_bytes([
        buf[UNACKED],
        buf[UNACKED + 1],
        buf[UNACKED + 2],
        buf[UNACKED + 3],
    ]))
}

/// A listening unix stream socket at `path` whose file is created with mode 0600 (owner only),
/// non-blocking and close-on-exec. The mode is set on the socket before `bind` (the kernel
/// creates the file from the socket inode's mode), not through the process-wide umask, which
/// would also narrow whatever another thread creates at the same moment.
pub fn bind_unix_private(path: &std::path::Path) -> io::Result<std::os::unix::net::UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 128)?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

#[cfg(test)]
mod unix_tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_private_socket_file_is_owner_only() {
        let dir = std::env::temp_dir().join(format!("corral-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = super::bind_unix_private(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        std::os::unix::net::UnixStream::connect(&path).expect("connect");
        assert!(listener.accept().is_ok());
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
