//! Starting processes: `clone3(CLONE_PIDFD)` (or `clone(CLONE_PIDFD)` where a seccomp filter
//! refuses clone3) then `execve`, so the caller gets a pidfd atomically
//! with the child and never holds a bare pid that could be reused.
//!
//! Everything the child needs (argv, envp, paths, the `LISTEN_PID=` buffer) is built before the
//! clone; the child side only makes async-signal-safe syscalls on that memory and allocates
//! nothing. A failure in the child before exec is reported through a close-on-exec pipe as
//! (stage, errno), so the caller gets "chdir /srv/api: No such file or directory" instead of a
//! mysterious exit 127.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::{fmt, io, ptr};

use super::{cvt_retry, last_os_error};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("command `{program}` not found in PATH ({path})")]
    NotFound { program: String, path: String },
    #[error("{call}: {source}")]
    Parent {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("in the new process, {stage} failed: {source}")]
    Child {
        stage: Stage,
        #[source]
        source: io::Error,
    },
}

/// Declares [`Stage`] and its inverse of `as u32` (how the parent reads the child's report)
/// from one list.
macro_rules! stages {
    ($($(#[$doc:meta])* $name:ident = $n:literal,)+) => {
        /// The child's steps before exec, in order; reported when one fails.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Stage {
            $($(#[$doc])* $name = $n,)+
        }

        impl Stage {
            fn from_u32(v: u32) -> Option<Stage> {
                match v {
                    $($n => Some(Stage::$name),)+
                    _ => None,
                }
            }
        }
    };
}

stages! {
    /// Joining the worker's cgroup by writing cgroup.procs (only when clone3, and with it
    /// CLONE_INTO_CGROUP, is refused).
    Cgroup = 14,
    Signals = 1,
    Setsid = 2,
    Fds = 3,
    Chdir = 4,
    Limits = 5,
    Bounding = 6,
    Groups = 7,
    Gid = 8,
    Uid = 9,
    Caps = 10,
    NoNewPrivs = 11,
    DeathSignal = 12,
    Exec = 13,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Cgroup => "joining the worker's cgroup (cgroup.procs)",
            Stage::Signals => "resetting signals",
            Stage::Setsid => "setsid",
            Stage::Fds => "setting up fds 0-3",
            Stage::Chdir => "chdir to the working directory",
            Stage::Limits => "restoring RLIMIT_NOFILE",
            Stage::Bounding => "dropping the capability bounding set",
            Stage::Groups => "dropping supplementary groups",
            Stage::Gid => "setresgid",
            Stage::Uid => "setresuid",
            Stage::Caps => "clearing capabilities",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::DeathSignal => "setting the parent-death signal",
            Stage::Exec => "execve",
        })
    }
}

/// stdin, stdout, stderr, the socket (3), and what `more_fds` adds.
const MAX_FDS: usize = 8;

/// What to start and how.
pub struct Spec<'a> {
    /// Absolute path of the program (see [`resolve_program`]).
    pub program: &'a Path,
    pub argv: &'a [String],
    /// The complete environment, except `LISTEN_PID` (see `listen_pid`).
    pub env: &'a [(String, String)],
    /// Add `LISTEN_PID=<the child's own pid>`, filled in by the child after the clone.
    pub listen_pid: bool,
    pub workdir: &'a Path,
    pub uid: u32,
    pub gid: u32,
    /// Becomes fd 3 in the child (the listening socket).
    pub fd3: Option<BorrowedFd<'a>>,
    /// More descriptors and the numbers they get in the child, which must be 4, 5, ... in
    /// order (a TLS front's, `crate::front::fds`); only with `fd3`.
    pub more_fds: &'a [(RawFd, BorrowedFd<'a>)],
    /// fd 0; /dev/null without one.
    pub stdin: Option<BorrowedFd<'a>>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    /// Start the child inside this cgroup (a directory fd of a cgroup v2 leaf): with
    /// CLONE_INTO_CGROUP it is never, even briefly, in the agent's own cgroup.
    pub cgroup: Option<BorrowedFd<'a>>,
    /// Killed (SIGKILL) when the agent dies: pre-start steps, whose sequence no later agent
    /// can resume. Workers are not: they outlive a crashed agent (ARCHITECTURE.md, "What
    /// survives an agent crash").
    pub die_with_agent: bool,
}

/// A started child: its pid (for display and `/proc` only) and the pidfd that owns it.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Find `program` like execvp would, in the PATH the child will get; done in the parent so that
/// "not found" is an error with a message, not an exit status.
pub fn resolve_program(program: &str, path_var: &str) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        let Ok(c) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(SpawnError::NotFound {
        program: program.to_string(),
        path: path_var.to_string(),
    })
}

fn cstring(bytes: &[u8], what: impl FnOnce() -> String) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul { what: what() })
}

/// Memory prepared for the child. Pointers in `argv_ptrs`/`envp_ptrs` point into the other
/// fields, which are never moved or changed after construction.
struct Plan {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and the NUL.
    listen_pid: Option<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    workdir: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    parent: libc::pid_t,
    die_with_agent: bool,
    /// (source, target) in the order they must be installed.
    fds: [(RawFd, RawFd); MAX_FDS],
    nfds: usize,
    report: RawFd,
    /// RLIMIT_NOFILE to restore before exec (the agent raised its own).
    nofile: Option<libc::rlimit>,
    /// The worker leaf's cgroup.procs, which the child writes itself into first when it was
    /// started with clone instead of clone3 (-1: not needed).
    cgroup_procs: RawFd,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl Plan {
    fn new(spec: &Spec<'_>, stdin: RawFd, report: RawFd) -> Result<Plan, SpawnError> {
        let program = cstring(spec.program.as_os_str().as_bytes(), || {
            format!("program path {}", spec.program.display())
        })?;
        let argv = spec
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), || format!("argument `{a}`")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(ptr::null());
        let env = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), || format!("variable {k}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut listen_pid = spec.listen_pid.then(|| {
            let mut buf = LISTEN_PID_PREFIX.to_vec();
            buf.resize(LISTEN_PID_PREFIX.len() + 24, 0);
            buf
        });
        let mut envp_ptrs: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
        if let Some(buf) = listen_pid.as_mut() {
            envp_ptrs.push(buf.as_ptr().cast());
        }
        envp_ptrs.push(ptr::null());
        let workdir = cstring(spec.workdir.as_os_str().as_bytes(), || {
            format!("working directory {}", spec.workdir.display())
        })?;
        let mut fds = [(-1, -1); MAX_FDS];
        fds[0] = (stdin, 0);
        fds[1] = (spec.stdout.as_raw_fd(), 1);
        fds[2] = (spec.stderr.as_raw_fd(), 2);
        let mut nfds = 3;
        if let Some(fd) = spec.fd3 {
            fds[3] = (fd.as_raw_fd(), 3);
            nfds = 4;
            for (i, (target, fd)) in spec.more_fds.iter().enumerate() {
                if *target != 4 + i as RawFd {
                    return Err(SpawnError::Parent {
                        call: "passing descriptors",
                        source: std::io::Error::other(format!(
                            "descriptor {target} out of order: the child gets 4, 5, ... in order"
                        )),
                    });
                }
                if nfds == MAX_FDS {
                    return Err(SpawnError::Parent {
                        call: "passing descriptors",
                        source: std::io::Error::other(format!(
                            "at most {} descriptors above 3",
                            MAX_FDS - 4
                        )),
                    });
                }
                fds[4 + i] = (fd.as_raw_fd(), 4 + i as RawFd);
                nfds = 5 + i;
            }
        }
        Ok(Plan {
            program,
            _argv: argv,
            argv_ptrs,
            _env: env,
            listen_pid,
            envp_ptrs,
            workdir,
            uid: spec.uid,
            gid: spec.gid,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            die_with_agent: spec.die_with_agent,
            fds,
            nfds,
            report,
            nofile: super::machine::child_nofile().map(|l| libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            }),
            cgroup_procs: -1,
        })
    }
}

/// linux/sched.h (kernel 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Set once clone3 has failed with ENOSYS: later spawns go straight to [`clone_legacy`].
static CLONE3_REFUSED: AtomicBool = AtomicBool::new(false);

/// clone3(CLONE_PIDFD [| CLONE_INTO_CGROUP]): 0 in the child, the pid in the parent, -1 with
/// errno set on failure.
fn clone3(spec: &Spec<'_>, pidfd: &mut RawFd) -> libc::c_long {
    let mut flags = libc::CLONE_PIDFD as u64;
    let mut cgroup = 0;
    if let Some(fd) = spec.cgroup {
        flags |= CLONE_INTO_CGROUP;
        cgroup = fd.as_raw_fd() as u64;
    }
    let mut args = CloneArgs {
        flags,
        pidfd: pidfd as *mut RawFd as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup,
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a copy of this address
    // space and continues here with a return value of 0. `args` is a valid clone_args of the
    // size passed.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// clone(CLONE_PIDFD | SIGCHLD), fork-like; the pidfd is stored through the parent_tid
/// argument. Returns like [`clone3`].
fn clone_legacy(pidfd: &mut RawFd) -> libc::c_long {
    let flags = (libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: as for clone3: no CLONE_VM, so the child runs on a copy of this address space
    // (stack 0 = the same stack pointer, as fork). The pointer is valid for the kernel's
    // write of the pidfd; child_tid and tls are unused (0), whatever their order on this
    // architecture.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0usize,
            pidfd as *mut RawFd,
            0usize,
            0usize,
        )
    }
}

/// `cgroup.procs` of the cgroup directory `dir`, for writing, close-on-exec.
fn open_cgroup_procs(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: openat relative to a valid directory fd with a C string path.
    let fd = cvt_retry(|| unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Start the process described by `spec`. Returns once the child has exec'd (or failed to).
pub fn spawn(spec: &Spec<'_>) -> Result<Child, SpawnError> {
    let parent = |call| move |source| SpawnError::Parent { call, source };
    let devnull = open_devnull().map_err(parent("open /dev/null"))?;
    let (report_r, report_w) = pipe_cloexec().map_err(parent("pipe2"))?;
    let stdin = spec.stdin.map_or(devnull.as_raw_fd(), |f| f.as_raw_fd());
    let mut plan = Plan::new(spec, stdin, report_w.as_raw_fd())?;
    let listen_pid_buf: *mut u8 = match plan.listen_pid.as_mut() {
        Some(b) => b.as_mut_ptr(),
        None => ptr::null_mut(),
    };

    let mut pidfd: RawFd = -1;
    let mut ret = if CLONE3_REFUSED.load(Ordering::Relaxed) {
        -1
    } else {
        clone3(spec, &mut pidfd)
    };
    if ret == 0 {
        // SAFETY: we are the child of a fork-like clone; `child` only makes async-signal-safe
        // syscalls on memory prepared in `plan` and never returns.
        unsafe { child(&plan, listen_pid_buf) }
    }
    // systemd's RestrictNamespaces= (and older container seccomp profiles) make clone3 fail
    // with ENOSYS, since a seccomp filter cannot read its flags from memory. clone takes
    // CLONE_PIDFD too (5.2); the child then joins its cgroup itself, briefly in the agent's
    // cgroup first, before it drops its privileges.
    let mut _cgroup_procs = None;
    if ret < 0
        && (CLONE3_REFUSED.load(Ordering::Relaxed)
            || last_os_error().raw_os_error() == Some(libc::ENOSYS))
    {
        if !CLONE3_REFUSED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "clone3 is refused with ENOSYS (a seccomp filter: systemd's \
                 RestrictNamespaces=, or a container's profile); starting processes with clone \
                 instead, which puts a worker in its cgroup just after it starts rather than at \
                 its creation"
            );
        }
        if let Some(dir) = spec.cgroup {
            let procs = open_cgroup_procs(dir)
                .map_err(parent("opening the worker cgroup's cgroup.procs"))?;
            plan.cgroup_procs = procs.as_raw_fd();
            _cgroup_procs = Some(procs);
        }
        ret = clone_legacy(&mut pidfd);
        if ret == 0 {
            // SAFETY: as above: the child of a fork-like clone.
            unsafe { child(&plan, listen_pid_buf) }
        }
        if ret < 0 {
            return Err(SpawnError::Parent {
                call: "clone (clone3 is refused with ENOSYS by a seccomp filter)",
                source: last_os_error(),
            });
        }
    }
    if ret < 0 {
        let source = last_os_error();
        return Err(SpawnError::Parent {
            call: if spec.cgroup.is_some() {
                "clone3 into the worker's cgroup"
            } else {
                "clone3"
            },
            source,
        });
    }
    let pid = ret as i32;
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd, owned by nobody else, in `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(report_w);
    drop(devnull);
    match read_report(&report_r) {
        Ok(None) => Ok(Child { pid, pidfd }),
        Ok(Some((stage, errno))) => {
            // The child has exited (or is about to) with 127: reap it.
            let _ = rustix::process::waitid(
                rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&pidfd)),
                rustix::process::WaitIdOptions::EXITED,
            );
            Err(SpawnError::Child {
                stage,
                source: io::Error::from_raw_os_error(errno),
            })
        }
        Err(e) => Err(SpawnError::Parent {
            call: "read child report",
            source: e,
        }),
    }
}

fn open_devnull() -> io::Result<OwnedFd> {
    // SAFETY: the path is a valid C string; the returned fd is owned by us.
    let fd =
        cvt_retry(|| unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_report(fd: &OwnedFd) -> io::Result<Option<(Stage, i32)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let e = last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got != buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("child report was {got} bytes, expected 8"),
        ));
    }
    let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let stage = Stage::from_u32(stage).unwrap_or(Stage::Exec);
    Ok(Some((stage, errno)))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Report `stage` and errno through the pipe and exit 127.
///
/// # Safety
/// Child side only.
unsafe fn fail(plan: &Plan, stage: Stage) -> ! {
    // SAFETY: errno location is thread-local and valid.
    let errno = unsafe { *libc::__errno_location() };
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a stack buffer to our own fd; then exiting without running destructors.
    unsafe {
        libc::write(plan.report, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child side of the clone.
///
/// # Safety
/// Must only run in the child of a fork-like clone. Allocates nothing; every call is
/// async-signal-safe.
unsafe fn child(plan: &Plan, listen_pid_buf: *mut u8) -> ! {
    macro_rules! check {
        ($stage:expr, $e:expr) => {
            if $e == -1 {
                fail(plan, $stage)
            }
        };
    }
    // SAFETY (whole body): raw libc calls with valid arguments built before the clone; see the
    // function's contract.
    unsafe {
        // Started with clone, not clone3 into the cgroup: join it before anything else.
        if plan.cgroup_procs >= 0 {
            let n = libc::write(plan.cgroup_procs, b"0".as_ptr().cast(), 1);
            check!(Stage::Cgroup, n as libc::c_int);
        }
        // Signals: empty mask, default dispositions (Rust ignores SIGPIPE; exec keeps ignores).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check!(
            Stage::Signals,
            libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut())
        );
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        check!(Stage::Setsid, libc::setsid());

        // fds: first lift every source to >= 10 so no dup2 target clobbers a later source, then
        // install 0..=4 (dup2 clears close-on-exec on the target), then mark the rest
        // close-on-exec (the report pipe must stay open until exec).
        let mut lifted = [-1; MAX_FDS];
        for (i, (src, _)) in plan.fds[..plan.nfds].iter().enumerate() {
            let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 10);
            check!(Stage::Fds, fd);
            lifted[i] = fd;
        }
        for (i, (_, target)) in plan.fds[..plan.nfds].iter().enumerate() {
            check!(Stage::Fds, libc::dup2(lifted[i], *target));
        }
        let first_free = plan.nfds as libc::c_uint;
        if libc::syscall(
            libc::SYS_close_range,
            first_free,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == -1
        {
            for fd in plan.nfds as libc::c_int..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }

        check!(Stage::Chdir, libc::chdir(plan.workdir.as_ptr()));
        libc::umask(0o022);
        if let Some(lim) = &plan.nofile {
            check!(Stage::Limits, libc::setrlimit(libc::RLIMIT_NOFILE, lim));
        }

        // Capabilities: the bounding set can only be dropped while we still hold CAP_SETPCAP.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1 {
                if *libc::__errno_location() == libc::EINVAL {
                    break; // past the kernel's last capability
                }
                fail(plan, Stage::Bounding);
            }
        }
        check!(Stage::Groups, libc::setgroups(0, ptr::null()));
        check!(Stage::Gid, libc::setresgid(plan.gid, plan.gid, plan.gid));
        check!(Stage::Uid, libc::setresuid(plan.uid, plan.uid, plan.uid));
        check!(
            Stage::Caps,
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0
            )
        );
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check!(
            Stage::Caps,
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int
        );
        check!(
            Stage::NoNewPrivs,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
        // Pre-start steps never outlive the agent: set after setresuid, which clears it.
        if plan.die_with_agent {
            check!(
                Stage::DeathSignal,
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
            );
        }
        // An agent that died while this child was being set up never learnt of it.
        if libc::getppid() != plan.parent {
            libc::_exit(127);
        }

        if !listen_pid_buf.is_null() {
            write_decimal(
                listen_pid_buf.add(LISTEN_PID_PREFIX.len()),
                libc::getpid() as u32,
            );
        }
        libc::execve(
            plan.program.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(plan, Stage::Exec)
    }
}

/// Write `v` in decimal followed by NUL at `dst` (which has room for 11 bytes).
///
/// # Safety
/// `dst` must be valid for 11 bytes of writes.
unsafe fn write_decimal(dst: *mut u8, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: i < n <= 10 < 11, within the caller's guarantee.
        unsafe { *dst.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: n <= 10, so dst + n is within the 11 bytes.
    unsafe { *dst.add(n) = 0 };
}

/// A pipe whose read end the caller watches: stdout or stderr of a child.
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_cloexec()
}

/// Display helper for an argv.
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"') {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
