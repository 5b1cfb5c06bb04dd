//! The only home of `unsafe` and raw syscalls. Everything above this module sees owned file
//! descriptors, plain values and one error enum per module naming the operation and its object.
#![allow(unsafe_code)]

pub mod bpf;
pub mod cgroup;
pub mod diag;
pub mod front;
pub mod handoff;
pub mod holder;
pub mod init;
pub mod inotify;
pub mod keeper;
pub mod ktls;
pub mod machine;
pub mod notify;
pub mod pidfd;
pub mod socket;
pub mod spawn;
pub mod users;

use std::io;

/// `io::Error` from the last OS error of a libc call that returned -1.
fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

/// Retry a libc call while it fails with EINTR.
fn cvt_retry<F: FnMut() -> libc::c_int>(mut f: F) -> io::Result<libc::c_int> {
    loop {
        let r = f();
        if r != -1 {
            return Ok(r);
        }
        let e = last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
