//! The variants under test: four corral-demo processes on one shared socket, or corral with
//! a steering mode; started, asked for their status, and stopped on drop.

use super::*;

/// A running set of four workers behind one address.
pub(crate) struct Servers {
    pub(crate) addr: SocketAddr,
    /// Worker pids in slot (spawn) order.
    pub(crate) pids: Vec<i32>,
    /// The agent's, for corral.
    pub(crate) agent_pid: Option<i32>,
    /// For corral: `corral status --json` needs it.
    pub(crate) control: Option<PathBuf>,
    /// What steers connections, as the agent reports it.
    pub(crate) steering: String,
    /// The processes this benchmark started for them (the agent, or the workers sharing a
    /// socket), stopped when the servers are dropped: an agent by SIGTERM (it stops its
    /// workers) and SIGKILL after 10 s, a worker by SIGKILL.
    pub(crate) _processes: Vec<ChildGuard>,
    /// The shared listening socket, kept open by us too while the workers run.
    pub(crate) _listener: Option<std::net::TcpListener>,
}

pub(crate) fn nobody() -> Result<(u32, u32)> {
    let name = c"nobody";
    // SAFETY: a NUL-terminated name; the result is read at once, before any other NSS call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("no user `nobody`");
    }
    // SAFETY: getpwnam returned a valid passwd entry.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// (a): one listening socket, made here, inherited by four corral-demo processes as fd 3.
pub(super) fn start_shared(demo: &Path, dir: &Path, threads: u32, accept: &str) -> Result<Servers> {
    use std::os::linux::net::SocketAddrExt;
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding the shared socket")?;
    let addr = listener.local_addr()?;
    let fd: RawFd = listener.as_raw_fd();
    // SAFETY: `fd` is our listening socket; listen() again only sets the backlog.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen on the shared socket");
    }
    let notify_name = format!("corral-bench-steering-{}", std::process::id());
    let notify = std::os::unix::net::UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(notify_name.as_bytes())?,
    )
    .context("binding the readiness socket")?;
    notify.set_read_timeout(Some(Duration::from_secs(20)))?;
    let (uid, gid) = nobody()?;
    let log = std::fs::File::create(dir.join("shared.log"))?;
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let mut cmd = Command::new("/bin/sh");
        // The shell learns its pid and execs the demo in place, so LISTEN_PID is the demo's.
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0""#)
            .arg(demo)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LISTEN_FDS", "1")
            .env("CORRAL_APP", "bench")
            .env("CORRAL_WORKER", worker.to_string())
            .env("DEMO_THREADS", threads.to_string())
            .env("DEMO_ACCEPT", accept)
            .env("DEMO_NOTIFY", "1")
            .env("NOTIFY_SOCKET", format!("@{notify_name}"))
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        // SAFETY: the closure only calls dup2/fcntl/prctl/getppid (async-signal-safe) on `fd`,
        // which stays open in the parent until every worker has been spawned, and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    // dup2(3, 3) would leave FD_CLOEXEC set: clear it instead.
                    if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                die_with_parent()
            })
        };
        workers.push(ChildGuard::new(
            cmd.spawn().context("starting a shared-socket worker")?,
        ));
    }
    let mut buf = [0u8; 256];
    for _ in 0..WORKERS {
        let n = notify
            .recv(&mut buf)
            .context("waiting for the shared-socket workers' READY=1")?;
        if !buf[..n].starts_with(b"READY=1") {
            bail!(
                "unexpected readiness datagram {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    let pids = workers.iter().map(ChildGuard::pid).collect();
    Ok(Servers {
        addr,
        pids,
        agent_pid: None,
        control: None,
        steering: "one shared accept queue (SO_REUSEADDR socket, no SO_REUSEPORT)".into(),
        _processes: workers,
        _listener: Some(listener),
    })
}

pub(crate) fn status(corral: &Path, control: &Path) -> Result<serde_json::Value> {
    let out = Command::new(corral)
        .args(["status", "--json", "--socket"])
        .arg(control)
        .stderr(Stdio::null())
        .output()
        .context("running corral status")?;
    if !out.status.success() {
        bail!("corral status failed with {}", out.status);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("corral status --json")?;
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .context("corral status lists no app")
}

/// (b)-(d): a corral agent with four workers of the demo, steered by `steering`.
pub(super) fn start_corral(
    corral: &Path,
    demo: &Path,
    dir: &Path,
    steering: &str,
    threads: u32,
    accept: &str,
) -> Result<Servers> {
    let app = App::new("bench")
        .command([demo.display().to_string()])
        .user("nobody")
        .env("DEMO_THREADS", threads)
        .env("DEMO_ACCEPT", accept);
    start_corral_with(corral, &dir.join(steering), steering, app)
}

/// A corral agent in `dir` running `app` (its command, user, env, restart...) with [`WORKERS`]
/// workers on a free loopback port, steered by `steering`. Returns when every worker is ready.
pub(crate) fn start_corral_with(
    corral: &Path,
    dir: &Path,
    steering: &str,
    app: App,
) -> Result<Servers> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let addr = loopback(free_port());
    let app = app
        .address(addr)
        .listen("steering", steering)
        .count(WORKERS);
    let config = dir.join("corral.toml");
    std::fs::write(&config, format!("{}{app}", AgentTable::private(&dir)))?;
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(corral);
    cmd.args(["agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure only calls prctl/getppid (async-signal-safe) and allocates nothing.
    unsafe { cmd.pre_exec(die_with_parent) };
    let mut agent = ChildGuard::with_grace(
        cmd.spawn().context("starting the agent")?,
        Duration::from_secs(10),
    );
    let control = dir.join("run/control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let app = loop {
        if let Some(st) = agent.try_wait() {
            bail!(
                "the {steering} agent exited with {st}; see {}",
                log_path.display()
            );
        }
        if let Ok(app) = status(corral, &control) {
            let ready = app["workers"]
                .as_array()
                .map(|w| {
                    w.iter()
                        .filter(|w| w["state"] == "ready" && w["pid"].is_i64())
                        .count()
                })
                .unwrap_or(0);
            if ready == WORKERS {
                break app;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the {steering} agent's workers were not all ready within 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut pids = vec![0; WORKERS];
    for w in app["workers"].as_array().into_iter().flatten() {
        if let (Some(slot), Some(pid)) = (w["slot"].as_u64(), w["pid"].as_i64()) {
            if let Some(p) = pids.get_mut(slot as usize) {
                *p = pid as i32;
            }
        }
    }
    let agent_pid = Some(agent.pid());
    Ok(Servers {
        addr,
        pids,
        agent_pid,
        control: Some(control),
        steering: app["steering"].as_str().unwrap_or("?").to_string(),
        _processes: vec![agent],
        _listener: None,
    })
}
