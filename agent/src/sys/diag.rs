//! sock_diag (NETLINK_SOCK_DIAG) exact lookups of one TCP connection. Used to learn whether a
//! worker has accept()ed a probe connection: a connection still in a listener's accept queue
//! has no socket inode; accept() gives it one.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::last_os_error;

#[derive(Debug, thiserror::Error)]
#[error("sock_diag lookup of {local} <- {remote}: {source}")]
pub struct DiagError {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    #[source]
    pub source: io::Error,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;

fn words(addr: &SocketAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match addr {
        SocketAddr::V4(a) => w[0] = u32::from_ne_bytes(a.ip().octets()),
        SocketAddr::V6(a) => {
            for (i, c) in a.ip().octets().chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    w
}

/// What the kernel knows about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// TCP state (1 = ESTABLISHED).
    pub state: u8,
    /// 0 while the connection waits in an accept queue.
    pub inode: u32,
}

/// Look up the TCP connection whose local end is `local` and remote end `remote`. `Ok(None)`
/// when there is none.
pub fn tcp_connection(
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<Option<Connection>, DiagError> {
    let err = |source| DiagError {
        local,
        remote,
        source,
    };
    // SAFETY: plain socket(2); wrapped at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd == -1 {
        return Err(err(last_os_error()));
    }
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: InetDiagReqV2,
    }
    let request = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: libc::NLM_F_REQUEST as u16,
            seq: 1,
            pid: 0,
        },
        req: InetDiagReqV2 {
            family: if local.is_ipv6() {
                libc::AF_INET6
            } else {
                libc::AF_INET
            } as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: SockId {
                sport: local.port().to_be(),
                dport: remote.port().to_be(),
                src: words(&local),
                dst: words(&remote),
                interface: 0,
                cookie: [INET_DIAG_NOCOOKIE; 2],
            },
        },
    };
    // SAFETY: sockaddr_nl is plain data; zero is valid (pid 0 = the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `request` and `kernel` are live values of the sizes passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent == -1 {
        return Err(err(last_os_error()));
    }
    let mut buf = [0u8; 1024];
    let n = loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(err(e));
        }
    };
    if n < size_of::<NlMsgHdr>() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink reply",
        )));
    }
    // SAFETY: `buf` holds at least a header's worth of bytes; read_unaligned copes with alignment.
    let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    if hdr.kind == NLMSG_ERROR {
        let off = size_of::<NlMsgHdr>();
        if n < off + 4 {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink error",
            )));
        }
        let code = i32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
        return match -code {
            0 | libc::ENOENT => Ok(None),
            e => Err(err(io::Error::from_raw_os_error(e))),
        };
    }
    if hdr.kind != SOCK_DIAG_BY_FAMILY || n < size_of::<NlMsgHdr>() + size_of::<InetDiagMsg>() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected netlink reply type {} ({n} bytes)", hdr.kind),
        )));
    }
    // SAFETY: the reply holds a full inet_diag_msg after the header (checked above).
    let msg: InetDiagMsg =
        unsafe { std::ptr::read_unaligned(buf.as_ptr().add(size_of::<NlMsgHdr>()).cast()) };
    Ok(Some(Connection {
        state: msg.state,
        inode: msg.inode,
    }))
}

/// Whether sock_diag can see TCP connections on this machine. It answers ENOENT both for "no
/// such connection" and for "no inet_diag/tcp_diag here" (modules not loaded and not loadable),
/// so this makes a loopback connection of its own and looks it up: it must be found, still
/// queued (no inode), and after accept, accepted.
pub fn self_check() -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let server = listener.local_addr().map_err(|e| e.to_string())?;
    let client = std::net::TcpStream::connect(server).map_err(|e| e.to_string())?;
    let client_addr = client.local_addr().map_err(|e| e.to_string())?;
    match tcp_connection(server, client_addr).map_err(|e| e.to_string())? {
        Some(c) if c.inode == 0 => {}
        Some(c) => return Err(format!("a queued connection reported inode {}", c.inode)),
        None => {
            return Err(
                "sock_diag does not see TCP connections (are the inet_diag and tcp_diag \
                 kernel modules available?)"
                    .to_string(),
            )
        }
    }
    let (_accepted, _) = listener.accept().map_err(|e| e.to_string())?;
    match tcp_connection(server, client_addr).map_err(|e| e.to_string())? {
        Some(c) if c.inode != 0 => Ok(()),
        other => Err(format!("an accepted connection looked like {other:?}")),
    }
}
