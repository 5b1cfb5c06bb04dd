//! The only module with `unsafe`: signals, the self-pipe, poll, accept and the listening socket.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// Set by SIGTERM/SIGINT: stop accepting, finish what is in flight, exit.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// Write end of the self-pipe; the signal handler writes one byte so poll() wakes up.
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// The signal main() sends a thread blocked in accept() to interrupt it during shutdown.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

extern "C" fn on_terminate(sig: libc::c_int) {
    // SAFETY: __errno_location() returns this thread's errno; saving and restoring it keeps the
    // interrupted code's errno intact.
    let saved_errno = unsafe { *libc::__errno_location() };
    if SHUTDOWN.swap(true, Ordering::SeqCst) && sig == libc::SIGINT {
        // A second Ctrl-C: stop draining.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives across the call. A full pipe
        // (EAGAIN, the fd is non-blocking) is fine: it is readable already.
        unsafe { libc::write(fd, ptr::from_ref(&byte).cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

extern "C" fn on_kick(_sig: libc::c_int) {
    // Nothing: being delivered is the point, it makes a blocking accept() fail with EINTR.
}

fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid (empty mask, no flags); the fields are set below.
    let mut sa: libc::sigaction = unsafe { mem::zeroed() };
    sa.sa_sigaction = handler as libc::sighandler_t;
    // No SA_RESTART: a blocking accept() in this process returns EINTR instead of resuming.
    sa.sa_flags = 0;
    // SAFETY: sa_mask is a valid sigset_t owned by `sa`.
    cvt(unsafe { libc::sigemptyset(&mut sa.sa_mask) })?;
    // SAFETY: `sa` is fully initialised; the handlers only touch atomics and call
    // async-signal-safe functions.
    cvt(unsafe { libc::sigaction(sig, &sa, ptr::null_mut()) })?;
    Ok(())
}

/// Installs the SIGTERM/SIGINT handlers and the kick handler; returns the read end of the
/// self-pipe, which becomes readable (and stays so) once a termination signal arrived.
/// With `ignore_term`, SIGTERM is ignored instead (a worker that will not stop: tests of the
/// supervisor's SIGKILL after stop_timeout).
pub fn install_signal_handlers(ignore_term: bool) -> io::Result<OwnedFd> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: pipe2 just returned these two fresh descriptors; nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end lives as long as the process: the handler may run at any time.
    WAKE_WRITE.store(std::os::fd::IntoRawFd::into_raw_fd(write), Ordering::SeqCst);
    if ignore_term {
        // SAFETY: SIG_IGN is a valid disposition for SIGTERM.
        if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    } else {
        set_handler(libc::SIGTERM, on_terminate)?;
    }
    set_handler(libc::SIGINT, on_terminate)?;
    set_handler(KICK_SIGNAL, on_kick)?;
    Ok(read)
}

/// Readiness of the (up to) two descriptors passed to [`poll2`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    pub a: bool,
    pub b: bool,
}

/// Waits until `a` or `b` is readable (or has an error or hang-up), or `timeout` passes (`None`:
/// forever). An interrupted wait returns with nothing ready: callers re-check their conditions.
pub fn poll2(a: RawFd, b: Option<RawFd>, timeout: Option<Duration>) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = match timeout {
        None => -1,
        // Round up so a wait never ends just before its deadline.
        Some(t) => t.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int,
    };
    let n = if b.is_some() { 2 } else { 1 };
    // SAFETY: `fds` holds `n` initialised pollfd entries and outlives the call.
    match cvt(unsafe { libc::poll(fds.as_mut_ptr(), n, ms) }) {
        Ok(_) => Ok(Ready {
            a: fds[0].revents != 0,
            b: b.is_some() && fds[1].revents != 0,
        }),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Ready::default()),
        Err(e) => Err(e),
    }
}

/// accept4(2) without retrying on EINTR (std's accept retries, which would defeat the kick).
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the returned fd is checked and owned at once.
    let fd = cvt(unsafe {
        libc::accept4(
            listener,
            ptr::null_mut(),
            ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 just returned this fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets O_NONBLOCK on `fd`'s open file description.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// An id for the calling thread that [`kick`] can signal.
pub fn thread_id() -> u64 {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as u64 }
}

/// Interrupts a blocking call in thread `tid` (from [`thread_id`]; the thread must still exist).
pub fn kick(tid: u64) {
    // SAFETY: callers only pass ids of threads that never exit (the accept threads park forever
    // once shutting down), so the pthread_t is valid.
    unsafe { libc::pthread_kill(tid as libc::pthread_t, KICK_SIGNAL) };
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn get_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid out-pointers of the advertised size.
    cvt(unsafe { libc::getsockopt(fd, level, name, ptr::from_mut(&mut value).cast(), &mut len) })?;
    Ok(value)
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int that outlives the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            ptr::from_ref(&value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Checks that `fd` is an inherited listening TCP socket and takes ownership of it (marking it
/// close-on-exec). The error says precisely what is wrong with it.
pub fn take_inherited_listener(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "fd {fd} is not open ({}): the socket-activation contract passes the listening socket as fd 3",
            io::Error::last_os_error()
        ));
    }
    let ty = get_int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            format!("fd {fd} is open but is not a socket")
        } else {
            format!("fd {fd}: getsockopt(SO_TYPE) failed: {e}")
        }
    })?;
    if ty != libc::SOCK_STREAM {
        return Err(format!(
            "fd {fd} is a socket of type {ty}, not a stream (SOCK_STREAM) socket"
        ));
    }
    let domain = get_int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|e| format!("fd {fd}: getsockopt(SO_DOMAIN) failed: {e}"))?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(format!(
            "fd {fd} is a socket of address family {domain}, not TCP over IPv4 or IPv6"
        ));
    }
    let listening = get_int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .map_err(|e| format!("fd {fd}: getsockopt(SO_ACCEPTCONN) failed: {e}"))?;
    if listening == 0 {
        return Err(format!(
            "fd {fd} is a TCP socket but not listening (listen() was not called on it)"
        ));
    }
    // SAFETY: F_SETFD on an open descriptor; FD_CLOEXEC is a per-descriptor flag, so this does
    // not affect other processes sharing the socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!(
            "fd {fd}: fcntl(F_SETFD) failed: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process uses it:
    // this is the one place that takes ownership of the inherited socket.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// socket + SO_REUSEADDR (+ SO_REUSEPORT) + bind + listen.
pub fn bind_listener(addr: SocketAddr, reuseport: bool, backlog: i32) -> io::Result<OwnedFd> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = cvt(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket(2) just returned this fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific part is written below.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
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
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { ptr::write(ptr::from_mut(&mut storage).cast::<libc::sockaddr_in>(), sin) };
            mem::size_of::<libc::sockaddr_in>()
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
            // SAFETY: as above.
            unsafe {
                ptr::write(
                    ptr::from_mut(&mut storage).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for the socket's family.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            ptr::from_ref(&storage).cast(),
            len as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on a bound socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// CLOCK_MONOTONIC in nanoseconds (the clock the benchmark reads too).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Forks a child that sleeps until a signal kills it (`fork_children=N`); returns its pid. With
/// `ignore_term` the child ignores SIGTERM, so only SIGKILL (or the cgroup's `cgroup.kill`)
/// ends it. The parent never waits for it: it stays in the worker's cgroup, counting against
/// pids.max, until something kills it.
///
/// The child runs only async-signal-safe calls (this process has other threads, whose locks
/// may be held at the fork): signal dispositions back to default, the signal mask emptied,
/// every descriptor above 2 closed (the listening socket and the client connection must not
/// stay open in it), then `pause` forever. It never returns into Rust code, so no destructor
/// runs and nothing is allocated.
pub fn fork_sleeper(ignore_term: bool) -> io::Result<u32> {
    // SAFETY: fork has no memory-safety preconditions; the child below only makes
    // async-signal-safe calls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(pid as u32);
    }
    // The child.
    let term = if ignore_term {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: signal, sigemptyset, sigprocmask, syscall(close_range), close and pause are
    // async-signal-safe and take only values and pointers to this frame's locals.
    unsafe {
        libc::signal(libc::SIGTERM, term);
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(KICK_SIGNAL, libc::SIG_DFL);
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9: close them one by one.
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        loop {
            libc::pause();
        }
    }
}
