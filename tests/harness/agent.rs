//! [`Agent`]: the real `corral agent` on a config in a test's private directory, driven over
//! its control socket and stopped, with every worker and keeper it started, on drop.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    bin, pid_alive, processes_with_arg, require_root, terminate, AgentTable, App, AppStatus,
    Request, Response, Table, TempDir, WorkerStatus,
};

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

    /// The agent's own measure, from each worker's spawn to its readiness ("worker ready in
    /// ..." in its log), of `app`'s worker `worker`, in milliseconds, in order of the lines.
    pub fn ready_in_ms(&self, app: &str, worker: u32) -> Vec<f64> {
        let (app, worker) = (format!("app={app} "), format!("worker={worker} "));
        self.log()
            .lines()
            .filter(|l| l.contains(&app) && l.contains(&worker))
            .filter_map(|l| l.split("worker ready in ").nth(1)?.split(' ').next())
            .map(|t| match t.strip_suffix("ms") {
                Some(ms) => ms.parse::<f64>().expect("ms"),
                None => t.strip_suffix('s').expect("s").parse::<f64>().expect("s") * 1e3,
            })
            .collect()
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
