//! Kernel TLS (linux/tls.h): probing what this kernel supports, handing an established
//! connection's record crypto to it, and the record-type side channel (cmsg) for the records
//! that are not application data. corral's own code instead of the `ktls` crate: that crate
//! cannot splice and leans on rustls internals; this takes rustls's public extracted secrets.
//!
//! Setting kTLS up returns [`KtlsError`]. The data path ([`splice`], [`recv_record`],
//! [`send_record`], [`pipe`]) returns `io::Result`: it runs inside tokio's readiness loop
//! (`async_io`), which needs WouldBlock as an `io::Error`, and its callers tell EINVAL (a record
//! that is not data) from the rest by the error number.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use zeroize::Zeroizing;

/// The call [`set_ulp`] makes, as its errors name it.
const TCP_ULP_TLS: &str = "TCP_ULP \"tls\"";
/// linux/socket.h
pub const SOL_TLS: libc::c_int = 282;
/// linux/tls.h socket options and cmsg types.
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "TCP_ULP \"tls\": no such upper-layer protocol (kernel without CONFIG_TLS, or tls.ko not \
         loaded)"
    )]
    NoTlsModule,
    #[error("probe sockets: {source}")]
    ProbeSockets {
        #[source]
        source: io::Error,
    },
    #[error("{cipher}: key of {key} bytes and nonce of {nonce} (want {want} and 12)")]
    KeyLength {
        cipher: Cipher,
        key: usize,
        nonce: usize,
        want: usize,
    },
}

/// TLS record content types (RFC 8446 5.1).
pub const RECORD_ALERT: u8 = 21;
pub const RECORD_HANDSHAKE: u8 = 22;
pub const RECORD_APPLICATION_DATA: u8 = 23;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Tx,
    Rx,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::Tls12 => "TLS1.2",
            Version::Tls13 => "TLS1.3",
        })
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        })
    }
}

impl Cipher {
    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

pub const VERSIONS: [Version; 2] = [Version::Tls12, Version::Tls13];
pub const CIPHERS: [Cipher; 3] = [
    Cipher::Aes128Gcm,
    Cipher::Aes256Gcm,
    Cipher::Chacha20Poly1305,
];

/// One direction's `struct tls12_crypto_info_*`, as bytes (the layouts are packed: u16 fields
/// then byte arrays). Zeroized when dropped.
pub struct CryptoInfo(Zeroizing<Vec<u8>>);

impl CryptoInfo {
    /// From a traffic key, the 12-byte nonce base rustls extracts, and the next record's
    /// sequence number. AES-GCM splits the nonce into a 4-byte salt and an 8-byte iv;
    /// ChaCha20-Poly1305 takes all 12 as its iv and has no salt.
    pub fn new(
        version: Version,
        cipher: Cipher,
        key: &[u8],
        nonce: &[u8],
        seq: u64,
    ) -> Result<CryptoInfo, KtlsError> {
        if key.len() != cipher.key_len() || nonce.len() != 12 {
            return Err(KtlsError::KeyLength {
                cipher,
                key: key.len(),
                nonce: nonce.len(),
                want: cipher.key_len(),
            });
        }
        let mut b = Zeroizing::new(Vec::with_capacity(64));
        let v = match version {
            Version::Tls12 => TLS_1_2_VERSION,
            Version::Tls13 => TLS_1_3_VERSION,
        };
        let c = match cipher {
            Cipher::Aes128Gcm => TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20Poly1305 => TLS_CIPHER_CHACHA20_POLY1305,
        };
        b.extend_from_slice(&v.to_ne_bytes());
        b.extend_from_slice(&c.to_ne_bytes());
        match cipher {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => {
                b.extend_from_slice(&nonce[4..12]); // iv
                b.extend_from_slice(key);
                b.extend_from_slice(&nonce[..4]); // salt
            }
            Cipher::Chacha20Poly1305 => {
                b.extend_from_slice(nonce); // iv
                b.extend_from_slice(key);
            }
        }
        b.extend_from_slice(&seq.to_be_bytes()); // rec_seq
        Ok(CryptoInfo(b))
    }
}

fn cvt(call: &'static str, r: libc::c_int) -> Result<libc::c_int, KtlsError> {
    if r == -1 {
        Err(KtlsError::Syscall {
            call,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

/// `TCP_ULP "tls"` on an established TCP socket.
pub fn set_ulp(fd: BorrowedFd<'_>) -> Result<(), KtlsError> {
    let name = b"tls";
    // SAFETY: setsockopt on a valid fd with a buffer of the length passed.
    cvt(TCP_ULP_TLS, unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The socket's upper-layer protocol ("tls" once kTLS is on; empty for none).
pub fn ulp(fd: BorrowedFd<'_>) -> Result<String, KtlsError> {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the length passed; len is updated by the kernel.
    cvt("getsockopt(TCP_ULP)", unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    let s = &buf[..(len as usize).min(buf.len())];
    let s = s.split(|b| *b == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(s).into_owned())
}

/// Hand one direction's record crypto to the kernel (after [`set_ulp`]).
pub fn set_crypto(fd: BorrowedFd<'_>, dir: Direction, info: &CryptoInfo) -> Result<(), KtlsError> {
    let (opt, call) = match dir {
        Direction::Tx => (TLS_TX, "TLS_TX"),
        Direction::Rx => (TLS_RX, "TLS_RX"),
    };
    // SAFETY: setsockopt with the crypto_info bytes and their length.
    cvt(call, unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            opt,
            info.0.as_ptr().cast(),
            info.0.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Whether `TCP_ULP "tls"` can be set on an established TCP socket here. The reason when not:
/// ENOENT means no tls module (CONFIG_TLS off, or tls.ko not loaded and this process may not
/// load it: only CAP_NET_ADMIN triggers the kernel's module autoload).
pub fn probe() -> Result<(), KtlsError> {
    let (c, _s) = loopback_pair()?;
    set_ulp(std::os::fd::AsFd::as_fd(&c)).map_err(|e| match e {
        KtlsError::Syscall { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
            KtlsError::NoTlsModule
        }
        e => e,
    })
}

fn loopback_pair() -> Result<(TcpStream, TcpStream), KtlsError> {
    let pair = || -> io::Result<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (s, _) = l.accept()?;
        Ok((c, s))
    };
    pair().map_err(|source| KtlsError::ProbeSockets { source })
}

/// What the kernel takes, per version, cipher and direction: each tried on a fresh loopback
/// connection with a zero key (nothing is sent).
pub fn matrix() -> Vec<(Version, Cipher, Direction, Result<(), KtlsError>)> {
    let mut out = Vec::new();
    for v in VERSIONS {
        for c in CIPHERS {
            for d in [Direction::Tx, Direction::Rx] {
                let r = (|| -> Result<(), KtlsError> {
                    let (sock, _peer) = loopback_pair()?;
                    let fd = std::os::fd::AsFd::as_fd(&sock);
                    set_ulp(fd)?;
                    let info = CryptoInfo::new(v, c, &vec![0; c.key_len()], &[0; 12], 0)?;
                    set_crypto(fd, d, &info)
                })();
                out.push((v, c, d, r));
            }
        }
    }
    out
}

/// splice(2) up to `len` bytes, non-blocking. `Ok(0)`: end of input.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors the caller owns, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe (read end, write end) for splicing.
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC,
    )?;
    Ok((r, w))
}

/// Read one record from a kTLS socket with its type (recvmsg with a TLS_GET_RECORD_TYPE
/// cmsg), non-blocking: what splice refuses (EINVAL) when the next record is not data.
pub fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64-aligned cmsg space for one byte of data.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg into the buffers described by msg.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = RECORD_APPLICATION_DATA;
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((record_type, n as usize))
}

/// Send one record of `record_type` (e.g. an alert) through a kTLS socket.
pub fn send_record(fd: RawFd, record_type: u8, data: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as in recv_record; CMSG_SPACE(1) fits in `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = record_type;
        let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// shutdown(SHUT_WR): a FIN after whatever is queued (a half-close).
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Write);
}

/// The alert record for close_notify: level warning (1), description close_notify (0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];
