//! corral-demo: the small HTTP/1.1 server corral supervises in its demo, tests and benchmarks.
//!
//! It follows the worker contract (SPEC.md): serve on the inherited listening socket, fd 3, when
//! `LISTEN_FDS=1` and `LISTEN_PID` is our pid. `--help` lists the flags, variables and endpoints.

#![deny(unsafe_code)]

mod http;
mod server;
#[allow(unsafe_code)]
mod sys;

use std::env;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::process::exit;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use server::{say, warn};

const USAGE: &str = "\
corral-demo: a small HTTP/1.1 server, the demo app corral supervises

USAGE:
    corral-demo                          serve the inherited socket (socket activation)
    corral-demo --listen ADDR [--reuseport] [--backlog N]
    corral-demo --help | --version

SOCKET:
    With LISTEN_FDS=1 and LISTEN_PID equal to this process's pid (the systemd socket-activation
    contract corral follows), it serves the listening socket on fd 3; LISTEN_FDNAMES is ignored.
    LISTEN_FDS set with any other LISTEN_PID is an error (exit 2), even with --listen. Without
    LISTEN_FDS it binds --listen ADDR itself.

FLAGS:
    --listen ADDR    bind and listen on ADDR (IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080)
    --reuseport      set SO_REUSEPORT before bind (several processes on one address)
    --backlog N      listen() backlog with --listen (default 1024)
    -h, --help       print this help
    -V, --version    print the version

ENDPOINTS (any method; HEAD gets no body; every response has Content-Length, X-Worker, X-Pid):
    GET /healthz     200 text/plain `ok`
    GET /anything    200 application/json
                     {\"app\":..,\"worker\":N,\"pid\":N,\"listen_pid_ok\":true,\"path\":\"/..\",\"requests\":N}
                     (requests: requests this process has parsed, this one included)
    Query parameters, on any path (unknown ones are ignored; a bad value is a 400):
      delay_ms=N     sleep N ms before answering (at most 3600000)
      burn_ms=N      spin until this request used N ms of CPU time (at most 3600000)
      bytes=N        answer exactly N bytes of application/octet-stream instead (at most
                     67108864): byte i is LETTERS[(i % 251) % 52], LETTERS = A-Z then a-z
      pad=N          add \"pad\":\"xxx...\" (N x's) to the JSON body (at most 67108864)
      alloc_mb=N     before answering, allocate N MiB, write a byte in every 4 KiB page (so it
                     is resident) and keep it until the process exits (at most 65536); the JSON
                     gets \"alloc_mb\":N,\"allocated_mb\":TOTAL (all MiB kept so far). Under a
                     cgroup memory.max this is where the kernel kills the worker
      fork_children=N
                     fork N child processes that sleep until killed (at most 4096) and answer
                     200 with \"children\":[PID,...],\"forked\":N in the JSON; if a fork fails
                     (EAGAIN under a cgroup's pids.max) it stops there and adds
                     \"fork_error\":\"...\" (children and forked list those forked so far).
                     The children are never waited for; they close every descriptor above 2
      child_ignores_term=1
                     with fork_children: the children ignore SIGTERM (only SIGKILL or the
                     cgroup's cgroup.kill ends them); 0 (default): SIGTERM kills them
    Bad framing or headers get 400 (431 for a head over 16 KiB, 413 for a body over 1 GiB,
    505 for other HTTP versions) and the connection is closed. Request bodies (Content-Length
    or chunked) are read and discarded; keep-alive and pipelining are supported.

ENVIRONMENT:
    LISTEN_FDS, LISTEN_PID   socket activation, see SOCKET
    CORRAL_APP               app name reported in JSON and logs (default `demo`)
    CORRAL_WORKER            worker slot, a non-negative integer, sent as X-Worker
                             (unset: JSON null, X-Worker: -)
    DEMO_THREADS             accept/connection threads (default 16, 1..=4096); each serves one
                             connection at a time, further connections wait in the backlog
    DEMO_ACCEPT              `free-thread` (default): a thread accepts only when it is free to
                             serve, so waiting connections stay in the kernel's queue;
                             `greedy`: one thread accepts every connection as soon as it
                             arrives and queues it for the DEMO_THREADS serving threads (an
                             asyncio/uvicorn or gunicorn gthread accept loop). Sets O_NONBLOCK
                             on the listening socket (shared with any process it came from)
    DEMO_PROXY_PROTOCOL      1: every connection starts with a PROXY protocol v2 header (as
                             corral's TLS front sends with proxy_protocol = \"v2\"); the JSON
                             answer then has \"proxy_client\":\"IP:PORT\" (default 0)
    DEMO_DELAY_MS            default delay_ms for every request (default 0)
    DEMO_BURN_MS             default burn_ms for every request (default 0)
    DEMO_PAD_BYTES           default pad for JSON responses (default 0)
    DEMO_KEEPALIVE_MS        close a connection idle this long between requests (default 5000)
    DEMO_LOG_REQUESTS        1: log every request to stdout (default 0)
    DEMO_START_DELAY_MS      sleep this long before accepting anything (default 0)
    DEMO_ALLOC_MB            at start, before accepting: allocate, touch and keep this many MiB,
                             as alloc_mb=N does (default 0, at most 65536)
    DEMO_NOTIFY              1: once ready to accept, send the datagram `READY=1` to the unix
                             socket NOTIFY_SOCKET (a path, or @name for an abstract socket)
    NOTIFY_SOCKET            see DEMO_NOTIFY
    DEMO_EXIT_AFTER_MS       exit with DEMO_EXIT_CODE this long after start (default: never)
    DEMO_EXIT_CODE           exit status for DEMO_EXIT_AFTER_MS (default 1, 0..=255)
    DEMO_DRAIN_MS            on SIGTERM/SIGINT, how long in-flight requests may take to finish
                             (default 10000)
    DEMO_IGNORE_SIGTERM      1: ignore SIGTERM (a worker that will not stop when asked)
    DEMO_STARTED_FILE        append `<pid> <CLOCK_MONOTONIC ns>` to this file first thing at
                             start (the restart benchmark reads it)
    An empty variable counts as unset. A bad value is an error (exit 2).

SIGNALS:
    SIGTERM, SIGINT  stop accepting, let in-flight requests finish (up to DEMO_DRAIN_MS), close
                     idle keep-alive connections, print `corral-demo: drained, exiting`, exit 0.
                     A second SIGINT exits at once with status 130.
    SIGUSR2          used internally (interrupts a blocked accept during shutdown)

EXIT STATUS:
    0 after a graceful stop, 2 for usage, environment and socket errors, DEMO_EXIT_CODE after
    DEMO_EXIT_AFTER_MS.
";

struct Args {
    listen: Option<SocketAddr>,
    reuseport: bool,
    backlog: i32,
}

/// Everything configured through the environment.
struct Settings {
    app: String,
    worker: Option<u32>,
    threads: usize,
    greedy: bool,
    proxy_protocol: bool,
    delay_ms: u64,
    burn_ms: u64,
    pad: u64,
    keepalive_ms: u64,
    log_requests: bool,
    start_delay_ms: u64,
    notify: bool,
    exit_after_ms: Option<u64>,
    exit_code: i32,
    drain_ms: u64,
    alloc_mb: u64,
}

fn fail(msg: std::fmt::Arguments<'_>) -> ! {
    warn(format_args!("corral-demo: error: {msg}"));
    exit(2)
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: None,
        reuseport: false,
        backlog: 1024,
    };
    let mut it = env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                // Ignore write errors (`corral-demo --help | head`).
                let _ = std::io::Write::write_all(&mut std::io::stdout(), USAGE.as_bytes());
                exit(0);
            }
            "-V" | "--version" => {
                say(format_args!("corral-demo {}", env!("CARGO_PKG_VERSION")));
                exit(0);
            }
            "--listen" => {
                let v = value("--listen")?;
                args.listen = Some(v.parse().map_err(|_| {
                    format!("--listen `{v}` is not IP:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)")
                })?);
            }
            "--backlog" => {
                let v = value("--backlog")?;
                args.backlog = http::parse_bounded("--backlog", &v, 65535).and_then(|n| {
                    if n == 0 {
                        Err("--backlog must be at least 1".into())
                    } else {
                        Ok(n)
                    }
                })? as i32;
            }
            "--reuseport" if inline.is_none() => args.reuseport = true,
            _ => return Err(format!("unknown argument `{arg}` (see --help)")),
        }
    }
    Ok(args)
}

fn env_var(name: &str) -> Result<Option<String>, String> {
    match env::var(name) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(env::VarError::NotPresent) => Ok(None),
        Err(env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

fn env_num(name: &str, default: u64, max: u64) -> Result<u64, String> {
    match env_var(name)? {
        None => Ok(default),
        Some(v) => http::parse_bounded(name, &v, max),
    }
}

fn env_bool(name: &str) -> Result<bool, String> {
    match env_var(name)?.as_deref() {
        None | Some("0" | "false" | "no") => Ok(false),
        Some("1" | "true" | "yes") => Ok(true),
        Some(v) => Err(format!("{name} must be 1 or 0, got `{v}`")),
    }
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let worker = match env_var("CORRAL_WORKER")? {
            None => None,
            Some(v) => Some(
                http::parse_bounded("CORRAL_WORKER", &v, u64::from(u32::MAX))
                    .map_err(|e| format!("{e} (the worker's 0-based slot)"))?
                    as u32,
            ),
        };
        let threads = env_num("DEMO_THREADS", 16, 4096)?;
        if threads == 0 {
            return Err("DEMO_THREADS must be at least 1".into());
        }
        Ok(Settings {
            app: env_var("CORRAL_APP")?.unwrap_or_else(|| "demo".into()),
            worker,
            threads: threads as usize,
            proxy_protocol: env_bool("DEMO_PROXY_PROTOCOL")?,
            greedy: match env_var("DEMO_ACCEPT")?.as_deref() {
                None | Some("free-thread") => false,
                Some("greedy") => true,
                Some(v) => {
                    return Err(format!(
                        "DEMO_ACCEPT must be `free-thread` or `greedy`, got `{v}`"
                    ))
                }
            },
            delay_ms: env_num("DEMO_DELAY_MS", 0, http::MAX_MS)?,
            burn_ms: env_num("DEMO_BURN_MS", 0, http::MAX_MS)?,
            pad: env_num("DEMO_PAD_BYTES", 0, http::MAX_BYTES)?,
            keepalive_ms: env_num("DEMO_KEEPALIVE_MS", 5000, 86_400_000)?,
            log_requests: env_bool("DEMO_LOG_REQUESTS")?,
            start_delay_ms: env_num("DEMO_START_DELAY_MS", 0, 86_400_000)?,
            notify: env_bool("DEMO_NOTIFY")?,
            exit_after_ms: match env_var("DEMO_EXIT_AFTER_MS")? {
                None => None,
                Some(v) => Some(http::parse_bounded("DEMO_EXIT_AFTER_MS", &v, 86_400_000)?),
            },
            exit_code: env_num("DEMO_EXIT_CODE", 1, 255)? as i32,
            drain_ms: env_num("DEMO_DRAIN_MS", 10_000, 86_400_000)?,
            alloc_mb: env_num("DEMO_ALLOC_MB", 0, http::MAX_ALLOC_MB)?,
        })
    }
}

/// Where the listening socket came from.
struct Socket {
    fd: OwnedFd,
    /// For the start line: `fd 3` or `--listen`.
    origin: &'static str,
    /// Served via socket activation with a matching LISTEN_PID.
    listen_pid_ok: bool,
}

/// Applies the socket-activation contract, else `--listen`.
fn acquire_socket(args: &Args, pid: u32) -> Result<Socket, String> {
    let fds = env::var("LISTEN_FDS").ok();
    let listen_pid = env::var("LISTEN_PID").ok();
    if let Some(fds) = fds {
        let Some(listen_pid) = listen_pid else {
            return Err(format!(
                "LISTEN_FDS={fds} is set but LISTEN_PID is not: socket activation requires \
                 LISTEN_PID to be the pid of the process meant to use the sockets (this is pid {pid})"
            ));
        };
        if listen_pid.trim() != pid.to_string() {
            return Err(format!(
                "LISTEN_FDS={fds} is set but LISTEN_PID={listen_pid} is not this process's pid \
                 {pid}: the inherited sockets were meant for another process (LISTEN_PID must be \
                 set to the worker's own pid, after fork, before exec)"
            ));
        }
        if fds != "1" {
            return Err(format!(
                "LISTEN_FDS={fds}: corral-demo serves exactly one inherited socket, expected \
                 LISTEN_FDS=1 (the socket on fd 3)"
            ));
        }
        if args.listen.is_some() {
            warn(format_args!(
                "corral-demo: note: --listen ignored, serving the inherited socket on fd 3"
            ));
        }
        let fd = sys::take_inherited_listener(3).map_err(|e| format!("LISTEN_FDS=1: {e}"))?;
        return Ok(Socket {
            fd,
            origin: "fd 3",
            listen_pid_ok: true,
        });
    }
    let Some(addr) = args.listen else {
        return Err(format!(
            "no socket to serve: LISTEN_FDS is not set (corral and systemd pass the listening \
             socket as fd 3 with LISTEN_FDS=1 LISTEN_PID={pid}), and no --listen ADDR was given \
             (see --help)"
        ));
    };
    let fd = sys::bind_listener(addr, args.reuseport, args.backlog)
        .map_err(|e| format!("--listen {addr}: {e}"))?;
    Ok(Socket {
        fd,
        origin: if args.reuseport {
            "--listen --reuseport"
        } else {
            "--listen"
        },
        listen_pid_ok: false,
    })
}

fn notify_ready() -> Result<(), String> {
    let path = env_var("NOTIFY_SOCKET")?.ok_or("DEMO_NOTIFY=1 but NOTIFY_SOCKET is not set")?;
    let sock = UnixDatagram::unbound().map_err(|e| format!("NOTIFY_SOCKET: socket: {e}"))?;
    let sent = if let Some(name) = path.strip_prefix('@') {
        UnixAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else if path.starts_with('/') {
        sock.send_to(b"READY=1", &path)
    } else {
        return Err(format!(
            "NOTIFY_SOCKET={path} is neither an absolute path nor an abstract name starting with @"
        ));
    };
    sent.map(drop)
        .map_err(|e| format!("sending READY=1 to NOTIFY_SOCKET={path}: {e}"))
}

/// What ended a wait in the main thread.
enum Event {
    Elapsed,
    Signal,
    ExitTimer,
}

/// Sleeps until `until` (None: forever), a termination signal, or the DEMO_EXIT_AFTER_MS deadline.
fn wait(wake_fd: &OwnedFd, until: Option<Instant>, exit_at: Option<Instant>) -> Event {
    loop {
        if sys::SHUTDOWN.load(Ordering::SeqCst) {
            return Event::Signal;
        }
        let now = Instant::now();
        if exit_at.is_some_and(|t| now >= t) {
            return Event::ExitTimer;
        }
        if until.is_some_and(|t| now >= t) {
            return Event::Elapsed;
        }
        let next = [until, exit_at].into_iter().flatten().min();
        let _ = sys::poll2(wake_fd.as_raw_fd(), None, next.map(|t| t - now));
    }
}

fn exit_timer(settings: &Settings) -> ! {
    warn(format_args!(
        "corral-demo: DEMO_EXIT_AFTER_MS={} elapsed, exiting with status {}",
        settings.exit_after_ms.unwrap_or(0),
        settings.exit_code
    ));
    exit(settings.exit_code)
}

fn main() {
    let start = Instant::now();
    report_start();
    let args = parse_args().unwrap_or_else(|e| fail(format_args!("{e}")));
    let settings = Settings::from_env().unwrap_or_else(|e| fail(format_args!("{e}")));
    let wake_fd = sys::install_signal_handlers(env_flag("DEMO_IGNORE_SIGTERM"))
        .unwrap_or_else(|e| fail(format_args!("installing signal handlers: {e}")));
    let pid = std::process::id();
    let socket = acquire_socket(&args, pid).unwrap_or_else(|e| fail(format_args!("{e}")));
    let exit_at = settings
        .exit_after_ms
        .map(|ms| start + Duration::from_millis(ms));

    let listener = TcpListener::from(socket.fd);
    let local = listener
        .local_addr()
        .map_or_else(|e| format!("unknown address: {e}"), |a| a.to_string());
    let worker = settings
        .worker
        .map_or_else(|| "-".to_string(), |w| w.to_string());

    if settings.alloc_mb > 0 {
        let total = server::alloc_and_touch(settings.alloc_mb);
        say(format_args!(
            "corral-demo: DEMO_ALLOC_MB={}: allocated and touched {total} MiB",
            settings.alloc_mb
        ));
    }

    if settings.start_delay_ms > 0 {
        say(format_args!(
            "corral-demo: DEMO_START_DELAY_MS={}, waiting before accepting on {local}",
            settings.start_delay_ms
        ));
        let until = start + Duration::from_millis(settings.start_delay_ms);
        match wait(&wake_fd, Some(until), exit_at) {
            Event::Elapsed => {}
            Event::Signal => {
                say(format_args!("corral-demo: drained, exiting"));
                exit(0);
            }
            Event::ExitTimer => exit_timer(&settings),
        }
    }

    let server = Arc::new(server::Server {
        listener,
        wake_fd: wake_fd.as_raw_fd(),
        app: settings.app.clone(),
        worker: settings.worker,
        pid,
        listen_pid_ok: socket.listen_pid_ok,
        log_requests: settings.log_requests,
        delay_ms: settings.delay_ms,
        burn_ms: settings.burn_ms,
        pad: settings.pad,
        keepalive: Duration::from_millis(settings.keepalive_ms),
        proxy_protocol: settings.proxy_protocol,
    });
    let backlog = Arc::new(server::Backlog::default());
    if settings.greedy {
        sys::set_nonblocking(server.listener.as_raw_fd())
            .unwrap_or_else(|e| fail(format_args!("DEMO_ACCEPT=greedy: {e}")));
        let (server, backlog) = (Arc::clone(&server), Arc::clone(&backlog));
        std::thread::Builder::new()
            .name("demo-accept".into())
            .stack_size(256 * 1024)
            .spawn(move || server::greedy_accept_loop(&server, &backlog))
            .unwrap_or_else(|e| fail(format_args!("spawning the accept thread: {e}")));
    }
    for i in 0..settings.threads {
        let (server, backlog) = (Arc::clone(&server), Arc::clone(&backlog));
        let greedy = settings.greedy;
        std::thread::Builder::new()
            .name(format!("demo-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                if greedy {
                    server::serve_backlog_loop(&server, &backlog)
                } else {
                    server::accept_loop(&server)
                }
            })
            .unwrap_or_else(|e| fail(format_args!("spawning thread {i}: {e}")));
    }

    if settings.notify {
        notify_ready().unwrap_or_else(|e| fail(format_args!("{e}")));
    }
    say(format_args!(
        "corral-demo: serving app={} worker={worker} pid={pid} on {} ({local})",
        settings.app, socket.origin
    ));

    match wait(&wake_fd, None, exit_at) {
        Event::Signal => {}
        Event::ExitTimer => exit_timer(&settings),
        Event::Elapsed => unreachable!("wait without a deadline only ends on a signal or timer"),
    }

    // Draining: the accept threads saw the self-pipe and stopped; connections finish their
    // request in flight and close. Read ACCEPTOR before ACTIVE (see server::accept_one).
    let drain_until = Instant::now() + Duration::from_millis(settings.drain_ms);
    loop {
        let acceptor = server::ACCEPTOR.load(Ordering::SeqCst);
        let active = server::ACTIVE.load(Ordering::SeqCst);
        if acceptor == 0 && active == 0 {
            say(format_args!("corral-demo: drained, exiting"));
            exit(0);
        }
        if Instant::now() >= drain_until {
            say(format_args!(
                "corral-demo: DEMO_DRAIN_MS={} elapsed with {active} connection(s) still open, exiting",
                settings.drain_ms
            ));
            exit(0);
        }
        if acceptor != 0 {
            sys::kick(acceptor);
        }
        if exit_at.is_some_and(|t| Instant::now() >= t) {
            exit_timer(&settings);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// With DEMO_STARTED_FILE set, append `<pid> <CLOCK_MONOTONIC ns>` to it first thing, so a
/// benchmark can tell when this process began running after its exec.
fn report_start() {
    let Some(path) = std::env::var_os("DEMO_STARTED_FILE").filter(|p| !p.is_empty()) else {
        return;
    };
    let line = format!("{} {}\n", std::process::id(), sys::monotonic_ns());
    let written = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = written {
        fail(format_args!(
            "DEMO_STARTED_FILE {}: {e}",
            path.to_string_lossy()
        ));
    }
}

/// A `1` flag variable.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}
