//! Test harness: start the real `corral` binary on a config in a private directory, talk to it
//! over its control socket, and clean up everything it started even when a test fails.
//!
//! Binaries come from the cargo target directory next to the test executable; build them first
//! with `cargo build --workspace --bins` (`cargo xtask test` does).

use std::collections::BTreeSet;
use std::fmt::Display;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use corral::control::{AppStatus, Request, Response, WorkerStatus};
pub use corral_testkit::{
    free_port, loopback, monotonic_ns, pid_alive, started_lines, terminate, AgentTable, App,
    ChildGuard, KillOnDrop, Table, Value,
};

pub mod acme_proxy;
pub mod h2;
pub mod load;
pub mod pebble;
pub mod tls;

pub use load::{answered_connections, OpenLoad};

/// Run `cmd` to its end; it must succeed (its stderr is the failure message). `what` names it
/// if it cannot be started.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// curl over https to `name` on `port` (`name` resolved to 127.0.0.1) trusting only the
/// certificate `ca`: the body of `path`, or curl's error.
pub fn curl_https(port: u16, name: &str, ca: &Path, path: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Path of a workspace binary built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// These tests start an agent, which must be root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "host integration tests run the agent, which needs root (run them as root, as CI does)"
    );
}

/// A private directory under /tmp, world-readable so unprivileged workers can reach files in it
/// that a test makes writable; removed on drop.
pub struct TempDir(PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("corral-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A file any worker user may append to.
    pub fn shared_file(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, "").expect("create shared file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `corral agent`.
pub struct Agent {
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    seen_pids: Mutex<BTreeSet<i32>>,
    wrapper: Vec<String>,
    /// Started under [`deny_clone3`].
    no_clone3: bool,
    /// The corral binary to run, when not the build's.
    binary: Option<PathBuf>,
    /// Settings added to the `[agent]` table (see [`Agent::start_with_agent_extra`]).
    agent_extra: Table,
    /// Variables added to the agent's environment (see [`Agent::start_with_env`]).
    env: Vec<(String, String)>,
}

/// An app running corral-demo (`@DEMO@`, see [`Agent::expand`]) as `nobody`:`nogroup` in /tmp
/// on `address` with `count` workers, given 5 s to stop.
pub fn demo_app(name: &str, address: impl Display, count: usize) -> App {
    App::new(name)
        .command(["@DEMO@"])
        .user("nobody")
        .set("group", "nogroup")
        .set("workdir", "/tmp")
        .address(address)
        .count(count)
        .workers("stop_timeout", "5s")
}

/// `corral agent --config CONFIG` run to its exit, for a config it must refuse.
pub fn refused_agent(config: &Path) -> std::process::Output {
    Command::new(bin("corral"))
        .args(["agent", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run corral agent")
}

/// Write `dir/corral.toml`: `agent` (usually [`AgentTable::private`]) and then `apps` (app
/// tables, expanded by [`Agent::expand`]). Returns its path.
pub fn write_config(dir: &Path, agent: &AgentTable, apps: impl Display) -> PathBuf {
    let config = dir.join("corral.toml");
    let text = format!("{agent}{}", Agent::expand(&apps.to_string(), dir));
    std::fs::write(&config, text).expect("write config");
    config
}

impl Agent {
    /// Write `apps` (app tables, e.g. [`App`]s; `@DEMO@` is replaced by the demo binary's path,
    /// `@DIR@` by the test directory) after an [`AgentTable::private`] to this test's
    /// directory, start the agent, wait for its control socket.
    pub fn start(tag: &str, apps: impl Display) -> Agent {
        Self::configure(tag, apps, |_| {}, Table::new()).spawned()
    }

    /// Like [`Agent::start`], with `prepare` run on the test directory before the agent starts.
    pub fn start_with(tag: &str, apps: impl Display, prepare: impl FnOnce(&TempDir)) -> Agent {
        Self::configure(tag, apps, prepare, Table::new()).spawned()
    }

    /// Like [`Agent::start_with`], with `env` added to the agent's environment (a test-only
    /// variable such as `corral::front::process::TEST_START_DELAY_VAR`).
    pub fn start_with_env(
        tag: &str,
        apps: impl Display,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&TempDir),
    ) -> Agent {
        let mut agent = Self::configure(tag, apps, prepare, Table::new());
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent.spawned()
    }

    /// Like [`Agent::start`], with the agent run under `wrapper` (e.g. `setpriv ...`).
    pub fn start_wrapped(tag: &str, apps: impl Display, wrapper: &[&str]) -> Agent {
        let mut agent = Self::configure(tag, apps, |_| {}, Table::new());
        agent.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        agent.spawned()
    }

    /// Like [`Agent::start`], with `agent_extra` (settings such as `cgroup_root` or
    /// `allow_overcommit`) added to the `[agent]` table; [`Agent::rewrite_config`] keeps them.
    pub fn start_with_agent_extra(tag: &str, agent_extra: Table, apps: impl Display) -> Agent {
        Self::configure(tag, apps, |_| {}, agent_extra).spawned()
    }

    /// Like [`Agent::start`], running the agent from `binary` (a copy of corral, which a test
    /// may replace as a package upgrade does) instead of the build's.
    pub fn start_binary(tag: &str, apps: impl Display, binary: &Path) -> Agent {
        let mut agent = Self::configure(tag, apps, |_| {}, Table::new());
        agent.binary = Some(binary.to_path_buf());
        agent.spawned()
    }

    /// Like [`Agent::start_with_agent_extra`], with the agent (and so everything it starts)
    /// under a seccomp filter that fails clone3 with ENOSYS, as systemd's RestrictNamespaces=
    /// and older container profiles do.
    pub fn start_without_clone3(tag: &str, agent_extra: Table, apps: impl Display) -> Agent {
        let mut agent = Self::configure(tag, apps, |_| {}, agent_extra);
        agent.no_clone3 = true;
        agent.spawned()
    }

    /// The test directory and config, not started yet.
    fn configure(
        tag: &str,
        apps: impl Display,
        prepare: impl FnOnce(&TempDir),
        agent_extra: Table,
    ) -> Agent {
        require_root();
        remember_panic_messages();
        let dir = TempDir::new(tag);
        prepare(&dir);
        let agent_table = AgentTable::private(dir.path()).merge(agent_extra.clone());
        let config = write_config(dir.path(), &agent_table, apps);
        let socket = dir.path().join("run/control.sock");
        let log = dir.path().join("agent.log");
        Agent {
            dir,
            config,
            socket,
            log,
            child: None,
            seen_pids: Mutex::new(BTreeSet::new()),
            wrapper: Vec::new(),
            agent_extra,
            env: Vec::new(),
            no_clone3: false,
            binary: None,
        }
    }

    fn spawned(mut self) -> Agent {
        self.spawn();
        self
    }

    /// Start the agent process (again) on this directory's config; wait for its control socket.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let corral = self.binary.clone().unwrap_or_else(|| bin("corral"));
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(&corral),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&corral);
                c
            }
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        if self.no_clone3 {
            use std::os::unix::process::CommandExt;
            // SAFETY: deny_clone3 only makes a prctl call on stack memory.
            unsafe { cmd.pre_exec(deny_clone3) };
        }
        let child = cmd
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("CORRAL_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn corral agent");
        self.child = Some(child);
        // Generous: in the VM tier (qemu TCG, debug build) an agent loads each app's eBPF
        // program in some 10 s and starts its keeper (another exec of the binary).
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.try_status().is_none() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("agent exited at start with {st}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the agent (a crash) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `@DEMO@` becomes a copy of corral-demo inside `dir`: workers run as `nobody`, who may
    /// not be able to reach the target directory of a checkout under /root.
    pub fn expand(text: &str, dir: &Path) -> String {
        let demo = dir.join("corral-demo");
        if text.contains("@DEMO@") && !demo.exists() {
            std::fs::copy(bin("corral-demo"), &demo).expect("copy corral-demo");
            std::fs::set_permissions(&demo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        text.replace("@DEMO@", &demo.display().to_string())
            .replace("@DIR@", &dir.display().to_string())
    }

    /// Replace the config file (for reload tests).
    pub fn rewrite_config(&self, apps: impl Display) {
        let agent = AgentTable::private(self.dir.path()).merge(self.agent_extra.clone());
        write_config(self.dir.path(), &agent, apps);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn call(&self, request: &Request) -> Option<Response> {
        corral::control::call(&self.socket, request, Duration::from_secs(30)).ok()
    }

    pub fn try_status(&self) -> Option<Vec<AppStatus>> {
        match self.call(&Request::Status { app: None })? {
            Response::Status { apps, .. } => {
                let mut seen = self.seen_pids.lock().expect("lock");
                for a in &apps {
                    seen.extend(a.workers.iter().filter_map(|w| w.pid));
                }
                Some(apps)
            }
            _ => None,
        }
    }

    /// The status response as JSON, as the agent sent it: fields this crate's [`WorkerStatus`]
    /// does not know yet are kept. `None` if the agent does not answer.
    pub fn try_status_json(&self) -> Option<serde_json::Value> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        let mut line = serde_json::to_string(&Request::Status { app: None }).ok()?;
        line.push('\n');
        stream.write_all(line.as_bytes()).ok()?;
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut reply).ok()?;
        let v: serde_json::Value = serde_json::from_str(&reply).ok()?;
        if v.get("result").and_then(|r| r.as_str()) != Some("status") {
            return None;
        }
        let mut seen = self.seen_pids.lock().expect("lock");
        for app in v["apps"].as_array().into_iter().flatten() {
            for w in app["workers"].as_array().into_iter().flatten() {
                if let Some(pid) = w["pid"].as_i64() {
                    seen.insert(pid as i32);
                }
            }
        }
        drop(seen);
        Some(v)
    }

    /// One app's status as raw JSON (see [`Agent::try_status_json`]).
    pub fn app_json(&self, name: &str) -> serde_json::Value {
        self.try_status_json()
            .and_then(|v| {
                v["apps"]
                    .as_array()?
                    .iter()
                    .find(|a| a["name"].as_str() == Some(name))
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no status for app {name}; log:\n{}", self.log()))
    }

    /// The worker in `slot` of app `name`, as the agent reports it now.
    pub fn worker(&self, name: &str, slot: u32) -> WorkerStatus {
        self.app(name)
            .workers
            .into_iter()
            .find(|w| w.slot == slot)
            .unwrap_or_else(|| panic!("app {name} has no worker in slot {slot}"))
    }

    /// The connections app `name`'s workers have open, summed (`None`: not counted, or no
    /// answer).
    pub fn in_flight(&self, name: &str) -> Option<u32> {
        let app = self.try_status()?.into_iter().find(|a| a.name == name)?;
        app.workers.iter().map(|w| w.inflight).sum()
    }

    pub fn app(&self, name: &str) -> AppStatus {
        self.try_status()
            .and_then(|apps| apps.into_iter().find(|a| a.name == name))
            .unwrap_or_else(|| panic!("no status for app {name}; log:\n{}", self.log()))
    }

    /// Wait until `app` has exactly `n` workers, all ready; returns their pids by slot.
    pub fn wait_ready(&self, app: &str, n: usize, timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self
                .try_status()
                .and_then(|v| v.into_iter().find(|a| a.name == app))
            {
                if a.workers.len() == n && a.workers.iter().all(|w| w.state == "ready") {
                    let mut ws = a.workers;
                    ws.sort_by_key(|w| w.slot);
                    return ws.iter().map(|w| w.pid.expect("ready has pid")).collect();
                }
                if Instant::now() > deadline {
                    panic!(
                        "app {app} not {n} ready workers: {a:#?}\nlog:\n{}",
                        self.log()
                    );
                }
            } else if Instant::now() > deadline {
                panic!("no status for {app}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send SIGTERM and wait for the agent to exit; returns its exit code.
    pub fn stop(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        match terminate(&mut child, timeout) {
            Some(status) => status.code(),
            None => panic!(
                "agent did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log()
            ),
        }
    }

    /// `corral reexec` against this agent: (exit code, stdout and stderr).
    pub fn reexec(&self) -> (i32, String) {
        let (code, out, err) = self.cli(&["reexec"]);
        (code, format!("{out}{err}"))
    }

    /// `corral ARGS --socket` this agent's control socket: its exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("corral"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run corral");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The agent's own status (pid, version, re-exec generation).
    pub fn agent_info(&self) -> corral::control::AgentInfo {
        match corral::control::call(
            &self.socket,
            &Request::Status { app: None },
            Duration::from_secs(10),
        ) {
            Ok(Response::Status {
                agent: Some(info), ..
            }) => info,
            other => panic!("agent status: {other:?}"),
        }
    }

    /// Every worker pid any status call has shown.
    pub fn seen_pids(&self) -> BTreeSet<i32> {
        self.seen_pids.lock().expect("lock").clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
        // Workers outlive a crashed agent, and so does its keeper: stop them (a keeper is
        // known by its spool file, inside this test's directory).
        let spool = self.socket.with_file_name("keeper.spool");
        for pid in processes_with_arg(&spool.to_string_lossy()) {
            // SAFETY: a keeper of this test's agent (its argv names this test's directory).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for pid in self.seen_pids() {
            if pid_alive(pid) {
                // SAFETY: pid was one of this test's workers; kill is harmless if it is gone.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
            // CI shows the tail of the output: say again what failed, below the log.
            if let Some(msg) = LAST_PANIC.with(|m| m.borrow().clone()) {
                eprintln!("---- end of agent log; the test failed with ----\n{msg}");
            }
        }
    }
}

/// This process's hard open-file limit (tests start agents with a lower soft one).
pub fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

/// The soft and hard "Max open files" of `pid`, from /proc/PID/limits.
pub fn nofile_of(pid: i32) -> [String; 2] {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    [fields[3].to_string(), fields[4].to_string()]
}

/// In a child before exec: a seccomp filter that fails clone3 with ENOSYS (every other call is
/// allowed). Inherited across exec and fork, so the agent and all it starts live under it.
fn deny_clone3() -> std::io::Result<()> {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        // seccomp_data.nr
        SockFilter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        SockFilter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        SockFilter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ERRNO | libc::ENOSYS as u32,
        },
        SockFilter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ];
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: PR_SET_SECCOMP with a valid filter program that outlives the call (root has
    // CAP_SYS_ADMIN, so no_new_privs is not needed).
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

thread_local! {
    /// This thread's last panic message, for [`Agent`]'s drop to repeat below the agent log.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keep each panic's message (and location) in [`LAST_PANIC`], then report it as before.
fn remember_panic_messages() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let text = format!("{msg}{at}");
            let _ = LAST_PANIC.try_with(|m| *m.borrow_mut() = Some(text));
            report(info);
        }));
    });
}

/// A plain HTTP/1.1 GET on a new connection; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `"pid"` field of the demo app's JSON answer.
pub fn demo_pid(body: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("pid")?.as_i64().map(|p| p as i32)
}

/// Lines of /proc/PID/status as (key, value).
pub fn proc_status(pid: i32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

pub fn proc_environ(pid: i32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Where the VM tier's /init mounts cgroup2.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// A cgroup v2 directory made for one test to hand the agent as `[agent] cgroup_root`; on drop
/// everything still in it is killed and the whole tree is removed bottom-up. Create it before
/// the [`Agent`] that uses it, so the agent (dropped first) stops before the tree goes.
pub struct CgroupRootGuard {
    path: PathBuf,
}

/// In the VM: enable memory, pids and cpu for the children of the cgroup2 root (writing
/// `+memory +pids +cpu` to /sys/fs/cgroup/cgroup.subtree_control) and make
/// /sys/fs/cgroup/corral-<tag>-<pid> (empty, no controllers enabled in it: that is the agent's
/// job).
pub fn vm_cgroup_root(tag: &str) -> CgroupRootGuard {
    require_root();
    let fs = Path::new(CGROUP_FS);
    std::fs::write(fs.join("cgroup.subtree_control"), "+memory +pids +cpu").unwrap_or_else(|e| {
        panic!(
            "enabling memory, pids and cpu in {CGROUP_FS}/cgroup.subtree_control: {e} \
             (cgroup.controllers: {:?})",
            std::fs::read_to_string(fs.join("cgroup.controllers")).unwrap_or_default()
        )
    });
    let path = fs.join(format!("corral-{tag}-{}", std::process::id()));
    if path.exists() {
        remove_cgroup_tree(&path);
    }
    std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    CgroupRootGuard { path }
}

impl CgroupRootGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `cgroup_root` for the `[agent]` table.
    pub fn agent_settings(&self) -> Table {
        Table::new().set("cgroup_root", self.path.as_path())
    }
}

impl Drop for CgroupRootGuard {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
        if self.path.exists() && !std::thread::panicking() {
            eprintln!(
                "warning: cgroup {} could not be removed: {:?}",
                self.path.display(),
                cgroup_tree(&self.path)
            );
        }
    }
}

/// Kill every process in the cgroup `dir` and its descendants, wait until it is empty, then
/// rmdir the tree bottom-up. Best effort: never panics.
pub fn remove_cgroup_tree(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if !dir.exists() {
            return;
        }
        // cgroup.kill (5.14+) kills the whole subtree; otherwise SIGKILL each process.
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for d in cgroup_tree(dir) {
                for pid in cgroup_procs(&d) {
                    if pid > 1 {
                        // SAFETY: kill(2) with a positive pid listed in a test's cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        let empty = Instant::now() + Duration::from_secs(5);
        while cgroup_populated(dir) == Some(true) && Instant::now() < empty {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Deepest first: a directory's children come before it in cgroup_tree's order.
        for d in cgroup_tree(dir) {
            let _ = std::fs::remove_dir(&d);
        }
        if !dir.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every cgroup directory under `dir`, `dir` included, children before their parent.
pub fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for sub in subdirs {
            out.extend(cgroup_tree(&sub));
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

/// The cgroup directories under `dir` (not `dir` itself) as paths relative to it, e.g.
/// `app-web` and `app-web/worker-0-3`.
pub fn cgroup_subdirs(dir: &Path) -> BTreeSet<String> {
    cgroup_tree(dir)
        .into_iter()
        .filter(|d| d != dir)
        .filter_map(|d| {
            d.strip_prefix(dir)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .collect()
}

/// A cgroup interface file, trimmed (empty if it cannot be read).
pub fn cgroup_read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pids in `dir/cgroup.procs`, sorted.
pub fn cgroup_procs(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_read(dir, "cgroup.procs")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// `populated` of `dir/cgroup.events` (`None` if unreadable).
pub fn cgroup_populated(dir: &Path) -> Option<bool> {
    cgroup_read(dir, "cgroup.events")
        .lines()
        .find_map(|l| l.strip_prefix("populated ").map(|v| v.trim() == "1"))
}

/// A cgroup directory as the kernel names it in /proc/PID/cgroup: its path below
/// [`CGROUP_FS`], with a leading `/`.
pub fn cgroup_name(dir: &Path) -> String {
    match dir.strip_prefix(CGROUP_FS) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// The cgroup v2 path of `pid` (the `0::` line of /proc/PID/cgroup).
pub fn proc_cgroup(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// Processes one of whose arguments is `arg`.
pub fn processes_with_arg(arg: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}
