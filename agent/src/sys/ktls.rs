//! Kernel TLS (linux/tls.h): what this kernel supports.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

/// Whether `TCP_ULP "tls"` can be set on an established TCP socket here. The reason when not:
/// ENOENT means no tls module (CONFIG_TLS off, or tls.ko not loaded and this process may not
/// load it: only CAP_NET_ADMIN triggers the kernel's module autoload).
pub fn probe() -> Result<(), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("probe socket: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let c = TcpStream::connect(addr).map_err(|e| format!("probe connect: {e}"))?;
    let _server = l.accept().map_err(|e| format!("probe accept: {e}"))?;
    let name = b"tls\0";
    // SAFETY: setsockopt on our socket with a buffer of the length passed.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            3,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "TCP_ULP \"tls\": no such upper-layer protocol (kernel without CONFIG_TLS, or tls.ko \
             not loaded)"
                .to_string()
        }
        _ => format!("TCP_ULP \"tls\": {e}"),
    })
}
