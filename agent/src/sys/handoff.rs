//! Re-executing the agent in place (`corral reexec`): the descriptors it hands to its next
//! image survive the exec because close-on-exec is cleared on exactly those; the state that
//! names them travels in a sealed memfd whose number is in [`STATE_ENV`]. The process keeps its
//! pid, so the workers stay its children and systemd keeps its main process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::front::FrontError;

/// The environment variable with the state memfd's number; the new image removes it at once.
pub const STATE_ENV: &str = "CORRAL_HANDOFF_FD";

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{call} on descriptor {fd}: {source}")]
    Fd {
        call: &'static str,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("handed descriptor {fd}: {source}")]
    NotOpen {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("{STATE_ENV}={value:?} is not a descriptor")]
    NotADescriptor { value: OsString },
    #[error("reading the state memfd: {source}")]
    ReadState {
        #[source]
        source: io::Error,
    },
    /// Making the state memfd, or opening it again to read it.
    #[error(transparent)]
    Memfd(#[from] FrontError),
    #[error("exec {path}: a NUL byte in its arguments or environment")]
    Nul { path: PathBuf },
    #[error("exec {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn on_fd(call: &'static str, fd: RawFd) -> HandoffError {
    HandoffError::Fd {
        call,
        fd,
        source: io::Error::last_os_error(),
    }
}

/// Let descriptor `fd` survive exec (`inherit`) or close with it again. By number: the
/// supervisor collects the numbers it hands over while owning the descriptors. A number that
/// is not open fails with EBADF.
pub fn set_inherit_raw(fd: RawFd, inherit: bool) -> Result<(), HandoffError> {
    // SAFETY: F_GETFD/F_SETFD only read and change the close-on-exec flag of the number.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return Err(on_fd("fcntl(F_GETFD)", fd));
    }
    let flags = if inherit {
        flags & !libc::FD_CLOEXEC
    } else {
        flags | libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } == -1 {
        return Err(on_fd("fcntl(F_SETFD)", fd));
    }
    Ok(())
}

/// The state for the next image, in a sealed memfd (close-on-exec until [`set_inherit_raw`]).
pub fn state_memfd(bytes: &[u8]) -> Result<OwnedFd, HandoffError> {
    Ok(super::front::sealed_memfd("corral-handoff", bytes)?)
}

/// In the new image: the handed state, if this process was started by a re-exec. The
/// variable is removed, so nothing started later inherits it.
pub fn take_state() -> Option<Result<Vec<u8>, HandoffError>> {
    let value = std::env::var_os(STATE_ENV)?;
    std::env::remove_var(STATE_ENV);
    Some((|| {
        let raw: RawFd = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .filter(|fd| *fd > 2)
            .ok_or_else(|| HandoffError::NotADescriptor {
                value: value.clone(),
            })?;
        let fd = adopt(raw)?;
        let mut bytes = Vec::new();
        // A fresh description, read from the start (the old image wrote the memfd's offset to
        // its end).
        File::from(super::front::reopen(&fd)?)
            .read_to_end(&mut bytes)
            .map_err(|source| HandoffError::ReadState { source })?;
        Ok(bytes)
    })())
}

/// In the new image: take ownership of a descriptor the old image handed over (it must be
/// open), close-on-exec again so workers started later do not inherit it. Each handed number
/// must be adopted once.
pub fn adopt(raw: RawFd) -> Result<OwnedFd, HandoffError> {
    // SAFETY: F_GETFD only inspects the descriptor number.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(HandoffError::NotOpen {
            fd: raw,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the descriptor is open (checked above) and the old image handed it to this
    // image alone; the caller adopts each number once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_inherit_raw(raw, false)?;
    Ok(fd)
}

/// The binary this process runs, by path: after a package upgrade replaced it, the new file at
/// the same path (/proc/self/exe then ends in " (deleted)").
pub fn running_binary() -> Result<PathBuf, HandoffError> {
    let link = std::fs::read_link("/proc/self/exe").map_err(|source| HandoffError::Syscall {
        call: "readlink /proc/self/exe",
        source,
    })?;
    let text = link.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => link,
    })
}

/// Replace this process's image with `binary` (argv[0] and `args` as given), the environment
/// as it is plus [`STATE_ENV`] naming `state`. execve directly, not `Command::exec`, which
/// would empty the signal mask: signals blocked for the exec must stay blocked until the new
/// image has its handlers. Returns only on failure.
pub fn exec(binary: &Path, args: &[OsString], state: &OwnedFd) -> HandoffError {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |b: &[u8]| {
        CString::new(b).map_err(|_| HandoffError::Nul {
            path: binary.to_path_buf(),
        })
    };
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), HandoffError> {
        let program = cstr(binary.as_os_str().as_bytes())?;
        let arg0 = std::env::args_os()
            .next()
            .unwrap_or_else(|| binary.as_os_str().to_owned());
        let mut argv = vec![cstr(arg0.as_bytes())?];
        for a in args {
            argv.push(cstr(a.as_bytes())?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k == STATE_ENV {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstr(&kv)?);
        }
        envp.push(cstr(
            format!("{STATE_ENV}={}", state.as_raw_fd()).as_bytes(),
        )?);
        Ok((program, argv, envp))
    };
    let (program, argv, envp) = match build() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and NULL-terminated pointer arrays that outlive the call.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    HandoffError::Exec {
        path: binary.to_path_buf(),
        source: io::Error::last_os_error(),
    }
}

/// The signals the agent handles (SIGTERM, SIGINT, SIGHUP): blocked across the exec, so one
/// that arrives in between waits for the new image instead of killing the process with its
/// default action.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Block the agent's handled signals in the calling thread (the one that execs).
pub fn block_signals() -> Result<(), HandoffError> {
    let set = handled_signals();
    // SAFETY: pthread_sigmask with a valid set and no old set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    sigmask_result("pthread_sigmask(SIG_BLOCK)", r)
}

/// Unblock them again: after a failed exec, and in the new image once its handlers are in
/// place (a signal that arrived during the exec is delivered then).
pub fn unblock_signals() -> Result<(), HandoffError> {
    let set = handled_signals();
    // SAFETY: as in block_signals.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    sigmask_result("pthread_sigmask(SIG_UNBLOCK)", r)
}

/// pthread_sigmask returns the error number instead of setting errno.
fn sigmask_result(call: &'static str, r: libc::c_int) -> Result<(), HandoffError> {
    match r {
        0 => Ok(()),
        e => Err(HandoffError::Syscall {
            call,
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

/// SIGTERM to every child of this process (an unreadable handoff: workers it cannot
/// supervise). Unreaped children keep their pids, so signalling them by pid is safe.
pub fn terminate_children() {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<i32>().ok())
            });
        if ppid == Some(me) {
            // SAFETY: kill on a child of ours (see above).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}
